//! Arbitrary rules (patterns, levels, types, priorities), floor and paths: compiling never
//! panics, and the engine's invariants hold for every path.
#![no_main]

use agentfense::policy::{normalize, Level, Policy, Rule, RuleType};
use libfuzzer_sys::fuzz_target;

fn level(b: u8) -> Level {
    Level::ALL[usize::from(b % 4)]
}

fn kind(b: u8) -> RuleType {
    match b % 6 {
        0 => RuleType::Directory,
        1 => RuleType::File,
        _ => RuleType::Glob,
    }
}

/// Rules (pattern, level, type, priority), floor rules (pattern, level, priority), the
/// default level, paths.
type Input = (
    Vec<(String, u8, u8, i8)>,
    Vec<(String, u8, i8)>,
    u8,
    Vec<String>,
);

fuzz_target!(|input: Input| {
    let (rules, floor, default, paths) = input;
    let rules: Vec<Rule> = rules
        .into_iter()
        .take(64)
        .map(|(p, l, t, prio)| Rule::new(p, level(l), kind(t), prio.into()))
        .collect();
    let floor: Vec<Rule> = floor
        .into_iter()
        .take(16)
        .map(|(p, l, prio)| Rule::new(p, level(l), RuleType::Glob, prio.into()))
        .collect();
    let Ok(policy) = Policy::new(rules, level(default)) else {
        return;
    };
    let Ok(combined) = policy.clone().with_floor(&floor) else {
        return;
    };
    let Ok(floor_only) = Policy::new(Vec::new(), Level::Write).and_then(|p| p.with_floor(&floor))
    else {
        return;
    };
    for p in paths.iter().take(16) {
        let n = normalize(p);
        assert_eq!(normalize(&n), n);
        for is_dir in [false, true] {
            let d = combined.decide(p, is_dir);
            assert_eq!(d, combined.decide(&n, is_dir));
            let c = policy.decide(p, is_dir);
            let f = floor_only.decide(p, is_dir);
            // The floor is never loosened, nor the policy.
            assert!(d.level <= c.level && d.level <= f.level);
            assert!(!d.visible() || (c.visible() && f.visible()));
            assert!(d.rule.is_none_or(|i| i < combined.rules().len()));
            // A hidden directory that is not traversable hides everything beneath it.
            if is_dir && d.level == Level::None && !d.traversable {
                for q in paths.iter().take(4) {
                    let below = format!(
                        "{}/{}",
                        n.trim_end_matches('/'),
                        normalize(q).trim_start_matches('/')
                    );
                    if normalize(&below) != n {
                        assert!(
                            !combined.decide(&below, true).visible(),
                            "{n} closed but {below} visible"
                        );
                    }
                }
            }
        }
        let e = combined.explain(p);
        assert_eq!(e.level, combined.decide(p, true).level);
    }
});

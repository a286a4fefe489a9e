//! Property tests of the policy engine.

use std::collections::HashMap;

use agentfense::config::AdminConfig;
use agentfense::policy::{from_spec, normalize, Level, Policy, PolicySpec, Rule, RuleType};
use globset::GlobBuilder;
use proptest::prelude::*;

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("src".to_string()),
        Just("secrets".to_string()),
        Just(".git".to_string()),
        Just(".env".to_string()),
        Just("x.py".to_string()),
        Just("c.md".to_string()),
        Just("credentials.json".to_string()),
        "[a-z.]{1,4}".prop_filter("no . or ..", |s| s != ".." && s != "."),
    ]
}

/// Normalised paths of up to 5 segments.
fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 0..6).prop_map(|s| format!("/{}", s.join("/")))
}

fn pattern_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        segment(),
        Just("*".to_string()),
        Just("**".to_string()),
        Just("*.py".to_string()),
        Just("x*".to_string()),
        Just(".env*".to_string()),
        Just("{a,b}".to_string()),
        Just("[ab]".to_string()),
        Just("s?c".to_string()),
        Just("*.md".to_string()),
        Just("*x".to_string()),
        Just("a**".to_string()),
        Just("**a".to_string()),
        Just("*.p.y".to_string()),
        Just("{x*,*.py}".to_string()),
        Just("\\*".to_string()),
    ]
}

fn level() -> impl Strategy<Value = Level> {
    prop_oneof![
        Just(Level::None),
        Just(Level::View),
        Just(Level::Read),
        Just(Level::Write)
    ]
}

fn rule_type() -> impl Strategy<Value = RuleType> {
    prop_oneof![4 => Just(RuleType::Glob), 1 => Just(RuleType::Directory), 1 => Just(RuleType::File)]
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(pattern_segment(), 1..5),
        any::<bool>(),
        level(),
        rule_type(),
        -3i64..4,
    )
        .prop_map(|(segs, slash, l, t, prio)| {
            let p = format!("{}{}", if slash { "/" } else { "" }, segs.join("/"));
            Rule::new(p, l, t, prio)
        })
}

fn rules(max: usize) -> impl Strategy<Value = Vec<Rule>> {
    prop::collection::vec(rule(), 0..max)
}

fn compile(rules: Vec<Rule>, default: Level) -> Policy {
    match Policy::new(rules.clone(), default) {
        Ok(p) => p,
        Err(e) => panic!("{rules:?}: {e}"),
    }
}

/// Reference matcher: does `rule` match the normalised path `q` itself (SPEC §3), computed
/// with plain globset per path, independently of the engine's automaton.
fn reference_matches(rule: &Rule, q: &str) -> bool {
    let rel = q.trim_start_matches('/');
    let pat = rule.pattern.trim_start_matches('/').trim_end_matches('/');
    match rule.kind {
        RuleType::File | RuleType::Directory => pat == rel,
        RuleType::Glob => {
            let segs: Vec<&str> = pat.split('/').filter(|s| !s.is_empty()).collect();
            if segs.iter().all(|s| *s == "**") {
                return true;
            }
            if rel.is_empty() {
                return false;
            }
            let m = |p: &str| {
                GlobBuilder::new(p)
                    .literal_separator(true)
                    .empty_alternates(true)
                    .build()
                    .map(|g| g.compile_matcher().is_match(rel))
                    .unwrap_or(false)
            };
            if m(&segs.join("/")) {
                return true;
            }
            let base_len = segs.iter().rposition(|s| *s != "**").map_or(0, |i| i + 1);
            base_len < segs.len() && m(&segs[..base_len].join("/"))
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn normalisation_is_idempotent(p in "[a-z./]{0,30}", q in any::<String>()) {
        for s in [p, q] {
            let n = normalize(&s);
            prop_assert_eq!(&normalize(&n), &n);
            prop_assert!(n.starts_with('/'));
            prop_assert!(n == "/" || !n.ends_with('/'));
            prop_assert!(!n.contains("//"));
            prop_assert!(n.split('/').all(|s| s != "." && s != ".."));
        }
    }

    #[test]
    fn decisions_ignore_path_spelling(rs in rules(8), p in path()) {
        let policy = compile(rs, Level::None);
        let spelled = format!("{}/", p.trim_start_matches('/').replace('/', "//./"));
        prop_assert_eq!(policy.decide(&p, true), policy.decide(&spelled, true));
    }

    #[test]
    fn lowest_rule_changes_only_what_it_matches(rs in rules(8), new in rule(), default in level(), paths in prop::collection::vec(path(), 1..10)) {
        let lowest = rs.iter().map(|r| r.priority).min().unwrap_or(0);
        let new = new.with_priority(lowest - 1);
        let before = compile(rs.clone(), default);
        let mut with = rs.clone();
        with.push(new.clone());
        let after = compile(with, default);
        let alone = compile(vec![new], Level::None);
        for p in &paths {
            for is_dir in [false, true] {
                let b = before.decide(p, is_dir);
                let a = after.decide(p, is_dir);
                if b.rule.is_some() {
                    // Some rule decided: the new rule ranks below it and changes nothing.
                    prop_assert_eq!(a, b, "{} (dir {})", p, is_dir);
                }
                if alone.decide(p, is_dir).rule.is_none() {
                    // The new rule does not match: level and rule unchanged.
                    prop_assert_eq!(a.level, b.level, "{}", p);
                    prop_assert_eq!(a.rule, b.rule, "{}", p);
                }
            }
        }
    }

    #[test]
    fn floor_is_never_loosened(container in rules(8), floor in rules(5), default in level(), paths in prop::collection::vec(path(), 1..10)) {
        let combined = compile(container.clone(), default).with_floor(&floor).unwrap();
        let floor_only = compile(Vec::new(), Level::Write).with_floor(&floor).unwrap();
        let container_only = compile(container, default);
        for p in &paths {
            for is_dir in [false, true] {
                let c = combined.decide(p, is_dir);
                let f = floor_only.decide(p, is_dir);
                let o = container_only.decide(p, is_dir);
                prop_assert!(c.level <= f.level, "{}: {:?} > floor {:?}", p, c, f);
                prop_assert!(c.level <= o.level, "{}: {:?} > policy {:?}", p, c, o);
                if c.visible() {
                    prop_assert!(f.visible() && o.visible(), "{}: {:?} visible, floor {:?}, policy {:?}", p, c, f, o);
                }
                if let Some(i) = c.rule {
                    prop_assert!(i < combined.rules().len());
                }
            }
        }
    }

    #[test]
    fn hidden_untraversable_dirs_hide_everything_beneath(container in rules(8), floor in rules(3), default in level(), d in path(), below in prop::collection::vec(path(), 1..8)) {
        let policy = compile(container, default).with_floor(&floor).unwrap();
        let dd = policy.decide(&d, true);
        if dd.level == Level::None && !dd.traversable {
            for b in &below {
                if b == "/" {
                    continue;
                }
                let x = format!("{}{}", if d == "/" { "" } else { d.as_str() }, b);
                let xd = policy.decide(&x, true);
                prop_assert_eq!(xd.level, Level::None, "{} hidden and closed, but {} is {:?}", d, x, xd);
                prop_assert!(!xd.traversable, "{} hidden and closed, but {} is traversable", d, x);
            }
        }
    }

    #[test]
    fn automaton_agrees_with_globset(rs in rules(10), paths in prop::collection::vec(path(), 1..10)) {
        let policy = compile(rs.clone(), Level::None);
        for p in &paths {
            // Every ancestor-or-self of p.
            let mut prefixes = vec!["/".to_string()];
            let mut acc = String::new();
            for seg in p.split('/').filter(|s| !s.is_empty()) {
                acc.push('/');
                acc.push_str(seg);
                prefixes.push(acc.clone());
            }
            let want: Vec<usize> = (0..rs.len()).filter(|&i| prefixes.iter().any(|q| reference_matches(&rs[i], q))).collect();
            let e = policy.explain(p);
            let mut got: Vec<usize> = e.policy.matches.iter().map(|m| m.index).collect();
            got.sort_unstable();
            prop_assert_eq!(&got, &want, "{} with {:?}", p, rs);
            let d = policy.decide(p, true);
            prop_assert_eq!(d.rule, e.rule);
            prop_assert_eq!(d.rule, e.policy.matches.first().map(|m| m.index));
            prop_assert_eq!(d.level, e.level);
        }
    }

    #[test]
    fn parser_never_panics_on_bytes(bytes in any::<Vec<u8>>()) {
        let s = String::from_utf8_lossy(&bytes);
        let _ = PolicySpec::parse(&s);
        if let Ok(p) = Policy::from_json(&s) {
            let _ = p.decide("/a/b", true);
            let _ = p.explain("/a/b");
        }
        let _ = AdminConfig::from_json(&s);
    }

    #[test]
    fn engine_never_panics_on_strings(pats in prop::collection::vec((any::<String>(), rule_type(), level(), any::<i64>()), 0..6), paths in prop::collection::vec(any::<String>(), 0..6)) {
        let json = serde_json::Value::Array(pats.iter().map(|(p, t, l, prio)| serde_json::json!({
            "pattern": p, "permission": l, "type": t, "priority": prio,
        })).collect()).to_string();
        if let Ok(policy) = Policy::from_json(&json) {
            for p in &paths {
                let _ = policy.decide(p, true);
                let _ = policy.decide(p, false);
                let _ = policy.explain(p);
            }
            let _ = policy.canonical_json();
        }
    }

    #[test]
    fn glob_syntax_never_panics(pats in prop::collection::vec("[a-z*?/\\[\\]{},.!\\\\-]{0,12}", 0..6), paths in prop::collection::vec("[a-z./*]{0,12}", 0..6)) {
        let rs: Vec<Rule> = pats.into_iter().map(|p| Rule::glob(p, Level::Read)).collect();
        if let Ok(policy) = Policy::new(rs, Level::None) {
            for p in &paths {
                let _ = policy.decide(p, true);
                let _ = policy.explain(p);
            }
        }
    }

    #[test]
    fn source_never_panics(keys in prop::collection::vec(("(agentfense\\.io/)?[a-z-]{0,12}", any::<String>()), 0..4), env in prop::collection::vec("(AGENTFENSE_)?[A-Z_]{0,10}=.{0,20}", 0..4)) {
        let ann: HashMap<String, String> = keys.into_iter().collect();
        let read = |_: &str| -> std::io::Result<String> { Ok("[]".into()) };
        let _ = from_spec(&ann, &env, &AdminConfig::default(), &read);
    }
}

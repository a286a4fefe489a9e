//! The policy engine against SPEC §3: matching, ranking, coverage, traversable hidden
//! directories, presets, the admin floor, explain.

use agentfense::policy::{Level, Policy, PolicySpec, Preset, Rule, RuleType};

fn policy(json: &str) -> Policy {
    match Policy::from_json(json) {
        Ok(p) => p,
        Err(e) => panic!("{json}: {e}"),
    }
}

fn level(p: &Policy, path: &str) -> Level {
    p.decide(path, false).level
}

fn dir(p: &Policy, path: &str) -> (Level, bool) {
    let d = p.decide(path, true);
    (d.level, d.traversable)
}

fn preset(p: Preset) -> Policy {
    Policy::preset(p).unwrap()
}

#[test]
fn file_rules_match_exactly() {
    let p = policy(r#"[{"pattern": "/docs/a.md", "permission": "read", "type": "file"}]"#);
    assert_eq!(level(&p, "/docs/a.md"), Level::Read);
    assert_eq!(level(&p, "docs/a.md"), Level::Read);
    assert_eq!(level(&p, "/docs/a.md.bak"), Level::None);
    assert_eq!(level(&p, "/docs/b.md"), Level::None);
    assert_eq!(level(&p, "/other/docs/a.md"), Level::None);
    assert_eq!(level(&p, "/docs"), Level::None);
    // Literal: glob syntax in a file pattern is not syntax.
    let p = policy(r#"[{"pattern": "/a*b", "permission": "read", "type": "file"}]"#);
    assert_eq!(level(&p, "/a*b"), Level::Read);
    assert_eq!(level(&p, "/axb"), Level::None);
}

#[test]
fn directory_rules_cover_descendants() {
    for pat in ["/docs", "/docs/", "docs"] {
        let p = policy(&format!(
            r#"[{{"pattern": "{pat}", "permission": "read", "type": "directory"}}]"#
        ));
        assert_eq!(level(&p, "/docs"), Level::Read, "{pat}");
        assert_eq!(level(&p, "/docs/"), Level::Read, "{pat}");
        assert_eq!(level(&p, "/docs/a/b/c.md"), Level::Read, "{pat}");
        assert_eq!(level(&p, "/other/docs"), Level::None, "{pat}");
        assert_eq!(level(&p, "/other/docs/x"), Level::None, "{pat}");
        assert_eq!(level(&p, "/docsx"), Level::None, "{pat}");
        assert_eq!(level(&p, "/"), Level::None, "{pat}");
    }
}

#[test]
fn star_md_is_root_only_and_double_star_any_depth() {
    for pat in ["*.md", "/*.md"] {
        let p = policy(&format!(
            r#"[{{"pattern": "{pat}", "permission": "read"}}]"#
        ));
        assert_eq!(level(&p, "/README.md"), Level::Read);
        assert_eq!(level(&p, "/docs/README.md"), Level::None);
    }
    let p = policy(r#"[{"pattern": "**/*.md", "permission": "read"}]"#);
    assert_eq!(level(&p, "/README.md"), Level::Read);
    assert_eq!(level(&p, "/docs/a/b/README.md"), Level::Read);
    assert_eq!(level(&p, "/docs/a/b/README.txt"), Level::None);
}

#[test]
fn double_star_in_the_middle() {
    let p = policy(r#"[{"pattern": "/src/**/test_*.py", "permission": "read"}]"#);
    assert_eq!(level(&p, "/src/test_a.py"), Level::Read);
    assert_eq!(level(&p, "/src/x/y/test_a.py"), Level::Read);
    assert_eq!(level(&p, "/src/x/y/a.py"), Level::None);
    assert_eq!(level(&p, "/lib/test_a.py"), Level::None);
    // `*` never crosses `/`.
    let p = policy(r#"[{"pattern": "/src/*.py", "permission": "read"}]"#);
    assert_eq!(level(&p, "/src/a.py"), Level::Read);
    assert_eq!(level(&p, "/src/x/a.py"), Level::None);
}

#[test]
fn x_double_star_matches_x_itself() {
    let p = policy(r#"[{"pattern": "/x/**", "permission": "write"}]"#);
    assert_eq!(dir(&p, "/x"), (Level::Write, false));
    assert_eq!(level(&p, "/x/a/b"), Level::Write);
    assert_eq!(level(&p, "/xy"), Level::None);
    let p = policy(r#"[{"pattern": "/**", "permission": "read"}]"#);
    assert_eq!(dir(&p, "/"), (Level::Read, false));
    assert_eq!(level(&p, "/a/b"), Level::Read);
}

#[test]
fn type_ranks_file_over_directory_over_glob() {
    let p = policy(
        r#"[{"pattern": "/a/b", "permission": "view", "type": "file"},
            {"pattern": "/a", "permission": "write", "type": "directory"},
            {"pattern": "/a/**", "permission": "read"}]"#,
    );
    assert_eq!(level(&p, "/a/b"), Level::View);
    assert_eq!(p.decide("/a/b", false).rule, Some(0));
    assert_eq!(level(&p, "/a/c"), Level::Write);
    assert_eq!(p.decide("/a/c", false).rule, Some(1));
    // Priority beats type.
    let p = policy(
        r#"[{"pattern": "/a/b", "permission": "view", "type": "file"},
            {"pattern": "/a/**", "permission": "read", "priority": 1}]"#,
    );
    assert_eq!(level(&p, "/a/b"), Level::Read);
}

#[test]
fn default_is_none_and_configurable() {
    let p = policy("[]");
    assert_eq!(level(&p, "/anything"), Level::None);
    assert_eq!(dir(&p, "/"), (Level::None, false));
    assert_eq!(p.decide("/x", false).rule, None);
    let p = policy(r#"{"default": "view", "rules": [{"pattern": "/a", "permission": "none"}]}"#);
    assert_eq!(level(&p, "/b"), Level::View);
    assert_eq!(level(&p, "/a"), Level::None);
    assert_eq!(p.default_level(), Level::View);
}

#[test]
fn secrets_and_git_hidden_at_every_depth() {
    for pr in [Preset::AgentSafe, Preset::Development] {
        let p = preset(pr);
        for path in [
            "/secrets",
            "/secrets/a",
            "/a/secrets",
            "/a/b/secrets/c/d",
            "/.env",
            "/a/.env.local",
            "/k.key",
            "/a/b.pem",
        ] {
            assert_eq!(dir(&p, path), (Level::None, false), "{pr} {path}");
        }
    }
    let p = preset(Preset::AgentSafe);
    for path in [
        "/.git",
        "/.git/config",
        "/a/.git",
        "/a/.git/HEAD",
        "/credentials",
        "/a/credentials.json",
        "/credentials/aws.json",
    ] {
        assert_eq!(dir(&p, path), (Level::None, false), "{path}");
    }
    assert_eq!(level(&p, "/a/.gitignore"), Level::Read);
    assert_eq!(level(&p, "/secretsx"), Level::Read);
    let p = policy(
        r#"[{"pattern": "**/secrets/**", "permission": "none"}, {"pattern": "**/*", "permission": "read"}]"#,
    );
    // Equal priority: the pattern with more literal characters wins.
    assert_eq!(level(&p, "/secrets/x"), Level::None);
    assert_eq!(level(&p, "/x"), Level::Read);
}

#[test]
fn exposing_one_file_in_a_hidden_dir() {
    let p = policy(
        r#"[{"pattern": "**/*", "permission": "read"},
            {"pattern": "/secrets/**", "permission": "none"},
            {"pattern": "/secrets/public.key", "permission": "read"}]"#,
    );
    assert_eq!(level(&p, "/secrets/public.key"), Level::Read);
    assert_eq!(dir(&p, "/secrets"), (Level::None, true));
    assert_eq!(dir(&p, "/secrets/other"), (Level::None, false));
    assert_eq!(level(&p, "/secrets/other.key"), Level::None);
    assert_eq!(level(&p, "/secrets/public.key/x"), Level::Read);
    assert_eq!(level(&p, "/src/main.rs"), Level::Read);
    // A file is never traversable.
    assert!(!p.decide("/secrets", false).traversable);
    // Without the catch-all too.
    let p = policy(
        r#"[{"pattern": "/secrets/**", "permission": "none"}, {"pattern": "/secrets/public.key", "permission": "read"}]"#,
    );
    assert_eq!(dir(&p, "/secrets"), (Level::None, true));
    assert_eq!(dir(&p, "/"), (Level::None, true));
    assert_eq!(dir(&p, "/other"), (Level::None, false));
}

#[test]
fn python_everywhere_without_catch_all() {
    let p = policy(r#"[{"pattern": "**/*.py", "permission": "read"}]"#);
    for d in ["/", "/a", "/a/b", "/a/b/c/d/e"] {
        assert_eq!(dir(&p, d), (Level::None, true), "{d}");
    }
    assert_eq!(level(&p, "/a/b/c/x.py"), Level::Read);
    assert_eq!(level(&p, "/a/b/c/x.rs"), Level::None);
    assert_eq!(dir(&p, "/a/x.py"), (Level::Read, false));
}

#[test]
fn high_priority_hiding_is_not_traversable() {
    let p = policy(
        r#"[{"pattern": "**/secrets/**", "permission": "none", "priority": 100},
            {"pattern": "**/*", "permission": "read"}]"#,
    );
    assert_eq!(dir(&p, "/a/secrets"), (Level::None, false));
    assert_eq!(dir(&p, "/secrets"), (Level::None, false));
    assert_eq!(dir(&p, "/a/secrets/b"), (Level::None, false));
    assert_eq!(level(&p, "/a/b"), Level::Read);
}

#[test]
fn credentials_covering() {
    let p = policy(
        r#"[{"pattern": "**/credentials*", "permission": "none", "priority": 100},
            {"pattern": "**/*", "permission": "read"}]"#,
    );
    assert_eq!(level(&p, "/credentials/aws.json"), Level::None);
    assert_eq!(level(&p, "/x/credentials.d/aws.json"), Level::None);
    assert_eq!(dir(&p, "/credentials"), (Level::None, false));
    assert_eq!(level(&p, "/x/aws.json"), Level::Read);
}

#[test]
fn ties_go_to_the_later_rule() {
    let a = policy(
        r#"[{"pattern": "/a/*", "permission": "read"}, {"pattern": "/a/*", "permission": "none"}]"#,
    );
    let b = policy(
        r#"[{"pattern": "/a/*", "permission": "none"}, {"pattern": "/a/*", "permission": "read"}]"#,
    );
    for _ in 0..3 {
        assert_eq!(a.decide("/a/x", false).level, Level::None);
        assert_eq!(a.decide("/a/x", false).rule, Some(1));
        assert_eq!(b.decide("/a/x", false).level, Level::Read);
        assert_eq!(b.decide("/a/x", false).rule, Some(1));
    }
}

#[test]
fn literal_ranking() {
    // No wildcard beats wildcard.
    let p = policy(
        r#"[{"pattern": "/a/b", "permission": "none"}, {"pattern": "/a/*", "permission": "read"}]"#,
    );
    assert_eq!(level(&p, "/a/b"), Level::None);
    // Longer literal prefix.
    let p = policy(
        r#"[{"pattern": "/src/a*", "permission": "none"}, {"pattern": "/src/*", "permission": "read"}]"#,
    );
    assert_eq!(level(&p, "/src/ab"), Level::None);
    // Equal prefix: more literal characters.
    let p = policy(
        r#"[{"pattern": "**/*.py", "permission": "none"}, {"pattern": "**/*", "permission": "read"}]"#,
    );
    assert_eq!(level(&p, "/x/a.py"), Level::None);
    assert_eq!(level(&p, "/x/a.rs"), Level::Read);
    // Leading slash does not count.
    let p = policy(
        r#"[{"pattern": "a/*", "permission": "none"}, {"pattern": "/a/*", "permission": "read"}]"#,
    );
    assert_eq!(level(&p, "/a/x"), Level::Read);
}

#[test]
fn malformed_patterns_refused() {
    for pat in ["a[", "a\\", "{a,b", "", "../x", "a/../b"] {
        let json = serde_json::json!([{"pattern": pat, "permission": "read"}]).to_string();
        let e = Policy::from_json(&json).expect_err(pat);
        assert!(e.to_string().starts_with("rule 0: "), "{pat}: {e}");
    }
    assert!(Policy::new(vec![Rule::glob("a[", Level::Read)], Level::None).is_err());
}

#[test]
fn agent_safe_keys() {
    let p = preset(Preset::AgentSafe);
    assert_eq!(p.rules().len(), 9);
    assert_eq!(level(&p, "/src/main.rs"), Level::Read);
    assert_eq!(dir(&p, "/output"), (Level::Write, false));
    assert_eq!(level(&p, "/output/report.txt"), Level::Write);
    assert_eq!(level(&p, "/tmp/x/y"), Level::Write);
    assert_eq!(level(&p, "/output/.env"), Level::None);
    assert_eq!(level(&p, "/output/x.key"), Level::None);
    assert_eq!(level(&p, "/src/tmp/x"), Level::Read);
    assert_eq!(level(&p, "/a/.git/config"), Level::None);
    assert_eq!(level(&p, "/.github/workflows/ci.yml"), Level::Read);
    // The root lists (view) and is not writable.
    assert_eq!(dir(&p, "/"), (Level::None, true));
    assert_eq!(p.decide("/", true).apparent_level(), Level::View);
}

#[test]
fn other_presets() {
    let p = preset(Preset::ReadOnly);
    assert_eq!(level(&p, "/a/.env"), Level::Read);
    assert_eq!(level(&p, "/a/b"), Level::Read);
    let p = preset(Preset::FullAccess);
    assert_eq!(level(&p, "/a/secrets/x"), Level::Write);
    let p = preset(Preset::Development);
    assert_eq!(level(&p, "/src/x.rs"), Level::Write);
    assert_eq!(level(&p, "/.git/config"), Level::Write);
    assert_eq!(level(&p, "/a/.env"), Level::None);
    assert_eq!(level(&p, "/credentials"), Level::Write);
    let p = preset(Preset::ViewOnly);
    assert_eq!(level(&p, "/a/b.txt"), Level::View);
    for pr in Preset::ALL {
        assert_eq!(pr.name().parse::<Preset>().unwrap(), pr);
    }
}

#[test]
fn preset_plus_rules() {
    let p = policy(
        r#"{"preset": "agent-safe", "rules": [{"pattern": "/secrets/public.key", "permission": "read", "priority": 200}]}"#,
    );
    assert_eq!(p.rules().len(), 10);
    assert_eq!(level(&p, "/secrets/public.key"), Level::Read);
    assert_eq!(dir(&p, "/secrets"), (Level::None, true));
    assert_eq!(dir(&p, "/a/secrets"), (Level::None, false));
}

#[test]
fn floor_only_takes_away() {
    let floor = vec![
        Rule::glob("**/.ssh/**", Level::None).with_priority(10),
        Rule::glob("/data/**", Level::Read),
    ];
    let p = preset(Preset::FullAccess).with_floor(&floor).unwrap();
    assert_eq!(p.rules().len(), 3);
    assert_eq!(level(&p, "/src/a"), Level::Write);
    assert_eq!(p.decide("/src/a", false).rule, Some(0));
    assert_eq!(level(&p, "/home/.ssh/id"), Level::None);
    assert_eq!(p.decide("/home/.ssh/id", false).rule, Some(1));
    assert_eq!(level(&p, "/data/x"), Level::Read);
    assert_eq!(p.decide("/data/x", false).rule, Some(2));
    // The container cannot loosen the floor, even with a higher priority.
    let own = PolicySpec::parse(
        r#"[{"pattern": "**/.ssh/**", "permission": "write", "priority": 1000}]"#,
    )
    .unwrap();
    let p = own.compile().unwrap().with_floor(&floor).unwrap();
    assert_eq!(level(&p, "/.ssh/id"), Level::None);
    // But can restrict further.
    let p = policy(r#"[{"pattern": "**/*", "permission": "write"}, {"pattern": "/data/**", "permission": "none", "priority": 1}]"#)
        .with_floor(&floor)
        .unwrap();
    assert_eq!(level(&p, "/data/x"), Level::None);
    assert_eq!(p.decide("/data/x", false).rule, Some(1));
}

#[test]
fn floor_traversal() {
    // The floor hides /secrets but allows /secrets/public.key; the container reads all.
    let floor = vec![
        Rule::glob("/secrets/**", Level::None),
        Rule::new("/secrets/public.key", Level::Read, RuleType::File, 0),
    ];
    let p = preset(Preset::ReadOnly).with_floor(&floor).unwrap();
    assert_eq!(dir(&p, "/secrets"), (Level::None, true));
    assert_eq!(level(&p, "/secrets/public.key"), Level::Read);
    assert_eq!(dir(&p, "/secrets/x"), (Level::None, false));
    // The container hides /secrets itself: not traversable whatever the floor allows.
    let p = policy(r#"[{"pattern": "**/*", "permission": "read"}, {"pattern": "/secrets/**", "permission": "none", "priority": 5}]"#)
        .with_floor(&floor)
        .unwrap();
    assert_eq!(dir(&p, "/secrets"), (Level::None, false));
    assert_eq!(level(&p, "/secrets/public.key"), Level::None);
    // Floor hides everything beneath /vault without exception: not traversable.
    let p = preset(Preset::ReadOnly)
        .with_floor(&[Rule::glob("/vault/**", Level::None)])
        .unwrap();
    assert_eq!(dir(&p, "/vault"), (Level::None, false));
}

#[test]
fn explain_says_why() {
    let p = policy(
        r#"[{"pattern": "**/*", "permission": "read"},
            {"pattern": "/secrets/**", "permission": "none"},
            {"pattern": "/secrets/public.key", "permission": "read"}]"#,
    );
    let e = p.explain("secrets//public.key");
    assert_eq!(e.path, "/secrets/public.key");
    assert_eq!(e.level, Level::Read);
    assert_eq!(e.rule, Some(2));
    assert_eq!(e.policy.matches.len(), 3);
    assert_eq!(e.policy.matches[0].index, 2);
    assert!(e.policy.matches[0].decides);
    assert!(
        e.policy.matches[0].why.contains("highest-ranked of 3"),
        "{}",
        e.policy.matches[0].why
    );
    assert_eq!(e.policy.matches[1].index, 1);
    assert_eq!(e.policy.matches[1].matched, "/secrets/public.key");
    assert!(
        e.policy.matches[1]
            .why
            .contains("it has wildcards and the winner has none"),
        "{}",
        e.policy.matches[1].why
    );
    assert!(
        e.policy.matches[2].why.contains("it has wildcards"),
        "{}",
        e.policy.matches[2].why
    );
    let e = p.explain("/secrets/x");
    assert_eq!(e.rule, Some(1));
    assert!(
        e.policy.matches[1]
            .why
            .contains("shorter literal prefix before the first wildcard (0 < 8 characters)"),
        "{}",
        e.policy.matches[1].why
    );
    let e = p.explain("/secrets");
    assert!(e.traversable);
    assert_eq!(e.policy.traversed_by, vec![2]);
    assert!(e.summary.contains("traversable"), "{}", e.summary);
    let e = policy("[]").explain("/x");
    assert_eq!(e.rule, None);
    assert!(e.summary.contains("default none"), "{}", e.summary);
    // Ties.
    let p = policy(
        r#"[{"pattern": "/a", "permission": "read"}, {"pattern": "/a", "permission": "none"}]"#,
    );
    let e = p.explain("/a");
    assert!(
        e.policy.matches[1].why.contains("the later rule wins"),
        "{}",
        e.policy.matches[1].why
    );
    // Priority.
    let p = preset(Preset::AgentSafe);
    let e = p.explain("/output/.env");
    assert_eq!(e.level, Level::None);
    assert!(
        e.policy
            .matches
            .iter()
            .any(|m| m.why.contains("lower priority (10 < 100)")),
        "{e:#?}"
    );
    // Floor.
    let p = preset(Preset::FullAccess)
        .with_floor(&[Rule::glob("/etc/**", Level::Read)])
        .unwrap();
    let e = p.explain("/etc/x");
    assert_eq!(e.level, Level::Read);
    assert_eq!(e.rule, Some(1));
    assert!(
        e.summary.contains("admin floor lowers it to read"),
        "{}",
        e.summary
    );
}

#[test]
fn canonical_json_and_digest() {
    let p = policy(r#"[{"priority": 3, "permission": "read", "pattern": "/a"}]"#);
    assert_eq!(
        p.canonical_json(),
        r#"{"default":"none","rules":[{"pattern":"/a","permission":"read","priority":3,"type":"glob"}]}"#
    );
    assert_eq!(p.sha256().len(), 64);
    let q = policy(r#"[{"pattern": "/a", "type": "glob", "permission": "read", "priority": 3}]"#);
    assert_eq!(p.sha256(), q.sha256());
    let f = p.with_floor(&[Rule::glob("/b", Level::None)]).unwrap();
    assert!(f.canonical_json().contains(r#""floor":[{"pattern":"/b""#));
}

#[test]
fn decide_normalises() {
    let p = preset(Preset::AgentSafe);
    for (a, b) in [
        ("secrets/x", "/secrets/x"),
        ("/a//b/../.env", "/a/.env"),
        ("/../../output/x", "/output/x"),
    ] {
        assert_eq!(p.decide(a, false), p.decide(b, false), "{a}");
    }
}

#[test]
fn policy_is_shareable_across_threads() {
    fn send_sync<T: Send + Sync + Clone>() {}
    send_sync::<Policy>();
    let p = std::sync::Arc::new(preset(Preset::AgentSafe));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let p = p.clone();
            std::thread::spawn(move || {
                (0..1000).all(|j| p.decide(&format!("/t{i}/d{j}/.env"), false).level == Level::None)
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap());
    }
}

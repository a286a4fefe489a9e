//! Reading a container's fencing request from its OCI annotations and environment
//! (SPEC §2).

use std::cell::RefCell;
use std::collections::HashMap;

use agentfense::config::AdminConfig;
use agentfense::policy::source::{parse_workspaces, validate_policy_name};
use agentfense::policy::{
    from_spec, AuditLevel, DeltaMode, FenceRequest, Level, PolicyError, PolicySpec, Preset, Rule,
    Source,
};

fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn env(entries: &[&str]) -> Vec<String> {
    entries.iter().map(|s| s.to_string()).collect()
}

fn no_named(name: &str) -> std::io::Result<String> {
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("no policy {name}"),
    ))
}

fn run(a: &[(&str, &str)], e: &[&str]) -> Result<Option<FenceRequest>, PolicyError> {
    from_spec(&ann(a), &env(e), &AdminConfig::default(), &no_named)
}

fn ok(a: &[(&str, &str)], e: &[&str]) -> FenceRequest {
    match run(a, e) {
        Ok(Some(r)) => r,
        Ok(None) => panic!("not fenced"),
        Err(err) => panic!("{err}"),
    }
}

fn err(a: &[(&str, &str)], e: &[&str]) -> String {
    match run(a, e) {
        Ok(r) => panic!("accepted: {:?}", r.map(|r| r.policy_json)),
        Err(err) => err.to_string(),
    }
}

#[test]
fn nothing_asked_nothing_fenced() {
    assert!(run(&[], &["PATH=/bin", "HOME=/root"]).unwrap().is_none());
    assert!(run(
        &[
            ("io.kubernetes.cri.container-name", "x"),
            ("other.io/policy", "x")
        ],
        &[]
    )
    .unwrap()
    .is_none());
}

#[test]
fn preset_annotation() {
    let r = ok(&[("agentfense.io/preset", "agent-safe")], &["PATH=/bin"]);
    assert_eq!(r.source, Source::Annotations);
    assert_eq!(r.workspaces, vec!["/workspace"]);
    assert_eq!(r.delta, DeltaMode::Keep);
    assert_eq!(r.audit, AuditLevel::All);
    assert!(r.remove_env.is_empty());
    assert_eq!(r.policy.rules().len(), 9);
    assert_eq!(r.policy.decide("/a/.env", false).level, Level::None);
    assert_eq!(r.policy_sha256, r.policy.sha256());
    assert_eq!(r.policy_json, r.policy.canonical_json());
}

#[test]
fn inline_policy_and_settings() {
    let r = ok(
        &[
            (
                "agentfense.io/policy",
                r#"[{"pattern": "/src/**", "permission": "write"}]"#,
            ),
            ("agentfense.io/workspace", " /workspace , /data/ "),
            ("agentfense.io/delta", "commit"),
            ("agentfense.io/audit", "deny"),
        ],
        &[],
    );
    assert_eq!(r.workspaces, vec!["/workspace", "/data"]);
    assert_eq!(r.delta, DeltaMode::Commit);
    assert_eq!(r.audit, AuditLevel::Deny);
    assert_eq!(r.policy.decide("/src/a", false).level, Level::Write);
    assert_eq!(r.policy.decide("/other", false).level, Level::None);
}

#[test]
fn errors_name_the_annotation() {
    assert_eq!(
        err(&[("agentfense.io/policy", r#"[{"pattern":"a","permission":"read"},{"pattern":"b","permission":"read"},{"pattern":"c","permission":"read"},{"pattern":"d","permission":"rw"}]"#)], &[]),
        "agentfense.io/policy: rule 3: unknown permission \"rw\"; expected one of none, view, read, write"
    );
    assert_eq!(
        err(&[("agentfense.io/preset", "agent-unsafe")], &[]),
        "agentfense.io/preset: unknown preset \"agent-unsafe\"; expected one of agent-safe, read-only, full-access, development, view-only"
    );
    let e = err(
        &[(
            "agentfense.io/policy",
            r#"[{"pattern":"a[","permission":"read"}]"#,
        )],
        &[],
    );
    assert!(
        e.starts_with("agentfense.io/policy: rule 0: invalid pattern \"a[\": "),
        "{e}"
    );
    assert_eq!(
        err(&[("agentfense.io/preset", "read-only"), ("agentfense.io/delta", "save")], &[]),
        "agentfense.io/delta: unknown delta mode \"save\"; expected one of keep, commit, discard, off"
    );
    assert_eq!(
        err(
            &[
                ("agentfense.io/preset", "read-only"),
                ("agentfense.io/audit", "most")
            ],
            &[]
        ),
        "agentfense.io/audit: unknown audit level \"most\"; expected one of off, deny, write, all"
    );
    assert!(err(
        &[
            ("agentfense.io/preset", "read-only"),
            ("agentfense.io/workspace", "/")
        ],
        &[]
    )
    .starts_with("agentfense.io/workspace: "));
}

#[test]
fn unknown_keys_refused() {
    let e = err(
        &[
            ("agentfense.io/preset", "read-only"),
            ("agentfense.io/polcy", "[]"),
        ],
        &[],
    );
    assert_eq!(
        e,
        "unknown annotation \"agentfense.io/polcy\"; expected one of agentfense.io/policy, agentfense.io/preset, agentfense.io/policy-name, agentfense.io/workspace, agentfense.io/delta, agentfense.io/audit"
    );
    // Alone too: a typo must not leave the container unfenced.
    assert!(err(&[("agentfense.io/prest", "read-only")], &[]).starts_with("unknown annotation"));
    let e = err(&[], &["AGENTFENSE_PRSET=read-only"]);
    assert!(e.starts_with("unknown environment variable \"AGENTFENSE_PRSET\"; expected one of AGENTFENSE_POLICY, "), "{e}");
}

#[test]
fn settings_without_policy_refused() {
    assert_eq!(
        err(&[("agentfense.io/delta", "discard")], &[]),
        "agentfense.io/delta given but no agentfense.io/policy, agentfense.io/preset or agentfense.io/policy-name: fencing is off without a policy"
    );
    assert!(err(&[("agentfense.io/workspace", "/w")], &[])
        .starts_with("agentfense.io/workspace given but no"));
    assert!(err(&[], &["AGENTFENSE_AUDIT=all"])
        .starts_with("AGENTFENSE_AUDIT given but no AGENTFENSE_POLICY"));
}

#[test]
fn sandbox_never_fenced() {
    let r = run(
        &[
            ("io.kubernetes.cri.container-type", "sandbox"),
            ("agentfense.io/preset", "agent-safe"),
        ],
        &[],
    )
    .unwrap();
    assert!(r.is_none());
    // Even a bad request: the sandbox is not the workload.
    let r = run(
        &[
            ("io.kubernetes.cri.container-type", "sandbox"),
            ("agentfense.io/bogus", "x"),
        ],
        &[],
    )
    .unwrap();
    assert!(r.is_none());
    let r = ok(
        &[
            ("io.kubernetes.cri.container-type", "container"),
            ("agentfense.io/preset", "agent-safe"),
        ],
        &[],
    );
    assert_eq!(r.source, Source::Annotations);
}

#[test]
fn env_source_and_removal() {
    let e = [
        "PATH=/bin",
        "AGENTFENSE_PRESET=read-only",
        "AGENTFENSE_DELTA=off",
        "HOME=/root",
    ];
    let r = ok(&[], &e);
    assert_eq!(r.source, Source::Env);
    assert_eq!(r.delta, DeltaMode::Off);
    assert_eq!(r.remove_env, vec!["AGENTFENSE_PRESET", "AGENTFENSE_DELTA"]);
    assert_eq!(r.filter_env(&env(&e)), vec!["PATH=/bin", "HOME=/root"]);
    let r = ok(
        &[],
        &[
            r#"AGENTFENSE_POLICY={"preset":"agent-safe","rules":[{"pattern":"/x","permission":"write","type":"file"}]}"#,
        ],
    );
    assert_eq!(r.policy.rules().len(), 10);
    assert!(err(
        &[],
        &[
            "AGENTFENSE_PRESET=read-only",
            "AGENTFENSE_PRESET=full-access"
        ]
    )
    .contains("more than once"));
}

#[test]
fn annotations_and_env_together_refused() {
    let e = err(
        &[("agentfense.io/preset", "read-only")],
        &["AGENTFENSE_PRESET=full-access"],
    );
    assert!(e.contains("both by annotations (agentfense.io/preset) and by environment variables (AGENTFENSE_PRESET)"), "{e}");
}

#[test]
fn policy_name_is_a_name() {
    for bad in [
        "../x",
        "/etc/passwd",
        "a/b",
        "",
        ".hidden",
        "-x",
        "a..b",
        "..",
        "a\0b",
        &"a".repeat(129),
    ] {
        let called = RefCell::new(false);
        let read = |_: &str| -> std::io::Result<String> {
            *called.borrow_mut() = true;
            Ok("[]".into())
        };
        let r = from_spec(
            &ann(&[("agentfense.io/policy-name", bad)]),
            &[],
            &AdminConfig::default(),
            &read,
        );
        let e = r.expect_err(bad).to_string();
        assert!(
            e.starts_with("agentfense.io/policy-name: invalid policy name"),
            "{bad}: {e}"
        );
        assert!(!*called.borrow(), "{bad}: callback called");
        assert!(validate_policy_name(bad).is_err());
    }
    for good in ["ci", "ci-strict.v2", "A_b", "0"] {
        assert!(validate_policy_name(good).is_ok(), "{good}");
    }
}

#[test]
fn named_policy_resolved_and_combined() {
    let read = |name: &str| -> std::io::Result<String> {
        match name {
            "ci" => Ok(r#"{"preset": "read-only", "rules": [{"pattern": "/out/**", "permission": "write"}], "default": "view"}"#.into()),
            "broken" => Ok(r#"[{"pattern": "x", "permission": "rw"}]"#.into()),
            _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "not found")),
        }
    };
    let a = ann(&[
        ("agentfense.io/policy-name", "ci"),
        (
            "agentfense.io/policy",
            r#"[{"pattern": "/out/keep", "permission": "read", "type": "file"}]"#,
        ),
    ]);
    let r = from_spec(&a, &[], &AdminConfig::default(), &read)
        .unwrap()
        .unwrap();
    assert_eq!(r.policy.rules().len(), 3);
    assert_eq!(r.policy.decide("/out/x", false).level, Level::Write);
    assert_eq!(r.policy.decide("/out/keep", false).level, Level::Read);
    assert_eq!(r.policy.decide("/src", false).level, Level::Read);
    assert_eq!(r.policy.default_level(), Level::View);
    let e = from_spec(
        &ann(&[("agentfense.io/policy-name", "broken")]),
        &[],
        &AdminConfig::default(),
        &read,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(e, "agentfense.io/policy-name \"broken\": rule 0: unknown permission \"rw\"; expected one of none, view, read, write");
    let e = from_spec(
        &ann(&[("agentfense.io/policy-name", "nope")]),
        &[],
        &AdminConfig::default(),
        &read,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "agentfense.io/policy-name: cannot read the administrator's policy \"nope\": not found"
    );
}

#[test]
fn combined_and_conflicting_sources() {
    // Preset + inline: the inline rules are added after the preset's.
    let r = ok(
        &[
            ("agentfense.io/preset", "agent-safe"),
            (
                "agentfense.io/policy",
                r#"[{"pattern": "/secrets/public.key", "permission": "read", "priority": 200}]"#,
            ),
        ],
        &[],
    );
    assert_eq!(r.policy.rules().len(), 10);
    assert_eq!(
        r.policy.decide("/secrets/public.key", false).level,
        Level::Read
    );
    // Same preset twice: fine, not duplicated.
    let r = ok(
        &[
            ("agentfense.io/preset", "agent-safe"),
            ("agentfense.io/policy", r#"{"preset": "agent-safe"}"#),
        ],
        &[],
    );
    assert_eq!(r.policy.rules().len(), 9);
    // Different presets: refused.
    let e = err(
        &[
            ("agentfense.io/preset", "agent-safe"),
            ("agentfense.io/policy", r#"{"preset": "full-access"}"#),
        ],
        &[],
    );
    assert!(
        e.contains("names preset \"full-access\" but agentfense.io/preset is \"agent-safe\""),
        "{e}"
    );
    // Preset + policy-name: refused.
    let e = err(
        &[
            ("agentfense.io/preset", "agent-safe"),
            ("agentfense.io/policy-name", "ci"),
        ],
        &[],
    );
    assert!(e.contains("are both given"), "{e}");
}

#[test]
fn admin_default_and_floor() {
    let admin = AdminConfig {
        default_policy: Some(PolicySpec::preset(Preset::ReadOnly)),
        floor: vec![Rule::glob("**/.ssh/**", Level::None).with_priority(5)],
        default_delta: DeltaMode::Discard,
        default_audit: AuditLevel::Write,
        ..AdminConfig::default()
    };
    let r = from_spec(&ann(&[]), &[], &admin, &no_named)
        .unwrap()
        .unwrap();
    assert_eq!(r.source, Source::AdminDefault);
    assert_eq!(r.delta, DeltaMode::Discard);
    assert_eq!(r.audit, AuditLevel::Write);
    assert_eq!(r.policy.decide("/a", false).level, Level::Read);
    assert_eq!(r.policy.decide("/a/.ssh/id", false).level, Level::None);
    assert!(r.policy_json.contains("\"floor\""));
    // Settings without a policy use the admin default.
    let r = from_spec(
        &ann(&[("agentfense.io/delta", "commit")]),
        &[],
        &admin,
        &no_named,
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.source, Source::AdminDefault);
    assert_eq!(r.delta, DeltaMode::Commit);
    // The container's policy replaces the default but not the floor.
    let a = ann(&[(
        "agentfense.io/policy",
        r#"[{"pattern": "**", "permission": "write", "priority": 1000}]"#,
    )]);
    let r = from_spec(&a, &[], &admin, &no_named).unwrap().unwrap();
    assert_eq!(r.source, Source::Annotations);
    assert_eq!(r.policy.decide("/a", false).level, Level::Write);
    assert_eq!(r.policy.decide("/.ssh/x", false).level, Level::None);
    // Sandboxes stay unfenced even with an admin default.
    assert!(from_spec(
        &ann(&[("io.kubernetes.cri.container-type", "sandbox")]),
        &[],
        &admin,
        &no_named
    )
    .unwrap()
    .is_none());
}

#[test]
fn deterministic_digest() {
    let a = ok(&[("agentfense.io/preset", "agent-safe")], &[]);
    let b = ok(
        &[("agentfense.io/policy", r#"{"preset":"agent-safe"}"#)],
        &[],
    );
    assert_eq!(a.policy_sha256, b.policy_sha256);
    assert_eq!(a.policy_sha256.len(), 64);
    let c = ok(&[("agentfense.io/preset", "read-only")], &[]);
    assert_ne!(a.policy_sha256, c.policy_sha256);
}

#[test]
fn workspaces() {
    assert_eq!(parse_workspaces("/workspace").unwrap(), vec!["/workspace"]);
    assert_eq!(
        parse_workspaces("/a//b/,/c/./d").unwrap(),
        vec!["/a/b", "/c/d"]
    );
    for (bad, want) in [
        ("", "empty path"),
        ("/a,,/b", "empty path"),
        ("a", "not an absolute path"),
        ("/", "cannot be a workspace"),
        ("//", "cannot be a workspace"),
        ("/a/../b", "must not contain \"..\""),
        ("/a,/a/", "listed twice"),
        ("/a,/a/b", "nested"),
        ("/a/b,/a", "nested"),
    ] {
        let e = parse_workspaces(bad).expect_err(bad).to_string();
        assert!(e.contains(want), "{bad}: {e}");
    }
    assert!(parse_workspaces("/a,/ab").is_ok());
}

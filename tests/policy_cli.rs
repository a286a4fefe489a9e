//! `agentfense-runc policy check|explain|describe`, through the library entry point.

use agentfense::cli::policy::{
    plain, run_with, CheckArgs, DescribeArgs, ExplainArgs, Format, PolicyCmd, PolicyInput,
};
use agentfense::config::AdminConfig;
use agentfense::policy::{Level, Rule, RuleType};

fn run(cmd: PolicyCmd, admin: &AdminConfig, stdin: &str) -> (i32, String, String) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = run_with(cmd, admin, &mut stdin.as_bytes(), &mut out, &mut err).unwrap();
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

fn stdin_input() -> PolicyInput {
    PolicyInput {
        policy: Some("-".into()),
        ..PolicyInput::default()
    }
}

fn preset_input(p: &str) -> PolicyInput {
    PolicyInput {
        preset: Some(p.into()),
        ..PolicyInput::default()
    }
}

#[test]
fn check_ok_and_errors() {
    let admin = AdminConfig::default();
    let (code, out, _) = run(
        PolicyCmd::Check(CheckArgs {
            input: preset_input("agent-safe"),
        }),
        &admin,
        "",
    );
    assert_eq!(code, 0);
    assert_eq!(out, "policy OK: 9 rules, default none\n");

    let bad = r#"[{"pattern": "a[", "permission": "read"}, {"pattern": "b", "permission": "rw"}]"#;
    let (code, out, err) = run(
        PolicyCmd::Check(CheckArgs {
            input: stdin_input(),
        }),
        &admin,
        bad,
    );
    assert_eq!(code, 1);
    assert_eq!(out, "");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with("error: <stdin>: rule 0: invalid pattern \"a[\""),
        "{err}"
    );
    assert_eq!(lines[1], "error: <stdin>: rule 1: unknown permission \"rw\"; expected one of none, view, read, write");

    let (code, _, err) = run(
        PolicyCmd::Check(CheckArgs {
            input: preset_input("nope"),
        }),
        &admin,
        "",
    );
    assert_eq!(code, 1);
    assert!(
        err.starts_with("error: --preset: unknown preset \"nope\""),
        "{err}"
    );

    let (code, _, err) = run(PolicyCmd::Check(CheckArgs::default()), &admin, "");
    assert_eq!(code, 1);
    assert!(err.contains("no policy"), "{err}");

    let (code, _, err) = run(
        PolicyCmd::Check(CheckArgs {
            input: PolicyInput {
                policy: Some("/nonexistent/p.json".into()),
                ..PolicyInput::default()
            },
        }),
        &admin,
        "",
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read the policy file /nonexistent/p.json"),
        "{err}"
    );
}

#[test]
fn check_from_file_with_floor() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.json");
    std::fs::write(
        &f,
        r#"{"preset": "read-only", "rules": [{"pattern": "/out/**", "permission": "write"}]}"#,
    )
    .unwrap();
    let admin = AdminConfig {
        floor: vec![Rule::glob("**/.ssh/**", Level::None)],
        ..AdminConfig::default()
    };
    let input = PolicyInput {
        policy: Some(f.to_string_lossy().into_owned()),
        ..PolicyInput::default()
    };
    let (code, out, _) = run(PolicyCmd::Check(CheckArgs { input }), &admin, "");
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "policy OK: 2 rules, default none, plus 1 admin floor rule\n"
    );
}

#[test]
fn check_named_policy() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("ci.json"),
        r#"[{"pattern": "**", "permission": "view"}]"#,
    )
    .unwrap();
    let admin = AdminConfig {
        policy_dir: dir.path().to_path_buf(),
        ..AdminConfig::default()
    };
    let input = PolicyInput {
        policy_name: Some("ci".into()),
        ..PolicyInput::default()
    };
    let (code, out, _) = run(PolicyCmd::Check(CheckArgs { input }), &admin, "");
    assert_eq!(code, 0, "{out}");
    let input = PolicyInput {
        policy_name: Some("../ci".into()),
        ..PolicyInput::default()
    };
    let (code, _, err) = run(PolicyCmd::Check(CheckArgs { input }), &admin, "");
    assert_eq!(code, 1);
    assert!(err.contains("invalid policy name"), "{err}");
}

#[test]
fn explain_text_and_json() {
    let admin = AdminConfig::default();
    let policy = r#"[{"pattern": "**/*", "permission": "read"},
                     {"pattern": "/secrets/**", "permission": "none"},
                     {"pattern": "/secrets/public.key", "permission": "read"}]"#;
    let cmd = PolicyCmd::Explain(ExplainArgs {
        input: stdin_input(),
        format: Format::Text,
        paths: vec![
            "/secrets/public.key".into(),
            "secrets".into(),
            "/src/a.rs".into(),
        ],
    });
    let (code, out, err) = run(cmd, &admin, policy);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("/secrets/public.key: read\n"), "{out}");
    assert!(
        out.contains(
            "policy rule 2 decides: \"/secrets/public.key\" read (glob, priority 0, policy rule 2)"
        ),
        "{out}"
    );
    assert!(out.contains("policy rule 1 loses:"), "{out}");
    assert!(
        out.contains("/secrets: none (as a directory: traversable, listed as view)"),
        "{out}"
    );
    assert!(out.contains("/src/a.rs: read"), "{out}");

    let cmd = PolicyCmd::Explain(ExplainArgs {
        input: stdin_input(),
        format: Format::Json,
        paths: vec![
            "/secrets/public.key".into(),
            "/secrets".into(),
            "/nothing/../x".into(),
        ],
    });
    let (code, out, _) = run(
        cmd,
        &AdminConfig::default(),
        r#"{"rules": [{"pattern": "/secrets/**", "permission": "none"}, {"pattern": "/secrets/public.key", "permission": "read"}]}"#,
    );
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["path"], "/secrets/public.key");
    assert_eq!(lines[0]["permission"], "read");
    assert_eq!(lines[0]["rule"]["index"], 1);
    assert_eq!(lines[0]["rule"]["pattern"], "/secrets/public.key");
    assert_eq!(lines[0]["rule"]["priority"], 0);
    assert_eq!(lines[0]["rule"]["type"], "glob");
    assert_eq!(lines[0]["traversable"], false);
    assert_eq!(lines[1]["permission"], "none");
    assert_eq!(lines[1]["traversable"], true);
    assert_eq!(lines[2]["path"], "/x");
    assert_eq!(lines[2]["rule"], serde_json::Value::Null);
}

#[test]
fn explain_with_floor() {
    let admin = AdminConfig {
        floor: vec![Rule::glob("/etc/**", Level::Read)],
        ..AdminConfig::default()
    };
    let cmd = PolicyCmd::Explain(ExplainArgs {
        input: preset_input("full-access"),
        format: Format::Json,
        paths: vec!["/etc/x".into()],
    });
    let (code, out, _) = run(cmd, &admin, "");
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["permission"], "read");
    assert_eq!(v["rule"]["origin"], "admin floor");
    assert_eq!(v["rule"]["index"], 1);
}

#[test]
fn describe_for_people() {
    let (code, out, _) = run(
        PolicyCmd::Describe(DescribeArgs {
            input: preset_input("agent-safe"),
            ..DescribeArgs::default()
        }),
        &AdminConfig::default(),
        "",
    );
    assert_eq!(code, 0);
    assert!(out.contains("Will not exist (hidden):\n  - everything whose name starts with credentials, at any depth"), "{out}");
    assert!(out.contains("  - everything whose name starts with .env, at any depth (glob \"**/.env*\", priority 100)\n"), "{out}");
    assert!(
        out.contains("every directory named secrets, at any depth, and everything in it"),
        "{out}"
    );
    assert!(out.contains("May write (create, change, delete; changes go to a copy-on-write layer):\n  - /output and everything in it"), "{out}");
    assert!(out.contains("May read:\n  - everything"), "{out}");
    assert!(
        out.contains("May only list (names and metadata, not contents):\n  (nothing)"),
        "{out}"
    );
    assert!(
        out.contains("Anything no rule covers: will not exist (hidden) (default none)."),
        "{out}"
    );
    assert!(out.contains("Precedence (highest first):\n  1. "), "{out}");
}

#[test]
fn describe_against_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for d in ["src", "secrets", "output", ".git"] {
        std::fs::create_dir(root.join(d)).unwrap();
    }
    std::fs::write(root.join("src/main.rs"), "").unwrap();
    std::fs::write(root.join("secrets/token"), "").unwrap();
    std::fs::write(root.join(".git/config"), "").unwrap();
    std::fs::write(root.join(".env"), "").unwrap();
    let (code, out, _) = run(
        PolicyCmd::Describe(DescribeArgs {
            input: preset_input("agent-safe"),
            dir: Some(root.to_path_buf()),
            examples: 10,
        }),
        &AdminConfig::default(),
        "",
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("May write: 1 entry\n      /output/\n"),
        "{out}"
    );
    assert!(
        out.contains("May read: 2 entries\n      /src/\n      /src/main.rs\n"),
        "{out}"
    );
    assert!(
        out.contains("Will not exist: 3 entries\n      /.env\n      /.git/\n      /secrets/\n"),
        "{out}"
    );
    assert!(!out.contains("token"), "{out}");
}

#[test]
fn plain_words() {
    assert_eq!(plain(RuleType::Glob, "**/*"), "everything");
    assert_eq!(plain(RuleType::Glob, "/**"), "everything");
    assert_eq!(
        plain(RuleType::Glob, "**/*.pem"),
        "every *.pem file, at any depth"
    );
    assert_eq!(
        plain(RuleType::Glob, "**/.git/**"),
        "every directory named .git, at any depth, and everything in it"
    );
    assert_eq!(
        plain(RuleType::Glob, "**/credentials*"),
        "everything whose name starts with credentials, at any depth"
    );
    assert_eq!(
        plain(RuleType::Glob, "/tmp/**"),
        "/tmp and everything in it"
    );
    assert_eq!(
        plain(RuleType::Glob, "**/Makefile"),
        "everything named Makefile, at any depth"
    );
    assert_eq!(plain(RuleType::Glob, "/a/b"), "/a/b");
    assert_eq!(
        plain(RuleType::Glob, "/src/**/test_*.py"),
        "paths matching /src/**/test_*.py"
    );
    assert_eq!(
        plain(RuleType::Directory, "/docs/"),
        "/docs and everything in it"
    );
    assert_eq!(plain(RuleType::File, "/a.txt"), "the path /a.txt");
}

#[test]
fn clap_parses() {
    use clap::{Parser, Subcommand};
    #[derive(Parser)]
    struct Top {
        #[command(subcommand)]
        cmd: Cmd,
    }
    #[derive(Subcommand)]
    enum Cmd {
        Policy {
            #[command(subcommand)]
            cmd: PolicyCmd,
        },
    }
    let t = Top::try_parse_from([
        "x",
        "policy",
        "explain",
        "--preset",
        "agent-safe",
        "--format",
        "json",
        "/a",
        "/b",
    ])
    .unwrap();
    let Cmd::Policy {
        cmd: PolicyCmd::Explain(a),
    } = t.cmd
    else {
        panic!("not explain")
    };
    assert_eq!(a.paths, vec!["/a", "/b"]);
    assert_eq!(a.format, Format::Json);
    assert!(Top::try_parse_from(["x", "policy", "explain", "--preset", "agent-safe"]).is_err());
    let t = Top::try_parse_from(["x", "policy", "check", "--policy", "-"]).unwrap();
    assert!(matches!(
        t.cmd,
        Cmd::Policy {
            cmd: PolicyCmd::Check(_)
        }
    ));
    let t = Top::try_parse_from([
        "x",
        "policy",
        "describe",
        "--policy-name",
        "ci",
        "--dir",
        "/w",
    ])
    .unwrap();
    assert!(matches!(
        t.cmd,
        Cmd::Policy {
            cmd: PolicyCmd::Describe(_)
        }
    ));
}

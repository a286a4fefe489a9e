//! Reading an audit trail back: summary (never-touched grants), text rendering, id prefixes.

use agentfense::audit::{
    self, AccessRecord, AuditDecision, AuditLevel, AuditLog, Op, Record, AUDIT_FILE,
};
use agentfense::config::AuditOverflow;
use agentfense::policy::{DeltaMode, Level, Policy, Rule};
use serde_json::{json, Value};

const ID: &str = "abc123def4567890";

/// rules: 0 `/src/**` read, 1 `/reports/**` write, 2 `/secrets/**` read, 3 `/configs/**`
/// view, 4 `**/.env*` none (100).
fn policy() -> Policy {
    let mut env = Rule::glob("**/.env*", Level::None);
    env.priority = 100;
    Policy::new(
        vec![
            Rule::glob("/src/**", Level::Read),
            Rule::glob("/reports/**", Level::Write),
            Rule::glob("/secrets/**", Level::Read),
            Rule::glob("/configs/**", Level::View),
            env,
        ],
        Level::None,
    )
    .unwrap()
}

fn open(path: &str, mode: &'static str, rule: usize, br: u64, bw: u64) -> AccessRecord {
    let mut r = AccessRecord::new(Op::Open, path, AuditDecision::Allow, Some(rule), 42, 1000);
    r.mode = Some(mode);
    r.bytes_read = Some(br);
    r.bytes_written = Some(bw);
    r
}

fn trail(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join(AUDIT_FILE);
    audit::append_lifecycle(
        &p,
        ID,
        "create",
        audit::create_info(
            &policy(),
            &["/workspace".to_string()],
            DeltaMode::Keep,
            AuditLevel::All,
        ),
    )
    .unwrap();
    audit::append_lifecycle(&p, ID, "start", Value::Null).unwrap();
    let log = AuditLog::open(&p, ID, AuditLevel::All, AuditOverflow::Count).unwrap();
    log.access(open("/src/main.py", "read", 0, 120, 0));
    log.access(open("/src/main.py", "read", 0, 120, 0));
    log.access(AccessRecord::new(
        Op::Opendir,
        "/src",
        AuditDecision::Allow,
        Some(0),
        42,
        1000,
    ));
    log.access(AccessRecord::new(
        Op::Create,
        "/reports/complexity.json",
        AuditDecision::Allow,
        Some(1),
        42,
        1000,
    ));
    log.access(open("/reports/complexity.json", "write", 1, 0, 77));
    let mut ren = AccessRecord::new(
        Op::Rename,
        "/reports/a",
        AuditDecision::Allow,
        Some(1),
        42,
        1000,
    );
    ren.to = Some("/reports/b".into());
    log.access(ren);
    log.access(AccessRecord::new(
        Op::Unlink,
        "/reports/old.txt",
        AuditDecision::Allow,
        Some(1),
        42,
        1000,
    ));
    let mut denied = AccessRecord::new(
        Op::Open,
        "/configs/db.yaml",
        AuditDecision::Deny,
        Some(3),
        42,
        1000,
    );
    denied.mode = Some("read");
    denied.errno = Some("EACCES");
    log.access(denied);
    let mut wdenied = AccessRecord::new(
        Op::Open,
        "/src/main.py",
        AuditDecision::Deny,
        Some(0),
        42,
        1000,
    );
    wdenied.mode = Some("write");
    wdenied.errno = Some("EACCES");
    log.access(wdenied);
    let mut probe = AccessRecord::new(
        Op::Lookup,
        "/.env",
        AuditDecision::Hidden,
        Some(4),
        42,
        1000,
    );
    probe.errno = Some("ENOENT");
    log.access(probe);
    // Default-decided probe: no rule.
    log.access(AccessRecord::new(
        Op::Lookup,
        "/etc",
        AuditDecision::Hidden,
        None,
        42,
        1000,
    ));
    log.close();
    audit::append_delete(&p, ID, Some(0), Value::Null).unwrap();
    p
}

#[test]
fn summary_of_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = trail(dir.path());
    let recs = audit::read_records(&p).unwrap();
    let s = audit::summary_from_log(&recs).unwrap();
    assert_eq!(s.container, ID);
    assert_eq!(s.policy_sha256.as_deref(), Some(policy().sha256().as_str()));
    assert_eq!(s.read, ["/src/main.py"]);
    assert_eq!(s.written, ["/reports/complexity.json"]);
    assert_eq!(s.created, ["/reports/complexity.json"]);
    assert_eq!(s.deleted, ["/reports/old.txt"]);
    assert_eq!(s.renamed.len(), 1);
    assert_eq!(s.listed, ["/src"]);
    assert_eq!(s.refused.len(), 2);
    assert_eq!(s.refused[0].path, "/configs/db.yaml");
    assert_eq!(s.refused[0].ops, ["read"]);
    assert_eq!(s.refused[1].ops, ["write"]);
    assert_eq!(s.probed, ["/.env", "/etc"]);
    assert_eq!(s.bytes_read, 240);
    assert_eq!(s.bytes_written, 77);
    assert_eq!((s.totals.allow, s.totals.deny, s.totals.hidden), (7, 2, 2));
    // "did NOT access /secrets": the only read/write grant no allowed access used.
    assert_eq!(s.untouched.len(), 1);
    assert_eq!(s.untouched[0].rule, 2);
    assert_eq!(s.untouched[0].pattern, "/secrets/**");
    assert_eq!(s.untouched[0].permission, "read");

    let text = audit::render_summary_text(&s);
    for want in [
        "Container abc123def456 (policy sha256 ",
        "Read, 240 bytes (1):\n  /src/main.py\n",
        "Written, 77 bytes (1):\n  /reports/complexity.json\n",
        "Renamed (1):\n  /reports/a -> /reports/b\n",
        "Refused (2):\n  /configs/db.yaml (read)\n  /src/main.py (write)\n",
        "Probed hidden paths (2):\n  /.env\n  /etc\n",
        "Granted but never touched (1):\n  /secrets/** (read, rule 2)\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let j: Value = serde_json::from_str(&audit::render_summary_json(&s)).unwrap();
    assert_eq!(j["untouched"][0]["pattern"], "/secrets/**");
    assert_eq!(j["totals"]["deny"], 2);
}

#[test]
fn summary_covers_the_latest_run_and_floor_rules_are_not_grants() {
    let dir = tempfile::tempdir().unwrap();
    let p = trail(dir.path());
    // Created again under the same id, with a floor: nothing accessed yet.
    let pol = policy()
        .with_floor(&[Rule::glob("/reports/**", Level::Read)])
        .unwrap();
    audit::append_lifecycle(
        &p,
        ID,
        "create",
        audit::create_info(&pol, &[], DeltaMode::Keep, AuditLevel::All),
    )
    .unwrap();
    assert!(audit::verify(&p).is_ok());
    let s = audit::summary_from_log(&audit::read_records(&p).unwrap()).unwrap();
    assert!(s.read.is_empty());
    let rules: Vec<usize> = s.untouched.iter().map(|g| g.rule).collect();
    assert_eq!(rules, [0, 1, 2]);
}

#[test]
fn summary_without_or_with_a_forged_policy() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(AUDIT_FILE);
    audit::append_lifecycle(&p, ID, "start", Value::Null).unwrap();
    let s = audit::summary_from_log(&audit::read_records(&p).unwrap()).unwrap();
    assert!(s.policy_sha256.is_none());
    assert!(audit::render_summary_text(&s).contains("never touched: unknown"));

    let p2 = dir.path().join("b.jsonl");
    audit::append_lifecycle(
        &p2,
        ID,
        "create",
        json!({"policy": policy().canonical_json(), "policy_sha256": "00"}),
    )
    .unwrap();
    let e = audit::summary_from_log(&audit::read_records(&p2).unwrap()).unwrap_err();
    assert!(e.to_string().contains("does not match"), "{e}");
}

fn text_lines(p: &std::path::Path) -> Vec<String> {
    audit::read_records(p)
        .unwrap()
        .iter()
        .map(audit::format_record)
        .collect()
}

#[test]
fn text_rendering() {
    let dir = tempfile::tempdir().unwrap();
    let p = trail(dir.path());
    let ls = text_lines(&p);
    let msgs: Vec<&str> = ls
        .iter()
        .map(|l| {
            assert!(l.starts_with('['), "{l}");
            let (ts, rest) = l.split_once("] ").unwrap();
            assert_eq!(ts.len(), "[2026-02-03T10:23:45Z".len(), "{l}");
            rest.strip_prefix("abc123def456: ").unwrap()
        })
        .collect();
    let sha: String = policy().sha256().chars().take(8).collect();
    assert_eq!(
        msgs,
        [
            format!("Container created (policy sha256 {sha}…, delta keep, audit all, workspaces /workspace)").as_str(),
            "Container started",
            "Read allowed: /src/main.py (120 bytes read)",
            "Read allowed: /src/main.py (120 bytes read)",
            "List allowed: /src",
            "Create allowed: /reports/complexity.json",
            "Write allowed: /reports/complexity.json (77 bytes written)",
            "Rename allowed: /reports/a -> /reports/b",
            "Delete allowed: /reports/old.txt",
            "Read denied: /configs/db.yaml",
            "Write denied: /src/main.py",
            "Path hidden: /.env",
            "Path hidden: /etc",
            "Fence daemon stopped (0 records lost)",
            "Container deleted (exit status 0; 7 allowed, 2 denied, 2 hidden; 0 records lost)",
        ]
    );
}

#[test]
fn rendering_unusual_records() {
    let r: Record = serde_json::from_str(
        r#"{"ts":"bad","seq":0,"container":"x","event":"frobnicate","prev":"","info":{"a":1}}"#,
    )
    .unwrap();
    assert_eq!(
        audit::format_record(&r),
        "[bad] x: Event frobnicate: {\"a\":1}"
    );
    let r: Record = serde_json::from_str(
        r#"{"ts":"2026-02-03T10:23:45.999Z","seq":0,"container":"x","event":"commit","prev":"","info":{"conflicts":["/a"]}}"#,
    )
    .unwrap();
    assert_eq!(
        audit::format_record(&r),
        "[2026-02-03T10:23:45Z] x: Delta committed (1 conflicts)"
    );
}

#[test]
fn id_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("containers");
    for id in ["abc123", "abc456", "abd", "zz"] {
        std::fs::create_dir_all(c.join(id)).unwrap();
    }
    std::fs::write(c.join("abcfile"), "").unwrap();
    let r = |p: &str| audit::resolve_id(dir.path(), p).map_err(|e| e.to_string());
    assert_eq!(r("abc123"), Ok("abc123".into()));
    assert_eq!(r("abc1"), Ok("abc123".into()));
    assert_eq!(r("abd"), Ok("abd".into()));
    assert_eq!(r("z"), Ok("zz".into()));
    assert_eq!(r("abc"), Err("abc is ambiguous: abc123, abc456".into()));
    assert_eq!(r("q"), Err("no container matches q".into()));
    for bad in ["", ".", "..", "a/b", "../containers"] {
        assert!(
            r(bad).unwrap_err().starts_with("invalid container id"),
            "{bad}"
        );
    }
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        audit::resolve_id(empty.path(), "a")
            .unwrap_err()
            .to_string(),
        "no container matches a"
    );
}

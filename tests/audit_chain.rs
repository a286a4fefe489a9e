//! The audit file's hash chain: verify on good files, tampering detected, concurrent appenders
//! keep one chain.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentfense::audit::{
    self, AccessRecord, AuditDecision, AuditLevel, AuditLog, Op, VerifyOptions, AUDIT_FILE,
};
use agentfense::config::AuditOverflow;
use serde_json::{json, Value};

const ID: &str = "c0ffee0000000000000000000000000000000000000000000000000000000001";

fn file(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join(AUDIT_FILE)
}

fn rec(i: usize) -> AccessRecord {
    let mut r = AccessRecord::new(
        Op::Open,
        format!("/src/file-{i}.py"),
        AuditDecision::Allow,
        Some(i % 3),
        1000 + i as u32,
        0,
    );
    r.mode = Some("read");
    r.bytes_read = Some(i as u64);
    r.bytes_written = Some(0);
    r
}

/// create, start, 5 accesses, daemon-stop, delete: 9 lines.
fn good_log(path: &Path) {
    audit::append_lifecycle(path, ID, "create", json!({"policy_sha256": "ab"})).unwrap();
    audit::append_lifecycle(path, ID, "start", Value::Null).unwrap();
    let log = AuditLog::open(path, ID, AuditLevel::All, AuditOverflow::Count).unwrap();
    for i in 0..5 {
        log.access(rec(i));
    }
    log.close();
    audit::append_delete(path, ID, Some(0), Value::Null).unwrap();
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, ls: &[String]) {
    let mut s = ls.join("\n");
    if !ls.is_empty() {
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

#[test]
fn good_file_verifies_and_has_the_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let p = file(&dir);
    good_log(&p);
    assert_eq!(audit::verify(&p), Ok(9));
    assert_eq!(
        audit::verify_with(
            &p,
            &VerifyOptions {
                container: Some(ID),
                deleted: true
            }
        ),
        Ok(9)
    );
    let e = audit::verify_with(
        &p,
        &VerifyOptions {
            container: Some("other"),
            deleted: false,
        },
    )
    .unwrap_err();
    assert_eq!(e.line, 1);

    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let ls = lines(&p);
    // Key order of an access record.
    let access = &ls[2];
    let keys: Vec<&str> = [
        "\"ts\"",
        "\"seq\"",
        "\"container\"",
        "\"event\"",
        "\"prev\"",
        "\"op\"",
        "\"path\"",
        "\"decision\"",
        "\"rule\"",
        "\"pid\"",
        "\"uid\"",
        "\"mode\"",
        "\"bytes_read\"",
        "\"bytes_written\"",
    ]
    .to_vec();
    let pos: Vec<usize> = keys.iter().map(|k| access.find(k).unwrap()).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{access}");
    let v: Value = serde_json::from_str(access).unwrap();
    assert_eq!(v["event"], "access");
    assert_eq!(v["seq"], 2);
    assert_eq!(v["op"], "open");
    assert_eq!(v["decision"], "allow");
    let ts = v["ts"].as_str().unwrap();
    assert!(
        ts.ends_with('Z') && ts.len() == "2026-02-03T10:23:45.123Z".len(),
        "{ts}"
    );

    let first: Value = serde_json::from_str(&ls[0]).unwrap();
    assert_eq!(first["prev"], audit::GENESIS);
    let stop: Value = serde_json::from_str(&ls[7]).unwrap();
    assert_eq!(stop["event"], "daemon-stop");
    assert_eq!(stop["info"]["dropped"], 0);
    let del: Value = serde_json::from_str(&ls[8]).unwrap();
    assert_eq!(del["event"], "delete");
    assert_eq!(del["info"]["head"], del["prev"]);
    assert_eq!(del["info"]["exit_status"], 0);
    assert_eq!(
        del["info"]["totals"],
        json!({"allow": 5, "deny": 0, "hidden": 0})
    );
    assert_eq!(del["info"]["dropped"], 0);
}

#[test]
fn empty_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = file(&dir);
    assert_eq!(audit::verify(&p).unwrap_err().line, 0);
    std::fs::write(&p, "").unwrap();
    assert_eq!(audit::verify(&p), Ok(0));
}

fn tampered(edit: impl FnOnce(&mut Vec<String>)) -> audit::VerifyError {
    let dir = tempfile::tempdir().unwrap();
    let p = file(&dir);
    good_log(&p);
    let mut ls = lines(&p);
    edit(&mut ls);
    write_lines(&p, &ls);
    audit::verify(&p).expect_err("tampering must be detected")
}

#[test]
fn removed_line_is_detected() {
    let e = tampered(|ls| {
        ls.remove(4);
    });
    assert_eq!(e.line, 5, "{e}");
    assert!(e.reason.contains("seq is 5, expected 4"), "{e}");
    // The first line.
    let e = tampered(|ls| {
        ls.remove(0);
    });
    assert_eq!(e.line, 1, "{e}");
}

#[test]
fn edited_line_is_detected() {
    let e = tampered(|ls| ls[3] = ls[3].replace("/src/file-1.py", "/src/other.py"));
    assert_eq!(e.line, 5, "{e}");
    assert!(e.reason.contains("hash of line 4"), "{e}");
    // Recomputing the edited record's own prev does not help.
    let e = tampered(|ls| ls[0] = ls[0].replace("\"ab\"", "\"cd\""));
    assert_eq!(e.line, 2, "{e}");
    // A line that is no longer JSON.
    let e = tampered(|ls| ls[2].truncate(20));
    assert_eq!(e.line, 3, "{e}");
    // The delete record's head.
    let e = tampered(|ls| {
        let mut v: Value = serde_json::from_str(&ls[8]).unwrap();
        v["info"]["head"] = json!(audit::GENESIS);
        ls[8] = v.to_string();
    });
    assert_eq!(e.line, 9, "{e}");
}

#[test]
fn swapped_lines_are_detected() {
    let e = tampered(|ls| ls.swap(3, 4));
    assert_eq!(e.line, 4, "{e}");
    assert!(e.reason.contains("seq is 4, expected 3"), "{e}");
}

#[test]
fn inserted_and_appended_lines_are_detected() {
    let e = tampered(|ls| {
        let l = ls[3].clone();
        ls.insert(3, l);
    });
    // Line 4 is the original; its duplicate, line 5, is out of sequence.
    assert_eq!(e.line, 5, "{e}");
    // A record forged after delete with a correct chain.
    let dir = tempfile::tempdir().unwrap();
    let p = file(&dir);
    good_log(&p);
    audit::append_lifecycle(&p, ID, "start", Value::Null).unwrap();
    let e = audit::verify(&p).unwrap_err();
    assert_eq!(e.line, 10, "{e}");
    assert!(e.reason.contains("after the delete record"), "{e}");
}

#[test]
fn tail_cuts() {
    // A torn last line.
    let dir = tempfile::tempdir().unwrap();
    let p = file(&dir);
    good_log(&p);
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, &text[..text.len() - 10]).unwrap();
    let e = audit::verify(&p).unwrap_err();
    assert_eq!(e.line, 9, "{e}");
    assert!(e.reason.contains("incomplete"), "{e}");

    // The delete record removed: undetectable from the file alone (documented), detected
    // when the container is known to be deleted.
    let dir = tempfile::tempdir().unwrap();
    let p = file(&dir);
    good_log(&p);
    let mut ls = lines(&p);
    ls.truncate(8);
    write_lines(&p, &ls);
    assert_eq!(audit::verify(&p), Ok(8));
    let e = audit::verify_with(
        &p,
        &VerifyOptions {
            container: None,
            deleted: true,
        },
    )
    .unwrap_err();
    assert_eq!(e.line, 9, "{e}");

    // Cut after a re-create that followed the delete.
    let dir = tempfile::tempdir().unwrap();
    let p = file(&dir);
    good_log(&p);
    audit::append_lifecycle(&p, ID, "create", json!({})).unwrap();
    audit::append_lifecycle(&p, ID, "start", json!({})).unwrap();
    audit::append_delete(&p, ID, Some(1), Value::Null).unwrap();
    assert_eq!(audit::verify(&p), Ok(12));
    let mut ls = lines(&p);
    ls.truncate(10);
    write_lines(&p, &ls);
    assert_eq!(audit::verify(&p), Ok(10));
    assert_eq!(
        audit::verify_with(
            &p,
            &VerifyOptions {
                container: None,
                deleted: true
            }
        )
        .unwrap_err()
        .line,
        11
    );
}

#[test]
fn tampered_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = file(&dir);
    good_log(&p);
    let good = std::fs::read(&p).unwrap();
    // Flip bytes all over the file; verify and read must answer, not panic.
    for i in (0..good.len()).step_by(37) {
        let mut b = good.clone();
        b[i] ^= 0x55;
        std::fs::write(&p, &b).unwrap();
        let _ = audit::verify(&p);
        let recs = audit::read_records(&p).unwrap();
        let _ = audit::summary_from_log(&recs);
        for r in &recs {
            let _ = audit::format_record(r);
        }
        // A writer appends after a damaged last line without panicking.
        let _ = audit::append_lifecycle(&p, ID, "start", Value::Null);
    }
}

#[test]
fn ten_thousand_records_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = file(&dir);
    let log = AuditLog::open(&p, ID, AuditLevel::All, AuditOverflow::Block).unwrap();
    for i in 0..10_000 {
        log.access(rec(i));
    }
    assert_eq!(log.dropped(), 0);
    log.close();
    assert_eq!(audit::verify(&p), Ok(10_001));
    let recs = audit::read_records(&p).unwrap();
    assert_eq!(recs.len(), 10_001);
    for (i, r) in recs[..10_000].iter().enumerate() {
        let want = rec(i);
        assert_eq!(r.seq, i as u64);
        assert_eq!(r.container, ID);
        assert_eq!(r.op, Some(want.op));
        assert_eq!(r.path.as_deref(), Some(want.path.as_str()));
        assert_eq!(r.decision, Some(want.decision));
        assert_eq!(r.rule, want.rule);
        assert_eq!(r.pid, Some(want.pid));
        assert_eq!(r.uid, Some(0));
        assert_eq!(r.mode.as_deref(), Some("read"));
        assert_eq!(r.bytes_read, want.bytes_read);
        assert_eq!(r.bytes_written, Some(0));
        assert_eq!(r.line, i as u64 + 1);
    }
    assert_eq!(recs[10_000].event, "daemon-stop");
}

#[test]
fn concurrent_appenders_keep_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let p = file(&dir);
    audit::append_lifecycle(&p, ID, "create", json!({})).unwrap();
    // Two independent logs (separate open files, as two daemons), each fed by 4 threads, and
    // a thread of lifecycle records (as the runtime).
    let a = Arc::new(AuditLog::open(&p, ID, AuditLevel::All, AuditOverflow::Block).unwrap());
    let b = Arc::new(AuditLog::open(&p, ID, AuditLevel::All, AuditOverflow::Block).unwrap());
    let mut threads = Vec::new();
    for t in 0..8 {
        let log = Arc::clone(if t % 2 == 0 { &a } else { &b });
        threads.push(std::thread::spawn(move || {
            for i in 0..500 {
                log.access(rec(t * 1000 + i));
            }
        }));
    }
    let p2 = p.clone();
    threads.push(std::thread::spawn(move || {
        for _ in 0..20 {
            audit::append_lifecycle(&p2, ID, "commit", json!({"conflicts": []})).unwrap();
        }
    }));
    for t in threads {
        t.join().unwrap();
    }
    drop(a);
    drop(b);
    audit::append_delete(&p, ID, None, Value::Null).unwrap();
    let n = audit::verify(&p).unwrap();
    // create + 4000 accesses + 20 commits + 2 daemon-stops + delete.
    assert_eq!(n, 1 + 4000 + 20 + 2 + 1);
    let recs = audit::read_records(&p).unwrap();
    let mut paths: Vec<&str> = recs.iter().filter_map(|r| r.path.as_deref()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 4000);
    assert_eq!(
        audit::totals(&p).unwrap(),
        audit::Totals {
            allow: 4000,
            deny: 0,
            hidden: 0,
            dropped: 0
        }
    );
}

//! The daemon's audit writer: levels, overflow (count or block), close.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use agentfense::audit::{self, AccessRecord, AuditDecision, AuditLevel, AuditLog, Op, AUDIT_FILE};
use agentfense::config::AuditOverflow;
use rustix::fs::{flock, FlockOperation};

const ID: &str = "feed";

fn mix() -> Vec<AccessRecord> {
    let mut v = Vec::new();
    let mut open = AccessRecord::new(Op::Open, "/src/a.py", AuditDecision::Allow, Some(0), 1, 0);
    open.mode = Some("read");
    v.push(open.clone());
    let mut wopen = open.clone();
    wopen.path = "/out/b".into();
    wopen.mode = Some("write");
    wopen.bytes_written = Some(3);
    v.push(wopen);
    v.push(AccessRecord::new(
        Op::Opendir,
        "/src",
        AuditDecision::Allow,
        Some(0),
        1,
        0,
    ));
    v.push(AccessRecord::new(
        Op::Create,
        "/out/c",
        AuditDecision::Allow,
        Some(1),
        1,
        0,
    ));
    let mut ren = AccessRecord::new(Op::Rename, "/out/c", AuditDecision::Allow, Some(1), 1, 0);
    ren.to = Some("/out/d".into());
    v.push(ren);
    let mut denied =
        AccessRecord::new(Op::Open, "/cfg/db.yaml", AuditDecision::Deny, Some(2), 1, 0);
    denied.mode = Some("read");
    denied.errno = Some("EACCES");
    v.push(denied);
    let mut probe = AccessRecord::new(Op::Lookup, "/.env", AuditDecision::Hidden, Some(3), 1, 0);
    probe.errno = Some("ENOENT");
    v.push(probe);
    v
}

fn paths_at(level: AuditLevel) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(AUDIT_FILE);
    let log = AuditLog::open(&p, ID, level, AuditOverflow::Count).unwrap();
    for r in mix() {
        assert_eq!(log.keeps(&r), r.kept_at(level));
        log.access(r);
    }
    log.close();
    if level == AuditLevel::Off {
        assert!(!p.exists(), "no file at level off");
        return Vec::new();
    }
    assert!(audit::verify(&p).is_ok());
    audit::read_records(&p)
        .unwrap()
        .into_iter()
        .filter(|r| r.is_access())
        .map(|r| r.path.unwrap_or_default())
        .collect()
}

#[test]
fn levels_filter() {
    assert!(paths_at(AuditLevel::Off).is_empty());
    assert_eq!(paths_at(AuditLevel::Deny), ["/cfg/db.yaml", "/.env"]);
    assert_eq!(
        paths_at(AuditLevel::Write),
        ["/out/b", "/out/c", "/out/c", "/cfg/db.yaml", "/.env"]
    );
    assert_eq!(paths_at(AuditLevel::All).len(), 7);
}

fn lock(p: &Path) -> File {
    let f = File::open(p).unwrap();
    flock(&f, FlockOperation::LockExclusive).unwrap();
    f
}

fn daemon_stop_dropped(p: &Path) -> u64 {
    let recs = audit::read_records(p).unwrap();
    let last = recs.last().unwrap();
    assert_eq!(last.event, "daemon-stop");
    last.info["dropped"].as_u64().unwrap()
}

#[test]
fn overflow_counts_drops() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(AUDIT_FILE);
    let log =
        AuditLog::open_with_capacity(&p, ID, AuditLevel::All, AuditOverflow::Count, 4).unwrap();
    // Another appender holds the file: the writer cannot write, the queue fills up.
    let held = lock(&p);
    let n = 5000u64;
    let mix = mix();
    for i in 0..n as usize {
        log.access(mix[i % mix.len()].clone());
    }
    let dropped = log.dropped();
    assert!(dropped > 0, "a 4-record queue must overflow");
    drop(held);
    log.close();
    let written = audit::read_records(&p)
        .unwrap()
        .iter()
        .filter(|r| r.is_access())
        .count() as u64;
    assert_eq!(written + dropped, n, "nothing is lost silently");
    assert_eq!(daemon_stop_dropped(&p), dropped);
    assert_eq!(audit::totals(&p).unwrap().dropped, dropped);
    assert!(audit::verify(&p).is_ok());
}

#[test]
fn overflow_block_waits() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(AUDIT_FILE);
    let log = std::sync::Arc::new(
        AuditLog::open_with_capacity(&p, ID, AuditLevel::All, AuditOverflow::Block, 4).unwrap(),
    );
    let held = lock(&p);
    let l2 = std::sync::Arc::clone(&log);
    let t = std::thread::spawn(move || {
        let mix = mix();
        for i in 0..3000 {
            l2.access(mix[i % mix.len()].clone());
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!t.is_finished(), "callers wait while the queue is full");
    drop(held);
    t.join().unwrap();
    assert_eq!(log.dropped(), 0);
    drop(log);
    let recs = audit::read_records(&p).unwrap();
    assert_eq!(recs.iter().filter(|r| r.is_access()).count(), 3000);
    assert_eq!(daemon_stop_dropped(&p), 0);
    assert_eq!(audit::verify(&p), Ok(3001));
}

#[test]
fn close_flushes_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(AUDIT_FILE);
    let log = AuditLog::open(&p, ID, AuditLevel::All, AuditOverflow::Count).unwrap();
    log.access(mix().remove(0));
    let t = std::time::Instant::now();
    drop(log);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(audit::verify(&p), Ok(2));
}

#[test]
fn written_in_batches_while_running() {
    // Records reach the file without closing the log (within the linger time).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(AUDIT_FILE);
    let log = AuditLog::open(&p, ID, AuditLevel::All, AuditOverflow::Count).unwrap();
    for r in mix() {
        log.access(r);
    }
    let mut n = 0;
    for _ in 0..100 {
        n = audit::read_records(&p).unwrap().len();
        if n == 7 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(n, 7);
    log.close();
}

#[test]
fn refuses_a_symlinked_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere");
    std::fs::write(&target, "").unwrap();
    let p = dir.path().join(AUDIT_FILE);
    std::os::unix::fs::symlink(&target, &p).unwrap();
    assert!(AuditLog::open(&p, ID, AuditLevel::All, AuditOverflow::Count).is_err());
    assert!(audit::append_lifecycle(&p, ID, "start", serde_json::Value::Null).is_err());
    assert_eq!(std::fs::read(&target).unwrap(), b"");
}

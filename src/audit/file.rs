//! Appending to the audit file: locking, the last line, the chain, lifecycle records.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::SystemTime;

use rustix::fs::{flock, FlockOperation};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{sha256_hex, AccessRecord, AuditDecision, Op, GENESIS};
use crate::policy::{AuditLevel, DeltaMode, Policy};

/// The audit file's name in the container's state directory.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// The longest last line [`read_head`] accepts (a `create` record carries the whole policy).
const MAX_LINE: u64 = 64 << 20;

/// Opens (creating, mode 0600) the audit file for appending and reading. Never follows a
/// symlink; refuses anything but a regular file.
pub(crate) fn open_log(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

/// The end of the chain: the hash of the last line, the next `seq`, and the file size they
/// were read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub hash: String,
    pub next_seq: u64,
    pub end: u64,
}

/// Holds an exclusive `flock` until dropped.
struct Locked<'a>(&'a File);

impl<'a> Locked<'a> {
    fn new(f: &'a File) -> io::Result<Locked<'a>> {
        loop {
            match flock(f, FlockOperation::LockExclusive) {
                Ok(()) => return Ok(Locked(f)),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = flock(self.0, FlockOperation::Unlock);
    }
}

/// Reads the last line of the file (seeking from the end) for the chain's head. The caller
/// holds the lock. A torn last line (no newline: a writer failed mid-write) is cut off: it
/// was never a record.
pub(crate) fn read_head(f: &File) -> io::Result<Head> {
    let size = f.metadata()?.len();
    if size == 0 {
        return Ok(Head {
            hash: GENESIS.to_string(),
            next_seq: 0,
            end: 0,
        });
    }
    let mut last = [0u8; 1];
    f.read_exact_at(&mut last, size - 1)?;
    if last[0] != b'\n' {
        // Cut the torn tail back to the last newline.
        let keep = match find_line_start(f, size)? {
            Some(start) => start,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the audit file's last line is too long",
                ))
            }
        };
        f.set_len(keep)?;
        return read_head(f);
    }
    let end = size - 1; // the last line is [start, end)
    let Some(start) = find_line_start(f, end)? else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the audit file's last line is too long",
        ));
    };
    let len = usize::try_from(end - start)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "line too long"))?;
    let mut line = vec![0u8; len];
    f.read_exact_at(&mut line, start)?;
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    // An unparseable last line (edited by hand) still chains; `verify` reports it.
    let next_seq = serde_json::from_slice::<Seq>(&line)
        .ok()
        .and_then(|s| s.seq.checked_add(1))
        .unwrap_or(0);
    Ok(Head {
        hash: sha256_hex(&line),
        next_seq,
        end: size,
    })
}

/// The offset just after the last `\n` before `end` (0 if none), reading backwards in chunks.
/// `None` if the line would be longer than [`MAX_LINE`].
fn find_line_start(f: &File, end: u64) -> io::Result<Option<u64>> {
    const CHUNK: u64 = 8192;
    let mut pos = end;
    let mut buf = vec![0u8; CHUNK as usize];
    while pos > 0 {
        if end - pos > MAX_LINE {
            return Ok(None);
        }
        let n = CHUNK.min(pos);
        pos -= n;
        let chunk = &mut buf[..n as usize];
        f.read_exact_at(chunk, pos)?;
        if let Some(i) = memchr::memrchr(b'\n', chunk) {
            return Ok(Some(pos + i as u64 + 1));
        }
    }
    Ok(Some(0))
}

/// A record waiting to be appended.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    Access(SystemTime, AccessRecord),
    Lifecycle(SystemTime, String, Value),
}

/// RFC 3339, UTC, milliseconds, `Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[derive(Serialize)]
struct AccessLine<'a> {
    ts: &'a str,
    seq: u64,
    container: &'a str,
    event: &'static str,
    prev: &'a str,
    op: Op,
    path: &'a str,
    decision: AuditDecision,
    rule: Option<usize>,
    pid: u32,
    uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errno: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_read: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_written: Option<u64>,
}

#[derive(Serialize)]
struct LifecycleLine<'a> {
    ts: &'a str,
    seq: u64,
    container: &'a str,
    event: &'a str,
    prev: &'a str,
    info: &'a Value,
}

/// Serialises one record chained after `prev` with number `seq`.
fn line(container: &str, item: &Pending, seq: u64, prev: &str) -> io::Result<Vec<u8>> {
    let r = match item {
        Pending::Access(t, a) => serde_json::to_vec(&AccessLine {
            ts: &rfc3339(*t),
            seq,
            container,
            event: "access",
            prev,
            op: a.op,
            path: &a.path,
            decision: a.decision,
            rule: a.rule,
            pid: a.pid,
            uid: a.uid,
            to: a.to.as_deref(),
            mode: a.mode,
            errno: a.errno,
            bytes_read: a.bytes_read,
            bytes_written: a.bytes_written,
        }),
        Pending::Lifecycle(t, event, info) => {
            let mut info = match info {
                Value::Object(m) => m.clone(),
                Value::Null => Map::new(),
                other => {
                    let mut m = Map::new();
                    m.insert("value".into(), other.clone());
                    m
                }
            };
            if event == "delete" {
                info.insert("head".into(), Value::String(prev.to_string()));
            }
            serde_json::to_vec(&LifecycleLine {
                ts: &rfc3339(*t),
                seq,
                container,
                event,
                prev,
                info: &Value::Object(info),
            })
        }
    };
    r.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Appends `items` as one write under the file's lock, chained after its last line.
/// `cache` is the head this writer left behind last time: reused when the file has not grown
/// since (no other writer appended), updated after the write. `sync`: `fdatasync` after.
pub(crate) fn append_batch(
    f: &File,
    container: &str,
    items: &[Pending],
    cache: &mut Option<Head>,
    sync: bool,
) -> io::Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let _lock = Locked::new(f)?;
    let size = f.metadata()?.len();
    let head = match cache.take() {
        Some(h) if h.end == size && size > 0 => h,
        _ => read_head(f)?,
    };
    let mut buf = Vec::with_capacity(items.len() * 256);
    let mut hash = head.hash;
    let mut seq = head.next_seq;
    for item in items {
        let l = line(container, item, seq, &hash)?;
        hash = sha256_hex(&l);
        buf.extend_from_slice(&l);
        buf.push(b'\n');
        seq += 1;
    }
    let mut w: &File = f;
    if let Err(e) = w.write_all(&buf) {
        // Never leave a torn line behind.
        let _ = f.set_len(head.end);
        return Err(e);
    }
    if sync {
        f.sync_data()?;
    }
    *cache = Some(Head {
        hash,
        next_seq: seq,
        end: head.end + buf.len() as u64,
    });
    Ok(())
}

/// Appends one lifecycle record (`create`, `start`, `delete`, `commit`, ...) to the audit file
/// at `path` (created 0600 if missing; its directory must exist) and syncs it. `info` should be
/// a JSON object (`null` becomes `{}`, anything else `{"value": ...}`). For `delete`,
/// `info.head` is set to the hash of the line before the record. Safe against concurrent
/// appenders (daemons, other runtime invocations). `event` must not be empty or `access`.
pub fn append_lifecycle(path: &Path, container: &str, event: &str, info: Value) -> io::Result<()> {
    if event.is_empty() || event == "access" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{event:?} is not a lifecycle event"),
        ));
    }
    let f = open_log(path)?;
    let item = Pending::Lifecycle(SystemTime::now(), event.to_string(), info);
    append_batch(&f, container, std::slice::from_ref(&item), &mut None, true)
}

/// Counts of the container's latest run (from its last `create` record on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Allowed accesses recorded.
    pub allow: u64,
    /// Refusals recorded.
    pub deny: u64,
    /// Probes of hidden paths recorded.
    pub hidden: u64,
    /// Records that could not be written (the `dropped` of `daemon-stop` records).
    pub dropped: u64,
}

/// The totals of the latest run in the audit file at `path` (lines that do not parse are
/// skipped). A missing file gives zeros.
pub fn totals(path: &Path) -> io::Result<Totals> {
    let log = match super::read_log(path) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Totals::default()),
        Err(e) => return Err(e),
    };
    Ok(totals_of(super::read::latest_run(&log.records)))
}

pub(crate) fn totals_of(records: &[super::Record]) -> Totals {
    let mut t = Totals::default();
    for r in records {
        match (r.event.as_str(), r.decision) {
            ("access", Some(AuditDecision::Allow)) => t.allow += 1,
            ("access", Some(AuditDecision::Deny)) => t.deny += 1,
            ("access", Some(AuditDecision::Hidden)) => t.hidden += 1,
            ("daemon-stop", _) => {
                t.dropped += r.info.get("dropped").and_then(Value::as_u64).unwrap_or(0)
            }
            _ => {}
        }
    }
    t
}

/// Appends the `delete` record: `info` = `{exit_status, totals: {allow, deny, hidden},
/// dropped, head}` plus the fields of `extra` (a JSON object, or `null`), after reading the
/// totals of the latest run from the file. Call it after the fence daemons have stopped.
pub fn append_delete(
    path: &Path,
    container: &str,
    exit_status: Option<i32>,
    extra: Value,
) -> io::Result<()> {
    let t = totals(path)?;
    let mut info = match extra {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    info.insert("exit_status".into(), json!(exit_status));
    info.insert(
        "totals".into(),
        json!({"allow": t.allow, "deny": t.deny, "hidden": t.hidden}),
    );
    info.insert("dropped".into(), json!(t.dropped));
    append_lifecycle(path, container, "delete", Value::Object(info))
}

/// The `info` of a `create` record: the policy as applied (canonical JSON, as a string, so
/// that its digest can be checked), its SHA-256, the fenced workspace paths, the delta mode
/// and the audit level.
pub fn create_info(
    policy: &Policy,
    workspaces: &[String],
    delta: DeltaMode,
    audit: AuditLevel,
) -> Value {
    json!({
        "policy": policy.canonical_json(),
        "policy_sha256": policy.sha256(),
        "workspaces": workspaces,
        "delta": delta.as_str(),
        "audit": audit.as_str(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_of_empty_and_torn_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(AUDIT_FILE);
        let f = open_log(&p).unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        let h = read_head(&f).unwrap();
        assert_eq!((h.hash.as_str(), h.next_seq, h.end), (GENESIS, 0, 0));
        append_lifecycle(&p, "c1", "start", Value::Null).unwrap();
        let h1 = read_head(&f).unwrap();
        assert_eq!(h1.next_seq, 1);
        // A torn line is cut off.
        let mut w: &File = &f;
        w.write_all(b"{\"ts\":\"x").unwrap();
        let h2 = read_head(&f).unwrap();
        assert_eq!(h1, h2);
        assert_eq!(f.metadata().unwrap().len(), h1.end);
    }

    #[test]
    fn lifecycle_event_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(AUDIT_FILE);
        assert!(append_lifecycle(&p, "c", "access", Value::Null).is_err());
        assert!(append_lifecycle(&p, "c", "", Value::Null).is_err());
        append_lifecycle(&p, "c", "start", json!(5)).unwrap();
        let r = super::super::read_records(&p).unwrap();
        assert_eq!(r[0].info, json!({"value": 5}));
    }

    #[test]
    fn refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        std::fs::write(&target, "").unwrap();
        let link = dir.path().join(AUDIT_FILE);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_log(&link).is_err());
    }

    #[test]
    fn long_lines_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(AUDIT_FILE);
        let big = "x".repeat(100_000);
        append_lifecycle(&p, "c1", "create", json!({"policy": big})).unwrap();
        append_lifecycle(&p, "c1", "create", json!({"policy": big})).unwrap();
        let f = open_log(&p).unwrap();
        assert_eq!(read_head(&f).unwrap().next_seq, 2);
        assert_eq!(super::super::verify(&p), Ok(2));
    }
}

//! Reading audit files, and finding a container by id prefix.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::Value;

use super::{AuditDecision, Op};

/// One record as read back from the file. Fields a record does not have are `None` (or, for
/// `info`, `null`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Record {
    /// RFC 3339 time.
    pub ts: String,
    /// Position in the file's chain, from 0.
    pub seq: u64,
    /// The container's full id.
    pub container: String,
    /// `access` or a lifecycle event name.
    pub event: String,
    /// Hash of the previous line.
    #[serde(default)]
    pub prev: String,
    /// Access records: the operation.
    #[serde(default)]
    pub op: Option<Op>,
    /// Access records: the path as the container sees it.
    #[serde(default)]
    pub path: Option<String>,
    /// Access records: the decision.
    #[serde(default)]
    pub decision: Option<AuditDecision>,
    /// Access records: the deciding rule (`None`: the policy default, or not an access).
    #[serde(default)]
    pub rule: Option<usize>,
    /// Access records: the calling process.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Access records: the calling uid.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Rename/link destination, symlink target.
    #[serde(default)]
    pub to: Option<String>,
    /// Opens: `read` or `write`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Refusals: the errno name.
    #[serde(default)]
    pub errno: Option<String>,
    /// Opens: bytes read (recorded at close).
    #[serde(default)]
    pub bytes_read: Option<u64>,
    /// Opens: bytes written (recorded at close).
    #[serde(default)]
    pub bytes_written: Option<u64>,
    /// Lifecycle records: their details.
    #[serde(default)]
    pub info: Value,
    /// The 1-based line number in the file.
    #[serde(skip)]
    pub line: u64,
    /// The line as written (without its newline).
    #[serde(skip)]
    pub raw: String,
}

impl Record {
    /// Whether this is an access record.
    pub fn is_access(&self) -> bool {
        self.event == "access"
    }
}

/// An audit file as read: the records that parse, and the numbers of the lines that do not
/// (use [`super::verify`] to find out whether the file is intact).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadLog {
    /// The records, in file order.
    pub records: Vec<Record>,
    /// 1-based numbers of lines that are not records (bad JSON, a torn last line).
    pub bad_lines: Vec<u64>,
}

/// Reads every record of the audit file at `path`, skipping lines that do not parse (they
/// are listed in [`ReadLog::bad_lines`]). Never panics on a damaged file.
pub fn read_log(path: &Path) -> io::Result<ReadLog> {
    let mut r = BufReader::with_capacity(1 << 16, File::open(path)?);
    let mut log = ReadLog::default();
    let mut buf = Vec::new();
    let mut n = 0u64;
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        n += 1;
        if buf.last() != Some(&b'\n') {
            log.bad_lines.push(n);
            break;
        }
        buf.pop();
        match parse_line(&buf, n) {
            Some(rec) => log.records.push(rec),
            None => log.bad_lines.push(n),
        }
    }
    Ok(log)
}

fn parse_line(bytes: &[u8], n: u64) -> Option<Record> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut rec: Record = serde_json::from_str(text).ok()?;
    rec.line = n;
    rec.raw = text.to_string();
    Some(rec)
}

/// The records of the audit file at `path` that parse (see [`read_log`]).
pub fn read_records(path: &Path) -> io::Result<Vec<Record>> {
    Ok(read_log(path)?.records)
}

/// The records of the latest run of a container: from its last `create` record on (a
/// container id can be deleted and created again; its audit file goes on). All records if
/// there is no `create`.
pub(crate) fn latest_run(records: &[Record]) -> &[Record] {
    match records.iter().rposition(|r| r.event == "create") {
        Some(i) => &records[i..],
        None => records,
    }
}

/// Finds a container of `<state_dir>/containers/` by its full id, or else by a unique prefix
/// of it (as Docker does). Errors: an invalid prefix, "no container matches X",
/// "X is ambiguous: a, b".
pub fn resolve_id(state_dir: &Path, prefix: &str) -> anyhow::Result<String> {
    if prefix.is_empty()
        || prefix == "."
        || prefix == ".."
        || prefix.contains('/')
        || prefix.contains('\0')
    {
        bail!("invalid container id {prefix:?}");
    }
    let dir = state_dir.join("containers");
    if dir.join(prefix).is_dir() {
        return Ok(prefix.to_string());
    }
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!("no container matches {prefix}"),
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", dir.display())),
    };
    let mut found = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("failed to read {}", dir.display()))?;
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        if name.starts_with(prefix) && e.path().is_dir() {
            found.push(name);
        }
    }
    found.sort();
    match found.len() {
        0 => bail!("no container matches {prefix}"),
        1 => Ok(found.remove(0)),
        _ => bail!("{prefix} is ambiguous: {}", found.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerant_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jsonl");
        std::fs::write(
            &p,
            b"{\"ts\":\"t\",\"seq\":0,\"container\":\"c\",\"event\":\"start\",\"prev\":\"0\"}\n\
              not json\n\
              \xff\xfe\n\
              {\"ts\":\"t\",\"seq\":\"x\"}\n\
              {\"ts\":\"t\",\"seq\":4,\"container\":\"c\",\"event\":\"access\",\"op\":\"open\",\"decision\":\"allow\",\"rule\":null}\n\
              {\"ts\":",
        )
        .unwrap();
        let log = read_log(&p).unwrap();
        assert_eq!(log.records.len(), 2);
        assert_eq!(log.records[1].line, 5);
        assert_eq!(log.records[1].op, Some(Op::Open));
        assert_eq!(log.bad_lines, vec![2, 3, 4, 6]);
    }
}

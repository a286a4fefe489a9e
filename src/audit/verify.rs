//! `audit verify`: checking the hash chain.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use super::{sha256_hex, Record, GENESIS};

/// Why an audit file failed [`verify`]: the first bad line (1-based; 0 when the file itself
/// could not be read) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct VerifyError {
    /// The first line found inconsistent (1-based), 0 for the file as a whole.
    pub line: u64,
    /// What is wrong.
    pub reason: String,
}

fn bad(line: u64, reason: impl Into<String>) -> VerifyError {
    VerifyError {
        line,
        reason: reason.into(),
    }
}

/// Checks the audit file at `path`; returns the number of records.
///
/// Every line must be a complete record (newline-terminated JSON with a valid RFC 3339
/// `ts`), `seq` must count from 0 one by one, `prev` must be the SHA-256 of the previous
/// line (64 zeros for the first), every record must name the same container, a `delete`
/// record's `info.head` must equal its `prev`, and after a `delete` only a `create` (the same
/// id created again) may follow.
///
/// So it detects: a line removed, inserted, edited or moved anywhere before the last line; a
/// cut head; a damaged or torn line; records appended after a `delete` other than `commit`
/// records and a new `create`.
///
/// It cannot detect: a cut tail while the container runs (or a cut that removes the `delete`
/// record together with everything after it: a deleted container's log must end with its
/// `delete` record, but only someone who knows the container was deleted can tell that it is
/// missing); an edit of the last line that keeps it well-formed; and anyone who rewrites the
/// chain from the edit to the end (the hashes are not keyed: the chain shows tampering by
/// whoever cannot or did not rewrite it, it is not a signature).
pub fn verify(path: &Path) -> Result<u64, VerifyError> {
    verify_with(path, &VerifyOptions::default())
}

/// What [`verify_with`] requires beyond [`verify`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyOptions<'a> {
    /// Every record must name this container.
    pub container: Option<&'a str>,
    /// The container is known to be deleted: the trail must end with its `delete` record
    /// (this catches a tail cut that removed the `delete` record).
    pub deleted: bool,
}

/// [`verify`] with extra requirements.
pub fn verify_with(path: &Path, opts: &VerifyOptions) -> Result<u64, VerifyError> {
    let container = opts.container;
    let f = File::open(path).map_err(|e| bad(0, format!("cannot open {}: {e}", path.display())))?;
    let mut r = BufReader::with_capacity(1 << 16, f);
    let mut expected_container = container.map(str::to_string);
    let mut prev = GENESIS.to_string();
    let mut after_delete = false;
    let mut buf = Vec::new();
    let mut n = 0u64;
    loop {
        buf.clear();
        let got = r
            .read_until(b'\n', &mut buf)
            .map_err(|e| bad(n + 1, format!("cannot read: {e}")))?;
        if got == 0 {
            if opts.deleted && !after_delete {
                return Err(bad(
                    n + 1,
                    "end of file: the container was deleted but its trail does not end with \
                     its delete record (the tail was cut)",
                ));
            }
            return Ok(n);
        }
        n += 1;
        if buf.pop() != Some(b'\n') {
            return Err(bad(
                n,
                "incomplete line (no newline at the end of the file)",
            ));
        }
        let text = std::str::from_utf8(&buf).map_err(|_| bad(n, "not UTF-8"))?;
        let rec: Record =
            serde_json::from_str(text).map_err(|e| bad(n, format!("not a valid record: {e}")))?;
        if chrono::DateTime::parse_from_rfc3339(&rec.ts).is_err() {
            return Err(bad(n, format!("invalid ts {:?}", rec.ts)));
        }
        let want_seq = n - 1;
        if rec.seq != want_seq {
            return Err(bad(
                n,
                format!(
                    "seq is {}, expected {want_seq} (lines were removed, inserted or reordered)",
                    rec.seq
                ),
            ));
        }
        if rec.prev != prev {
            return Err(bad(
                n,
                if n == 1 {
                    "the first record's prev is not 64 zeros (the start of the file was cut)"
                        .to_string()
                } else {
                    format!(
                        "prev does not match the hash of line {} (that line was changed, or lines \
                         were removed, inserted or reordered)",
                        n - 1
                    )
                },
            ));
        }
        match &expected_container {
            None => expected_container = Some(rec.container.clone()),
            Some(c) if *c != rec.container => {
                return Err(bad(
                    n,
                    format!("record of container {:?}, expected {c:?}", rec.container),
                ))
            }
            Some(_) => {}
        }
        if rec.event.is_empty() {
            return Err(bad(n, "empty event"));
        }
        if rec.is_access() && (rec.op.is_none() || rec.path.is_none() || rec.decision.is_none()) {
            return Err(bad(n, "access record without op, path or decision"));
        }
        // After a delete: settling the delta (`commit`, at delete or later), or a new create.
        if after_delete && rec.event != "create" && rec.event != "commit" {
            return Err(bad(
                n,
                format!(
                    "{} record after the delete record (only a commit or a new create may \
                     follow it)",
                    rec.event
                ),
            ));
        }
        if rec.event != "commit" {
            after_delete = rec.event == "delete";
        }
        if rec.event == "delete" {
            let head = rec.info.get("head").and_then(|h| h.as_str());
            if head != Some(prev.as_str()) {
                return Err(bad(
                    n,
                    "the delete record's head does not match the hash of the line before it",
                ));
            }
        }
        prev = sha256_hex(&buf);
    }
}

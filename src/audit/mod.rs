//! Audit trail (SPEC §6).
//!
//! Per container, one append-only JSON Lines file, `<state_dir>/containers/<id>/audit.jsonl`
//! (mode 0600), written by the fence daemons (one per fenced workspace, through
//! [`AuditLog`]) and by the runtime's lifecycle steps ([`append_lifecycle`],
//! [`append_delete`]).
//!
//! # Records
//!
//! Every line is one JSON object. Common keys, in this order: `ts` (RFC 3339 UTC with
//! milliseconds), `seq` (0-based, consecutive in the file), `container` (full id), `event`
//! (`access`, or a lifecycle event: `create`, `start`, `delete`, `daemon-stop`, `commit`),
//! `prev` (lowercase hex SHA-256 of the previous line's bytes without its newline; 64 zeros
//! for the first line).
//!
//! Access records add `op`, `path` (as the container sees it), `decision`
//! (`allow`/`deny`/`hidden`), `rule` (index into the effective rules of the policy, `null`
//! when the policy default decided), `pid`, `uid`, and when they apply `to` (rename / link
//! destination, symlink target), `mode` (`read`/`write`, for opens), `errno` (on refusals)
//! and `bytes_read` / `bytes_written` (opens, recorded when the file is closed).
//!
//! Lifecycle records add an `info` object: `create` has `policy` (canonical JSON, a string),
//! `policy_sha256`, `workspaces`, `delta`, `audit`; `delete` has `exit_status`, `totals`
//! (`{allow, deny, hidden}`), `dropped` (records that could not be written) and `head` (the
//! hash of the line before it); `daemon-stop` has `dropped`.
//!
//! # Chain
//!
//! Each record holds the hash of the line before it, so [`verify`] detects a removed, edited,
//! inserted or reordered line anywhere before the last one. What it cannot detect is
//! documented on [`verify`]: mainly, a cut tail of a container that is still running, and an
//! attacker who rewrites every line from the edit to the end (the chain is not keyed).
//!
//! # Concurrency
//!
//! Every append takes an exclusive `flock` on the file, reads the last line (seeking from the
//! end) for the previous hash and `seq`, writes the whole batch with one `write`, and unlocks,
//! so several processes can append to the same file and still produce one chain.

mod file;
mod read;
mod render;
mod summary;
mod verify;
mod writer;

use serde::{Deserialize, Serialize};

pub use file::{append_delete, append_lifecycle, create_info, totals, Totals, AUDIT_FILE};
pub use read::{read_log, read_records, resolve_id, ReadLog, Record};
pub use render::{format_record, format_ts, render_summary_json, render_summary_text};
pub use summary::{summary, summary_from_log, Grant, Refusal, Rename, Summary};
pub use verify::{verify, verify_with, VerifyError, VerifyOptions};
pub use writer::{AuditLog, DEFAULT_QUEUE};

/// The audit level (re-exported from the policy module): `off`, `deny`, `write`, `all`.
pub use crate::policy::AuditLevel;

/// What the fence decided for an access (named so as not to clash with
/// [`crate::policy::Decision`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditDecision {
    /// Allowed.
    Allow,
    /// Refused (the path is visible to the container).
    Deny,
    /// The path is hidden: the container asked about or for something that does not exist
    /// for it ("probe").
    Hidden,
}

impl AuditDecision {
    /// The name used in records (`allow`, `deny`, `hidden`).
    pub fn as_str(self) -> &'static str {
        match self {
            AuditDecision::Allow => "allow",
            AuditDecision::Deny => "deny",
            AuditDecision::Hidden => "hidden",
        }
    }
}

impl std::str::FromStr for AuditDecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(AuditDecision::Allow),
            "deny" => Ok(AuditDecision::Deny),
            "hidden" => Ok(AuditDecision::Hidden),
            _ => Err(format!(
                "unknown decision {s:?}; expected one of allow, deny, hidden"
            )),
        }
    }
}

/// The file-system operation of an access record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// `open` of a file (an allowed open is recorded at close, with the byte counts).
    Open,
    /// `opendir` (a listing).
    Opendir,
    /// `create` of a file.
    Create,
    /// `mkdir`.
    Mkdir,
    /// `mknod`.
    Mknod,
    /// `symlink` (`path` is the new link, `to` its target as written).
    Symlink,
    /// `link` (`path` is the existing file, `to` the new name).
    Link,
    /// `unlink`.
    Unlink,
    /// `rmdir`.
    Rmdir,
    /// `rename` (`path` is the old name, `to` the new one).
    Rename,
    /// `setattr` (chmod, chown, truncate, utimes).
    Setattr,
    /// `setxattr`.
    Setxattr,
    /// `removexattr`.
    Removexattr,
    /// `lookup` (of a hidden path: a probe).
    Lookup,
    /// `readlink`.
    Readlink,
    /// `getxattr`.
    Getxattr,
    /// `listxattr`.
    Listxattr,
    /// `access(2)`.
    Access,
}

impl Op {
    /// The name used in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Open => "open",
            Op::Opendir => "opendir",
            Op::Create => "create",
            Op::Mkdir => "mkdir",
            Op::Mknod => "mknod",
            Op::Symlink => "symlink",
            Op::Link => "link",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Rename => "rename",
            Op::Setattr => "setattr",
            Op::Setxattr => "setxattr",
            Op::Removexattr => "removexattr",
            Op::Lookup => "lookup",
            Op::Readlink => "readlink",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Access => "access",
        }
    }

    /// Whether an allowed operation of this kind changes the workspace (kept at level
    /// `write`). Opens are changes only when opened for writing (see [`AccessRecord::is_change`]).
    pub fn is_change(self) -> bool {
        !matches!(
            self,
            Op::Open
                | Op::Opendir
                | Op::Readlink
                | Op::Getxattr
                | Op::Listxattr
                | Op::Lookup
                | Op::Access
        )
    }
}

/// One access, as the fence reports it to [`AuditLog::access`]. The time, `seq`, container
/// and hash chain are added by the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    /// The operation.
    pub op: Op,
    /// The path as the container sees it (`/src/main.py`).
    pub path: String,
    /// What was decided.
    pub decision: AuditDecision,
    /// The deciding rule: an index into [`crate::policy::Policy::rules`]; `None` when the
    /// policy's default decided.
    pub rule: Option<usize>,
    /// The calling process (as the FUSE request gives it).
    pub pid: u32,
    /// The calling uid.
    pub uid: u32,
    /// `rename`/`link`: the destination; `symlink`: the target as written.
    pub to: Option<String>,
    /// Opens: `"read"` or `"write"`.
    pub mode: Option<&'static str>,
    /// Refusals: the errno name returned (`"EACCES"`, `"ENOENT"`).
    pub errno: Option<&'static str>,
    /// Allowed opens, recorded at close: bytes read through the handle.
    pub bytes_read: Option<u64>,
    /// Allowed opens, recorded at close: bytes written through the handle.
    pub bytes_written: Option<u64>,
}

impl AccessRecord {
    /// A record with only the required fields (`to`, `mode`, `errno` and byte counts unset).
    pub fn new(
        op: Op,
        path: impl Into<String>,
        decision: AuditDecision,
        rule: Option<usize>,
        pid: u32,
        uid: u32,
    ) -> AccessRecord {
        AccessRecord {
            op,
            path: path.into(),
            decision,
            rule,
            pid,
            uid,
            to: None,
            mode: None,
            errno: None,
            bytes_read: None,
            bytes_written: None,
        }
    }

    /// Whether this access changes the workspace: a change operation, or an open for writing.
    pub fn is_change(&self) -> bool {
        self.op.is_change() || (self.op == Op::Open && self.mode == Some("write"))
    }

    /// Whether the audit level keeps this record: `deny` keeps refusals and probes, `write`
    /// adds allowed changes (including opens for writing), `all` keeps everything.
    pub fn kept_at(&self, level: AuditLevel) -> bool {
        match level {
            AuditLevel::Off => false,
            AuditLevel::Deny => self.decision != AuditDecision::Allow,
            AuditLevel::Write => self.decision != AuditDecision::Allow || self.is_change(),
            AuditLevel::All => true,
        }
    }
}

/// Lowercase hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_filter() {
        let open = |d| {
            let mut r = AccessRecord::new(Op::Open, "/a", d, None, 1, 0);
            r.mode = Some("read");
            r
        };
        let mut wopen = open(AuditDecision::Allow);
        wopen.mode = Some("write");
        let unlink = AccessRecord::new(Op::Unlink, "/a", AuditDecision::Allow, Some(0), 1, 0);
        let probe = AccessRecord::new(Op::Lookup, "/.env", AuditDecision::Hidden, Some(2), 1, 0);
        let cases = [
            (open(AuditDecision::Allow), [false, false, false, true]),
            (open(AuditDecision::Deny), [false, true, true, true]),
            (wopen, [false, false, true, true]),
            (unlink, [false, false, true, true]),
            (probe, [false, true, true, true]),
        ];
        for (r, expect) in cases {
            for (level, want) in [
                AuditLevel::Off,
                AuditLevel::Deny,
                AuditLevel::Write,
                AuditLevel::All,
            ]
            .into_iter()
            .zip(expect)
            {
                assert_eq!(r.kept_at(level), want, "{r:?} at {level}");
            }
        }
    }

    #[test]
    fn hex() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(GENESIS.len(), 64);
    }
}

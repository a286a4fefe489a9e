//! `audit summary`: what a container read, wrote, was refused, probed, and which of its grants
//! it never used.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use anyhow::{anyhow, Context};
use serde::Serialize;
use serde_json::Value;

use super::file::{totals_of, Totals};
use super::read::latest_run;
use super::{AuditDecision, Op, Record};
use crate::policy::{EffectiveRule, Level, Origin};

/// A rule granting `read` or `write` that no allowed access was decided by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// Its index in the effective rules (the `rule` of access records).
    pub rule: usize,
    /// Its pattern as written.
    pub pattern: String,
    /// `read` or `write`.
    pub permission: String,
}

/// A path the container was refused, and what it tried there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// The path.
    pub path: String,
    /// What was refused: `read`, `write` (opens), or the operation's name.
    pub ops: Vec<String>,
}

/// A rename.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Rename {
    /// The old name.
    pub from: String,
    /// The new name.
    pub to: String,
}

/// What a container did, from its audit records. Path lists are sorted, without repeats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// The container's id (from the records).
    pub container: String,
    /// The digest of the policy of the run summarised (`None`: no `create` record with a
    /// policy, so the never-touched grants are unknown).
    pub policy_sha256: Option<String>,
    /// Records summarised.
    pub records: u64,
    /// Opened for reading (or `readlink`, `getxattr`, `listxattr`), allowed.
    pub read: Vec<String>,
    /// Opened for writing, or changed (`setattr`, `setxattr`, `removexattr`), allowed.
    pub written: Vec<String>,
    /// Created (`create`, `mknod`, `mkdir`, `symlink`, the new name of `link`).
    pub created: Vec<String>,
    /// Deleted (`unlink`, `rmdir`).
    pub deleted: Vec<String>,
    /// Renamed.
    pub renamed: Vec<Rename>,
    /// Listed (`opendir`), allowed.
    pub listed: Vec<String>,
    /// Refused (`deny`).
    pub refused: Vec<Refusal>,
    /// Hidden paths asked for (`hidden`).
    pub probed: Vec<String>,
    /// Rules of the container's policy granting `read` or `write` that decided no allowed
    /// access ("did NOT access /secrets"). The administrator's floor rules are not grants.
    pub untouched: Vec<Grant>,
    /// Bytes read through allowed opens.
    pub bytes_read: u64,
    /// Bytes written through allowed opens.
    pub bytes_written: u64,
    /// Records per decision, and records that could not be written.
    pub totals: Totals,
}

/// Summarises `records` (access records; others are skipped except `daemon-stop` for the
/// dropped count). `policy_rules` are the effective rules of the policy the records' `rule`
/// indices refer to ([`crate::policy::Policy::rules`]); pass `&[]` if unknown.
pub fn summary(records: &[Record], policy_rules: &[EffectiveRule]) -> Summary {
    let mut read = BTreeSet::new();
    let mut written = BTreeSet::new();
    let mut created = BTreeSet::new();
    let mut deleted = BTreeSet::new();
    let mut renamed = BTreeSet::new();
    let mut listed = BTreeSet::new();
    let mut refused: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut probed = BTreeSet::new();
    let mut touched = HashSet::new();
    let mut s = Summary {
        container: records
            .first()
            .map(|r| r.container.clone())
            .unwrap_or_default(),
        records: records.len() as u64,
        totals: totals_of(records),
        ..Summary::default()
    };
    for r in records.iter().filter(|r| r.is_access()) {
        let (Some(op), Some(path), Some(decision)) = (r.op, r.path.as_ref(), r.decision) else {
            continue;
        };
        match decision {
            AuditDecision::Hidden => {
                probed.insert(path.clone());
                continue;
            }
            AuditDecision::Deny => {
                let what = match (op, r.mode.as_deref()) {
                    (Op::Open, Some(m)) => m.to_string(),
                    _ => op.as_str().to_string(),
                };
                refused.entry(path.clone()).or_default().insert(what);
                continue;
            }
            AuditDecision::Allow => {}
        }
        if let Some(i) = r.rule {
            touched.insert(i);
        }
        s.bytes_read += r.bytes_read.unwrap_or(0);
        s.bytes_written += r.bytes_written.unwrap_or(0);
        match op {
            Op::Open if r.mode.as_deref() == Some("write") => {
                written.insert(path.clone());
                if r.bytes_read.unwrap_or(0) > 0 {
                    read.insert(path.clone());
                }
            }
            Op::Open | Op::Readlink | Op::Getxattr | Op::Listxattr => {
                read.insert(path.clone());
            }
            Op::Opendir => {
                listed.insert(path.clone());
            }
            Op::Create | Op::Mknod | Op::Mkdir | Op::Symlink => {
                created.insert(path.clone());
            }
            Op::Link => {
                if let Some(to) = &r.to {
                    created.insert(to.clone());
                }
            }
            Op::Unlink | Op::Rmdir => {
                deleted.insert(path.clone());
            }
            Op::Rename => {
                renamed.insert(Rename {
                    from: path.clone(),
                    to: r.to.clone().unwrap_or_default(),
                });
            }
            Op::Setattr | Op::Setxattr | Op::Removexattr => {
                written.insert(path.clone());
            }
            Op::Lookup | Op::Access => {}
        }
    }
    s.untouched = policy_rules
        .iter()
        .enumerate()
        .filter(|(i, r)| {
            r.origin != Origin::Floor
                && matches!(r.rule.permission, Level::Read | Level::Write)
                && !touched.contains(i)
        })
        .map(|(i, r)| Grant {
            rule: i,
            pattern: r.rule.pattern.clone(),
            permission: r.rule.permission.as_str().to_string(),
        })
        .collect();
    s.read = read.into_iter().collect();
    s.written = written.into_iter().collect();
    s.created = created.into_iter().collect();
    s.deleted = deleted.into_iter().collect();
    s.renamed = renamed.into_iter().collect();
    s.listed = listed.into_iter().collect();
    s.refused = refused
        .into_iter()
        .map(|(path, ops)| Refusal {
            path,
            ops: ops.into_iter().collect(),
        })
        .collect();
    s.probed = probed.into_iter().collect();
    s
}

/// Summarises the latest run in `records` (from the last `create` record on), with the policy
/// recorded in that `create` record (`info.policy`, canonical JSON). Errors if that policy
/// is present but does not parse or does not match its recorded digest.
pub fn summary_from_log(records: &[Record]) -> anyhow::Result<Summary> {
    let run = latest_run(records);
    let create = run.first().filter(|r| r.event == "create");
    let policy_json = create.and_then(|r| match r.info.get("policy") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(v @ Value::Object(_)) => Some(v.to_string()),
        _ => None,
    });
    let Some(json) = policy_json else {
        return Ok(summary(run, &[]));
    };
    let line = create.map(|r| r.line).unwrap_or(0);
    let digest = super::sha256_hex(json.as_bytes());
    if let Some(recorded) = create.and_then(|r| r.info.get("policy_sha256")) {
        if recorded.as_str() != Some(digest.as_str()) {
            return Err(anyhow!(
                "line {line}: the recorded policy does not match its policy_sha256"
            ));
        }
    }
    let policy = crate::fence::daemon::policy_from_canonical(&json)
        .with_context(|| format!("line {line}: invalid policy in the create record"))?;
    let mut s = summary(run, policy.rules());
    s.policy_sha256 = Some(digest);
    Ok(s)
}

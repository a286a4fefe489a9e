//! Settling a container's delta (SPEC §5): what changed (`diff`), applying it to the base
//! (`commit`), handing it over as an OCI layer (`export`), and what the fence records so that a
//! commit never overwrites what changed on the host meanwhile (`origins`).
//!
//! The delta of a workspace is its upper directory (see [`crate::fence::layers`]): entries
//! made or changed by the container, whiteouts (character devices 0:0) for deleted base
//! entries, and opaque directories (`trusted.agentfense.opaque`) that replaced base ones.

pub mod commit;
pub mod diff;
pub mod export;
pub mod gc;
pub mod origins;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::audit::{self, AUDIT_FILE};
use crate::config::AdminConfig;
use crate::lifecycle::{container_state_dir, FenceRecord, WorkspaceRecord};
use crate::policy::{AuditLevel, DeltaMode, Policy};

/// The policy a container ran under, from its fence record.
pub fn record_policy(rec: &FenceRecord) -> Result<Policy> {
    crate::fence::daemon::policy_from_canonical(&rec.policy)
}

fn journal_path(w: &WorkspaceRecord) -> PathBuf {
    let mut p = w.upper.clone().into_os_string();
    p.push(".commit-journal");
    PathBuf::from(p)
}

fn origins_of(w: &WorkspaceRecord) -> PathBuf {
    w.origins.clone().unwrap_or_else(|| {
        let mut p = w.upper.clone().into_os_string();
        p.push(".origins");
        PathBuf::from(p)
    })
}

fn require_settleable(id: &str, rec: &FenceRecord) -> Result<()> {
    if rec.delta == DeltaMode::Off {
        bail!("container {id} wrote straight to its workspace (delta off): there is no delta");
    }
    if rec.live {
        bail!(
            "container {id} is still running over its delta: delete it first (its delta is kept \
             unless it asked for discard)"
        );
    }
    Ok(())
}

/// Holds the container's commit lock (one settling at a time).
struct Lock(#[allow(dead_code)] std::fs::File);

fn lock(cdir: &Path, id: &str) -> Result<Lock> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cdir.join("settle.lock"))
        .context("failed to open the settle lock")?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Lock(f)),
        Err(_) => bail!("the delta of {id} is being settled by another process"),
    }
}

/// Applies a deleted container's delta to its bases (SPEC §5), records a `commit` audit
/// record, and returns what happened. Conflicts stay in the kept delta.
pub fn commit(admin: &AdminConfig, id: &str, rec: &FenceRecord) -> Result<commit::Report> {
    require_settleable(id, rec)?;
    let cdir = container_state_dir(admin, id);
    let _lock = lock(&cdir, id)?;
    let policy = record_policy(rec)?;
    let tag: String = id.chars().take(12).collect();
    let mut report = commit::Report::default();
    let mut failure = None;
    for w in &rec.workspaces {
        if !w.upper.exists() {
            continue;
        }
        let origins = origins_of(w);
        let journal = journal_path(w);
        let ws = commit::Workspace {
            dest: &w.dest,
            base: &w.base,
            upper: &w.upper,
            origins: &origins,
            journal: &journal,
            tag: &tag,
        };
        if let Err(e) = commit::commit_workspace(&ws, &policy, &mut report) {
            failure = Some(e.context(format!("commit of {} stopped", w.dest)));
            break;
        }
    }
    for l in [&mut report.added, &mut report.changed, &mut report.deleted] {
        l.sort();
    }
    if rec.audit != AuditLevel::Off {
        let info = serde_json::json!({
            "added": report.added.len(),
            "changed": report.changed.len(),
            "deleted": report.deleted.len(),
            "conflicts": report.conflicts,
            "complete": failure.is_none(),
            "error": failure.as_ref().map(|e| format!("{e:#}")),
        });
        audit::append_lifecycle(&cdir.join(AUDIT_FILE), id, "commit", info)
            .with_context(|| format!("failed to write the commit record of {id}"))?;
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// Drops a deleted container's delta (the audit trail stays).
pub fn discard(admin: &AdminConfig, id: &str, rec: &FenceRecord) -> Result<()> {
    require_settleable(id, rec)?;
    let cdir = container_state_dir(admin, id);
    let _lock = lock(&cdir, id)?;
    for w in &rec.workspaces {
        for p in [origins_of(w), journal_path(w)] {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("failed to remove {}", p.display()))
                }
                _ => {}
            }
        }
        match std::fs::remove_dir_all(&w.upper) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("failed to remove {}", w.upper.display()))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The changes of every workspace of a container (running or deleted).
pub fn diff(id: &str, rec: &FenceRecord) -> Result<Vec<(diff::Kind, String)>> {
    if rec.delta == DeltaMode::Off {
        bail!("container {id} wrote straight to its workspace (delta off): there is no delta");
    }
    let policy = record_policy(rec)?;
    let mut out = Vec::new();
    for w in &rec.workspaces {
        if !w.upper.exists() {
            continue;
        }
        let origins = origins_of(w);
        out.extend(diff::diff_workspace(
            &w.dest,
            &w.base,
            &w.upper,
            Some(&origins),
            &policy,
        )?);
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

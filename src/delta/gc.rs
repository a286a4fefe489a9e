//! `gc`: removing the state (delta, audit trail) of fenced containers that no longer exist.
//!
//! A container's state is never removed while its fence is live, while the runtime that
//! created it still has it, while anything is mounted beneath its state directory, or while
//! an engine we can ask still knows the container: a stopped Docker or podman container (whose
//! runtime state is gone between runs) keeps its delta for its next start. Engines are asked
//! through their own state: `/var/lib/docker/containers/ID` (Docker),
//! `/var/lib/containers/storage/overlay-containers/ID` (podman), `ctr -n NAMESPACE containers
//! info ID` for containerd runtimes rooted at `/run/containerd/runc/NAMESPACE`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};

use crate::config::AdminConfig;
use crate::lifecycle::{read_record, FenceRecord};

/// `30s`, `15m`, `24h`, `7d` (or plain seconds).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("invalid duration {s:?} (e.g. 30s, 15m, 24h, 7d)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("invalid duration {s:?} (e.g. 30s, 15m, 24h, 7d)"),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// What gc decided about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub id: String,
    /// Removed (or would be, with `dry_run`).
    pub remove: bool,
    /// Why it stays, or what was removed.
    pub why: String,
}

/// Why the container's state must stay, if it must.
fn in_use(id: &str, cdir: &Path, rec: &FenceRecord) -> Option<String> {
    if rec.live {
        return Some("its fence is live".into());
    }
    if rec.runtime_root.join(id).exists() {
        return Some("the runtime still has it".into());
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
        let prefix = cdir.to_string_lossy().into_owned();
        if mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .any(|mp| mp == prefix || mp.starts_with(&format!("{prefix}/")))
        {
            return Some("something is mounted beneath its state directory".into());
        }
    }
    for p in [
        format!("/var/lib/docker/containers/{id}"),
        format!("/var/lib/containers/storage/overlay-containers/{id}"),
    ] {
        if Path::new(&p).exists() {
            return Some(format!("an engine still has it ({p})"));
        }
    }
    if let Ok(ns) = rec.runtime_root.strip_prefix("/run/containerd/runc") {
        if let Some(ns) = ns.to_str().filter(|n| !n.is_empty() && !n.contains('/')) {
            let known = std::process::Command::new("ctr")
                .args(["-n", ns, "containers", "info", id])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| s.success());
            if let Ok(true) = known {
                return Some(format!("containerd still has it (namespace {ns})"));
            }
        }
    }
    None
}

/// Looks at every container state directory; removes those of containers that no longer
/// exist (and, with `older_than`, were torn down at least that long ago).
pub fn gc(
    admin: &AdminConfig,
    older_than: Option<Duration>,
    dry_run: bool,
) -> Result<Vec<Verdict>> {
    let dir = admin.state_dir.join("containers");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", dir.display())),
    };
    let mut ids: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    ids.sort();
    let mut out = Vec::new();
    for id in ids {
        let cdir = dir.join(&id);
        let verdict = |remove: bool, why: String| Verdict {
            id: id.clone(),
            remove,
            why,
        };
        let rec = match read_record(admin, &id) {
            Ok(Some(r)) => r,
            Ok(None) => {
                out.push(verdict(false, "no fence record: left alone".into()));
                continue;
            }
            Err(e) => {
                out.push(verdict(false, format!("unreadable fence record: {e:#}")));
                continue;
            }
        };
        if let Some(why) = in_use(&id, &cdir, &rec) {
            out.push(verdict(false, why));
            continue;
        }
        if let Some(min) = older_than {
            let age = std::fs::metadata(cdir.join("fence.json"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .unwrap_or_default();
            if age < min {
                out.push(verdict(false, format!("deleted {}s ago", age.as_secs())));
                continue;
            }
        }
        if !dry_run {
            // Under the settle lock: never under a commit in progress.
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(cdir.join("settle.lock"));
            let locked = lock.as_ref().is_ok_and(|f| {
                rustix::fs::flock(f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
            });
            if !locked {
                out.push(verdict(false, "its delta is being settled".into()));
                continue;
            }
            std::fs::remove_dir_all(&cdir)
                .with_context(|| format!("failed to remove {}", cdir.display()))?;
        }
        out.push(verdict(true, "state removed (delta, audit trail)".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604800));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
    }
}

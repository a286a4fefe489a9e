//! `gc`: removing the state (delta, audit trail) of fenced containers that no longer exist.
//!
//! A container's state is never removed while its fence is live, while the runtime that
//! created it still has it, while anything is mounted beneath its state directory, or while
//! an engine we can ask still knows the container: a stopped Docker or podman container (whose
//! runtime state is gone between runs) keeps its delta for its next start. Engines are asked
//! through their own state: `/var/lib/docker/containers/ID` (Docker),
//! `/var/lib/containers/storage/overlay-containers/ID` (podman), `ctr -n NAMESPACE containers
//! info ID` for containerd runtimes rooted at `/run/containerd/runc/NAMESPACE`.
//!
//! Containers fenced by an engine's OCI hook (runtime root `hook:ENGINE`, see
//! [`crate::cli::hook`]) have no runtime state of ours: their runtime root names an engine,
//! never a directory. Their record stays `live` if the engine never ran the `poststop` hook
//! (podman died between `precreate` and the runtime's create, or the container was removed
//! behind its back). Such a fence counts as live while one of its daemons runs (the pid in
//! the record, with a fence daemon's command line for that fence and the recorded start
//! time), or while the engine still knows the container (its storage entry, or `podman
//! container exists`); otherwise it is stale: gc tears the dead fence down (its mounts answer
//! ENOTCONN) and removes the state.

use std::path::{Path, PathBuf};
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

/// Where gc asks whether a container still exists. [`Host::real`] in use; tests point it
/// elsewhere.
#[derive(Debug, Clone)]
pub struct Host {
    /// Directories holding one entry per container an engine knows, named by its id:
    /// Docker's `/var/lib/docker/containers`, podman's (and CRI-O's) containers/storage
    /// `/var/lib/containers/storage/overlay-containers`.
    pub engine_dirs: Vec<PathBuf>,
    /// `/proc/self/mountinfo`.
    pub mountinfo: PathBuf,
    /// Ask `ctr` about containers of containerd runtime roots.
    pub ask_containerd: bool,
    /// podman, asked (`podman container exists`) about hook-fenced containers whose storage
    /// entry is gone, in case its storage lives somewhere else (`graphroot`).
    pub podman: Option<PathBuf>,
}

impl Host {
    /// This machine.
    pub fn real() -> Host {
        let podman = ["/usr/bin/podman", "/usr/local/bin/podman"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file());
        Host {
            engine_dirs: vec![
                PathBuf::from("/var/lib/docker/containers"),
                PathBuf::from("/var/lib/containers/storage/overlay-containers"),
            ],
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            ask_containerd: true,
            podman,
        }
    }
}

/// Whether any fence daemon of the record is still running: the process in the record,
/// alive, with our command line and start time (pids are reused). A record still marked
/// `live` whose daemons are all gone was never torn down: its engine died, or never created
/// the container.
fn daemon_running(rec: &FenceRecord) -> Option<i32> {
    rec.workspaces
        .iter()
        .filter_map(|w| w.daemon.as_ref())
        .find(|h| crate::fence::daemon::is_our_daemon(h))
        .map(|h| h.pid)
}

/// Whether something is mounted at or beneath `cdir`.
fn mounted_beneath(cdir: &Path, host: &Host) -> bool {
    let Ok(mounts) = std::fs::read_to_string(&host.mountinfo) else {
        return false;
    };
    let prefix = cdir.to_string_lossy().into_owned();
    mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| mp == prefix || mp.starts_with(&format!("{prefix}/")))
}

/// Which engine still knows container `id`, if one we can ask does.
fn engine_knows(id: &str, rec: &FenceRecord, host: &Host) -> Option<String> {
    for d in &host.engine_dirs {
        let p = d.join(id);
        if p.exists() {
            return Some(format!("an engine still has it ({})", p.display()));
        }
    }
    let hook = crate::cli::hook::hook_engine(&rec.runtime_root);
    if hook == Some("podman") {
        if let Some(podman) = &host.podman {
            let known = std::process::Command::new(podman)
                .args(["container", "exists", "--external", id])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| s.code());
            match known {
                Ok(Some(1)) => {}
                Ok(Some(0)) => return Some("podman still has it".into()),
                // podman could not answer: keep the state rather than guess.
                _ => return Some("podman could not say whether it still has it".into()),
            }
        }
    }
    if !host.ask_containerd {
        return None;
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

/// What gc makes of one container's record.
#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Its state must stay, for this reason.
    InUse(String),
    /// Gone: its state can be removed.
    Gone,
    /// Fenced by an engine's hook (`hook:ENGINE`), still marked live, but its daemons are
    /// dead and its engine no longer knows the container (it never created it, or forgot it
    /// without running the poststop hook): the dead fence is torn down, then the state goes.
    StaleHook,
}

fn state_of(id: &str, cdir: &Path, rec: &FenceRecord, host: &Host) -> State {
    let hook = crate::cli::hook::hook_engine(&rec.runtime_root).is_some();
    if rec.live {
        if !hook {
            return State::InUse("its fence is live".into());
        }
        // A hook's fence has no runtime state of ours to consult: it is live while one of its
        // daemons runs, or while the engine still knows the container (a container whose
        // daemon died fails closed, and is fenced again when it is started again).
        if let Some(pid) = daemon_running(rec) {
            return State::InUse(format!("its fence is live (daemon {pid})"));
        }
        if let Some(why) = engine_knows(id, rec, host) {
            return State::InUse(why);
        }
        return State::StaleHook;
    }
    // A hook's runtime root (`hook:podman`) names an engine, not a directory.
    if !hook && rec.runtime_root.is_absolute() && rec.runtime_root.join(id).exists() {
        return State::InUse("the runtime still has it".into());
    }
    if mounted_beneath(cdir, host) {
        return State::InUse("something is mounted beneath its state directory".into());
    }
    match engine_knows(id, rec, host) {
        Some(why) => State::InUse(why),
        None => State::Gone,
    }
}

/// Looks at every container state directory; removes those of containers that no longer
/// exist (and, with `older_than`, were torn down at least that long ago).
pub fn gc(
    admin: &AdminConfig,
    older_than: Option<Duration>,
    dry_run: bool,
) -> Result<Vec<Verdict>> {
    gc_on(admin, older_than, dry_run, &Host::real())
}

/// [`gc`], asking `host` whether containers still exist.
pub fn gc_on(
    admin: &AdminConfig,
    older_than: Option<Duration>,
    dry_run: bool,
    host: &Host,
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
        let state = state_of(&id, &cdir, &rec, host);
        if let State::InUse(why) = state {
            out.push(verdict(false, why));
            continue;
        }
        if let Some(min) = older_than {
            // The record was last written at the container's delete (for a stale hook fence:
            // when its fence started).
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
        let what = if state == State::StaleHook {
            "stale hook fence torn down (daemons gone, engine no longer has it); state removed"
        } else {
            "state removed (delta, audit trail)"
        };
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
            if state == State::StaleHook {
                // Its dead mounts (ENOTCONN) go, and the record is closed, as poststop would
                // have done; then what is left must be nothing mounted.
                if let Err(e) = crate::lifecycle::teardown(admin, &id) {
                    out.push(verdict(
                        false,
                        format!("its dead fence could not be torn down: {e:#}"),
                    ));
                    continue;
                }
                if mounted_beneath(&cdir, host) {
                    out.push(verdict(
                        false,
                        "something is mounted beneath its state directory".into(),
                    ));
                    continue;
                }
            }
            std::fs::remove_dir_all(&cdir)
                .with_context(|| format!("failed to remove {}", cdir.display()))?;
        }
        out.push(verdict(true, what.into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fence::daemon::DaemonHandle;
    use crate::lifecycle::{container_state_dir, WorkspaceRecord};

    const ID: &str = "aac94cb1ba764197bfd7582422a15ed5f7eefe79fcc7f1d27f8e87765ec7de24";

    struct Fixture {
        dir: tempfile::TempDir,
        admin: AdminConfig,
        host: Host,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let admin = AdminConfig {
            state_dir: dir.path().join("state"),
            ..Default::default()
        };
        std::fs::create_dir_all(dir.path().join("engine")).unwrap();
        std::fs::write(dir.path().join("mountinfo"), "").unwrap();
        let host = Host {
            engine_dirs: vec![dir.path().join("engine")],
            mountinfo: dir.path().join("mountinfo"),
            ask_containerd: false,
            podman: None,
        };
        Fixture { dir, admin, host }
    }

    /// Writes a fence record for `id`: fenced by `root`, one workspace whose daemon is `pid`
    /// serving config `cfg` (a mount point that does not exist, so that tearing it down needs
    /// no privilege).
    fn record(f: &Fixture, id: &str, root: &str, live: bool, pid: i32, cfg: &Path) -> PathBuf {
        let cdir = container_state_dir(&f.admin, id);
        std::fs::create_dir_all(cdir.join("upper")).unwrap();
        let rec = FenceRecord {
            container_id: id.into(),
            runtime_root: PathBuf::from(root),
            workspaces: vec![WorkspaceRecord {
                dest: "/w".into(),
                base: f.dir.path().join("base"),
                upper: cdir.join("upper"),
                mountpoint: cdir.join("mnt").join("w"),
                daemon: Some(DaemonHandle {
                    pid,
                    mountpoint: cdir.join("mnt").join("w"),
                    config: cfg.to_path_buf(),
                    start_time: 0,
                }),
                origins: None,
            }],
            delta: crate::policy::DeltaMode::Keep,
            audit: crate::policy::AuditLevel::Off,
            policy: "[]".into(),
            policy_sha256: String::new(),
            live,
        };
        std::fs::write(cdir.join("fence.json"), serde_json::to_vec(&rec).unwrap()).unwrap();
        cdir
    }

    /// A process whose command line is a fence daemon's for `cfg`, as `is_our_daemon` sees it.
    fn fake_daemon(cfg: &Path) -> std::process::Child {
        let child = std::process::Command::new("sh")
            .args(["-c", "sleep 60; true", "fence-daemon"])
            .arg(cfg)
            .spawn()
            .unwrap();
        // Until the shell has exec'd, /proc shows the test binary's command line.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read(format!("/proc/{}/cmdline", child.id()))
            .unwrap_or_default()
            .windows(12)
            .any(|w| w == b"fence-daemon")
        {
            assert!(std::time::Instant::now() < deadline, "sh did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    fn dead_pid() -> i32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id() as i32;
        c.wait().unwrap();
        pid
    }

    #[test]
    fn stale_hook_fence_is_torn_down_and_collected() {
        let f = fixture();
        let cfg = f.dir.path().join("daemon.json");
        let cdir = record(&f, ID, "hook:podman", true, dead_pid(), &cfg);
        // Dry run: would remove, changes nothing.
        let v = gc_on(&f.admin, None, true, &f.host).unwrap();
        assert_eq!(v.len(), 1);
        assert!(v[0].remove, "{v:?}");
        assert!(v[0].why.contains("stale hook fence"), "{v:?}");
        assert!(read_record(&f.admin, ID).unwrap().unwrap().live);
        // Too young for --older-than: stays.
        let v = gc_on(&f.admin, Some(Duration::from_secs(3600)), false, &f.host).unwrap();
        assert!(!v[0].remove, "{v:?}");
        assert!(cdir.exists());
        let v = gc_on(&f.admin, None, false, &f.host).unwrap();
        assert!(v[0].remove, "{v:?}");
        assert!(!cdir.exists());
    }

    #[test]
    fn hook_fence_stays_while_its_engine_knows_the_container() {
        let f = fixture();
        let cfg = f.dir.path().join("daemon.json");
        let cdir = record(&f, ID, "hook:podman", true, dead_pid(), &cfg);
        std::fs::create_dir(f.dir.path().join("engine").join(ID)).unwrap();
        let v = gc_on(&f.admin, None, false, &f.host).unwrap();
        assert!(!v[0].remove, "{v:?}");
        assert!(v[0].why.contains("an engine still has it"), "{v:?}");
        assert!(cdir.exists());
        assert!(read_record(&f.admin, ID).unwrap().unwrap().live);
    }

    #[test]
    fn hook_fence_stays_while_its_daemon_runs() {
        let f = fixture();
        let cfg = f.dir.path().join("daemon.json");
        let mut d = fake_daemon(&cfg);
        let cdir = record(&f, ID, "hook:podman", true, d.id() as i32, &cfg);
        let v = gc_on(&f.admin, None, false, &f.host);
        // Another process with a fence daemon's name, but not this fence's config: not ours.
        let other = record(
            &f,
            "other",
            "hook:podman",
            true,
            d.id() as i32,
            Path::new("/x"),
        );
        let w = gc_on(&f.admin, None, false, &f.host);
        let _ = d.kill();
        let _ = d.wait();
        let v = v.unwrap();
        assert!(!v[0].remove, "{v:?}");
        assert_eq!(v[0].why, format!("its fence is live (daemon {})", d.id()));
        assert!(cdir.exists());
        let w = w.unwrap();
        assert_eq!(w.iter().filter(|v| v.remove).count(), 1, "{w:?}");
        assert!(!other.exists());
    }

    #[test]
    fn runtime_fenced_live_record_is_never_guessed_about() {
        let f = fixture();
        let cfg = f.dir.path().join("daemon.json");
        let cdir = record(
            &f,
            "c1",
            "/run/agentfense-test-none",
            true,
            dead_pid(),
            &cfg,
        );
        let v = gc_on(&f.admin, None, false, &f.host).unwrap();
        assert_eq!(v[0].why, "its fence is live");
        assert!(cdir.exists());
    }

    #[test]
    fn runtime_roots_that_are_not_directories_are_not_looked_up() {
        let f = fixture();
        let cfg = f.dir.path().join("daemon.json");
        // Relative to the test's working directory (the crate), `src/cli` exists: a root that
        // is not absolute (as `hook:podman` is not) must never be joined and looked up.
        record(&f, "cli", "src", false, dead_pid(), &cfg);
        record(&f, ID, "hook:podman", false, dead_pid(), &cfg);
        let v = gc_on(&f.admin, None, true, &f.host).unwrap();
        assert!(v.iter().all(|v| v.remove), "{v:?}");
    }

    #[test]
    fn something_mounted_beneath_keeps_the_state() {
        let f = fixture();
        let cfg = f.dir.path().join("daemon.json");
        let cdir = record(&f, ID, "hook:podman", false, dead_pid(), &cfg);
        std::fs::write(
            &f.host.mountinfo,
            format!(
                "99 1 0:50 / {} rw - fuse agentfense:{ID} rw\n",
                cdir.join("mnt/w").display()
            ),
        )
        .unwrap();
        let v = gc_on(&f.admin, None, false, &f.host).unwrap();
        assert!(!v[0].remove, "{v:?}");
        assert!(v[0].why.contains("mounted"), "{v:?}");
    }

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

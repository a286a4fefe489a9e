//! The fence daemon: the same binary, run as `agentfense-runc fence-daemon CONFIG`, one per
//! fenced workspace path of a container.
//!
//! The runtime starts it before libcontainer creates the container and waits until the mount
//! is live. The daemon starts its own session (`setsid`), closes every descriptor it inherited
//! (containerd reads the runtime's stdout and stderr until every copy is closed), reports
//! readiness on its stdout pipe, then puts `/dev/null` there and serves until unmounted.
//! If it dies, the kernel answers every access to the mount with an error: the workspace fails
//! closed.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::Fence;
use crate::audit::AuditLog;
use crate::config::AuditOverflow;
use crate::policy::{AuditLevel, Level, Policy, Rule};

/// Everything a daemon needs, written by the runtime as JSON into the container's state dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    pub container_id: String,
    /// The shared base (None: `delta=off`, changes go straight to `upper`, the base itself).
    pub base: Option<PathBuf>,
    pub upper: PathBuf,
    pub mountpoint: PathBuf,
    /// The effective policy, in the engine's canonical JSON.
    pub policy: String,
    /// Mount read-only (the workspace's own mount was `ro`).
    pub read_only: bool,
    /// FUSE worker threads.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// The container's audit trail (None: audit off).
    #[serde(default)]
    pub audit_path: Option<PathBuf>,
    #[serde(default)]
    pub audit_level: AuditLevel,
    #[serde(default)]
    pub audit_overflow: AuditOverflow,
    /// Where to record what the base held at each path the delta takes over (for `commit`).
    #[serde(default)]
    pub origins: Option<PathBuf>,
}

fn default_threads() -> usize {
    4
}

/// The canonical JSON's shape.
#[derive(Deserialize)]
struct Canonical {
    default: Level,
    rules: Vec<Rule>,
    #[serde(default)]
    floor: Vec<Rule>,
}

/// Rebuilds a policy from [`Policy::canonical_json`].
pub fn policy_from_canonical(json: &str) -> Result<Policy> {
    let c: Canonical = serde_json::from_str(json).context("invalid policy in daemon config")?;
    Policy::new(c.rules, c.default)
        .and_then(|p| p.with_floor(&c.floor))
        .map_err(|e| anyhow!("{e}"))
}

/// The daemon's main: mount, say so, serve. Returns when the file system is unmounted.
pub fn run(config_path: &Path) -> Result<()> {
    // Few malloc arenas: with one per FUSE thread, memory freed when the kernel forgets
    // nodes stays scattered over the arenas and the daemon's size ratchets up with every
    // burst of new paths. (Measured in test_faults::test_many_files_memory.)
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    // Every file the container holds open is a descriptor here, plus the upper layer's
    // cached directories: the soft limit the engine left (often 1024) goes up to the hard one.
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if lim
        .maximum
        .is_some_and(|max| lim.current.is_some_and(|cur| cur < max))
    {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    // Our own session: no signal aimed at the runtime's process group reaches us.
    let _ = nix::unistd::setsid();
    close_inherited_fds();
    // Modes come from the container's requests, already masked by its own umask: ours must
    // not take anything more away.
    rustix::process::umask(rustix::fs::Mode::empty());
    // Before any thread exists (capabilities are per thread; threads inherit them).
    harden().context("failed to drop the daemon's privileges")?;
    let cfg: DaemonConfig = serde_json::from_str(
        &fs::read_to_string(config_path)
            .with_context(|| format!("failed to read {}", config_path.display()))?,
    )
    .context("invalid daemon config")?;
    let policy = policy_from_canonical(&cfg.policy)?;
    let audit = match &cfg.audit_path {
        Some(p) if cfg.audit_level != AuditLevel::Off => Some(
            AuditLog::open(p, &cfg.container_id, cfg.audit_level, cfg.audit_overflow)
                .with_context(|| format!("failed to open the audit trail {}", p.display()))?,
        ),
        _ => None,
    };
    let origins = match (&cfg.origins, &cfg.base) {
        (Some(p), Some(_)) => crate::delta::origins::Origins::open(p)
            .with_context(|| format!("failed to open {}", p.display()))?,
        _ => crate::delta::origins::Origins::disabled(),
    };
    let layers = crate::fence::layers::Layers::open_with(cfg.base.as_deref(), &cfg.upper, origins);
    let fence = layers
        .and_then(|l| Fence::with_layers(policy, l, audit))
        .map_err(|e| {
            if e == crate::sys::fs::Errno::MEDIUMTYPE {
                anyhow!(
                "the workspace's file system matches names ignoring case; fencing it would let \
                 another spelling of a hidden name through, so it is refused"
            )
            } else {
                anyhow!("failed to open the workspace layers: {e}")
            }
        })?;
    let mut options = vec![
        fuser::MountOption::FSName(format!("agentfense:{}", cfg.container_id)),
        fuser::MountOption::Subtype("agentfense".into()),
        // No `default_permissions`: the daemon decides Unix permissions itself (fence/perm.rs),
        // so that root's access(2) agrees with the policy too.
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
    ];
    options.push(if cfg.read_only {
        fuser::MountOption::RO
    } else {
        fuser::MountOption::RW
    });
    let mut config = fuser::Config::default();
    config.mount_options = options;
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(cfg.threads.clamp(1, 64));
    config.clone_fd = true;
    let invalidation = fence.invalidation();
    let queue = fence.notifier_slot();
    if !Path::new("/dev/fuse").exists() {
        bail!(
            "/dev/fuse is missing: load the FUSE module (modprobe fuse) or make /dev/fuse \
             visible where the runtime runs"
        );
    }
    let session = fuser::Session::new(fence, &cfg.mountpoint, &config)
        .with_context(|| format!("failed to mount the fence at {}", cfg.mountpoint.display()))?;
    if let Ok(mut q) = queue.lock() {
        *q = Some(session.notifier());
    }
    if invalidation.is_none() {
        // Not fatal: without a watch the kernel keeps names and attributes one second only
        // (host changes still show; everything is slower). The usual cause is the per-user
        // limit of inotify instances, one per fence daemon.
        eprintln!(
            "agentfense fence {}: no inotify instance (fs.inotify.max_user_instances reached?): \
             caches kept 1 s instead of until the host changes a file",
            cfg.container_id
        );
    }
    if let Some((watch, nodes)) = invalidation {
        let notifier = session.notifier();
        std::thread::Builder::new()
            .name("watch".into())
            .spawn(move || watch.run(nodes, notifier))
            .context("failed to start the watch thread")?;
    }
    // Ready: the mount is live.
    println!("ready");
    redirect_stdout_to_null();
    release_startup_pages();
    session.run().context("fence session failed")?;
    Ok(())
}

/// Unmaps the pages of program files (ours and its libraries) that starting up touched
/// (argument parsing, configuration, mounting: the daemon runs the runtime's whole binary).
/// They stay in the page cache, shared with every other process; the pages serving requests
/// come back on first use. An idle daemon then holds about its own memory, not a copy of the
/// startup path.
fn release_startup_pages() {
    let Ok(smaps) = fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    // Mappings as (start, end, releasable): file-backed, not writable, and with no page the
    // process changed (a changed page of a private file mapping is an anonymous copy:
    // relocated read-only data, RELRO, has some, and dropping them would revert it to the
    // file's bytes).
    let mut maps: Vec<(usize, usize, bool)> = Vec::new();
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let Some(first) = f.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            else {
                continue;
            };
            let perms = f.next().unwrap_or("");
            let path = f.nth(3).unwrap_or("");
            let file = path.starts_with('/');
            maps.push((a, b, file && !perms.contains('w') && perms.ends_with('p')));
        } else if first == "Anonymous:" && f.next() != Some("0") {
            if let Some(m) = maps.last_mut() {
                m.2 = false;
            }
        }
    }
    for (a, b, ok) in maps {
        if ok {
            // SAFETY: a read-only private file mapping none of whose pages the process
            // changed: dropping them only makes the next access fault them back in from the
            // page cache, with the same contents.
            unsafe {
                libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED);
            }
        }
    }
}

/// The capabilities a fence daemon keeps: mounting and passthrough registration
/// (`CAP_SYS_ADMIN`, which also covers the `trusted.` attributes of the delta's bookkeeping),
/// reading and linking any file of the layers (`CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`),
/// giving copies and new files their owners and modes (`CAP_CHOWN`, `CAP_FOWNER`,
/// `CAP_FSETID`), and whiteouts (`CAP_MKNOD`, for 0:0 character devices).
pub const DAEMON_CAPS: [caps::Capability; 7] = [
    caps::Capability::CAP_SYS_ADMIN,
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_CHOWN,
    caps::Capability::CAP_FOWNER,
    caps::Capability::CAP_FSETID,
    caps::Capability::CAP_MKNOD,
];

/// Keeps only [`DAEMON_CAPS`] (also out of the bounding set, so nothing the daemon might ever
/// execute gets more), none inheritable or ambient, and sets `no_new_privs`.
fn harden() -> Result<()> {
    use caps::CapSet;
    let keep: caps::CapsHashSet = DAEMON_CAPS.into_iter().collect();
    rustix::thread::set_no_new_privs(true).context("no_new_privs")?;
    for c in caps::all() {
        if !keep.contains(&c) && caps::has_cap(None, CapSet::Bounding, c).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, c).with_context(|| format!("bounding {c}"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).context("ambient")?;
    caps::clear(None, CapSet::Inheritable).context("inheritable")?;
    let have = caps::read(None, CapSet::Permitted).context("permitted")?;
    let keep: caps::CapsHashSet = keep.intersection(&have).copied().collect();
    caps::set(None, CapSet::Effective, &keep).context("effective")?;
    caps::set(None, CapSet::Permitted, &keep).context("permitted")?;
    if std::env::var_os("AGENTFENSE_NO_SECCOMP").is_none() {
        confine().context("seccomp")?;
    }
    Ok(())
}

/// The system calls a fence daemon makes (file system work on the layers, FUSE, threads,
/// memory, inotify, its own mount). Anything else (execve, ptrace, sockets, bpf, module
/// loading, keyrings...) fails with ENOSYS: a daemon subverted through a FUSE request still
/// cannot run a program or reach the network.
const DAEMON_SYSCALLS: &[&str] = &[
    // files and directories, by descriptor
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "lseek",
    "open",
    "openat",
    "openat2",
    "close",
    "close_range",
    "dup",
    "dup2",
    "dup3",
    "fcntl",
    "flock",
    "fstat",
    "newfstatat",
    "statx",
    "lstat",
    "stat",
    "statfs",
    "fstatfs",
    "getdents64",
    "mkdirat",
    "mknodat",
    "unlinkat",
    "renameat",
    "renameat2",
    "linkat",
    "symlinkat",
    "readlinkat",
    "readlink",
    "fchown",
    "fchownat",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "utimensat",
    "ftruncate",
    "fallocate",
    "fsync",
    "fdatasync",
    "copy_file_range",
    "sendfile",
    "getxattr",
    "lgetxattr",
    "fgetxattr",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "listxattr",
    "llistxattr",
    "flistxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "access",
    "faccessat",
    "faccessat2",
    "getcwd",
    "ioctl",
    "poll",
    "ppoll",
    "inotify_init1",
    "inotify_add_watch",
    "inotify_rm_watch",
    "mount",
    "umount2",
    // memory, threads, signals, time
    "mmap",
    "munmap",
    "mprotect",
    "mremap",
    "madvise",
    "brk",
    "futex",
    "clone",
    "clone3",
    "set_robust_list",
    "rseq",
    "set_tid_address",
    "exit",
    "exit_group",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "sched_yield",
    "sched_getaffinity",
    "nanosleep",
    "clock_nanosleep",
    "clock_gettime",
    "gettimeofday",
    "getrandom",
    "getpid",
    "gettid",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "capget",
    "prctl",
    "prlimit64",
    "restart_syscall",
    "membarrier",
    "tgkill",
    "pipe2",
];

fn confine() -> Result<()> {
    use libseccomp::{ScmpAction, ScmpFilterContext, ScmpSyscall};
    let mut f = ScmpFilterContext::new(ScmpAction::Errno(libc::ENOSYS))?;
    for name in DAEMON_SYSCALLS {
        // A name this kernel or libseccomp does not know is simply not allowed.
        if let Ok(sc) = ScmpSyscall::from_name(name) {
            f.add_rule(ScmpAction::Allow, sc)?;
        }
    }
    f.load()?;
    Ok(())
}

fn close_inherited_fds() {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // The directory's own descriptor is among them; closing it after listing is harmless.
        let _ = nix::unistd::close(fd);
    }
}

fn redirect_stdout_to_null() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let _ = std::io::stdout().flush();
    if let Ok(null) = fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
}

/// A running daemon, as the runtime knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonHandle {
    pub pid: i32,
    pub mountpoint: PathBuf,
    /// The daemon's config file (it is on the daemon's command line).
    #[serde(default)]
    pub config: PathBuf,
    /// The process's start time (clock ticks since boot, /proc/PID/stat field 22): with the
    /// pid, names the process even after the pid is reused.
    #[serde(default)]
    pub start_time: u64,
}

fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Starts a daemon for `config` (already written at `config_path`) and waits until its mount
/// is live. On failure nothing is left running and the error carries the daemon's own words.
pub fn spawn(
    exe: &Path,
    config_path: &Path,
    cfg: &DaemonConfig,
    log: &Path,
) -> Result<DaemonHandle> {
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("failed to open {}", log.display()))?;
    let mut child = Command::new(exe)
        .arg("fence-daemon")
        .arg(config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .with_context(|| format!("failed to start the fence daemon ({})", exe.display()))?;
    let pid = child.id() as i32;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no daemon stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(r);
    });
    let fail = |child: &mut std::process::Child, why: String| -> anyhow::Error {
        let _ = child.kill();
        let _ = child.wait();
        let _ = unmount(&cfg.mountpoint);
        let tail = fs::read_to_string(log).unwrap_or_default();
        let last = tail
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string();
        if last.is_empty() {
            anyhow!("fence daemon {why}")
        } else {
            anyhow!("fence daemon {why}: {last}")
        }
    };
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(l)) if l.trim() == "ready" => {}
        Ok(_) => {
            let _ = child.wait();
            return Err(fail(&mut child, "failed".into()));
        }
        Err(_) => return Err(fail(&mut child, "did not become ready in 20s".into())),
    }
    // No thread of ours may outlive this call: libcontainer forks next, and a child forked
    // while another thread holds a lock (the allocator's, say) can deadlock. The reader is
    // done (it sent its line); the daemon, in its own session, is left unwaited (a runtime
    // that outlives it, `run` in the foreground, reaps it when it stops it).
    let _ = reader.join();
    drop(child);
    Ok(DaemonHandle {
        pid,
        mountpoint: cfg.mountpoint.clone(),
        config: config_path.to_path_buf(),
        start_time: start_time(pid).unwrap_or(0),
    })
}

/// Whether `path` is a mount point (per /proc/self/mountinfo, compared as bytes: other mount
/// points' names need not be UTF-8).
pub fn is_mounted(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(info) = fs::read("/proc/self/mountinfo") else {
        return false;
    };
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let want = canon.as_os_str().as_bytes();
    info.split(|b| *b == b'\n').any(|l| {
        l.split(|b| *b == b' ')
            .nth(4)
            .is_some_and(|mp| unescape_mount(mp) == want)
    })
}

fn unescape_mount(b: &[u8]) -> Vec<u8> {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Unmounts a fence mount: normally, else lazily (still busy). Not mounted is fine.
pub fn unmount(path: &Path) -> Result<()> {
    use nix::mount::{umount2, MntFlags};
    for _ in 0..3 {
        // Asked of the kernel directly: EINVAL means it is not (or no longer) a mount point.
        match umount2(path, MntFlags::empty()) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EBUSY) => {
                umount2(path, MntFlags::MNT_DETACH)
                    .with_context(|| format!("failed to detach {}", path.display()))?;
            }
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => bail!("failed to unmount {}: {e}", path.display()),
        }
    }
    if is_mounted(path) {
        bail!("{} is still mounted", path.display());
    }
    Ok(())
}

/// Stops a daemon: unmount (which ends its session), then make sure the process is gone.
/// Only a process that is really our daemon for this mount is signalled.
pub fn stop(handle: &DaemonHandle) -> Result<()> {
    let r = unmount(&handle.mountpoint);
    let pid = nix::unistd::Pid::from_raw(handle.pid);
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_our_daemon(handle) {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reap it if it is our own child (a runtime that started it and is still running).
    let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    r
}

/// Whether `handle.pid` is still a fence daemon serving `handle.mountpoint` (pids are reused).
pub fn is_our_daemon(handle: &DaemonHandle) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{}/cmdline", handle.pid)) else {
        return false;
    };
    if let Ok(stat) = fs::read_to_string(format!("/proc/{}/stat", handle.pid)) {
        if stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            == Some("Z")
        {
            return false;
        }
    }
    if handle.start_time != 0 && start_time(handle.pid) != Some(handle.start_time) {
        return false;
    }
    use std::os::unix::ffi::OsStrExt;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.iter().any(|a| *a == b"fence-daemon")
        && args
            .iter()
            .any(|a| *a == handle.config.as_os_str().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_policy_round_trips() {
        let p = Policy::preset(crate::policy::Preset::AgentSafe).unwrap();
        let q = policy_from_canonical(&p.canonical_json()).unwrap();
        assert_eq!(p.canonical_json(), q.canonical_json());
        for path in [
            "/.env",
            "/src/a.py",
            "/output/x",
            "/.git/config",
            "/a/secrets/k",
        ] {
            assert_eq!(p.decide(path, false), q.decide(path, false), "{path}");
        }
    }

    #[test]
    fn mountinfo_unescaping() {
        assert_eq!(unescape_mount(b"/a\\040b"), b"/a b");
        assert_eq!(unescape_mount(b"/plain"), b"/plain");
        assert_eq!(unescape_mount(b"/\xff\\134"), b"/\xff\\");
    }

    #[test]
    fn a_reused_pid_is_not_our_daemon() {
        let me = std::process::id() as i32;
        let h = DaemonHandle {
            pid: me,
            mountpoint: PathBuf::from("/nonexistent"),
            config: PathBuf::from("/nonexistent/daemon.json"),
            start_time: start_time(me).unwrap_or(0),
        };
        assert!(start_time(me).is_some());
        assert!(!is_our_daemon(&h));
    }
}

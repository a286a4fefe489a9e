//! `agentfense-runc sandbox`: one fenced command, no engine (SPEC §7).
//!
//! An OCI bundle is made on the fly under the runtime's root (`<root>/agentfense:sandbox/`,
//! 0700; `:` cannot appear in a container id): an empty, read-only root file system in which
//! the host's `/usr` and the `/bin`, `/sbin`, `/lib*` beside it are bound read-only (symlinks
//! such as Debian's `/bin -> usr/bin` are recreated, not bound), a short list of `/etc` entries
//! that commands need (never `/etc` itself: no `shadow`, no ssh keys, no credentials of host
//! tools), a private `/tmp`, `/proc`, a minimal `/dev`, read-only `/sys`, and DIR at
//! `/workspace`, the working directory. The container is created through the same path as
//! `run` ([`runtime::create_init`]: the fence is set up by `lifecycle::prepare` before
//! libcontainer sees the bundle), started, waited for with signals passed on, and deleted
//! (`lifecycle::delete` settles the delta); the bundle is removed. The command has the
//! caller's stdin, stdout and stderr (no pseudo-terminal), and its exit status is ours.
//!
//! Exit status when the sandbox itself fails (as `docker run`): 125, or 126 (the command
//! cannot be run) and 127 (it does not exist).

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use libcontainer::container::ContainerStatus;
use libcontainer::oci_spec::runtime::Spec;
use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::{json, Value};

use super::runtime::{self, Ctx, InitOpts};
use crate::config::AdminConfig;
use crate::lifecycle;
use crate::policy::source::{admin_default_policy, resolve_policy};
use crate::policy::{AuditLevel, DeltaMode, PolicyInputs};

/// `sandbox [--preset P | --policy FILE] [--delta MODE] [--audit LEVEL] [--id ID] DIR -- CMD...`
#[derive(clap::Args, Debug, Clone)]
pub struct SandboxArgs {
    /// A built-in preset (`agent-safe`, `read-only`, `full-access`, ...).
    #[arg(long, conflicts_with = "policy")]
    pub preset: Option<String>,
    /// A policy file (JSON, SPEC §3), or `-` for stdin.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// A policy file's name in the administrator's policy directory.
    #[arg(long, value_name = "NAME", conflicts_with = "preset")]
    pub policy_name: Option<String>,
    /// What happens to the delta when the command ends: keep (default), commit, discard, off.
    #[arg(long, value_name = "MODE")]
    pub delta: Option<String>,
    /// Audit level: off, deny, write, all.
    #[arg(long, value_name = "LEVEL")]
    pub audit: Option<String>,
    /// The sandbox's id: runs with the same id share one delta (an agent's session). Default:
    /// a fresh id.
    #[arg(long)]
    pub id: Option<String>,
    /// Print the sandbox id (and where its state is) on stderr before running.
    #[arg(long)]
    pub print_id: bool,
    /// `none` (default): no network but loopback; `host`: the host's network (and its
    /// `/etc/resolv.conf`).
    #[arg(long, value_enum, default_value_t = Network::None)]
    pub network: Network,
    /// An environment variable for the command, `KEY=VALUE`, or `KEY` for the caller's value.
    /// The command gets only PATH, HOME=/tmp, TERM, LANG, LANGUAGE, LC_* and TZ otherwise.
    #[arg(short = 'e', long = "env", value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,
    /// The working directory: a path inside the container, relative ones from /workspace.
    #[arg(short = 'w', long, value_name = "PATH")]
    pub workdir: Option<String>,
    /// Also show a host file or directory, read-only, at DEST (default: the same path), e.g. a
    /// toolchain under /opt. Not beneath /workspace or the system directories.
    #[arg(long, value_name = "SRC[:DEST]")]
    pub ro_bind: Vec<String>,
    /// The user to run as, `UID[:GID]` (numeric). Default: the caller's.
    #[arg(short = 'u', long, value_name = "UID[:GID]")]
    pub user: Option<String>,
    /// The directory to fence at /workspace.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// The sandbox's network.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// A network namespace of its own, with loopback only.
    None,
    /// The host's network namespace.
    Host,
}

/// Where the command runs, and the fenced workspace.
const WORKSPACE: &str = "/workspace";
/// Marks containers made by `sandbox` (a stopped one under the same id is cleared).
const SANDBOX_ANNOTATION: &str = "io.github.agentfense.sandbox";
/// The bundles' directory under the runtime's root (not a valid container id).
const BUNDLES: &str = "agentfense:sandbox";
/// The host's system directories, bound read-only (or recreated, when they are symlinks).
const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// The `/etc` entries shown, read-only: users and name resolution, the dynamic linker,
/// Debian's alternatives (`/usr/bin/awk -> /etc/alternatives/awk`), locale and time zone, TLS
/// roots, and the configuration of common tools. Nothing that holds secrets.
const ETC_ENTRIES: &[&str] = &[
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "host.conf",
    "gai.conf",
    "resolv.conf",
    "networks",
    "protocols",
    "services",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "localtime",
    "timezone",
    "locale.alias",
    "locale.conf",
    "os-release",
    "lsb-release",
    "debian_version",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "pki",
    "crypto-policies",
    "mime.types",
    "magic",
    "magic.mime",
    "inputrc",
    "bash.bashrc",
    "profile",
    "profile.d",
    "terminfo",
    "gitconfig",
    "mtab",
];
/// `/etc` entries shown by prefix (tool configuration that packages link to from /usr).
const ETC_PREFIXES: &[&str] = &["java-", "python3", "perl"];
/// Variables of the caller's environment passed on (plus `LC_*`).
const PASSED_ENV: &[&str] = &["TERM", "LANG", "LANGUAGE", "TZ", "COLORTERM"];
/// The command's capabilities: Docker's defaults without MKNOD, NET_RAW and SETFCAP.
const CAPABILITIES: &[&str] = &[
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// Runs the command; returns its exit code.
pub fn run(args: SandboxArgs, ctx: &Ctx) -> Result<i32> {
    match sandbox(args, ctx) {
        Ok(code) => Ok(code),
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("agentfense-runc sandbox: {msg}");
            Ok(error_status(&msg))
        }
    }
}

/// `docker run`'s statuses for a sandbox that did not run its command.
fn error_status(msg: &str) -> i32 {
    if msg.contains("exec: \"") {
        if msg.contains("permission denied") {
            return 126;
        }
        if msg.contains("not found") || msg.contains("no such file or directory") {
            return 127;
        }
    }
    125
}

fn sandbox(args: SandboxArgs, ctx: &Ctx) -> Result<i32> {
    let admin = lifecycle::admin_config(ctx.agentfense.config.as_deref())?;
    let id = match &args.id {
        Some(id) => id.clone(),
        None => fresh_id()?,
    };
    runtime::validate_id(&id)?;
    let plan = Plan::new(&args, &admin, Path::new("/"))?;
    let config = plan.spec();
    let spec: Spec = serde_json::from_value(config.clone()).context("the sandbox's spec")?;
    // What `create` will read: refused here, before anything exists.
    if lifecycle::request_of(&spec, &admin)?.is_none() {
        bail!("no policy: give --preset, --policy or --policy-name");
    }
    clear_previous(&id, ctx)?;

    // From here on every signal is ours to pass on to the command. Threads started from now
    // (the fence daemons' reapers) inherit the mask, so no signal can end us by default
    // action; the command itself is created with none blocked.
    SigSet::all()
        .thread_block()
        .context("failed to block signals")?;
    let bundle = Bundle::make(ctx, &id, &plan, &config)?;
    let watchdog = Watchdog::spawn(ctx, &id, &bundle.dir)?;
    if args.print_id {
        let state = lifecycle::container_state_dir(&admin, &id);
        eprintln!("sandbox ID: {id}");
        eprintln!(
            "sandbox state: {} (delta in upper/, audit trail in {})",
            state.display(),
            crate::audit::AUDIT_FILE
        );
    }
    let (result, settled) = run_container(&id, &bundle.dir, &admin, ctx);
    drop(bundle);
    if settled {
        watchdog.release();
    }
    result
}

/// A fresh sandbox id: `sbx-` and 12 random hex digits.
fn fresh_id() -> Result<String> {
    let mut b = [0u8; 6];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("failed to read /dev/urandom")?;
    Ok(format!(
        "sbx-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    ))
}

/// Refuses an id in use; clears a stopped sandbox left by a run that could not delete it.
fn clear_previous(id: &str, ctx: &Ctx) -> Result<()> {
    if !ctx.root.join(id).exists() {
        return Ok(());
    }
    let mut c = runtime::load(ctx, id).map_err(|_| {
        anyhow!(
            "container {id} exists under {} (being created, or left half-created: \
             `agentfense-runc delete --force {id}`)",
            ctx.root.display()
        )
    })?;
    let _ = c.refresh_status();
    let ours = c
        .state
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SANDBOX_ANNOTATION));
    if c.status() != ContainerStatus::Stopped {
        if ours {
            bail!("sandbox {id} is already running");
        }
        bail!("container {id} exists and is not a sandbox: choose another --id");
    }
    if !ours {
        bail!("container {id} exists and is not a sandbox: choose another --id");
    }
    let bundle = c.state.bundle.clone();
    runtime::delete(id, true, ctx)
        .with_context(|| format!("failed to clear stopped sandbox {id}"))?;
    remove_stale_bundle(ctx, &bundle);
    Ok(())
}

/// Removes a bundle left by a run that was killed with its watchdog: only beneath our
/// bundles' directory, and only when nothing is mounted beneath it.
fn remove_stale_bundle(ctx: &Ctx, bundle: &Path) {
    let parent = ctx.root.join(BUNDLES);
    if bundle.parent() != Some(parent.as_path()) || !bundle.exists() {
        return;
    }
    let escaped = bundle
        .to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    let mounted = fs::read_to_string("/proc/self/mountinfo").map(|info| {
        info.lines().any(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| m == escaped || m.starts_with(&format!("{escaped}/")))
        })
    });
    match mounted {
        Ok(false) => {
            if let Err(e) = fs::remove_dir_all(bundle) {
                tracing::warn!("cannot remove {}: {e}", bundle.display());
            }
        }
        _ => tracing::warn!(
            "left {} (something is mounted beneath it)",
            bundle.display()
        ),
    }
}

/// Creates, starts, waits for and deletes the container. Returns the command's status, and
/// whether everything was cleaned up (else the watchdog tries again).
fn run_container(id: &str, bundle: &Path, admin: &AdminConfig, ctx: &Ctx) -> (Result<i32>, bool) {
    let opts = InitOpts {
        pid_file: None,
        console_socket: None,
        preserve_fds: 0,
        detach: false,
        no_pivot: false,
        clear_signal_mask: true,
    };
    let mut c = match runtime::create_init(id, bundle, &opts, admin, ctx) {
        Ok(c) => c,
        Err(e) => {
            // The fence is undone already; libcontainer may have left its state.
            let clean = !ctx.root.join(id).exists() || runtime::delete(id, true, ctx).is_ok();
            return (Err(e), clean);
        }
    };
    if let Err(e) = lifecycle::note_start(admin, id) {
        tracing::warn!("{e:#}");
    }
    let started = c
        .start()
        .map_err(|e| anyhow!(e).context(format!("failed to start sandbox {id}")))
        .and_then(|_| {
            c.pid()
                .ok_or_else(|| anyhow!("sandbox {id} has no process"))
        });
    let pid = match started {
        Ok(pid) => pid,
        Err(e) => {
            let clean = runtime::delete(id, true, ctx).is_ok();
            return (Err(e), clean);
        }
    };
    let status = wait_passing_signals(pid);
    let deleted = c
        .delete(true)
        .map_err(|e| anyhow!(e).context(format!("failed to delete sandbox {id}")))
        .and_then(|_| lifecycle::delete(admin, id, status.as_ref().ok().copied()));
    match (status, deleted) {
        (Ok(code), Ok(())) => (Ok(code), true),
        (Ok(code), Err(e)) => {
            // The command ran: its status stands; the watchdog tries the delete again.
            eprintln!("agentfense-runc sandbox: {e:#}");
            (Ok(code), false)
        }
        (Err(e), d) => (Err(e), d.is_ok()),
    }
}

/// Waits for the command (the container's init, our child), passing on every signal we get.
///
/// The command is the container's pid 1, to which the kernel delivers only the signals it
/// handles: a signal that would end an ordinary process by default (INT, TERM, HUP, QUIT,
/// ABRT, USR1, USR2, ALRM, PIPE) and that the command neither handles nor ignores ends it
/// here too (SIGKILL), with the status that signal would have given (128 + its number), so
/// that `timeout`-style callers and Ctrl-C behave as without a sandbox. Signals are blocked
/// by the caller, so none is lost between the checks.
fn wait_passing_signals(init: Pid) -> Result<i32> {
    let all = SigSet::all();
    let mut ended_by: Option<Signal> = None;
    loop {
        match waitpid(init, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Signaled(_, Signal::SIGKILL, _)) if ended_by.is_some() => {
                return Ok(128 + ended_by.map_or(Signal::SIGKILL as i32, |s| s as i32))
            }
            Ok(st @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                return Ok(runtime::exit_code(st))
            }
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waitpid"),
        }
        match all.wait().context("sigwait")? {
            Signal::SIGCHLD | Signal::SIGURG | Signal::SIGWINCH => {}
            sig if ends_by_default(sig) && default_action(init, sig) => {
                ended_by.get_or_insert(sig);
                let _ = kill(init, Signal::SIGKILL);
            }
            sig => {
                let _ = kill(init, sig);
            }
        }
    }
}

/// Signals whose default action ends a process, and that a caller sends to stop one.
fn ends_by_default(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGINT
            | Signal::SIGTERM
            | Signal::SIGHUP
            | Signal::SIGQUIT
            | Signal::SIGABRT
            | Signal::SIGUSR1
            | Signal::SIGUSR2
            | Signal::SIGALRM
            | Signal::SIGPIPE
    )
}

/// Whether `pid` leaves `sig` at its default action (neither caught nor ignored).
fn default_action(pid: Pid, sig: Signal) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    signal_disposition_is_default(&status, sig)
}

fn signal_disposition_is_default(status: &str, sig: Signal) -> bool {
    let bit = 1u64 << (sig as i32 - 1);
    let mask = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    match (mask("SigCgt:"), mask("SigIgn:")) {
        (Some(caught), Some(ignored)) => (caught | ignored) & bit == 0,
        _ => false,
    }
}

/// What a path of the bundle's rootfs is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir(PathBuf),
    /// An empty file (a mount point for a file).
    File(PathBuf),
    Symlink(PathBuf, PathBuf),
}

/// Everything the sandbox will be, checked: nothing is created yet.
#[derive(Debug)]
struct Plan {
    annotations: BTreeMap<String, String>,
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    uid: u32,
    gid: u32,
    network: Network,
    /// Mounts besides the default spec's `/proc`, `/dev`, `/sys`.
    mounts: Vec<Value>,
    /// The rootfs' content, relative paths, parents first.
    rootfs: Vec<Entry>,
}

fn bind_ro(src: &Path, dest: &Path) -> Value {
    json!({
        "destination": dest,
        "type": "bind",
        "source": src,
        "options": ["rbind", "ro", "rro", "nosuid", "nodev"],
    })
}

impl Plan {
    /// `host` is the host's root (`/`; a test directory in unit tests).
    fn new(args: &SandboxArgs, admin: &AdminConfig, host: &Path) -> Result<Plan> {
        let annotations = annotations(args, admin)?;
        let dir = args
            .dir
            .canonicalize()
            .with_context(|| format!("workspace {}", args.dir.display()))?;
        if !dir.is_dir() {
            bail!("workspace {} is not a directory", dir.display());
        }
        let (uid, gid) = match &args.user {
            Some(u) => parse_user(u)?,
            None => (
                nix::unistd::getuid().as_raw(),
                nix::unistd::getgid().as_raw(),
            ),
        };
        let cwd = match &args.workdir {
            None => WORKSPACE.to_string(),
            Some(w) => {
                let p = if w.starts_with('/') {
                    PathBuf::from(w)
                } else {
                    Path::new(WORKSPACE).join(w)
                };
                if p.components().any(|c| c == Component::ParentDir) {
                    bail!("--workdir {w}: \"..\" is not allowed");
                }
                p.to_string_lossy().into_owned()
            }
        };
        let mut rootfs = Vec::new();
        let mut mounts = Vec::new();
        system_view(host, args.network, &mut rootfs, &mut mounts)?;
        for d in ["proc", "dev", "sys", "tmp", "workspace"] {
            rootfs.push(Entry::Dir(d.into()));
        }
        mounts.push(json!({
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777"],
        }));
        mounts.push(json!({
            "destination": WORKSPACE,
            "type": "bind",
            "source": dir,
            "options": ["rbind", "rw"],
        }));
        for b in &args.ro_bind {
            extra_bind(b, &mut rootfs, &mut mounts)?;
        }
        Ok(Plan {
            annotations,
            args: args.cmd.clone(),
            env: environment(&args.env, &|k| std::env::var(k).ok(), &caller_env())?,
            cwd,
            uid,
            gid,
            network: args.network,
            mounts,
            rootfs,
        })
    }

    /// The bundle's `config.json`: libcontainer's default spec (as `spec` writes it), adjusted.
    fn spec(&self) -> Value {
        let mut v = serde_json::to_value(Spec::default()).unwrap_or_else(|_| json!({}));
        v["root"] = json!({"path": "rootfs", "readonly": true});
        v["hostname"] = json!("agentfense");
        let caps: Vec<&str> = CAPABILITIES.to_vec();
        v["process"] = json!({
            "terminal": false,
            "user": {"uid": self.uid, "gid": self.gid},
            "args": self.args,
            "env": self.env,
            "cwd": self.cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
                "inheritable": [], "ambient": [],
            },
            "noNewPrivileges": true,
        });
        if let Some(m) = v["mounts"].as_array_mut() {
            m.extend(self.mounts.iter().cloned());
        }
        v["annotations"] = json!(self.annotations);
        if self.network == Network::Host {
            if let Some(ns) = v["linux"]["namespaces"].as_array_mut() {
                ns.retain(|n| n["type"] != "network");
            }
        }
        v
    }
}

/// The fencing annotations, each value checked (with the flag's name in messages).
fn annotations(args: &SandboxArgs, admin: &AdminConfig) -> Result<BTreeMap<String, String>> {
    let policy = match &args.policy {
        None => None,
        Some(p) if p.as_os_str() == "-" => Some((
            "--policy -".to_string(),
            std::io::read_to_string(std::io::stdin()).context("failed to read the policy")?,
        )),
        Some(p) => Some((
            format!("--policy {}", p.display()),
            fs::read_to_string(p).with_context(|| format!("policy file {}", p.display()))?,
        )),
    };
    let inputs = PolicyInputs {
        policy: policy.as_ref().map(|(l, t)| (l.as_str(), t.as_str())),
        preset: args.preset.as_deref().map(|p| ("--preset", p)),
        policy_name: args.policy_name.as_deref().map(|n| ("--policy-name", n)),
    };
    let resolved = resolve_policy(&inputs, admin, &|n| admin.read_named_policy(n))
        .map_err(|e| anyhow!("{e}"))?;
    if resolved.is_none()
        && admin_default_policy(admin)
            .map_err(|e| anyhow!("{e}"))?
            .is_none()
    {
        bail!("no policy: give --preset, --policy or --policy-name");
    }
    if let Some(d) = &args.delta {
        d.trim()
            .parse::<DeltaMode>()
            .map_err(|e| anyhow!("{}", e.context("--delta")))?;
    }
    if let Some(a) = &args.audit {
        a.trim()
            .parse::<AuditLevel>()
            .map_err(|e| anyhow!("{}", e.context("--audit")))?;
    }
    let mut out = BTreeMap::new();
    let mut put = |k: &str, v: Option<&str>| {
        if let Some(v) = v {
            out.insert(format!("agentfense.io/{k}"), v.to_string());
        }
    };
    put("policy", policy.as_ref().map(|(_, t)| t.as_str()));
    put("preset", args.preset.as_deref());
    put("policy-name", args.policy_name.as_deref());
    put("workspace", Some(WORKSPACE));
    put("delta", args.delta.as_deref());
    put("audit", args.audit.as_deref());
    out.insert(SANDBOX_ANNOTATION.to_string(), "true".to_string());
    Ok(out)
}

fn parse_user(u: &str) -> Result<(u32, u32)> {
    let (a, b) = u.split_once(':').unwrap_or((u, u));
    let n = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| anyhow!("--user {u}: UID[:GID] must be numeric"))
    };
    Ok((n(a)?, n(b)?))
}

/// The caller's environment (entries that are not UTF-8 are left out).
fn caller_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// The command's environment: PATH, HOME, the caller's locale and terminal variables, then
/// `--env` entries.
fn environment(
    extra: &[String],
    lookup: &dyn Fn(&str) -> Option<String>,
    caller: &[(String, String)],
) -> Result<Vec<String>> {
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), "/tmp".into()),
    ];
    for (k, v) in caller {
        if PASSED_ENV.contains(&k.as_str()) || k.starts_with("LC_") {
            env.push((k.clone(), v.clone()));
        }
    }
    for e in extra {
        let (k, v) = match e.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (e.clone(), lookup(e)),
        };
        if k.is_empty() || k.contains('\0') {
            bail!("--env {e:?}: not KEY=VALUE");
        }
        if k.starts_with("AGENTFENSE_") {
            bail!("--env {k}: fencing is set with --preset, --policy, --delta and --audit");
        }
        env.retain(|(n, _)| *n != k);
        if let Some(v) = v {
            env.push((k, v));
        }
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// The host's system directories and chosen `/etc` entries, read-only.
fn system_view(
    host: &Path,
    network: Network,
    rootfs: &mut Vec<Entry>,
    mounts: &mut Vec<Value>,
) -> Result<()> {
    for name in SYSTEM_DIRS {
        let src = host.join(name);
        let Ok(md) = fs::symlink_metadata(&src) else {
            continue;
        };
        if md.file_type().is_symlink() {
            rootfs.push(Entry::Symlink(name.into(), fs::read_link(&src)?));
        } else if md.is_dir() {
            rootfs.push(Entry::Dir(name.into()));
            mounts.push(bind_ro(&src, &Path::new("/").join(name)));
        }
    }
    rootfs.push(Entry::Dir("etc".into()));
    let etc = host.join("etc");
    let mut names: Vec<String> = match fs::read_dir(&etc) {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| {
                (ETC_ENTRIES.contains(&n.as_str()) || ETC_PREFIXES.iter().any(|p| n.starts_with(p)))
                    && (network == Network::Host || n != "resolv.conf")
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    for name in names {
        let src = etc.join(&name);
        let rel = Path::new("etc").join(&name);
        let dest = Path::new("/").join(&rel);
        let Ok(md) = fs::symlink_metadata(&src) else {
            continue;
        };
        let (src, md) = if md.file_type().is_symlink() {
            // A link into what the sandbox shows anyway is recreated; any other is shown
            // through its target's content (a resolv.conf managed under /run).
            let Ok(target) = src.canonicalize() else {
                continue;
            };
            let visible = ["usr", "proc"]
                .iter()
                .any(|d| target.starts_with(host.join(d)))
                || (target.starts_with(&etc)
                    && target.strip_prefix(&etc).is_ok_and(|t| {
                        t.components().next().is_some_and(|c| {
                            let c = c.as_os_str().to_string_lossy();
                            ETC_ENTRIES.contains(&c.as_ref())
                                || ETC_PREFIXES.iter().any(|p| c.starts_with(p))
                        })
                    }));
            if visible || target.starts_with("/proc") {
                rootfs.push(Entry::Symlink(rel, fs::read_link(&src)?));
                continue;
            }
            let Ok(md) = fs::metadata(&target) else {
                continue;
            };
            (target, md)
        } else {
            (src, md)
        };
        if md.is_dir() {
            rootfs.push(Entry::Dir(rel));
        } else if md.is_file() {
            rootfs.push(Entry::File(rel));
        } else {
            continue;
        }
        mounts.push(bind_ro(&src, &dest));
    }
    Ok(())
}

/// `--ro-bind SRC[:DEST]`.
fn extra_bind(spec: &str, rootfs: &mut Vec<Entry>, mounts: &mut Vec<Value>) -> Result<()> {
    let (src, dest) = spec.split_once(':').unwrap_or((spec, spec));
    let src = Path::new(src)
        .canonicalize()
        .with_context(|| format!("--ro-bind {spec}"))?;
    let dest = Path::new(dest);
    let normal: Vec<_> = dest.components().skip(1).collect();
    if !dest.is_absolute()
        || normal.is_empty()
        || normal.iter().any(|c| !matches!(c, Component::Normal(_)))
    {
        bail!("--ro-bind {spec}: DEST must be an absolute path without \"..\", not /");
    }
    let top = normal[0].as_os_str().to_string_lossy();
    let taken = SYSTEM_DIRS.contains(&top.as_ref())
        || ["etc", "proc", "dev", "sys", "tmp", "workspace"].contains(&top.as_ref());
    if taken {
        bail!(
            "--ro-bind {spec}: DEST must not be beneath /{top} (the system view, /tmp and \
             /workspace are the sandbox's own)"
        );
    }
    let is_dir = src.is_dir();
    let mut rel = PathBuf::new();
    for (i, c) in normal.iter().enumerate() {
        rel.push(c);
        let last = i + 1 == normal.len();
        let e = if last && !is_dir {
            Entry::File(rel.clone())
        } else {
            Entry::Dir(rel.clone())
        };
        let clash = rootfs.iter().find(|x| match x {
            Entry::Dir(p) | Entry::File(p) | Entry::Symlink(p, _) => *p == rel,
        });
        match clash {
            None => rootfs.push(e),
            Some(x) if *x == e && !last => {}
            Some(_) => bail!("--ro-bind {spec}: {} is shown already", dest.display()),
        }
    }
    mounts.push(bind_ro(&src, dest));
    Ok(())
}

/// The bundle on disk: what was created, removed in reverse order (never recursively: a
/// directory that is not empty, or is a mount point, stays).
struct Bundle {
    dir: PathBuf,
    created: Vec<PathBuf>,
}

impl Bundle {
    fn make(ctx: &Ctx, id: &str, plan: &Plan, config: &Value) -> Result<Bundle> {
        let parent = ctx.root.join(BUNDLES);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
        let suffix = fresh_id()?;
        let dir = parent.join(format!("{id}.{}", &suffix[4..]));
        let mut b = Bundle {
            dir: dir.clone(),
            created: Vec::new(),
        };
        b.mkdir(&dir, 0o700)?;
        let rootfs = dir.join("rootfs");
        b.mkdir(&rootfs, 0o755)?;
        for e in &plan.rootfs {
            match e {
                Entry::Dir(p) => b.mkdir(&rootfs.join(p), 0o755)?,
                Entry::File(p) => {
                    let path = rootfs.join(p);
                    fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o644)
                        .open(&path)
                        .with_context(|| format!("failed to create {}", path.display()))?;
                    b.created.push(path);
                }
                Entry::Symlink(p, target) => {
                    let path = rootfs.join(p);
                    std::os::unix::fs::symlink(target, &path)
                        .with_context(|| format!("failed to create {}", path.display()))?;
                    b.created.push(path);
                }
            }
        }
        let path = dir.join("config.json");
        b.created.push(path.clone());
        fs::write(&path, serde_json::to_vec(config)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
        Ok(b)
    }

    fn mkdir(&mut self, p: &Path, mode: u32) -> Result<()> {
        fs::DirBuilder::new()
            .mode(mode)
            .create(p)
            .with_context(|| format!("failed to create {}", p.display()))?;
        // The umask must not narrow the rootfs' directories.
        fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        self.created.push(p.to_path_buf());
        Ok(())
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        for p in self.created.iter().rev() {
            let r = match fs::symlink_metadata(p) {
                Ok(md) if md.is_dir() => fs::remove_dir(p),
                Ok(_) => fs::remove_file(p),
                Err(_) => continue,
            };
            if let Err(e) = r {
                tracing::warn!("sandbox bundle: cannot remove {}: {e}", p.display());
            }
        }
    }
}

/// A process of its own that deletes the sandbox if we die without doing it (killed by the
/// caller's timeout, say): it waits on a pipe; `release` says all is done, end of file without
/// it means we are gone.
struct Watchdog {
    child: Child,
}

/// `$1`: the bundle; the rest: the delete command.
const WATCHDOG: &str = r#"read -r done
[ "$done" = ok ] && exit 0
b=$1; shift
"$@"
find "$b" -depth -xdev \( -type d -exec rmdir {} \; -o -exec rm -f {} \; \)
"#;

impl Watchdog {
    fn spawn(ctx: &Ctx, id: &str, bundle: &Path) -> Result<Watchdog> {
        let exe = crate::sys::daemon_exe();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("agentfense-sandbox-watchdog")
            .arg(bundle)
            .arg(exe);
        if let Some(c) = &ctx.agentfense.config {
            cmd.arg("--agentfense-config").arg(c);
        }
        cmd.arg("--root").arg(&ctx.root);
        if ctx.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        cmd.args(["delete", "--force", id])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = cmd
            .spawn()
            .context("failed to start the sandbox's watchdog")?;
        Ok(Watchdog { child })
    }

    /// Everything is cleaned up: the watchdog ends without doing anything.
    fn release(mut self) {
        if let Some(mut w) = self.child.stdin.take() {
            let _ = w.write_all(b"ok\n");
        }
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct W {
        #[command(flatten)]
        a: SandboxArgs,
    }

    fn parse(args: &[&str]) -> SandboxArgs {
        let mut v = vec!["sandbox"];
        v.extend_from_slice(args);
        W::try_parse_from(v).unwrap().a
    }

    fn host() -> tempfile::TempDir {
        let h = tempfile::tempdir().unwrap();
        let p = h.path();
        fs::create_dir_all(p.join("usr/bin")).unwrap();
        fs::create_dir_all(p.join("usr/share/zoneinfo")).unwrap();
        fs::write(p.join("usr/share/zoneinfo/UTC"), "").unwrap();
        std::os::unix::fs::symlink("usr/bin", p.join("bin")).unwrap();
        fs::create_dir_all(p.join("lib64")).unwrap();
        fs::create_dir_all(p.join("etc/alternatives")).unwrap();
        fs::create_dir_all(p.join("run")).unwrap();
        for f in ["passwd", "group", "shadow", "npmrc", "hostname"] {
            fs::write(p.join("etc").join(f), "x").unwrap();
        }
        fs::write(p.join("run/resolv.conf"), "nameserver 1.1.1.1").unwrap();
        std::os::unix::fs::symlink(p.join("run/resolv.conf"), p.join("etc/resolv.conf")).unwrap();
        std::os::unix::fs::symlink(p.join("usr/share/zoneinfo/UTC"), p.join("etc/localtime"))
            .unwrap();
        fs::create_dir_all(p.join("work")).unwrap();
        h
    }

    #[test]
    fn the_system_view_shows_system_directories_and_chosen_etc_entries() {
        let h = host();
        let p = h.path();
        let mut rootfs = Vec::new();
        let mut mounts = Vec::new();
        system_view(p, Network::Host, &mut rootfs, &mut mounts).unwrap();
        assert!(rootfs.contains(&Entry::Symlink("bin".into(), "usr/bin".into())));
        assert!(rootfs.contains(&Entry::Dir("usr".into())));
        assert!(rootfs.contains(&Entry::Dir("lib64".into())));
        assert!(rootfs.contains(&Entry::File("etc/passwd".into())));
        assert!(rootfs.contains(&Entry::Dir("etc/alternatives".into())));
        // A link into /usr is recreated; one elsewhere is shown through its target.
        assert!(rootfs.contains(&Entry::Symlink(
            "etc/localtime".into(),
            p.join("usr/share/zoneinfo/UTC")
        )));
        assert!(rootfs.contains(&Entry::File("etc/resolv.conf".into())));
        let dests: Vec<&str> = mounts
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        for hidden in ["/etc/shadow", "/etc/npmrc", "/etc/hostname", "/etc", "/bin"] {
            assert!(!dests.contains(&hidden), "{hidden}");
        }
        assert!(dests.contains(&"/usr"));
        assert!(dests.contains(&"/etc/resolv.conf"));
        let resolv = mounts
            .iter()
            .find(|m| m["destination"] == "/etc/resolv.conf")
            .unwrap();
        assert_eq!(
            resolv["source"].as_str().unwrap(),
            p.join("run/resolv.conf").to_str().unwrap()
        );
        assert!(mounts
            .iter()
            .all(|m| m["options"].as_array().unwrap().contains(&json!("ro"))));
        // No network: no resolv.conf.
        let (mut r2, mut m2) = (Vec::new(), Vec::new());
        system_view(p, Network::None, &mut r2, &mut m2).unwrap();
        assert!(!m2.iter().any(|m| m["destination"] == "/etc/resolv.conf"));
    }

    #[test]
    fn the_spec_fences_the_workspace_and_carries_the_request() {
        let h = host();
        let dir = h.path().join("work");
        let a = parse(&[
            "--preset",
            "agent-safe",
            "--delta",
            "commit",
            "--audit",
            "deny",
            "-e",
            "FOO=bar",
            "-w",
            "src",
            dir.to_str().unwrap(),
            "--",
            "grep",
            "-r",
            "x",
        ]);
        let admin = AdminConfig::default();
        let plan = Plan::new(&a, &admin, h.path()).unwrap();
        let v = plan.spec();
        let spec: Spec = serde_json::from_value(v.clone()).unwrap();
        let req = lifecycle::request_of(&spec, &admin).unwrap().unwrap();
        assert_eq!(req.workspaces, vec![WORKSPACE.to_string()]);
        assert_eq!(req.delta, DeltaMode::Commit);
        assert_eq!(req.audit, AuditLevel::Deny);
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["process"]["terminal"], false);
        assert_eq!(v["process"]["cwd"], "/workspace/src");
        assert_eq!(v["process"]["args"], json!(["grep", "-r", "x"]));
        let env: Vec<&str> = v["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert!(env.contains(&"FOO=bar"));
        assert!(env.contains(&"HOME=/tmp"));
        let ws = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == WORKSPACE)
            .unwrap();
        assert_eq!(ws["source"].as_str().unwrap(), dir.to_str().unwrap());
        let plans = crate::splice::plan(&spec, Path::new("/b"), &req.workspaces).unwrap();
        assert_eq!(plans[0].base, dir);
        assert!(!plans[0].in_rootfs);
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        for n in ["pid", "mount", "ipc", "uts", "network"] {
            assert!(ns.contains(&n), "{n}");
        }
        assert_eq!(v["annotations"][SANDBOX_ANNOTATION], "true");
    }

    #[test]
    fn bad_requests_are_refused_before_anything_is_made() {
        let h = host();
        let dir = h.path().join("work");
        let d = dir.to_str().unwrap();
        let admin = AdminConfig::default();
        let bad = h.path().join("bad.json");
        fs::write(&bad, "{not json").unwrap();
        let err = |args: &[&str]| {
            format!(
                "{:#}",
                Plan::new(&parse(args), &admin, h.path()).unwrap_err()
            )
        };
        let e = err(&["--policy", bad.to_str().unwrap(), d, "--", "true"]);
        assert!(e.contains("--policy") && e.contains("bad.json"), "{e}");
        let e = err(&["--preset", "agent-unsafe", d, "--", "true"]);
        assert!(e.contains("agent-unsafe"), "{e}");
        let e = err(&[d, "--", "true"]);
        assert!(e.contains("no policy"), "{e}");
        let e = err(&["--preset", "read-only", "--delta", "maybe", d, "--", "true"]);
        assert!(e.contains("--delta"), "{e}");
        let e = err(&["--preset", "read-only", "--audit", "loud", d, "--", "true"]);
        assert!(e.contains("--audit"), "{e}");
        let e = err(&["--preset", "read-only", "/nonexistent/dir", "--", "true"]);
        assert!(e.contains("/nonexistent/dir"), "{e}");
        let e = err(&[
            "--preset",
            "read-only",
            "-e",
            "AGENTFENSE_PRESET=x",
            d,
            "--",
            "true",
        ]);
        assert!(e.contains("AGENTFENSE_PRESET"), "{e}");
        let e = err(&[
            "--preset",
            "read-only",
            "--ro-bind",
            "/usr:/usr/x",
            d,
            "--",
            "true",
        ]);
        assert!(e.contains("DEST"), "{e}");
        let e = err(&["--preset", "read-only", "-w", "../x", d, "--", "true"]);
        assert!(e.contains(".."), "{e}");
    }

    #[test]
    fn extra_binds_create_their_mount_points() {
        let mut rootfs = Vec::new();
        let mut mounts = Vec::new();
        extra_bind("/usr/bin:/opt/tools/bin", &mut rootfs, &mut mounts).unwrap();
        assert_eq!(
            rootfs,
            vec![
                Entry::Dir("opt".into()),
                Entry::Dir("opt/tools".into()),
                Entry::Dir("opt/tools/bin".into())
            ]
        );
        assert_eq!(mounts[0]["destination"], "/opt/tools/bin");
        assert!(extra_bind("/usr/bin:/opt/tools/bin", &mut rootfs, &mut mounts).is_err());
        assert!(extra_bind("/usr/bin:relative", &mut rootfs, &mut mounts).is_err());
        assert!(extra_bind("/usr/bin:/workspace/x", &mut rootfs, &mut mounts).is_err());
    }

    #[test]
    fn environment_is_minimal_and_extended_by_flags() {
        let caller = vec![
            ("TERM".to_string(), "xterm".to_string()),
            ("LC_ALL".to_string(), "C.UTF-8".to_string()),
            ("OPENAI_API_KEY".to_string(), "sk-secret".to_string()),
        ];
        let lookup = |k: &str| (k == "FROM_CALLER").then(|| "v".to_string());
        let env = environment(
            &[
                "A=1".into(),
                "FROM_CALLER".into(),
                "UNSET".into(),
                "TERM=dumb".into(),
            ],
            &lookup,
            &caller,
        )
        .unwrap();
        assert!(env.contains(&"A=1".to_string()));
        assert!(env.contains(&"FROM_CALLER=v".to_string()));
        assert!(env.contains(&"LC_ALL=C.UTF-8".to_string()));
        assert!(env.contains(&"TERM=dumb".to_string()));
        assert!(!env
            .iter()
            .any(|e| e.starts_with("OPENAI") || e.starts_with("UNSET")));
        assert!(env[0].starts_with("PATH="));
    }

    #[test]
    fn signal_dispositions_from_proc_status() {
        // SIGINT (2) caught, SIGHUP (1) ignored, SIGTERM (15) default.
        let status = "Name:\tpython3\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000001\nSigCgt:\t0000000000000002\n";
        assert!(!signal_disposition_is_default(status, Signal::SIGINT));
        assert!(!signal_disposition_is_default(status, Signal::SIGHUP));
        assert!(signal_disposition_is_default(status, Signal::SIGTERM));
        assert!(!signal_disposition_is_default(
            "Name:\tx\n",
            Signal::SIGTERM
        ));
        assert!(ends_by_default(Signal::SIGTERM));
        assert!(!ends_by_default(Signal::SIGCONT));
    }

    #[test]
    fn users_ids_and_statuses() {
        assert_eq!(parse_user("1000").unwrap(), (1000, 1000));
        assert_eq!(parse_user("1000:50").unwrap(), (1000, 50));
        assert!(parse_user("alice").is_err());
        let id = fresh_id().unwrap();
        assert!(id.starts_with("sbx-") && id.len() == 16);
        runtime::validate_id(&id).unwrap();
        assert!(runtime::validate_id(BUNDLES).is_err());
        assert_eq!(
            error_status("exec: \"nope\": executable file not found in $PATH"),
            127
        );
        assert_eq!(error_status("exec: \"/x\": permission denied"), 126);
        assert_eq!(error_status("--policy p.json: invalid JSON"), 125);
    }
}

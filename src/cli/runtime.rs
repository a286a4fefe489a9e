//! runc's commands over youki's libcontainer.
//!
//! Behaviour and wording follow runc where engines depend on them: containerd treats an error
//! containing "does not exist" as not-found and "container not running" on kill as already
//! stopped; `delete --force` of a missing container succeeds; `run` and `exec` exit with the
//! process's status, or 128 + the signal that ended it.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use libcgroups::common::{CgroupManager, ControllerOpt};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
};
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use liboci_cli::{CommonCmd, GlobalOpts, StandardCmd};
use nix::sys::signal::{self as nixsignal, kill};
use nix::sys::signalfd::SigSet;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::Serialize;

use super::executor::{runc_create_error, RuncExecutor};
use super::{AgentfenseOpts, Command};
use crate::lifecycle;

/// runc's message for a container id with no state.
pub const ERR_NOT_EXIST: &str = "container does not exist";
/// runc's message for signalling a container that is not running.
pub const ERR_NOT_RUNNING: &str = "container not running";
/// Where container state lives when `--root` is not given.
pub const DEFAULT_ROOT: &str = "/run/agentfense-runc";

/// What every command needs besides its own arguments.
pub struct Ctx {
    pub root: PathBuf,
    pub systemd_cgroup: bool,
    pub agentfense: AgentfenseOpts,
}

/// Runs one command; returns the exit code.
pub fn dispatch(cmd: Command, global: &GlobalOpts, agentfense: &AgentfenseOpts) -> Result<i32> {
    // `spec` and `features` need no state directory.
    if let Command::Common(c) = &cmd {
        match c.as_ref() {
            CommonCmd::Features(_) => return features().map(|_| 0),
            CommonCmd::Spec(s) => return spec(s.bundle.as_deref(), s.rootless).map(|_| 0),
            _ => {}
        }
    }
    let ctx = Ctx {
        root: state_root(global.root.as_deref())?,
        systemd_cgroup: global.systemd_cgroup,
        agentfense: agentfense.clone(),
    };
    match cmd {
        Command::Standard(c) => match *c {
            StandardCmd::Create(a) => create(a, &ctx).map(|_| 0),
            StandardCmd::Start(a) => start(&a.container_id, &ctx).map(|_| 0),
            StandardCmd::State(a) => state(&a.container_id, &ctx).map(|_| 0),
            StandardCmd::Kill(a) => kill_cmd(&a.container_id, &a.signal, a.all, &ctx).map(|_| 0),
            StandardCmd::Delete(a) => delete(&a.container_id, a.force, &ctx).map(|_| 0),
        },
        Command::Common(c) => match *c {
            CommonCmd::Checkpointt(_) => bail!("checkpoint is not supported by agentfense-runc"),
            CommonCmd::Events(a) => events(a, &ctx).map(|_| 0),
            CommonCmd::Exec(a) => exec(a, &ctx),
            CommonCmd::List(a) => list(&a.format, a.quiet, &ctx).map(|_| 0),
            CommonCmd::Pause(a) => pause(&a.container_id, &ctx).map(|_| 0),
            CommonCmd::Resume(a) => resume(&a.container_id, &ctx).map(|_| 0),
            CommonCmd::Ps(a) => ps(&a.container_id, &a.format, &a.ps_options, &ctx).map(|_| 0),
            CommonCmd::Run(a) => run(a, &ctx),
            CommonCmd::Update(a) => update(a, &ctx).map(|_| 0),
            CommonCmd::Features(_) | CommonCmd::Spec(_) => Ok(0),
        },
        Command::Sandbox(args) => super::sandbox::run(*args, &ctx),
        Command::FenceDaemon { .. }
        | Command::Policy { .. }
        | Command::Audit(_)
        | Command::Export(_)
        | Command::Diff(_)
        | Command::Commit(_)
        | Command::Gc(_)
        | Command::Configure(_)
        | Command::Completions(_)
        | Command::Man(_)
        | Command::Hook(_) => {
            bail!("not a runtime command")
        }
    }
}

/// The state root: `--root`, else [`DEFAULT_ROOT`]; created 0700 if missing.
pub fn state_root(root: Option<&Path>) -> Result<PathBuf> {
    let root = root.unwrap_or(Path::new(DEFAULT_ROOT));
    if !root.exists() {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| format!("failed to create state root {}", root.display()))?;
    }
    root.canonicalize()
        .with_context(|| format!("invalid state root {}", root.display()))
}

/// A container's state directory under the root. The id is checked first so that it can never
/// name anything outside the root.
fn container_dir(ctx: &Ctx, id: &str) -> Result<PathBuf> {
    validate_id(id)?;
    Ok(ctx.root.join(id))
}

/// runc's container id rule: `^[\w+-\.]+$`, and not `.` or `..`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        bail!("invalid container id format: {id:?}")
    }
}

pub(crate) fn load(ctx: &Ctx, id: &str) -> Result<Container> {
    let dir = container_dir(ctx, id)?;
    if !dir.join("state.json").exists() {
        bail!(ERR_NOT_EXIST);
    }
    Container::load(dir).map_err(|e| anyhow!(e).context(format!("failed to load container {id}")))
}

fn builder(id: &str) -> ContainerBuilder {
    ContainerBuilder::new(id.to_string(), SyscallType::default()).with_executor(RuncExecutor)
}

/// `create`. Fencing plugs in here: before libcontainer sees the bundle, the fence for the
/// container's workspace is set up and `config.json` rewritten; if libcontainer then fails,
/// the fence is torn down again (see the fence issue). Unfenced containers go straight through.
fn create(args: liboci_cli::Create, ctx: &Ctx) -> Result<()> {
    validate_id(&args.container_id)?;
    let bundle = absolute(&args.bundle)?;
    let admin = lifecycle::admin_config(ctx.agentfense.config.as_deref())?;
    let opts = InitOpts {
        pid_file: args.pid_file.as_ref(),
        console_socket: args.console_socket.as_ref(),
        preserve_fds: args.preserve_fds,
        detach: true,
        no_pivot: args.no_pivot,
        clear_signal_mask: false,
    };
    create_init(&args.container_id, &bundle, &opts, &admin, ctx).map(|_| ())
}

/// How libcontainer is to create a container's init process (`create`, `run`, `sandbox`).
pub(crate) struct InitOpts<'a> {
    pub pid_file: Option<&'a PathBuf>,
    pub console_socket: Option<&'a PathBuf>,
    pub preserve_fds: i32,
    pub detach: bool,
    pub no_pivot: bool,
    /// The container's process inherits the calling thread's signal mask: create it with no
    /// signal blocked (for a caller that blocks signals while it sets up, as `sandbox` does).
    pub clear_signal_mask: bool,
}

/// The shared path of `create`, `run` and `sandbox`: the bundle fenced if its spec asks for
/// it ([`lifecycle::prepare`]), then the container created by libcontainer; if that fails, the
/// fence is undone. The bundle's `config.json` is left as it was in either case.
pub(crate) fn create_init(
    id: &str,
    bundle: &Path,
    opts: &InitOpts<'_>,
    admin: &crate::config::AdminConfig,
    ctx: &Ctx,
) -> Result<Container> {
    let fence = lifecycle::prepare(id, bundle, admin, &ctx.root)?;
    let b = builder(id)
        .with_pid_file(opts.pid_file)
        .and_then(|b| {
            b.with_console_socket(opts.console_socket)
                .with_root_path(&ctx.root)
        })
        .and_then(|b| b.with_preserved_fds(opts.preserve_fds).validate_id());
    let b = match b {
        Ok(b) => b,
        Err(e) => {
            if let Some(f) = fence {
                f.abort();
            }
            return Err(e.into());
        }
    };
    let saved_mask = if opts.clear_signal_mask {
        Some(SigSet::empty().thread_swap_mask(nixsignal::SigmaskHow::SIG_SETMASK)?)
    } else {
        None
    };
    let built = b
        .as_init(bundle)
        .with_systemd(ctx.systemd_cgroup)
        .with_detach(opts.detach)
        .with_no_pivot(opts.no_pivot)
        .build();
    if let Some(mask) = saved_mask {
        // pthread_sigmask with a valid set cannot fail.
        let _ = mask.thread_set_mask();
    }
    match built {
        Ok(c) => {
            lifecycle::crash_point("built");
            if let Some(f) = fence {
                f.created();
            }
            Ok(c)
        }
        Err(e) => {
            if let Some(f) = fence {
                f.abort();
            }
            Err(anyhow!(runc_create_error(&format!("{:#}", anyhow!(e)))))
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    p.canonicalize()
        .with_context(|| format!("invalid bundle {}", p.display()))
}

fn start(id: &str, ctx: &Ctx) -> Result<()> {
    let mut c = load(ctx, id)?;
    let admin = lifecycle::admin_config(ctx.agentfense.config.as_deref())?;
    lifecycle::note_start(&admin, id)?;
    c.start()
        .map_err(|e| anyhow!(e).context(format!("failed to start container {id}")))
}

/// `state`: runc's JSON shape (containerd parses it; `owner` is a string there).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StateOut<'a> {
    oci_version: &'a str,
    id: &'a str,
    pid: i32,
    status: String,
    bundle: &'a Path,
    rootfs: String,
    created: String,
    owner: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    annotations: Option<&'a HashMap<String, String>>,
}

fn rootfs_of(bundle: &Path) -> String {
    let root = fs::read_to_string(bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["root"]["path"].as_str().map(str::to_string))
        .unwrap_or_default();
    if root.is_empty() || root.starts_with('/') {
        root
    } else {
        bundle.join(root).display().to_string()
    }
}

fn state_out(c: &Container) -> StateOut<'_> {
    let st = &c.state;
    StateOut {
        oci_version: &st.oci_version,
        id: &st.id,
        pid: if c.status() == ContainerStatus::Stopped {
            0
        } else {
            st.pid.unwrap_or(0)
        },
        // runc's (and containerd's) status words are lower case.
        status: c.status().to_string().to_lowercase(),
        bundle: &st.bundle,
        rootfs: rootfs_of(&st.bundle),
        created: st
            .created
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
            .unwrap_or_default(),
        owner: c
            .creator()
            .map(|o| o.to_string_lossy().into_owned())
            .unwrap_or_default(),
        annotations: st.annotations.as_ref(),
    }
}

fn state(id: &str, ctx: &Ctx) -> Result<()> {
    let mut c = load(ctx, id)?;
    c.refresh_status()?;
    println!("{}", serde_json::to_string_pretty(&state_out(&c))?);
    Ok(())
}

fn kill_cmd(id: &str, signal: &str, all: bool, ctx: &Ctx) -> Result<()> {
    let mut c = load(ctx, id)?;
    let sig: Signal = signal
        .try_into()
        .map_err(|e| anyhow!("{e}").context(format!("invalid signal {signal:?}")))?;
    c.refresh_status()?;
    if c.status() == ContainerStatus::Stopped && !all {
        bail!(ERR_NOT_RUNNING);
    }
    match c.kill(sig, all) {
        Ok(()) => Ok(()),
        Err(_) if c.status() == ContainerStatus::Stopped => bail!(ERR_NOT_RUNNING),
        Err(e) => Err(anyhow!(e).context(format!("failed to kill container {id}"))),
    }
}

/// `delete`: libcontainer's delete, then the container's fences torn down (delta kept). A
/// fence left behind by a create that died half way is cleaned up too.
pub(crate) fn delete(id: &str, force: bool, ctx: &Ctx) -> Result<()> {
    let result = delete_container(id, force, ctx);
    if result.is_ok() || !container_dir(ctx, id)?.join("state.json").exists() {
        let admin = lifecycle::admin_config(ctx.agentfense.config.as_deref())?;
        lifecycle::delete(&admin, id, None)?;
    }
    result
}

fn delete_container(id: &str, force: bool, ctx: &Ctx) -> Result<()> {
    let dir = container_dir(ctx, id)?;
    if !dir.exists() {
        if force {
            return Ok(());
        }
        bail!(ERR_NOT_EXIST);
    }
    match load(ctx, id) {
        Ok(mut c) => c
            .delete(force)
            .map_err(|e| anyhow!(e).context(format!("failed to delete container {id}"))),
        // A create that died half way leaves a directory without usable state. With --force
        // there is nothing left to stop: remove what is there.
        Err(_) if force => fs::remove_dir_all(&dir)
            .with_context(|| format!("failed to remove state of container {id}")),
        Err(e) => Err(e),
    }
}

/// Exit code of a reaped process, as runc reports it.
pub fn exit_code(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => 0,
    }
}

fn exec(args: liboci_cli::Exec, ctx: &Ctx) -> Result<i32> {
    let user = args.user.map(|(u, _)| u);
    let group = args.user.and_then(|(_, g)| g);
    // Loading first gives runc's "does not exist" for an unknown id.
    load(ctx, &args.container_id)?;
    if let Some(p) = &args.process {
        strip_fencing_env(p)?;
    }
    let env: HashMap<String, String> = args
        .env
        .iter()
        .filter(|(k, _)| !k.starts_with(FENCING_ENV_PREFIX))
        .cloned()
        .collect();
    let pid = builder(&args.container_id)
        .with_root_path(&ctx.root)?
        .with_console_socket(args.console_socket.as_ref())
        .with_pid_file(args.pid_file.as_ref())?
        .with_preserved_fds(args.preserve_fds)
        .validate_id()?
        .as_tenant()
        .with_detach(args.detach)
        .with_cwd(args.cwd.as_ref())
        .with_env(env)
        .with_process(args.process.as_ref())
        .with_no_new_privs(args.no_new_privs)
        .with_container_args(args.command.clone())
        .with_additional_gids(args.additional_gids)
        .with_user(user)
        .with_group(group)
        .with_capabilities(args.cap)
        .with_ignore_paused(args.ignore_paused)
        .with_sub_cgroup(args.cgroup)
        .with_apparmor(args.apparmor)
        .build()?;
    if args.detach {
        return Ok(0);
    }
    Ok(exit_code(waitpid(pid, None)?))
}

/// Fencing settings travel as `AGENTFENSE_*` variables for engines without annotations; they
/// are removed from every process the container runs (Docker hands `exec` the container's
/// original environment again).
const FENCING_ENV_PREFIX: &str = "AGENTFENSE_";

fn strip_fencing_env(process_json: &Path) -> Result<()> {
    let text = fs::read_to_string(process_json)
        .with_context(|| format!("failed to read {}", process_json.display()))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).context("invalid process JSON")?;
    let Some(env) = v.get_mut("env").and_then(|e| e.as_array_mut()) else {
        return Ok(());
    };
    let before = env.len();
    env.retain(|e| {
        !e.as_str()
            .is_some_and(|s| s.starts_with(FENCING_ENV_PREFIX))
    });
    if env.len() != before {
        fs::write(process_json, serde_json::to_vec(&v)?)
            .with_context(|| format!("failed to write {}", process_json.display()))?;
    }
    Ok(())
}

fn run(args: liboci_cli::Run, ctx: &Ctx) -> Result<i32> {
    validate_id(&args.container_id)?;
    let bundle = absolute(&args.bundle)?;
    let admin = lifecycle::admin_config(ctx.agentfense.config.as_deref())?;
    let opts = InitOpts {
        pid_file: args.pid_file.as_ref(),
        console_socket: args.console_socket.as_ref(),
        preserve_fds: args.preserve_fds,
        detach: args.detach,
        no_pivot: args.no_pivot,
        clear_signal_mask: false,
    };
    let mut c = create_init(&args.container_id, &bundle, &opts, &admin, ctx)?;
    c.start().map_err(|e| {
        anyhow!(e).context(format!("failed to start container {}", args.container_id))
    })?;
    if args.detach {
        return Ok(0);
    }
    let pid = c
        .pid()
        .ok_or_else(|| anyhow!("container {} has no init process", args.container_id))?;
    let result = forward_signals_until_exit(pid);
    if !args.keep {
        c.delete(true)?;
        lifecycle::delete(&admin, &args.container_id, result.as_ref().ok().copied())?;
    }
    result
}

/// `run` in the foreground: forward signals to the container's init process (as runc does,
/// except SIGCHLD, and SIGURG which Go runtimes use internally) and return its exit code.
fn forward_signals_until_exit(init: Pid) -> Result<i32> {
    let all = SigSet::all();
    all.thread_block().context("failed to block signals")?;
    loop {
        // A child may have exited before the signals were blocked: reap first.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(st) if st.pid() == Some(init) => return Ok(exit_code(st)),
                Ok(_) => continue,
                Err(e) => return Err(e).context("waitpid"),
            }
        }
        match all.wait().context("sigwait")? {
            nixsignal::SIGCHLD | nixsignal::SIGURG | nixsignal::SIGWINCH => {}
            sig => {
                let _ = kill(init, Some(sig));
            }
        }
    }
}

fn pause(id: &str, ctx: &Ctx) -> Result<()> {
    load(ctx, id)?
        .pause()
        .map_err(|e| anyhow!(e).context(format!("failed to pause container {id}")))
}

fn resume(id: &str, ctx: &Ctx) -> Result<()> {
    load(ctx, id)?
        .resume()
        .map_err(|e| anyhow!(e).context(format!("failed to resume container {id}")))
}

fn events(args: liboci_cli::Events, ctx: &Ctx) -> Result<()> {
    load(ctx, &args.container_id)?
        .events(args.interval, args.stats)
        .map_err(|e| anyhow!(e).context(format!("failed to get events of {}", args.container_id)))
}

fn cgroup_manager(ctx: &Ctx, id: &str) -> Result<libcgroups::common::AnyCgroupManager> {
    let c = load(ctx, id)?;
    Ok(libcgroups::common::create_cgroup_manager(
        libcgroups::common::CgroupConfig {
            cgroup_path: c.spec()?.cgroup_path,
            systemd_cgroup: c.systemd(),
            container_name: c.id().to_string(),
        },
    )?)
}

fn ps(id: &str, format: &str, ps_options: &[String], ctx: &Ctx) -> Result<()> {
    let pids: Vec<i32> = cgroup_manager(ctx, id)?
        .get_all_pids()?
        .iter()
        .map(|p| p.as_raw())
        .collect();
    match format {
        "json" => {
            println!("{}", serde_json::to_string(&pids)?);
            Ok(())
        }
        "table" => {
            let default = vec!["-ef".to_string()];
            let opts = if ps_options.is_empty() {
                &default
            } else {
                ps_options
            };
            let out = std::process::Command::new("ps")
                .args(opts)
                .output()
                .context("failed to run ps")?;
            if !out.status.success() {
                bail!("ps: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines = text.lines();
            let header = lines.next().unwrap_or_default();
            let pid_col = header
                .split_whitespace()
                .position(|h| h == "PID")
                .ok_or_else(|| anyhow!("couldn't find PID field in ps output"))?;
            let mut stdout = io::stdout().lock();
            writeln!(stdout, "{header}")?;
            for line in lines {
                let pid = line
                    .split_whitespace()
                    .nth(pid_col)
                    .and_then(|p| p.parse::<i32>().ok());
                if pid.is_some_and(|p| pids.contains(&p)) {
                    writeln!(stdout, "{line}")?;
                }
            }
            Ok(())
        }
        other => bail!("invalid format option: {other}"),
    }
}

/// The resources an `update` asks for: a JSON `LinuxResources` (`--resources FILE|-`, as
/// containerd sends it), else the individual flags.
pub fn update_resources(args: &liboci_cli::Update) -> Result<LinuxResources> {
    if let Some(path) = &args.resources {
        let text = if path.as_os_str() == "-" {
            io::read_to_string(io::stdin()).context("failed to read resources from stdin")?
        } else {
            fs::read_to_string(path)
                .with_context(|| format!("failed to read {}", path.display()))?
        };
        return serde_json::from_str(&text).context("invalid resources JSON");
    }
    let mut b = LinuxResourcesBuilder::default();
    if args.memory.is_some() || args.memory_reservation.is_some() || args.memory_swap.is_some() {
        let mut m = LinuxMemoryBuilder::default();
        if let Some(v) = args.memory {
            m = m.limit(v as i64);
        }
        if let Some(v) = args.memory_reservation {
            m = m.reservation(v as i64);
        }
        if let Some(v) = args.memory_swap {
            m = m.swap(v);
        }
        b = b.memory(m.build()?);
    }
    if args.cpu_period.is_some()
        || args.cpu_quota.is_some()
        || args.cpu_share.is_some()
        || args.cpuset_cpus.is_some()
        || args.cpuset_mems.is_some()
    {
        let mut c = LinuxCpuBuilder::default();
        if let Some(v) = args.cpu_period {
            c = c.period(v);
        }
        if let Some(v) = args.cpu_quota {
            c = c.quota(v as i64);
        }
        if let Some(v) = args.cpu_share {
            c = c.shares(v);
        }
        if let Some(v) = &args.cpuset_cpus {
            c = c.cpus(v.clone());
        }
        if let Some(v) = &args.cpuset_mems {
            c = c.mems(v.clone());
        }
        b = b.cpu(c.build()?);
    }
    if let Some(v) = args.pids_limit {
        b = b.pids(LinuxPidsBuilder::default().limit(v).build()?);
    }
    Ok(b.build()?)
}

fn update(args: liboci_cli::Update, ctx: &Ctx) -> Result<()> {
    let resources = update_resources(&args)?;
    cgroup_manager(ctx, &args.container_id)?.apply(&ControllerOpt {
        resources: &resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    })?;
    Ok(())
}

/// runc's `list -f json` shape.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListItem {
    oci_version: String,
    id: String,
    pid: i32,
    status: String,
    bundle: PathBuf,
    rootfs: String,
    created: String,
    owner: String,
}

fn list(format: &str, quiet: bool, ctx: &Ctx) -> Result<()> {
    let mut items = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(&ctx.root)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let dir = entry.path();
        if !dir.join("state.json").exists() {
            continue;
        }
        let Ok(mut c) = Container::load(dir) else {
            continue;
        };
        let _ = c.refresh_status();
        let s = state_out(&c);
        items.push(ListItem {
            oci_version: s.oci_version.to_string(),
            id: s.id.to_string(),
            pid: s.pid,
            status: s.status,
            bundle: s.bundle.to_path_buf(),
            rootfs: s.rootfs,
            created: s.created,
            owner: s.owner,
        });
    }
    let mut out = io::stdout().lock();
    if quiet {
        for i in &items {
            writeln!(out, "{}", i.id)?;
        }
        return Ok(());
    }
    match format {
        "json" => writeln!(out, "{}", serde_json::to_string(&items)?)?,
        "table" => {
            let mut tw = tabwriter::TabWriter::new(out);
            writeln!(tw, "ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER")?;
            for i in &items {
                writeln!(
                    tw,
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    i.id,
                    i.pid,
                    i.status,
                    i.bundle.display(),
                    i.created,
                    i.owner
                )?;
            }
            tw.flush()?;
        }
        other => bail!("invalid format option: {other}"),
    }
    Ok(())
}

/// The runtime-spec Features document for what this runtime supports.
pub fn features_document() -> Result<libcontainer::oci_spec::runtime::Features> {
    use libcontainer::oci_spec::runtime::{
        ApparmorBuilder, Arch, CgroupBuilder, FeaturesBuilder, IDMapBuilder, IntelRdtBuilder,
        LinuxFeatureBuilder, LinuxNamespaceType, LinuxSeccompAction, MountExtensionsBuilder,
        SeccompBuilder, SelinuxBuilder, VERSION,
    };
    let namespaces = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::User,
        LinuxNamespaceType::Cgroup,
        LinuxNamespaceType::Time,
    ];
    let capabilities: Vec<String> = caps::all().iter().map(|c| format!("{c:?}")).collect();
    let seccomp = SeccompBuilder::default()
        .enabled(true)
        .actions(vec![
            LinuxSeccompAction::ScmpActAllow,
            LinuxSeccompAction::ScmpActErrno,
            LinuxSeccompAction::ScmpActKill,
            LinuxSeccompAction::ScmpActKillProcess,
            LinuxSeccompAction::ScmpActKillThread,
            LinuxSeccompAction::ScmpActLog,
            LinuxSeccompAction::ScmpActNotify,
            LinuxSeccompAction::ScmpActTrace,
            LinuxSeccompAction::ScmpActTrap,
        ])
        .operators(
            [
                "SCMP_CMP_EQ",
                "SCMP_CMP_GE",
                "SCMP_CMP_GT",
                "SCMP_CMP_LE",
                "SCMP_CMP_LT",
                "SCMP_CMP_MASKED_EQ",
                "SCMP_CMP_NE",
            ]
            .map(String::from)
            .to_vec(),
        )
        .archs(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
            Arch::ScmpArchAarch64,
            Arch::ScmpArchArm,
        ])
        .build()?;
    let linux = LinuxFeatureBuilder::default()
        .namespaces(namespaces)
        .capabilities(capabilities)
        .cgroup(
            CgroupBuilder::default()
                .v1(true)
                .v2(true)
                .systemd(true)
                .systemd_user(true)
                .rdma(false)
                .build()?,
        )
        .seccomp(seccomp)
        .apparmor(ApparmorBuilder::default().enabled(true).build()?)
        .selinux(SelinuxBuilder::default().enabled(false).build()?)
        .intel_rdt(IntelRdtBuilder::default().enabled(true).build()?)
        .mount_extensions(
            MountExtensionsBuilder::default()
                .idmap(IDMapBuilder::default().enabled(false).build()?)
                .build()?,
        )
        .build()?;
    let mut annotations = HashMap::new();
    annotations.insert(
        "io.github.agentfense.runc.version".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    );
    annotations.insert(
        "io.github.agentfense.runc.libcontainer.version".to_string(),
        "0.7.0".to_string(),
    );
    annotations.insert(
        "io.github.agentfense.runc.annotations".to_string(),
        "agentfense.io/policy,agentfense.io/preset,agentfense.io/policy-name,\
         agentfense.io/workspace,agentfense.io/delta,agentfense.io/audit"
            .to_string(),
    );
    Ok(FeaturesBuilder::default()
        .oci_version_min("1.0.0".to_string())
        .oci_version_max(VERSION)
        .hooks(
            [
                "prestart",
                "createRuntime",
                "createContainer",
                "startContainer",
                "poststart",
                "poststop",
            ]
            .map(String::from)
            .to_vec(),
        )
        .mount_options(libcontainer::syscall::linux::MountOption::known_options())
        .linux(linux)
        .annotations(annotations)
        .build()?)
}

fn features() -> Result<()> {
    println!("{}", serde_json::to_string_pretty(&features_document()?)?);
    Ok(())
}

/// `spec`: writes a default `config.json` into the bundle directory (the current directory by
/// default), refusing to overwrite one, as runc does.
fn spec(bundle: Option<&Path>, rootless: bool) -> Result<()> {
    let dir = bundle.unwrap_or(Path::new("."));
    let path = dir.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let spec = if rootless {
        libcontainer::oci_spec::runtime::Spec::rootless(
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    } else {
        libcontainer::oci_spec::runtime::Spec::default()
    };
    let text = serde_json::to_string_pretty(&spec)?;
    fs::write(&path, text).with_context(|| format!("failed to write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(root: &Path) -> Ctx {
        Ctx {
            root: root.to_path_buf(),
            systemd_cgroup: false,
            agentfense: AgentfenseOpts::default(),
        }
    }

    #[test]
    fn ids_follow_runc() {
        for ok in ["abc", "a-b_c.d+e", "0123456789abcdef"] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "a\0b"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_container_wording() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        assert_eq!(state("nope", &c).unwrap_err().to_string(), ERR_NOT_EXIST);
        assert_eq!(
            kill_cmd("nope", "KILL", false, &c).unwrap_err().to_string(),
            ERR_NOT_EXIST
        );
        assert_eq!(
            delete("nope", false, &c).unwrap_err().to_string(),
            ERR_NOT_EXIST
        );
        // `delete --force` of a missing container succeeds, as containerd expects.
        delete("nope", true, &c).unwrap();
    }

    #[test]
    fn delete_force_clears_a_half_created_container() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(dir.path());
        fs::create_dir(dir.path().join("half")).unwrap();
        fs::write(dir.path().join("half/state.json"), b"{truncated").unwrap();
        assert!(delete("half", false, &c).is_err());
        delete("half", true, &c).unwrap();
        assert!(!dir.path().join("half").exists());
    }

    #[test]
    fn exit_codes_follow_runc() {
        let p = Pid::from_raw(1);
        assert_eq!(exit_code(WaitStatus::Exited(p, 3)), 3);
        assert_eq!(
            exit_code(WaitStatus::Signaled(p, nixsignal::SIGKILL, false)),
            137
        );
    }

    #[test]
    fn features_document_is_valid_json_with_runtime_spec_keys() {
        let doc = serde_json::to_value(features_document().unwrap()).unwrap();
        assert_eq!(doc["ociVersionMin"], "1.0.0");
        assert!(doc["ociVersionMax"].as_str().unwrap().starts_with("1."));
        assert!(doc["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == "createRuntime"));
        assert!(doc["mountOptions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "nosuid"));
        assert_eq!(doc["linux"]["cgroup"]["v1"], true);
        assert_eq!(doc["linux"]["seccomp"]["enabled"], true);
        assert!(doc["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "mount"));
    }

    #[test]
    fn update_resources_from_flags_and_json() {
        use clap::Parser;
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            u: liboci_cli::Update,
        }
        let w =
            W::try_parse_from(["x", "--memory", "104857600", "--pids-limit", "50", "id"]).unwrap();
        let r = update_resources(&w.u).unwrap();
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(104857600));
        assert_eq!(r.pids().as_ref().unwrap().limit(), 50);

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r.json");
        fs::write(&f, r#"{"memory":{"limit":1048576}}"#).unwrap();
        let w = W::try_parse_from(["x", "--resources", f.to_str().unwrap(), "id"]).unwrap();
        let r = update_resources(&w.u).unwrap();
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(1048576));
    }

    #[test]
    fn spec_writes_config_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        spec(Some(dir.path()), false).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(v["root"]["path"], "rootfs");
        let err = spec(Some(dir.path()), false).unwrap_err().to_string();
        assert!(err.contains("exists"), "{err}");
    }
}

//! The command line: runc's commands and global flags (through `liboci-cli`), our global options,
//! and our own commands. Thin: parse, call, report.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
use liboci_cli::{CommonCmd, GlobalOpts, StandardCmd};

use crate::logging::{LogFormat, Logger};

pub mod audit;
pub mod configure;
pub mod delta;
pub mod docs;
pub mod executor;
pub mod hook;
pub mod policy;
pub mod runtime;
pub mod sandbox;

/// The runtime's version line, in runc's shape (engines parse the first line).
pub fn version_text() -> String {
    format!(
        "agentfense-runc version {}\nlibcontainer: 0.7.0\nspec: {}",
        env!("CARGO_PKG_VERSION"),
        libcontainer::oci_spec::runtime::VERSION
    )
}

/// Options of our own that may appear among runc's global flags. Docker places a runtime's
/// `runtimeArgs` before the global flags it adds itself, so these are accepted anywhere before
/// the subcommand, in any order with runc's.
#[derive(Args, Debug, Default, Clone)]
pub struct AgentfenseOpts {
    /// The administrator's settings file (JSON): state directory, policy directory, default
    /// policy, mandatory floor rules, audit and delta defaults.
    #[arg(long = "agentfense-config", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}

/// runc global flags we accept for compatibility and ignore (we have no use for them).
#[derive(Args, Debug, Default)]
struct IgnoredRuncOpts {
    /// path to the criu binary (checkpoint/restore is not supported)
    #[arg(long, hide = true)]
    criu: Option<String>,
    /// runc's rootless mode switch ("true", "false", "auto")
    #[arg(long, hide = true)]
    rootless: Option<String>,
}

#[derive(Parser, Debug)]
#[command(
    name = "agentfense-runc",
    about = "An OCI runtime that fences a container's workspace: hidden paths, view-only paths, \
             copy-on-write writes, and an audit trail. runc-compatible.",
    disable_version_flag = true
)]
pub struct Opts {
    #[command(flatten)]
    pub global: GlobalOpts,

    #[command(flatten)]
    pub agentfense: AgentfenseOpts,

    #[command(flatten)]
    ignored: IgnoredRuncOpts,

    /// print the version
    #[arg(short = 'v', long)]
    pub version: bool,

    #[command(subcommand)]
    pub cmd: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    #[command(flatten)]
    Standard(Box<StandardCmd>),
    #[command(flatten)]
    Common(Box<CommonCmd>),
    /// Show, summarise and verify a container's audit trail.
    Audit(audit::AuditArgs),
    /// Print a container's delta as an OCI image layer (tar) on stdout: `.wh.` files for
    /// deletions, `.wh..wh..opq` for replaced directories.
    Export(delta::IdArg),
    /// What a fenced container changed in its workspaces, like `docker diff`: `A`dded,
    /// `C`hanged, `D`eleted.
    Diff(delta::DiffArgs),
    /// Apply a deleted container's delta to its workspace on the host, file by file and
    /// atomically, keeping whatever changed on the host meanwhile (listed as conflicts; exit 2).
    Commit(delta::DiffArgs),
    /// Remove the state (delta, audit trail) of fenced containers that no longer exist.
    Gc(delta::GcArgs),
    /// Run one command with DIR fenced at /workspace, over a read-only view of the host's
    /// system directories: no engine needed.
    Sandbox(Box<sandbox::SandboxArgs>),
    /// Register agentfense-runc as a runtime of Docker, containerd or podman (backup, merge,
    /// never clobber).
    Configure(configure::ConfigureArgs),
    /// OCI hook entry point (podman, CRI-O): fences a container run by another runtime.
    Hook(hook::HookArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(docs::CompletionsArgs),
    /// Print the manual page (roff) on stdout, or write every page into a directory.
    Man(docs::ManArgs),
    /// Validate, explain and describe policies.
    Policy {
        #[command(subcommand)]
        cmd: policy::PolicyCmd,
    },
    /// Serves one fenced workspace (started by the runtime itself, never by hand).
    #[command(name = "fence-daemon", hide = true)]
    FenceDaemon { config: PathBuf },
}

/// Parses argv, logs where runc's flags say, runs the command, and returns the process's exit
/// code. Errors are reported as runc reports them (an `error` log line, and on stderr).
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let opts = match Opts::try_parse_from(args) {
        Ok(o) => o,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    if opts.version {
        println!("{}", version_text());
        return 0;
    }
    let format = match LogFormat::parse(opts.global.log_format.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e:#}");
            return 1;
        }
    };
    let logger = match Logger::open(opts.global.log.as_deref(), format) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e:#}");
            return 1;
        }
    };
    logger.install(opts.global.debug);
    tracing::debug!("started with {:?}", std::env::args_os().collect::<Vec<_>>());

    let Some(cmd) = opts.cmd else {
        let _ = Opts::command().print_help();
        return 0;
    };
    let docs = match &cmd {
        Command::Completions(args) => Some(docs::completions(args)),
        Command::Man(args) => Some(docs::man(args)),
        _ => None,
    };
    if let Some(result) = docs {
        return match result {
            Ok(code) => code,
            Err(e) => {
                logger.fatal(&format!("{e:#}"));
                1
            }
        };
    }
    if matches!(
        cmd,
        Command::Policy { .. }
            | Command::Audit(_)
            | Command::Export(_)
            | Command::Diff(_)
            | Command::Commit(_)
            | Command::Gc(_)
            | Command::Hook(_)
    ) {
        let admin = match crate::lifecycle::admin_config(opts.agentfense.config.as_deref()) {
            Ok(a) => a,
            Err(e) => {
                logger.fatal(&format!("{e:#}"));
                return 1;
            }
        };
        let result = match cmd {
            Command::Audit(args) => audit::run(args, &admin),
            Command::Policy { cmd } => policy::run(cmd, &admin),
            Command::Export(args) => delta::export(args, &admin),
            Command::Diff(args) => delta::diff(args, &admin),
            Command::Commit(args) => delta::commit(args, &admin),
            Command::Gc(args) => delta::gc(args, &admin),
            Command::Hook(args) => hook::run(args, &admin),
            _ => Ok(1),
        };
        return match result {
            Ok(code) => code,
            Err(e) => {
                logger.fatal(&format!("{e:#}"));
                1
            }
        };
    }
    if let Command::Configure(args) = cmd {
        return match configure::run(args) {
            Ok(code) => code,
            Err(e) => {
                logger.fatal(&format!("{e:#}"));
                1
            }
        };
    }
    if let Command::FenceDaemon { config } = &cmd {
        return match crate::fence::daemon::run(config) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("{e:#}");
                1
            }
        };
    }
    match runtime::dispatch(cmd, &opts.global, &opts.agentfense) {
        Ok(code) => code,
        Err(e) => {
            logger.fatal(&format!("{e:#}"));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Opts {
        Opts::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn runtime_args_before_global_flags() {
        // What Docker runs for a runtime registered with runtimeArgs.
        let o = parse(&[
            "agentfense-runc",
            "--agentfense-config",
            "/etc/agentfense/config.json",
            "--root",
            "/var/run/docker/runtime-runc/moby",
            "--log",
            "/run/containerd/x/log.json",
            "--log-format",
            "json",
            "--systemd-cgroup",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/init.pid",
            "abc",
        ]);
        assert_eq!(
            o.agentfense.config.as_deref(),
            Some(std::path::Path::new("/etc/agentfense/config.json"))
        );
        assert_eq!(
            o.global.root.as_deref(),
            Some(std::path::Path::new("/var/run/docker/runtime-runc/moby"))
        );
        assert_eq!(o.global.log_format.as_deref(), Some("json"));
        assert!(o.global.systemd_cgroup);
        match o.cmd {
            Some(Command::Standard(c)) => match *c {
                StandardCmd::Create(c) => {
                    assert_eq!(c.container_id, "abc");
                    assert_eq!(c.bundle, PathBuf::from("/b"));
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn global_flags_before_runtime_args() {
        let o = parse(&[
            "agentfense-runc",
            "--root",
            "/r",
            "--agentfense-config=/c.json",
            "--debug",
            "state",
            "x",
        ]);
        assert_eq!(o.agentfense.config, Some(PathBuf::from("/c.json")));
        assert!(o.global.debug);
    }

    #[test]
    fn runc_flags_we_ignore_are_accepted() {
        let o = parse(&["agentfense-runc", "--criu", "/usr/sbin/criu", "list"]);
        assert!(matches!(o.cmd, Some(Command::Common(_))));
        let o = parse(&["agentfense-runc", "--rootless", "false", "list"]);
        assert!(o.cmd.is_some());
    }

    #[test]
    fn kill_with_all_and_signal_names() {
        let o = parse(&["agentfense-runc", "kill", "--all", "abc", "KILL"]);
        match o.cmd {
            Some(Command::Standard(c)) => match *c {
                StandardCmd::Kill(k) => {
                    assert!(k.all);
                    assert_eq!(k.signal, "KILL");
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exec_as_containerd_calls_it() {
        let o = parse(&[
            "agentfense-runc",
            "--root",
            "/r",
            "--log",
            "/l",
            "--log-format",
            "json",
            "exec",
            "--process",
            "/tmp/p.json",
            "--detach",
            "--pid-file",
            "/tmp/p.pid",
            "abc",
        ]);
        match o.cmd {
            Some(Command::Common(c)) => match *c {
                CommonCmd::Exec(e) => {
                    assert!(e.detach);
                    assert_eq!(e.process, Some(PathBuf::from("/tmp/p.json")));
                    assert_eq!(e.container_id, "abc");
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn delete_force() {
        let o = parse(&["agentfense-runc", "delete", "--force", "abc"]);
        assert!(matches!(o.cmd, Some(Command::Standard(_))));
    }

    #[test]
    fn unknown_flag_is_an_error_with_exit_1() {
        assert_eq!(
            main_with_args(["agentfense-runc", "--no-such-flag", "list"]),
            1
        );
    }

    #[test]
    fn bad_log_format_is_refused() {
        assert_eq!(
            main_with_args(["agentfense-runc", "--log-format", "xml", "list"]),
            1
        );
    }

    #[test]
    fn version_first_line_is_runc_shaped() {
        assert!(version_text().starts_with("agentfense-runc version "));
        assert_eq!(main_with_args(["agentfense-runc", "--version"]), 0);
    }
}

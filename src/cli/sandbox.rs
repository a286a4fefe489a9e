//! `agentfense-runc sandbox`: one fenced command, no engine (SPEC §7). Being written.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::runtime::Ctx;

/// `sandbox [--preset P | --policy FILE] [--delta MODE] [--audit LEVEL] [--id ID] DIR -- CMD...`
#[derive(clap::Args, Debug, Clone)]
pub struct SandboxArgs {
    /// A built-in preset (`agent-safe`, `read-only`, `full-access`, ...).
    #[arg(long, conflicts_with = "policy")]
    pub preset: Option<String>,
    /// A policy file (JSON, SPEC §3), or `-` for stdin.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
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
    /// The directory to fence at /workspace.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// Runs the command; returns its exit code.
pub fn run(args: SandboxArgs, ctx: &Ctx) -> Result<i32> {
    let _ = (args, ctx);
    bail!("sandbox is not written yet")
}

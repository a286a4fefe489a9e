//! `agentfense-runc configure docker|containerd|podman`: register the runtime (SPEC §7).
//! Being written.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// The engine to configure.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Containerd,
    Podman,
}

/// `configure ENGINE [--config FILE] [--name NAME] [--dry-run]`
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigureArgs {
    #[arg(value_enum)]
    pub engine: Engine,
    /// The engine's configuration file (default: the engine's usual path).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The runtime's name in the engine's configuration.
    #[arg(long, default_value = "agentfense")]
    pub name: String,
    /// Print the new configuration; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Edits the engine's configuration; returns the exit code.
pub fn run(args: ConfigureArgs) -> Result<i32> {
    let _ = args;
    bail!("configure is not written yet")
}

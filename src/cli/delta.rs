//! `agentfense-runc diff|commit|export|gc` (SPEC §5): settling a container's delta after the
//! fact. `ID` is a container id or a unique prefix of one, as with Docker.

use std::io::Write;

use anyhow::{bail, Context, Result};

use crate::config::AdminConfig;
use crate::lifecycle::{self, FenceRecord};

#[derive(clap::Args, Debug, Clone)]
pub struct IdArg {
    /// Container id, or a unique prefix of it.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// A fenced container's record, by id or unique prefix.
pub fn locate(admin: &AdminConfig, prefix: &str) -> Result<(String, FenceRecord)> {
    let id = crate::audit::resolve_id(&admin.state_dir, prefix)?;
    match lifecycle::read_record(admin, &id)? {
        Some(r) => Ok((id, r)),
        None => bail!("container {id} was not fenced (no fence record)"),
    }
}

/// `export ID`: the delta as an OCI layer tar on stdout.
pub fn export(args: IdArg, admin: &AdminConfig) -> Result<i32> {
    let (id, rec) = locate(admin, &args.id)?;
    if rec.delta == crate::policy::DeltaMode::Off {
        bail!("container {id} writes straight to its workspace (delta off): there is no delta to export");
    }
    // With each workspace's base and the container's policy: the layer deletes nothing the
    // policy hid from the container (as commit never does).
    let policy = crate::delta::record_policy(&rec)?;
    let ws: Vec<crate::delta::export::ExportWorkspace> = rec
        .workspaces
        .iter()
        .map(|w| crate::delta::export::ExportWorkspace {
            dest: w.dest.clone(),
            upper: w.upper.clone(),
            base: Some(w.base.clone()),
            policy: Some(policy.clone()),
        })
        .collect();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    crate::delta::export::export_layer(&ws, &mut out).with_context(|| format!("export {id}"))?;
    out.flush()?;
    Ok(0)
}

/// Output format of `diff` and `commit`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Lines for people and scripts: `A|C|D PATH`.
    #[default]
    Text,
    /// One JSON document.
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DiffArgs {
    /// Container id, or a unique prefix of it.
    #[arg(value_name = "ID")]
    pub id: String,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// `diff ID`: `A`/`C`/`D` lines, like `docker diff`.
pub fn diff(args: DiffArgs, admin: &AdminConfig) -> Result<i32> {
    let (id, rec) = locate(admin, &args.id)?;
    let changes = crate::delta::diff(&id, &rec)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match args.format {
        Format::Text => {
            for (k, p) in &changes {
                writeln!(out, "{} {p}", k.letter())?;
            }
        }
        Format::Json => {
            let v: Vec<_> = changes
                .iter()
                .map(|(k, p)| serde_json::json!({"kind": k.letter().to_string(), "path": p}))
                .collect();
            writeln!(out, "{}", serde_json::Value::Array(v))?;
        }
    }
    out.flush()?;
    Ok(0)
}

/// `commit ID`: apply a deleted container's delta to its base. Exit 0: everything landed;
/// 2: some paths conflicted (listed; they stay in the kept delta); 1: an error.
pub fn commit(args: DiffArgs, admin: &AdminConfig) -> Result<i32> {
    let (id, rec) = locate(admin, &args.id)?;
    let report = crate::delta::commit(admin, &id, &rec)?;
    print_report(&report, args.format)?;
    Ok(if report.conflicts.is_empty() { 0 } else { 2 })
}

/// Prints a commit report.
pub fn print_report(report: &crate::delta::commit::Report, format: Format) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match format {
        Format::Text => {
            let mut lines: Vec<(char, &String)> = Vec::new();
            lines.extend(report.added.iter().map(|p| ('A', p)));
            lines.extend(report.changed.iter().map(|p| ('C', p)));
            lines.extend(report.deleted.iter().map(|p| ('D', p)));
            lines.sort_by(|a, b| a.1.cmp(b.1));
            for (k, p) in lines {
                writeln!(out, "{k} {p}")?;
            }
            for c in &report.conflicts {
                writeln!(out, "conflict: {}: {}", c.path, c.reason)?;
            }
        }
        Format::Json => writeln!(out, "{}", serde_json::to_string(report)?)?,
    }
    out.flush()?;
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct GcArgs {
    /// Only containers deleted at least this long ago (`30s`, `15m`, `24h`, `7d`).
    #[arg(long, value_name = "DURATION")]
    pub older_than: Option<String>,
    /// Say what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also say why each kept container stays.
    #[arg(long, short)]
    pub verbose: bool,
}

/// `gc`: remove the state of fenced containers that no longer exist.
pub fn gc(args: GcArgs, admin: &AdminConfig) -> Result<i32> {
    let older = args
        .older_than
        .as_deref()
        .map(crate::delta::gc::parse_duration)
        .transpose()?;
    let verdicts = crate::delta::gc::gc(admin, older, args.dry_run)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for v in verdicts {
        if v.remove {
            let verb = if args.dry_run {
                "would remove"
            } else {
                "removed"
            };
            writeln!(out, "{verb} {}", v.id)?;
        } else if args.verbose {
            writeln!(out, "kept {}: {}", v.id, v.why)?;
        }
    }
    Ok(0)
}

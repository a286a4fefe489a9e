//! `agentfense-runc audit ID`, `audit summary ID`, `audit verify ID` (SPEC §6): a container's
//! audit trail for people, what it did in short, and whether its chain is intact.
//!
//! `ID` is a container id or a unique prefix of one, as with Docker.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::audit::{self, AuditDecision, AUDIT_FILE};
use crate::config::AdminConfig;

/// `audit`: `audit ID [--format F] [--decision D]` prints the trail; `audit summary ID` and
/// `audit verify ID` are subcommands. (A container named `summary` or `verify` is shown with
/// `audit -- NAME`.)
#[derive(clap::Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AuditArgs {
    /// `summary` or `verify`; without one, the trail is printed.
    #[command(subcommand)]
    pub cmd: Option<AuditCmd>,
    /// Printing the trail.
    #[command(flatten)]
    pub show: ShowArgs,
}

/// `audit ID`: print the trail.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ShowArgs {
    /// Container id, or a unique prefix of it.
    #[arg(value_name = "ID", required = true)]
    pub id: Option<String>,
    /// Output format: `text` for people, `json` for the records as written (JSON Lines).
    #[arg(long, value_enum, default_value_t = AuditFormat::Text)]
    pub format: AuditFormat,
    /// Only access records with this decision.
    #[arg(long, value_enum)]
    pub decision: Option<DecisionArg>,
}

/// The `audit` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum AuditCmd {
    /// What the container read, wrote, created, deleted, was refused, probed, and which
    /// granted paths it never touched (its latest run).
    Summary(SummaryArgs),
    /// Check the trail's hash chain: exit 0 with the record count, 1 naming the first bad line.
    Verify(VerifyArgs),
}

/// `audit summary ID`.
#[derive(clap::Args, Debug, Clone)]
pub struct SummaryArgs {
    /// Container id, or a unique prefix of it.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = AuditFormat::Text)]
    pub format: AuditFormat,
}

/// `audit verify ID`.
#[derive(clap::Args, Debug, Clone)]
pub struct VerifyArgs {
    /// Container id, or a unique prefix of it.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// Output format of `audit`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuditFormat {
    /// For people.
    #[default]
    Text,
    /// JSON.
    Json,
}

/// `--decision`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionArg {
    /// Allowed accesses.
    Allow,
    /// Refusals.
    Deny,
    /// Probes of hidden paths.
    Hidden,
}

impl From<DecisionArg> for AuditDecision {
    fn from(d: DecisionArg) -> AuditDecision {
        match d {
            DecisionArg::Allow => AuditDecision::Allow,
            DecisionArg::Deny => AuditDecision::Deny,
            DecisionArg::Hidden => AuditDecision::Hidden,
        }
    }
}

/// Runs `audit` with the process's standard output and error; returns the exit code.
pub fn run(args: AuditArgs, admin: &AdminConfig) -> anyhow::Result<i32> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    run_with(args, admin, &mut stdout.lock(), &mut stderr.lock())
}

/// The audit file of the container `prefix` names.
fn locate(admin: &AdminConfig, prefix: &str) -> anyhow::Result<(String, PathBuf)> {
    let id = audit::resolve_id(&admin.state_dir, prefix)?;
    let path = admin
        .state_dir
        .join("containers")
        .join(&id)
        .join(AUDIT_FILE);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => Ok((id, path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("container {id} has no audit trail (not fenced, or audit off)")
        }
        Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
}

fn read(path: &std::path::Path, id: &str, err: &mut dyn Write) -> anyhow::Result<audit::ReadLog> {
    let log =
        audit::read_log(path).with_context(|| format!("failed to read {}", path.display()))?;
    if !log.bad_lines.is_empty() {
        writeln!(
            err,
            "warning: {} line(s) of the audit trail are not records (first: line {}); run \
             `agentfense-runc audit verify {id}`",
            log.bad_lines.len(),
            log.bad_lines[0]
        )?;
    }
    Ok(log)
}

/// [`run`] with explicit streams (for tests).
pub fn run_with(
    args: AuditArgs,
    admin: &AdminConfig,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<i32> {
    match args.cmd {
        None => {
            let Some(prefix) = args.show.id.as_deref() else {
                bail!("audit: a container ID is required");
            };
            let (id, path) = locate(admin, prefix)?;
            let log = read(&path, &id, err)?;
            let want: Option<AuditDecision> = args.show.decision.map(Into::into);
            for r in &log.records {
                if let Some(d) = want {
                    if !r.is_access() || r.decision != Some(d) {
                        continue;
                    }
                }
                match args.show.format {
                    AuditFormat::Text => writeln!(out, "{}", audit::format_record(r))?,
                    AuditFormat::Json => writeln!(out, "{}", r.raw)?,
                }
            }
            Ok(0)
        }
        Some(AuditCmd::Summary(a)) => {
            let (id, path) = locate(admin, &a.id)?;
            let log = read(&path, &id, err)?;
            let s = audit::summary_from_log(&log.records)?;
            match a.format {
                AuditFormat::Text => out.write_all(audit::render_summary_text(&s).as_bytes())?,
                AuditFormat::Json => out.write_all(audit::render_summary_json(&s).as_bytes())?,
            }
            Ok(0)
        }
        Some(AuditCmd::Verify(a)) => {
            let (id, path) = locate(admin, &a.id)?;
            // A container whose fence was torn down must have its delete record last.
            let deleted = matches!(
                crate::lifecycle::read_record(admin, &id),
                Ok(Some(r)) if !r.live
            );
            let opts = audit::VerifyOptions {
                container: Some(&id),
                deleted,
            };
            match audit::verify_with(&path, &opts) {
                Ok(n) => {
                    writeln!(out, "{id}: {n} records, chain intact")?;
                    Ok(0)
                }
                Err(e) => {
                    writeln!(out, "{id}: audit trail damaged: {}: {e}", path.display())?;
                    Ok(1)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AccessRecord, AuditLog, Op};
    use crate::config::AuditOverflow;
    use crate::policy::{AuditLevel, DeltaMode, Policy, Preset};
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }
    #[derive(clap::Subcommand, Debug)]
    enum Top {
        Audit(AuditArgs),
    }

    fn parse(args: &[&str]) -> AuditArgs {
        let mut v = vec!["x", "audit"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v) {
            Ok(Cli { cmd: Top::Audit(a) }) => a,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn parsing() {
        let a = parse(&["abc", "--format", "json", "--decision", "deny"]);
        assert!(a.cmd.is_none());
        assert_eq!(a.show.id.as_deref(), Some("abc"));
        assert_eq!(a.show.format, AuditFormat::Json);
        assert_eq!(a.show.decision, Some(DecisionArg::Deny));
        let a = parse(&["summary", "abc", "--format", "json"]);
        match a.cmd {
            Some(AuditCmd::Summary(s)) => {
                assert_eq!(s.id, "abc");
                assert_eq!(s.format, AuditFormat::Json);
            }
            other => panic!("{other:?}"),
        }
        let a = parse(&["verify", "abc"]);
        assert!(matches!(a.cmd, Some(AuditCmd::Verify(v)) if v.id == "abc"));
        let a = parse(&["--", "summary"]);
        assert!(a.cmd.is_none());
        assert_eq!(a.show.id.as_deref(), Some("summary"));
        assert!(Cli::try_parse_from(["x", "audit"]).is_err());
        assert!(Cli::try_parse_from(["x", "audit", "verify"]).is_err());
        assert!(Cli::try_parse_from(["x", "audit", "a", "--decision", "maybe"]).is_err());
    }

    fn setup() -> (tempfile::TempDir, AdminConfig, String) {
        let dir = tempfile::tempdir().unwrap();
        let admin = AdminConfig {
            state_dir: dir.path().to_path_buf(),
            ..AdminConfig::default()
        };
        let id = "0123456789abcdef0123".to_string();
        let cdir = dir.path().join("containers").join(&id);
        std::fs::create_dir_all(&cdir).unwrap();
        std::fs::create_dir_all(dir.path().join("containers").join("fedcba")).unwrap();
        let path = cdir.join(AUDIT_FILE);
        let policy = Policy::preset(Preset::AgentSafe).unwrap();
        audit::append_lifecycle(
            &path,
            &id,
            "create",
            audit::create_info(
                &policy,
                &["/workspace".into()],
                DeltaMode::Keep,
                AuditLevel::All,
            ),
        )
        .unwrap();
        let log = AuditLog::open(&path, &id, AuditLevel::All, AuditOverflow::Count).unwrap();
        let mut r = AccessRecord::new(
            Op::Open,
            "/src/main.py",
            AuditDecision::Allow,
            Some(0),
            7,
            0,
        );
        r.mode = Some("read");
        r.bytes_read = Some(10);
        log.access(r);
        let mut r = AccessRecord::new(Op::Lookup, "/.env", AuditDecision::Hidden, Some(3), 7, 0);
        r.errno = Some("ENOENT");
        log.access(r);
        log.close();
        audit::append_delete(&path, &id, Some(0), serde_json::Value::Null).unwrap();
        (dir, admin, id)
    }

    fn run_args(admin: &AdminConfig, args: &[&str]) -> (i32, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run_with(parse(args), admin, &mut out, &mut err).unwrap();
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn show_summary_verify() {
        let (_d, admin, id) = setup();
        let (code, out, _) = run_args(&admin, &["0123"]);
        assert_eq!(code, 0);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(lines[0].contains("] 0123456789ab: Container created (policy sha256 "));
        assert!(lines[1].ends_with("] 0123456789ab: Read allowed: /src/main.py (10 bytes read)"));
        assert!(lines[2].ends_with(": Path hidden: /.env"));
        assert!(lines[3].ends_with(": Fence daemon stopped (0 records lost)"));
        assert!(lines[4].ends_with(
            ": Container deleted (exit status 0; 1 allowed, 0 denied, 1 hidden; 0 records lost)"
        ));
        let (_, out, _) = run_args(
            &admin,
            &["0123", "--decision", "hidden", "--format", "json"],
        );
        assert_eq!(out.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["path"], "/.env");

        let (code, out, _) = run_args(&admin, &["summary", &id]);
        assert_eq!(code, 0);
        assert!(
            out.contains("Read, 10 bytes (1):\n  /src/main.py\n"),
            "{out}"
        );
        assert!(out.contains("Probed hidden paths (1):\n  /.env\n"), "{out}");
        assert!(out.contains("/output/** (write, rule 1)"), "{out}");
        let (_, out, _) = run_args(&admin, &["summary", &id, "--format", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["read"][0], "/src/main.py");

        let (code, out, _) = run_args(&admin, &["verify", "01"]);
        assert_eq!(
            (code, out.trim()),
            (0, format!("{id}: 5 records, chain intact").as_str())
        );

        // Damage it: drop line 2.
        let path = admin
            .state_dir
            .join("containers")
            .join(&id)
            .join(AUDIT_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut ls: Vec<&str> = text.lines().collect();
        ls.remove(1);
        std::fs::write(&path, ls.join("\n") + "\n").unwrap();
        let (code, out, _) = run_args(&admin, &["verify", "01"]);
        assert_eq!(code, 1);
        assert!(out.contains("line 2: seq is 2, expected 1"), "{out}");
    }

    #[test]
    fn errors() {
        let (_d, admin, _id) = setup();
        let e = run_with(parse(&["zzz"]), &admin, &mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert_eq!(e.to_string(), "no container matches zzz");
        let e = run_with(parse(&["fedcba"]), &admin, &mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("has no audit trail"), "{e}");
        std::fs::create_dir_all(admin.state_dir.join("containers").join("0123x")).unwrap();
        let e = run_with(parse(&["012"]), &admin, &mut Vec::new(), &mut Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "012 is ambiguous: 0123456789abcdef0123, 0123x"
        );
    }
}

//! `agentfense-runc policy check|explain|describe` (SPEC §7): validate a policy, say which
//! rule decides a path and why, describe a policy for the person who must approve it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::AdminConfig;
use crate::policy::source::{admin_default_policy, resolve_policy};
use crate::policy::{EffectiveRule, Level, Policy, PolicyError, PolicyInputs, RuleType};

/// The `policy` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum PolicyCmd {
    /// Validate a policy: exit 0 if it can be used, 1 (printing every problem) if not.
    Check(CheckArgs),
    /// Say which rule decides each PATH (relative to the workspace root) and why.
    Explain(ExplainArgs),
    /// Describe a policy for the person who must approve it: what it may read, write, only
    /// list, and what will not exist for it.
    Describe(DescribeArgs),
}

/// Which policy: the same sources as the `agentfense.io/` annotations. Given together, the
/// policy's rules are added to the preset's or the named policy's. With none, the
/// administrator's default policy (if configured). The administrator's floor always applies.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PolicyInput {
    /// Policy JSON file (`-` for standard input): a rule array or
    /// {"preset": NAME, "rules": [...], "default": LEVEL}.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<String>,
    /// A preset: agent-safe, read-only, full-access, development, view-only.
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// A policy of the administrator's policy directory, by name.
    #[arg(long = "policy-name", value_name = "NAME")]
    pub policy_name: Option<String>,
}

/// `policy check`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CheckArgs {
    #[command(flatten)]
    pub input: PolicyInput,
}

/// Output format of `policy explain`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// For people.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `policy explain`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub input: PolicyInput,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Paths relative to the workspace root (`/src/main.rs` or `src/main.rs`).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<String>,
}

/// `policy describe`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DescribeArgs {
    #[command(flatten)]
    pub input: PolicyInput,
    /// Also sort the files of this directory (as the workspace) by what the policy allows.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// With --dir: how many example paths to show per group.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub examples: usize,
}

/// Runs a `policy` subcommand with the process's standard streams; returns the exit code.
pub fn run(cmd: PolicyCmd, admin: &AdminConfig) -> anyhow::Result<i32> {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    run_with(
        cmd,
        admin,
        &mut stdin.lock(),
        &mut stdout.lock(),
        &mut stderr.lock(),
    )
}

/// [`run`] with explicit streams (for tests).
pub fn run_with(
    cmd: PolicyCmd,
    admin: &AdminConfig,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<i32> {
    let input = match &cmd {
        PolicyCmd::Check(a) => &a.input,
        PolicyCmd::Explain(a) => &a.input,
        PolicyCmd::Describe(a) => &a.input,
    };
    let policy = match load(input, admin, stdin) {
        Ok(p) => p,
        Err(e) => {
            for m in e.messages() {
                writeln!(err, "error: {m}")?;
            }
            return Ok(1);
        }
    };
    match cmd {
        PolicyCmd::Check(_) => check(&policy, out),
        PolicyCmd::Explain(a) => explain(&policy, &a, out),
        PolicyCmd::Describe(a) => describe(&policy, &a, out),
    }
}

/// Builds the policy named by `input` (floor applied).
pub fn load(
    input: &PolicyInput,
    admin: &AdminConfig,
    stdin: &mut dyn Read,
) -> Result<Policy, PolicyError> {
    let text = match input.policy.as_deref() {
        None => None,
        Some("-") => {
            let mut s = String::new();
            stdin.read_to_string(&mut s).map_err(|e| {
                PolicyError::invalid(format!("cannot read the policy from standard input: {e}"))
            })?;
            Some(("<stdin>".to_string(), s))
        }
        Some(path) => {
            let s = std::fs::read_to_string(path).map_err(|e| {
                PolicyError::invalid(format!("cannot read the policy file {path}: {e}"))
            })?;
            Some((path.to_string(), s))
        }
    };
    let inputs = PolicyInputs {
        policy: text.as_ref().map(|(l, s)| (l.as_str(), s.as_str())),
        preset: input.preset.as_deref().map(|p| ("--preset", p)),
        policy_name: input.policy_name.as_deref().map(|n| ("--policy-name", n)),
    };
    if let Some(p) = resolve_policy(&inputs, admin, &|n| admin.read_named_policy(n))? {
        return Ok(p);
    }
    admin_default_policy(admin)?.ok_or_else(|| {
        PolicyError::invalid("no policy: give --policy FILE|-, --preset NAME or --policy-name NAME")
    })
}

fn check(policy: &Policy, out: &mut dyn Write) -> anyhow::Result<i32> {
    let n = policy.policy_rules().len();
    let mut line = format!(
        "policy OK: {n} rule{}, default {}",
        if n == 1 { "" } else { "s" },
        policy.default_level()
    );
    let f = policy.floor_rules().len();
    if f > 0 {
        line.push_str(&format!(
            ", plus {f} admin floor rule{}",
            if f == 1 { "" } else { "s" }
        ));
    }
    writeln!(out, "{line}")?;
    if policy.default_level() == Level::None
        && policy
            .policy_rules()
            .iter()
            .all(|r| r.rule.permission == Level::None)
    {
        writeln!(
            out,
            "warning: no rule grants anything: the workspace will look empty"
        )?;
    }
    Ok(0)
}

fn rule_json(policy: &Policy, i: usize) -> Value {
    match policy.rule(i) {
        Some(r) => json!({
            "index": i,
            "pattern": r.rule.pattern,
            "permission": r.rule.permission,
            "type": r.rule.kind,
            "priority": r.rule.priority,
            "origin": r.origin,
            "origin_index": r.origin_index,
        }),
        None => Value::Null,
    }
}

fn rule_text(r: &EffectiveRule) -> String {
    format!(
        "{} {} ({}, priority {}, {} rule {})",
        serde_json::Value::String(r.rule.pattern.clone()),
        r.rule.permission,
        r.rule.kind,
        r.rule.priority,
        r.origin,
        r.origin_index
    )
}

fn explain(policy: &Policy, args: &ExplainArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    for path in &args.paths {
        let e = policy.explain(path);
        match args.format {
            Format::Json => {
                let v = json!({
                    "path": e.path,
                    "permission": e.level,
                    "rule": e.rule.map_or(Value::Null, |i| rule_json(policy, i)),
                    "traversable": e.traversable,
                    "default": policy.default_level(),
                    "matches": e.policy.matches,
                    "floor": e.floor,
                    "summary": e.summary,
                });
                writeln!(out, "{v}")?;
            }
            Format::Text => {
                let shown = if e.traversable {
                    "none (as a directory: traversable, listed as view)".to_string()
                } else {
                    e.level.to_string()
                };
                writeln!(out, "{}: {shown}", e.path)?;
                let sides = std::iter::once(("policy", &e.policy))
                    .chain(e.floor.iter().map(|f| ("admin floor", f)));
                for (name, side) in sides {
                    if side.matches.is_empty() {
                        writeln!(
                            out,
                            "  {name}: no rule matches the path or an ancestor; default {}",
                            side.default
                        )?;
                    }
                    for m in &side.matches {
                        let r = policy.rule(m.index).map(rule_text).unwrap_or_default();
                        let verb = if m.decides { "decides" } else { "loses" };
                        writeln!(out, "  {name} rule {} {verb}: {r}: {}", m.index, m.why)?;
                    }
                }
                writeln!(out, "  {}", e.summary)?;
            }
        }
    }
    Ok(0)
}

/// What a level means, for people.
fn meaning(l: Level) -> &'static str {
    match l {
        Level::None => "will not exist (hidden)",
        Level::View => "may only list (names and metadata, not contents)",
        Level::Read => "may read",
        Level::Write => "may write (create, change, delete; changes go to a copy-on-write layer)",
    }
}

/// A rule's pattern in words, where a common form allows.
pub fn plain(kind: RuleType, pattern: &str) -> String {
    let p = pattern.trim_start_matches('/').trim_end_matches('/');
    let literal = |s: &str| !s.is_empty() && !s.contains(['*', '?', '[', ']', '{', '}', '\\']);
    match kind {
        RuleType::File => return format!("the path /{p}"),
        RuleType::Directory if p.is_empty() => return "everything".into(),
        RuleType::Directory => return format!("/{p} and everything in it"),
        RuleType::Glob => {}
    }
    if p.is_empty() || p.split('/').all(|s| s == "**") || p == "**/*" {
        return "everything".into();
    }
    if let Some(rest) = p.strip_prefix("**/") {
        if let Some(ext) = rest.strip_prefix("*.") {
            if literal(ext) {
                return format!("every *.{ext} file, at any depth");
            }
        }
        if let Some(name) = rest.strip_suffix("/**") {
            if literal(name) {
                return format!("every directory named {name}, at any depth, and everything in it");
            }
        }
        if let Some(prefix) = rest.strip_suffix('*') {
            if literal(prefix) {
                return format!("everything whose name starts with {prefix}, at any depth");
            }
        }
        if literal(rest) {
            return format!("everything named {rest}, at any depth");
        }
    }
    if let Some(base) = p.strip_suffix("/**") {
        if literal(base) {
            return format!("/{base} and everything in it");
        }
    }
    if literal(p) {
        return format!("/{p}");
    }
    format!("paths matching /{p}")
}

fn describe(policy: &Policy, args: &DescribeArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let n = policy.policy_rules().len();
    writeln!(
        out,
        "This policy has {n} rule{}.",
        if n == 1 { "" } else { "s" }
    )?;
    writeln!(
        out,
        "Where rules overlap, the higher-ranked one decides (see the precedence list below)."
    )?;
    let order = policy.policy_rules_by_rank();
    for level in [Level::None, Level::Write, Level::Read, Level::View] {
        let rules: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| policy.rules()[i].rule.permission == level)
            .collect();
        writeln!(out)?;
        let head = meaning(level);
        let mut chars = head.chars();
        let head = chars
            .next()
            .map(|c| c.to_uppercase().collect::<String>() + chars.as_str())
            .unwrap_or_default();
        writeln!(out, "{head}:")?;
        if rules.is_empty() {
            writeln!(out, "  (nothing)")?;
        }
        for i in rules {
            let r = &policy.rules()[i].rule;
            writeln!(
                out,
                "  - {} ({} {:?}, priority {})",
                plain(r.kind, &r.pattern),
                r.kind,
                r.pattern,
                r.priority
            )?;
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "Anything no rule covers: {} (default {}).",
        meaning(policy.default_level()),
        policy.default_level()
    )?;
    writeln!(
        out,
        "Where a rule grants something inside a hidden directory, the names of the directories on the way are listed; nothing else in them is."
    )?;
    if !policy.floor_rules().is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "Mandatory rules of the administrator (the policy cannot loosen them):"
        )?;
        for i in policy.floor_rules_by_rank() {
            let r = &policy.rules()[i].rule;
            writeln!(
                out,
                "  - {}: at most {} ({} {:?}, priority {})",
                plain(r.kind, &r.pattern),
                r.permission,
                r.kind,
                r.pattern,
                r.priority
            )?;
        }
    }
    writeln!(out)?;
    writeln!(out, "Precedence (highest first):")?;
    for (k, i) in order.iter().enumerate() {
        if let Some(r) = policy.rule(*i) {
            writeln!(out, "  {}. {}", k + 1, rule_text(r))?;
        }
    }
    if let Some(dir) = &args.dir {
        writeln!(out)?;
        describe_dir(policy, dir, args.examples, out)?;
    }
    Ok(0)
}

/// Most entries `describe --dir` looks at.
const MAX_WALK: usize = 200_000;

fn describe_dir(
    policy: &Policy,
    root: &Path,
    examples: usize,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    // Groups: write, read, view, listed-only directory (traversable), hidden.
    let names = [
        "May write",
        "May read",
        "May only list",
        "Directories listed only on the way to something visible",
        "Will not exist",
    ];
    let mut counts = [0usize; 5];
    let mut samples: [Vec<String>; 5] = Default::default();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    let mut seen = 0usize;
    let mut truncated = false;
    let mut unreadable = 0usize;
    while let Some((dir, rel)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(_) => {
                unreadable += 1;
                continue;
            }
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            seen += 1;
            if seen > MAX_WALK {
                truncated = true;
                break;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = format!("{rel}/{name}");
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let d = policy.decide(&path, is_dir);
            let g = match (d.level, d.traversable) {
                (Level::Write, _) => 0,
                (Level::Read, _) => 1,
                (Level::View, _) => 2,
                (Level::None, true) => 3,
                (Level::None, false) => 4,
            };
            counts[g] += 1;
            if samples[g].len() < examples {
                samples[g].push(if is_dir {
                    format!("{path}/")
                } else {
                    path.clone()
                });
            }
            if is_dir && d.visible() {
                stack.push((entry.path(), path));
            }
        }
        if truncated {
            break;
        }
    }
    writeln!(out, "In {} (as the workspace):", root.display())?;
    for g in 0..5 {
        writeln!(
            out,
            "  {}: {} entr{}",
            names[g],
            counts[g],
            if counts[g] == 1 { "y" } else { "ies" }
        )?;
        for s in &samples[g] {
            writeln!(out, "      {s}")?;
        }
        if counts[g] > samples[g].len() {
            writeln!(out, "      ...")?;
        }
    }
    writeln!(
        out,
        "  (the contents of hidden directories are not counted)"
    )?;
    if unreadable > 0 {
        writeln!(
            out,
            "  ({unreadable} director{} could not be read)",
            if unreadable == 1 { "y" } else { "ies" }
        )?;
    }
    if truncated {
        writeln!(out, "  (stopped after {MAX_WALK} entries)")?;
    }
    Ok(())
}

//! `agentfense-runc completions SHELL` and `agentfense-runc man [--dir DIR]`: shell completion
//! scripts and manual pages, generated from the command line's own definition (clap), so that
//! they name every command and flag the binary accepts, and nothing it does not.
//!
//! `make install` installs them under `$(PREFIX)/share`: `bash-completion/completions/`,
//! `zsh/site-functions/`, `fish/vendor_completions.d/`, and `man/man1/` (the main page and one
//! page per command, `agentfense-runc-create.1`, `agentfense-runc-policy-check.1`, ...).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_mangen::roff::{bold, italic, roman, Roff};
use clap_mangen::Man;

use super::Opts;

/// The program's name, as installed.
pub const BIN: &str = "agentfense-runc";

/// Commands of runc's command line (through liboci-cli) that this runtime does not support:
/// left out of the pages and completions. (`checkpointt` is liboci-cli's spelling.)
pub const UNSUPPORTED: &[&str] = &["checkpointt"];

/// `completions`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `man`.
#[derive(clap::Args, Debug, Clone)]
pub struct ManArgs {
    /// Write every page into DIR (agentfense-runc.1 and one page per command,
    /// agentfense-runc-create.1, agentfense-runc-policy-check.1, ...) instead of printing the
    /// main page.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// The command line as documented: the parser's own definition, with its version, without
/// its hidden commands and flags (the fence daemon's entry point, runc flags accepted and
/// ignored), what the runtime does not support, and clap's `help` command.
pub fn command() -> clap::Command {
    let mut cmd = Opts::command().version(env!("CARGO_PKG_VERSION"));
    for name in UNSUPPORTED {
        cmd = cmd.mut_subcommand(*name, |s| s.hide(true));
    }
    cmd.build();
    let mut cmd = visible(&cmd);
    cmd.build();
    cmd
}

/// A copy of the (built) command `cmd` with only what is not hidden. clap_complete offers
/// hidden commands and flags too, so they are left out of the copy rather than marked.
fn visible(cmd: &clap::Command) -> clap::Command {
    let mut c = clap::Command::new(cmd.get_name().to_string())
        .disable_help_flag(true)
        .disable_version_flag(true)
        .disable_help_subcommand(true)
        .visible_aliases(cmd.get_visible_aliases().map(str::to_string));
    if let Some(a) = cmd.get_about() {
        c = c.about(a.clone());
    }
    if let Some(a) = cmd.get_long_about() {
        c = c.long_about(a.clone());
    }
    if let Some(v) = cmd.get_version() {
        c = c.version(v.to_string());
    }
    let args: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .cloned()
        .collect();
    for g in cmd.get_groups() {
        if g.get_args().all(|id| args.iter().any(|a| a.get_id() == id)) {
            c = c.group(g.clone());
        }
    }
    c = c.args(args);
    for s in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        c = c.subcommand(visible(s));
    }
    c
}

/// Every documented command, depth first: (`display name`, command), the display name being
/// the page's name (`agentfense-runc-policy-check`). The root comes first.
pub fn documented(cmd: &clap::Command) -> Vec<(String, clap::Command)> {
    fn walk(cmd: &clap::Command, out: &mut Vec<(String, clap::Command)>) {
        let name = cmd
            .get_display_name()
            .unwrap_or_else(|| cmd.get_name())
            .to_string();
        out.push((name, cmd.clone()));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, out);
        }
    }
    let mut out = Vec::new();
    walk(cmd, &mut out);
    out
}

/// Writes the completion script for `shell`.
pub fn write_completions(shell: clap_complete::Shell, w: &mut dyn Write) -> std::io::Result<()> {
    let mut cmd = command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, BIN, &mut buf);
    if shell == clap_complete::Shell::Bash {
        // clap_complete (4.6.12, clap-rs/clap#6421) spells the state of a subcommand of a
        // hyphenated program two ways: the word loop sets `agentfense__runc__subcmd__policy`,
        // the arms test `agentfense__subcmd__runc__subcmd__policy`, so nothing after the first
        // word would complete. The arms are spelled as the loop spells them.
        let fixed = String::from_utf8_lossy(&buf).replace(
            "agentfense__subcmd__runc__subcmd__",
            "agentfense__runc__subcmd__",
        );
        buf = fixed.into_bytes();
    }
    w.write_all(&buf)
}

fn section(roff: &mut Roff, title: &str) {
    roff.control("SH", [title]);
}

fn para(roff: &mut Roff, text: &str) {
    roff.control("PP", [] as [&str; 0]);
    roff.text([roman(text)]);
}

/// A tagged paragraph: `tag` in bold, then `text`.
fn item(roff: &mut Roff, tag: &str, text: &str) {
    roff.control("TP", [] as [&str; 0]);
    roff.text([bold(tag)]);
    roff.text([roman(text)]);
}

/// What the main page says beyond the flags: how containers ask for fencing, the levels,
/// where state lives, exit status, and where to read more.
fn main_page_extra(roff: &mut Roff) {
    section(roff, "FENCING");
    para(
        roff,
        "A container asks for fencing with OCI annotations (docker run --annotation from \
         Docker 24, ctr run --annotation, nerdctl and podman run --annotation, Kubernetes pod \
         annotations let through by the containerd runtime handler), or, for Docker before \
         24, with the same keys as environment variables, which are removed from the \
         container's environment. A container that asks for nothing runs unfenced, exactly as \
         under youki. A request that cannot be honoured (a policy that does not parse, an \
         unknown preset, level or key) stops the create: a container never runs unfenced by \
         mistake.",
    );
    for (ann, env, what) in [
        (
            "agentfense.io/policy",
            "AGENTFENSE_POLICY",
            "inline JSON: a rule array, or {\"preset\": NAME, \"rules\": [...], \"default\": LEVEL}",
        ),
        (
            "agentfense.io/preset",
            "AGENTFENSE_PRESET",
            "agent-safe, read-only, full-access, development or view-only",
        ),
        (
            "agentfense.io/policy-name",
            "AGENTFENSE_POLICY_NAME",
            "a policy file in the administrator's policy directory (/etc/agentfense/policies)",
        ),
        (
            "agentfense.io/workspace",
            "AGENTFENSE_WORKSPACE",
            "comma-separated container paths to fence (default /workspace)",
        ),
        (
            "agentfense.io/delta",
            "AGENTFENSE_DELTA",
            "keep (default), commit, discard, or off (writes go straight to the host)",
        ),
        (
            "agentfense.io/audit",
            "AGENTFENSE_AUDIT",
            "all (default), write, deny or off",
        ),
    ] {
        item(roff, &format!("{ann}, {env}"), what);
    }
    para(
        roff,
        "A rule is {\"pattern\": GLOB, \"permission\": LEVEL, \"priority\": N}. Levels: none \
         (the path does not exist: ENOENT), view (listed, metadata readable, contents not: \
         EACCES), read, write (copy-on-write into the container's delta). Check a policy with \
         agentfense-runc policy check, see which rule decides a path with policy explain.",
    );
    section(roff, "FILES");
    item(
        roff,
        "/var/lib/agentfense/containers/ID/",
        "per-container state: fence.json, the delta (upper/), the audit trail (audit.jsonl).",
    );
    item(
        roff,
        "/etc/agentfense/policies/",
        "named policies (agentfense.io/policy-name).",
    );
    item(
        roff,
        "/run/agentfense-runc/",
        "runtime state of containers (the --root default).",
    );
    roff.control("TP", [] as [&str; 0]);
    roff.text([italic("FILE"), roman(" given with --agentfense-config")]);
    roff.text([roman(
        "the administrator's settings (JSON): state_dir, policy_dir, default_policy, floor, \
         default_delta, default_audit, audit_overflow.",
    )]);
    section(roff, "EXIT STATUS");
    para(
        roff,
        "0 on success and 1 on error, as runc; run and exec exit with the container process's \
         status (128 + signal when a signal ended it); commit exits 2 when there were \
         conflicts; sandbox exits 125, 126 or 127 when it could not run the command.",
    );
}

fn see_also(roff: &mut Roff, page: &str) {
    section(roff, "SEE ALSO");
    let mut refs: Vec<String> = Vec::new();
    if page != BIN {
        refs.push(format!("{BIN}(1)"));
    }
    refs.extend(
        ["runc(8)", "docker-run(1)", "podman-run(1)", "ctr(8)"]
            .iter()
            .map(|s| s.to_string()),
    );
    roff.text([roman(refs.join(", "))]);
    para(
        roff,
        "README.md of agentfense-runc: install, a quick start for each engine, recipes, the \
         policy reference, audit format and troubleshooting.",
    );
}

/// Renders one page: the main page (with [`main_page_extra`]) or a command's.
pub fn render_page(name: &str, cmd: &clap::Command, w: &mut dyn Write) -> std::io::Result<()> {
    let man = Man::new(cmd.clone())
        .title(name.to_uppercase())
        .source(format!("{BIN} {}", env!("CARGO_PKG_VERSION")))
        .manual("agentfense-runc manual");
    let mut extra = Roff::default();
    if name == BIN {
        man.render_title(w)?;
        man.render_name_section(w)?;
        man.render_synopsis_section(w)?;
        man.render_description_section(w)?;
        man.render_options_section(w)?;
        man.render_subcommands_section(w)?;
        main_page_extra(&mut extra);
        man.render_version_section(w)?;
    } else {
        man.render(w)?;
    }
    see_also(&mut extra, name);
    extra.to_writer(w)
}

/// Writes every page into `dir`; returns the files written.
pub fn write_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut out = Vec::new();
    for (name, cmd) in documented(&command()) {
        let path = dir.join(format!("{name}.1"));
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&path)
                .with_context(|| format!("failed to create {}", path.display()))?,
        );
        render_page(&name, &cmd, &mut f)
            .and_then(|_| f.flush())
            .with_context(|| format!("failed to write {}", path.display()))?;
        out.push(path);
    }
    Ok(out)
}

/// `agentfense-runc completions SHELL`.
pub fn completions(args: &CompletionsArgs) -> Result<i32> {
    let mut buf = Vec::new();
    write_completions(args.shell, &mut buf)?;
    write_stdout(&buf)
}

/// `agentfense-runc man [--dir DIR]`.
pub fn man(args: &ManArgs) -> Result<i32> {
    match &args.dir {
        Some(dir) => {
            write_pages(dir)?;
            Ok(0)
        }
        None => {
            let mut buf = Vec::new();
            render_page(BIN, &command(), &mut buf)?;
            write_stdout(&buf)
        }
    }
}

fn write_stdout(buf: &[u8]) -> Result<i32> {
    let mut out = std::io::stdout().lock();
    match out.write_all(buf).and_then(|_| out.flush()) {
        Ok(()) => Ok(0),
        // `agentfense-runc man | head`: not an error worth a message.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(e).context("failed to write to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command a user can type, from the parser's definition (not from [`command`]):
    /// `(path of names, e.g. ["policy", "check"])`, hidden commands, clap's `help` and the
    /// unsupported ones left out.
    fn all_commands() -> Vec<Vec<String>> {
        fn walk(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<Vec<String>>) {
            for s in cmd.get_subcommands() {
                let name = s.get_name().to_string();
                if s.is_hide_set() || name == "help" || UNSUPPORTED.contains(&name.as_str()) {
                    continue;
                }
                let mut p = path.clone();
                p.push(name);
                out.push(p.clone());
                walk(s, p, out);
            }
        }
        let mut cmd = Opts::command();
        cmd.build();
        let mut out = Vec::new();
        walk(&cmd, Vec::new(), &mut out);
        out
    }

    #[test]
    fn the_definition_has_the_commands_users_rely_on() {
        let top: Vec<String> = all_commands()
            .into_iter()
            .filter(|p| p.len() == 1)
            .map(|p| p[0].clone())
            .collect();
        for c in [
            "create",
            "start",
            "state",
            "kill",
            "delete",
            "exec",
            "run",
            "spec",
            "policy",
            "audit",
            "sandbox",
            "configure",
            "gc",
            "completions",
            "man",
        ] {
            assert!(top.iter().any(|t| t == c), "{c} missing from {top:?}");
        }
        assert!(!top.iter().any(|t| t == "fence-daemon"));
        assert!(all_commands().contains(&vec!["policy".into(), "check".into()]));
    }

    #[test]
    fn one_page_per_command_and_the_main_page_lists_them() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_pages(dir.path()).unwrap();
        let mut names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected: Vec<String> = all_commands()
            .iter()
            .map(|p| format!("{BIN}-{}.1", p.join("-")))
            .collect();
        expected.push(format!("{BIN}.1"));
        expected.sort();
        assert_eq!(names, expected);

        let main = std::fs::read_to_string(dir.path().join(format!("{BIN}.1"))).unwrap();
        for p in all_commands().iter().filter(|p| p.len() == 1) {
            // clap_mangen lists each command as `agentfense-runc-NAME(1)`, `-` escaped.
            let r = format!("{BIN}-{}(1)", p[0]).replace('-', "\\-");
            assert!(main.contains(&r), "main page does not list {r}");
        }
        for s in [
            "FENCING",
            "FILES",
            "EXIT STATUS",
            "SEE ALSO",
            "agentfense.io/preset",
        ] {
            assert!(main.contains(s), "main page lacks {s}");
        }
        assert!(!main.contains("fence\\-daemon"));
        let check =
            std::fs::read_to_string(dir.path().join(format!("{BIN}-policy-check.1"))).unwrap();
        assert!(check.contains("\\-\\-policy"), "{check}");
        assert!(check.contains("agentfense\\-runc(1)"), "{check}");
        assert!(check.contains(&format!("\"{BIN} {}\"", env!("CARGO_PKG_VERSION"))));
    }

    fn script(shell: clap_complete::Shell) -> String {
        let mut buf = Vec::new();
        write_completions(shell, &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn completions_name_every_command() {
        use clap_complete::Shell;
        let bash = script(Shell::Bash);
        let zsh = script(Shell::Zsh);
        let fish = script(Shell::Fish);
        assert!(bash.contains("complete -F _agentfense__runc "), "{bash}");
        assert!(zsh.starts_with("#compdef agentfense-runc"), "{zsh}");
        for path in all_commands() {
            let last = path.last().unwrap();
            // bash: a case for the command's word (`agentfense__runc__subcmd__policy,check)`)
            // and the word among those offered (`opts="... check ..."`); zsh:
            // `'NAME:description'`; fish: `-a "NAME"`.
            assert!(
                bash.contains(&format!(",{last})")),
                "bash lacks a case for {last}"
            );
            assert!(
                bash.lines()
                    .filter(|l| l.trim_start().starts_with("opts=\""))
                    .any(|l| l.trim().trim_end_matches('"').split(' ').any(|w| w == last)),
                "bash does not offer {last}"
            );
            assert!(zsh.contains(&format!("'{last}:")), "zsh lacks {last}");
            assert!(
                fish.contains(&format!("-a \"{last}\"")),
                "fish lacks {last}"
            );
        }
        // Every state the word loop can set has an arm (clap-rs/clap#6421 worked around).
        let set: Vec<&str> = bash
            .lines()
            .filter_map(|l| l.trim().strip_prefix("cmd=\""))
            .map(|l| l.trim_end_matches('"'))
            .filter(|c| !c.is_empty())
            .collect();
        assert!(set.len() > all_commands().len(), "{set:?}");
        for state in set {
            assert!(
                bash.contains(&format!("\n        {state})\n")),
                "no arm for {state}"
            );
        }
        // runc's global `--rootless` is accepted and ignored (hidden); `spec --rootless` is
        // a flag of its own.
        let root_opts = bash
            .lines()
            .find(|l| l.contains("opts=\"") && l.contains(" create "))
            .unwrap();
        assert!(!root_opts.contains("--rootless"), "{root_opts}");
        for s in [bash.as_str(), zsh.as_str(), fish.as_str()] {
            for hidden in ["fence-daemon", "checkpointt", "--criu"] {
                assert!(!s.contains(hidden), "{hidden} is offered");
            }
        }
    }
}

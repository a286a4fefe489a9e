"""Shell completions and manual pages, as `make install` installs them.

The commands they must cover are read from the binary's own `--help` (the clap definition),
recursively: every command has a man page, the main page lists every top-level command, and
bash, with the installed completion script sourced the way bash-completion sources it,
completes each command from a prefix and a command's flags after it.
"""

import re
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, REPO, sh

# runc's `checkpoint` (liboci-cli spells it `checkpointt`) is not supported: not documented.
UNSUPPORTED = {"checkpointt", "help"}


def commands(path=()):
    """Every command path under `path`, from the binary's help: [("create",), ("policy",
    "check"), ...]."""
    out = sh([BIN, *path, "--help"], check=True).stdout
    if "\nCommands:\n" not in out:
        return []
    block = out.split("\nCommands:\n", 1)[1].split("\n\n", 1)[0]
    found = []
    for line in block.splitlines():
        m = re.match(r"^  (\S+)", line)
        if m and m.group(1) not in UNSUPPORTED:
            p = (*path, m.group(1))
            found.append(p)
            found += commands(p)
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory, agentfense_bin):
    """`make install` into a DESTDIR, with PREFIX=/usr, from the binary under test (the build
    step is taken as done: the suite runs against AGENTFENSE_BIN)."""
    dest = tmp_path_factory.mktemp("destdir")
    p = sh(["make", "-C", REPO, "-o", "build", "install", f"DESTDIR={dest}", "PREFIX=/usr",
            f"BIN={agentfense_bin}"], timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return dest / "usr"


def test_every_command_has_a_man_page(installed):
    man1 = installed / "share" / "man" / "man1"
    pages = sorted(p.name for p in man1.iterdir())
    cmds = commands()
    assert len([c for c in cmds if len(c) == 1]) >= 25, cmds
    expected = sorted(["agentfense-runc.1"] + ["-".join(("agentfense-runc", *c)) + ".1"
                                               for c in cmds])
    assert pages == expected
    assert (installed / "bin" / "agentfense-runc").is_file()


def render(page):
    p = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                       env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert p.returncode == 0, p.stderr
    # groff only warns that it could not justify a line holding a long URL.
    problems = [l for l in p.stderr.splitlines() if "cannot adjust line" not in l]
    assert not problems, problems
    return re.sub(r".\x08", "", p.stdout)


def test_man_pages_render_and_name_every_command(installed):
    man1 = installed / "share" / "man" / "man1"
    main = render(man1 / "agentfense-runc.1")
    listed = set(re.findall(r"agentfense-runc-([a-z-]+)\(1\)", main))
    assert listed == {c[0] for c in commands() if len(c) == 1}
    for section in ("SYNOPSIS", "OPTIONS", "SUBCOMMANDS", "FENCING", "FILES", "EXIT STATUS",
                    "SEE ALSO"):
        assert re.search(rf"^{section}$", main, re.M), section
    assert "--agentfense-config" in main and "agentfense.io/preset" in main
    check = render(man1 / "agentfense-runc-policy-check.1")
    assert "agentfense-runc policy check" in check and "--policy" in check, check
    sandbox = render(man1 / "agentfense-runc-sandbox.1")
    assert "--preset" in sandbox and "--delta" in sandbox, sandbox
    # `man` finds them by name once installed under a manpath.
    p = subprocess.run(["man", "-M", str(installed / "share" / "man"), "-w", "agentfense-runc"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip().endswith("agentfense-runc.1"), p


def complete(script, words):
    """COMPREPLY of the installed bash completion for the command line `words` (the last word
    being completed), calling the function `complete -p` names as bash would."""
    prog = f"""
source {script}
spec=$(complete -p agentfense-runc) || exit 3
fn=$(sed -E 's/.* -F ([^ ]+) .*/\\1/' <<<"$spec")
COMP_WORDS=({" ".join(repr(w) for w in words)})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="${{COMP_WORDS[*]}}"
COMP_POINT=${{#COMP_LINE}}
prev=""; [ $COMP_CWORD -gt 0 ] && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
"$fn" agentfense-runc "${{COMP_WORDS[COMP_CWORD]}}" "$prev"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    p = subprocess.run(["bash", "--norc", "--noprofile", "-c", prog], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    return [l for l in p.stdout.splitlines() if l]


def test_bash_completes_commands_and_their_flags(installed):
    script = installed / "share" / "bash-completion" / "completions" / "agentfense-runc"
    assert script.is_file()
    top = [c[0] for c in commands() if len(c) == 1]
    # Every command, from its first three letters.
    for c in top:
        got = complete(script, ["agentfense-runc", c[:3]])
        assert c in got, (c, got)
        assert all(g.startswith(c[:3]) for g in got), got
    # All of them, and nothing hidden, from nothing.
    offered = {w for w in complete(script, ["agentfense-runc", ""]) if not w.startswith("-")}
    assert offered == set(top)
    assert complete(script, ["agentfense-runc", "cre"]) == ["create"]
    # Nested commands and a command's own flags.
    for c in [c for c in commands() if len(c) == 2]:
        got = complete(script, ["agentfense-runc", c[0], c[1][:2]])
        assert c[1] in got, (c, got)
    assert "--preset" in complete(script, ["agentfense-runc", "sandbox", "--pre"])
    assert complete(script, ["agentfense-runc", "policy", "check", "--policy-n"]) == \
        ["--policy-name"]
    # runc's global flags first, as engines write them.
    assert complete(script, ["agentfense-runc", "--root", "/run/x", "del"]) == ["delete"]


@pytest.mark.parametrize("shell,check", [("zsh", ["zsh", "-n"]), ("fish", ["fish", "-n"])])
def test_zsh_and_fish_scripts_parse(installed, shell, check):
    script = {
        "zsh": installed / "share" / "zsh" / "site-functions" / "_agentfense-runc",
        "fish": installed / "share" / "fish" / "vendor_completions.d" / "agentfense-runc.fish",
    }[shell]
    text = script.read_text()
    for c in commands():
        assert c[-1] in text, (shell, c)
    if shutil.which(shell) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{shell} is missing in CI (integration/host.sh install adds it)")
        pytest.skip(f"{shell} is not installed: the script's syntax is not checked "
                    f"(apt-get install {shell})")
    p = subprocess.run([*check, str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    if shell == "fish":
        # fish can be asked what it would complete.
        def fish_complete(line):
            p = sh(["fish", "--no-config", "-c", f"source {script}; complete -C '{line}'"],
                   check=True)
            return [l.split("\t")[0] for l in p.stdout.splitlines()]
        top = [c[0] for c in commands() if len(c) == 1]
        assert set(fish_complete("agentfense-runc ")) >= set(top)
        assert fish_complete("agentfense-runc cre") == ["create"]
        assert fish_complete("agentfense-runc policy check --pre") == ["--preset"]

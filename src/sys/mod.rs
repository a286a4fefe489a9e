//! The only place for `unsafe` and raw system interfaces. Each block says why it is sound.

pub mod fs;

/// Protects against CVE-2019-5736: a container process that can see the runtime's binary
/// through `/proc/<pid>/exe` must not be able to overwrite it. Before anything else the runtime
/// copies itself into a sealed memfd and re-executes from there (what runc and youki do).
pub fn ensure_sealed() -> std::io::Result<()> {
    pentacle::ensure_sealed()
}

/// Whether a command line (without the program name) needs the sealed copy: everything that
/// may start a container's processes or enter a container (`create`, `run`, `exec`, `sandbox`,
/// hooks, anything not recognised) does. Copying the binary costs about 12 ms per
/// invocation, and an engine calls the runtime several times per container (`state`,
/// `start`, `kill`, `delete`): those only read state, signal or clean up from the host,
/// and never execute inside a container, as with runc.
pub fn needs_sealed_copy<I, S>(args: I) -> bool
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    const HOST_ONLY: &[&str] = &[
        "state",
        "start",
        "kill",
        "delete",
        "list",
        "ps",
        "events",
        "pause",
        "resume",
        "features",
        "spec",
        "audit",
        "policy",
        "completions",
        "man",
    ];
    // runc's global flags that take a value (and ours); `--flag=value` needs no skipping.
    const VALUED: &[&str] = &[
        "--log",
        "-l",
        "--log-format",
        "--root",
        "-r",
        "--criu",
        "--rootless",
        "--agentfense-config",
    ];
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let Some(a) = a.as_ref().to_str() else {
            return true;
        };
        if a.starts_with('-') {
            if VALUED.contains(&a) {
                it.next();
            }
            continue;
        }
        return !HOST_ONLY.contains(&a);
    }
    // No subcommand: help or version.
    false
}

/// The environment variable in which the runtime passes its own on-disk path to its sealed
/// copy.
pub const EXE_ENV: &str = "AGENTFENSE_RUNTIME_EXE";

/// The binary fence daemons are started from: the runtime's file on disk when known, else
/// `/proc/self/exe` (the sealed copy).
///
/// A daemon runs on the host, outside every container's mount and PID namespaces, and never
/// executes anything a container controls, so the sealed copy (which protects the runtime
/// while it enters a container) buys it nothing; run from the on-disk file, the kernel shares
/// its pages among all daemons, where each sealed copy would cost a private copy of the
/// binary (about 12 MiB) per fenced workspace. The daemon itself does not re-seal either.
pub fn daemon_exe() -> std::path::PathBuf {
    std::env::var_os(EXE_ENV)
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_file())
        .unwrap_or_else(|| std::path::PathBuf::from("/proc/self/exe"))
}

/// Whether the running binary is the sealed copy.
pub fn is_sealed() -> bool {
    pentacle::is_sealed()
}

#[cfg(test)]
mod tests {
    use super::needs_sealed_copy;

    fn seal(line: &str) -> bool {
        needs_sealed_copy(line.split_whitespace())
    }

    #[test]
    fn only_host_side_commands_skip_the_sealed_copy() {
        // What containerd's shim runs per container.
        assert!(seal("--root /run/containerd/runc/moby --log /x/log.json --log-format json create --bundle /b id"));
        assert!(!seal(
            "--root /run/containerd/runc/moby --log /x/log.json --log-format json start id"
        ));
        assert!(!seal(
            "--root /r --log /l --log-format json delete --force id"
        ));
        assert!(!seal("--root /r state id"));
        assert!(!seal("--root=/r --systemd-cgroup kill id 9"));
        assert!(seal(
            "--root /r --log /l --log-format json exec --process /p.json id"
        ));
        assert!(seal("run --bundle /b id"));
        assert!(seal(
            "--agentfense-config /etc/agentfense/c.json --root /r create id"
        ));
        assert!(!seal(
            "--agentfense-config /etc/agentfense/c.json --root /r delete id"
        ));
        // A flag's value is never taken for the command; the unknown is sealed.
        assert!(seal("--root state create id"));
        assert!(seal("sandbox -- sh"));
        assert!(seal("hook prestart"));
        assert!(seal("something-new id"));
        assert!(!seal("--version"));
        assert!(!seal("policy check p.json"));
    }
}

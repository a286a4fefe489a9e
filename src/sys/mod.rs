//! The only place for `unsafe` and raw system interfaces. Each block says why it is sound.

pub mod fs;

/// Protects against CVE-2019-5736: a container process that can see the runtime's binary
/// through `/proc/<pid>/exe` must not be able to overwrite it. Before anything else the runtime
/// copies itself into a sealed memfd and re-executes from there (what runc and youki do).
pub fn ensure_sealed() -> std::io::Result<()> {
    pentacle::ensure_sealed()
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

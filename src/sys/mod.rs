//! The only place for `unsafe` and raw system interfaces. Each block says why it is sound.

pub mod fs;

/// Protects against CVE-2019-5736: a container process that can see the runtime's binary
/// through `/proc/<pid>/exe` must not be able to overwrite it. Before anything else the runtime
/// copies itself into a sealed memfd and re-executes from there (what runc and youki do).
pub fn ensure_sealed() -> std::io::Result<()> {
    pentacle::ensure_sealed()
}

/// Whether the running binary is the sealed copy.
pub fn is_sealed() -> bool {
    pentacle::is_sealed()
}

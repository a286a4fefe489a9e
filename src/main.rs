//! agentfense-runc's entry point: seal, then hand argv to the CLI.

fn main() {
    let daemon = std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "fence-daemon");
    if !daemon {
        // Remember where the binary is on disk: fence daemons are started from there rather
        // than from the sealed copy (see `agentfense::sys::daemon_exe`).
        if std::env::var_os(agentfense::sys::EXE_ENV).is_none() {
            if let Ok(p) = std::env::current_exe() {
                std::env::set_var(agentfense::sys::EXE_ENV, p);
            }
        }
        // First thing, before parsing anything: re-execute from a sealed copy (CVE-2019-5736),
        // for every command that may run inside a container or start its processes.
        // Once more if that fails (a transient failure to copy the binary must not fail a
        // container start); then the error goes where the engine reads it, the --log file,
        // not only to stderr (which containerd hands to the container's stdio).
        let sealed = if agentfense::sys::needs_sealed_copy(std::env::args_os().skip(1)) {
            agentfense::sys::ensure_sealed().or_else(|_| agentfense::sys::ensure_sealed())
        } else {
            Ok(())
        };
        if let Err(e) = sealed {
            let msg = format!("failed to seal /proc/self/exe: {e}");
            agentfense::logging::report_early_failure(std::env::args_os(), &msg);
            eprintln!("{msg}");
            std::process::exit(1);
        }
    }
    std::process::exit(agentfense::cli::main_with_args(std::env::args_os()));
}

//! agentfense-runc's entry point: seal, then hand argv to the CLI.

fn main() {
    // First thing, before parsing anything: re-execute from a sealed copy (CVE-2019-5736).
    if let Err(e) = agentfense::sys::ensure_sealed() {
        eprintln!("failed to seal /proc/self/exe: {e}");
        std::process::exit(1);
    }
    std::process::exit(agentfense::cli::main_with_args(std::env::args_os()));
}

//! The container's workload: libcontainer's default executor, with runc's wording when the
//! program cannot be run.
//!
//! The check runs inside the container (after pivot_root), before the start signal, so a
//! missing program fails `create` as under runc, and with runc's words, which engines rely on:
//! Docker's CLI turns "no such file or directory" and "executable file not found" into exit
//! code 127 and "permission denied" into 126; anything else is 125.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};

/// Runs the container's process; validates it the way runc does.
#[derive(Clone, Default)]
pub struct RuncExecutor;

/// What a file system lookup of a candidate program found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Missing,
    NotExecutable,
    Executable,
}

/// Checks one path in the container's file system.
pub fn probe(path: &Path) -> Probe {
    match std::fs::metadata(path) {
        Err(_) => Probe::Missing,
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Probe::Executable,
        Ok(_) => Probe::NotExecutable,
    }
}

/// Resolves `arg0` as `execvp` would and returns runc's error text when it cannot be run.
/// `path_env` is the process's `PATH` (None when unset).
pub fn check_program(
    arg0: &str,
    path_env: Option<&str>,
    probe: &dyn Fn(&Path) -> Probe,
) -> Result<(), String> {
    if arg0.is_empty() {
        return Err("exec: \"\": executable file not found in $PATH".to_string());
    }
    if arg0.contains('/') {
        return match probe(Path::new(arg0)) {
            Probe::Executable => Ok(()),
            Probe::Missing => Err(format!(
                "exec: \"{arg0}\": stat {arg0}: no such file or directory"
            )),
            Probe::NotExecutable => Err(format!("exec: \"{arg0}\": permission denied")),
        };
    }
    let mut denied = false;
    for dir in path_env.unwrap_or("").split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        match probe(&Path::new(dir).join(arg0)) {
            Probe::Executable => return Ok(()),
            Probe::NotExecutable => denied = true,
            Probe::Missing => {}
        }
    }
    if denied {
        Err(format!("exec: \"{arg0}\": permission denied"))
    } else {
        Err(format!(
            "exec: \"{arg0}\": executable file not found in $PATH"
        ))
    }
}

impl Executor for RuncExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let Some(process) = spec.process() else {
            return Err(ExecutorValidationError::ArgValidationError(
                "spec did not contain process".into(),
            ));
        };
        let Some(arg0) = process.args().as_ref().and_then(|a| a.first()) else {
            return Err(ExecutorValidationError::ArgValidationError(
                "args must not be empty".into(),
            ));
        };
        let path_env = process
            .env()
            .as_ref()
            .and_then(|env| env.iter().find_map(|e| e.strip_prefix("PATH=")));
        check_program(arg0, path_env, &probe).map_err(ExecutorValidationError::ArgValidationError)
    }
}

/// Rewrites libcontainer's wrapping of a failed start into runc's ("unable to start container
/// process: ..."), keeping the cause as it is.
pub fn runc_create_error(msg: &str) -> String {
    const MARK: &str = "error in executing process : ";
    match msg.find(MARK) {
        Some(i) => format!(
            "unable to start container process: {}",
            &msg[i + MARK.len()..]
        ),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(path: &Path) -> Probe {
        match path.to_str().unwrap_or("") {
            "/bin/sh" | "/usr/bin/env" => Probe::Executable,
            "/etc/passwd" | "/bin/data" | "/tmp" => Probe::NotExecutable,
            _ => Probe::Missing,
        }
    }

    #[test]
    fn absolute_paths() {
        assert_eq!(check_program("/bin/sh", None, &fs), Ok(()));
        assert_eq!(
            check_program("/nonexistent", Some("/bin"), &fs).unwrap_err(),
            "exec: \"/nonexistent\": stat /nonexistent: no such file or directory"
        );
        assert_eq!(
            check_program("/etc/passwd", None, &fs).unwrap_err(),
            "exec: \"/etc/passwd\": permission denied"
        );
        assert_eq!(
            check_program("/tmp", None, &fs).unwrap_err(),
            "exec: \"/tmp\": permission denied"
        );
    }

    #[test]
    fn path_search() {
        assert_eq!(check_program("sh", Some("/usr/bin:/bin"), &fs), Ok(()));
        assert_eq!(check_program("env", Some("/usr/bin:/bin"), &fs), Ok(()));
        assert_eq!(
            check_program("nope", Some("/usr/bin:/bin"), &fs).unwrap_err(),
            "exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(
            check_program("sh", None, &fs).unwrap_err(),
            "exec: \"sh\": executable file not found in $PATH"
        );
        assert_eq!(
            check_program("data", Some("/bin"), &fs).unwrap_err(),
            "exec: \"data\": permission denied"
        );
    }

    #[test]
    fn create_error_is_runc_worded() {
        let lc = "failed to create container: exec process failed with error error in \
                  executing process : exec: \"/x\": stat /x: no such file or directory";
        assert_eq!(
            runc_create_error(lc),
            "unable to start container process: exec: \"/x\": stat /x: no such file or directory"
        );
        assert_eq!(runc_create_error("other"), "other");
    }
}

//! `agentfense-runc hook STAGE`: fencing for stock runc or crun under podman, as OCI hooks
//! (see hooks/).
//!
//! - `precreate` (a podman extension stage): podman hands the hook the container's proposed
//!   OCI spec on stdin and uses what the hook prints on stdout instead. If the spec asks for
//!   fencing (SPEC §2), the fences are started as `create` would ([`lifecycle::prepare_spec`])
//!   and the spec printed with the workspaces mounted from them, its `agentfense.io/`
//!   annotations and `AGENTFENSE_*` variables removed (so that a runtime that fences by
//!   itself does not fence a second time). A spec that asks for nothing is printed as it came.
//!   A bad request, or a fence that cannot be set up, fails the hook, and podman then refuses
//!   to create the container: never an unfenced container.
//! - `poststop`: the OCI state (`id`, `bundle`, `annotations`) on stdin, once the container
//!   is gone from the runtime; the container's fences are torn down and its delta settled as
//!   `delete` does ([`lifecycle::delete`]). Only fences a hook set up are touched, and a
//!   second run finds nothing left to do. podman runs it from hooks.d when it removes the
//!   container from the runtime (after each stop); `precreate` also adds it to the spec's own
//!   `poststop` hooks, which the runtime runs at `delete` and when its `create` fails (podman
//!   runs no hook then, and the fence would stay up).
//!
//! podman passes no container id to `precreate`: the id is read from the spec, from what
//! podman puts there for that container alone (its cgroup `…/libpod-ID`, its own bind mounts
//! from `…/overlay-containers/ID/userdata/`, the bundle `…/overlay-containers/ID/userdata` as
//! the working directory in newer podman; CRI-O's `io.kubernetes.cri-o.ContainerID`). Every
//! place that names an id must name the same one. `poststop` gets the same id as the state's
//! `id`, so both stages agree on the container's state directory.
//!
//! podman up to 4.x throws away a `precreate` hook's stderr: a refusal is also written to the
//! controlling terminal when there is one (the user running `podman run` sees why) and
//! appended to `hooks.log` in the state directory.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use libcontainer::oci_spec::runtime::Spec;
use serde_json::Value;

use crate::config::AdminConfig;
use crate::lifecycle;

/// The hook stage this invocation serves.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before the runtime creates the container: the spec on stdin, the fenced spec on stdout.
    Precreate,
    /// After the container stopped: tear the fence down (the OCI state on stdin).
    Poststop,
}

#[derive(clap::Args, Debug, Clone)]
pub struct HookArgs {
    #[arg(value_enum)]
    pub stage: Stage,
}

/// What a hook-fenced container's `fence.json` names as its runtime root: `hook:ENGINE`.
/// Never a directory (ids are only unique per runtime root; these are the engine's ids).
pub const ROOT_PREFIX: &str = "hook:";

/// The engine of a container fenced by a hook (`hook:podman` gives `podman`); None for a
/// container the runtime itself fenced (its runtime root is a directory).
pub fn hook_engine(runtime_root: &Path) -> Option<&str> {
    runtime_root.to_str()?.strip_prefix(ROOT_PREFIX)
}

/// CRI-O's annotation holding the container id.
const CRIO_ID: &str = "io.kubernetes.cri-o.ContainerID";

/// Runs the hook; returns the exit code.
pub fn run(args: HookArgs, admin: &AdminConfig) -> Result<i32> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .context("agentfense hook: failed to read stdin")?;
    match args.stage {
        Stage::Precreate => {
            let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
            match precreate(&input, &cwd, admin) {
                Ok(out) => {
                    let mut stdout = std::io::stdout().lock();
                    let written = stdout.write_all(&out.spec).and_then(|_| stdout.flush());
                    if let Err(e) = written {
                        // The engine will not create the container: its fences must not stay.
                        if let Some(id) = &out.fenced {
                            let _ = lifecycle::teardown(admin, id);
                        }
                        refuse(admin, &format!("failed to write the spec: {e}"));
                        return Ok(1);
                    }
                    Ok(0)
                }
                Err(e) => {
                    refuse(admin, &format!("{e:#}"));
                    Ok(1)
                }
            }
        }
        Stage::Poststop => match poststop(&input, admin) {
            Ok(()) => Ok(0),
            Err(e) => {
                eprintln!("agentfense-runc hook poststop: {e:#}");
                Ok(1)
            }
        },
    }
}

/// What the precreate stage hands back.
#[derive(Debug)]
pub struct Precreated {
    /// The spec for the engine.
    pub spec: Vec<u8>,
    /// The container id, when its fences were started.
    pub fenced: Option<String>,
}

/// The precreate stage: the spec `input` as it came if it asks for no fencing, else the
/// fenced spec. `cwd` is the hook's working directory (the bundle, in newer podman).
pub fn precreate(input: &[u8], cwd: &Path, admin: &AdminConfig) -> Result<Precreated> {
    let mut doc: Value = serde_json::from_slice(input)
        .context("agentfense: the hook's stdin is not a JSON OCI spec")?;
    let spec: Spec = serde_json::from_value(doc.clone())
        .context("agentfense: the hook's stdin is not an OCI spec")?;
    let Some(req) = lifecycle::request_of(&spec, admin)? else {
        return Ok(Precreated {
            spec: input.to_vec(),
            fenced: None,
        });
    };
    let annotations = spec.annotations().clone().unwrap_or_default();
    let id = container_id(&doc, cwd).context("agentfense: cannot fence this container")?;
    let root = PathBuf::from(format!("{ROOT_PREFIX}{}", engine(&annotations)));
    let fenced = lifecycle::prepare_spec(&id, &spec, cwd, &req, admin, &root)?;
    // Only what fencing changes is taken from the rewritten spec: everything else stays as
    // the engine wrote it, fields this build does not know included.
    let patched = patch(&mut doc, &fenced)
        .and_then(|_| add_poststop(&mut doc, own_poststop()))
        .and_then(|_| Ok(serde_json::to_vec(&doc)?));
    match patched {
        Ok(spec) => Ok(Precreated {
            spec,
            fenced: Some(id),
        }),
        Err(e) => {
            let _ = lifecycle::teardown(admin, &id);
            Err(e)
        }
    }
}

/// This binary's `hook poststop`, as an OCI hook for the runtime to run: the same program
/// and arguments as this invocation (`--agentfense-config` included), `poststop` for
/// `precreate`. None when the program's path on disk is not known.
fn own_poststop() -> Option<Value> {
    let exe = std::env::var_os(crate::sys::EXE_ENV)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_file())?;
    let mut args: Vec<String> = std::env::args().collect();
    let at = args
        .windows(2)
        .rposition(|w| w[0] == "hook" && w[1] == "precreate")?;
    args[at + 1] = "poststop".into();
    Some(serde_json::json!({"path": exe, "args": args}))
}

/// Adds `hook` to the spec's own `poststop` hooks. The runtime runs them when it deletes the
/// container, and also when its create fails, after which podman (which only runs its
/// `poststop` hooks for a container the runtime created) would leave the fence running.
fn add_poststop(doc: &mut Value, hook: Option<Value>) -> Result<()> {
    let Some(hook) = hook else {
        return Ok(());
    };
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| anyhow!("the spec is not a JSON object"))?;
    let hooks = obj
        .entry("hooks")
        .or_insert_with(|| Value::Object(Default::default()));
    if hooks.is_null() {
        *hooks = Value::Object(Default::default());
    }
    let poststop = hooks
        .as_object_mut()
        .ok_or_else(|| anyhow!("the spec's hooks are not a JSON object"))?
        .entry("poststop")
        .or_insert_with(|| Value::Array(Vec::new()));
    if poststop.is_null() {
        *poststop = Value::Array(Vec::new());
    }
    poststop
        .as_array_mut()
        .ok_or_else(|| anyhow!("the spec's poststop hooks are not a JSON array"))?
        .push(hook);
    Ok(())
}

/// Copies the fenced spec's mounts and environment into the engine's document, and removes
/// the fencing request from it.
fn patch(doc: &mut Value, fenced: &Spec) -> Result<()> {
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| anyhow!("the spec is not a JSON object"))?;
    obj.insert("mounts".into(), serde_json::to_value(fenced.mounts())?);
    if let Some(env) = fenced.process().as_ref().and_then(|p| p.env().as_ref()) {
        if let Some(p) = obj.get_mut("process").and_then(Value::as_object_mut) {
            p.insert("env".into(), serde_json::to_value(env)?);
        }
    }
    if let Some(a) = obj.get_mut("annotations").and_then(Value::as_object_mut) {
        a.retain(|k, _| !k.starts_with("agentfense.io/"));
    }
    Ok(())
}

/// The poststop stage: tears down the fences a hook set up for the state's container.
pub fn poststop(input: &[u8], admin: &AdminConfig) -> Result<()> {
    let state: Value =
        serde_json::from_slice(input).context("the hook's stdin is not a JSON OCI state")?;
    let Some(id) = state.get("id").and_then(Value::as_str) else {
        bail!("the OCI state on stdin has no id");
    };
    super::runtime::validate_id(id)?;
    let Some(rec) = lifecycle::read_record(admin, id)? else {
        return Ok(());
    };
    // A container that agentfense-runc fenced as its runtime is the runtime's to tear down.
    if hook_engine(&rec.runtime_root).is_none() {
        return Ok(());
    }
    lifecycle::delete(admin, id, None)
}

/// Which engine the spec is from, for the fence record's runtime root.
fn engine(annotations: &HashMap<String, String>) -> &'static str {
    if annotations
        .get("io.container.manager")
        .is_some_and(|v| v == "libpod")
    {
        "podman"
    } else if annotations.contains_key(CRIO_ID) {
        "cri-o"
    } else {
        "oci"
    }
}

fn is_engine_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// `…/<driver>-containers/ID/userdata[/…]`: the id, from a path in the engine's storage.
fn id_in_storage_path(p: &str) -> Option<&str> {
    let parts: Vec<&str> = p.split('/').collect();
    parts.windows(3).find_map(|w| {
        (w[0].ends_with("-containers") && is_engine_id(w[1]) && w[2] == "userdata").then_some(w[1])
    })
}

/// `…/libpod-ID`, `…/libpod-ID.scope` (cgroupfs) or `SLICE:libpod:ID` (systemd).
fn id_in_cgroups_path(p: &str) -> Option<&str> {
    if let Some((_, rest)) = p.split_once(":libpod:") {
        return is_engine_id(rest).then_some(rest);
    }
    let last = p.rsplit('/').next()?;
    let id = last.strip_prefix("libpod-")?;
    let id = id.strip_suffix(".scope").unwrap_or(id);
    is_engine_id(id).then_some(id)
}

/// The container's id, from what the engine wrote into its spec for it (see the module's
/// documentation). Every place that names one must name the same.
pub fn container_id(doc: &Value, cwd: &Path) -> Result<String> {
    let mut found: Vec<(String, String)> = Vec::new();
    if let Some(id) = doc
        .pointer(&format!("/annotations/{}", CRIO_ID.replace('/', "~1")))
        .and_then(Value::as_str)
    {
        super::runtime::validate_id(id)?;
        found.push((id.to_string(), format!("annotation {CRIO_ID}")));
    }
    if let Some(id) = id_in_storage_path(&cwd.to_string_lossy()) {
        found.push((id.to_string(), format!("bundle {}", cwd.display())));
    }
    for m in doc
        .get("mounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(src) = m.get("source").and_then(Value::as_str) {
            if let Some(id) = id_in_storage_path(src) {
                found.push((id.to_string(), format!("mount source {src}")));
            }
        }
    }
    if let Some(cg) = doc.pointer("/linux/cgroupsPath").and_then(Value::as_str) {
        if let Some(id) = id_in_cgroups_path(cg) {
            found.push((id.to_string(), format!("cgroupsPath {cg}")));
        }
    }
    let Some((id, _)) = found.first() else {
        bail!(
            "the spec does not say which container it is for (no engine storage path, cgroup \
             path or {CRIO_ID} annotation naming its id)"
        );
    };
    if let Some((other, whence)) = found.iter().find(|(o, _)| o != id) {
        bail!(
            "the spec names two container ids: {id} ({}) and {other} ({whence})",
            found[0].1
        );
    }
    Ok(id.clone())
}

/// Reports a refused create where the user can see it: stderr (podman 4 discards it; newer
/// podman keeps it with the `run.oci.hooks.stderr` annotation), the controlling terminal if
/// the hook runs in its foreground, and `hooks.log` in the state directory.
fn refuse(admin: &AdminConfig, msg: &str) {
    let line = format!("agentfense-runc hook precreate: container refused: {msg}");
    eprintln!("{line}");
    to_terminal(&line);
    let log = admin.state_dir.join("hooks.log");
    let stamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .create(&admin.state_dir)
        .and_then(|_| {
            std::os::unix::fs::OpenOptionsExt::mode(
                std::fs::OpenOptions::new().create(true).append(true),
                0o600,
            )
            .open(&log)
        })
        .and_then(|mut f| writeln!(f, "{stamp} {line}"));
}

/// Writes `line` to the controlling terminal, if there is one and this process is in its
/// foreground (a background write could stop the process, and podman with it).
fn to_terminal(line: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut tty) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/tty")
    else {
        return;
    };
    match nix::unistd::tcgetpgrp(&tty) {
        Ok(fg) if fg == nix::unistd::getpgrp() => {
            let _ = writeln!(tty, "{line}");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "aac94cb1ba764197bfd7582422a15ed5f7eefe79fcc7f1d27f8e87765ec7de24";
    const ID2: &str = "bbc94cb1ba764197bfd7582422a15ed5f7eefe79fcc7f1d27f8e87765ec7de24";

    fn podman_spec(annotations: Value, workspace: &Path) -> Value {
        serde_json::json!({
            "ociVersion": "1.0.2-dev",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                        "env": ["PATH=/bin", "HOSTNAME=aac94cb1ba76"]},
            "root": {"path": "/var/lib/containers/storage/overlay/7c2d/merged"},
            "hostname": "aac94cb1ba76",
            "mounts": [
                {"destination": "/w", "type": "bind", "source": workspace,
                 "options": ["rw", "rprivate", "rbind"]},
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind",
                 "source": format!("/run/containers/storage/overlay-containers/{ID}/userdata/hosts"),
                 "options": ["bind", "rprivate"]},
                {"destination": "/dev/shm", "type": "bind",
                 "source": format!("/var/lib/containers/storage/overlay-containers/{ID}/userdata/shm"),
                 "options": ["bind", "rprivate"]},
            ],
            "annotations": annotations,
            "linux": {"cgroupsPath": format!("/libpod_parent/libpod-{ID}"),
                      "futureField": {"kept": true}},
            "futureTopLevel": 1,
        })
    }

    fn admin(dir: &Path) -> AdminConfig {
        AdminConfig {
            state_dir: dir.join("state"),
            ..Default::default()
        }
    }

    #[test]
    fn id_from_podman_spec_cgroups_and_storage_paths() {
        let doc = podman_spec(serde_json::json!({}), Path::new("/repo"));
        assert_eq!(container_id(&doc, Path::new("/root")).unwrap(), ID);
        // Newer podman runs the hook in the bundle.
        let bundle = format!("/var/lib/containers/storage/overlay-containers/{ID}/userdata");
        assert_eq!(container_id(&doc, Path::new(&bundle)).unwrap(), ID);
        assert_eq!(
            id_in_cgroups_path(&format!("machine.slice:libpod:{ID}")),
            Some(ID)
        );
        assert_eq!(
            id_in_cgroups_path(&format!("/x/libpod-{ID}.scope")),
            Some(ID)
        );
        assert_eq!(id_in_cgroups_path("/x/libpod-nothex"), None);
        assert_eq!(
            id_in_storage_path("/srv/overlay-containers/abc/userdata/x"),
            None
        );
    }

    #[test]
    fn id_must_be_named_and_named_once() {
        let mut doc = podman_spec(serde_json::json!({}), Path::new("/repo"));
        doc["linux"]["cgroupsPath"] = Value::String(format!("/libpod_parent/libpod-{ID2}"));
        let e = format!("{:#}", container_id(&doc, Path::new("/")).unwrap_err());
        assert!(e.contains("two container ids"), "{e}");
        doc["linux"]["cgroupsPath"] = Value::Null;
        doc["mounts"] = serde_json::json!([]);
        let e = format!("{:#}", container_id(&doc, Path::new("/")).unwrap_err());
        assert!(e.contains("does not say which container"), "{e}");
        doc["annotations"] = serde_json::json!({ CRIO_ID: ID2 });
        assert_eq!(container_id(&doc, Path::new("/")).unwrap(), ID2);
        doc["annotations"] = serde_json::json!({ CRIO_ID: "../x" });
        assert!(container_id(&doc, Path::new("/")).is_err());
    }

    #[test]
    fn unfenced_spec_passes_through_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let doc = podman_spec(
            serde_json::json!({"io.container.manager": "libpod"}),
            dir.path(),
        );
        let input = serde_json::to_vec_pretty(&doc).unwrap();
        let out = precreate(&input, Path::new("/"), &admin(dir.path())).unwrap();
        assert_eq!(out.spec, input);
        assert!(out.fenced.is_none());
        assert!(!dir.path().join("state").exists());
    }

    #[test]
    fn bad_request_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let doc = podman_spec(
            serde_json::json!({"agentfense.io/preset": "agent-unsafe"}),
            dir.path(),
        );
        let input = serde_json::to_vec(&doc).unwrap();
        let e = format!(
            "{:#}",
            precreate(&input, Path::new("/"), &admin(dir.path())).unwrap_err()
        );
        assert!(e.contains("agent-unsafe"), "{e}");
        assert!(!dir.path().join("state").exists());
    }

    #[test]
    fn patch_keeps_unknown_fields_and_drops_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let mut doc = podman_spec(
            serde_json::json!({"agentfense.io/preset": "agent-safe", "other": "x"}),
            dir.path(),
        );
        doc["process"]["env"] = serde_json::json!(["PATH=/bin", "AGENTFENSE_AUDIT=all"]);
        let spec: Spec = serde_json::from_value(doc.clone()).unwrap();
        let mut fenced = spec.clone();
        let mut mounts = fenced.mounts().clone().unwrap();
        mounts[0].set_source(Some(PathBuf::from("/state/mnt/w")));
        fenced.set_mounts(Some(mounts));
        if let Some(p) = fenced.process_mut() {
            p.set_env(Some(vec!["PATH=/bin".into()]));
        }
        patch(&mut doc, &fenced).unwrap();
        assert_eq!(doc["mounts"][0]["source"], "/state/mnt/w");
        assert_eq!(doc["mounts"][2]["destination"], "/etc/hosts");
        assert_eq!(doc["process"]["env"], serde_json::json!(["PATH=/bin"]));
        assert_eq!(doc["annotations"], serde_json::json!({"other": "x"}));
        assert_eq!(doc["linux"]["futureField"]["kept"], true);
        assert_eq!(doc["futureTopLevel"], 1);
    }

    #[test]
    fn own_poststop_is_appended_to_the_spec_hooks() {
        let mut doc = serde_json::json!({"hooks": {}});
        let h = serde_json::json!({"path": "/x", "args": ["x", "hook", "poststop"]});
        add_poststop(&mut doc, Some(h.clone())).unwrap();
        assert_eq!(doc["hooks"]["poststop"], serde_json::json!([h.clone()]));
        let mut doc = serde_json::json!({"hooks": {"poststop": [{"path": "/y"}]}});
        add_poststop(&mut doc, Some(h.clone())).unwrap();
        assert_eq!(doc["hooks"]["poststop"][1], h);
        let mut doc = serde_json::json!({});
        add_poststop(&mut doc, None).unwrap();
        assert_eq!(doc, serde_json::json!({}));
    }

    #[test]
    fn poststop_leaves_unknown_and_runtime_fenced_containers_alone() {
        let dir = tempfile::tempdir().unwrap();
        let a = admin(dir.path());
        let state = serde_json::json!({"ociVersion": "1.0.2", "id": ID, "status": "stopped",
                                       "bundle": "/b", "annotations": {}});
        poststop(&serde_json::to_vec(&state).unwrap(), &a).unwrap();
        // A record the runtime itself wrote (its root is a directory) stays live.
        let cdir = lifecycle::container_state_dir(&a, ID);
        std::fs::create_dir_all(&cdir).unwrap();
        let rec = serde_json::json!({"container_id": ID, "runtime_root": "/run/agentfense-runc",
            "workspaces": [], "delta": "keep", "audit": "off", "policy": "[]",
            "policy_sha256": "", "live": true});
        std::fs::write(cdir.join("fence.json"), rec.to_string()).unwrap();
        poststop(&serde_json::to_vec(&state).unwrap(), &a).unwrap();
        assert!(lifecycle::read_record(&a, ID).unwrap().unwrap().live);
        // One a hook wrote is torn down.
        let mut rec = rec;
        rec["runtime_root"] = Value::String("hook:podman".into());
        std::fs::write(cdir.join("fence.json"), rec.to_string()).unwrap();
        poststop(&serde_json::to_vec(&state).unwrap(), &a).unwrap();
        assert!(!lifecycle::read_record(&a, ID).unwrap().unwrap().live);
        // Garbage is an error, not a panic.
        assert!(poststop(b"{}", &a).is_err());
        assert!(poststop(br#"{"id": "../etc"}"#, &a).is_err());
    }
}

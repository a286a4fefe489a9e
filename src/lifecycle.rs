//! Fencing at `create` and tearing it down at `delete`.
//!
//! At create, before libcontainer sees the bundle: read the container's fencing request (a bad
//! one stops the create: a container is never created unfenced), plan one fence per workspace
//! path, start a daemon for each and wait until its mount is live, then rewrite `config.json`
//! so the workspaces come from the fences. Any failure on the way undoes what was done.
//!
//! The container's state directory (`<state_dir>/containers/<id>/`) holds:
//! `fence.json` (what is running: daemons, mounts, layers), `upper/<key>/` (the delta of each
//! workspace, kept across delete and re-create under the same id), `mnt/<key>/` (mount
//! points), `daemon-<key>.json` and `daemon-<key>.log`.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use libcontainer::oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{self, AUDIT_FILE};
use crate::config::AdminConfig;
use crate::fence::daemon::{self, DaemonConfig, DaemonHandle};
use crate::policy::{from_spec, AuditLevel, DeltaMode, FenceRequest};
use crate::splice;

/// One fenced workspace path, as recorded in `fence.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkspaceRecord {
    pub dest: String,
    pub base: PathBuf,
    pub upper: PathBuf,
    pub mountpoint: PathBuf,
    pub daemon: Option<DaemonHandle>,
    /// What the base held where the delta took over (None: delta off).
    #[serde(default)]
    pub origins: Option<PathBuf>,
}

/// `fence.json`: what the runtime set up for a container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FenceRecord {
    pub container_id: String,
    /// The runtime's `--root` that created it (ids are only unique per root).
    pub runtime_root: PathBuf,
    pub workspaces: Vec<WorkspaceRecord>,
    pub delta: DeltaMode,
    pub audit: AuditLevel,
    pub policy: String,
    pub policy_sha256: String,
    pub live: bool,
}

/// The container's state directory.
pub fn container_state_dir(admin: &AdminConfig, id: &str) -> PathBuf {
    admin.state_dir.join("containers").join(id)
}

fn mkdir_private(p: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .with_context(|| format!("failed to create {}", p.display()))
}

/// A stable directory name for a workspace path.
fn key(dest: &str) -> String {
    let h = Sha256::digest(dest.as_bytes());
    let name: String = dest
        .trim_start_matches('/')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(32)
        .collect();
    format!("{name}-{:02x}{:02x}{:02x}{:02x}", h[0], h[1], h[2], h[3])
}

/// Where a workspace's origins are recorded (see [`crate::delta::origins`]).
pub fn origins_path(cdir: &Path, key: &str) -> PathBuf {
    cdir.join(format!("origins-{key}.jsonl"))
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("failed to write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("failed to write {}", path.display()))
}

/// Reads a container's fence record, if it was fenced.
pub fn read_record(admin: &AdminConfig, id: &str) -> Result<Option<FenceRecord>> {
    let path = container_state_dir(admin, id).join("fence.json");
    match fs::read_to_string(&path) {
        Ok(t) => Ok(Some(
            serde_json::from_str(&t).with_context(|| format!("invalid {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
}

/// A fence set up for a create in progress. `abort` undoes it; dropping it keeps it.
pub struct Prepared {
    config_path: PathBuf,
    original_config: Vec<u8>,
    admin: AdminConfig,
    id: String,
}

impl Prepared {
    /// After libcontainer has created the container (it keeps its own copy of the spec): the
    /// bundle's `config.json` as the engine wrote it, so that the bundle can be used again.
    pub fn created(self) {
        let _ = fs::write(&self.config_path, &self.original_config);
    }
    /// Undoes everything: daemons stopped, mounts gone, `config.json` as it was.
    pub fn abort(self) {
        let _ = fs::write(&self.config_path, &self.original_config);
        if let Err(e) = teardown(&self.admin, &self.id) {
            tracing::warn!("undoing the fence of {}: {e:#}", self.id);
        }
    }
}

/// Loads the administrator's settings (`--agentfense-config`), or the defaults.
pub fn admin_config(path: Option<&Path>) -> Result<AdminConfig> {
    match path {
        Some(p) => AdminConfig::load(p),
        None => Ok(AdminConfig::default()),
    }
}

/// The fencing request of the bundle's spec, if any (errors are policy errors, for the user).
pub fn request_of(spec: &Spec, admin: &AdminConfig) -> Result<Option<FenceRequest>> {
    let annotations: HashMap<String, String> = spec.annotations().clone().unwrap_or_default();
    let env: Vec<String> = spec
        .process()
        .as_ref()
        .and_then(|p| p.env().clone())
        .unwrap_or_default();
    from_spec(&annotations, &env, admin, &|name| {
        admin.read_named_policy(name)
    })
    .map_err(|e| anyhow!("agentfense: {e}"))
}

/// With the environment form, an image's ENV could point the fence somewhere else
/// (`AGENTFENSE_WORKSPACE`) and leave the user's repository unfenced: a directory mounted at the
/// default workspace path is always fenced then.
fn check_env_workspace(spec: &Spec, req: &FenceRequest) -> Result<()> {
    if req.source != crate::policy::Source::Env {
        return Ok(());
    }
    let default = crate::policy::source::DEFAULT_WORKSPACE;
    let mounted = spec.mounts().as_ref().is_some_and(|ms| {
        ms.iter()
            .any(|m| m.destination().to_str().map(|d| d.trim_end_matches('/')) == Some(default))
    });
    if mounted && !req.workspaces.iter().any(|w| w == default) {
        bail!(
            "agentfense: AGENTFENSE_WORKSPACE ({}) leaves the directory mounted at {default} \
             unfenced; with the environment form that is refused (an image's ENV may set it): \
             include {default}, or use annotations",
            req.workspaces.join(",")
        );
    }
    Ok(())
}

/// Test hook for fault injection: the runtime dies here (as if killed: no cleanup runs) when
/// `AGENTFENSE_TEST_CRASH_AT` names this point. `delete --force` must then leave nothing.
pub fn crash_point(name: &str) {
    if std::env::var_os("AGENTFENSE_TEST_CRASH_AT").is_some_and(|v| v == name) {
        std::process::abort();
    }
}

/// Sets up fencing for container `id` of `bundle`, if its spec asks for it.
pub fn prepare(
    id: &str,
    bundle: &Path,
    admin: &AdminConfig,
    runtime_root: &Path,
) -> Result<Option<Prepared>> {
    let config_path = bundle.join("config.json");
    let original_config = fs::read(&config_path)
        .with_context(|| format!("failed to read {}", config_path.display()))?;
    let spec: Spec = serde_json::from_slice(&original_config)
        .with_context(|| format!("invalid {}", config_path.display()))?;
    let Some(req) = request_of(&spec, admin)? else {
        return Ok(None);
    };
    // A second create under the id of an existing container fails in libcontainer; it must
    // not touch that container's fences on the way.
    if runtime_root.join(id).exists() {
        bail!("container {id} already exists");
    }
    let prepared = Prepared {
        config_path: config_path.clone(),
        original_config,
        admin: admin.clone(),
        id: id.to_string(),
    };
    let restore = || {
        let _ = fs::write(&prepared.config_path, &prepared.original_config);
    };
    let rewritten = fence_spec(id, &spec, bundle, &req, admin, runtime_root, &restore)?;
    let tmp = config_path.with_extension("json.agentfense-tmp");
    fs::write(&tmp, serde_json::to_vec(&rewritten)?)
        .and_then(|_| fs::rename(&tmp, &config_path))
        .with_context(|| format!("failed to rewrite {}", config_path.display()))
        .inspect_err(|_| {
            let _ = teardown(admin, id);
        })?;
    crash_point("config");
    Ok(Some(prepared))
}

/// Sets up fencing for container `id` as [`prepare`] does, but on a spec in memory: for an
/// engine's OCI hook (`agentfense-runc hook precreate`), which is handed the spec and hands
/// back the fenced one. `req` is the spec's fencing request ([`request_of`]); `bundle` is
/// what a relative `root.path` is relative to; `runtime_root` is recorded in `fence.json` as
/// the fence's owner (for hooks, a marker such as `hook:podman`). On success the fences are
/// running and the returned spec mounts them; on failure nothing is left running.
pub fn prepare_spec(
    id: &str,
    spec: &Spec,
    bundle: &Path,
    req: &FenceRequest,
    admin: &AdminConfig,
    runtime_root: &Path,
) -> Result<Spec> {
    fence_spec(id, spec, bundle, req, admin, runtime_root, &|| {})
}

/// What [`prepare`] and [`prepare_spec`] share: plan the fences, start them, and rewrite the
/// spec. `undo` is called, before the teardown, when starting the fences fails.
fn fence_spec(
    id: &str,
    spec: &Spec,
    bundle: &Path,
    req: &FenceRequest,
    admin: &AdminConfig,
    runtime_root: &Path,
    undo: &dyn Fn(),
) -> Result<Spec> {
    let plans = splice::plan(spec, bundle, &req.workspaces).context("agentfense")?;
    check_env_workspace(spec, req)?;
    let cdir = container_state_dir(admin, id);
    mkdir_private(&cdir)?;
    crash_point("state-dir");
    // A previous incarnation under this id that was never deleted (a crash): clean it first,
    // unless another engine's container owns it.
    if let Some(old) = read_record(admin, id)? {
        if old.live
            && old.runtime_root != runtime_root
            && old
                .workspaces
                .iter()
                .any(|w| w.daemon.as_ref().is_some_and(daemon::is_our_daemon))
        {
            bail!(
                "agentfense: container id {id} is already fenced under {}",
                old.runtime_root.display()
            );
        }
        teardown(admin, id)?;
    }
    let mut record = FenceRecord {
        container_id: id.to_string(),
        runtime_root: runtime_root.to_path_buf(),
        workspaces: Vec::new(),
        delta: req.delta,
        audit: req.audit,
        policy: req.policy_json.clone(),
        policy_sha256: req.policy_sha256.clone(),
        live: true,
    };
    let audit_path = cdir.join(AUDIT_FILE);
    if req.audit != AuditLevel::Off {
        let info = audit::create_info(&req.policy, &req.workspaces, req.delta, req.audit);
        audit::append_lifecycle(&audit_path, id, "create", info)
            .with_context(|| format!("agentfense: failed to write {}", audit_path.display()))?;
    }
    match start_fences(&cdir, id, &plans, req, admin, &mut record) {
        Ok(mountpoints) => {
            let env = (!req.remove_env.is_empty()).then(|| {
                let env = spec
                    .process()
                    .as_ref()
                    .and_then(|p| p.env().clone())
                    .unwrap_or_default();
                req.filter_env(&env)
            });
            splice::rewrite(spec, &plans, &mountpoints, env).inspect_err(|_| {
                let _ = teardown(admin, id);
            })
        }
        Err(e) => {
            let _ = write_json(&cdir.join("fence.json"), &record);
            undo();
            if let Err(t) = teardown(admin, id) {
                tracing::warn!("undoing the fence of {id}: {t:#}");
            }
            Err(e)
        }
    }
}

fn start_fences(
    cdir: &Path,
    id: &str,
    plans: &[splice::FencePlan],
    req: &FenceRequest,
    admin: &AdminConfig,
    record: &mut FenceRecord,
) -> Result<Vec<PathBuf>> {
    let exe = crate::sys::daemon_exe();
    let mut mountpoints = Vec::new();
    for p in plans {
        let k = key(&p.dest);
        // A workspace that is neither a bind mount nor a directory of the image is most likely
        // a repository mounted somewhere else: fencing an empty directory instead would leave
        // the real one unfenced, so refuse.
        if p.in_rootfs {
            // The image must not point the workspace elsewhere on the host: no symlink on the
            // way from the rootfs to the workspace directory.
            let root = p
                .base
                .ancestors()
                .nth(p.dest.matches('/').count())
                .unwrap_or(&p.base);
            let rootfd = crate::sys::fs::open_root(root)
                .map_err(|e| anyhow!("agentfense: cannot open the rootfs: {e}"))?;
            let sub = p.dest.trim_start_matches('/');
            if let Err(e) = crate::sys::fs::open_beneath(
                std::os::fd::AsFd::as_fd(&rootfd),
                sub,
                crate::sys::fs::OFlags::PATH | crate::sys::fs::OFlags::DIRECTORY,
                crate::sys::fs::Mode::empty(),
            ) {
                if e == crate::sys::fs::Errno::LOOP || e == crate::sys::fs::Errno::XDEV {
                    bail!(
                        "agentfense: workspace {} is reached through a symlink in the image; \
                         only a plain directory can be fenced",
                        p.dest
                    );
                }
            }
        }
        let meta = fs::symlink_metadata(&p.base).map_err(|_| {
            anyhow!(
                "agentfense: workspace {} is neither a bind mount's destination nor a directory \
                 of the image; mount the directory to fence there, or name its path in \
                 agentfense.io/workspace (AGENTFENSE_WORKSPACE)",
                p.dest
            )
        })?;
        if !meta.is_dir() {
            bail!(
                "agentfense: workspace {} ({}) is not a directory",
                p.dest,
                p.base.display()
            );
        }
        let (base, upper) = if req.delta == DeltaMode::Off {
            (None, p.base.clone())
        } else {
            let upper = cdir.join("upper").join(&k);
            mkdir_private(&upper)?;
            fs::set_permissions(&upper, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            (Some(p.base.clone()), upper)
        };
        let mountpoint = cdir.join("mnt").join(&k);
        mkdir_private(&mountpoint)?;
        let cfg = DaemonConfig {
            container_id: id.to_string(),
            base,
            upper: upper.clone(),
            mountpoint: mountpoint.clone(),
            policy: req.policy_json.clone(),
            read_only: p.read_only,
            threads: 4,
            audit_path: (req.audit != AuditLevel::Off).then(|| cdir.join(AUDIT_FILE)),
            audit_level: req.audit,
            audit_overflow: admin.audit_overflow,
            origins: (req.delta != DeltaMode::Off).then(|| origins_path(cdir, &k)),
        };
        let origins = cfg.origins.clone();
        let cfg_path = cdir.join(format!("daemon-{k}.json"));
        write_json(&cfg_path, &cfg)?;
        record.workspaces.push(WorkspaceRecord {
            dest: p.dest.clone(),
            base: p.base.clone(),
            upper,
            mountpoint: mountpoint.clone(),
            daemon: None,
            origins,
        });
        let handle = daemon::spawn(&exe, &cfg_path, &cfg, &cdir.join(format!("daemon-{k}.log")))
            .with_context(|| format!("agentfense: workspace {}", p.dest))?;
        if let Some(w) = record.workspaces.last_mut() {
            w.daemon = Some(handle);
        }
        write_json(&cdir.join("fence.json"), &*record)?;
        crash_point("daemon");
        mountpoints.push(mountpoint);
    }
    Ok(mountpoints)
}

/// Records the container's start in its audit trail, if it is fenced and audited.
pub fn note_start(admin: &AdminConfig, id: &str) -> Result<()> {
    match read_record(admin, id)? {
        Some(r) if r.live && r.audit != AuditLevel::Off => {
            let path = container_state_dir(admin, id).join(AUDIT_FILE);
            audit::append_lifecycle(&path, id, "start", serde_json::json!({}))
                .with_context(|| format!("failed to write {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Tears down container `id`'s fences: daemons stopped, mounts gone, the delta kept.
/// Idempotent; a container that was never fenced is fine.
pub fn teardown(admin: &AdminConfig, id: &str) -> Result<()> {
    teardown_with_status(admin, id, None).map(|_| ())
}

/// The container's delete: its fences torn down, then its delta settled as it asked
/// (`agentfense.io/delta`: `commit` applies it to the base, `discard` drops it, `keep` and
/// `off` leave things as they are). Settling happens once, when a live fence is torn down; a
/// commit's conflicts (and errors) are logged and recorded in the audit trail and never fail
/// the delete: what did not land stays in the kept delta, for `agentfense-runc commit ID`.
pub fn delete(admin: &AdminConfig, id: &str, exit_status: Option<i32>) -> Result<()> {
    if !teardown_with_status(admin, id, exit_status)? {
        return Ok(());
    }
    let Some(rec) = read_record(admin, id)? else {
        return Ok(());
    };
    match rec.delta {
        DeltaMode::Commit => match crate::delta::commit(admin, id, &rec) {
            Ok(r) => {
                for c in &r.conflicts {
                    tracing::warn!("commit of {id}: conflict at {}: {}", c.path, c.reason);
                }
            }
            Err(e) => tracing::warn!("commit of {id} stopped, its delta is kept: {e:#}"),
        },
        DeltaMode::Discard => {
            if let Err(e) = crate::delta::discard(admin, id, &rec) {
                tracing::warn!("discarding the delta of {id}: {e:#}");
            }
        }
        DeltaMode::Keep | DeltaMode::Off => {}
    }
    Ok(())
}

/// [`teardown`], recording the container's exit status in the `delete` audit record when the
/// runtime knows it (`run` in the foreground; under an engine, the engine reaps the process
/// and the runtime never learns it). Returns whether a live fence was torn down.
pub fn teardown_with_status(
    admin: &AdminConfig,
    id: &str,
    exit_status: Option<i32>,
) -> Result<bool> {
    let Some(mut record) = read_record(admin, id)? else {
        return Ok(false);
    };
    let mut first_err = None;
    for w in &mut record.workspaces {
        let r = match &w.daemon {
            Some(h) => daemon::stop(h),
            None => daemon::unmount(&w.mountpoint),
        };
        match r {
            Ok(()) => {
                w.daemon = None;
                let _ = fs::remove_dir(&w.mountpoint);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let was_live = record.live;
    record.live = false;
    let cdir = container_state_dir(admin, id);
    write_json(&cdir.join("fence.json"), &record)?;
    if was_live && record.audit != AuditLevel::Off {
        // After the daemons are gone: their last records and counts are in the file.
        audit::append_delete(
            &cdir.join(AUDIT_FILE),
            id,
            exit_status,
            serde_json::json!({}),
        )
        .with_context(|| format!("failed to write the delete record of {id}"))?;
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(was_live),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_distinct_and_safe() {
        assert_eq!(key("/workspace"), key("/workspace"));
        assert_ne!(key("/a/b"), key("/a_b"));
        assert!(key("/../x")
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    }

    #[test]
    fn unfenced_bundle_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]},
        });
        fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        let admin = AdminConfig {
            state_dir: dir.path().join("state"),
            ..Default::default()
        };
        assert!(prepare("c1", dir.path(), &admin, Path::new("/run/x"))
            .unwrap()
            .is_none());
        assert!(!dir.path().join("state").exists());
        assert_eq!(
            fs::read_to_string(dir.path().join("config.json")).unwrap(),
            cfg.to_string()
        );
    }

    #[test]
    fn bad_policy_refuses_the_create_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({
            "ociVersion": "1.0.2", "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]},
            "annotations": {"agentfense.io/preset": "agent-unsafe"},
        });
        fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        let admin = AdminConfig {
            state_dir: dir.path().join("state"),
            ..Default::default()
        };
        let err = prepare("c1", dir.path(), &admin, Path::new("/run/x"))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("agent-unsafe"), "{err:#}");
        assert!(!dir.path().join("state").exists());
    }
}

//! From a container's OCI spec and its fencing request to a plan (one fence per workspace path)
//! and the rewritten spec that mounts the fences. Pure: no I/O.
//!
//! - A workspace path that is the destination of a bind mount is fenced over that mount's
//!   source, and the mount is pointed at the fence instead (its options kept, `nosuid,nodev`
//!   added; `ro` stays `ro`).
//! - Any other workspace path is fenced over the image's own content at that path (beneath the
//!   rootfs), and a bind mount of the fence is added there, before any mount nested beneath it.
//! - Mounts nested beneath a workspace path are left as they are: they are not fenced.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use libcontainer::oci_spec::runtime::{Mount, MountBuilder, Spec};

/// One workspace path to fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencePlan {
    /// The path inside the container (`/workspace`).
    pub dest: String,
    /// The host directory the fence shows (a bind source, or beneath the rootfs).
    pub base: PathBuf,
    /// Whether `base` is beneath the rootfs (it may need creating).
    pub in_rootfs: bool,
    /// The workspace mount was read-only.
    pub read_only: bool,
    /// Index of the bind mount being replaced, if any.
    pub mount_index: Option<usize>,
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn norm_dest(d: &Path) -> String {
    let s = d.to_string_lossy();
    let t = s.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.to_string()
    }
}

/// The rootfs as a host path (relative `root.path` is relative to the bundle).
pub fn rootfs(spec: &Spec, bundle: &Path) -> Result<PathBuf> {
    let Some(root) = spec.root() else {
        bail!("the spec has no root");
    };
    let p = root.path();
    Ok(if p.is_absolute() {
        p.clone()
    } else {
        bundle.join(p)
    })
}

/// Plans a fence for each workspace path.
pub fn plan(spec: &Spec, bundle: &Path, workspaces: &[String]) -> Result<Vec<FencePlan>> {
    let mounts = spec.mounts().clone().unwrap_or_default();
    let mut out = Vec::new();
    for ws in workspaces {
        if ws == "/" || !ws.starts_with('/') || ws.split('/').any(|c| c == ".." || c == ".") {
            bail!("invalid workspace path {ws:?}");
        }
        // The last mount at a destination is the one the container sees.
        let idx = mounts
            .iter()
            .enumerate()
            .rev()
            .find(|(_, m)| norm_dest(m.destination()) == *ws)
            .map(|(i, _)| i);
        match idx {
            Some(i) if is_bind(&mounts[i]) => {
                let m = &mounts[i];
                let Some(src) = m.source() else {
                    bail!("the bind mount at {ws} has no source");
                };
                if !src.is_absolute() {
                    bail!(
                        "the bind mount at {ws} has a relative source {}",
                        src.display()
                    );
                }
                let ro = m
                    .options()
                    .as_ref()
                    .is_some_and(|o| o.iter().any(|x| x == "ro"));
                out.push(FencePlan {
                    dest: ws.clone(),
                    base: src.clone(),
                    in_rootfs: false,
                    read_only: ro,
                    mount_index: Some(i),
                });
            }
            Some(_) => bail!(
                "{ws} is the destination of a mount that is not a bind mount; only bind mounts \
                 and the image's own directories can be fenced"
            ),
            None => {
                let root = rootfs(spec, bundle)?;
                out.push(FencePlan {
                    dest: ws.clone(),
                    base: root.join(ws.trim_start_matches('/')),
                    in_rootfs: true,
                    read_only: false,
                    mount_index: None,
                });
            }
        }
    }
    Ok(out)
}

fn with_fence_options(opts: &[String]) -> Vec<String> {
    let mut o: Vec<String> = opts
        .iter()
        .filter(|x| *x != "suid" && *x != "dev")
        .cloned()
        .collect();
    for add in ["nosuid", "nodev"] {
        if !o.iter().any(|x| x == add) {
            o.push(add.to_string());
        }
    }
    o
}

/// The spec with each planned workspace mounted from its fence's mount point (`mountpoints`
/// in plan order), and the environment filtered by `env`.
pub fn rewrite(
    spec: &Spec,
    plans: &[FencePlan],
    mountpoints: &[PathBuf],
    env: Option<Vec<String>>,
) -> Result<Spec> {
    if plans.len() != mountpoints.len() {
        bail!("plan and mount points differ in number");
    }
    let mut spec = spec.clone();
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for (p, mp) in plans.iter().zip(mountpoints) {
        match p.mount_index {
            Some(i) => {
                let m = &mut mounts[i];
                let opts = with_fence_options(m.options().as_deref().unwrap_or(&[]));
                m.set_source(Some(mp.clone()));
                m.set_options(Some(opts));
            }
            None => {
                let m = MountBuilder::default()
                    .destination(PathBuf::from(&p.dest))
                    .typ("bind")
                    .source(mp.clone())
                    .options(with_fence_options(&["rbind".to_string()]))
                    .build()?;
                let prefix = format!("{}/", p.dest);
                let at = mounts
                    .iter()
                    .position(|x| norm_dest(x.destination()).starts_with(&prefix))
                    .unwrap_or(mounts.len());
                mounts.insert(at, m);
            }
        }
    }
    spec.set_mounts(Some(mounts));
    if let Some(env) = env {
        if let Some(process) = spec.process_mut() {
            process.set_env(Some(env));
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mounts: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin", "AGENTFENSE_PRESET=agent-safe"]},
            "mounts": mounts,
        }))
        .unwrap()
    }

    #[test]
    fn bind_destination_is_fenced_over_its_source() {
        let s = spec(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/workspace/", "type": "bind", "source": "/srv/repo", "options": ["rbind", "ro", "suid"]},
        ]));
        let p = plan(&s, Path::new("/b"), &["/workspace".into()]).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].base, PathBuf::from("/srv/repo"));
        assert!(p[0].read_only);
        assert_eq!(p[0].mount_index, Some(1));
        let r = rewrite(
            &s,
            &p,
            &[PathBuf::from("/state/mnt/0")],
            Some(vec!["PATH=/bin".into()]),
        )
        .unwrap();
        let m = &r.mounts().as_ref().unwrap()[1];
        assert_eq!(m.source().as_deref(), Some(Path::new("/state/mnt/0")));
        let o = m.options().as_ref().unwrap();
        assert!(o.contains(&"ro".to_string()) && o.contains(&"nosuid".to_string()));
        assert!(o.contains(&"nodev".to_string()) && !o.contains(&"suid".to_string()));
        assert_eq!(
            r.process().as_ref().unwrap().env().as_ref().unwrap(),
            &vec!["PATH=/bin".to_string()]
        );
    }

    #[test]
    fn image_content_gets_a_new_mount_before_nested_ones() {
        let s = spec(serde_json::json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/app/cache", "type": "bind", "source": "/c", "options": ["rbind"]},
        ]));
        let p = plan(&s, Path::new("/b"), &["/app".into()]).unwrap();
        assert_eq!(p[0].base, PathBuf::from("/b/rootfs/app"));
        assert!(p[0].in_rootfs);
        let r = rewrite(&s, &p, &[PathBuf::from("/m")], None).unwrap();
        let ms = r.mounts().as_ref().unwrap();
        assert_eq!(ms.len(), 3);
        assert_eq!(ms[1].destination(), Path::new("/app"));
        assert_eq!(ms[1].source().as_deref(), Some(Path::new("/m")));
        assert_eq!(ms[2].destination(), Path::new("/app/cache"));
    }

    #[test]
    fn non_bind_mounts_and_bad_paths_are_refused() {
        let s = spec(serde_json::json!([
            {"destination": "/workspace", "type": "tmpfs", "source": "tmpfs"},
        ]));
        assert!(plan(&s, Path::new("/b"), &["/workspace".into()]).is_err());
        assert!(plan(&s, Path::new("/b"), &["/".into()]).is_err());
        assert!(plan(&s, Path::new("/b"), &["/a/../etc".into()]).is_err());
    }

    #[test]
    fn two_workspaces() {
        let s = spec(serde_json::json!([
            {"destination": "/src", "type": "bind", "source": "/h/src", "options": ["rbind"]},
        ]));
        let p = plan(&s, Path::new("/b"), &["/src".into(), "/out".into()]).unwrap();
        assert_eq!(p.len(), 2);
        let r = rewrite(&s, &p, &[PathBuf::from("/m0"), PathBuf::from("/m1")], None).unwrap();
        assert_eq!(r.mounts().as_ref().unwrap().len(), 2);
    }
}

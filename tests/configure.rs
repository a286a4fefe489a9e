//! `agentfense-runc configure docker|containerd|podman` on fixtures: an empty or missing file,
//! unrelated settings (kept verbatim), an already configured file (nothing written, no new
//! backup), a malformed file (refused, untouched), and the command line itself.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use agentfense::cli::configure::{configure, edit, Edit, Engine, Registration};

const BIN: &str = "/usr/local/bin/agentfense-runc";

fn reg(name: &str) -> Registration {
    Registration::new(name, BIN)
}

fn ok(engine: Engine, text: &str, r: &Registration) -> Edit {
    edit(engine, text, r).unwrap_or_else(|e| panic!("{e:#}"))
}

fn err(engine: Engine, text: &str, r: &Registration) -> String {
    match edit(engine, text, r) {
        Ok(e) => panic!("accepted:\n{}", e.text),
        Err(e) => format!("{e:#}"),
    }
}

fn backups(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".agentfense-backup."))
        .collect();
    v.sort();
    v
}

fn toml(text: &str) -> toml_edit::DocumentMut {
    text.parse()
        .unwrap_or_else(|e| panic!("does not parse: {e}\n{text}"))
}

// ------------------------------------------------------------------------------------ Docker

#[test]
fn docker_empty_and_missing_file() {
    let want = format!("{{\n  \"runtimes\": {{\n    \"agentfense\": {{\n      \"path\": \"{BIN}\"\n    }}\n  }}\n}}\n");
    for text in ["", "  \n", "{}", "{}\n"] {
        let e = ok(Engine::Docker, text, &reg("agentfense"));
        assert_eq!(e.text, want, "from {text:?}");
        assert_eq!(e.changes.len(), 1);
        assert!(e.changes[0].contains("added"), "{:?}", e.changes);
    }
}

const DOCKER_UNRELATED: &str = r#"{
    "log-driver": "json-file",
    "log-opts": {
        "max-size": "10m",
        "max-file": "3"
    },
    "runtimes": {
        "nvidia": {
            "path": "nvidia-container-runtime",
            "runtimeArgs": []
        }
    },
    "storage-driver": "overlay2",
    "insecure-registries": ["b.example:5000", "a.example:5000"]
}
"#;

#[test]
fn docker_keeps_unrelated_settings_verbatim_and_in_order() {
    let mut r = reg("agentfense");
    r.runtime_args = vec!["--agentfense-config".into(), "/etc/af.json".into()];
    let e = ok(Engine::Docker, DOCKER_UNRELATED, &r);
    // Values not ours are kept as written, in the file's indentation.
    for kept in [
        "    \"log-driver\": \"json-file\",\n",
        "    \"log-opts\": {\n        \"max-size\": \"10m\",\n        \"max-file\": \"3\"\n    },\n",
        "        \"nvidia\": {\n            \"path\": \"nvidia-container-runtime\",\n            \"runtimeArgs\": []\n        },\n",
        "    \"insecure-registries\": [\"b.example:5000\", \"a.example:5000\"]\n",
    ] {
        assert!(e.text.contains(kept), "lost {kept:?} in\n{}", e.text);
    }
    let order: Vec<usize> = [
        "\"log-driver\"",
        "\"log-opts\"",
        "\"runtimes\"",
        "\"nvidia\"",
        "\"agentfense\"",
        "\"storage-driver\"",
        "\"insecure-registries\"",
    ]
    .iter()
    .map(|k| e.text.find(k).unwrap_or_else(|| panic!("{k} missing")))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{}", e.text);
    let v: serde_json::Value = serde_json::from_str(&e.text).unwrap();
    assert_eq!(
        v["runtimes"]["agentfense"],
        serde_json::json!({"path": BIN, "runtimeArgs": ["--agentfense-config", "/etc/af.json"]})
    );
    let old: serde_json::Value = serde_json::from_str(DOCKER_UNRELATED).unwrap();
    let mut without = v.clone();
    without["runtimes"]
        .as_object_mut()
        .unwrap()
        .remove("agentfense");
    assert_eq!(without, old);
    // Idempotent.
    assert!(ok(Engine::Docker, &e.text, &r).unchanged());
}

#[test]
fn docker_already_configured_is_left_alone() {
    let text = format!("{{\"runtimes\":{{\"agentfense\":{{\"path\":\"{BIN}\"}}}},\"debug\":true}}");
    let e = ok(Engine::Docker, &text, &reg("agentfense"));
    assert!(e.unchanged());
    assert_eq!(e.text, text);
    // An explicitly empty runtimeArgs is the same thing.
    let text =
        format!("{{\"runtimes\":{{\"agentfense\":{{\"path\":\"{BIN}\",\"runtimeArgs\":[]}}}}}}");
    assert!(ok(Engine::Docker, &text, &reg("agentfense")).unchanged());
}

#[test]
fn docker_updates_its_own_entry_but_not_someone_elses() {
    let text = r#"{"runtimes": {"agentfense": {"path": "/opt/old/agentfense-runc"}}}"#;
    let e = ok(Engine::Docker, text, &reg("agentfense"));
    assert!(e.changes[0].contains("replaced"), "{:?}", e.changes);
    let v: serde_json::Value = serde_json::from_str(&e.text).unwrap();
    assert_eq!(v["runtimes"]["agentfense"]["path"], BIN);

    let text = r#"{"runtimes": {"nvidia": {"path": "nvidia-container-runtime"}}}"#;
    let msg = err(Engine::Docker, text, &reg("nvidia"));
    assert!(msg.contains("already exists"), "{msg}");
    let mut r = reg("nvidia");
    r.replace = true;
    assert!(!ok(Engine::Docker, text, &r).unchanged());
}

#[test]
fn docker_default_runtime() {
    let mut r = reg("agentfense");
    r.make_default = true;
    let e = ok(Engine::Docker, r#"{"default-runtime": "runc"}"#, &r);
    let v: serde_json::Value = serde_json::from_str(&e.text).unwrap();
    assert_eq!(v["default-runtime"], "agentfense");
    assert_eq!(
        v.as_object().unwrap().keys().next().unwrap(),
        "default-runtime"
    );
    assert!(ok(Engine::Docker, &e.text, &r).unchanged());
}

#[test]
fn docker_refuses_malformed_files() {
    for (text, why) in [
        ("{\"a\": 1,", "not valid JSON"),
        ("{\"a\": 1} x", "not valid JSON"),
        ("[1]", "not a JSON object"),
        ("\"x\"", "not a JSON object"),
        ("{\"runtimes\": []}", "\"runtimes\" is not a JSON object"),
        ("{\"a\": 1, \"a\": 2}", "duplicate key"),
    ] {
        let msg = err(Engine::Docker, text, &reg("agentfense"));
        assert!(msg.contains(why), "{text}: {msg}");
    }
}

// -------------------------------------------------------------------------------- containerd

const CRI: &str = "io.containerd.grpc.v1.cri";

fn runtime<'a>(doc: &'a toml_edit::DocumentMut, plugin: &str, name: &str) -> &'a toml_edit::Item {
    &doc["plugins"][plugin]["containerd"]["runtimes"][name]
}

#[test]
fn containerd_empty_file_gets_version_2() {
    let e = ok(Engine::Containerd, "", &reg("agentfense"));
    let want = format!(
        "version = 2\n\n\
         [plugins.\"{CRI}\".containerd.runtimes.runc]\n  \
         runtime_type = \"io.containerd.runc.v2\"\n\n\
         [plugins.\"{CRI}\".containerd.runtimes.agentfense]\n  \
         runtime_type = \"io.containerd.runc.v2\"\n  \
         pod_annotations = [\"agentfense.io/*\"]\n  \
         [plugins.\"{CRI}\".containerd.runtimes.agentfense.options]\n    \
         BinaryName = \"{BIN}\"\n"
    );
    assert_eq!(e.text, want);
    // Top-level settings alone do not change the layout: version 2 is added.
    let e = ok(
        Engine::Containerd,
        "root = \"/var/lib/containerd\"\n",
        &reg("agentfense"),
    );
    let doc = toml(&e.text);
    assert_eq!(doc["version"].as_integer(), Some(2));
    assert_eq!(doc["root"].as_str(), Some("/var/lib/containerd"));
}

const CONTAINERD_V2: &str = r#"# the node's containerd
version = 2
root = "/var/lib/containerd"
oom_score = -999

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes]
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
          runtime_type = "io.containerd.runc.v2"
          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
            SystemdCgroup = true   # kubelet uses systemd
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"#;

#[test]
fn containerd_v2_keeps_the_file_and_adds_the_handler() {
    let e = ok(Engine::Containerd, CONTAINERD_V2, &reg("agentfense"));
    // Everything that was there stays as written (comments too); the handler comes after.
    assert!(
        e.text.starts_with(CONTAINERD_V2),
        "changed the existing text:\n{}",
        e.text
    );
    let doc = toml(&e.text);
    let rt = runtime(&doc, CRI, "agentfense");
    assert_eq!(rt["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
    assert_eq!(
        rt["pod_annotations"]
            .as_array()
            .unwrap()
            .get(0)
            .unwrap()
            .as_str(),
        Some("agentfense.io/*")
    );
    assert_eq!(rt["options"]["BinaryName"].as_str(), Some(BIN));
    // The new handler takes runc's cgroup driver.
    assert_eq!(rt["options"]["SystemdCgroup"].as_bool(), Some(true));
    // The default runtime is not ours unless asked.
    assert_eq!(
        doc["plugins"][CRI]["containerd"]["default_runtime_name"].as_str(),
        Some("runc")
    );
    assert!(ok(Engine::Containerd, &e.text, &reg("agentfense")).unchanged());

    let mut r = reg("agentfense");
    r.make_default = true;
    let d = ok(Engine::Containerd, &e.text, &r);
    assert_eq!(d.changes.len(), 1, "{:?}", d.changes);
    assert!(d
        .text
        .contains("      default_runtime_name = \"agentfense\"\n"));
}

#[test]
fn containerd_v3_layout() {
    let text =
        "version = 3\n\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'overlayfs'\n";
    let e = ok(Engine::Containerd, text, &reg("agentfense"));
    assert!(e.text.starts_with(text));
    let doc = toml(&e.text);
    let rt = runtime(&doc, "io.containerd.cri.v1.runtime", "agentfense");
    assert_eq!(rt["options"]["BinaryName"].as_str(), Some(BIN));
    assert!(doc["plugins"].get(CRI).is_none());
    assert!(ok(Engine::Containerd, &e.text, &reg("agentfense")).unchanged());
}

#[test]
fn containerd_merges_into_an_existing_entry() {
    let text = format!(
        "version = 2\n[plugins.\"{CRI}\".containerd.runtimes.agentfense]\n  runtime_type = \"io.containerd.runc.v2\"\n  pod_annotations = [\"example.com/*\"]\n  privileged_without_host_devices = true\n  [plugins.\"{CRI}\".containerd.runtimes.agentfense.options]\n    BinaryName = \"/opt/agentfense-runc\"\n    SystemdCgroup = true\n"
    );
    let e = ok(Engine::Containerd, &text, &reg("agentfense"));
    assert_eq!(e.changes.len(), 3, "{:?}", e.changes);
    let doc = toml(&e.text);
    let rt = runtime(&doc, CRI, "agentfense");
    let ann: Vec<&str> = rt["pod_annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ann, ["example.com/*", "agentfense.io/*"]);
    assert_eq!(rt["privileged_without_host_devices"].as_bool(), Some(true));
    assert_eq!(rt["options"]["SystemdCgroup"].as_bool(), Some(true));
    assert_eq!(rt["options"]["BinaryName"].as_str(), Some(BIN));
    assert!(e
        .text
        .contains("\n    BinaryName = \"/usr/local/bin/agentfense-runc\"\n"));
}

#[test]
fn containerd_keeps_its_default_runc_runtime() {
    // containerd replaces its built-in runtimes with the file's: runc must be listed.
    let text =
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/usr/lib/cni\"\n";
    let e = ok(Engine::Containerd, text, &reg("agentfense"));
    assert!(e.text.starts_with(text));
    let doc = toml(&e.text);
    assert_eq!(
        runtime(&doc, CRI, "runc")["runtime_type"].as_str(),
        Some("io.containerd.runc.v2")
    );
    assert!(
        e.changes.iter().any(|c| c.contains("runtimes.runc")),
        "{:?}",
        e.changes
    );
    // Not when the default is another runtime (listed, or the administrator's business).
    let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"crun\"\n";
    let doc = toml(&ok(Engine::Containerd, text, &reg("agentfense")).text);
    let runtimes = doc["plugins"][CRI]["containerd"]["runtimes"]
        .as_table_like()
        .unwrap();
    assert!(runtimes.get("runc").is_none() && runtimes.get("agentfense").is_some());
}

#[test]
fn containerd_refuses_what_it_cannot_merge_safely() {
    let r = reg("agentfense");
    for (text, why) in [
        ("version = 2\n[plugins\n", "not valid TOML at line 2"),
        ("version = \"2\"\n", "not an integer"),
        ("version = 1\n[plugins.cri]\n", "version 1"),
        ("version = 4\n", "unknown config version 4"),
        ("[plugins.cri.containerd]\n", "no `version`"),
        (
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\ncontainerd = 3\n",
            "not a table",
        ),
        (
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.agentfense]\nruntime_type = \"io.containerd.kata.v2\"\n",
            "already exists",
        ),
    ] {
        let msg = err(Engine::Containerd, text, &r);
        assert!(msg.contains(why), "{text:?}: {msg}");
    }
    let mut a = reg("agentfense");
    a.runtime_args = vec!["--x".into()];
    assert!(err(Engine::Containerd, "", &a).contains("--runtime-arg is for Docker"));
}

// ------------------------------------------------------------------------------------ podman

const CONTAINERS_CONF: &str = r#"# containers.conf, as the distribution ships it
[containers]
default_capabilities = [
  "CHOWN",
  "KILL",
]

[engine]
# cgroup_manager = "systemd"
events_logger = "file"

[engine.runtimes]
#crun = [
#  "/usr/bin/crun",
#]
kata = ["/usr/bin/kata-runtime"]

[engine.volume_plugins]

[machine]
"#;

#[test]
fn podman_adds_a_runtime_and_keeps_the_rest() {
    let e = ok(Engine::Podman, CONTAINERS_CONF, &reg("agentfense"));
    let want = CONTAINERS_CONF.replace(
        "kata = [\"/usr/bin/kata-runtime\"]\n",
        &format!("kata = [\"/usr/bin/kata-runtime\"]\nagentfense = [\"{BIN}\"]\n"),
    );
    assert_eq!(e.text, want);
    assert!(ok(Engine::Podman, &e.text, &reg("agentfense")).unchanged());

    let mut r = reg("agentfense");
    r.make_default = true;
    let d = ok(Engine::Podman, &e.text, &r);
    assert_eq!(
        toml(&d.text)["engine"]["runtime"].as_str(),
        Some("agentfense")
    );
    assert_eq!(
        toml(&d.text)["engine"]["events_logger"].as_str(),
        Some("file")
    );
}

#[test]
fn podman_empty_file_and_refusals() {
    let e = ok(Engine::Podman, "", &reg("agentfense"));
    assert_eq!(
        e.text,
        format!("[engine.runtimes]\nagentfense = [\"{BIN}\"]\n")
    );
    assert!(err(Engine::Podman, "[engine\n", &reg("agentfense")).contains("not valid TOML"));
    assert!(err(Engine::Podman, CONTAINERS_CONF, &reg("kata")).contains("already exists"));
    assert!(err(Engine::Podman, "[engine]\nruntimes = 1\n", &reg("x")).contains("not a table"));
}

#[test]
fn odd_names_are_refused() {
    for engine in [Engine::Docker, Engine::Containerd, Engine::Podman] {
        for name in [
            "",
            "a b",
            "a\"b",
            "-x",
            "a/b",
            "a]b",
            "runc",
            &"x".repeat(64),
        ] {
            let msg = err(engine, "", &reg(name));
            assert!(msg.contains("name"), "{engine:?} {name:?}: {msg}");
        }
        assert!(err(engine, "", &Registration::new("agentfense", "rel/path")).contains("absolute"));
    }
}

// ------------------------------------------------------------------------- files and backups

#[test]
fn files_backups_idempotence_and_dry_run() {
    for (engine, unrelated) in [
        (Engine::Docker, DOCKER_UNRELATED),
        (Engine::Containerd, CONTAINERD_V2),
        (Engine::Podman, CONTAINERS_CONF),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        std::fs::write(&file, unrelated).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let r = reg("agentfense");

        // Dry run: prints the new file, writes nothing.
        let mut out = Vec::new();
        let o = configure(engine, &file, &r, true, &mut out).unwrap();
        assert!(!o.changes.is_empty());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            ok(engine, unrelated, &r).text
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), unrelated);
        assert!(backups(dir.path()).is_empty());

        // First run: a backup of the old file, the new file in its place with the old mode.
        let o = configure(engine, &file, &r, false, &mut Vec::new()).unwrap();
        let b = backups(dir.path());
        assert_eq!(b.len(), 1, "{engine:?}");
        assert_eq!(o.backup.as_ref(), Some(&b[0]));
        assert_eq!(std::fs::read_to_string(&b[0]).unwrap(), unrelated);
        let written = std::fs::read_to_string(&file).unwrap();
        assert_eq!(written, ok(engine, unrelated, &r).text);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{engine:?}");

        // Second run: already configured, nothing written, no new backup.
        let o = configure(engine, &file, &r, false, &mut Vec::new()).unwrap();
        assert!(o.changes.is_empty() && o.backup.is_none());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), written);
        assert_eq!(backups(dir.path()).len(), 1);

        // Nothing else left in the directory (no temporary files).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}

#[test]
fn missing_file_is_created_without_backup() {
    for engine in [Engine::Docker, Engine::Containerd, Engine::Podman] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub").join("config");
        let o = configure(engine, &file, &reg("agentfense"), false, &mut Vec::new()).unwrap();
        assert!(o.backup.is_none());
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            ok(engine, "", &reg("agentfense")).text
        );
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }
}

#[test]
fn malformed_files_are_refused_and_left_untouched() {
    for (engine, bad) in [
        (Engine::Docker, "{\"debug\": true,,}\n"),
        (Engine::Containerd, "version = 2\n[plugins.\"x\"\n"),
        (Engine::Podman, "[engine.runtimes]\nagentfense = [\n"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config");
        std::fs::write(&file, bad).unwrap();
        let e = configure(engine, &file, &reg("agentfense"), false, &mut Vec::new()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("nothing was changed"), "{msg}");
        assert!(msg.contains("not valid"), "{msg}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), bad);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

#[test]
fn a_symlinked_config_is_edited_through_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.json");
    std::fs::write(&real, "{\"debug\": true}\n").unwrap();
    let link = dir.path().join("daemon.json");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    configure(
        Engine::Docker,
        &link,
        &reg("agentfense"),
        false,
        &mut Vec::new(),
    )
    .unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::read_to_string(&real)
        .unwrap()
        .contains("agentfense"));
}

// ------------------------------------------------------------------------------ command line

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_agentfense-runc"))
        .arg("configure")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn command_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("daemon.json");
    let f = file.to_str().unwrap();
    std::fs::write(&file, "{\"debug\": true}\n").unwrap();

    // Dry run: the new file on stdout, nothing written.
    let o = cli(&["docker", "--config", f, "--dry-run"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // By default, the binary registers itself (its file on disk, not the sealed copy).
    let me = std::fs::canonicalize(env!("CARGO_BIN_EXE_agentfense-runc")).unwrap();
    assert_eq!(v["runtimes"]["agentfense"]["path"], me.to_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "{\"debug\": true}\n"
    );

    // Runtime arguments may start with dashes.
    let o = cli(&[
        "docker",
        "--config",
        f,
        "--name",
        "agentfense-cfg",
        "--runtime-path",
        BIN,
        "--runtime-arg",
        "--agentfense-config",
        "--runtime-arg",
        "/etc/agentfense/config.json",
    ]);
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("runtimes.agentfense-cfg: added"), "{out}");
    assert!(out.contains("previous version saved as"), "{out}");
    assert!(out.contains("kill -HUP $(pidof dockerd)"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(v["debug"], true);
    assert_eq!(
        v["runtimes"]["agentfense-cfg"]["runtimeArgs"],
        serde_json::json!(["--agentfense-config", "/etc/agentfense/config.json"])
    );

    // Again: already configured.
    let o = cli(&[
        "docker",
        "--config",
        f,
        "--name",
        "agentfense-cfg",
        "--runtime-path",
        BIN,
        "--runtime-arg=--agentfense-config",
        "--runtime-arg=/etc/agentfense/config.json",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("already configured"));
    assert_eq!(backups(dir.path()).len(), 1);

    // A malformed file: exit 1, the parse error, the file untouched.
    std::fs::write(&file, "{oops").unwrap();
    let o = cli(&["docker", "--config", f]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not valid JSON"),
        "{o:?}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "{oops");

    // containerd and podman say what to restart.
    let c = dir.path().join("config.toml");
    let o = cli(&[
        "containerd",
        "--config",
        c.to_str().unwrap(),
        "--runtime-path",
        BIN,
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("restart containerd"),
        "{o:?}"
    );
    let p = dir.path().join("containers.conf");
    let o = cli(&[
        "podman",
        "--config",
        p.to_str().unwrap(),
        "--runtime-path",
        BIN,
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("podman --runtime agentfense"),
        "{o:?}"
    );
    let o = cli(&[
        "podman",
        "--config",
        p.to_str().unwrap(),
        "--runtime-arg",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(1));
}

//! The shipped configuration examples are valid as shipped.

use std::path::Path;

use agentfense::config::AdminConfig;
use agentfense::policy::Level;

fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config-examples")
        .join(name)
}

#[test]
fn admin_config_example_loads_and_its_floor_hides_secrets() {
    let cfg = AdminConfig::load(&example("agentfense-config.json")).unwrap();
    assert_eq!(cfg.floor.len(), 2);
    // Even a full-access container cannot see what the floor hides.
    let policy = agentfense::policy::Policy::preset(agentfense::policy::Preset::FullAccess)
        .unwrap()
        .with_floor(&cfg.floor)
        .unwrap();
    assert_eq!(policy.decide("/.env", false).level, Level::None);
    assert_eq!(policy.decide("/a/tls.pem", false).level, Level::None);
    assert_eq!(policy.decide("/src/main.rs", false).level, Level::Write);
}

#[test]
fn docker_daemon_example_registers_the_runtime() {
    let text = std::fs::read_to_string(example("docker-daemon.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["runtimes"]["agentfense"]["path"],
        "/usr/local/bin/agentfense-runc"
    );
    assert_eq!(
        v["runtimes"]["agentfense-safe"]["runtimeArgs"][0],
        "--agentfense-config"
    );
}

// ------------------------------------------------ what `configure` writes is what is shipped

use agentfense::cli::configure::{edit, Engine, Registration};

const INSTALLED: &str = "/usr/local/bin/agentfense-runc";

fn read(name: &str) -> String {
    std::fs::read_to_string(example(name)).unwrap()
}

/// The keys and values of a TOML table, recursively, formatting and comments aside.
fn toml_tree(item: &toml_edit::Item) -> serde_json::Value {
    use serde_json::{json, Value};
    fn value(v: &toml_edit::Value) -> Value {
        match v {
            toml_edit::Value::String(s) => json!(s.value()),
            toml_edit::Value::Integer(i) => json!(i.value()),
            toml_edit::Value::Boolean(b) => json!(b.value()),
            toml_edit::Value::Array(a) => Value::Array(a.iter().map(value).collect()),
            other => json!(other.to_string().trim()),
        }
    }
    match item {
        toml_edit::Item::Value(v) if v.is_inline_table() => {
            let t = v.as_inline_table().unwrap();
            Value::Object(t.iter().map(|(k, v)| (k.to_string(), value(v))).collect())
        }
        toml_edit::Item::Value(v) => value(v),
        toml_edit::Item::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.to_string(), toml_tree(v)))
                .collect(),
        ),
        other => panic!("unexpected {other:?}"),
    }
}

fn toml_doc(text: &str) -> serde_json::Value {
    let doc: toml_edit::DocumentMut = text.parse().unwrap();
    toml_tree(doc.as_item())
}

#[test]
fn configure_docker_writes_the_shipped_example() {
    let mut safe = Registration::new("agentfense-safe", INSTALLED);
    safe.runtime_args = vec![
        "--agentfense-config".into(),
        "/etc/agentfense/config.json".into(),
    ];
    let first = edit(
        Engine::Docker,
        "",
        &Registration::new("agentfense", INSTALLED),
    )
    .unwrap();
    let both = edit(Engine::Docker, &first.text, &safe).unwrap();
    let shipped: serde_json::Value = serde_json::from_str(&read("docker-daemon.json")).unwrap();
    let written: serde_json::Value = serde_json::from_str(&both.text).unwrap();
    assert_eq!(written, shipped);
    // And on the shipped file, configure finds nothing to do.
    for reg in [Registration::new("agentfense", INSTALLED), safe] {
        assert!(edit(Engine::Docker, &read("docker-daemon.json"), &reg)
            .unwrap()
            .unchanged());
    }
}

#[test]
fn configure_containerd_writes_the_shipped_examples() {
    let reg = Registration::new("agentfense", INSTALLED);
    // An empty file gets the version 2 layout (containerd 1.x).
    let v2 = edit(Engine::Containerd, "", &reg).unwrap();
    assert_eq!(
        toml_doc(&v2.text),
        toml_doc(&read("containerd-config-v2.toml"))
    );
    // A version 3 file (containerd 2.x) gets the version 3 layout.
    let v3 = edit(Engine::Containerd, "version = 3\n", &reg).unwrap();
    assert_eq!(
        toml_doc(&v3.text),
        toml_doc(&read("containerd-config-v3.toml"))
    );
    for name in ["containerd-config-v2.toml", "containerd-config-v3.toml"] {
        let e = edit(Engine::Containerd, &read(name), &reg).unwrap();
        assert!(e.unchanged(), "{name}: {:?}", e.changes);
    }
    let v3 = toml_doc(&read("containerd-config-v3.toml"));
    let rt = &v3["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["agentfense"];
    assert_eq!(rt["pod_annotations"][0], "agentfense.io/*");
    assert_eq!(rt["options"]["BinaryName"], INSTALLED);
}

#[test]
fn configure_podman_writes_the_shipped_example() {
    let reg = Registration::new("agentfense", INSTALLED);
    let written = edit(Engine::Podman, "", &reg).unwrap();
    let shipped = read("podman-containers.conf");
    assert_eq!(toml_doc(&written.text), toml_doc(&shipped));
    assert_eq!(
        toml_doc(&shipped)["engine"]["runtimes"]["agentfense"][0],
        INSTALLED
    );
    assert!(edit(Engine::Podman, &shipped, &reg).unwrap().unchanged());
}

#[test]
fn runtimeclass_example_uses_the_containerd_handler_and_valid_annotations() {
    let text = read("runtimeclass.yaml");
    let docs: Vec<&str> = text.split("\n---\n").collect();
    assert_eq!(docs.len(), 2);
    let has = |doc: &str, line: &str| doc.lines().any(|l| l == line);
    assert!(has(docs[0], "kind: RuntimeClass"));
    assert!(has(docs[0], "apiVersion: node.k8s.io/v1"));
    // The handler is the runtime name the containerd examples register.
    assert!(has(docs[0], "handler: agentfense"));
    for name in ["containerd-config-v2.toml", "containerd-config-v3.toml"] {
        assert!(read(name).contains(".containerd.runtimes.agentfense]"));
    }
    assert!(has(docs[1], "kind: Pod"));
    assert!(has(docs[1], "  runtimeClassName: agentfense"));
    // Every agentfense.io/ annotation is one the runtime knows, and the preset exists.
    let known = [
        "policy",
        "preset",
        "policy-name",
        "workspace",
        "delta",
        "audit",
    ];
    let mut preset = None;
    for line in docs[1].lines() {
        if let Some(rest) = line.trim().strip_prefix("agentfense.io/") {
            let (key, value) = rest.split_once(": ").unwrap();
            assert!(known.contains(&key), "unknown annotation {key}");
            if key == "preset" {
                preset = Some(value.trim().to_string());
            }
        }
    }
    let preset = preset.expect("the pod asks for a preset");
    preset
        .parse::<agentfense::policy::Preset>()
        .unwrap_or_else(|e| panic!("{e}"));
}

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

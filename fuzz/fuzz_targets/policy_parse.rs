//! Arbitrary bytes as a policy document, an admin configuration and an annotation value:
//! parsing never panics, and whatever parses can be decided and explained.
#![no_main]

use std::collections::HashMap;

use agentfense::config::AdminConfig;
use agentfense::policy::{from_spec, Level, Policy, PolicySpec};
use libfuzzer_sys::fuzz_target;

const PATHS: [&str; 8] = [
    "/",
    "/a",
    "/src/main.rs",
    "/.git/config",
    "/secrets/public.key",
    "a/../../b",
    "//x//y/",
    "/output/.env",
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = PolicySpec::parse(&text);
    if let Ok(policy) = Policy::from_json(&text) {
        for p in PATHS {
            let d = policy.decide(p, true);
            assert!(d.rule.is_none_or(|i| i < policy.rules().len()));
            assert!(!d.traversable || d.level == Level::None);
            let e = policy.explain(p);
            assert_eq!(e.level, d.level);
            assert_eq!(e.rule, d.rule);
        }
        let _ = policy.canonical_json();
    }
    let _ = AdminConfig::from_json(&text);
    let mut ann = HashMap::new();
    ann.insert("agentfense.io/policy".to_string(), text.to_string());
    let read = |_: &str| -> std::io::Result<String> { Ok(text.to_string()) };
    let _ = from_spec(&ann, &[], &AdminConfig::default(), &read);
    let env = vec![format!("AGENTFENSE_POLICY_NAME={text}")];
    let _ = from_spec(&HashMap::new(), &env, &AdminConfig::default(), &read);
});

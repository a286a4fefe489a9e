//! The administrator's settings (`--agentfense-config FILE`): a JSON object, every field
//! optional.
//!
//! ```json
//! {
//!   "state_dir": "/var/lib/agentfense",
//!   "policy_dir": "/etc/agentfense/policies",
//!   "default_policy": {"preset": "agent-safe"},
//!   "floor": [{"pattern": "**/.ssh/**", "permission": "none", "priority": 1000}],
//!   "default_delta": "keep",
//!   "default_audit": "all",
//!   "audit_overflow": "count"
//! }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::policy::{AuditLevel, DeltaMode, PolicyError, PolicySpec, Rule};

/// Default state directory (SPEC §6).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/agentfense";
/// Default directory of named policies (`agentfense.io/policy-name`).
pub const DEFAULT_POLICY_DIR: &str = "/etc/agentfense/policies";

/// What to do when an audit record cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOverflow {
    /// Go on, and count the lost records in the `delete` record. The default.
    #[default]
    Count,
    /// Block the operation until the record is written.
    Block,
}

impl FromStr for AuditOverflow {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "count" => Ok(AuditOverflow::Count),
            "block" => Ok(AuditOverflow::Block),
            _ => Err(PolicyError::invalid(format!(
                "unknown value {s:?}; expected one of count, block"
            ))),
        }
    }
}

impl fmt::Display for AuditOverflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuditOverflow::Count => "count",
            AuditOverflow::Block => "block",
        })
    }
}

/// The administrator's settings. Only the administrator (whoever writes the runtime's
/// configuration) sets these; nothing a container asks for changes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where per-container state (deltas, audit trails) lives.
    pub state_dir: PathBuf,
    /// Where named policies (`agentfense.io/policy-name`) are looked up.
    pub policy_dir: PathBuf,
    /// The policy of containers that name none (then every container is fenced).
    pub default_policy: Option<PolicySpec>,
    /// Mandatory rules: a container's policy can restrict further but never loosen them.
    pub floor: Vec<Rule>,
    /// Delta mode of containers that name none.
    pub default_delta: DeltaMode,
    /// Audit level of containers that name none.
    pub default_audit: AuditLevel,
    /// What to do when an audit record cannot be written.
    pub audit_overflow: AuditOverflow,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            policy_dir: PathBuf::from(DEFAULT_POLICY_DIR),
            default_policy: None,
            floor: Vec::new(),
            default_delta: DeltaMode::Keep,
            default_audit: AuditLevel::All,
            audit_overflow: AuditOverflow::Count,
        }
    }
}

const FIELDS: &str =
    "state_dir, policy_dir, default_policy, floor, default_delta, default_audit, audit_overflow";

impl AdminConfig {
    /// Parses the configuration. Unknown fields, duplicate keys, relative directories and
    /// invalid policies are errors naming the field (`floor: rule 2: unknown permission ...`).
    pub fn from_json(json: &str) -> Result<AdminConfig, PolicyError> {
        let v = crate::policy::parse_json_strict(json)?;
        let Value::Object(map) = v else {
            return Err(PolicyError::invalid(
                "the configuration must be a JSON object",
            ));
        };
        let mut c = AdminConfig::default();
        let mut errors = Vec::new();
        for (k, v) in &map {
            let r: Result<(), PolicyError> = (|| {
                match k.as_str() {
                    "state_dir" => c.state_dir = abs_dir(v)?,
                    "policy_dir" => c.policy_dir = abs_dir(v)?,
                    "default_policy" => {
                        if !v.is_null() {
                            if v.is_string() {
                                return Err(PolicyError::invalid(
                                    "expected a rule array or a policy object; for a preset write {\"preset\": \"agent-safe\"}",
                                ));
                            }
                            c.default_policy = Some(PolicySpec::from_value(v)?);
                        }
                    }
                    "floor" => {
                        if !v.is_null() {
                            c.floor = crate::policy::parse_rules_json_value(v)?;
                        }
                    }
                    "default_delta" => c.default_delta = string(v)?.parse()?,
                    "default_audit" => c.default_audit = string(v)?.parse()?,
                    "audit_overflow" => c.audit_overflow = string(v)?.parse()?,
                    other => {
                        return Err(PolicyError::invalid(format!(
                            "unknown field {other:?} in the configuration; expected one of {FIELDS}"
                        )))
                    }
                }
                Ok(())
            })();
            if let Err(e) = r {
                errors.push(if FIELDS.split(", ").any(|f| f == k) {
                    e.context(k.clone())
                } else {
                    e
                });
            }
        }
        if errors.is_empty() {
            // The floor must compile on its own (e.g. the set of all its patterns).
            if !c.floor.is_empty() {
                crate::policy::Policy::new(Vec::new(), crate::policy::Level::Write)
                    .and_then(|p| p.with_floor(&c.floor))
                    .map_err(|e| e.context("floor"))?;
            }
            if let Some(spec) = &c.default_policy {
                spec.compile().map_err(|e| e.context("default_policy"))?;
            }
            Ok(c)
        } else {
            Err(PolicyError::from_many(errors))
        }
    }

    /// Reads and parses the configuration file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<AdminConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("cannot read the configuration {}: {e}", path.display())
        })?;
        AdminConfig::from_json(&text)
            .map_err(|e| anyhow::anyhow!("configuration {}: {e}", path.display()))
    }

    /// Reads the named policy `name` of the policy directory: `policy_dir/NAME.json` if it
    /// exists, else `policy_dir/NAME`. The name must pass
    /// [`crate::policy::source::validate_policy_name`] (checked here again, so that this never
    /// reads outside the directory). Use as the `read_named` callback of
    /// [`crate::policy::from_spec`].
    pub fn read_named_policy(&self, name: &str) -> std::io::Result<String> {
        crate::policy::source::validate_policy_name(name)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let with_ext = self.policy_dir.join(format!("{name}.json"));
        match std::fs::read_to_string(&with_ext) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::read_to_string(self.policy_dir.join(name)).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!(
                                "no policy named {name:?} in the administrator's policy directory"
                            ),
                        )
                    } else {
                        e
                    }
                })
            }
            other => other,
        }
    }
}

impl<'de> Deserialize<'de> for AdminConfig {
    /// Deserialises through [`AdminConfig::from_json`]'s checks.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        AdminConfig::from_json(&v.to_string()).map_err(serde::de::Error::custom)
    }
}

fn string(v: &Value) -> Result<&str, PolicyError> {
    v.as_str()
        .ok_or_else(|| PolicyError::invalid("expected a string"))
}

fn abs_dir(v: &Value) -> Result<PathBuf, PolicyError> {
    let s = string(v)?;
    if !s.starts_with('/') {
        return Err(PolicyError::invalid(format!(
            "{s:?} is not an absolute path"
        )));
    }
    if s.contains('\0') {
        return Err(PolicyError::invalid("contains a NUL byte"));
    }
    Ok(PathBuf::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Level, Preset};

    #[test]
    fn defaults() {
        let c = AdminConfig::from_json("{}").unwrap();
        assert_eq!(c, AdminConfig::default());
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/agentfense"));
        assert_eq!(c.policy_dir, PathBuf::from("/etc/agentfense/policies"));
    }

    #[test]
    fn full() {
        let c = AdminConfig::from_json(
            r#"{"state_dir": "/srv/af", "policy_dir": "/srv/pol", "default_policy": {"preset": "read-only"},
                "floor": [{"pattern": "**/.ssh/**", "permission": "none"}], "default_delta": "discard",
                "default_audit": "deny", "audit_overflow": "block"}"#,
        )
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/srv/af"));
        assert_eq!(
            c.default_policy.as_ref().and_then(|p| p.preset),
            Some(Preset::ReadOnly)
        );
        assert_eq!(c.floor, vec![Rule::glob("**/.ssh/**", Level::None)]);
        assert_eq!(c.default_delta, DeltaMode::Discard);
        assert_eq!(c.default_audit, AuditLevel::Deny);
        assert_eq!(c.audit_overflow, AuditOverflow::Block);
        let via_serde: AdminConfig = serde_json::from_str(r#"{"default_delta":"commit"}"#).unwrap();
        assert_eq!(via_serde.default_delta, DeltaMode::Commit);
    }

    #[test]
    fn errors() {
        let msg = |j: &str| AdminConfig::from_json(j).unwrap_err().to_string();
        assert_eq!(
            msg(r#"{"statedir": "/x"}"#),
            format!("unknown field \"statedir\" in the configuration; expected one of {FIELDS}")
        );
        assert_eq!(
            msg(r#"{"state_dir": "x"}"#),
            "state_dir: \"x\" is not an absolute path"
        );
        assert_eq!(
            msg(r#"{"floor": [{"pattern": "a", "permission": "rw"}]}"#),
            "floor: rule 0: unknown permission \"rw\"; expected one of none, view, read, write"
        );
        assert_eq!(
            msg(r#"{"default_delta": "save"}"#),
            "default_delta: unknown delta mode \"save\"; expected one of keep, commit, discard, off"
        );
        assert!(msg(r#"{"default_policy": "agent-safe"}"#)
            .starts_with("default_policy: expected a rule array"));
        assert!(
            msg(r#"{"floor": {"rules": []}}"#).starts_with("floor: expected a JSON array of rules")
        );
        assert!(msg(r#"{"audit_overflow": "drop"}"#).starts_with("audit_overflow: unknown value"));
        assert!(msg("[]").contains("must be a JSON object"));
        assert!(msg(r#"{"state_dir": "/a", "state_dir": "/b"}"#).contains("duplicate key"));
    }

    #[test]
    fn named_policy_lookup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ci.json"), "[]").unwrap();
        std::fs::write(dir.path().join("plain"), "{}").unwrap();
        let c = AdminConfig {
            policy_dir: dir.path().to_path_buf(),
            ..AdminConfig::default()
        };
        assert_eq!(c.read_named_policy("ci").unwrap(), "[]");
        assert_eq!(c.read_named_policy("plain").unwrap(), "{}");
        assert!(c.read_named_policy("missing").is_err());
        assert!(c.read_named_policy("../etc/passwd").is_err());
        assert!(c.read_named_policy("/etc/passwd").is_err());
    }
}

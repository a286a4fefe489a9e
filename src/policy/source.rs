//! Reading a container's fencing request from its OCI spec (SPEC §2): `agentfense.io/`
//! annotations, else `AGENTFENSE_*` variables of the process environment, else the
//! administrator's default policy. Pure: the one file read (a named policy) is a callback.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::engine::{effective_rules, EffectiveRule, Origin};
use super::error::quote;
use super::{Level, Policy, PolicyError, PolicySpec, Preset};
use crate::config::AdminConfig;

/// Prefix of the annotations this runtime reads.
pub const ANNOTATION_PREFIX: &str = "agentfense.io/";
/// Prefix of the environment variables this runtime reads (and removes).
pub const ENV_PREFIX: &str = "AGENTFENSE_";
/// The workspace fenced when none is named.
pub const DEFAULT_WORKSPACE: &str = "/workspace";
/// Most workspace paths one container may fence.
pub const MAX_WORKSPACES: usize = 32;

/// What happens to the container's writes (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeltaMode {
    /// Keep the delta in the state directory at delete. The default.
    #[default]
    Keep,
    /// Apply the delta to the base at delete.
    Commit,
    /// Drop the delta at delete.
    Discard,
    /// No delta: writes go straight to the base.
    Off,
}

impl DeltaMode {
    /// The name used in annotations and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DeltaMode::Keep => "keep",
            DeltaMode::Commit => "commit",
            DeltaMode::Discard => "discard",
            DeltaMode::Off => "off",
        }
    }
}

impl fmt::Display for DeltaMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeltaMode {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "keep" => Ok(DeltaMode::Keep),
            "commit" => Ok(DeltaMode::Commit),
            "discard" => Ok(DeltaMode::Discard),
            "off" => Ok(DeltaMode::Off),
            _ => Err(PolicyError::invalid(format!(
                "unknown delta mode {}; expected one of keep, commit, discard, off",
                quote(s)
            ))),
        }
    }
}

/// How much is audited (SPEC §6). Ordered: `Off < Deny < Write < All`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AuditLevel {
    /// Nothing.
    Off,
    /// Refusals and probes of hidden paths.
    Deny,
    /// Plus every change.
    Write,
    /// Plus every open and listing. The default.
    #[default]
    All,
}

impl AuditLevel {
    /// The name used in annotations and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditLevel::Off => "off",
            AuditLevel::Deny => "deny",
            AuditLevel::Write => "write",
            AuditLevel::All => "all",
        }
    }
}

impl fmt::Display for AuditLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuditLevel {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(AuditLevel::Off),
            "deny" => Ok(AuditLevel::Deny),
            "write" => Ok(AuditLevel::Write),
            "all" => Ok(AuditLevel::All),
            _ => Err(PolicyError::invalid(format!(
                "unknown audit level {}; expected one of off, deny, write, all",
                quote(s)
            ))),
        }
    }
}

/// Where a fencing request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// `agentfense.io/` annotations.
    Annotations,
    /// `AGENTFENSE_*` environment variables.
    Env,
    /// The administrator's default policy (the container named no policy; it may still have
    /// set the workspace, delta or audit).
    AdminDefault,
}

/// A container's fencing request, ready for the fence.
#[derive(Debug, Clone)]
pub struct FenceRequest {
    /// The compiled policy, admin floor applied.
    pub policy: Policy,
    /// [`Policy::canonical_json`]: the effective rules, for audit records.
    pub policy_json: String,
    /// SHA-256 of `policy_json`, lowercase hex.
    pub policy_sha256: String,
    /// The container paths to fence: absolute, normalised, distinct, not nested, not `/`.
    pub workspaces: Vec<String>,
    /// What happens to the container's writes.
    pub delta: DeltaMode,
    /// How much is audited.
    pub audit: AuditLevel,
    /// Names of the environment variables to remove from the container process's
    /// environment (every `AGENTFENSE_*` entry, whether or not it was used).
    pub remove_env: Vec<String>,
    /// Where the request came from.
    pub source: Source,
}

impl FenceRequest {
    /// `env` without the entries named in [`FenceRequest::remove_env`].
    pub fn filter_env(&self, env: &[String]) -> Vec<String> {
        env.iter()
            .filter(|e| !self.remove_env.iter().any(|n| env_name(e) == n))
            .cloned()
            .collect()
    }
}

fn env_name(entry: &str) -> &str {
    entry.split_once('=').map_or(entry, |(k, _)| k)
}

/// The keys of SPEC §2's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Policy,
    Preset,
    PolicyName,
    Workspace,
    Delta,
    Audit,
}

const KEYS: [Key; 6] = [
    Key::Policy,
    Key::Preset,
    Key::PolicyName,
    Key::Workspace,
    Key::Delta,
    Key::Audit,
];

impl Key {
    fn suffix(self) -> &'static str {
        match self {
            Key::Policy => "policy",
            Key::Preset => "preset",
            Key::PolicyName => "policy-name",
            Key::Workspace => "workspace",
            Key::Delta => "delta",
            Key::Audit => "audit",
        }
    }
    fn env(self) -> &'static str {
        match self {
            Key::Policy => "AGENTFENSE_POLICY",
            Key::Preset => "AGENTFENSE_PRESET",
            Key::PolicyName => "AGENTFENSE_POLICY_NAME",
            Key::Workspace => "AGENTFENSE_WORKSPACE",
            Key::Delta => "AGENTFENSE_DELTA",
            Key::Audit => "AGENTFENSE_AUDIT",
        }
    }
    fn annotation(self) -> String {
        format!("{ANNOTATION_PREFIX}{}", self.suffix())
    }
}

/// The values found, each with the name it was given under (for messages).
#[derive(Default)]
struct Settings {
    values: [Option<(String, String)>; 6],
}

impl Settings {
    fn get(&self, k: Key) -> Option<(&str, &str)> {
        self.values[k as usize]
            .as_ref()
            .map(|(l, v)| (l.as_str(), v.as_str()))
    }
    fn is_empty(&self) -> bool {
        self.values.iter().all(Option::is_none)
    }
    fn label(&self, k: Key, from_env: bool) -> String {
        match self.get(k) {
            Some((l, _)) => l.to_string(),
            None if from_env => k.env().to_string(),
            None => k.annotation(),
        }
    }
}

/// Annotations that mark a Kubernetes sandbox (pause) container, which is never fenced.
fn is_sandbox(annotations: &HashMap<String, String>) -> bool {
    annotations
        .get("io.kubernetes.cri.container-type")
        .is_some_and(|v| v == "sandbox")
        || annotations
            .get("io.kubernetes.cri-o.ContainerType")
            .is_some_and(|v| v == "sandbox")
}

/// Reads a container's fencing request from its OCI annotations and process environment.
///
/// - `agentfense.io/` annotations, if any; else `AGENTFENSE_*` entries of `env`; else the
///   administrator's default policy, if there is one. Giving both annotations and
///   `AGENTFENSE_*` variables is an error (which one was meant is not clear).
/// - `Ok(None)`: the container is not fenced (it asked for nothing and the administrator set
///   no default, or it is a Kubernetes sandbox container).
/// - `read_named(NAME)` returns the text of the administrator's policy file `NAME` (see
///   [`AdminConfig::read_named_policy`]); it is only called with names that passed
///   validation (`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`, no `..`).
///
/// Any unknown `agentfense.io/` key or `AGENTFENSE_*` variable, bad value, or setting given
/// without a policy (when the administrator set no default) is an error: a typo must never
/// leave a container unfenced.
pub fn from_spec(
    annotations: &HashMap<String, String>,
    env: &[String],
    admin: &AdminConfig,
    read_named: &dyn Fn(&str) -> std::io::Result<String>,
) -> Result<Option<FenceRequest>, PolicyError> {
    if is_sandbox(annotations) {
        return Ok(None);
    }
    let ann = annotation_settings(annotations)?;
    let (envs, remove_env) = env_settings(env)?;
    if !ann.is_empty() && !envs.is_empty() {
        let a = KEYS
            .iter()
            .find_map(|&k| ann.get(k).map(|(l, _)| l.to_string()))
            .unwrap_or_default();
        let e = KEYS
            .iter()
            .find_map(|&k| envs.get(k).map(|(l, _)| l.to_string()))
            .unwrap_or_default();
        return Err(PolicyError::invalid(format!(
            "fencing is requested both by annotations ({a}) and by environment variables ({e}); use one or the other"
        )));
    }
    let (settings, from_env) = if ann.is_empty() {
        (envs, true)
    } else {
        (ann, false)
    };
    let source = if from_env {
        Source::Env
    } else {
        Source::Annotations
    };

    let inputs = PolicyInputs {
        policy: settings.get(Key::Policy),
        preset: settings.get(Key::Preset),
        policy_name: settings.get(Key::PolicyName),
    };
    if from_env {
        // The engine merges the image's ENV with the user's variables: two policy sources in
        // the environment may come from two parties, and an image must not add rules to the
        // user's. One source only (an inline policy can still name a preset and add rules).
        let given: Vec<&str> = [inputs.policy, inputs.preset, inputs.policy_name]
            .into_iter()
            .flatten()
            .map(|(l, _)| l)
            .collect();
        if given.len() > 1 {
            return Err(PolicyError::invalid(format!(
                "{} are both given in the environment; give one of them (an image's ENV must not \
                 add to the user's policy): to add rules to a preset, name it in the inline \
                 policy ({{\"preset\": ..., \"rules\": [...]}}) or use annotations",
                given.join(" and ")
            )));
        }
    }
    let (policy, source) = match resolve_policy(&inputs, admin, read_named)? {
        Some(p) => (p, source),
        None => match admin_default_policy(admin)? {
            Some(p) => (p, Source::AdminDefault),
            None => {
                if let Some(k) = [Key::Workspace, Key::Delta, Key::Audit]
                    .into_iter()
                    .find(|&k| settings.get(k).is_some())
                {
                    return Err(PolicyError::invalid(format!(
                        "{} given but no {}, {} or {}: fencing is off without a policy",
                        settings.label(k, from_env),
                        settings.label(Key::Policy, from_env),
                        settings.label(Key::Preset, from_env),
                        settings.label(Key::PolicyName, from_env),
                    )));
                }
                return Ok(None);
            }
        },
    };

    let workspaces = match settings.get(Key::Workspace) {
        Some((label, v)) => parse_workspaces(v).map_err(|e| e.context(label))?,
        None => vec![DEFAULT_WORKSPACE.to_string()],
    };
    let delta = match settings.get(Key::Delta) {
        Some((label, v)) => v
            .trim()
            .parse::<DeltaMode>()
            .map_err(|e| e.context(label))?,
        None => admin.default_delta,
    };
    let audit = match settings.get(Key::Audit) {
        Some((label, v)) => v
            .trim()
            .parse::<AuditLevel>()
            .map_err(|e| e.context(label))?,
        None => admin.default_audit,
    };
    let policy_json = policy.canonical_json();
    let policy_sha256 = super::engine::sha256_hex(policy_json.as_bytes());
    Ok(Some(FenceRequest {
        policy,
        policy_json,
        policy_sha256,
        workspaces,
        delta,
        audit,
        remove_env,
        source,
    }))
}

fn annotation_settings(annotations: &HashMap<String, String>) -> Result<Settings, PolicyError> {
    let mut keys: Vec<&String> = annotations
        .keys()
        .filter(|k| k.starts_with(ANNOTATION_PREFIX))
        .collect();
    keys.sort();
    let mut s = Settings::default();
    let mut errors = Vec::new();
    for k in keys {
        let suffix = &k[ANNOTATION_PREFIX.len()..];
        match KEYS.iter().find(|key| key.suffix() == suffix) {
            Some(&key) => {
                let v = annotations.get(k).cloned().unwrap_or_default();
                s.values[key as usize] = Some((k.clone(), v));
            }
            None => errors.push(PolicyError::invalid(format!(
                "unknown annotation {}; expected one of {}",
                quote(k),
                KEYS.iter()
                    .map(|k| k.annotation())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
    if errors.is_empty() {
        Ok(s)
    } else {
        Err(PolicyError::from_many(errors))
    }
}

fn env_settings(env: &[String]) -> Result<(Settings, Vec<String>), PolicyError> {
    let mut s = Settings::default();
    let mut remove = Vec::new();
    let mut errors = Vec::new();
    for entry in env {
        let (name, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        if !name.starts_with(ENV_PREFIX) {
            continue;
        }
        if !remove.iter().any(|n: &String| n == name) {
            remove.push(name.to_string());
        }
        match KEYS.iter().find(|key| key.env() == name) {
            Some(&key) => {
                if s.values[key as usize].is_some() {
                    errors.push(PolicyError::invalid(format!(
                        "environment variable {name} is given more than once"
                    )));
                } else {
                    s.values[key as usize] = Some((name.to_string(), value.to_string()));
                }
            }
            None => errors.push(PolicyError::invalid(format!(
                "unknown environment variable {}; expected one of {}",
                quote(name),
                KEYS.iter().map(|k| k.env()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
    if errors.is_empty() {
        Ok((s, remove))
    } else {
        Err(PolicyError::from_many(errors))
    }
}

/// The sources that name a policy, each as `(label, value)`; the label (an annotation key,
/// a variable name, a command-line flag) is used in messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicyInputs<'a> {
    /// Inline policy JSON (either form).
    pub policy: Option<(&'a str, &'a str)>,
    /// A preset name.
    pub preset: Option<(&'a str, &'a str)>,
    /// The name of a policy in the administrator's policy directory.
    pub policy_name: Option<(&'a str, &'a str)>,
}

/// Builds the policy from the sources that name it (SPEC §2): the preset's or the named
/// policy's rules, then the inline policy's rules added; then the administrator's floor.
/// `Ok(None)` when no source is given. Giving both a preset and a policy name (or an inline
/// policy naming another preset) is an error.
pub fn resolve_policy(
    inputs: &PolicyInputs<'_>,
    admin: &AdminConfig,
    read_named: &dyn Fn(&str) -> std::io::Result<String>,
) -> Result<Option<Policy>, PolicyError> {
    if inputs.policy.is_none() && inputs.preset.is_none() && inputs.policy_name.is_none() {
        return Ok(None);
    }
    let mut preset = match inputs.preset {
        Some((label, v)) => Some((
            label,
            v.trim().parse::<Preset>().map_err(|e| e.context(label))?,
        )),
        None => None,
    };
    let named = match inputs.policy_name {
        Some((label, name)) => {
            if let Some((pl, _)) = preset {
                return Err(PolicyError::invalid(format!(
                    "{pl} and {label} are both given; give one of them (rules can be added with an inline policy)"
                )));
            }
            validate_policy_name(name).map_err(|e| e.context(label))?;
            let text = read_named(name).map_err(|e| {
                PolicyError::invalid(format!(
                    "cannot read the administrator's policy {}: {e}",
                    quote(name)
                ))
                .context(label)
            })?;
            let spec = PolicySpec::parse(&text)
                .map_err(|e| e.context(format!("{label} {}", quote(name))))?;
            Some((name, spec))
        }
        None => None,
    };
    let inline = match inputs.policy {
        Some((label, json)) => Some((
            label,
            PolicySpec::parse(json).map_err(|e| e.context(label))?,
        )),
        None => None,
    };
    if let Some((label, spec)) = &inline {
        if let Some(p) = spec.preset {
            if let Some((nl, _)) = inputs.policy_name {
                return Err(PolicyError::invalid(format!(
                    "{label} names preset {} and {nl} is given too; give one base policy",
                    quote(p.name())
                )));
            }
            match preset {
                Some((pl, q)) if q != p => {
                    return Err(PolicyError::invalid(format!(
                        "{label} names preset {} but {pl} is {}; give one preset",
                        quote(p.name()),
                        quote(q.name())
                    )))
                }
                Some(_) => {}
                None => preset = Some((label, p)),
            }
        }
    }

    let mut rules: Vec<EffectiveRule> = Vec::new();
    let mut default = None;
    if let Some((_, p)) = preset {
        rules.extend(effective_rules(&PolicySpec::preset(p), Origin::Policy));
    }
    if let Some((name, spec)) = named {
        rules.extend(effective_rules(&spec, Origin::Named(name.to_string())));
        default = spec.default;
    }
    if let Some((_, spec)) = inline {
        rules.extend(effective_rules(
            &PolicySpec {
                preset: None,
                ..spec.clone()
            },
            Origin::Policy,
        ));
        if spec.default.is_some() {
            default = spec.default;
        }
    }
    let policy = Policy::from_effective(rules, default.unwrap_or(Level::None))?;
    Ok(Some(policy.with_floor(&admin.floor)?))
}

/// The administrator's default policy, compiled with the floor, if one is configured.
pub fn admin_default_policy(admin: &AdminConfig) -> Result<Option<Policy>, PolicyError> {
    let Some(spec) = &admin.default_policy else {
        return Ok(None);
    };
    let policy = Policy::from_effective(
        effective_rules(spec, Origin::AdminDefault),
        spec.default_level(),
    )
    .map_err(|e| e.context("default_policy"))?;
    Ok(Some(policy.with_floor(&admin.floor)?))
}

/// Checks a policy name: 1 to 128 ASCII letters, digits, `.`, `_`, `-`, starting with a
/// letter or digit, without `..`. A name, never a path.
pub fn validate_policy_name(name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(PolicyError::invalid(format!(
            "invalid policy name {}: a name (never a path) is 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit, without \"..\"",
            quote(name)
        )))
    }
}

/// Parses `agentfense.io/workspace`: comma-separated absolute container paths, normalised;
/// no `..`, not `/`, no duplicates, none inside another.
pub fn parse_workspaces(value: &str) -> Result<Vec<String>, PolicyError> {
    let mut out: Vec<String> = Vec::new();
    for raw in value.split(',') {
        let p = raw.trim();
        if p.is_empty() {
            return Err(PolicyError::invalid(format!(
                "empty path in the list {}",
                quote(value)
            )));
        }
        if !p.starts_with('/') {
            return Err(PolicyError::invalid(format!(
                "{} is not an absolute path",
                quote(p)
            )));
        }
        if p.contains('\0') {
            return Err(PolicyError::invalid(format!(
                "{} contains a NUL byte",
                quote(p)
            )));
        }
        if p.split('/').any(|s| s == "..") {
            return Err(PolicyError::invalid(format!(
                "{} must not contain \"..\"",
                quote(p)
            )));
        }
        let n = super::normalize(p);
        if n == "/" {
            return Err(PolicyError::invalid(
                "the container's root \"/\" cannot be a workspace",
            ));
        }
        if out.contains(&n) {
            return Err(PolicyError::invalid(format!(
                "{} is listed twice",
                quote(&n)
            )));
        }
        if let Some(o) = out
            .iter()
            .find(|o| n.starts_with(&format!("{o}/")) || o.starts_with(&format!("{n}/")))
        {
            return Err(PolicyError::invalid(format!(
                "{} and {} are nested; fenced workspaces cannot contain one another",
                quote(o),
                quote(&n)
            )));
        }
        out.push(n);
        if out.len() > MAX_WORKSPACES {
            return Err(PolicyError::invalid(format!(
                "more than {MAX_WORKSPACES} workspaces"
            )));
        }
    }
    Ok(out)
}

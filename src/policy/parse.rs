//! The policy JSON forms (SPEC §3): a rule array, or
//! `{"preset": NAME, "rules": [...], "default": LEVEL}`.
//!
//! Parsing goes through a JSON value that refuses duplicate keys (a rule with two
//! `permission` fields is ambiguous to whoever reviews it) and is then checked field by
//! field, so that every error names the rule index and the field.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::error::quote;
pub use super::pattern::MAX_PATTERN_BYTES;
use super::{pattern, Level, Policy, PolicyError, Preset, Rule, RuleType};

/// Most rules a policy may have (preset rules included).
pub const MAX_RULES: usize = 10_000;

/// Largest policy document accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 16 << 20;

/// At most this many errors are reported for one document.
const MAX_ERRORS: usize = 50;

/// A parsed (not yet compiled) policy: the object form, with the array form meaning
/// `{"rules": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicySpec {
    /// The preset whose rules come first.
    pub preset: Option<Preset>,
    /// The rules, after the preset's.
    pub rules: Vec<Rule>,
    /// The level of paths no rule covers (`none` when absent).
    pub default: Option<Level>,
}

impl PolicySpec {
    /// Parses either JSON form. Errors name the rule index and field, e.g.
    /// `rule 3: unknown permission "rw"; expected one of none, view, read, write` or
    /// `rule 0: invalid pattern "a[": unclosed character class; missing ']'`; all problems
    /// of the document are reported at once (see [`PolicyError::messages`]).
    pub fn parse(json: &str) -> Result<PolicySpec, PolicyError> {
        let v = parse_strict(json)?;
        PolicySpec::from_value(&v)
    }

    /// A preset alone.
    pub fn preset(preset: Preset) -> PolicySpec {
        PolicySpec {
            preset: Some(preset),
            rules: Vec::new(),
            default: None,
        }
    }

    /// Checks an already parsed JSON value (see [`PolicySpec::parse`]).
    pub fn from_value(v: &Value) -> Result<PolicySpec, PolicyError> {
        match v {
            Value::Array(items) => Ok(PolicySpec { preset: None, rules: parse_rule_array(items)?, default: None }),
            Value::Object(map) => parse_object(map),
            other => Err(PolicyError::invalid(format!(
                "a policy is a JSON array of rules or an object {{\"preset\": NAME, \"rules\": [...], \"default\": LEVEL}}, not {}",
                kind_of(other)
            ))),
        }
    }

    /// The rules in effect: the preset's, then this policy's own.
    pub fn effective_rules(&self) -> Vec<Rule> {
        let mut out = self.preset.map(Preset::rules).unwrap_or_default();
        out.extend(self.rules.iter().cloned());
        out
    }

    /// The default level (`none` when not given).
    pub fn default_level(&self) -> Level {
        self.default.unwrap_or(Level::None)
    }

    /// Compiles this policy (without any admin floor).
    pub fn compile(&self) -> Result<Policy, PolicyError> {
        Policy::from_spec(self)
    }
}

/// Parses a rule array (the admin floor's form). Errors as for [`PolicySpec::parse`].
pub(crate) fn parse_rules_value(v: &Value) -> Result<Vec<Rule>, PolicyError> {
    match v {
        Value::Array(items) => parse_rule_array(items),
        other => Err(PolicyError::invalid(format!(
            "expected a JSON array of rules, not {}",
            kind_of(other)
        ))),
    }
}

/// Parses JSON, refusing duplicate object keys and oversized documents.
pub(crate) fn parse_strict(json: &str) -> Result<Value, PolicyError> {
    if json.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::invalid(format!(
            "policy is {} bytes long; at most {MAX_POLICY_BYTES} are allowed",
            json.len()
        )));
    }
    let mut de = serde_json::Deserializer::from_str(json);
    let v = StrictValue::deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| PolicyError::invalid(format!("invalid JSON: {e}")))?;
    Ok(v.0)
}

fn parse_object(map: &Map<String, Value>) -> Result<PolicySpec, PolicyError> {
    let mut errors = Vec::new();
    let mut spec = PolicySpec::default();
    for (k, v) in map {
        match k.as_str() {
            "preset" => match v.as_str() {
                Some(s) => match s.parse::<Preset>() {
                    Ok(p) => spec.preset = Some(p),
                    Err(e) => errors.push(e),
                },
                None => errors.push(PolicyError::invalid(format!(
                    "preset: expected a string (one of {}), not {}",
                    Preset::names(),
                    kind_of(v)
                ))),
            },
            "default" => match v.as_str() {
                Some(s) => match s.parse::<Level>() {
                    Ok(l) => spec.default = Some(l),
                    Err(e) => errors.push(e.context("default")),
                },
                None => errors.push(PolicyError::invalid(format!(
                    "default: expected a string (one of none, view, read, write), not {}",
                    kind_of(v)
                ))),
            },
            "rules" => match v {
                Value::Array(items) => match parse_rule_array(items) {
                    Ok(r) => spec.rules = r,
                    Err(e) => errors.push(e),
                },
                other => errors.push(PolicyError::invalid(format!(
                    "rules: expected an array of rules, not {}",
                    kind_of(other)
                ))),
            },
            other => errors.push(PolicyError::invalid(format!(
                "unknown field {} in the policy object; expected one of preset, rules, default",
                quote(other)
            ))),
        }
    }
    let total = spec.rules.len() + spec.preset.map_or(0, |p| p.rules().len());
    if errors.is_empty() && total > MAX_RULES {
        errors.push(too_many_rules(total));
    }
    if errors.is_empty() {
        Ok(spec)
    } else {
        Err(PolicyError::from_many(errors))
    }
}

pub(crate) fn too_many_rules(n: usize) -> PolicyError {
    PolicyError::invalid(format!(
        "the policy has {n} rules; at most {MAX_RULES} are allowed"
    ))
}

fn parse_rule_array(items: &[Value]) -> Result<Vec<Rule>, PolicyError> {
    if items.len() > MAX_RULES {
        return Err(too_many_rules(items.len()));
    }
    let mut rules = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match parse_rule(item) {
            Ok(r) => rules.push(r),
            Err(msgs) => {
                errors.extend(msgs.into_iter().map(|m| PolicyError::rule(i, m)));
                if errors.len() >= MAX_ERRORS {
                    errors.push(PolicyError::invalid(format!(
                        "too many errors; stopped at rule {i} of {}",
                        items.len()
                    )));
                    break;
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(PolicyError::from_many(errors))
    }
}

/// One rule; the errors are the messages to show after `rule N: `.
fn parse_rule(v: &Value) -> Result<Rule, Vec<String>> {
    let Value::Object(map) = v else {
        return Err(vec![format!(
            "expected an object {{\"pattern\": ..., \"permission\": ..., \"type\": ..., \"priority\": ...}}, not {}",
            kind_of(v)
        )]);
    };
    let mut errors = Vec::new();
    let mut pattern = None;
    let mut permission = None;
    let mut kind = RuleType::Glob;
    let mut priority = 0i64;
    for (k, v) in map {
        match k.as_str() {
            "pattern" => match v.as_str() {
                Some(s) => pattern = Some(s),
                None => errors.push(format!("pattern: expected a string, not {}", kind_of(v))),
            },
            "permission" => match v.as_str() {
                Some(s) => match s.parse::<Level>() {
                    Ok(l) => permission = Some(l),
                    Err(e) => errors.push(e.to_string()),
                },
                None => errors.push(format!(
                    "permission: expected a string (one of none, view, read, write), not {}",
                    kind_of(v)
                )),
            },
            "type" => match v.as_str() {
                Some(s) => match s.parse::<RuleType>() {
                    Ok(t) => kind = t,
                    Err(e) => errors.push(e.to_string()),
                },
                None => errors.push(format!(
                    "type: expected a string (one of glob, directory, file), not {}",
                    kind_of(v)
                )),
            },
            "priority" => match v.as_i64() {
                Some(p) => priority = p,
                None => errors.push(match v {
                    Value::Number(_) => format!(
                        "priority: {v} is not an integer between {} and {}",
                        i64::MIN,
                        i64::MAX
                    ),
                    other => format!("priority: expected an integer, not {}", kind_of(other)),
                }),
            },
            other => errors.push(format!(
                "unknown field {}; expected one of pattern, permission, type, priority",
                quote(other)
            )),
        }
    }
    if pattern.is_none() && !map.contains_key("pattern") {
        errors.push("missing field \"pattern\"".to_string());
    }
    if permission.is_none() && !map.contains_key("permission") {
        errors.push("missing field \"permission\" (one of none, view, read, write)".to_string());
    }
    if let Some(p) = pattern {
        if let Err(e) = pattern::compile(p, kind) {
            errors.push(e);
        }
    }
    match (pattern, permission) {
        (Some(p), Some(l)) if errors.is_empty() => Ok(Rule::new(p, l, kind, priority)),
        _ => Err(errors),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON value whose objects have no duplicate keys.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = StrictValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<StrictValue, E> {
        Ok(StrictValue(
            serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }
    fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }
    fn visit_none<E>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<StrictValue, D::Error> {
        StrictValue::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut v = Vec::new();
        while let Some(StrictValue(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(StrictValue(Value::Array(v)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(de::Error::custom(format_args!(
                    "duplicate key {}",
                    quote(&k)
                )));
            }
            let StrictValue(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(StrictValue(Value::Object(m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> Vec<String> {
        match PolicySpec::parse(json) {
            Ok(s) => panic!("{json} parsed: {s:?}"),
            Err(e) => e.messages(),
        }
    }

    #[test]
    fn both_forms() {
        let a = PolicySpec::parse(r#"[{"pattern": "/src/**", "permission": "read"}]"#).unwrap();
        assert_eq!(a.rules, vec![Rule::glob("/src/**", Level::Read)]);
        let o = PolicySpec::parse(
            r#"{"preset": "agent-safe", "rules": [{"pattern": "/x", "permission": "write", "type": "file", "priority": -3}], "default": "view"}"#,
        )
        .unwrap();
        assert_eq!(o.preset, Some(Preset::AgentSafe));
        assert_eq!(
            o.rules,
            vec![Rule::new("/x", Level::Write, RuleType::File, -3)]
        );
        assert_eq!(o.default, Some(Level::View));
        assert_eq!(o.effective_rules().len(), 10);
        assert_eq!(PolicySpec::parse("{}").unwrap(), PolicySpec::default());
    }

    #[test]
    fn error_texts() {
        assert_eq!(
            err(
                r#"[{"pattern":"a","permission":"read"},{"pattern":"b","permission":"read"},{"pattern":"c","permission":"read"},{"pattern":"d","permission":"rw"}]"#
            ),
            vec!["rule 3: unknown permission \"rw\"; expected one of none, view, read, write"]
        );
        let e = err(r#"[{"pattern":"a[","permission":"read"}]"#);
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("rule 0: invalid pattern \"a[\": "),
            "{e:?}"
        );
        assert_eq!(
            err(r#"{"preset":"agent-unsafe"}"#),
            vec!["unknown preset \"agent-unsafe\"; expected one of agent-safe, read-only, full-access, development, view-only"]
        );
        assert_eq!(
            err(r#"[{"pattern":"a","permission":"read","perm":"x"}]"#),
            vec!["rule 0: unknown field \"perm\"; expected one of pattern, permission, type, priority"]
        );
        assert_eq!(
            err(r#"[{"pattern":"a"}]"#),
            vec!["rule 0: missing field \"permission\" (one of none, view, read, write)"]
        );
        assert_eq!(
            err(r#"[{"pattern":"a","permission":"read","type":"dir"}]"#),
            vec!["rule 0: unknown type \"dir\"; expected one of glob, directory, file"]
        );
        assert_eq!(
            err(r#"[{"pattern":"a","permission":"read","priority":"10"}]"#),
            vec!["rule 0: priority: expected an integer, not a string"]
        );
        assert!(
            err(r#"[{"pattern":"a","permission":"read","priority":1.5}]"#)[0]
                .starts_with("rule 0: priority: 1.5 is not an integer")
        );
        assert_eq!(
            err(r#"{"default":"all"}"#),
            vec!["default: unknown permission \"all\"; expected one of none, view, read, write"]
        );
        assert_eq!(err(r#"{"rule":[]}"#), vec!["unknown field \"rule\" in the policy object; expected one of preset, rules, default"]);
        assert!(
            err(r#"[{"pattern":"a","permission":"read","permission":"none"}]"#)[0]
                .contains("duplicate key \"permission\"")
        );
        assert!(err("[").len() == 1);
        assert!(err("\"x\"")[0].starts_with("a policy is a JSON array of rules or an object"));
        assert_eq!(err(r#"[1]"#).len(), 1);
        // Several errors are all reported.
        assert_eq!(
            err(r#"[{"pattern":"a[","permission":"rw"},{"pattern":5}]"#).len(),
            4
        );
        assert_eq!(
            err("[{\"pattern\":\"a\\u0000\",\"permission\":\"read\"}]"),
            vec!["rule 0: invalid pattern \"a\\u{0}\": contains a NUL byte"]
        );
    }

    #[test]
    fn bounds() {
        let many = format!(
            "[{}]",
            vec![r#"{"pattern":"a","permission":"read"}"#; MAX_RULES + 1].join(",")
        );
        assert_eq!(
            err(&many),
            vec![format!(
                "the policy has {} rules; at most {MAX_RULES} are allowed",
                MAX_RULES + 1
            )]
        );
        let long = format!(
            r#"[{{"pattern":"{}","permission":"read"}}]"#,
            "a".repeat(MAX_PATTERN_BYTES + 1)
        );
        assert_eq!(
            err(&long),
            vec![format!(
                "rule 0: pattern is {} bytes long; at most {MAX_PATTERN_BYTES} are allowed",
                MAX_PATTERN_BYTES + 1
            )]
        );
    }

    #[test]
    fn serde_rule_shape() {
        let r: Rule = serde_json::from_str(r#"{"pattern":"x","permission":"view"}"#).unwrap();
        assert_eq!(r, Rule::glob("x", Level::View));
        assert!(
            serde_json::from_str::<Rule>(r#"{"pattern":"x","permission":"view","extra":1}"#)
                .is_err()
        );
        let s =
            serde_json::to_string(&Rule::new("x", Level::Read, RuleType::Directory, 2)).unwrap();
        assert_eq!(
            s,
            r#"{"pattern":"x","permission":"read","type":"directory","priority":2}"#
        );
    }
}

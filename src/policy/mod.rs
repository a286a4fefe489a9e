//! Policy engine (SPEC §2–3): rules, presets, matcher, admin floor, explain.
//!
//! Pure: no I/O, no `unsafe`. Everything here works on strings handed in by the caller
//! (the fence, the CLI, the OCI spec reader), so it can be tested and fuzzed in isolation.
//!
//! The pieces:
//!
//! - [`Level`], [`RuleType`], [`Rule`]: the rule format users already write
//!   (`{"pattern": "...", "permission": "read", "type": "glob", "priority": 10}`).
//! - [`PolicySpec::parse`]: the two JSON forms (a rule array, or
//!   `{"preset": NAME, "rules": [...], "default": LEVEL}`), with errors that name the rule
//!   index and field.
//! - [`Policy`]: a compiled policy (the container's rules plus, optionally, the administrator's
//!   mandatory floor). [`Policy::decide`] is the one query the fence makes for every new path;
//!   [`Policy::explain`] says which rule decides a path and why it beat the others.
//! - [`Preset`]: the presets of SPEC §3.
//! - [`normalize`]: the path form every query is made in (`/a/b`, root `/`).
//! - [`source`]: reading a container's fencing request from its OCI annotations or
//!   environment ([`source::from_spec`]).

mod engine;
mod error;
mod matcher;
mod parse;
mod path;
mod pattern;
mod presets;
pub mod source;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use engine::{
    Decision, EffectiveRule, Explanation, Origin, Policy, RuleMatch, SideExplanation,
};
pub use error::PolicyError;
pub(crate) use parse::{
    parse_rules_value as parse_rules_json_value, parse_strict as parse_json_strict,
};
pub use parse::{PolicySpec, MAX_PATTERN_BYTES, MAX_POLICY_BYTES, MAX_RULES};
pub use path::{is_normalized, normalize};
pub use presets::Preset;
pub use source::{from_spec, AuditLevel, DeltaMode, FenceRequest, PolicyInputs, Source};

/// A permission level. Ordered: `None < View < Read < Write`.
///
/// | level | meaning inside the container (SPEC §4) |
/// |---|---|
/// | `none` | the path does not exist |
/// | `view` | listed and `stat`-able, contents refused |
/// | `read` | readable |
/// | `write` | writable (copy-on-write) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Hidden: the path does not exist for the container.
    None,
    /// Visible (listing, `stat`) but its contents cannot be read.
    View,
    /// Readable.
    Read,
    /// Readable and writable.
    Write,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 4] = [Level::None, Level::View, Level::Read, Level::Write];

    /// The name used in JSON and messages (`"none"`, `"view"`, `"read"`, `"write"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "none",
            Level::View => "view",
            Level::Read => "read",
            Level::Write => "write",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = PolicyError;

    /// Parses a level name; the error reads
    /// `unknown permission "rw"; expected one of none, view, read, write`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Level::None),
            "view" => Ok(Level::View),
            "read" => Ok(Level::Read),
            "write" => Ok(Level::Write),
            _ => Err(PolicyError::invalid(format!(
                "unknown permission {}; expected one of none, view, read, write",
                error::quote(s)
            ))),
        }
    }
}

/// How a rule's pattern is matched.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RuleType {
    /// A glob matched from the workspace root (`*` stays within a segment, `**` spans
    /// segments). The default.
    #[default]
    Glob,
    /// A literal directory path: matches it and (as every rule does) covers everything
    /// beneath it.
    Directory,
    /// A literal path: matches exactly that path.
    File,
}

impl RuleType {
    /// The name used in JSON and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleType::Glob => "glob",
            RuleType::Directory => "directory",
            RuleType::File => "file",
        }
    }

    /// Rank of the type in the rule ordering: `file` > `directory` > `glob`.
    pub(crate) fn rank(self) -> u8 {
        match self {
            RuleType::Glob => 0,
            RuleType::Directory => 1,
            RuleType::File => 2,
        }
    }
}

impl fmt::Display for RuleType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RuleType {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "glob" => Ok(RuleType::Glob),
            "directory" => Ok(RuleType::Directory),
            "file" => Ok(RuleType::File),
            _ => Err(PolicyError::invalid(format!(
                "unknown type {}; expected one of glob, directory, file",
                error::quote(s)
            ))),
        }
    }
}

/// One rule, as users write it:
/// `{"pattern": "/src/**", "permission": "read", "type": "glob", "priority": 10}`.
///
/// `type` defaults to `glob` and `priority` to 0; unknown fields are errors. (The Rust field
/// for `type` is [`Rule::kind`].) Deserialising a `Rule` with serde checks the shape only;
/// [`PolicySpec::parse`] and [`Policy::new`] also validate the pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The pattern: a glob, or a literal path for `directory` and `file` rules. Relative to
    /// the workspace root; the leading `/` is optional.
    pub pattern: String,
    /// The level granted (or, for `none`, the hiding) where this rule decides.
    pub permission: Level,
    /// How `pattern` is matched (JSON field `type`).
    #[serde(rename = "type", default)]
    pub kind: RuleType,
    /// Higher wins. Default 0.
    #[serde(default)]
    pub priority: i64,
}

impl Rule {
    /// A glob rule with priority 0.
    pub fn glob(pattern: impl Into<String>, permission: Level) -> Rule {
        Rule {
            pattern: pattern.into(),
            permission,
            kind: RuleType::Glob,
            priority: 0,
        }
    }

    /// A rule of any type and priority.
    pub fn new(
        pattern: impl Into<String>,
        permission: Level,
        kind: RuleType,
        priority: i64,
    ) -> Rule {
        Rule {
            pattern: pattern.into(),
            permission,
            kind,
            priority,
        }
    }

    /// The same rule with another priority.
    pub fn with_priority(mut self, priority: i64) -> Rule {
        self.priority = priority;
        self
    }

    /// The same rule with another type.
    pub fn with_kind(mut self, kind: RuleType) -> Rule {
        self.kind = kind;
        self
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} → {} ({}, priority {})",
            self.pattern, self.permission, self.kind, self.priority
        )
    }
}

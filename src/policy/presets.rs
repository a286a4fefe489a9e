//! The presets of SPEC §3.

use std::fmt;
use std::str::FromStr;

use super::error::quote;
use super::{Level, PolicyError, Rule};

/// A named, built-in policy (SPEC §3). Every preset's default is `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// Read everything; write `/output` and `/tmp`; secrets, keys, credentials and `.git`
    /// do not exist.
    AgentSafe,
    /// Read everything.
    ReadOnly,
    /// Write everything.
    FullAccess,
    /// Write everything; secrets and keys do not exist.
    Development,
    /// List and `stat` everything, read nothing.
    ViewOnly,
}

impl Preset {
    /// Every preset, in the order of SPEC §3.
    pub const ALL: [Preset; 5] = [
        Preset::AgentSafe,
        Preset::ReadOnly,
        Preset::FullAccess,
        Preset::Development,
        Preset::ViewOnly,
    ];

    /// The preset's name (`agent-safe`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Preset::AgentSafe => "agent-safe",
            Preset::ReadOnly => "read-only",
            Preset::FullAccess => "full-access",
            Preset::Development => "development",
            Preset::ViewOnly => "view-only",
        }
    }

    /// The names of all presets, comma-separated (for messages).
    pub fn names() -> String {
        Preset::ALL
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The preset's rules, in the order of SPEC §3's table.
    pub fn rules(self) -> Vec<Rule> {
        let g = |p: &str, l: Level, prio: i64| Rule::glob(p, l).with_priority(prio);
        let secrets = |prio: i64| {
            vec![
                g("**/.env*", Level::None, prio),
                g("**/secrets/**", Level::None, prio),
                g("**/*.key", Level::None, prio),
                g("**/*.pem", Level::None, prio),
            ]
        };
        match self {
            Preset::AgentSafe => {
                let mut r = vec![
                    g("**/*", Level::Read, 0),
                    g("/output/**", Level::Write, 10),
                    g("/tmp/**", Level::Write, 10),
                ];
                r.extend(secrets(100));
                r.push(g("**/credentials*", Level::None, 100));
                r.push(g("**/.git/**", Level::None, 50));
                r
            }
            Preset::ReadOnly => vec![g("**/*", Level::Read, 0)],
            Preset::FullAccess => vec![g("**/*", Level::Write, 0)],
            Preset::Development => {
                let mut r = vec![g("**/*", Level::Write, 0)];
                r.extend(secrets(100));
                r
            }
            Preset::ViewOnly => vec![g("**/*", Level::View, 0)],
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = PolicyError;

    /// The error reads `unknown preset "x"; expected one of agent-safe, read-only, ...`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::ALL
            .iter()
            .copied()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                PolicyError::invalid(format!(
                    "unknown preset {}; expected one of {}",
                    quote(s),
                    Preset::names()
                ))
            })
    }
}

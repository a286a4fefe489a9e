//! The compiled policy: the container's rules plus the administrator's floor, and the two
//! queries the rest of the runtime makes, [`Policy::decide`] and [`Policy::explain`].

use std::fmt;

use serde::{Serialize, Serializer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::error::quote;
use super::matcher::{RankKey, Side, SideDecision};
use super::parse::{too_many_rules, PolicySpec, MAX_RULES};
use super::path::normalize_cow;
use super::{Level, PolicyError, Preset, Rule, RuleType};

/// Where a rule of the effective list came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A preset's rule.
    Preset(Preset),
    /// The container's own policy (inline JSON, `--policy FILE`).
    Policy,
    /// A policy file of the administrator's policy directory, by name.
    Named(String),
    /// The administrator's default policy (the container asked for none).
    AdminDefault,
    /// The administrator's mandatory floor.
    Floor,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Preset(p) => write!(f, "preset {p}"),
            Origin::Policy => f.write_str("policy"),
            Origin::Named(n) => write!(f, "policy-name {n}"),
            Origin::AdminDefault => f.write_str("admin default policy"),
            Origin::Floor => f.write_str("admin floor"),
        }
    }
}

impl Serialize for Origin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A rule of the effective list, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectiveRule {
    /// The rule as written.
    #[serde(flatten)]
    pub rule: Rule,
    /// Where it came from.
    pub origin: Origin,
    /// Its position in the list it came from (the `N` of `rule N` in messages).
    pub origin_index: usize,
}

/// The decision for one path: what the fence calls on every new path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The level in effect (already the minimum of the container's policy and the admin
    /// floor).
    pub level: Level,
    /// The deciding rule: an index into [`Policy::rules`]; `None` = the policy's default.
    pub rule: Option<usize>,
    /// For a directory whose level is `none`: it may be looked up and listed as `view`
    /// because something beneath it could be visible; its listing shows only entries that
    /// are visible or themselves traversable. Always `false` for files and for paths whose
    /// level is not `none`.
    pub traversable: bool,
}

impl Decision {
    /// Whether the path exists for the container (level `view` or more, or traversable).
    pub fn visible(&self) -> bool {
        self.level >= Level::View || self.traversable
    }

    /// The level the path shows with: `view` for a traversable hidden directory.
    pub fn apparent_level(&self) -> Level {
        if self.traversable {
            Level::View
        } else {
            self.level
        }
    }
}

/// A compiled policy: the container's rules (a preset's, a named policy's, its own) and the
/// administrator's floor. Cheap to query from many threads (`Sync`); clone to share.
///
/// The effective rule list ([`Policy::rules`]) is the container's rules in order, then the
/// floor's; [`Decision::rule`] indexes it.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<EffectiveRule>,
    container_len: usize,
    container: Side,
    floor: Option<Side>,
}

fn label_error(origin: &Origin, index: usize, msg: String) -> PolicyError {
    let e = PolicyError::rule(index, msg);
    match origin {
        Origin::Policy => e,
        Origin::Preset(p) => e.context(format!("preset {p}")),
        Origin::Named(n) => e.context(format!("policy-name {}", quote(n))),
        Origin::AdminDefault => e.context("default_policy"),
        Origin::Floor => e.context("floor"),
    }
}

impl Policy {
    /// Compiles a rule list of the container's own policy with the given default.
    pub fn new(rules: Vec<Rule>, default: Level) -> Result<Policy, PolicyError> {
        let rules = rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| EffectiveRule {
                rule,
                origin: Origin::Policy,
                origin_index: i,
            })
            .collect();
        Policy::from_effective(rules, default)
    }

    /// Compiles rules whose origins are already known (the preset's first, etc.).
    pub fn from_effective(
        rules: Vec<EffectiveRule>,
        default: Level,
    ) -> Result<Policy, PolicyError> {
        if rules.len() > MAX_RULES {
            return Err(too_many_rules(rules.len()));
        }
        let plain: Vec<Rule> = rules.iter().map(|r| r.rule.clone()).collect();
        let container = Side::compile(&plain, default, &|i, msg| match rules.get(i) {
            Some(r) => label_error(&r.origin, r.origin_index, msg),
            None => PolicyError::rule(i, msg),
        })?;
        Ok(Policy {
            container_len: rules.len(),
            rules,
            container,
            floor: None,
        })
    }

    /// Compiles a parsed policy: the preset's rules (origin [`Origin::Preset`]) then the
    /// policy's own ([`Origin::Policy`]).
    pub fn from_spec(spec: &PolicySpec) -> Result<Policy, PolicyError> {
        Policy::from_effective(effective_rules(spec, Origin::Policy), spec.default_level())
    }

    /// Parses and compiles a policy in either JSON form (no floor).
    pub fn from_json(json: &str) -> Result<Policy, PolicyError> {
        Policy::from_spec(&PolicySpec::parse(json)?)
    }

    /// A preset's policy.
    pub fn preset(preset: Preset) -> Result<Policy, PolicyError> {
        Policy::from_spec(&PolicySpec::preset(preset))
    }

    /// Adds the administrator's mandatory floor: the effective level of every path becomes
    /// the minimum of this policy's decision and the floor's, where the floor is a policy of
    /// `floor` rules whose default is `write` (it only ever takes away). An empty floor
    /// changes nothing. Replaces any floor set before.
    pub fn with_floor(mut self, floor: &[Rule]) -> Result<Policy, PolicyError> {
        self.rules.truncate(self.container_len);
        self.floor = None;
        if floor.is_empty() {
            return Ok(self);
        }
        if floor.len() > MAX_RULES {
            return Err(too_many_rules(floor.len()).context("floor"));
        }
        let side = Side::compile(floor, Level::Write, &|i, msg| {
            label_error(&Origin::Floor, i, msg)
        })?;
        self.rules
            .extend(floor.iter().enumerate().map(|(i, r)| EffectiveRule {
                rule: r.clone(),
                origin: Origin::Floor,
                origin_index: i,
            }));
        self.floor = Some(side);
        Ok(self)
    }

    /// Decides `path` (relative to the workspace root; normalised here, with or without
    /// leading `/`). `is_dir` only matters for [`Decision::traversable`].
    ///
    /// Cost: one `GlobSet` match over the path (per side), no allocation when the path is
    /// already normalised.
    pub fn decide(&self, path: &str, is_dir: bool) -> Decision {
        let norm = normalize_cow(path);
        let c = self.container.decide(&norm, is_dir);
        let Some(floor) = &self.floor else {
            return Decision {
                level: c.level,
                rule: c.rule,
                traversable: c.traversable,
            };
        };
        let f = floor.decide(&norm, is_dir);
        self.combine(c, f, is_dir)
    }

    fn combine(&self, c: SideDecision, f: SideDecision, is_dir: bool) -> Decision {
        let level = c.level.min(f.level);
        // The floor decides only where it took something away.
        let rule = if f.level < c.level {
            f.rule.map(|i| i + self.container_len)
        } else {
            c.rule
        };
        let open = |d: SideDecision| d.level >= Level::View || d.traversable;
        let traversable = is_dir && level == Level::None && open(c) && open(f);
        Decision {
            level,
            rule,
            traversable,
        }
    }

    /// The effective rule list: the container's rules, then the floor's.
    pub fn rules(&self) -> &[EffectiveRule] {
        &self.rules
    }

    /// The container's rules (preset's, named policy's, own), without the floor.
    pub fn policy_rules(&self) -> &[EffectiveRule] {
        &self.rules[..self.container_len]
    }

    /// The floor's rules.
    pub fn floor_rules(&self) -> &[EffectiveRule] {
        &self.rules[self.container_len..]
    }

    /// Rule `index` of [`Policy::rules`].
    pub fn rule(&self, index: usize) -> Option<&EffectiveRule> {
        self.rules.get(index)
    }

    /// The level of paths no rule covers.
    pub fn default_level(&self) -> Level {
        self.container.default
    }

    /// The rank of rule `index` among the rules of its side (the container's policy or the
    /// floor): 1 for the lowest, the side's rule count for the highest. The default ranks 0.
    pub fn rank(&self, index: usize) -> Option<u32> {
        if index < self.container_len {
            self.container.rules.get(index).map(|r| r.rank)
        } else {
            self.floor
                .as_ref()
                .and_then(|f| f.rules.get(index - self.container_len))
                .map(|r| r.rank)
        }
    }

    /// Indices of [`Policy::rules`] of the container's policy, highest-ranked first.
    pub fn policy_rules_by_rank(&self) -> Vec<usize> {
        by_rank(&self.container, 0)
    }

    /// Indices of [`Policy::rules`] of the floor, highest-ranked first.
    pub fn floor_rules_by_rank(&self) -> Vec<usize> {
        self.floor
            .as_ref()
            .map(|f| by_rank(f, self.container_len))
            .unwrap_or_default()
    }

    /// The canonical JSON of the effective policy (keys sorted, no whitespace), for audit
    /// records: `{"default": LEVEL, "rules": [...]}` plus `"floor": [...]` when the
    /// administrator set one. A [`Decision::rule`] `i` is `rules[i]`, or
    /// `floor[i - rules.len()]` when `i >= rules.len()`.
    pub fn canonical_json(&self) -> String {
        let rule_json = |r: &EffectiveRule| {
            json!({
                "pattern": r.rule.pattern,
                "permission": r.rule.permission.as_str(),
                "type": r.rule.kind.as_str(),
                "priority": r.rule.priority,
            })
        };
        let mut obj = serde_json::Map::new();
        obj.insert(
            "default".into(),
            Value::String(self.default_level().as_str().into()),
        );
        obj.insert(
            "rules".into(),
            Value::Array(self.policy_rules().iter().map(rule_json).collect()),
        );
        if self.floor.is_some() {
            obj.insert(
                "floor".into(),
                Value::Array(self.floor_rules().iter().map(rule_json).collect()),
            );
        }
        Value::Object(obj).to_string()
    }

    /// The SHA-256 of [`Policy::canonical_json`], lowercase hex.
    pub fn sha256(&self) -> String {
        sha256_hex(self.canonical_json().as_bytes())
    }

    /// Explains the decision for `path`: every rule matching it or an ancestor, highest rank
    /// first, which one decides and why it beats each of the others, and the floor's part.
    /// `traversable` is answered as if the path were a directory.
    pub fn explain(&self, path: &str) -> Explanation {
        let norm = normalize_cow(path).into_owned();
        let c = self.container.decide(&norm, true);
        let policy = self.explain_side(&self.container, c, 0, &norm);
        let (decision, floor) = match &self.floor {
            None => (
                Decision {
                    level: c.level,
                    rule: c.rule,
                    traversable: c.traversable,
                },
                None,
            ),
            Some(fs) => {
                let f = fs.decide(&norm, true);
                (
                    self.combine(c, f, true),
                    Some(self.explain_side(fs, f, self.container_len, &norm)),
                )
            }
        };
        let summary = self.summary(&norm, &decision, &policy, floor.as_ref());
        Explanation {
            path: norm,
            level: decision.level,
            rule: decision.rule,
            traversable: decision.traversable,
            policy,
            floor,
            summary,
        }
    }

    fn explain_side(
        &self,
        side: &Side,
        d: SideDecision,
        offset: usize,
        norm: &str,
    ) -> SideExplanation {
        let mut found = side.matches_with_paths(norm);
        found.sort_by_key(|(i, _)| std::cmp::Reverse(side.rules[*i].rank));
        let winner = d.rule;
        let total = found.len();
        let matches = found
            .into_iter()
            .map(|(i, matched)| {
                let er = &self.rules[i + offset];
                let how = if matched == norm {
                    "matches the path itself".to_string()
                } else {
                    format!("matches {matched}, covering everything beneath it")
                };
                let why = match winner {
                    Some(w) if w == i => {
                        if total == 1 {
                            format!("{how}; the only matching rule")
                        } else {
                            format!("{how}; the highest-ranked of {total} matching rules")
                        }
                    }
                    Some(w) => format!(
                        "{how}; loses to rule {}: {}",
                        w + offset,
                        lose_reason(
                            &side.rules[w].key,
                            &side.rules[i].key,
                            &self.rules[w + offset].rule.kind,
                            &er.rule.kind,
                            offset
                        )
                    ),
                    None => how,
                };
                RuleMatch {
                    index: i + offset,
                    rule: er.rule.clone(),
                    origin: er.origin.clone(),
                    rank: side.rules[i].rank,
                    matched,
                    decides: winner == Some(i),
                    why,
                }
            })
            .collect();
        let traversed_by = if d.traversable {
            let rank = d.rule.map_or(0, |w| side.rules[w].rank);
            let mut by: Vec<usize> = (0..side.rules.len())
                .filter(|&i| {
                    let r = &side.rules[i];
                    r.rank > rank && r.level >= Level::View && r.pattern.could_match_beneath(norm)
                })
                .collect();
            by.sort_by_key(|&i| std::cmp::Reverse(side.rules[i].rank));
            by.into_iter().map(|i| i + offset).collect()
        } else {
            Vec::new()
        };
        SideExplanation {
            level: d.level,
            rule: d.rule.map(|i| i + offset),
            traversable: d.traversable,
            traversed_by,
            default: side.default,
            matches,
        }
    }

    fn summary(
        &self,
        norm: &str,
        d: &Decision,
        policy: &SideExplanation,
        floor: Option<&SideExplanation>,
    ) -> String {
        let describe_rule = |i: usize| match self.rules.get(i) {
            Some(r) => format!(
                "rule {i} ({} {}, {}, priority {}, from {})",
                r.rule.permission,
                quote(&r.rule.pattern),
                r.rule.kind,
                r.rule.priority,
                r.origin
            ),
            None => format!("rule {i}"),
        };
        let side_text = |s: &SideExplanation, what: &str| match s.rule {
            Some(i) => format!("{what} says {} by {}", s.level, describe_rule(i)),
            None => format!(
                "no rule of the {what} matches {norm} or an ancestor: {what} default {}",
                s.default
            ),
        };
        let mut out = side_text(policy, "policy");
        if let Some(f) = floor {
            if f.level < policy.level {
                out.push_str(&format!(
                    "; the admin floor lowers it to {} by {}",
                    f.level,
                    f.rule.map(describe_rule).unwrap_or_default()
                ));
            } else {
                out.push_str(&format!("; the admin floor allows up to {}", f.level));
            }
        }
        out.push_str(&format!(". Effective: {}", d.level));
        if d.traversable {
            let by: Vec<String> = policy
                .traversed_by
                .iter()
                .take(3)
                .map(|&i| describe_rule(i))
                .collect();
            out.push_str(&format!(
                "; as a directory it is traversable (listed as view, showing only what is visible beneath it) because {} could grant access beneath it",
                if by.is_empty() { "a rule".to_string() } else { by.join(", ") }
            ));
        } else if d.level == Level::None {
            out.push_str(" (the path does not exist for the container)");
        }
        out
    }
}

fn by_rank(side: &Side, offset: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..side.rules.len()).collect();
    v.sort_by_key(|&i| std::cmp::Reverse(side.rules[i].rank));
    v.into_iter().map(|i| i + offset).collect()
}

/// The preset's rules then the spec's own, with origins.
pub(crate) fn effective_rules(spec: &PolicySpec, own: Origin) -> Vec<EffectiveRule> {
    let mut out = Vec::new();
    if let Some(p) = spec.preset {
        out.extend(
            p.rules()
                .into_iter()
                .enumerate()
                .map(|(i, rule)| EffectiveRule {
                    rule,
                    origin: Origin::Preset(p),
                    origin_index: i,
                }),
        );
    }
    out.extend(
        spec.rules
            .iter()
            .enumerate()
            .map(|(i, rule)| EffectiveRule {
                rule: rule.clone(),
                origin: own.clone(),
                origin_index: i,
            }),
    );
    out
}

/// Why the rule with key `l` ranks below the winner `w`.
fn lose_reason(w: &RankKey, l: &RankKey, wk: &RuleType, lk: &RuleType, offset: usize) -> String {
    if w.priority != l.priority {
        format!("lower priority ({} < {})", l.priority, w.priority)
    } else if w.type_rank != l.type_rank {
        format!("same priority; a {lk} rule ranks below a {wk} rule (file > directory > glob)")
    } else if w.exact != l.exact {
        "same priority and type; it has wildcards and the winner has none".to_string()
    } else if w.literal_prefix != l.literal_prefix {
        format!(
            "same priority and type; shorter literal prefix before the first wildcard ({} < {} characters)",
            l.literal_prefix, w.literal_prefix
        )
    } else if w.literal_chars != l.literal_chars {
        format!(
            "same priority, type and prefix; fewer literal characters ({} < {})",
            l.literal_chars, w.literal_chars
        )
    } else {
        format!(
            "equal on priority, type and literals; the later rule wins (rule {} comes before rule {})",
            l.index + offset,
            w.index + offset
        )
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// What [`Policy::explain`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The normalised path.
    pub path: String,
    /// The effective level.
    pub level: Level,
    /// The deciding rule (index into [`Policy::rules`]); `None` = the default.
    pub rule: Option<usize>,
    /// Whether the path, were it a directory, would be traversable.
    pub traversable: bool,
    /// The container policy's side.
    pub policy: SideExplanation,
    /// The admin floor's side, when there is a floor.
    pub floor: Option<SideExplanation>,
    /// The whole story in one paragraph.
    pub summary: String,
}

/// One side (the container's policy, or the floor) of an [`Explanation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SideExplanation {
    /// This side's level.
    pub level: Level,
    /// This side's deciding rule (index into [`Policy::rules`]); `None` = this side's default.
    pub rule: Option<usize>,
    /// Whether this side alone would make the path (as a directory) traversable.
    pub traversable: bool,
    /// The rules that make it traversable (ranked above the hiding one, granting `view` or
    /// more, able to match beneath the path), highest rank first.
    pub traversed_by: Vec<usize>,
    /// This side's default level.
    pub default: Level,
    /// Every rule of this side matching the path or an ancestor, highest rank first.
    pub matches: Vec<RuleMatch>,
}

/// A rule matching the explained path (or an ancestor).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleMatch {
    /// Index into [`Policy::rules`].
    pub index: usize,
    /// The rule.
    pub rule: Rule,
    /// Where it came from.
    pub origin: Origin,
    /// Its rank within its side (higher wins).
    pub rank: u32,
    /// The path it matched: the explained path, or the ancestor through which it covers it.
    pub matched: String,
    /// Whether it decides this side.
    pub decides: bool,
    /// Why it decides, or why it loses to the rule that does.
    pub why: String,
}

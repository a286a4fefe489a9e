//! One compiled rule list (the container's policy, or the admin floor).
//!
//! Matching is one pass over the path's segments, whatever the number of rules: all
//! patterns are merged into one segment automaton (a trie whose edges are segment patterns,
//! with `**` nodes that loop), so a query costs a few hash lookups per path component,
//! not a loop over rules. Because the automaton is walked from the root, every rule that
//! matches an ancestor of the path is seen on the way: "a rule matching a directory covers
//! everything beneath it" costs nothing extra. Patterns that cannot be split into segments
//! (a `/` inside `{}` or `[]`) go to a fallback `globset::GlobSet` with their coverage
//! variants (`P/**`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use globset::{Candidate, GlobSet, GlobSetBuilder};

use super::pattern::{self, CompiledPattern, Seg};
use super::{Level, PolicyError, Rule};

/// Ranking features of a rule, compared field by field (SPEC §3): priority, type, exact
/// pattern, literal prefix, literal characters, position. The position makes every key
/// distinct, so ranks never depend on sort stability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RankKey {
    pub priority: i64,
    pub type_rank: u8,
    pub exact: bool,
    pub literal_prefix: u32,
    pub literal_chars: u32,
    pub index: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledRule {
    pub level: Level,
    /// 1 = lowest-ranked rule, `len` = highest; 0 stands for the default.
    pub rank: u32,
    pub key: RankKey,
    pub pattern: CompiledPattern,
}

/// The outcome for one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SideDecision {
    pub level: Level,
    /// Local rule index; `None` = the default.
    pub rule: Option<usize>,
    pub traversable: bool,
}

/// A word-at-a-time multiplicative hash (FxHash-like): path segments are short, and
/// SipHash's setup (or a byte-at-a-time hash on long names) dominates their lookups.
/// (Policies are written by the container's own user; flooding the table only slows that
/// container's own fence.)
#[derive(Default, Clone, Copy)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        let h = self.0;
        (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (h >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0xf135_7aea_2e62_a9c5;
        let mut h = self.0;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(<[u8; 8]>::try_from(c).unwrap_or_default());
            h = (h.rotate_left(5) ^ w).wrapping_mul(K);
        }
        let rem = chunks.remainder();
        if !rem.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rem.len()].copy_from_slice(rem);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(buf) ^ ((rem.len() as u64) << 59))
                .wrapping_mul(K);
        }
        self.0 = h;
    }
}

type FnvMap<V> = HashMap<Box<str>, V, BuildHasherDefault<Fnv>>;

type NodeId = u32;

/// A node of the segment automaton.
#[derive(Debug, Clone, Default)]
struct Node {
    /// Children by literal segment.
    lit: FnvMap<NodeId>,
    /// Children by `*.EXT`.
    ext: FnvMap<NodeId>,
    /// Child by `*`.
    any: Option<NodeId>,
    /// Children by `LIT*`, sorted by `LIT`'s first byte (only those sharing the segment's
    /// first byte are compared).
    prefix: Vec<(u8, Box<str>, NodeId)>,
    /// Children by `*LIT`, sorted by `LIT`'s last byte.
    suffix: Vec<(u8, Box<str>, NodeId)>,
    /// Children by other segment globs, with the segment text (to share nodes).
    other: Vec<(Seg, String, NodeId)>,
    /// Child by `**` (reached without consuming a segment).
    star: Option<NodeId>,
    /// This node is a `**` node: it consumes any segment and stays.
    looping: bool,
    /// No edge leaves this node (its `**` self-loop aside): once its rules are seen, it
    /// need not stay in the active set.
    dead_end: bool,
    /// Rules whose pattern ends here.
    accept: Vec<usize>,
    /// The highest rank among `accept` (0 = none).
    best_rank: u32,
    /// The rule of `best_rank`.
    best: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct Side {
    pub rules: Vec<CompiledRule>,
    pub default: Level,
    nodes: Vec<Node>,
    /// Fallback set for patterns not matched segment by segment.
    set: GlobSet,
    /// Set glob index → (local rule index, coverage variant).
    glob_rule: Vec<(usize, bool)>,
    /// Rules granting `view` or more, highest rank first.
    granting: Vec<usize>,
    /// The root's decision (constant).
    root: SideDecision,
    /// The nodes active at the root (its `**` closure) that have edges.
    root_live: Vec<NodeId>,
}

/// Per-thread buffers of the hot path (no allocation per query).
#[derive(Default)]
struct Scratch {
    /// Active nodes before and after a step.
    a: Vec<NodeId>,
    b: Vec<NodeId>,
    /// Fallback set matches.
    globs: Vec<usize>,
    /// `stamps[n] == stamp`: node `n` is already in the set being built.
    stamps: Vec<u32>,
    stamp: u32,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Adds nodes to the next active set, following `**` edges, keeping the best rule seen.
struct Adder<'a> {
    nodes: &'a [Node],
    set: &'a mut Vec<NodeId>,
    stamps: &'a mut [u32],
    stamp: u32,
    best_rank: u32,
    best: Option<usize>,
}

impl Adder<'_> {
    #[inline]
    fn add(&mut self, n: NodeId) {
        let mut cur = n;
        loop {
            let Some(node) = self.nodes.get(cur as usize) else {
                return;
            };
            if node.best_rank > self.best_rank {
                self.best_rank = node.best_rank;
                self.best = Some(node.best);
            }
            if !node.dead_end {
                match self.stamps.get_mut(cur as usize) {
                    Some(s) if *s == self.stamp => return,
                    Some(s) => *s = self.stamp,
                    None => return,
                }
                self.set.push(cur);
            }
            match node.star {
                Some(s) => cur = s,
                None => return,
            }
        }
    }
}

impl Side {
    /// Compiles `rules`. `error(i, msg)` makes the error for rule `i` (so that it can name
    /// the rule as the user knows it: `rule 3`, `floor: rule 0`).
    pub fn compile(
        rules: &[Rule],
        default: Level,
        error: &dyn Fn(usize, String) -> PolicyError,
    ) -> Result<Side, PolicyError> {
        let mut errors = Vec::new();
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            match pattern::compile(&r.pattern, r.kind) {
                Ok(p) => compiled.push(CompiledRule {
                    level: r.permission,
                    rank: 0,
                    key: RankKey {
                        priority: r.priority,
                        type_rank: r.kind.rank(),
                        exact: p.exact,
                        literal_prefix: p.literal_prefix,
                        literal_chars: p.literal_chars,
                        index: i,
                    },
                    pattern: p,
                }),
                Err(msg) => errors.push(error(i, msg)),
            }
        }
        if !errors.is_empty() {
            return Err(PolicyError::from_many(errors));
        }
        let mut order: Vec<usize> = (0..compiled.len()).collect();
        order.sort_unstable_by_key(|&i| compiled[i].key);
        for (pos, &i) in order.iter().enumerate() {
            compiled[i].rank = u32::try_from(pos + 1).unwrap_or(u32::MAX);
        }

        let mut nodes = vec![Node::default()];
        let mut builder = GlobSetBuilder::new();
        let mut glob_rule = Vec::new();
        for (i, r) in compiled.iter().enumerate() {
            match &r.pattern.segs {
                Some(segs) => {
                    let end = insert(&mut nodes, segs);
                    if let Some(n) = nodes.get_mut(end as usize) {
                        n.accept.push(i);
                        if r.rank > n.best_rank {
                            n.best_rank = r.rank;
                            n.best = i;
                        }
                    }
                }
                None => {
                    for g in &r.pattern.globs {
                        builder.add(g.glob.clone());
                        glob_rule.push((i, g.coverage));
                    }
                }
            }
        }
        let set = builder.build().map_err(|e| {
            PolicyError::invalid(format!(
                "the policy's patterns cannot be compiled together: {}",
                e.kind()
            ))
        })?;
        let mut granting: Vec<usize> = (0..compiled.len())
            .filter(|&i| compiled[i].level >= Level::View)
            .collect();
        granting.sort_unstable_by_key(|&i| std::cmp::Reverse(compiled[i].rank));

        let mut side = Side {
            rules: compiled,
            default,
            nodes,
            set,
            glob_rule,
            granting,
            root: SideDecision {
                level: default,
                rule: None,
                traversable: false,
            },
            root_live: Vec::new(),
        };
        for n in &mut side.nodes {
            n.dead_end = n.lit.is_empty()
                && n.ext.is_empty()
                && n.any.is_none()
                && n.prefix.is_empty()
                && n.suffix.is_empty()
                && n.other.is_empty()
                && n.star.is_none();
        }
        let mut a = Vec::new();
        side.closure(&mut a, 0);
        let root_best = side.best_of(&a, None);
        side.root = side.decide_with(root_best, "/", true);
        side.root_live = a
            .into_iter()
            .filter(|&n| side.nodes.get(n as usize).is_some_and(|n| !n.dead_end))
            .collect();
        Ok(side)
    }

    fn rank_of(&self, rule: Option<usize>) -> u32 {
        rule.map_or(0, |i| self.rules[i].rank)
    }

    /// Adds `n` and every node reachable from it through `**` edges to `set` (no pruning;
    /// for `explain` and the root).
    fn closure(&self, set: &mut Vec<NodeId>, n: NodeId) {
        let mut cur = Some(n);
        while let Some(c) = cur {
            if set.contains(&c) {
                return;
            }
            set.push(c);
            cur = self.nodes.get(c as usize).and_then(|node| node.star);
        }
    }

    /// The highest-ranked rule accepted by any node of `set`, or `best` if higher.
    fn best_of(&self, set: &[NodeId], mut best: Option<usize>) -> Option<usize> {
        let mut best_rank = self.rank_of(best);
        for &n in set {
            if let Some(node) = self.nodes.get(n as usize) {
                if node.best_rank > best_rank {
                    best_rank = node.best_rank;
                    best = Some(node.best);
                }
            }
        }
        best
    }

    /// One step of the automaton: calls `add` for every node reached from `cur` by
    /// consuming `seg` (before `**` closure).
    #[inline]
    fn step(&self, cur: &[NodeId], seg: &str, mut add: impl FnMut(NodeId)) {
        // The segment's last extension, found once for all nodes.
        let ext = super::path::rfind_byte(seg.as_bytes(), b'.').and_then(|dot| seg.get(dot + 1..));
        for &n in cur {
            let Some(node) = self.nodes.get(n as usize) else {
                continue;
            };
            if node.looping {
                add(n);
            }
            if node.dead_end {
                continue;
            }
            if !node.lit.is_empty() {
                if let Some(&c) = node.lit.get(seg) {
                    add(c);
                }
            }
            if let Some(x) = ext {
                if let Some(&c) = node.ext.get(x) {
                    add(c);
                }
            }
            if let Some(c) = node.any {
                add(c);
            }
            if !node.prefix.is_empty() {
                let first = seg.as_bytes().first().copied().unwrap_or(0);
                let from = node.prefix.partition_point(|(b, _, _)| *b < first);
                for (b, p, c) in &node.prefix[from..] {
                    if *b != first {
                        break;
                    }
                    if seg.starts_with(&**p) {
                        add(*c);
                    }
                }
            }
            if !node.suffix.is_empty() {
                let last = seg.as_bytes().last().copied().unwrap_or(0);
                let from = node.suffix.partition_point(|(b, _, _)| *b < last);
                for (b, x, c) in &node.suffix[from..] {
                    if *b != last {
                        break;
                    }
                    if seg.ends_with(&**x) {
                        add(*c);
                    }
                }
            }
            for (s, _, c) in &node.other {
                if s.matches(seg) {
                    add(*c);
                }
            }
        }
    }

    /// Decides a normalised path.
    pub fn decide(&self, norm: &str, is_dir: bool) -> SideDecision {
        if norm == "/" {
            return self.root;
        }
        let best = SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => self.best_for(norm, &mut s),
            Err(_) => self.best_for(norm, &mut Scratch::default()),
        });
        self.decide_with(best, norm, is_dir)
    }

    fn best_for(&self, norm: &str, s: &mut Scratch) -> Option<usize> {
        let Scratch {
            a,
            b,
            globs,
            stamps,
            stamp,
        } = s;
        // The root's closure, pruned: the live nodes of `root_set`.
        a.clear();
        a.extend_from_slice(&self.root_live);
        let mut best = self.root.rule;
        let mut best_rank = self.rank_of(best);
        for seg in super::path::segments(norm) {
            if a.is_empty() {
                break;
            }
            *stamp = stamp.wrapping_add(1);
            if *stamp == 0 || stamps.len() < self.nodes.len() {
                stamps.clear();
                stamps.resize(self.nodes.len(), 0);
                *stamp = 1;
            }
            b.clear();
            let mut adder = Adder {
                nodes: &self.nodes,
                set: b,
                stamps: stamps.as_mut_slice(),
                stamp: *stamp,
                best_rank,
                best,
            };
            self.step(a, seg, |n| adder.add(n));
            best = adder.best;
            best_rank = adder.best_rank;
            std::mem::swap(a, b);
        }
        if !self.glob_rule.is_empty() {
            let rel = norm.strip_prefix('/').unwrap_or(norm);
            self.set.matches_candidate_into(&Candidate::new(rel), globs);
            for &g in globs.iter() {
                if let Some(&(r, _)) = self.glob_rule.get(g) {
                    if self.rules[r].rank > best_rank {
                        best_rank = self.rules[r].rank;
                        best = Some(r);
                    }
                }
            }
        }
        best
    }

    fn decide_with(&self, best: Option<usize>, norm: &str, is_dir: bool) -> SideDecision {
        let level = best.map_or(self.default, |i| self.rules[i].level);
        let traversable =
            is_dir && level == Level::None && self.could_grant_beneath(norm, self.rank_of(best));
        SideDecision {
            level,
            rule: best,
            traversable,
        }
    }

    /// Could a rule ranked above `rank` grant `view` or more to something strictly beneath
    /// the directory `norm`?
    fn could_grant_beneath(&self, norm: &str, rank: u32) -> bool {
        for &i in &self.granting {
            let r = &self.rules[i];
            if r.rank <= rank {
                break;
            }
            if r.pattern.could_match_beneath(norm) {
                return true;
            }
        }
        false
    }

    /// Every rule matching `norm` itself or one of its ancestors, with the deepest such path
    /// (for `explain`; not on the hot path).
    pub fn matches_with_paths(&self, norm: &str) -> Vec<(usize, String)> {
        let mut found: Vec<Option<String>> = vec![None; self.rules.len()];
        let record = |set: &[NodeId], path: &str, found: &mut Vec<Option<String>>| {
            for &n in set {
                if let Some(node) = self.nodes.get(n as usize) {
                    for &r in &node.accept {
                        found[r] = Some(path.to_string());
                    }
                }
            }
        };
        let mut a = Vec::new();
        let mut b = Vec::new();
        self.closure(&mut a, 0);
        record(&a, "/", &mut found);
        let mut end = 0;
        for seg in super::path::segments(norm) {
            end += 1 + seg.len();
            b.clear();
            self.step(&a, seg, |n| self.closure(&mut b, n));
            std::mem::swap(&mut a, &mut b);
            if a.is_empty() {
                break;
            }
            record(&a, norm.get(..end).unwrap_or(norm), &mut found);
        }
        if !self.glob_rule.is_empty() {
            let mut prefixes: Vec<&str> = norm
                .char_indices()
                .filter(|&(i, c)| c == '/' && i > 0)
                .map(|(i, _)| &norm[..i])
                .collect();
            if norm != "/" {
                prefixes.push(norm);
            }
            let mut v = Vec::new();
            for p in prefixes {
                let rel = p.strip_prefix('/').unwrap_or(p);
                self.set
                    .matches_candidate_into(&Candidate::new(rel), &mut v);
                for &g in &v {
                    if let Some(&(r, false)) = self.glob_rule.get(g) {
                        found[r] = Some(p.to_string());
                    }
                }
            }
        }
        found
            .into_iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|p| (i, p)))
            .collect()
    }
}

/// Inserts a pattern's segments into the automaton; returns the node where it ends.
fn insert(nodes: &mut Vec<Node>, segs: &[Seg]) -> NodeId {
    let mut cur: NodeId = 0;
    for seg in segs {
        let new_id = NodeId::try_from(nodes.len()).unwrap_or(NodeId::MAX);
        let Some(node) = nodes.get_mut(cur as usize) else {
            return cur;
        };
        let (next, created) = match seg {
            Seg::Star2 => match node.star {
                Some(c) => (c, false),
                None => {
                    node.star = Some(new_id);
                    (new_id, true)
                }
            },
            Seg::Any => match node.any {
                Some(c) => (c, false),
                None => {
                    node.any = Some(new_id);
                    (new_id, true)
                }
            },
            Seg::Lit(l) => match node.lit.get(l.as_str()) {
                Some(&c) => (c, false),
                None => {
                    node.lit.insert(l.as_str().into(), new_id);
                    (new_id, true)
                }
            },
            Seg::Ext(e) => match node.ext.get(e.as_str()) {
                Some(&c) => (c, false),
                None => {
                    node.ext.insert(e.as_str().into(), new_id);
                    (new_id, true)
                }
            },
            Seg::Prefix(t) | Seg::Suffix(t) => {
                let is_prefix = matches!(seg, Seg::Prefix(_));
                let key = if is_prefix {
                    t.as_bytes().first()
                } else {
                    t.as_bytes().last()
                }
                .copied()
                .unwrap_or(0);
                let list = if is_prefix {
                    &mut node.prefix
                } else {
                    &mut node.suffix
                };
                match list.iter().find(|(_, k, _)| **k == **t) {
                    Some(&(_, _, c)) => (c, false),
                    None => {
                        let at = list.partition_point(|(b, _, _)| *b <= key);
                        list.insert(at, (key, t.as_str().into(), new_id));
                        (new_id, true)
                    }
                }
            }
            Seg::Glob(_, t) => match node.other.iter().find(|(_, k, _)| k == t) {
                Some(&(_, _, c)) => (c, false),
                None => {
                    node.other.push((seg.clone(), t.clone(), new_id));
                    (new_id, true)
                }
            },
        };
        if created {
            nodes.push(Node {
                looping: matches!(seg, Seg::Star2),
                ..Node::default()
            });
        }
        cur = next;
    }
    cur
}

//! Pattern validation and compilation: one rule's pattern becomes
//!
//! - the globs to put into the policy's `GlobSet` (the pattern itself, `x` for a pattern
//!   `x/**`, and the "coverage" variant `P/**` that matches everything beneath a match, so
//!   that one set match over a path finds every rule matching the path or an ancestor);
//! - whether it matches the workspace root itself;
//! - its ranking features (wildcards, literal prefix, literal characters);
//! - its segments, to answer "could this pattern match something beneath directory D?"
//!   (traversable hidden directories).

use globset::{Glob, GlobBuilder, GlobMatcher};

use super::error::quote;
use super::RuleType;

/// Longest pattern accepted, in bytes.
pub const MAX_PATTERN_BYTES: usize = 4096;

/// Patterns with more segments than this answer "could match beneath" conservatively (yes).
const MAX_BENEATH_SEGMENTS: usize = 63;

/// One segment of a pattern. Patterns are matched segment by segment (see
/// `matcher.rs`), and the same segments answer "could match beneath".
#[derive(Debug, Clone)]
pub(crate) enum Seg {
    /// `**`: zero or more whole segments.
    Star2,
    /// `*`: any one segment.
    Any,
    /// A segment without any glob syntax.
    Lit(String),
    /// `*.EXT` with `EXT` literal and without `.`: a segment whose last extension is `EXT`.
    Ext(String),
    /// `LIT*`: a segment starting with `LIT`.
    Prefix(String),
    /// `*LIT`: a segment ending with `LIT`.
    Suffix(String),
    /// Any other segment (`test_*.py`, `{a,b}`, `[0-9]*`); the string is its text.
    Glob(GlobMatcher, String),
}

impl Seg {
    pub fn matches(&self, s: &str) -> bool {
        match self {
            Seg::Star2 | Seg::Any => true,
            Seg::Lit(l) => l == s,
            Seg::Ext(e) => s.rsplit_once('.').is_some_and(|(_, x)| x == e),
            Seg::Prefix(p) => s.starts_with(p.as_str()),
            Seg::Suffix(x) => s.ends_with(x.as_str()),
            Seg::Glob(m, _) => m.is_match(s),
        }
    }
}

/// A glob to add to the set.
#[derive(Debug, Clone)]
pub(crate) struct SetGlob {
    pub glob: Glob,
    /// `true` for the `P/**` variant (matches strictly beneath a match of the pattern);
    /// `false` for globs that match the paths the pattern itself matches.
    pub coverage: bool,
}

/// A compiled pattern.
#[derive(Debug, Clone)]
pub(crate) struct CompiledPattern {
    /// The pattern without leading or trailing `/`, empty/`.` segments dropped
    /// (`""` stands for the root).
    #[cfg_attr(not(test), allow(dead_code))]
    pub norm: String,
    /// For patterns that cannot be matched segment by segment (`/` inside `{}` or `[]`):
    /// the globs for the policy's fallback `GlobSet`. Empty otherwise.
    pub globs: Vec<SetGlob>,
    /// The segments (empty for the root); `None` for patterns with `/` inside `{}` or `[]`,
    /// which are matched by the fallback `GlobSet` and answer "could match beneath"
    /// conservatively (yes).
    pub segs: Option<Vec<Seg>>,
    /// No wildcard at all.
    pub exact: bool,
    /// Literal characters before the first wildcard.
    pub literal_prefix: u32,
    /// Literal characters in the whole pattern.
    pub literal_chars: u32,
}

impl CompiledPattern {
    /// Whether the pattern could match some path strictly beneath the directory `dir`
    /// (normalised). Never answers `false` when the answer is "yes"; may answer `true` for
    /// patterns too complex to analyse (`/` inside braces or brackets, very many segments).
    pub fn could_match_beneath(&self, dir: &str) -> bool {
        let Some(segs) = &self.segs else {
            return true;
        };
        let n = segs.len();
        if n > MAX_BENEATH_SEGMENTS {
            return true;
        }
        // Bit i set: the first i pattern segments can have consumed the directory's
        // segments read so far.
        let closure = |mut states: u64| {
            for (i, s) in segs.iter().enumerate() {
                if states & (1 << i) != 0 && matches!(s, Seg::Star2) {
                    states |= 1 << (i + 1);
                }
            }
            states
        };
        let mut states = closure(1);
        for d in super::path::segments(dir) {
            let mut next = 0u64;
            for (i, s) in segs.iter().enumerate() {
                if states & (1 << i) == 0 {
                    continue;
                }
                if matches!(s, Seg::Star2) {
                    next |= 1 << i;
                } else if s.matches(d) {
                    next |= 1 << (i + 1);
                }
            }
            states = closure(next);
            if states == 0 {
                return false;
            }
        }
        // Some state with pattern left to match: at least one more segment (beneath the
        // directory) can complete it.
        states & ((1u64 << n) - 1) != 0
    }
}

/// Builds a glob with the engine's options: `*` never crosses `/`, `\` escapes, `{a,}`
/// allowed.
pub(crate) fn build_glob(p: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(p)
        .literal_separator(true)
        .backslash_escape(true)
        .empty_alternates(true)
        .build()
}

/// Validates and compiles a pattern of the given type. The error is the message to show
/// after `rule N: `.
pub(crate) fn compile(pattern: &str, kind: RuleType) -> Result<CompiledPattern, String> {
    if pattern.is_empty() {
        return Err(
            "empty pattern (use \"**\" for everything, \"/\" for the workspace root)".into(),
        );
    }
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(format!(
            "pattern is {} bytes long; at most {MAX_PATTERN_BYTES} are allowed",
            pattern.len()
        ));
    }
    if pattern.contains('\0') {
        return Err(format!(
            "invalid pattern {}: contains a NUL byte",
            quote(pattern)
        ));
    }
    match kind {
        RuleType::Glob => compile_glob(pattern),
        RuleType::Directory | RuleType::File => compile_literal(pattern, kind),
    }
}

fn compile_literal(pattern: &str, kind: RuleType) -> Result<CompiledPattern, String> {
    let mut segs: Vec<&str> = Vec::new();
    for s in pattern.split('/') {
        match s {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "invalid pattern {}: a {kind} pattern cannot contain \"..\" (paths are relative to the workspace root)",
                    quote(pattern)
                ))
            }
            s => segs.push(s),
        }
    }
    let norm = segs.join("/");
    let chars = norm.chars().count() as u32;
    Ok(CompiledPattern {
        segs: Some(segs.iter().map(|s| Seg::Lit((*s).to_string())).collect()),
        globs: Vec::new(),
        exact: true,
        literal_prefix: chars,
        literal_chars: chars,
        norm,
    })
}

fn compile_glob(pattern: &str) -> Result<CompiledPattern, String> {
    let invalid = |why: String| format!("invalid pattern {}: {why}", quote(pattern));
    let split = split_top(pattern);
    let mut segs: Vec<&str> = Vec::with_capacity(split.segments.len());
    for s in split.segments {
        match s {
            "" | "." => {}
            ".." => {
                return Err(invalid(
                    "a \"..\" segment can never match (paths are relative to the workspace root and normalised)".into(),
                ))
            }
            s => segs.push(s),
        }
    }
    let norm = segs.join("/");
    // Validate the pattern as written (after normalisation) first, so that the message is
    // about what the user wrote.
    let own = build_glob(&norm).map_err(|e| invalid(e.kind().to_string()))?;
    let (exact, literal_prefix, literal_chars) = literal_features(&norm);
    let matches_root = segs.iter().all(|s| *s == "**");
    let mut globs = Vec::new();
    let nfa = if split.slash_inside {
        None
    } else {
        segs.iter().map(|s| seg_of(s)).collect::<Option<Vec<Seg>>>()
    };
    if nfa.is_none() && !matches_root {
        globs.push(SetGlob {
            glob: own,
            coverage: false,
        });
        if segs.last() == Some(&"**") {
            // `x/**` also matches `x` itself; strip every trailing `**`.
            let base_len = segs.iter().rposition(|s| *s != "**").map_or(0, |i| i + 1);
            let base = segs[..base_len].join("/");
            let g = build_glob(&base).map_err(|e| invalid(e.kind().to_string()))?;
            globs.push(SetGlob {
                glob: g,
                coverage: false,
            });
        } else {
            let g = build_glob(&format!("{norm}/**")).map_err(|e| invalid(e.kind().to_string()))?;
            globs.push(SetGlob {
                glob: g,
                coverage: true,
            });
        }
    }
    Ok(CompiledPattern {
        norm,
        globs,
        segs: nfa,
        exact,
        literal_prefix,
        literal_chars,
    })
}

fn seg_of(s: &str) -> Option<Seg> {
    const META: [char; 7] = ['*', '?', '[', ']', '{', '}', '\\'];
    let literal = |x: &str| !x.contains(META);
    if s == "**" {
        return Some(Seg::Star2);
    }
    if s == "*" {
        return Some(Seg::Any);
    }
    if literal(s) {
        return Some(Seg::Lit(s.to_string()));
    }
    if let Some(rest) = s.strip_prefix('*') {
        if !rest.is_empty() && literal(rest) {
            if let Some(ext) = rest.strip_prefix('.') {
                if !ext.is_empty() && !ext.contains('.') {
                    return Some(Seg::Ext(ext.to_string()));
                }
            }
            return Some(Seg::Suffix(rest.to_string()));
        }
    }
    if let Some(pre) = s.strip_suffix('*') {
        if !pre.is_empty() && literal(pre) {
            return Some(Seg::Prefix(pre.to_string()));
        }
    }
    build_glob(s)
        .ok()
        .map(|g| Seg::Glob(g.compile_matcher(), s.to_string()))
}

struct Split<'a> {
    segments: Vec<&'a str>,
    /// A `/` inside `{...}` or `[...]`: segment analysis is not exact.
    slash_inside: bool,
}

/// Splits a glob at the `/` that separate segments (not those inside `{}` or `[]`, nor
/// escaped ones).
fn split_top(p: &str) -> Split<'_> {
    let b = p.as_bytes();
    let mut segments = Vec::new();
    let mut slash_inside = false;
    let mut start = 0;
    let mut depth = 0usize;
    let mut i = 0;
    // Byte scan: every syntax character is ASCII, and ASCII bytes never occur inside a
    // multi-byte UTF-8 sequence, so every split point is a char boundary.
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'[' => {
                // A class: `[!]...]` / `[]...]` take a leading `]` literally.
                let mut j = i + 1;
                if j < b.len() && b[j] == b'!' {
                    j += 1;
                }
                if j < b.len() && b[j] == b']' {
                    j += 1;
                }
                while j < b.len() && b[j] != b']' {
                    if b[j] == b'/' {
                        slash_inside = true;
                    }
                    j += 1;
                }
                i = j;
            }
            b'{' => depth += 1,
            b'}' => depth = depth.saturating_sub(1),
            b'/' if depth > 0 => slash_inside = true,
            b'/' => {
                segments.push(&p[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    segments.push(p.get(start..).unwrap_or(""));
    Split {
        segments,
        slash_inside,
    }
}

/// (no wildcard at all, literal characters before the first wildcard, literal characters).
fn literal_features(norm: &str) -> (bool, u32, u32) {
    let mut exact = true;
    let mut prefix = 0u32;
    let mut literal = 0u32;
    let mut chars = norm.chars().peekable();
    let mut depth = 0usize;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if chars.next().is_some() {
                    literal += 1;
                    if exact {
                        prefix += 1;
                    }
                }
            }
            '*' | '?' => exact = false,
            '[' => {
                exact = false;
                // Skip the class (its characters are not literal).
                if chars.peek() == Some(&'!') {
                    chars.next();
                }
                if chars.peek() == Some(&']') {
                    chars.next();
                }
                for c in chars.by_ref() {
                    if c == ']' {
                        break;
                    }
                }
            }
            '{' => {
                exact = false;
                depth += 1;
            }
            '}' if depth > 0 => depth -= 1,
            ',' if depth > 0 => {}
            _ => {
                literal += 1;
                if exact {
                    prefix += 1;
                }
            }
        }
    }
    (exact, prefix, literal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(p: &str) -> CompiledPattern {
        match compile(p, RuleType::Glob) {
            Ok(c) => c,
            Err(e) => panic!("{p}: {e}"),
        }
    }

    #[test]
    fn normalises_patterns() {
        assert_eq!(glob("/*.md").norm, "*.md");
        assert_eq!(glob("*.md").norm, "*.md");
        assert_eq!(glob("/docs/").norm, "docs");
        assert_eq!(glob("a//./b").norm, "a/b");
        let root = |p: &str| {
            glob(p)
                .segs
                .unwrap()
                .iter()
                .all(|s| matches!(s, Seg::Star2))
        };
        assert!(root("/"));
        assert!(root("**"));
        assert!(root("/**"));
        assert!(root("**/**"));
        assert!(!root("**/*"));
    }

    #[test]
    fn refuses_malformed() {
        for p in ["a[", "", "a\\", "{a", "../x", "a/../b", "x\0y"] {
            assert!(compile(p, RuleType::Glob).is_err(), "{p:?} accepted");
        }
        assert!(compile(&"a".repeat(MAX_PATTERN_BYTES + 1), RuleType::Glob).is_err());
        assert!(compile("/a/../b", RuleType::File).is_err());
        let e = compile("a[", RuleType::Glob).err().unwrap_or_default();
        assert!(
            e.starts_with("invalid pattern \"a[\": unclosed character class"),
            "{e}"
        );
    }

    #[test]
    fn features() {
        assert_eq!(
            literal_features("src/**/test_*.py"),
            (false, 4, 4 + 1 + 5 + 3)
        );
        assert_eq!(literal_features("docs/a.md"), (true, 9, 9));
        assert_eq!(literal_features("a\\*b"), (true, 3, 3));
        assert_eq!(literal_features("{a,bc}x"), (false, 0, 4));
        assert_eq!(literal_features("[ab]x"), (false, 0, 1));
    }

    #[test]
    fn split_respects_braces_and_classes() {
        let s = split_top("{a,b/c}/d");
        assert_eq!(s.segments, vec!["{a,b/c}", "d"]);
        assert!(s.slash_inside);
        let s = split_top("a\\/b/c");
        assert_eq!(s.segments, vec!["a\\/b", "c"]);
        let s = split_top("[]/]x/y");
        assert!(s.slash_inside);
    }

    #[test]
    fn beneath() {
        let p = glob("/secrets/public.key");
        assert!(p.could_match_beneath("/"));
        assert!(p.could_match_beneath("/secrets"));
        assert!(!p.could_match_beneath("/secrets/public.key"));
        assert!(!p.could_match_beneath("/secrets/other"));
        assert!(!p.could_match_beneath("/other"));
        let p = glob("**/*.py");
        assert!(p.could_match_beneath("/"));
        assert!(p.could_match_beneath("/a/b/c"));
        let p = glob("/src/**/test_*.py");
        assert!(p.could_match_beneath("/src"));
        assert!(p.could_match_beneath("/src/a/b"));
        assert!(!p.could_match_beneath("/lib"));
        let p = glob("x/**");
        assert!(p.could_match_beneath("/x"));
        assert!(!p.could_match_beneath("/y"));
        let p = glob("*.md");
        assert!(p.could_match_beneath("/"));
        assert!(!p.could_match_beneath("/a"));
        let p = glob("{a,b/c}/**");
        assert!(p.could_match_beneath("/zzz"));
        let f = compile("/docs/x", RuleType::File).map_err(|e| e.to_string());
        assert!(f.as_ref().is_ok_and(|f| f.could_match_beneath("/docs")));
        assert!(f.as_ref().is_ok_and(|f| !f.could_match_beneath("/doc")));
    }

    #[test]
    fn literal_types_are_literal() {
        let c = compile("/we*ird[1]/x", RuleType::File).unwrap();
        assert!(c.globs.is_empty());
        assert!(
            matches!(&c.segs.as_deref(), Some([Seg::Lit(a), Seg::Lit(b)]) if a == "we*ird[1]" && b == "x")
        );
    }

    #[test]
    fn segment_kinds() {
        let kinds = |p: &str| {
            glob(p)
                .segs
                .unwrap()
                .iter()
                .map(|s| match s {
                    Seg::Star2 => "**".to_string(),
                    Seg::Any => "*".to_string(),
                    Seg::Lit(l) => format!("lit:{l}"),
                    Seg::Ext(e) => format!("ext:{e}"),
                    Seg::Prefix(x) => format!("prefix:{x}"),
                    Seg::Suffix(x) => format!("suffix:{x}"),
                    Seg::Glob(_, t) => format!("glob:{t}"),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds("**/*.py"), vec!["**", "ext:py"]);
        assert_eq!(kinds("/a/*.tar.gz"), vec!["lit:a", "suffix:.tar.gz"]);
        assert_eq!(kinds("**/.env*"), vec!["**", "prefix:.env"]);
        assert_eq!(kinds("x/*/test_*.py"), vec!["lit:x", "*", "glob:test_*.py"]);
        assert_eq!(kinds("a**/b"), vec!["glob:a**", "lit:b"]);
        for (seg, yes, no) in [
            ("*.py", "a.py", "a.pyc"),
            ("*.py", ".py", "py"),
            ("*.tar.gz", "a.tar.gz", "a.gz"),
            (".env*", ".env", "env"),
            ("a**", "abc", "b"),
        ] {
            let s = seg_of(seg).unwrap();
            assert!(s.matches(yes), "{seg} {yes}");
            assert!(!s.matches(no), "{seg} {no}");
        }
    }
}

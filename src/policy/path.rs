//! Path normalisation. Every query is made in one form: relative to the workspace root,
//! written with a leading `/` (`/a/b`; the root itself is `/`).

use std::borrow::Cow;

/// Normalises a workspace path: accepts it with or without a leading `/`, collapses `//`,
/// `/./` and trailing `/`, and lets `..` pop a segment but never climb above the root.
///
/// The result starts with `/`, has no empty, `.` or `..` segment and no trailing `/` (the
/// root is `/`). Idempotent: `normalize(&normalize(p)) == normalize(p)`.
///
/// ```
/// use agentfense::policy::normalize;
/// assert_eq!(normalize("a//b/./c/"), "/a/b/c");
/// assert_eq!(normalize("/../../etc/passwd"), "/etc/passwd");
/// assert_eq!(normalize(""), "/");
/// ```
pub fn normalize(path: &str) -> String {
    normalize_cow(path).into_owned()
}

/// [`normalize`], borrowing when the path already is normalised (the common case for the
/// fence, which builds paths from normalised parents and directory entry names).
pub(crate) fn normalize_cow(path: &str) -> Cow<'_, str> {
    if is_normalized(path) {
        return Cow::Borrowed(path);
    }
    let mut segs: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// Whether `path` already is in the form [`normalize`] returns.
pub fn is_normalized(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    let mut rest = &b[1..];
    if rest.is_empty() {
        return true;
    }
    // One pass over the bytes (on the hot path of every decision).
    loop {
        let len = find_byte(rest, b'/').unwrap_or(rest.len());
        if matches!(&rest[..len], b"" | b"." | b"..") {
            return false;
        }
        match rest.get(len + 1..) {
            Some(r) => rest = r,
            None => return true,
        }
    }
}

const LO7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HI: u64 = 0x8080_8080_8080_8080;

/// The bytes of `w` equal to the byte of `pat` (repeated): their high bits set, exactly.
#[inline]
fn equal_bytes(w: u64, pat: u64) -> u64 {
    let x = w ^ pat;
    !(((x & LO7).wrapping_add(LO7)) | x) & HI
}

#[inline]
fn word(b: &[u8]) -> u64 {
    u64::from_le_bytes(<[u8; 8]>::try_from(b).unwrap_or_default())
}

/// The first position of `needle` in `hay` (eight bytes at a time; paths are scanned on
/// every decision).
#[inline]
pub(crate) fn find_byte(hay: &[u8], needle: u8) -> Option<usize> {
    let pat = u64::from_le_bytes([needle; 8]);
    let mut i = 0;
    while let Some(chunk) = hay.get(i..i + 8) {
        let m = equal_bytes(word(chunk), pat);
        if m != 0 {
            return Some(i + (m.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    hay.get(i..)?
        .iter()
        .position(|&c| c == needle)
        .map(|p| p + i)
}

/// The last position of `needle` in `hay`.
#[inline]
pub(crate) fn rfind_byte(hay: &[u8], needle: u8) -> Option<usize> {
    let pat = u64::from_le_bytes([needle; 8]);
    let mut end = hay.len();
    while end >= 8 {
        let m = equal_bytes(word(hay.get(end - 8..end)?), pat);
        if m != 0 {
            return Some(end - 8 + (7 - m.leading_zeros() / 8) as usize);
        }
        end -= 8;
    }
    hay.get(..end)?.iter().rposition(|&c| c == needle)
}

/// The segments of a normalised path (none for the root). Empty segments are skipped, so
/// this is also safe on other paths.
pub(crate) fn segments(norm: &str) -> Segments<'_> {
    Segments { rest: norm }
}

/// Iterator of [`segments`]: a plain byte scan, cheaper than `str::split` for the short
/// segments of paths.
pub(crate) struct Segments<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        loop {
            let b = self.rest.as_bytes();
            let start = b.iter().position(|&c| c != b'/')?;
            let len = find_byte(&b[start..], b'/').unwrap_or(b.len() - start);
            // `/` is ASCII, so both ends are char boundaries.
            let seg = self.rest.get(start..start + len)?;
            self.rest = self.rest.get(start + len..).unwrap_or("");
            if !seg.is_empty() {
                return Some(seg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises() {
        for (input, want) in [
            ("", "/"),
            ("/", "/"),
            ("//", "/"),
            (".", "/"),
            ("..", "/"),
            ("/..", "/"),
            ("a", "/a"),
            ("/a", "/a"),
            ("a/", "/a"),
            ("/a//b", "/a/b"),
            ("/a/./b/", "/a/b"),
            ("/a/b/..", "/a"),
            ("/a/../../b", "/b"),
            ("../../etc/passwd", "/etc/passwd"),
            ("/a/.../b", "/a/.../b"),
            ("/a/.b", "/a/.b"),
        ] {
            assert_eq!(normalize(input), want, "normalize({input:?})");
            assert_eq!(normalize(want), want);
            assert!(is_normalized(want));
        }
    }

    #[test]
    fn borrow_when_normalised() {
        assert!(matches!(normalize_cow("/a/b"), Cow::Borrowed(_)));
        assert!(matches!(normalize_cow("/"), Cow::Borrowed(_)));
        assert!(matches!(normalize_cow("a/b"), Cow::Owned(_)));
        assert!(!is_normalized("/a/"));
        assert!(!is_normalized("/a/./b"));
        assert!(!is_normalized(""));
    }

    #[test]
    fn byte_search() {
        for hay in [
            "",
            "a",
            "a/b",
            "abcdefgh/",
            "abcdefghijklmnop/q/r",
            "/",
            "no slash at all here!",
            "é/ü/\u{80}/x",
        ] {
            for n in [b'/', b'.', b'a', 0x80, 0xff] {
                let b = hay.as_bytes();
                assert_eq!(find_byte(b, n), b.iter().position(|&c| c == n), "{hay} {n}");
                assert_eq!(
                    rfind_byte(b, n),
                    b.iter().rposition(|&c| c == n),
                    "{hay} {n}"
                );
            }
        }
        let long: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for n in 0..=255u8 {
            assert_eq!(find_byte(&long, n), long.iter().position(|&c| c == n));
            assert_eq!(rfind_byte(&long, n), long.iter().rposition(|&c| c == n));
        }
    }

    #[test]
    fn segments_of_root_and_paths() {
        assert_eq!(segments("/").count(), 0);
        assert_eq!(segments("/a/b").collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(segments("//a//bc/").collect::<Vec<_>>(), vec!["a", "bc"]);
        assert_eq!(segments("/é/ü").collect::<Vec<_>>(), vec!["é", "ü"]);
    }
}

//! The node table: one node per path the kernel holds, with inode numbers that stay the same
//! for the life of the mount (git's index records them), whatever the kernel forgets.
//!
//! A path's inode number is a hash of the path (`path_ino`), so a node the kernel has forgotten
//! can be dropped and made again with the same number: the table holds only what the kernel
//! caches (which it trims under memory pressure), not every path ever seen. The numbers are the
//! same across restarts of the fence too. When the hash's number is taken by another live node
//! (a path removed while the kernel still holds it, a path whose type changed, or a real hash
//! collision), the node gets a number from a counter instead, never reused.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use fuser::FileType;

/// One path as the container sees it.
#[derive(Debug, Clone)]
pub struct Node {
    /// The path in the policy's form (`/a/b`; the root is `/`).
    pub path: String,
    pub kind: FileType,
    /// Whether base entries at this path's children show through (directories only).
    pub merge_base: bool,
    /// Whether base entries may show at this path itself (its parent's `merge_base`).
    pub parent_merge: bool,
    /// The kernel's lookup count.
    pub nlookup: u64,
}

#[derive(Default)]
pub struct Nodes {
    by_ino: HashMap<u64, Node>,
    /// Ordered, so that the nodes beneath a directory are one range.
    by_path: BTreeMap<String, u64>,
    /// Numbers of forgotten nodes that are not their path's hash (moved there by a rename, or
    /// given by the counter): the path gets the same number back when it comes again.
    pinned: BTreeMap<String, u64>,
    next: u64,
}

pub const ROOT: u64 = 1;

/// The inode number a path gets when it is free: FNV-1a of the path, in [2^62, 2^63) (above
/// the counter's numbers, and positive as a signed 64-bit number).
pub fn path_ino(path: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 2) | (1 << 62)
}

/// The path of child `name` of directory `dir` (both in the policy's form).
pub fn child_path(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// The path of the directory holding `path` (the root's is the root).
pub fn parent_path(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((p, _)) => p,
    }
}

impl Nodes {
    pub fn new(root_merge: bool) -> Nodes {
        let mut n = Nodes {
            next: ROOT + 1,
            ..Default::default()
        };
        n.by_ino.insert(
            ROOT,
            Node {
                path: "/".into(),
                kind: FileType::Directory,
                merge_base: root_merge,
                parent_merge: root_merge,
                nlookup: 1,
            },
        );
        n.by_path.insert("/".into(), ROOT);
        n
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.by_ino.get(&ino)
    }

    /// How many nodes the table holds.
    pub fn len(&self) -> usize {
        self.by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ino.is_empty()
    }

    /// Every node: inode number and path.
    pub fn all(&self) -> Vec<(u64, String)> {
        self.by_ino
            .iter()
            .map(|(i, n)| (*i, n.path.clone()))
            .collect()
    }

    /// A number for a new node at `path`.
    fn new_ino(&mut self, path: &str) -> u64 {
        if let Some(i) = self.pinned.remove(path) {
            if !self.by_ino.contains_key(&i) {
                return i;
            }
        }
        let h = path_ino(path);
        if !self.by_ino.contains_key(&h) {
            return h;
        }
        let ino = self.next;
        self.next += 1;
        ino
    }

    /// The node for `path`, created if needed, and updated with what a fresh lookup found.
    /// `count` adds one kernel lookup reference (a node without one is dropped again when the
    /// kernel forgets something, see `forget`, or when the path goes).
    pub fn upsert(
        &mut self,
        path: &str,
        kind: FileType,
        merge_base: bool,
        parent_merge: bool,
        count: bool,
    ) -> u64 {
        if let Some(&ino) = self.by_path.get(path) {
            if self.by_ino.get(&ino).is_some_and(|n| n.kind != kind) {
                // Another kind of entry at this path now (the host replaced a directory with a
                // file, say): a new inode, as the kernel must not see one inode change type.
                self.removed(path);
                return self.upsert(path, kind, merge_base, parent_merge, count);
            }
            if let Some(n) = self.by_ino.get_mut(&ino) {
                n.kind = kind;
                n.merge_base = merge_base;
                n.parent_merge = parent_merge;
                if count {
                    n.nlookup += 1;
                }
                return ino;
            }
        }
        let ino = self.new_ino(path);
        self.by_ino.insert(
            ino,
            Node {
                path: path.to_string(),
                kind,
                merge_base,
                parent_merge,
                nlookup: u64::from(count),
            },
        );
        self.by_path.insert(path.to_string(), ino);
        ino
    }

    /// The inode number a path has, if it has a node.
    pub fn ino_of(&self, path: &str) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// The inode number a directory listing reports for `path`: its node's, or the one a
    /// lookup would give it. Only when that number is taken by another node is a node made
    /// (so that the listing and a later lookup agree).
    pub fn listing_ino(&mut self, path: &str, kind: FileType, parent_merge: bool) -> u64 {
        if let Some(i) = self.ino_of(path) {
            return i;
        }
        if let Some(&i) = self.pinned.get(path) {
            if !self.by_ino.contains_key(&i) {
                return i;
            }
        }
        let h = path_ino(path);
        if !self.by_ino.contains_key(&h) {
            return h;
        }
        self.upsert(path, kind, false, parent_merge, false)
    }

    /// The kernel dropped `n` references to `ino`. Returns whether the node went (the kernel
    /// holds it no more; the same path gets the same number again if it comes back).
    pub fn forget(&mut self, ino: u64, n: u64) -> bool {
        let Some(node) = self.by_ino.get_mut(&ino) else {
            return false;
        };
        node.nlookup = node.nlookup.saturating_sub(n);
        if node.nlookup > 0 || ino == ROOT {
            return false;
        }
        if let Some(node) = self.by_ino.remove(&ino) {
            if self.by_path.get(&node.path) == Some(&ino) {
                self.by_path.remove(&node.path);
                if ino != path_ino(&node.path) {
                    self.pinned.insert(node.path, ino);
                }
            }
        }
        self.shrink();
        true
    }

    /// A hash table keeps its size when emptied: give the room back once it is mostly empty
    /// (amortised: each shrink halves at least what the next one can cost).
    fn shrink(&mut self) {
        let (len, cap) = (self.by_ino.len(), self.by_ino.capacity());
        if cap > 1024 && len * 4 < cap {
            self.by_ino.shrink_to(len * 2);
        }
    }

    /// The paths at and beneath `path`, with their numbers.
    fn subtree(&self, path: &str) -> Vec<(String, u64)> {
        subtree_of(&self.by_path, path)
    }
}

/// The entries of `map` at and beneath `path`.
fn subtree_of(map: &BTreeMap<String, u64>, path: &str) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = map
        .get_key_value(path)
        .map(|(p, i)| (p.clone(), *i))
        .into_iter()
        .collect();
    let prefix = if path == "/" {
        "/".to_string()
    } else {
        format!("{path}/")
    };
    out.extend(
        map.range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
            .take_while(|(p, _)| p.starts_with(&prefix))
            .filter(|(p, _)| p.as_str() != path)
            .map(|(p, i)| (p.clone(), *i)),
    );
    out
}

impl Nodes {
    /// A path was removed: a later entry at that path is a new file (with a new number while
    /// the kernel still holds the old one).
    pub fn removed(&mut self, path: &str) {
        for (p, _) in subtree_of(&self.pinned, path) {
            self.pinned.remove(&p);
        }
        for (p, ino) in self.subtree(path) {
            self.by_path.remove(&p);
            let drop = match self.by_ino.get_mut(&ino) {
                // Kept, detached from the path, for the kernel's outstanding references.
                Some(n) if n.nlookup > 0 => {
                    n.path = format!("\0removed:{ino}");
                    false
                }
                Some(_) => true,
                None => false,
            };
            if drop {
                self.by_ino.remove(&ino);
            }
        }
        self.shrink();
    }

    /// `from` was renamed to `to` (replacing whatever was at `to`): the moved node keeps its
    /// inode number, as do nodes beneath a moved directory.
    pub fn renamed(&mut self, from: &str, to: &str) {
        if from != to {
            self.removed(to);
        }
        self.renamed_raw(from, to);
    }

    /// Two paths swapped places (`RENAME_EXCHANGE`).
    pub fn exchanged(&mut self, a: &str, b: &str) {
        let tmp = format!("\0exchange:{a}");
        self.renamed_raw(a, &tmp);
        self.renamed_raw(b, a);
        self.renamed_raw(&tmp, b);
    }

    fn renamed_raw(&mut self, from: &str, to: &str) {
        for (p, ino) in subtree_of(&self.pinned, from) {
            self.pinned.remove(&p);
            self.pinned.insert(format!("{to}{}", &p[from.len()..]), ino);
        }
        for (p, ino) in self.subtree(from) {
            self.by_path.remove(&p);
            let newp = format!("{to}{}", &p[from.len()..]);
            if let Some(n) = self.by_ino.get_mut(&ino) {
                n.path = newp.clone();
            }
            self.by_path.insert(newp, ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_stable_and_never_reused() {
        let mut n = Nodes::new(true);
        let a = n.upsert("/a", FileType::RegularFile, false, true, true);
        n.forget(a, 1);
        assert_eq!(n.upsert("/a", FileType::RegularFile, false, true, true), a);
        n.removed("/a");
        let a2 = n.upsert("/a", FileType::RegularFile, false, true, true);
        assert_ne!(a, a2);
    }

    #[test]
    fn rename_moves_subtree_and_keeps_numbers() {
        let mut n = Nodes::new(true);
        let d = n.upsert("/d", FileType::Directory, false, true, true);
        let f = n.upsert("/d/f", FileType::RegularFile, false, false, true);
        let old = n.upsert("/e", FileType::RegularFile, false, true, true);
        n.renamed("/d", "/e");
        assert_eq!(n.ino_of("/e"), Some(d));
        assert_eq!(n.ino_of("/e/f"), Some(f));
        assert_eq!(n.ino_of("/d"), None);
        assert_eq!(n.get(f).unwrap().path, "/e/f");
        assert_ne!(n.get(old).unwrap().path, "/e");
    }

    #[test]
    fn exchange_swaps() {
        let mut n = Nodes::new(true);
        let a = n.upsert("/a", FileType::RegularFile, false, true, true);
        let b = n.upsert("/b", FileType::Directory, false, true, true);
        let c = n.upsert("/b/c", FileType::RegularFile, false, true, true);
        n.exchanged("/a", "/b");
        assert_eq!(n.ino_of("/a"), Some(b));
        assert_eq!(n.ino_of("/b"), Some(a));
        assert_eq!(n.ino_of("/a/c"), Some(c));
    }

    #[test]
    fn forgotten_nodes_go_and_come_back_with_their_number() {
        let mut n = Nodes::new(true);
        let d = n.upsert("/d", FileType::Directory, false, true, true);
        let f = n.upsert("/d/f", FileType::RegularFile, false, false, true);
        assert_eq!(f, path_ino("/d/f"));
        n.upsert("/d/f", FileType::RegularFile, false, false, true);
        assert!(!n.forget(f, 1));
        assert!(n.forget(f, 1));
        assert_eq!(n.ino_of("/d/f"), None);
        assert_eq!(n.len(), 2);
        assert_eq!(
            n.upsert("/d/f", FileType::RegularFile, false, false, true),
            f
        );
        assert!(!n.forget(ROOT, 5), "the root stays");
        // A listing reports the number a lookup will give, without a node.
        assert_eq!(
            n.listing_ino("/d/g", FileType::RegularFile, false),
            path_ino("/d/g")
        );
        assert_eq!(n.ino_of("/d/g"), None);
        let _ = d;
    }

    #[test]
    fn a_number_still_held_is_never_given_to_another_file() {
        let mut n = Nodes::new(true);
        let a = n.upsert("/a", FileType::RegularFile, false, true, true);
        n.removed("/a");
        // The kernel still holds the removed file: the new one gets a counter number.
        let a2 = n.upsert("/a", FileType::RegularFile, false, true, true);
        assert_ne!(a, a2);
        assert_eq!(n.listing_ino("/a", FileType::RegularFile, true), a2);
        // A removed node nobody holds goes at once.
        let b = n.upsert("/b", FileType::RegularFile, false, true, false);
        n.removed("/b");
        assert!(n.get(b).is_none());
    }

    #[test]
    fn a_renamed_file_keeps_its_number_after_the_kernel_forgets_it() {
        let mut n = Nodes::new(true);
        let a = n.upsert("/a", FileType::RegularFile, false, true, true);
        n.renamed("/a", "/b");
        assert!(n.forget(a, 1));
        assert_eq!(n.listing_ino("/b", FileType::RegularFile, true), a);
        assert_eq!(n.upsert("/b", FileType::RegularFile, false, true, true), a);
        assert!(n.forget(a, 1));
        // Moved again while forgotten (with its directory), still the same number.
        n.upsert("/d", FileType::Directory, false, true, true);
        n.renamed("/b", "/d/b");
        assert!(n.forget(a, 1) || n.get(a).is_none());
        n.renamed("/d", "/e");
        assert_eq!(
            n.upsert("/e/b", FileType::RegularFile, false, true, true),
            a
        );
        n.removed("/e/b");
        assert_eq!(
            n.listing_ino("/e/b", FileType::RegularFile, true),
            path_ino("/e/b")
        );
        assert!(n.forget(a, 1));
        n.renamed("/e/b", "/b");
        n.removed("/b");
        assert_eq!(
            n.upsert("/b", FileType::RegularFile, false, true, true),
            path_ino("/b")
        );
    }

    #[test]
    fn removing_a_directory_takes_only_its_subtree() {
        let mut n = Nodes::new(true);
        for p in ["/d", "/d/x", "/d/x/y", "/d-sibling", "/d0", "/e"] {
            n.upsert(p, FileType::Directory, false, true, false);
        }
        n.removed("/d");
        assert_eq!(n.ino_of("/d/x/y"), None);
        assert!(n.ino_of("/d-sibling").is_some() && n.ino_of("/d0").is_some());
        n.renamed("/e", "/f");
        assert!(n.ino_of("/f").is_some() && n.ino_of("/e").is_none());
    }

    #[test]
    fn child_paths() {
        assert_eq!(child_path("/", "a"), "/a");
        assert_eq!(child_path("/a", "b"), "/a/b");
        assert_eq!(parent_path("/a/b"), "/a");
        assert_eq!(parent_path("/a"), "/");
        assert_eq!(parent_path("/"), "/");
    }
}

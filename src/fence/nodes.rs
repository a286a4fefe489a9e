//! The node table: one node per path the container has seen, with inode numbers that stay the
//! same for the life of the mount (git's index records them), whatever the kernel forgets.

use std::collections::HashMap;

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
    by_path: HashMap<String, u64>,
    next: u64,
}

pub const ROOT: u64 = 1;

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

    /// Every node: inode number and path.
    pub fn all(&self) -> Vec<(u64, String)> {
        self.by_ino
            .iter()
            .map(|(i, n)| (*i, n.path.clone()))
            .collect()
    }

    /// The node for `path`, created (with a new, never reused inode number) if needed, and
    /// updated with what a fresh lookup found. `count` adds one kernel lookup reference.
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
        let ino = self.next;
        self.next += 1;
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

    /// The inode number a path has, or will have.
    pub fn ino_of(&self, path: &str) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if let Some(node) = self.by_ino.get_mut(&ino) {
            node.nlookup = node.nlookup.saturating_sub(n);
        }
    }

    /// A path was removed: a later entry at that path is a new file with a new number.
    pub fn removed(&mut self, path: &str) {
        if let Some(ino) = self.by_path.remove(path) {
            // The node stays for the kernel's outstanding references, detached from the path.
            if let Some(n) = self.by_ino.get_mut(&ino) {
                n.path = format!("\0removed:{ino}");
            }
        }
        let prefix = format!("{path}/");
        let gone: Vec<String> = self
            .by_path
            .keys()
            .filter(|p| p.starts_with(&prefix))
            .cloned()
            .collect();
        for p in gone {
            self.removed(&p);
        }
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
        let prefix = format!("{from}/");
        let moved: Vec<(String, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| *p == from || p.starts_with(&prefix))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (p, ino) in moved {
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
    fn child_paths() {
        assert_eq!(child_path("/", "a"), "/a");
        assert_eq!(child_path("/a", "b"), "/a/b");
        assert_eq!(parent_path("/a/b"), "/a");
        assert_eq!(parent_path("/a"), "/");
        assert_eq!(parent_path("/"), "/");
    }
}

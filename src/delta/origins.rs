//! What the base held at a path when the container's delta first shadowed it.
//!
//! `commit` must never overwrite or delete a base entry that changed on the host after the
//! container saw it. So, the first time the upper layer takes over a path (copy-up, a
//! directory made in the upper layer for a child's sake, a whiteout, a new entry, a rename's
//! destination), the fence appends the base entry's identity there (inode, type, mode, owner,
//! size, modification and change times), or its absence, to a JSON Lines file in the
//! container's state directory (out of the container's reach). The first record of a path
//! wins: it is what the container started from. A path the container gave back entirely (an
//! entry it made and removed, leaving no whiteout) is forgotten, so that a later host entry
//! there is not taken for a conflict.
//!
//! Records are per path, not per inode, because whiteouts are replaced by new entries, files
//! are renamed over others, and hard links share an inode.
//!
//! Records are written before the upper layer changes; a crash of the daemon never leaves an
//! upper entry without its record (a crash of the whole machine may lose the last records
//! with the page cache: commit then treats the path as new, and a base entry there as a
//! conflict: safe).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::sys::fs::{self as sfs, Errno, FileType, Res, Stat};

/// The identity of a base entry, as far as telling "changed since" goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub ino: u64,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: i64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Identity {
    pub fn of(st: &Stat) -> Identity {
        Identity {
            ino: st.st_ino,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime, st.st_ctime_nsec as i64),
        }
    }

    pub fn is_dir(&self) -> bool {
        FileType::from_raw_mode(self.mode) == FileType::Directory
    }

    /// Whether `st` is still this entry, unchanged. Directories change their times whenever
    /// an entry is added or removed in them, which is not a change of the directory itself:
    /// for them only the inode, mode and owner count.
    pub fn unchanged(&self, st: &Stat) -> bool {
        let now = Identity::of(st);
        if self.is_dir() {
            self.ino == now.ino
                && self.mode == now.mode
                && self.uid == now.uid
                && self.gid == now.gid
        } else {
            *self == now
        }
    }
}

/// One line of the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Line {
    /// The path, relative to the workspace root (`"."` for the root).
    p: String,
    /// The base entry then; `null` when there was none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b: Option<Identity>,
    /// Present and true: the path was given back, forget it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    forget: bool,
}

/// Recorded origins: path to the base entry there when first shadowed (`None`: there was none).
pub type OriginMap = HashMap<String, Option<Identity>>;

/// Reads an origins file; a missing file is an empty map. A torn last line (a crash in the
/// middle of a write) is ignored.
pub fn load(path: &Path) -> std::io::Result<OriginMap> {
    let mut map = OriginMap::new();
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(map),
        Err(e) => return Err(e),
    };
    for line in BufReader::new(f).lines() {
        let line = line?;
        let Ok(l) = serde_json::from_str::<Line>(&line) else {
            continue;
        };
        if l.forget {
            map.remove(&l.p);
        } else {
            map.entry(l.p).or_insert(l.b);
        }
    }
    Ok(map)
}

/// Writes `map` as a fresh origins file (atomically), or removes the file when it is empty.
pub fn store(path: &Path, map: &OriginMap) -> std::io::Result<()> {
    if map.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let mut text = String::new();
    for k in keys {
        let l = Line {
            p: k.clone(),
            b: map[k].clone(),
            forget: false,
        };
        text.push_str(&serde_json::to_string(&l).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The daemon's side: records as the upper layer takes paths over.
pub struct Origins {
    inner: Option<Mutex<Inner>>,
}

struct Inner {
    known: OriginMap,
    file: File,
}

impl Origins {
    /// Nothing recorded (writes in place, or tests).
    pub fn disabled() -> Origins {
        Origins { inner: None }
    }

    /// Records into `path`, knowing what it already holds.
    pub fn open(path: &Path) -> std::io::Result<Origins> {
        let known = load(path)?;
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Origins {
            inner: Some(Mutex::new(Inner { known, file })),
        })
    }

    /// Records what `base` holds at `rel`, unless `rel` was recorded before.
    pub fn claim(&self, base: Option<std::os::fd::BorrowedFd<'_>>, rel: &str) -> Res<()> {
        let (Some(inner), Some(base)) = (&self.inner, base) else {
            return Ok(());
        };
        let mut g = inner.lock().map_err(|_| Errno::IO)?;
        if g.known.contains_key(rel) {
            return Ok(());
        }
        let b = sfs::lstat(base, rel)?.map(|st| Identity::of(&st));
        let line = Line {
            p: rel.to_string(),
            b: b.clone(),
            forget: false,
        };
        write_line(&mut g.file, &line)?;
        g.known.insert(rel.to_string(), b);
        Ok(())
    }

    /// Forgets `rel` (the container gave the path back: no upper entry, no whiteout).
    pub fn forget(&self, rel: &str) -> Res<()> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let mut g = inner.lock().map_err(|_| Errno::IO)?;
        if g.known.remove(rel).is_none() {
            return Ok(());
        }
        let line = Line {
            p: rel.to_string(),
            b: None,
            forget: true,
        };
        write_line(&mut g.file, &line)
    }
}

fn write_line(file: &mut File, line: &Line) -> Res<()> {
    let mut text = serde_json::to_string(line).map_err(|_| Errno::IO)?;
    text.push('\n');
    // One write per line (O_APPEND): a line is never interleaved with another.
    file.write_all(text.as_bytes())
        .map_err(|e| Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn first_record_wins_and_forget_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::create_dir(&base).unwrap();
        std::fs::write(base.join("f"), b"one").unwrap();
        let file = dir.path().join("origins.jsonl");
        let root = sfs::open_root(&base).unwrap();
        let o = Origins::open(&file).unwrap();
        o.claim(Some(root.as_fd()), "f").unwrap();
        o.claim(Some(root.as_fd()), "new").unwrap();
        // The host changes f: the first record still holds what the container started from.
        std::fs::write(base.join("f"), b"two, longer").unwrap();
        o.claim(Some(root.as_fd()), "f").unwrap();
        o.claim(Some(root.as_fd()), "gone").unwrap();
        o.forget("gone").unwrap();
        drop(o);
        let m = load(&file).unwrap();
        assert_eq!(m.len(), 2);
        let f = m["f"].as_ref().unwrap();
        assert_eq!(f.size, 3);
        let now = sfs::lstat(root.as_fd(), "f").unwrap().unwrap();
        assert!(!f.unchanged(&now));
        assert_eq!(m["new"], None);
        // Reopened, it knows what it holds.
        let o = Origins::open(&file).unwrap();
        o.claim(Some(root.as_fd()), "f").unwrap();
        drop(o);
        assert_eq!(load(&file).unwrap()["f"].as_ref().unwrap().size, 3);
    }

    #[test]
    fn torn_lines_are_ignored_and_store_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("o.jsonl");
        std::fs::write(&file, "{\"p\":\"a\"}\n{\"p\":\"b\",\"b\":{\"ino\":1").unwrap();
        let m = load(&file).unwrap();
        assert_eq!(m.len(), 1);
        store(&file, &m).unwrap();
        assert_eq!(load(&file).unwrap(), m);
        store(&file, &OriginMap::new()).unwrap();
        assert!(!file.exists());
    }

    #[test]
    fn directories_compare_without_times() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let root = sfs::open_root(dir.path()).unwrap();
        let before = Identity::of(&sfs::lstat(root.as_fd(), "d").unwrap().unwrap());
        std::fs::write(dir.path().join("d/x"), b"x").unwrap();
        let after = sfs::lstat(root.as_fd(), "d").unwrap().unwrap();
        assert!(before.unchanged(&after));
    }
}

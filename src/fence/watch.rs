//! Keeping the kernel's caches right while they live long.
//!
//! The kernel may keep names and attributes it got from the fence for as long as the fence
//! says. Changes made through the fence are known to the kernel already; changes the host makes
//! to the base behind the container's back are not. So every base directory the container
//! looks into is watched with inotify, and a change in it invalidates the kernel's entry for the
//! name and its attributes (`FUSE_NOTIFY_INVAL_ENTRY`, `FUSE_NOTIFY_INVAL_INODE`). Entries in a
//! watched directory, or in a directory that exists only in the container's delta (which only
//! the fence changes), get a long time to live; everything else keeps the short one, so host
//! changes still show within about a second when a watch cannot be added (the inotify limit).
//!
//! Watches are added through `/proc/self/fd/N` of a directory opened beneath the base root
//! (never by a path string the host could swap a symlink into). If the kernel's event queue
//! overflows, every cached name and attribute is invalidated.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};

use rustix::fs::inotify::{self, ReadFlags, WatchFlags};

use super::nodes::{child_path, parent_path, Nodes};
use crate::sys::fs::{self as sfs, Mode, OFlags};

/// The time to live for entries and attributes the kernel can be told about when they change.
pub const LONG_TTL: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Default)]
struct Dirs {
    by_wd: HashMap<i32, String>,
    by_path: HashMap<String, i32>,
}

/// The inotify instance over the base and the directories it watches (by container path).
pub struct Watch {
    fd: OwnedFd,
    dirs: Mutex<Dirs>,
}

impl Watch {
    pub fn new() -> Option<Watch> {
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC).ok()?;
        Some(Watch {
            fd,
            dirs: Mutex::new(Dirs::default()),
        })
    }

    /// Whether directory `path` (container form, `/a/b`) is watched.
    pub fn watched(&self, path: &str) -> bool {
        self.dirs
            .lock()
            .map(|d| d.by_path.contains_key(path))
            .unwrap_or(false)
    }

    /// Watches base directory `path` (relative form `rel` beneath `base`), if not yet.
    /// Returns whether it is watched.
    pub fn watch(&self, base: std::os::fd::BorrowedFd<'_>, path: &str, rel: &str) -> bool {
        if self.watched(path) {
            return true;
        }
        let Ok(dir) = sfs::open_beneath(base, rel, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
        else {
            return false;
        };
        use std::os::fd::AsRawFd;
        let proc = format!("/proc/self/fd/{}", dir.as_raw_fd());
        let mask = WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::MOVED_FROM
            | WatchFlags::MOVED_TO
            | WatchFlags::MODIFY
            | WatchFlags::ATTRIB
            | WatchFlags::DELETE_SELF
            | WatchFlags::MOVE_SELF
            | WatchFlags::ONLYDIR
            | WatchFlags::EXCL_UNLINK;
        let Ok(wd) = inotify::add_watch(&self.fd, proc.as_str(), mask) else {
            return false;
        };
        let Ok(mut d) = self.dirs.lock() else {
            return false;
        };
        // The same directory reached again under another path (it was renamed): the newest
        // path is the one the kernel caches now.
        if let Some(old) = d.by_wd.insert(wd, path.to_string()) {
            d.by_path.remove(&old);
        }
        d.by_path.insert(path.to_string(), wd);
        true
    }

    fn dir_of(&self, wd: i32) -> Option<String> {
        self.dirs.lock().ok()?.by_wd.get(&wd).cloned()
    }

    fn forget_wd(&self, wd: i32) {
        if let Ok(mut d) = self.dirs.lock() {
            if let Some(p) = d.by_wd.remove(&wd) {
                d.by_path.remove(&p);
            }
        }
    }

    /// Serves events until the inotify descriptor fails (the daemon exits with the session).
    pub fn run(self: Arc<Self>, nodes: Arc<Mutex<Nodes>>, notifier: fuser::Notifier) {
        let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 64 * 1024];
        let mut reader = inotify::Reader::new(self.fd.as_fd(), &mut buf);
        loop {
            let ev = match reader.next() {
                Ok(ev) => ev,
                Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => continue,
                Err(_) => return,
            };
            let flags = ev.events();
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                invalidate_all(&nodes, &notifier);
                continue;
            }
            let wd = ev.wd();
            let Some(dir) = self.dir_of(wd) else {
                continue;
            };
            if flags.intersects(ReadFlags::IGNORED | ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF)
            {
                // The directory itself went away or moved: its parent's watch reports the
                // name; forget the path so that it is watched again where it is found next.
                self.forget_wd(wd);
                if flags.contains(ReadFlags::MOVE_SELF) {
                    let _ = inotify::remove_watch(&self.fd, wd);
                }
                continue;
            }
            let Some(name) = ev.file_name() else {
                continue;
            };
            let name = OsStr::from_bytes(name.to_bytes()).to_os_string();
            let Some(n) = name.to_str() else {
                continue;
            };
            let child = child_path(&dir, n);
            let (parent_ino, child_ino) = match nodes.lock() {
                Ok(g) => (g.ino_of(&dir), g.ino_of(&child)),
                Err(_) => return,
            };
            let names_changed = flags.intersects(
                ReadFlags::CREATE | ReadFlags::DELETE | ReadFlags::MOVED_FROM | ReadFlags::MOVED_TO,
            );
            if let Some(p) = parent_ino {
                // Errors only say the kernel had nothing cached. The name goes whatever
                // changed: the next path walk then looks it up again and the reply carries
                // the new size (reads through splice, as `cat` does, trust the cached size,
                // and the fence has no `default_permissions` refreshing attributes at open).
                let _ = notifier.inval_entry(fuser::INodeNo(p), &name);
                if names_changed {
                    let _ = notifier.inval_inode(fuser::INodeNo(p), 0, 0);
                }
            }
            if let Some(c) = child_ino {
                let _ = notifier.inval_inode(fuser::INodeNo(c), 0, 0);
            }
        }
    }
}

/// Drops every name and attribute the kernel has cached from the fence.
fn invalidate_all(nodes: &Mutex<Nodes>, notifier: &fuser::Notifier) {
    let all: Vec<(u64, String)> = match nodes.lock() {
        Ok(g) => g.all(),
        Err(_) => return,
    };
    let by_path: HashMap<&str, u64> = all.iter().map(|(i, p)| (p.as_str(), *i)).collect();
    for (ino, path) in &all {
        let _ = notifier.inval_inode(fuser::INodeNo(*ino), 0, 0);
        if path == "/" {
            continue;
        }
        if let (Some(p), Some((_, name))) = (by_path.get(parent_path(path)), path.rsplit_once('/'))
        {
            let _ = notifier.inval_entry(fuser::INodeNo(*p), OsStr::new(name));
        }
    }
}

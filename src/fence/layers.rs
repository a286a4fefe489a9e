//! The two layers under a fence: the shared base (never written while copy-on-write is on) and
//! the container's upper directory, where every change lands.
//!
//! Bookkeeping lives where no name a container can create reaches it:
//! - a deleted base entry is hidden by a *whiteout*, a character device 0:0 in the upper layer
//!   (containers cannot create character devices through the fence: `mknod` of devices is
//!   refused), so no file name can be mistaken for one;
//! - a directory that replaces a deleted one is marked *opaque* with the `trusted.` extended
//!   attribute [`OPAQUE_XATTR`]; `trusted.agentfense.*` attributes are invisible to the
//!   container and it cannot set them;
//! - what the base held at each path the upper layer took over is recorded outside the layer
//!   (see [`crate::delta::origins`]), for `commit`.
//!
//! With copy-on-write off (`agentfense.io/delta=off`) there is no base: the upper layer *is*
//! the workspace, and changes are made in place.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use crate::sys::fs::{self as sfs, Errno, FileType, Mode, OFlags, Res, Stat};

/// Marks an upper directory whose base counterpart must not show through.
pub const OPAQUE_XATTR: &str = "trusted.agentfense.opaque";
/// The prefix of our own extended attributes.
pub const PRIVATE_XATTR_PREFIX: &[u8] = b"trusted.agentfense.";

/// Whether an extended attribute name is our own bookkeeping.
pub fn is_private_xattr(name: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    name.as_bytes().starts_with(PRIVATE_XATTR_PREFIX)
}

/// Which layer an entry was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Upper,
    Base,
}

/// An entry as the container sees it.
#[derive(Debug, Clone)]
pub struct Found {
    pub layer: Layer,
    pub st: Stat,
    /// For directories: whether base entries beneath show through (the directory exists in the
    /// base, nothing on the way hides it, and it is not opaque).
    pub merge_base: bool,
    /// Whether the base has an entry at this very path (that a deletion must hide).
    pub in_base: bool,
}

impl Found {
    pub fn kind(&self) -> FileType {
        sfs::file_type(&self.st)
    }
    pub fn is_dir(&self) -> bool {
        self.kind() == FileType::Directory
    }
}

pub struct Layers {
    base: Option<OwnedFd>,
    upper: OwnedFd,
    /// What the base held where the upper layer took over (for `commit`).
    origins: crate::delta::origins::Origins,
    /// Copy-ups (and the parent directories they create) run one at a time: two first writes
    /// racing on the same path must not fail with `EEXIST`.
    copy_lock: std::sync::Mutex<()>,
}

/// Set on the upper root once it has taken the base root's owner, mode and times.
const ROOT_INIT_XATTR: &str = "trusted.agentfense.root";

/// `"/a/b"` (the policy's form) to `"a/b"` (relative to a layer root); the root is `"."`.
pub fn rel(path: &str) -> &str {
    let r = path.trim_start_matches('/');
    if r.is_empty() {
        "."
    } else {
        r
    }
}

impl Drop for Layers {
    fn drop(&mut self) {
        sfs::uncache_dirs(self.upper.as_fd());
    }
}

impl Layers {
    /// Copy-on-write over `base`, changes in `upper`; or, with `base` None, changes in place.
    pub fn open(base: Option<&Path>, upper: &Path) -> Res<Layers> {
        Self::open_with(base, upper, crate::delta::origins::Origins::disabled())
    }

    /// [`Layers::open`], recording into `origins` what the base held at each path the upper
    /// layer takes over.
    pub fn open_with(
        base: Option<&Path>,
        upper: &Path,
        origins: crate::delta::origins::Origins,
    ) -> Res<Layers> {
        let l = Layers {
            base: base.map(sfs::open_root).transpose()?,
            upper: sfs::open_root(upper)?,
            origins,
            copy_lock: std::sync::Mutex::new(()),
        };
        if l.cow() {
            // The upper layer is this daemon's alone (the base is the host's: never cached).
            sfs::cache_dirs(l.upper());
        }
        for root in [l.base(), Some(l.upper())].into_iter().flatten() {
            if sfs::case_insensitive(root)? {
                // Refused rather than served: rules could be bypassed by another spelling.
                return Err(Errno::MEDIUMTYPE);
            }
        }
        // The root is shown from the upper layer, so that changes to it (chmod, times,
        // attributes) stick; it starts as a copy of the base root's metadata (once: a
        // container created again under the same id keeps what it changed).
        if let Some(b) = l.base() {
            l.claim(".")?;
            if sfs::get_xattr(l.upper(), ".", OsStr::new(ROOT_INIT_XATTR)).is_err() {
                let st = sfs::lstat(b, ".")?.ok_or(Errno::NOENT)?;
                l.copy_attrs(".", &st)?;
                sfs::set_xattr(l.upper(), ".", OsStr::new(ROOT_INIT_XATTR), b"1", 0)?;
            }
        }
        Ok(l)
    }

    pub fn cow(&self) -> bool {
        self.base.is_some()
    }

    /// Records what the base holds at `rel` before the upper layer takes the path over (the
    /// first time only).
    pub fn claim(&self, rel: &str) -> Res<()> {
        self.origins.claim(self.base(), rel)
    }

    pub fn upper(&self) -> BorrowedFd<'_> {
        self.upper.as_fd()
    }

    pub fn base(&self) -> Option<BorrowedFd<'_>> {
        self.base.as_ref().map(|b| b.as_fd())
    }

    fn root(&self, layer: Layer) -> BorrowedFd<'_> {
        match (layer, &self.base) {
            (Layer::Base, Some(b)) => b.as_fd(),
            _ => self.upper.as_fd(),
        }
    }

    /// Whether an upper entry is a whiteout.
    pub fn is_whiteout(&self, st: &Stat) -> bool {
        self.cow() && sfs::file_type(st) == FileType::CharacterDevice && st.st_rdev == 0
    }

    fn is_opaque(&self, rel: &str) -> bool {
        self.cow() && sfs::get_xattr(self.upper(), rel, OsStr::new(OPAQUE_XATTR)).is_ok()
    }

    /// The root of the workspace.
    pub fn root_entry(&self) -> Res<Found> {
        let up = sfs::lstat(self.upper(), ".")?.ok_or(Errno::NOENT)?;
        match self.base() {
            Some(b) => {
                let st = sfs::lstat(b, ".")?.ok_or(Errno::NOENT)?;
                let opaque = self.is_opaque(".");
                if opaque {
                    Ok(Found {
                        layer: Layer::Upper,
                        st: up,
                        merge_base: false,
                        in_base: true,
                    })
                } else {
                    let _ = st;
                    Ok(Found {
                        layer: Layer::Upper,
                        st: up,
                        merge_base: true,
                        in_base: true,
                    })
                }
            }
            None => Ok(Found {
                layer: Layer::Upper,
                st: up,
                merge_base: false,
                in_base: false,
            }),
        }
    }

    /// Finds `rel` (whose parent directory lets base entries show through when
    /// `parent_merge`).
    pub fn find(&self, rel: &str, parent_merge: bool) -> Res<Option<Found>> {
        if rel == "." {
            return self.root_entry().map(Some);
        }
        let in_base = match (parent_merge, self.base()) {
            (true, Some(b)) => sfs::lstat(b, rel)?,
            _ => None,
        };
        match sfs::lstat(self.upper(), rel)? {
            Some(st) if self.is_whiteout(&st) => Ok(None),
            Some(st) => {
                let is_dir = sfs::file_type(&st) == FileType::Directory;
                let base_dir = in_base
                    .as_ref()
                    .is_some_and(|b| sfs::file_type(b) == FileType::Directory);
                let merge_base = is_dir && base_dir && !self.is_opaque(rel);
                Ok(Some(Found {
                    layer: Layer::Upper,
                    st,
                    merge_base,
                    in_base: in_base.is_some(),
                }))
            }
            None => Ok(in_base.map(|st| {
                let is_dir = sfs::file_type(&st) == FileType::Directory;
                Found {
                    layer: Layer::Base,
                    st,
                    merge_base: is_dir,
                    in_base: true,
                }
            })),
        }
    }

    /// The merged listing of directory `rel`: upper entries (less whiteouts) over base entries
    /// (less whited-out names), with their types.
    pub fn list(&self, rel: &str, found: &Found) -> Res<Vec<(std::ffi::OsString, FileType)>> {
        let mut out: Vec<(std::ffi::OsString, FileType)> = Vec::new();
        let mut taken = std::collections::HashSet::new();
        let upper_has_dir = found.layer == Layer::Upper
            || sfs::lstat(self.upper(), rel)?
                .is_some_and(|st| sfs::file_type(&st) == FileType::Directory);
        if upper_has_dir {
            for (name, ft) in sfs::read_dir(self.upper(), rel)? {
                taken.insert(name.clone());
                if ft == FileType::CharacterDevice && self.cow() {
                    let st = sfs::lstat_in_dir(self.upper(), rel, &name)?;
                    if self.is_whiteout(&st) {
                        continue;
                    }
                }
                out.push((name, ft));
            }
        }
        if found.merge_base {
            if let Some(b) = self.base() {
                for (name, ft) in sfs::read_dir(b, rel)? {
                    if !taken.contains(&name) {
                        out.push((name, ft));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Opens the entry's backing file.
    pub fn open_file(&self, rel: &str, layer: Layer, flags: OFlags) -> Res<OwnedFd> {
        // A symlink where the entry or a directory on its way was (the host swapped it since
        // the lookup) is never followed: the entry is stale, and the kernel looks it up again.
        sfs::open_beneath(self.root(layer), rel, flags, Mode::empty()).map_err(|e| {
            if e == Errno::LOOP {
                Errno::STALE
            } else {
                e
            }
        })
    }

    /// Makes sure directory `rel` exists in the upper layer, creating it and its missing
    /// ancestors as copies of their base counterparts (mode, owner, times; not opaque).
    pub fn ensure_upper_dir(&self, rel: &str) -> Res<()> {
        if rel == "." {
            return Ok(());
        }
        match sfs::lstat(self.upper(), rel)? {
            Some(st) if sfs::file_type(&st) == FileType::Directory => return Ok(()),
            Some(_) => return Err(Errno::NOTDIR),
            None => {}
        }
        let (parent, _) = sfs::split(rel);
        self.ensure_upper_dir(parent)?;
        let base = self.base().ok_or(Errno::NOENT)?;
        let st = sfs::lstat(base, rel)?.ok_or(Errno::NOENT)?;
        if sfs::file_type(&st) != FileType::Directory {
            return Err(Errno::NOTDIR);
        }
        self.claim(rel)?;
        match sfs::mkdir(self.upper(), rel, 0o700) {
            Ok(()) => self.copy_attrs(rel, &st),
            // Made meanwhile by another request: fine if it is a directory.
            Err(Errno::EXIST) => match sfs::lstat(self.upper(), rel)? {
                Some(s) if sfs::file_type(&s) == FileType::Directory => Ok(()),
                _ => Err(Errno::NOTDIR),
            },
            Err(e) => Err(e),
        }
    }

    /// Owner, mode and times of `st` onto upper entry `rel`.
    fn copy_attrs(&self, rel: &str, st: &Stat) -> Res<()> {
        sfs::lchown(self.upper(), rel, Some(st.st_uid), Some(st.st_gid))?;
        if sfs::file_type(st) != FileType::Symlink {
            sfs::chmod(self.upper(), rel, st.st_mode & 0o7777)?;
        }
        sfs::set_times(self.upper(), rel, &sfs::stat_times(st))
    }

    /// Copies base entry `rel` into the upper layer (first modification), keeping content,
    /// mode, owner, times and extended attributes. A regular file is written unnamed and
    /// linked into place when complete. No-op if the entry is already in the upper layer.
    pub fn copy_up(&self, rel: &str) -> Res<()> {
        let Some(base) = self.base() else {
            return Ok(());
        };
        let _one_at_a_time = self.copy_lock.lock().map_err(|_| Errno::IO)?;
        if let Some(st) = sfs::lstat(self.upper(), rel)? {
            if !self.is_whiteout(&st) {
                return Ok(());
            }
        }
        let st = sfs::lstat(base, rel)?.ok_or(Errno::NOENT)?;
        let (parent, _) = sfs::split(rel);
        self.ensure_upper_dir(parent)?;
        self.claim(rel)?;
        match sfs::file_type(&st) {
            FileType::Directory => self.ensure_upper_dir(rel),
            FileType::RegularFile => {
                // Non-blocking and checked: the host may swap a FIFO in meanwhile.
                let src =
                    sfs::open_beneath(base, rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())?;
                if sfs::file_type(&rustix::fs::fstat(&src)?) != FileType::RegularFile {
                    return Err(Errno::AGAIN);
                }
                let tmp = sfs::tmpfile_in(self.upper(), parent, 0o600)?;
                sfs::copy_contents(src.as_fd(), tmp.as_fd())?;
                sfs::copy_xattrs(base, rel, tmp.as_fd(), &is_private_xattr)?;
                rustix::fs::fchown(
                    &tmp,
                    Some(rustix::fs::Uid::from_raw(st.st_uid)),
                    Some(rustix::fs::Gid::from_raw(st.st_gid)),
                )?;
                rustix::fs::fchmod(&tmp, Mode::from_raw_mode(st.st_mode & 0o7777))?;
                rustix::fs::futimens(&tmp, &sfs::stat_times(&st))?;
                self.clear_whiteout(rel)?;
                sfs::link_tmpfile(tmp.as_fd(), self.upper(), rel)
            }
            FileType::Symlink => {
                let target = sfs::readlink(base, rel)?;
                self.clear_whiteout(rel)?;
                sfs::symlink(self.upper(), &target, rel)?;
                self.copy_attrs(rel, &st)
            }
            FileType::Fifo | FileType::Socket => {
                self.clear_whiteout(rel)?;
                sfs::mknod(
                    self.upper(),
                    rel,
                    sfs::file_type(&st),
                    st.st_mode & 0o7777,
                    0,
                )?;
                self.copy_attrs(rel, &st)
            }
            // Device nodes from the base are never reproduced (the mount is nodev anyway).
            _ => Err(Errno::PERM),
        }
    }

    /// Removes a whiteout at `rel` if there is one (before creating something there).
    /// Returns whether there was one.
    pub fn clear_whiteout(&self, rel: &str) -> Res<bool> {
        match sfs::lstat(self.upper(), rel)? {
            Some(st) if self.is_whiteout(&st) => {
                sfs::unlink(self.upper(), rel, false)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Hides base entry `rel` from now on.
    pub fn whiteout(&self, rel: &str) -> Res<()> {
        let (parent, _) = sfs::split(rel);
        {
            let _one_at_a_time = self.copy_lock.lock().map_err(|_| Errno::IO)?;
            self.ensure_upper_dir(parent)?;
        }
        self.claim(rel)?;
        sfs::mknod(self.upper(), rel, FileType::CharacterDevice, 0o000, 0)
    }

    /// Marks upper directory `rel` opaque: nothing of the base's shows through it.
    pub fn set_opaque(&self, rel: &str) -> Res<()> {
        sfs::set_xattr(self.upper(), rel, OsStr::new(OPAQUE_XATTR), b"y", 0)
    }

    /// Removes `rel` from the view: the upper entry (with everything beneath, which for a
    /// directory is only bookkeeping once it is empty to the container), and a whiteout when
    /// the base has an entry there.
    pub fn remove(&self, rel: &str, found: &Found) -> Res<()> {
        if found.layer == Layer::Upper {
            if found.is_dir() {
                sfs::remove_tree(self.upper(), rel)?;
            } else {
                sfs::unlink(self.upper(), rel, false)?;
            }
        } else if !self.cow() {
            sfs::unlink(self.upper(), rel, found.is_dir())?;
        }
        if self.cow() && found.in_base {
            self.whiteout(rel)?;
        } else {
            // Given back entirely: a later host entry there is not the container's business.
            self.origins.forget(rel)?;
        }
        Ok(())
    }

    /// Makes room for a new entry at `rel`: its parent directories in the upper layer.
    pub fn prepare_parent(&self, rel: &str) -> Res<()> {
        if !self.cow() {
            return Ok(());
        }
        let (parent, _) = sfs::split(rel);
        let _one_at_a_time = self.copy_lock.lock().map_err(|_| Errno::IO)?;
        self.ensure_upper_dir(parent)
    }

    /// Whether the base has an entry at `rel` (beneath a directory whose base shows through).
    pub fn base_has(&self, rel: &str) -> bool {
        self.base()
            .is_some_and(|b| sfs::lstat(b, rel).ok().flatten().is_some())
    }

    /// Whether directory `rel` holds anything from the base (itself, or beneath it).
    pub fn has_base_content(&self, found: &Found) -> bool {
        self.cow() && (found.in_base || found.merge_base)
    }

    /// Every path beneath upper directory `rel` (relative to it), for checking a directory
    /// rename against the policy.
    pub fn upper_subtree(&self, rel: &str) -> Res<Vec<(String, bool)>> {
        let mut out = Vec::new();
        let mut stack = vec![String::new()];
        while let Some(sub) = stack.pop() {
            let dir = if sub.is_empty() {
                rel.to_string()
            } else {
                sfs::join(rel, &sub)
            };
            for (name, ft) in sfs::read_dir(self.upper(), &dir)? {
                let name = name.to_str().ok_or(Errno::INVAL)?.to_string();
                let child = if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                };
                let is_dir = ft == FileType::Directory;
                out.push((child.clone(), is_dir));
                if is_dir {
                    stack.push(child);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn setup() -> (tempfile::TempDir, Layers) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        let upper = dir.path().join("upper");
        fs::create_dir_all(base.join("d/e")).unwrap();
        fs::create_dir_all(&upper).unwrap();
        fs::write(base.join("d/f"), b"base content").unwrap();
        fs::write(base.join("d/e/g"), b"g").unwrap();
        std::os::unix::fs::symlink("f", base.join("d/l")).unwrap();
        let l = Layers::open(Some(&base), &upper).unwrap();
        (dir, l)
    }

    fn names(l: &Layers, rel: &str) -> Vec<String> {
        let f = l.find(rel, true).unwrap().unwrap();
        let mut v: Vec<String> = l
            .list(rel, &f)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n.to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rel_forms() {
        assert_eq!(rel("/"), ".");
        assert_eq!(rel("/a/b"), "a/b");
    }

    #[test]
    fn copy_up_keeps_content_and_base_untouched() {
        let (dir, l) = setup();
        l.copy_up("d/f").unwrap();
        let up = dir.path().join("upper/d/f");
        assert_eq!(fs::read(&up).unwrap(), b"base content");
        fs::write(&up, b"changed").unwrap();
        assert_eq!(
            fs::read(dir.path().join("base/d/f")).unwrap(),
            b"base content"
        );
        let f = l.find("d/f", true).unwrap().unwrap();
        assert_eq!(f.layer, Layer::Upper);
        assert!(f.in_base);
        l.copy_up("d/l").unwrap();
        assert_eq!(
            fs::read_link(dir.path().join("upper/d/l")).unwrap(),
            Path::new("f")
        );
    }

    #[test]
    fn whiteouts_hide_and_recreate_is_fresh() {
        let (dir, l) = setup();
        assert_eq!(names(&l, "d"), ["e", "f", "l"]);
        let f = l.find("d/f", true).unwrap().unwrap();
        l.remove("d/f", &f).unwrap();
        assert!(l.find("d/f", true).unwrap().is_none());
        assert_eq!(names(&l, "d"), ["e", "l"]);
        assert!(dir.path().join("base/d/f").exists());
        // rm -rf d/e && mkdir d/e gives an empty directory.
        let e = l.find("d/e", true).unwrap().unwrap();
        l.remove("d/e", &e).unwrap();
        assert!(l.clear_whiteout("d/e").unwrap());
        sfs::mkdir(l.upper(), "d/e", 0o755).unwrap();
        l.set_opaque("d/e").unwrap();
        let e = l.find("d/e", true).unwrap().unwrap();
        assert!(!e.merge_base);
        assert!(l.list("d/e", &e).unwrap().is_empty());
        assert!(dir.path().join("base/d/e/g").exists());
    }

    #[test]
    fn a_file_named_like_bookkeeping_is_just_a_file() {
        let (_dir, l) = setup();
        l.ensure_upper_dir("d").unwrap();
        fs::write(_dir.path().join("upper/d/.wh.f"), b"x").unwrap();
        assert_eq!(names(&l, "d"), [".wh.f", "e", "f", "l"]);
    }

    #[test]
    fn in_place_mode_changes_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"1").unwrap();
        let l = Layers::open(None, dir.path()).unwrap();
        assert!(!l.cow());
        let f = l.find("a", false).unwrap().unwrap();
        l.remove("a", &f).unwrap();
        assert!(!dir.path().join("a").exists());
    }
}

//! File-descriptor-relative file system access for the fence.
//!
//! Every path handed to these functions is relative to a layer root held open as an `O_PATH`
//! directory, and is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)`: a symlink anywhere on the way (planted by the host or swapped in
//! during a race) fails the call with `ELOOP` instead of leading outside the layer. Final
//! components are never followed (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`). Built on rustix's safe
//! wrappers: no `unsafe` here.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};

use rustix::fs::{AtFlags, ResolveFlags, Timespec};
pub use rustix::fs::{FileType, Mode, OFlags, RenameFlags, Stat, StatVfs, Timestamps};
pub use rustix::io::Errno;

/// Result type of this module: errors are raw errnos, ready for a FUSE reply.
pub type Res<T> = Result<T, Errno>;

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Opens a layer root (a host directory given by the runtime, not by a container).
pub fn open_root(path: &std::path::Path) -> Res<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Whether names on the file system of directory `dir` are matched ignoring case (FAT, exFAT,
/// NTFS, SMB/CIFS, HFS+, ISO 9660, or a case-folding ext4/f2fs directory). Policies are
/// decided on the name a container asks for: on such a file system `.ENV` would reach `.env`.
pub fn case_insensitive(dir: BorrowedFd<'_>) -> Res<bool> {
    const CASE_INSENSITIVE_FS: [i64; 8] = [
        0x4d44,     // msdos / vfat
        0x2011bab0, // exfat
        0x5346544e, // ntfs (ntfs-3g)
        0x7366746e, // ntfs3
        0xff534d42, // cifs
        0xfe534d42, // smb2
        0x482b,     // hfs+
        0x9660,     // iso9660
    ];
    let st = rustix::fs::fstatfs(dir)?;
    if CASE_INSENSITIVE_FS.contains(&(st.f_type as i64)) {
        return Ok(true);
    }
    const FS_CASEFOLD_FL: u32 = 0x4000_0000;
    let fd = open_beneath(dir, ".", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    Ok(match rustix::fs::ioctl_getflags(&fd) {
        Ok(flags) => flags.bits() & FS_CASEFOLD_FL != 0,
        Err(_) => false,
    })
}

/// Opens `rel` beneath `root`. `rel` is `"."` for the root itself.
pub fn open_beneath(root: BorrowedFd<'_>, rel: &str, flags: OFlags, mode: Mode) -> Res<OwnedFd> {
    if let Some(i) = rel.rfind('/') {
        // The parent from the cache, then one component beneath it, resolved the same way.
        // (A parent that is not a directory, a symlink say, gets the full walk's answer.)
        match cached_dir(root, &rel[..i]) {
            Some(Ok(dir)) => return openat2_beneath(dir.as_fd(), &rel[i + 1..], flags, mode),
            Some(Err(Errno::NOTDIR)) | None => {}
            Some(Err(e)) => return Err(e),
        }
    }
    openat2_beneath(root, rel, flags, mode)
}

fn openat2_beneath(root: BorrowedFd<'_>, rel: &str, flags: OFlags, mode: Mode) -> Res<OwnedFd> {
    loop {
        match rustix::fs::openat2(
            root,
            rel,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            mode,
            RESOLVE,
        ) {
            // The kernel asks callers to retry when a rename raced with the walk.
            Err(Errno::AGAIN) => continue,
            other => return other,
        }
    }
}

/// Splits `a/b/c` into (`a/b`, `c`); a single component has parent `"."`.
pub fn split(rel: &str) -> (&str, &str) {
    match rel.rfind('/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (".", rel),
    }
}

/// Joins a relative directory and a name.
pub fn join(dir: &str, name: &str) -> String {
    if dir == "." || dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The parent directory of `rel`, opened `O_PATH`, and the final name.
pub fn parent_of<'r, 'a>(root: BorrowedFd<'r>, rel: &'a str) -> Res<(Dir<'r>, &'a str)> {
    let (dir, name) = split(rel);
    Ok((dir_beneath(root, dir)?, name))
}

/// A directory opened `O_PATH`: the layer root itself, one opened for the caller, or one
/// from the cache of a layer only this process changes.
pub enum Dir<'r> {
    Root(BorrowedFd<'r>),
    Owned(OwnedFd),
    Shared(Arc<OwnedFd>),
}

impl AsFd for Dir<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Dir::Root(fd) => *fd,
            Dir::Owned(fd) => fd.as_fd(),
            Dir::Shared(fd) => fd.as_fd(),
        }
    }
}

/// Directory `dir` beneath `root` (`"."`: the root itself), opened `O_PATH`.
pub fn dir_beneath<'r>(root: BorrowedFd<'r>, dir: &str) -> Res<Dir<'r>> {
    if dir == "." {
        return Ok(Dir::Root(root));
    }
    cached_dir(root, dir).unwrap_or_else(|| {
        openat2_beneath(root, dir, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).map(Dir::Owned)
    })
}

/// Directory `dir` beneath `root` from the cache, opened and kept there if need be; None when
/// `root` is not the cached layer.
fn cached_dir<'r>(root: BorrowedFd<'r>, dir: &str) -> Option<Res<Dir<'r>>> {
    let generation = {
        let mut g = DIRS.lock().ok()?;
        let c = g.as_mut().filter(|c| c.root == root.as_raw_fd())?;
        if let Some(fd) = c.dirs.get(dir) {
            return Some(Ok(Dir::Shared(fd.clone())));
        }
        c.generation
    };
    let flags = OFlags::PATH | OFlags::DIRECTORY;
    let fd = match openat2_beneath(root, dir, flags, Mode::empty()) {
        Ok(fd) => Arc::new(fd),
        Err(e) => return Some(Err(e)),
    };
    if let Ok(mut g) = DIRS.lock() {
        // Kept only if no directory was removed or renamed meanwhile (the path might then
        // name another directory, or none).
        if let Some(c) = g.as_mut().filter(|c| c.generation == generation) {
            if c.dirs.len() >= DIR_CACHE_MAX {
                c.dirs.clear();
            }
            c.dirs.insert(dir.to_string(), fd.clone());
        }
    }
    Some(Ok(Dir::Shared(fd)))
}

/// Directories of the one layer whose tree only this process changes (a fence's upper
/// layer), by path (at most 256 descriptors): a path walk of `openat2` per operation becomes
/// one lookup here. Every directory removal or rename in that layer empties it, before and
/// after the change.
struct DirCache {
    root: RawFd,
    generation: u64,
    dirs: HashMap<String, Arc<OwnedFd>>,
}

static DIRS: Mutex<Option<DirCache>> = Mutex::new(None);

const DIR_CACHE_MAX: usize = 256;

/// Caches directories beneath `root` from now on: only for a tree that nothing but this
/// process changes, and held open until [`uncache_dirs`].
pub fn cache_dirs(root: BorrowedFd<'_>) {
    if let Ok(mut g) = DIRS.lock() {
        *g = Some(DirCache {
            root: root.as_raw_fd(),
            generation: 0,
            dirs: HashMap::new(),
        });
    }
}

/// Stops caching directories beneath `root` (before it is closed: its number may be reused).
pub fn uncache_dirs(root: BorrowedFd<'_>) {
    if let Ok(mut g) = DIRS.lock() {
        if g.as_ref().is_some_and(|c| c.root == root.as_raw_fd()) {
            *g = None;
        }
    }
}

/// Runs `change`, which may remove or move directories beneath `root`: every cached one is
/// forgotten before it (no lookup meanwhile stores one) and after it (none stored during it
/// outlives it).
fn moving_dirs<T>(root: BorrowedFd<'_>, change: impl FnOnce() -> Res<T>) -> Res<T> {
    let forget = || {
        if let Ok(mut g) = DIRS.lock() {
            if let Some(c) = g.as_mut().filter(|c| c.root == root.as_raw_fd()) {
                c.generation += 1;
                c.dirs.clear();
            }
        }
    };
    forget();
    let r = change();
    forget();
    r
}

/// `lstat` of `rel` beneath `root`; `None` when it does not exist.
pub fn lstat(root: BorrowedFd<'_>, rel: &str) -> Res<Option<Stat>> {
    let r = if rel == "." {
        rustix::fs::fstat(root)
    } else {
        match parent_of(root, rel) {
            Ok((dir, name)) => rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW),
            Err(e) => Err(e),
        }
    };
    match r {
        Ok(st) => Ok(Some(st)),
        // A directory on the way that is no longer one (or now a symlink, which is never
        // followed): there is no such path.
        Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The file type of a `Stat`.
pub fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Reads a directory's entries (without `.` and `..`): name and, when the file system says,
/// its type.
pub fn read_dir(root: BorrowedFd<'_>, rel: &str) -> Res<Vec<(OsString, FileType)>> {
    let fd = open_beneath(root, rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    let mut dir = rustix::fs::Dir::read_from(&fd)?;
    let mut out = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let mut ft = entry.file_type();
        if ft == FileType::Unknown {
            ft = match rustix::fs::statat(&fd, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => file_type(&st),
                Err(_) => continue,
            };
        }
        out.push((OsStr::from_bytes(name).to_os_string(), ft));
    }
    Ok(out)
}

/// `stat` of an entry found by `read_dir` (to tell whiteouts from real character devices).
pub fn lstat_in_dir(root: BorrowedFd<'_>, dir: &str, name: &OsStr) -> Res<Stat> {
    let fd = dir_beneath(root, dir)?;
    rustix::fs::statat(&fd, name, AtFlags::SYMLINK_NOFOLLOW)
}

/// Creates a directory.
pub fn mkdir(root: BorrowedFd<'_>, rel: &str, mode: u32) -> Res<()> {
    let (dir, name) = parent_of(root, rel)?;
    rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(mode))
}

/// Creates a special file (FIFO, socket, character device for whiteouts) or empty regular file.
pub fn mknod(root: BorrowedFd<'_>, rel: &str, kind: FileType, mode: u32, dev: u64) -> Res<()> {
    let (dir, name) = parent_of(root, rel)?;
    rustix::fs::mknodat(&dir, name, kind, Mode::from_raw_mode(mode), dev)
}

/// Creates a symlink holding `target` as written.
pub fn symlink(root: BorrowedFd<'_>, target: &OsStr, rel: &str) -> Res<()> {
    let (dir, name) = parent_of(root, rel)?;
    rustix::fs::symlinkat(target, &dir, name)
}

/// Reads a symlink's target.
pub fn readlink(root: BorrowedFd<'_>, rel: &str) -> Res<OsString> {
    let (dir, name) = parent_of(root, rel)?;
    let target = rustix::fs::readlinkat(&dir, name, Vec::new())?;
    Ok(OsStr::from_bytes(target.as_bytes()).to_os_string())
}

/// Removes a file (`dir` false) or an empty directory (`dir` true).
pub fn unlink(root: BorrowedFd<'_>, rel: &str, dir: bool) -> Res<()> {
    let (parent, name) = parent_of(root, rel)?;
    if !dir {
        return rustix::fs::unlinkat(&parent, name, AtFlags::empty());
    }
    moving_dirs(root, || {
        rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR)
    })
}

/// Removes `rel` and everything beneath it, never following a symlink.
pub fn remove_tree(root: BorrowedFd<'_>, rel: &str) -> Res<()> {
    moving_dirs(root, || remove_tree_inner(root, rel))
}

fn remove_tree_inner(root: BorrowedFd<'_>, rel: &str) -> Res<()> {
    let Some(st) = lstat(root, rel)? else {
        return Ok(());
    };
    if file_type(&st) == FileType::Directory {
        for (name, _) in read_dir(root, rel)? {
            let child = join(rel, &name.to_string_lossy());
            if name.to_str().is_none() {
                // Names that are not UTF-8 cannot be joined losslessly: remove through the dir.
                let dir = open_beneath(root, rel, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
                let st = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW)?;
                let flags = if file_type(&st) == FileType::Directory {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                rustix::fs::unlinkat(&dir, &name, flags)?;
                continue;
            }
            remove_tree_inner(root, &child)?;
        }
        unlink(root, rel, true)
    } else {
        unlink(root, rel, false)
    }
}

/// `renameat2` within one layer.
pub fn rename(root: BorrowedFd<'_>, from: &str, to: &str, flags: RenameFlags) -> Res<()> {
    let (a, an) = parent_of(root, from)?;
    let (b, bn) = parent_of(root, to)?;
    moving_dirs(root, || rustix::fs::renameat_with(&a, an, &b, bn, flags))
}

/// A hard link within one layer.
pub fn link(root: BorrowedFd<'_>, from: &str, to: &str) -> Res<()> {
    let (a, an) = parent_of(root, from)?;
    let (b, bn) = parent_of(root, to)?;
    rustix::fs::linkat(&a, an, &b, bn, AtFlags::empty())
}

/// Changes owner without following a final symlink.
pub fn lchown(root: BorrowedFd<'_>, rel: &str, uid: Option<u32>, gid: Option<u32>) -> Res<()> {
    let fd = open_beneath(root, rel, OFlags::PATH, Mode::empty())?;
    rustix::fs::chownat(
        &fd,
        "",
        uid.map(rustix::fs::Uid::from_raw),
        gid.map(rustix::fs::Gid::from_raw),
        AtFlags::EMPTY_PATH,
    )
}

/// Changes mode (not for symlinks, whose mode Linux does not keep).
pub fn chmod(root: BorrowedFd<'_>, rel: &str, mode: u32) -> Res<()> {
    let (dir, name) = parent_of(root, rel)?;
    rustix::fs::chmodat(&dir, name, Mode::from_raw_mode(mode), AtFlags::empty())
}

/// Sets access and modification times without following a final symlink.
pub fn set_times(root: BorrowedFd<'_>, rel: &str, times: &Timestamps) -> Res<()> {
    if rel == "." {
        let fd = open_beneath(root, ".", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
        return rustix::fs::futimens(&fd, times);
    }
    let (dir, name) = parent_of(root, rel)?;
    rustix::fs::utimensat(&dir, name, times, AtFlags::SYMLINK_NOFOLLOW)
}

/// Timestamps as `utimensat` takes them, from a `Stat`.
pub fn stat_times(st: &Stat) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        },
    }
}

/// The path under which the kernel reaches an open descriptor's file (for the xattr calls,
/// which take no `O_PATH` descriptor).
fn proc_fd_path(fd: BorrowedFd<'_>) -> String {
    use std::os::fd::AsRawFd;
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Reads an extended attribute of `rel` (never following a final symlink).
pub fn get_xattr(root: BorrowedFd<'_>, rel: &str, name: &OsStr) -> Res<Vec<u8>> {
    let fd = open_beneath(root, rel, OFlags::PATH, Mode::empty())?;
    let p = proc_fd_path(fd.as_fd());
    let size = rustix::fs::getxattr_query(p.as_str(), name)?;
    let mut buf = vec![0u8; size];
    let n = rustix::fs::getxattr(p.as_str(), name, &mut buf[..])?;
    buf.truncate(n);
    Ok(buf)
}

/// Lists extended attribute names of `rel`.
pub fn list_xattr(root: BorrowedFd<'_>, rel: &str) -> Res<Vec<OsString>> {
    let fd = open_beneath(root, rel, OFlags::PATH, Mode::empty())?;
    let p = proc_fd_path(fd.as_fd());
    let size = rustix::fs::listxattr_query(p.as_str())?;
    let mut buf = vec![0u8; size];
    let n = rustix::fs::listxattr(p.as_str(), &mut buf[..])?;
    buf.truncate(n);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| OsStr::from_bytes(n).to_os_string())
        .collect())
}

/// Sets an extended attribute of `rel`.
pub fn set_xattr(
    root: BorrowedFd<'_>,
    rel: &str,
    name: &OsStr,
    value: &[u8],
    flags: i32,
) -> Res<()> {
    let fd = open_beneath(root, rel, OFlags::PATH, Mode::empty())?;
    let p = proc_fd_path(fd.as_fd());
    let flags = rustix::fs::XattrFlags::from_bits_retain(flags as _);
    rustix::fs::setxattr(p.as_str(), name, value, flags)
}

/// Removes an extended attribute of `rel`.
pub fn remove_xattr(root: BorrowedFd<'_>, rel: &str, name: &OsStr) -> Res<()> {
    let fd = open_beneath(root, rel, OFlags::PATH, Mode::empty())?;
    let p = proc_fd_path(fd.as_fd());
    rustix::fs::removexattr(p.as_str(), name)
}

/// File system statistics of a layer.
pub fn statvfs(root: BorrowedFd<'_>) -> Res<StatVfs> {
    rustix::fs::fstatvfs(root)
}

/// Creates an unnamed file in directory `dir` (`O_TMPFILE`); it gets a name only through
/// [`link_tmpfile`], so a half-written copy is never visible.
pub fn tmpfile_in(root: BorrowedFd<'_>, dir: &str, mode: u32) -> Res<OwnedFd> {
    open_beneath(
        root,
        dir,
        OFlags::TMPFILE | OFlags::RDWR,
        Mode::from_raw_mode(mode),
    )
}

/// Gives an `O_TMPFILE` file its name.
pub fn link_tmpfile(fd: BorrowedFd<'_>, root: BorrowedFd<'_>, rel: &str) -> Res<()> {
    let (dir, name) = parent_of(root, rel)?;
    rustix::fs::linkat(fd, "", &dir, name, AtFlags::EMPTY_PATH)
}

/// Copies all of `from` into `to` (both regular files), from offset 0.
pub fn copy_contents(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> Res<()> {
    let len = rustix::fs::fstat(from)?.st_size as u64;
    let mut off_in = 0u64;
    let mut off_out = 0u64;
    while off_in < len {
        let chunk = (len - off_in).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(Errno::XDEV) | Err(Errno::NOSYS) | Err(Errno::INVAL) => {
                return copy_by_reading(from, to, off_in);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn copy_by_reading(from: BorrowedFd<'_>, to: BorrowedFd<'_>, mut off: u64) -> Res<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = rustix::io::pread(from, &mut buf[..], off)?;
        if n == 0 {
            return Ok(());
        }
        let mut done = 0;
        while done < n {
            done += rustix::io::pwrite(to, &buf[done..n], off + done as u64)?;
        }
        off += n as u64;
    }
}

/// Copies extended attributes from one open file to another, skipping names `skip` refuses
/// and the ones the target file system does not take.
pub fn copy_xattrs(
    root_from: BorrowedFd<'_>,
    rel_from: &str,
    to: BorrowedFd<'_>,
    skip: &dyn Fn(&OsStr) -> bool,
) -> Res<()> {
    let names = match list_xattr(root_from, rel_from) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(e),
    };
    let to_path = proc_fd_path(to);
    for name in names {
        if skip(&name) {
            continue;
        }
        let value = match get_xattr(root_from, rel_from, &name) {
            Ok(v) => v,
            Err(Errno::NODATA) => continue,
            Err(e) => return Err(e),
        };
        match rustix::fs::setxattr(
            to_path.as_str(),
            &name,
            &value,
            rustix::fs::XattrFlags::empty(),
        ) {
            Ok(()) | Err(Errno::NOTSUP) | Err(Errno::PERM) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens entry `name` of the open directory `dir`: one path component, any bytes (names that
/// are not UTF-8 included), resolved like [`open_beneath`] and never followed. `.`, `..`, an
/// empty name or one holding `/` is refused with `EINVAL`.
pub fn open_entry(dir: BorrowedFd<'_>, name: &OsStr, flags: OFlags) -> Res<OwnedFd> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(Errno::INVAL);
    }
    loop {
        match rustix::fs::openat2(
            dir,
            name,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        ) {
            Err(Errno::AGAIN) => continue,
            other => return other,
        }
    }
}

/// Opens the very file an open descriptor (`O_PATH` included) refers to again, with `flags`
/// (e.g. to read a regular file found with `O_PATH`, without looking its name up again).
pub fn reopen(fd: BorrowedFd<'_>, flags: OFlags) -> Res<OwnedFd> {
    rustix::fs::open(
        proc_fd_path(fd).as_str(),
        flags | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The target of the symlink that `fd` (opened `O_PATH | O_NOFOLLOW`) refers to.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> Res<OsString> {
    let target = rustix::fs::readlinkat(fd, "", Vec::new())?;
    Ok(OsStr::from_bytes(target.as_bytes()).to_os_string())
}

/// Lists the extended attribute names of the file `fd` refers to (`O_PATH` included; a
/// symlink's own attributes for a symlink).
pub fn list_xattr_fd(fd: BorrowedFd<'_>) -> Res<Vec<OsString>> {
    let p = proc_fd_path(fd);
    let buf = sized_read(
        || rustix::fs::listxattr_query(p.as_str()),
        |b| rustix::fs::listxattr(p.as_str(), b),
    )?;
    Ok(buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| OsStr::from_bytes(n).to_os_string())
        .collect())
}

/// Reads an extended attribute of the file `fd` refers to (`O_PATH` included).
pub fn get_xattr_fd(fd: BorrowedFd<'_>, name: &OsStr) -> Res<Vec<u8>> {
    let p = proc_fd_path(fd);
    sized_read(
        || rustix::fs::getxattr_query(p.as_str(), name),
        |b| rustix::fs::getxattr(p.as_str(), name, b),
    )
}

/// Asks for a size, then reads into a buffer of that size; again if the value grew between
/// the two calls (`ERANGE`), a few times.
fn sized_read(
    query: impl Fn() -> Res<usize>,
    read: impl Fn(&mut [u8]) -> Res<usize>,
) -> Res<Vec<u8>> {
    let mut tries = 0;
    loop {
        let mut buf = vec![0u8; query()?];
        match read(&mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) if tries < 8 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn split_and_join() {
        assert_eq!(split("a/b/c"), ("a/b", "c"));
        assert_eq!(split("a"), (".", "a"));
        assert_eq!(join(".", "a"), "a");
        assert_eq!(join("a/b", "c"), "a/b/c");
    }

    #[test]
    fn symlinks_on_the_way_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(dir.path().join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("escape")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("d/link")).unwrap();
        let fd = open_root(&root).unwrap();
        // A symlinked directory on the way: ELOOP, never the host's file.
        assert_eq!(
            open_beneath(fd.as_fd(), "escape/outside", OFlags::RDONLY, Mode::empty()).unwrap_err(),
            Errno::LOOP
        );
        // `..` cannot climb out.
        assert_eq!(
            open_beneath(fd.as_fd(), "../outside", OFlags::RDONLY, Mode::empty()).unwrap_err(),
            Errno::XDEV
        );
        // A final symlink is not followed.
        assert!(open_beneath(fd.as_fd(), "d/link", OFlags::RDONLY, Mode::empty()).is_err());
        // lstat sees the link itself.
        let st = lstat(fd.as_fd(), "d/link").unwrap().unwrap();
        assert_eq!(file_type(&st), FileType::Symlink);
        assert_eq!(readlink(fd.as_fd(), "d/link").unwrap(), "../outside");
        assert!(lstat(fd.as_fd(), "missing").unwrap().is_none());
    }

    #[test]
    fn cached_directories_follow_renames_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), b"1").unwrap();
        std::fs::create_dir_all(dir.path().join("x/y")).unwrap();
        let fd = open_root(dir.path()).unwrap();
        cache_dirs(fd.as_fd());
        assert!(lstat(fd.as_fd(), "a/b/f").unwrap().is_some());
        assert!(lstat(fd.as_fd(), "x/y").unwrap().is_some());
        // A renamed directory: its old path names nothing, its new one the same files.
        rename(fd.as_fd(), "a", "z", RenameFlags::empty()).unwrap();
        assert!(lstat(fd.as_fd(), "a/b/f").unwrap().is_none());
        assert!(lstat(fd.as_fd(), "z/b/f").unwrap().is_some());
        mkdir(fd.as_fd(), "a", 0o755).unwrap();
        mkdir(fd.as_fd(), "a/b", 0o755).unwrap();
        assert!(lstat(fd.as_fd(), "a/b/f").unwrap().is_none());
        mknod(fd.as_fd(), "a/b/g", FileType::RegularFile, 0o644, 0).unwrap();
        assert!(dir.path().join("a/b/g").exists() && !dir.path().join("z/b/g").exists());
        // A removed directory made again: the new one is used.
        remove_tree(fd.as_fd(), "x").unwrap();
        mkdir(fd.as_fd(), "x", 0o755).unwrap();
        mkdir(fd.as_fd(), "x/y", 0o755).unwrap();
        mknod(fd.as_fd(), "x/y/n", FileType::RegularFile, 0o644, 0).unwrap();
        assert!(dir.path().join("x/y/n").exists());
        // An exchange swaps what the two paths name.
        rename(fd.as_fd(), "a", "z", RenameFlags::EXCHANGE).unwrap();
        assert!(lstat(fd.as_fd(), "a/b/f").unwrap().is_some());
        assert!(lstat(fd.as_fd(), "z/b/g").unwrap().is_some());
        // Symlinks on the way are still refused beneath a cached directory.
        std::os::unix::fs::symlink("/etc", dir.path().join("a/b/l")).unwrap();
        assert_eq!(
            open_beneath(fd.as_fd(), "a/b/l/passwd", OFlags::RDONLY, Mode::empty()).unwrap_err(),
            Errno::LOOP
        );
        assert_eq!(
            open_beneath(fd.as_fd(), "a/b/../../../x", OFlags::RDONLY, Mode::empty()).unwrap_err(),
            Errno::XDEV
        );
        uncache_dirs(fd.as_fd());
    }

    #[test]
    fn tmpfile_copy_and_link() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("src"), b"hello world").unwrap();
        let fd = open_root(dir.path()).unwrap();
        let src = open_beneath(fd.as_fd(), "src", OFlags::RDONLY, Mode::empty()).unwrap();
        let tmp = tmpfile_in(fd.as_fd(), ".", 0o600).unwrap();
        copy_contents(src.as_fd(), tmp.as_fd()).unwrap();
        assert_eq!(read_dir(fd.as_fd(), ".").unwrap().len(), 1);
        link_tmpfile(tmp.as_fd(), fd.as_fd(), "dst").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("dst")).unwrap(),
            b"hello world"
        );
    }

    #[test]
    fn entries_by_any_name_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let odd = OsStr::from_bytes(b"caf\xe9");
        std::fs::write(dir.path().join(odd), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("l")).unwrap();
        let fd = open_root(dir.path()).unwrap();
        let f = open_entry(fd.as_fd(), odd, OFlags::PATH).unwrap();
        let r = reopen(f.as_fd(), OFlags::RDONLY).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(rustix::io::read(&r, &mut buf).unwrap(), 1);
        for bad in ["", ".", "..", "a/b"] {
            assert_eq!(
                open_entry(fd.as_fd(), OsStr::new(bad), OFlags::PATH).unwrap_err(),
                Errno::INVAL
            );
        }
        let l = open_entry(fd.as_fd(), OsStr::new("l"), OFlags::PATH).unwrap();
        assert_eq!(
            file_type(&rustix::fs::fstat(&l).unwrap()),
            FileType::Symlink
        );
        assert_eq!(readlink_fd(l.as_fd()).unwrap(), "/etc/passwd");
        assert!(open_entry(fd.as_fd(), OsStr::new("l"), OFlags::RDONLY).is_err());
        set_xattr(fd.as_fd(), "l", OsStr::new("trusted.t"), b"v", 0).unwrap();
        assert!(list_xattr_fd(l.as_fd())
            .unwrap()
            .contains(&OsString::from("trusted.t")));
        assert_eq!(
            get_xattr_fd(l.as_fd(), OsStr::new("trusted.t")).unwrap(),
            b"v"
        );
    }

    #[test]
    fn remove_tree_does_not_follow_links() {
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().join("keep");
        std::fs::create_dir(&keep).unwrap();
        std::fs::write(keep.join("f"), b"x").unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("t/u")).unwrap();
        std::fs::write(root.join("t/u/f"), b"x").unwrap();
        std::os::unix::fs::symlink(&keep, root.join("t/link")).unwrap();
        let fd = open_root(&root).unwrap();
        remove_tree(fd.as_fd(), "t").unwrap();
        assert!(!root.join("t").exists());
        assert!(keep.join("f").exists());
    }
}

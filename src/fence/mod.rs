//! The fence: a FUSE file system that shows a container its workspace through a policy, with
//! every change landing in a per-container copy-on-write layer (SPEC §4, §5).
//!
//! Each operation is: find the node, decide its path against the policy, do the work through
//! file descriptors beneath the layer roots, reply. Nothing here panics on what a container can
//! influence: every failure is an errno reply.
//!
//! What the container is told (SPEC §4):
//! - a path whose level is `none` (and that is not a traversable directory) does not exist:
//!   `ENOENT` on lookup, absent from listings (whose offsets are positions in the filtered
//!   listing), not counted in a directory's link count;
//! - `view`: metadata only; opening, `readlink`, `getxattr` answer `EACCES`;
//! - `read`: no change of any kind (`EACCES`);
//! - `write`: changes, copy-on-write;
//! - creating at a hidden path answers `EACCES` and never touches what may be there.
//!
//! Reported permission bits are those of the backing file, less what the level takes away
//! (`read`: no write bits; `view`: no read or write bits on files, no write bits on
//! directories), so that `ls -l` and `access(2)` for ordinary users agree with the policy.

pub mod daemon;
pub mod layers;
pub mod nodes;
pub mod perm;
pub mod watch;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno as FErrno, FileAttr, FileHandle, FileType as FType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, OpenAccMode, OpenFlags,
    RenameFlags as FRenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};

use crate::audit::{AccessRecord, AuditDecision, AuditLog, Op};
use crate::policy::{Level, Policy};
use crate::sys::fs::{self as sfs, Errno, FileType, Mode, OFlags};
use layers::{is_private_xattr, rel, Found, Layer, Layers};
use nodes::{child_path, parent_path, Node, Nodes, ROOT};
use perm::{Caller, Owner, R, W, X};

/// How long the kernel may cache entries and attributes. Host changes to the base show
/// through within this time (SPEC §5: about a second).
const TTL: Duration = Duration::from_secs(1);

type Res<T> = Result<T, Errno>;

fn ferr(e: Errno) -> FErrno {
    FErrno::from_i32(e.raw_os_error())
}

/// What the fence serves.
pub struct Fence {
    policy: Policy,
    layers: Layers,
    nodes: std::sync::Arc<Mutex<Nodes>>,
    /// Host changes to the base, turned into invalidations of the kernel's caches (so that
    /// they may live long).
    watch: Option<std::sync::Arc<watch::Watch>>,
    /// Namespace changes (create, remove, rename) are serialised; lookups and I/O are not.
    ns: RwLock<()>,
    handles: Mutex<HashMap<u64, std::sync::Arc<Handle>>>,
    next_fh: AtomicU64,
    audit: Option<AuditLog>,
    /// Whether the kernel agreed to pass reads of open files straight to their backing files.
    passthrough: bool,
    /// How each inode with open files is served: passthrough (the backing file registered
    /// for it: the kernel wants one per inode while any such open lasts) or through the page
    /// cache (how many such opens). The kernel refuses to mix the two on one inode.
    io: Mutex<HashMap<u64, Io>>,
    /// An open handle of each inode with open files: an unlinked file stays usable through it.
    open_files: Mutex<HashMap<u64, u64>>,
    /// Inodes whose file has several names in its layer: the kernel sees one inode per name,
    /// so their attributes are never cached.
    multi_linked: Mutex<std::collections::HashSet<u64>>,
    /// Tells the kernel to drop cached attributes (only attributes: that takes no lock a
    /// request in progress may hold, so it is safe from within a request).
    inval: std::sync::Arc<Mutex<Option<fuser::Notifier>>>,
    /// Owner, group and mode of directories recently checked for search permission (at most
    /// `TTL` old), by path.
    dirs: Mutex<HashMap<String, (Owner, Instant)>>,
    /// Nodes dropped since the start (memory is trimmed every so many).
    forgotten: AtomicU64,
}

/// How the open files of one inode are served.
enum Io {
    /// Reads go straight to this backing file, without the daemon.
    Pass(std::sync::Weak<fuser::BackingId>),
    /// Through the kernel's page cache; this many opens.
    Cached(usize),
}

/// An open whose reads may bypass the daemon.
struct Bypass {
    size: u64,
    /// By kernel passthrough (else only through the page cache).
    pass: bool,
}

/// How one open file is served.
enum OpenIo {
    Pass(std::sync::Arc<fuser::BackingId>),
    /// The page cache, kept from one open to the next (FOPEN_KEEP_CACHE).
    KeepCache,
    /// The page cache, dropped at this open (the kernel's default).
    Plain,
}

/// Counts one more page-cache open of `ino` (one whose passthrough opens are all gone, if it
/// had any).
fn count_cached_open(map: &mut HashMap<u64, Io>, ino: u64) {
    match map.entry(ino).or_insert(Io::Cached(0)) {
        Io::Cached(n) => *n += 1,
        e => *e = Io::Cached(1),
    }
}

/// Files up to this size are served through the page cache, kept across opens, rather than by
/// passthrough: a passthrough read makes the kernel refetch the attributes at the next stat
/// (it invalidates atime), which costs a round trip per file to every `grep -r` after the
/// first; larger read-only files keep passthrough (no second copy in memory).
const KEEP_CACHE_MAX: u64 = 1 << 20;

/// The entry of a name that does not exist (node 0), for the kernel to remember as such.
fn negative_entry() -> FileAttr {
    let t = std::time::UNIX_EPOCH;
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: fuser::FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

/// At most this many directories' owners are remembered for permission checks.
const DIR_CACHE: usize = 16384;

/// The open(2) flag the kernel adds when it opens a program to run it (`__FMODE_EXEC`):
/// such an open needs execute permission, not read.
const FMODE_EXEC: i32 = 0x20;

enum Handle {
    /// An open file; with passthrough, the backing file registration it keeps alive (the
    /// kernel reads through it until the handle is released).
    File(
        OwnedFd,
        Option<Box<OpenAudit>>,
        #[allow(dead_code)] Option<std::sync::Arc<fuser::BackingId>>,
    ),
    /// An open directory: its inode, and its listing, taken at the first read (a listing the
    /// kernel serves from its own cache is never taken).
    Dir(u64, std::sync::OnceLock<Res<Vec<DirEntry>>>),
}

/// One entry of a directory listing: inode number, type, name.
type DirEntry = (u64, FType, std::ffi::OsString);

/// What an allowed open reports when it is closed.
struct OpenAudit {
    path: String,
    write: bool,
    rule: Option<usize>,
    pid: u32,
    uid: u32,
    read: AtomicU64,
    written: AtomicU64,
}

thread_local! {
    /// The process and user of the request this FUSE worker thread is serving (for audit).
    static WHO: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
}

thread_local! {
    /// The process this FUSE worker thread is serving, for permission checks.
    static CALLER: RefCell<Rc<Caller>> = RefCell::new(Rc::new(Caller::new(u32::MAX, u32::MAX, 0)));
}

fn set_who(req: &Request) {
    WHO.with(|w| w.set((req.pid(), req.uid())));
    CALLER.with(|c| *c.borrow_mut() = Rc::new(Caller::new(req.uid(), req.gid(), req.pid())));
}

/// The caller of the request being served (set by `set_who`).
fn who() -> Rc<Caller> {
    CALLER.with(|c| c.borrow().clone())
}

fn errno_name(e: Errno) -> &'static str {
    match e {
        Errno::NOENT => "ENOENT",
        Errno::ACCESS => "EACCES",
        Errno::XDEV => "EXDEV",
        Errno::PERM => "EPERM",
        _ => "EOTHER",
    }
}

fn ftype(ft: FileType) -> FType {
    match ft {
        FileType::Directory => FType::Directory,
        FileType::Symlink => FType::Symlink,
        FileType::Fifo => FType::NamedPipe,
        FileType::Socket => FType::Socket,
        FileType::CharacterDevice => FType::CharDevice,
        FileType::BlockDevice => FType::BlockDevice,
        _ => FType::RegularFile,
    }
}

/// A `setattr` of an orphaned file: mode, uid, gid, size, atime, mtime.
type OrphanChange = (
    Option<u32>,
    Option<u32>,
    Option<u32>,
    Option<u64>,
    Option<TimeOrNow>,
    Option<TimeOrNow>,
);

fn timespec(x: TimeOrNow) -> rustix::fs::Timespec {
    let when = match x {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    };
    let d = when.duration_since(UNIX_EPOCH).unwrap_or_default();
    rustix::fs::Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: d.subsec_nanos() as _,
    }
}

/// What a `setattr` asks to change, as Unix permissions judge it (`truncate`: a new size not
/// through a descriptor opened for writing).
fn setattr_change(
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    truncate: bool,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
) -> perm::Change {
    let times = [atime, mtime];
    perm::Change {
        mode,
        uid,
        gid,
        truncate,
        times_given: times
            .iter()
            .any(|t| matches!(t, Some(TimeOrNow::SpecificTime(_)))),
        times_now: times.iter().any(|t| matches!(t, Some(TimeOrNow::Now))),
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec.clamp(0, 999_999_999) as u32)
    } else {
        UNIX_EPOCH
    }
}

/// Refusal for an operation that needs `need` on a path decided `level`: a path that does not
/// exist for the container is `ENOENT`, one that does is `EACCES`.
fn refuse(level: Level) -> Errno {
    if level == Level::None {
        Errno::NOENT
    } else {
        Errno::ACCESS
    }
}

/// A name the kernel hands us for a new or looked-up entry.
fn valid_name(name: &OsStr) -> Res<&str> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(Errno::INVAL);
    }
    if b.len() > 255 {
        return Err(Errno::NAMETOOLONG);
    }
    // Policies are decided on text; a name that is not UTF-8 can match no rule reliably, so it
    // is treated as not existing (and cannot be created).
    name.to_str().ok_or(Errno::NOENT)
}

impl Fence {
    /// A fence over `base` (None: changes in place) with changes in `upper`.
    pub fn new(
        policy: Policy,
        base: Option<&Path>,
        upper: &Path,
        audit: Option<AuditLog>,
    ) -> Res<Fence> {
        Self::with_layers(policy, Layers::open(base, upper)?, audit)
    }

    /// A fence over layers opened by the caller.
    pub fn with_layers(policy: Policy, layers: Layers, audit: Option<AuditLog>) -> Res<Fence> {
        let root = layers.root_entry()?;
        Ok(Fence {
            policy,
            nodes: std::sync::Arc::new(Mutex::new(Nodes::new(root.merge_base))),
            watch: watch::Watch::new().map(std::sync::Arc::new),
            layers,
            ns: RwLock::new(()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            audit,
            passthrough: false,
            io: Mutex::new(HashMap::new()),
            open_files: Mutex::new(HashMap::new()),
            multi_linked: Mutex::new(std::collections::HashSet::new()),
            inval: std::sync::Arc::new(Mutex::new(None)),
            dirs: Mutex::new(HashMap::new()),
            forgotten: AtomicU64::new(0),
        })
    }

    /// Reports an access to the audit trail (when one is kept and its level wants it).
    fn note(
        &self,
        op: Op,
        path: &str,
        is_dir: bool,
        decision: AuditDecision,
        to: Option<&str>,
        errno: Option<Errno>,
    ) {
        let Some(log) = &self.audit else { return };
        let (pid, uid) = WHO.with(|w| w.get());
        let rule = self.policy.decide(path, is_dir).rule;
        let mut rec = AccessRecord::new(op, path, decision, rule, pid, uid);
        rec.to = to.map(str::to_string);
        rec.errno = errno.map(errno_name);
        if log.keeps(&rec) {
            log.access(rec);
        }
    }

    /// Records a refusal (`ENOENT`: the path is hidden; otherwise denied) and returns it.
    fn refused(&self, op: Op, path: &str, is_dir: bool, e: Errno) -> Errno {
        let d = if e == Errno::NOENT {
            AuditDecision::Hidden
        } else {
            AuditDecision::Deny
        };
        self.note(op, path, is_dir, d, None, Some(e));
        e
    }

    /// `ENOENT` for a path that is not there for the container. A probe of a path the policy
    /// hides (whether or not it exists) is recorded; misses of visible paths are not.
    fn missing(&self, op: Op, path: &str, is_dir: bool) -> Errno {
        if self.audit.is_some() && !self.policy.decide(path, is_dir).visible() {
            self.note(
                op,
                path,
                false,
                AuditDecision::Hidden,
                None,
                Some(Errno::NOENT),
            );
        }
        Errno::NOENT
    }

    fn allowed(&self, op: Op, path: &str, is_dir: bool, to: Option<&str>) {
        self.note(op, path, is_dir, AuditDecision::Allow, to, None);
    }

    fn node(&self, ino: INodeNo) -> Res<Node> {
        let nodes = self.nodes.lock().map_err(|_| Errno::IO)?;
        nodes.get(ino.0).cloned().ok_or(Errno::STALE)
    }

    /// The level in effect at `path`, as the container sees it.
    fn level(&self, path: &str, is_dir: bool) -> Level {
        self.policy.decide(path, is_dir).apparent_level()
    }

    /// A node's entry, freshly from the layers.
    fn found(&self, node: &Node) -> Res<Found> {
        if node.path.starts_with('\0') {
            return Err(Errno::STALE);
        }
        let f = self
            .layers
            .find(rel(&node.path), node.parent_merge)?
            .ok_or(Errno::NOENT)?;
        if ftype(f.kind()) != node.kind {
            // The host put another kind of entry at this path: it is another file, with
            // another inode number once looked up. Attributes of a new type under the old
            // number would make the kernel mark the inode bad (EIO for whoever holds it);
            // ESTALE makes it look the path up again.
            return Err(Errno::STALE);
        }
        Ok(f)
    }

    /// Looks up `name` in directory `parent`: the child's path and entry, if it exists for the
    /// container.
    fn child(&self, parent: &Node, name: &str) -> Res<(String, Option<Found>)> {
        if parent.path.starts_with('\0') {
            // A directory removed or replaced since the kernel looked it up.
            return Err(Errno::STALE);
        }
        self.watch_dir(parent);
        let path = child_path(&parent.path, name);
        let found = self.layers.find(rel(&path), parent.merge_base)?;
        let found = found.filter(|f| self.policy.decide(&path, f.is_dir()).visible());
        Ok((path, found))
    }

    fn attr(&self, ino: u64, path: &str, f: &Found) -> Res<FileAttr> {
        let st = &f.st;
        let kind = sfs::file_type(st);
        let level = self.level(path, kind == FileType::Directory);
        let mut perm = (st.st_mode & 0o7777) as u16;
        // The workspace root is decided by the policy's default (patterns like `**/*` do not
        // match it); it shows writable when what is created in it would be.
        let level = if path == "/" && self.level("/\u{1}", false) == Level::Write {
            Level::Write
        } else {
            level
        };
        match (level, kind) {
            (Level::Write, _) => {}
            (Level::Read, _) => perm &= !0o222,
            (_, FileType::Directory) => perm &= !0o222,
            _ => perm &= !0o666,
        }
        if kind != FileType::Directory && st.st_nlink > 1 {
            if let Ok(mut m) = self.multi_linked.lock() {
                m.insert(ino);
            }
        }
        let (nlink, size, blocks) = if kind == FileType::Directory {
            // A directory's link count would count hidden subdirectories: report 1, which
            // tools read as "unknown" (find then does not rely on it), and a constant size,
            // so the number of hidden entries does not show either.
            (1, 4096, 8)
        } else {
            // A link count above one would tell of names elsewhere, possibly hidden.
            (1, st.st_size as u64, st.st_blocks as u64)
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: time(st.st_atime, st.st_atime_nsec as i64),
            mtime: time(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: time(st.st_ctime, st.st_ctime_nsec as i64),
            crtime: UNIX_EPOCH,
            kind: ftype(kind),
            perm,
            nlink,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: if kind == FileType::CharacterDevice || kind == FileType::BlockDevice {
                st.st_rdev as u32
            } else {
                0
            },
            blksize: 4096,
            flags: 0,
        })
    }

    /// Watches directory `dir` in the host's layer (the base, or the workspace itself with
    /// changes in place) before its entries are served, if the host can change them.
    fn watch_dir(&self, dir: &Node) {
        let Some(w) = &self.watch else { return };
        let host = match self.layers.base() {
            Some(b) if dir.merge_base => b,
            Some(_) => return,
            None => self.layers.upper(),
        };
        w.watch(host, &dir.path, rel(&dir.path));
    }

    /// How long the kernel may remember that `name` does not exist in directory `parent`:
    /// long where a host change reaches the kernel as an invalidation (the directory is
    /// watched, or holds only the container's own entries), for names the policy leaves
    /// visible (a probe of a hidden one reaches the daemon every time, for the audit trail);
    /// None: not at all.
    fn negative_ttl(&self, parent: INodeNo, name: &OsStr) -> Option<Duration> {
        let parent = self.node(parent).ok()?;
        let path = child_path(&parent.path, name.to_str()?);
        let visible =
            self.policy.decide(&path, false).visible() && self.policy.decide(&path, true).visible();
        (visible && self.changes_invalidate(&parent.path, parent.merge_base))
            .then_some(watch::LONG_TTL)
    }

    /// Whether every change to the entries of directory `dir` reaches the kernel as an
    /// invalidation: the host's through the watch, the container's through the kernel itself
    /// (a directory whose base entries do not show through holds only the container's).
    fn changes_invalidate(&self, dir: &str, merges_base: bool) -> bool {
        let Some(w) = &self.watch else { return false };
        (self.layers.cow() && !merges_base) || w.watched(dir)
    }

    /// How long the kernel may keep the entry and attributes of node `ino`: long when a change
    /// reaches it as an invalidation (its directory is watched, or holds only the container's
    /// own entries), else the short default.
    fn ttl_of(&self, ino: u64) -> Duration {
        if self.multi_linked.lock().is_ok_and(|m| m.contains(&ino)) {
            return Duration::ZERO;
        }
        let Some((path, parent_merge)) = self
            .nodes
            .lock()
            .ok()
            .and_then(|n| n.get(ino).map(|n| (n.path.clone(), n.parent_merge)))
        else {
            return TTL;
        };
        // (The root is the upper layer's own entry.)
        if self.changes_invalidate(parent_path(&path), parent_merge && path != "/") {
            watch::LONG_TTL
        } else {
            TTL
        }
    }

    /// What the daemon needs to turn host changes into invalidations: the watch and the node
    /// table (None without inotify).
    pub fn invalidation(
        &self,
    ) -> Option<(std::sync::Arc<watch::Watch>, std::sync::Arc<Mutex<Nodes>>)> {
        self.watch.clone().map(|w| (w, self.nodes.clone()))
    }

    /// Where the daemon plugs in the session's notifier once mounted.
    pub fn notifier_slot(&self) -> std::sync::Arc<Mutex<Option<fuser::Notifier>>> {
        self.inval.clone()
    }

    /// Drops the kernel's cached attributes of `ino` (not its pages), before replying.
    fn invalidate_attrs(&self, ino: u64) {
        if let Ok(g) = self.inval.lock() {
            if let Some(n) = g.as_ref() {
                let _ = n.inval_inode(INodeNo(ino), -1, 0);
            }
        }
    }

    /// After many nodes went (the kernel forgot what it cached, e.g. under memory pressure):
    /// gives the freed memory back to the system, so that the daemon's size follows the
    /// kernel's cache down as well as up.
    fn trim_memory(&self) {
        let n = self.forgotten.fetch_add(1, Ordering::Relaxed) + 1;
        if n % 4096 == 0 {
            // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Drops the kernel's cached name `path` soon, from another thread (the kernel takes the
    /// directory's lock for it, which the request being served may hold). The next path walk
    /// then looks the name up again, and the reply carries fresh attributes.
    fn invalidate_entry_soon(&self, path: &str) {
        let Some(n) = self.inval.lock().ok().and_then(|g| g.clone()) else {
            return;
        };
        let Some(parent) = self
            .nodes
            .lock()
            .ok()
            .and_then(|nodes| nodes.ino_of(parent_path(path)))
        else {
            return;
        };
        let Some((_, name)) = path.rsplit_once('/') else {
            return;
        };
        let name = std::ffi::OsString::from(name);
        let _ = std::thread::Builder::new()
            .name("inval".into())
            .spawn(move || {
                let _ = n.inval_entry(INodeNo(parent), &name);
            });
    }

    /// The open file of an inode whose path is gone (unlinked or renamed over while open).
    fn open_fd_of(&self, ino: u64, fh: Option<FileHandle>) -> Option<std::sync::Arc<Handle>> {
        let fh = fh
            .map(|f| f.0)
            .or_else(|| self.open_files.lock().ok()?.get(&ino).copied())?;
        let h = self.handles.lock().ok()?.get(&fh).cloned()?;
        matches!(&*h, Handle::File(..)).then_some(h)
    }

    /// Attributes of an open file whose name is gone: from its descriptor, with no links.
    fn orphan_attr(&self, ino: u64, path: &str, h: &Handle) -> Res<FileAttr> {
        let Handle::File(fd, _, _) = h else {
            return Err(Errno::STALE);
        };
        let st = rustix::fs::fstat(fd)?;
        let f = Found {
            layer: Layer::Upper,
            st,
            merge_base: false,
            in_base: false,
        };
        let mut a = self.attr(ino, path, &f)?;
        a.nlink = 0;
        Ok(a)
    }

    /// The entries of directory `path` the container sees: name, type, child path.
    fn visible_children(&self, path: &str, f: &Found) -> Res<Vec<(String, FileType, String)>> {
        let mut out = Vec::new();
        for (name, ft) in self.layers.list(rel(path), f)? {
            let Some(name) = name.to_str() else { continue };
            let cp = child_path(path, name);
            if self.policy.decide(&cp, ft == FileType::Directory).visible() {
                out.push((name.to_string(), ft, cp));
            }
        }
        Ok(out)
    }

    /// Registers a looked-up entry with the kernel (one lookup reference) and builds its reply.
    fn entry(&self, parent: &Node, path: &str, f: &Found) -> Res<FileAttr> {
        let ino = {
            let mut nodes = self.nodes.lock().map_err(|_| Errno::IO)?;
            nodes.upsert(path, ftype(f.kind()), f.merge_base, parent.merge_base, true)
        };
        self.attr(ino, path, f)
    }

    /// The refusal, if any, for changing an existing entry at `path`.
    fn need_write(&self, op: Op, path: &str, is_dir: bool) -> Res<()> {
        match self.level(path, is_dir) {
            Level::Write => Ok(()),
            l => Err(self.refused(op, path, is_dir, refuse(l))),
        }
    }

    /// The refusal, if any, for creating something at `path` (hidden or not: `EACCES`).
    fn need_create(&self, op: Op, path: &str, is_dir: bool) -> Res<()> {
        if self.level(path, is_dir) == Level::Write {
            Ok(())
        } else {
            Err(self.refused(op, path, is_dir, Errno::ACCESS))
        }
    }

    /// Owner, group and mode of directory `path`, as seen at most `TTL` ago.
    fn dir_owner(&self, path: &str) -> Res<Owner> {
        if path.starts_with('\0') {
            return Err(Errno::STALE);
        }
        if let Some((o, t)) = self.dirs.lock().ok().and_then(|d| d.get(path).copied()) {
            if t.elapsed() < TTL {
                return Ok(o);
            }
        }
        let node = self
            .nodes
            .lock()
            .ok()
            .and_then(|n| n.ino_of(path).and_then(|i| n.get(i).cloned()));
        let f = match node {
            Some(n) => self.found(&n)?,
            None => return Err(Errno::STALE),
        };
        let o = Owner::of(&f.st);
        if let Ok(mut d) = self.dirs.lock() {
            if d.len() >= DIR_CACHE {
                d.clear();
            }
            d.insert(path.to_string(), (o, Instant::now()));
        }
        Ok(o)
    }

    /// Forgets the remembered owners of directories (after a directory moved or went away,
    /// or its owner or mode changed).
    fn forget_dir_owners(&self) {
        if let Ok(mut d) = self.dirs.lock() {
            d.clear();
        }
    }

    /// Unix search permission on directory `dir` and on every directory above it in the
    /// workspace. The kernel does not check it without `default_permissions`; it asks the
    /// daemon only for names it has not cached, so every operation on a path checks it here.
    fn search(&self, c: &Caller, dir: &str) -> Res<()> {
        let mut p = dir;
        loop {
            if !c.may(&self.dir_owner(p)?, X) {
                return Err(Errno::ACCESS);
            }
            if p == "/" {
                return Ok(());
            }
            p = parent_path(p);
        }
    }

    /// Search permission on the directories leading to `path`.
    fn reach(&self, c: &Caller, path: &str) -> Res<()> {
        if path == "/" {
            Ok(())
        } else {
            self.search(c, parent_path(path))
        }
    }

    /// Unix permission `mask` (R, W, X) on an entry (`EACCES` if not).
    fn unix(&self, c: &Caller, f: &Found, mask: u32) -> Res<()> {
        if c.may(&Owner::of(&f.st), mask) {
            Ok(())
        } else {
            Err(Errno::ACCESS)
        }
    }

    /// Permission to change the entries of directory `dir`: search on the way to it, and
    /// write and search on it.
    fn may_change_dir(&self, c: &Caller, dir: &Node) -> Res<()> {
        self.search(c, &dir.path)?;
        if c.may(&self.dir_owner(&dir.path)?, W | X) {
            Ok(())
        } else {
            Err(Errno::ACCESS)
        }
    }

    /// Permission to remove (or rename away, or replace) entry `f` of directory `dir`: as
    /// `may_change_dir`, and the sticky-directory rule.
    fn may_delete(&self, c: &Caller, dir: &Node, f: &Found) -> Res<()> {
        self.may_change_dir(c, dir)?;
        if perm::may_delete_in(c, &self.dir_owner(&dir.path)?, &Owner::of(&f.st)) {
            Ok(())
        } else {
            Err(Errno::PERM)
        }
    }

    fn ns_write(&self) -> Res<std::sync::RwLockWriteGuard<'_, ()>> {
        self.ns.write().map_err(|_| Errno::IO)
    }

    fn ns_read(&self) -> Res<std::sync::RwLockReadGuard<'_, ()>> {
        self.ns.read().map_err(|_| Errno::IO)
    }

    /// Prepares creating `name` in `parent`: checks, then makes room in the upper layer.
    /// Returns the new path and whether a deleted base entry was there (so a new directory
    /// must be opaque).
    fn prepare_create(
        &self,
        op: Op,
        parent: &Node,
        name: &OsStr,
        is_dir: bool,
    ) -> Res<(String, bool)> {
        let name =
            valid_name(name).map_err(|e| if e == Errno::NOENT { Errno::ACCESS } else { e })?;
        let path = child_path(&parent.path, name);
        self.need_create(op, &path, is_dir)?;
        let (_, existing) = self.child(parent, name)?;
        if existing.is_some() {
            return Err(Errno::EXIST);
        }
        self.may_change_dir(&who(), parent)?;
        let r = rel(&path);
        self.layers.prepare_parent(r)?;
        let had_whiteout = self.layers.clear_whiteout(r)?;
        let base_had = self.layers.cow()
            && parent.merge_base
            && self
                .layers
                .base()
                .is_some_and(|b| sfs::lstat(b, r).ok().flatten().is_some());
        if base_had && !had_whiteout {
            // Something hidden by the policy exists in the base there: never touch it.
            return Err(self.refused(op, &path, is_dir, Errno::ACCESS));
        }
        self.layers.claim(r)?;
        Ok((path, had_whiteout))
    }

    /// After creating `path` in the upper layer: owner, then the reply.
    fn finish_create(&self, req: &Request, parent: &Node, path: &str) -> Res<FileAttr> {
        let r = rel(path);
        // The creator's uid; its gid, unless the directory is set-group-ID: then the
        // directory's group, and a new directory is set-group-ID too (as on any Linux file
        // system).
        let parent_st = self.found(parent).map(|f| f.st).ok();
        let sgid = parent_st
            .as_ref()
            .filter(|st| st.st_mode & libc::S_ISGID != 0);
        let gid = sgid.map(|st| st.st_gid).unwrap_or(req.gid());
        sfs::lchown(self.layers.upper(), r, Some(req.uid()), Some(gid))?;
        if let (Some(dir), Some(st)) = (sgid, sfs::lstat(self.layers.upper(), r)?) {
            let mode = st.st_mode & 0o7777;
            match sfs::file_type(&st) {
                FileType::Directory => {
                    sfs::chmod(self.layers.upper(), r, mode | libc::S_ISGID)?;
                }
                // Linux's mode_strip_sgid: a set-group-ID executable made in a set-group-ID
                // directory by someone outside the directory's group loses the bit.
                FileType::RegularFile
                    if mode & (libc::S_ISGID | libc::S_IXGRP)
                        == (libc::S_ISGID | libc::S_IXGRP) =>
                {
                    let c = who();
                    let o = Owner::of(dir);
                    if !c.in_group(dir.st_gid) && !c.capable_wrt(perm::CAP_FSETID, &o) {
                        sfs::chmod(self.layers.upper(), r, mode & !libc::S_ISGID)?;
                    }
                }
                _ => {}
            }
        }
        let f = self
            .layers
            .find(r, parent.merge_base)?
            .ok_or(Errno::NOENT)?;
        self.entry(parent, path, &f)
    }

    fn new_fh(&self, h: Handle) -> Res<u64> {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .map_err(|_| Errno::IO)?
            .insert(fh, std::sync::Arc::new(h));
        Ok(fh)
    }

    fn with_handle<T>(
        &self,
        fh: FileHandle,
        f: impl FnOnce(&OwnedFd, Option<&OpenAudit>) -> Res<T>,
    ) -> Res<T> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::File(fd, audit, _) => f(fd, audit.as_deref()),
            _ => Err(Errno::BADF),
        }
    }

    /// A handle, taken out of the table so that I/O runs without holding its lock.
    fn handle(&self, fh: FileHandle) -> Res<std::sync::Arc<Handle>> {
        let handles = self.handles.lock().map_err(|_| Errno::IO)?;
        handles.get(&fh.0).cloned().ok_or(Errno::BADF)
    }

    fn with_file<T>(&self, fh: FileHandle, f: impl FnOnce(&OwnedFd) -> Res<T>) -> Res<T> {
        self.with_handle(fh, |fd, _| f(fd))
    }

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Res<FileAttr> {
        let _g = self.ns_read()?;
        let parent = self.node(parent)?;
        let name = valid_name(name)?;
        // Unix search permission first: a directory one may not search tells nothing of its
        // entries, hidden or not.
        self.search(&who(), &parent.path)?;
        let (path, found) = self.child(&parent, name)?;
        let Some(f) = found else {
            return Err(self.missing(Op::Lookup, &path, true));
        };
        self.entry(&parent, &path, &f)
    }

    fn do_getattr(&self, ino: INodeNo, fh: Option<FileHandle>) -> Res<FileAttr> {
        let node = self.node(ino)?;
        let f = match self.found(&node) {
            Ok(f) => f,
            Err(e @ (Errno::NOENT | Errno::STALE)) => {
                // Unlinked while open: still there for whoever holds it open.
                return match self.open_fd_of(ino.0, fh) {
                    Some(h) => self.orphan_attr(ino.0, &node.path, &h),
                    None => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        if !self.policy.decide(&node.path, f.is_dir()).visible() {
            return Err(Errno::NOENT);
        }
        self.attr(ino.0, &node.path, &f)
    }

    #[allow(clippy::too_many_arguments)]
    fn do_setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Res<FileAttr> {
        let _g = self.ns_read()?;
        let node = self.node(ino)?;
        let f = match self.found(&node) {
            Ok(f) => f,
            Err(e @ (Errno::NOENT | Errno::STALE)) => {
                let Some(h) = self.open_fd_of(ino.0, fh) else {
                    return Err(e);
                };
                let change = (mode, uid, gid, size, atime, mtime);
                return self.orphan_setattr(ino.0, &node.path, &h, change);
            }
            Err(e) => return Err(e),
        };
        self.need_write(Op::Setattr, &node.path, f.is_dir())?;
        let c = who();
        self.reach(&c, &node.path)?;
        let truncate = size.is_some() && fh.is_none();
        let change = setattr_change(mode, uid, gid, truncate, atime, mtime);
        let mode = perm::setattr_allowed(&c, &Owner::of(&f.st), &change)?;
        let r = rel(&node.path);
        self.layers.copy_up(r)?;
        self.allowed(Op::Setattr, &node.path, f.is_dir(), None);
        let up = self.layers.upper();
        if uid.is_some() || gid.is_some() {
            sfs::lchown(up, r, uid, gid)?;
        }
        if let Some(m) = mode {
            if f.kind() != FileType::Symlink {
                sfs::chmod(up, r, m & 0o7777)?;
            }
        }
        if f.is_dir() && (mode.is_some() || uid.is_some() || gid.is_some()) {
            self.forget_dir_owners();
        }
        if let Some(len) = size {
            let via_fh = fh.map(|fh| self.with_file(fh, |fd| rustix::fs::ftruncate(fd, len)));
            match via_fh {
                Some(Ok(())) => {}
                _ => {
                    // Non-blocking and checked: a FIFO swapped in must not hang a worker.
                    let fd = self.layers.open_file(
                        r,
                        Layer::Upper,
                        OFlags::WRONLY | OFlags::NONBLOCK,
                    )?;
                    if sfs::file_type(&rustix::fs::fstat(&fd)?) != FileType::RegularFile {
                        return Err(Errno::INVAL);
                    }
                    rustix::fs::ftruncate(&fd, len)?;
                }
            }
        }
        if atime.is_some() || mtime.is_some() {
            let st = sfs::lstat(up, r)?.ok_or(Errno::NOENT)?;
            let mut t = sfs::stat_times(&st);
            if let Some(a) = atime {
                t.last_access = timespec(a);
            }
            if let Some(m) = mtime {
                t.last_modification = timespec(m);
            }
            sfs::set_times(up, r, &t)?;
        }
        let f = self.found(&node)?;
        self.attr(ino.0, &node.path, &f)
    }

    /// `setattr` of an open file whose name is gone, through its descriptor.
    fn orphan_setattr(
        &self,
        ino: u64,
        path: &str,
        h: &Handle,
        change: OrphanChange,
    ) -> Res<FileAttr> {
        let (mode, uid, gid, size, atime, mtime) = change;
        let Handle::File(fd, _, _) = h else {
            return Err(Errno::STALE);
        };
        // Only through a descriptor opened for writing: the policy allowed writing that name
        // when it was opened, and it is the container's copy in the delta. A descriptor opened
        // for reading may be the base's own file, which is never changed.
        let acc = rustix::fs::fcntl_getfl(fd)? & OFlags::RWMODE;
        let _ = path;
        if acc == OFlags::RDONLY {
            return Err(Errno::ACCESS);
        }
        let change = setattr_change(mode, uid, gid, false, atime, mtime);
        let st = rustix::fs::fstat(fd)?;
        let mode = perm::setattr_allowed(&who(), &Owner::of(&st), &change)?;
        if uid.is_some() || gid.is_some() {
            rustix::fs::fchown(
                fd,
                uid.map(rustix::fs::Uid::from_raw),
                gid.map(rustix::fs::Gid::from_raw),
            )?;
        }
        if let Some(m) = mode {
            rustix::fs::fchmod(fd, Mode::from_raw_mode(m & 0o7777))?;
        }
        if let Some(len) = size {
            rustix::fs::ftruncate(fd, len)?;
        }
        if atime.is_some() || mtime.is_some() {
            let st = rustix::fs::fstat(fd)?;
            let mut t = sfs::stat_times(&st);
            if let Some(a) = atime {
                t.last_access = timespec(a);
            }
            if let Some(m) = mtime {
                t.last_modification = timespec(m);
            }
            rustix::fs::futimens(fd, &t)?;
        }
        self.orphan_attr(ino, path, h)
    }

    fn do_readlink(&self, ino: INodeNo) -> Res<Vec<u8>> {
        let node = self.node(ino)?;
        let f = self.found(&node)?;
        let level = self.level(&node.path, false);
        if level < Level::Read {
            return Err(self.refused(Op::Readlink, &node.path, false, refuse(level)));
        }
        self.reach(&who(), &node.path)?;
        if f.kind() != FileType::Symlink {
            // The host replaced the link since the kernel looked it up: ESTALE makes the
            // kernel look the path up again.
            return Err(Errno::STALE);
        }
        self.allowed(Op::Readlink, &node.path, false, None);
        let root = if f.layer == Layer::Base {
            self.layers.base()
        } else {
            None
        };
        let t = sfs::readlink(root.unwrap_or(self.layers.upper()), rel(&node.path))
            .map_err(|e| if e == Errno::INVAL { Errno::STALE } else { e })?;
        Ok(t.as_bytes().to_vec())
    }

    fn do_mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32) -> Res<FileAttr> {
        let kind = FileType::from_raw_mode(mode);
        if !matches!(
            kind,
            FileType::RegularFile | FileType::Fifo | FileType::Socket
        ) {
            // Device nodes are never created through the fence (the mount is nodev, and
            // character devices are the delta's whiteouts).
            return Err(Errno::PERM);
        }
        let _g = self.ns_write()?;
        let parent = self.node(parent)?;
        let (path, _) = self.prepare_create(Op::Mknod, &parent, name, false)?;
        sfs::mknod(self.layers.upper(), rel(&path), kind, mode & 0o7777, 0)?;
        self.allowed(Op::Mknod, &path, false, None);
        self.finish_create(req, &parent, &path)
    }

    fn do_mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32) -> Res<FileAttr> {
        let _g = self.ns_write()?;
        let parent = self.node(parent)?;
        let (path, replaced) = self.prepare_create(Op::Mkdir, &parent, name, true)?;
        let r = rel(&path);
        sfs::mkdir(self.layers.upper(), r, mode & 0o7777)?;
        if replaced {
            self.layers.set_opaque(r)?;
        }
        self.allowed(Op::Mkdir, &path, true, None);
        self.finish_create(req, &parent, &path)
    }

    fn do_symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &Path,
    ) -> Res<FileAttr> {
        let _g = self.ns_write()?;
        let parent = self.node(parent)?;
        let (path, _) = self.prepare_create(Op::Symlink, &parent, name, false)?;
        sfs::symlink(self.layers.upper(), target.as_os_str(), rel(&path))?;
        self.allowed(Op::Symlink, &path, false, Some(&target.to_string_lossy()));
        self.finish_create(req, &parent, &path)
    }

    fn do_remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Res<()> {
        let _g = self.ns_write()?;
        let parent = self.node(parent)?;
        let name = valid_name(name)?;
        let (path, found) = self.child(&parent, name)?;
        let op = if dir { Op::Rmdir } else { Op::Unlink };
        let Some(f) = found else {
            return Err(self.missing(op, &path, dir));
        };
        self.need_write(op, &path, f.is_dir())?;
        self.may_delete(&who(), &parent, &f)?;
        match (dir, f.is_dir()) {
            (true, false) => return Err(Errno::NOTDIR),
            (false, true) => return Err(Errno::ISDIR),
            (true, true) => {
                // Empty as the container sees it: hidden entries do not count, and stay in
                // the base.
                if !self.visible_children(&path, &f)?.is_empty() {
                    return Err(Errno::NOTEMPTY);
                }
                if !self.layers.cow() && !self.layers.list(rel(&path), &f)?.is_empty() {
                    // In place, removing the directory would delete what the container
                    // cannot see.
                    return Err(Errno::NOTEMPTY);
                }
            }
            _ => {}
        }
        self.layers.remove(rel(&path), &f)?;
        if f.is_dir() {
            self.forget_dir_owners();
        }
        self.allowed(op, &path, f.is_dir(), None);
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.removed(&path);
        }
        Ok(())
    }

    fn do_rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: FRenameFlags,
    ) -> Res<()> {
        let _g = self.ns_write()?;
        let p1 = self.node(parent)?;
        let p2 = self.node(newparent)?;
        let n1 = valid_name(name)?;
        let n2 =
            valid_name(newname).map_err(|e| if e == Errno::NOENT { Errno::ACCESS } else { e })?;
        let (from, src) = self.child(&p1, n1)?;
        let src = src.ok_or(Errno::NOENT)?;
        self.need_write(Op::Rename, &from, src.is_dir())?;
        let (to, dst) = self.child(&p2, n2)?;
        self.need_create(Op::Rename, &to, src.is_dir())?;
        if dst.is_none() {
            // A hidden entry at the destination is never replaced or revealed.
            let hidden_there = self.layers.find(rel(&to), p2.merge_base)?.is_some();
            if hidden_there {
                return Err(self.refused(Op::Rename, &to, src.is_dir(), Errno::ACCESS));
            }
        }
        let c = who();
        self.may_delete(&c, &p1, &src)?;
        match &dst {
            Some(d) => self.may_delete(&c, &p2, d)?,
            None => self.may_change_dir(&c, &p2)?,
        }
        // A directory moving elsewhere has its `..` entry rewritten.
        if src.is_dir() && p2.path != p1.path {
            self.unix(&c, &src, W)?;
        }
        if from == to {
            return Ok(());
        }
        // Two names of one file: rename does nothing and succeeds (POSIX; Linux's vfs_rename),
        // whatever the flags.
        if let Some(d) = &dst {
            if d.layer == src.layer && d.st.st_dev == src.st.st_dev && d.st.st_ino == src.st.st_ino
            {
                return Ok(());
            }
        }
        let exchange = flags.contains(FRenameFlags::RENAME_EXCHANGE);
        let noreplace = flags.contains(FRenameFlags::RENAME_NOREPLACE);
        if flags.contains(FRenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::INVAL);
        }
        if noreplace && dst.is_some() {
            return Err(Errno::EXIST);
        }
        if exchange {
            let dst = dst.ok_or(Errno::NOENT)?;
            self.need_write(Op::Rename, &to, dst.is_dir())?;
            self.exchange(&from, &src, &to, &dst)?;
            self.allowed(Op::Rename, &from, src.is_dir(), Some(&to));
            return Ok(());
        }
        if let Some(d) = &dst {
            self.need_write(Op::Rename, &to, d.is_dir())?;
            match (src.is_dir(), d.is_dir()) {
                (true, false) => return Err(Errno::NOTDIR),
                (false, true) => return Err(Errno::ISDIR),
                (true, true) if !self.visible_children(&to, d)?.is_empty() => {
                    return Err(Errno::NOTEMPTY)
                }
                _ => {}
            }
        }
        let (rf, rt) = (rel(&from), rel(&to));
        if src.is_dir() {
            if self.layers.has_base_content(&src) {
                // Tools fall back to copying, which the policy checks file by file.
                return Err(Errno::XDEV);
            }
            self.check_dir_move(&from, &to)?;
        } else {
            self.layers.copy_up(rf)?;
        }
        if self.layers.cow() {
            self.layers.prepare_parent(rt)?;
            if let Some(d) = &dst {
                if d.is_dir() {
                    if d.layer == Layer::Upper {
                        sfs::remove_tree(self.layers.upper(), rt)?;
                    }
                } else if d.layer == Layer::Upper {
                    sfs::unlink(self.layers.upper(), rt, false)?;
                }
            }
            self.layers.claim(rt)?;
            let had_whiteout = self.layers.clear_whiteout(rt)?;
            sfs::rename(self.layers.upper(), rf, rt, sfs::RenameFlags::NOREPLACE)?;
            // A directory moved over a deleted or replaced base directory must not let the
            // base's entries show through it.
            let dst_in_base = dst.as_ref().is_some_and(|d| d.in_base);
            if src.is_dir() && (dst_in_base || had_whiteout || self.layers.base_has(rt)) {
                self.layers.set_opaque(rt)?;
            }
            if src.in_base {
                self.layers.whiteout(rf)?;
            }
        } else {
            let fl = if noreplace {
                sfs::RenameFlags::NOREPLACE
            } else {
                sfs::RenameFlags::empty()
            };
            sfs::rename(self.layers.upper(), rf, rt, fl)?;
        }
        self.allowed(Op::Rename, &from, src.is_dir(), Some(&to));
        if src.is_dir() || dst.as_ref().is_some_and(|d| d.is_dir()) {
            self.forget_dir_owners();
        }
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.renamed(&from, &to);
        }
        self.refresh_node(&p2, &to);
        Ok(())
    }

    /// After a rename: the moved node's layer flags, as a fresh lookup would set them.
    fn refresh_node(&self, parent: &Node, path: &str) {
        if let Ok(Some(f)) = self.layers.find(rel(path), parent.merge_base) {
            if let Ok(mut nodes) = self.nodes.lock() {
                nodes.upsert(
                    path,
                    ftype(f.kind()),
                    f.merge_base,
                    parent.merge_base,
                    false,
                );
            }
        }
    }

    /// A directory made in the container moves from `from` to `to` as a whole: everything in
    /// it must be writable where it was (with changes in place, it may hold entries the
    /// container cannot see) and where it lands; otherwise `EXDEV`.
    fn check_dir_move(&self, from: &str, to: &str) -> Res<()> {
        for (sub, is_dir) in self.layers.upper_subtree(rel(from))? {
            if self.level(&format!("{from}/{sub}"), is_dir) != Level::Write
                || self.level(&format!("{to}/{sub}"), is_dir) != Level::Write
            {
                return Err(Errno::XDEV);
            }
        }
        Ok(())
    }

    fn exchange(&self, from: &str, src: &Found, to: &str, dst: &Found) -> Res<()> {
        for (p, f) in [(from, src), (to, dst)] {
            if f.is_dir() && self.layers.has_base_content(f) {
                return Err(Errno::XDEV);
            }
            if f.is_dir() {
                let other = if p == from { to } else { from };
                self.check_dir_move(p, other)?;
            } else {
                self.layers.copy_up(rel(p))?;
            }
            self.layers.claim(rel(p))?;
        }
        sfs::rename(
            self.layers.upper(),
            rel(from),
            rel(to),
            sfs::RenameFlags::EXCHANGE,
        )?;
        // A directory landing where the base has an entry must not let the base show through.
        for (landed, was) in [(to, src), (from, dst)] {
            if was.is_dir() && self.layers.cow() && self.layers.base_has(rel(landed)) {
                self.layers.set_opaque(rel(landed))?;
            }
        }
        self.forget_dir_owners();
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.exchanged(from, to);
        }
        for p in [from, to] {
            let pp = parent_path(p);
            let parent = self
                .nodes
                .lock()
                .ok()
                .and_then(|n| n.ino_of(pp).and_then(|i| n.get(i).cloned()));
            if let Some(parent) = parent {
                self.refresh_node(&parent, p);
            }
        }
        Ok(())
    }

    fn do_link(&self, ino: INodeNo, newparent: INodeNo, newname: &OsStr) -> Res<FileAttr> {
        let _g = self.ns_write()?;
        let node = self.node(ino)?;
        let src = self.found(&node)?;
        if src.is_dir() {
            return Err(Errno::PERM);
        }
        self.need_write(Op::Link, &node.path, false)?;
        let c = who();
        self.reach(&c, &node.path)?;
        if !perm::may_link(&c, &Owner::of(&src.st)) {
            return Err(Errno::PERM);
        }
        let parent = self.node(newparent)?;
        let (path, _) = self.prepare_create(Op::Link, &parent, newname, false)?;
        self.layers.copy_up(rel(&node.path))?;
        sfs::link(self.layers.upper(), rel(&node.path), rel(&path))?;
        // Two names, two inodes for the kernel: the first one's cached attributes (kept long
        // while it had one name) must go, and neither is cached from now on.
        if let Ok(mut m) = self.multi_linked.lock() {
            m.insert(ino.0);
        }
        self.invalidate_attrs(ino.0);
        // Its name, too: the kernel may keep it for minutes, and would not ask for the
        // attributes again before an open or a write (only stat does).
        self.invalidate_entry_soon(&node.path);
        self.allowed(Op::Link, &node.path, false, Some(&path));
        let f = self
            .layers
            .find(rel(&path), parent.merge_base)?
            .ok_or(Errno::NOENT)?;
        self.entry(&parent, &path, &f)
    }

    /// Opens a file: the open file, what its close reports, and whether its reads may bypass
    /// the daemon.
    fn do_open(
        &self,
        ino: INodeNo,
        flags: OpenFlags,
    ) -> Res<(OwnedFd, Option<Box<OpenAudit>>, Option<Bypass>)> {
        let node = self.node(ino)?;
        let f = self.found(&node)?;
        let writing = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let level = self.level(&node.path, f.is_dir());
        let needed = if writing { Level::Write } else { Level::Read };
        if level < needed {
            let e = refuse(level);
            if let Some(log) = &self.audit {
                let (pid, uid) = WHO.with(|w| w.get());
                let d = if e == Errno::NOENT {
                    AuditDecision::Hidden
                } else {
                    AuditDecision::Deny
                };
                let rule = self.policy.decide(&node.path, f.is_dir()).rule;
                let mut rec = AccessRecord::new(Op::Open, node.path.as_str(), d, rule, pid, uid);
                rec.mode = Some(if writing { "write" } else { "read" });
                rec.errno = Some(errno_name(e));
                if log.keeps(&rec) {
                    log.access(rec);
                }
            }
            return Err(e);
        }
        if f.kind() != FileType::RegularFile {
            // FIFOs and sockets are served by the kernel; device nodes never.
            return Err(Errno::ACCESS);
        }
        let c = who();
        self.reach(&c, &node.path)?;
        let mut mask = match flags.acc_mode() {
            OpenAccMode::O_RDONLY if flags.0 & FMODE_EXEC != 0 => X,
            OpenAccMode::O_RDONLY => R,
            OpenAccMode::O_WRONLY => W,
            _ => R | W,
        };
        if flags.0 & libc::O_TRUNC != 0 {
            mask |= W;
        }
        self.unix(&c, &f, mask)?;
        let r = rel(&node.path);
        let mut layer = f.layer;
        if writing {
            let _g = self.ns_read()?;
            self.layers.copy_up(r)?;
            layer = Layer::Upper;
        }
        // O_APPEND on the layer's file: appends land at its real end (Linux's pwrite appends on
        // such a descriptor), whatever size the kernel has cached for this name.
        let keep = libc::O_ACCMODE
            | libc::O_TRUNC
            | libc::O_SYNC
            | libc::O_DSYNC
            | libc::O_NOATIME
            | libc::O_APPEND;
        let oflags = OFlags::from_bits_retain((flags.0 & keep) as _);
        // Non-blocking, and checked after opening: a FIFO swapped in meanwhile must not hang a
        // worker thread, nor be served.
        let fd = self.layers.open_file(r, layer, oflags | OFlags::NONBLOCK)?;
        let st = rustix::fs::fstat(&fd)?;
        if sfs::file_type(&st) != FileType::RegularFile {
            return Err(Errno::ACCESS);
        }
        let audit = self.open_audit(&node.path, writing);
        // Reads may bypass the daemon only when the audit trail does not count the bytes
        // read (the daemon no longer sees them): through the page cache kept across opens
        // (writes through the fence keep it up to date, the watch drops it when the host
        // changes the file), or by kernel passthrough, only for files the policy makes
        // read-only (never copied up or written through the fence: the inode keeps one
        // backing file).
        let bypass = (!writing && audit.is_none()).then_some(Bypass {
            size: st.st_size as u64,
            pass: level == Level::Read,
        });
        Ok((fd, audit, bypass))
    }

    /// How an open of `ino` is served, given whether its reads may bypass the daemon (None:
    /// every read goes through it). Counted until `io_release`.
    fn io_open(&self, ino: u64, bypass: Option<Bypass>, fd: &OwnedFd, reply: &ReplyOpen) -> OpenIo {
        let Ok(mut map) = self.io.lock() else {
            return OpenIo::Plain;
        };
        // The page cache is kept across opens only where a host change reaches the kernel
        // as an invalidation (which drops the cached pages too).
        let keep = bypass.is_some() && self.ttl_of(ino) == watch::LONG_TTL;
        let page_cache = if keep {
            OpenIo::KeepCache
        } else {
            OpenIo::Plain
        };
        match map.get(&ino) {
            Some(Io::Pass(w)) => {
                if let Some(b) = w.upgrade() {
                    // Passthrough opens are live: this one must be one too.
                    return OpenIo::Pass(b);
                }
            }
            Some(Io::Cached(n)) if *n > 0 => {
                count_cached_open(&mut map, ino);
                return page_cache;
            }
            _ => {}
        }
        let small = bypass
            .as_ref()
            .is_some_and(|b| keep && b.size <= KEEP_CACHE_MAX);
        let pass = bypass.is_some_and(|b| b.pass) && self.passthrough && !small;
        // A registration the kernel refuses (e.g. a backing file system stacked too deep)
        // leaves the file served through the page cache, by the daemon, as usual.
        if let Some(b) = pass.then(|| reply.open_backing(fd).ok()).flatten() {
            let b = std::sync::Arc::new(b);
            map.insert(ino, Io::Pass(std::sync::Arc::downgrade(&b)));
            if map.len() > 4096 {
                map.retain(|_, io| !matches!(io, Io::Pass(w) if w.strong_count() == 0));
            }
            return OpenIo::Pass(b);
        }
        count_cached_open(&mut map, ino);
        page_cache
    }

    /// Counts a page-cache open made by create(2).
    fn io_created(&self, ino: u64) {
        if let Ok(mut map) = self.io.lock() {
            count_cached_open(&mut map, ino);
        }
    }

    /// Ends what `io_open` or `io_created` counted for a handle of `ino`.
    fn io_release(&self, ino: u64, pass: bool) {
        let Ok(mut map) = self.io.lock() else { return };
        match map.get_mut(&ino) {
            Some(Io::Cached(n)) if !pass => {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&ino);
                }
            }
            Some(Io::Pass(w)) if pass && w.strong_count() == 0 => {
                map.remove(&ino);
            }
            _ => {}
        }
    }

    /// The record an allowed open makes at close, if the audit level keeps it.
    fn open_audit(&self, path: &str, write: bool) -> Option<Box<OpenAudit>> {
        let log = self.audit.as_ref()?;
        let (pid, uid) = WHO.with(|w| w.get());
        let rule = self.policy.decide(path, false).rule;
        let mut probe = AccessRecord::new(Op::Open, path, AuditDecision::Allow, rule, pid, uid);
        probe.mode = Some(if write { "write" } else { "read" });
        if !log.keeps(&probe) {
            return None;
        }
        Some(Box::new(OpenAudit {
            path: path.to_string(),
            write,
            rule,
            pid,
            uid,
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }))
    }

    fn do_create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Res<(FileAttr, u64)> {
        let _g = self.ns_write()?;
        let parent = self.node(parent)?;
        let (path, _) = self.prepare_create(Op::Create, &parent, name, false)?;
        let r = rel(&path);
        let keep = libc::O_ACCMODE | libc::O_SYNC | libc::O_DSYNC | libc::O_APPEND;
        let fd = sfs::open_beneath(
            self.layers.upper(),
            r,
            OFlags::from_bits_retain((flags & keep) as _) | OFlags::CREATE | OFlags::EXCL,
            Mode::from_raw_mode(mode & 0o7777),
        )?;
        let attr = self.finish_create(req, &parent, &path)?;
        self.allowed(Op::Create, &path, false, None);
        let audit = self.open_audit(&path, true);
        let fh = self.new_fh(Handle::File(fd, audit, None))?;
        Ok((attr, fh))
    }

    fn do_opendir(&self, ino: INodeNo) -> Res<(u64, bool)> {
        let node = self.node(ino)?;
        let f = self.found(&node)?;
        if !f.is_dir() {
            return Err(Errno::NOTDIR);
        }
        if !self.policy.decide(&node.path, true).visible() {
            return Err(self.refused(Op::Opendir, &node.path, true, Errno::NOENT));
        }
        let c = who();
        self.reach(&c, &node.path)?;
        self.unix(&c, &f, R)?;
        self.allowed(Op::Opendir, &node.path, true, None);
        self.watch_dir(&node);
        let fh = self.new_fh(Handle::Dir(ino.0, std::sync::OnceLock::new()))?;
        // The kernel may keep the listing while a change reaches it as an invalidation (the
        // watch drops the directory's pages when the host changes it; the kernel drops them
        // itself when the container does).
        let cache = self.ttl_of(ino.0) == watch::LONG_TTL;
        Ok((fh, cache))
    }

    /// The listing of directory `ino` as the container sees it, taken once per open directory
    /// (offsets are positions in it, so they count only what the container sees).
    fn listing(&self, ino: u64) -> Res<Vec<DirEntry>> {
        let node = self.node(INodeNo(ino))?;
        let f = self.found(&node)?;
        if !f.is_dir() {
            return Err(Errno::NOTDIR);
        }
        let children = self.visible_children(&node.path, &f)?;
        let parent_ino = {
            let pp = parent_path(&node.path);
            self.nodes
                .lock()
                .ok()
                .and_then(|n| n.ino_of(pp))
                .unwrap_or(ROOT)
        };
        let mut entries = vec![
            (ino, FType::Directory, ".".into()),
            (parent_ino, FType::Directory, "..".into()),
        ];
        let mut nodes = self.nodes.lock().map_err(|_| Errno::IO)?;
        for (name, ft, cp) in children {
            let kind = ftype(ft);
            let child_ino = nodes.listing_ino(&cp, kind, f.merge_base);
            entries.push((child_ino, kind, name.into()));
        }
        drop(nodes);
        Ok(entries)
    }

    /// The listing of an open directory handle.
    fn entries_of<'a>(&self, h: &'a Handle) -> Res<&'a [DirEntry]> {
        match h {
            Handle::Dir(ino, l) => l
                .get_or_init(|| self.listing(*ino))
                .as_deref()
                .map_err(|e| *e),
            _ => Err(Errno::BADF),
        }
    }

    /// The node and entry whose attribute `name` is read (`mask` R) or changed (W), if the
    /// policy gives `need` there and Unix permissions agree (`user.*` attributes need read or
    /// write permission; the kernel checks the other namespaces itself).
    fn xattr_target(
        &self,
        op: Op,
        ino: INodeNo,
        need: Level,
        name: Option<&OsStr>,
        mask: u32,
    ) -> Res<(Node, Found)> {
        let node = self.node(ino)?;
        let f = self.found(&node)?;
        let level = self.level(&node.path, f.is_dir());
        if level < need {
            return Err(self.refused(op, &node.path, f.is_dir(), refuse(level)));
        }
        let c = who();
        self.reach(&c, &node.path)?;
        if name.is_some_and(|n| n.as_bytes().starts_with(b"user.")) {
            self.unix(&c, &f, mask)?;
        }
        Ok((node, f))
    }

    fn layer_root(&self, f: &Found) -> std::os::fd::BorrowedFd<'_> {
        match f.layer {
            Layer::Base => self.layers.base().unwrap_or(self.layers.upper()),
            Layer::Upper => self.layers.upper(),
        }
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, data: Res<Vec<u8>>) {
    match data {
        Err(e) => reply.error(ferr(e)),
        Ok(d) if size == 0 => reply.size(d.len() as u32),
        Ok(d) if d.len() > size as usize => reply.error(FErrno::ERANGE),
        Ok(d) => reply.data(&d),
    }
}

impl Filesystem for Fence {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Backing files may live on overlayfs (a workspace that is the image's own directory),
        // which is stacked once: allow that, so the fence itself is at depth 2 (nothing stacks
        // on it; it is bind-mounted into the container).
        // Listings carry attributes (no lookup per entry after a readdir), and lookups in one
        // directory run in parallel (the fence serialises what must be).
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS
                | fuser::InitFlags::FUSE_READDIRPLUS_AUTO
                | fuser::InitFlags::FUSE_PARALLEL_DIROPS,
        );
        self.passthrough = std::env::var_os("AGENTFENSE_NO_PASSTHROUGH").is_none()
            && config.set_max_stack_depth(2).is_ok()
            && config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok();
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        set_who(req);
        match self.do_lookup(parent, name) {
            Ok(attr) => reply.entry(&self.ttl_of(attr.ino.0), &attr, Generation(0)),
            Err(Errno::NOENT) => match self.negative_ttl(parent, name) {
                // Node 0: "no such name", which the kernel may remember that long.
                Some(ttl) => reply.entry(&ttl, &negative_entry(), Generation(0)),
                None => reply.error(FErrno::ENOENT),
            },
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let dropped = self
            .nodes
            .lock()
            .map(|mut n| n.forget(ino.0, nlookup))
            .unwrap_or(false);
        if dropped {
            if let Ok(mut m) = self.multi_linked.lock() {
                m.remove(&ino.0);
            }
            self.trim_memory();
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.do_getattr(ino, _fh) {
            Ok(attr) => reply.attr(&self.ttl_of(attr.ino.0), &attr),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        set_who(req);
        match self.do_setattr(ino, mode, uid, gid, size, atime, mtime, fh) {
            Ok(attr) => reply.attr(&self.ttl_of(attr.ino.0), &attr),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        set_who(req);
        match self.do_readlink(ino) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        set_who(req);
        match self.do_mknod(req, parent, name, mode) {
            Ok(attr) => reply.entry(&self.ttl_of(attr.ino.0), &attr, Generation(0)),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        set_who(req);
        match self.do_mkdir(req, parent, name, mode) {
            Ok(attr) => reply.entry(&self.ttl_of(attr.ino.0), &attr, Generation(0)),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        set_who(req);
        match self.do_remove(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        set_who(req);
        match self.do_remove(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        set_who(req);
        match self.do_symlink(req, parent, link_name, target) {
            Ok(attr) => reply.entry(&self.ttl_of(attr.ino.0), &attr, Generation(0)),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: FRenameFlags,
        reply: ReplyEmpty,
    ) {
        set_who(req);
        match self.do_rename(parent, name, newparent, newname, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        set_who(req);
        match self.do_link(ino, newparent, newname) {
            Ok(attr) => reply.entry(&self.ttl_of(attr.ino.0), &attr, Generation(0)),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        set_who(req);
        let (fd, audit, bypass) = match self.do_open(ino, flags) {
            Ok(o) => o,
            Err(e) => return reply.error(ferr(e)),
        };
        let io = self.io_open(ino.0, bypass, &fd, &reply);
        let backing = match &io {
            OpenIo::Pass(b) => Some(b.clone()),
            _ => None,
        };
        let pass = backing.is_some();
        let fh = match self.new_fh(Handle::File(fd, audit, backing)) {
            Ok(fh) => fh,
            Err(e) => {
                self.io_release(ino.0, pass);
                return reply.error(ferr(e));
            }
        };
        if let Ok(mut m) = self.open_files.lock() {
            m.insert(ino.0, fh);
        }
        match io {
            OpenIo::Pass(b) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b),
            OpenIo::KeepCache => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            OpenIo::Plain => reply.opened(FileHandle(fh), FopenFlags::empty()),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.with_handle(fh, |fd, audit| {
            // Not zeroed first: the kernel asks for its read-ahead window (128 KiB and more),
            // mostly beyond the end of a small file.
            let mut buf = Vec::with_capacity(size as usize);
            if size == 0 {
                return Ok(buf);
            }
            let n = rustix::io::pread(fd, rustix::buffer::spare_capacity(&mut buf), offset)?;
            if let Some(a) = audit {
                a.read.fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok(buf)
        });
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.with_handle(fh, |fd, audit| {
            let n = rustix::io::pwrite(fd, data, offset)?;
            if let Some(a) = audit {
                a.written.fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok(n)
        });
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes reach the layers synchronously: there is nothing to flush at close. ENOSYS
        // tells the kernel so once, and it stops sending a round trip with every close(2).
        reply.error(FErrno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = self.handles.lock().ok().and_then(|mut h| h.remove(&fh.0));
        if let Ok(mut m) = self.open_files.lock() {
            if m.get(&_ino.0) == Some(&fh.0) {
                m.remove(&_ino.0);
            }
        }
        let file_pass = match handle.as_deref() {
            Some(Handle::File(_, _, b)) => Some(b.is_some()),
            _ => None,
        };
        let audit = handle.as_deref().and_then(|h| match h {
            Handle::File(_, Some(a), _) => Some(a),
            _ => None,
        });
        if let (Some(a), Some(log)) = (audit, &self.audit) {
            let mut rec = AccessRecord::new(
                Op::Open,
                a.path.as_str(),
                AuditDecision::Allow,
                a.rule,
                a.pid,
                a.uid,
            );
            rec.mode = Some(if a.write { "write" } else { "read" });
            rec.bytes_read = Some(a.read.load(Ordering::Relaxed));
            rec.bytes_written = Some(a.written.load(Ordering::Relaxed));
            log.access(rec);
        }
        drop(handle);
        if let Some(pass) = file_pass {
            self.io_release(_ino.0, pass);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.with_file(fh, |fd| {
            if datasync {
                rustix::fs::fdatasync(fd)
            } else {
                rustix::fs::fsync(fd)
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        set_who(req);
        match self.do_opendir(ino) {
            Ok((fh, true)) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Ok((fh, false)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Ok(handle) = self.handle(fh) else {
            return reply.error(FErrno::EBADF);
        };
        let entries = match self.entries_of(&handle) {
            Ok(e) => e,
            Err(e) => return reply.error(ferr(e)),
        };
        let Ok(_g) = self.ns_read() else {
            return reply.error(FErrno::EIO);
        };
        let Ok(parent) = self.node(ino) else {
            return reply.error(FErrno::ENOENT);
        };
        // The listing's entries with their attributes, as lookups of each would give them
        // (the kernel then needs no lookup per entry). Offsets stay positions in the listing
        // taken at open; an entry gone since is left out.
        for (i, (child_ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            let attr = if name == "." || name == ".." {
                // Not looked up by the kernel: only the inode and type matter.
                let Ok(node) = self.node(INodeNo(*child_ino)) else {
                    continue;
                };
                match self
                    .found(&node)
                    .and_then(|f| self.attr(*child_ino, &node.path, &f))
                {
                    Ok(a) => a,
                    Err(_) => continue,
                }
            } else {
                let Some(n) = name.to_str() else { continue };
                match self.child(&parent, n) {
                    Ok((path, Some(f))) => match self.entry(&parent, &path, &f) {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                    _ => continue,
                }
            };
            let _ = kind;
            let ttl = self.ttl_of(attr.ino.0);
            if reply.add(
                INodeNo(attr.ino.0),
                (i + 1) as u64,
                name,
                &ttl,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }
    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Ok(handle) = self.handle(fh) else {
            return reply.error(FErrno::EBADF);
        };
        let entries = match self.entries_of(&handle) {
            Ok(e) => e,
            Err(e) => return reply.error(ferr(e)),
        };
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _f: OpenFlags,
        reply: ReplyEmpty,
    ) {
        if let Ok(mut h) = self.handles.lock() {
            h.remove(&fh.0);
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _d: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match sfs::statvfs(self.layers.upper()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        set_who(req);
        let r = (|| {
            let (node, f) = self.xattr_target(Op::Setxattr, ino, Level::Write, Some(name), W)?;
            if is_private_xattr(name) {
                return Err(Errno::PERM);
            }
            let r = rel(&node.path);
            self.layers.copy_up(r)?;
            sfs::set_xattr(self.layers.upper(), r, name, value, flags)?;
            self.allowed(Op::Setxattr, &node.path, f.is_dir(), None);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        set_who(req);
        let r = (|| {
            // POSIX ACLs are permission metadata, visible at `view` like the mode bits (so
            // that `ls -l` works there); every other attribute value is content.
            let acl = name.as_bytes().starts_with(b"system.posix_acl_");
            // `security.*` (SELinux labels, file capabilities): at `view` there is none, so
            // that `ls -l` lists quietly; the value itself is not shown.
            let sec = name.as_bytes().starts_with(b"security.");
            let need = if acl || sec { Level::View } else { Level::Read };
            let (node, f) = self.xattr_target(Op::Getxattr, ino, need, Some(name), R)?;
            if sec && self.level(&node.path, f.is_dir()) < Level::Read {
                return Err(Errno::NODATA);
            }
            if is_private_xattr(name) {
                return Err(Errno::NODATA);
            }
            sfs::get_xattr(self.layer_root(&f), rel(&node.path), name)
        })();
        reply_xattr(reply, size, r);
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        set_who(req);
        let r = (|| {
            // Attribute names are metadata, like file names.
            let (node, f) = self.xattr_target(Op::Listxattr, ino, Level::View, None, 0)?;
            let names = sfs::list_xattr(self.layer_root(&f), rel(&node.path))?;
            let mut out = Vec::new();
            for n in names.iter().filter(|n| !is_private_xattr(n)) {
                out.extend_from_slice(n.as_bytes());
                out.push(0);
            }
            Ok(out)
        })();
        reply_xattr(reply, size, r);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        set_who(req);
        let r = (|| {
            let (node, f) = self.xattr_target(Op::Removexattr, ino, Level::Write, Some(name), W)?;
            if is_private_xattr(name) {
                return Err(Errno::NODATA);
            }
            let r = rel(&node.path);
            self.layers.copy_up(r)?;
            sfs::remove_xattr(self.layers.upper(), r, name)?;
            self.allowed(Op::Removexattr, &node.path, f.is_dir(), None);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        set_who(req);
        let r = (|| {
            let node = self.node(ino)?;
            let f = self.found(&node)?;
            let level = self.level(&node.path, f.is_dir());
            if !self.policy.decide(&node.path, f.is_dir()).visible() {
                return Err(Errno::NOENT);
            }
            let need = if mask.contains(AccessFlags::W_OK) {
                Level::Write
            } else if mask.contains(AccessFlags::R_OK) && !f.is_dir() {
                Level::Read
            } else {
                Level::View
            };
            if level < need {
                return Err(Errno::ACCESS);
            }
            // And what Unix permissions say, for this caller (root included: its
            // `access(W_OK)` on a read-only path is refused above, whatever its capabilities).
            let c = who();
            self.reach(&c, &node.path)?;
            let bits = (mask.bits() & 7) as u32;
            self.unix(&c, &f, bits)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        set_who(req);
        match self.do_create(req, parent, name, mode, flags) {
            Ok((attr, fh)) => {
                self.io_created(attr.ino.0);
                if let Ok(mut m) = self.open_files.lock() {
                    m.insert(attr.ino.0, fh);
                }
                reply.created(
                    &self.ttl_of(attr.ino.0),
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                )
            }
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.with_file(fh, |fd| {
            let flags = rustix::fs::FallocateFlags::from_bits_retain(mode as _);
            rustix::fs::fallocate(fd, flags, offset, length)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(ferr(e)),
        }
    }
}

// The fence is served from several threads.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<Fence>();
};

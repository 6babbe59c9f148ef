/* A job-side probe for tests/regions.rs: an agent written in C that uses regions
 * through libagentd_region.so.
 *
 *   region_probe stride NAME STEP    read one byte every STEP pages; check each against
 *                                    the test pattern; print "ok PAGES"
 *   region_probe sum NAME OFF LEN    print the sum of LEN bytes from OFF
 *   region_probe text NAME OFF LEN   print LEN bytes from OFF as text
 *   region_probe write NAME OFF TEXT open read-write, write TEXT at OFF
 *   region_probe hold NAME OFF FILE  read at 0, print "opened", wait for FILE to exist,
 *                                    then read at OFF (a revoked handle dies here)
 *   region_probe open NAME [rw]      open and close; print the error if refused
 *   region_probe uffd                try the userfaultfd syscall and /dev/userfaultfd
 *
 * A SIGBUS prints the broker's reason (agentd_region_failure) and dies of the signal.
 */
#include "agentd_region.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static agentd_region *current;

static unsigned char pattern(unsigned long long o) {
    return (unsigned char)((o / 4096 * 31 + o % 4096) % 251);
}

static void on_sigbus(int sig) {
    /* Not async-signal-safe in general; good enough for a probe that dies next. */
    for (int i = 0; i < 100; i++) {
        const char *why = current ? agentd_region_failure(current) : NULL;
        if (why) {
            fprintf(stderr, "SIGBUS: %s\n", why);
            break;
        }
        usleep(5000);
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

static agentd_region *open_or_die(const char *name, int rw) {
    agentd_region *r = agentd_region_open(name, rw);
    if (!r) {
        fprintf(stderr, "open %s: %s\n", name, agentd_region_last_error());
        exit(3);
    }
    current = r;
    return r;
}

int main(int argc, char **argv) {
    signal(SIGBUS, on_sigbus);
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc < 2) return 2;
    const char *cmd = argv[1];
    if (!strcmp(cmd, "uffd")) {
        long fd = syscall(SYS_userfaultfd, O_CLOEXEC);
        printf("userfaultfd syscall: %s\n", fd < 0 ? strerror(errno) : "allowed");
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        printf("/dev/userfaultfd: %s\n", dev < 0 ? strerror(errno) : "opened");
        return 0;
    }
    if (argc < 3) return 2;
    const char *name = argv[2];
    if (!strcmp(cmd, "open")) {
        agentd_region *r = open_or_die(name, argc > 3 && !strcmp(argv[3], "rw"));
        printf("opened %s size %llu generation %llu\n", name,
               (unsigned long long)agentd_region_size(r),
               (unsigned long long)agentd_region_generation(r));
        agentd_region_close(r);
        return 0;
    }
    if (!strcmp(cmd, "stride") && argc == 4) {
        agentd_region *r = open_or_die(name, 0);
        const unsigned char *p = agentd_region_data(r);
        unsigned long long size = agentd_region_size(r), step = strtoull(argv[3], 0, 0) * 4096;
        unsigned long long pages = 0;
        for (unsigned long long o = 0; o < size; o += step) {
            unsigned long long at = o + (o / step) % 4096;
            if (at >= size) break;
            if (p[at] != pattern(at)) {
                printf("mismatch at %llu: %u != %u\n", at, p[at], pattern(at));
                return 1;
            }
            pages++;
        }
        printf("ok %llu\n", pages);
        agentd_region_close(r);
        return 0;
    }
    if ((!strcmp(cmd, "sum") || !strcmp(cmd, "text")) && argc == 5) {
        agentd_region *r = open_or_die(name, 0);
        const unsigned char *p = agentd_region_data(r);
        unsigned long long off = strtoull(argv[3], 0, 0), len = strtoull(argv[4], 0, 0);
        if (!strcmp(cmd, "text")) {
            fwrite(p + off, 1, len, stdout);
            printf("\n");
        } else {
            unsigned long long sum = 0;
            for (unsigned long long i = 0; i < len; i++) sum += p[off + i];
            printf("sum %llu\n", sum);
        }
        agentd_region_close(r);
        return 0;
    }
    if (!strcmp(cmd, "write") && argc == 5) {
        agentd_region *r = open_or_die(name, 1);
        unsigned char *p = (unsigned char *)agentd_region_data(r);
        memcpy(p + strtoull(argv[3], 0, 0), argv[4], strlen(argv[4]));
        agentd_region_close(r);
        printf("wrote\n");
        return 0;
    }
    if (!strcmp(cmd, "hold") && argc == 5) {
        agentd_region *r = open_or_die(name, 0);
        const volatile unsigned char *p = agentd_region_data(r);
        printf("opened %u\n", p[0]);
        while (access(argv[4], F_OK) != 0) usleep(20000);
        printf("read %u\n", p[strtoull(argv[3], 0, 0)]);
        agentd_region_close(r);
        return 0;
    }
    return 2;
}

/* The in-job side of scripts/bench-regions: an agent in C that measures regions from
 * inside a real agentd job (libagentd_region.so), or the same work done eagerly.
 *
 *   region_bench latency NAME N      N first touches, 2 pages apart (no read-ahead):
 *                                    "median_us X p99_us Y"
 *   region_bench seq NAME            open, then read every byte (8 at a time):
 *                                    "seq_mbps X ttfb_ms Y"
 *   region_bench eager FILE          read FILE into fresh memory, then read every byte:
 *                                    "eager_mbps X memcpy_mbps Y" (memcpy: a second pass
 *                                    copying the eager copy, pure memory bandwidth)
 *   region_bench touch slices|random NAME  open, touch 1% of its pages: as 16
 *                                    contiguous runs, or as single pages at random:
 *                                    "ttfb_ms X total_ms Y"
 *   region_bench eagertouch slices|random FILE  copy FILE into memory first, then the same
 */
#include "agentd_region.h"
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static agentd_region *open_or_die(const char *name) {
    agentd_region *r = agentd_region_open(name, 0);
    if (!r) {
        fprintf(stderr, "open %s: %s\n", name, agentd_region_last_error());
        exit(3);
    }
    return r;
}

static uint64_t scan(const unsigned char *p, uint64_t len) {
    const volatile uint64_t *q = (const volatile uint64_t *)p;
    uint64_t sum = 0;
    for (uint64_t i = 0; i < len / 8; i++) sum += q[i];
    return sum;
}

static unsigned char *copy_in(const char *path, uint64_t *len) {
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) { perror(path); exit(3); }
    unsigned char *buf = malloc(st.st_size);
    if (!buf) { perror("malloc"); exit(3); }
    uint64_t got = 0;
    while (got < (uint64_t)st.st_size) {
        ssize_t n = read(fd, buf + got, st.st_size - got);
        if (n <= 0) { perror("read"); exit(3); }
        got += n;
    }
    close(fd);
    *len = got;
    return buf;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    const char *cmd = argv[1], *name = argv[2];
    if (!strcmp(cmd, "latency") && argc == 4) {
        agentd_region *r = open_or_die(name);
        const volatile unsigned char *p = agentd_region_data(r);
        uint64_t n = strtoull(argv[3], 0, 0), pages = agentd_region_size(r) / 4096;
        if (n * 2 > pages) n = pages / 2;
        double *t = malloc(n * sizeof *t);
        unsigned sink = 0;
        for (uint64_t i = 0; i < n; i++) {
            struct timespec a, b;
            clock_gettime(CLOCK_MONOTONIC, &a);
            sink += p[i * 2 * 4096];
            clock_gettime(CLOCK_MONOTONIC, &b);
            t[i] = (b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3;
        }
        qsort(t, n, sizeof *t, cmp);
        printf("median_us %.1f p99_us %.1f faults %llu sink %u\n", t[n / 2], t[n * 99 / 100],
               (unsigned long long)n, sink);
        return 0;
    }
    if (!strcmp(cmd, "seq")) {
        double t0 = now_ms();
        agentd_region *r = open_or_die(name);
        const unsigned char *p = agentd_region_data(r);
        volatile unsigned char first = p[0];
        double t1 = now_ms();
        uint64_t len = agentd_region_size(r), sum = scan(p, len);
        double t2 = now_ms();
        printf("seq_mbps %.0f ttfb_ms %.3f sum %llu %u\n", len / 1e3 / (t2 - t0), t1 - t0,
               (unsigned long long)sum, first);
        return 0;
    }
    if (!strcmp(cmd, "eager")) {
        double t0 = now_ms();
        uint64_t len;
        unsigned char *buf = copy_in(name, &len);
        uint64_t sum = scan(buf, len);
        double t1 = now_ms();
        unsigned char *second = malloc(len);
        memset(second, 1, len); /* its pages exist before the timed copy */
        double t2 = now_ms();
        memcpy(second, buf, len);
        double t3 = now_ms();
        printf("eager_mbps %.0f memcpy_mbps %.0f sum %llu %u\n", len / 1e3 / (t1 - t0),
               len / 1e3 / (t3 - t2), (unsigned long long)sum, second[len / 2]);
        return 0;
    }
    if ((!strcmp(cmd, "touch") || !strcmp(cmd, "eagertouch")) && argc == 4) {
        /* argv[2]: "slices" (1% as 16 contiguous runs, evenly spread) or "random" (1%
         * of the pages, single pages in a random order, fixed seed). */
        int slices = !strcmp(argv[2], "slices");
        double t0 = now_ms();
        const volatile unsigned char *p;
        uint64_t len;
        if (!strcmp(cmd, "touch")) {
            agentd_region *r = open_or_die(argv[3]);
            p = agentd_region_data(r);
            len = agentd_region_size(r);
        } else {
            p = copy_in(argv[3], &len);
        }
        unsigned sink = p[0];
        double t1 = now_ms();
        uint64_t pages = len / 4096, want = pages / 100;
        if (slices) {
            uint64_t run = want / 16;
            for (int s = 0; s < 16; s++) {
                uint64_t first = pages / 16 * s;
                for (uint64_t i = 0; i < run; i++) sink += p[(first + i) * 4096];
            }
        } else {
            uint64_t x = 88172645463325252ull;
            for (uint64_t i = 0; i < want; i++) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                sink += p[(x % pages) * 4096];
            }
        }
        double t2 = now_ms();
        printf("ttfb_ms %.3f total_ms %.3f sink %u\n", t1 - t0, t2 - t0, sink);
        return 0;
    }
    return 2;
}

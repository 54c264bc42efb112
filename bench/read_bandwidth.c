/* How fast can this machine read N MiB that are already in its caches, on T threads?
 *
 * The floor for one decoding step: the kernel must read every cached key and value once,
 * so a step over 32 heads x 128 tokens x D 128 (4 MiB of float32) cannot beat the time
 * this takes to sum 4 MiB. Each thread sums its half with 4 independent 64-byte vector
 * accumulators (no arithmetic to wait for); the same buffer is read again and again, as
 * the decode benchmark reads the same cache, so it stays in L2/L3 when it fits.
 *
 *   cc -O3 -march=native -fopenmp bench/read_bandwidth.c -o /tmp/read_bandwidth
 *   /tmp/read_bandwidth 4 2       # MiB, threads  -> median and best of 2000 reads
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef float v16 __attribute__((vector_size(64)));

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s MiB threads [reads]\n", argv[0]);
        return 2;
    }
    size_t n = (size_t)(atof(argv[1]) * 1048576) / sizeof(v16);
    int threads = atoi(argv[2]), reads = argc > 3 ? atoi(argv[3]) : 2000;
    if (n < 4 * (size_t)threads || threads < 1 || reads < 1) {
        fprintf(stderr, "need at least %d KiB, one thread and one read\n", threads / 4 + 1);
        return 2;
    }
    v16 *a = aligned_alloc(64, n * sizeof(v16));
    double *times = malloc(reads * sizeof(double));
    volatile float sink = 0;
    for (size_t i = 0; i < n; i++) a[i] = (v16){0} + (float)(i % 7);
    for (int r = -10; r < reads; r++) {  /* 10 reads to warm the caches and the team */
        double t0 = now();
        #pragma omp parallel num_threads(threads)
        {
            int id = omp_get_thread_num(), team = omp_get_num_threads();
            size_t lo = n * id / team, hi = n * (id + 1) / team;
            v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            size_t i = lo;
            for (; i + 4 <= hi; i += 4) {
                s0 += a[i]; s1 += a[i + 1]; s2 += a[i + 2]; s3 += a[i + 3];
            }
            for (; i < hi; i++) s0 += a[i];
            v16 s = s0 + s1 + s2 + s3;
            if (s[0] == -1.0f) sink = s[1];  /* never true: keeps the loop alive */
        }
        if (r >= 0) times[r] = now() - t0;
    }
    qsort(times, reads, sizeof(double), by_value);
    double bytes = (double)n * sizeof(v16), median = times[reads / 2], best = times[0];
    printf("read %.2f MiB on %d threads: median %.2f us (%.1f GB/s), best %.2f us (%.1f GB/s)\n",
           bytes / 1048576, threads, median * 1e6, bytes / median / 1e9, best * 1e6,
           bytes / best / 1e9);
    (void)sink;
    free(times);
    free(a);
    return 0;
}

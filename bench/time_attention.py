"""Median time of fastattn.attention on one shape, for A/B comparisons of two builds.

    python bench/time_attention.py [B,H,LQ,LK,D] [CALLS] [THREADS]

Run it alternately against two installs (for instance with PYTHONPATH pointing at two
copies of the package, one per build), so that a shared machine's noise falls on both.
Defaults: 1,8,4096,4096,64 (the bench's `long`), 10 calls, all threads.
"""

import sys
import time

import numpy as np

import fastattn


def main(argv):
    shape = tuple(int(x) for x in (argv[0] if argv else "1,8,4096,4096,64").split(","))
    calls = int(argv[1]) if len(argv) > 1 else 10
    threads = int(argv[2]) if len(argv) > 2 else None
    b, h, n_q, n_k, d = shape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, h, n_q, d), dtype=np.float32)
    k, v = (rng.standard_normal((b, h, n_k, d), dtype=np.float32) for _ in range(2))
    fastattn.attention(q, k, v, num_threads=threads)  # warm-up
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fastattn.attention(q, k, v, num_threads=threads)
        times.append(time.perf_counter() - t)
    t = sorted(times)[len(times) // 2]
    print(f"{shape}: median {t * 1e3:.2f} ms, {4 * b * h * n_q * n_k * d / t / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main(sys.argv[1:])

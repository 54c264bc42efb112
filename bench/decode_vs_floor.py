"""The decoding kernel against a plain read of the same bytes, alternating, on 1 and 2
threads: the fastest and median of 15 calls each.

    python bench/decode_vs_floor.py

One query per head, 32 heads, 4,096 cached tokens, D 128, float32 (the bench's
`decode 4096`: 128 MiB of keys and values), through `_kernels.decode` as the public call
hands it its arrays, and `_kernels.read_sum` (the bench's read floor) over a buffer of the
same size.
"""

import statistics
import time

import numpy as np

from fastattn import _dispatch

kernels = _dispatch.kernels


def main():
    heads, n, d = 32, 4096, 128
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((heads, n, d), dtype=np.float32) for _ in range(2))
    q = rng.standard_normal((heads, 1, d), dtype=np.float32)
    moved = k.nbytes + v.nbytes
    x = np.ones(moved // 4, np.float32)
    for threads in (1, 2):
        args = (q, k, v, np.arange(heads, dtype=np.intp), 1 / np.sqrt(d), 0.0, None,
                np.empty((heads, 1, d), np.float32), np.empty((heads, 1), np.float32), threads)
        times = {"decode": [], "read": []}
        for _ in range(15):
            t = time.perf_counter()
            kernels.decode(*args)
            times["decode"].append(time.perf_counter() - t)
            t = time.perf_counter()
            kernels.read_sum(x, threads)
            times["read"].append(time.perf_counter() - t)
        line = ", ".join(f"{name} fastest {min(s) * 1e3:.2f} ms ({moved / min(s) / 1e9:.0f} GB/s), "
                         f"median {statistics.median(s) * 1e3:.2f} ms" for name, s in times.items())
        print(f"{threads} thread{'s' if threads > 1 else ''}: {line}")


if __name__ == "__main__":
    main()

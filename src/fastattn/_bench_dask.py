"""``python -m fastattn bench --dask``: fastattn.dask on a LocalCluster of 2 single-thread
worker processes against single-process fastattn.attention on 2 threads (the same
cores): time, efficiency (single / dask), task count and the per-task overhead measured
from dask's task stream ((workers x wall - time inside tasks) / tasks).

Inputs are persisted on the workers first (as data already living in a cluster would
be); the result comes back to the client inside the timed call."""

import statistics
import time

import numpy as np

__all__ = ["main"]

CASES = [(4096, False), (4096, True), (16384, False), (16384, True)]


def main(threads=None, quick=False, repeat=None):
    try:
        import dask.array as da
        from distributed import Client, LocalCluster, get_task_stream
    except ImportError:
        print("bench --dask needs dask and distributed: pip install 'fastattn[dask]'")
        return 1
    from . import api
    from ._timing import cpu_description
    from . import dask as fd

    threads = threads or 2
    repeat = repeat or (2 if quick else 3)
    cases = [(1024, False), (1024, True)] if quick else CASES
    heads, d = 8, 64
    q_chunk, k_chunk = (256, 512) if quick else (1024, 4096)
    print(f"fastattn bench --dask: LocalCluster of {threads} worker processes x 1 thread, "
          f"against fastattn.attention on {threads} threads")
    print(f"cpu: {cpu_description()}")
    print(f"shape (1, {heads}, L, L, {d}) float32; query chunks {q_chunk}, key chunks "
          f"{k_chunk}; medians of {repeat}")
    print()
    print("| L | causal | single process | dask | efficiency | GFLOP/s (single, dask) | "
          "tasks (attention, all) | overhead per task |")
    print("|---|---|---|---|---|---|---|---|")
    with LocalCluster(n_workers=threads, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        for n, causal in cases:
            rng = np.random.default_rng(0)
            q, k, v = (rng.standard_normal((1, heads, n, d), dtype=np.float32)
                       for _ in range(3))
            flops = 4.0 * heads * n * n * d * (0.5 if causal else 1.0)
            single = []
            for _ in range(repeat):
                t = time.perf_counter()
                api.attention(q, k, v, causal=causal, num_threads=threads)
                single.append(time.perf_counter() - t)
            dq = da.from_array(q, chunks=(1, heads, q_chunk, d)).persist()
            dk = da.from_array(k, chunks=(1, heads, k_chunk, d)).persist()
            dv = da.from_array(v, chunks=(1, heads, k_chunk, d)).persist()
            out = fd.attention(dq, dk, dv, causal=causal)
            graph = dict(out.__dask_graph__())
            n_attn = sum(1 for key in graph if str(key[0]).startswith("fastattn-partial"))
            out.compute()  # warm: imports and pools on the workers
            wall, busy = [], []
            for _ in range(repeat):
                with get_task_stream(client) as ts:
                    t = time.perf_counter()
                    out.compute()
                    wall.append(time.perf_counter() - t)
                busy.append(sum(s["stop"] - s["start"] for task in ts.data
                                for s in task["startstops"] if s["action"] == "compute"))
            t1, t2 = statistics.median(single), statistics.median(wall)
            overhead = (threads * t2 - statistics.median(busy)) / len(graph)
            print(f"| {n} | {'yes' if causal else 'no'} | {t1 * 1e3:.0f} ms | {t2 * 1e3:.0f} ms "
                  f"| {t1 / t2:.0%} | {flops / t1 / 1e9:.0f}, {flops / t2 / 1e9:.0f} | "
                  f"{n_attn}, {len(graph)} | {overhead * 1e3:.1f} ms |")
            last = (q, k, v, causal, t1)
    # The other way to fill the cores: one worker with one dask thread, OpenMP threads in
    # each task (num_threads=threads).
    q, k, v, causal, t1 = last
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster):
        dq = da.from_array(q, chunks=(1, heads, q_chunk, d)).persist()
        dk = da.from_array(k, chunks=(1, heads, k_chunk, d)).persist()
        dv = da.from_array(v, chunks=(1, heads, k_chunk, d)).persist()
        out = fd.attention(dq, dk, dv, causal=causal, num_threads=threads)
        out.compute()
        wall = []
        for _ in range(repeat):
            t = time.perf_counter()
            out.compute()
            wall.append(time.perf_counter() - t)
        t2 = statistics.median(wall)
        print(f"\none worker x 1 dask thread, num_threads={threads} per task, L {q.shape[2]} "
              f"{'causal' if causal else ''}: {t2 * 1e3:.0f} ms, efficiency {t1 / t2:.0%} "
              f"(the table above: {threads} workers x 1 thread, num_threads=1)")
    return 0

"""Timing and the machine's ceilings, shared by ``python -m fastattn bench``, ``tune`` and
the ``bench --dask`` / ``--transformers`` runs (so that none of them imports another).
bench.py's docstring gives the method."""

import os
import platform
import statistics
import time

import numpy as np

from ._dispatch import kernels as _kernels

__all__ = ["time_alternating", "fma_peak", "ceilings", "cpu_description"]


def _calibrate(fn, min_time):
    """Calls per sample so that a sample lasts at least min_time (fn already warm)."""
    t = time.perf_counter()
    fn()
    once = time.perf_counter() - t
    return max(1, int(min_time / max(once, 1e-9)) + 1) if once < min_time else 1


def _sample(fn, number):
    t = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t) / number


def time_alternating(contenders, repeat, min_time, gap=0.0, fastest=(), samples=None):
    """Median seconds per call of each contender, sampled in turn, `gap` s apart; the
    fastest sample instead for the contenders named in `fastest` (ceilings). `samples`,
    a dict, receives every contender's samples."""
    numbers = {}
    for name, fn in contenders.items():
        fn()  # warm-up: first-touch, thread pools, caches
        numbers[name] = _calibrate(fn, min_time)
    samples = {} if samples is None else samples
    samples.update({name: [] for name in contenders})
    order = list(contenders.items())
    for r in range(repeat):
        # Each round starts with the next contender: none always follows the same one (whose
        # threads may still hold the cores) or always comes first after the gap.
        for name, fn in order[r % len(order):] + order[:r % len(order)]:
            time.sleep(gap)
            fn()  # warm again after the gap: no sample starts on sleeping vCPUs or pools
            samples[name].append(_sample(fn, numbers[name]))
    return {name: (min if name in fastest else statistics.median)(samples[name])
            for name in contenders}


def fma_peak(dtype, threads, min_time=0.1):
    """GFLOP/s of the build's widest vector FMAs on `threads` threads (fa_bench.h): the
    physical ceiling of the instruction set in use, measured now. The fastest of 7
    samples, not their median: a ceiling is what the cores can do, and a shared machine's
    noise only ever lowers it (a median taken while a neighbour held a core put float32
    at 332 GFLOP/s on a Zen 5 EPYC whose quiet samples give 436, and the attention rows
    beside it at 108% of that "peak")."""
    double = np.dtype(dtype) == np.float64
    n_iter = 1_000_000
    flops = _kernels.fma_loop(double, n_iter, threads)
    t = time_alternating({"fma": lambda: _kernels.fma_loop(double, n_iter, threads)}, 7,
                         min_time, fastest=("fma",))["fma"]
    return flops / t / 1e9


def ceilings(threads, min_time=0.2):
    """The machine's FMA peaks, float32 matmul GFLOP/s and copy GB/s, measured now (each
    the fastest of its samples, as in fma_peak)."""
    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    t = time_alternating({"matmul": lambda: a @ a}, 5, min_time, fastest=("matmul",))["matmul"]
    src = np.ones(64 * 2**20 // 8)  # 64 MiB, far beyond the caches
    dst = np.empty_like(src)
    c = time_alternating({"copy": lambda: np.copyto(dst, src)}, 5, min_time,
                         fastest=("copy",))["copy"]
    return {"fma_float32": fma_peak(np.float32, threads), "fma_float64": fma_peak(np.float64, threads),
            "matmul_gflops": 2 * n**3 / t / 1e9, "copy_gbs": 2 * src.nbytes / c / 1e9}


def cpu_description():
    """Vendor, model name, family/model/stepping and caches of this CPU (Linux; else
    what the platform module knows)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or platform.machine()
    caches = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            path = os.path.join(base, entry)
            with open(os.path.join(path, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(path, "type")) as f:
                kind = {"Data": "d", "Instruction": "i", "Unified": ""}.get(f.read().strip(), "?")
            with open(os.path.join(path, "size")) as f:
                size = f.read().strip()
            caches.append(f"L{level}{kind} {size}")
    except OSError:
        pass
    return (f"{fields.get('model name', '?')} ({fields.get('vendor_id', '?')}, family "
            f"{fields.get('cpu family', '?')} model {fields.get('model', '?')} stepping "
            f"{fields.get('stepping', '?')}; per core: {', '.join(caches) or 'caches unknown'})")

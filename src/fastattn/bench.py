"""The benchmark behind ``python -m fastattn bench``.

Method: every contender is warmed up, then the contenders of a row are timed in turn
(fastattn, NumPy, PyTorch, fastattn, ...) so that a noisy neighbour slows them alike;
each sample runs enough calls to last ``min_time``; a row reports the median sample per
contender and the ratio peer time / fastattn time (above 1: fastattn is faster).
Between samples the harness sleeps ``gap`` seconds: each library keeps a pool of worker
threads that spin for a while after a call (NumPy's OpenBLAS, SciPy's OpenBLAS, PyTorch's
and fastattn's OpenMP), and on a 2-core machine the next contender's threads would fight
them (measured: a NumPy matmul right after a SciPy-BLAS call ran 2-80x slower). The gap
lets each contender start on an idle machine, as it would in a program of its own; one
untimed call right after the gap then wakes the vCPUs and the contender's own threads (on
a VM, the first call after 0.2 s idle took 5-12 ms whatever the work), so no sample starts
cold.

The machine's own ceilings are measured in the same run, so the figures can be read
against them: the FMA peak of the instruction set in use on all threads (float32 and
float64: the physical limit), a large float32 NumPy matmul, a large copy, and, for the
decode rows, the time to read the same bytes the step reads. Each ceiling is the fastest
of its samples, not their median: noise from a neighbour only ever lowers a ceiling, so a
noisy run shows rows at a lower share of it rather than above 100%. The FMA peak is also
sampled between each attention row's samples, and a row's share is of the fastest FMA
sample so far (on a shared 2-vCPU VM the header's seven samples all fell in one busy spell
and read 330 GFLOP/s, where the interleaved samples reached 465). The header names the
CPU.
OpenBLAS settings that restrict NumPy's and SciPy's kernels (OPENBLAS_CORETYPE,
OPENBLAS_L2_SIZE) are removed from the benchmark's process (``__main__`` re-executes it),
so the peers run as users run them; the header says when that happened.
"""

import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import _plan, api
from ._dispatch import kernels as _kernels
from ._timing import ceilings, cpu_description, time_alternating
from ._validation import check_threads

__all__ = ["Case", "DEFAULT_CASES", "DECODE_CASES", "QUICK_CASES", "run", "main"]


@dataclass
class Case:
    name: str
    kind: str            # "attention", "decode", "projection", "softmax" or "memory"
    shape: tuple
    dtype: str = "float32"
    causal: bool = False
    repeat: int = 7


DEFAULT_CASES = [
    Case("tiny", "attention", (1, 1, 16, 16, 64)),
    Case("small", "attention", (1, 8, 128, 128, 64)),
    Case("medium", "attention", (4, 8, 512, 512, 64)),
    Case("long", "attention", (1, 8, 4096, 4096, 64), repeat=5),
    Case("causal", "attention", (1, 8, 2048, 2048, 64), causal=True),
    Case("wide head", "attention", (1, 8, 2048, 2048, 128)),
    Case("float64", "attention", (1, 8, 512, 512, 64), dtype="float64"),
    Case("projection", "projection", (4096, 768, 2304)),
    Case("softmax", "softmax", (8192, 4096)),
    Case("memory", "memory", (1, 8, 16384, 16384, 64), repeat=1),
]

# Incremental decoding: one query per head against a cache of n tokens; shape (batch,
# heads, n cached, head dim). Bandwidth-bound: the figure is the K+V bytes read per second.
DECODE_CASES = [
    Case("decode 4096", "decode", (1, 32, 4096, 128), repeat=9),
    Case("decode 128", "decode", (1, 32, 128, 128), repeat=9),
    # A KVCache per storage (issue 26): batch 4, 32 query heads over 8 key/value heads,
    # D 128, 16,384 tokens (512 MiB as float32); each against the float32 cache.
    Case("storage bfloat16", "storage", (4, 32, 8, 16384, 128), dtype="bfloat16", repeat=7),
    Case("storage float16", "storage", (4, 32, 8, 16384, 128), dtype="float16", repeat=7),
    Case("storage int8", "storage", (4, 32, 8, 16384, 128), dtype="int8", repeat=7),
    Case("storage float8_e4m3", "storage", (4, 32, 8, 16384, 128), dtype="float8_e4m3",
         repeat=7),
]

QUICK_CASES = [
    Case("tiny", "attention", (1, 1, 16, 16, 64), repeat=3),
    Case("small", "attention", (1, 8, 128, 128, 64), repeat=3),
    Case("causal", "attention", (1, 4, 256, 256, 64), causal=True, repeat=3),
    Case("float64", "attention", (1, 2, 256, 256, 32), dtype="float64", repeat=3),
    Case("projection", "projection", (256, 128, 384), repeat=3),
    Case("softmax", "softmax", (256, 1024), repeat=3),
]


# --------------------------------------------------------------------------- peers

def numpy_attention(q, k, v, causal=False):
    """The plain NumPy formulation: scores, max-subtracted softmax, weighted sum."""
    s = q @ np.swapaxes(k, -1, -2)
    s *= s.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    if causal:
        n_q, n_k = s.shape[-2:]
        s[..., np.arange(n_k) > np.arange(n_q)[:, None] + (n_k - n_q)] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s @ v


def numpy_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _peak_rss_reset():
    """Reset the kernel's peak-RSS mark for this process (Linux); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_heap():
    """Return the C heap's free memory to the system (glibc's malloc_trim), so that a call's
    new allocations show in the resident set: without it the memory row read 0.0 MiB when
    the rows before it had left free heap for the call to reuse. No-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_kib(field_name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(field_name)


# --------------------------------------------------------------------------- rows

def _attention_row(case, against, threads, min_time, gap):
    b, h, n_q, n_k, d = case.shape
    dtype = np.dtype(case.dtype)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, h, n_q, d)).astype(dtype)
    k = rng.standard_normal((b, h, n_k, d)).astype(dtype)
    v = rng.standard_normal((b, h, n_k, d)).astype(dtype)
    # Every contender allocates its result, as NumPy and torch do.
    contenders = {"fastattn": lambda: api.attention(q, k, v, causal=case.causal,
                                                    num_threads=threads)}
    if "numpy" in against:
        contenders["numpy"] = lambda: numpy_attention(q, k, v, case.causal)
    torch = _torch() if "torch" in against else None
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run_torch():
            with torch.no_grad():
                return sdpa(tq, tk, tv, is_causal=case.causal)

        contenders["torch"] = run_torch
    # The FMA peak once more, between the row's samples: on a shared machine the header's
    # measurement may have fallen in a busy spell (run keeps the fastest sample so far).
    double, n_iter = dtype == np.float64, 200_000
    fma_flops = _kernels.fma_loop(double, n_iter, threads)
    contenders["fma"] = lambda: _kernels.fma_loop(double, n_iter, threads)
    times = time_alternating(contenders, case.repeat, min_time, gap, fastest=("fma",))
    flops = 4.0 * b * h * n_q * n_k * d / (2 if case.causal else 1)
    return times, {"rate": flops / times["fastattn"] / 1e9, "unit": "GFLOP/s",
                   "fma_gflops": fma_flops / times.pop("fma") / 1e9}


def _projection_row(case, against, threads, min_time, gap):
    m, k_, n = case.shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k_)).astype(np.float32)
    w = rng.standard_normal((k_, n)).astype(np.float32)
    out = np.empty((m, n), np.float32)
    contenders = {"fastattn": lambda: api.project(x, w, out=out),
                  "numpy": lambda: np.matmul(x, w, out=out)}
    times = time_alternating(contenders, case.repeat, min_time, gap)
    return times, {"rate": 2.0 * m * k_ * n / times["fastattn"] / 1e9, "unit": "GFLOP/s"}


def _softmax_row(case, against, threads, min_time, gap):
    rows, cols = case.shape
    x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    contenders = {"fastattn": lambda: api.softmax(x),
                  "numpy": lambda: numpy_softmax(x)}
    try:
        from scipy.special import softmax as scipy_softmax

        contenders["scipy"] = lambda: scipy_softmax(x, axis=-1)
    except ImportError:
        pass
    times = time_alternating(contenders, case.repeat, min_time, gap)
    return times, {"rate": 2.0 * x.nbytes / times["fastattn"] / 1e9, "unit": "GB/s"}


def _memory_row(case, against, threads, min_time, gap):
    """Peak resident memory beyond inputs and output during one fused call."""
    b, h, n_q, n_k, d = case.shape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, h, n_q, d), dtype=np.float32)
    k = rng.standard_normal((b, h, n_k, d), dtype=np.float32)
    v = rng.standard_normal((b, h, n_k, d), dtype=np.float32)
    out = np.ones_like(q)  # touched: its pages count as the output's, not as extra
    api.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], num_threads=threads)  # warm-up
    time.sleep(gap)
    _release_free_heap()
    before = _rss_kib("VmRSS")
    supported = _peak_rss_reset()
    t = time.perf_counter()
    api.attention(q, k, v, out=out, num_threads=threads)
    elapsed = time.perf_counter() - t
    extra = (_rss_kib("VmHWM") - before) / 1024 if supported else float("nan")
    times = {"fastattn": elapsed}
    torch = _torch() if "torch" in against else None
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        time.sleep(gap)
        with torch.no_grad():
            t = time.perf_counter()
            torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
            times["torch"] = time.perf_counter() - t
    flops = 4.0 * b * h * n_q * n_k * d
    return times, {"rate": flops / elapsed / 1e9, "unit": "GFLOP/s", "extra_mib": extra}


def call_overhead(repeat=7):
    """Seconds per call on the tiny shape: the whole public call, and the kernel alone
    with its inputs already prepared (the difference is validation and dispatch)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 16, 64), dtype=np.float32) for _ in range(3))
    out = np.empty((1, 16, 64), np.float32)
    lse = np.empty((1, 16), np.float32)
    index = np.zeros((3, 1), np.intp)
    q3, k3, v3 = q[0], k[0], v[0]
    micro = _plan.use_microkernels(q.dtype, 64, 64)
    times = time_alternating({
        "public": lambda: api.attention(q, k, v),
        "kernel": lambda: _kernels.attention(q3, k3, v3, None, _plan.MaskKind.NONE, index, False,
                                             0, 0.125, 0.0, None, out, lse, 16, 16, micro, 1),
    }, repeat, 0.05)
    return times["public"], times["kernel"]


def plot(path, against=("numpy",), threads=None, lengths=(128, 256, 512, 1024, 2048, 4096)):
    """GFLOP/s against sequence length (batch 1, 8 heads, D 64, float32) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'fastattn[bench]' "
                         "(in a clone: pip install '.[bench]')") from None
    threads = check_threads(threads)
    series = {}
    for n in lengths:
        case = Case(f"L={n}", "attention", (1, 8, n, n, 64), repeat=3)
        times, _ = _attention_row(case, against, threads, 0.05, 0.2)
        flops = 4.0 * 8 * n * n * 64
        for name, t in times.items():
            series.setdefault(name, []).append(flops / t / 1e9)
        print(f"L={n}: " + ", ".join(f"{k} {flops / t / 1e9:.1f} GFLOP/s" for k, t in times.items()),
              flush=True)
    measured = ceilings(threads)
    ceil, peak = measured["matmul_gflops"], measured["fma_float32"]
    fig, ax = plt.subplots(figsize=(7, 5.2))
    for name, values in series.items():
        ax.plot(lengths, values, marker="o", label=name)
    ax.axhline(ceil, color="grey", linestyle="--", label=f"NumPy float32 matmul ({ceil:.0f})")
    ax.axhline(peak, color="black", linestyle=":", label=f"FMA peak, float32 ({peak:.0f})")
    ax.set_ylim(0, 1.08 * max([peak, ceil] + [v for vs in series.values() for v in vs]))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("sequence length (L_q = L_k), batch 1, 8 heads, D 64, float32")
    ax.set_ylabel("GFLOP/s (4 B H L^2 D / time)")
    ax.set_title(f"attention on {os.cpu_count()} cores, {threads} threads each")
    ax.grid(True, alpha=0.3)
    # Below the axes: inside, the legend covered the ceiling lines.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize="small",
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _decode_row(case, against, threads, min_time, gap):
    from .cache import KVCache

    b, h, n, d = case.shape
    rng = np.random.default_rng(0)
    cache = KVCache(b, h, n, d, dtype=np.float32)
    cache.append(rng.standard_normal((b, h, n, d), dtype=np.float32),
                 rng.standard_normal((b, h, n, d), dtype=np.float32))
    q = rng.standard_normal((b, h, 1, d), dtype=np.float32)
    # The kernel alone, its inputs prepared as the public call prepares them (the
    # difference between the two is validation and dispatch).
    kernel_args = (q.reshape(b * h, 1, d), cache.keys.reshape(b * h, n, d),
                   cache.values.reshape(b * h, n, d), np.arange(b * h, dtype=np.intp),
                   1 / np.sqrt(d), 0.0, None, np.empty((b * h, 1, d), np.float32),
                   np.empty((b * h, 1), np.float32), threads)
    # The same step on plain arrays (what a caller keeping its own K/V passes).
    keys, values = np.ascontiguousarray(cache.keys), np.ascontiguousarray(cache.values)
    contenders = {"fastattn": lambda: api.attention(q, cache=cache, num_threads=threads),
                  "kernel": lambda: _kernels.decode(*kernel_args),
                  "arrays": lambda: api.attention(q, keys, values, num_threads=threads)}
    if "numpy" in against:
        contenders["numpy"] = lambda: numpy_attention(q, cache.keys, cache.values)
    torch = _torch() if "torch" in against else None
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a)) for a in (q, cache.keys, cache.values))
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run_torch():
            with torch.no_grad():
                return sdpa(tq, tk, tv)

        contenders["torch"] = run_torch
    # The read floor between the row's samples, as the FMA peak in attention rows: this
    # VM's memory bandwidth swings with its neighbours (the floor of 128 MiB measured apart
    # from the row took 3.3 to 7.2 ms in five runs, the step beside it 3.8 to 5.2).
    moved = cache.keys.nbytes + cache.values.nbytes
    block = _kernels.read_sum_multiple() * threads
    floor_buf = np.ones(-(-moved // block) * block // 4, np.float32)
    contenders["floor"] = lambda: _kernels.read_sum(floor_buf, threads)
    samples = {}
    times = time_alternating(contenders, case.repeat, min_time, gap, fastest=("floor",),
                             samples=samples)
    # The floor's median beside its fastest sample: read against the row's median, the
    # fastest is the strict ceiling, the median the like-for-like one (a read of 128 MiB
    # once took 1.71 ms, 78 GB/s, in a run whose other samples and copy ceiling gave 43).
    return times, {"rate": moved / times["fastattn"] / 1e9, "unit": "GB/s",
                   "kernel": times.pop("kernel"), "arrays": times.pop("arrays"),
                   "floor": times.pop("floor"),
                   "floor_median": statistics.median(samples["floor"])}


def _storage_row(case, against, threads, min_time, gap):
    """One decoding step against a KVCache holding case.dtype, against the same step on a
    float32 cache and against the read floor of the cache's own bytes."""
    from .cache import KVCache

    b, h, h_kv, n, d = case.shape
    rng = np.random.default_rng(0)
    k = rng.standard_normal((b, h_kv, n, d), dtype=np.float32)
    v = rng.standard_normal((b, h_kv, n, d), dtype=np.float32)
    q = rng.standard_normal((b, h, 1, d), dtype=np.float32)
    caches = {}
    for name, storage in (("fastattn", case.dtype), ("float32 cache", None)):
        caches[name] = KVCache(b, h_kv, n, d, storage=storage)
        caches[name].append(k, v)
    del k, v
    contenders = {name: (lambda c=c: api.attention(q, cache=c, num_threads=threads))
                  for name, c in caches.items()}
    if _kernels.decode_products(d, d, case.dtype):
        contenders["products"] = lambda: api.attention(q, cache=caches["fastattn"],
                                                       num_threads=threads, precision="bfloat16")
    moved = caches["fastattn"].nbytes
    block = _kernels.read_sum_multiple() * threads
    floor_buf = np.ones(-(-moved // block) * block // 4, np.float32)
    contenders["floor"] = lambda: _kernels.read_sum(floor_buf, threads)
    times = time_alternating(contenders, case.repeat, min_time, gap, fastest=("floor",))
    # Appending (quantizing) a 4096-token chunk into a cache whose group is half filled.
    chunk = rng.standard_normal((b, h_kv, 4096, d), dtype=np.float32)
    target = KVCache(b, h_kv, 4096 + 16, d, storage=case.dtype)

    def append():
        target.reset()
        target.append(chunk[:, :, :16], chunk[:, :, :16])
        target.append(chunk, chunk)
    appended = time_alternating({"append": append}, 5, min_time, gap)["append"]
    return times, {"rate": moved / times["fastattn"] / 1e9, "unit": "GB/s",
                   "float32": times.pop("float32 cache"), "floor": times.pop("floor"),
                   "products": times.pop("products", None), "flops": 4.0 * b * h * n * d,
                   "append": 2 * chunk.nbytes / appended / 1e9}


_ROWS = {"attention": _attention_row, "decode": _decode_row, "projection": _projection_row,
         "softmax": _softmax_row, "memory": _memory_row, "storage": _storage_row}


# --------------------------------------------------------------------------- report

def _fmt_time(t):
    if t is None:
        return "—"
    return f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


def info_isa():
    """The instruction set of the kernels in use."""
    return _kernels.build_info()["isa"]


def _header(threads, against):
    info = _kernels.build_info()
    torch = _torch() if "torch" in against else None
    lines = [
        f"fastattn {sys.modules['fastattn'].__version__}, NumPy {np.__version__}"
        + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else ""),
        f"cpu: {cpu_description()}",
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus, "
        f"fastattn threads {threads}, OpenMP {'on' if info['openmp'] else 'off'}, "
        f"kernels {info['isa']} ({info['compile_flags']})",
        _plan.tile_summary(),
    ]
    removed = os.environ.get("FASTATTN_BENCH_UNSET")
    if removed:
        lines.append(f"removed from this process so that NumPy's and SciPy's OpenBLAS pick their "
                     f"own kernels: {removed}")
    return lines


def run(cases, against=("numpy",), threads=None, min_time=0.05, gap=0.2, out=sys.stdout):
    """Run the cases and print the table; returns the rows as dictionaries."""
    threads = check_threads(threads)
    torch = _torch() if "torch" in against else None
    if "torch" in against and torch is None:
        print("torch is not installed: its columns are left empty", file=out)
    if torch is not None:
        torch.set_num_threads(threads)
    for line in _header(threads, against):
        print(line, file=out)
    ceil = ceilings(threads)
    print(f"ceilings measured now on {threads} threads: FMA peak ({info_isa()}) float32 "
          f"{ceil['fma_float32']:.1f} GFLOP/s, float64 {ceil['fma_float64']:.1f} GFLOP/s; "
          f"float32 matmul (2048^3) {ceil['matmul_gflops']:.1f} GFLOP/s; "
          f"copy (64 MiB) {ceil['copy_gbs']:.1f} GB/s", file=out)
    public, kernel = call_overhead()
    print(f"per-call cost on the tiny shape: {public * 1e6:.1f} us public call = "
          f"{(public - kernel) * 1e6:.1f} us validation and dispatch + {kernel * 1e6:.1f} us kernel",
          file=out)
    print(file=out)
    print("| case | shape | fastattn | rate | NumPy | NumPy / fastattn | torch | torch / fastattn |",
          file=out)
    print("|---|---|---|---|---|---|---|---|", file=out)
    rows, best = [], {}
    for case in cases:
        times, extra = _ROWS[case.kind](case, against, threads, min_time, gap)
        fa = times["fastattn"]
        peer = times.get("numpy")
        tt = times.get("torch")
        label = case.name + (" (scipy: %s, x%.2f)" % (_fmt_time(times["scipy"]), times["scipy"] / fa)
                             if "scipy" in times else "")
        dims = case.shape if case.kind not in ("decode", "storage") else (
            case.shape[:2] + (1,) + case.shape[2:] if case.kind == "decode"
            else (case.shape[0], f"{case.shape[1]} over {case.shape[2]}", 1) + case.shape[3:])
        shape = ", ".join(map(str, dims)) + ("" if case.dtype == "float32" else f", {case.dtype}") \
            + (", causal" if case.causal else "")
        rate = f"{extra['rate']:.1f} {extra['unit']}"
        if case.kind == "decode":
            rate += (f" (read floor {_fmt_time(extra['floor'])} fastest, "
                     f"{_fmt_time(extra['floor_median'])} median: {100 * extra['floor'] / fa:.0f}%, "
                     f"{100 * extra['floor_median'] / fa:.0f}%), "
                     f"kernel alone {_fmt_time(extra['kernel'])}, plain arrays "
                     f"{_fmt_time(extra['arrays'])}"
                     + ("" if tt is None else f" ({tt / extra['arrays']:.2f}x torch)"))
        if case.kind == "storage":
            rate += (f" ({fa / extra['float32']:.2f}x the float32 cache's time, "
                     f"{_fmt_time(extra['float32'])}; read floor of its bytes "
                     f"{_fmt_time(extra['floor'])}: {100 * extra['floor'] / fa:.0f}%; "
                     f"append of 4096 tokens {extra['append']:.1f} GB/s of float32; "
                     f"its FLOPs at the FMA peak {_fmt_time(extra['flops'] / ceil['fma_float32'] / 1e9)}"
                     + ("" if extra["products"] is None else
                        f"; precision='bfloat16' {_fmt_time(extra['products'])}: "
                        f"{extra['products'] / extra['float32']:.2f}x the float32 cache's time, "
                        f"{100 * extra['floor'] / extra['products']:.0f}% of the read floor")
                     + ")")
        if "fma_gflops" in extra:
            peak = "fma_" + case.dtype
            ceil[peak] = max(ceil[peak], extra["fma_gflops"])
            best[peak] = max(best.get(peak, 0.0), extra["fma_gflops"])
        if case.kind == "attention" or case.kind == "memory":
            rate += (f" ({100 * extra['rate'] / ceil['fma_' + case.dtype]:.0f}% of FMA peak, "
                     f"{100 * extra['rate'] / ceil['matmul_gflops']:.0f}% of matmul)")
            if tt is not None:
                rate += f"; torch {100 * extra['rate'] * fa / tt / ceil['fma_' + case.dtype]:.0f}% of peak"
        if "extra_mib" in extra:
            rate += f", peak extra {extra['extra_mib']:.1f} MiB"
        print(f"| {label} | {shape} | {_fmt_time(fa)} | {rate} | {_fmt_time(peer)} | "
              f"{'—' if peer is None else f'{peer / fa:.2f}x'} | {_fmt_time(tt)} | "
              f"{'—' if tt is None else f'{tt / fa:.2f}x'} |", file=out, flush=True)
        rows.append({"case": case, "times": times, **extra})
    if best:
        print("\nFMA peak sampled again between each attention row's samples, fastest: "
              + ", ".join(f"{k[4:]} {v:.1f} GFLOP/s" for k, v in sorted(best.items()))
              + "; each row's share is of the fastest FMA sample up to and including its own",
              file=out)
    return rows


def options(threads=None, min_time=0.2, repeat=7, quick=False, out=sys.stdout):
    """What softcap and sinks cost over plain attention, in the fused kernel (1, 8, 2048,
    2048, 64) and the decoding kernel (32 heads over 4096 tokens, D 128), float32: the
    variants alternate in one run (medians of `repeat`). softcap 50 is Gemma 2's cap
    (random N(0, 1) scores then stay in tanh's series range); softcap 5 sends some lanes
    of most vectors to its exp form. Returns {(kernel, variant): seconds}."""
    threads = check_threads(threads)
    for line in _header(threads, ()):
        print(line, file=out)
    rng = np.random.default_rng(0)
    fused = (1, 8, 256, 256, 64) if quick else (1, 8, 2048, 2048, 64)
    decode = (1, 32, 256, 128) if quick else (1, 32, 4096, 128)
    b, h, lq, lk, d = fused
    q, k, v = (rng.standard_normal((b, h, n, d), dtype=np.float32) for n in (lq, lk, lk))
    db, dh, dn, dd = decode
    dq = rng.standard_normal((db, dh, 1, dd), dtype=np.float32)
    dk, dv = (rng.standard_normal((db, dh, dn, dd), dtype=np.float32) for _ in range(2))
    sinks = rng.standard_normal(h).astype(np.float32)
    dsinks = rng.standard_normal(dh).astype(np.float32)
    variants = {"plain": {}, "softcap 50": {"softcap": 50.0}, "softcap 5": {"softcap": 5.0}}
    print(f"\nsoftcap and sinks against plain attention, {threads} threads, float32, medians "
          f"of {repeat} alternating samples\n", file=out)
    print("| kernel | shape | variant | time | cost over plain |", file=out)
    print("|---|---|---|---|---|", file=out)
    result = {}
    for kernel, shape, args, sink in (("fused", fused, (q, k, v), sinks),
                                      ("decoding", (db, dh, 1, dn, dd), (dq, dk, dv), dsinks)):
        contenders = {
            name: (lambda kw=kw: api.attention(*args, num_threads=threads, **kw))
            for name, kw in {**variants, "sinks": {"sinks": sink}}.items()}
        times = time_alternating(contenders, repeat, min_time)
        for name, t in times.items():
            result[(kernel, name)] = t
            cost = "—" if name == "plain" else f"{100 * (t / times['plain'] - 1):+.0f}%"
            print(f"| {kernel} | {', '.join(map(str, shape))} | {name} | {_fmt_time(t)} | "
                  f"{cost} |", file=out, flush=True)
    return result


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastattn bench",
                                     description="Time fastattn against NumPy (and PyTorch).")
    parser.add_argument("--against", action="append", choices=["numpy", "torch"],
                        help="peers to time (default: numpy, and torch when installed)")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--decode", action="store_true",
                        help="incremental decoding: one query per head against a KVCache")
    parser.add_argument("--threads", type=int, default=None, help="threads for every contender")
    parser.add_argument("--cases", help="comma-separated case names to run: "
                        + ", ".join(c.name for c in DEFAULT_CASES) + " (with --quick: "
                        + ", ".join(c.name for c in QUICK_CASES) + "; with --decode: "
                        + ", ".join(c.name for c in DECODE_CASES) + ")")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per sample")
    parser.add_argument("--plot", metavar="FILE",
                        help="instead of the table, plot GFLOP/s against sequence length to FILE (PNG)")
    parser.add_argument("--gap", type=float, default=0.2,
                        help="idle seconds before each sample, so thread pools go quiet")
    parser.add_argument("--transformers", action="store_true",
                        help="a random ~100M-parameter Llama in transformers: fastattn "
                             "against sdpa, prefill and decode (needs fastattn[transformers])")
    parser.add_argument("--varlen", action="store_true",
                        help="packed batches of sequences of different lengths: "
                             "attention_varlen against a per-sequence loop and torch")
    parser.add_argument("--dask", action="store_true",
                        help="fastattn.dask on a LocalCluster of 2 workers against one "
                             "process (needs fastattn[dask])")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="bfloat16 or float16: attention on 16-bit inputs against fastattn "
                             "float32 and torch on the same dtype (bfloat16 needs ml_dtypes)")
    parser.add_argument("--options", action="store_true",
                        help="what softcap and sinks cost over plain attention (fused and "
                             "decoding kernels)")
    args = parser.parse_args(argv)
    if args.options:
        options(args.threads, quick=args.quick)
        return 0
    if args.varlen:
        from . import _bench_varlen
        return _bench_varlen.main(args.threads, args.quick, min_time=args.min_time, gap=args.gap)
    if args.dask:
        from . import _bench_dask
        return _bench_dask.main(args.threads, args.quick)
    if args.transformers:
        from . import _bench_transformers
        return _bench_transformers.main(args.threads, args.quick, args.dtype)
    if args.dtype != "float32":
        from . import _bench_lowp
        cases = None
        if args.cases:
            wanted = {c.strip() for c in args.cases.split(",")}
            table = _bench_lowp.QUICK_CASES if args.quick else _bench_lowp.CASES
            unknown = wanted - {c[0] for c in table}
            if unknown:
                parser.error(f"unknown cases {sorted(unknown)}; choose from {[c[0] for c in table]}")
            cases = [c for c in table if c[0] in wanted]
        rows = _bench_lowp.main(args.dtype, args.threads, args.quick, min_time=args.min_time,
                                gap=args.gap, cases=cases)
        return 1 if rows == 1 else 0
    against = set(args.against or ["numpy"] + (["torch"] if _torch() is not None else []))
    against.add("numpy")
    if args.plot:
        plot(args.plot, tuple(sorted(against)), args.threads)
        return 0
    cases = DECODE_CASES if args.decode else QUICK_CASES if args.quick else DEFAULT_CASES
    if args.cases:
        wanted = {c.strip() for c in args.cases.split(",")}
        unknown = wanted - {c.name for c in cases}
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}; choose from {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in wanted]
    run(cases, tuple(sorted(against)), args.threads, args.min_time, args.gap)
    return 0

"""``python -m fastattn tune``: measure this machine's tile choices and store them.

Which way a tile's GEMMs run fastest (the build's micro-kernels or BLAS) and which tile
size suits the caches depend on the CPU, not on the shape: the defaults in _plan were
measured on the CPUs seen so far. This times the candidates on this machine, the public
``attention`` call on two long shapes (float32 1, 8, 2048, 2048, 64 and float64
1, 8, 1024, 1024, 64) as users run it, alternating candidates round after round, and
keeps a candidate over the default only when its median is at least ``MARGIN`` faster:
on a shared machine a smaller difference is noise, and a choice that flips between runs
would make results change (in the last bits) for nothing. The winners go to the tuning
file (fastattn._tuning), which every later import on this machine reads.

Steps: (1) the largest tile, float32, in the GEMM path the build prefers; (2) for each
compute dtype the build has micro-kernels for, micro-kernels against BLAS at that tile;
(3) for each dtype whose tiles stay in the micro-kernels, their register blocks (the
scores kernel's, then P V's; every block gives the same bits, so only speed decides).
Float64 tiles follow the same rule as always (half the keys of float32's). About half a
minute on a 2-core machine.

``--kernels`` is the kernel probe instead: each register block of each micro-kernel timed
on one thread, on operands in their packed layouts, against one core's FMA peak measured
in the same run (probe_kernels), then one decoding step per cache storage, exact and with
products below float32 where the CPU has them, its cache in L2 (probe_decode). It writes
nothing: it is the figure to report from a CPU
the defaults were not measured on.
"""

import argparse
import datetime
import statistics
import sys

import numpy as np

from . import _dispatch, _plan, _tuning
from ._dispatch import kernels as _kernels
from .api import attention
from ._timing import cpu_description, fma_peak, time_alternating

__all__ = ["CANDIDATE_TILES", "MARGIN", "PROBE_SETS", "SHAPES", "choose", "probe_kernels",
           "tune", "main"]

# (query rows, keys) per tile, the default first. Around it: fewer rows, fewer keys (an
# L2 of 512 KiB or less), more keys and more rows (an L2 of 2 MiB).
CANDIDATE_TILES = ((_plan.DEFAULT_Q_BLOCK, _plan.DEFAULT_K_BLOCK), (128, 512), (256, 256),
                   (256, 1024), (512, 512))
# The shape each compute dtype is timed on (B, H, L_q, L_k, D): long enough that the tiles
# dominate, short enough for a quick run.
SHAPES = {4: (1, 8, 2048, 2048, 64), 8: (1, 8, 1024, 1024, 64)}
# A candidate replaces the default only when its median time is this much lower: on
# shared VMs, alternating medians of one call move by up to 5% between runs, while the
# choices that matter differ by more (micro-kernels against BLAS: 20-50%).
MARGIN = 0.08


def choose(default, medians, margin=MARGIN):
    """The fastest of `medians` ({candidate: seconds}) if it beats `default`'s by at least
    `margin` (a fraction), else `default`."""
    best = min(medians, key=medians.get)
    return best if medians[best] <= (1 - margin) * medians[default] else default


def _inputs(shape, dtype):
    b, h, lq, lk, d = shape
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, h, lq, d)).astype(dtype)
    k = rng.standard_normal((b, h, lk, d)).astype(dtype)
    v = rng.standard_normal((b, h, lk, d)).astype(dtype)
    return q, k, v, np.empty_like(q)


def _call(q, k, v, out, tile, gemm, threads, blocks=None):
    """One attention call with the tile, GEMM path and register blocks ({dtype: {"scores":
    name, "pv": name}}; None: the CPU table's, mk_defaults) of a candidate set in the
    policy."""
    values = dict(_plan.policy_for(None, gemm), q_block=tile[0], k_block=tile[1],
                  **_plan.mk_policy(blocks or _plan.mk_defaults()))

    def run():
        _kernels.set_policy(**values)
        attention(q, k, v, out=out, num_threads=threads)
    return run


def _flops(shape):
    b, h, lq, lk, d = shape
    return 4.0 * b * h * lq * lk * d


def _choose_blocks(name, q, k, v, o, tile, threads, rounds, min_time, shape, report, out):
    """The register blocks of dtype `name`'s micro-kernels: the scores' first (P V held at
    the default), then P V's, each against the CPU table's default (mk_defaults) by the
    same margin as tiles."""
    default = _plan.mk_defaults()[name]
    blocks = dict(default)
    for kernel in ("scores", "pv"):
        print(f"register blocks: {name} {kernel}, {shape}", file=out)
        calls = {b: _call(q, k, v, o, tile, "micro", threads, {name: dict(blocks, **{kernel: b})})
                 for b in _plan.MK_BLOCKS[kernel]}
        medians = time_alternating(calls, rounds, min_time, gap=0.02)
        blocks[kernel] = choose(default[kernel], medians)
        report(f"{name} {kernel}", shape, medians, blocks[kernel], default[kernel])
    return blocks


def tune(shapes=None, tiles=CANDIDATE_TILES, rounds=7, min_time=0.05, threads=None,
         out=sys.stdout):
    """Time the candidates and return this machine's entry for the tuning file (not
    written). `shapes` {itemsize: shape} defaults to SHAPES."""
    shapes = dict(SHAPES if shapes is None else shapes)
    saved = _kernels.policy()
    lanes = _plan.MICROKERNEL_LANES
    figures = {}

    def report(what, shape, medians, chosen, default):
        for name, t in medians.items():
            label = name if isinstance(name, str) else f"{name[0]} x {name[1]}"
            gflops = _flops(shape) / t / 1e9
            mark = " <- chosen" if name == chosen else ""
            print(f"  {what} {label:>10}: {t * 1e3:8.2f} ms {gflops:7.1f} GFLOP/s "
                  f"({medians[default] / t:.2f}x the default){mark}", file=out)
            figures[f"{what} {label}"] = round(t * 1e3, 3)

    try:
        shape = shapes[4]
        q, k, v, o = _inputs(shape, np.float32)
        gemm = "micro" if 4 in lanes else "blas"
        print(f"tiles: float32 {shape}, {gemm} GEMMs, medians of {rounds} rounds", file=out)
        calls = {t: _call(q, k, v, o, t, gemm, threads) for t in tiles}
        medians = time_alternating(calls, rounds, min_time, gap=0.02)
        tile = choose(tiles[0], medians)
        report("float32 tile", shape, medians, tile, tiles[0])
        chosen, blocks = {}, {}
        for size, name in ((4, "float32"), (8, "float64")):
            if size not in lanes:
                continue  # no micro-kernels for it: its tiles run in BLAS regardless
            shape = shapes[size]
            q, k, v, o = _inputs(shape, np.dtype(name))
            _kernels.set_policy(q_block=tile[0], k_block=tile[1])
            largest = _kernels.tiles(1, 1 << 30, 1 << 30, False, size)
            print(f"tile GEMMs: {name} {shape}, tiles up to {largest[0]} x {largest[1]}",
                  file=out)
            calls = {g: _call(q, k, v, o, tile, g, threads) for g in ("micro", "blas")}
            medians = time_alternating(calls, rounds, min_time, gap=0.02)
            chosen[name] = choose("micro", medians)
            report(f"{name} GEMMs", shape, medians, chosen[name], "micro")
            if chosen[name] == "micro":
                blocks[name] = _choose_blocks(name, q, k, v, o, tile, threads, rounds,
                                              min_time, shape, report, out)
    finally:
        _kernels.set_policy(**saved)
    return {"q_block": tile[0], "k_block": tile[1], "tile_gemm": chosen, "mk_blocks": blocks,
            "measured": datetime.date.today().isoformat(), "rounds": rounds,
            "threads": threads or _kernels.max_threads(), "median_ms": figures}


# The kernel probe's operands per compute dtype's itemsize: (what, rows, keys, head size).
# "L1": q or P, the packed keys or values and the scores or output in 28 KiB (float32) or
# 20 KiB (float64), under every L1d seen (32-48 KiB); "tile": the default tile (256 x 512
# float32, 256 x 256 float64, D 64), 704-768 KiB, in the L2 of the CPUs with 1-2 MiB.
PROBE_SETS = {4: (("L1", 24, 64, 64), ("tile", 256, 512, 64)),
              8: (("L1", 24, 32, 32), ("tile", 256, 256, 64))}


def probe_kernels(rounds=5, min_time=0.02, out=None):
    """Time every register block of each micro-kernel (scores and P V, float32 and
    float64) on one thread, on operands in their packed layouts (PROBE_SETS), medians of
    `rounds` alternating samples, beside the FMA peak of one core measured in the same
    run. Prints a table to `out` (default: stdout) and returns its rows as dicts (dtype,
    kernel, block, set, gflops, peak: the share of the core's peak). Writes nothing."""
    out = out or sys.stdout
    blocks = _plan.MK_BLOCKS
    if not blocks["scores"]:
        print(f"kernel probe: the {_dispatch.isa} build has no micro-kernels (its tiles run "
              f"in BLAS)", file=out)
        return []
    in_use = _plan.mk_in_use()
    peaks = {size: fma_peak(np.dtype(f"float{8 * size}"), 1) for size in (4, 8)}
    print(f"kernel probe: {cpu_description()}\n{_dispatch.isa} build, one thread, medians of "
          f"{rounds} rounds; FMA peak of one core (fa_bench.h, fastest of 7): float32 "
          f"{peaks[4]:.1f}, float64 {peaks[8]:.1f} GFLOP/s", file=out)
    rows = []
    for size, dtype in ((4, "float32"), (8, "float64")):
        sets = PROBE_SETS[size]
        for kernel, what in (("scores", "scores = Q K^T"), ("pv", "O += P V")):
            heads = "".join(f"  {f'{name} {r} x {n} keys, D {d}':>30}" for name, r, n, d in sets)
            print(f"{dtype} {what}\n  {'block':<12}{heads}", file=out)
            medians = {}
            for name, r, n, d in sets:
                flops = 2.0 * r * n * d
                reps = {b: max(1, int(min_time / max(_kernels.mk_probe(kernel, size, b, r, n, d, 1),
                                                     1e-7)))
                        for b in range(len(blocks[kernel]))}
                samples = {b: [] for b in reps}
                for i in range(rounds):
                    order = list(reps)[i % len(reps):] + list(reps)[:i % len(reps)]
                    for b in order:
                        samples[b].append(_kernels.mk_probe(kernel, size, b, r, n, d, reps[b])
                                          / reps[b])
                for b, times in samples.items():
                    medians[b, name] = flops / statistics.median(times) / 1e9
            for b, block in enumerate(blocks[kernel]):
                cells = ""
                for name, *_ in sets:
                    gflops = medians[b, name]
                    rows.append({"dtype": dtype, "kernel": kernel, "block": block, "set": name,
                                 "gflops": gflops, "peak": gflops / peaks[size]})
                    cells += f"  {gflops:16.1f} GFLOP/s {gflops / peaks[size]:4.0%}"
                label = block + (" (in use)" if block == in_use[dtype][kernel] else "")
                print(f"  {label:<12}{cells}", file=out)
    return rows


# The decoding probe's step: one kv head's G query rows against a cache of this many
# tokens, D 128, whose keys and values (768 KiB as float32, less stored narrower) stay in
# the L2 cache of the CPUs with 1-2 MiB, so that the figure is the kernel's arithmetic.
DECODE_PROBE = {"rows": 4, "tokens": 768, "d": 128}


def probe_decode(rounds=5, min_time=0.02, out=None):
    """Time one decoding step (the decoding kernel on one thread: DECODE_PROBE's rows
    against its cache, in L2) for each storage of KVCache, exact and, where the CPU takes
    them, with products below float32 (precision="bfloat16"), medians of `rounds`
    alternating samples, beside one core's float32 FMA peak measured in the same run.
    Each sample is a direct call of the compiled kernel (about a microsecond of Python
    with it, against tens in the step). Prints a table to `out` and returns its rows as
    dicts (storage, precision, us, gflops, peak). Writes nothing."""
    from .cache import KVCache, products_allowed
    out = out or sys.stdout
    rows, tokens, d = DECODE_PROBE["rows"], DECODE_PROBE["tokens"], DECODE_PROBE["d"]
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 1, tokens, d), dtype=np.float32)
    v = rng.standard_normal((1, 1, tokens, d), dtype=np.float32)
    q = rng.standard_normal((1, rows, d), dtype=np.float32)
    o = np.empty((1, rows, d), np.float32)
    lse = np.empty((1, rows), np.float32)
    index = np.zeros(1, np.intp)
    scale = 1.0 / np.sqrt(d)
    runs = {}
    for storage in (None, "bfloat16", "float16", "int8", "float8_e4m3"):
        cache = KVCache(1, 1, tokens, d, storage=storage)
        cache.append(k, v)
        scales = {} if cache._group <= 1 else {"ks": cache._ks[0], "vs": cache._vs[0]}
        for precision in (None, "bfloat16"):
            if precision and not (products_allowed(storage, precision)
                                  and _kernels.decode_products(d, d, storage)):
                continue
            runs[storage, precision] = (
                lambda c=cache, s=scales, p=precision is not None: _kernels.decode(
                    q, c._k[0], c._v[0], index, scale, 0.0, None, o, lse, 1, products=p, **s))
    peak = fma_peak(np.dtype(np.float32), 1)
    flops = 2.0 * rows * tokens * 2 * d
    times = time_alternating(runs, rounds, min_time)
    print(f"decoding probe: one step of {rows} query rows against {tokens} cached tokens, D "
          f"{d} (in L2), one thread, medians of {rounds} rounds; FMA peak of one core float32 "
          f"{peak:.1f} GFLOP/s", file=out)
    print(f"  {'storage':<14}{'precision':<12}{'step':>10}{'rate':>16}{'of peak':>9}", file=out)
    result = []
    for (storage, precision), t in times.items():
        gflops = flops / t / 1e9
        result.append({"storage": storage, "precision": precision, "us": t * 1e6,
                       "gflops": gflops, "peak": gflops / peak})
        print(f"  {str(storage or 'float32'):<14}{str(precision or 'exact'):<12}"
              f"{t * 1e6:8.1f} us{gflops:10.1f} GFLOP/s{gflops / peak:8.0%}", file=out)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastattn tune",
        description="Measure which tile size, tile GEMMs (micro-kernels or BLAS) and "
                    "micro-kernel register blocks are fastest on this machine and store them "
                    "in the tuning file, which later imports read. Without an entry, "
                    "fastattn uses its built-in defaults.")
    parser.add_argument("--show", action="store_true", help="print this machine's entry and exit")
    parser.add_argument("--forget", action="store_true",
                        help="remove this machine's entry (back to the defaults) and exit")
    parser.add_argument("--dry-run", action="store_true", help="measure, but write nothing")
    parser.add_argument("--kernels", action="store_true",
                        help="the kernel probe: time each micro-kernel's register blocks on "
                             "one thread against one core's FMA peak, and exit (writes nothing)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per candidate")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every call (default: all, as attention uses)")
    args = parser.parse_args(argv)
    isa = _dispatch.isa
    file = _tuning.path()
    print(f"machine: {_tuning.machine_key(isa)}")
    print(f"tuning file: {file or 'none (FASTATTN_TUNING is off)'}")
    if args.show:
        print(f"in use: {_plan.tile_summary()}")
        print(f"entry: {_plan.TUNED}" if _plan.TUNED else "entry: none for this machine")
        return 0
    if args.forget:
        print("entry removed" if _tuning.forget(isa) else "no entry for this machine")
        return 0
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.kernels:
        probe_kernels(rounds=args.rounds)
        probe_decode(rounds=args.rounds)
        return 0
    entry = tune(rounds=args.rounds, threads=args.threads)
    gemm = ", ".join(f"{name} {g}" for name, g in sorted(entry["tile_gemm"].items()))
    blocks = ", ".join(f"{name} scores {b['scores']}, P V {b['pv']}"
                       for name, b in sorted(entry["mk_blocks"].items()))
    print(f"chosen: tiles up to {entry['q_block']} x {entry['k_block']}"
          + (f"; tile GEMMs {gemm}" if gemm else "")
          + (f"; register blocks {blocks}" if blocks else ""))
    if args.dry_run or file is None:
        print("not written" + (" (--dry-run)" if args.dry_run else ""))
        return 0
    print(f"written to {_tuning.save(isa, entry)}; later imports on this machine use it")
    return 0

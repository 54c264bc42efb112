"""``python -m fastattn bench --dtype bfloat16`` (or float16): attention on 16-bit inputs.

Each row times, in turn (as bench.py's method says), fastattn on the 16-bit arrays,
fastattn float32 on the same values (what a caller gets by converting first, and the
kernel bfloat16 must beat), and torch SDPA on tensors of the same dtype. Rates are against
the peak of the engine in use (its own loop of bfloat16 products on every thread, measured
in the same run) and the float32 FMA peak. Accuracy: the largest absolute error of each
result against float64 attention on the same (16-bit) values, computed by fastattn's
float64 kernel, which the suite checks against the pure-Python reference.
"""

import numpy as np

from . import _plan, api
from ._dispatch import kernels as _kernels
from ._timing import cpu_description, fma_peak, time_alternating
from ._validation import bfloat16, check_threads

__all__ = ["CASES", "QUICK_CASES", "main", "engine_peak"]

# (name, batch, query heads, key/value heads, L_q, L_k, D, causal)
CASES = [
    ("small", 1, 8, 8, 128, 128, 64, False),
    ("medium", 4, 8, 8, 512, 512, 64, False),
    ("long", 1, 8, 8, 4096, 4096, 64, False),
    ("causal", 1, 8, 8, 2048, 2048, 64, True),
    ("wide head", 1, 8, 8, 2048, 2048, 128, False),
    ("decode", 1, 32, 8, 1, 4096, 128, False),
]
QUICK_CASES = [
    ("small", 1, 8, 8, 128, 128, 64, False),
    ("causal", 1, 4, 4, 256, 256, 64, True),
    ("decode", 1, 8, 2, 1, 512, 128, False),
]


def engine_peak(threads, min_time=0.05):
    """GFLOP/s of the bfloat16 engine's peak loop on `threads` threads (fastest of 5), or
    None where there is no engine (or only its emulation)."""
    n_iter = 200_000
    if _kernels.engine_loop(1, 1) == 0:
        return None
    flops = _kernels.engine_loop(n_iter, threads)
    t = time_alternating({"engine": lambda: _kernels.engine_loop(n_iter, threads)}, 5,
                         min_time, fastest=("engine",))["engine"]
    return flops / t / 1e9


def _fmt(t):
    return f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def main(dtype_name="bfloat16", threads=None, quick=False, repeat=None, min_time=0.05,
         gap=0.2, cases=None):
    dtype = bfloat16() if dtype_name == "bfloat16" else np.dtype(np.float16)
    if dtype is None:
        print("bench --dtype bfloat16 needs ml_dtypes: pip install ml_dtypes")
        return 1
    try:
        import torch
    except ImportError:
        torch = None
    threads = check_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    repeat = repeat or (3 if quick else 7)
    info = _kernels.build_info()
    peak = engine_peak(threads)
    fma = fma_peak(np.float32, threads)
    print(f"fastattn bench --dtype {dtype_name}: fastattn on {dtype_name} arrays, fastattn "
          f"float32 on the same values, torch SDPA on {dtype_name} tensors; medians of {repeat}")
    print(f"cpu: {cpu_description()}")
    print(f"kernels {info['isa']}, bfloat16 engine {_plan.ENGINE} "
          f"({', '.join(f'{k}: {v}' for k, v in _kernels.engines().items())}), "
          f"{threads} threads" + (f", torch {torch.__version__}" if torch else ", no torch"))
    print(f"ceilings measured now: engine peak ({_plan.ENGINE}) "
          + (f"{peak:.1f} GFLOP/s" if peak else "none")
          + f", float32 FMA peak {fma:.1f} GFLOP/s")
    print()
    print(f"| case | shape (B, H over H_kv, L_q, L_k, D) | fastattn {dtype_name} | rate | "
          f"fastattn float32 | float32 / {dtype_name} | torch {dtype_name} | torch / fastattn | "
          f"max error fastattn, torch |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for case in (cases or (QUICK_CASES if quick else CASES)):
        name, b, h, h_kv, n_q, n_k, d, causal = case
        rng = np.random.default_rng(0)
        q = rng.standard_normal((b, h, n_q, d), dtype=np.float32).astype(dtype)
        k = rng.standard_normal((b, h_kv, n_k, d), dtype=np.float32).astype(dtype)
        v = rng.standard_normal((b, h_kv, n_k, d), dtype=np.float32).astype(dtype)
        qf, kf, vf = (a.astype(np.float32) for a in (q, k, v))
        contenders = {
            "fastattn": lambda: api.attention(q, k, v, causal=causal, num_threads=threads),
            "float32": lambda: api.attention(qf, kf, vf, causal=causal, num_threads=threads)}
        if torch is not None:
            tdtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float16
            tq, tk, tv = (torch.from_numpy(a).to(tdtype) for a in (qf, kf, vf))

            def run_torch():
                with torch.no_grad():
                    return torch.nn.functional.scaled_dot_product_attention(
                        tq, tk, tv, is_causal=causal, enable_gqa=h != h_kv)

            contenders["torch"] = run_torch
        times = time_alternating(contenders, repeat, min_time, gap)
        exact = api.attention(*(a.astype(np.float64) for a in (q, k, v)), causal=causal)
        err = np.abs(api.attention(q, k, v, causal=causal).astype(np.float64) - exact).max()
        terr = None
        if torch is not None:
            terr = np.abs(run_torch().float().numpy().astype(np.float64) - exact).max()
        fa, f32, tt = times["fastattn"], times["float32"], times.get("torch")
        flops = 4.0 * b * h * n_q * n_k * d / (2 if causal and n_q > 1 else 1)
        if n_q == 1:
            moved = k.nbytes + v.nbytes
            rate = f"{moved / fa / 1e9:.1f} GB/s of {dtype_name} keys and values"
        else:
            # (float16 never runs on the bfloat16 engine: its share is of the FMA peak only)
            on_engine = peak and _kernels.lowp_mode(dtype_name, d, d) == "engine"
            rate = f"{flops / fa / 1e9:.1f} GFLOP/s" + (
                f" ({100 * flops / fa / 1e9 / peak:.0f}% of engine peak, "
                f"{100 * flops / fa / 1e9 / fma:.0f}% of FMA peak)" if on_engine else
                f" ({100 * flops / fa / 1e9 / fma:.0f}% of FMA peak)")
        shape = f"{b}, {h} over {h_kv}, {n_q}, {n_k}, {d}" + (", causal" if causal else "")
        print(f"| {name} | {shape} | {_fmt(fa)} | {rate} | {_fmt(f32)} | {f32 / fa:.2f}x | "
              + (f"{_fmt(tt)} | {tt / fa:.2f}x | " if tt else "— | — | ")
              + f"{err:.2e}, " + (f"{terr:.2e}" if terr is not None else "—") + " |", flush=True)
        rows.append({"case": name, "times": times, "error": err, "torch_error": terr})
    return rows

"""The error table of docs/guide/dtypes.rst: each 16-bit mode against float64 attention.

Run: ``python bench/lowp_accuracy.py`` (needs ml_dtypes; torch for its row). Inputs are
N(0, 1), shape (1, 8, 1024, 1024, 64); bfloat16 inputs are compared with float64 attention
on the same bfloat16 values, float32 inputs with float64 attention on the float32 values.
Every engine this machine runs is tried, by setting the policy's engine in turn.
"""

import numpy as np

import fastattn
from fastattn._dispatch import kernels
from fastattn._timing import cpu_description

try:
    import ml_dtypes
except ImportError:
    raise SystemExit("needs ml_dtypes: pip install ml_dtypes")


def errors(out, exact):
    d = np.asarray(out, np.float64) - exact
    return np.abs(d).max(), np.sqrt((d ** 2).mean() / (exact ** 2).mean())


def main():
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 8, 1024, 64), dtype=np.float32) for _ in range(3))
    qb, kb, vb = (a.astype(bf16) for a in (q, k, v))
    print(f"cpu: {cpu_description()}")
    print("| mode | causal | max abs error | relative RMS error |")
    print("|---|---|---|---|")
    for causal in (False, True):
        exact_b = fastattn.attention(*(a.astype(np.float64) for a in (qb, kb, vb)), causal=causal)
        exact_f = fastattn.attention(*(a.astype(np.float64) for a in (q, k, v)), causal=causal)
        rows = []
        for engine, why in kernels.engines().items():
            if why != "ok":
                continue
            old = kernels.set_policy(engine=kernels.ENGINES.index(engine))
            try:
                rows.append((f"bfloat16 inputs, engine {engine}",
                             errors(fastattn.attention(qb, kb, vb, causal=causal), exact_b)))
                rows.append((f"float32, precision='bfloat16', engine {engine}",
                             errors(fastattn.attention(q, k, v, causal=causal,
                                                       precision="bfloat16"), exact_f)))
            finally:
                kernels.set_policy(**old)
        rows.append(("float32, precision='highest'",
                     errors(fastattn.attention(q, k, v, causal=causal), exact_f)))
        try:
            import torch

            t = torch.nn.functional.scaled_dot_product_attention(
                *(torch.from_numpy(a.astype(np.float32)).bfloat16() for a in (qb, kb, vb)),
                is_causal=causal)
            rows.append(("torch SDPA, bfloat16 tensors", errors(t.float().numpy(), exact_b)))
        except ImportError:
            pass
        for name, (worst, rms) in rows:
            print(f"| {name} | {causal} | {worst:.2e} | {rms:.2e} |")


if __name__ == "__main__":
    main()

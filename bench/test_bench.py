"""pytest-benchmark suite over the shapes of ``python -m fastattn bench``.

Run: ``pip install '.[bench]' && python -m pytest bench/ --benchmark-only``
(add ``--benchmark-compare`` to compare with a saved run). Timings only: correctness is
in tests/. PyTorch rows are skipped when torch is not installed.
"""

import numpy as np
import pytest

import fastattn
from fastattn.bench import DEFAULT_CASES, numpy_attention, numpy_softmax

pytest.importorskip("pytest_benchmark")

ATTENTION = [c for c in DEFAULT_CASES if c.kind == "attention"]


def _qkv(case):
    b, h, n_q, n_k, d = case.shape
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(case.dtype)
            for s in ((b, h, n_q, d), (b, h, n_k, d), (b, h, n_k, d))]


@pytest.mark.parametrize("case", ATTENTION, ids=lambda c: c.name)
def test_attention_fastattn(benchmark, case):
    q, k, v = _qkv(case)
    benchmark(fastattn.attention, q, k, v, causal=case.causal)


@pytest.mark.parametrize("case", ATTENTION, ids=lambda c: c.name)
def test_attention_numpy(benchmark, case):
    q, k, v = _qkv(case)
    benchmark(numpy_attention, q, k, v, case.causal)


@pytest.mark.parametrize("case", ATTENTION, ids=lambda c: c.name)
def test_attention_torch(benchmark, case):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(a) for a in _qkv(case))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        benchmark(sdpa, q, k, v, is_causal=case.causal)


@pytest.mark.parametrize("impl", ["fastattn", "numpy"])
def test_projection(benchmark, impl):
    (case,) = [c for c in DEFAULT_CASES if c.kind == "projection"]
    m, k, n = case.shape
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    benchmark(fastattn.project if impl == "fastattn" else np.matmul, x, w)


@pytest.mark.parametrize("impl", ["fastattn", "numpy"])
def test_softmax(benchmark, impl):
    (case,) = [c for c in DEFAULT_CASES if c.kind == "softmax"]
    x = np.random.default_rng(0).standard_normal(case.shape, dtype=np.float32)
    benchmark(fastattn.softmax if impl == "fastattn" else numpy_softmax, x)

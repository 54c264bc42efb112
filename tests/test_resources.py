"""Ten thousand calls of each public function leave memory flat (tracemalloc and RSS)."""

import gc
import os
import tracemalloc

import numpy as np
import pytest

import fastattn


def _rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pytest.skip("needs /proc")


rng = np.random.default_rng(0)
Q, K, V = rng.standard_normal((2, 9, 8)), rng.standard_normal((2, 13, 8)), rng.standard_normal((2, 13, 4))
X = rng.standard_normal((9, 8))
W = rng.standard_normal((8, 8))
MASK = rng.random((9, 13)) > 0.3
LAYER = fastattn.MultiHeadAttention(W, W, W, W, num_heads=2)
OUT = np.empty((2, 9, 4))

CALLS = {
    "attention": lambda: fastattn.attention(Q, K, V, mask=MASK, causal=True),
    "attention+lse+weights+out": lambda: fastattn.attention(Q, K, V, return_lse=True,
                                                           return_weights=True, out=OUT),
    "scores": lambda: fastattn.scores(Q, K, mask=MASK),
    "softmax": lambda: fastattn.softmax(X, axis=0),
    "log_softmax": lambda: fastattn.log_softmax(X),
    "project": lambda: fastattn.project(X, W, np.ones(8)),
    "self_attention": lambda: fastattn.self_attention(X, W, W, W, causal=True),
    "merge_attention": lambda: fastattn.merge_attention(OUT, Q[..., 0], OUT, Q[..., 0]),
    "MultiHeadAttention": lambda: LAYER(X, causal=True),
    "error path": lambda: _expect_error(lambda: fastattn.attention(Q, K[..., :3], V)),
}


def _expect_error(fn):
    try:
        fn()
    except ValueError:
        return
    raise AssertionError("expected a ValueError")


@pytest.mark.parametrize("name", list(CALLS))
def test_ten_thousand_calls_leave_memory_flat(name):
    call = CALLS[name]
    for _ in range(1000):  # warm-up: caches, lazily created objects, allocator pools
        call()
    gc.collect()
    rss_before = _rss_bytes()
    tracemalloc.start()
    try:
        for _ in range(10_000):
            call()
        gc.collect()
        traced, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = _rss_bytes() - rss_before
    # A leak of even 100 bytes per call would show as 1 MB here.
    assert traced < 64 * 1024, f"{name}: {traced} bytes still traced after 10,000 calls"
    # Under AddressSanitizer freed memory waits in a quarantine (up to 256 MiB by design),
    # so RSS grows without a leak there; ASan runs keep the tracemalloc half only.
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):
        assert rss_growth < 4 * 2**20, f"{name}: RSS grew by {rss_growth} bytes"

"""The compiled kernel-choice policy: one struct of values, set through one function, and
rules that every path (the compiled small-call and decoding entries, _plan and _run)
reads, so that a changed value changes every path alike."""

import math

import numpy as np
import pytest

import fastattn
from fastattn import _plan, _run
from fastattn._dispatch import kernels

from conftest import kernel_policy


def test_set_policy_returns_the_old_values_and_refuses_bad_ones_changing_nothing():
    before = kernels.policy()
    assert set(before) == {"q_block", "k_block", "min_q_block", "min_work_items",
                           "decode_chunk", "serial_flops", "blas_serial_mnk",
                           "softmax_serial", "lanes_f", "lanes_d", "engine", "mk_scores_f",
                           "mk_pv_f", "mk_scores_d", "mk_pv_d"}
    with kernel_policy(q_block=64):
        assert kernels.policy() == dict(before, q_block=64)
    assert kernels.policy() == before
    for bad in ({"q_block": 0}, {"k_block": -3}, {"decode_chunk": 1.5},
                {"lanes_f": 3}, {"serial_flops": -1.0}, {"blas_serial_mnk": float("nan")},
                {"no_such_value": 1}, {"q_block": 128, "lanes_d": 5}, {"engine": -1}):
        with pytest.raises(ValueError, match="set_policy"):
            kernels.set_policy(**bad)
        assert kernels.policy() == before, bad


def test_the_defaults_are_the_compiled_ones_unless_tuned_or_forced():
    p = kernels.policy()
    if _plan.TUNED is None:
        assert (p["q_block"], p["k_block"]) == (_plan.DEFAULT_Q_BLOCK, _plan.DEFAULT_K_BLOCK)
    lanes = _plan.policy_for(_plan.TUNED, _plan.TILE_GEMM)
    assert (p["lanes_f"], p["lanes_d"]) == (lanes["lanes_f"], lanes["lanes_d"])
    assert _plan.policy_for(None, "blas")["lanes_f"] == 0 == _plan.policy_for(None, "blas")["lanes_d"]
    assert _plan.policy_for(None, "micro")["lanes_f"] == _plan.MICROKERNEL_LANES.get(4, 0)


def test_the_rules():
    assert kernels.gqa_group(8, 8) == 1 and kernels.gqa_group(8, 2) == 4
    assert kernels.gqa_group(8, 1) == 8 and kernels.gqa_group(0, 3) == 0
    assert kernels.gqa_group(8, 3) == -1 and kernels.gqa_group(8, 0) == -1
    assert kernels.gqa_group(0, 0) == 1
    assert kernels.default_scale(64) == 1 / math.sqrt(64) and kernels.default_scale(0) == 1.0
    assert kernels.window_first_key(100, 10) == 90
    assert kernels.window_first_key(100, 100) == kernels.window_first_key(100, 0) == 0
    assert kernels.sinks_valid(np.array([0.0, -np.inf, 1e30]))
    for bad in (np.nan, np.inf):
        assert not kernels.sinks_valid(np.array([0.0, bad], np.float32))
    with kernel_policy(serial_flops=100.0):
        assert kernels.team(4, 99.0, 10) == 1 and kernels.team(4, 100.0, 10) == 4
        assert kernels.team(4, 1e9, 3) == 3
    with kernel_policy(blas_serial_mnk=1000.0):
        assert not kernels.blas_would_thread(10, 10, 10) and kernels.blas_would_thread(10, 10, 11)
    with kernel_policy(q_block=256, k_block=512, min_q_block=32, min_work_items=8):
        assert kernels.tiles(1, 4096, 4096, False, 4) == (256, 512)
        assert kernels.tiles(1, 4096, 4096, True, 4) == (128, 512)
        assert kernels.tiles(1, 4096, 4096, False, 8) == (256, 256)
        assert kernels.tiles(1, 256, 100, False, 4) == (32, 100)  # 8 work items, clipped keys
        assert kernels.tiles(1, 64, 100, False, 4) == (32, 100)   # never below min_q_block


@pytest.mark.parametrize("values", [{"decode_chunk": 7, "serial_flops": 0.0}, {"serial_flops": 0.0},
                                    {"q_block": 5, "k_block": 9, "min_q_block": 2}])
def test_every_path_reads_the_same_policy(values):
    """A changed value reaches the compiled small-call path, the cache's step and the
    general path alike: each still gives the general path's result bitwise."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, 1, 32)).astype(np.float32)
    qs = rng.standard_normal((1, 2, 9, 32)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 60, 32)).astype(np.float32) for _ in range(2))
    cache = fastattn.KVCache(1, 2, 64, 32)
    cache.append(k, v)
    with kernel_policy(**values):
        small = fastattn.attention(q, k, v)
        step = fastattn.attention(q, cache=cache)
        general = fastattn.attention(q, k, v, return_lse=True)[0]
        assert np.array_equal(small, general) and np.array_equal(step, general)
        small = fastattn.attention(qs, k, v, causal=True)
        general = fastattn.attention(qs, k, v, causal=True, return_lse=True)[0]
        assert np.array_equal(small, general)
        if "decode_chunk" in values:  # 60 keys in chunks of 7: nine work items per group
            fastattn.attention(q, k, v, num_threads=2, return_lse=True)
            assert _run.last_call.threads == (2 if kernels.build_info()["openmp"] else 1)

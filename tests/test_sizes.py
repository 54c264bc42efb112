"""Shapes too large to compute are refused with a clear error before any allocation."""

import tracemalloc

import numpy as np
import pytest

import fastattn


def huge_view(shape):
    """A zero-stride view with an enormous nominal shape: costs no memory itself."""
    return np.broadcast_to(np.zeros((1,) * len(shape)), shape)


@pytest.mark.parametrize("args,words", [
    # A broadcast batch of 2**40 entries: the output could never be allocated.
    ((huge_view((2**20, 1, 4, 8)), huge_view((1, 2**20, 5, 8)), huge_view((1, 2**20, 5, 8))),
     ["batch", "q.shape=(1048576, 1, 4, 8)"]),
    # 2**30 keys of 64: the contiguous copy of k (512 GiB) could never be allocated.
    ((np.zeros((4, 64)), huge_view((2**30, 64)), huge_view((2**30, 64))), ["copy of k", "k.shape"]),
    # L_q above the BLAS int range.
    ((huge_view((2**31, 8)), np.zeros((4, 8)), np.zeros((4, 8))), ["L_q", "2**31"]),
])
def test_attention_refuses_unallocatable_shapes_before_allocating(args, words):
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            fastattn.attention(*args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert peak < 2**20, f"{peak} bytes were allocated before refusing"


def test_scores_weights_softmax_project_refuse_huge_results():
    q = huge_view((2**17, 8))
    with pytest.raises(ValueError, match=r"the scores would need 128 GiB"):
        fastattn.scores(q, huge_view((2**17, 8)))
    with pytest.raises(ValueError, match=r"the weights would need"):
        fastattn.attention(q, huge_view((2**17, 8)), huge_view((2**17, 1)), return_weights=True)
    with pytest.raises(ValueError, match=r"the result would need.*x.shape"):
        fastattn.softmax(huge_view((2**20, 2**20)))
    with pytest.raises(ValueError, match=r"the output would need.*x.shape"):
        fastattn.project(huge_view((2**20, 2**10, 8)), np.zeros((8, 2**16)))
    with pytest.raises(ValueError, match=r"projection by w_q would need"):
        fastattn.self_attention(huge_view((2**20, 2**10, 8)), np.zeros((8, 2**16)),
                                np.zeros((8, 2**16)), np.zeros((8, 4)))


def test_large_but_feasible_broadcast_still_runs():
    # A zero-stride k of 50k keys is copied once (1.6 MB): refused only when it could not be.
    k = huge_view((50_000, 4))
    out = fastattn.attention(np.ones((2, 4)), k, k)
    assert out.shape == (2, 4) and not out.any()

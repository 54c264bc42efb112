"""Hypothesis properties that hold whatever the inputs: invariances of softmax and attention."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import fastattn
from fastattn import reference
from conftest import assert_close


@st.composite
def qkv(draw, max_keys=40):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n_q, n_k = draw(st.integers(1, 12)), draw(st.integers(2, max_keys))
    d, d_v = draw(st.integers(1, 9)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    spread = draw(st.sampled_from([0.3, 1.0, 4.0]))
    q = (rng.standard_normal((2, n_q, d)) * spread).astype(dtype)
    k = (rng.standard_normal((2, n_k, d)) * spread).astype(dtype)
    v = rng.standard_normal((2, n_k, d_v)).astype(dtype)
    return seed, rng, q, k, v


@given(st.integers(0, 2**32 - 1), st.sampled_from([np.float32, np.float64]),
       st.floats(-1e4, 1e4, allow_nan=False), st.sampled_from([1.0, 30.0, 1e3]))
def test_softmax_rows_sum_to_one_and_are_shift_invariant(seed, dtype, shift, spread):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((5, 33)) * spread).astype(dtype)
    y = fastattn.softmax(x)
    assert_close(y.sum(axis=-1, dtype=np.float64), np.ones(5), dtype, "rows sum to 1", magnitude=2)
    assert np.all(y >= 0)
    # Shift invariance holds exactly only where x + shift is exact: shift in float64.
    shifted = fastattn.softmax(x.astype(np.float64) + shift)
    assert_close(shifted, fastattn.softmax(x.astype(np.float64)), np.float64 if dtype == np.float64
                 else np.float32, f"shift {shift}", magnitude=1 + abs(shift) * 1e-3)
    # log_softmax(x) = x - (m + log sum): its absolute error is a few ulps of max|x| (the
    # subtraction cancels), so it matches log(softmax) to that, not to a relative 2e-5.
    log_y = fastattn.log_softmax(x).astype(np.float64)
    y64 = y.astype(np.float64)
    seen = y64 > 1e-30
    bound = 8 * np.finfo(dtype).eps * max(1.0, float(np.abs(x).max())) + (2e-5 if dtype == np.float32 else 1e-12)
    err = np.abs(log_y[seen] - np.log(y64[seen]))
    assert err.max() <= bound, (err.max(), bound)


@given(qkv(), st.booleans())
def test_permuting_keys_and_values_together_changes_nothing(data, masked):
    seed, rng, q, k, v = data
    mask = rng.random((q.shape[1], k.shape[1])) > 0.3 if masked else None
    perm = rng.permutation(k.shape[1])
    out = fastattn.attention(q, k, v, mask=mask)
    permuted = fastattn.attention(q, k[:, perm], v[:, perm], mask=None if mask is None else mask[:, perm])
    assert_close(permuted, out, q.dtype, f"seed {seed}", magnitude=4)


@given(qkv(), st.sampled_from(["bool", "float"]))
def test_masked_keys_have_no_influence(data, kind):
    seed, rng, q, k, v = data
    keep = rng.random(k.shape[1]) > 0.4
    keep[0] = True
    mask = keep if kind == "bool" else np.where(keep, 0.0, -np.inf)
    out = fastattn.attention(q, k, v, mask=mask)
    # Whatever finite values the hidden keys hold, the result is the same...
    k2, v2 = k.copy(), v.copy()
    k2[:, ~keep] = rng.standard_normal(k2[:, ~keep].shape) * 100
    v2[:, ~keep] = rng.standard_normal(v2[:, ~keep].shape) * 100
    assert np.array_equal(fastattn.attention(q, k2, v2, mask=mask), out), f"seed {seed}"
    # ...and equal to dropping them.
    assert_close(fastattn.attention(q, k[:, keep], v[:, keep]), out, q.dtype, f"seed {seed}", magnitude=4)


@given(qkv(max_keys=60), st.booleans())
def test_split_keys_merged_by_log_sum_exp_equal_all_keys(data, causal):
    seed, rng, q, k, v = data
    n_k = k.shape[1]
    cut = int(rng.integers(1, n_k))
    full, lse = fastattn.attention(q, k, v, return_lse=True)
    a = fastattn.attention(q, k[:, :cut], v[:, :cut], return_lse=True)
    b = fastattn.attention(q, k[:, cut:], v[:, cut:], return_lse=True)
    merged, merged_lse = fastattn.merge_attention(*a, *b)
    assert_close(merged, full, q.dtype, f"seed {seed} cut {cut}", magnitude=4)
    assert_close(merged_lse, lse, q.dtype, f"seed {seed} cut {cut} lse", magnitude=20)
    r_out, r_lse = reference.merge_attention(*a, *b)
    assert_close(merged, r_out, q.dtype, f"seed {seed} reference merge", magnitude=4)
    assert_close(merged_lse, r_lse, q.dtype, f"seed {seed} reference merge lse", magnitude=20)


def test_merge_with_an_empty_side():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    full = fastattn.attention(q, k, v, return_lse=True)
    empty = fastattn.attention(q, k[:0], v[:0], return_lse=True)
    for merged, lse in (fastattn.merge_attention(*full, *empty), fastattn.merge_attention(*empty, *full)):
        assert_close(merged, full[0], np.float64, "empty side", magnitude=4)
        assert_close(lse, full[1], np.float64, "empty side lse", magnitude=20)
    merged, lse = fastattn.merge_attention(*empty, *empty)
    assert not merged.any() and np.all(lse == -np.inf)


@given(qkv(max_keys=60), st.sampled_from([None, 0.5, 4.0, 30.0]), st.floats(-5, 5))
def test_sinks_in_one_part_merge_to_sinks_over_all_keys(data, softcap, sink):
    """docs/DESIGN.md: a sink is one more key, so merging a part that has it with one that
    does not equals attention over all keys with it; the weights then sum to 1 minus the
    sink's share, exp(sink - lse)."""
    seed, rng, q, k, v = data
    cut = int(rng.integers(1, k.shape[1]))
    sinks = np.array([sink, -np.inf])  # the second batch entry: no sink
    kw = dict(softcap=softcap, return_lse=True)  # (causal aligns to each part's own end)
    full, lse = fastattn.attention(q, k, v, sinks=sinks, **kw)
    a = fastattn.attention(q, k[:, :cut], v[:, :cut], sinks=sinks, **kw)
    b = fastattn.attention(q, k[:, cut:], v[:, cut:], **kw)
    merged, merged_lse = fastattn.merge_attention(*a, *b)
    case = f"seed {seed} cut {cut}"
    assert_close(merged, full, q.dtype, case, magnitude=4)
    assert_close(merged_lse, lse, q.dtype, case + " lse", magnitude=20)
    _, w, lse2 = fastattn.attention(q, k, v, sinks=sinks, return_weights=True, **kw)
    sink_share = np.exp(sinks[:, None] - lse2.astype(np.float64))
    assert_close(w.sum(-1) + sink_share, np.ones_like(sink_share), q.dtype, case + " sums")
    if softcap is not None:
        assert np.all(np.abs(fastattn.scores(q, k, softcap=softcap)) <= softcap)

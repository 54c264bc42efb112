"""attention_varlen: packed sequences of different lengths in one call.

Each sequence against fastattn.attention on it alone (bitwise where that call takes the
fused kernel: two or more queries), against the pure-Python reference on
awkward inputs, across thread counts, and every hostile argument refused by name.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastattn
from fastattn import reference

from conftest import assert_close


def _offsets(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _packed(rng, lq, lk, heads, kv_heads, d, d_v, dtype):
    q = rng.standard_normal((sum(lq), heads, d)).astype(dtype)
    k = rng.standard_normal((sum(lk), kv_heads, d)).astype(dtype)
    v = rng.standard_normal((sum(lk), kv_heads, d_v)).astype(dtype)
    return q, k, v


def _per_sequence(q, k, v, cu_q, cu_k, **kw):
    """fastattn.attention on each sequence alone (return_lse=True: the general path, never
    the compiled small-call path), packed back: (out, lse, whether the fused kernel ran
    it per row)."""
    outs, lses, fused = [], [], []
    for s in range(len(cu_q) - 1):
        a, b, c, d = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        o, lse = fastattn.attention(q[a:b].transpose(1, 0, 2), k[c:d].transpose(1, 0, 2),
                                    v[c:d].transpose(1, 0, 2), return_lse=True, **kw)
        outs.append(o.transpose(1, 0, 2))
        lses.append(lse.T)
        fused += [d > c and b - a >= 2] * (b - a)
    return np.concatenate(outs), np.concatenate(lses), np.array(fused, bool)


LQ = [0, 1, 5, 130, 300, 2, 64, 3]
LK = [3, 7, 5, 200, 300, 0, 64, 40]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 37)])
@pytest.mark.parametrize("heads,kv_heads,d", [(8, 2, 64), (3, 3, 20), (4, 1, 16)])
def test_each_sequence_as_attention_alone(dtype, causal, window, heads, kv_heads, d):
    rng = np.random.default_rng(heads * 100 + d)
    q, k, v = _packed(rng, LQ, LK, heads, kv_heads, d, d, dtype)
    cu_q, cu_k = _offsets(LQ), _offsets(LK)
    sinks = rng.standard_normal(heads)
    kw = dict(causal=causal, window=window, sinks=sinks, softcap=8.0)
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    want_out, want_lse, fused = _per_sequence(q, k, v, cu_q, cu_k, **kw)
    assert out.dtype == dtype and out.shape == want_out.shape
    assert lse.dtype == dtype and lse.shape == (sum(LQ), heads)
    # Bitwise where the call alone takes the fused kernel too...
    np.testing.assert_array_equal(out[fused], want_out[fused])
    np.testing.assert_array_equal(lse[fused], want_lse[fused])
    # ...and within rounding where it takes the decoding kernel (one query).
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(out, want_out, **tol)
    np.testing.assert_allclose(lse, want_lse, **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 2)])
def test_against_the_reference(dtype, causal, window):
    """Empty sequences (no query, no key, neither), a query longer than its keys under
    causal (queries that see nothing), sinks of -inf and finite, GQA, D_v != D."""
    rng = np.random.default_rng(7)
    lq, lk = [0, 1, 3, 2, 4, 0, 6], [2, 3, 5, 0, 4, 0, 2]
    q, k, v = _packed(rng, lq, lk, 4, 2, 3, 5, dtype)
    sinks = np.array([0.3, -np.inf, 1.0, -2.0])
    kw = dict(causal=causal, window=window, softcap=3.0, sinks=sinks)
    out, lse = fastattn.attention_varlen(q, k, v, _offsets(lq), _offsets(lk), return_lse=True, **kw)
    want_out, want_lse = reference.attention_varlen(
        q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
        _offsets(lq).tolist(), _offsets(lk).tolist(), return_lse=True,
        **dict(kw, sinks=sinks.tolist()))
    assert_close(out, want_out, dtype, "out")
    assert_close(lse, want_lse, dtype, "lse")


def test_no_keys_no_queries_and_empty_heads():
    rng = np.random.default_rng(3)
    q, k, v = _packed(rng, [2, 0, 3], [0, 4, 0], 2, 1, 8, 8, np.float32)
    out, lse = fastattn.attention_varlen(q, k, v, [0, 2, 2, 5], [0, 0, 4, 4], return_lse=True)
    assert not out.any() and np.isneginf(lse).all()
    out, lse = fastattn.attention_varlen(q, k, v, [0, 2, 2, 5], [0, 0, 4, 4], return_lse=True,
                                         sinks=[1.5, -np.inf])
    assert not out.any()
    np.testing.assert_array_equal(lse, np.broadcast_to([1.5, -np.inf], (5, 2)))
    # No sequence at all; no query; empty head sizes.
    empty = np.zeros((0, 2, 8), np.float32)
    assert fastattn.attention_varlen(empty, empty[:, :1], empty[:, :1], [0], [0]).shape == (0, 2, 8)
    q0, k0, v0 = _packed(rng, [3], [4], 2, 2, 0, 0, np.float64)
    out, lse = fastattn.attention_varlen(q0, k0, v0, [0, 3], [0, 4], return_lse=True)
    assert out.shape == (3, 2, 0)
    np.testing.assert_allclose(lse, np.log(4.0), rtol=1e-15)  # every score is 0


def test_bitwise_across_threads_and_pieces(monkeypatch):
    rng = np.random.default_rng(5)
    lq = lk = [700, 3, 1, 260, 40]
    q, k, v = _packed(rng, lq, lk, 4, 2, 32, 32, np.float32)
    cu = _offsets(lq)
    one = fastattn.attention_varlen(q, k, v, cu, cu, causal=True, num_threads=1)
    np.testing.assert_array_equal(one, fastattn.attention_varlen(q, k, v, cu, cu, causal=True,
                                                                 num_threads=2))
    np.testing.assert_array_equal(one, fastattn.attention_varlen(q, k, v, cu, cu, causal=True,
                                                                 num_threads=3))
    # In many pieces (as a long call runs, for Ctrl-C), sharing one scratch.
    from fastattn import _run
    monkeypatch.setattr(_run, "PIECE_FLOPS", 1e5)
    np.testing.assert_array_equal(one, fastattn.attention_varlen(q, k, v, cu, cu, causal=True,
                                                                 num_threads=2))


def test_sixteen_bit_inputs():
    """bfloat16 and float16 are read as they are and returned in their dtype; a sequence
    equals attention on it alone."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(11)
    lq, lk = [3, 17, 40, 2], [3, 30, 40, 9]
    cu_q, cu_k = _offsets(lq), _offsets(lk)
    for dtype in (ml_dtypes.bfloat16, np.float16):
        q, k, v = _packed(rng, lq, lk, 4, 2, 32, 32, dtype)
        out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
        want_out, want_lse, fused = _per_sequence(q, k, v, cu_q, cu_k, causal=True)
        assert out.dtype == dtype and lse.dtype == np.float32
        np.testing.assert_array_equal(out.astype(np.float32), want_out.astype(np.float32))
        np.testing.assert_array_equal(lse, want_lse)


def test_layouts_and_mixed_dtypes():
    """Non-contiguous inputs are read as their values; integer inputs compute in float64."""
    rng = np.random.default_rng(13)
    q, k, v = _packed(rng, [4, 6], [5, 6], 2, 2, 8, 8, np.float64)
    want = fastattn.attention_varlen(q, k, v, [0, 4, 10], [0, 5, 11], causal=True)
    got = fastattn.attention_varlen(np.asfortranarray(q), k[:, ::-1][:, ::-1], v.astype(">f8"),
                                    np.array([0, 4, 10], np.uint8), (0, 5, 11), causal=True)
    np.testing.assert_array_equal(got, want)
    ints = fastattn.attention_varlen(np.ones((2, 1, 2), np.int32), np.ones((2, 1, 2), np.int64),
                                     np.arange(4).reshape(2, 1, 2), [0, 1, 2], [0, 1, 2])
    assert ints.dtype == np.float64
    np.testing.assert_array_equal(ints[:, 0], [[0, 1], [2, 3]])


@st.composite
def ragged(draw):
    n = draw(st.integers(0, 5))
    edges = [0, 1, 2, 15, 16, 17, 31, 32, 33, 64, 65]
    lens = st.one_of(st.sampled_from(edges), st.integers(0, 90))
    lq = [draw(lens) for _ in range(n)]
    lk = [draw(lens) for _ in range(n)]
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 3]))
    d = draw(st.sampled_from([4, 16, 24]))
    causal = draw(st.booleans())
    window = draw(st.sampled_from([None, 1, 5, 40])) if causal else None
    return lq, lk, heads, kv_heads, d, causal, window, draw(st.integers(0, 2**32 - 1))


@given(ragged(), st.sampled_from([np.float32, np.float64]))
def test_property_matches_the_loop(case, dtype):
    lq, lk, heads, kv_heads, d, causal, window, seed = case
    rng = np.random.default_rng(seed)
    q, k, v = _packed(rng, lq, lk, heads, kv_heads, d, d, dtype)
    cu_q, cu_k = _offsets(lq), _offsets(lk)
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, window=window,
                                         return_lse=True)
    if not lq:
        assert out.shape == (0, heads, d)
        return
    want_out, want_lse, fused = _per_sequence(q, k, v, cu_q, cu_k, causal=causal, window=window)
    np.testing.assert_array_equal(out[fused], want_out[fused])
    np.testing.assert_array_equal(lse[fused], want_lse[fused])
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(out, want_out, **tol)
    np.testing.assert_allclose(lse, want_lse, **tol)


def _ok():
    q = np.zeros((5, 4, 8), np.float32)
    kv = np.zeros((6, 2, 8), np.float32)
    return q, kv, kv, [0, 2, 5], [0, 3, 6]


@pytest.mark.parametrize("change,error,words", [
    (dict(cu_seqlens_q=[0, 3, 2]), ValueError, "cu_seqlens_q must not decrease"),
    (dict(cu_seqlens_q=[1, 2, 5]), ValueError, "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_q=[0, 2, 4]), ValueError, "cu_seqlens_q must end at the packed length 5"),
    (dict(cu_seqlens_k=[0, 3, 7]), ValueError, "cu_seqlens_k must end at the packed length 6"),
    (dict(cu_seqlens_k=[0, 6]), ValueError, "cu_seqlens_k must have as many offsets"),
    (dict(cu_seqlens_k=[0, 4, 3, 6]), ValueError, "cu_seqlens_k must have as many offsets"),
    (dict(cu_seqlens_q=[0.0, 2.0, 5.0]), TypeError, "cu_seqlens_q must hold integers"),
    (dict(cu_seqlens_q=[[0, 2, 5]]), ValueError, "cu_seqlens_q must be 1-D"),
    (dict(cu_seqlens_q=[]), ValueError, "cu_seqlens_q must be 1-D"),
    (dict(cu_seqlens_k=[True, False, True]), TypeError, "cu_seqlens_k must hold integers"),
    (dict(q=np.zeros((5, 8), np.float32)), ValueError, "q must be packed as (total_q, H, D)"),
    (dict(k=np.zeros((6, 2, 7), np.float32)), ValueError, "q and k must have the same head size"),
    (dict(v=np.zeros((6, 3, 8), np.float32)), ValueError, "k and v must have the same tokens and heads"),
    (dict(k=np.zeros((6, 3, 8), np.float32), v=np.zeros((6, 3, 8), np.float32)), ValueError,
     "key/value heads (3) must divide the query heads (4)"),
    (dict(window=4), ValueError, "window needs causal=True"),
    (dict(causal=1), TypeError, "causal must be True or False"),
    (dict(sinks=[1.0, 2.0, 3.0]), ValueError, "sinks must broadcast"),
    (dict(num_threads=0), ValueError, "num_threads"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(q=np.zeros((5, 4, 8), np.complex64)), TypeError, "complex"),
])
def test_hostile_arguments(change, error, words):
    q, k, v, cu_q, cu_k = _ok()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    args.update(change)
    with pytest.raises(error, match=_escaped(words)):
        fastattn.attention_varlen(**args)


def _escaped(words):
    import re
    return re.escape(words)


@pytest.mark.timing
def test_varlen_benchmark_prints_its_rows(capsys):
    from fastattn import _bench_varlen

    assert _bench_varlen.main(threads=1, quick=True, repeat=1, min_time=0.001, gap=0.0) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| ragged", "| mixed", "| paged"))]
    assert [row.split(" | ")[0] for row in rows] == [
        "| ragged causal prefill", "| mixed decode batch (in order)",
        "| mixed decode batch (interleaved)", "| mixed decode batch (int8, interleaved)",
        "| mixed decode batch (int8, products, interleaved)", "| paged prefill chunk"]
    assert "GFLOP/s" in rows[0] and all("read floor" in row for row in rows[1:5])
    assert "GFLOP/s" in rows[5]
    assert all(row.split(" | ")[5].endswith("x") for row in rows)  # loop / fastattn

"""The decided semantics of docs/DESIGN.md, each pinned by a test."""

import numpy as np
import pytest

import fastattn
from fastattn import reference
from conftest import assert_close, float64_attention

W_Q = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]]
W_K = [[0.3, 0.1, 0.5], [0.6, 0.4, 0.2], [0.9, 0.7, 0.8]]
W_V = [[0.5, 0.6, 0.7], [0.1, 0.2, 0.3], [0.9, 0.8, 0.4]]
X = [0.2, 0.7, 0.4]


def rng_arrays(shapes, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


# --------------------------------------------------------------------------- worked example

def test_worked_example_projection():
    x = np.array(X)
    assert_close(fastattn.project(x, np.array(W_Q)), [0.58, 0.71, 0.84], np.float64, "q")
    assert_close(fastattn.project(x, np.array(W_K)), [0.84, 0.58, 0.56], np.float64, "k")
    assert_close(fastattn.project(x, np.array(W_V)), [0.53, 0.58, 0.51], np.float64, "v")
    assert_close(reference.project(X, W_Q), [0.58, 0.71, 0.84], np.float64, "reference q")


def test_worked_example_self_attention():
    # One token attends only to itself: the output is its value.
    out = fastattn.self_attention(np.array(X), np.array(W_Q), np.array(W_K), np.array(W_V))
    assert out.shape == (3,)
    assert_close(out, [0.53, 0.58, 0.51], np.float64, "self_attention")
    assert_close(reference.self_attention(X, W_Q, W_K, W_V), [0.53, 0.58, 0.51], np.float64, "ref")
    out32 = fastattn.self_attention(np.array(X, np.float32), np.array(W_Q, np.float32),
                                    np.array(W_K, np.float32), np.array(W_V, np.float32))
    assert out32.dtype == np.float32
    assert_close(out32, [0.53, 0.58, 0.51], np.float32, "self_attention float32")


def test_worked_example_sequence_matches_reference():
    x = np.array([X, [0.5, -0.1, 0.3], [0.0, 0.9, -0.4]])
    for causal in (False, True):
        out, w = fastattn.self_attention(x, np.array(W_Q), np.array(W_K), np.array(W_V),
                                         causal=causal, return_weights=True)
        r_out, r_w = reference.self_attention(x.tolist(), W_Q, W_K, W_V, causal=causal,
                                              return_weights=True)
        assert_close(out, r_out, np.float64, f"causal={causal}")
        assert_close(w, r_w, np.float64, f"weights causal={causal}")
        assert_close(out[0] if causal else out[0] * 0, [0.53, 0.58, 0.51] if causal else [0] * 3,
                     np.float64, "first token sees only itself")


# --------------------------------------------------------------------------- masks

def test_bool_mask_true_means_attend():
    q, k, v = rng_arrays([(2, 4), (3, 4), (3, 2)])
    mask = np.array([True, False, True])
    out = fastattn.attention(q, k, v, mask=mask)
    ref = fastattn.attention(q, k[[0, 2]], v[[0, 2]])
    assert_close(out, ref, np.float64, "hidden key 1 equals dropping it")


def test_float_mask_is_added():
    q, k, v, m = rng_arrays([(2, 4), (3, 4), (3, 2), (2, 3)])
    s = q @ k.T / 2.0 + m
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert_close(fastattn.attention(q, k, v, mask=m), p @ v, np.float64, "additive mask")


@pytest.mark.parametrize("n_q,n_k", [(3, 3), (2, 5), (5, 2), (1, 7)])
def test_causal_is_bottom_right_aligned(n_q, n_k):
    s = fastattn.scores(np.ones((n_q, 1)), np.ones((n_k, 1)), causal=True)
    for i in range(n_q):
        for j in range(n_k):
            visible = j <= i + (n_k - n_q)
            assert (s[i, j] == 1.0) if visible else (s[i, j] == -np.inf), (i, j)


def test_causal_with_more_queries_than_keys_gives_zero_rows():
    q, k, v = rng_arrays([(5, 4), (2, 4), (2, 3)])
    out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
    assert np.array_equal(out[:3], np.zeros((3, 3)))
    assert np.all(lse[:3] == -np.inf)
    assert np.all(np.isfinite(out[3:]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fully_masked_rows_are_zero_not_nan(dtype):
    q, k, v = rng_arrays([(2, 3, 4), (2, 5, 4), (2, 5, 3)], dtype)
    mask = np.ones((3, 5), bool)
    mask[1] = False
    fmask = np.where(mask, 0.0, -np.inf)
    for m in (mask, fmask):
        out, w, lse = fastattn.attention(q, k, v, mask=m, return_weights=True, return_lse=True)
        assert np.array_equal(out[:, 1], np.zeros((2, 3), dtype))
        assert np.array_equal(w[:, 1], np.zeros((2, 5), dtype))
        assert np.all(lse[:, 1] == -np.inf)
        assert np.all(np.isfinite(out))
    out = fastattn.attention(q, k[:, :0], v[:, :0])  # no keys at all
    assert out.shape == (2, 3, 3) and not out.any()


def test_softmax_of_all_neginf_row_is_nan_like_scipy():
    y = fastattn.softmax(np.array([[-np.inf, -np.inf], [0.0, -np.inf]]))
    assert np.all(np.isnan(y[0]))
    assert np.array_equal(y[1], [1.0, 0.0])
    scipy_special = pytest.importorskip("scipy.special")
    with np.errstate(invalid="ignore"):
        assert np.all(np.isnan(scipy_special.softmax(np.array([-np.inf, -np.inf]))))


# --------------------------------------------------------------------------- extremes

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_stay_finite(dtype):
    x = np.array([1e4, 0.0, -1e4, 1e4 - 1.0], dtype)
    y = fastattn.softmax(x)
    e = 1 / (1 + np.exp(-1.0))
    assert_close(y, [e, 0, 0, 1 - e], dtype, "softmax of 1e4 logits")
    assert_close(fastattn.log_softmax(x), reference.log_softmax(x.astype(float)), dtype,
                 "log_softmax", magnitude=2e4)
    q = np.array([[100.0, 0.0]], dtype)
    k = np.array([[100.0, 0.0], [99.0, 0.0], [-100.0, 0.0]], dtype)  # scores 1e4, 9900, -1e4
    v = np.array([[1.0], [2.0], [3.0]], dtype)
    out, lse = fastattn.attention(q, k, v, scale=1.0, return_lse=True)
    assert np.all(np.isfinite(out)) and np.isfinite(lse).all()
    assert_close(out, [[1.0]], dtype, "one key dominates")
    assert_close(lse, [1e4], dtype, "lse", magnitude=1e4)
    big = rng_arrays([(3, 8), (6, 8), (6, 2)], np.float64, seed=3)
    out = fastattn.attention(big[0] * 100, big[1] * 100, big[2])
    assert_close(out, reference.attention(big[0] * 100, big[1] * 100, big[2]), np.float64, "1e4")


def test_nan_propagates_to_the_rows_it_touches():
    q, k, v = rng_arrays([(4, 3), (5, 3), (5, 2)])
    q[1, 0] = np.nan
    out = fastattn.attention(q, k, v)
    assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[[0, 2, 3]]))
    k2 = k.copy()
    k2[2, 1] = np.nan
    assert np.all(np.isnan(fastattn.attention(q, k2, v)))  # every query reads key 2
    v2 = v.copy()
    v2[3, 0] = np.nan
    out = fastattn.attention(q, k, v2)
    assert np.all(np.isnan(out[:, 0])) and np.all(np.isfinite(out[[0, 2, 3], 1]))
    # A key hidden by a boolean or causal mask has weight exactly 0, even with a NaN score.
    q3 = np.ones((3, 3))
    k3 = np.ones((3, 3))
    k3[2] = np.nan
    out = fastattn.attention(q3, k3, v[:3], causal=True)
    assert np.all(np.isfinite(out[:2])) and np.all(np.isnan(out[2]))
    out = fastattn.attention(q3, k3, v[:3], mask=np.array([True, True, False]))
    assert np.all(np.isfinite(out))
    y = fastattn.softmax(np.array([[1.0, np.nan], [1.0, 2.0]]))
    assert np.all(np.isnan(y[0])) and np.all(np.isfinite(y[1]))


def test_inf_score_makes_row_nan():
    q, k, v = rng_arrays([(2, 2), (3, 2), (3, 2)])
    m = np.zeros((2, 3))
    m[0, 1] = np.inf
    out = fastattn.attention(q, k, v, mask=m)
    assert np.all(np.isnan(out[0])) and np.all(np.isfinite(out[1]))
    r = np.asarray(reference.attention(q, k, v, mask=m))
    assert np.all(np.isnan(r[0]))


# --------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtypes,result", [
    ((np.float32,) * 3, np.float32),
    ((np.float64,) * 3, np.float64),
    ((np.float16,) * 3, np.float16),
    ((np.int64,) * 3, np.float64),
    ((np.bool_,) * 3, np.float64),
    ((np.float32, np.float64, np.float32), np.float64),
    ((np.float16, np.float32, np.float16), np.float32),
    ((np.float32, np.int32, np.float32), np.float64),
])
def test_dtype_rules(dtypes, result):
    q, k, v = (a.astype(d) for a, d in zip(rng_arrays([(3, 4), (5, 4), (5, 2)]), dtypes))
    out, w, lse = fastattn.attention(q, k, v, return_weights=True, return_lse=True)
    assert out.dtype == result and w.dtype == result
    assert lse.dtype == (np.float32 if result in (np.float16, np.float32) else np.float64)
    assert fastattn.scores(q, k).dtype == result
    assert fastattn.softmax(q).dtype == (np.float64 if q.dtype.kind in "bi" else q.dtype)


def test_float16_computes_in_float32():
    q, k, v = rng_arrays([(3, 4), (70, 4), (70, 2)], np.float16)
    out = fastattn.attention(q, k, v)
    via32 = fastattn.attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    assert out.dtype == np.float16
    assert np.array_equal(out, via32.astype(np.float16))


# --------------------------------------------------------------------------- layouts, out=

def test_out_is_filled_and_returned():
    q, k, v = rng_arrays([(2, 3, 4), (2, 5, 4), (2, 5, 6)])
    expected = fastattn.attention(q, k, v)
    for out in (np.empty((2, 3, 6)), np.empty((2, 3, 12))[..., ::2], np.empty((6, 3, 2)).T):
        if out.shape != (2, 3, 6):
            continue
        got = fastattn.attention(q, k, v, out=out)
        assert got is out and np.array_equal(out, expected)
    out = np.empty((2, 3, 12))[..., ::2]
    assert fastattn.attention(q, k, v, out=out) is out and np.array_equal(out, expected)
    x = rng_arrays([(4, 5)])[0]
    out = np.empty_like(x)
    assert fastattn.softmax(x, axis=0, out=out) is out
    assert np.array_equal(out, fastattn.softmax(x, axis=0))
    w = rng_arrays([(5, 3)])[0]
    out = np.empty((4, 3))
    assert fastattn.project(x, w, out=out) is out
    assert np.array_equal(out, fastattn.project(x, w))
    f16 = np.empty((2, 3, 6), np.float16)
    got = fastattn.attention(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), out=f16)
    assert got is f16


def test_grouped_query_heads_share_kv_without_copy_semantics():
    q, k, v = rng_arrays([(2, 6, 4, 8), (2, 3, 7, 8), (2, 3, 7, 5)])
    out = fastattn.attention(q, k, v)
    expanded = fastattn.attention(q, np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1))
    assert np.array_equal(out, expanded)
    out1 = fastattn.attention(q, k[:, :1], v[:, :1])  # one kv head: plain broadcasting
    assert np.array_equal(out1, fastattn.attention(q, np.repeat(k[:, :1], 6, 1), np.repeat(v[:, :1], 6, 1)))


def test_broadcast_batch_matches_explicit():
    q, k, v = rng_arrays([(3, 1, 4, 8), (5, 9, 8), (1, 9, 2)])
    m = np.random.default_rng(1).random((5, 1, 9)) > 0.3
    out = fastattn.attention(q, k, v, mask=m)
    assert out.shape == (3, 5, 4, 2)
    qe = np.broadcast_to(q, (3, 5, 4, 8))
    ke = np.broadcast_to(k, (3, 5, 9, 8))
    ve = np.broadcast_to(v, (3, 5, 9, 2))
    me = np.broadcast_to(m, (3, 5, 4, 9))
    explicit = fastattn.attention(qe.copy(), ke.copy(), ve.copy(), mask=me.copy())
    assert np.array_equal(out, explicit)


# --------------------------------------------------------------------------- threads

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_for_any_thread_count(causal, dtype):
    q, k, v = rng_arrays([(2, 3, 150, 32), (2, 3, 300, 32), (2, 3, 300, 16)], dtype)
    results = [fastattn.attention(q, k, v, causal=causal, num_threads=n) for n in (1, 2, 3)]
    for r in results[1:]:
        assert np.array_equal(results[0], r)
    x = rng_arrays([(300, 700)], dtype)[0]
    assert np.array_equal(fastattn.softmax(x), fastattn.softmax(x))


def test_long_sequence_against_numpy():
    # Many key and query blocks with the shipped tile sizes, against a float64 NumPy formula.
    q, k, v = rng_arrays([(2, 130, 24), (2, 600, 24), (2, 600, 8)], seed=7)
    for causal in (False, True):
        s = q @ np.swapaxes(k, -1, -2) / np.sqrt(24)
        if causal:
            s = np.where(np.arange(600) <= np.arange(130)[:, None] + 470, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        expected = (p / p.sum(-1, keepdims=True)) @ v
        assert_close(fastattn.attention(q, k, v, causal=causal), expected, np.float64,
                     f"causal={causal}")
        out32 = fastattn.attention(q.astype(np.float32), k.astype(np.float32),
                                   v.astype(np.float32), causal=causal)
        assert_close(out32, expected, np.float32, f"float32 causal={causal}")


# --------------------------------------------------------------------------- sliding window

@pytest.mark.parametrize("n_q,n_k,window", [(9, 9, 3), (4, 11, 5), (11, 4, 2), (300, 300, 70),
                                            (130, 600, 1)])
def test_sliding_window_equals_its_band_mask(block_sizes, n_q, n_k, window):
    rng = np.random.default_rng(n_q * 1000 + n_k)
    q, k, v = rng.standard_normal((2, n_q, 8)), rng.standard_normal((2, n_k, 8)), rng.standard_normal((2, n_k, 3))
    i, j = np.arange(n_q)[:, None] + (n_k - n_q), np.arange(n_k)[None, :]
    band = (j <= i) & (j > i - window)
    out, lse = fastattn.attention(q, k, v, causal=True, window=window, return_lse=True)
    masked, masked_lse = fastattn.attention(q, k, v, mask=band, return_lse=True)
    assert_close(out, masked, np.float64, f"window {window}", magnitude=4)
    assert_close(lse, masked_lse, np.float64, f"window {window} lse", magnitude=20)
    s = fastattn.scores(q, k, causal=True, window=window)
    assert np.array_equal(np.isfinite(s[0]), band)
    if n_q * n_k <= 200:
        r = reference.attention(q, k, v, causal=True, window=window)
        assert_close(out, r, np.float64, f"window {window} reference", magnitude=4)
        assert_close(s, reference.scores(q, k, causal=True, window=window), np.float64, "scores")


def test_window_errors():
    q = np.ones((3, 4))
    with pytest.raises(ValueError, match="window needs causal=True"):
        fastattn.attention(q, q, q, window=2)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        fastattn.attention(q, q, q, causal=True, window=0)
    with pytest.raises(TypeError, match="window must be a positive integer"):
        fastattn.scores(q, q, causal=True, window=1.5)


# --------------------------------------------------------------------------- micro-kernels

@pytest.mark.parametrize("d,d_v", [(16, 16), (32, 48), (64, 64), (64, 80), (128, 128), (48, 16)])
@pytest.mark.parametrize("n_q,n_k", [(1, 1), (7, 33), (37, 70), (300, 601)])
def test_float32_head_sizes_of_the_micro_kernels(block_sizes, d, d_v, n_q, n_k):
    # float32 with head sizes that are multiples of 16 run in the AVX-512 build's
    # micro-kernels: odd row and key counts exercise their edges (8-row, 32-key blocks).
    rng = np.random.default_rng(d * 7 + n_k)
    q = rng.standard_normal((2, n_q, d), dtype=np.float32)
    k = rng.standard_normal((2, n_k, d), dtype=np.float32)
    v = rng.standard_normal((2, n_k, d_v), dtype=np.float32)
    i, j = np.arange(n_q)[:, None] + (n_k - n_q), np.arange(n_k)[None, :]
    keep = rng.random((n_q, n_k)) > 0.2
    for label, kwargs, mask in (("plain", {}, np.ones((n_q, n_k), bool)),
                                ("causal", {"causal": True}, j <= i),
                                ("window", {"causal": True, "window": 5}, (j <= i) & (j > i - 5)),
                                ("bool mask", {"mask": keep}, keep)):
        out = fastattn.attention(q, k, v, **kwargs)
        assert out.dtype == np.float32
        assert_close(out, float64_attention(q, k, v, mask)[0], np.float32, f"{label} d={d} d_v={d_v}",
                     magnitude=4)
    if n_q * n_k <= 300:
        assert_close(fastattn.attention(q, k, v, causal=True),
                     reference.attention(q, k, v, causal=True), np.float32, "reference", magnitude=4)


@pytest.mark.parametrize("causal", [False, True])
def test_one_query_vector_is_a_query_axis_dropped_as_in_matmul(causal):
    # A 1-D q is one query, the last one under causal: it sees every key. Results are those
    # of q[None] with the query axis removed, checked against the reference too.
    rng = np.random.default_rng(7)
    q = rng.standard_normal(6)
    k = rng.standard_normal((2, 3, 5, 6))
    v = rng.standard_normal((2, 3, 5, 4))
    mask = np.array([True, False, True, True, False])  # (L_k,): broadcasts like a row
    out, w, lse = fastattn.attention(q, k, v, mask=mask, causal=causal,
                                     return_weights=True, return_lse=True)
    assert (out.shape, w.shape, lse.shape) == ((2, 3, 4), (2, 3, 5), (2, 3))
    ref_out = reference.attention([list(q)], k[1, 2].tolist(), v[1, 2].tolist(),
                                  mask=[mask.tolist()])
    assert_close(out[1, 2], np.array(ref_out[0]), np.float64, "1-D q")
    full = fastattn.attention(q[None], k, v, mask=mask, causal=causal,
                              return_weights=True, return_lse=True)
    np.testing.assert_array_equal(out, full[0][..., 0, :])
    np.testing.assert_array_equal(w, full[1][..., 0, :])
    np.testing.assert_array_equal(lse, full[2][..., 0])
    s = fastattn.scores(q, k, mask=mask, causal=causal)
    assert s.shape == (2, 3, 5)
    np.testing.assert_array_equal(s, fastattn.scores(q[None], k, mask=mask)[..., 0, :])
    assert np.isneginf(s[..., 1]).all() and np.isfinite(s[..., 0]).all()
    # out= has the 1-D query's shape, and is what is returned.
    buf = np.full((2, 3, 4), np.nan)
    assert fastattn.attention(q, k, v, mask=mask, causal=causal, out=buf) is buf
    np.testing.assert_array_equal(buf, out)
    with pytest.raises(ValueError, match="out"):
        fastattn.attention(q, k, v, out=np.empty((2, 3, 5)))
    with pytest.raises(TypeError, match="out must be an ndarray"):
        fastattn.attention(q, k, v, out=[0.0] * 4)
    # Lists and a single key/value matrix.
    assert fastattn.attention(list(q), k[0, 0], v[0, 0]).shape == (4,)

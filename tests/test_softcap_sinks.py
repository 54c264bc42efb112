"""Soft-capped scores and attention sinks (docs/DESIGN.md): their definitions, their
corner cases, every kernel path that runs them, and how sinks compose with
merge_attention. The hypothesis comparison with the reference is in
test_against_reference.py; the bad-argument errors in test_errors.py."""

import numpy as np
import pytest

import fastattn
from fastattn import _run, reference
from fastattn._dispatch import kernels as _kernels
from conftest import assert_close


def qkv(seed, shape_q, shape_kv, dtype=np.float64, spread=2.0, d_v=None):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal(shape_q) * spread).astype(dtype)
    k = (rng.standard_normal(shape_kv) * spread).astype(dtype)
    v_shape = shape_kv if d_v is None else shape_kv[:-1] + (d_v,)
    v = rng.standard_normal(v_shape).astype(dtype)
    return q, k, v


# --------------------------------------------------------------------------- softcap

@pytest.mark.parametrize("dtype,ulps", [(np.float32, 2), (np.float64, 4)])
def test_kernel_tanh_is_within_a_few_ulp(dtype, ulps):
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-20, 20, 200_001), rng.standard_normal(100_000) * 0.3,
                        np.geomspace(1e-30, 1.0, 10_000), -np.geomspace(1e-30, 1.0, 10_000),
                        [0.0, -0.0, 0.125, 0.25, 0.4, -0.4, 1e4, -1e4]]).astype(dtype)
    got = np.empty_like(x)
    _kernels.tanh(x, got)
    exact = np.tanh(x.astype(np.longdouble))
    err = np.abs(got.astype(np.longdouble) - exact) / np.spacing(np.abs(exact).astype(dtype))
    assert err.max() <= ulps, (x[np.argmax(err)], float(err.max()))
    assert np.array_equal(np.signbit(got), np.signbit(x))  # odd, -0.0 included
    special = np.array([np.inf, -np.inf, np.nan], dtype)
    out = np.empty_like(special)
    _kernels.tanh(special, out)
    assert out[0] == 1 and out[1] == -1 and np.isnan(out[2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cap", [0.3, 5.0, 50.0])
def test_softcap_is_c_tanh_s_over_c_before_the_mask(dtype, cap):
    q, k, _ = qkv(1, (2, 7, 16), (2, 9, 16), dtype, spread=3.0)
    mask = np.random.default_rng(2).standard_normal((7, 9)).astype(dtype)
    plain = fastattn.scores(q, k).astype(np.float64)
    capped = fastattn.scores(q, k, softcap=cap, mask=mask)
    expected = cap * np.tanh(plain / cap) + mask  # the mask is added after the cap
    assert_close(capped, expected, dtype, f"cap {cap}", magnitude=cap)
    assert np.all(np.abs(fastattn.scores(q, k, softcap=cap)) <= cap)


def test_softcap_of_infinite_scores_is_the_cap_and_of_nan_is_nan():
    q = np.array([[1e200, 0.0], [-1e200, 0.0], [np.nan, 0.0]])
    k = np.array([[1e200, 0.0], [1.0, 0.0]])
    s = fastattn.scores(q, k, scale=1.0, softcap=7.0)
    assert s[0, 0] == 7.0 and s[1, 0] == -7.0 and np.isnan(s[2]).all()
    r = reference.scores(q, k, scale=1.0, softcap=7.0)
    assert r[0][0] == 7.0 and r[1][0] == -7.0
    # Capped, a score of +inf is an ordinary one: the row is not NaN.
    out = fastattn.attention(q[:2], k, np.eye(2), scale=1.0, softcap=7.0)
    assert np.isfinite(out).all()


def test_softcap_same_on_every_path():
    """Fused (many blocks, both tile GEMMs), decode kernel, cache path: one definition."""
    q, k, v = qkv(3, (1, 4, 1, 64), (1, 2, 700, 64), np.float32)
    cap = 4.0
    decode = fastattn.attention(q, k, v, softcap=cap)                           # decode kernel
    fused = fastattn.attention(q, k, v, softcap=cap, mask=np.ones(700, bool))   # fused kernel
    ref = reference.attention(q, k, v, softcap=cap)
    assert_close(decode, ref, np.float32, "decode", magnitude=4)
    assert_close(fused, ref, np.float32, "fused", magnitude=4)
    cache = fastattn.KVCache(1, 2, 800, 64, dtype=np.float32)
    cache.append(k, v)
    assert np.array_equal(fastattn.attention(q, cache=cache, softcap=cap), decode)


# --------------------------------------------------------------------------- sinks

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sink_takes_its_share_of_every_row(dtype):
    q, k, v = qkv(4, (2, 3, 5, 8), (2, 3, 6, 8), dtype)
    sinks = np.array([-1.0, 0.5, 4.0])
    out, w, lse = fastattn.attention(q, k, v, sinks=sinks, return_weights=True, return_lse=True)
    # The visible weights sum to 1 - (the sink's weight), exp(sink - lse).
    sink_weight = np.exp(sinks[:, None] - lse.astype(np.float64))
    assert_close(w.sum(-1) + sink_weight, np.ones_like(sink_weight), dtype, "row sums")
    # And the output is the weights against the values (the sink's value is zero).
    assert_close(out, w @ v, dtype, "out = w v", magnitude=4)
    # -inf is no sink at all.
    none = fastattn.attention(q, k, v, return_lse=True)
    minus_inf = fastattn.attention(q, k, v, sinks=-np.inf, return_lse=True)
    assert np.array_equal(none[0], minus_inf[0]) and np.array_equal(none[1], minus_inf[1])


@pytest.mark.parametrize("path", ["fused", "decode", "cache", "no keys"])
def test_fully_masked_query_with_a_sink_gives_zeros_and_the_sink_as_lse(path):
    sinks = np.array([0.25, -3.0, 7.5, -np.inf], np.float32)
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 4, 1 if path != "fused" else 3, 16)).astype(np.float32)
    k = rng.standard_normal((1, 4, 10, 16)).astype(np.float32)
    v = rng.standard_normal((1, 4, 10, 16)).astype(np.float32)
    if path == "fused":
        out, lse = fastattn.attention(q, k, v, mask=np.zeros((3, 10), bool), sinks=sinks,
                                      return_lse=True)
    elif path == "decode":  # every score -inf through an additive mask would take the fused
        out, lse = fastattn.attention(q, k * 0, v, scale=1.0, sinks=sinks, return_lse=True,
                                      mask=np.full(10, -np.inf, np.float32))
    elif path == "cache":
        cache = fastattn.KVCache(1, 4, 16, 16, dtype=np.float32)
        out, lse = fastattn.attention(q, cache=cache, sinks=sinks, return_lse=True)
    else:
        out, lse = fastattn.attention(q, k[:, :, :0], v[:, :, :0], sinks=sinks, return_lse=True)
    assert not out.any()
    assert np.array_equal(lse[0, :, 0], sinks), lse
    r_out, r_lse = reference.attention(q, k[:, :, :0], v[:, :, :0], sinks=sinks, return_lse=True)
    assert np.array_equal(np.asarray(r_lse)[0, :, 0], sinks)


def test_sinks_same_on_every_path_and_thread_count():
    q, k, v = qkv(6, (2, 8, 1, 64), (2, 2, 1500, 64), np.float32)
    sinks = np.linspace(-2, 6, 8).astype(np.float32)
    ref_out, ref_lse = reference.attention(q[:1], k[:1], v[:1], sinks=sinks,
                                           return_lse=True)
    results = {}
    for n in (1, 2):
        results[n] = fastattn.attention(q, k, v, sinks=sinks, softcap=20.0, return_lse=True,
                                        num_threads=n)
    assert all(np.array_equal(a, b) for a, b in zip(results[1], results[2]))
    decode = fastattn.attention(q, k, v, sinks=sinks, return_lse=True)
    fused = fastattn.attention(q, k, v, sinks=sinks, return_lse=True, mask=np.ones(1500, bool))
    assert_close(decode[0][:1], ref_out, np.float32, "decode", magnitude=4)
    assert_close(decode[1][:1], ref_lse, np.float32, "decode lse", magnitude=20)
    assert_close(fused[0], decode[0], np.float32, "fused vs decode", magnitude=4)
    assert_close(fused[1], decode[1], np.float32, "fused vs decode lse", magnitude=20)
    cache = fastattn.KVCache(2, 2, 1600, 64, dtype=np.float32)
    cache.append(k, v)
    cached = fastattn.attention(q, cache=cache, sinks=sinks, return_lse=True)
    assert all(np.array_equal(a, b) for a, b in zip(cached, decode))


def test_sinks_with_many_query_blocks_and_causal():
    q, k, v = qkv(7, (1, 2, 300, 32), (1, 2, 300, 32), np.float64, spread=1.5)
    sinks = np.array([1.0, -0.5])
    out, lse = fastattn.attention(q, k, v, causal=True, window=40, sinks=sinks, softcap=3.0,
                                  return_lse=True)
    sub = (slice(None), slice(None), slice(250, 300))
    r_out, r_lse = reference.attention(q[sub], k[:, :, :300], v[:, :, :300], causal=True,
                                       window=40, sinks=sinks, softcap=3.0, return_lse=True)
    assert_close(out[sub], r_out, np.float64, "causal window sinks", magnitude=4)
    assert_close(lse[sub], r_lse, np.float64, "causal window sinks lse", magnitude=20)


def test_merge_attention_composes_with_sinks():
    """Sinks are one more key: give them to one part only, or merge them in as a part."""
    q, k, v = qkv(8, (3, 6, 16), (3, 40, 16), np.float64)
    sinks = np.array([0.3, 2.0, -np.inf])
    full, full_lse = fastattn.attention(q, k, v, sinks=sinks, return_lse=True)
    a = fastattn.attention(q, k[:, :15], v[:, :15], sinks=sinks, return_lse=True)
    b = fastattn.attention(q, k[:, 15:], v[:, 15:], return_lse=True)
    for merged, lse in (fastattn.merge_attention(*a, *b), fastattn.merge_attention(*b, *a)):
        assert_close(merged, full, np.float64, "sinks in one part", magnitude=4)
        assert_close(lse, full_lse, np.float64, "sinks in one part lse", magnitude=20)
    # As a part of their own: output zeros, lse the sink.
    plain = fastattn.attention(q, k, v, return_lse=True)
    sink_part = (np.zeros_like(plain[0]), np.broadcast_to(sinks[:, None], plain[1].shape))
    merged, lse = fastattn.merge_attention(*plain, *sink_part)
    assert_close(merged, full, np.float64, "sink part", magnitude=4)
    assert_close(lse, full_lse, np.float64, "sink part lse", magnitude=20)
    # Given to both parts they count twice: not the same result.
    twice = fastattn.merge_attention(*a, *fastattn.attention(q, k[:, 15:], v[:, 15:], sinks=sinks,
                                                            return_lse=True))
    assert not np.allclose(twice[1][:2], full_lse[:2])


def test_sinks_follow_grouped_query_heads_and_broadcast():
    q, k, v = qkv(9, (2, 6, 4, 8), (2, 3, 5, 8))
    sinks = np.arange(6, dtype=np.float64) - 2
    out, lse = fastattn.attention(q, k, v, sinks=sinks, return_lse=True)
    r_out, r_lse = reference.attention(q, k, v, sinks=sinks, return_lse=True)
    assert_close(out, r_out, np.float64, "gqa", magnitude=4)
    assert_close(lse, r_lse, np.float64, "gqa lse", magnitude=20)
    # A full (B, H) array of sinks equals the broadcast (H,) one.
    full = fastattn.attention(q, k, v, sinks=np.broadcast_to(sinks, (2, 6)), return_lse=True)
    assert np.array_equal(full[0], out) and np.array_equal(full[1], lse)


def test_float16_inputs_with_sinks_and_softcap():
    q, k, v = (a.astype(np.float16) for a in qkv(10, (2, 5, 8), (2, 7, 8)))
    out, lse = fastattn.attention(q, k, v, sinks=[0.5, 1.0], softcap=2.0, return_lse=True)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    r_out, r_lse = reference.attention(q, k, v, sinks=[0.5, 1.0], softcap=2.0, return_lse=True)
    assert_close(out, r_out, np.float32, "float16", magnitude=4)


def test_self_attention_and_layer_take_softcap_and_sinks():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 6, 8))
    w = [rng.standard_normal(shape) * 0.5 for shape in ((8, 8), (8, 4), (8, 4), (8, 8))]
    out = fastattn.self_attention(x, w[0][:, :4], *w[1:3], causal=True, softcap=1.5, sinks=0.7)
    r = reference.self_attention(x, w[0][:, :4], *w[1:3], causal=True, softcap=1.5, sinks=0.7)
    assert_close(out, r, np.float64, "self_attention", magnitude=4)
    layer = fastattn.MultiHeadAttention(*w, num_heads=2, num_kv_heads=1, softcap=1.5,
                                        sinks=[0.2, -1.0])
    heads_q = (x @ w[0]).reshape(2, 6, 2, 4).swapaxes(1, 2)
    kv = [(x @ wi).reshape(2, 6, 1, 4).swapaxes(1, 2) for wi in w[1:3]]
    expected = fastattn.attention(heads_q, *kv, causal=True, softcap=1.5, sinks=[0.2, -1.0])
    expected = expected.swapaxes(1, 2).reshape(2, 6, 8) @ w[3]
    assert_close(layer(x, causal=True), expected, np.float64, "layer", magnitude=4)
    with pytest.raises(ValueError, match="sinks must have shape"):
        fastattn.MultiHeadAttention(*w, num_heads=2, num_kv_heads=1, sinks=[0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="softcap"):
        fastattn.MultiHeadAttention(*w, num_heads=2, num_kv_heads=1, softcap=-1.0)


def test_small_call_path_is_not_taken_with_softcap_or_sinks():
    q, k, v = qkv(12, (1, 1, 16, 64), (1, 1, 16, 64), np.float32)
    _run.last_call.threads = None
    plain = fastattn.attention(q, k, v)
    assert not np.array_equal(fastattn.attention(q, k, v, softcap=0.5), plain)
    assert not np.array_equal(fastattn.attention(q, k, v, sinks=[3.0]), plain)


def test_sinks_in_awkward_layouts_and_dtypes_equal_plain_ones():
    from hostile import _awkward_layouts
    q, k, v = qkv(13, (2, 4, 3, 8), (2, 4, 5, 8), np.float32)
    plain = np.array([0.5, -1.0, 2.0, -np.inf], np.float32)
    expected = fastattn.attention(q, k, v, sinks=plain, return_lse=True)
    for dtype in (np.float64, np.float32, np.float16):
        for label, sinks in _awkward_layouts(np.dtype(dtype).name, plain.astype(dtype)):
            got = fastattn.attention(q, k, v, sinks=sinks, return_lse=True)
            assert all(np.array_equal(a, b) for a, b in zip(got, expected)), label
    ints = fastattn.attention(q, k, v, sinks=np.array([1, 0, -2, 3]), return_lse=True)
    again = fastattn.attention(q, k, v, sinks=[1.0, 0.0, -2.0, 3.0], return_lse=True)
    assert all(np.array_equal(a, b) for a, b in zip(ints, again))


@pytest.mark.timing
def test_options_benchmark_times_each_variant_against_plain():
    import io

    from fastattn import bench

    out = io.StringIO()
    times = bench.options(threads=1, min_time=0.001, repeat=1, quick=True, out=out)
    variants = ("plain", "softcap 50", "softcap 5", "sinks")
    assert set(times) == {(kernel, v) for kernel in ("fused", "decoding") for v in variants}
    assert all(t > 0 for t in times.values())
    rows = [line for line in out.getvalue().splitlines() if line.startswith("| fused")
            or line.startswith("| decoding")]
    assert len(rows) == 8 and all(row.endswith("% |") or "plain" in row for row in rows)

"""Decoding with products below float32 (precision="bfloat16", fa_decode_dp.h): on
bfloat16 storage bfloat16 products (AVX512-BF16), the step float64 attention on q rounded
to bfloat16 and the values the cache holds (float16 storage: those rounded to bfloat16
too); on int8 storage 16-bit integer products
(AVX512-VNNI), and on float8 e4m3 storage bfloat16 products, the step float64 attention
on q itself and the values held. All within the bound of the bfloat16 engines (test_lowp:
the weights rounded to bfloat16, float32 sums; float8 plus what q's rounding and e4m3's
subnormals add), on head sizes of every pass of the kernel, key counts off its pairs,
passes, blocks and key groups, windows, softcap, sinks, several queries; bitwise the same
for any thread count; and elsewhere (no such CPU, head sizes not whole 32s, the policy's engine
off, other storage) bitwise the exact step."""

import numpy as np
import pytest

import fastattn
from fastattn import KVCache, reference
from fastattn._dispatch import kernels

from conftest import kernel_policy
from test_lowp import BF16, U, assert_within_bound

# Each storage where this CPU and build take its products (bfloat16, float16, float8:
# AVX512-BF16; int8: AVX512-VNNI, with or without it).
STORAGES = [pytest.param(name, marks=pytest.mark.skipif(
    not kernels.decode_products(128, 128, name), reason=f"no {name} products on this CPU"))
    for name in ("bfloat16", "float16", "int8", "float8_e4m3")]
# The storages whose products take q, keys and values as bfloat16 (float16's rounded so
# as they are loaded; bfloat16's already are).
BF16_OPERANDS = ("bfloat16", "float16")


def as_products_see(storage, a):
    """a (q, or held keys or values) as float64, as the products of `storage` take it."""
    return bf16_rounded(a) if storage in BF16_OPERANDS else np.asarray(a, np.float64)


def products_bound(storage, q, keys, values, weights, scale):
    """(weighted, score_err) for assert_within_bound and the lse: sum_j p_j |v_j| per
    output (B, H, L_q, D_v), with what each storage's products add, and how far each row's
    scores may be off (B, H, L_q). q as the products see it (bfloat16: rounded) and the
    held keys and values, float64, kv heads repeated; weights the reference's."""
    weighted = weights @ np.abs(values)
    score_err = np.zeros(weighted.shape[:3])
    if storage == "int8":
        # q times a key group's scales held to 16 bits: each number off by at most the
        # row's largest / 65534 (<= |q|max |k|max / 65534 per held number), times codes
        # of at most 127 (in the scale's units) over d of them.
        score_err[:] = scale * np.abs(q).max() * np.abs(keys).max() * q.shape[-1] / 65534
    elif storage == "float8_e4m3":
        # q times the key scales rounded to bfloat16 (2^-9 of each product), and the
        # numbers e4m3 holds as subnormals taken as zero by the products: below 2^-6 of
        # the format's 448 times their scale, so below max|k_c| 2^-6 / 448 over the
        # channel (its group's largest is at most that), below max_c |v_c| 2^-6 / 448 in
        # their value row.
        tiny_k = np.abs(keys) < np.abs(keys).max(axis=2, keepdims=True) * 2.0 ** -6 / 448
        tiny_v = (np.abs(values)
                  < np.abs(values).max(axis=-1, keepdims=True) * 2.0 ** -6 / 448)
        scores = scale * (2.0 ** -9 * np.abs(q) @ np.swapaxes(np.abs(keys), -1, -2)
                          + np.abs(q) @ np.swapaxes(np.abs(keys) * tiny_k, -1, -2))
        score_err = scores.max(-1)
        # A weight's relative error from its scores', e^(2 err) - 1, in the bound's units.
        weighted = (weighted * (1 + (np.exp(2 * score_err[..., None]) - 1) / U)
                    + weights @ (np.abs(values) * tiny_v) / U)
    return weighted, score_err


def bf16_rounded(a):
    """a rounded to bfloat16 (nearest even), as float64."""
    return np.asarray(a, np.float32).astype(BF16).astype(np.float64)


def filled(batch, kv_heads, d, d_v, appends, seed, window=None, storage="bfloat16"):
    rng = np.random.default_rng(seed)
    cache = KVCache(batch, kv_heads, 1024, d, value_dim=d_v, storage=storage, window=window)
    for n in appends:
        k = rng.standard_normal((batch, kv_heads, n, d)).astype(np.float32)
        k[..., 1] *= 8  # an outlier channel
        cache.append(k, rng.standard_normal((batch, kv_heads, n, d_v)).astype(np.float32))
    return cache, rng


# (batch, heads, kv_heads, d, d_v, appends, window): every row block (4, 2, 1 rows per kv
# head), every column pass (128, 64, 32), key counts of 1, odd, across a block of 256 and
# a decoding chunk and key groups of 32 (int8), a window's ring starting mid-way.
CASES = [
    (1, 4, 1, 128, 128, (1,), None),
    (1, 8, 2, 64, 96, (2, 1), None),
    (2, 3, 1, 32, 32, (31, 2), None),
    (1, 7, 7, 96, 160, (300,), None),
    (1, 12, 2, 128, 64, (255, 2, 300), None),
    (1, 5, 1, 64, 128, (600, 377), None),
    (1, 4, 2, 128, 128, (200, 150, 90), 333),
]


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-{sum(c[5])}")
@pytest.mark.parametrize("kwargs", [{}, {"softcap": 4.0, "return_lse": True},
                                    {"sinks": True, "scale": 0.2}])
def test_the_step_is_float64_attention_within_the_bound(storage, case, kwargs):
    batch, heads, kv_heads, d, d_v, appends, window = case
    cache, rng = filled(batch, kv_heads, d, d_v, appends, sum(appends) + d, window, storage)
    q = rng.standard_normal((batch, heads, 1, d)).astype(np.float32)
    kwargs = dict(kwargs)
    if kwargs.pop("sinks", False):
        kwargs["sinks"] = rng.standard_normal((batch, heads)).astype(np.float32)
    assert kernels.decode_products(d, d_v, storage)
    got = fastattn.attention(q, cache=cache, precision="bfloat16", **kwargs)
    out = got[0] if isinstance(got, tuple) else got
    group = heads // kv_heads
    keys, values = (np.repeat(as_products_see(storage, a), group, axis=1)
                    for a in (cache.keys, cache.values))
    q_seen = as_products_see(storage, q)
    want, weights, *lse = reference.attention(
        q_seen.tolist(), keys.tolist(), values.tolist(), return_weights=True,
        **{n: (a.tolist() if isinstance(a, np.ndarray) else a) for n, a in kwargs.items()})
    weighted, score_err = products_bound(storage, q_seen, keys, values, np.array(weights),
                                         kwargs.get("scale", d ** -0.5))
    assert_within_bound(out, np.array(want), values, f"{case} {kwargs}", rounded_out=False,
                        weighted=weighted)
    if lse:  # the lse is the float32 scores', q rounded (bfloat16) or held to 16 bits
        assert (np.abs(got[1] - np.array(lse[0]))
                <= 1e-5 + 1e-5 * np.abs(got[1]) + score_err).all()
    for threads in (1, 2, 3):
        again = fastattn.attention(q, cache=cache, precision="bfloat16", num_threads=threads,
                                   **kwargs)
        for a, b in zip(got if isinstance(got, tuple) else (got,),
                        again if isinstance(again, tuple) else (again,)):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("storage", STORAGES)
def test_products_differ_from_the_exact_step_and_stay_within_the_storage_bound(storage):
    """The products path really runs (its results are not the exact kernel's), and on
    outlier-channel keys stays within the storage's documented error bound (float16's
    products: bfloat16's, the bound of the operands they take)."""
    from test_cache_storage import BOUNDS, float64_attention, outlier_keys

    q, k, v = outlier_keys(1)
    cache = KVCache(1, 2, 512, 128, storage=storage)
    cache.append(k, v)
    q32 = q.astype(np.float32)
    exact_step = fastattn.attention(q32, cache=cache)
    products = fastattn.attention(q32, cache=cache, precision="bfloat16")
    assert not np.array_equal(exact_step, products)
    exact = float64_attention(q, k, v)
    for got, bound in ((exact_step, BOUNDS[storage]),
                       (products, BOUNDS["bfloat16" if storage == "float16" else storage])):
        rel = np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact ** 2))
        assert rel <= bound, rel


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("n_queries, causal", [(3, True), (6, False)])
def test_several_queries_take_the_products_in_place(monkeypatch, storage, n_queries, causal):
    cache, rng = filled(1, 2, 64, 64, (100, 60), 5, storage=storage)
    keys, values = cache.keys, cache.values
    monkeypatch.setattr(KVCache, "keys", property(lambda self: pytest.fail("copied")))
    q = rng.standard_normal((1, 4, n_queries, 64)).astype(np.float32)
    got = fastattn.attention(q, cache=cache, causal=causal, precision="bfloat16")
    k, v = (np.repeat(as_products_see(storage, a), 2, axis=1) for a in (keys, values))
    n_keys = k.shape[2]
    q_seen = as_products_see(storage, q)
    want, weights = reference.attention(q_seen.tolist(), k.tolist(), v.tolist(),
                                        causal=causal, return_weights=True)
    # Causal: the keys every query sees take the products; the last n_queries - 1 run
    # through the fused kernel (float32 inputs, precision="bfloat16": its engine, q
    # rounded to bfloat16 there; so for int8 the bound on max|v|).
    weighted = products_bound(storage, q_seen, k, v, np.array(weights), 64 ** -0.5)[0]
    if causal and storage == "int8":
        weighted = None
    assert_within_bound(got, np.array(want), v, f"{n_queries} {causal} of {n_keys}",
                        rounded_out=False, weighted=weighted)


@pytest.mark.parametrize("storage", STORAGES)
def test_inf_nan_and_tiny_queries_as_the_exact_step(storage):
    """A query row holding NaN or inf gives NaN where the exact step does (the int8
    products cannot hold them in integers: the row's scores are made NaN); a row of
    zeros weighs every key alike; magnitudes near float32's smallest (q 1e-36, which the
    int8 and float8 products scale up by a power of two before rounding) keep their
    precision."""
    cache, rng = filled(1, 2, 64, 64, (70,), 9, storage=storage)
    q = rng.standard_normal((1, 4, 1, 64)).astype(np.float32)
    q[0, 0, 0, 5] = np.nan
    q[0, 1, 0, 7] = np.inf
    q[0, 2] = 0
    q[0, 3] *= np.float32(1e-36)
    exact_step = fastattn.attention(q, cache=cache)
    products = fastattn.attention(q, cache=cache, precision="bfloat16")
    assert np.array_equal(np.isnan(products), np.isnan(exact_step))
    assert np.isnan(products[0, :2]).all()
    # (float8: each value row's weights times its own scale, rounded to bfloat16; float16:
    # the values rounded to bfloat16.)
    atol = U * np.abs(cache.values).max() if storage in ("float8_e4m3", "float16") else 1e-4
    np.testing.assert_allclose(products[0, 2:], exact_step[0, 2:], rtol=0, atol=atol)


@pytest.mark.parametrize("storage", ["bfloat16", "float16", "int8", "float8_e4m3"])
@pytest.mark.parametrize("d, d_v", [(128, 128), (80, 128), (128, 48)])
def test_elsewhere_precision_bfloat16_is_the_exact_step_bitwise(storage, d, d_v):
    """Head sizes not whole 32s, no AVX512-BF16 (for int8: no AVX512-VNNI, or d > 512),
    or the policy's engine off (not for int8, whose integer products hold no bfloat16):
    the exact widening kernel, bitwise."""
    cache, rng = filled(1, 2, d, d_v, (70, 3), d, storage=storage)
    q = rng.standard_normal((1, 4, 1, d)).astype(np.float32)
    exact_step = fastattn.attention(q, cache=cache)
    if not kernels.decode_products(d, d_v, storage):
        assert np.array_equal(fastattn.attention(q, cache=cache, precision="bfloat16"),
                              exact_step)
    if storage != "int8":
        with kernel_policy(engine=kernels.ENGINES.index("none")):
            assert not kernels.decode_products(d, d_v, storage)
            assert np.array_equal(fastattn.attention(q, cache=cache, precision="bfloat16"),
                                  exact_step)
    # int8 products' integer sums are exact up to d = 512.
    assert not kernels.decode_products(544, 128, "int8")


@pytest.mark.skipif(not kernels.decode_products(128, 128, "int8"),
                    reason="no int8 products on this CPU")
def test_int8_products_need_vnni_alone():
    """The int8 products (vpdpwssd) hold no bfloat16, so they run with the bfloat16
    engine off, as on a CPU with AVX512-VNNI and no AVX512-BF16 (Intel Cascade Lake, Ice
    Lake): the same bits as with it on, and not the exact step; a window, several
    queries, a paged pool's decoding step and prefill chunk in one call."""
    cache, rng = filled(1, 2, 128, 64, (250, 91), 5, window=290, storage="int8")
    pool = fastattn.PagedKVCache(12, 32, 2, 128, storage="int8")
    ids = [pool.new_sequence() for _ in range(2)]
    for sid, n in zip(ids, (37, 130)):
        pool.append(sid, *rng.standard_normal((2, n, 2, 128)).astype(np.float32))
    pool_q = rng.standard_normal((5, 8, 128)).astype(np.float32)
    cu = np.array([0, 1, 5])  # a decoding step and a prefill chunk of 4
    calls = [lambda q=q, **kw: fastattn.attention(q, cache=cache, softcap=6.0,
                                                   return_lse=True, **kw)
             for q in (rng.standard_normal((1, 8, n, 128)).astype(np.float32) for n in (1, 3))]
    calls.append(lambda **kw: pool.attention(pool_q, ids, cu, return_lse=True, **kw))
    on = [call(precision="bfloat16") for call in calls]
    with kernel_policy(engine=kernels.ENGINES.index("none")):
        assert kernels.decode_products(128, 64, "int8")
        assert kernels.decode_products(128, 128, "int8")
        for call, want in zip(calls, on):
            got = call(precision="bfloat16")
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
            assert not np.array_equal(got[0], call()[0])


def test_a_float_cache_ignores_precision_and_a_bad_precision_is_refused():
    """A cache held in its own dtype (storage None) takes the exact step whatever
    precision says; a precision that is not one is refused naming the argument."""
    rng = np.random.default_rng(12)
    cache = KVCache(1, 2, 160, 64)
    cache.append(*rng.standard_normal((2, 1, 2, 150, 64)))
    q = rng.standard_normal((1, 4, 1, 64)).astype(np.float32)
    assert not kernels.decode_products(64, 64, "float32")
    assert np.array_equal(fastattn.attention(q, cache=cache, precision="bfloat16"),
                          fastattn.attention(q, cache=cache))
    for storage in ("bfloat16", "float16", None):
        cache = KVCache(1, 1, 16, 32, storage=storage)
        cache.append(np.ones((1, 1, 5, 32)), np.ones((1, 1, 5, 32)))
        with pytest.raises(ValueError, match="precision"):
            fastattn.attention(q, cache=cache, precision="fast")


def _paged_and_flat(storage, block, lengths, d, seed, kv_heads=2):
    """A PagedKVCache of `storage` whose sequences (one per length) grew in turn, 40
    tokens at a time (blocks interleaved), and a KVCache per sequence given the same
    appends."""
    rng = np.random.default_rng(seed)
    pool = fastattn.PagedKVCache(sum(-(-n // block) for n in lengths) + 3, block, kv_heads,
                                 d, storage=storage)
    ids = [pool.new_sequence() for _ in lengths]
    flats = [KVCache(1, kv_heads, n, d, storage=storage) for n in lengths]
    tokens = []
    for n in lengths:
        k, v = rng.standard_normal((2, n, kv_heads, d)).astype(np.float32)
        k[..., 1] *= 8  # an outlier channel
        tokens.append((k, v))
    for at in range(0, max(lengths), 40):
        for sid, flat, (k, v) in zip(ids, flats, tokens):
            if at < len(k):
                pool.append(sid, k[at:at + 40], v[at:at + 40])
                flat.append(k[at:at + 40].transpose(1, 0, 2)[None],
                            v[at:at + 40].transpose(1, 0, 2)[None])
    return pool, ids, flats, rng


@pytest.mark.parametrize("storage,block", [("bfloat16", 7), ("bfloat16", 16), ("bfloat16", 256),
                                           ("float16", 7), ("int8", 32), ("int8", 96),
                                           ("float8_e4m3", 32), ("float8_e4m3", 64)])
def test_a_paged_pool_takes_the_products_of_a_kvcache_bitwise(storage, block):
    """PagedKVCache.attention(precision="bfloat16"): the decoding kernel's products read
    through the page map (blocks interleaved; with blocks of 7, pairs of keys straddle
    two blocks) give what a KVCache step holding the same tokens gives, bit for bit, on
    any thread count; and they really run (not the exact step)."""
    if not kernels.decode_products(64, 64, storage):
        pytest.skip(f"no {storage} products on this CPU")
    lengths = [1, 333, 40, 700, 3]
    pool, ids, flats, rng = _paged_and_flat(storage, block, lengths, 64, block)
    q = rng.standard_normal((len(ids), 8, 64)).astype(np.float32)
    sinks = rng.standard_normal(8).astype(np.float32)
    kw = dict(softcap=5.0, sinks=sinks, return_lse=True)
    cu = np.arange(len(ids) + 1)
    out, lse = pool.attention(q, ids, cu, precision="bfloat16", **kw)
    for i, flat in enumerate(flats):
        want, want_lse = fastattn.attention(q[i][None, :, None, :], cache=flat,
                                            precision="bfloat16", **kw)
        np.testing.assert_array_equal(out[i], want[0, :, 0])
        np.testing.assert_array_equal(lse[i], want_lse[0, :, 0])
    assert not np.array_equal(out, pool.attention(q, ids, cu, **kw)[0])
    for threads in (1, 3):
        again = pool.attention(q, ids, cu, precision="bfloat16", num_threads=threads, **kw)
        np.testing.assert_array_equal(out, again[0])
    old = fastattn.set_float32_precision("bfloat16")
    try:  # the module default
        np.testing.assert_array_equal(out, pool.attention(q, ids, cu, **kw)[0])
    finally:
        fastattn.set_float32_precision(old)


@pytest.mark.parametrize("storage", STORAGES)
def test_a_paged_window_and_prefill_chunk_take_products_within_the_bound(storage):
    """Queries whose visible keys start inside a key group and a block (a window; a
    prefill chunk, causal, each query its own keys): float64 attention on what the pool
    holds, within the products' bound."""
    block = 7 if storage in BF16_OPERANDS else 32
    pool, ids, _, rng = _paged_and_flat(storage, block, [500], 64, 11)
    keys, values = pool.keys(ids[0]), pool.values(ids[0])
    q = rng.standard_normal((3, 4, 64)).astype(np.float32)
    for kw in (dict(window=77), dict()):
        out = pool.attention(q, ids, [0, 3], precision="bfloat16", **kw)
        k, v = (np.repeat(as_products_see(storage, a.transpose(1, 0, 2)[None]), 2, axis=1)
                for a in (keys, values))
        q_seen = as_products_see(storage, q.transpose(1, 0, 2)[None])
        want, weights = reference.attention(q_seen.tolist(), k.tolist(), v.tolist(),
                                            causal=True, return_weights=True, **kw)
        weighted = products_bound(storage, q_seen, k, v, np.array(weights), 64 ** -0.5)[0]
        assert_within_bound(out.transpose(1, 0, 2)[None], np.array(want), v, f"{kw}",
                            rounded_out=False, weighted=weighted)

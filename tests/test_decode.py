"""Incremental decoding: KVCache, the single-query kernel, and MultiHeadAttention with a cache."""

import numpy as np
import pytest

import fastattn
from fastattn import _dispatch, _run, reference
from fastattn import cache as cache_module
from conftest import assert_close, float64_attention

OPENMP = _dispatch.kernels.build_info()["openmp"]


def make_layer(embed, heads, kv_heads, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    ws = [(rng.standard_normal(s) / np.sqrt(embed)).astype(dtype) for s in
          ((embed, heads * head_dim), (embed, kv_heads * head_dim), (embed, kv_heads * head_dim),
           (heads * head_dim, embed))]
    bs = [rng.standard_normal(w.shape[1]).astype(dtype) for w in ws]
    return fastattn.MultiHeadAttention(*ws, num_heads=heads, num_kv_heads=kv_heads,
                                       b_q=bs[0], b_k=bs[1], b_v=bs[2], b_o=bs[3])


def band_mask(n, window):
    """Causal sliding window: token i sees tokens i - window < j <= i."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    return (j <= i) & (j > i - window)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 5])
def test_step_by_step_decoding_equals_full_causal_attention(dtype, heads, kv_heads, window):
    layer = make_layer(16, heads, kv_heads, 4, dtype)
    x = np.random.default_rng(1).standard_normal((2, 23, 16)).astype(dtype)
    if window is None:
        full = layer(x, causal=True)
    else:
        full = layer(x, mask=band_mask(23, window), causal=False)
    cache = fastattn.KVCache(2, kv_heads, 8 if window else 23, 4, dtype=dtype, window=window)
    prefill = 4
    steps = [layer(x[:, :prefill], cache=cache)]  # a prompt, then one token at a time
    for t in range(prefill, 23):
        steps.append(layer(x[:, t:t + 1], cache=cache))
    decoded = np.concatenate(steps, axis=1)
    assert decoded.dtype == dtype and len(cache) == (23 if window is None else window)
    assert_close(decoded, full, dtype, f"window={window}", magnitude=10)


def test_unbatched_query_with_a_batch_of_one_cache():
    layer = make_layer(8, 2, 2, 4, np.float64)
    x = np.random.default_rng(2).standard_normal((6, 8))
    cache = fastattn.KVCache(1, 2, 6, 4, dtype=np.float64)
    steps = [layer(x[t:t + 1], cache=cache) for t in range(6)]
    assert_close(np.concatenate(steps), layer(x, causal=True), np.float64, "unbatched", magnitude=10)


def test_single_query_kernel_matches_reference_and_general_kernel():
    rng = np.random.default_rng(3)
    for shapes in [((2, 8, 1, 5), (2, 2, 37, 5), (2, 2, 37, 3)),      # GQA
                   ((3, 1, 4), (1, 1300, 4), (1, 1300, 2)),           # broadcast kv, 3 chunks
                   ((2, 1, 6), (2, 9, 6), (2, 9, 6))]:
        q, k, v = (rng.standard_normal(s) for s in shapes)
        out, lse = fastattn.attention(q, k, v, return_lse=True)
        r_out, r_lse = reference.attention(q, k, v, return_lse=True)
        assert_close(out, r_out, np.float64, str(shapes), magnitude=4)
        assert_close(lse, r_lse, np.float64, str(shapes), magnitude=20)
        general = fastattn.attention(q, k, v, mask=np.ones(k.shape[-2], bool))  # general kernel
        assert_close(out, general, np.float64, f"{shapes} vs general", magnitude=4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d,d_v", [(16, 16), (64, 176), (128, 128), (48, 80), (256, 32), (8, 2),
                                   (5, 16), (16, 7)])
@pytest.mark.parametrize("n_k", [1, 15, 17, 97, 1100])
def test_single_query_kernel_head_sizes_of_every_vector_width(dtype, d, d_v, n_k):
    # Head sizes that the widest vectors of the build divide (16 floats for AVX-512, 2
    # doubles for SSE2) take the vectorised path: N keys per score group, then 8, 2 and 1
    # vectors of output columns. Key counts that are not multiples of N or of the 64-key
    # block, and several 512-key chunks, reach every edge; 3 query heads share a kv head.
    rng = np.random.default_rng(d * 1000 + d_v + n_k)
    q = rng.standard_normal((2, 3, 1, d)).astype(dtype)
    k = rng.standard_normal((2, 1, n_k, d)).astype(dtype)
    v = rng.standard_normal((2, 1, n_k, d_v)).astype(dtype)
    k[1, 0, n_k // 2] *= 30  # one dominant key
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    expected = float64_attention(q, k, v)
    assert_close(out, expected[0], dtype, f"d={d} d_v={d_v} n_k={n_k}", magnitude=4)
    assert_close(lse, expected[1], dtype, f"lse d={d} d_v={d_v} n_k={n_k}", magnitude=40)
    if n_k <= 17:
        r_out, r_lse = reference.attention(q, k, v, return_lse=True)
        assert_close(out, r_out, dtype, "reference", magnitude=4)
        assert_close(lse, r_lse, dtype, "reference lse", magnitude=40)


def test_single_query_kernel_special_values():
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((2, 1, 4)), rng.standard_normal((2, 1100, 4)), rng.standard_normal((2, 1100, 3))
    q[1, 0, 0] = np.nan
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1])) and np.isnan(lse[1, 0])
    k2 = np.full_like(k, -np.inf)  # every score -inf (q > 0 in every component)
    out, lse = fastattn.attention(np.ones((1, 1, 4)), k2[:1], v[:1], return_lse=True)
    assert not out.any() and lse[0, 0] == -np.inf
    big = fastattn.attention(q[:1] * 100, k[:1] * 100, v[:1])
    assert_close(big, reference.attention(q[:1] * 100, k[:1] * 100, v[:1]), np.float64, "1e4 logits",
                 magnitude=4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decoding_is_bitwise_identical_for_any_thread_count(dtype):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 32, 1, 64)).astype(dtype)
    cache = fastattn.KVCache(1, 8, 3000, 64, dtype=dtype)
    cache.append(rng.standard_normal((1, 8, 2500, 64)), rng.standard_normal((1, 8, 2500, 64)))
    results = []
    for n in (1, 2, 3):
        results.append(fastattn.attention(q, cache=cache, num_threads=n))
        assert _run.last_call.threads == (n if OPENMP else 1)
    for r in results[1:]:
        assert np.array_equal(r, results[0])


def test_cache_views_are_in_place_and_chronological():
    cache = fastattn.KVCache(1, 1, 8, 2, window=3)
    for t in range(7):
        cache.append(np.full((1, 1, 1, 2), t), np.full((1, 1, 1, 2), -t))
        held = cache.keys[0, 0, :, 0]
        assert list(held) == list(range(max(0, t - 2), t + 1)), (t, held)
        assert np.shares_memory(cache.keys, cache._k)  # a view, never a copy
    assert len(cache) == 3 and cache.seen == 7
    cache.reset()
    assert len(cache) == 0 and cache.keys.shape == (1, 1, 0, 2)


def test_cache_storage_starts_on_a_cache_line_also_after_growing():
    cache = fastattn.KVCache(1, 2, 3, 16, dtype=np.float32, on_full="grow")
    for _ in range(2):
        assert cache.keys.ctypes.data % 64 == 0 and cache.values.ctypes.data % 64 == 0
        cache.append(np.ones((1, 2, 4, 16)), np.ones((1, 2, 4, 16)))
    assert cache.capacity >= 4 and np.all(cache.keys == 1)


def test_cache_overflow_raises_and_leaves_the_cache_unchanged():
    cache = fastattn.KVCache(1, 2, 4, 3)
    cache.append(np.ones((1, 2, 3, 3)), np.ones((1, 2, 3, 3)))
    keys = cache.keys.copy()
    with pytest.raises(ValueError, match="KVCache is full: capacity 4, holding 3, appending 2"):
        cache.append(np.zeros((1, 2, 2, 3)), np.zeros((1, 2, 2, 3)))
    assert len(cache) == 3 and np.array_equal(cache.keys, keys)


def test_cache_grows_when_asked():
    cache = fastattn.KVCache(1, 1, 2, 2, on_full="grow")
    for t in range(9):
        cache.append(np.full((1, 1, 1, 2), t), np.full((1, 1, 1, 2), t))
    assert len(cache) == 9 and cache.capacity >= 9
    assert list(cache.keys[0, 0, :, 0]) == list(range(9))


@pytest.mark.parametrize("arg,value,exc,words", [
    ("k", np.ones((1, 2, 1, 4)), ValueError, ["k.shape=(1, 2, 1, 4)", "head_dim"]),
    ("v", np.ones((1, 3, 1, 3)), ValueError, ["v.shape=(1, 3, 1, 3)"]),
    ("k", np.ones((2, 1, 3)), ValueError, ["k.shape=(2, 1, 3)"]),
    ("v", np.ones((1, 2, 2, 3)), ValueError, ["same number of tokens"]),
    ("k", np.ones((1, 2, 1, 3), complex), TypeError, ["k", "complex128"]),
    ("v", np.full((1, 2, 1, 3), "a"), TypeError, ["v", "<U1"]),
    ("k", [[1.0]], ValueError, ["k.shape"]),
])
def test_bad_appends_raise_naming_the_argument_and_write_nothing(arg, value, exc, words):
    cache = fastattn.KVCache(1, 2, 8, 3)
    cache.append(np.ones((1, 2, 2, 3)), np.ones((1, 2, 2, 3)))
    before = (cache._k.copy(), cache._v.copy())
    good = {"k": np.zeros((1, 2, 1, 3)), "v": np.zeros((1, 2, 1, 3))}
    good[arg] = value
    with pytest.raises(exc) as info:
        cache.append(**good)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert len(cache) == 2 and np.array_equal(cache._k, before[0]) and np.array_equal(cache._v, before[1])


@pytest.mark.parametrize("storage", [None, "int8"])
def test_an_append_interrupted_midway_is_rolled_back(storage):
    class Interrupting(fastattn.KVCache):
        armed = False

        def _write(self, writes):
            if not self.armed:
                return super()._write(writes)
            original = self._v

            class InterruptOnWrite:  # the keys are written, then the values' write is interrupted
                fired = False

                def __setitem__(self, key, value):
                    if not self.fired:
                        self.fired = True
                        raise KeyboardInterrupt
                    original[key] = value

                def __getitem__(self, key):
                    return original[key]

            self._v = InterruptOnWrite()
            try:
                return super()._write(writes)
            finally:
                self._v = original

    for window in (None, 3):
        cache = Interrupting(1, 1, 6, 2, window=window, storage=storage)
        for t in range(4 if window else 2):
            cache.append(np.full((1, 1, 1, 2), t), np.full((1, 1, 1, 2), t))
        keys, values, seen = cache.keys.copy(), cache.values.copy(), cache.seen
        state = [getattr(cache, n).copy() for n in ("_k", "_v", "_ks", "_vs", "_open")
                 if hasattr(cache, n)]
        cache.armed = True
        with pytest.raises(KeyboardInterrupt):
            cache.append(np.full((1, 1, 2, 2), 99), np.full((1, 1, 2, 2), 99))
        cache.armed = False
        assert cache.seen == seen, window
        assert np.array_equal(cache.keys, keys) and np.array_equal(cache.values, values), window
        assert all(np.array_equal(getattr(cache, n), a) for n, a in
                   zip(("_k", "_v", "_ks", "_vs", "_open"), state)), window
        cache.append(np.full((1, 1, 1, 2), 7), np.full((1, 1, 1, 2), 7))  # still usable
        assert cache.keys[0, 0, -1, 0] == 7


def test_constructor_and_cache_argument_errors():
    with pytest.raises(ValueError, match="capacity"):
        fastattn.KVCache(1, 1, 0, 4)
    with pytest.raises(TypeError, match="dtype"):
        fastattn.KVCache(1, 1, 4, 4, dtype=np.int32)
    with pytest.raises(ValueError, match="window"):
        fastattn.KVCache(1, 1, 4, 4, window=5)
    with pytest.raises(ValueError, match="on_full"):
        fastattn.KVCache(1, 1, 4, 4, on_full="wrap")
    cache = fastattn.KVCache(1, 1, 4, 2, window=2)
    with pytest.raises(ValueError, match="at most window=2"):
        cache.append(np.ones((1, 1, 3, 2)), np.ones((1, 1, 3, 2)))
    with pytest.raises(TypeError, match="cache must be a fastattn.KVCache"):
        fastattn.attention(np.ones((1, 2)), cache=object())
    with pytest.raises(ValueError, match="both k and v"):
        fastattn.attention(np.ones((1, 1, 1, 2)), np.ones((1, 1, 1, 2)), cache=cache)
    with pytest.raises(TypeError, match="needs k and v"):
        fastattn.attention(np.ones((1, 2)))


@pytest.mark.timing
def test_decode_benchmark_row_times_the_public_call_and_the_kernel_alone():
    from fastattn import bench

    case = bench.Case("decode tiny", "decode", (1, 2, 8, 16), repeat=1)
    times, extra = bench._decode_row(case, ("numpy",), 1, 0.001, 0.0)
    assert set(times) == {"fastattn", "numpy"} and extra["unit"] == "GB/s"
    assert extra["kernel"] > 0 and extra["rate"] > 0
    assert 0 < extra["floor"] <= extra["floor_median"]  # the fastest sample, and the median


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch,heads,kv_heads,d,d_v", [(1, 4, 4, 16, 16), (2, 6, 2, 5, 7),
                                                        (2, 3, 1, 32, 48), (1, 8, 2, 128, 128)])
@pytest.mark.parametrize("window", [None, 6])
def test_cache_step_is_bitwise_the_general_path(monkeypatch, dtype, batch, heads, kv_heads, d, d_v,
                                                window):
    # attention(q, cache=cache) with one query per head in the cache's dtype takes a short
    # path to the decoding kernel; it must give exactly what the general path gives for the
    # same keys and values, with every option it accepts.
    taken, compiled = [], []
    short_path, compiled_path = cache_module.decode_step, cache_module.cache_decode
    monkeypatch.setattr(cache_module, "decode_step",
                        lambda *args: taken.append(short_path(*args)) or taken[-1])
    monkeypatch.setattr(cache_module, "cache_decode",
                        lambda *args: compiled.append(compiled_path(*args)) or compiled[-1])
    rng = np.random.default_rng(batch * 100 + heads * 10 + d)
    cache = fastattn.KVCache(batch, kv_heads, 4 if window is None else 6, d, value_dim=d_v, dtype=dtype,
                             window=window,
                             on_full="grow" if window is None else "raise")
    for step in range(9):  # grows past capacity, or wraps the window's ring
        kv = (rng.standard_normal((batch, kv_heads, 1, d)), rng.standard_normal((batch, kv_heads, 1, d_v)))
        q = rng.standard_normal((batch, heads, 1, d)).astype(dtype)
        out, lse = fastattn.attention(q, *kv, cache=cache, return_lse=True)
        general = fastattn.attention(q, cache.keys, cache.values, return_lse=True)
        assert out.dtype == dtype and out.shape == (batch, heads, 1, d_v)
        assert np.array_equal(out, general[0]) and np.array_equal(lse, general[1]), f"step {step}"
        for kwargs in ({"causal": True}, {"scale": 0.3}, {"num_threads": 1}, {"num_threads": 2}):
            assert np.array_equal(fastattn.attention(q, cache=cache, **kwargs),
                                  fastattn.attention(q, cache.keys, cache.values, **kwargs)), kwargs
    assert len(taken) == 9 * 5 and all(t is not None for t in taken)  # the short path ran
    # ... and for the calls with nothing but causal or num_threads, its compiled part.
    assert len(compiled) == 9 * 3 and all(c is not None for c in compiled)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_threads", [None, 1, 2])
def test_compiled_cache_step_reads_strided_views_bitwise(dtype, num_threads):
    # A cache with room to spare: its views skip the unused rows between kv heads. 1100
    # keys: three chunks of the decoding kernel; 8 query heads on 2 kv heads.
    rng = np.random.default_rng(7)
    cache = fastattn.KVCache(2, 2, 2048, 64, value_dim=40, dtype=dtype)
    cache.append(rng.standard_normal((2, 2, 1100, 64)), rng.standard_normal((2, 2, 1100, 40)))
    assert not cache.keys.flags.c_contiguous
    q = rng.standard_normal((2, 8, 1, 64)).astype(dtype)
    got = fastattn.attention(q, cache=cache, num_threads=num_threads)
    general = fastattn.attention(q, np.ascontiguousarray(cache.keys),
                                 np.ascontiguousarray(cache.values), num_threads=num_threads,
                                 return_lse=True)[0]
    assert got.dtype == dtype and np.array_equal(got, general)
    one_group = fastattn.KVCache(1, 1, 4, 8, dtype=dtype)  # one kv entry, one key
    one_group.append(np.ones((1, 1, 1, 8)), np.full((1, 1, 1, 8), 2.0))
    assert np.array_equal(fastattn.attention(np.ones((1, 3, 1, 8), dtype), cache=one_group),
                          np.full((1, 3, 1, 8), 2.0, dtype))


def test_cache_step_falls_back_to_full_validation(monkeypatch):
    taken = []
    short_path = cache_module.decode_step
    monkeypatch.setattr(cache_module, "decode_step",
                        lambda *args: taken.append(short_path(*args)) or taken[-1])
    cache = fastattn.KVCache(1, 2, 8, 4, dtype=np.float32)
    q = np.ones((1, 2, 1, 4), np.float32)
    assert not fastattn.attention(q, cache=cache).any()  # empty cache: zeros, as the general path
    cache.append(np.ones((1, 2, 3, 4)), np.ones((1, 2, 3, 4)))
    expected = fastattn.attention(q, cache.keys, cache.values)
    for other in (q.astype(np.float16), q.astype(np.float64), q.tolist(), q[0], q.repeat(2, axis=3)[..., ::2]):
        got = fastattn.attention(other, cache=cache)
        assert_close(np.asarray(got, np.float64).reshape(expected.shape), expected, np.float32, "fallback")
    assert taken == [None] * 6  # the empty cache and each of these took the general path
    with pytest.raises(ValueError, match="q.shape"):
        fastattn.attention(np.ones((1, 2, 1, 5), np.float32), cache=cache)
    with pytest.raises(ValueError, match="q.shape"):
        fastattn.attention(np.ones((1, 3, 1, 4), np.float32), cache=cache)
    with pytest.raises(TypeError, match="causal"):
        fastattn.attention(q, cache=cache, causal=1)
    with pytest.raises(ValueError, match="scale"):
        fastattn.attention(q, cache=cache, scale=np.inf)
    with pytest.raises(ValueError, match="num_threads"):
        fastattn.attention(q, cache=cache, num_threads=0)

"""KVCache(storage=): keys and values held in 16 or 8 bits, read in place by the decoding
kernel. 16 bits: bitwise the float32 kernel on the rounded values. 8 bits: the bytes and
scales exactly those of an independent NumPy quantizer, the decoding step against the
pure-Python reference on what the cache holds, the error on outlier-channel keys within
the documented bounds."""

import numpy as np
import pytest

import fastattn
from fastattn import KVCache, reference
from fastattn._dispatch import kernels
from fastattn.cache import GROUP

ml_dtypes = pytest.importorskip("ml_dtypes")
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def rounded(a, storage):
    return a.astype(DTYPES[storage]).astype(np.float32)


@pytest.mark.parametrize("storage", list(DTYPES))
@pytest.mark.parametrize("kwargs", [{}, {"softcap": 20.0}, {"return_lse": True}])
def test_a_step_is_bitwise_the_float32_step_on_the_rounded_values(storage, kwargs):
    k, v = rand((2, 4, 300, 64), 1), rand((2, 4, 300, 48), 2)
    q = rand((2, 8, 1, 64), 3)
    cache = KVCache(2, 4, 512, 64, value_dim=48, storage=storage)
    cache.append(k[:, :, :1], v[:, :, :1])
    cache.append(k[:, :, 1:], v[:, :, 1:])
    got = fastattn.attention(q, cache=cache, **kwargs)
    want = fastattn.attention(q, rounded(k, storage), rounded(v, storage), **kwargs)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert np.array_equal(g, w)
    assert np.array_equal(cache.keys, rounded(k, storage))  # a float copy of what it holds
    assert cache.keys.dtype == np.float32 and cache.nbytes == 2 * 4 * 512 * (64 + 48) * 2


@pytest.mark.parametrize("storage", list(DTYPES))
def test_windows_growth_and_general_calls(storage):
    k, v, q = rand((1, 2, 90, 32), 1), rand((1, 2, 90, 32), 2), rand((1, 2, 3, 32), 3)
    ring = KVCache(1, 2, 64, 32, window=50, storage=storage)
    grow = KVCache(1, 2, 8, 32, on_full="grow", storage=storage)
    for lo, hi in ((0, 40), (40, 80), (80, 90)):
        ring.append(k[:, :, lo:hi], v[:, :, lo:hi])
        grow.append(k[:, :, lo:hi], v[:, :, lo:hi])
    assert np.array_equal(ring.keys, rounded(k[:, :, 40:], storage))
    assert np.array_equal(grow.values, rounded(v, storage))
    # several queries (in place: the decoding kernel and the last two tokens' triangle)
    got = fastattn.attention(q, cache=grow, causal=True)
    np.testing.assert_allclose(got, float64_attention(q, rounded(k, storage),
                                                      rounded(v, storage), causal=True),
                               rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("storage", list(DTYPES))
def test_nan_inf_and_overflow_are_refused_changing_nothing(storage):
    cache = KVCache(1, 1, 16, 4, storage=storage)
    cache.append(np.ones((1, 1, 2, 4)), np.ones((1, 1, 2, 4)))
    bad = np.ones((1, 1, 1, 4))
    for value in (np.nan, np.inf, -np.inf) + ((1e5,) if storage == "float16" else ()):
        bad[..., 2] = value
        with pytest.raises(ValueError, match="^v holds"):
            cache.append(np.ones((1, 1, 1, 4)), bad)
        with pytest.raises(ValueError, match="^k holds"):
            cache.append(bad, np.ones((1, 1, 1, 4)))
        assert len(cache) == 2 and np.array_equal(cache.keys, np.ones((1, 1, 2, 4)))


def test_bad_storage_arguments():
    with pytest.raises(ValueError, match="storage must be one of"):
        KVCache(1, 1, 4, 4, storage="int4")
    with pytest.raises(ValueError, match="dtype must be float32"):
        KVCache(1, 1, 4, 4, dtype=np.float64, storage="bfloat16")


def test_multi_head_attention_decodes_through_a_16_bit_cache():
    rng = np.random.default_rng(0)
    w = [rng.standard_normal(shape).astype(np.float32) / 6
         for shape in ((32, 32), (32, 16), (32, 16), (32, 32))]
    mha = fastattn.MultiHeadAttention(*w, num_heads=4, num_kv_heads=2)
    x = rng.standard_normal((1, 20, 32)).astype(np.float32)
    full = mha(x, causal=True)
    cache = KVCache(1, 2, 32, 8, storage="bfloat16")
    steps = [mha(x[:, :12], cache=cache)] + [mha(x[:, i:i + 1], cache=cache) for i in range(12, 20)]
    got = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(got, full, atol=3e-2)  # keys and values rounded to bfloat16


# --------------------------------------------------------------------------- 8 bits

EIGHT = ("int8", "float8_e4m3")
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def test_e4m3_conversions_are_ml_dtypes_own():
    bits = np.arange(256, dtype=np.uint8)
    finite = (bits & 0x7f) != 0x7f  # 0x7f and 0xff are NaN
    want = bits.view(E4M3).astype(np.float32)
    assert np.array_equal(kernels.f8_to_f32(bits)[finite], want[finite])
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.uniform(-448, 448, 100_000), rng.standard_normal(100_000) * 2.0 ** -7,
        want[finite].astype(np.float64) * (1 + 2.0 ** -4),  # exactly halfway: ties to even
        np.nextafter(want[finite], np.float32(np.inf)).astype(np.float64), [448, -448, 0.0, -0.0],
    ]).astype(np.float32)
    x = x[np.abs(x) <= 448]
    assert np.array_equal(kernels.f32_to_f8(x), x.astype(E4M3).view(np.uint8))


def numpy_quantized(x, storage, group):
    """(bytes, scales) of x (B, H, T, D) as fa_quant.h documents them, in NumPy: keys
    (group > 0) one scale per channel per group of rows, values (group 0) one per row."""
    top, step = (127.0, 127.0) if storage == "int8" else (448.0, 1.75)
    x64 = x.astype(np.float64)
    if group:
        pad = -x.shape[2] % group
        blocks = np.abs(np.concatenate([x64, np.zeros(x.shape[:2] + (pad, x.shape[3]))], 2))
        largest = blocks.reshape(x.shape[:2] + (-1, group, x.shape[3])).max(axis=3)
        per_row = np.repeat(largest, group, axis=2)[:, :, :x.shape[2]]
    else:
        largest = np.abs(x64).max(axis=3)
        per_row = largest[..., None]
    with np.errstate(divide="ignore"):
        mul = np.where(per_row > 0, top / per_row, 0.0)
    scaled = x64 * mul
    if storage == "int8":
        q = np.rint(scaled).astype(np.int8)
    else:
        q = scaled.astype(np.float32).astype(E4M3).view(np.uint8)
    return q, (largest / step).astype(np.float32)


@pytest.mark.parametrize("storage", EIGHT)
def test_bytes_and_scales_are_those_of_a_numpy_quantizer_however_tokens_arrive(storage):
    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, 3, 150, 20)).astype(np.float32)
    k[..., 5] *= 30  # an outlier channel
    k[0, 0, 40:72] = 0  # a whole group of zeros (scale 0)
    k[0, 1, :, 3] = 1e-39  # subnormal channel
    v = rng.standard_normal((2, 3, 150, 12)).astype(np.float32) * 1e-3
    one_go, in_steps = (KVCache(2, 3, 160, 20, value_dim=12, storage=storage) for _ in range(2))
    one_go.append(k, v)
    at = 0
    for n in (1, 1, 3, 27, 30, 2, 64, 22):
        in_steps.append(k[:, :, at:at + n], v[:, :, at:at + n])
        at += n
        # the state after each append is the quantizer's on the tokens so far
        qk, sk = numpy_quantized(k[:, :, :at], storage, GROUP)
        qv, sv = numpy_quantized(v[:, :, :at], storage, 0)
        assert np.array_equal(in_steps._k[:, :, :at].view(qk.dtype), qk), at
        assert np.array_equal(in_steps._ks[:, :, :sk.shape[2]], sk), at
        assert np.array_equal(in_steps._v[:, :, :at].view(qv.dtype), qv), at
        assert np.array_equal(in_steps._vs[:, :, :at], sv), at
    for name in ("_k", "_v", "_ks", "_vs"):
        assert np.array_equal(getattr(one_go, name), getattr(in_steps, name)), name
    # keys/values: the bytes times their scales, a float32 copy
    qk, sk = numpy_quantized(k, storage, GROUP)
    row_scales = np.repeat(sk, GROUP, axis=2)[:, :, :150]
    if storage == "int8":
        assert np.array_equal(one_go.keys, qk.astype(np.float32) * row_scales)
    else:  # the e4m3 scales are 256 times the step: exact to take out
        assert np.array_equal(one_go.keys, qk.view(E4M3).astype(np.float32)
                              * (row_scales / np.float32(256)))
    assert one_go.keys.dtype == np.float32 and not np.shares_memory(one_go.keys, one_go._k)
    groups = -(-160 // GROUP)
    assert one_go.nbytes == (2 * 3 * groups * GROUP * (20 + 12) + 4 * 2 * 3 * groups * GROUP
                             + 4 * 2 * 3 * groups * 20 + 4 * 2 * 3 * GROUP * 20)


CASES = [  # batch, heads, kv_heads, d, d_v, appends, window
    (1, 4, 4, 64, 64, (300,), None),
    (2, 6, 2, 20, 36, (7, 1, 40, 1), None),          # d not whole vectors: the scalar path
    (1, 8, 1, 128, 128, (33, 31, 1, 200), None),      # MQA, 8 rows a block
    (2, 10, 2, 48, 16, (5, 60, 17), None),            # groups of 5 rows: 4 + 1
    (1, 3, 1, 32, 32, (40, 3, 50, 1, 1, 44), 50),     # a window: the ring, start mid-group
    (1, 4, 2, 16, 80, (70, 70, 9), 70),
]


@pytest.mark.parametrize("storage", EIGHT)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])))
@pytest.mark.parametrize("kwargs", [{}, {"softcap": 3.0, "return_lse": True},
                                    {"sinks": "yes", "scale": 0.3}])
def test_a_step_is_the_reference_on_what_the_cache_holds(storage, case, kwargs):
    batch, heads, kv_heads, d, d_v, appends, window = case
    rng = np.random.default_rng(sum(appends) + d)
    cache = KVCache(batch, kv_heads, 512, d, value_dim=d_v, storage=storage, window=window)
    for n in appends:
        k = rng.standard_normal((batch, kv_heads, n, d)).astype(np.float32)
        k[..., 1] *= 12
        cache.append(k, rng.standard_normal((batch, kv_heads, n, d_v)).astype(np.float32))
    q = rng.standard_normal((batch, heads, 1, d)).astype(np.float32)
    kwargs = dict(kwargs)
    if "sinks" in kwargs:
        kwargs["sinks"] = rng.standard_normal((batch, heads)).astype(np.float32)
    got = fastattn.attention(q, cache=cache, **kwargs)
    group = heads // kv_heads
    keys, values = (np.repeat(a, group, axis=1) for a in (cache.keys, cache.values))
    want = reference.attention(q.tolist(), keys.tolist(), values.tolist(),
                               **{n: (a.tolist() if isinstance(a, np.ndarray) else a)
                                  for n, a in kwargs.items()})
    for g, w in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        np.testing.assert_allclose(g, np.array(w), rtol=2e-5, atol=2e-6)
    for threads in (1, 2):
        again = fastattn.attention(q, cache=cache, num_threads=threads, **kwargs)
        for g, a in zip(got if isinstance(got, tuple) else (got,),
                        again if isinstance(again, tuple) else (again,)):
            assert np.array_equal(g, a)


def outlier_keys(seed, n=512, d=128):
    """Keys N(0, 1) with 4 of 128 channels ten times the rest (as real models' keys have),
    values N(0, 1), 8 queries over 2 kv heads."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((1, 2, n, d))
    k[..., [3, 40, 77, 100]] *= 10
    return (rng.standard_normal((1, 8, 1, d)), k, rng.standard_normal((1, 2, n, d)))


# The decoding guide's bounds on the relative RMS error of the output on such keys.
BOUNDS = {None: 1e-6, "bfloat16": 1.2e-2, "float16": 2e-3, "int8": 3e-2, "float8_e4m3": 8e-2}


@pytest.mark.parametrize("storage", list(BOUNDS))
def test_error_on_outlier_channel_keys_is_within_the_documented_bound(storage):
    q, k, v = outlier_keys(0)
    exact = float64_attention(q, k, v)
    cache = KVCache(1, 2, 512, 128, storage=storage)
    for lo, hi in ((0, 1), (1, 100), (100, 512)):
        cache.append(k[:, :, lo:hi], v[:, :, lo:hi])
    got = fastattn.attention(q.astype(np.float32), cache=cache)
    rel = np.sqrt(np.mean((got - exact) ** 2) / np.mean(exact ** 2))
    assert rel <= BOUNDS[storage], rel


def float64_attention(q, k, v, causal=False):
    """Plain float64 attention, kv heads repeated for their query heads; causal aligned
    bottom-right (every query sees at least its own key here)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    k, v = (np.repeat(a, q.shape[1] // a.shape[1], axis=1) for a in (k, v))
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if causal:
        n_q, n_k = s.shape[-2:]
        s = np.where(np.arange(n_k) <= np.arange(n_q)[:, None] + n_k - n_q, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("storage", EIGHT)
def test_eight_bit_refuses_nan_and_inf_changing_nothing(storage):
    cache = KVCache(1, 1, 64, 4, storage=storage)
    cache.append(np.ones((1, 1, 5, 4)), np.ones((1, 1, 5, 4)))
    state = [a.copy() for a in (cache._k, cache._v, cache._ks, cache._vs, cache._open)]
    for value in (np.nan, np.inf, -np.inf):
        for at in (0, 40):  # in the group still filling, and in a later one
            bad = np.ones((1, 1, 41, 4))
            bad[0, 0, at, 2] = value
            with pytest.raises(ValueError, match="^v holds NaN or inf"):
                cache.append(np.ones((1, 1, 41, 4)), bad)
            with pytest.raises(ValueError, match="^k holds NaN or inf"):
                cache.append(bad, np.ones((1, 1, 41, 4)))
    assert len(cache) == 5
    for a, b in zip(state, (cache._k, cache._v, cache._ks, cache._vs, cache._open)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("storage", EIGHT)
def test_eight_bit_growth_window_and_full(storage):
    rng = np.random.default_rng(3)
    k, v = (rng.standard_normal((1, 2, 200, 16)).astype(np.float32) for _ in range(2))
    grow = KVCache(1, 2, 10, 16, on_full="grow", storage=storage)
    whole = KVCache(1, 2, 200, 16, storage=storage)
    whole.append(k, v)
    for lo, hi in ((0, 9), (9, 45), (45, 200)):
        grow.append(k[:, :, lo:hi], v[:, :, lo:hi])
    assert grow.capacity >= 200
    assert np.array_equal(grow.keys, whole.keys) and np.array_equal(grow.values, whole.values)
    ring = KVCache(1, 2, 64, 16, window=37, storage=storage)
    for lo in range(0, 200, 20):
        ring.append(k[:, :, lo:lo + 20], v[:, :, lo:lo + 20])
        n = min(lo + 20, 37)
        # the last 37 tokens, quantized as a plain cache of the same tokens would hold them
        # up to the groups they fall in: compare with the tolerance of the format
        step = 127 if storage == "int8" else 8
        np.testing.assert_allclose(ring.keys, k[:, :, lo + 20 - n:lo + 20],
                                   atol=np.abs(k).max() / step)
    full = KVCache(1, 1, 40, 4, storage=storage)
    full.append(np.ones((1, 1, 39, 4)), np.ones((1, 1, 39, 4)))
    with pytest.raises(ValueError, match="KVCache is full"):
        full.append(np.ones((1, 1, 2, 4)), np.ones((1, 1, 2, 4)))
    assert len(full) == 39 and full.capacity == 40


@pytest.mark.parametrize("storage", ["bfloat16", "int8", "float8_e4m3"])
@pytest.mark.parametrize("n_queries, causal, window", [(2, True, None), (7, True, 40),
                                                       (5, False, None), (16, True, None),
                                                       (40, True, None)])
def test_several_queries_read_the_storage_in_place(monkeypatch, storage, n_queries, causal,
                                                   window):
    rng = np.random.default_rng(n_queries)
    cache = KVCache(2, 2, 128, 32, value_dim=24, storage=storage, window=window)
    for n in (30, 25, 20):
        cache.append(rng.standard_normal((2, 2, n, 32)), rng.standard_normal((2, 2, n, 24)))
    keys, values = cache.keys, cache.values
    q = rng.standard_normal((2, 4, n_queries, 32)).astype(np.float32)
    sinks = rng.standard_normal((2, 4)).astype(np.float32)
    if n_queries * 2 <= fastattn.cache.IN_PLACE_ROWS:  # else the general path, on a copy
        monkeypatch.setattr(KVCache, "keys", property(lambda self: pytest.fail("copied")))
    got, lse = fastattn.attention(q, cache=cache, causal=causal, softcap=5.0, sinks=sinks,
                                  return_lse=True)
    k, v = (np.repeat(a, 2, axis=1).tolist() for a in (keys, values))
    want, want_lse = reference.attention(q.tolist(), k, v, causal=causal, softcap=5.0,
                                         sinks=sinks.tolist(), return_lse=True)
    np.testing.assert_allclose(got, np.array(want), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(lse, np.array(want_lse), rtol=2e-5, atol=2e-6)


class TinyLlama:
    """A Llama-shaped decoder with random weights, decoded through MultiHeadAttention with
    a KVCache per layer: token embeddings, layers of RMSNorm -> grouped-query attention ->
    RMSNorm -> SwiGLU MLP, an output head. (No rotary embeddings: MultiHeadAttention
    projects and attends in one call.)"""

    def __init__(self, seed, vocab=96, embed=64, layers=2, heads=4, kv_heads=2, mlp=128):
        rng = np.random.default_rng(seed)

        def w(*shape):
            return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        self.emb = rng.standard_normal((vocab, embed)).astype(np.float32)
        self.head = w(embed, vocab)
        self.head_dim, self.kv_heads = embed // heads, kv_heads
        self.layers = [(fastattn.MultiHeadAttention(
            w(embed, embed), w(embed, kv_heads * self.head_dim), w(embed, kv_heads * self.head_dim),
            w(embed, embed), num_heads=heads, num_kv_heads=kv_heads),
            w(embed, mlp), w(embed, mlp), w(mlp, embed)) for _ in range(layers)]

    @staticmethod
    def norm(x):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    def logits(self, tokens, caches):
        x = self.emb[tokens][None]
        for (mha, gate, up, down), cache in zip(self.layers, caches):
            x = x + mha(self.norm(x), cache=cache)
            h = self.norm(x)
            g = h @ gate
            x = x + (g / (1 + np.exp(-g)) * (h @ up)) @ down
        return self.norm(x) @ self.head

    def decode(self, prompt, n_new, storage, forced=None):
        """(tokens, logits at each step): greedy, or fed `forced` tokens (teacher forcing)."""
        caches = [KVCache(1, self.kv_heads, len(prompt) + n_new, self.head_dim,
                          storage=storage) for _ in self.layers]
        logits = self.logits(np.asarray(prompt), caches)[0, -1]
        tokens, seen = [], []
        for i in range(n_new):
            seen.append(logits)
            tokens.append(int(np.argmax(logits)) if forced is None else forced[i])
            logits = self.logits(np.array([tokens[-1]]), caches)[0, -1]
        return tokens, np.array(seen)


@pytest.mark.parametrize("storage", ["bfloat16", "float16", "int8", "float8_e4m3"])
def test_a_tiny_llama_decodes_the_float32_tokens(storage):
    model = TinyLlama(4)
    prompt = list(np.random.default_rng(4).integers(0, 96, 40))
    tokens, logits = model.decode(prompt, 40, None)
    # float32's smallest top-2 margin over the 40 steps is 0.030; bfloat16, float16 and
    # int8 move no logit by more than a third of it (0.004, 0.0004, 0.010), so their greedy
    # tokens are float32's. float8 e4m3 moves them by up to 0.07 (and changed the greedy
    # tokens of 2 of 6 such models): it is held to its error bound only.
    forced = model.decode(prompt, 40, storage, forced=tokens)[1]
    rel = np.sqrt(np.mean((forced - logits) ** 2) / np.mean(logits ** 2))
    assert rel <= BOUNDS[storage], rel
    if storage != "float8_e4m3":
        assert model.decode(prompt, 40, storage)[0] == tokens


@pytest.mark.parametrize("storage", ["bfloat16", "float16", "int8", "float8_e4m3"])
@pytest.mark.parametrize("window", [None, 40])
def test_the_plain_step_takes_the_compiled_path_bitwise(monkeypatch, storage, window):
    compiled, path = [], fastattn.cache.cache_decode
    monkeypatch.setattr(fastattn.cache, "cache_decode",
                        lambda *args: compiled.append(path(*args)) or compiled[-1])
    rng = np.random.default_rng(7)
    cache = KVCache(2, 2, 8 if window is None else 64, 24, value_dim=40, storage=storage,
                    window=window,
                    on_full="grow" if window is None else "raise")
    for step in range(70):  # grows, or wraps the ring (starting mid-group)
        cache.append(rng.standard_normal((2, 2, 1, 24)), rng.standard_normal((2, 2, 1, 40)))
        q = rng.standard_normal((2, 6, 1, 24)).astype(np.float32)
        plain = fastattn.attention(q, cache=cache)
        general = fastattn.attention(q, cache=cache, return_lse=True)[0]  # the Python path
        assert np.array_equal(plain, general), step
    assert len(compiled) == 70 and all(c is not None for c in compiled)

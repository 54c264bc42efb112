"""KVCache(storage=): keys and values held in 16 bits, read in place by the decoding
kernel (issue 26, first part: bfloat16 and float16)."""

import numpy as np
import pytest

import fastattn
from fastattn import KVCache

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
    # several queries (the general path) against the held tokens
    got = fastattn.attention(q, cache=grow, causal=True)
    assert np.array_equal(got, fastattn.attention(q, rounded(k, storage), rounded(v, storage),
                                                  causal=True))


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

"""MultiHeadAttention against the reference composed by hand."""

import numpy as np
import pytest

import fastattn
from fastattn import reference
from conftest import assert_close


def make_layer(embed, heads, kv_heads, head_dim, dtype=np.float64, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    w_q = (rng.standard_normal((embed, heads * head_dim)) / np.sqrt(embed)).astype(dtype)
    w_k = (rng.standard_normal((embed, kv_heads * head_dim)) / np.sqrt(embed)).astype(dtype)
    w_v = (rng.standard_normal((embed, kv_heads * head_dim)) / np.sqrt(embed)).astype(dtype)
    w_o = (rng.standard_normal((heads * head_dim, embed)) / np.sqrt(embed)).astype(dtype)
    b = [rng.standard_normal(w.shape[1]).astype(dtype) if bias else None for w in (w_q, w_k, w_v, w_o)]
    return fastattn.MultiHeadAttention(w_q, w_k, w_v, w_o, num_heads=heads, num_kv_heads=kv_heads,
                                       b_q=b[0], b_k=b[1], b_v=b[2], b_o=b[3])


def reference_mha(layer, query, key, value, causal, mask=None):
    """Heads by hand from reference.project and reference.attention, on one batch entry."""
    q = np.asarray(reference.project(query, layer.w_q, layer.b_q))
    k = np.asarray(reference.project(key, layer.w_k, layer.b_k))
    v = np.asarray(reference.project(value, layer.w_v, layer.b_v))
    hd, group = layer.head_dim, layer.num_heads // layer.num_kv_heads
    heads = []
    for h in range(layer.num_heads):
        g = h // group
        m = None if mask is None else np.broadcast_to(mask, (layer.num_heads,) + mask.shape[-2:])[h]
        heads.append(np.asarray(reference.attention(
            q[:, h * hd:(h + 1) * hd], k[:, g * hd:(g + 1) * hd], v[:, g * hd:(g + 1) * hd],
            causal=causal, mask=m)))
    return np.asarray(reference.project(np.concatenate(heads, axis=-1), layer.w_o, layer.b_o))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_layer_matches_reference(heads, kv_heads, causal):
    layer = make_layer(16, heads, kv_heads, 4)
    x = np.random.default_rng(1).standard_normal((2, 7, 16))
    out = layer(x, causal=causal)
    assert out.shape == (2, 7, 16)
    for b in range(2):
        assert_close(out[b], reference_mha(layer, x[b], x[b], x[b], causal), np.float64,
                     f"batch {b}", magnitude=10)


def test_cross_attention_layer_and_mask():
    layer = make_layer(8, 2, 2, 3, bias=False)
    rng = np.random.default_rng(2)
    query, memory = rng.standard_normal((5, 8)), rng.standard_normal((9, 8))
    mask = rng.random((2, 5, 9)) > 0.3
    out, weights = layer(query, memory, mask=mask, return_weights=True)
    assert weights.shape == (2, 5, 9)
    assert_close(out, reference_mha(layer, query, memory, memory, False, mask), np.float64,
                 "cross", magnitude=10)


def test_layer_float32_and_float16():
    layer32 = make_layer(16, 4, 2, 4, dtype=np.float32)
    x = np.random.default_rng(3).standard_normal((6, 16))
    out = layer32(x.astype(np.float32))
    assert out.dtype == np.float32
    assert_close(out, reference_mha(layer32, x.astype(np.float32), x.astype(np.float32),
                                    x.astype(np.float32), False), np.float32, "f32", magnitude=10)
    out16 = layer32(x.astype(np.float16))
    assert out16.dtype == np.float32  # float16 input with float32 weights promotes to float32


def test_a_cache_that_does_not_fit_the_layer_is_named():
    rng = np.random.default_rng(7)
    w = [rng.standard_normal(s) for s in ((8, 8), (8, 4), (8, 4), (8, 8))]
    layer = fastattn.MultiHeadAttention(*w, num_heads=2, num_kv_heads=1)
    x = rng.standard_normal((1, 3, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"the cache does not fit this layer.*num_kv_heads=1"):
        layer(x, cache=fastattn.KVCache(1, 2, 16, 4, dtype=np.float32))
    layer32 = fastattn.MultiHeadAttention(*(a.astype(np.float32) for a in w), num_heads=2,
                                          num_kv_heads=1)
    with pytest.raises(ValueError, match="the cache holds float64 and this layer computes in float32"):
        layer32(x, cache=fastattn.KVCache(1, 1, 16, 4, dtype=np.float64))
    cache = fastattn.KVCache(1, 1, 16, 4, dtype=np.float64)
    assert layer(x, cache=cache).dtype == np.float64  # float64 weights: a float64 cache fits

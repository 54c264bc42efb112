"""Parity with PyTorch's scaled_dot_product_attention and nn.MultiheadAttention.

Skipped when torch is not installed; .ci/run installs torch==2.13.0 so they run in CI.
"""

import numpy as np
import pytest

import fastattn
from conftest import assert_close

torch = pytest.importorskip("torch")
F = torch.nn.functional


def sdpa(q, k, v, **kw):
    t = [torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v)]
    if isinstance(kw.get("attn_mask"), np.ndarray):
        kw["attn_mask"] = torch.from_numpy(kw["attn_mask"])
    with torch.no_grad():
        return F.scaled_dot_product_attention(*t, **kw).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
def test_attention_matches_sdpa(dtype, mask_kind):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in [(2, 4, 37, 16), (2, 4, 300, 16), (2, 4, 300, 8)])
    kw, ours = {}, {}
    if mask_kind == "bool":
        m = rng.random((2, 1, 37, 300)) > 0.5
        kw["attn_mask"] = ours["mask"] = m
    elif mask_kind == "float":
        m = rng.standard_normal((37, 300)).astype(dtype)
        kw["attn_mask"] = ours["mask"] = m
    elif mask_kind == "causal":
        q = q[:, :, :37]
        kw["is_causal"] = ours["causal"] = True
        k, v = k[:, :, :37], v[:, :, :37]  # torch's is_causal is top-left: compare with L_q == L_k
    assert_close(fastattn.attention(q, k, v, **ours), sdpa(q, k, v, **kw), dtype, mask_kind, magnitude=4)


def test_causal_bottom_right_matches_torch_causal_lower_right():
    bias = pytest.importorskip("torch.nn.attention.bias")
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(1, 2, 5, 8), (1, 2, 12, 8), (1, 2, 12, 8)])
    mask = bias.causal_lower_right(5, 12)
    with torch.no_grad():
        expected = F.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)),
                                                  attn_mask=mask).numpy()
    assert_close(fastattn.attention(q, k, v, causal=True), expected, np.float32, "lower right")


def test_grouped_query_matches_sdpa_enable_gqa():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(2, 8, 20, 16), (2, 2, 30, 16), (2, 2, 30, 16)])
    assert_close(fastattn.attention(q, k, v), sdpa(q, k, v, enable_gqa=True), np.float32, "gqa")


def test_fully_masked_rows_match_torch():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(3, 6, 8), (3, 9, 8), (3, 9, 4)])
    m = rng.random((3, 6, 9)) > 0.5
    m[:, 2] = False
    expected = sdpa(q, k, v, attn_mask=m)
    assert np.array_equal(expected[:, 2], np.zeros((3, 4), np.float32))  # torch >= 2.5 semantics
    assert_close(fastattn.attention(q, k, v, mask=m), expected, np.float32, "masked rows")


@pytest.mark.parametrize("bias", [True, False])
def test_multi_head_attention_loads_torch_module(bias):
    torch.manual_seed(0)
    mod = torch.nn.MultiheadAttention(32, 4, bias=bias, batch_first=True).double().eval()
    x = np.random.default_rng(4).standard_normal((2, 11, 32))
    sd = {k: t.detach().numpy() for k, t in mod.state_dict().items()}
    layer = fastattn.MultiHeadAttention.from_torch_state_dict(sd, num_heads=4)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(11, dtype=torch.bool)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        expected, w = mod(xt, xt, xt, need_weights=True, average_attn_weights=False)
        expected_causal, _ = mod(xt, xt, xt, attn_mask=causal, need_weights=False)
    out, weights = layer(x, return_weights=True)
    assert_close(out, expected.numpy(), np.float64, "forward", magnitude=10)
    assert_close(weights, w.numpy(), np.float64, "weights")
    assert_close(layer(x, causal=True), expected_causal.numpy(), np.float64, "causal", magnitude=10)


def test_multi_head_attention_kdim_vdim():
    torch.manual_seed(1)
    mod = torch.nn.MultiheadAttention(16, 2, kdim=10, vdim=6, batch_first=True).double().eval()
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 4, 16)), rng.standard_normal((3, 7, 10)), rng.standard_normal((3, 7, 6))
    layer = fastattn.MultiHeadAttention.from_torch_state_dict(
        {n: t.detach().numpy() for n, t in mod.state_dict().items()}, num_heads=2)
    with torch.no_grad():
        expected, _ = mod(*(torch.from_numpy(a) for a in (q, k, v)))
    assert_close(layer(q, k, v), expected.numpy(), np.float64, "kdim/vdim", magnitude=10)

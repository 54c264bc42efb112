"""Arrays from elsewhere: bfloat16 (ml_dtypes), torch tensors, DLPack objects, and the
fastattn.torch functions that return tensors. Skipped where the optional package is
absent."""

import numpy as np
import pytest

import fastattn
from fastattn import reference
from fastattn._validation import as_array

from conftest import kernel_policy


def rand(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------- bfloat16

def test_bfloat16_computes_in_float32_and_returns_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    q, k, v = (rand((2, 3, 7, 16), s).astype(bf16) for s in range(3))
    with kernel_policy(engine=0):  # no matrix engine (they have tests/test_lowp.py)
        out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == bf16 and lse.dtype == np.float32
    # Exactly the float32 computation on the same (bfloat16-valued) inputs, rounded once.
    f32 = fastattn.attention(*(a.astype(np.float32) for a in (q, k, v)), causal=True)
    assert np.array_equal(out, f32.astype(bf16))
    r = reference.attention(*(a.astype(np.float64) for a in (q, k, v)), causal=True)
    # ...whose own rounding to 8 bits of mantissa is at most half a bfloat16 ulp, 2**-9.
    np.testing.assert_allclose(out.astype(np.float64), r, rtol=2**-8, atol=1e-6)
    # Mixed with float32: float32 wins, as NumPy's promotion says.
    assert fastattn.attention(q, k.astype(np.float32), v).dtype == np.float32
    assert fastattn.softmax(q).dtype == bf16
    assert fastattn.scores(q, k).dtype == bf16


# --------------------------------------------------------------------------- torch

def test_torch_tensors_are_read_in_place_and_results_are_ndarrays():
    torch = pytest.importorskip("torch")
    q = torch.from_numpy(rand((2, 4, 5, 8)))
    assert np.shares_memory(as_array("q", q), q.numpy())
    strided = q.transpose(-1, -2)
    assert np.shares_memory(as_array("q", strided), q.numpy())
    out = fastattn.attention(q, q, q, causal=True)
    assert type(out) is np.ndarray
    assert np.array_equal(out, fastattn.attention(q.numpy(), q.numpy(), q.numpy(), causal=True))
    neg = -q  # a lazily negated view is resolved, not misread
    assert np.array_equal(fastattn.softmax(torch.neg(q)), fastattn.softmax(-q.numpy()))
    assert np.array_equal(fastattn.softmax(neg), fastattn.softmax(-q.numpy()))


def test_torch_bfloat16_tensor_works():
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    q = torch.from_numpy(rand((1, 2, 6, 8))).to(torch.bfloat16)
    a = as_array("q", q)
    assert a.dtype.name == "bfloat16" and a.ctypes.data == q.data_ptr()  # no copy
    out = fastattn.attention(q, q, q)
    assert out.dtype.name == "bfloat16"
    f32 = fastattn.attention(*(q.float().numpy(),) * 3)
    assert np.array_equal(out.astype(np.float32), f32.astype(out.dtype).astype(np.float32))


def test_torch_errors_name_the_argument_and_the_fix():
    torch = pytest.importorskip("torch")
    q = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(TypeError, match=r"k is a torch tensor that requires grad.*k\.detach\(\)"):
        fastattn.attention(q.detach(), q, q.detach())
    with pytest.raises(TypeError, match="sinks is a torch tensor that requires grad"):
        fastattn.attention(q.detach(), q.detach(), q.detach(), sinks=torch.zeros(1, requires_grad=True))
    with pytest.raises(TypeError, match="q has unsupported dtype"):
        fastattn.attention(torch.ones(2, 3, dtype=torch.complex64), q.detach(), q.detach())


def test_fastattn_torch_returns_tensors_sharing_the_result():
    torch = pytest.importorskip("torch")
    import fastattn.torch as fa
    q = torch.from_numpy(rand((2, 4, 5, 8)))
    out, lse = fa.attention(q, q, q, return_lse=True, sinks=torch.zeros(4))
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
    assert torch.equal(out, torch.from_numpy(fastattn.attention(q, q, q, sinks=np.zeros(4))))
    target = torch.empty(2, 4, 5, 8)
    assert fa.attention(q, q, q, out=target) is target
    assert torch.equal(target, out.new_tensor(fastattn.attention(q, q, q)))
    bf = fa.attention(q.bfloat16(), q.bfloat16(), q.bfloat16()) if _has_ml_dtypes() else None
    assert bf is None or bf.dtype == torch.bfloat16
    assert isinstance(fa.softmax(q), torch.Tensor) and isinstance(fa.scores(q, q), torch.Tensor)


def _has_ml_dtypes():
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- DLPack

class DLPackOnly:
    """An array that offers DLPack and nothing else (as a JAX or CuPy array would)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_objects_are_read_in_place():
    a = rand((3, 4, 8))
    got = as_array("q", DLPackOnly(a))
    assert np.shares_memory(got, a)
    assert np.array_equal(fastattn.attention(DLPackOnly(a), a, a), fastattn.attention(a, a, a))


def test_objects_with_only_array_interface_still_work():
    class ArrayOnly:
        def __init__(self, a):
            self._a = a

        def __array__(self, dtype=None, copy=None):
            return self._a

    a = rand((3, 4, 8))
    assert np.array_equal(fastattn.attention(ArrayOnly(a), a, a), fastattn.attention(a, a, a))


def test_bfloat16_decoding_reads_keys_in_place_and_equals_float32_bitwise():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from fastattn import _run
    from fastattn._dispatch import kernels
    bf16 = np.dtype(ml_dtypes.bfloat16)
    for d, d_v, n_keys in ((64, 64, 700), (128, 128, 1500), (24, 40, 90)):  # vector and scalar paths
        q = rand((2, 6, 1, d), 1).astype(bf16)
        k = rand((2, 3, n_keys, d), 2).astype(bf16)
        v = rand((2, 3, n_keys, d_v), 3).astype(bf16)
        sinks = rand((6,), 4)
        calls = []
        original = kernels.decode
        kernels_attr = _run._kernels
        try:
            kernels_attr.decode = lambda *a, **kw: calls.append(a) or original(*a, **kw)
            out, lse = fastattn.attention(q, k, v, softcap=4.0, sinks=sinks, return_lse=True)
        finally:
            kernels_attr.decode = original
        # the bfloat16 keys (their bits), not a copy
        assert calls and calls[0][1].dtype == np.uint16 and np.shares_memory(calls[0][1], k)
        f32 = fastattn.attention(*(a.astype(np.float32) for a in (q, k, v)), softcap=4.0,
                                 sinks=sinks, return_lse=True)
        assert out.dtype == bf16 and np.array_equal(out, f32[0].astype(bf16)), d
        assert np.array_equal(lse, f32[1]), d


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_without_ml_dtypes_no_array_is_taken_for_bfloat16(monkeypatch, dtype):
    """Regression: with ml_dtypes absent, bfloat16() is None, and NumPy reads
    `dtype == None` as float64: float64 decoding once went to the bfloat16 kernel."""
    import sys
    from fastattn import _run, _validation
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now fails
    _validation.bfloat16.cache_clear()
    try:
        assert _validation.bfloat16() is None
        calls = []
        original = _run._kernels.decode
        monkeypatch.setattr(_run._kernels, "decode", lambda *a, **kw: calls.append(a) or original(*a, **kw))
        q, k, v = rand((2, 4, 1, 16), 5, dtype), rand((2, 2, 40, 16), 6, dtype), rand((2, 2, 40, 8), 7, dtype)
        out = fastattn.attention(q, k, v, return_lse=True)[0]  # the general path's decoding
        assert calls and calls[0][1].dtype == dtype and out.dtype == dtype  # not as bfloat16 bits
        np.testing.assert_allclose(out, reference.attention(q, k, v),
                                   rtol=1e-12 if dtype == np.float64 else 2e-5, atol=1e-6)
    finally:
        monkeypatch.undo()
        _validation.bfloat16.cache_clear()

"""Shared test helpers: tolerances, awkward layouts, hypothesis profiles."""

import contextlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough", max_examples=600, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def assert_close(actual, desired, compute, case, magnitude=1.0):
    """Compare a kernel result with the float64 reference, with docs/DESIGN.md's tolerances.

    float64: rtol=1e-12; float32 (and float16 computed in float32): rtol=2e-5, atol=2e-6.
    The float64 comparison also allows an absolute 1e-13 * magnitude (the size of the
    terms summed) because a sum that cancels to near zero cannot keep a relative error.
    A float16 result is the float32 one rounded once more, so it may also differ by the
    half-ulp of that rounding (float16 eps / 2 relative). NaN must match NaN; infinities
    must match exactly.
    """
    half_ulp16 = 0.0
    if np.asarray(actual).dtype == np.float16:
        half_ulp16 = float(np.finfo(np.float16).eps) / 2
    actual = np.asarray(actual, dtype=np.float64)
    desired = np.asarray(desired, dtype=np.float64)
    if actual.size == 0:  # nested lists cannot keep the length of the other axes
        assert desired.size == 0, f"{case}: expected {desired.shape}, got empty {actual.shape}"
        return
    assert actual.shape == desired.shape, f"{case}: shape {actual.shape} != {desired.shape}"
    if np.dtype(compute) == np.float64:
        rtol, atol = 1e-12, 1e-13 * magnitude
    else:
        rtol, atol = 2e-5 + half_ulp16, 2e-6 * magnitude
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, equal_nan=True,
                               err_msg=case)


LAYOUTS = ("C", "F", "sliced", "transposed", "readonly", "byteswapped", "negative")


def with_layout(a, layout):
    """The same values as `a`, laid out awkwardly (a copy; never a view of `a`)."""
    a = np.array(a)
    if layout == "C":
        return a
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "sliced":
        big = np.empty(a.shape[:-1] + (2 * a.shape[-1] + 1,), a.dtype) if a.ndim else a.copy()
        if a.ndim:
            big[..., 1::2] = a
            return big[..., 1::2]
        return big
    if layout == "transposed":
        return np.ascontiguousarray(a.T).T
    if layout == "readonly":
        a.setflags(write=False)
        return a
    if layout == "byteswapped":
        if a.dtype.itemsize == 1:
            return a
        return a.astype(a.dtype.newbyteorder())
    if layout == "negative":
        if not a.ndim:
            return a
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    raise AssertionError(layout)


@contextlib.contextmanager
def kernel_policy(**values):
    """The compiled kernel-choice policy with these values while the block runs (every
    path, compiled or Python, reads the same values), restored after."""
    from fastattn._dispatch import kernels

    saved = kernels.set_policy(**values)
    try:
        yield
    finally:
        kernels.set_policy(**saved)


@pytest.fixture(params=["default", "tiny"])
def block_sizes(request):
    """Run with the shipped tile sizes and with tiny ones, so that small inputs still
    cross query- and key-block boundaries."""
    with kernel_policy(**({"q_block": 3, "k_block": 5} if request.param == "tiny" else {})):
        yield request.param


def float64_attention(q, k, v, mask=None):
    """Plain float64 NumPy attention and its log-sum-exp, an oracle for the kernels.

    Grouped-query heads (axis -3 of k/v dividing that of q) by repetition; a boolean mask
    (True = may attend); a query with every key hidden gets zeros and a -inf lse.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    if q.ndim >= 3 and k.ndim >= 3:
        group = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    shift = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - shift)
    total = p.sum(-1, keepdims=True)
    out = np.where(total > 0, (p / np.where(total > 0, total, 1)) @ v, 0)
    with np.errstate(divide="ignore"):
        lse = (shift + np.log(total))[..., 0]
    return out, np.where(total[..., 0] > 0, lse, -np.inf)

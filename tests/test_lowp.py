"""16-bit attention: bfloat16 tiles on each matrix engine this machine can run (AVX512-BF16,
AMX, and the AMX kernels on their portable emulation, which runs everywhere), the widening
of bfloat16 and float16 inputs for the float32 micro-kernels, the kernels' own 16-bit
conversions, and precision= for float32 inputs.

The bound the engines are held to (docs/guide/dtypes.rst), with u = 2^-8 the unit
roundoff of bfloat16: against float64 attention on the same 16-bit values,
|out_i - exact_i| <= u |exact_i| (the result rounded to bfloat16 once) + u sum_j p_ij |v_j|
(the weights rounded to bfloat16 for P V, each by at most u of itself) + 1e-4 max|v|
(float32 sums); widening is exact float32 attention on the same values, rounded once.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn import _plan, _run, reference
from fastattn._dispatch import kernels

from conftest import kernel_policy

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
RUNNABLE = [name for name, why in kernels.engines().items() if why == "ok"]
ENGINES = [name for name in RUNNABLE if name != "none"]


@pytest.fixture(params=RUNNABLE)
def engine(request):
    """Each engine this machine runs ("none": 16-bit inputs widened for the float32
    kernels), as the policy's engine while the test runs."""
    with kernel_policy(engine=kernels.ENGINES.index(request.param)):
        yield request.param


def rand(shape, seed, dtype=BF16, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def exact(q, k, v, **kwargs):
    """float64 attention on the same values, by the pure-Python reference."""
    return reference.attention(*(np.asarray(a, np.float64) for a in (q, k, v)), **kwargs)


U = 2.0**-8  # bfloat16's unit roundoff


def assert_within_bound(out, ref, v, case, rounded_out=True, weighted=None):
    """|out - ref| within the bound above; weighted: sum_j p_ij |v_j| per output row (else
    max|v|, its upper bound); rounded_out False for float32 results (precision=)."""
    out = np.asarray(out, np.float64)
    v_max = np.abs(np.asarray(v, np.float64)).max()
    bound = (U * np.abs(ref) if rounded_out else 0) + 1e-4 * v_max \
        + U * (v_max if weighted is None else weighted)
    bad = ~(np.abs(out - ref) <= bound) & ~(np.isnan(out) & np.isnan(ref))
    assert not bad.any(), (f"{case}: {bad.sum()} outside the bound, worst "
                           f"{np.nanmax(np.abs(out - ref) - bound):.3g} over it")


# (B, H, H_kv, L_q, L_k, D, D_v): lengths off the 16/32-row and 32-key steps, heads off the
# 32-dimension step, value widths of whole bands (64), of 16-column bands, and of both.
SHAPES = [
    (1, 2, 2, 5, 7, 16, 16),
    (1, 2, 1, 33, 65, 20, 48),
    (2, 2, 2, 17, 31, 64, 80),
    (1, 3, 1, 40, 33, 72, 64),
    (1, 1, 1, 64, 96, 128, 128),
    (1, 2, 2, 1, 40, 32, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", [{}, {"causal": True}, {"causal": True, "window": 9},
                                     {"softcap": 2.0}, {"mask": "bool"}, {"mask": "add"},
                                     {"sinks": True}], ids=str)
def test_bfloat16_is_within_the_documented_bound_on_every_engine(engine, shape, options):
    b, h, h_kv, n_q, n_k, d, d_v = shape
    q, k = rand((b, h, n_q, d), 1, scale=2.0), rand((b, h_kv, n_k, d), 2, scale=2.0)
    v = rand((b, h_kv, n_k, d_v), 3)
    kwargs = dict(options)
    if kwargs.get("mask") == "bool":
        mask = np.random.default_rng(4).random((n_q, n_k)) < 0.7
        mask[0] = False  # a fully hidden row: zeros
        kwargs["mask"] = mask
    elif kwargs.get("mask") == "add":
        kwargs["mask"] = rand((n_q, n_k), 5, np.float32, 3.0)
    if kwargs.pop("sinks", False):
        kwargs["sinks"] = rand((h,), 6, np.float32)
    out, lse = fastattn.attention(q, k, v, return_lse=True, **kwargs)
    assert out.dtype == BF16 and lse.dtype == np.float32
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
    if h != h_kv:  # the reference has no grouped heads: repeat them
        k64, v64 = (np.repeat(a, h // h_kv, axis=1) for a in (k64, v64))
    ref, ref_lse = reference.attention(q64, k64, v64, return_lse=True, **kwargs)
    assert_within_bound(out, np.asarray(ref), v, f"{engine} {shape} {options}")
    np.testing.assert_allclose(lse, np.asarray(ref_lse), rtol=1e-4, atol=1e-4)


def test_widening_is_float32_attention_on_the_same_values_rounded_once():
    """Without an engine, bfloat16 and float16 inputs are exact float32 attention."""
    with kernel_policy(engine=0):
        for dtype in (BF16, np.dtype(np.float16)):
            q, k, v = (rand((2, 3, 45, 64), s, dtype) for s in range(3))
            for kwargs in ({}, {"causal": True}, {"causal": True, "window": 7}):
                out = fastattn.attention(q, k, v, **kwargs)
                f32 = fastattn.attention(*(a.astype(np.float32) for a in (q, k, v)), **kwargs)
                assert out.dtype == dtype
                assert np.array_equal(out.view(np.uint16), f32.astype(dtype).view(np.uint16))


def test_an_engine_rounds_the_weights_and_so_differs_from_float32_but_only_so_much(engine):
    q, k, v = (rand((1, 4, 200, 64), s) for s in range(3))
    out = fastattn.attention(q, k, v).astype(np.float64)
    f32 = fastattn.attention(*(a.astype(np.float32) for a in (q, k, v))).astype(np.float64)
    assert np.abs(out - f32).max() <= 2.0**-8 * (np.abs(f32).max() + 1)
    # the 16-bit path ran, as the plan says: on an engine always; widening where the build
    # runs float32 tiles in micro-kernels (else the inputs are converted first)
    expected = "bfloat16" if engine != "none" or kernels.use_microkernels(4, 64, 64) else None
    assert _plan.plan_attention(q, k, v, None, False, None).lowp == expected


@pytest.mark.parametrize("kwargs", [{}, {"causal": True}, {"causal": True, "window": 50}])
def test_bfloat16_is_bitwise_the_same_on_any_thread_count_and_in_pieces(engine, monkeypatch,
                                                                       kwargs):
    q, k, v = (rand((2, 4, 300, 64), s) for s in range(3))
    one = fastattn.attention(q, k, v, num_threads=1, **kwargs)
    two = fastattn.attention(q, k, v, num_threads=2, **kwargs)
    monkeypatch.setattr(_run, "PIECE_FLOPS", 1.0)  # pieces of one item per thread
    pieces = fastattn.attention(q, k, v, num_threads=2, **kwargs)
    assert np.array_equal(one.view(np.uint16), two.view(np.uint16))
    assert np.array_equal(one.view(np.uint16), pieces.view(np.uint16))


def test_tiny_tiles_cross_every_block_boundary(engine):
    q, k, v = (rand((1, 2, 70, 32), s) for s in range(3))
    want = fastattn.attention(q, k, v, causal=True)
    with kernel_policy(q_block=3, k_block=5):
        got = fastattn.attention(q, k, v, causal=True)
    assert_within_bound(got, exact(q, k, v, causal=True), v, engine)
    assert_within_bound(want, exact(q, k, v, causal=True), v, engine)


def test_nan_and_inf_reach_the_rows_they_reach_in_float32(engine):
    q, k, v = (rand((1, 2, 40, 32), s) for s in range(3))
    q[0, 0, 3, 5] = np.nan
    k[0, 1, 7, 0] = np.inf
    out = fastattn.attention(q, k, v)
    f32 = fastattn.attention(*(a.astype(np.float32) for a in (q, k, v)))
    assert np.array_equal(np.isnan(out.astype(np.float32)), np.isnan(f32))
    assert np.isnan(out.astype(np.float32)[0, 0, 3]).all()


def test_fully_hidden_rows_are_zeros_with_lse_minus_inf_or_the_sink(engine):
    q, k, v = (rand((1, 2, 20, 32), s) for s in range(3))
    mask = np.ones((20, 20), bool)
    mask[4] = False
    out, lse = fastattn.attention(q, k, v, mask=mask, return_lse=True)
    assert not out.astype(np.float32)[:, :, 4].any() and (lse[:, :, 4] == -np.inf).all()
    sinks = np.array([0.5, -1.0], np.float32)
    out, lse = fastattn.attention(q, k, v, mask=mask, sinks=sinks, return_lse=True)
    assert not out.astype(np.float32)[:, :, 4].any()
    assert np.array_equal(lse[0, :, 4], sinks)


def test_out_and_return_weights_and_gqa(engine):
    q = rand((2, 4, 50, 64), 0)
    k, v = rand((2, 2, 70, 64), 1), rand((2, 2, 70, 64), 2)
    want = fastattn.attention(q, k, v, causal=True)
    out = np.empty((2, 4, 50, 64), BF16)
    assert fastattn.attention(q, k, v, causal=True, out=out) is out
    assert np.array_equal(out.view(np.uint16), want.view(np.uint16))
    strided = np.empty((2, 4, 50, 128), BF16)[..., ::2]
    fastattn.attention(q, k, v, causal=True, out=strided)
    assert np.array_equal(strided.view(np.uint16), want.view(np.uint16))
    got, w = fastattn.attention(q, k, v, causal=True, return_weights=True)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    np.testing.assert_allclose(w.astype(np.float32).sum(-1), 1, atol=2e-2)
    with pytest.raises(ValueError, match="dtype bfloat16"):
        fastattn.attention(q, k, v, out=np.empty((2, 4, 50, 64), np.float32))


def test_awkward_layouts_and_broadcast_batches(engine):
    q = rand((3, 2, 40, 64), 0)
    k, v = rand((1, 2, 40, 64), 1), rand((1, 2, 40, 64), 2)
    want = fastattn.attention(q, np.broadcast_to(k, q.shape).copy(),
                              np.broadcast_to(v, q.shape).copy())
    assert np.array_equal(fastattn.attention(q, k, v).view(np.uint16), want.view(np.uint16))
    fq = np.asfortranarray(q)
    assert np.array_equal(fastattn.attention(fq, k, v).view(np.uint16), want.view(np.uint16))


def test_float16_widens_and_keeps_its_own_rounding():
    q, k, v = (rand((1, 2, 50, 64), s, np.float16) for s in range(3))
    out = fastattn.attention(q, k, v, causal=True)
    f32 = fastattn.attention(*(a.astype(np.float32) for a in (q, k, v)), causal=True)
    assert out.dtype == np.float16
    assert np.array_equal(out.view(np.uint16), f32.astype(np.float16).view(np.uint16))
    # float16 never runs through bfloat16 (fewer mantissa bits)
    assert _plan.plan_attention(q, k, v, None, True, None).lowp in (None, "float16")


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16)], ids=str)
def test_decoding_reads_16_bit_keys_in_place_bitwise_the_float32_step(dtype, monkeypatch):
    q = rand((2, 8, 1, 64), 0, np.float32)
    k, v = rand((2, 2, 700, 64), 1, dtype), rand((2, 2, 700, 64), 2, dtype)
    widened = [a.astype(np.float32) for a in (k, v)]
    want = fastattn.attention(q, *widened, softcap=5.0)
    seen = []
    real = kernels.decode
    monkeypatch.setattr(_run._kernels, "decode",
                        lambda q3, k3, v3, *rest, **kw: seen.append(k3) or real(q3, k3, v3, *rest, **kw))
    got = fastattn.attention(q, k, v, softcap=5.0)
    assert np.array_equal(got, want)
    assert seen and seen[0].itemsize == 2 and np.shares_memory(seen[0], k)  # no copy


# --------------------------------------------------------------------------- conversions

def test_the_kernels_16_bit_conversions_match_numpy_and_ml_dtypes():
    every = np.arange(65536, dtype=np.uint16)
    for kind, dtype in (("bfloat16", BF16), ("float16", np.dtype(np.float16))):
        widened = kernels.widen16(every, kind)
        want = every.view(dtype).astype(np.float32)
        assert np.array_equal(widened.view(np.uint32)[~np.isnan(want)],
                              want.view(np.uint32)[~np.isnan(want)])
        assert np.isnan(widened[np.isnan(want)]).all()
        rng = np.random.default_rng(0)
        x = np.concatenate([
            rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
            np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 1e-8, 2.98e-8,
                      5.96e-8, 6.1e-5, 3.4e38, 1.00390625, 1.005859375, 1e-40], np.float32)])
        with np.errstate(over="ignore", invalid="ignore"):
            want = x.astype(dtype)
        got = kernels.narrow16(x, kind)
        nan = np.isnan(x)
        assert np.array_equal(got[~nan], want.view(np.uint16)[~nan]), kind
        assert np.isnan(got[nan].view(dtype).astype(np.float32)).all()


# --------------------------------------------------------------------------- precision=

def test_precision_bfloat16_is_the_bfloat16_computation_kept_in_float32():
    q, k, v = (rand((2, 3, 70, 64), s, np.float32) for s in range(3))
    got = fastattn.attention(q, k, v, causal=True, precision="bfloat16")
    assert got.dtype == np.float32
    highest = fastattn.attention(q, k, v, causal=True)
    if _plan.ENGINE == "none":
        assert np.array_equal(got, highest)  # a permission: no engine, exact
    else:
        via_bf16 = fastattn.attention(*(a.astype(BF16) for a in (q, k, v)), causal=True)
        assert np.array_equal(got.astype(BF16).view(np.uint16), via_bf16.view(np.uint16))
        # the documented bound against the exact float32 inputs (their rounding included)
        ref = exact(q, k, v, causal=True)
        err = np.abs(got.astype(np.float64) - ref)
        assert err.max() <= 2.0**-7 * (np.abs(ref).max() + np.abs(v).max())
    assert np.array_equal(fastattn.attention(q, k, v, causal=True, precision="highest"), highest)


@pytest.mark.parametrize("kwargs", [{}, {"causal": True}, {"softcap": 3.0}])
def test_precision_bfloat16_is_within_the_weights_rounding_of_the_bfloat16_values(engine, kwargs):
    """A float32 result has no rounding of its own: the bound is the weights' rounding,
    u sum_j p_ij |v_j| (+ float32 sums), against float64 attention on the inputs rounded to
    bfloat16, which is what precision="bfloat16" computes with."""
    q, k = (rand((1, 2, 37, 40), s, np.float32, 2.0) for s in (1, 2))
    v = rand((1, 2, 70, 48), 3, np.float32)
    k = rand((1, 2, 70, 40), 2, np.float32, 2.0)
    got = fastattn.attention(q, k, v, precision="bfloat16", **kwargs)
    rounded = [a.astype(BF16).astype(np.float64) for a in (q, k, v)]
    if engine == "none":  # exact float32 on the unrounded values
        rounded = [a.astype(np.float64) for a in (q, k, v)]
    ref, w = reference.attention(*rounded, return_weights=True, **kwargs)
    weighted = np.asarray(w) @ np.abs(rounded[2])
    assert_within_bound(got, np.asarray(ref), rounded[2], engine, rounded_out=False,
                        weighted=1e-9 if engine == "none" else weighted)


def test_the_default_precision_and_bad_values():
    q, k, v = (rand((1, 2, 40, 32), s, np.float32) for s in range(3))
    assert fastattn.get_float32_precision() == "highest"
    old = fastattn.set_float32_precision("bfloat16")
    try:
        assert old == "highest" and fastattn.get_float32_precision() == "bfloat16"
        assert np.array_equal(fastattn.attention(q, k, v),
                              fastattn.attention(q, k, v, precision="bfloat16"))
        assert fastattn.MultiHeadAttention(*[np.eye(32, dtype=np.float32)] * 4,
                                           num_heads=1).precision is None  # read per call
    finally:
        fastattn.set_float32_precision(old)
    assert fastattn.get_float32_precision() == "highest"
    for bad in ("bf16", "medium", 3, None):
        with pytest.raises(ValueError, match="precision"):
            fastattn.set_float32_precision(bad)
    for bad in ("bf16", "bfloat16x3", 1):
        with pytest.raises(ValueError, match="precision"):
            fastattn.attention(q, k, v, precision=bad)
    # float64 and float16 inputs are not affected by precision
    q64 = q.astype(np.float64)
    assert np.array_equal(fastattn.attention(q64, q64, q64, precision="bfloat16"),
                          fastattn.attention(q64, q64, q64))


def test_precision_reaches_self_attention_and_multi_head_attention():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 50, 64)).astype(np.float32)
    w = [rng.standard_normal((64, 64)).astype(np.float32) / 8 for _ in range(4)]
    for precision in ("highest", "bfloat16"):
        mha = fastattn.MultiHeadAttention(*w, num_heads=2, precision=precision)
        q, k, v = (x @ wi for wi in w[:3])
        split = lambda a: a.reshape(2, 50, 2, 32).swapaxes(1, 2)
        heads = fastattn.attention(split(q), split(k), split(v), causal=True, precision=precision)
        np.testing.assert_allclose(mha(x, causal=True),
                                   heads.swapaxes(1, 2).reshape(2, 50, 64) @ w[3],
                                   rtol=1e-4, atol=1e-4)
        single = fastattn.self_attention(x, *w[:3], causal=True, precision=precision)
        assert np.array_equal(single, fastattn.attention(x @ w[0], x @ w[1], x @ w[2],
                                                         causal=True, precision=precision))
    with pytest.raises(ValueError, match="precision"):
        fastattn.MultiHeadAttention(*w, num_heads=2, precision="fast")


# --------------------------------------------------------------------------- engines

def test_engines_say_why_and_the_policy_refuses_one_that_cannot_run():
    status = kernels.engines()
    assert set(status) == set(kernels.ENGINES)
    assert status["none"] == "ok" and status["amx-emulated"] == "ok"
    before = kernels.policy()
    for name, why in status.items():
        if why != "ok":
            with pytest.raises(ValueError, match="engine"):
                kernels.set_policy(engine=kernels.ENGINES.index(name))
    with pytest.raises(ValueError, match="engine"):
        kernels.set_policy(engine=17)
    assert kernels.policy() == before
    assert _plan.ENGINE == kernels.ENGINES[before["engine"]]


def test_fastattn_engine_forces_one_and_refuses_what_cannot_run():
    env = dict(os.environ, FASTATTN_ENGINE="amx-emulated")
    code = "import fastattn._plan as p; print(p.ENGINE)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "amx-emulated", run.stderr
    env["FASTATTN_ENGINE"] = "warp-drive"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "FASTATTN_ENGINE='warp-drive'" in run.stderr
    if kernels.engines()["amx"] != "ok":
        env["FASTATTN_ENGINE"] = "amx"
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.returncode != 0 and "cannot run here" in run.stderr


@pytest.mark.parametrize("why", ["Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)",
                                 "a known product on the AMX tiles differed from the emulation's"])
def test_an_amx_engine_that_fails_its_first_contact_warns_and_is_not_chosen(monkeypatch, why):
    status = {"none": "ok", "avx512bf16": "ok", "amx": why, "amx-emulated": "ok"}
    monkeypatch.setattr(_plan._kernels, "engines", lambda: dict(status))
    with pytest.warns(RuntimeWarning, match="AMX engine is off for this process"):
        assert _plan.choose_engine("auto") == "avx512bf16"
    status["avx512bf16"] = "this CPU or build has no AVX512-BF16"
    with pytest.warns(RuntimeWarning, match="the float32 kernels"):
        assert _plan.choose_engine("") == "none"
    with pytest.raises(ImportError, match="cannot run here"):
        _plan.choose_engine("amx")
    status["amx"] = "ok"
    assert _plan.choose_engine("auto") == "amx"  # the first in the order, when it runs

"""Every public function against fastattn.reference over generated awkward inputs."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastattn
from fastattn import reference
from conftest import LAYOUTS, assert_close, with_layout

DTYPES = (np.float64, np.float32, np.float16, np.int32)


def compute_dtype(*dtypes):
    """docs/DESIGN.md's rule: float16 and float32 compute in float32, anything else in float64."""
    native = [np.dtype(d).newbyteorder("=") for d in dtypes]
    return np.float32 if all(d in (np.float32, np.float16) for d in native) else np.float64


def values(rng, shape, dtype, spread):
    if np.dtype(dtype).kind == "i":
        return rng.integers(-3, 4, size=shape).astype(dtype)
    return (rng.standard_normal(shape) * spread).astype(dtype)


@st.composite
def attention_cases(draw, with_v=True):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n_q = draw(st.integers(0, 9))
    n_k = draw(st.integers(0, 13))
    d = draw(st.integers(0, 6))
    d_v = draw(st.integers(0, 5))
    kind = draw(st.sampled_from(["none", "batch", "heads", "broadcast", "gqa", "gqa-batch"]))
    q_batch, kv_batch = {
        "none": ((), ()),
        "batch": ((2,), (2,)),
        "heads": ((2, 3), (2, 3)),
        "broadcast": ((3, 1, 2), (4, 1)),
        "gqa": ((4,), (2,)),
        "gqa-batch": ((2, 6), (1, 3)),
    }[kind]
    dtype = draw(st.sampled_from(DTYPES))
    spread = draw(st.sampled_from([0.1, 1.0, 3.0]))
    q = values(rng, q_batch + (n_q, d), dtype, spread)
    k = values(rng, kv_batch + (n_k, d), dtype, spread)
    v = values(rng, kv_batch + (n_k, d_v), dtype, 1.0)
    mask_kind = draw(st.sampled_from(["none", "bool", "bool-keys", "float", "float-batch"]))
    mask = None
    if mask_kind == "bool":
        mask = rng.random((n_q, n_k)) > 0.4
        if n_q:
            mask[rng.integers(n_q)] = False  # one fully masked query
    elif mask_kind == "bool-keys":
        mask = rng.random((n_k,)) > 0.3
    elif mask_kind == "float":
        mask = rng.standard_normal((n_q, n_k))
        mask[rng.random((n_q, n_k)) < 0.3] = -np.inf
    elif mask_kind == "float-batch":
        mask = rng.standard_normal((1,) * len(q_batch) + (n_q, 1)).astype(np.float32)
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    # softcap: small caps squash every score; sinks: one per query head (the last batch
    # axis of q), some -inf (no sink), some large enough to take most of the weight.
    sinks_kind = draw(st.sampled_from(["none", "none", "per-head", "scalar"]))
    sinks = None
    if sinks_kind == "per-head":
        sinks = rng.choice([-np.inf, -2.0, 0.0, 0.7, 5.0], size=q_batch[-1:]).astype(
            draw(st.sampled_from([np.float32, np.float64])))
    elif sinks_kind == "scalar":
        sinks = float(rng.choice([-np.inf, -1.0, 3.0]))
    case = dict(seed=seed, n_q=n_q, n_k=n_k, d=d, d_v=d_v, batch=kind, dtype=np.dtype(dtype).name,
                spread=spread, mask=mask_kind, layouts=layouts,
                causal=draw(st.booleans()),
                scale=draw(st.sampled_from([None, None, 0.0, 0.37, -1.5])),
                softcap=draw(st.sampled_from([None, None, 0.5, 5.0, 30.0])),
                sinks=sinks)
    arrays = [with_layout(a, lay) for a, lay in zip((q, k, v), layouts)]
    return case, arrays, mask


def snapshot(*arrays):
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def assert_unchanged(before, arrays, case):
    for b, a in zip(before, arrays):
        if b is not None:
            assert np.array_equal(b, a, equal_nan=True), f"{case}: an input was modified"


@given(attention_cases())
def test_attention_matches_reference(block_sizes, data):
    case, (q, k, v), mask = data
    before = snapshot(q, k, v, mask)
    out, weights, lse = fastattn.attention(q, k, v, mask=mask, causal=case["causal"],
                                           scale=case["scale"], softcap=case["softcap"],
                                           sinks=case["sinks"], return_weights=True,
                                           return_lse=True)
    assert_unchanged(before, (q, k, v, mask), case)
    r_out, r_weights, r_lse = reference.attention(
        q, k, v, mask=mask, causal=case["causal"], scale=case["scale"],
        softcap=case["softcap"], sinks=case["sinks"], return_weights=True, return_lse=True)
    compute = compute_dtype(q.dtype, k.dtype, v.dtype)
    expected_dtype = np.result_type(*(np.float64 if a.dtype.kind == "i" else a.dtype.newbyteorder("=")
                                      for a in (q, k, v)))
    assert out.dtype == expected_dtype, case
    msg = f"{case} [{block_sizes} blocks]"
    assert weights.dtype == expected_dtype and lse.dtype == compute, case
    assert_close(out, r_out, compute, msg + " out", magnitude=4)
    assert_close(weights, r_weights, compute, msg + " weights")
    assert_close(lse, r_lse, compute, msg + " lse", magnitude=50)


@given(attention_cases(with_v=False))
def test_scores_match_reference(block_sizes, data):
    case, (q, k, _), mask = data
    before = snapshot(q, k, mask)
    s = fastattn.scores(q, k, mask=mask, causal=case["causal"], scale=case["scale"],
                        softcap=case["softcap"])
    assert_unchanged(before, (q, k, mask), case)
    r = reference.scores(q, k, mask=mask, causal=case["causal"], scale=case["scale"],
                         softcap=case["softcap"])
    compute = compute_dtype(q.dtype, k.dtype)
    assert_close(s, r, compute, str(case), magnitude=50)


@st.composite
def softmax_cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    x = values(rng, shape, dtype, draw(st.sampled_from([0.5, 10.0, 1e4])))
    special = draw(st.sampled_from(["none", "neginf", "neginf-row", "nan", "posinf"]))
    if x.size and x.dtype.kind == "f":
        flat = x.reshape(-1)
        if special == "neginf":
            flat[rng.random(flat.size) < 0.3] = -np.inf
        elif special == "neginf-row":
            x[..., :] = -np.inf if x.ndim == 1 else x[..., :]
            x[(0,) * (x.ndim - 1)] = -np.inf
        elif special == "nan":
            flat[rng.integers(flat.size)] = np.nan
        elif special == "posinf":
            flat[rng.integers(flat.size)] = np.inf
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    layout = draw(st.sampled_from(LAYOUTS))
    case = dict(seed=seed, shape=shape, dtype=np.dtype(dtype).name, special=special, axis=axis, layout=layout)
    return case, with_layout(x, layout), axis


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@given(data=softmax_cases())
def test_softmax_matches_reference(log, data):
    case, x, axis = data
    before = snapshot(x)
    fn, ref = (fastattn.log_softmax, reference.log_softmax) if log else (fastattn.softmax, reference.softmax)
    y = fn(x, axis=axis)
    assert_unchanged(before, (x,), case)
    assert y.shape == x.shape and y.dtype == (np.float64 if x.dtype.kind == "i" else x.dtype.newbyteorder("="))
    r = ref(x, axis=axis)
    compute = compute_dtype(x.dtype)
    # log_softmax of logits near 1e4 is itself near 1e4: compare on that magnitude.
    mag = float(np.nanmax(np.abs(np.where(np.isfinite(x), x, 0)), initial=1.0)) if log else 1.0
    assert_close(y, r, compute, str(case), magnitude=mag)


@st.composite
def projection_cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lead = tuple(draw(st.lists(st.integers(0, 5), max_size=2)))
    d_in, d_out = draw(st.integers(0, 7)), draw(st.integers(0, 7))
    dtype = draw(st.sampled_from(DTYPES))
    x = values(rng, lead + (d_in,), dtype, 1.0)
    w = values(rng, (d_in, d_out), dtype, 1.0)
    b = values(rng, (d_out,), dtype, 1.0) if draw(st.booleans()) else None
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    case = dict(seed=seed, lead=lead, d_in=d_in, d_out=d_out, dtype=np.dtype(dtype).name,
                bias=b is not None, layouts=layouts)
    x, w = with_layout(x, layouts[0]), with_layout(w, layouts[1])
    b = None if b is None else with_layout(b, layouts[2])
    return case, x, w, b


@given(projection_cases())
def test_project_matches_reference(data):
    case, x, w, b = data
    before = snapshot(x, w, b)
    y = fastattn.project(x, w, b)
    assert_unchanged(before, (x, w, b), case)
    r = reference.project(x, w, b)
    compute = compute_dtype(x.dtype, w.dtype)
    assert_close(y, r, compute, str(case), magnitude=8)


@given(projection_cases(), st.booleans())
def test_self_attention_matches_reference(data, causal):
    case, x, w, b = data
    d_out = w.shape[1]
    rng = np.random.default_rng(case["seed"])
    w_k = rng.standard_normal(w.shape).astype(w.dtype)
    w_v = rng.standard_normal((w.shape[0], 3)).astype(w.dtype)
    y = fastattn.self_attention(x, w, w_k, w_v, b_q=b, b_v=np.ones(3), causal=causal)
    r = reference.self_attention(x, w, w_k, w_v,
                                 b_q=b, b_v=[1.0] * 3,
                                 causal=causal)
    compute = np.float64
    assert y.shape == x.shape[:-1] + (3,), case
    assert_close(y, r, compute if y.dtype == np.float64 else np.float32, f"{case} d_out={d_out}",
                 magnitude=8)

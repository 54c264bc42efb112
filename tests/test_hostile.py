"""Hostile inputs through every public function and its reference.

Every case either matches fastattn.reference or raises a ValueError/TypeError whose
message names an argument; nothing may crash, hang or return garbage.
"""

import re

import numpy as np
import pytest

import fastattn
from fastattn import reference
from conftest import assert_close
from hostile import _awkward_layouts, arrays, bad_values, special_values, wrong_ranks

RNG_SEED = 20261128
COUNTS = {}


def _compute(*values):
    dts = [np.asarray(v).dtype.newbyteorder("=") for v in values if v is not None]
    return np.float32 if dts and all(d in (np.float32, np.float16) for d in dts) else np.float64


def run_case(fn_name, case, fast, ref, names, compute, magnitude=4.0, zero_weight_nan=False):
    """Ask the reference first, then fast(): both raise (fastattn's message naming one of
    `names`), or both return and agree. An error of fastattn's where the reference
    computes a result is a failure, however well the message names its argument.

    zero_weight_nan: the case puts inf/NaN in the value of keys that may get weight
    exactly 0, where whether it reaches the output is documented as unspecified; then
    fastattn must agree wherever its result is finite and be NaN wherever the reference is.
    """
    COUNTS[fn_name] = COUNTS.get(fn_name, 0) + 1
    try:
        want, refused = ref(), None
    except (ValueError, TypeError) as exc:
        want, refused = None, exc
    try:
        got = fast()
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        assert refused is not None, \
            f"{fn_name} {case}: fastattn raised {type(exc).__name__}({msg!r}), the reference computed it"
        assert any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", msg) for n in names), \
            f"{fn_name} {case}: {type(exc).__name__}({msg!r}) names none of {names}"
        return "raised"
    assert refused is None, \
        f"{fn_name} {case}: fastattn returned a result, the reference raised {refused!r}"
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        if zero_weight_nan:
            g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
            assert np.all(np.isnan(g)[np.isnan(w)]), f"{fn_name} {case}: a NaN was lost"
            finite = np.isfinite(g)
            assert_close(g[finite], w[finite], compute, f"{fn_name} {case}", magnitude=magnitude)
        else:
            assert_close(g, w, compute, f"{fn_name} {case}", magnitude=magnitude)
    return "agreed"


ATTENTION_SHAPES = [
    ((3, 4), (5, 4), (5, 2)),
    ((0, 4), (5, 4), (5, 2)),        # L_q = 0
    ((3, 4), (0, 4), (0, 2)),        # L_k = 0
    ((3, 0), (5, 0), (5, 2)),        # D = 0
    ((3, 4), (5, 4), (5, 0)),        # D_v = 0
    ((0, 3, 4), (0, 5, 4), (0, 5, 2)),  # batch 0
    ((2, 1, 3, 4), (3, 5, 4), (1, 5, 2)),  # broadcast batch
    ((4, 3, 4), (2, 5, 4), (2, 5, 2)),   # grouped-query heads
    ((3, 4), (5, 3), (5, 2)),        # D mismatch
    ((3, 4), (5, 4), (6, 2)),        # L_k mismatch
    ((3, 3, 4), (2, 5, 4), (2, 5, 2)),   # heads that do not divide
]


def _assert_many_cases(before, *names, at_least=50):
    """Each of `names` ran at least `at_least` hostile cases since `before` (COUNTS then)."""
    for name in names:
        ran = COUNTS.get(name, 0) - before.get(name, 0)
        assert ran >= at_least, f"{name}: only {ran} hostile cases"


def test_attention_and_scores_on_hostile_inputs():
    before = dict(COUNTS)
    rng = np.random.default_rng(RNG_SEED)
    outcomes = {"raised": 0, "agreed": 0}
    for qs, ks, vs in ATTENTION_SHAPES:
        k = rng.standard_normal(ks)
        v = rng.standard_normal(vs)
        for label, q in list(arrays(qs, rng)) + list(special_values(qs, rng)):
            for causal in (False, True):
                case = f"q={label} k{ks} v{vs} causal={causal}"
                outcomes[run_case(
                    "attention", case,
                    lambda: fastattn.attention(q, k, v, causal=causal, return_lse=True),
                    lambda: reference.attention(q, k, v, causal=causal, return_lse=True),
                    ["q", "k", "v"], _compute(q, k, v), magnitude=1e5)] += 1
                run_case("scores", case, lambda: fastattn.scores(q, k, causal=causal),
                         lambda: reference.scores(q, k, causal=causal), ["q", "k"],
                         _compute(q, k), magnitude=1e5)
        q = rng.standard_normal(qs)
        for label, kk in special_values(ks, rng):
            # A NaN or inf key hidden by the causal mask must not reach the rows it is
            # hidden from: its score is replaced, not added to.
            run_case("attention", f"k={label} causal", lambda: fastattn.attention(q, kk, v, causal=True),
                     lambda: reference.attention(q, kk, v, causal=True), ["q", "k", "v"], np.float64,
                     magnitude=1e5)
        for label, kk in arrays(ks, rng):
            for vlabel, vv in arrays(vs, rng, dtypes=("float32", "int64")):
                run_case("attention", f"k={label} v={vlabel}",
                         lambda: fastattn.attention(q, kk, vv),
                         lambda: reference.attention(q, kk, vv), ["q", "k", "v"],
                         _compute(q, kk, vv))
    assert outcomes["raised"] and outcomes["agreed"]
    _assert_many_cases(before, "attention", "scores")


def test_attention_refuses_bad_values_and_ranks():
    rng = np.random.default_rng(RNG_SEED)
    good = {"q": rng.standard_normal((3, 4)), "k": rng.standard_normal((5, 4)),
            "v": rng.standard_normal((5, 2))}
    for arg in ("q", "k", "v"):
        for label, bad in list(bad_values(good[arg].shape)) + list(wrong_ranks(rng)):
            args = dict(good, **{arg: bad})
            COUNTS["attention"] = COUNTS.get("attention", 0) + 1
            if arg == "q" and label == "1-d":
                # One query vector of the right D is valid (the query axis is dropped);
                # the empty 1-D q above is still refused, its D being 0.
                assert fastattn.attention(**args).shape == (2,)
                continue
            with pytest.raises((ValueError, TypeError)) as info:
                fastattn.attention(**args)
            assert re.search(rf"\b{arg}\b", str(info.value)), f"{arg}={label}: {info.value!r}"


MASKS = [
    ("bool", lambda rng: rng.random((3, 5)) > 0.4),
    ("bool-all-false-row", lambda rng: np.array([[True] * 5, [False] * 5, [True, False] * 2 + [True]])),
    ("bool-keys", lambda rng: rng.random(5) > 0.3),
    ("bool-0d", lambda rng: np.bool_(True)),
    ("float", lambda rng: rng.standard_normal((3, 5))),
    ("float-neginf", lambda rng: np.where(rng.random((3, 5)) > 0.5, 0.0, -np.inf)),
    ("float-nan", lambda rng: np.where(rng.random((3, 5)) > 0.8, np.nan, 0.0)),
    ("float16", lambda rng: rng.standard_normal((1, 3, 5)).astype(np.float16)),
    ("float-batch", lambda rng: rng.standard_normal((2, 1, 5))),
    ("int", lambda rng: np.ones((3, 5), np.int64)),
    ("complex", lambda rng: np.ones((3, 5), complex)),
    ("object", lambda rng: np.ones((3, 5), object)),
    ("wrong-shape", lambda rng: np.ones((4, 5), bool)),
    ("wrong-keys", lambda rng: np.ones((3, 6), bool)),
    ("list", lambda rng: [[True] * 5] * 3),
]


def test_masks_of_every_kind():
    rng = np.random.default_rng(RNG_SEED)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 2))
    for label, make in MASKS:
        mask = make(rng)
        for layout_label, m in (_awkward_layouts(label, mask) if isinstance(mask, np.ndarray) and mask.ndim
                                else [(label, mask)]):
            for causal in (False, True):
                run_case("attention", f"mask={layout_label} causal={causal}",
                         lambda: fastattn.attention(q, k, v, mask=m, causal=causal),
                         lambda: reference.attention(q, k, v, mask=m, causal=causal),
                         ["mask"], np.float64)


def test_out_that_aliases_or_mismatches():
    rng = np.random.default_rng(RNG_SEED)
    buf = rng.standard_normal((3, 4))
    k, v = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    cases = [("aliases q", buf, buf), ("aliases k", buf, k[:3]), ("view of q", buf, buf[:, :]),
             ("wrong dtype", buf, np.empty((3, 4), np.float32)),
             ("wrong shape", buf, np.empty((4, 3))), ("list", buf, [[0.0] * 4] * 3)]
    for label, q, out in cases:
        COUNTS["attention"] = COUNTS.get("attention", 0) + 1
        before = q.copy()
        with pytest.raises((ValueError, TypeError), match=r"\bout\b"):
            fastattn.attention(q, k, v, out=out)
        assert np.array_equal(q, before), label
    x = rng.standard_normal((3, 4))
    for fn in (fastattn.softmax, fastattn.log_softmax):
        COUNTS[fn.__name__] = COUNTS.get(fn.__name__, 0) + 2
        with pytest.raises(ValueError, match=r"\bout\b"):
            fn(x, out=x[::-1])
        with pytest.raises(ValueError, match=r"\bout\b"):
            fn(x, out=np.empty((3, 4), np.float32))


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_on_hostile_inputs(log):
    before = dict(COUNTS)
    rng = np.random.default_rng(RNG_SEED)
    fast, ref = (fastattn.log_softmax, reference.log_softmax) if log else (fastattn.softmax, reference.softmax)
    name = "log_softmax" if log else "softmax"
    for shape in ((5,), (3, 4), (2, 0, 3), (0,), (1, 1), (2, 3, 4)):
        values = list(arrays(shape, rng)) + list(special_values(shape, rng))
        for label, x in values:
            for axis in range(-len(shape), len(shape)):
                run_case(name, f"x={label} axis={axis}", lambda: fast(x, axis=axis),
                         lambda: ref(x, axis=axis), ["x", "axis"], _compute(x), magnitude=1e5)
        for label, bad in bad_values(shape):
            run_case(name, f"x={label}", lambda: fast(bad), lambda: ref(bad), ["x"], np.float64)
    for label, x in wrong_ranks(rng):
        run_case(name, f"x={label}", lambda: fast(x), lambda: ref(x), ["x", "axis"], np.float64)
    for axis in (5, -5, 1.0, "0", None):
        run_case(name, f"axis={axis!r}", lambda: fast(np.ones((2, 3)), axis=axis),
                 lambda: ref(np.ones((2, 3)), axis=axis), ["axis"], np.float64)
    _assert_many_cases(before, name)


def test_project_and_self_attention_on_hostile_inputs():
    before = dict(COUNTS)
    rng = np.random.default_rng(RNG_SEED)
    for xs, ws in (((4, 3), (3, 2)), ((3,), (3, 2)), ((0, 3), (3, 2)), ((4, 0), (0, 2)),
                   ((4, 3), (3, 0)), ((2, 4, 3), (3, 2)), ((4, 3), (2, 2)), ((4, 3), (3,))):
        w = rng.standard_normal(ws)
        for label, x in list(arrays(xs, rng)) + list(special_values(xs, rng)):
            run_case("project", f"x={label} w{ws}", lambda: fastattn.project(x, w),
                     lambda: reference.project(x, w), ["x", "w"], _compute(x, w), magnitude=1e5)
            if len(ws) == 2:
                # Non-finite x reaches v: a key with weight 0 (hidden, or scored -inf) may
                # then hold inf/NaN in its value, which the README leaves unspecified.
                run_case("self_attention", f"x={label} w{ws}",
                         lambda: fastattn.self_attention(x, w, w, w, causal=True),
                         lambda: reference.self_attention(x, w, w, w, causal=True),
                         ["x", "w_q", "w_k", "w_v"], _compute(x, w), magnitude=1e5,
                         zero_weight_nan=not np.isfinite(x).all())
        for label, bad in list(bad_values(xs)) + list(wrong_ranks(rng)):
            run_case("project", f"x={label}", lambda: fastattn.project(bad, w),
                     lambda: reference.project(bad, w), ["x", "w"], np.float64)
            run_case("project", f"w={label}", lambda: fastattn.project(rng.standard_normal(xs), bad),
                     lambda: reference.project(rng.standard_normal(xs), bad), ["x", "w"], np.float64)
    _assert_many_cases(before, "project", "self_attention")

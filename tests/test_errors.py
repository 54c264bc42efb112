"""Each documented error: a ValueError or TypeError whose message names the argument."""

import numpy as np
import pytest

import fastattn

Q = np.ones((2, 3, 4))
K = np.ones((2, 5, 4))
V = np.ones((2, 5, 6))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(q=np.ones(3)), ValueError, ["q.shape=(3,)", "one query vector", "k.shape=(2, 5, 4)"]),
    (dict(q=np.ones(())), ValueError, ["q", "()"]),
    (dict(k=np.ones(4)), ValueError, ["k", "(4,)"]),
    (dict(v=np.float64(1.0)), ValueError, ["v", "()"]),
    (dict(k=np.ones((2, 5, 3))), ValueError, ["q", "k", "(2, 3, 4)", "(2, 5, 3)"]),
    (dict(v=np.ones((2, 6, 6))), ValueError, ["k", "v", "(2, 5, 4)", "(2, 6, 6)"]),
    (dict(q=np.ones((3, 3, 4))), ValueError, ["head axis", "q.shape=(3, 3, 4)", "k.shape=(2, 5, 4)"]),
    (dict(q=np.ones((3, 2, 3, 4)), k=np.ones((2, 2, 5, 4)), v=np.ones((2, 2, 5, 6))), ValueError, ["broadcast"]),
    (dict(q=np.ones((5, 3, 4)), k=np.ones((2, 5, 4))), ValueError, ["head axis", "q.shape", "k.shape"]),
    (dict(mask=np.ones((4, 5), bool)), ValueError, ["mask", "(4, 5)"]),
    (dict(mask=np.ones((3, 5), np.int64)), TypeError, ["mask", "int64"]),
    (dict(mask=np.ones((3, 5), complex)), TypeError, ["mask", "complex128"]),
    (dict(q=Q.astype(complex)), TypeError, ["q", "complex128"]),
    (dict(k=K.astype(object)), TypeError, ["k", "object"]),
    (dict(v=np.full((2, 5, 6), "a")), TypeError, ["v", "<U1"]),
    (dict(q=Q.astype(np.longdouble)), TypeError, ["q", "float128"]),
    (dict(q=[[1.0, 2.0], [1.0]]), ValueError, ["q"]),
    (dict(scale=float("nan")), ValueError, ["scale", "nan"]),
    (dict(scale="1"), TypeError, ["scale"]),
    (dict(causal=1), TypeError, ["causal"]),
    (dict(num_threads=0), ValueError, ["num_threads", "0"]),
    (dict(num_threads=1.5), TypeError, ["num_threads"]),
    (dict(num_threads=True), TypeError, ["num_threads"]),
    (dict(return_weights="yes"), TypeError, ["return_weights"]),
    (dict(out=np.empty((2, 3, 5))), ValueError, ["out", "(2, 3, 6)", "(2, 3, 5)"]),
    (dict(out=np.empty((2, 3, 6), np.float32)), ValueError, ["out", "float64", "float32"]),
    (dict(out=[0.0]), TypeError, ["out", "list"]),
    (dict(softcap=0), ValueError, ["softcap", "> 0"]),
    (dict(softcap=-2.0), ValueError, ["softcap", "-2.0"]),
    (dict(softcap=float("nan")), ValueError, ["softcap", "nan"]),
    (dict(softcap=float("inf")), ValueError, ["softcap", "inf"]),
    (dict(softcap="30"), TypeError, ["softcap", "'30'"]),
    (dict(softcap=True), TypeError, ["softcap"]),
    (dict(softcap=1j), TypeError, ["softcap"]),
    (dict(sinks=np.zeros(3)), ValueError, ["sinks", "(3,)", "(2,)"]),
    (dict(sinks=np.zeros((2, 2))), ValueError, ["sinks", "(2, 2)"]),
    (dict(sinks=np.array([0.0, np.nan])), ValueError, ["sinks", "NaN"]),
    (dict(sinks=np.array([0.0, np.inf])), ValueError, ["sinks", "+inf"]),
    (dict(sinks=np.zeros(2, complex)), TypeError, ["sinks", "complex128"]),
    (dict(sinks=np.zeros(2, bool)), TypeError, ["sinks", "bool"]),
    (dict(sinks=["a", "b"]), TypeError, ["sinks", "<U1"]),
    (dict(sinks=[[1.0], [1.0, 2.0]]), ValueError, ["sinks"]),
])
def test_attention_errors_name_the_argument(kwargs, exc, words):
    args = dict(q=Q, k=K, v=V)
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc) as info:
        fastattn.attention(q, k, v, **args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value!r}"


def test_out_overlapping_an_input_is_rejected():
    q, k, v = np.ones((3, 4)), np.ones((5, 4)), np.ones((5, 4))
    with pytest.raises(ValueError, match="out overlaps the input q"):
        fastattn.attention(q, k, v, out=q[:3])
    buf = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="overlaps"):
        fastattn.attention(buf[0], k, v, out=buf[0])
    x = np.ones((3, 3))
    with pytest.raises(ValueError, match="overlaps"):
        fastattn.softmax(x, out=x)
    with pytest.raises(ValueError, match="overlaps"):
        fastattn.project(x, np.eye(3), out=x)
    ro = np.empty((3, 4))
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        fastattn.attention(q, k, v, out=ro)


@pytest.mark.parametrize("axis", [2, -3, 10])
def test_softmax_bad_axis(axis):
    with pytest.raises(ValueError, match=f"axis {axis}"):
        fastattn.softmax(np.ones((2, 3)), axis=axis)
    with pytest.raises(ValueError, match="axis"):
        fastattn.log_softmax(np.ones((2, 3)), axis=axis)


def test_softmax_errors():
    with pytest.raises(TypeError, match="axis"):
        fastattn.softmax(np.ones(3), axis=0.5)
    with pytest.raises(TypeError, match="x.*complex128"):
        fastattn.softmax(np.ones(3, complex))
    with pytest.raises(ValueError, match="axis"):
        fastattn.softmax(np.float64(2.0))
    with pytest.raises(ValueError, match="out"):
        fastattn.softmax(np.ones(3), out=np.empty(4))


def test_project_errors():
    with pytest.raises(ValueError, match=r"x and w.*\(2, 3\).*\(4, 5\)"):
        fastattn.project(np.ones((2, 3)), np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"w must be 2-D.*\(3,\)"):
        fastattn.project(np.ones((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match=r"b must have shape \(5,\).*\(4,\)"):
        fastattn.project(np.ones((2, 3)), np.ones((3, 5)), np.ones(4))
    with pytest.raises(ValueError, match="x must have at least 1"):
        fastattn.project(np.float64(1), np.ones((1, 5)))
    with pytest.raises(TypeError, match="w.*object"):
        fastattn.project(np.ones(3), np.ones((3, 2), object))


def test_self_attention_errors():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match=r"w_k must have shape \(d_model, d_out\)"):
        fastattn.self_attention(x, np.ones((3, 2)), np.ones((4, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="w_q and w_k"):
        fastattn.self_attention(x, np.ones((3, 2)), np.ones((3, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"b_v must have shape \(2,\)"):
        fastattn.self_attention(x, np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 2)), b_v=np.ones(3))
    with pytest.raises(ValueError, match="out"):
        fastattn.self_attention(x[0], np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 2)), out=np.empty(3))


def test_multi_head_attention_errors():
    w = np.ones((8, 8))
    with pytest.raises(ValueError, match="num_heads"):
        fastattn.MultiHeadAttention(w, w, w, w, num_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        fastattn.MultiHeadAttention(w, w, w, w, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="w_k and w_v"):
        fastattn.MultiHeadAttention(w, w[:, :4], w, w, num_heads=4)
    with pytest.raises(ValueError, match="w_o"):
        fastattn.MultiHeadAttention(w, w, w, w[:4], num_heads=4)
    with pytest.raises(ValueError, match="b_o"):
        fastattn.MultiHeadAttention(w, w, w, w, num_heads=4, b_o=np.ones(3))
    with pytest.raises(ValueError, match="bias_k"):
        fastattn.MultiHeadAttention.from_torch_state_dict(
            {"in_proj_weight": np.ones((24, 8)), "bias_k": np.ones((1, 1, 8)),
             "out_proj.weight": w}, num_heads=2)


def test_merge_attention_errors():
    out, lse = np.ones((3, 2)), np.zeros(3)
    with pytest.raises(ValueError, match=r"out_a and out_b.*\(3, 2\).*\(3, 3\)"):
        fastattn.merge_attention(out, lse, np.ones((3, 3)), lse)
    with pytest.raises(ValueError, match=r"lse_a and lse_b must have shape \(3,\)"):
        fastattn.merge_attention(out, np.zeros(4), out, lse)
    with pytest.raises(TypeError, match=r"lse_b.*complex128"):
        fastattn.merge_attention(out, lse, out, lse.astype(complex))


@pytest.mark.parametrize("make,name", [
    (lambda n: fastattn.attention(Q, K, V, num_threads=n), "num_threads"),
    (lambda n: fastattn.attention(Q, K, V, causal=True, window=n), "window"),
    (lambda n: fastattn.KVCache(n, 1, 4, 4), "batch"),
    (lambda n: fastattn.KVCache(1, n, 4, 4), "kv_heads"),
    (lambda n: fastattn.KVCache(1, 1, n, 4), "capacity"),
    (lambda n: fastattn.KVCache(1, 1, 4, n), "head_dim"),
    (lambda n: fastattn.KVCache(1, 1, 4, 4, value_dim=n), "value_dim"),
    (lambda n: fastattn.KVCache(1, 1, 4, 4, window=n), "window"),
    (lambda n: fastattn.MultiHeadAttention(*[np.ones((8, 8))] * 4, num_heads=n), "num_heads"),
    (lambda n: fastattn.MultiHeadAttention(*[np.ones((8, 8))] * 4, num_heads=4, num_kv_heads=n),
     "num_kv_heads"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_every_count_argument_follows_one_rule(make, name):
    # One rule for every argument that counts something: TypeError for what is not an
    # integer (bools and floats included), ValueError for an integer below 1.
    for bad in (1.5, True, "2", np.float64(2.0)):
        with pytest.raises(TypeError, match=f"{name} must be a positive integer"):
            make(bad)
    for bad in (0, -3, np.int64(0)):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            make(bad)


def test_forgotten_v_says_so():
    with pytest.raises(TypeError, match="attention needs v"):
        fastattn.attention(Q, K)
    with pytest.raises(TypeError, match="attention needs k and v"):
        fastattn.attention(Q)

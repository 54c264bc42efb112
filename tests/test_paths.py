"""Every way a call can run gives the answer of the general path.

- The compiled small-call path (attention(q, k, v[, causal]) on small C-contiguous arrays)
  is bitwise the general path, and anything it does not take falls back to the general
  path's validation, with its errors.
- Tile GEMMs in this build's micro-kernels and in BLAS (FASTATTN_TILE_GEMM=blas) both
  agree with the float64 oracle, for float32 and float64, on head sizes and row/key counts
  that cross every register-block edge. CI also runs the whole suite with
  FASTATTN_TILE_GEMM=blas and with each instruction-set build the machine runs.
"""

import numpy as np
import pytest

import fastattn
from fastattn import _plan, _run
from conftest import assert_close, float64_attention, kernel_policy
from hostile import _awkward_layouts, bad_values, wrong_ranks


@pytest.fixture
def spy_small(monkeypatch):
    """Record what each small-call attempt returned (None: it fell back)."""
    taken = []
    small = _run.small_attention
    monkeypatch.setattr(_run, "small_attention",
                        lambda *args: taken.append(small(*args)) or taken[-1])
    return taken


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3), (16, 64), (1, 1, 16, 64), (2, 3, 7, 24), (5, 33, 16),
                                   (2, 2, 40, 48)])
@pytest.mark.parametrize("causal", [False, True])
def test_small_call_path_is_bitwise_the_general_path(block_sizes, spy_small, dtype, shape, causal):
    rng = np.random.default_rng(sum(shape))
    q = rng.standard_normal(shape).astype(dtype)
    k = rng.standard_normal(shape[:-2] + (shape[-2] + 3, shape[-1])).astype(dtype)
    v = rng.standard_normal(shape[:-2] + (shape[-2] + 3, shape[-1] + 8)).astype(dtype)
    fast = fastattn.attention(q, k, v, causal=causal)
    assert spy_small and spy_small[-1] is not None, "the small-call path did not run"
    assert np.array_equal(fastattn.attention(q, k, v, causal=causal, num_threads=2), fast)
    assert len(spy_small) == 2 and spy_small[-1] is not None  # a valid num_threads: same path
    general = fastattn.attention(q, k, v, causal=causal, return_lse=True)[0]  # general path
    assert len(spy_small) == 2
    assert fast.dtype == dtype and fast.shape == shape[:-1] + (v.shape[-1],)
    assert np.array_equal(fast, general), f"{shape} causal={causal}"
    expected = float64_attention(q, k, v, None if not causal else
                                 np.tril(np.ones((shape[-2], k.shape[-2]), bool), k.shape[-2] - shape[-2]))[0]
    assert_close(fast, expected, dtype, f"{shape} causal={causal}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,n_keys", [((1, 32, 1, 128), 128), ((3, 1, 16), 700),
                                          ((1, 1, 1, 8), 1), ((2, 1, 24), 1025)])
@pytest.mark.parametrize("num_threads", [None, 1, 2])
def test_one_query_takes_the_compiled_decoding_path_bitwise(spy_small, dtype, shape, n_keys,
                                                            num_threads):
    # One query per batch entry (a decoding step on plain arrays) runs the decoding kernel
    # straight from the compiled path: same kernel, chunks and thread rule as the general
    # path, so the same bits and the same team. 700, 1025 keys: two and three chunks.
    rng = np.random.default_rng(n_keys)
    q = rng.standard_normal(shape).astype(dtype)
    k = rng.standard_normal(shape[:-2] + (n_keys, shape[-1])).astype(dtype)
    v = rng.standard_normal(shape[:-2] + (n_keys, shape[-1] + 8)).astype(dtype)
    for causal in (False, True):  # one query, the newest: causal hides nothing
        fast = fastattn.attention(q, k, v, causal=causal, num_threads=num_threads)
        assert spy_small and spy_small[-1] is not None, "the compiled path did not run"
        fast_threads = _run.last_call.threads
        general, lse = fastattn.attention(q, k, v, causal=causal, num_threads=num_threads,
                                          return_lse=True)
        assert _run.last_call.threads == fast_threads
        assert fast.dtype == dtype and fast.shape == shape[:-1] + (v.shape[-1],)
        assert np.array_equal(fast, general), f"{shape} {n_keys} causal={causal}"
    assert_close(fast, float64_attention(q, k, v)[0], dtype, f"{shape} {n_keys}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q_shape,kv_heads,n_keys", [((1, 8, 1, 64), 2, 130), ((2, 6, 1, 128), 1, 700),
                                                     ((3, 4, 1, 24), 4, 5), ((12, 1, 16), 3, 1025)])
@pytest.mark.parametrize("scale", [None, 128 ** -0.5, -0.3])
def test_grouped_heads_and_a_float_scale_take_the_compiled_decoding_path(spy_small, dtype, q_shape,
                                                                         kv_heads, n_keys, scale):
    # A decoding step of a grouped-query model (k, v with fewer heads, as transformers
    # passes them) with an explicit float scale (transformers passes head_dim ** -0.5,
    # which is not always 1 / sqrt(head_dim) to the last bit): the compiled path, bitwise
    # the general path.
    rng = np.random.default_rng(n_keys)
    q = rng.standard_normal(q_shape).astype(dtype)
    kv_shape = q_shape[:-3] + (kv_heads, n_keys)
    k = rng.standard_normal(kv_shape + (q_shape[-1],)).astype(dtype)
    v = rng.standard_normal(kv_shape + (q_shape[-1] + 8,)).astype(dtype)
    fast = fastattn.attention(q, k, v, scale=scale, causal=True)
    assert spy_small and spy_small[-1] is not None, "the compiled path did not run"
    general = fastattn.attention(q, k, v, scale=scale, causal=True, return_lse=True)[0]
    assert np.array_equal(fast, general), f"{q_shape} {kv_heads} {n_keys} {scale}"
    if scale is None:
        assert_close(fast, float64_attention(q, k, v)[0], dtype, f"{q_shape} {kv_heads}")
    else:  # the oracle's scale is 1 / sqrt(D): give it q scaled to match
        q_scaled = q.astype(np.float64) * scale * np.sqrt(q_shape[-1])
        assert_close(fast, float64_attention(q_scaled, k, v)[0], dtype, f"{q_shape} {kv_heads}")
    # What the compiled path must leave to the general one (which validates it)
    for label, kwargs in {"NumPy float scale": {"scale": np.float64(0.25)},
                          "integer scale": {"scale": 1}, "inf scale": {"scale": float("inf")},
                          "NaN scale": {"scale": float("nan")}}.items():
        spy_small.clear()
        try:
            got = fastattn.attention(q, k, v, **kwargs)
        except ValueError as e:
            assert "scale must be finite" in str(e), label
        else:
            assert np.array_equal(got, fastattn.attention(q, k, v, return_lse=True, **kwargs)[0])
        assert spy_small == [], label


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kv_heads,n_keys,window", [(8, 700, 1), (8, 700, 512), (2, 700, 699),
                                                    (2, 700, 700), (2, 40, 5000), (1, 1100, 600)])
def test_a_window_in_a_decoding_step_is_its_last_keys(spy_small, dtype, kv_heads, n_keys, window):
    # One query under causal is the newest: with window=W it sees exactly the last W keys.
    # Both paths read only those (the decoding kernel, on views), bitwise the call without
    # the window on the last W keys, and that is the oracle's attention with the mask.
    rng = np.random.default_rng(window)
    q = rng.standard_normal((2, 8, 1, 64)).astype(dtype)
    k = rng.standard_normal((2, kv_heads, n_keys, 64)).astype(dtype)
    v = rng.standard_normal((2, kv_heads, n_keys, 72)).astype(dtype)
    fast = fastattn.attention(q, k, v, causal=True, window=window)
    assert spy_small and spy_small[-1] is not None, "the compiled path did not run"
    general, lse = fastattn.attention(q, k, v, causal=True, window=window, return_lse=True)
    last = fastattn.attention(q, k[..., -window:, :], v[..., -window:, :], return_lse=True)
    assert np.array_equal(fast, general) and np.array_equal(general, last[0])
    assert np.array_equal(lse, last[1])
    seen = np.arange(n_keys) >= n_keys - window
    assert_close(fast, float64_attention(q, k, v, np.broadcast_to(seen, (1, n_keys)))[0], dtype,
                 f"{kv_heads} {n_keys} {window}")
    # the weights keep every key's column: zeros outside the window (the fused kernel)
    weights = fastattn.attention(q, k, v, causal=True, window=window, return_weights=True)[1]
    assert weights.shape[-1] == n_keys and not weights[..., ~seen].any()
    for label, kwargs in {"NumPy int window": {"window": np.int64(window), "causal": True},
                          "window without causal": {"window": window},
                          "zero window": {"window": 0, "causal": True},
                          "bool window": {"window": True, "causal": True}}.items():
        spy_small.clear()
        try:
            got = fastattn.attention(q, k, v, **kwargs)
        except (TypeError, ValueError) as e:
            with pytest.raises(type(e)) as general_error:
                fastattn.attention(q, k, v, return_lse=True, **kwargs)
            assert str(general_error.value) == str(e), label
        else:
            assert np.array_equal(got, fast), label
        assert spy_small == [], label


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kv_heads,n_keys", [(8, 700), (2, 130), (1, 1025)])
@pytest.mark.parametrize("softcap", [None, 50.0, 0.5])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_soft_cap_and_sinks_in_a_decoding_step_take_the_compiled_path(spy_small, dtype, kv_heads,
                                                                      n_keys, softcap, with_sinks):
    # Gemma 2's soft cap and GPT-OSS's sinks (one per query head, shape (H,)): the
    # compiled path, bitwise the general path; what it cannot take falls back to it.
    rng = np.random.default_rng(n_keys)
    q = rng.standard_normal((3, 8, 1, 32)).astype(dtype) * 3
    k = rng.standard_normal((3, kv_heads, n_keys, 32)).astype(dtype)
    v = rng.standard_normal((3, kv_heads, n_keys, 40)).astype(dtype)
    sinks = rng.standard_normal(8).astype(dtype) if with_sinks else None
    if with_sinks:
        sinks[1] = -np.inf  # a head without a sink
    fast = fastattn.attention(q, k, v, causal=True, window=n_keys - 3, softcap=softcap,
                              sinks=sinks)
    assert spy_small and spy_small[-1] is not None, "the compiled path did not run"
    general = fastattn.attention(q, k, v, causal=True, window=n_keys - 3, softcap=softcap,
                                 sinks=sinks, return_lse=True)[0]
    assert np.array_equal(fast, general)
    if not with_sinks:
        return
    others = {"NaN sink": np.where(np.arange(8) == 3, np.nan, sinks).astype(dtype),
              "+inf sink": np.where(np.arange(8) == 3, np.inf, sinks).astype(dtype),
              "wrong length": sinks[:4], "other dtype": sinks.astype(np.float16),
              "per batch entry": np.broadcast_to(sinks, (3, 8)).copy(), "a list": list(sinks),
              "strided": np.repeat(sinks, 2)[::2], "0-d": sinks[0]}
    for label, bad in others.items():
        spy_small.clear()
        try:
            got = fastattn.attention(q, k, v, softcap=softcap, sinks=bad)
        except (TypeError, ValueError) as e:
            with pytest.raises(type(e)) as general_error:
                fastattn.attention(q, k, v, softcap=softcap, sinks=bad, return_lse=True)
            assert str(general_error.value) == str(e), label
            assert label in ("NaN sink", "+inf sink", "wrong length"), label
        else:
            expected = fastattn.attention(q, k, v, softcap=softcap, sinks=bad, return_lse=True)[0]
            assert np.array_equal(got, expected), label
        assert spy_small == [None] or label in ("a list", "0-d", "other dtype"), label
    for label, cap in {"NumPy float cap": np.float64(2.0), "int cap": 2, "zero cap": 0.0,
                       "NaN cap": float("nan"), "inf cap": float("inf")}.items():
        spy_small.clear()
        try:
            got = fastattn.attention(q, k, v, softcap=cap, sinks=sinks)
        except (TypeError, ValueError) as e:
            assert "softcap" in str(e), label
        else:
            assert np.array_equal(got, fastattn.attention(q, k, v, softcap=cap, sinks=sinks,
                                                          return_lse=True)[0]), label
        assert spy_small == [], label


def test_small_call_path_falls_back_for_everything_else(spy_small):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 8, 16)) for _ in range(3))
    others = {
        "float16": (q.astype(np.float16), k, v),
        "mixed dtypes": (q.astype(np.float32), k, v),
        "one query, broadcast keys": (q[:, :1], k[:1], v[:1]),
        "broadcast batch": (q, k[:1], v[:1]),
        "grouped heads": (np.stack([q, q], 1), k[:, None], v[:, None]),
        "lists": (q.tolist(), k, v),
        "integers": (q.astype(np.int64), k, v),
        "too large for one thread": tuple(rng.standard_normal((8, 256, 64)) for _ in range(3)),
    }
    for label, a in _awkward_layouts("fortran etc.", q):
        others[label] = (a, k, v)
    for label, (qq, kk, vv) in others.items():
        spy_small.clear()
        got = fastattn.attention(qq, kk, vv)
        if label not in ("fortran etc.", "fortran etc. readonly"):
            # Layouts and dtypes the small path does not take go to the general path.
            assert spy_small == [None], label
        expected = fastattn.attention(qq, kk, vv, return_lse=True)[0]  # the general path
        assert np.array_equal(got, expected), label


@pytest.mark.parametrize("n_queries", [4, 1])  # the fused kernel's small calls, decoding's
def test_small_call_path_never_raises_and_errors_are_the_general_paths(n_queries):
    good = np.ones((2, n_queries, 8))
    kv = np.ones((2, 4, 8))
    for label, bad in list(bad_values(good.shape)) + list(wrong_ranks(np.random.default_rng(0))):
        for args in ((bad, kv, kv), (good, bad, kv), (good, kv, bad)):
            assert _run.small_attention(*args, False, None, None, None, None, None) is None, label
            with pytest.raises((TypeError, ValueError)) as fast:
                fastattn.attention(*args)
            with pytest.raises(type(fast.value)) as general:
                fastattn.attention(*args, return_lse=True)
            assert str(fast.value) == str(general.value), label
    for args in ((good, np.ones((2, 5, 8)), np.ones((2, 6, 8))), (good, np.ones((2, 4, 7)), good),
                 (good, np.ones((3, 4, 8)), np.ones((3, 4, 8)))):
        with pytest.raises(ValueError) as fast:
            fastattn.attention(*args)
        with pytest.raises(ValueError) as general:
            fastattn.attention(*args, return_lse=True)
        assert str(fast.value) == str(general.value)


@pytest.fixture(params=["micro", "blas"])
def tile_gemm(request):
    """Each way a tile's GEMMs run: this build's micro-kernels (where it has them) or BLAS,
    whatever this machine's tuning chose."""
    with kernel_policy(**_plan.policy_for(_plan.TUNED, request.param)):
        yield request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d,d_v", [(8, 8), (16, 24), (64, 64), (72, 40), (128, 128), (12, 20)])
@pytest.mark.parametrize("n_q,n_k", [(2, 1), (7, 17), (13, 70), (97, 300)])
def test_every_tile_variant_agrees_with_the_oracle(tile_gemm, block_sizes, dtype, d, d_v, n_q, n_k):
    # Row counts around the register blocks (6 and 8 rows), key counts around the packed
    # key panels (8, 16 and 32 keys) and head sizes of 1, 2 and more vectors and none.
    rng = np.random.default_rng(d * 1000 + n_k)
    q = rng.standard_normal((2, n_q, d)).astype(dtype)
    k = rng.standard_normal((2, n_k, d)).astype(dtype)
    v = rng.standard_normal((2, n_k, d_v)).astype(dtype)
    keep = rng.random((n_q, n_k)) > 0.3
    i, j = np.arange(n_q)[:, None] + (n_k - n_q), np.arange(n_k)[None, :]
    for label, kwargs, mask in (("plain", {}, None), ("causal", {"causal": True}, j <= i),
                                ("bool mask", {"mask": keep}, keep)):
        for threads in (1, 2):
            out = fastattn.attention(q, k, v, num_threads=threads, **kwargs)
            assert out.dtype == dtype
            assert_close(out, float64_attention(q, k, v, mask)[0], dtype,
                         f"{tile_gemm} {label} d={d} d_v={d_v} threads={threads}", magnitude=4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kwargs", [{}, {"causal": True}, {"causal": True, "window": 37},
                                    {"softcap": 5.0, "mask": "bool"}])
def test_a_call_in_pieces_is_bitwise_one_call(monkeypatch, block_sizes, dtype, kwargs):
    # A long call runs in pieces (for Ctrl-C) that share one scratch, in which each thread
    # keeps the keys it packed: a piece must start from them exactly as a one-piece call
    # would have. Grouped heads (4 over 2), so a thread's next item may be another head.
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 4, 300, 64)).astype(dtype)
    k, v = (rng.standard_normal((2, 2, 333, 64)).astype(dtype) for _ in range(2))
    if kwargs.get("mask") == "bool":
        kwargs = {**kwargs, "mask": rng.random((300, 333)) > 0.2}
    calls = []
    kernel = _run._kernels.attention
    monkeypatch.setattr(_run._kernels, "attention",
                        lambda *args: calls.append(args) or kernel(*args))
    one, lse_one = fastattn.attention(q, k, v, num_threads=2, return_lse=True, **kwargs)
    assert len(calls) == 1 and calls[0][-1] is None
    monkeypatch.setattr(_run, "PIECE_FLOPS", 1.0)  # pieces of one item per thread
    calls.clear()
    pieces, lse_pieces = fastattn.attention(q, k, v, num_threads=2, return_lse=True, **kwargs)
    assert len(calls) > 2 and all(c[-1] is calls[0][-1] is not None for c in calls)
    assert np.array_equal(one, pieces) and np.array_equal(lse_one, lse_pieces)
    # A scratch too small for the call's sizes is refused, not overrun.
    with pytest.raises(ValueError, match="scratch"):
        kernel(*calls[0][:-1], np.zeros(64, np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kwargs", [{}, {"causal": True}, {"causal": True, "window": 700}])
def test_keys_beyond_a_threads_packing_room(block_sizes, dtype, kwargs):
    # A thread keeps at most 16 MiB of a head's packed keys, and as much of its packed
    # values (the kernel's KP_MAX_BYTES and VP_MAX_BYTES): 4,096 keys of D 1024 in float32,
    # 2,048 in float64. Past that, its tiles pack the keys and values again in runs; with
    # the tiny tiles, runs restart mid-panel (mid-chunk) and at every query block.
    rng = np.random.default_rng(9)
    n_q, n_k, d = 24, 4100 if dtype == np.float32 else 2200, 1024
    q = rng.standard_normal((2, n_q, d)).astype(dtype)
    k, v = (rng.standard_normal((2, n_k, d)).astype(dtype) for _ in range(2))
    i, j = np.arange(n_q)[:, None] + (n_k - n_q), np.arange(n_k)[None, :]
    mask = None
    if kwargs.get("causal"):
        mask = (j <= i) & (j > i - kwargs.get("window", n_k))
    out = fastattn.attention(q, k, v, num_threads=2, **kwargs)
    assert_close(out, float64_attention(q, k, v, mask)[0], dtype, f"{kwargs}", magnitude=4)


@pytest.mark.parametrize("n_rows,d_in,d_out", [(1, 5, 3), (37, 16, 19), (300, 64, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_a_projection_in_pieces_covers_every_output_once(monkeypatch, n_rows, d_in, d_out, bias):
    # Pieces far smaller than the shipped ones, so that small shapes cut into many uneven
    # row and column bands: every output written exactly once, by the right rows and
    # columns (out= starts as NaN), with the bias of its own column.
    monkeypatch.setattr(_run, "PROJECT_ONE_CALL_FLOPS", 0.0)
    monkeypatch.setattr(_run, "PIECE_COLS", 7)
    monkeypatch.setattr(_run, "PROJECT_PIECE_FLOPS", 2.0 * 5 * d_in * 7)
    rows, cols = _run.project_pieces(n_rows, d_in, d_out)
    for ranges, n in ((rows, n_rows), (cols, d_out)):
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(r1 - r0 for r0, r1 in ranges) - min(r1 - r0 for r0, r1 in ranges) <= 1
    assert max(c1 - c0 for c0, c1 in cols) <= 7 and max(r1 - r0 for r0, r1 in rows) <= 5
    rng = np.random.default_rng(n_rows)
    x, w = rng.standard_normal((n_rows, d_in)), rng.standard_normal((d_in, d_out))
    b = rng.standard_normal(d_out) if bias else None
    out = np.full((n_rows, d_out), np.nan)
    fastattn.project(x, w, b, out=out)
    np.testing.assert_allclose(out, x @ w + (0 if b is None else b), rtol=1e-12, atol=1e-12)


def test_a_projection_under_the_threshold_is_one_gemm():
    assert _run.project_pieces(4096, 768, 2304) == ([(0, 4096)], [(0, 2304)])
    rows, cols = _run.project_pieces(8192, 8192, 8192)
    assert len(cols) == 4 and all(2.0 * (r1 - r0) * 8192 * 2048 <= _run.PROJECT_PIECE_FLOPS
                                  for r0, r1 in rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_rows,d_in,d_out,cols", [
    (1, 33, 100, (0, 100)),    # one row: GEMV bands of columns
    (5, 17, 70, (0, 70)),      # more columns: bands on multiples of 16, the last 22 wide
    (3, 8, 40, (5, 37)),       # a piece's columns only, edges off the multiples of 16
    (70, 9, 20, (0, 20)),      # more rows: bands of rows, uneven
    (2, 4, 31, (0, 31)),       # fewer columns than two bands of 16: one thread
])
@pytest.mark.parametrize("bias", [False, True])
def test_the_projection_kernel_splits_over_threads_exactly(dtype, n_rows, d_in, d_out, cols,
                                                           bias):
    # Each thread one BLAS call on its band of rows or columns: for every team size, the
    # piece's outputs (with their own bias) and nothing else; out= starts as NaN.
    kernels = fastattn._dispatch.kernels
    rng = np.random.default_rng(d_out)
    x = rng.standard_normal((n_rows, d_in)).astype(dtype)
    w = rng.standard_normal((d_in, d_out)).astype(dtype)
    b = rng.standard_normal(d_out).astype(dtype)
    c0, c1 = cols
    want = (x.astype(np.float64) @ w.astype(np.float64) + (b if bias else 0))[:, c0:c1]
    for threads in (1, 2, 3, 8):
        out = np.full((n_rows, d_out), np.nan, dtype)
        with _run.serial_blas:
            kernels.project(x, w, b, bias, out, c0, c1, threads)
        assert np.isnan(out[:, :c0]).all() and np.isnan(out[:, c1:]).all(), threads
        assert_close(out[:, c0:c1], want, dtype, f"{threads} threads", magnitude=d_in)


def test_a_projection_holds_blas_to_one_thread(monkeypatch):
    # fastattn's threads split a projection, so BLAS's own pool must not start as well
    # (it would then spin on the cores after the call, slowing whatever runs next).
    kernels = fastattn._dispatch.kernels
    depths = []

    class Spy:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def project(self, *args):
            depths.append(_run.serial_blas._depth)
            return kernels.project(*args)

    monkeypatch.setattr(_run, "_kernels", Spy())
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((64, 128)), rng.standard_normal((128, 300))
    assert _run._kernels.blas_would_thread(64, 128, 64)  # calls BLAS would thread
    np.testing.assert_allclose(fastattn.project(x, w), x @ w, rtol=1e-12, atol=1e-12)
    fastattn.self_attention(x, w[:, :64], w[:, 64:128], w[:, 128:192])
    assert len(depths) == 4 and all(d >= 1 for d in depths)
    assert _run.serial_blas._depth == 0

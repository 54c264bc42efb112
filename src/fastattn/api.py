"""The public functions: parse -> plan -> run -> finish.

Design: everything a kernel could trip on is settled before the compiled code runs.
``_validation`` checks and converts each argument (one rule per kind of argument),
``_plan`` turns shapes into a frozen plan (broadcast batch dimensions and grouped-query
heads become index arrays instead of copies; tiles and kernel choices come from the
compiled policy's rules), and ``_run`` runs the kernels. Arrays reach the kernels C-contiguous in
float32 or float64 (one normalising copy at most, none when the input is already so), and
every bad input raises a ``ValueError`` or ``TypeError`` that names the argument. The
kernels never raise.
"""

import math

import numpy as np

from . import _plan, _run
from . import cache as _cache
from ._validation import (INT_MAX, as_array, check_axis, check_flag, check_out, check_threads,
                          contiguous, dtypes, is_dask_array, qkv_arguments, refuse_huge)

__all__ = ["project", "scores", "softmax", "log_softmax", "attention", "self_attention",
           "merge_attention"]


# --------------------------------------------------------------------------- projection

def project(x, w, b=None, *, out=None):
    """Project embeddings: ``x @ w + b``.

    Parameters
    ----------
    x : array_like, shape (..., d_in)
        Embeddings. A 1-D ``x`` is one token (a matrix-vector product).
    w : array_like, shape (d_in, d_out)
        Projection matrix.
    b : array_like, shape (d_out,), optional
        Bias.
    out : ndarray, shape (..., d_out), optional
        Where to write the result; exact shape and dtype required.

    Returns
    -------
    ndarray, shape (..., d_out)

    Notes
    -----
    ``out[..., j] = sum_i x[..., i] w[i, j] + b[j]``, by SciPy's BLAS (GEMV for one token)
    on fastattn's threads: each takes an even band of rows, or of columns when there are
    more of those, with BLAS held to one thread, so that BLAS's own thread pool never
    starts and is not left spinning on the cores for the attention that follows. The
    bands follow the thread count (``OMP_NUM_THREADS``), and BLAS may sum a band's edge
    columns in another order, so the last bits of the result can depend on it.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> fastattn.project(np.array([1.0, 2.0]), np.array([[1.0, 0.0], [0.5, 1.0]]), b=np.array([0.0, 1.0]))
    array([2., 3.])
    """
    x = as_array("x", x)
    w = as_array("w", w)
    named = [("x", x), ("w", w)]
    if b is not None:
        b = as_array("b", b)
        named.append(("b", b))
    compute, result_dtype = dtypes(named)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension (..., d_in), got x.shape={x.shape}")
    if w.ndim != 2:
        raise ValueError(f"w must be 2-D (d_in, d_out), got w.shape={w.shape}")
    d_in, d_out = w.shape
    if x.shape[-1] != d_in:
        raise ValueError(
            f"x and w disagree on d_in: got x.shape={x.shape} and w.shape={w.shape}"
        )
    if b is not None and b.shape != (d_out,):
        raise ValueError(f"b must have shape ({d_out},) to match w.shape={w.shape}, got b.shape={b.shape}")
    out_shape = x.shape[:-1] + (d_out,)
    if out is not None:
        check_out(out, out_shape, result_dtype, named)
    n_rows = math.prod(x.shape[:-1])
    if max(n_rows, d_in, d_out) > INT_MAX:
        raise ValueError(f"project: dimensions above 2**31 - 1 are not supported, got x.shape={x.shape}, w.shape={w.shape}")
    refuse_huge("the output", n_rows * d_out, compute.itemsize, f"x.shape={x.shape}, w.shape={w.shape}")
    refuse_huge("the copy of x", x.size, compute.itemsize, f"x.shape={x.shape}")

    target = _run.kernel_target(out, (n_rows, d_out), compute)
    _run.project_rows(contiguous(x, compute).reshape(n_rows, d_in), w, b, target)
    return _run.finish(target.reshape(out_shape), result_dtype, out)


# --------------------------------------------------------------------------- softmax

def _softmax(x, axis, out, log_out, name):
    x = as_array("x", x)
    compute, result_dtype = dtypes([("x", x)])
    axis = check_axis(axis, x.ndim, x.shape, name)
    if out is not None:
        check_out(out, x.shape, result_dtype, [("x", x)])
    refuse_huge("the result", x.size, compute.itemsize, f"x.shape={x.shape}")
    if x.size == 0:
        return _run.finish(np.empty(x.shape, compute), result_dtype, out)
    moved = np.moveaxis(x, axis, -1)
    rows = contiguous(moved, compute).reshape(-1, x.shape[axis])
    if axis in (-1, x.ndim - 1):
        target = _run.kernel_target(out, rows.shape, compute)
    else:
        target = np.empty(rows.shape, compute)
    _run.run_softmax(rows, target, log_out, check_threads(None))
    result = np.moveaxis(target.reshape(moved.shape), -1, axis)
    return _run.finish(result, result_dtype, out)


def softmax(x, axis=-1, *, out=None):
    """Numerically stable softmax along an axis.

    Parameters
    ----------
    x : array_like
        Logits; float16/32/64, integer or boolean.
    axis : int, default -1
        The axis that sums to one.
    out : ndarray, optional
        Where to write the result; exact shape and dtype required.

    Returns
    -------
    ndarray, the shape of ``x``

    Notes
    -----
    ``softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m)`` with ``m = max_j x_j``; the sum is
    kept in float64. As in SciPy, a row that is all ``-inf``, or holds ``+inf`` or NaN, is
    NaN throughout; ``attention`` instead gives zeros for a query whose keys are all masked.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> fastattn.softmax(np.array([1000.0, 0.0, 0.0, 0.0]))
    array([1., 0., 0., 0.])
    """
    return _softmax(x, axis, out, False, "softmax")


def log_softmax(x, axis=-1, *, out=None):
    """Numerically stable log-softmax along an axis.

    Parameters
    ----------
    x : array_like
        Logits.
    axis : int, default -1
    out : ndarray, optional

    Returns
    -------
    ndarray, the shape of ``x``

    Notes
    -----
    ``log_softmax(x)_i = x_i - m - log(sum_j exp(x_j - m))``, ``m = max_j x_j``.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> fastattn.log_softmax(np.array([0.0, 0.0]))
    array([-0.69314718, -0.69314718])
    """
    return _softmax(x, axis, out, True, "log_softmax")


# --------------------------------------------------------------------------- attention

def scores(q, k, *, scale=None, mask=None, causal=False, window=None, softcap=None):
    """Scaled dot-product scores, masked.

    Parameters
    ----------
    q : array_like, shape (..., L_q, D) or (D,)
        A 1-D ``q`` is one query vector, as in ``np.matmul``: the query axis is dropped
        from the result (and, under ``causal``, it is the last query: it sees every key).
    k : array_like, shape (..., L_k, D)
        Leading dimensions broadcast; a head axis (-3) of ``k`` that divides that of ``q``
        is shared by groups of query heads (grouped-query attention).
    scale : float, optional
        Defaults to ``1 / sqrt(D)`` (1 when ``D == 0``).
    mask : array_like, bool or float, broadcastable to (..., L_q, L_k), optional
        Boolean: True = may attend; a hidden score is ``-inf``. Float: added to the scores.
    causal : bool, default False
        Query ``i`` sees keys ``j <= i + (L_k - L_q)`` (aligned bottom-right); later keys
        score ``-inf``.
    window : int, optional
        With ``causal=True``: query ``i`` also sees no key ``j <= i + (L_k - L_q) - window``
        (sliding-window attention: the ``window`` most recent keys, itself included).
    softcap : float > 0, optional
        Soft-cap the scores to ``softcap * tanh(s / softcap)`` after scaling and before
        the masks (Gemma 2's attention logit soft-capping).

    Returns
    -------
    ndarray, shape (..., L_q, L_k), or (..., L_k) for a 1-D ``q``

    Notes
    -----
    ``s[..., i, j] = scale * sum_d q[..., i, d] k[..., j, d] (+ mask[..., i, j])``; with
    ``softcap`` the scaled product is capped before the mask is added.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> fastattn.scores(np.ones((2, 4)), np.ones((3, 4)), causal=True)
    array([[  2.,   2., -inf],
           [  2.,   2.,   2.]])
    """
    if _one_query(q):
        return scores(_query_row(q, k), k, scale=scale, mask=mask, causal=causal,
                      window=window, softcap=softcap)[..., 0, :]
    plan = _plan.plan_attention(q, k, None, mask, causal, scale, window, softcap, with_v=False)
    lay = plan.layout
    result = _run.run_scores(plan)
    return _run.finish(result.reshape(lay.batch + (lay.n_queries, lay.n_keys)), plan.result, None)


def _one_query(q):
    """Whether ``q`` is a single query vector (1-D), which ``scores`` and ``attention``
    take as ``q[None]`` and drop the query axis from the results, as ``np.matmul`` does."""
    ndim = getattr(q, "ndim", None)
    if ndim is None and q is not None and not isinstance(q, (str, bytes)):
        try:
            ndim = np.ndim(q)
        except (ValueError, TypeError):
            return False  # a ragged list: as_array names it below
    return ndim == 1


def _query_row(q, k):
    """A 1-D ``q`` as a (1, D) query matrix, its head size checked against ``k`` first so
    that a mismatch is reported in the shapes the caller passed."""
    q = as_array("q", q)
    try:
        k_shape = tuple(np.shape(k)) if k is not None else ()
    except ValueError:
        k_shape = ()  # a ragged k: the general path names it
    if k_shape and k_shape[-1] != q.shape[0]:
        raise ValueError(f"q and k must have the same head dimension D, got q.shape={q.shape} "
                         f"(one query vector) and k.shape={k_shape}")
    return q[None]


def _pack(result, weights, lse, return_weights, return_lse):
    if not (return_weights or return_lse):
        return result
    extra = ([weights] if return_weights else []) + ([lse] if return_lse else [])
    return (result, *extra)


def _compiled_route(cache, mask, out, causal, window, scale, softcap, return_weights,
                    return_lse, num_threads, precision):
    """Whether a call may take the compiled path (small calls, and single queries, with
    default arguments; the compiled code checks the arrays and the sinks): only
    arguments the general path would take unchanged. A finite float scale is what
    check_scale returns unchanged (x - x == 0 is False for inf and NaN, which the general
    path rejects); so are an int window >= 1 with causal=True and a finite float softcap
    > 0."""
    return (cache is None and mask is None and out is None
            and (window is None or (type(window) is int and window >= 1 and causal is True))
            and (scale is None or (type(scale) is float and scale - scale == 0))
            and (softcap is None or (type(softcap) is float and softcap > 0
                                     and softcap - softcap == 0))
            and return_weights is False and return_lse is False
            and (causal is False or causal is True)
            and (num_threads is None or (type(num_threads) is int and num_threads >= 1))
            and (precision or _plan.float32_precision()) == "highest")


def _lazy_route(cache, q, k, v, mask):
    """Whether the call holds dask arrays, which stay lazy (fastattn.dask)."""
    nd = np.ndarray  # plain arrays skip the dask test (a generator: 1.2 us of a 55 us decode step)
    return (cache is None and (type(q) is not nd or type(k) is not nd or type(v) is not nd
                               or (mask is not None and type(mask) is not nd))
            and any(is_dask_array(a) for a in (q, k, v, mask)))


def _lazy_attention(q, k, v, mask, causal, window, scale, softcap, sinks, return_weights,
                    return_lse, out, num_threads):
    """attention on dask arrays: fastattn.dask splits the call into blocks."""
    if return_weights is not False or out is not None:
        raise ValueError("with dask arrays, attention returns no weights and takes no out=")
    from . import dask as _dask
    return _dask.attention(q, k, v, mask=mask, causal=causal, window=window, scale=scale,
                           softcap=softcap, sinks=sinks, return_lse=return_lse,
                           num_threads=1 if num_threads is None else num_threads)


def attention(q, k=None, v=None, *, cache=None, mask=None, causal=False, window=None,
              scale=None, softcap=None, sinks=None, return_weights=False, return_lse=False,
              out=None, num_threads=None, precision=None):
    """Scaled dot-product attention, fused: ``softmax(scale q k^T + mask) v``.

    Parameters
    ----------
    q : array_like, shape (..., L_q, D) or (D,)
        A 1-D ``q`` is one query vector, as in ``np.matmul``: the query axis is dropped
        from the results (and, under ``causal``, it is the last query: it sees every key).
    k : array_like, shape (..., L_k, D)
    v : array_like, shape (..., L_k, D_v)
        Leading dimensions broadcast as in NumPy. When the head axis (-3) of ``k``/``v``
        divides that of ``q``, query head ``h`` reads key/value head ``h // (H_q / H_kv)``
        (grouped-query attention), without copying them.
    cache : KVCache, optional
        Attend to the cached keys and values instead, after appending ``k`` and ``v`` to
        the cache when they are given. With ``causal=True`` the queries are the last
        ``L_q`` tokens of the cache (bottom-right alignment).
    mask : array_like, bool or float, broadcastable to (..., L_q, L_k), optional
        Boolean: True = may attend (PyTorch's convention). Float: added to the scores.
    causal : bool, default False
        Query ``i`` sees keys ``j <= i + (L_k - L_q)``: aligned bottom-right, as in
        FlashAttention 2.1+ and as decoding with a cache needs (top-left when L_q == L_k).
    window : int, optional
        With ``causal=True``: sliding-window attention, query ``i`` sees only the
        ``window`` keys ``i + (L_k - L_q) - window < j <= i + (L_k - L_q)``. Key blocks
        outside every query's window are skipped; no mask array is built.
    scale : float, optional
        Defaults to ``1 / sqrt(D)`` (1 when ``D == 0``).
    softcap : float > 0, optional
        Soft-cap the scores to ``softcap * tanh(s / softcap)`` after scaling and before
        the masks (Gemma 2).
    sinks : array_like, optional
        One logit per query head, broadcast against ``q.shape[:-2]`` (shape ``(H,)`` for
        ``(B, H, L_q, D)`` queries): each softmax row gets one more, virtual key with that
        logit and a zero value (GPT-OSS's attention sinks), so a query's weights sum to
        less than one. ``-inf`` is no sink. Converted to the compute dtype.
    return_weights : bool, default False
        Also return the attention weights, shape (..., L_q, L_k) (this builds them).
    return_lse : bool, default False
        Also return ``log sum_j exp(s_ij)`` per query, shape (..., L_q), in the compute
        dtype (float32 for float16 inputs); ``-inf`` for a fully masked query. With
        ``sinks`` the sum includes the sink's term.
    out : ndarray, shape (..., L_q, D_v), optional
        Where to write the output; exact shape and dtype required ((..., D_v) for a 1-D
        ``q``).
    num_threads : int, optional
        OpenMP threads; defaults to OpenMP's (``OMP_NUM_THREADS``). Results are bitwise
        identical for any value.
    precision : {"highest", "bfloat16"}, optional
        For float32 ``q``, ``k``, ``v`` only. ``"highest"`` (the default, unless
        :func:`set_float32_precision` changed it): exact float32. ``"bfloat16"``: allows
        the CPU's bfloat16 matrix engine (AMX, AVX512-BF16): q, k, v are rounded to
        bfloat16 (8 bits of mantissa) as they are packed, and so are the weights for the
        weights-times-values product; softmax and sums stay float32 and so does the
        result. Where there is no engine the call runs exact. A permission, like
        ``torch.set_float32_matmul_precision``: the error bounds are in the dtype guide.
        With a cache, ``storage="bfloat16"``, ``"int8"`` and ``"float8_e4m3"`` ones
        take it: the decoding step rounds q and the weights to bfloat16 against the
        stored bfloat16 bits (or float8 bytes made bfloat16), or holds them to 16-bit
        integers against the stored int8 bytes (decoding guide).

    Returns
    -------
    out : ndarray, shape (..., L_q, D_v)
    weights : ndarray, shape (..., L_q, L_k), if ``return_weights``
    lse : ndarray, shape (..., L_q), if ``return_lse``
        For a 1-D ``q``: shapes (..., D_v), (..., L_k) and (...).

    Notes
    -----
    ``out_i = sum_j p_ij v_j`` with ``p_ij = exp(s_ij - m_i) / sum_j exp(s_ij - m_i)``,
    ``s_ij = scale q_i . k_j`` (+ mask), computed by an online softmax over key blocks
    without building the L_q x L_k matrix. A query whose keys are all masked gets zeros
    (never NaN). NaN or +inf reaching a visible score makes that query's row NaN. A key
    hidden by a boolean or causal mask has weight exactly 0 whatever its score; whether
    NaN or inf in the value of a key with weight 0 reaches the output is unspecified
    (0 * inf in the GEMM is NaN).

    bfloat16 inputs (ml_dtypes) run on the CPU's matrix engine where it has one: the
    products of bfloat16 values accumulate in float32, the weights are rounded to bfloat16
    for the weights-times-values product (as FlashAttention and PyTorch do), softmax and
    sums stay float32, and the result is rounded to bfloat16 once. Elsewhere (and for
    float16) the inputs are widened to float32 as they are read, and the result equals
    float32 attention on the same values, rounded once.

    With ``sinks``, ``p_ij = exp(s_ij - m_i) / (sum_j exp(s_ij - m_i) + exp(sink_i - m_i))``
    (``m_i`` now also covers the sink), and a fully masked query gets zeros and an lse
    equal to its sink. To split such a call over key sets and join the parts with
    :func:`merge_attention`, give the sinks to exactly one part (or merge them in as a
    part of their own: output zeros, lse the sink).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> v = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> fastattn.attention(q, k, v, scale=0.0)
    array([[2., 3.]])
    """
    # The routes, in order: the compiled path (it returns None for what it does not
    # take), lazy dask arrays, one query vector, a cache, then the general path.
    if _compiled_route(cache, mask, out, causal, window, scale, softcap, return_weights,
                       return_lse, num_threads, precision):
        result = _run.small_attention(q, k, v, causal, window, scale, softcap, sinks,
                                      num_threads)
        if result is not None:
            return result
    if _lazy_route(cache, q, k, v, mask):
        return _lazy_attention(q, k, v, mask, causal, window, scale, softcap, sinks,
                               return_weights, return_lse, out, num_threads)
    return_weights = check_flag("return_weights", return_weights)
    return_lse = check_flag("return_lse", return_lse)
    if _one_query(q):
        if out is not None and (not isinstance(out, np.ndarray) or out.ndim < 1):
            raise TypeError(f"out must be an ndarray of shape (..., D_v) for a 1-D q, "
                            f"got {type(out).__name__} of shape {np.shape(out)}")
        res = attention(_query_row(q, k), k, v, cache=cache, mask=mask, causal=causal,
                        window=window, scale=scale, softcap=softcap, sinks=sinks,
                        return_weights=return_weights, return_lse=return_lse,
                        out=None if out is None else out[..., None, :],
                        num_threads=num_threads, precision=precision)
        res = res if isinstance(res, tuple) else (res,)
        return _pack(res[0][..., 0, :] if out is None else out,
                     res[1][..., 0, :] if return_weights else None,
                     res[-1][..., 0] if return_lse else None, return_weights, return_lse)
    if cache is not None:
        if not isinstance(cache, _cache.KVCache):
            raise TypeError(f"cache must be a fastattn.KVCache, got {type(cache).__name__}")
        if (k is None) != (v is None):
            raise ValueError("pass both k and v to append them to the cache, or neither")
        if k is not None:
            cache.append(k, v)
        if mask is None and window is None and out is None and not return_weights:
            result = _cache.decode_step(q, cache, causal, scale, softcap, sinks, num_threads,
                                        return_lse, precision)
            if result is not None:
                return result
        k, v = cache.keys, cache.values
    elif k is None:
        raise TypeError("attention needs k and v (or a cache)")
    elif v is None:
        raise TypeError("attention needs v, the values, as well as k (or a cache): "
                        "attention(q, k, v)")
    # v=None must be refused as a bad value (its dtype), not taken for scores()'s "no v".
    plan = _plan.plan_attention(q, k, v, mask, causal, scale, window, softcap, sinks,
                                return_weights=return_weights, precision=precision)
    n_threads = check_threads(num_threads)
    return _pack(*_run.run_attention(plan, return_weights, out, n_threads),
                 return_weights, return_lse)


def self_attention(x, w_q, w_k, w_v, *, b_q=None, b_k=None, b_v=None, mask=None,
                   causal=False, window=None, scale=None, softcap=None, sinks=None,
                   return_weights=False, return_lse=False, out=None, num_threads=None,
                   precision=None):
    """Single-head self-attention from embeddings: project, then attend.

    Parameters
    ----------
    x : array_like, shape (..., L, d_model)
        Embeddings of a sequence; a 1-D ``x`` is one token (and the query axis is dropped
        from the results).
    w_q, w_k : array_like, shape (d_model, d_head)
    w_v : array_like, shape (d_model, d_v)
    b_q, b_k, b_v : array_like, optional
        Biases of the projections.
    mask, causal, window, scale, softcap, sinks, return_weights, return_lse, out, num_threads
        As in :func:`attention` (one head: ``sinks`` is a scalar or broadcasts against
        ``x.shape[:-2]``).
    precision : {"highest", "bfloat16"}, optional
        As in :func:`attention`, for the attention of float32 projections (the
        projections themselves stay exact).

    Returns
    -------
    out : ndarray, shape (..., L, d_v)
        And the weights and lse when asked, as in :func:`attention`.

    Notes
    -----
    ``q, k, v = x W_q + b_q, x W_k + b_k, x W_v + b_v`` (one pass over ``x``), then
    ``attention(q, k, v)``.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> x = np.array([0.2, 0.7, 0.4])
    >>> w_q = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    >>> w_k = np.array([[0.3, 0.1, 0.5], [0.6, 0.4, 0.2], [0.9, 0.7, 0.8]])
    >>> w_v = np.array([[0.5, 0.6, 0.7], [0.1, 0.2, 0.3], [0.9, 0.8, 0.4]])
    >>> fastattn.self_attention(x, w_q, w_k, w_v).round(12)
    array([0.53, 0.58, 0.51])
    """
    return_weights = check_flag("return_weights", return_weights)
    return_lse = check_flag("return_lse", return_lse)
    x, ws, bs, named, compute, result_dtype = qkv_arguments(x, w_q, w_k, w_v, b_q, b_k, b_v)
    q, k, v = _run.project_qkv(x, ws, bs, compute)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"w_q and w_k must give the same head dimension, got w_q.shape={np.shape(w_q)} "
            f"and w_k.shape={np.shape(w_k)}"
        )
    one_token = q.ndim == 1
    user_out = out
    if one_token:
        q, k, v = q[None], k[None], v[None]
        if out is not None:
            check_out(out, (v.shape[-1],), result_dtype, named)
            out = out[None]
    plan = _plan.plan_attention(q, k, v, mask, causal, scale, window, softcap, sinks,
                                return_weights=return_weights, precision=precision)
    # The projections ran in the compute dtype; the result takes the dtype of x and the
    # weights, and out= may not overlap any of them.
    plan = plan._replace(result=result_dtype, named=plan.named + tuple(named))
    result, weights, lse = _run.run_attention(plan, return_weights, out,
                                              check_threads(num_threads))
    if one_token:
        result, lse = result[0], lse[0]
        weights = weights[0] if weights is not None else None
    if user_out is not None:
        result = user_out
    return _pack(result, weights, lse, return_weights, return_lse)


def set_float32_precision(precision):
    """Set the default ``precision`` of float32 attention for this process: ``"highest"``
    (exact float32, the initial default) or ``"bfloat16"`` (the CPU's bfloat16 matrix
    engine allowed; see :func:`attention`), as ``torch.set_float32_matmul_precision``
    does for PyTorch. Calls that pass ``precision=`` are not affected.

    Returns
    -------
    str
        The previous default, for restoring it.

    Examples
    --------
    >>> import fastattn
    >>> old = fastattn.set_float32_precision("bfloat16")
    >>> fastattn.get_float32_precision()
    'bfloat16'
    >>> fastattn.set_float32_precision(old)
    'bfloat16'
    """
    return _plan.set_float32_precision(precision)


def get_float32_precision():
    """The default ``precision`` of float32 attention (see :func:`set_float32_precision`)."""
    return _plan.float32_precision()


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Combine attention over two disjoint sets of keys into attention over their union.

    Parameters
    ----------
    out_a, out_b : array_like, shape (..., L_q, D_v)
        ``attention(q, k_a, v_a)`` and ``attention(q, k_b, v_b)``.
    lse_a, lse_b : array_like, shape (..., L_q)
        Their log-sum-exps (``return_lse=True``).

    Returns
    -------
    out : ndarray, shape (..., L_q, D_v)
    lse : ndarray, shape (..., L_q)
        Equal (to rounding) to ``attention(q, k, v, return_lse=True)`` with ``k``/``v`` the
        two key sets together: the building block for splitting keys across workers.

    Notes
    -----
    ``lse = log(exp(lse_a) + exp(lse_b))`` computed as ``m + log(exp(lse_a - m) +
    exp(lse_b - m))``, ``m = max(lse_a, lse_b)``, and ``out = exp(lse_a - lse) out_a +
    exp(lse_b - lse) out_b``. A side with no visible key (lse ``-inf``) contributes
    nothing; both empty gives zeros and ``-inf``. NaN propagates.

    Attention sinks are one more key each: pass ``sinks=`` to exactly one of the two
    calls, or add them afterwards as a part of their own, ``merge_attention(out, lse,
    zeros, sinks)`` (a key set whose only member has logit ``sink`` and value 0). Giving
    them to both calls would count them twice.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> q, k, v = np.ones((1, 2)), np.eye(2), np.array([[1.0], [3.0]])
    >>> a = fastattn.attention(q, k[:1], v[:1], return_lse=True)
    >>> b = fastattn.attention(q, k[1:], v[1:], return_lse=True)
    >>> fastattn.merge_attention(*a, *b)[0]
    array([[2.]])
    """
    named = [(n, as_array(n, a)) for n, a in
             (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b))]
    compute, result_dtype = dtypes(named)
    (_, out_a), (_, lse_a), (_, out_b), (_, lse_b) = named
    if out_a.ndim < 1 or out_a.shape != out_b.shape:
        raise ValueError(f"out_a and out_b must have the same shape (..., L_q, D_v), "
                         f"got out_a.shape={out_a.shape} and out_b.shape={out_b.shape}")
    if lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(f"lse_a and lse_b must have shape {out_a.shape[:-1]} (out without its "
                         f"last axis), got lse_a.shape={lse_a.shape} and lse_b.shape={lse_b.shape}")
    lse_a, lse_b = lse_a.astype(compute), lse_b.astype(compute)
    m = np.maximum(lse_a, lse_b)
    empty = m == -np.inf
    m_safe = np.where(empty, 0, m)  # both sides empty: exp(-inf - 0) = 0, not NaN
    with np.errstate(invalid="ignore", divide="ignore"):
        wa, wb = np.exp(lse_a - m_safe), np.exp(lse_b - m_safe)
        total = wa + wb
        lse = np.where(empty, -np.inf, m_safe + np.log(total))
        scale_a = np.where(empty, 0, wa / total)[..., None]
        scale_b = np.where(empty, 0, wb / total)[..., None]
    out = scale_a * out_a.astype(compute) + scale_b * out_b.astype(compute)
    return out.astype(result_dtype, copy=False), lse

"""The pure-Python twin of fastattn's API: nested lists in, nested lists out.

Design: this module is the oracle the kernels are tested against, so it shares nothing
with them: no NumPy, only lists and ``math``, written for clarity rather than speed
(sizes of a few dozen per axis). Sums are ``math.fsum`` (correctly rounded) wherever the
terms are finite. It follows the semantics of docs/DESIGN.md literally:

- a key hidden from a query (boolean mask False, causal, or a score of -inf) has weight 0
  and is left out of the sums;
- a query with no visible key gets zeros and a log-sum-exp of -inf;
- a visible score that is NaN or +inf makes the query's row NaN;
- ``softmax`` of a row that is all -inf, or holds +inf or NaN, is NaN (as SciPy);
- ``softcap=c`` replaces each scaled score ``s`` by ``c * tanh(s / c)`` before the masks;
- ``sinks`` add to each softmax row one visible key with the sink's logit and a zero
  value: it counts in the sum and the log-sum-exp, and a query with no other visible key
  gets zeros and a log-sum-exp equal to its sink.

Inputs are nested lists/tuples of numbers, or array-likes with ``shape`` and ``tolist()``
(read only through those two, so that empty axes keep their length).
"""

import math

__all__ = ["project", "scores", "softmax", "log_softmax", "attention", "attention_varlen",
           "self_attention", "merge_attention"]

_NAN = float("nan")
_INF = float("inf")


# --------------------------------------------------------------------------- nested arrays

def _flatten(a):
    """(flat list, shape) of a nested list, or of an array-like with .shape and .tolist()
    (whose shape survives empty axes, which nested lists lose); ValueError if ragged,
    TypeError for an array of a dtype fastattn does not take."""
    if hasattr(a, "shape") and hasattr(a, "tolist"):
        # Arrays of the dtypes fastattn takes (bool, integers, floats up to double,
        # bfloat16); any other (objects, complex, strings, dates, long double) is refused,
        # as fastattn refuses it, even where its items would happen to be numbers.
        dtype = getattr(a, "dtype", None)
        kind, size = getattr(dtype, "kind", None), getattr(dtype, "itemsize", 0)
        if dtype is not None and not (kind in ("b", "i", "u") or (kind == "f" and size <= 8)
                                      or getattr(dtype, "name", "") == "bfloat16"):
            raise TypeError(f"unsupported dtype {dtype}")
        shape = tuple(a.shape)
        flat, _ = _flatten(a.tolist())
        return (flat if math.prod(shape) else []), shape
    if not isinstance(a, (list, tuple)):
        if not isinstance(a, (bool, int, float)) and not hasattr(a, "__float__"):
            raise TypeError(f"expected real numbers, got {type(a).__name__}")
        return [a], ()
    if not a:
        return [], (0,)
    parts = [_flatten(x) for x in a]
    inner = parts[0][1]
    if any(s != inner for _, s in parts):
        raise ValueError("ragged nested list")
    flat = [x for f, _ in parts for x in f]
    return flat, (len(a),) + inner


class _Shaped:
    """A nested list that remembers its shape (nested lists forget empty axes)."""

    def __init__(self, flat, shape):
        self.shape, self._flat = shape, flat

    def tolist(self):
        return _nest(self._flat, self.shape)


def _nest(flat, shape):
    """Nested list of a shape from a row-major flat list."""
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return list(flat)
    step = math.prod(shape[1:])
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _indices(shape):
    """All index tuples of a shape, row-major."""
    if not shape:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _indices(shape[1:]):
            yield (i,) + rest


def _broadcast_shapes(*shapes):
    n = max((len(s) for s in shapes), default=0)
    result = []
    for axis in range(n):
        sizes = {s[axis - n + len(s)] for s in shapes if axis - n + len(s) >= 0}
        sizes.discard(1)
        if len(sizes) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        result.append(sizes.pop() if sizes else 1)
    return tuple(result)


def _offset(shape, index):
    """Row-major position in an array of `shape` read at a broadcast `index`."""
    index = index[len(index) - len(shape):]
    pos = 0
    for size, i in zip(shape, index):
        pos = pos * size + (i if size != 1 else 0)
    return pos


def _sum(xs):
    """Correctly rounded sum when it can be; plain IEEE sum with inf/NaN."""
    xs = list(xs)
    try:
        return math.fsum(xs)
    except (ValueError, OverflowError):
        total = 0.0
        for x in xs:
            total += x
        return total


def _dot(a, b):
    return _sum(x * y for x, y in zip(a, b))


def _matrix(flat, shape, batch_pos):
    """Rows of the trailing (rows, cols) matrix at a batch position."""
    rows, cols = shape[-2], shape[-1]
    start = batch_pos * rows * cols
    return [flat[start + r * cols:start + (r + 1) * cols] for r in range(rows)]


# --------------------------------------------------------------------------- projection

def project(x, w, b=None):
    """``x @ w + b``, as :func:`fastattn.project`.

    Parameters
    ----------
    x : nested list, shape (..., d_in)
    w : nested list, shape (d_in, d_out)
    b : nested list, shape (d_out,), optional

    Returns
    -------
    nested list, shape (..., d_out)

    Examples
    --------
    >>> from fastattn import reference
    >>> reference.project([1.0, 2.0], [[1.0, 0.0], [0.5, 1.0]], [0.0, 1.0])
    [2.0, 3.0]
    """
    return _project(x, w, b).tolist()


def _project(x, w, b):
    xf, xs = _flatten(x)
    wf, ws = _flatten(w)
    if len(xs) < 1 or len(ws) != 2:
        raise ValueError("x needs at least 1 dimension and w exactly 2")
    d_in, d_out = ws
    if xs[-1] != d_in:
        raise ValueError("x and w disagree on d_in")
    bias = _flatten(b)[0] if b is not None else [0.0] * d_out
    cols = [[wf[i * d_out + j] for i in range(d_in)] for j in range(d_out)]
    out = []
    for r in range(len(xf) // d_in if d_in else math.prod(xs[:-1])):
        row = xf[r * d_in:(r + 1) * d_in]
        out.extend(_dot(row, cols[j]) + bias[j] for j in range(d_out))
    return _Shaped(out, xs[:-1] + (d_out,))


# --------------------------------------------------------------------------- softmax

def _softmax_vec(x, log_out=False):
    if any(math.isnan(v) for v in x):
        return [_NAN] * len(x)
    if not x:
        return []
    m = max(x)
    if math.isinf(m):  # all -inf, or +inf present: inf - inf
        return [_NAN] * len(x)
    e = [math.exp(v - m) for v in x]
    total = math.fsum(e)
    if log_out:
        shift = m + math.log(total)
        return [v - shift for v in x]
    return [v / total for v in e]


def _along_axis(x, axis, fn):
    flat, shape = _flatten(x)
    if not shape:
        raise ValueError("axis out of bounds for a 0-d input")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} out of bounds for {len(shape)} dimensions")
    axis %= len(shape)
    n = shape[axis]
    stride = math.prod(shape[axis + 1:])
    out = [0.0] * len(flat)
    other = shape[:axis] + shape[axis + 1:]
    for idx in _indices(other):
        base = 0
        full = idx[:axis] + (0,) + idx[axis:]
        for size, i in zip(shape, full):
            base = base * size + i
        positions = [base + j * stride for j in range(n)]
        for pos, v in zip(positions, fn([flat[pos] for pos in positions])):
            out[pos] = v
    return _nest(out, shape)


def softmax(x, axis=-1):
    """Stable softmax along ``axis``, as :func:`fastattn.softmax`.

    Parameters
    ----------
    x : nested list
    axis : int, default -1

    Returns
    -------
    nested list, the shape of ``x``
        ``exp(x - max) / sum(exp(x - max))``; NaN for a row that is all ``-inf`` or holds
        ``+inf`` or NaN.

    Examples
    --------
    >>> from fastattn import reference
    >>> reference.softmax([1000.0, 0.0, 0.0])
    [1.0, 0.0, 0.0]
    >>> reference.softmax([[0.0, 0.0], [float("-inf"), float("-inf")]])
    [[0.5, 0.5], [nan, nan]]
    """
    return _along_axis(x, axis, _softmax_vec)


def log_softmax(x, axis=-1):
    """Stable log-softmax along ``axis``, as :func:`fastattn.log_softmax`.

    Parameters
    ----------
    x : nested list
    axis : int, default -1

    Returns
    -------
    nested list, the shape of ``x``
        ``x - max - log(sum(exp(x - max)))``.

    Examples
    --------
    >>> from fastattn import reference
    >>> reference.log_softmax([0.0, 0.0])
    [-0.6931471805599453, -0.6931471805599453]
    """
    return _along_axis(x, axis, lambda v: _softmax_vec(v, log_out=True))


# --------------------------------------------------------------------------- attention

def _is_bool_mask(flat):
    return all(isinstance(v, bool) for v in flat)


def _row_scores(q_row, keys, scale, i, n_queries, mask_row, mask_is_bool, causal, window=None,
                softcap=None):
    n_keys = len(keys)
    s = []
    for j, k_row in enumerate(keys):
        hidden = causal and j > i + (n_keys - n_queries)
        if window is not None and j <= i + (n_keys - n_queries) - window:
            hidden = True
        if mask_row is not None and mask_is_bool and not mask_row[j]:
            hidden = True
        if hidden:
            s.append(-_INF)
            continue
        value = scale * _dot(q_row, k_row)
        if softcap is not None:
            value = softcap * math.tanh(value / softcap)
        if mask_row is not None and not mask_is_bool:
            value = value + mask_row[j]
        s.append(value)
    return s


def _prepare(q, k, v, mask, scale):
    qf, qs = _flatten(q)
    kf, ks = _flatten(k)
    vf, vs = _flatten(v) if v is not None else (None, None)
    if len(qs) < 2 or len(ks) < 2 or (vs is not None and len(vs) < 2):
        raise ValueError("q, k and v need at least 2 dimensions" if vs is not None
                         else "q and k need at least 2 dimensions")
    if qs[-1] != ks[-1]:
        raise ValueError("q and k disagree on D")
    if vs is not None and vs[-2] != ks[-2]:
        raise ValueError("k and v disagree on L_k")
    qb, kb = qs[:-2], ks[:-2]
    vb = vs[:-2] if vs is not None else kb
    kvb = _broadcast_shapes(kb, vb)
    group = 1
    kv_heads_as = kvb
    if qb and kvb and 1 not in (qb[-1], kvb[-1]) and kvb[-1] != qb[-1]:
        if qb[-1] % kvb[-1]:
            raise ValueError("k/v heads must divide q heads")
        group = qb[-1] // kvb[-1]
        kv_heads_as = kvb[:-1] + (qb[-1],)
    if mask is not None:
        mf, ms = _flatten(mask)
        mb = ms[:-2] if len(ms) > 2 else ()
        # Boolean (True = may attend) or floating (added): ints and other kinds are refused,
        # as fastattn refuses an integer mask array (a Python bool is an int: test it first).
        if not _is_bool_mask(mf) and not all(isinstance(m, (bool, float)) for m in mf):
            kind = next(type(m).__name__ for m in mf if not isinstance(m, (bool, float)))
            raise TypeError(f"mask must be boolean or floating, got {kind} entries")
    else:
        mf, ms, mb = None, None, ()
    batch = _broadcast_shapes(qb, kv_heads_as, mb)
    n_q, d = qs[-2], qs[-1]
    n_k = ks[-2]
    if ms is not None:
        _broadcast_shapes(ms[-2:] if len(ms) >= 2 else ms, (n_q, n_k))
    scale = (1.0 / math.sqrt(d) if d else 1.0) if scale is None else float(scale)

    def kv_index(idx, shape):
        if group > 1:
            idx = idx[:-1] + (idx[-1] // group,)
        return _offset(shape[:-2], idx)

    def mask_rows(idx):
        if mf is None:
            return None
        return [[mf[_offset(ms, idx + (i, j))] for j in range(n_k)] for i in range(n_q)]

    cases = []
    for idx in _indices(batch):
        qm = _matrix(qf, qs, _offset(qb, idx))
        km = _matrix(kf, ks, kv_index(idx, ks))
        vm = _matrix(vf, vs, kv_index(idx, vs)) if vs is not None else None
        cases.append((qm, km, vm, mask_rows(idx)))
    mask_is_bool = mf is not None and _is_bool_mask(mf)
    return cases, batch, n_q, n_k, (vs[-1] if vs is not None else 0), scale, mask_is_bool


def scores(q, k, *, scale=None, mask=None, causal=False, window=None, softcap=None):
    """Scaled, soft-capped, masked dot-product scores, as :func:`fastattn.scores`.

    Parameters
    ----------
    q : nested list, shape (..., L_q, D)
    k : nested list, shape (..., L_k, D)
    scale, mask, causal, window, softcap
        As in :func:`fastattn.scores`.

    Returns
    -------
    nested list, shape (..., L_q, L_k)

    Examples
    --------
    >>> from fastattn import reference
    >>> reference.scores([[1.0, 1.0, 1.0, 1.0]] * 2, [[1.0, 1.0, 1.0, 1.0]] * 3, causal=True)
    [[2.0, 2.0, -inf], [2.0, 2.0, 2.0]]
    """
    cases, batch, n_q, n_k, _, scale, mask_is_bool = _prepare(q, k, None, mask, scale)
    flat = []
    for qm, km, _, mrows in cases:
        for i in range(n_q):
            flat.extend(_row_scores(qm[i], km, scale, i, n_q,
                                    mrows[i] if mrows else None, mask_is_bool, causal, window,
                                    softcap))
    return _nest(flat, batch + (n_q, n_k))


def _attend_row(s, values, d_v, sink=None):
    """(output row, weights, lse) of one query from its scores (and its sink logit)."""
    if any(math.isnan(x) for x in s):
        return [_NAN] * d_v, [_NAN] * len(s), _NAN
    visible = [j for j, x in enumerate(s) if x != -_INF]
    has_sink = sink is not None and sink != -_INF
    if not visible and not has_sink:
        return [0.0] * d_v, [0.0] * len(s), -_INF
    m = max([s[j] for j in visible] + ([sink] if has_sink else []))
    if m == _INF:
        return [_NAN] * d_v, [_NAN] * len(s), _NAN
    p = {j: math.exp(s[j] - m) for j in visible}
    total = math.fsum(list(p.values()) + ([math.exp(sink - m)] if has_sink else []))
    out = [_sum(p[j] * values[j][c] for j in visible) / total for c in range(d_v)]
    weights = [p[j] / total if j in p else 0.0 for j in range(len(s))]
    return out, weights, m + math.log(total)


def attention(q, k, v, *, mask=None, causal=False, window=None, scale=None, softcap=None,
              sinks=None, return_weights=False, return_lse=False):
    """``softmax(scale q k^T + mask) v``, as :func:`fastattn.attention`.

    Parameters
    ----------
    q : nested list, shape (..., L_q, D)
    k : nested list, shape (..., L_k, D)
    v : nested list, shape (..., L_k, D_v)
    mask, causal, window, scale, softcap, sinks, return_weights, return_lse
        As in :func:`fastattn.attention` (the semantics are the module docstring's);
        ``sinks`` broadcast against the batch shape ``q.shape[:-2]``.

    Returns
    -------
    out : nested list, shape (..., L_q, D_v)
    weights : nested list, shape (..., L_q, L_k), if ``return_weights``
    lse : nested list, shape (..., L_q), if ``return_lse``

    Examples
    --------
    >>> from fastattn import reference
    >>> q, k, v = [[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]]
    >>> reference.attention(q, k, v, scale=0.0)
    [[2.0, 3.0]]
    >>> reference.attention(q, k, v, mask=[[False, False]], return_lse=True)
    ([[0.0, 0.0]], [-inf])
    """
    cases, batch, n_q, n_k, d_v, scale, mask_is_bool = _prepare(q, k, v, mask, scale)
    if sinks is not None:
        sf, ss = _flatten(sinks)
        if _broadcast_shapes(ss, batch) != batch:
            raise ValueError("sinks must broadcast to the batch shape")
        sink_of = [float(sf[_offset(ss, idx)]) for idx in _indices(batch)]
    outs, weights, lses = [], [], []
    for c, (qm, km, vm, mrows) in enumerate(cases):
        for i in range(n_q):
            s = _row_scores(qm[i], km, scale, i, n_q, mrows[i] if mrows else None,
                            mask_is_bool, causal, window, softcap)
            o, w, lse = _attend_row(s, vm, d_v, None if sinks is None else sink_of[c])
            outs.extend(o)
            weights.extend(w)
            lses.append(lse)
    result = [_nest(outs, batch + (n_q, d_v))]
    if return_weights:
        result.append(_nest(weights, batch + (n_q, n_k)))
    if return_lse:
        result.append(_nest(lses, batch + (n_q,)))
    return result[0] if len(result) == 1 else tuple(result)


def self_attention(x, w_q, w_k, w_v, *, b_q=None, b_k=None, b_v=None, mask=None,
                   causal=False, scale=None, softcap=None, sinks=None, return_weights=False,
                   return_lse=False):
    """Project ``x`` into q, k, v and attend, as :func:`fastattn.self_attention`.

    Parameters
    ----------
    x : nested list, shape (..., L, d_model), or (d_model,) for one token
    w_q, w_k, w_v : nested list, shape (d_model, d_head) (``w_v``: (d_model, d_v))
    b_q, b_k, b_v, mask, causal, scale, softcap, sinks, return_weights, return_lse
        As in :func:`fastattn.self_attention`.

    Returns
    -------
    nested list, shape (..., L, d_v), or (d_v,) for one token
        And the weights and lse when asked.

    Examples
    --------
    The tutorial's worked example, exactly:

    >>> from fastattn import reference
    >>> x = [0.2, 0.7, 0.4]
    >>> w_q = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]]
    >>> w_k = [[0.3, 0.1, 0.5], [0.6, 0.4, 0.2], [0.9, 0.7, 0.8]]
    >>> w_v = [[0.5, 0.6, 0.7], [0.1, 0.2, 0.3], [0.9, 0.8, 0.4]]
    >>> [round(y, 12) for y in reference.self_attention(x, w_q, w_k, w_v)]
    [0.53, 0.58, 0.51]
    """
    flat, shape = _flatten(x)
    one_token = len(shape) == 1
    x = _Shaped(flat, (1,) + shape if one_token else shape)
    q, k, v = _project(x, w_q, b_q), _project(x, w_k, b_k), _project(x, w_v, b_v)
    result = attention(q, k, v, mask=mask, causal=causal, scale=scale, softcap=softcap,
                       sinks=sinks, return_weights=return_weights, return_lse=return_lse)
    if not one_token:
        return result
    if isinstance(result, tuple):
        return tuple(r[0] for r in result)
    return result[0]



def merge_attention(out_a, lse_a, out_b, lse_b):
    """Attention over two disjoint key sets, combined from their outputs and
    log-sum-exps, as :func:`fastattn.merge_attention`.

    Parameters
    ----------
    out_a, out_b : nested list, shape (..., L_q, D_v)
    lse_a, lse_b : nested list, shape (..., L_q)

    Returns
    -------
    out : nested list, shape (..., L_q, D_v)
    lse : nested list, shape (..., L_q)

    Examples
    --------
    >>> from fastattn import reference
    >>> q, k, v = [[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]]
    >>> a = reference.attention(q, k[:1], v[:1], return_lse=True)
    >>> b = reference.attention(q, k[1:], v[1:], return_lse=True)
    >>> out, lse = reference.merge_attention(*a, *b)
    >>> whole = reference.attention(q, k, v)
    >>> max(abs(x - y) for x, y in zip(out[0], whole[0])) < 1e-15
    True
    """
    oa, shape = _flatten(out_a)
    ob, _ = _flatten(out_b)
    la, lshape = _flatten(lse_a)
    lb, _ = _flatten(lse_b)
    d_v = shape[-1] if shape else 0
    out, lse = [], []
    for r, (a, b) in enumerate(zip(la, lb)):
        row_a, row_b = oa[r * d_v:(r + 1) * d_v], ob[r * d_v:(r + 1) * d_v]
        if a == -_INF and b == -_INF:
            out.extend([0.0] * d_v)
            lse.append(-_INF)
            continue
        m = max(a, b) if not (math.isnan(a) or math.isnan(b)) else _NAN
        total = math.exp(a - m) + math.exp(b - m)
        merged = m + math.log(total)
        ca, cb = math.exp(a - merged), math.exp(b - merged)
        out.extend(ca * x + cb * y for x, y in zip(row_a, row_b))
        lse.append(merged)
    return _nest(out, shape), _nest(lse, lshape)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, window=None,
                     scale=None, softcap=None, sinks=None, return_lse=False):
    """Attention over packed sequences of different lengths, as
    :func:`fastattn.attention_varlen`: each sequence and query head attended on its own.

    Parameters
    ----------
    q : nested list, shape (total_q, H, D)
    k : nested list, shape (total_k, H_kv, D)
    v : nested list, shape (total_k, H_kv, D_v)
    cu_seqlens_q, cu_seqlens_k : list of int, n + 1 offsets each
    causal, window, scale, softcap, return_lse
        As in :func:`attention`, per sequence (causal aligned bottom-right).
    sinks : list of H numbers, optional

    Returns
    -------
    out : nested list, shape (total_q, H, D_v)
    lse : nested list, shape (total_q, H), if ``return_lse``

    Examples
    --------
    >>> from fastattn import reference
    >>> q = [[[1.0, 0.0]], [[0.0, 1.0]]]; k = v = [[[1.0, 2.0]], [[3.0, 4.0]]]
    >>> reference.attention_varlen(q, k, v, [0, 1, 2], [0, 1, 2])
    [[[1.0, 2.0]], [[3.0, 4.0]]]
    """
    qf, (total_q, n_heads, d) = _flatten(q)
    kf, (total_k, n_kv, _) = _flatten(k)
    vf, (_, _, d_v) = _flatten(v)
    cu_q, cu_k = [int(x) for x in _flatten(cu_seqlens_q)[0]], [int(x) for x in _flatten(cu_seqlens_k)[0]]
    group = n_heads // n_kv
    out = [0.0] * (total_q * n_heads * d_v)
    lse = [-_INF] * (total_q * n_heads)

    def rows(flat, heads, width, first, stop, h):
        return [flat[(t * heads + h) * width:(t * heads + h + 1) * width] for t in range(first, stop)]

    for s in range(len(cu_q) - 1):
        if cu_q[s + 1] == cu_q[s]:
            continue
        for h in range(n_heads):
            qs = rows(qf, n_heads, d, cu_q[s], cu_q[s + 1], h)
            ks = _Shaped(_flat_rows(rows(kf, n_kv, d, cu_k[s], cu_k[s + 1], h // group)),
                         (cu_k[s + 1] - cu_k[s], d))
            vs = _Shaped(_flat_rows(rows(vf, n_kv, d_v, cu_k[s], cu_k[s + 1], h // group)),
                         (cu_k[s + 1] - cu_k[s], d_v))
            o, l = attention(_Shaped(_flat_rows(qs), (len(qs), d)), ks, vs, causal=causal,
                             window=window, scale=scale, softcap=softcap,
                             sinks=None if sinks is None else float(sinks[h]), return_lse=True)
            for i, t in enumerate(range(cu_q[s], cu_q[s + 1])):
                out[(t * n_heads + h) * d_v:(t * n_heads + h + 1) * d_v] = o[i]
                lse[t * n_heads + h] = l[i]
    result = _nest(out, (total_q, n_heads, d_v))
    return (result, _nest(lse, (total_q, n_heads))) if return_lse else result


def _flat_rows(rows):
    return [x for row in rows for x in row]

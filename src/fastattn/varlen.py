"""Attention over a packed batch of sequences of different lengths (``attention_varlen``).

Design: a ragged call is the fused kernel's call with a table instead of a uniform
shape. The kernel reads the packed arrays in place (a head's tokens are rows a head count
apart; nothing is transposed or gathered), and every (sequence, query head) becomes an
entry of the table with its own first rows and sizes and the query-block size that
``attention`` would take for that sequence alone: so a sequence's result is bitwise what
``attention`` gives it on the fused path. The work items of all entries run in one
parallel region, the costliest entries first (the threads finish together), each
entry's query blocks last to first (a causal entry's costliest first, and the keys a
thread packs for one block serve its next).
"""

import numpy as np

from . import _plan, _run
from ._dispatch import kernels as _kernels
from ._validation import (as_array, check_flag, check_scale, check_sinks, check_softcap,
                          check_threads, check_window, contiguous, dtypes_of, is_bfloat16)

__all__ = ["attention_varlen"]

# The kernel's SEQ_N fields of an entry: q row, k/v row, queries, keys, query block, sink,
# and (paged calls) where its page ids start.
_SEQ_N = 7


def _offsets(name, cu, total, n_seqs=None):
    """cu_seqlens as int64 offsets: 1-D integers, starting at 0, never decreasing, ending
    at the packed arrays' length (total); n_seqs + 1 of them when n_seqs is given."""
    a = as_array(name, cu)
    if a.ndim != 1 or a.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with n + 1 offsets (n sequences), got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if n_seqs is not None and a.shape[0] != n_seqs + 1:
        raise ValueError(f"{name} must have as many offsets as cu_seqlens_q ({n_seqs + 1}), "
                         f"got {a.shape[0]}")
    if a.dtype.kind == "u" and a.size and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds offsets beyond int64")
    a = a.astype(np.int64)
    if a[0] != 0:
        raise ValueError(f"{name} must start at 0, got {a[0]}")
    steps = np.diff(a)
    if (steps < 0).any():
        at = int(np.argmax(steps < 0))
        raise ValueError(f"{name} must not decrease, got {a[at]} then {a[at + 1]} "
                         f"(offsets {at} and {at + 1})")
    if a[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {a[-1]}")
    return a


def _packed(name, a, ndim_name):
    if a.ndim != 3:
        raise ValueError(f"{name} must be packed as {ndim_name}, got shape {a.shape}")
    return a


def _visible_keys(n_q, n_k, causal, window):
    """About how many (query, key) pairs of a sequence are computed (its cost)."""
    if not causal:
        return n_q * n_k
    # Query i sees keys up to i + n_k - n_q (at least none), at most `window` of them.
    i = np.arange(n_q)
    seen = np.clip(i + n_k - n_q + 1, 0, n_k)
    if window:
        seen = np.minimum(seen, window)
    return int(seen.sum())


def _tables(nq, nk, q_first, kv_first, kv_head_rows, pages_at, n_heads, group, causal,
            window, itemsize):
    """The kernel's tables for these sequences: seqs (a row per query head of each sequence
    with queries and keys, costliest sequences first), work (entry, first query), and the
    largest query block, queries and keys. Sequence s's query head h reads q's row
    q_first[s] + h and its kv head's rows from kv_first[s] + (h // group) kv_head_rows
    (pages_at: where a paged sequence's page ids start, or None)."""
    entries, costs = [], []
    for s in np.flatnonzero((nq > 0) & (nk > 0)):
        n_q, n_k = int(nq[s]), int(nk[s])
        q_block, _ = _kernels.tiles(n_heads, n_q, n_k, causal, itemsize)
        costs.append(_visible_keys(n_q, n_k, causal, window) + n_q)
        entries.append((int(q_first[s]), int(kv_first[s]), n_q, n_k, q_block,
                        0 if pages_at is None else int(pages_at[s])))
    order = sorted(range(len(entries)), key=lambda e: -costs[e])  # stable: ties in order
    heads = np.arange(n_heads)
    seqs = np.empty((len(entries) * n_heads, _SEQ_N), np.intp)
    for at, e in enumerate(order):
        q0, k0, n_q, n_k, q_block, page_at = entries[e]
        rows = seqs[at * n_heads:(at + 1) * n_heads]
        rows[:, 0] = q0 + heads
        rows[:, 1] = k0 + heads // group * kv_head_rows
        rows[:, 2:5] = n_q, n_k, q_block
        rows[:, 5] = heads
        rows[:, 6] = page_at
    n_blocks = -(-seqs[:, 2] // seqs[:, 4])
    entry = np.repeat(np.arange(seqs.shape[0]), n_blocks)
    # Within an entry, its blocks last to first.
    first = np.cumsum(n_blocks) - n_blocks
    block = n_blocks[entry] - 1 - (np.arange(entry.size) - first[entry])
    work = np.ascontiguousarray(np.stack([entry, block * seqs[entry, 4]], axis=1), np.intp)
    return seqs, work, int(seqs[:, 4].max()), int(seqs[:, 2].max()), int(seqs[:, 3].max())


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, window=None,
                     scale=None, softcap=None, sinks=None, return_lse=False, num_threads=None):
    """Attention over a batch of sequences of different lengths, packed without padding.

    Sequence ``s`` has queries ``q[cu_seqlens_q[s]:cu_seqlens_q[s + 1]]`` and keys and
    values ``k[cu_seqlens_k[s]:cu_seqlens_k[s + 1]]`` (the same rows of ``v``); each is
    attended on its own, as :func:`fastattn.attention` would, and all in one call whose
    work is balanced across the threads (flash-attn's ``flash_attn_varlen_func``).

    Parameters
    ----------
    q : array_like, shape (total_q, H, D)
    k : array_like, shape (total_k, H_kv, D)
    v : array_like, shape (total_k, H_kv, D_v)
        Packed sequences, token-major. ``H_kv`` must divide ``H``: query head ``h`` reads
        key/value head ``h // (H / H_kv)`` (grouped-query attention).
    cu_seqlens_q, cu_seqlens_k : array_like of int, shape (n + 1,)
        Offsets of the ``n`` sequences' rows: starting at 0, never decreasing, ending at
        ``total_q`` (``total_k``). A sequence may be empty: with no query it has nothing
        to compute; with queries and no key, its queries are fully masked (zeros, lse
        ``-inf`` or the sink).
    causal : bool, default False
        Per sequence, aligned bottom-right: query ``i`` of a sequence with ``L_q`` queries
        and ``L_k`` keys sees its keys ``j <= i + L_k - L_q`` (a prefill chunk after
        cached tokens).
    window, scale, softcap, num_threads
        As in :func:`fastattn.attention`, for every sequence. Results are bitwise
        identical for any ``num_threads``.
    sinks : array_like, shape (H,) or broadcastable to it, optional
        One logit per query head, as in :func:`fastattn.attention`.
    return_lse : bool, default False
        Also return the log-sum-exp of each query and head, shape (total_q, H), in the
        compute dtype (flash-attn returns its transpose, (H, total_q)).

    Returns
    -------
    out : ndarray, shape (total_q, H, D_v)
    lse : ndarray, shape (total_q, H), if ``return_lse``

    Notes
    -----
    dtypes as :func:`fastattn.attention`: float32 and float64 run natively, bfloat16 and
    float16 compute in float32 and are returned in their own dtype. A sequence's result
    is bitwise :func:`fastattn.attention`'s on it alone (``q[a:b].transpose(1, 0, 2)``
    and the same of ``k``, ``v``) wherever that call takes the fused kernel (two or more
    queries); a single query runs here in the fused kernel as well, where ``attention``
    would take its decoding kernel (equal to within rounding). The packed arrays are read
    in place where they are C-contiguous in the dtype the kernel reads (else copied
    once).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((5, 2, 4)); k = rng.standard_normal((5, 1, 4)); v = k
    >>> out = fastattn.attention_varlen(q, k, v, [0, 2, 5], [0, 2, 5], causal=True)
    >>> bool(np.allclose(out[2:], fastattn.attention(
    ...     q[2:].transpose(1, 0, 2), k[2:].transpose(1, 0, 2), v[2:].transpose(1, 0, 2),
    ...     causal=True).transpose(1, 0, 2)))
    True
    """
    q = _packed("q", as_array("q", q), "(total_q, H, D)")
    k = _packed("k", as_array("k", k), "(total_k, H_kv, D)")
    v = _packed("v", as_array("v", v), "(total_k, H_kv, D_v)")
    compute, result = dtypes_of(("q", "k", "v"), (q.dtype, k.dtype, v.dtype))
    total_q, n_heads, d_head = q.shape
    total_k, n_kv, d_v = v.shape
    if k.shape[:2] != (total_k, n_kv):
        raise ValueError(f"k and v must have the same tokens and heads, got k.shape={k.shape} "
                         f"and v.shape={v.shape}")
    if k.shape[2] != d_head:
        raise ValueError(f"q and k must have the same head size, got q.shape={q.shape} and "
                         f"k.shape={k.shape}")
    group = _kernels.gqa_group(n_heads, n_kv)
    if group < 1:
        raise ValueError(f"the key/value heads ({n_kv}) must divide the query heads "
                         f"({n_heads}), got q.shape={q.shape} and k.shape={k.shape}")
    cu_q = _offsets("cu_seqlens_q", cu_seqlens_q, total_q)
    cu_k = _offsets("cu_seqlens_k", cu_seqlens_k, total_k, cu_q.shape[0] - 1)
    causal = check_flag("causal", causal)
    window = check_window(window, causal)
    scale = check_scale(scale, d_head)
    softcap = check_softcap(softcap)
    sinks = check_sinks(sinks, (n_heads,), compute)
    return_lse = check_flag("return_lse", return_lse)
    n_threads = check_threads(num_threads)

    kind = _lowp_kind(q, k, v, d_head, d_v)
    out_dtype = result if kind is not None and result.itemsize == 2 and d_v else compute
    out = np.zeros((total_q, n_heads, d_v), out_dtype)
    lse = np.full((total_q, n_heads), -np.inf, compute)
    if sinks is not None:
        lse[...] = sinks
    nq, nk = np.diff(cu_q), np.diff(cu_k)
    if n_heads and ((nq > 0) & (nk > 0)).any():
        _run.run_varlen(kind, q, k, v, compute, out, lse, _tables(
            nq, nk, cu_q * n_heads, cu_k * n_kv, 1, None, n_heads, n_heads // n_kv, causal,
            window, compute.itemsize), causal, window, scale, softcap, sinks, n_threads)
    # (Sequences with queries and no key keep their zeros and lse, the sink or -inf.)
    out = out if out.dtype == result else out.astype(result)
    return (out, lse) if return_lse else out


def _lowp_kind(q, k, v, d_head, d_v):
    """"bfloat16" or "float16" when q, k, v all are and the fused kernel reads them as
    they are (else they are converted to float32 first)."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    kind = ("bfloat16" if all(is_bfloat16(d) for d in dtypes) else
            "float16" if all(d == np.float16 for d in dtypes) else None)
    if kind is not None and _kernels.lowp_mode(kind, d_head, d_v) is None:
        return None
    return kind

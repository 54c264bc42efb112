"""The runners of the compiled kernels: projection, softmax, scores, the fused attention
and the decoding kernel.

Design: the runners take what _validation and _plan have checked and prepared; they ask
the compiled policy for the thread team (small work runs on one thread), hold BLAS to one
thread where the tile kernels call it from several, raise MemoryError when a kernel
reports that its scratch could not be allocated, and record the threads that ran
(``last_call``, for tests). (_plan, _validation and tune ask the compiled policy's rules
too, but call no kernel.)
"""

import contextlib
import functools
import math
import threading

import numpy as np

from . import _plan
from ._dispatch import kernels as _kernels
from ._validation import check_out, contiguous, is_bfloat16

__all__ = ["serial_blas", "last_call", "project_rows", "project_qkv", "small_attention",
           "cache_decode", "run_softmax", "run_scores", "run_attention", "run_decode",
           "run_varlen", "identity_index", "kernel_target", "finish"]

class _SerialBlas:
    """Holds the BLAS libraries to one thread while any fastattn kernel that needs it runs.

    threadpoolctl's ``threadpool_limits`` builds a controller on every use (about 1 ms);
    this keeps one controller and a count of the calls inside, so concurrent calls from
    several Python threads neither pay that nor restore the limit under each other's feet.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._libs = None
        self._saved = ()

    def _controllers(self):
        if self._libs is None:
            from threadpoolctl import ThreadpoolController

            libs = ThreadpoolController().select(user_api="blas").lib_controllers
            # Only the BLAS that scipy.linalg.cython_blas calls: NumPy ships its own
            # OpenBLAS, and other threads of the program may be using it meanwhile.
            # Where the two are one library (a system or conda BLAS), hold that one.
            scipy_libs = [lib for lib in libs if "scipy" in lib.filepath and "numpy" not in lib.filepath]
            self._libs = scipy_libs or libs
        return self._libs

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                libs = self._controllers()
                self._saved = [lib.num_threads for lib in libs]
                for lib in libs:
                    lib.set_num_threads(1)
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for lib, n in zip(self._libs, self._saved):
                    lib.set_num_threads(n)
        return False


serial_blas = _SerialBlas()
_no_context = contextlib.nullcontext()

# What the latest attention call of this Python thread ran with (tests and debugging).
last_call = threading.local()

# Ctrl-C: Python runs signal handlers only between bytecodes, never inside a kernel, so a
# long call runs its work in pieces and returns to the interpreter between them; SIGINT
# then raises KeyboardInterrupt at the next piece. A piece is about PIECE_FLOPS per thread
# (a few tenths of a second at most); a call below that is one piece. An extra piece
# costs its end, where the threads wait for the one still in its last work item: at this
# size that is within noise of one piece (docs/DESIGN.md has the figures).
PIECE_FLOPS = 8e9
# A projection over PROJECT_ONE_CALL_FLOPS runs in pieces: column bands of at most
# PIECE_COLS outputs, each cut into row bands of at most PROJECT_PIECE_FLOPS, both split
# evenly. Each piece is a BLAS call of its own, which re-packs its part of x and w (about
# 10 ms a piece), so pieces are large: under 8% slower than one GEMM for the largest
# projections, and Ctrl-C still within a few tenths of a second.
PIECE_COLS = 2048
PROJECT_PIECE_FLOPS = 64e9
PROJECT_ONE_CALL_FLOPS = 64e9


def pieces(n_items, flops, team):
    """Ranges (start, stop) covering range(n_items) in order, each about PIECE_FLOPS per
    thread of work and a multiple of ``team`` items (the threads share it evenly); one
    range when the whole call is under that."""
    per_piece = max(team, int(PIECE_FLOPS * team * n_items / flops) if flops else n_items)
    per_piece = -(-per_piece // team) * team
    return [(start, min(start + per_piece, n_items)) for start in range(0, n_items, per_piece)]


def _checked(team, what):
    """The team size a kernel returned, or MemoryError when it could not allocate."""
    if team < 0:
        raise MemoryError(f"attention: cannot allocate the {what}")
    last_call.threads = team
    return team


# --------------------------------------------------------------------------- results

def kernel_target(out, shape, compute):
    """Where a kernel writes: a view of out itself when out is C-contiguous in the
    compute dtype (then ``finish`` has nothing to copy), else a new array."""
    if out is not None and out.dtype == compute and out.flags.c_contiguous:
        return out.reshape(shape)
    return np.empty(shape, dtype=compute)


def finish(result, result_dtype, out):
    """Cast the computed array to the result dtype, into out= when given (no copy when the
    kernel already wrote into out itself)."""
    if out is None:
        return result if result.dtype == result_dtype else result.astype(result_dtype)
    if result.base is not out and result is not out:
        out[...] = result
    return out


# --------------------------------------------------------------------------- projection

def project_rows(x2, w, b, target):
    """target (n_rows, d_out) = x2 @ w (+ b), x2 C-contiguous in target's dtype."""
    n_rows, d_in = x2.shape
    compute = target.dtype
    if n_rows == 0 or target.shape[1] == 0:
        return
    if d_in == 0:  # an empty sum: BLAS wants every dimension >= 1
        target[...] = 0 if b is None else contiguous(b, compute)
        return
    b2 = contiguous(b, compute) if b is not None else np.zeros(1, compute)
    w = contiguous(w, compute)
    # fastattn's threads each take a band of the output (rows, or columns when there are
    # more of those; _kernels.project) with BLAS held to one thread, rather than one GEMM
    # threaded by the BLAS: as fast alone, and BLAS's pool, never started, is not left
    # spinning on the cores when the call returns (an attention call right after took 4x
    # its time). Only a large projection runs in pieces, for Ctrl-C (see PIECE_COLS).
    d_out = target.shape[1]
    # (The kernel caps the team at its bands: n_rows of rows, or d_out / 16 of columns.)
    team = _kernels.team(max(1, _kernels.max_threads()), 2.0 * n_rows * d_in * d_out,
                         max(n_rows, d_out))
    rows, cols = project_pieces(n_rows, d_in, d_out)
    with serial_blas if _kernels.blas_would_thread(n_rows, d_in, d_out) else _no_context:
        for r0, r1 in rows:
            for c0, c1 in cols:
                _kernels.project(x2[r0:r1], w, b2, b is not None, target[r0:r1], c0, c1, team)


def _even(n, most):
    """range(n) in the fewest runs of at most `most`, as even as can be."""
    count = -(-n // max(1, most))
    return [(n * i // count, n * (i + 1) // count) for i in range(count)]


def project_pieces(n_rows, d_in, d_out):
    """(row ranges, column ranges) of a projection's pieces: one of each up to
    PROJECT_ONE_CALL_FLOPS, else column bands of at most PIECE_COLS, cut into row bands
    of at most PROJECT_PIECE_FLOPS."""
    if 2.0 * n_rows * d_in * d_out <= PROJECT_ONE_CALL_FLOPS:
        return [(0, n_rows)], [(0, d_out)]
    cols = _even(d_out, PIECE_COLS)
    width = max(c1 - c0 for c0, c1 in cols)
    return _even(n_rows, int(PROJECT_PIECE_FLOPS // (2.0 * d_in * width))), cols


# --------------------------------------------------------------------------- softmax

def run_softmax(rows, target, log_out, n_threads):
    """target = softmax (or log_softmax) of each row of rows (n_rows, n), both contiguous."""
    _kernels.softmax(rows, target, log_out, False, _kernels.softmax_threads(rows.size, n_threads))


# --------------------------------------------------------------------------- kernel inputs
# Every array the attention kernels read is converted here, once: C-contiguous in the
# compute dtype (bfloat16 keys and values of the decoding kernel stay as they are).

def _kv_stored(a, lay):
    """k or v with the batch shape of the stored key/value entries (a view)."""
    if a.shape[:-2] != lay.kv_batch:
        a = np.broadcast_to(a, lay.kv_batch + a.shape[-2:])
    return a


def _kv_contiguous(a, lay, width, compute):
    """k or v as C-contiguous (n_kv_items, L_k, width) in the compute dtype."""
    return contiguous(_kv_stored(a, lay), compute).reshape(lay.n_kv_items, lay.n_keys, width)


def _kv_items(a, lay, width, compute):
    """k or v as (n_kv_items, L_k, width) in the dtype `compute` (the compute dtype, or
    bfloat16 for the decoding kernel), without copying when the last two axes are already
    contiguous (a KVCache's storage is read in place)."""
    a = _kv_stored(a, lay)
    itemsize = compute.itemsize
    if not (a.dtype == compute and a.strides[-1] == itemsize
            and (lay.n_keys == 1 or a.strides[-2] == width * itemsize)):
        a = contiguous(a, compute)
    items = a.reshape(lay.n_kv_items, lay.n_keys, width)  # a view whenever strides allow
    if items.strides[0] % itemsize:  # pragma: no cover - exotic byte strides
        items = contiguous(items, compute)
    return items


def _kernel_inputs(plan):
    """The contiguous, compute-dtype q, k and mask the kernels read (mask None without
    one; a boolean mask goes as uint8, a float one in the compute dtype)."""
    lay, compute = plan.layout, plan.compute
    d_head = lay.d_head
    q = contiguous(plan.q, compute).reshape(lay.n_q_items, lay.n_queries, d_head)
    k = _kv_contiguous(plan.k, lay, d_head, compute)
    if d_head == 0:
        # An empty dot product is 0: give BLAS one zero column instead of a zero dimension.
        q = np.zeros(q.shape[:-1] + (1,), compute)
        k = np.zeros(k.shape[:-1] + (1,), compute)
    return q, k, _kernel_mask(plan)


def _lowp_inputs(plan):
    """q, k, v for attention_lowp: C-contiguous in their own dtype (plan.lowp's), as
    uint8 arrays of their bytes (n_items, L, width x itemsize)."""
    lay = plan.layout
    dtype = plan.q.dtype
    q = contiguous(plan.q, dtype).reshape(lay.n_q_items, lay.n_queries, lay.d_head)
    k = _kv_contiguous(plan.k, lay, lay.d_head, dtype)
    v = _kv_contiguous(plan.v, lay, lay.d_v, dtype)
    return [a.view(np.uint8) for a in (q, k, v)]


def _kernel_mask(plan):
    """The mask the kernels read: None, uint8 for a boolean one, else the compute dtype."""
    lay, compute = plan.layout, plan.compute
    mask = None
    if plan.mask_kind != _plan.MaskKind.NONE:
        mask = np.broadcast_to(plan.mask, lay.mask_batch + (lay.n_queries, lay.n_keys))
        mask = mask.reshape(lay.n_mask_items, lay.n_queries, lay.n_keys)
        if plan.mask_kind == _plan.MaskKind.ADD:
            mask = contiguous(mask, compute)
        else:
            mask = contiguous(mask, np.bool_).view(np.uint8)
    return mask


# --------------------------------------------------------------------------- scores

def run_scores(plan):
    """The masked, scaled scores of a plan, (n_batch, L_q, L_k) in the compute dtype."""
    lay = plan.layout
    _plan.refuse_huge_plan(plan, [("scores", lay.n_batch * lay.n_queries * lay.n_keys)])
    result = np.empty((lay.n_batch, lay.n_queries, lay.n_keys), plan.compute)
    if result.size:
        q, k, mask = _kernel_inputs(plan)
        _kernels.scores(q, k, mask, plan.mask_kind, lay.index, plan.causal, plan.window,
                        plan.scale, plan.softcap, result)
    return result


# --------------------------------------------------------------------------- small calls

def small_attention(q, k, v, causal, window, scale, softcap, sinks, n_threads):
    """attention(q, k, v, causal=causal, window=window, scale=scale, softcap=softcap,
    sinks=sinks) with every other argument at its default (and num_threads=n_threads,
    None for OpenMP's default; window None or an int >= 1 with causal True; scale None or
    a finite float; softcap None or a finite float > 0; sinks None or an ndarray), for one
    query per batch entry (the decoding kernel, with grouped-query heads, windows, soft
    caps and sinks of shape (H,) in q's dtype) or calls small enough to run on one thread
    (below the policy's serial_flops, none of those options); None for anything else (the general path
    then validates it). The compiled kernels check
    the arrays and run the general path's kernel choice, tile rule, thread count and
    micro-kernel choice, so the result is bitwise the same, without the planning that
    cost about 20 us of a 30 us tiny call (and 25 us of a 80 us decoding step)."""
    result = _kernels.small_attention(
        q, k, v, causal, window or 0, scale, softcap or 0.0, sinks,
        # a team is at most one thread per work item: any larger request is the same
        max(1, _kernels.max_threads()) if n_threads is None else min(n_threads, 1 << 30))
    if result is None:
        return None
    last_call.threads = result[1]
    return result[0]


def cache_decode(q, k_store, v_store, start, n_keys, n_threads, scales=()):
    """attention(q, cache=c) with every other argument at its default, from the cache's
    storage arrays (rows start to start + n_keys; 8-bit storage with scales = (key
    scales, value scales)), straight from compiled code (bitwise the general path's
    decoding call); None unless q is a C-contiguous float32/float64 ndarray (B, H, 1, D)
    in the cache's dtype (fastattn.cache.decode_step checked the shapes)."""
    result = _kernels.cache_decode(q, k_store, v_store, start, n_keys, min(n_threads, 1 << 30),
                                   *scales)
    if result is None:
        return None
    last_call.threads = result[1]
    return result[0]


# --------------------------------------------------------------------------- attention

def run_attention(plan, return_weights, out, n_threads):
    """Run a plan by its route (the plan's decisions are final); returns (out, weights or
    None, lse), shaped as the caller sees them."""
    lay, compute = plan.layout, plan.compute
    n_batch, n_queries, n_keys, d_v = lay.n_batch, lay.n_queries, lay.n_keys, lay.d_v
    out_shape = lay.batch + (n_queries, d_v)
    if out is not None:
        check_out(out, out_shape, plan.result, plan.named)
    flat = (n_batch, n_queries, d_v)
    results = [("output", n_batch * n_queries * d_v), ("log-sum-exp", n_batch * n_queries)]
    if return_weights:
        results.append(("weights", n_batch * n_queries * n_keys))
    _plan.refuse_huge_plan(plan, results)
    # 16-bit results of 16-bit inputs are written by the kernel itself (no float32 copy).
    target = kernel_target(out, flat, plan.result if _writes_result(plan) else compute)
    lse = np.empty((n_batch, n_queries), compute)
    weights = None
    route = plan.route
    if route == _plan.Route.NO_KEYS:
        target[...] = 0  # no key to attend to: every query is fully masked
        # ... and its log-sum-exp is the sink's alone, if it has one.
        lse[...] = -np.inf if plan.sinks is None else plan.sinks.reshape(n_batch, 1)
    elif route == _plan.Route.DECODE:
        _decode_plan(plan, target, lse, n_threads)
    elif route == _plan.Route.FUSED:
        weights = _fused(plan, return_weights, target, lse, n_threads)
    if return_weights and weights is None:
        weights = np.zeros((n_batch, n_queries, n_keys), compute)
    result = finish(target.reshape(out_shape), plan.result, out)
    if weights is not None:
        weights = finish(weights.reshape(lay.batch + (n_queries, n_keys)), plan.result, None)
    return result, weights, lse.reshape(lay.batch + (n_queries,))


def _fused(plan, return_weights, target, lse, n_threads):
    """The fused kernel into target and lse; the weights when asked, else None. 16-bit
    inputs (and float32 ones allowed bfloat16 products: plan.lowp) go to attention_lowp,
    which reads them in their own dtype and computes in float32."""
    lay = plan.layout
    n_batch, n_queries, n_keys = lay.n_batch, lay.n_queries, lay.n_keys
    if plan.lowp is None:
        q, k, mask = _kernel_inputs(plan)
        v = _kv_contiguous(plan.v, lay, lay.d_v, plan.compute)
        kernel_out = target
        if lay.d_v == 0:
            # Nothing to average, but lse still needs the pass: use one zero column.
            v = np.zeros(v.shape[:-1] + (1,), plan.compute)
            kernel_out = np.empty((n_batch, n_queries, 1), plan.compute)
        d_head, d_v = q.shape[-1], v.shape[-1]
    else:
        q, k, v = _lowp_inputs(plan)
        mask = _kernel_mask(plan)
        d_head, d_v = lay.d_head, lay.d_v
    q_block, k_block, micro = plan.q_block, plan.k_block, plan.micro
    flops = 2.0 * n_batch * n_queries * n_keys * (d_head + d_v)
    n_work = n_batch * -(-n_queries // q_block)
    team = _kernels.team(n_threads, flops, n_work)
    sinks = None if plan.sinks is None else plan.sinks.reshape(n_batch)
    options = (mask, plan.mask_kind, lay.index, plan.causal, plan.window, plan.scale,
               plan.softcap, sinks)
    if plan.lowp is None:
        kernel = _kernels.attention
        args = (q, k, v, *options, kernel_out, lse, q_block, k_block, micro, team)
    else:
        kernel = _kernels.attention_lowp
        out_kind = ("float32" if target.dtype == np.float32 else
                    "float16" if target.dtype == np.float16 else "bfloat16")
        args = (plan.lowp, q, k, v, *options, out_kind, target.view(np.uint8), lse, q_block,
                k_block, team)
    _fused_pieces(kernel, args, None, n_work, flops / (2 if plan.causal else 1), team,
                  (n_keys, d_head, d_v, q_block, k_block, micro, plan.compute.itemsize),
                  plan.lowp)
    if not return_weights:
        return None
    if plan.lowp is not None:
        # The weights from the scores in float32 (exact products of the inputs' values).
        q, k, _ = _kernel_inputs(plan)
    return _weights(plan, q, k, mask, lse, team)


def _fused_pieces(kernel, args, ragged, n_work, flops, team, sizes, lowp):
    """Run the fused kernel's work items in pieces (one unless the call is long: Ctrl-C,
    PIECE_FLOPS), BLAS held to one thread where the tiles call it from several. sizes:
    attention_scratch's (n_keys, d_head, d_v, q_block, k_block, micro, itemsize). ragged:
    the kernel's, or None."""
    parts = pieces(n_work, flops, team)
    # A call in pieces allocates its scratch once and passes it to every piece, so each
    # thread's packed keys (a few MiB for long sequences) carry over; allocated and freed
    # per piece, they grew the heap: 9-56 MiB peak extra at 16,384 tokens, 9.7 in one.
    scratch = (None if len(parts) == 1 else _kernels.attention_scratch(
        *sizes, team, lowp, 1 if ragged is None else ragged[6],
        ragged is not None and len(ragged) > 7))
    n_keys, d_head, d_v, q_block, k_block, micro, _ = sizes
    # (The micro-kernels and the 16-bit tiles call no BLAS.)
    with (serial_blas if lowp is None and not micro
          and _kernels.blas_would_thread(q_block, k_block, max(d_head, d_v)) else _no_context):
        ragged = () if ragged is None else (ragged,)
        for start, stop in parts:
            _checked(kernel(*args, start, stop, scratch, *ragged), "per-thread scratch")


def run_varlen(kind, q, k, v, compute, out, lse, tables, causal, window, scale, softcap,
               sinks, n_threads, pages=None):
    """The fused kernel on a ragged call (fastattn.varlen): q, k, v packed token-major,
    read in kind ("bfloat16"/"float16", or None: converted to compute), into out and lse
    (packed too: (total_q, H, D_v), (total_q, H)) for the entries of tables (seqs, work,
    largest query block, queries, keys). pages: None, or (page ids, rows per page) when k
    and v are the pools of a PagedKVCache, (kv_heads x blocks, block rows, D)."""
    seqs, work, q_block, n_queries, n_keys = tables
    d_head, d_v = q.shape[2], v.shape[2]
    dtype = compute if kind is None else q.dtype
    q, k, v = (contiguous(a, dtype) for a in (q, k, v))
    kernel_out = out
    if kind is None:
        if d_head == 0:  # an empty dot product is 0: one zero column
            q = np.zeros(q.shape[:-1] + (1,), compute)
            k = np.zeros(k.shape[:-1] + (1,), compute)
        if d_v == 0:  # nothing to average, but lse still needs the pass: one zero column
            v = np.zeros(v.shape[:-1] + (1,), compute)
            kernel_out = np.empty(out.shape[:-1] + (1,), compute)
    q_rows, k_rows = seqs[:, 2], seqs[:, 3]
    flops = 2.0 * float((q_rows * k_rows).sum()) * (d_head + d_v)
    team = _kernels.team(n_threads, flops, work.shape[0])
    _, k_block = _kernels.tiles(1, n_queries, n_keys, causal, compute.itemsize)
    micro = _kernels.use_microkernels(compute.itemsize, d_head or 1, d_v or 1)
    unused_index = np.zeros((3, 1), np.intp)
    options = (None, _plan.MaskKind.NONE, unused_index, causal, window, scale, softcap, sinks)
    if kind is None:
        args = (q, k, v, *options, kernel_out, lse, q_block, k_block, micro, team)
        kernel = _kernels.attention
    else:
        args = (kind, *(a.view(np.uint8) for a in (q, k, v)), *options,
                "bfloat16" if is_bfloat16(out.dtype) else str(out.dtype), out.view(np.uint8),
                lse, q_block, k_block, team)
        kernel = _kernels.attention_lowp
    ragged = (seqs, work, n_queries, n_keys, q_block, q.shape[1],
              k.shape[1] if pages is None else 1) + (pages or ())
    _fused_pieces(kernel, args, ragged,
                  work.shape[0], flops / (2 if causal else 1), team,
                  (n_keys, q.shape[2], v.shape[2], q_block, k_block, micro, compute.itemsize),
                  kind)
    if kernel_out is not out:
        out[...] = 0


def _writes_result(plan):
    """Whether the fused kernel writes a 16-bit result dtype itself (attention_lowp)."""
    return (plan.lowp is not None and plan.route == _plan.Route.FUSED and plan.layout.d_v > 0
            and _sixteen_bit(plan.result))


def _weights(plan, q, k, mask, lse, team):
    """The attention weights (n_batch, L_q, L_k) of a fused call, from its scores and lse."""
    lay, compute = plan.layout, plan.compute
    n_batch, n_queries, n_keys = lay.n_batch, lay.n_queries, lay.n_keys
    sinks = None if plan.sinks is None else plan.sinks.reshape(n_batch)
    w = np.empty((n_batch, n_queries, n_keys), compute)
    _kernels.scores(q, k, mask, plan.mask_kind, lay.index, plan.causal, plan.window,
                    plan.scale, plan.softcap, w)
    if sinks is not None:
        # The sink takes its share of each row: p_ij = exp(s_ij - lse_i), with the lse
        # (which counts the sink) from the fused pass. A hidden key: exp(-inf) = 0.
        # A row with no visible key and no sink (lse -inf) gets zeros, not exp(-inf + inf).
        with np.errstate(invalid="ignore", over="ignore"):
            np.exp(w - lse[:, :, None], out=w)
        w[lse == -np.inf] = 0
        return w
    w2 = w.reshape(-1, n_keys)
    _kernels.softmax(w2, w2, False, True, team)
    return w


def _decode_plan(plan, target, lse, n_threads):
    """Single-query attention: one pass over each key/value head for its group of queries."""
    lay, compute = plan.layout, plan.compute
    group = lay.decode_group
    n_groups = lay.n_batch // group
    q3 = contiguous(plan.q, compute).reshape(n_groups, group, lay.d_head)
    # bfloat16 and float16 keys and values stay as they are: the kernel widens them as it
    # reads them.
    stored = plan.k.dtype if (_sixteen_bit(plan.k.dtype) and plan.v.dtype == plan.k.dtype
                              and compute == np.float32) else compute
    k3 = _kv_items(plan.k, lay, lay.d_head, stored)
    v3 = _kv_items(plan.v, lay, lay.d_v, stored)
    sinks = None if plan.sinks is None else plan.sinks.reshape(n_groups, group)
    run_decode(q3, k3, v3, lay.decode_kv, plan.scale, plan.softcap, sinks,
               target.reshape(n_groups, group, lay.d_v), lse.reshape(n_groups, group), n_threads)


def _sixteen_bit(dtype):
    """Whether the kernels read arrays of this dtype as they are: bfloat16 or float16."""
    return dtype == np.float16 or is_bfloat16(dtype)


def run_decode(q3, k3, v3, kv_index, scale, softcap, sinks, out3, lse2, n_threads,
               scales=None, products=False):
    """The decoding kernel on prepared arrays: q3 (n_groups, G, D), k3/v3 (n_kv, L_k,
    D or D_v; in q3's dtype, or both bfloat16 or both float16 for float32 q3, or a KVCache's
    8-bit storage with scales = (key scales, value scales, phase): see _kernels.decode),
    sinks None or (n_groups, G), out3 (n_groups, G, D_v), lse2 (n_groups, G); products:
    bfloat16 keys and values may take bfloat16 products (precision="bfloat16"); the
    kernel picks its team."""
    if is_bfloat16(k3.dtype):
        k3, v3 = k3.view(np.uint16), v3.view(np.uint16)  # the kernel widens the bits
    _checked(_kernels.decode(q3, k3, v3, kv_index, scale, softcap, sinks, out3, lse2, n_threads,
                             *(scales or (None, None, 0)), products=products),
             "decoding scratch")


@functools.lru_cache(maxsize=64)
def identity_index(n):
    """The read-only index 0..n-1 (the kv entry of each group when nothing is shared)."""
    return _plan.frozen(np.arange(n, dtype=np.intp))


# --------------------------------------------------------------------------- q, k, v at once

def project_qkv(x, weights, biases, compute):
    """[x @ w + b for each (w, b)], each (..., d_out) in the compute dtype; the arguments
    as _validation.qkv_arguments returns them."""
    # Three whole-matrix GEMMs: blocks of rows of x kept in cache re-pack the weights per
    # block (up to 1.4x slower), and one GEMM against [w_q | w_k | w_v] was no faster and
    # needs a copy of the weights and a split of the result.
    lead = x.shape[:-1]
    x2 = contiguous(x, compute).reshape(math.prod(lead), x.shape[-1])
    outs = []
    for w, b in zip(weights, biases):
        outs.append(np.empty((x2.shape[0], w.shape[1]), compute))
        project_rows(x2, w, b, outs[-1])
    return [o.reshape(lead + (o.shape[1],)) for o in outs]

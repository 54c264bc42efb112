"""The public functions: validation, broadcasting, dtype rules, ``out=`` and dispatch.

Design: everything a kernel could trip on is settled here, in Python, before the compiled
code runs. Arrays reach ``_kernels`` C-contiguous in float32 or float64 (one normalising
copy at most, none when the input is already so), broadcast batch dimensions and
grouped-query heads become index arrays instead of copies, and every bad input raises a
``ValueError`` or ``TypeError`` that names the argument. The kernels never raise.
"""

import functools
import math
import numbers
import operator
import os
import sys
import threading

import numpy as np

from ._dispatch import kernels as _kernels

__all__ = ["project", "scores", "softmax", "log_softmax", "attention", "self_attention",
           "merge_attention"]

try:  # NumPy >= 1.25
    from numpy.exceptions import AxisError
except ImportError:  # pragma: no cover
    from numpy import AxisError

# Largest tiles of the fused kernel (query rows x keys); _tiles() picks per shape. Sweep
# of q_block in 32..256 x k_block in 128..1024 on this 2-core AVX-512 machine (float32,
# D=64, 2 threads): 256 x 512 was fastest for long sequences (2048 tokens, BLAS tiles:
# 43.8 ms against 53.1 ms at 64 x 256; micro-kernel tiles: 24.2 against 28.1 ms), half the
# query rows for causal, 256 x 256 for float64; others were within 3%.
_Q_BLOCK = 256
_K_BLOCK = 512
# Query blocks are halved until a call has this many work items, so that up to this many
# threads share the work evenly. A constant, not the thread count: tile sizes must depend
# on the shape alone for results to be bitwise identical for any number of threads.
_MIN_WORK_ITEMS = 8
# Single-query attention splits the keys in chunks of this many, merged in a fixed order:
# a constant, so that results do not depend on the thread count.
_DECODE_CHUNK = 512
# Below this many floating-point operations a call runs on one thread: waking a team of
# threads costs more than it saves.
_SERIAL_FLOPS = 2_000_000
# OpenBLAS runs a GEMM on the calling thread when m*n*k <= 65536 * 4 (interface/gemm.c,
# SMP_THRESHOLD_MIN * GEMM_MULTITHREAD_THRESHOLD); above that it would start its own
# threads inside ours, so fastattn holds it to one thread for such calls.
_BLAS_SERIAL_MNK = 65536 * 4
_INT_MAX = 2**31 - 1  # BLAS dimensions are C ints
# The AVX-512 build computes float32 tiles whose head sizes are multiples of 16 in its own
# micro-kernels, calling no BLAS: no BLAS threads to hold for those calls.
_MICROKERNELS = _kernels.build_info()["microkernels"]


# --------------------------------------------------------------------------- dtypes

def _dtype_pair(name, dtype):
    """(compute dtype, result dtype) for an argument's dtype, or TypeError naming it."""
    if dtype.kind == "f":
        if dtype.itemsize == 2:
            return np.dtype(np.float32), np.dtype(np.float16)
        if dtype.itemsize in (4, 8):
            native = np.dtype(np.float32 if dtype.itemsize == 4 else np.float64)
            return native, native
    elif dtype.kind in "biu":
        return np.dtype(np.float64), np.dtype(np.float64)
    raise TypeError(
        f"{name} has unsupported dtype {dtype}; expected float16, float32, float64, "
        "an integer or a boolean array"
    )


def _as_array(name, a):
    """np.asarray with the argument's name on failure (ragged lists, etc.)."""
    if isinstance(a, np.ndarray):
        return a
    try:
        return np.asarray(a)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} could not be converted to an array: {exc}") from None


def _dtypes(named):
    """Compute and result dtypes for several (name, array) pairs, promoting as NumPy does."""
    return _dtypes_of(tuple(name for name, _ in named), tuple(a.dtype for _, a in named))


@functools.lru_cache(maxsize=256)
def _dtypes_of(names, dtypes):
    computes, results = [], []
    for name, dtype in zip(names, dtypes):
        c, r = _dtype_pair(name, dtype)
        computes.append(c)
        results.append(r)
    compute = np.dtype(np.float64) if np.dtype(np.float64) in computes else np.dtype(np.float32)
    return compute, np.result_type(*results)


def _contiguous(a, dtype):
    """a as a C-contiguous, native-byte-order array of dtype: at most one copy."""
    return np.ascontiguousarray(a, dtype=dtype)


# --------------------------------------------------------------------------- sizes

@functools.lru_cache(maxsize=1)
def _memory_limit():
    """Bytes of physical memory: no single array fastattn allocates may exceed it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return sys.maxsize


def _refuse_huge(what, n_elements, itemsize, detail):
    """ValueError, before anything is allocated, for an array that could not be."""
    n_bytes = n_elements * itemsize  # Python ints: no overflow
    if n_bytes > min(_memory_limit(), sys.maxsize):
        raise ValueError(
            f"{what} would need {n_bytes / 2**30:.4g} GiB ({detail}), more than the "
            f"{_memory_limit() / 2**30:.4g} GiB of memory of this machine"
        )


# --------------------------------------------------------------------------- arguments

def _check_threads(num_threads):
    if num_threads is None:
        return max(1, _kernels.max_threads())
    if isinstance(num_threads, (bool, np.bool_)):
        raise TypeError(f"num_threads must be a positive integer or None, got {num_threads!r}")
    try:
        n = operator.index(num_threads)
    except TypeError:
        raise TypeError(
            f"num_threads must be a positive integer or None, got {num_threads!r}"
        ) from None
    if n < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {n}")
    return n


def _check_scale(scale, d_head):
    """The score scale: 1/sqrt(d_head) by default (1 when d_head is 0: every score is 0)."""
    if scale is None:
        return 1.0 / math.sqrt(d_head) if d_head > 0 else 1.0
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_out(out, shape, dtype, inputs):
    """Validate out= as NumPy does: exact shape and dtype, writeable, no overlap with inputs."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(
            f"out must have shape {tuple(shape)} and dtype {dtype}, "
            f"got out.shape={out.shape} and dtype {out.dtype}"
        )
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    for name, a in inputs:
        # may_share_memory compares bounds only (cheap); shares_memory decides exactly.
        if isinstance(a, np.ndarray) and np.may_share_memory(out, a) and _overlaps(out, a):
            raise ValueError(f"out overlaps the input {name}; pass a separate array")


def _overlaps(a, b):
    try:
        return np.shares_memory(a, b, max_work=10_000)
    except np.exceptions.TooHardError:
        return True  # cannot tell cheaply: refuse rather than risk a wrong answer


def _finish(result, result_dtype, out):
    """Cast the computed array to the result dtype, into out= when given (no copy when the
    kernel already wrote into out itself)."""
    if out is None:
        return result if result.dtype == result_dtype else result.astype(result_dtype)
    if result.base is not out and result is not out:
        out[...] = result
    return out


def _kernel_target(out, shape, compute):
    """Where the kernel writes: a view of out itself when out is C-contiguous in the
    compute dtype (then ``_finish`` has nothing to copy), else a new array."""
    if out is not None and out.dtype == compute and out.flags.c_contiguous:
        return out.reshape(shape)
    return np.empty(shape, dtype=compute)


def _batch_index(batch_shape, out_batch):
    """For each entry of the broadcast batch, the index of the stored entry it reads."""
    ids = np.arange(math.prod(batch_shape), dtype=np.intp).reshape(batch_shape)
    return np.broadcast_to(ids, out_batch).reshape(-1)


def _broadcast(shapes, what):
    try:
        return np.broadcast_shapes(*(s for _, s in shapes))
    except ValueError:
        described = " and ".join(f"{name}.shape={s}" for name, s in shapes)
        raise ValueError(f"{what} do not broadcast: {described}") from None


# --------------------------------------------------------------------------- BLAS threads

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


_serial_blas = _SerialBlas()

# What the latest attention call of this Python thread ran with (tests and debugging).
_last_call = threading.local()
_KVCache = None


# --------------------------------------------------------------------------- projection

def _project_rows(x2, w, b, target):
    """target (n_rows, d_out) = x2 @ w (+ b), x2 C-contiguous in target's dtype."""
    n_rows, d_in = x2.shape
    compute = target.dtype
    if n_rows == 0 or target.shape[1] == 0:
        return
    if d_in == 0:  # an empty sum: BLAS wants every dimension >= 1
        target[...] = 0 if b is None else _contiguous(b, compute)
        return
    b2 = _contiguous(b, compute) if b is not None else np.zeros(1, compute)
    # One GEMM threaded by the BLAS itself: splitting rows over fastattn's threads made
    # every block re-pack w and ran 1.1-1.5x slower (256 x 128 x 384: 162 vs 115 us).
    _kernels.project(x2, _contiguous(w, compute), b2, b is not None, target)


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
    ``out[..., j] = sum_i x[..., i] w[i, j] + b[j]``, one BLAS GEMM (GEMV for one token).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> fastattn.project(np.array([1.0, 2.0]), np.array([[1.0, 0.0], [0.5, 1.0]]), b=np.array([0.0, 1.0]))
    array([2., 3.])
    """
    x = _as_array("x", x)
    w = _as_array("w", w)
    named = [("x", x), ("w", w)]
    if b is not None:
        b = _as_array("b", b)
        named.append(("b", b))
    compute, result_dtype = _dtypes(named)
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
        _check_out(out, out_shape, result_dtype, named)
    n_rows = math.prod(x.shape[:-1])
    if max(n_rows, d_in, d_out) > _INT_MAX:
        raise ValueError(f"project: dimensions above 2**31 - 1 are not supported, got x.shape={x.shape}, w.shape={w.shape}")
    _refuse_huge("the output", n_rows * d_out, compute.itemsize, f"x.shape={x.shape}, w.shape={w.shape}")
    _refuse_huge("the copy of x", x.size, compute.itemsize, f"x.shape={x.shape}")

    target = _kernel_target(out, (n_rows, d_out), compute)
    _project_rows(_contiguous(x, compute).reshape(n_rows, d_in), w, b, target)
    return _finish(target.reshape(out_shape), result_dtype, out)


# --------------------------------------------------------------------------- softmax

def _softmax(x, axis, out, log_out, name):
    x = _as_array("x", x)
    compute, result_dtype = _dtypes([("x", x)])
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {axis!r}") from None
    if not -x.ndim <= axis < x.ndim:
        raise AxisError(f"{name}: axis {axis} is out of bounds for x of dimension {x.ndim} (x.shape={x.shape})")
    if out is not None:
        _check_out(out, x.shape, result_dtype, [("x", x)])
    _refuse_huge("the result", x.size, compute.itemsize, f"x.shape={x.shape}")
    if x.size == 0:
        return _finish(np.empty(x.shape, compute), result_dtype, out)
    moved = np.moveaxis(x, axis, -1)
    rows = _contiguous(moved, compute).reshape(-1, x.shape[axis])
    if axis in (-1, x.ndim - 1):
        target = _kernel_target(out, rows.shape, compute)
    else:
        target = np.empty(rows.shape, compute)
    n_threads = _check_threads(None) if x.size >= 100_000 else 1
    _kernels.softmax(rows, target, log_out, False, n_threads)
    result = np.moveaxis(target.reshape(moved.shape), -1, axis)
    return _finish(result, result_dtype, out)


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

class _Plan:
    """Everything the score and attention kernels need, after validation."""


@functools.lru_cache(maxsize=256)
def _layout(q_shape, k_shape, v_shape, mask_shape):
    """The shape logic of scores/attention: batch broadcasting, grouped-query heads and
    the index maps. It depends on shapes only, so it is cached, and so are the index maps
    by batch shapes alone (_index_maps). The index arrays are read-only (shared)."""
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if shape is not None and len(shape) < 2:
            want = "(..., L_k, D_v)" if name == "v" else f"(..., L_{name}, D)"
            raise ValueError(f"{name} must have at least 2 dimensions {want}, got {name}.shape={shape}")
    if q_shape[-1] != k_shape[-1]:
        raise ValueError(
            f"q and k must have the same head dimension D, got q.shape={q_shape} and k.shape={k_shape}"
        )
    n_queries, d_head = q_shape[-2:]
    n_keys = k_shape[-2]
    kv_batch = k_shape[:-2]
    if v_shape is not None:
        if v_shape[-2] != n_keys:
            raise ValueError(
                f"k and v must have the same number of keys, got k.shape={k_shape} and v.shape={v_shape}"
            )
        kv_batch = _broadcast([("k", k_shape[:-2]), ("v", v_shape[:-2])],
                              "the batch dimensions of k and v")
    q_batch = q_shape[:-2]

    # Grouped-query attention: query heads h share key/value head h // (H_q / H_kv).
    group = 1
    kv_heads_as = kv_batch
    if q_batch and kv_batch and 1 not in (q_batch[-1], kv_batch[-1]) and kv_batch[-1] != q_batch[-1]:
        h_q, h_kv = q_batch[-1], kv_batch[-1]
        if h_kv == 0 or h_q % h_kv:
            raise ValueError(
                f"the head axis (-3) of k and v must divide that of q for grouped-query attention, "
                f"got q.shape={q_shape} and k.shape={k_shape}"
            )
        group = h_q // h_kv
        kv_heads_as = kv_batch[:-1] + (h_q,)
    shapes = [("q", q_batch), ("k", kv_heads_as)]
    mask_batch = ()
    if mask_shape is not None:
        mask_batch = mask_shape[:-2] if len(mask_shape) > 2 else ()
        shapes.append(("mask", mask_batch))
    batch = _broadcast(shapes, "the batch dimensions of q, k/v and mask")
    if mask_shape is not None:
        tail = mask_shape[-2:]
        try:
            ok = np.broadcast_shapes(tail, (n_queries, n_keys)) == (n_queries, n_keys)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"mask must broadcast to (..., L_q, L_k) = {batch + (n_queries, n_keys)}, "
                f"got mask.shape={mask_shape}"
            )
    if max(n_queries, n_keys, d_head, v_shape[-1] if v_shape is not None else 0) > _INT_MAX:
        raise ValueError(
            f"L_q, L_k, D and D_v above 2**31 - 1 are not supported (BLAS dimensions are C ints), "
            f"got q.shape={q_shape} and k.shape={k_shape}"
        )
    _refuse_huge("the batch index", 3 * math.prod(batch) + math.prod(kv_batch), 8,
                 f"broadcast batch {batch} from q.shape={q_shape} and k.shape={k_shape}")
    p = _Plan()
    p.batch, p.q_batch, p.kv_batch, p.mask_batch = batch, q_batch, kv_batch, mask_batch
    p.n_queries, p.n_keys, p.d_head = n_queries, n_keys, d_head
    p.d_v = v_shape[-1] if v_shape is not None else 0
    p.n_batch = math.prod(batch)
    p.n_q_items, p.n_kv_items = math.prod(q_batch), math.prod(kv_batch)
    p.n_mask_items = math.prod(mask_batch)
    p.index, p.decode_group, p.decode_kv = _index_maps(q_batch, kv_batch, group, mask_batch, batch)
    # The most elements any array of a call can have: only calls that might not fit in
    # memory go through the detailed check (_refuse_huge_plan), which costs microseconds.
    p.max_elements = max(p.n_batch * n_queries * max(n_keys, p.d_v, 1),
                         p.n_q_items * n_queries * d_head,
                         p.n_kv_items * n_keys * max(d_head, p.d_v),
                         p.n_mask_items * n_queries * n_keys)
    return p


@functools.lru_cache(maxsize=256)
def _index_maps(q_batch, kv_batch, group, mask_batch, batch):
    """index[:, b], the stored q, k/v and mask entries that batch entry b reads, and the
    decoding groups: the costly part of _layout (about 20 us), cached by the batch shapes
    alone, so that a new key or query length (every step of a growing cache) reuses it."""
    kv_ids = np.arange(math.prod(kv_batch), dtype=np.intp).reshape(kv_batch)
    if group > 1:
        kv_ids = np.repeat(kv_ids, group, axis=-1)
    index = _frozen(np.stack([
        _batch_index(q_batch, batch),
        np.broadcast_to(kv_ids, batch).reshape(-1),
        _batch_index(mask_batch, batch),
    ]))
    return (index, *_decode_groups(index[1]))


def _decode_groups(kv_index):
    """For single-query attention: the number G of consecutive batch entries that read
    the same key/value entry (the query heads of a grouped-query group, or everything
    when k/v are broadcast), and the kv entry of each group. G = 1 when there is none."""
    n = kv_index.shape[0]
    if n == 0:
        return 1, kv_index
    run = int(np.argmax(kv_index != kv_index[0])) or n
    if n % run == 0 and np.all(kv_index.reshape(-1, run) == kv_index[::run, None]):
        return run, _frozen(kv_index[::run])
    return 1, kv_index


def _frozen(a):
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def _check_window(window, causal):
    """The sliding window: None (0 for the kernels) or a positive int, with causal=True."""
    if window is None:
        return 0
    if isinstance(window, (bool, np.bool_)) or not isinstance(window, (int, np.integer)):
        raise TypeError(f"window must be a positive integer or None, got {window!r}")
    if window < 1:
        raise ValueError(f"window must be a positive integer or None, got {window}")
    if not causal:
        raise ValueError("window needs causal=True: it bounds how far back a query sees")
    return int(window)


def _plan(q, k, v, mask, causal, scale, window=None):
    """Validate q, k, (v), mask and the flags; the arrays are not converted yet."""
    q = _as_array("q", q)
    k = _as_array("k", k)
    if v is None:
        named = [("q", q), ("k", k)]
        compute, result_dtype = _dtypes_of(("q", "k"), (q.dtype, k.dtype))
    else:
        v = _as_array("v", v)
        named = [("q", q), ("k", k), ("v", v)]
        compute, result_dtype = _dtypes_of(("q", "k", "v"), (q.dtype, k.dtype, v.dtype))
    mask_kind = 0
    if mask is not None:
        mask = _as_array("mask", mask)
        if mask.dtype.kind == "b":
            mask_kind = 2
        elif mask.dtype.kind == "f" and mask.dtype.itemsize in (2, 4, 8):
            mask_kind = 1
        else:
            raise TypeError(
                f"mask must be boolean (True = may attend) or floating (added to the scores), "
                f"got dtype {mask.dtype}"
            )
        named.append(("mask", mask))
    layout = _layout(q.shape, k.shape, None if v is None else v.shape,
                     None if mask is None else mask.shape)
    causal = _check_flag("causal", causal)
    return (layout, q, k, v, mask, mask_kind, causal, _check_window(window, causal),
            _check_scale(scale, layout.d_head), compute, result_dtype, named)


def _refuse_huge_plan(layout, q, k, v, mask_kind, compute, results):
    """Refuse, naming the shapes, a call whose arrays could not be allocated: the results
    (name, element count) and the contiguous copies the kernels would need."""
    if layout.max_elements * compute.itemsize <= _memory_limit():
        return
    shapes = f"q.shape={q.shape}, k.shape={k.shape}" + ("" if v is None else f", v.shape={v.shape}")
    for name, n in results:
        _refuse_huge(f"the {name}", n, compute.itemsize, shapes)
    copies = [("copy of q", q, layout.n_q_items * layout.n_queries * layout.d_head),
              ("copy of k", k, layout.n_kv_items * layout.n_keys * layout.d_head)]
    if v is not None:
        copies.append(("copy of v", v, layout.n_kv_items * layout.n_keys * layout.d_v))
    for name, a, n in copies:
        if a.dtype != compute or not a.flags.c_contiguous or a.size != n:
            _refuse_huge(f"the {name}", n, compute.itemsize, shapes)
    if mask_kind:
        _refuse_huge("the mask", layout.n_mask_items * layout.n_queries * layout.n_keys,
                     compute.itemsize if mask_kind == 1 else 1, shapes)


def _kv_stored(a, layout):
    """k or v with the batch shape of the stored key/value entries (a view)."""
    if a.shape[:-2] != layout.kv_batch:
        a = np.broadcast_to(a, layout.kv_batch + a.shape[-2:])
    return a


def _kv_contiguous(a, layout, width, compute):
    """k or v as C-contiguous (n_kv_items, L_k, width) in the compute dtype."""
    return _contiguous(_kv_stored(a, layout), compute).reshape(layout.n_kv_items, layout.n_keys, width)


def _kernel_inputs(layout, q, k, mask, mask_kind, compute):
    """The contiguous, compute-dtype q, k and mask the kernels read (mask may be None;
    a boolean mask goes as uint8, a float one in the compute dtype)."""
    d_head = layout.d_head
    q = _contiguous(q, compute).reshape(layout.n_q_items, layout.n_queries, d_head)
    k = _kv_contiguous(k, layout, d_head, compute)
    if d_head == 0:
        # An empty dot product is 0: give BLAS one zero column instead of a zero dimension.
        q = np.zeros(q.shape[:-1] + (1,), compute)
        k = np.zeros(k.shape[:-1] + (1,), compute)
    if mask_kind:
        mask = np.broadcast_to(mask, layout.mask_batch + (layout.n_queries, layout.n_keys))
        mask = mask.reshape(layout.n_mask_items, layout.n_queries, layout.n_keys)
        if mask_kind == 1:
            mask = _contiguous(mask, compute)
        else:
            mask = _contiguous(mask, np.bool_).view(np.uint8)
    return q, k, mask


def scores(q, k, *, scale=None, mask=None, causal=False, window=None):
    """Scaled dot-product scores, masked.

    Parameters
    ----------
    q : array_like, shape (..., L_q, D)
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

    Returns
    -------
    ndarray, shape (..., L_q, L_k)

    Notes
    -----
    ``s[..., i, j] = scale * sum_d q[..., i, d] k[..., j, d] (+ mask[..., i, j])``.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> fastattn.scores(np.ones((2, 4)), np.ones((3, 4)), causal=True)
    array([[ 2.,  2., -inf],
           [ 2.,  2.,  2.]])
    """
    layout, q, k, _, mask, mask_kind, causal, window, scale, compute, result_dtype, _ = _plan(
        q, k, None, mask, causal, scale, window)
    shape = layout.batch + (layout.n_queries, layout.n_keys)
    _refuse_huge_plan(layout, q, k, None, mask_kind, compute,
                      [("scores", layout.n_batch * layout.n_queries * layout.n_keys)])
    result = np.empty((layout.n_batch, layout.n_queries, layout.n_keys), compute)
    if result.size:
        q, k, mask = _kernel_inputs(layout, q, k, mask, mask_kind, compute)
        _kernels.scores(q, k, mask, layout.index, causal, window, scale, result)
    return _finish(result.reshape(shape), result_dtype, None)


def _attention(plan, return_weights, return_lse, out, num_threads):
    """Run the fused kernel for a plan; returns (out, weights or None, lse or None)."""
    layout, q, k, v, mask, mask_kind, causal, window, scale, compute, result_dtype, named = plan
    n_threads = _check_threads(num_threads)
    n_batch, n_queries, n_keys, d_v = layout.n_batch, layout.n_queries, layout.n_keys, layout.d_v
    out_shape = layout.batch + (n_queries, d_v)
    if out is not None:
        _check_out(out, out_shape, result_dtype, named)
    flat = (n_batch, n_queries, d_v)
    results = [("output", n_batch * n_queries * d_v), ("log-sum-exp", n_batch * n_queries)]
    if return_weights:
        results.append(("weights", n_batch * n_queries * n_keys))
    _refuse_huge_plan(layout, q, k, v, mask_kind, compute, results)
    target = _kernel_target(out, flat, compute)
    lse = np.empty((n_batch, n_queries), compute)
    weights = None
    if n_batch == 0 or n_queries == 0:
        pass
    elif n_keys == 0:
        target[...] = 0  # no key to attend to: every query is fully masked
        lse[...] = -np.inf
    else:
        if (n_queries == 1 and mask_kind == 0 and not window and layout.q_batch == layout.batch
                and layout.d_head > 0 and d_v > 0 and not return_weights):
            _decode(layout, q, k, v, scale, compute, target, lse, n_threads)
            return (_finish(target.reshape(out_shape), result_dtype, out), None,
                    lse.reshape(layout.batch + (n_queries,)))
        q, k, mask = _kernel_inputs(layout, q, k, mask, mask_kind, compute)
        v = _kv_contiguous(v, layout, d_v, compute)
        kernel_out = target
        if d_v == 0:
            # Nothing to average, but lse still needs the pass: use one zero column.
            v = np.zeros(v.shape[:-1] + (1,), compute)
            kernel_out = np.empty(flat[:-1] + (1,), compute)
        d_v = v.shape[-1]
        q_block, k_block = _tiles(n_batch, n_queries, n_keys, causal, compute)
        n_work = n_batch * -(-n_queries // q_block)
        flops = 2.0 * n_batch * n_queries * n_keys * (q.shape[-1] + d_v)
        n_threads = 1 if flops < _SERIAL_FLOPS else min(n_threads, n_work)
        uses_blas = not (_MICROKERNELS and compute == np.float32 and q.shape[-1] % 16 == 0
                         and d_v % 16 == 0)
        if uses_blas and q_block * k_block * max(q.shape[-1], d_v) > _BLAS_SERIAL_MNK:
            with _serial_blas:
                status = _kernels.attention(q, k, v, mask, layout.index, causal, window, scale,
                                            kernel_out, lse, q_block, k_block, n_threads)
        else:  # OpenBLAS runs such tiles on the calling thread anyway
            status = _kernels.attention(q, k, v, mask, layout.index, causal, window, scale,
                                        kernel_out, lse, q_block, k_block, n_threads)
        if status < 0:
            raise MemoryError("attention: cannot allocate the per-thread scratch")
        _last_call.threads = status
        if return_weights:
            w = np.empty((n_batch, n_queries, n_keys), compute)
            _kernels.scores(q, k, mask, layout.index, causal, window, scale, w)
            w2 = w.reshape(-1, n_keys)
            _kernels.softmax(w2, w2, False, True, n_threads)
            weights = w
    if return_weights and weights is None:
        weights = np.zeros((n_batch, n_queries, n_keys), compute)
    result = _finish(target.reshape(out_shape), result_dtype, out)
    if weights is not None:
        weights = _finish(weights.reshape(layout.batch + (n_queries, n_keys)), result_dtype, None)
    return result, weights, lse.reshape(layout.batch + (n_queries,))


def _kv_items(a, layout, n_keys, width, compute):
    """k or v as (n_kv_items, L_k, width) in the compute dtype, without copying when the
    last two axes are already contiguous (a KVCache's storage is read in place)."""
    a = _kv_stored(a, layout)
    itemsize = compute.itemsize
    if not (a.dtype == compute and a.strides[-1] == itemsize
            and (n_keys == 1 or a.strides[-2] == width * itemsize)):
        a = _contiguous(a, compute)
    items = a.reshape(layout.n_kv_items, n_keys, width)  # a view whenever strides allow
    if items.strides[0] % itemsize:  # pragma: no cover - exotic byte strides
        items = _contiguous(items, compute)
    return items


def _decode(layout, q, k, v, scale, compute, target, lse, n_threads):
    """Single-query attention: one pass over each key/value head for its group of queries."""
    group = layout.decode_group
    n_groups = layout.n_batch // group
    q3 = _contiguous(q, compute).reshape(n_groups, group, layout.d_head)
    k3 = _kv_items(k, layout, layout.n_keys, layout.d_head, compute)
    v3 = _kv_items(v, layout, layout.n_keys, layout.d_v, compute)
    _run_decode(q3, k3, v3, layout.decode_kv, scale, target.reshape(n_groups, group, layout.d_v),
                lse.reshape(n_groups, group), n_threads)


def _run_decode(q3, k3, v3, kv_index, scale, out3, lse2, n_threads):
    """The decoding kernel on prepared arrays: q3 (n_groups, G, D), k3/v3 (n_kv, L_k,
    D or D_v), out3 (n_groups, G, D_v), lse2 (n_groups, G); small work runs serially."""
    n_groups, group, d_head = q3.shape
    n_keys, d_v = k3.shape[1], v3.shape[2]
    flops = 2.0 * n_groups * group * n_keys * (d_head + d_v)
    n_chunks = -(-n_keys // _DECODE_CHUNK)
    n_threads = 1 if flops < _SERIAL_FLOPS else min(n_threads, n_groups * n_chunks)
    team = _kernels.decode(q3, k3, v3, kv_index, scale, out3, lse2, _DECODE_CHUNK, n_threads)
    if team < 0:
        raise MemoryError("attention: cannot allocate the decoding scratch")
    _last_call.threads = team


def _decode_step(q, cache, causal, scale, num_threads, return_lse):
    """One decoding step against a cache, or None to take the general path.

    The common call while generating, ``attention(q, cache=cache)`` with q of shape
    (batch, heads, 1, head_dim) in the cache's dtype, C-contiguous: the same kernel call
    as the general path (so bitwise the same result) without its shape planning, which
    cost about 6 us of a 38 us step over 32 heads x 128 tokens. Anything else (other
    shapes or dtypes, an empty cache) returns None and goes through the full validation.
    """
    if not (type(q) is np.ndarray and q.dtype == cache.dtype and q.ndim == 4
            and q.flags.c_contiguous):
        return None
    batch, heads, n_queries, d_head = q.shape
    kv_heads, n_keys = cache.kv_heads, len(cache)
    if (batch != cache.batch or n_queries != 1 or d_head != cache.head_dim
            or heads == 0 or heads % kv_heads or n_keys == 0):
        return None
    _check_flag("causal", causal)  # one query, the newest token: causal changes nothing
    scale = _check_scale(scale, d_head)
    n_threads = _check_threads(num_threads)
    group, n_groups, d_v = heads // kv_heads, batch * kv_heads, cache.value_dim
    result = np.empty((n_groups, group, d_v), q.dtype)
    lse = np.empty((n_groups, group), q.dtype)
    # The cache's views, (batch, kv_heads, n_keys, D): rows contiguous, read in place.
    _run_decode(q.reshape(n_groups, group, d_head), cache.keys.reshape(n_groups, n_keys, d_head),
                cache.values.reshape(n_groups, n_keys, d_v), _identity_index(n_groups), scale,
                result, lse, n_threads)
    result = result.reshape(batch, heads, 1, d_v)
    return (result, lse.reshape(batch, heads, 1)) if return_lse else result


@functools.lru_cache(maxsize=64)
def _identity_index(n):
    return _frozen(np.arange(n, dtype=np.intp))


def _tiles(n_batch, n_queries, n_keys, causal, compute):
    """(query rows, keys) per tile for a shape; never depends on the thread count."""
    # Causal rows see a triangle: smaller query blocks skip more and balance better.
    q_block = max(1, _Q_BLOCK // 2) if causal else _Q_BLOCK
    while q_block > 32 and n_batch * -(-n_queries // q_block) < _MIN_WORK_ITEMS:
        q_block //= 2
    # A float64 tile of 256 x 512 would not fit the L2 cache beside its operands.
    k_block = _K_BLOCK if compute.itemsize == 4 else max(1, _K_BLOCK // 2)
    return min(q_block, n_queries), min(k_block, n_keys)


def _pack(result, weights, lse, return_weights, return_lse):
    if not (return_weights or return_lse):
        return result
    extra = ([weights] if return_weights else []) + ([lse] if return_lse else [])
    return (result, *extra)


def attention(q, k=None, v=None, *, cache=None, mask=None, causal=False, window=None,
              scale=None, return_weights=False, return_lse=False, out=None, num_threads=None):
    """Scaled dot-product attention, fused: ``softmax(scale q k^T + mask) v``.

    Parameters
    ----------
    q : array_like, shape (..., L_q, D)
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
    return_weights : bool, default False
        Also return the attention weights, shape (..., L_q, L_k) (this builds them).
    return_lse : bool, default False
        Also return ``log sum_j exp(s_ij)`` per query, shape (..., L_q), in the compute
        dtype (float32 for float16 inputs); ``-inf`` for a fully masked query.
    out : ndarray, shape (..., L_q, D_v), optional
        Where to write the output; exact shape and dtype required.
    num_threads : int, optional
        OpenMP threads; defaults to OpenMP's (``OMP_NUM_THREADS``). Results are bitwise
        identical for any value.

    Returns
    -------
    out : ndarray, shape (..., L_q, D_v)
    weights : ndarray, shape (..., L_q, L_k), if ``return_weights``
    lse : ndarray, shape (..., L_q), if ``return_lse``

    Notes
    -----
    ``out_i = sum_j p_ij v_j`` with ``p_ij = exp(s_ij - m_i) / sum_j exp(s_ij - m_i)``,
    ``s_ij = scale q_i . k_j`` (+ mask), computed by an online softmax over key blocks
    without building the L_q x L_k matrix. A query whose keys are all masked gets zeros
    (never NaN). NaN or +inf reaching a visible score makes that query's row NaN. A key
    hidden by a boolean or causal mask has weight exactly 0 whatever its score; whether
    NaN or inf in the value of a key with weight 0 reaches the output is unspecified
    (0 * inf in the GEMM is NaN).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> q = np.array([[1.0, 0.0]]); k = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> v = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> fastattn.attention(q, k, v, scale=0.0)
    array([[2., 3.]])
    """
    return_weights = _check_flag("return_weights", return_weights)
    return_lse = _check_flag("return_lse", return_lse)
    if cache is not None:
        global _KVCache
        if _KVCache is None:  # imported on first use: fastattn.cache imports this module
            from .cache import KVCache as _KVCache
        if not isinstance(cache, _KVCache):
            raise TypeError(f"cache must be a fastattn.KVCache, got {type(cache).__name__}")
        if (k is None) != (v is None):
            raise ValueError("pass both k and v to append them to the cache, or neither")
        if k is not None:
            cache.append(k, v)
        if mask is None and window is None and out is None and not return_weights:
            result = _decode_step(q, cache, causal, scale, num_threads, return_lse)
            if result is not None:
                return result
        k, v = cache.keys, cache.values
    elif k is None:
        raise TypeError("attention needs k and v (or a cache)")
    # v=None must be refused as a bad value, not taken for scores()'s "no v".
    plan = _plan(q, k, _as_array("v", v), mask, causal, scale, window)
    return _pack(*_attention(plan, return_weights, return_lse, out, num_threads),
                 return_weights, return_lse)


def _project_qkv(x, w_q, w_k, w_v, b_q, b_k, b_v):
    """q, k, v projections of x (..., d_model), as arrays in the compute dtype."""
    x = _as_array("x", x)
    ws = [("w_q", _as_array("w_q", w_q)), ("w_k", _as_array("w_k", w_k)),
          ("w_v", _as_array("w_v", w_v))]
    bs = [(name, None if b is None else _as_array(name, b))
          for name, b in (("b_q", b_q), ("b_k", b_k), ("b_v", b_v))]
    named = [("x", x)] + ws + [(n, b) for n, b in bs if b is not None]
    compute, result_dtype = _dtypes(named)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension (..., L, d_model), got x.shape={x.shape}")
    d_model = x.shape[-1]
    for (name, w), (bname, b) in zip(ws, bs):
        if w.ndim != 2 or w.shape[0] != d_model:
            raise ValueError(
                f"{name} must have shape (d_model, d_out) with d_model = {d_model} from "
                f"x.shape={x.shape}, got {name}.shape={w.shape}"
            )
        if b is not None and b.shape != (w.shape[1],):
            raise ValueError(f"{bname} must have shape ({w.shape[1]},) to match {name}.shape={w.shape}, got {bname}.shape={b.shape}")
    n_rows = math.prod(x.shape[:-1])
    if max(n_rows, d_model, *(w.shape[1] for _, w in ws)) > _INT_MAX:
        raise ValueError(f"dimensions above 2**31 - 1 are not supported, got x.shape={x.shape}")
    for name, w in ws:
        _refuse_huge(f"the projection by {name}", n_rows * w.shape[1], compute.itemsize,
                     f"x.shape={x.shape}, {name}.shape={w.shape}")
    # Three whole-matrix GEMMs. Measured against the alternatives (float32, 2 threads):
    # blocks of rows of x kept in cache re-pack the weights per block and ran up to 1.4x
    # slower; one GEMM against [w_q | w_k | w_v] was within 6% (noise) and needs a copy of
    # the weights and a split of the result.
    x2 = _contiguous(x, compute).reshape(n_rows, d_model)
    outs = []
    for (_, w), (_, b) in zip(ws, bs):
        outs.append(np.empty((n_rows, w.shape[1]), compute))
        _project_rows(x2, w, b, outs[-1])
    lead = x.shape[:-1]
    return [o.reshape(lead + (o.shape[1],)) for o in outs], named, result_dtype


def self_attention(x, w_q, w_k, w_v, *, b_q=None, b_k=None, b_v=None, mask=None,
                   causal=False, window=None, scale=None, return_weights=False,
                   return_lse=False, out=None, num_threads=None):
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
    mask, causal, window, scale, return_weights, return_lse, out, num_threads
        As in :func:`attention`.

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
    return_weights = _check_flag("return_weights", return_weights)
    return_lse = _check_flag("return_lse", return_lse)
    (q, k, v), named, result_dtype = _project_qkv(x, w_q, w_k, w_v, b_q, b_k, b_v)
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
            _check_out(out, (v.shape[-1],), result_dtype, named)
            out = out[None]
    plan = _plan(q, k, v, mask, causal, scale, window)
    # The projections ran in the compute dtype; the result takes the dtype of x and the
    # weights, and out= may not overlap any of them.
    plan = plan[:-2] + (result_dtype, plan[-1] + named)
    result, weights, lse = _attention(plan, return_weights, return_lse, out, num_threads)
    if one_token:
        result, lse = result[0], lse[0]
        weights = weights[0] if weights is not None else None
    if user_out is not None:
        result = user_out
    return _pack(result, weights, lse, return_weights, return_lse)


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

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> q, k, v = np.ones((1, 2)), np.eye(2), np.array([[1.0], [3.0]])
    >>> a = fastattn.attention(q, k[:1], v[:1], return_lse=True)
    >>> b = fastattn.attention(q, k[1:], v[1:], return_lse=True)
    >>> fastattn.merge_attention(*a, *b)[0]
    array([[2.]])
    """
    named = [(n, _as_array(n, a)) for n, a in
             (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b))]
    compute, result_dtype = _dtypes(named)
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

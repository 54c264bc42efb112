"""Checking and converting the arguments of the public functions.

Design: every rule about what an argument may be lives here once, so that the public
functions (api.py), the layer (layers.py) and the cache (cache.py) raise the same error
for the same mistake: a ``TypeError`` for the wrong kind of thing, a ``ValueError`` for a
value or shape out of range, each naming the argument. Of the kernels it asks only the
compiled rules (the default scale, the sinks' validity) and the default thread count.
"""

import functools
import math
import numbers
import operator
import os
import sys

import numpy as np

from ._dispatch import kernels as _kernels

try:  # NumPy >= 1.25
    from numpy.exceptions import AxisError
except ImportError:  # pragma: no cover
    from numpy import AxisError

__all__ = ["AxisError", "INT_MAX", "as_array", "dtype_pair", "dtypes", "dtypes_of",
           "bfloat16", "is_bfloat16", "contiguous", "memory_limit", "refuse_huge",
           "positive_int", "check_threads",
           "require", "is_dask_array", "check_scale", "check_softcap", "check_sinks", "check_flag",
           "check_precision", "PRECISIONS",
           "check_window",
           "check_axis", "check_out", "qkv_arguments"]

INT_MAX = 2**31 - 1  # BLAS dimensions are C ints


# --------------------------------------------------------------------------- dtypes

@functools.lru_cache(maxsize=1)
def bfloat16():
    """ml_dtypes' bfloat16 dtype, or None when the optional ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype):
    """Whether a NumPy dtype is ml_dtypes' bfloat16. (Never compare with bfloat16()
    itself: without ml_dtypes that is None, and NumPy reads dtype == None as float64.)"""
    return dtype.kind == "V" and dtype.name == "bfloat16"


def dtype_pair(name, dtype):
    """(compute dtype, result dtype) for an argument's dtype, or TypeError naming it."""
    if is_bfloat16(dtype):
        # As float16: computed in float32, returned in the argument's own dtype.
        return np.dtype(np.float32), dtype
    if dtype.kind == "f":
        if dtype.itemsize == 2:
            return np.dtype(np.float32), np.dtype(np.float16)
        if dtype.itemsize in (4, 8):
            native = np.dtype(np.float32 if dtype.itemsize == 4 else np.float64)
            return native, native
    elif dtype.kind in "biu":
        return np.dtype(np.float64), np.dtype(np.float64)
    raise TypeError(
        f"{name} has unsupported dtype {dtype}; expected float16, bfloat16 (ml_dtypes), "
        "float32, float64, an integer or a boolean array"
    )


def as_array(name, a):
    """The argument as a NumPy array, without a copy where the object allows: an ndarray
    as is, a torch tensor through its own memory (bfloat16 too, as ml_dtypes' bfloat16),
    an object with ``__dlpack__`` through ``np.from_dlpack``, anything else through
    ``np.asarray``; the argument's name on failure (ragged lists, a tensor that needs a
    gradient, a GPU tensor)."""
    if isinstance(a, np.ndarray):
        return a
    module = type(a).__module__
    if module == "torch" or module.startswith("torch."):
        return _from_torch(name, a)
    if hasattr(a, "__dlpack__"):
        try:
            return np.from_dlpack(a)
        except (BufferError, RuntimeError, TypeError, ValueError):
            pass  # a device or dtype DLPack cannot hand over: try __array__ below
    try:
        return np.asarray(a)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{name} could not be converted to an array: {exc}") from None


def _from_torch(name, t):
    """A CPU torch tensor's memory as an ndarray, without a copy. The common case is one
    call, ``t.numpy()`` (about 2 us); only when it refuses are the reasons told apart."""
    import torch

    if not isinstance(t, torch.Tensor):
        return np.asarray(t)
    if t.dtype == torch.bfloat16:
        bf16 = bfloat16()
        if bf16 is None:
            raise TypeError(f"{name} is a torch bfloat16 tensor: bfloat16 needs the optional "
                            f"package ml_dtypes (pip install ml_dtypes)")
        t = _torch_readable(name, t)
        return t.view(torch.int16).numpy().view(bf16)
    try:
        return t.numpy()
    except (TypeError, RuntimeError):
        pass
    t = _torch_readable(name, t)
    try:
        return t.numpy()
    except (TypeError, RuntimeError) as exc:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}: {exc}") from None


def _torch_readable(name, t):
    """t, refused with the fix when it needs a gradient or lives off the CPU, and with any
    lazy negation or conjugation resolved (numpy() refuses those views)."""
    if t.requires_grad:
        raise TypeError(f"{name} is a torch tensor that requires grad, and fastattn computes "
                        f"no gradients: pass {name}.detach() (or compute it under "
                        f"torch.no_grad())")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is a torch tensor on {t.device}; fastattn runs on the CPU: "
                         f"pass {name}.cpu()")
    return t.resolve_conj().resolve_neg()


def dtypes(named):
    """Compute and result dtypes for several (name, array) pairs, promoting as NumPy does."""
    return dtypes_of(tuple(name for name, _ in named), tuple(a.dtype for _, a in named))


@functools.lru_cache(maxsize=256)
def dtypes_of(names, dtypes):
    """dtypes() by names and dtypes alone (cached: a call's dtypes rarely change)."""
    computes, results = [], []
    for name, dtype in zip(names, dtypes):
        c, r = dtype_pair(name, dtype)
        computes.append(c)
        results.append(r)
    compute = np.dtype(np.float64) if np.dtype(np.float64) in computes else np.dtype(np.float32)
    return compute, np.result_type(*results)


def contiguous(a, dtype):
    """a as a C-contiguous, native-byte-order array of dtype: at most one copy."""
    return np.ascontiguousarray(a, dtype=dtype)


# --------------------------------------------------------------------------- sizes

@functools.lru_cache(maxsize=1)
def memory_limit():
    """Bytes of physical memory: no single array fastattn allocates may exceed it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return sys.maxsize


def refuse_huge(what, n_elements, itemsize, detail):
    """ValueError, before anything is allocated, for an array that could not be."""
    n_bytes = n_elements * itemsize  # Python ints: no overflow
    if n_bytes > min(memory_limit(), sys.maxsize):
        raise ValueError(
            f"{what} would need {n_bytes / 2**30:.4g} GiB ({detail}), more than the "
            f"{memory_limit() / 2**30:.4g} GiB of memory of this machine"
        )


# --------------------------------------------------------------------------- scalars

def _integer(name, value, expected):
    """value as an int (anything with __index__ but a bool), else TypeError."""
    if not isinstance(value, (bool, np.bool_)):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be {expected}, got {value!r}")


def positive_int(name, value, *, allow_none=False, what="a positive integer"):
    """value as an int >= 1: TypeError if it is not an integer (bools are not), ValueError
    if it is below 1. ``what`` is how the message describes the expected value."""
    if value is None and allow_none:
        return None
    expected = what + (" or None" if allow_none else "")
    n = _integer(name, value, expected)
    if n < 1:
        raise ValueError(f"{name} must be {expected}, got {n}")
    return n


def check_threads(num_threads):
    """The OpenMP team size for a call: num_threads, or OpenMP's default when None."""
    if num_threads is None:
        return max(1, _kernels.max_threads())
    return positive_int("num_threads", num_threads, allow_none=True)


def require(module, extra, who, load=True):
    """Import an optional package for one of fastattn's optional modules (load=False: only
    check that it can be imported, importing nothing), or ImportError naming the extra
    that installs it (not a bare "No module named ...")."""
    import importlib
    import importlib.util
    try:
        if not load:
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"No module named {module!r}")
            return None
        return importlib.import_module(module)
    except (ImportError, ValueError) as e:  # find_spec: ValueError when sys.modules holds None
        raise ImportError(f"{who} needs {module.split('.')[0]}, which is not installed: "
                          f"pip install 'fastattn[{extra}]'") from e


def is_dask_array(a):
    """Whether a is a dask array, told by its type alone (importing no dask)."""
    return type(a).__module__.startswith("dask.array") and hasattr(a, "dask")


def check_scale(scale, d_head):
    """The score scale: 1/sqrt(d_head) by default (1 when d_head is 0: every score is 0)."""
    if scale is None:
        return _kernels.default_scale(d_head)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def check_softcap(softcap):
    """The soft cap of the scores: None (0.0 for the kernels) or a finite number > 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive real number or None, got {softcap!r}")
    value = float(softcap)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"softcap must be finite and > 0, got {softcap!r}")
    return value


PRECISIONS = ("highest", "bfloat16")


def check_precision(precision, allow_none=True):
    """precision= of float32 attention: one of PRECISIONS, or None (the default's, where
    allowed)."""
    if precision is None and allow_none:
        return None
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def check_sinks(sinks, batch, compute):
    """One sink logit per query head: an array that broadcasts to the batch shape of the
    output (q.shape[:-2], say (H,) for (B, H, L, D)), real, finite or -inf (-inf: no sink).
    Returns it C-contiguous in the compute dtype with exactly that shape, or None."""
    if sinks is None:
        return None
    sinks = as_array("sinks", sinks)
    if sinks.dtype.kind not in "fiu":
        raise TypeError(f"sinks must be real numbers (float or integer), got dtype {sinks.dtype}")
    try:
        full = np.broadcast_to(sinks, batch)
    except ValueError:
        raise ValueError(f"sinks must broadcast to the query heads' batch shape {batch} "
                         f"(one logit per head, e.g. shape {batch[-1:]}), got sinks.shape="
                         f"{sinks.shape}") from None
    with np.errstate(over="ignore", invalid="ignore"):
        full = np.ascontiguousarray(full, compute)
    if not _kernels.sinks_valid(full.reshape(-1)):
        raise ValueError(f"sinks must be finite or -inf (no sink) in {compute}, got "
                         f"NaN or +inf: {sinks.tolist() if sinks.size <= 8 else sinks}")
    return full


def check_flag(name, value):
    """A bool argument: True or False (NumPy's too), nothing merely truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_window(window, causal):
    """The sliding window: None (0 for the kernels) or a positive int, with causal=True."""
    if window is None:
        return 0
    window = positive_int("window", window, allow_none=True)
    if not causal:
        raise ValueError("window needs causal=True: it bounds how far back a query sees")
    return window


def check_axis(axis, ndim, shape, func):
    """axis as an int in [-ndim, ndim), or AxisError as NumPy raises it."""
    axis = _integer("axis", axis, "an integer")
    if not -ndim <= axis < ndim:
        raise AxisError(f"{func}: axis {axis} is out of bounds for x of dimension {ndim} (x.shape={shape})")
    return axis


# --------------------------------------------------------------------------- out=

def check_out(out, shape, dtype, inputs):
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


# --------------------------------------------------------------------------- projections

def qkv_arguments(x, w_q, w_k, w_v, b_q, b_k, b_v):
    """The arguments of the q, k, v projections of x (..., d_model), checked: returns
    (x, [w_q, w_k, w_v], [b_q, b_k, b_v], named, compute dtype, result dtype)."""
    x = as_array("x", x)
    ws = [("w_q", as_array("w_q", w_q)), ("w_k", as_array("w_k", w_k)),
          ("w_v", as_array("w_v", w_v))]
    bs = [(name, None if b is None else as_array(name, b))
          for name, b in (("b_q", b_q), ("b_k", b_k), ("b_v", b_v))]
    named = [("x", x)] + ws + [(n, b) for n, b in bs if b is not None]
    compute, result_dtype = dtypes(named)
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
    if max(n_rows, d_model, *(w.shape[1] for _, w in ws)) > INT_MAX:
        raise ValueError(f"dimensions above 2**31 - 1 are not supported, got x.shape={x.shape}")
    for name, w in ws:
        refuse_huge(f"the projection by {name}", n_rows * w.shape[1], compute.itemsize,
                    f"x.shape={x.shape}, {name}.shape={w.shape}")
    return x, [w for _, w in ws], [b for _, b in bs], named, compute, result_dtype

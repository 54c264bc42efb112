"""KVCache: preallocated keys and values for incremental decoding, and the decoding
step on it (``attention(q, cache=cache)``'s short path)."""

import numpy as np

from . import _plan
from ._dispatch import kernels as _kernels
from ._run import cache_decode, identity_index, run_decode
from ._validation import (as_array, check_flag, check_precision, check_scale, check_sinks,
                          check_softcap, check_threads, dtype_pair, positive_int)

__all__ = ["KVCache", "decode_step"]

# storage= -> the dtype of the arrays that hold keys and values (None: the compute dtype);
# bfloat16 and float8 e4m3 are held as their bits, so that no optional package is needed.
_STORAGES = {None: None, "bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16),
             "int8": np.dtype(np.int8), "float8_e4m3": np.dtype(np.uint8)}
_EIGHT_BIT = ("int8", "float8_e4m3")
# Tokens per group of key scales (an 8-bit cache's keys have one scale per channel for
# each group of this many storage rows; the kernel's FA_KV_GROUP).
GROUP = int(_kernels.KV_GROUP)


# The 256 float8 e4m3 bit patterns as float32, by the kernels' own conversion.
_F8 = _kernels.f8_to_f32(np.arange(256, dtype=np.uint8))


def checked_dtype_storage(dtype, storage, storages=tuple(_STORAGES), who=""):
    """(dtype, storage) of a cache: dtype float32 or float64 (TypeError otherwise), storage
    one of `storages` (ValueError naming them, and `who` after them), computing in float32."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    if storage not in storages:
        raise ValueError(f"storage must be one of {list(storages)}{who}, got {storage!r}")
    if storage is not None and dtype != np.float32:
        raise ValueError(f"storage={storage!r} computes in float32: dtype must be float32, "
                         f"got {dtype}")
    return dtype, storage


def narrowed16(name, a, storage):
    """a (real numbers) as the bits of storage "bfloat16" or "float16" (uint16), rounded to
    nearest even; NaN and inf refused, and (float16) what overflows, naming the argument."""
    a32 = np.ascontiguousarray(a, np.float32)
    if not np.isfinite(a32).all():
        raise ValueError(f"{name} holds NaN or inf: a cache with storage={storage!r} "
                         f"refuses them")
    bits = _kernels.narrow16(a32.reshape(-1), storage).reshape(a32.shape)
    if storage == "float16" and (bits & 0x7c00 == 0x7c00).any():
        raise ValueError(f"{name} holds values beyond float16's range (65504): a cache "
                         f"with storage='float16' refuses them")
    return bits


def widened16(a, storage):
    """A float32 copy of a, held as storage "bfloat16" (its bits) or "float16"."""
    flat = _kernels.widen16(np.ascontiguousarray(a).view(np.uint16).reshape(-1), storage)
    return flat.reshape(a.shape)


def dequantized(a, scale, storage):
    """float32 of the bytes a of an 8-bit storage times their scales (broadcast to a)."""
    if storage == "int8":
        return a.astype(np.float32) * scale
    # the e4m3 scales hold 256 times the step (fa_quant.h): exact to take out
    return _F8[a] * (scale / np.float32(256))


def quantized(name, x, group, storage):
    """(bytes, scales) of x (B, H, T, D) float32, the argument `name`, as
    _kernels.quantize gives them (group > 0: keys, a scale per channel for each group of
    rows; 0: values, one per row), refusing NaN and inf naming the argument."""
    a = x if x.strides[-1] == x.itemsize else np.ascontiguousarray(x)  # rows contiguous
    result = _kernels.quantize(a, group, storage, _kernels.max_threads())
    if result is None:
        raise ValueError(f"{name} holds NaN or inf: a cache with storage={storage!r} "
                         f"refuses them")
    return result


def _zeros_aligned(shape, dtype, align=64):
    """np.zeros on a cache-line boundary. NumPy's large arrays start 16 bytes past one,
    so every 64-byte vector load of the decoding kernel would straddle two lines (about
    10% of a step with 32 heads x 128 tokens x D 128, more when the cache fits in L2)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    buf = np.zeros(nbytes + align, np.uint8)
    start = -buf.ctypes.data % align
    return buf[start:start + nbytes].view(dtype).reshape(shape)


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer.

    Parameters
    ----------
    batch, kv_heads, capacity, head_dim : int
        Storage shape ``(batch, kv_heads, capacity, head_dim)``, allocated once.
    value_dim : int, optional
        Width of the values (defaults to ``head_dim``).
    dtype : float32 or float64, default float32
        The compute and result dtype of attention against the cache.
    storage : {None, "bfloat16", "float16", "int8", "float8_e4m3"}, optional
        How keys and values are held: None, in ``dtype``; ``"bfloat16"`` or ``"float16"``,
        in half the bytes of float32 (rounded to nearest even as they are appended);
        ``"int8"`` or ``"float8_e4m3"``, in a quarter, with scales: keys have one per
        channel for each group of 32 tokens (the group still filling is kept exactly
        beside and re-quantized as tokens join it), values one per token. The decoding
        kernel reads the stored bytes in place and widens them in registers. Such a cache
        refuses NaN and inf (and float16 values beyond its range, 65504) naming the
        argument, computes in float32, and ``keys``/``values`` are float copies of what it
        holds (dequantized), not views. See the decoding guide for the error of each.
        With ``precision="bfloat16"`` (or :func:`~fastattn.set_float32_precision`), a
        bfloat16, float16 (rounded to bfloat16 as read) or float8 e4m3 cache's steps take
        bfloat16 products where the CPU has them, and an int8 cache's 16-bit integer
        products (decoding guide).
    window : int, optional
        Keep only the last ``window`` tokens (sliding-window attention); ``window <=
        capacity``. The cache is then a ring in which each token is written twice, so the
        last ``window`` tokens are always one contiguous, chronological view and nothing is
        moved as tokens come and go. Appends never overflow, but one append may not bring
        more than ``window`` tokens (its first queries would need keys it evicts).
    on_full : {"raise", "grow"}, default "raise"
        Without a window: what appending past ``capacity`` does. "raise": a ValueError,
        and the cache is unchanged. "grow": reallocate with at least twice the capacity.

    Notes
    -----
    ``append`` validates everything first and writes nothing on error; if the write itself
    is interrupted (KeyboardInterrupt), the rows it overwrote are restored, so the cache
    always holds exactly the tokens of the appends that completed.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> cache = fastattn.KVCache(1, 2, 16, 4)
    >>> cache.append(np.ones((1, 2, 3, 4)), np.ones((1, 2, 3, 4)))
    >>> len(cache), cache.keys.shape
    (3, (1, 2, 3, 4))
    """

    def __init__(self, batch, kv_heads, capacity, head_dim, *, value_dim=None,
                 dtype=np.float32, window=None, on_full="raise", storage=None):
        batch = positive_int("batch", batch)
        kv_heads = positive_int("kv_heads", kv_heads)
        capacity = positive_int("capacity", capacity)
        head_dim = positive_int("head_dim", head_dim)
        value_dim = positive_int("value_dim", value_dim, allow_none=True) or head_dim
        window = positive_int("window", window, allow_none=True)
        dtype, storage = checked_dtype_storage(dtype, storage)
        if on_full not in ("raise", "grow"):
            raise ValueError(f"on_full must be 'raise' or 'grow', got {on_full!r}")
        if window is not None and window > capacity:
            raise ValueError(f"window ({window}) must not exceed capacity ({capacity})")
        self.batch, self.kv_heads, self.head_dim, self.value_dim = batch, kv_heads, head_dim, value_dim
        self.dtype, self.window, self.on_full, self.storage = dtype, window, on_full, storage
        self._store = _STORAGES[storage] or dtype  # bfloat16, float8: their bits
        self._group = GROUP if storage in _EIGHT_BIT else 1  # rows per key scale
        # A window is a ring of _ring slots, each written at slot and slot + _ring. With
        # groups of key scales, the ring is whole groups and one more than the window, so
        # that the slots of a group still filling hold only tokens out of the window.
        self._ring = window if self._group == 1 or window is None else \
            -(-window // GROUP) * GROUP + GROUP
        self._capacity = capacity if window is None else window
        self._allocate(2 * self._ring if window is not None else capacity)
        self._seen = 0  # tokens appended since the last reset

    def _allocate(self, rows):
        """Zeroed storage for `rows` rows (whole groups, for 8-bit storage)."""
        rows = -(-rows // self._group) * self._group
        b, h = self.batch, self.kv_heads
        self._k = _zeros_aligned((b, h, rows, self.head_dim), self._store)
        self._v = _zeros_aligned((b, h, rows, self.value_dim), self._store)
        if self._group > 1:
            self._ks = np.zeros((b, h, rows // self._group, self.head_dim), np.float32)
            self._vs = np.zeros((b, h, rows), np.float32)
            self._open = np.zeros((b, h, self._group, self.head_dim), np.float32)

    # ------------------------------------------------------------------ state
    @property
    def capacity(self):
        """Tokens the cache can hold (the window, when there is one)."""
        return self._capacity

    @property
    def seen(self):
        """Tokens appended since the last reset (the position of the next token)."""
        return self._seen

    def __len__(self):
        """Tokens held now: all seen, or the last ``window``."""
        return self._seen if self.window is None else min(self._seen, self.window)

    def _span(self):
        n = len(self)
        start = 0 if self.window is None else (self._seen - n) % self._ring
        return start, start + n

    @property
    def keys(self):
        """The held keys, oldest first: (batch, kv_heads, len, head_dim), in ``dtype``: a
        view of the storage, or with ``storage=`` a float copy of it."""
        return self._held("k", *self._span())

    @property
    def values(self):
        """The held values, oldest first: (batch, kv_heads, len, value_dim), as ``keys``."""
        return self._held("v", *self._span())

    @property
    def nbytes(self):
        """Bytes the cache holds for keys and values (its whole capacity), scales and the
        exact keys of the group still filling included."""
        extra = (self._ks, self._vs, self._open) if self._group > 1 else ()
        return self._k.nbytes + self._v.nbytes + sum(a.nbytes for a in extra)

    def _held(self, which, start, stop):
        """Storage rows [start, stop) of the keys ("k") or values ("v") in the compute
        dtype: a view, or with storage= a float32 copy (8-bit: times their scales)."""
        a = (self._k if which == "k" else self._v)[:, :, start:stop]
        if self.storage is None:
            return a
        if self._group == 1:
            return widened16(a, self.storage)
        rows = np.arange(start, stop)
        if which == "k":  # a scale per channel for each group of rows
            scale = self._ks[:, :, rows // self._group]
        else:  # a scale per row
            scale = self._vs[:, :, rows, None]
        return dequantized(a, scale, self.storage)

    def _stored(self, name, a):
        """a (validated) as the storage holds it: itself, or its 16-bit bits, refusing NaN
        and inf and (float16) what overflows."""
        if self.storage is None:
            return a
        return narrowed16(name, a, self.storage).view(self._store)

    def reset(self):
        """Forget every token (the storage is kept)."""
        self._seen = 0

    def __repr__(self):
        window = "" if self.window is None else f", window={self.window}"
        storage = "" if self.storage is None else f", storage={self.storage!r}"
        return (f"KVCache(batch={self.batch}, kv_heads={self.kv_heads}, len={len(self)}, "
                f"capacity={self.capacity}, head_dim={self.head_dim}, "
                f"value_dim={self.value_dim}, dtype={self.dtype}{window}{storage})")

    # ------------------------------------------------------------------ append
    def _checked(self, name, a, width):
        a = as_array(name, a)
        dtype_pair(name, a.dtype)  # the API's dtype rule: TypeError naming the dtype
        expected = (self.batch, self.kv_heads, width)
        if a.ndim != 4 or (a.shape[0], a.shape[1], a.shape[3]) != expected:
            raise ValueError(
                f"{name} must have shape (batch, kv_heads, n_new, {'head_dim' if name == 'k' else 'value_dim'})"
                f" = ({self.batch}, {self.kv_heads}, n_new, {width}), got {name}.shape={a.shape}"
            )
        return a

    def append(self, k, v):
        """Append ``n_new`` tokens: ``k`` (batch, kv_heads, n_new, head_dim) and ``v``
        (batch, kv_heads, n_new, value_dim). Nothing is written unless all of it is valid."""
        k = self._checked("k", k, self.head_dim)
        v = self._checked("v", v, self.value_dim)
        n = k.shape[2]
        if v.shape[2] != n:
            raise ValueError(f"k and v must bring the same number of tokens, got k.shape={k.shape} "
                             f"and v.shape={v.shape}")
        if n == 0:
            return
        if self.window is not None and n > self.window:
            raise ValueError(f"one append may bring at most window={self.window} tokens, got {n}")
        writes = self._quantized(k, v) if self._group > 1 else (
            self._placed("_k", self._seen, self._stored("k", k))
            + self._placed("_v", self._seen, self._stored("v", v)))
        if self.window is None and self._seen + n > self._capacity:
            if self.on_full == "raise":
                raise ValueError(
                    f"KVCache is full: capacity {self._capacity}, holding {self._seen}, "
                    f"appending {n}; construct it with a larger capacity or on_full='grow'"
                )
            self._grow(self._seen + n)
        self._write(writes)
        self._seen += n

    def _placed(self, name, first, data, per=1):
        """[(name, index, data)]: data (token or group rows along axis 2) written from row
        `first` of the attribute `name` (per: tokens per row), twice round a window's ring."""
        n = data.shape[2]
        if self.window is None:
            return [(name, slice(first, first + n), data)]
        ring = self._ring // per
        slots = (first + np.arange(n)) % ring
        return [(name, np.concatenate([slots, slots + ring]), np.concatenate([data, data], axis=2))]

    def _quantized(self, k, v):
        """The writes of an append to an 8-bit cache: the group still filling re-quantized
        from its exact keys with the new ones, the following groups, the values, and the
        exact keys of the group left filling."""
        group, seen, n = self._group, self._seen, k.shape[2]
        k32, v32 = np.asarray(k, np.float32), np.asarray(v, np.float32)
        filled = seen % group  # tokens already in the open group
        first = min(n, group - filled) if filled else 0
        pieces = []  # (first position, exact keys) of whole groups or a last partial one
        if first:
            pieces.append((seen - filled, np.concatenate([self._open[:, :, :filled],
                                                          k32[:, :, :first]], axis=2)))
        if first < n:
            pieces.append((seen + first, k32[:, :, first:]))
        writes = []
        for at, keys in pieces:
            stored, scales = quantized("k", keys, group, self.storage)
            writes += self._placed("_k", at, stored)
            writes += self._placed("_ks", at // group, scales, per=group)
        stored, scales = quantized("v", v32, 0, self.storage)
        writes += self._placed("_v", seen, stored)
        writes += self._placed("_vs", seen, scales)
        left = (seen + n) % group
        if left:
            writes.append(("_open", slice(0, left), pieces[-1][1][:, :, -left:]))
        return writes

    def _write(self, writes):
        """Do writes, (attribute name, index along axis 2, data); on any exception (an
        interrupt) put every old row back, so that the append happened or did not."""
        done = []
        try:
            for name, index, data in writes:
                a = getattr(self, name)
                done.append((a, index, a[:, :, index].copy()))
                a[:, :, index] = data
        except BaseException:
            for a, index, old in reversed(done):
                a[:, :, index] = old
            raise

    def _grow(self, needed):
        old = {name: getattr(self, name) for name in ("_k", "_v", "_ks", "_vs", "_open")
               if hasattr(self, name)}
        self._capacity = max(needed, 2 * self._capacity)
        self._allocate(self._capacity)
        kept = {"_ks": -(-self._seen // self._group), "_open": self._group}
        for name, a in old.items():
            rows = kept.get(name, self._seen)
            getattr(self, name)[:, :, :rows] = a[:, :, :rows]


# Query rows per kv head (heads sharing it x queries) up to which several queries against a
# cache with storage= are decoded in place (the decoding kernel keeps every row's partial
# state per chunk of keys); more take the general path on a float32 copy of the cache,
# where the fused kernel's GEMM tiles pay for the copy.
IN_PLACE_ROWS = 64


# The storages whose decoding steps take products below float32 under precision="bfloat16"
# (where the CPU has them: _kernels.decode_products).
_PRODUCTS = ("bfloat16", "float16", "int8", "float8_e4m3")


def products_allowed(storage, precision):
    """Whether a decoding step on `storage` may take products below float32: the storage
    has them and precision (checked; None: set_float32_precision's) is "bfloat16"."""
    allowed = check_precision(precision) or _plan.float32_precision()
    return storage in _PRODUCTS and allowed == "bfloat16"


def decode_step(q, cache, causal, scale, softcap, sinks, num_threads, return_lse,
                precision=None):
    """One decoding step against a cache, or None to take the general path.

    The common call while generating, ``attention(q, cache=cache)`` with q of shape
    (batch, heads, 1, head_dim) in the cache's dtype, C-contiguous: the same kernel call
    as the general path (so bitwise the same result) without its shape planning, which
    cost about 6 us of a 38 us step over 32 heads x 128 tokens. With storage=, also a few
    queries at once (chunked prefill, speculative decoding; see _queries_in_place).
    Anything else (other shapes or dtypes, an empty cache) returns None and goes through
    the full validation. precision="bfloat16" lets every storage but None
    take products below float32 where the CPU has them (_kernels.decode's products).
    """
    products = products_allowed(cache.storage, precision)
    if not (type(q) is np.ndarray and q.dtype == cache.dtype and q.ndim == 4
            and q.flags.c_contiguous):
        return None
    batch, heads, n_queries, d_head = q.shape
    kv_heads, n_keys = cache.kv_heads, len(cache)
    if (batch != cache.batch or d_head != cache.head_dim
            or heads == 0 or heads % kv_heads or n_keys == 0):
        return None
    if n_queries != 1:
        if (cache.storage is None or n_queries == 0 or n_queries > n_keys
                or heads // kv_heads * n_queries > IN_PLACE_ROWS):
            return None
        return _queries_in_place(q, cache, check_flag("causal", causal), scale, softcap, sinks,
                                 num_threads, return_lse, precision, products)
    check_flag("causal", causal)  # one query, the newest token: causal changes nothing
    if scale is None and softcap is None and sinks is None and not return_lse and not products:
        # The plainest step, the one generation repeats: checked and run in compiled code.
        start, stop = cache._span()
        result = cache_decode(q, cache._k, cache._v, start, stop - start,
                              check_threads(num_threads),
                              (cache._ks, cache._vs) if cache._group > 1 else ())
        if result is not None:
            return result
    result, lse = _decode(q, cache, 0, n_keys, scale, softcap, sinks, num_threads, products)
    return (result, lse) if return_lse else result


def _decode(q, cache, first, stop, scale, softcap, sinks, num_threads, products=False):
    """(out, lse) of the queries of q (batch, heads, L_q, D) against held tokens [first,
    stop), every query seeing every one of them, by the decoding kernel on the storage
    in place: each kv head's G x L_q query rows are one group of rows."""
    batch, heads, n_queries, d_head = q.shape
    kv_heads, n_keys = cache.kv_heads, stop - first
    scale = check_scale(scale, d_head)
    softcap = check_softcap(softcap)
    n_threads = check_threads(num_threads)
    rows, n_groups, d_v = heads // kv_heads * n_queries, batch * kv_heads, cache.value_dim
    if sinks is not None:
        sinks = np.ascontiguousarray(np.broadcast_to(
            check_sinks(sinks, (batch, heads), q.dtype)[..., None], q.shape[:3])
        ).reshape(n_groups, rows)
    result = np.empty((n_groups, rows, d_v), q.dtype)
    lse = np.empty((n_groups, rows), q.dtype)
    # The storage's views, (batch, kv_heads, n_keys, D): rows contiguous, read in place
    # (16- and 8-bit storage too: the kernel widens it as it loads it; 8-bit with the
    # scales from the group of the first row, which is row `phase` of it).
    start = cache._span()[0] + first
    scales = None
    if cache._group > 1:
        scales = (cache._ks[:, :, start // cache._group:].reshape(n_groups, -1, d_head),
                  cache._vs[:, :, start:start + n_keys].reshape(n_groups, n_keys),
                  start % cache._group)
    run_decode(q.reshape(n_groups, rows, d_head),
               cache._k[:, :, start:start + n_keys].reshape(n_groups, n_keys, d_head),
               cache._v[:, :, start:start + n_keys].reshape(n_groups, n_keys, d_v),
               identity_index(n_groups), scale, softcap, sinks, result, lse, n_threads, scales,
               products)
    return (result.reshape(batch, heads, n_queries, d_v),
            lse.reshape(batch, heads, n_queries))


def _queries_in_place(q, cache, causal, scale, softcap, sinks, num_threads, return_lse,
                      precision, products):
    """attention(q, cache=cache) for L_q > 1 queries against a cache with storage=, reading
    the storage in place. Without causal, every query sees every token: one decoding call.
    With causal, query i (of the last L_q tokens) sees tokens up to n - L_q + i: the first
    n - L_q + 1 tokens, which all see, go through the decoding kernel in place, and the
    last L_q - 1 (a float32 copy of them) through the fused kernel with causal alignment;
    the two parts are merged exactly (merge_attention), sinks counted once."""
    from .api import attention, merge_attention

    n_keys, n_queries = len(cache), q.shape[2]
    shared = n_keys - n_queries + 1 if causal else n_keys
    out, lse = _decode(q, cache, 0, shared, scale, softcap, sinks, num_threads, products)
    if shared < n_keys:
        start, stop = cache._span()
        out, lse = merge_attention(out, lse, *attention(
            q, cache._held("k", start + shared, stop), cache._held("v", start + shared, stop),
            causal=True, scale=scale, softcap=softcap, return_lse=True,
            num_threads=num_threads, precision=precision))
    return (out, lse) if return_lse else out

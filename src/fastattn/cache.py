"""KVCache: preallocated keys and values for incremental decoding, and the decoding
step on it (``attention(q, cache=cache)``'s short path)."""

import numpy as np

from ._dispatch import kernels as _kernels
from ._run import cache_decode, identity_index, run_decode
from ._validation import (as_array, check_flag, check_scale, check_sinks, check_softcap,
                          check_threads, dtype_pair, positive_int)

__all__ = ["KVCache", "decode_step"]

# storage= -> the dtype of the arrays that hold keys and values (None: the compute dtype);
# bfloat16 is held as its bits, so that no optional package is needed.
_STORAGES = {None: None, "bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.float16)}


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
    storage : {None, "bfloat16", "float16"}, optional
        How keys and values are held: None, in ``dtype``; ``"bfloat16"`` or ``"float16"``,
        in half the bytes of float32 (rounded to nearest even as they are appended), read
        in place and widened by the decoding kernel. Such a cache refuses NaN and inf
        (and float16 refuses values beyond its range, 65504) naming the argument, and
        ``keys``/``values`` are then float copies of what it holds, not views.
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
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        if storage not in _STORAGES:
            raise ValueError(f"storage must be one of {list(_STORAGES)}, got {storage!r}")
        if storage is not None and dtype != np.float32:
            raise ValueError(f"storage={storage!r} computes in float32: dtype must be float32, "
                             f"got {dtype}")
        if on_full not in ("raise", "grow"):
            raise ValueError(f"on_full must be 'raise' or 'grow', got {on_full!r}")
        if window is not None and window > capacity:
            raise ValueError(f"window ({window}) must not exceed capacity ({capacity})")
        self.batch, self.kv_heads, self.head_dim, self.value_dim = batch, kv_heads, head_dim, value_dim
        self.dtype, self.window, self.on_full, self.storage = dtype, window, on_full, storage
        rows = 2 * window if window is not None else capacity
        self._store = _STORAGES[storage] or dtype  # bfloat16 is held as its bits (uint16)
        self._k = _zeros_aligned((batch, kv_heads, rows, head_dim), self._store)
        self._v = _zeros_aligned((batch, kv_heads, rows, value_dim), self._store)
        self._seen = 0  # tokens appended since the last reset

    # ------------------------------------------------------------------ state
    @property
    def capacity(self):
        """Tokens the cache can hold (the window, when there is one)."""
        return self.window if self.window is not None else self._k.shape[2]

    @property
    def seen(self):
        """Tokens appended since the last reset (the position of the next token)."""
        return self._seen

    def __len__(self):
        """Tokens held now: all seen, or the last ``window``."""
        return self._seen if self.window is None else min(self._seen, self.window)

    def _span(self):
        n = len(self)
        start = 0 if self.window is None else (self._seen - n) % self.window
        return start, start + n

    @property
    def keys(self):
        """The held keys, oldest first: (batch, kv_heads, len, head_dim), in ``dtype``: a
        view of the storage, or with ``storage=`` a float copy of it."""
        start, stop = self._span()
        return self._widened(self._k[:, :, start:stop])

    @property
    def values(self):
        """The held values, oldest first: (batch, kv_heads, len, value_dim), as ``keys``."""
        start, stop = self._span()
        return self._widened(self._v[:, :, start:stop])

    @property
    def nbytes(self):
        """Bytes the cache holds for keys and values (its whole capacity)."""
        return self._k.nbytes + self._v.nbytes

    def _widened(self, a):
        """a (a view of the storage) in the compute dtype: itself, or a float32 copy."""
        if self.storage is None:
            return a
        flat = _kernels.widen16(np.ascontiguousarray(a).view(np.uint16).reshape(-1),
                                self.storage)
        return flat.reshape(a.shape)

    def _stored(self, name, a):
        """a (validated) as the storage holds it: itself, or its 16-bit bits, refusing NaN
        and inf and (float16) what overflows."""
        if self.storage is None:
            return a
        a32 = np.ascontiguousarray(a, np.float32)
        if not np.isfinite(a32).all():
            raise ValueError(f"{name} holds NaN or inf: a cache with storage={self.storage!r} "
                             f"refuses them")
        bits = _kernels.narrow16(a32.reshape(-1), self.storage).reshape(a32.shape)
        if self.storage == "float16" and (bits & 0x7c00 == 0x7c00).any():
            raise ValueError(f"{name} holds values beyond float16's range (65504): a cache "
                             f"with storage='float16' refuses them")
        return bits.view(self._store)

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
        k, v = self._stored("k", k), self._stored("v", v)
        if self.window is not None:
            if n > self.window:
                raise ValueError(f"one append may bring at most window={self.window} tokens, got {n}")
            slots = (self._seen + np.arange(n)) % self.window
            rows = np.concatenate([slots, slots + self.window])
            self._write(rows, np.concatenate([k, k], axis=2), np.concatenate([v, v], axis=2))
        else:
            if self._seen + n > self._k.shape[2]:
                if self.on_full == "raise":
                    raise ValueError(
                        f"KVCache is full: capacity {self._k.shape[2]}, holding {self._seen}, "
                        f"appending {n}; construct it with a larger capacity or on_full='grow'"
                    )
                self._grow(self._seen + n)
            self._write(np.arange(self._seen, self._seen + n), k, v)
        self._seen += n

    def _write(self, rows, k, v):
        """Write tokens into storage rows; on any exception put the old rows back."""
        old_k, old_v = self._k[:, :, rows], self._v[:, :, rows]
        try:
            self._k[:, :, rows] = k
            self._v[:, :, rows] = v
        except BaseException:
            self._k[:, :, rows] = old_k
            self._v[:, :, rows] = old_v
            raise

    def _grow(self, needed):
        capacity = max(needed, 2 * self._k.shape[2])
        k = _zeros_aligned(self._k.shape[:2] + (capacity, self.head_dim), self._store)
        v = _zeros_aligned(self._v.shape[:2] + (capacity, self.value_dim), self._store)
        k[:, :, :self._seen] = self._k[:, :, :self._seen]
        v[:, :, :self._seen] = self._v[:, :, :self._seen]
        self._k, self._v = k, v


def decode_step(q, cache, causal, scale, softcap, sinks, num_threads, return_lse):
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
    check_flag("causal", causal)  # one query, the newest token: causal changes nothing
    if scale is None and softcap is None and sinks is None and not return_lse:
        # The plainest step, the one generation repeats: checked and run in compiled code.
        start, stop = cache._span()
        result = cache_decode(q, cache._k, cache._v, start, stop - start,
                              check_threads(num_threads))
        if result is not None:
            return result
    scale = check_scale(scale, d_head)
    softcap = check_softcap(softcap)
    n_threads = check_threads(num_threads)
    group, n_groups, d_v = heads // kv_heads, batch * kv_heads, cache.value_dim
    if sinks is not None:
        sinks = check_sinks(sinks, (batch, heads), q.dtype).reshape(n_groups, group)
    result = np.empty((n_groups, group, d_v), q.dtype)
    lse = np.empty((n_groups, group), q.dtype)
    # The storage's views, (batch, kv_heads, n_keys, D): rows contiguous, read in place
    # (16-bit storage too: the kernel widens it as it loads it).
    start, stop = cache._span()
    run_decode(q.reshape(n_groups, group, d_head),
               cache._k[:, :, start:stop].reshape(n_groups, n_keys, d_head),
               cache._v[:, :, start:stop].reshape(n_groups, n_keys, d_v),
               identity_index(n_groups), scale, softcap, sinks, result, lse, n_threads)
    result = result.reshape(batch, heads, 1, d_v)
    return (result, lse.reshape(batch, heads, 1)) if return_lse else result

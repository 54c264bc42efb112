"""fastattn on dask arrays: attention split into blocks that dask schedules anywhere (its
threaded scheduler, a dask.distributed cluster, Ray through dask-on-ray).

Design. The batch and head axes are split as the arrays are chunked; query blocks are
independent; each key block of a query block gives a partial result ``(out, lse)`` from
:func:`fastattn.attention` with ``return_lse=True``, and the partials of one query block
are merged exactly by a tree of :func:`fastattn.merge_attention` (``split_every`` at a
time), the log-sum-exp merge of ring attention and FlashDecoding. A partial travels as
one array, ``out`` with ``lse`` as one more column. Under ``causal``/``window`` a
(query block, key block) pair whose keys are all hidden makes no task at all; one that is
partly hidden gets the mask of its own offsets, built inside its task. Grouped-query heads
read their key/value head blocks without copying them. Sinks, one more key per row, are
merged in once, at the end of each tree.

Threads: each task calls the kernels with ``num_threads`` threads (default 1): dask's
workers supply the parallelism, one task per worker thread, which neither oversubscribes
the cores nor idles them when a worker has as many threads as cores (dask.distributed's
default, whose nanny also sets ``OMP_NUM_THREADS=1``). With fewer, larger tasks than
cores, raise it.

Importing this module imports dask; the rest of fastattn never does.
"""

import itertools
import math
import operator

import numpy as np

from . import _plan, api
from ._plan import layout
from ._validation import require

da = require("dask.array", "dask", "fastattn.dask")
from dask.base import tokenize  # noqa: E402 (after the check that names the extra)
from dask.highlevelgraph import HighLevelGraph  # noqa: E402
from ._validation import (check_flag, check_precision, check_scale, check_sinks, check_softcap,
                          check_window, dtypes_of, is_dask_array, positive_int)

__all__ = ["attention", "is_dask_array", "ShardedKVCache"]


def _as_dask(name, a):
    if is_dask_array(a):
        if any(math.isnan(c) for chunks in a.chunks for c in chunks):
            raise ValueError(f"{name} has unknown chunk sizes: call {name}.compute_chunk_sizes() "
                             f"first")
        return a
    return da.asarray(np.asarray(a) if not hasattr(a, "shape") else a)


def _offsets(chunks):
    return list(itertools.accumulate(chunks, initial=0))


def _without_empty_chunks(a):
    """a rechunked without the empty chunks of its sequence axis (-2)."""
    chunks = a.chunks[-2]
    if 0 not in chunks or len(chunks) == 1:
        return a
    kept = tuple(c for c in chunks if c) or (0,)
    return a.rechunk(a.chunks[:-2] + (kept, a.chunks[-1]))


def _visibility(qs, qe, ks, ke, offset, causal, window):
    """'hidden', 'full' or 'partial' for queries [qs, qe) against keys [ks, ke): query i
    sees key j when j <= i + offset (causal) and j > i + offset - window (window)."""
    if qe <= qs or ke <= ks:
        return "full"  # an empty block: nothing to hide
    if not causal:
        return "full"
    if ks > qe - 1 + offset:
        return "hidden"
    if window and ke - 1 <= qs + offset - window:
        return "hidden"
    full = ke - 1 <= qs + offset and (not window or ks > qe - 1 + offset - window)
    return "full" if full else "partial"


def _visible(qs, n_q, ks, n_k, offset, window):
    """The (n_q, n_k) boolean mask of queries [qs, qs + n_q) against keys [ks, ks + n_k):
    key j visible to query i when j <= i + offset, and j > i + offset - window."""
    i = np.arange(qs, qs + n_q)[:, None]
    j = np.arange(ks, ks + n_k)[None, :]
    visible = j <= i + offset
    if window:
        visible &= j > i + offset - window
    return visible


def _partial(q, k, v, mask, qs, ks, offset, causal, window, scale, softcap, num_threads,
             compute):
    """One (query block, key block) pair: out and lse packed as (..., L_q, D_v + 1).

    causal: the pair is partly hidden. When the block's keys reach at least the last
    query's horizon, the keys past it are dropped and the kernel's own causal/window
    (aligned to the block's new end) hide the rest, skipping whole tiles; otherwise the
    mask of the pair's offsets is built here."""
    kernel_causal, kernel_window = False, None
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        horizon = qs + n_q - 1 + offset  # the last key the last query sees
        if ks + n_k - 1 >= horizon:
            keep = horizon - ks + 1
            k, v = k[..., :keep, :], v[..., :keep, :]
            if mask is not None:
                mask = mask[..., :keep]
            kernel_causal, kernel_window = True, window or None
        else:
            visible = _visible(qs, n_q, ks, n_k, offset, window)
            if mask is None:
                mask = visible
            elif mask.dtype == np.bool_:
                mask = mask & visible
            else:
                mask = np.where(visible, mask, -np.inf)
    out, lse = api.attention(q, k, v, mask=mask, causal=kernel_causal, window=kernel_window,
                             scale=scale, softcap=softcap, return_lse=True,
                             num_threads=num_threads)
    return np.concatenate([out.astype(compute, copy=False), lse[..., None]], axis=-1)


def _merge(*parts):
    """Exact merge of packed partials over disjoint key sets (fastattn.merge_attention)."""
    out, lse = parts[0][..., :-1], parts[0][..., -1]
    for p in parts[1:]:
        out, lse = api.merge_attention(out, lse, p[..., :-1], p[..., -1])
    return np.concatenate([out, lse[..., None]], axis=-1)


def _empty(shape, compute):
    """The packed result of a query block that sees no key: zeros, lse -inf."""
    packed = np.zeros(shape, compute)
    packed[..., -1] = -np.inf
    return packed


def _with_sinks(packed, sinks):
    """Merge the sinks in as a key set of their own: output 0, lse the sink."""
    sink_lse = np.broadcast_to(sinks[..., None], packed.shape[:-1]).astype(packed.dtype)
    return _merge(packed, np.concatenate([np.zeros_like(packed[..., :-1]),
                                          sink_lse[..., None]], axis=-1))


def attention(q, k, v, *, mask=None, causal=False, window=None, scale=None, softcap=None,
              sinks=None, return_lse=False, num_threads=1, split_every=4):
    """:func:`fastattn.attention` on dask arrays, lazily.

    Parameters
    ----------
    q, k, v : dask arrays (or anything array-like, wrapped as one chunk)
        Shapes as in :func:`fastattn.attention`: batch axes broadcast, grouped-query heads
        on axis -3. ``q`` is split as it is chunked (batch, heads, queries); keys as ``k``
        is chunked along its key axis (``v`` follows). The head-size axes are made whole.
    mask : dask or NumPy array, bool or float, optional
        Broadcastable to (..., L_q, L_k); rechunked like the scores.
    causal, window, scale, softcap, sinks
        As in :func:`fastattn.attention`.
    return_lse : bool, default False
        Also return the log-sum-exp per query (a dask array).
    num_threads : int, default 1
        Threads each task's kernel uses (see the module notes).
    split_every : int, default 4
        Partials merged per task of the reduction tree.

    Returns
    -------
    out : dask array, shape (..., L_q, D_v)
    lse : dask array, shape (..., L_q), if ``return_lse``

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastattn
    >>> from fastattn import dask as fd
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 64, 16)) for _ in range(3))
    >>> out = fd.attention(da.from_array(q, chunks=(1, 32, 16)),
    ...                    da.from_array(k, chunks=(1, 16, 16)), v, causal=True)
    >>> bool(np.allclose(out.compute(), fastattn.attention(q, k, v, causal=True)))
    True
    """
    q, k, v = _as_dask("q", q), _as_dask("k", k), _as_dask("v", v)
    if mask is not None:
        mask = _as_dask("mask", mask)
    lay = layout(q.shape, k.shape, v.shape, None if mask is None else mask.shape)
    compute, result = dtypes_of(("q", "k", "v"), (q.dtype, k.dtype, v.dtype))
    if mask is not None and mask.dtype != np.bool_ and mask.dtype.kind != "f":
        raise TypeError(f"mask must be boolean or floating, got dtype {mask.dtype}")
    causal = check_flag("causal", causal)
    window = check_window(window, causal)
    scale = check_scale(scale, lay.d_head)
    softcap = check_softcap(softcap) or None
    sinks = check_sinks(sinks, lay.batch, compute)
    return_lse = check_flag("return_lse", return_lse)
    num_threads = positive_int("num_threads", num_threads)
    split_every = positive_int("split_every", split_every)
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")

    batch, n_q, n_k, d, d_v = lay.batch, lay.n_queries, lay.n_keys, lay.d_head, lay.d_v
    nb = len(batch)
    group = 1
    if (nb and q.ndim >= 3 and k.ndim >= 3 and q.shape[-3] != k.shape[-3]
            and 1 not in (q.shape[-3], k.shape[-3])):
        group = q.shape[-3] // k.shape[-3]
    kv_batch = batch[:-1] + (batch[-1] // group,) if group > 1 else batch

    # Broadcast (lazily) and line the chunks up: q's batch chunks drive everything; a head
    # chunk of q is a whole number of key/value heads. Empty chunks of the sequence axes
    # hold nothing (and trip dask's broadcast_to): they are dropped first.
    q, k, v = (_without_empty_chunks(a) for a in (q, k, v))
    q = da.broadcast_to(q, batch + (n_q, d))
    batch_chunks = list(q.chunks[:nb])
    if group > 1:
        size = max(group, max(batch_chunks[-1]) // group * group)
        batch_chunks[-1] = size
    q = q.rechunk(tuple(batch_chunks) + (q.chunks[-2], -1))
    batch_chunks = q.chunks[:nb]
    kv_chunks = batch_chunks[:-1] + (tuple(c // group for c in batch_chunks[-1]),) if group > 1 \
        else batch_chunks
    k = da.broadcast_to(k, kv_batch + (n_k, d))
    k = k.rechunk(kv_chunks + (k.chunks[-2], -1))
    v = da.broadcast_to(v, kv_batch + (n_k, d_v)).rechunk(kv_chunks + (k.chunks[-2], -1))
    if mask is not None:
        mask = da.broadcast_to(mask, batch + (n_q, n_k))
        mask = mask.rechunk(batch_chunks + (q.chunks[-2], k.chunks[-2]))

    q_off, k_off = _offsets(q.chunks[-2]), _offsets(k.chunks[-2])
    offset = n_k - n_q
    token = tokenize(q, k, v, mask, causal, window, scale, softcap, sinks, num_threads,
                     split_every)
    part_name, merge_name, out_name = (f"fastattn-{s}-{token}" for s in ("partial", "merge", "out"))
    dsk = {}
    for bi in itertools.product(*(range(len(c)) for c in batch_chunks)):
        block_batch = tuple(c[i] for c, i in zip(batch_chunks, bi))
        sink_block = None
        if sinks is not None:
            starts = [_offsets(c)[i] for c, i in zip(batch_chunks, bi)]
            sink_block = sinks[tuple(slice(s, s + n) for s, n in zip(starts, block_batch))]
        for qi in range(len(q_off) - 1):
            qs, qe = q_off[qi], q_off[qi + 1]
            parts = []
            for kj in range(len(k_off) - 1):
                ks, ke = k_off[kj], k_off[kj + 1]
                seen = _visibility(qs, qe, ks, ke, offset, causal, window)
                if seen == "hidden":
                    continue  # no task at all
                key = (part_name,) + bi + (qi, kj)
                dsk[key] = (_partial, (q.name,) + bi + (qi, 0), (k.name,) + bi + (kj, 0),
                            (v.name,) + bi + (kj, 0),
                            None if mask is None else (mask.name,) + bi + (qi, kj),
                            qs, ks, offset, seen == "partial", window, scale, softcap,
                            num_threads, compute)
                parts.append(key)
            level = 0
            while len(parts) > split_every or (len(parts) > 1 and sink_block is None):
                merged = []
                for n, start in enumerate(range(0, len(parts), split_every)):
                    group_keys = parts[start:start + split_every]
                    if len(group_keys) == 1:
                        merged.append(group_keys[0])
                        continue
                    key = (merge_name,) + bi + (qi, level, n)
                    dsk[key] = (_merge,) + tuple(group_keys)
                    merged.append(key)
                parts = merged
                level += 1
            final = (out_name,) + bi + (qi, 0)
            shape = block_batch + (qe - qs, d_v + 1)
            if not parts:
                dsk[final] = ((_with_sinks, (_empty, shape, compute), sink_block)
                              if sink_block is not None else (_empty, shape, compute))
            elif sink_block is not None:
                dsk[final] = (_with_sinks, ((_merge,) + tuple(parts)) if len(parts) > 1
                              else parts[0], sink_block)
            else:
                dsk[final] = (operator.getitem, parts[0], Ellipsis)
    deps = [q, k, v] + ([mask] if mask is not None else [])
    graph = HighLevelGraph.from_collections(out_name, dsk, dependencies=deps)
    packed = da.Array(graph, out_name, chunks=batch_chunks + (q.chunks[-2], (d_v + 1,)),
                      dtype=compute, meta=np.empty((0,) * (nb + 2), compute))
    out = packed[..., :d_v]
    if out.dtype != result:
        out = out.astype(result)
    if not return_lse:
        return out
    return out, packed[..., d_v]


# --------------------------------------------------------------------------- sharded cache

class _Shard:
    """One shard of a ShardedKVCache: a KVCache living on one worker (a dask actor)."""

    def __init__(self, batch, kv_heads, capacity, head_dim, value_dim, dtype, storage):
        from .cache import KVCache
        self.cache = KVCache(batch, kv_heads, capacity, head_dim, value_dim=value_dim,
                             dtype=dtype, storage=storage)

    def append(self, k, v):
        self.cache.append(k, v)
        return len(self.cache)

    def attend(self, q, first_key, n_total, causal, scale, softcap, num_threads,
               precision="highest"):
        """(out, lse) of q against this shard's keys, which are global keys [first_key,
        first_key + len); the queries are the last L_q of n_total tokens (causal)."""
        n = len(self.cache)
        n_q = q.shape[-2]
        mask = None
        if causal and first_key + n - 1 > n_total - n_q:  # some key after the first query
            mask = _visible(n_total - n_q, n_q, first_key, n, 0, None)
        if n == 0:
            shape = q.shape[:-1]
            return (np.zeros(shape + (self.cache.value_dim,), q.dtype),
                    np.full(shape, -np.inf, q.dtype))
        if mask is None:  # every query sees every key here: the cache's own path, in place
            return api.attention(q, cache=self.cache, scale=scale, softcap=softcap,
                                 return_lse=True, num_threads=num_threads, precision=precision)
        return api.attention(q, self.cache.keys, self.cache.values, mask=mask, scale=scale,
                             softcap=softcap, return_lse=True, num_threads=num_threads,
                             precision=precision)


class ShardedKVCache:
    """A key/value cache split by keys across the workers of a dask.distributed cluster.

    Each shard is a :class:`fastattn.KVCache` of ``shard_capacity`` tokens held by a dask
    actor on one worker; appends fill the shards in order (a new token goes to the last
    shard with room). :meth:`attention` sends the queries to every non-empty shard, gets
    back ``(out, lse)`` partials and merges them exactly, in shard order, with
    :func:`fastattn.merge_attention`; sinks are merged in once, at the end. The keys never
    leave their worker: each step moves the queries out and ``L_q x (D_v + 1)`` numbers
    per shard back.

    Parameters
    ----------
    client : distributed.Client
    batch, kv_heads, head_dim : int
        As in :class:`fastattn.KVCache`.
    shard_capacity : int
        Tokens per shard.
    n_shards : int
        Shards, placed round-robin on the client's workers.
    value_dim : int, optional
    dtype : float32 or float64
    storage : {None, "bfloat16", "float16", "int8", "float8_e4m3"}, optional
        How each shard holds its keys and values, as in :class:`fastattn.KVCache`.

    Examples
    --------
    On a real cluster, ``Client("tcp://scheduler:8786")``; here two in-process workers:

    >>> import numpy as np, fastattn
    >>> from distributed import Client, LocalCluster
    >>> from fastattn.dask import ShardedKVCache
    >>> client = Client(LocalCluster(n_workers=2, processes=False, dashboard_address=None))
    >>> cache = ShardedKVCache(client, 1, 2, 16, shard_capacity=64, n_shards=3)
    >>> rng = np.random.default_rng(0)
    >>> k, v = (rng.standard_normal((1, 2, 100, 16), dtype=np.float32) for _ in range(2))
    >>> cache.append(k, v)          # 64 keys in the first shard, 36 in the second
    >>> q = rng.standard_normal((1, 2, 1, 16), dtype=np.float32)
    >>> out = cache.attention(q)
    >>> bool(np.abs(out - fastattn.attention(q, k, v)).max() < 1e-6)
    True
    >>> client.close(); client.cluster.close()
    """

    def __init__(self, client, batch, kv_heads, head_dim, *, shard_capacity, n_shards,
                 value_dim=None, dtype=np.float32, storage=None):
        self.shard_capacity = positive_int("shard_capacity", shard_capacity)
        n_shards = positive_int("n_shards", n_shards)
        workers = sorted(client.scheduler_info()["workers"])
        if not workers:
            raise ValueError("the client has no workers")
        self.value_dim = head_dim if value_dim is None else value_dim
        self.dtype = np.dtype(dtype)
        self.storage = storage
        from .cache import KVCache
        KVCache(1, 1, 1, 1, dtype=self.dtype, storage=storage)  # its errors, here, at once
        self.workers = [workers[i % len(workers)] for i in range(n_shards)]
        futures = [client.submit(_Shard, batch, kv_heads, self.shard_capacity, head_dim,
                                 self.value_dim, self.dtype, storage, actor=True, workers=[w],
                                 pure=False)
                   for w in self.workers]
        self.shards = [f.result() for f in futures]
        self.lengths = [0] * n_shards

    def __len__(self):
        return sum(self.lengths)

    @property
    def capacity(self):
        return self.shard_capacity * len(self.shards)

    def append(self, k, v):
        """Append tokens (..., L_new, D) to the last shards with room (whole, or nothing:
        a ValueError before any shard changes when they do not fit)."""
        k, v = np.asarray(k), np.asarray(v)
        n_new = k.shape[-2]
        if len(self) + n_new > self.capacity:
            raise ValueError(f"the sharded cache holds {len(self)} of {self.capacity} tokens: "
                             f"{n_new} more do not fit")
        pending, taken = [], 0
        for s, length in enumerate(self.lengths):
            room = self.shard_capacity - length
            if room <= 0 or taken == n_new:
                continue
            part = min(room, n_new - taken)
            pending.append((s, self.shards[s].append(k[..., taken:taken + part, :],
                                                      v[..., taken:taken + part, :])))
            taken += part
        for s, future in pending:
            self.lengths[s] = future.result()

    def attention(self, q, *, causal=True, scale=None, softcap=None, sinks=None,
                  return_lse=False, num_threads=1, precision=None):
        """Attention of q (batch, heads, L_q, D) to every cached token, exactly merged over
        the shards; with ``causal`` the queries are the last L_q cached tokens.
        ``precision`` as in :func:`fastattn.attention` (None: this process's
        :func:`fastattn.set_float32_precision`, sent to the workers): ``"bfloat16"`` lets
        each shard's steps take the products its storage allows (decoding guide)."""
        precision = check_precision(precision) or _plan.float32_precision()
        q = np.asarray(q)
        total = len(self)
        futures, first = [], 0
        for shard, length in zip(self.shards, self.lengths):
            if length and not (causal and first > total - 1):
                futures.append(shard.attend(q, first, total, causal, scale, softcap,
                                            num_threads, precision))
            first += length
        if not futures:
            out = np.zeros(q.shape[:-1] + (self.value_dim,), q.dtype)
            lse = np.full(q.shape[:-1], -np.inf, q.dtype)
        else:
            out, lse = futures[0].result()
            for f in futures[1:]:
                out, lse = api.merge_attention(out, lse, *f.result())
        if sinks is not None:
            sink = check_sinks(sinks, q.shape[:-2], lse.dtype)[..., None]
            out, lse = api.merge_attention(out, lse, np.zeros_like(out),
                                           np.broadcast_to(sink, lse.shape))
        return (out, lse) if return_lse else out

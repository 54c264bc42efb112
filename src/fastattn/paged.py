"""PagedKVCache: one pool of fixed-size blocks of keys and values shared by many
sequences, and attention over a mixed batch of them read in place through their block
tables.

Design: the pool is ``(kv_heads, num_blocks, block_size, D)`` for keys and values alike:
one head's rows inside a block are contiguous, and so are its consecutive blocks, so the
decoding kernel reads them as they lie, in one run across a sequence's neighbouring
blocks. The allocator keeps a sequence's blocks neighbours where it can: a growing
sequence takes the block after its last one when that is free, and a block taken
elsewhere comes from the largest free run, the blocks wanted centred in it (from its start
when the run opens the pool), leaving room to grow on both sides: sequences grown a block
at a time in turn, as decoding grows them, still hold runs of neighbours. A sequence is a
list of block ids and a length; blocks carry reference counts, so ``fork`` shares a
prefix's blocks and the first append that would write into a shared block copies that
block first (copy-on-write). In a batch, every single query (a decoding step) is a group
of the decoding kernel (the query heads of one key/value head) with its own visible keys,
all groups' key chunks the work items of one parallel region (``decode_paged``); the
prefill chunks are a ragged call of the fused kernel whose keys and values lie in pages
(``attention_varlen``'s tables, with page ids). Both are bitwise the same on any thread
count.
"""

import numpy as np

from ._dispatch import kernels as _kernels
from . import _run
from ._run import last_call
from ._validation import (as_array, check_flag, check_scale, check_sinks, check_softcap,
                          check_threads, check_window, dtype_pair, positive_int)
from .cache import (_EIGHT_BIT, _STORAGES, GROUP, _zeros_aligned, checked_dtype_storage,
                    dequantized, narrowed16, products_allowed, quantized, widened16)
from .varlen import _offsets, _tables

__all__ = ["PagedKVCache"]


class PagedKVCache:
    """Keys and values of many sequences in one pool of fixed-size blocks (a paged cache,
    as vLLM's and FlashInfer's), for one attention layer.

    Parameters
    ----------
    num_blocks, block_size, kv_heads, head_dim : int
        The pool holds ``num_blocks`` blocks of ``block_size`` tokens, each token
        ``kv_heads`` keys and values of ``head_dim``; allocated once.
    dtype : float32 or float64, default float32
        The compute and result dtype of :meth:`attention`.
    storage : {None, "bfloat16", "float16", "int8", "float8_e4m3"}, optional
        How keys and values are held, as in :class:`KVCache`: None, in ``dtype``;
        ``"bfloat16"`` or ``"float16"``, in half the bytes of float32 (rounded to nearest
        even as they are appended; NaN and inf refused, and float16 values beyond its
        range); ``"int8"`` or ``"float8_e4m3"``, in a quarter, keys with one scale per
        channel for each group of 32 tokens of a sequence (the group still filling kept
        exactly beside, per sequence, and re-quantized as tokens join it), values one per
        token: ``block_size`` must then be a multiple of 32, so that a block holds whole
        groups. Read in place and widened by the kernel, computing in float32;
        :meth:`keys` and :meth:`values` give float32 copies (dequantized).

    Notes
    -----
    ``new_sequence()`` makes an empty sequence and returns its id; ``append(id, k, v)``
    adds tokens; ``fork(id)`` makes a new sequence sharing every block of ``id`` (a
    common prefix, beam search): the blocks are copied only when one of the two appends
    into a block both hold; ``release(id)`` returns the blocks no sequence holds any more
    to the pool. An append the pool cannot hold raises ``ValueError`` and changes nothing.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> cache = fastattn.PagedKVCache(num_blocks=8, block_size=4, kv_heads=1, head_dim=2)
    >>> a = cache.new_sequence()
    >>> cache.append(a, np.ones((6, 1, 2)), np.arange(12.0).reshape(6, 1, 2))
    >>> b = cache.fork(a)
    >>> cache.free_blocks, cache.length(b)
    (6, 6)
    >>> out = cache.attention(np.zeros((2, 2, 2)), [a, b], [0, 1, 2])
    >>> out[0, 0]                              # equal scores: the mean of the values
    array([5., 6.], dtype=float32)
    """

    def __init__(self, num_blocks, block_size, kv_heads, head_dim, *, dtype=np.float32,
                 storage=None):
        num_blocks = positive_int("num_blocks", num_blocks)
        block_size = positive_int("block_size", block_size)
        kv_heads = positive_int("kv_heads", kv_heads)
        head_dim = positive_int("head_dim", head_dim)
        dtype, storage = checked_dtype_storage(dtype, storage)
        if storage in _EIGHT_BIT and block_size % GROUP:
            raise ValueError(f"storage={storage!r} needs block_size a multiple of {GROUP} (a "
                             f"block holds whole groups of key scales), got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_heads, self.head_dim, self.dtype, self.storage = kv_heads, head_dim, dtype, storage
        store = _STORAGES[storage] or dtype
        shape = (kv_heads, num_blocks, block_size, head_dim)
        # (on cache-line boundaries, as KVCache's: see _zeros_aligned)
        self._k, self._v = _zeros_aligned(shape, store), _zeros_aligned(shape, store)
        self._ks = self._vs = None
        if storage in _EIGHT_BIT:  # the scales, in blocks as the bytes
            self._ks = np.zeros((kv_heads, num_blocks, block_size // GROUP, head_dim),
                                np.float32)
            self._vs = np.zeros((kv_heads, num_blocks, block_size), np.float32)
        self._open = {}  # id -> the exact keys of its group still filling (8-bit storage)
        self._refs = np.zeros(num_blocks, np.int64)
        self._is_free = np.ones(num_blocks, bool)
        self._n_free = num_blocks
        self._seqs = {}  # id -> [block ids, length]
        # id -> its block ids as an array, for attention's block tables: made when first
        # asked, dropped when the sequence's blocks change (every block_size tokens, not
        # every append), so that a call costs a concatenation rather than a pass over
        # every block id of the batch (11 us against 230 us for the 5,200 blocks of
        # bench --varlen's mixed batch, on a Zen 4 core).
        self._tables = {}
        self._next_id = 0

    # ------------------------------------------------------------------ sequences
    def new_sequence(self):
        """A new, empty sequence: its id (an int, never reused)."""
        sid = self._next_id
        self._next_id += 1
        self._seqs[sid] = [[], 0]
        return sid

    def _seq(self, name, sid):
        seq = self._seqs.get(sid) if type(sid) is int else None
        if seq is not None:  # (the common case: a plain int that names a sequence)
            return seq
        if isinstance(sid, (bool, np.bool_)) or not isinstance(sid, (int, np.integer)):
            raise TypeError(f"{name} must be a sequence id (int), got {sid!r}")
        seq = self._seqs.get(int(sid))
        if seq is None:
            raise ValueError(f"{name} {sid!r} is not a sequence of this cache "
                             f"(released, or never made by new_sequence or fork)")
        return seq

    def length(self, seq_id):
        """The number of tokens held for a sequence."""
        return self._seq("seq_id", seq_id)[1]

    def fork(self, seq_id):
        """A new sequence holding the same tokens as ``seq_id``, sharing its blocks until
        either appends into a shared one (copy-on-write). Returns its id."""
        blocks, length = self._seq("seq_id", seq_id)
        sid = self.new_sequence()
        self._seqs[sid] = [list(blocks), length]
        self._refs[blocks] += 1
        if int(seq_id) in self._open:  # (never changed in place: shared as it is)
            self._open[sid] = self._open[int(seq_id)]
        return sid

    def release(self, seq_id):
        """Forget a sequence; its blocks that no other sequence holds return to the pool."""
        blocks, _ = self._seq("seq_id", seq_id)
        del self._seqs[int(seq_id)]
        self._open.pop(int(seq_id), None)
        self._tables.pop(int(seq_id), None)
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._is_free[b] = True
                self._n_free += 1

    @property
    def free_blocks(self):
        """Blocks no sequence holds."""
        return self._n_free

    @property
    def sequences(self):
        """The ids of the sequences held, in the order they were made."""
        return list(self._seqs)

    @property
    def nbytes(self):
        """Bytes of the pool (keys and values, and for 8-bit storage their scales), held
        whatever the sequences use, and the exact keys of the sequences' groups still
        filling."""
        scales = (self._ks.nbytes + self._vs.nbytes) if self._ks is not None else 0
        opened = {id(a): a.nbytes for a in self._open.values()}  # (a fork's shared once)
        return self._k.nbytes + self._v.nbytes + scales + sum(opened.values())

    def __repr__(self):
        storage = "" if self.storage is None else f", storage={self.storage!r}"
        return (f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}"
                f"{storage}; {len(self._seqs)} sequences, {self.free_blocks} blocks free)")

    # ------------------------------------------------------------------ append
    def _stored(self, name, a):
        """a (L, kv_heads, head_dim), validated, as the pool holds it."""
        a = as_array(name, a)
        dtype_pair(name, a.dtype)  # the API's dtype rule: TypeError naming the dtype
        if a.ndim != 3 or a.shape[1:] != (self.kv_heads, self.head_dim):
            raise ValueError(f"{name} must have shape (n_new, kv_heads, head_dim) = (n_new, "
                             f"{self.kv_heads}, {self.head_dim}), got {name}.shape={a.shape}")
        if self.storage is None:
            return np.asarray(a, self.dtype)
        if self.storage in _EIGHT_BIT:  # (quantized by append, with the open group)
            return np.asarray(a, np.float32)
        return narrowed16(name, a, self.storage).view(self._k.dtype)

    def _take(self, after, count):
        """count free blocks for a sequence whose last block is `after` (None: it has
        none), marked taken, in order: each the block right after the one before when that
        is free, so that the sequence's blocks stay neighbours (the kernel reads
        neighbours as one run); else from the largest run of free blocks, the blocks still
        wanted centred in it (from its start when the run opens the pool), leaving room to
        grow to whoever holds the block before it and to this sequence."""
        taken = []
        for _ in range(count):
            last = taken[-1] if taken else after
            if last is not None and last + 1 < self.num_blocks and self._is_free[last + 1]:
                b = last + 1
            else:
                edges = np.diff(np.concatenate([[0], self._is_free.view(np.int8), [0]]))
                starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
                longest = int(np.argmax(stops - starts))  # the first of the longest
                start, length = int(starts[longest]), int(stops[longest] - starts[longest])
                b = start if start == 0 else start + max(0, length - (count - len(taken))) // 2
            self._is_free[b] = False
            self._n_free -= 1
            taken.append(b)
        return taken

    def append(self, seq_id, k, v):
        """Append ``n_new`` tokens to a sequence: ``k`` and ``v`` of shape (n_new,
        kv_heads, head_dim). All or nothing: invalid input, or a pool without the blocks
        the tokens need, raises and changes nothing."""
        seq = self._seq("seq_id", seq_id)
        k = self._stored("k", k)
        v = self._stored("v", v)
        n = k.shape[0]
        if v.shape[0] != n:
            raise ValueError(f"k and v must bring the same number of tokens, got k.shape={k.shape} "
                             f"and v.shape={v.shape}")
        if n == 0:
            return
        blocks, length = seq
        bs = self.block_size
        # What to write: (pool, first row of the sequence, rows (kv_heads, count, ...),
        # rows per block), checked before anything changes.
        if self.storage in _EIGHT_BIT:
            # The group still filling is quantized again from its exact keys with the new
            # ones (its rows and scales rewritten), as KVCache does.
            filled = length % GROUP
            exact = np.concatenate([self._open[int(seq_id)], k]) if filled else k
            kq, ks = quantized("k", exact.transpose(1, 0, 2)[None], GROUP, self.storage)
            vq, vs = quantized("v", v.transpose(1, 0, 2)[None], 0, self.storage)
            left = (length + n) % GROUP
            open_after = exact[n + filled - left:].copy() if left else None
            writes = [("_k", length - filled, kq[0], bs),
                      ("_ks", (length - filled) // GROUP, ks[0], bs // GROUP),
                      ("_v", length, vq[0], bs), ("_vs", length, vs[0], bs)]
        else:
            filled = 0
            writes = [("_k", length, k.transpose(1, 0, 2), bs),
                      ("_v", length, v.transpose(1, 0, 2), bs)]
        # A partly filled last block that another sequence holds too is copied first.
        shared_tail = length % bs != 0 and self._refs[blocks[-1]] > 1
        need = -(-(length + n) // bs) - len(blocks) + shared_tail
        if need > self._n_free:
            raise ValueError(f"the pool is full: appending {n} tokens to sequence {seq_id} "
                             f"needs {need} free blocks of {bs} tokens, {self._n_free} "
                             f"are free (release sequences, or make a larger pool)")
        # What a rollback restores (the free map is a byte per block: cheap to keep).
        n_blocks, free_before = len(blocks), self._is_free.copy()
        tail = blocks[-1] if blocks else None
        tail_refs = self._refs[tail] if blocks else 0
        pools = ("_k", "_v") if self._ks is None else ("_k", "_v", "_ks", "_vs")
        # The rows below the length that the writes change (an 8-bit group still
        # filling, in a tail of its own: its keys and their scales), kept to put back.
        kept = []
        if filled and not shared_tail:
            r0 = (length - filled) % bs
            kept = [("_k", r0, self._k[:, tail, r0:r0 + filled].copy()),
                    ("_ks", r0 // GROUP, self._ks[:, tail, r0 // GROUP:r0 // GROUP + 1].copy())]
        if need:  # the blocks change (a copied tail, fresh blocks)
            self._tables.pop(int(seq_id), None)
        try:
            if shared_tail:
                copy, = self._take(blocks[-2] if len(blocks) > 1 else None, 1)
                for name in pools:
                    pool = getattr(self, name)
                    pool[:, copy] = pool[:, tail]
                self._refs[tail] -= 1
                self._refs[copy] = 1
                blocks[-1] = copy
            fresh = self._take(blocks[-1] if blocks else None, need - shared_tail)
            self._refs[fresh] = 1
            blocks.extend(fresh)
            for name, at, rows, per in writes:
                self._write_rows(getattr(self, name), blocks, at, rows, per)
        except BaseException:
            # Interrupted (Ctrl-C) midway: the blocks taken go back, the shared tail is
            # shared again, rewritten rows below the length are put back; rows written
            # past the length are never read.
            for name, row, old in kept:
                getattr(self, name)[:, tail, row:row + old.shape[1]] = old
            del blocks[n_blocks:]
            if shared_tail:
                blocks[-1] = tail
                self._refs[tail] = tail_refs
            taken = np.flatnonzero(free_before & ~self._is_free)
            self._refs[taken] = 0
            self._is_free[taken] = True
            self._n_free = int(self._is_free.sum())
            raise
        seq[1] = length + n
        if self._ks is not None:
            if open_after is None:
                self._open.pop(int(seq_id), None)
            else:
                self._open[int(seq_id)] = open_after

    @staticmethod
    def _write_rows(pool, blocks, at, rows, per):
        """rows (kv_heads, count, ...) written as rows [at, at + count) of a sequence whose
        blocks are `blocks`, in pool (kv_heads, num_blocks, per, ...)."""
        done, count = 0, rows.shape[1]
        while done < count:
            b, row = blocks[(at + done) // per], (at + done) % per
            take = min(per - row, count - done)
            pool[:, b, row:row + take] = rows[:, done:done + take]
            done += take

    # ------------------------------------------------------------------ reading
    def _gathered(self, which, seq_id):
        blocks, length = self._seq("seq_id", seq_id)
        h, d = self.kv_heads, self.head_dim
        pool = self._k if which == "k" else self._v
        rows = pool[:, blocks].transpose(1, 2, 0, 3).reshape(-1, h, d)[:length]
        if self.storage is None:
            return rows.copy()
        if self.storage not in _EIGHT_BIT:
            return widened16(rows, self.storage)
        if which == "k":  # a scale per channel for each group of rows
            scale = np.repeat(self._ks[:, blocks], GROUP, axis=2)
            scale = scale.transpose(1, 2, 0, 3).reshape(-1, h, d)[:length]
        else:  # a scale per row
            scale = self._vs[:, blocks].transpose(1, 2, 0).reshape(-1, h, 1)[:length]
        return dequantized(rows, scale, self.storage)

    def keys(self, seq_id):
        """A copy of a sequence's keys, (length, kv_heads, head_dim), as the pool holds
        them (widened to float32 for 16-bit storage, dequantized for 8-bit)."""
        return self._gathered("k", seq_id)

    def values(self, seq_id):
        """A copy of a sequence's values, as :meth:`keys`."""
        return self._gathered("v", seq_id)

    # ------------------------------------------------------------------ attention
    def attention(self, q, seq_ids, cu_seqlens_q, *, causal=True, window=None, scale=None,
                  softcap=None, sinks=None, return_lse=False, num_threads=None,
                  precision=None):
        """Attention of a batch of sequences to what the cache holds for each, in one call.

        Parameters
        ----------
        q : array_like, shape (total_q, H, D)
            The queries of every sequence, packed: ``q[cu_seqlens_q[i]:cu_seqlens_q[i +
            1]]`` are sequence ``seq_ids[i]``'s. ``kv_heads`` must divide ``H``.
        seq_ids : sequence of int
            The sequences, ``n`` of them (one may appear more than once).
        cu_seqlens_q : array_like of int, shape (n + 1,)
            Offsets of each sequence's queries, as in :func:`fastattn.attention_varlen`.
            One query per sequence is a decoding step; more are a prefill chunk (append
            its keys and values first).
        causal : bool, default True
            Each sequence's queries are its last positions (bottom-right): query ``r`` of
            ``L_q`` sees the sequence's keys ``j <= r + length - L_q``. False: every query
            sees every key.
        window, scale, softcap, sinks, return_lse, num_threads
            As in :func:`fastattn.attention_varlen`.
        precision : {"highest", "bfloat16"}, optional
            As in :func:`fastattn.attention` (default: :func:`fastattn.set_float32_precision`'s,
            "highest"): ``"bfloat16"`` lets the decoding kernel take products below float32
            on a pool with ``storage=`` (any but None) where the CPU has them, as
            :class:`fastattn.KVCache` steps do (the decoding guide: which products, their
            error, where they run); otherwise it changes nothing.

        Returns
        -------
        out : ndarray, shape (total_q, H, D), in the cache's dtype
        lse : ndarray, shape (total_q, H), if ``return_lse``

        Notes
        -----
        q is converted to the cache's dtype (float32 with ``storage=``). Single queries
        run in the decoding kernel, which reads the blocks in place through the block
        tables (a sequence's blocks that follow one another in the pool as one run), its
        keys split in chunks of the same size for every sequence, the chunks of all rows
        the work items of one parallel region. Prefill chunks run in the fused kernel,
        which takes their keys and values from the blocks as it packs them (bitwise
        :func:`fastattn.attention_varlen` on the same keys); with ``storage=`` they run
        in the decoding kernel too, reading their keys once per query (8-bit: the key
        scales of each group folded into the query, the value scales into the weights).
        """
        q = as_array("q", q)
        dtype_pair("q", q.dtype)  # (converted to the compute dtype below)
        if q.ndim != 3 or q.shape[2] != self.head_dim:
            raise ValueError(f"q must be packed as (total_q, H, head_dim={self.head_dim}), "
                             f"got q.shape={q.shape}")
        total_q, heads, d = q.shape
        if heads % self.kv_heads:
            raise ValueError(f"the cache's kv_heads ({self.kv_heads}) must divide the query "
                             f"heads ({heads}), got q.shape={q.shape}")
        if isinstance(seq_ids, (int, np.integer)) or not hasattr(seq_ids, "__len__"):
            raise TypeError(f"seq_ids must be a sequence of ids, got {seq_ids!r}")
        seqs = [self._seq("seq_ids entry", s) for s in seq_ids]
        cu = _offsets("cu_seqlens_q", cu_seqlens_q, total_q, len(seqs))
        causal = check_flag("causal", causal)
        window = check_window(window, causal)
        scale = check_scale(scale, d)
        softcap = check_softcap(softcap)
        compute = np.dtype(np.float32) if self.storage else self.dtype
        sinks = check_sinks(sinks, (heads,), compute)
        return_lse = check_flag("return_lse", return_lse)
        n_threads = check_threads(num_threads)
        products = products_allowed(self.storage, precision)

        # The block tables of the batch's sequences, one after another.
        tables = [self._table(int(s)) for s in seq_ids]
        counts = np.array([t.size for t in tables], np.intp)
        offsets = np.cumsum(counts) - counts  # where each sequence's block ids start
        table = np.concatenate(tables) if tables else np.empty(0, np.intp)
        n_q = np.diff(cu)
        lengths = np.array([length for _, length in seqs], np.intp)
        q = np.ascontiguousarray(q, compute)
        out = np.empty((total_q, heads, d), compute)
        lse = np.empty((total_q, heads), compute)
        # Prefill chunks (several queries) in the fused kernel, which gathers their keys
        # from the pages as it packs them; single queries (and every query of a pool with
        # storage=, which the fused kernel does not read) in the decoding kernel, which
        # reads the pages in place.
        fused = (n_q > 1) & (self.storage is None)
        if fused.any():
            self._prefill(q, out, lse, np.where(fused, n_q, 0), lengths, cu, offsets, table,
                          causal, window, scale, softcap, sinks, n_threads)
            rows = np.flatnonzero(np.repeat(~fused, n_q))
        else:
            rows = np.arange(total_q)
        if rows.size:
            self._decode(q, out, lse, rows, n_q, lengths, cu, offsets, table, causal, window,
                         scale, softcap, sinks, n_threads, products)
        return (out, lse) if return_lse else out

    def _table(self, sid):
        """Sequence sid's block ids as an array (see _tables)."""
        table = self._tables.get(sid)
        if table is None:
            table = self._tables[sid] = np.array(self._seqs[sid][0], np.intp)
        return table

    def _prefill(self, q, out, lse, n_q, lengths, cu, offsets, table, causal, window, scale,
                 softcap, sinks, n_threads):
        """The sequences with n_q > 0 queries, in the fused kernel on the pools (a ragged
        call whose keys and values lie in pages)."""
        heads, group = q.shape[1], q.shape[1] // self.kv_heads
        shape = (self.kv_heads * self.num_blocks, self.block_size, self.head_dim)
        tables = _tables(n_q, np.where(n_q > 0, lengths, 0), cu[:-1] * heads,
                         np.zeros(len(n_q), np.intp), self.num_blocks * self.block_size,
                         offsets, heads, group, causal, window, q.dtype.itemsize)
        _run.run_varlen(None, q, self._k.reshape(shape), self._v.reshape(shape), q.dtype, out,
                        lse, tables, causal, window, scale, softcap, sinks, n_threads,
                        pages=(table, self.block_size))

    def _decode(self, q, out, lse, rows, n_q, lengths, cu, offsets, table, causal, window,
                scale, softcap, sinks, n_threads, products):
        """The query rows `rows` in the decoding kernel: one group per (row, kv head), its
        visible keys [first, first + count) of its sequence's pages (products: below
        float32 allowed)."""
        heads, d = q.shape[1], q.shape[2]
        group = heads // self.kv_heads
        if rows.size == q.shape[0] == len(n_q) and (n_q == 1).all():
            # One query per sequence (a batch of decoding steps): row i is sequence i's
            # newest position, which sees all of it. (The general arithmetic below costs
            # some 20 us of NumPy calls on small arrays, a third of a small call.)
            seq_offsets, end = offsets, lengths
        else:
            seq_of_row = np.repeat(np.arange(len(n_q)), n_q)[rows]
            row_in_seq = rows - cu[seq_of_row]
            n_k = lengths[seq_of_row]
            end = np.clip(n_k - n_q[seq_of_row] + row_in_seq + 1, 0, n_k) if causal else n_k
            seq_offsets = offsets[seq_of_row]
        first = np.maximum(end - window, 0)[:, None] if window else 0
        groups = np.empty((rows.size, self.kv_heads, 4), np.intp)
        groups[:, :, 0] = np.arange(self.kv_heads)
        groups[:, :, 1] = first
        groups[:, :, 2] = end[:, None] - first
        groups[:, :, 3] = seq_offsets[:, None]
        every = rows.size == q.shape[0]  # every row, in order
        q3 = (q if every else q[rows]).reshape(-1, group, d)
        # (Every row: the kernel writes out and lse themselves, no copies.)
        out3 = (out.reshape(-1, group, d) if every
                else np.empty((rows.size * self.kv_heads, group, d), q.dtype))
        lse2 = (lse.reshape(-1, group) if every
                else np.empty((rows.size * self.kv_heads, group), q.dtype))
        sink_rows = None if sinks is None else np.ascontiguousarray(
            np.broadcast_to(sinks.reshape(self.kv_heads, group),
                            (rows.size, self.kv_heads, group)).reshape(-1, group))
        team = _kernels.decode_paged(q3, self._k, self._v, groups.reshape(-1, 4), table, scale,
                                     softcap, sink_rows, out3, lse2, n_threads, self._ks,
                                     self._vs, products)
        if team < 0:
            raise MemoryError("attention: cannot allocate the decoding scratch")
        last_call.threads = team
        if not every:
            out[rows] = out3.reshape(rows.size, heads, d)
            lse[rows] = lse2.reshape(rows.size, heads)

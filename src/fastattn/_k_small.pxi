# The small-call path: a call checked and run without the Python planning.
# Part of _kernels_impl.pxi (see there).

# --------------------------------------------------------------------------- small calls

cdef void _tiles(Py_ssize_t n_batch, Py_ssize_t n_queries, Py_ssize_t n_keys, bint causal,
                 Py_ssize_t itemsize, Py_ssize_t q_block_max, Py_ssize_t k_block_max,
                 Py_ssize_t min_q_block, Py_ssize_t min_work_items,
                 Py_ssize_t *q_block_out, Py_ssize_t *k_block_out) noexcept nogil:
    """The tile rule of fastattn._plan.tiles (which calls tiles() below: one rule)."""
    # Causal rows see a triangle: smaller query blocks skip more and balance better.
    cdef Py_ssize_t q_block = max(1, q_block_max // 2) if causal else q_block_max
    while q_block > min_q_block and n_batch * ((n_queries + q_block - 1) // q_block) < min_work_items:
        q_block = q_block // 2
    # A float64 tile of 256 x 512 would not fit the L2 cache beside its operands.
    cdef Py_ssize_t k_block = k_block_max if itemsize == 4 else max(1, k_block_max // 2)
    q_block_out[0] = min(q_block, n_queries)
    k_block_out[0] = min(k_block, n_keys)


def tiles(Py_ssize_t n_batch, Py_ssize_t n_queries, Py_ssize_t n_keys, bint causal,
          Py_ssize_t itemsize, Py_ssize_t q_block_max, Py_ssize_t k_block_max,
          Py_ssize_t min_q_block, Py_ssize_t min_work_items):
    """(query rows, keys) per tile; see fastattn._plan.tiles."""
    cdef Py_ssize_t q_block, k_block
    _tiles(n_batch, n_queries, n_keys, causal, itemsize, q_block_max, k_block_max,
           min_q_block, min_work_items, &q_block, &k_block)
    return q_block, k_block

cdef object _small_shape(object q, object k, object v):
    """(n_batch, L_q, L_k, D, D_v, G) when q, k, v are what the small-call path takes, else
    None: NumPy arrays (not subclasses) of one native float32 or float64 dtype,
    C-contiguous, with the same batch dimensions (no broadcasting) but for grouped-query
    heads: the head axis (-3) of k and v may divide q's, G query heads per key/value head
    (G = 1 otherwise); and no empty axis."""
    cdef object dtype = getattr(q, "dtype", None)
    cdef tuple q_shape, k_shape, v_shape
    cdef Py_ssize_t ndim, i, n_batch = 1, group = 1
    if type(q) is not _ndarray or type(k) is not _ndarray or type(v) is not _ndarray:
        return None
    if (dtype is not _float32 and dtype is not _float64) or k.dtype is not dtype or v.dtype is not dtype:
        return None
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    ndim = len(q_shape)
    if ndim < 2 or len(k_shape) != ndim or len(v_shape) != ndim:
        return None
    for i in range(ndim - 2):
        if q_shape[i] != k_shape[i] or q_shape[i] != v_shape[i]:
            if (i != ndim - 3 or k_shape[i] != v_shape[i] or k_shape[i] < 1
                    or q_shape[i] % k_shape[i] != 0):
                return None
            group = q_shape[i] // k_shape[i]
        n_batch *= <Py_ssize_t> q_shape[i]
    n_queries, n_keys = q_shape[ndim - 2], k_shape[ndim - 2]
    d_head, d_v = q_shape[ndim - 1], v_shape[ndim - 1]
    if (k_shape[ndim - 1] != d_head or v_shape[ndim - 2] != n_keys or n_batch < 1
            or n_queries < 1 or n_keys < 1 or d_head < 1 or d_v < 1):
        return None
    return n_batch, n_queries, n_keys, d_head, d_v, group


def small_attention(object q, object k, object v, bint causal, Py_ssize_t window, object scale,
                    double softcap, object sinks, tuple policy, int n_threads):
    """(attention(q, k, v, causal=causal, window=window or None, scale=scale,
    softcap=softcap or None, sinks=sinks) with every other argument at its default, the
    threads that ran), or None when the call is not a small one
    (fastattn._run.small_attention says which). scale: None (1 / sqrt(D)) or a finite
    float, as the general path's check_scale returns it. For one query per batch entry
    only: window 0 (none) or >= 1 with causal (its last `window` keys, as
    fastattn._plan.window_as_keys); softcap 0 (none) or finite > 0; sinks None or what
    _small_sinks takes.

    One query per batch entry runs the decoding kernel, of any size, on up to n_threads
    threads, grouped-query heads too; more queries (not grouped) run the fused kernel on
    one thread, below SERIAL_FLOPS.
    policy: (Q_BLOCK, K_BLOCK, MIN_Q_BLOCK, MIN_WORK_ITEMS, SERIAL_FLOPS, BLAS_SERIAL_MNK,
    micro-kernel lanes for float32, for float64 (0: BLAS), DECODE_CHUNK) from
    fastattn._plan and _run, so that the kernel, its tiles, the thread count and the
    micro-kernel choice are the general path's and the result is bitwise the same. Never
    raises but MemoryError.
    """
    cdef object shape = _small_shape(q, k, v)
    cdef Py_ssize_t n_batch, n_queries, n_keys, d_head, d_v, group, q_block, k_block, lanes, b
    cdef Py_ssize_t itemsize
    cdef double c_scale
    cdef bint micro
    cdef Py_buffer qb, kb, vb, ob
    cdef Py_ssize_t *index
    cdef void *lse
    cdef int team
    cdef object out
    cdef tuple q_shape
    if shape is None:
        return None
    n_batch, n_queries, n_keys, d_head, d_v, group = shape
    c_scale = 1.0 / sqrt(<double> d_head) if scale is None else <double> scale
    if n_queries == 1:
        return _small_decode(q, k, v, n_batch // group, group, n_keys,
                             n_keys - window if 0 < window < n_keys else 0, d_head, d_v,
                             c_scale, softcap, sinks, policy, n_threads)
    if group != 1 or window != 0 or softcap != 0 or sinks is not None:
        return None
    if 2.0 * n_batch * n_queries * n_keys * (d_head + d_v) >= <double> policy[4]:
        return None
    itemsize = 4 if q.dtype is _float32 else 8
    _tiles(n_batch, n_queries, n_keys, causal, itemsize, policy[0], policy[1], policy[2],
           policy[3], &q_block, &k_block)
    lanes = policy[6] if itemsize == 4 else policy[7]
    micro = FA_MICROKERNELS != 0 and lanes > 0 and d_head % lanes == 0 and d_v % lanes == 0
    if not micro and q_block * k_block * max(d_head, d_v) > <Py_ssize_t> policy[5]:
        return None  # a BLAS tile the general path would hold to one thread
    # C-contiguity, checked by the buffer request itself: a strided array falls back.
    if not _c_buffers(q, k, v, &qb, &kb, &vb):
        return None
    try:
        q_shape = q.shape
        out = _np.empty(q_shape[:len(q_shape) - 1] + (d_v,), q.dtype)
        PyObject_GetBuffer(out, &ob, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
        index = <Py_ssize_t*> malloc(3 * n_batch * sizeof(Py_ssize_t))
        lse = malloc(n_batch * n_queries * itemsize)
        if index == NULL or lse == NULL:
            free(index)
            free(lse)
            PyBuffer_Release(&ob)
            raise MemoryError("attention: cannot allocate the per-thread scratch")
        # The general path's index maps for this layout: q and k/v entry b, mask entry 0.
        for b in range(n_batch):
            index[b] = b
            index[n_batch + b] = b
            index[2 * n_batch + b] = 0
        with nogil:
            if itemsize == 4:
                team = _attention_run(<const float*> qb.buf, <const float*> kb.buf,
                                      <const float*> vb.buf, NULL, NULL, MASK_NONE, index,
                                      n_batch, n_queries, n_keys, d_head, d_v, causal, 0,
                                      c_scale, 0, NULL, <float*> ob.buf,
                                      <float*> lse, q_block, k_block, micro, 1, 0, -1, NULL)
            else:
                team = _attention_run(<const double*> qb.buf, <const double*> kb.buf,
                                      <const double*> vb.buf, NULL, NULL, MASK_NONE, index,
                                      n_batch, n_queries, n_keys, d_head, d_v, causal, 0,
                                      c_scale, 0, NULL, <double*> ob.buf,
                                      <double*> lse, q_block, k_block, micro, 1, 0, -1, NULL)
        free(index)
        free(lse)
        PyBuffer_Release(&ob)
        if team < 0:
            raise MemoryError("attention: cannot allocate the per-thread scratch")
        return out, team
    finally:
        PyBuffer_Release(&qb)
        PyBuffer_Release(&kb)
        PyBuffer_Release(&vb)


cdef void *_small_sinks(object sinks, object q, Py_ssize_t n_batch):
    """The sinks of a small decoding call, one per batch entry (malloc'd, the caller frees
    it), or NULL when the general path must take them: an ndarray (not a subclass) of q's
    dtype, one value per query head, shape (H,) for q (..., H, 1, D), each finite or -inf
    (check_sinks's rule: anything else is its error to raise)."""
    cdef Py_buffer sb
    cdef Py_ssize_t i, n_heads, item = 4 if q.dtype is _float32 else 8
    cdef double x
    cdef void *tiled
    cdef tuple q_shape = q.shape
    if (type(sinks) is not _ndarray or sinks.dtype is not q.dtype or sinks.ndim != 1
            or len(q_shape) < 3 or sinks.shape[0] != q_shape[len(q_shape) - 3]):
        return NULL
    n_heads = sinks.shape[0]
    if n_heads < 1 or not _c_buffer(sinks, &sb):
        return NULL
    tiled = malloc(n_batch * item)
    if tiled != NULL:
        for i in range(n_batch):  # entry i of the flattened batch is head i % H
            x = (<float*> sb.buf)[i % n_heads] if item == 4 else (<double*> sb.buf)[i % n_heads]
            if x != x or x == INFINITY:
                free(tiled)
                tiled = NULL
                break
            if item == 4:
                (<float*> tiled)[i] = <float> x
            else:
                (<double*> tiled)[i] = x
    PyBuffer_Release(&sb)
    return tiled  # NULL too if malloc failed: the general path then allocates (or raises)


cdef object _small_decode(object q, object k, object v, Py_ssize_t n_groups, Py_ssize_t group,
                          Py_ssize_t n_keys, Py_ssize_t start, Py_ssize_t d_head,
                          Py_ssize_t d_v, double scale, double softcap, object sinks,
                          tuple policy, int n_threads):
    """small_attention for one query per batch entry: kv entry g for the `group` query
    heads of group g, its keys start to n_keys, in C-contiguous arrays (None when one is
    not, or the sinks are not what _small_sinks takes)."""
    cdef Py_buffer qb, kb, vb
    cdef Py_ssize_t item = 4 if q.dtype is _float32 else 8
    cdef void *sink_buf = NULL
    if sinks is not None:
        sink_buf = _small_sinks(sinks, q, n_groups * group)
        if sink_buf == NULL:
            return None
    if not _c_buffers(q, k, v, &qb, &kb, &vb):
        free(sink_buf)
        return None
    try:
        return _decode_call(q, qb.buf, <char*> kb.buf + start * d_head * item,
                            <char*> vb.buf + start * d_v * item, n_keys * d_head,
                            n_keys * d_v, n_groups, group, n_keys - start, d_head, d_v, scale,
                            softcap, sink_buf, policy[4], policy[8], n_threads)
    finally:
        free(sink_buf)
        PyBuffer_Release(&qb)
        PyBuffer_Release(&kb)
        PyBuffer_Release(&vb)


cdef tuple _decode_call(object q, const void *q_buf, const void *k_buf, const void *v_buf,
                        Py_ssize_t k_item, Py_ssize_t v_item, Py_ssize_t n_groups,
                        Py_ssize_t group, Py_ssize_t n_keys, Py_ssize_t d_head, Py_ssize_t d_v,
                        double scale, double softcap, const void *sinks, double serial_flops,
                        Py_ssize_t chunk, int n_threads):
    """(out, threads that ran): the general path's decoding call (fastattn._run.run_decode)
    with this scale, soft cap (0: none) and sinks (NULL: none; else one per query row, in
    q's dtype), for the single queries of q (its
    buffer q_buf, C-contiguous: n_groups groups of `group` query heads) against kv entry
    g (k_item, v_item elements apart in k_buf, v_buf; rows contiguous) for group g. Its
    thread rule (one below serial_flops, else at most one per work item of `chunk` keys:
    fastattn._plan's SERIAL_FLOPS and DECODE_CHUNK) and chunks, so that the result is
    bitwise the general path's."""
    cdef Py_ssize_t g
    cdef Py_ssize_t n_work = n_groups * ((n_keys + chunk - 1) // chunk)
    cdef int team = 1
    cdef Py_buffer ob
    cdef Py_ssize_t *index
    cdef void *lse
    cdef tuple q_shape = q.shape
    cdef bint single = q.dtype is _float32
    cdef object out = _np.empty(q_shape[:len(q_shape) - 1] + (d_v,), q.dtype)
    if 2.0 * n_groups * group * n_keys * (d_head + d_v) >= serial_flops:
        team = <int> min(<Py_ssize_t> n_threads, n_work)
    PyObject_GetBuffer(out, &ob, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
    index = <Py_ssize_t*> malloc(n_groups * sizeof(Py_ssize_t))
    lse = malloc(n_groups * group * (4 if single else 8))
    if index == NULL or lse == NULL:
        free(index)
        free(lse)
        PyBuffer_Release(&ob)
        raise MemoryError("attention: cannot allocate the decoding scratch")
    for g in range(n_groups):
        index[g] = g
    with nogil:
        if single:
            team = _decode_run(<const float*> q_buf, k_buf, v_buf, False, k_item, v_item,
                               index, n_groups, group, d_head, n_keys, d_v,
                               scale, softcap, <const float*> sinks,
                               <float*> ob.buf, <float*> lse, chunk, team)
        else:
            team = _decode_run(<const double*> q_buf, k_buf, v_buf, False, k_item, v_item,
                               index, n_groups, group, d_head, n_keys, d_v,
                               scale, softcap, <const double*> sinks,
                               <double*> ob.buf, <double*> lse, chunk, team)
    free(index)
    free(lse)
    PyBuffer_Release(&ob)
    if team < 0:
        raise MemoryError("attention: cannot allocate the decoding scratch")
    return out, team


def cache_decode(object q, object k_store, object v_store, Py_ssize_t start, Py_ssize_t n_keys,
                 double serial_flops, Py_ssize_t chunk, int n_threads):
    """(attention(q, cache=c), threads that ran) with every other argument at its
    default, read from the cache's storage arrays (B, H_kv, rows, D or D_v), rows start
    to start + n_keys; or None: q must be a C-contiguous ndarray (B, H, 1, D) in the
    storage's dtype (float32 or float64), with H a multiple of H_kv (fastattn.cache.
    decode_step checked the shapes). Reading the storage, not a view of it, spares NumPy
    building the buffer description of a new view at every step. The general path's
    decoding call, bitwise (see _decode_call)."""
    cdef Py_buffer qb, kb, vb
    cdef tuple q_shape, k_shape, v_shape
    cdef Py_ssize_t rows, item
    cdef object dtype = getattr(q, "dtype", None)
    if (type(q) is not _ndarray or (dtype is not _float32 and dtype is not _float64)
            or k_store.dtype is not dtype or v_store.dtype is not dtype):
        return None
    q_shape, k_shape, v_shape = q.shape, k_store.shape, v_store.shape
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4 or q_shape[2] != 1:
        return None
    rows = k_shape[2]
    if (v_shape[2] != rows or n_keys < 1 or start < 0 or start + n_keys > rows
            or k_shape[0] * k_shape[1] < 1):
        return None
    if not _c_buffers(q, k_store, v_store, &qb, &kb, &vb):
        return None
    item = 4 if dtype is _float32 else 8
    try:
        return _decode_call(q, qb.buf, <char*> kb.buf + start * kb.shape[3] * item,
                            <char*> vb.buf + start * vb.shape[3] * item,
                            rows * kb.shape[3], rows * vb.shape[3], kb.shape[0] * kb.shape[1],
                            q_shape[1] // kb.shape[1], n_keys, kb.shape[3], vb.shape[3],
                            1.0 / sqrt(<double> kb.shape[3]), 0, NULL, serial_flops, chunk,
                            n_threads)
    finally:
        PyBuffer_Release(&qb)
        PyBuffer_Release(&kb)
        PyBuffer_Release(&vb)

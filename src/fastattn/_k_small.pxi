# The small-call path: a call checked and run without the Python planning.
# Part of _kernels_impl.pxi (see there).

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
            if i != ndim - 3 or k_shape[i] != v_shape[i]:
                return None
            group = _gqa_group(q_shape[i], k_shape[i])
            if group < 2:
                return None  # q broadcast over the kv heads, or heads that do not fit
        n_batch *= <Py_ssize_t> q_shape[i]
    n_queries, n_keys = q_shape[ndim - 2], k_shape[ndim - 2]
    d_head, d_v = q_shape[ndim - 1], v_shape[ndim - 1]
    if (k_shape[ndim - 1] != d_head or v_shape[ndim - 2] != n_keys or n_batch < 1
            or n_queries < 1 or n_keys < 1 or d_head < 1 or d_v < 1):
        return None
    return n_batch, n_queries, n_keys, d_head, d_v, group


def small_attention(object q, object k, object v, bint causal, Py_ssize_t window, object scale,
                    double softcap, object sinks, int n_threads):
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
    one thread, below the policy's serial_flops. The kernel, its tiles, the thread count
    and the micro-kernel choice come from the rules the general path calls too
    (_k_policy.pxi), so the result is bitwise the same. Never raises but MemoryError.
    """
    cdef object shape = _small_shape(q, k, v)
    cdef Py_ssize_t n_batch, n_queries, n_keys, d_head, d_v, group, q_block, k_block, b
    cdef Py_ssize_t itemsize
    cdef double c_scale
    cdef bint micro
    cdef Py_buffer qb, kb, vb, ob
    cdef Py_ssize_t *index
    cdef void *lse
    cdef int team
    cdef object out
    cdef tuple q_shape
    cdef Call c
    if shape is None:
        return None
    n_batch, n_queries, n_keys, d_head, d_v, group = shape
    c_scale = _default_scale(d_head) if scale is None else <double> scale
    if n_queries == 1:
        return _small_decode(q, k, v, n_batch // group, group, n_keys,
                             _window_first_key(n_keys, window), d_head, d_v, c_scale, softcap,
                             sinks, n_threads)
    if group != 1 or window != 0 or softcap != 0 or sinks is not None:
        return None
    if 2.0 * n_batch * n_queries * n_keys * (d_head + d_v) >= _policy.serial_flops:
        return None  # the general path's: on a team, in pieces
    itemsize = 4 if q.dtype is _float32 else 8
    _tiles(n_batch, n_queries, n_keys, causal, itemsize, &q_block, &k_block)
    micro = _use_micro(itemsize, d_head, d_v)
    if not micro and _blas_would_thread(q_block, k_block, max(d_head, d_v)):
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
        memset(&c, 0, sizeof(Call))
        _call_sizes(&c, n_batch, n_queries, n_keys, d_head, d_v, q_block, k_block)
        c.q, c.k, c.v, c.index, c.out, c.lse = qb.buf, kb.buf, vb.buf, index, ob.buf, lse
        c.mask_kind, c.causal, c.scale, c.micro = MASK_NONE, causal, c_scale, micro
        c.src_item = itemsize
        if itemsize == 4:
            _call_blocks(&c, <float*> NULL)
        else:
            _call_blocks(&c, <double*> NULL)
        with nogil:
            if itemsize == 4:
                team = _attention_run(&c, <float*> NULL, 1, 0, -1)
            else:
                team = _attention_run(&c, <double*> NULL, 1, 0, -1)
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
            if not _sink_ok(x):
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
                          int n_threads):
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
                            softcap, sink_buf, n_threads)
    finally:
        free(sink_buf)
        PyBuffer_Release(&qb)
        PyBuffer_Release(&kb)
        PyBuffer_Release(&vb)

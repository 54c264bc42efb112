# The decoding kernel: single queries against many keys, split over key chunks.
# Part of _kernels_impl.pxi (see there).
#
# One runner, _decode_run, picks the chunks and the team (the policy's rules) and runs the
# C kernel of fa_decode.h; its entries are decode() (fastattn._run's general path) and
# _decode_call (the small-call path and a cache's plain step), so every route computes
# bitwise the same result.

cdef struct KvScales:
    # The scales of an 8-bit kv source (fa_quant.h), NULL for other kinds: ks holds, for
    # each kv head (ks_item floats apart), one row of d per group of FA_KV_GROUP keys, key
    # 0 being key `phase` of the first group; vs one per key (vs_item floats apart).
    const float *ks
    const float *vs
    Py_ssize_t ks_item, vs_item, phase


cdef inline size_t _kind_size(int kv_kind, size_t floating_size) noexcept nogil:
    """Bytes per stored element of a kv source of kv_kind (0: floating itself)."""
    if (kv_kind == FA_SRC_I8 or kv_kind == FA_SRC_F8 or kv_kind == FA_SRC_I8_DP
            or kv_kind == FA_SRC_F8_DP):
        return 1
    if (kv_kind == FA_SRC_BF16 or kv_kind == FA_SRC_F16 or kv_kind == FA_SRC_BF16_DP
            or kv_kind == FA_SRC_F16_DP):
        return 2
    return floating_size


cdef inline Py_ssize_t _decode_scratch(Py_ssize_t n_rows, Py_ssize_t d) noexcept nogil:
    """Scratch per thread of the decoding kernel, in elements: the scores (rows of
    FA_DECODE_BLOCK keys, whole cache lines), then q times the key scales (8-bit kinds), q
    as bfloat16 (FA_SRC_BF16_DP, FA_SRC_F16_DP), as 16-bit integers (FA_SRC_I8_DP) or bfloat16
    (FA_SRC_F8_DP) times the key scales and their factors, then those kinds' weights in
    pairs of 16 bits."""
    return n_rows * FA_DECODE_BLOCK + _round_up(n_rows * d, 16) + n_rows * FA_DECODE_BLOCK // 2


cdef inline void _decode_item(const floating *q, Py_ssize_t n_rows, Py_ssize_t d,
                              const void *k, const void *v, int kv_kind, Py_ssize_t d_v,
                              Py_ssize_t count, double scale, double softcap, const float *ks,
                              const float *vs, Py_ssize_t phase, floating *part,
                              double *l_part, floating *s_own,
                              const fa_pages *pg) noexcept nogil:
    """One work item of the decoding kernel: the n_rows queries q against count keys and
    values at k, v (of kv_kind, see _decode_run; in pages when pg is not NULL), into the
    partial state part (m then o) and l_part; s_own: the thread's scratch (_decode_scratch)."""
    if floating is float:
        if kv_kind == FA_SRC_BF16_DP:
            fa_decode_chunk_bfdp(q, n_rows, d, <const uint16_t*> k, <const uint16_t*> v, d_v,
                                 count, <float> scale, <float> softcap, part, l_part,
                                 part + n_rows, s_own,
                                 <uint16_t*> (s_own + n_rows * FA_DECODE_BLOCK),
                                 <uint32_t*> (s_own + n_rows * FA_DECODE_BLOCK
                                              + _round_up(n_rows * d, 16)), pg)
        elif kv_kind == FA_SRC_F16_DP:
            fa_decode_chunk_hfdp(q, n_rows, d, <const uint16_t*> k, <const uint16_t*> v, d_v,
                                 count, <float> scale, <float> softcap, part, l_part,
                                 part + n_rows, s_own,
                                 <uint16_t*> (s_own + n_rows * FA_DECODE_BLOCK),
                                 <uint32_t*> (s_own + n_rows * FA_DECODE_BLOCK
                                              + _round_up(n_rows * d, 16)), pg)
        elif kv_kind == FA_SRC_I8_DP:
            fa_decode_chunk_i8dp(q, n_rows, d, <const int8_t*> k, <const int8_t*> v, d_v, count,
                                 <float> scale, <float> softcap, ks, vs, phase, part, l_part,
                                 part + n_rows, s_own, s_own + n_rows * FA_DECODE_BLOCK,
                                 <uint32_t*> (s_own + n_rows * FA_DECODE_BLOCK
                                              + _round_up(n_rows * d, 16)), pg)
        elif kv_kind == FA_SRC_F8_DP:
            fa_decode_chunk_f8dp(q, n_rows, d, <const uint8_t*> k, <const uint8_t*> v, d_v, count,
                                 <float> scale, <float> softcap, ks, vs, phase, part, l_part,
                                 part + n_rows, s_own, s_own + n_rows * FA_DECODE_BLOCK,
                                 <uint32_t*> (s_own + n_rows * FA_DECODE_BLOCK
                                              + _round_up(n_rows * d, 16)), pg)
        elif kv_kind == FA_SRC_I8:
            fa_decode_chunk_i8(q, n_rows, d, <const int8_t*> k, <const int8_t*> v, d_v, count,
                               <float> scale, <float> softcap, ks, vs, phase, part, l_part,
                               part + n_rows, s_own, s_own + n_rows * FA_DECODE_BLOCK, pg)
        elif kv_kind == FA_SRC_F8:
            fa_decode_chunk_f8(q, n_rows, d, <const uint8_t*> k, <const uint8_t*> v, d_v, count,
                               <float> scale, <float> softcap, ks, vs, phase, part, l_part,
                               part + n_rows, s_own, s_own + n_rows * FA_DECODE_BLOCK, pg)
        elif kv_kind == FA_SRC_BF16:
            fa_decode_chunk_bf(q, n_rows, d, <const uint16_t*> k, <const uint16_t*> v, d_v,
                               count, <float> scale, <float> softcap, NULL, NULL, 0, part,
                               l_part, part + n_rows, s_own, NULL, pg)
        elif kv_kind == FA_SRC_F16:
            fa_decode_chunk_hf(q, n_rows, d, <const uint16_t*> k, <const uint16_t*> v, d_v,
                               count, <float> scale, <float> softcap, NULL, NULL, 0, part,
                               l_part, part + n_rows, s_own, NULL, pg)
        else:
            fa_decode_chunk_f(q, n_rows, d, <const float*> k, <const float*> v, d_v, count,
                              <float> scale, <float> softcap, NULL, NULL, 0, part, l_part,
                              part + n_rows, s_own, NULL, pg)
    else:
        fa_decode_chunk_d(q, n_rows, d, <const double*> k, <const double*> v, d_v, count,
                          scale, softcap, NULL, NULL, 0, part, l_part, part + n_rows, s_own,
                          NULL, pg)


cdef inline void _decode_merge(const floating *parts, const double *l_parts,
                               Py_ssize_t n_chunks, Py_ssize_t n_rows, Py_ssize_t d_v,
                               const floating *sinks, floating *out,
                               floating *lse) noexcept nogil:
    """One group's result from its chunks' partial states, merged in chunk order."""
    if floating is float:
        fa_decode_merge_f(parts, l_parts, n_chunks, n_rows, d_v, sinks, out, lse)
    else:
        fa_decode_merge_d(parts, l_parts, n_chunks, n_rows, d_v, sinks, out, lse)


cdef int _decode_run(const floating *q, const void *k, const void *v, int kv_kind,
                     Py_ssize_t k_item, Py_ssize_t v_item, const KvScales *sc,
                     const Py_ssize_t *kv_index,
                     Py_ssize_t n_groups, Py_ssize_t n_rows, Py_ssize_t d, Py_ssize_t n_keys,
                     Py_ssize_t d_v, double scale, double softcap, const floating *sink_base,
                     floating *out, floating *lse, int n_threads) noexcept nogil:
    """out[g] = softmax(scale q[g] k[kv_index[g]].T) v[kv_index[g]] for the n_rows single
    queries of each group g, on raw pointers (see decode); k and v hold floating (kv_kind
    0), or for floating = float bfloat16 or float16 bits (FA_SRC_BF16, FA_SRC_F16), or int8
    or float8 e4m3 bits with the scales sc (FA_SRC_I8, FA_SRC_F8); k_item, v_item:
    elements between kv heads.
    Returns the team that ran, or -1 when the scratch cannot be allocated."""
    cdef Py_ssize_t chunk = _policy.decode_chunk
    cdef Py_ssize_t n_chunks = _decode_chunks(n_keys)
    cdef Py_ssize_t n_work = n_groups * n_chunks
    # Partial state per work item: m (n_rows), o (n_rows * d_v), in floating; l in double.
    cdef Py_ssize_t part = n_rows * (1 + d_v)
    cdef Py_ssize_t s_size = _decode_scratch(n_rows, d)
    cdef floating *parts
    cdef double *l_parts
    cdef floating *s_all
    cdef Py_ssize_t w, grp, k0, at, kv
    cdef const float *ks = NULL
    cdef const float *vs = NULL
    cdef int team = 1
    cdef int *team_out = &team
    cdef size_t k_size = _kind_size(kv_kind, sizeof(floating))
    n_threads = _team(n_threads, 2.0 * n_groups * n_rows * n_keys * (d + d_v), n_work)
    parts = <floating*> malloc(n_work * part * sizeof(floating))
    l_parts = <double*> malloc(n_work * n_rows * sizeof(double))
    s_all = <floating*> aligned_alloc(64, n_threads * s_size * sizeof(floating))
    if parts == NULL or l_parts == NULL or s_all == NULL:
        free(parts)
        free(l_parts)
        free(s_all)
        return -1
    with parallel(num_threads=n_threads):
        for w in prange(n_work, schedule='static'):
            grp = w // n_chunks
            kv = kv_index[grp]
            k0 = (w % n_chunks) * chunk
            at = 0
            if sc != NULL and sc.ks != NULL:  # the 8-bit kinds
                at = sc.phase + k0
                ks = sc.ks + kv * sc.ks_item + at // FA_KV_GROUP * d
                vs = sc.vs + kv * sc.vs_item + k0
            _decode_item(q + grp * n_rows * d, n_rows, d,
                         <const char*> k + (kv * k_item + k0 * d) * k_size,
                         <const char*> v + (kv * v_item + k0 * d_v) * k_size, kv_kind, d_v,
                         min(chunk, n_keys - k0), scale, softcap, ks, vs, at % FA_KV_GROUP,
                         parts + w * part, l_parts + w * n_rows,
                         s_all + threadid() * s_size, NULL)
            team_out[0] = fa_omp_team_size()
        # Each group's chunks, merged in chunk order (after the loop's barrier).
        for grp in prange(n_groups, schedule='static'):
            _decode_merge(parts + grp * n_chunks * part, l_parts + grp * n_chunks * n_rows,
                          n_chunks, n_rows, d_v,
                          sink_base + grp * n_rows if sink_base != NULL else NULL,
                          out + grp * n_rows * d_v, lse + grp * n_rows)
    free(parts)
    free(l_parts)
    free(s_all)
    return team


# The dtypes of keys and values that float32 decoding reads in place and widens (bfloat16
# and float8 e4m3 held as their bits), and their kinds; float32 and float64 are kind 0.
_STORED_KINDS = {_np.dtype(_np.uint16): FA_SRC_BF16, _np.dtype(_np.float16): FA_SRC_F16,
                 _np.dtype(_np.int8): FA_SRC_I8, _np.dtype(_np.uint8): FA_SRC_F8}


def decode(const floating[:, :, ::1] q, object k, object v, const Py_ssize_t[::1] kv_index,
           double scale, double softcap, object sinks, floating[:, :, ::1] out,
           floating[:, ::1] lse, int n_threads, object ks=None, object vs=None,
           Py_ssize_t phase=0, bint products=False):
    """out[i] = softmax(scale q[i] k[kv_index[i]].T) v[kv_index[i]] for groups of single queries.

    softcap (0: none) caps the scores to softcap tanh(s / softcap); sinks (None, or one
    logit per query row, shaped like lse) adds a key with that logit and a zero value.

    q is (n_groups, G, D): the G query heads that share one key/value head, each with one
    query; k, v are (n_kv, L_k, D) and (n_kv, L_k, D_v) with contiguous rows (the caller
    checks) and any stride between kv heads (a cache's storage is read in place), in q's
    dtype, or for float32 q both float16 or both bfloat16 given as their bits (uint16),
    widened as they are read (bitwise the result on the widened arrays); or int8 or float8
    e4m3 (its bits, uint8) with their scales (fa_quant.h): ks (n_kv, groups, D) float32,
    one row per group of FA_KV_GROUP keys from the group holding key 0 (key `phase` of
    it), vs (n_kv, L_k) float32, one per value row; rows contiguous, any stride between kv
    heads. products: the call allows bfloat16 products (precision="bfloat16"), which
    bfloat16 keys and values then take where the policy says (_decode_kind). The keys are
    split in chunks of
    the policy's decode_chunk (fixed, not the thread count); the work items (group, chunk)
    run on the team of _team, and their partial states are merged per group in chunk
    order, so results are bitwise thread-invariant. Returns the number of threads that
    ran, or -1 if the scratch cannot be allocated.
    """
    cdef const floating[:, ::1] sink_view
    cdef const floating *sink_base = NULL
    cdef Py_buffer kb, vb
    cdef int team
    cdef int kind = _STORED_KINDS.get(getattr(k, "dtype", None), 0)
    cdef const float[:, :, :] ks_view
    cdef const float[:, :] vs_view
    cdef KvScales sc
    sc.ks = sc.vs = NULL
    sc.ks_item = sc.vs_item = sc.phase = 0
    if ks is not None:
        ks_view, vs_view = ks, vs
        if ((ks_view.shape[2] > 1 and ks_view.strides[2] != 4)  # (an axis of one: any stride)
                or (ks_view.shape[1] > 1 and ks_view.strides[1] != 4 * ks_view.shape[2])
                or (vs_view.shape[1] > 1 and vs_view.strides[1] != 4)):
            raise ValueError("decode: the rows of the scales must be contiguous")
        sc.ks, sc.vs = &ks_view[0, 0, 0], &vs_view[0, 0]
        sc.ks_item, sc.vs_item = ks_view.strides[0] // 4, vs_view.strides[0] // 4
        sc.phase = phase
    if sinks is not None:
        sink_view = sinks
        sink_base = &sink_view[0, 0]
    PyObject_GetBuffer(k, &kb, PyBUF_STRIDES)
    try:
        PyObject_GetBuffer(v, &vb, PyBUF_STRIDES)
    except BaseException:
        PyBuffer_Release(&kb)
        raise
    if (kind == FA_SRC_I8 or kind == FA_SRC_F8) and sc.ks == NULL:
        PyBuffer_Release(&kb)
        PyBuffer_Release(&vb)
        raise ValueError("decode: 8-bit keys and values need their scales")
    if floating is float:
        kind = _decode_kind(kind, products, q.shape[2], vb.shape[2])
    with nogil:
        team = _decode_run(&q[0, 0, 0], kb.buf, vb.buf, kind, kb.strides[0] // kb.itemsize,
                           vb.strides[0] // vb.itemsize, &sc, &kv_index[0], q.shape[0], q.shape[1],
                           q.shape[2], kb.shape[1], vb.shape[2], scale, softcap, sink_base,
                           &out[0, 0, 0], &lse[0, 0], n_threads)
    PyBuffer_Release(&kb)
    PyBuffer_Release(&vb)
    return team


# A paged group (decode_paged): its kv head, first visible key, visible keys, and where
# its sequence's page ids start in the table.
cdef enum:
    PG_HEAD = 0
    PG_FIRST
    PG_KEYS
    PG_TABLE
    PG_N


cdef inline void _decode_page_item(const floating *q, Py_ssize_t n_rows, Py_ssize_t d,
                                   const void *k, const void *v, int kv_kind, Py_ssize_t d_v,
                                   Py_ssize_t count, double scale, double softcap,
                                   const Py_ssize_t *table, Py_ssize_t page_rows,
                                   Py_ssize_t first, Py_ssize_t k_stride, Py_ssize_t v_stride,
                                   const float *ks, const float *vs,
                                   floating *part, double *l_part,
                                   floating *s_own) noexcept nogil:
    """_decode_item on keys and values in pages (fa_pages: its own, on this thread); the
    8-bit kinds' scales ks, vs (else NULL) in pages of page_rows / FA_KV_GROUP rows of d
    and of page_rows."""
    cdef fa_pages pg
    pg.table, pg.rows, pg.first, pg.k_stride, pg.v_stride = (table, page_rows, first,
                                                              k_stride, v_stride)
    pg.ks_stride, pg.vs_stride = page_rows // FA_KV_GROUP * d, page_rows
    _decode_item(q, n_rows, d, k, v, kv_kind, d_v, count, scale, softcap, ks, vs, 0,
                 part, l_part, s_own, &pg)


cdef int _decode_paged_run(const floating *q, const void *k, const void *v, int kv_kind,
                           const float *ks, const float *vs, Py_ssize_t n_pages,
                           Py_ssize_t page_rows,
                           const Py_ssize_t *groups, const Py_ssize_t *table,
                           Py_ssize_t n_groups, Py_ssize_t n_rows, Py_ssize_t d,
                           Py_ssize_t d_v, double scale, double softcap,
                           const floating *sink_base, floating *out, floating *lse,
                           int n_threads) noexcept nogil:
    """_decode_run for groups of different lengths whose keys and values lie in pages of a
    pool (see decode_paged; the 8-bit kinds' scales in ks, vs as there, else NULL): each
    group's visible keys in chunks of the policy's
    decode_chunk, counted from its first visible key; all groups' chunks are the work items
    of one parallel region, and each group's are merged in chunk order, so results are
    bitwise thread-invariant. Returns the team that ran, or -1 without scratch."""
    cdef Py_ssize_t chunk = _policy.decode_chunk
    cdef Py_ssize_t part = n_rows * (1 + d_v)
    cdef Py_ssize_t s_size = _decode_scratch(n_rows, d)
    cdef Py_ssize_t n_work = 0, grp, w, c, n_keys_all = 0
    cdef Py_ssize_t *first_item = <Py_ssize_t*> malloc((n_groups + 1) * sizeof(Py_ssize_t))
    cdef Py_ssize_t *item_group
    cdef floating *parts
    cdef double *l_parts
    cdef floating *s_all
    cdef const Py_ssize_t *gr
    cdef size_t k_size = _kind_size(kv_kind, sizeof(floating))
    cdef int team = 1
    cdef int *team_out = &team
    if first_item == NULL:
        return -1
    for grp in range(n_groups):
        first_item[grp] = n_work
        n_work += _decode_chunks(groups[grp * PG_N + PG_KEYS])
        n_keys_all += groups[grp * PG_N + PG_KEYS]
    first_item[n_groups] = n_work
    n_threads = _team(n_threads, 2.0 * n_rows * n_keys_all * (d + d_v), n_work)
    item_group = <Py_ssize_t*> malloc(max(n_work, 1) * sizeof(Py_ssize_t))
    parts = <floating*> malloc(max(n_work, 1) * part * sizeof(floating))
    l_parts = <double*> malloc(max(n_work, 1) * n_rows * sizeof(double))
    s_all = <floating*> aligned_alloc(64, n_threads * s_size * sizeof(floating))
    if item_group == NULL or parts == NULL or l_parts == NULL or s_all == NULL:
        free(first_item)
        free(item_group)
        free(parts)
        free(l_parts)
        free(s_all)
        return -1
    for grp in range(n_groups):
        for w in range(first_item[grp], first_item[grp + 1]):
            item_group[w] = grp
    with parallel(num_threads=n_threads):
        for w in prange(n_work, schedule='static'):
            gr = groups + item_group[w] * PG_N
            c = (w - first_item[item_group[w]]) * chunk  # the chunk's first visible key
            _decode_page_item(q + item_group[w] * n_rows * d, n_rows, d,
                              <const char*> k + gr[PG_HEAD] * n_pages * page_rows * d * k_size,
                              <const char*> v + gr[PG_HEAD] * n_pages * page_rows * d_v * k_size,
                              kv_kind, d_v, min(chunk, gr[PG_KEYS] - c), scale, softcap,
                              table + gr[PG_TABLE], page_rows, gr[PG_FIRST] + c,
                              page_rows * d, page_rows * d_v,
                              ks + gr[PG_HEAD] * n_pages * (page_rows // FA_KV_GROUP) * d
                              if ks != NULL else NULL,
                              vs + gr[PG_HEAD] * n_pages * page_rows if vs != NULL else NULL,
                              parts + w * part, l_parts + w * n_rows,
                              s_all + threadid() * s_size)
            team_out[0] = fa_omp_team_size()
        for grp in prange(n_groups, schedule='static'):
            _decode_merge(parts + first_item[grp] * part, l_parts + first_item[grp] * n_rows,
                          first_item[grp + 1] - first_item[grp], n_rows, d_v,
                          sink_base + grp * n_rows if sink_base != NULL else NULL,
                          out + grp * n_rows * d_v, lse + grp * n_rows)
    free(first_item)
    free(item_group)
    free(parts)
    free(l_parts)
    free(s_all)
    return team


def decode_paged(const floating[:, :, ::1] q, object k_pool, object v_pool,
                 const Py_ssize_t[:, ::1] groups, const Py_ssize_t[::1] table, double scale,
                 double softcap, object sinks, floating[:, :, ::1] out, floating[:, ::1] lse,
                 int n_threads, object ks_pool=None, object vs_pool=None,
                 bint products=False):
    """out[g] = softmax(scale q[g] K_g.T) V_g for the G single queries of each group g
    (q: (n_groups, G, D)), K_g and V_g the keys [first, first + n_keys) of one kv head of
    a sequence held in pages: groups[g] = (kv head, first, n_keys, offset), the sequence's
    page ids being table[offset:] (page p of kv head h is k_pool[h, p]). k_pool, v_pool:
    (kv_heads, num_blocks, page_rows, D or D_v), C-contiguous, in q's dtype, or for float32
    q the bits of bfloat16 (uint16) or float16, or int8 or float8 e4m3 (uint8) with their
    scales in pages too (page_rows a multiple of FA_KV_GROUP): ks_pool (kv_heads,
    num_blocks, page_rows / FA_KV_GROUP, D) and vs_pool (kv_heads, num_blocks, page_rows),
    float32, C-contiguous. softcap, sinks ((n_groups, G) or None), out, lse, products as
    decode(). Returns the threads that ran, or -1 without scratch."""
    cdef const floating[:, ::1] sink_view
    cdef const floating *sink_base = NULL
    cdef const float[:, :, :, ::1] ks_view
    cdef const float[:, :, ::1] vs_view
    cdef const float *ks = NULL
    cdef const float *vs = NULL
    cdef Py_buffer kb, vb
    cdef int team
    cdef int kind = _STORED_KINDS.get(getattr(k_pool, "dtype", None), 0)
    if kind and floating is double:
        raise ValueError("decode_paged: stored pages need float32 queries")
    if kind == FA_SRC_I8 or kind == FA_SRC_F8:
        if ks_pool is None or vs_pool is None:
            raise ValueError("decode_paged: 8-bit pages need their scales")
        ks_view, vs_view = ks_pool, vs_pool
        n_h, n_p, rows = k_pool.shape[0], k_pool.shape[1], k_pool.shape[2]
        if (rows % FA_KV_GROUP
                or tuple(ks_pool.shape) != (n_h, n_p, rows // FA_KV_GROUP, q.shape[2])
                or tuple(vs_pool.shape) != (n_h, n_p, rows)):
            raise ValueError("decode_paged: the scales do not match the 8-bit pages")
        if ks_view.size:
            ks, vs = &ks_view[0, 0, 0, 0], &vs_view[0, 0, 0]
    if groups.shape[1] != PG_N:
        raise ValueError("decode_paged: groups must have 4 columns")
    if floating is float:
        kind = _decode_kind(kind, products, q.shape[2], v_pool.shape[3])
    if sinks is not None:
        sink_view = sinks
        sink_base = &sink_view[0, 0]
    PyObject_GetBuffer(k_pool, &kb, PyBUF_C_CONTIGUOUS)
    try:
        PyObject_GetBuffer(v_pool, &vb, PyBUF_C_CONTIGUOUS)
    except BaseException:
        PyBuffer_Release(&kb)
        raise
    with nogil:
        team = _decode_paged_run(&q[0, 0, 0], kb.buf, vb.buf, kind, ks, vs, kb.shape[1],
                                 kb.shape[2],
                                 &groups[0, 0], &table[0] if table.shape[0] else NULL,
                                 q.shape[0], q.shape[1], q.shape[2], vb.shape[3], scale,
                                 softcap, sink_base, &out[0, 0, 0], &lse[0, 0], n_threads)
    PyBuffer_Release(&kb)
    PyBuffer_Release(&vb)
    return team


cdef tuple _decode_call(object q, const void *q_buf, const void *k_buf, const void *v_buf,
                        Py_ssize_t k_item, Py_ssize_t v_item, Py_ssize_t n_groups,
                        Py_ssize_t group, Py_ssize_t n_keys, Py_ssize_t d_head, Py_ssize_t d_v,
                        double scale, double softcap, const void *sinks, int n_threads,
                        int kind=0, const KvScales *sc=NULL):
    """(out, threads that ran): decode() for the single queries of q (its buffer q_buf,
    C-contiguous: n_groups groups of `group` query heads) against kv entry g (k_item,
    v_item elements apart in k_buf, v_buf; rows contiguous; of q's dtype, or of kind with
    the scales sc as _decode_run takes them) for group g, with this scale,
    soft cap (0: none) and sinks (NULL: none; else one per query row, in q's dtype); out
    shaped like q with D_v last. Raises MemoryError when the scratch cannot be allocated."""
    cdef Py_ssize_t g
    cdef int team
    cdef Py_buffer ob
    cdef Py_ssize_t *index
    cdef void *lse
    cdef tuple q_shape = q.shape
    cdef bint single = q.dtype is _float32
    cdef object out = _np.empty(q_shape[:len(q_shape) - 1] + (d_v,), q.dtype)
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
            team = _decode_run(<const float*> q_buf, k_buf, v_buf, kind, k_item, v_item,
                               sc, index, n_groups, group, d_head, n_keys, d_v,
                               scale, softcap, <const float*> sinks,
                               <float*> ob.buf, <float*> lse, n_threads)
        else:
            team = _decode_run(<const double*> q_buf, k_buf, v_buf, 0, k_item, v_item,
                               NULL, index, n_groups, group, d_head, n_keys, d_v,
                               scale, softcap, <const double*> sinks,
                               <double*> ob.buf, <double*> lse, n_threads)
    free(index)
    free(lse)
    PyBuffer_Release(&ob)
    if team < 0:
        raise MemoryError("attention: cannot allocate the decoding scratch")
    return out, team


def cache_decode(object q, object k_store, object v_store, Py_ssize_t start, Py_ssize_t n_keys,
                 int n_threads, object ks_store=None, object vs_store=None):
    """(attention(q, cache=c), threads that ran) with every other argument at its
    default, read from the cache's storage arrays (B, H_kv, rows, D or D_v), rows start
    to start + n_keys; or None: q must be a C-contiguous ndarray (B, H, 1, D) in the
    cache's compute dtype, the storage float32 or float64 in q's dtype, or for float32 q
    bfloat16 bits (uint16), float16, int8 or float8 e4m3 bits (uint8) with the scales
    ks_store (B, H_kv, rows / FA_KV_GROUP, D) and vs_store (B, H_kv, rows), all C-contiguous;
    H a multiple of H_kv (fastattn.cache.decode_step checked the shapes). Reading the
    storage, not a view of it, spares NumPy building the buffer description of a new
    view at every step."""
    cdef Py_buffer qb, kb, vb, ksb, vsb
    cdef tuple q_shape, k_shape, v_shape
    cdef Py_ssize_t rows, item, n_kv
    cdef int kind = 0
    cdef bint fits
    cdef KvScales sc
    cdef object dtype = getattr(q, "dtype", None)
    cdef object stored = getattr(k_store, "dtype", None)
    if type(q) is not _ndarray or (dtype is not _float32 and dtype is not _float64):
        return None
    if stored is not dtype:
        if dtype is not _float32 or stored not in _STORED_KINDS:
            return None
        kind = _STORED_KINDS[stored]
    if getattr(v_store, "dtype", None) is not stored:
        return None
    if (kind == FA_SRC_I8 or kind == FA_SRC_F8) != (ks_store is not None):
        return None
    q_shape, k_shape, v_shape = q.shape, k_store.shape, v_store.shape
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4 or q_shape[2] != 1:
        return None
    rows = k_shape[2]
    n_kv = k_shape[0] * k_shape[1]
    if (v_shape[2] != rows or n_keys < 1 or start < 0 or start + n_keys > rows or n_kv < 1):
        return None
    if not _c_buffers(q, k_store, v_store, &qb, &kb, &vb):
        return None
    sc.ks = sc.vs = NULL
    sc.ks_item = sc.vs_item = sc.phase = 0
    if ks_store is not None:
        fits = _c_buffer(ks_store, &ksb)
        if fits:
            fits = _c_buffer(vs_store, &vsb)
            if not fits:
                PyBuffer_Release(&ksb)
            elif (ksb.len != n_kv * (rows // FA_KV_GROUP) * kb.shape[3] * 4
                    or vsb.len != n_kv * rows * 4):
                PyBuffer_Release(&ksb)
                PyBuffer_Release(&vsb)
                fits = False
        if not fits:
            PyBuffer_Release(&qb)
            PyBuffer_Release(&kb)
            PyBuffer_Release(&vb)
            return None
        sc.ks = <const float*> ksb.buf + start // FA_KV_GROUP * kb.shape[3]
        sc.vs = <const float*> vsb.buf + start
        sc.ks_item, sc.vs_item = rows // FA_KV_GROUP * kb.shape[3], rows
        sc.phase = start % FA_KV_GROUP
    item = kb.itemsize
    try:
        return _decode_call(q, qb.buf, <char*> kb.buf + start * kb.shape[3] * item,
                            <char*> vb.buf + start * vb.shape[3] * item,
                            rows * kb.shape[3], rows * vb.shape[3], n_kv,
                            q_shape[1] // kb.shape[1], n_keys, kb.shape[3], vb.shape[3],
                            _default_scale(kb.shape[3]), 0, NULL, n_threads, kind,
                            &sc if ks_store is not None else NULL)
    finally:
        PyBuffer_Release(&qb)
        PyBuffer_Release(&kb)
        PyBuffer_Release(&vb)
        if ks_store is not None:
            PyBuffer_Release(&ksb)
            PyBuffer_Release(&vsb)


# The decoding kernel: single queries against many keys, split over key chunks.
# Part of _kernels_impl.pxi (see there).

# --------------------------------------------------------------------------- decoding

cdef int _decode_run(const floating *q, const void *k, const void *v, bint kv_bf16,
                     Py_ssize_t k_item, Py_ssize_t v_item, const Py_ssize_t *kv_index,
                     Py_ssize_t n_groups, Py_ssize_t n_rows, Py_ssize_t d, Py_ssize_t n_keys,
                     Py_ssize_t d_v, double scale, double softcap, const floating *sink_base,
                     floating *out, floating *lse, Py_ssize_t chunk,
                     int n_threads) noexcept nogil:
    """The decoding kernel on raw pointers (see decode); k and v hold floating, or
    bfloat16 (kv_bf16, floating = float). k_item, v_item: elements between kv heads."""
    cdef Py_ssize_t n_chunks = (n_keys + chunk - 1) // chunk
    cdef Py_ssize_t n_work = n_groups * n_chunks
    # Partial state per work item: m (n_rows), o (n_rows * d_v), in floating; l in double.
    cdef Py_ssize_t part = n_rows * (1 + d_v)
    # The scores of each thread start on a cache line (rows of FA_DECODE_BLOCK keys are
    # whole lines): the kernel stores and reloads them as full vectors.
    cdef Py_ssize_t s_size = n_rows * FA_DECODE_BLOCK
    cdef floating *parts = <floating*> malloc(n_work * part * sizeof(floating))
    cdef double *l_parts = <double*> malloc(n_work * n_rows * sizeof(double))
    cdef floating *s_all = <floating*> aligned_alloc(64, n_threads * s_size * sizeof(floating))
    cdef Py_ssize_t w, grp, k0, k_at, v_at
    cdef int team = 1
    cdef int *team_out = &team
    if parts == NULL or l_parts == NULL or s_all == NULL:
        free(parts)
        free(l_parts)
        free(s_all)
        return -1
    with parallel(num_threads=n_threads):
        for w in prange(n_work, schedule='static'):
            grp = w // n_chunks
            k0 = (w % n_chunks) * chunk
            k_at = kv_index[grp] * k_item + k0 * d
            v_at = kv_index[grp] * v_item + k0 * d_v
            if floating is float:
                if kv_bf16:
                    fa_decode_chunk_bf(q + grp * n_rows * d, n_rows, d,
                                       <const uint16_t*> k + k_at, <const uint16_t*> v + v_at,
                                       d_v, min(chunk, n_keys - k0), <float> scale,
                                       <float> softcap, parts + w * part, l_parts + w * n_rows,
                                       parts + w * part + n_rows, s_all + threadid() * s_size)
                else:
                    fa_decode_chunk_f(q + grp * n_rows * d, n_rows, d,
                                      <const float*> k + k_at, <const float*> v + v_at, d_v,
                                      min(chunk, n_keys - k0), <float> scale, <float> softcap,
                                      parts + w * part, l_parts + w * n_rows,
                                      parts + w * part + n_rows, s_all + threadid() * s_size)
            else:
                fa_decode_chunk_d(q + grp * n_rows * d, n_rows, d,
                                  <const double*> k + k_at, <const double*> v + v_at, d_v,
                                  min(chunk, n_keys - k0), scale, softcap,
                                  parts + w * part, l_parts + w * n_rows,
                                  parts + w * part + n_rows, s_all + threadid() * s_size)
            team_out[0] = fa_omp_team_size()
        # Each group's chunks, merged in chunk order (after the loop's barrier).
        for grp in prange(n_groups, schedule='static'):
            if floating is float:
                fa_decode_merge_f(parts + grp * n_chunks * part, l_parts + grp * n_chunks * n_rows,
                                  n_chunks, n_rows, d_v,
                                  sink_base + grp * n_rows if sink_base != NULL else NULL,
                                  out + grp * n_rows * d_v, lse + grp * n_rows)
            else:
                fa_decode_merge_d(parts + grp * n_chunks * part, l_parts + grp * n_chunks * n_rows,
                                  n_chunks, n_rows, d_v,
                                  sink_base + grp * n_rows if sink_base != NULL else NULL,
                                  out + grp * n_rows * d_v, lse + grp * n_rows)
    free(parts)
    free(l_parts)
    free(s_all)
    return team


def decode(const floating[:, :, ::1] q, const floating[:, :, :] k,
           const floating[:, :, :] v, const Py_ssize_t[::1] kv_index, double scale,
           double softcap, object sinks, floating[:, :, ::1] out, floating[:, ::1] lse,
           Py_ssize_t chunk, int n_threads):
    """out[i] = softmax(scale q[i] k[kv_index[i]].T) v[kv_index[i]] for groups of single queries.

    softcap (0: none) caps the scores to softcap tanh(s / softcap); sinks (None, or one
    logit per query row, shaped like lse) adds a key with that logit and a zero value.

    q is (n_groups, G, D): the G query heads that share one key/value head, each with one
    query; k, v are (n_kv, L_k, D) and (n_kv, L_k, D_v) with contiguous rows (the caller
    checks) and any stride between kv heads (a cache's storage is read in place). The
    keys are split in chunks of `chunk` (fixed, not the thread count); the work items
    (group, chunk) run in parallel and their partial states are merged per group in chunk
    order, so results are bitwise thread-invariant. Returns the number of threads that
    ran, or -1 if the scratch cannot be allocated.
    """
    cdef const floating[:, ::1] sink_view
    cdef const floating *sink_base = NULL
    cdef int team
    if sinks is not None:
        sink_view = sinks
        sink_base = &sink_view[0, 0]
    with nogil:
        team = _decode_run(&q[0, 0, 0], &k[0, 0, 0], &v[0, 0, 0], False,
                           k.strides[0] // sizeof(floating), v.strides[0] // sizeof(floating),
                           &kv_index[0], q.shape[0], q.shape[1], q.shape[2], k.shape[1],
                           v.shape[2], scale, softcap, sink_base, &out[0, 0, 0], &lse[0, 0],
                           chunk, n_threads)
    return team


def decode_bf16(const float[:, :, ::1] q, const uint16_t[:, :, :] k,
                const uint16_t[:, :, :] v, const Py_ssize_t[::1] kv_index, double scale,
                double softcap, object sinks, float[:, :, ::1] out, float[:, ::1] lse,
                Py_ssize_t chunk, int n_threads):
    """decode() with bfloat16 keys and values (their bits as uint16), read in place and
    widened to float32 as they are loaded: bitwise decode() on the widened arrays."""
    cdef const float[:, ::1] sink_view
    cdef const float *sink_base = NULL
    cdef int team
    if sinks is not None:
        sink_view = sinks
        sink_base = &sink_view[0, 0]
    with nogil:
        team = _decode_run(&q[0, 0, 0], &k[0, 0, 0], &v[0, 0, 0], True,
                           k.strides[0] // sizeof(uint16_t), v.strides[0] // sizeof(uint16_t),
                           &kv_index[0], q.shape[0], q.shape[1], q.shape[2], k.shape[1],
                           v.shape[2], scale, softcap, sink_base, &out[0, 0, 0], &lse[0, 0],
                           chunk, n_threads)
    return team

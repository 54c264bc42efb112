# The fused attention kernel: an online softmax over key tiles.
# Part of _kernels_impl.pxi (see there).

# --------------------------------------------------------------------------- attention

cdef void _attend_block(
        const floating *q, const floating *k, const floating *v,
        const floating *add_mask, const unsigned char *bool_mask, int mask_kind,
        Py_ssize_t q_start, Py_ssize_t q_rows, Py_ssize_t n_queries, Py_ssize_t n_keys,
        Py_ssize_t d_head, Py_ssize_t d_v, Py_ssize_t k_block, bint causal, Py_ssize_t window,
        floating scale, floating softcap, const floating *sink, floating *s_tile,
        floating *o_acc, floating *m_run, double *l_run, floating *kp, Py_ssize_t kp_keys,
        Py_ssize_t *packed, floating *vp, Py_ssize_t vp_chunks, floating *qs, bint micro,
        floating *out, floating *lse) noexcept nogil:
    """out rows [q_start, q_start + q_rows) of softmax(scale q k.T + mask) v, by an online
    softmax over key blocks; lse (if not NULL) gets m + log(l) per row.

    softcap > 0: the scores become softcap tanh(s / softcap) before the masks. sink (NULL:
    none): one more key per row with that logit and a zero value, so the running max and
    sum start at (*sink, 1) instead of (-inf, 0).

    micro: the tile GEMMs run in this build's micro-kernels (fastattn._plan.use_microkernels)
    instead of BLAS: the query block is scaled once into qs. The keys are packed into kp
    once per thread and head, not per tile: kp has room for kp_keys keys (a multiple of
    FA_MK_KEYS, at least a tile's panels) and holds the panels of keys [packed[1],
    packed[2]) of the head whose keys start at packed[0] (as an address), in panels of
    FA_MK_KEYS counted from key 0 (zero keys pad the last). A tile whose panels are not in
    kp extends it, or when there is no room starts it again at the tile's first panel. A
    tile whose first key is inside a panel computes the scores of the whole panels it
    touches and uses the columns from `off` on; the score tile's row stride is that
    width, a multiple of FA_MK_KEYS. The values, where their layout is not already the
    micro-kernel's chunk layout, are packed likewise into vp, once per thread and head: vp
    has room for vp_chunks chunks of FA_MK_PV_CHUNK keys (at least a tile's) and holds
    chunks [packed[4], packed[5]) of the head whose values start at packed[3]."""
    cdef Py_ssize_t offset = n_keys - n_queries   # causal: query i sees keys j <= i + offset
    cdef Py_ssize_t k_end = n_keys, k_start, k_rows, i, j, gi
    cdef floating m_new, m_use, alpha, inv
    cdef floating *s_row
    cdef floating *o_row
    cdef Py_ssize_t k_begin = 0, ld = 0, off = 0, k_panel, need
    cdef const floating *vb = v
    cdef Py_ssize_t v_origin = 0, v_first, v_need, v_next
    cdef bint v_in_place = _values_in_place(d_v, sizeof(floating))
    if causal:
        # The block's last query sees keys up to q_start + q_rows - 1 + offset: later key
        # blocks are skipped whole, never computed and then masked.
        k_end = min(n_keys, q_start + q_rows + offset)
    if window:
        # ...and its first query sees none before q_start + offset - window + 1.
        k_begin = max(0, q_start + offset - window + 1)
    for i in range(q_rows):
        m_run[i] = -INFINITY if sink == NULL else sink[0]
        l_run[i] = 0 if sink == NULL or sink[0] == -INFINITY else 1
    memset(o_acc, 0, q_rows * d_v * sizeof(floating))
    if micro:
        for i in range(q_rows * d_head):
            qs[i] = q[q_start * d_head + i] * scale

    k_start = k_begin
    while k_start < k_end:
        k_rows = min(k_block, k_end - k_start)
        ld = k_rows
        if micro:
            # The tile's key panels [k_panel, need) into kp (packing what is not there
            # yet), then s_tile (q_rows x ld) = (scale Q_blk) @ (the panels' keys).T, this
            # tile's key k_start in column off.
            k_panel = k_start // FA_MK_KEYS * FA_MK_KEYS
            need = _round_up(k_start + k_rows, FA_MK_KEYS)
            if (packed[0] != <Py_ssize_t> k or k_panel < packed[1]
                    or need > packed[1] + kp_keys):
                packed[0] = <Py_ssize_t> k
                packed[1] = k_panel
                packed[2] = k_panel
            if packed[2] < need:
                _pack_keys(k + packed[2] * d_head, min(n_keys, need) - packed[2], d_head,
                           kp + (packed[2] - packed[1]) * d_head, need - packed[2])
                packed[2] = need
            off = k_start - k_panel
            ld = need - k_panel
            _mk_scores(qs, q_rows, d_head, kp + (k_panel - packed[1]) * d_head, ld, s_tile, ld)
        else:
            # s_tile (q_rows x k_rows) = scale * Q_blk @ K_blk.T
            _gemm(True, <int> q_rows, <int> k_rows, <int> d_head, scale,
                  q + q_start * d_head, <int> d_head, k + k_start * d_head, <int> d_head,
                  0, s_tile, <int> k_rows)
        for i in range(q_rows):
            gi = q_start + i
            s_row = s_tile + i * ld + off
            if softcap > 0:
                _softcap_row(s_row, k_rows, softcap)
            _mask_row(s_row, k_rows, gi + offset + 1 - window - k_start if window else 0,
                      gi + offset + 1 - k_start if causal else k_rows, mask_kind,
                      add_mask + gi * n_keys + k_start if mask_kind == MASK_ADD else NULL,
                      bool_mask + gi * n_keys + k_start if mask_kind == MASK_BOOL else NULL)
            m_new = _row_max(s_row, k_rows)
            if m_run[i] > m_new:
                m_new = m_run[i]
            # Until a row has seen a visible key its max is -inf; shift by 0 then, so that
            # exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
            m_use = m_new if m_new != -INFINITY else 0
            alpha = _exp(m_run[i] - m_use)
            m_run[i] = m_new
            l_run[i] = l_run[i] * alpha + _exp_shift_sum(s_row, k_rows, m_use)
            if alpha != 1:
                o_row = o_acc + i * d_v
                for j in range(d_v):
                    o_row[j] = o_row[j] * alpha
        # o_acc (q_rows x d_v) += P (q_rows x k_rows) @ V_blk (k_rows x d_v)
        if micro:
            # The tile's value chunks [v_first, v_need) into vp (packing what is not there
            # yet) unless v is read in place; v_next: the keys after the tile that vb holds
            # (the next tile's, prefetched during this one).
            v_next = k_end - k_start - k_rows
            if not v_in_place:
                v_first = k_start // FA_MK_PV_CHUNK
                v_need = (k_start + k_rows + FA_MK_PV_CHUNK - 1) // FA_MK_PV_CHUNK
                if (packed[3] != <Py_ssize_t> v or v_first < packed[4]
                        or v_need > packed[4] + vp_chunks):
                    packed[3] = <Py_ssize_t> v
                    packed[4] = v_first
                    packed[5] = v_first
                if packed[5] < v_need:
                    _pack_values(v + packed[4] * FA_MK_PV_CHUNK * d_v,
                                 n_keys - packed[4] * FA_MK_PV_CHUNK, d_v,
                                 vp + (packed[5] - packed[4]) * FA_MK_PV_CHUNK * d_v,
                                 packed[5] - packed[4], v_need - packed[4])
                    packed[5] = v_need
                vb = vp
                v_origin = packed[4] * FA_MK_PV_CHUNK
                v_next = min(v_next, packed[5] * FA_MK_PV_CHUNK - k_start - k_rows)
            _mk_pv(s_tile + off, ld, q_rows, vb, k_start - v_origin, k_rows, max(v_next, 0),
                   d_v, o_acc)
        else:
            _gemm(False, <int> q_rows, <int> d_v, <int> k_rows, 1,
                  s_tile, <int> k_rows, v + k_start * d_v, <int> d_v,
                  1, o_acc, <int> d_v)
        k_start = k_start + k_rows

    for i in range(q_rows):
        o_row = out + (q_start + i) * d_v
        if l_run[i] == 0:
            # Every key hidden from this query: zeros, as PyTorch and FlashAttention give.
            for j in range(d_v):
                o_row[j] = 0
        else:
            inv = <floating> (1.0 / l_run[i])
            for j in range(d_v):
                o_row[j] = o_acc[i * d_v + j] * inv
        if lse != NULL:
            lse[q_start + i] = <floating> (m_run[i] + log(l_run[i]))


# A thread keeps a head's packed keys in at most this many bytes of its scratch: all of
# them up to 65,536 keys of D 64 in float32 (16 MiB). A longer head's keys are packed in
# runs of that many, again for each query block: memory before speed at such lengths.
# The same for its packed values (where they are not read in place).
cdef enum:
    KP_MAX_BYTES = 16 * 1024 * 1024
    VP_MAX_BYTES = 16 * 1024 * 1024
# The per-thread scratch of the fused kernel, in floating elements from the start of one
# thread's part (computed once per call by _scratch_layout, carved by _attend_item).
cdef enum:
    SCR_S_TILE = 0  # score tile, q_block x s_width
    SCR_O_ACC       # output accumulator, q_block x d_v
    SCR_M_RUN       # running max, q_block
    SCR_KP          # packed keys of a head, d_head x SCR_KP_KEYS (micro-kernels only)
    SCR_VP          # packed values of a head, SCR_VP_CHUNKS chunks (micro-kernels only)
    SCR_QS          # scaled query block, q_block x d_head (micro-kernels only)
    SCR_L_RUN       # running sum, q_block doubles, 64-byte aligned
    SCR_PACKED      # which head's keys kp holds, from and to, and its values: 6 Py_ssize_t
    SCR_SIZE        # the whole part, a multiple of 64 bytes
    SCR_KP_KEYS     # (not a place) how many keys SCR_KP has room for
    SCR_VP_CHUNKS   # (not a place) how many value chunks SCR_VP has room for
    SCR_N


cdef void _scratch_layout(Py_ssize_t q_block, Py_ssize_t s_width, Py_ssize_t kp_width,
                          Py_ssize_t vp_chunks, Py_ssize_t d_head, Py_ssize_t d_v, bint micro,
                          size_t item, Py_ssize_t *at) noexcept nogil:
    """at[SCR_*] = where each buffer starts in one thread's scratch (in elements of item
    bytes), and at[SCR_SIZE] its length: each part and the doubles start 64-byte aligned."""
    cdef Py_ssize_t per_line = 64 // item
    at[SCR_S_TILE] = 0
    at[SCR_O_ACC] = at[SCR_S_TILE] + q_block * s_width
    at[SCR_M_RUN] = at[SCR_O_ACC] + q_block * d_v
    at[SCR_KP] = at[SCR_M_RUN] + q_block
    at[SCR_VP] = at[SCR_KP] + (d_head * kp_width if micro else 0)
    at[SCR_QS] = at[SCR_VP] + (vp_chunks * FA_MK_PV_CHUNK * d_v if micro else 0)
    at[SCR_L_RUN] = _round_up(at[SCR_QS] + (q_block * d_head if micro else 0), per_line)
    at[SCR_PACKED] = _round_up(at[SCR_L_RUN] + q_block * (sizeof(double) // item), per_line)
    at[SCR_SIZE] = at[SCR_PACKED] + per_line
    at[SCR_KP_KEYS] = kp_width
    at[SCR_VP_CHUNKS] = vp_chunks


cdef void _run_layout(Py_ssize_t q_block, Py_ssize_t k_block, Py_ssize_t n_keys,
                      Py_ssize_t d_head, Py_ssize_t d_v, bint micro, size_t item,
                      Py_ssize_t *at) noexcept nogil:
    """_scratch_layout for a call of the fused kernel with these sizes."""
    # Score tile width: k_block, or with micro-kernels the whole key panels a block of
    # k_block keys starting anywhere touches.
    cdef Py_ssize_t s_width = _round_up(k_block, FA_MK_KEYS) + FA_MK_KEYS if micro else k_block
    # Room for a head's packed keys, up to KP_MAX_BYTES (and at least one tile's panels).
    cdef Py_ssize_t kp_keys = KP_MAX_BYTES // (max(d_head, 1) * <Py_ssize_t> item)
    kp_keys = max(s_width, kp_keys // FA_MK_KEYS * FA_MK_KEYS)
    # Room for a head's packed values likewise (at least the chunks one tile touches), or
    # none where they are read in place.
    cdef Py_ssize_t vp_chunks = 0
    if micro and not _values_in_place(d_v, item):
        vp_chunks = max((k_block + FA_MK_PV_CHUNK - 1) // FA_MK_PV_CHUNK + 1,
                        VP_MAX_BYTES // (FA_MK_PV_CHUNK * max(d_v, 1) * <Py_ssize_t> item))
        vp_chunks = min((n_keys + FA_MK_PV_CHUNK - 1) // FA_MK_PV_CHUNK, vp_chunks)
    _scratch_layout(q_block, s_width, min(_round_up(n_keys, FA_MK_KEYS), kp_keys), vp_chunks,
                    d_head, d_v, micro, item, at)


cdef inline void _attend_item(
        Py_ssize_t w, Py_ssize_t n_qblocks, Py_ssize_t q_block, Py_ssize_t k_block,
        const floating *q, const floating *k, const floating *v,
        const floating *add_base, const unsigned char *bool_base, int mask_kind,
        const Py_ssize_t *index, Py_ssize_t n_batch, Py_ssize_t n_queries, Py_ssize_t n_keys,
        Py_ssize_t d_head, Py_ssize_t d_v, bint causal, Py_ssize_t window, floating scale,
        floating softcap, const floating *sinks, floating *buf, const Py_ssize_t *at,
        bint micro, floating *out, floating *lse) noexcept nogil:
    """Work item w: query block w % n_qblocks of batch entry w // n_qblocks."""
    cdef Py_ssize_t b = w // n_qblocks
    cdef Py_ssize_t q_start = (w % n_qblocks) * q_block
    cdef Py_ssize_t q_item = index[b], kv_item = index[n_batch + b]
    cdef Py_ssize_t mask_item = index[2 * n_batch + b]
    _attend_block(q + q_item * n_queries * d_head, k + kv_item * n_keys * d_head,
                  v + kv_item * n_keys * d_v,
                  add_base + mask_item * n_queries * n_keys if mask_kind == MASK_ADD else NULL,
                  bool_base + mask_item * n_queries * n_keys if mask_kind == MASK_BOOL else NULL,
                  mask_kind, q_start, min(q_block, n_queries - q_start), n_queries,
                  n_keys, d_head, d_v, k_block, causal, window, scale, softcap,
                  sinks + b if sinks != NULL else NULL, buf + at[SCR_S_TILE], buf + at[SCR_O_ACC], buf + at[SCR_M_RUN],
                  <double*> (buf + at[SCR_L_RUN]), buf + at[SCR_KP], at[SCR_KP_KEYS],
                  <Py_ssize_t*> (buf + at[SCR_PACKED]), buf + at[SCR_VP], at[SCR_VP_CHUNKS],
                  buf + at[SCR_QS], micro,
                  out + b * n_queries * d_v, lse + b * n_queries)


cdef int _attention_run(const floating *q, const floating *k, const floating *v,
                        const floating *add_base, const unsigned char *bool_base, int mask_kind,
                        const Py_ssize_t *index, Py_ssize_t n_batch, Py_ssize_t n_queries,
                        Py_ssize_t n_keys, Py_ssize_t d_head, Py_ssize_t d_v, bint causal,
                        Py_ssize_t window, double scale, double softcap,
                        const floating *sinks, floating *out, floating *lse,
                        Py_ssize_t q_block, Py_ssize_t k_block, bint micro,
                        int n_threads, Py_ssize_t w_start, Py_ssize_t w_stop,
                        floating *kept) noexcept nogil:
    """The fused kernel on raw pointers (see attention), work items w_start <= w < w_stop
    (w_stop < 0: all): the team size, or -1 when the scratch cannot be allocated. kept:
    the scratch of attention_scratch (64-byte aligned), or NULL to allocate one here."""
    cdef Py_ssize_t n_qblocks = (n_queries + q_block - 1) // q_block
    cdef Py_ssize_t n_work = n_batch * n_qblocks
    cdef Py_ssize_t at[SCR_N]
    cdef Py_ssize_t w
    cdef floating *scratch = kept
    cdef int team = 1, t
    _run_layout(q_block, k_block, n_keys, d_head, d_v, micro, sizeof(floating), at)
    if kept == NULL:
        scratch = <floating*> aligned_alloc(64, n_threads * at[SCR_SIZE] * sizeof(floating))
        if scratch == NULL:
            return -1
        for t in range(n_threads):  # no head's keys or values packed yet
            (<Py_ssize_t*> (scratch + t * at[SCR_SIZE] + at[SCR_PACKED]))[0] = 0
            (<Py_ssize_t*> (scratch + t * at[SCR_SIZE] + at[SCR_PACKED]))[3] = 0
    if w_stop < 0 or w_stop > n_work:
        w_stop = n_work
    if n_threads == 1:
        # No OpenMP region for serial work: entering one costs more than a tiny call.
        for w in range(w_start, w_stop):
            _attend_item(w, n_qblocks, q_block, k_block, q, k, v, add_base, bool_base,
                         mask_kind, index, n_batch, n_queries, n_keys, d_head, d_v, causal,
                         window, <floating> scale, <floating> softcap, sinks, scratch, at,
                         micro, out, lse)
    else:
        # Dynamic: on a shared machine a core that loses time to a neighbour takes fewer
        # items instead of holding the others at the barrier (Zen 5 EPYC, alternating
        # processes: long, medium and causal 0-5% faster, 128 and 256 tokens equal). Items
        # are handed out in order, so a thread's next item is mostly of the same head and
        # reuses its packed keys. Results do not depend on which thread runs an item.
        for w in prange(w_start, w_stop, num_threads=n_threads, schedule='dynamic', chunksize=1):
            _attend_item(w, n_qblocks, q_block, k_block, q, k, v, add_base, bool_base,
                         mask_kind, index, n_batch, n_queries, n_keys, d_head, d_v, causal,
                         window, <floating> scale, <floating> softcap, sinks,
                         scratch + threadid() * at[SCR_SIZE], at, micro, out, lse)
            team = fa_omp_team_size()  # every thread writes the same value
    if kept == NULL:
        free(scratch)
    return team


def attention(const floating[:, :, ::1] q, const floating[:, :, ::1] k,
              const floating[:, :, ::1] v, object mask, int mask_kind,
              const Py_ssize_t[:, ::1] index, bint causal, Py_ssize_t window, double scale,
              double softcap, object sinks, floating[:, :, ::1] out, floating[:, ::1] lse,
              Py_ssize_t q_block, Py_ssize_t k_block, bint microkernels, int n_threads,
              Py_ssize_t w_start=0, Py_ssize_t w_stop=-1, object scratch=None):
    """out[b] = softmax(scale q[i0] k[i1].T + mask[i2]) v[i1], (i0, i1, i2) = index[:, b], fused.

    causal hides keys after each query's own position; window (0: none) also hides keys
    at or before `window` positions back. Key blocks that are entirely hidden are skipped.
    softcap (0: none) caps the scores to softcap tanh(s / softcap) before the masks; sinks
    (None, or one logit per batch entry, shape (n_batch,)) adds a key with that logit and a
    zero value to every softmax row of the entry.

    mask is None (MASK_NONE), a float array added to the scores (MASK_ADD) or a uint8 array,
    0 = hidden (MASK_BOOL), of shape (n_masks, n_queries, n_keys). microkernels: run the
    tile GEMMs in this build's micro-kernels (the caller decides; ignored where the build
    has none) instead of BLAS. Work is split over (batch entry, query block); each item is
    computed start to end by one thread with the same block sizes, so results do not
    depend on the thread count, nor on running the items w_start <= w < w_stop (w_stop -1:
    to the end; item w is query block w % n_qblocks of batch entry w // n_qblocks) in
    several calls, which is how a long call lets Python handle signals between them.
    scratch: None (each call allocates its own), or the attention_scratch of this call's
    sizes and n_threads, passed to each of those calls: one allocation for all of them, and
    the keys a thread packed in one piece serve it in the next. Returns the number of
    threads that ran (the OpenMP team), or -1 if the scratch cannot be allocated.
    """
    cdef const floating[:, :, ::1] add_mask
    cdef const unsigned char[:, :, ::1] bool_mask
    cdef const floating *add_base = NULL
    cdef const unsigned char *bool_base = NULL
    cdef const floating[::1] sink_view
    cdef const floating *sink_base = NULL
    cdef int team
    cdef bint micro = FA_MICROKERNELS != 0 and microkernels
    cdef unsigned char[::1] kept_view
    cdef floating *kept = NULL
    cdef Py_ssize_t at[SCR_N]
    if scratch is not None:
        kept_view = scratch
        _run_layout(q_block, k_block, k.shape[1], q.shape[2], out.shape[2], micro,
                    sizeof(floating), at)
        if kept_view.shape[0] < n_threads * at[SCR_SIZE] * <Py_ssize_t> sizeof(floating) + 64:
            raise ValueError("attention: the scratch is smaller than these sizes need")
        kept = <floating*> _round_up(<Py_ssize_t> &kept_view[0], 64)
    if mask_kind == MASK_BOOL:
        bool_mask = mask
        bool_base = &bool_mask[0, 0, 0]
    elif mask_kind == MASK_ADD:
        add_mask = mask
        add_base = &add_mask[0, 0, 0]
    if sinks is not None:
        sink_view = sinks
        sink_base = &sink_view[0]
    with nogil:
        team = _attention_run(&q[0, 0, 0], &k[0, 0, 0], &v[0, 0, 0], add_base, bool_base,
                              mask_kind, &index[0, 0], out.shape[0], out.shape[1], k.shape[1],
                              q.shape[2], out.shape[2], causal, window, scale, softcap,
                              sink_base, &out[0, 0, 0], &lse[0, 0], q_block, k_block, micro,
                              n_threads, w_start, w_stop, kept)
    return team


def attention_scratch(Py_ssize_t n_keys, Py_ssize_t d_head, Py_ssize_t d_v,
                      Py_ssize_t q_block, Py_ssize_t k_block, bint microkernels,
                      Py_ssize_t itemsize, int n_threads):
    """The per-thread scratch of attention() with these sizes (itemsize 4: float32, 8:
    float64) on n_threads, as a uint8 array (64 bytes over, for alignment), with no keys
    packed yet; for the pieces of one long call, which then share one allocation and
    each thread's packed keys."""
    cdef bint micro = FA_MICROKERNELS != 0 and microkernels
    cdef Py_ssize_t at[SCR_N]
    _run_layout(q_block, k_block, n_keys, d_head, d_v, micro, itemsize, at)
    return _np.zeros(n_threads * at[SCR_SIZE] * itemsize + 64, _np.uint8)

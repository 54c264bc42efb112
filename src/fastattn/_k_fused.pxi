# The fused attention kernel: an online softmax over key tiles.
# Part of _kernels_impl.pxi (see there).
#
# A call is split into work items (batch entry, query block); each is computed start to
# end by one thread (_attend_block), tile by tile of keys: the tile's scores, their online
# softmax update, and P V. With micro-kernels the keys and values are packed once per
# thread and head into the thread's scratch, and reused by its next items of that head.

cdef struct Call:
    # One call of the fused kernel, as every work item reads it (set once per call). The
    # arrays are floating (the call's dtype) unless said.
    const void *q                    # (n_q_items, n_queries, d_head)
    const void *k                    # (n_kv_items, n_keys, d_head)
    const void *v                    # (n_kv_items, n_keys, d_v)
    const void *add_mask             # MASK_ADD: (n_masks, n_queries, n_keys), else NULL
    const unsigned char *bool_mask   # MASK_BOOL: the same shape in uint8, 0 = hidden
    const void *sinks                # NULL, or one logit per batch entry
    const Py_ssize_t *index          # (3, n_batch): the q, k/v and mask entry of entry b
    void *out                        # (n_batch, n_queries, d_v)
    void *lse                        # (n_batch, n_queries)
    Py_ssize_t n_batch, n_queries, n_keys, d_head, d_v
    Py_ssize_t q_block, k_block, n_qblocks, n_work
    # A ragged call (attention_varlen) instead has a table row per batch entry and work
    # item; its n_queries, n_keys and q_block are then the largest of its entries' (what
    # the scratch is sized for), and index and the masks are unused.
    const Py_ssize_t *seqs           # NULL, or (n_batch, SEQ_N): see the SEQ_* fields
    const Py_ssize_t *work           # (n_work, 2): an item's entry and its first query
    # Rows are vectors of one head: d_head (q, k) or d_v (v, out) elements, one of lse.
    # Consecutive tokens of an entry are q_step rows apart in q, out and lse, kv_step in
    # k and v (1 in a uniform call; the head count of the packed arrays in a ragged one).
    Py_ssize_t q_step, kv_step
    # A ragged call whose keys and values lie in pages of a pool (PagedKVCache): an entry's
    # key row r is row r % page_rows of page pages[entry[SEQ_PAGES] + r // page_rows], the
    # pages of its head page_rows rows apart from the entry's SEQ_KV_ROW. NULL: no pages.
    const Py_ssize_t *pages
    Py_ssize_t page_rows
    int mask_kind
    bint causal
    Py_ssize_t window                # 0: none
    double scale, softcap            # softcap 0: none
    bint micro                       # tile GEMMs in the micro-kernels (else BLAS)
    int mk_scores, mk_pv             # ...in these register blocks (the policy's at the call)
    # 16-bit inputs (and float32 ones allowed bfloat16 products), float32 compute only:
    int src_kind                     # what q, k, v hold: FA_SRC_*, or 0 (floating itself)
    Py_ssize_t src_item              # ...bytes per element
    int lowp                         # LP_NONE, LP_WIDEN or LP_ENGINE (_lowp_mode)
    int engine                       # LP_ENGINE: the engine (FA_ENGINE_*)
    Py_ssize_t d_pad                 # LP_ENGINE: d_head padded to whole FA_LP_DSTEP
    int out_kind                     # what out holds: FA_SRC_BF16, FA_SRC_F16, or 0 (floating)


# The fields of a ragged call's entry (one sequence and query head), in rows of the arrays
# (see Call.q_step):
cdef enum:
    SEQ_Q_ROW = 0   # its first query's row of q, and of out and lse
    SEQ_KV_ROW      # its first key's row of k and v
    SEQ_N_Q         # its queries
    SEQ_N_K         # its keys
    SEQ_Q_BLOCK     # its query rows per tile (a uniform call of its sizes would take)
    SEQ_SINK        # its sink's index in the sinks
    SEQ_PAGES       # a paged call: where its page ids start in Call.pages
    SEQ_N


cdef struct Packed:
    # What a thread's scratch holds packed for the micro-kernels, carried from one work
    # item to the next. Keys in panels of FA_MK_KEYS and values in chunks of
    # FA_MK_PV_CHUNK keys, both counted from key 0 of their head.
    const void *k_head               # the head whose keys kp holds (NULL: none yet)
    const void *k_tab                # ...and in a paged call the entry's page ids (every
                                     # sequence's head starts at the same place)
    Py_ssize_t k_from, k_to          # ...its keys [k_from, k_to), whole panels
    const void *v_head               # the head whose values vp holds (NULL: none yet)
    const void *v_tab
    Py_ssize_t v_from, v_to          # ...its chunks [v_from, v_to)


# A thread keeps a head's packed keys in at most this many bytes of its scratch: all of
# them up to 65,536 keys of D 64 in float32 (16 MiB). A longer head's keys are packed in
# runs of that many, again for each query block: memory before speed at such lengths.
# The same for its packed values (where they are not read in place).
cdef enum:
    KP_MAX_BYTES = 16 * 1024 * 1024
    VP_MAX_BYTES = 16 * 1024 * 1024
# The per-thread scratch of the fused kernel, in floating elements from the start of one
# thread's part (computed once per call by _scratch_layout, carved by _attend_block).
cdef enum:
    SCR_S_TILE = 0  # score tile, q_block x s_width
    SCR_O_ACC       # output accumulator, q_block x d_v
    SCR_M_RUN       # running max, q_block
    SCR_KP          # packed keys of a head, d_head x SCR_KP_KEYS (micro-kernels only)
    SCR_VP          # packed values of a head, SCR_VP_CHUNKS chunks (micro-kernels only)
    SCR_QS          # scaled query block, q_block x d_head (micro-kernels only)
    SCR_PB          # LP_ENGINE: the tile's P in bfloat16
    SCR_L_RUN       # running sum, q_block doubles, 64-byte aligned
    SCR_PACKED      # what kp and vp hold: a Packed, carried from item to item
    SCR_SIZE        # the whole part, a multiple of 64 bytes
    SCR_KP_KEYS     # (not a place) how many keys SCR_KP has room for
    SCR_VP_CHUNKS   # (not a place) how many value chunks SCR_VP has room for
    SCR_STAGE       # a paged call: rows of keys or values gathered from their pages
    SCR_N


# A paged call gathers keys and values from their pages in runs of this many rows (whole
# key panels and value chunks of every build), or of one tile's keys for BLAS tiles.
cdef enum:
    STAGE_ROWS = 256


cdef void _scratch_layout(Py_ssize_t rows, Py_ssize_t s_width, Py_ssize_t kp_keys,
                          Py_ssize_t kp_elems, Py_ssize_t vp_chunks, Py_ssize_t vp_elems,
                          Py_ssize_t qs_elems, Py_ssize_t pb_elems, Py_ssize_t d_v, size_t item,
                          Py_ssize_t *at) noexcept nogil:
    """at[SCR_*] = where each buffer starts in one thread's scratch (in elements of item
    bytes), and at[SCR_SIZE] its length, for tiles of `rows` rows: each part and the
    doubles start 64-byte aligned."""
    cdef Py_ssize_t per_line = 64 // item
    at[SCR_S_TILE] = 0
    at[SCR_O_ACC] = _round_up(at[SCR_S_TILE] + rows * s_width, per_line)
    at[SCR_M_RUN] = _round_up(at[SCR_O_ACC] + rows * d_v, per_line)
    at[SCR_KP] = _round_up(at[SCR_M_RUN] + rows, per_line)
    at[SCR_VP] = _round_up(at[SCR_KP] + kp_elems, per_line)
    at[SCR_QS] = _round_up(at[SCR_VP] + vp_elems, per_line)
    at[SCR_PB] = _round_up(at[SCR_QS] + qs_elems, per_line)
    at[SCR_L_RUN] = _round_up(at[SCR_PB] + pb_elems, per_line)
    at[SCR_PACKED] = _round_up(at[SCR_L_RUN] + rows * (sizeof(double) // item), per_line)
    at[SCR_SIZE] = at[SCR_PACKED] + per_line
    at[SCR_KP_KEYS] = kp_keys
    at[SCR_VP_CHUNKS] = vp_chunks


cdef void _run_layout(const Call *c, size_t item, Py_ssize_t *at) noexcept nogil:
    """_scratch_layout for the call c (its sizes, micro and lowp), and a paged call's
    stage after it."""
    _tile_layout(c, item, at)
    cdef Py_ssize_t stage_bytes = 0, per_line = 64 // item
    if c.pages != NULL:
        stage_bytes = (max(<Py_ssize_t> STAGE_ROWS, c.k_block) * max(c.d_head, c.d_v, 1)
                       * c.src_item)
    at[SCR_STAGE] = at[SCR_SIZE]
    at[SCR_SIZE] = at[SCR_SIZE] + _round_up((stage_bytes + item - 1) // item, per_line)


cdef void _tile_layout(const Call *c, size_t item, Py_ssize_t *at) noexcept nogil:
    """_scratch_layout for the call c (its sizes, micro and lowp)."""
    cdef Py_ssize_t q_block = c.q_block, k_block = c.k_block, n_keys = c.n_keys
    cdef Py_ssize_t d_head = c.d_head, d_v = c.d_v
    cdef Py_ssize_t s_width, kp_keys, vp_chunks = 0, chunk, per_item
    if c.lowp == LP_ENGINE:
        # bfloat16 tiles: rows padded to whole tiles, key tiles starting at whole panels;
        # keys, values, queries and P held as bfloat16 (two to a float32 element).
        q_block = _round_up(q_block, FA_LP_ROWS)
        s_width = _round_up(k_block, FA_LP_KEYS)
        kp_keys = max(s_width, KP_MAX_BYTES // (c.d_pad * 2) // FA_LP_KEYS * FA_LP_KEYS)
        kp_keys = min(_round_up(n_keys, FA_LP_KEYS), kp_keys)
        chunk = FA_LP_VCHUNK
        vp_chunks = max((s_width + chunk - 1) // chunk + 1, VP_MAX_BYTES // (chunk * d_v * 2))
        vp_chunks = min((n_keys + chunk - 1) // chunk, vp_chunks)
        per_item = item // 2  # bfloat16 numbers per scratch element
        _scratch_layout(q_block, s_width, kp_keys,
                        _round_up(c.d_pad * kp_keys, per_item) // per_item, vp_chunks,
                        _round_up(vp_chunks * chunk * d_v, per_item) // per_item,
                        _round_up(q_block * c.d_pad, per_item) // per_item,
                        _round_up(q_block * s_width, per_item) // per_item, d_v, item, at)
        return
    if not c.micro:
        _scratch_layout(q_block, k_block, 0, 0, 0, 0, 0, 0, d_v, item, at)
        return
    # Score tile width: the whole key panels a block of k_block keys starting anywhere
    # touches. Room for a head's packed keys, up to KP_MAX_BYTES (and at least one tile's
    # panels).
    s_width = _round_up(k_block, FA_MK_KEYS) + FA_MK_KEYS
    kp_keys = KP_MAX_BYTES // (max(d_head, 1) * <Py_ssize_t> item)
    kp_keys = min(_round_up(n_keys, FA_MK_KEYS), max(s_width, kp_keys // FA_MK_KEYS * FA_MK_KEYS))
    # Room for a head's packed values likewise (at least the chunks one tile touches), or
    # none where they are read in place.
    if (c.lowp == LP_WIDEN or not _values_in_place(d_v, item) or c.kv_step != 1
            or c.pages != NULL):
        vp_chunks = max((k_block + FA_MK_PV_CHUNK - 1) // FA_MK_PV_CHUNK + 1,
                        VP_MAX_BYTES // (FA_MK_PV_CHUNK * max(d_v, 1) * <Py_ssize_t> item))
        vp_chunks = min((n_keys + FA_MK_PV_CHUNK - 1) // FA_MK_PV_CHUNK, vp_chunks)
    _scratch_layout(q_block, s_width, kp_keys, d_head * kp_keys, vp_chunks,
                    vp_chunks * FA_MK_PV_CHUNK * d_v, q_block * d_head, 0, d_v, item, at)


cdef inline void _pack_keys_of(const Call *c, const char *k, Py_ssize_t rows, Py_ssize_t ld,
                               char *kp, Py_ssize_t n_cols, floating *kind) noexcept nogil:
    """kp = keys k (rows of c's input elements) packed for c's tiles, zero keys up to
    n_cols (rows ld elements apart): bfloat16 panels (LP_ENGINE), widened float32 panels
    (LP_WIDEN) or the floating micro-kernels' (kind only names the dtype)."""
    if c.lowp == LP_ENGINE:
        fa_lp_pack_keys(k, c.src_kind, rows, c.d_head, ld, <uint16_t*> kp, n_cols, c.d_pad)
    elif c.lowp == LP_WIDEN:
        fa_lp_pack_keys_widen(k, c.src_kind, rows, c.d_head, ld, <float*> kp, n_cols,
                              FA_MK_KEYS)
    else:
        _pack_keys(<const floating*> k, rows, c.d_head, ld, <floating*> kp, n_cols)


cdef inline void _pack_values_of(const Call *c, const char *v, Py_ssize_t rows, Py_ssize_t ld,
                                 char *vp, Py_ssize_t c_lo, Py_ssize_t c_hi,
                                 floating *kind) noexcept nogil:
    """vp = chunks [c_lo, c_hi) of values v (rows of them, ld elements apart) in c's
    chunk layout, chunk c_lo first (as _pack_keys_of for keys)."""
    if c.lowp == LP_ENGINE:
        fa_lp_pack_values(v, c.src_kind, rows, c.d_v, ld, <uint16_t*> vp, c_lo, c_hi)
    elif c.lowp == LP_WIDEN:
        fa_lp_pack_values_widen(v, c.src_kind, rows, c.d_v, ld, <float*> vp, c_lo, c_hi,
                                FA_MK_PV_CHUNK, FA_MK_PV_NV * FA_MK_VBYTES // 4,
                                FA_MK_VBYTES // 4)
    else:
        _pack_values(<const floating*> v, rows, c.d_v, ld, <floating*> vp, c_lo, c_hi)


cdef inline void _gather_rows(const Call *c, const char *base, const Py_ssize_t *tab,
                              Py_ssize_t r0, Py_ssize_t rows, Py_ssize_t width,
                              char *dst) noexcept nogil:
    """dst = rows [r0, r0 + rows) of a paged entry (its head's pool at base, its page ids
    tab; rows `width` elements), one after another: a copy per run within a page."""
    cdef Py_ssize_t r = r0, run, row_bytes = width * c.src_item, p = c.page_rows
    while r < r0 + rows:
        run = min(p - r % p, r0 + rows - r)
        memcpy(dst + (r - r0) * row_bytes, base + (tab[r // p] * p + r % p) * row_bytes,
               run * row_bytes)
        r = r + run


cdef inline const char *_keys_packed(const Call *c, Packed *packed, const char *k,
                                     const Py_ssize_t *tab, char *stage,
                                     Py_ssize_t n_keys, char *kp, Py_ssize_t kp_keys,
                                     Py_ssize_t k_start, Py_ssize_t k_rows,
                                     floating *kind) noexcept nogil:
    """The key panels that keys [k_start, k_start + k_rows) of head k (of n_keys) touch, in
    kp (room for kp_keys keys), packing those not there yet: where the first of them
    starts. kp is extended while the panels follow on; else it starts again at the tile's
    first panel. tab: a paged entry's page ids (its keys gathered into stage, in runs of
    STAGE_ROWS), or NULL."""
    cdef Py_ssize_t panel = FA_LP_KEYS if c.lowp == LP_ENGINE else FA_MK_KEYS
    cdef Py_ssize_t key_bytes = (c.d_pad * 2 if c.lowp == LP_ENGINE
                                 else c.d_head * <Py_ssize_t> sizeof(floating))
    cdef Py_ssize_t k_panel = k_start // panel * panel
    cdef Py_ssize_t need = _round_up(k_start + k_rows, panel)
    cdef Py_ssize_t r0, cols, real
    if (packed.k_head != <const void*> k or packed.k_tab != <const void*> tab
            or k_panel < packed.k_from or need > packed.k_from + kp_keys):
        packed.k_head, packed.k_tab = k, tab
        packed.k_from = k_panel
        packed.k_to = k_panel
    if packed.k_to < need and tab == NULL:
        _pack_keys_of(c, k + packed.k_to * c.kv_step * c.d_head * c.src_item,
                      min(n_keys, need) - packed.k_to, c.kv_step * c.d_head,
                      kp + (packed.k_to - packed.k_from) * key_bytes, need - packed.k_to, kind)
    elif packed.k_to < need:
        r0 = packed.k_to
        while r0 < need:
            cols = min(<Py_ssize_t> STAGE_ROWS, need - r0)
            real = max(0, min(n_keys, r0 + cols) - r0)
            _gather_rows(c, k, tab, r0, real, c.d_head, stage)
            _pack_keys_of(c, stage, real, c.d_head, kp + (r0 - packed.k_from) * key_bytes,
                          cols, kind)
            r0 = r0 + cols
    packed.k_to = max(packed.k_to, need)
    return kp + (k_panel - packed.k_from) * key_bytes


cdef inline const char *_values_packed(const Call *c, Packed *packed, const char *v,
                                       const Py_ssize_t *tab, char *stage,
                                       Py_ssize_t n_keys, char *vp, Py_ssize_t vp_chunks,
                                       Py_ssize_t k_start, Py_ssize_t k_rows,
                                       floating *kind) noexcept nogil:
    """The value chunks that keys [k_start, k_start + k_rows) of head v (of n_keys) touch,
    in vp (room for vp_chunks chunks), packing those not there yet, as _keys_packed does
    for keys (tab and stage too): vp, whose chunk 0 is chunk packed.v_from of the head."""
    cdef Py_ssize_t chunk = FA_LP_VCHUNK if c.lowp == LP_ENGINE else FA_MK_PV_CHUNK
    cdef Py_ssize_t chunk_bytes = chunk * c.d_v * (2 if c.lowp == LP_ENGINE else sizeof(floating))
    cdef Py_ssize_t v_first = k_start // chunk
    cdef Py_ssize_t v_need = (k_start + k_rows + chunk - 1) // chunk
    cdef const char *src
    cdef char *dst
    cdef Py_ssize_t cc, pc, real
    if (packed.v_head != <const void*> v or packed.v_tab != <const void*> tab
            or v_first < packed.v_from or v_need > packed.v_from + vp_chunks):
        packed.v_head, packed.v_tab = v, tab
        packed.v_from = v_first
        packed.v_to = v_first
    if packed.v_to < v_need and tab == NULL:
        src = v + packed.v_from * chunk * c.kv_step * c.d_v * c.src_item
        dst = vp + (packed.v_to - packed.v_from) * chunk_bytes
        _pack_values_of(c, src, n_keys - packed.v_from * chunk, c.kv_step * c.d_v, dst,
                        packed.v_to - packed.v_from, v_need - packed.v_from, kind)
    elif packed.v_to < v_need:
        cc = packed.v_to
        while cc < v_need:
            pc = min(<Py_ssize_t> STAGE_ROWS // chunk, v_need - cc)
            real = max(0, min(n_keys, (cc + pc) * chunk) - cc * chunk)
            _gather_rows(c, v, tab, cc * chunk, real, c.d_v, stage)
            _pack_values_of(c, stage, real, c.d_v, vp + (cc - packed.v_from) * chunk_bytes,
                            0, pc, kind)
            cc = cc + pc
    packed.v_to = max(packed.v_to, v_need)
    return vp


cdef inline void _online_update(const Call *c, Py_ssize_t n_queries, Py_ssize_t n_keys,
                                floating *s, Py_ssize_t ld, Py_ssize_t q_start,
                                Py_ssize_t q_rows, Py_ssize_t k_start, Py_ssize_t k_rows,
                                floating softcap, const floating *add_mask,
                                const unsigned char *bool_mask, floating *m_run,
                                double *l_run, floating *o_acc) noexcept nogil:
    """Fold a tile of scores s (q_rows x k_rows, row stride ld; queries from q_start,
    keys from k_start, of an entry of n_queries and n_keys) into its rows' running max m,
    sum l and output o: soft-cap and
    mask the scores, s = exp(s - new m) (the P of P V), and l and o rescaled by
    exp(old m - new m). add_mask, bool_mask: this entry's masks (as c.mask_kind says)."""
    cdef Py_ssize_t offset = n_keys - n_queries  # causal: query i sees keys j <= i + offset
    cdef Py_ssize_t window = c.window, d_v = c.d_v
    cdef int mask_kind = c.mask_kind
    cdef bint causal = c.causal
    cdef Py_ssize_t i, j, gi
    cdef floating m_new, m_use, alpha
    cdef floating *s_row
    cdef floating *o_row
    for i in range(q_rows):
        gi = q_start + i
        s_row = s + i * ld
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


cdef void _attend_block(const Call *c, Py_ssize_t w, floating *buf,
                        const Py_ssize_t *at) noexcept nogil:
    """Work item w, query block w % n_qblocks of batch entry w // n_qblocks (in a ragged
    call: the entry and first query of row w of c.work, the entry's sizes from c.seqs): its rows of
    out = softmax(scale q k.T + mask) v by an online softmax over key tiles, and of lse
    = m + log(l), on the scratch buf of this thread (laid out as at says).

    causal and window bound the key tiles: tiles hidden from every row of the block are
    never computed. softcap > 0: the scores become softcap tanh(s / softcap) before the
    masks. A sink is one more key per row with that logit and a zero value, so the
    running max and sum start at (sink, 1) instead of (-inf, 0).

    On bfloat16 tiles (LP_ENGINE) the key tiles start at whole panels of FA_LP_KEYS and
    end at one or at the last key: keys of the widened range that the causal limit or the
    window hide are masked in the tile like any other hidden key, and P is rounded to
    bfloat16 for P V."""
    cdef Py_ssize_t b, q_start, q_block, n_queries, n_keys, q_row, kv_row, mask_item = 0
    cdef Py_ssize_t sink_at
    cdef const Py_ssize_t *entry
    cdef const Py_ssize_t *tab = NULL  # a paged entry's page ids
    if c.seqs == NULL:
        b = w // c.n_qblocks
        q_start, q_block = (w % c.n_qblocks) * c.q_block, c.q_block
        n_queries, n_keys = c.n_queries, c.n_keys
        q_row, kv_row = c.index[b] * n_queries, c.index[c.n_batch + b] * n_keys
        mask_item = c.index[2 * c.n_batch + b]
        sink_at = b
    else:
        b, q_start = c.work[2 * w], c.work[2 * w + 1]
        entry = c.seqs + b * SEQ_N
        q_block, n_queries, n_keys = entry[SEQ_Q_BLOCK], entry[SEQ_N_Q], entry[SEQ_N_K]
        q_row, kv_row, sink_at = entry[SEQ_Q_ROW], entry[SEQ_KV_ROW], entry[SEQ_SINK]
        if c.pages != NULL:
            tab = c.pages + entry[SEQ_PAGES]
    cdef Py_ssize_t out_row = b * n_queries if c.seqs == NULL else q_row
    cdef Py_ssize_t q_rows = min(q_block, n_queries - q_start)
    cdef Py_ssize_t d_head = c.d_head, d_v = c.d_v
    cdef Py_ssize_t item = c.src_item
    cdef const char *q = (<const char*> c.q) + q_row * d_head * item
    cdef const char *k = (<const char*> c.k) + kv_row * d_head * item
    cdef const char *v = (<const char*> c.v) + kv_row * d_v * item
    cdef const floating *add_mask = (<const floating*> c.add_mask) + mask_item * n_queries * n_keys
    cdef const unsigned char *bool_mask = c.bool_mask + mask_item * n_queries * n_keys
    cdef const floating *sink = (<const floating*> c.sinks) + sink_at if c.sinks != NULL else NULL
    cdef floating *out = (<floating*> c.out) + out_row * d_v
    cdef uint16_t *out16 = (<uint16_t*> c.out) + out_row * d_v  # (out_kind set)
    cdef floating *lse = (<floating*> c.lse) + out_row
    cdef floating scale = <floating> c.scale, softcap = <floating> c.softcap
    cdef bint micro = c.micro
    cdef int lowp = c.lowp, engine = c.engine
    # This thread's scratch, carved as _scratch_layout laid it out:
    cdef floating *s_tile = buf + at[SCR_S_TILE]           # scores of a tile, q_rows x ld
    cdef floating *o_acc = buf + at[SCR_O_ACC]             # output so far, q_rows x d_v
    cdef floating *m_run = buf + at[SCR_M_RUN]             # running max of each row
    cdef double *l_run = <double*> (buf + at[SCR_L_RUN])   # running sum of each row
    cdef floating *qs = buf + at[SCR_QS]                   # the scaled query block (micro)
    cdef uint16_t *qb = <uint16_t*> qs                     # ...or in bfloat16 (LP_ENGINE)
    cdef uint16_t *pb = <uint16_t*> (buf + at[SCR_PB])     # P in bfloat16 (LP_ENGINE)
    cdef Packed *packed = <Packed*> (buf + at[SCR_PACKED])
    cdef Py_ssize_t offset = n_keys - n_queries   # causal: query i sees keys j <= i + offset
    cdef Py_ssize_t k_begin = 0, k_end = n_keys, k_start, k_rows, i, j, ld, off = 0, v_next
    cdef Py_ssize_t k_block = c.k_block
    cdef Py_ssize_t rows = _round_up(q_rows, FA_LP_ROWS) if lowp == LP_ENGINE else q_rows
    cdef bint v_in_place = (lowp == LP_NONE and _values_in_place(d_v, sizeof(floating))
                            and c.kv_step == 1 and tab == NULL)
    cdef char *stage = <char*> (buf + at[SCR_STAGE])  # (paged calls)
    cdef Py_ssize_t q_ld = c.q_step * d_head, k_ld = c.kv_step * d_head
    cdef Py_ssize_t v_ld = c.kv_step * d_v, o_ld = c.q_step * d_v
    cdef const floating *kp
    cdef const floating *vb
    cdef const floating *kb   # BLAS tiles: the keys' (or values') rows, kb_ld apart
    cdef Py_ssize_t kb_ld
    cdef Py_ssize_t v_origin
    cdef floating inv
    cdef floating *o_row
    if c.causal:
        # The block's last query sees keys up to q_start + q_rows - 1 + offset.
        k_end = min(n_keys, q_start + q_rows + offset)
    if c.window:
        # ...and its first query none before q_start + offset - window + 1.
        k_begin = max(0, q_start + offset - c.window + 1)
    if lowp == LP_ENGINE:
        k_begin = k_begin // FA_LP_KEYS * FA_LP_KEYS
        k_end = min(n_keys, _round_up(k_end, FA_LP_KEYS))
        k_block = _round_up(k_block, FA_LP_KEYS)
    for i in range(q_rows):
        m_run[i] = -INFINITY if sink == NULL else sink[0]
        l_run[i] = 0 if sink == NULL or sink[0] == -INFINITY else 1
    memset(o_acc, 0, rows * d_v * sizeof(floating))
    if lowp == LP_ENGINE:
        fa_lp_pack_q(q + q_start * q_ld * item, c.src_kind, q_rows, d_head, q_ld, qb, rows,
                     c.d_pad)
        fa_lp_begin(engine)
    elif lowp == LP_WIDEN:
        for i in range(1 if q_ld == d_head else q_rows):
            fa_lp_widen_scaled(q + (q_start + i) * q_ld * item, c.src_kind,
                               q_rows * d_head if q_ld == d_head else d_head, scale,
                               <float*> qs + i * d_head)
    elif micro:
        for i in range(q_rows):
            for j in range(d_head):
                qs[i * d_head + j] = (<const floating*> q)[(q_start + i) * q_ld + j] * scale

    k_start = k_begin
    while k_start < k_end:
        k_rows = min(k_block, k_end - k_start)
        # s_tile = scale Q_blk @ K_blk.T: with micro-kernels, over the whole key panels
        # the tile touches (row stride ld), the tile's first key in column off.
        if lowp == LP_ENGINE:
            kp = <const floating*> _keys_packed(c, packed, k, tab, stage, n_keys, <char*> (buf + at[SCR_KP]),
                                                at[SCR_KP_KEYS], k_start, k_rows, buf)
            ld = _round_up(k_rows, FA_LP_KEYS)
            fa_lp_scores(engine, qb, rows, c.d_pad, <const uint16_t*> kp, ld, <float> scale,
                         <float*> s_tile, ld)
        elif micro:
            kp = <const floating*> _keys_packed(c, packed, k, tab, stage, n_keys, <char*> (buf + at[SCR_KP]),
                                                at[SCR_KP_KEYS], k_start, k_rows, buf)
            off = k_start % FA_MK_KEYS
            ld = _round_up(k_start + k_rows, FA_MK_KEYS) - (k_start - off)
            _mk_scores(c.mk_scores, qs, q_rows, d_head, kp, ld, s_tile, ld)
        else:
            ld = k_rows
            kb, kb_ld = <const floating*> k + k_start * k_ld, k_ld
            if tab != NULL:  # the tile's keys gathered from their pages
                _gather_rows(c, k, tab, k_start, k_rows, d_head, stage)
                kb, kb_ld = <const floating*> stage, d_head
            _gemm(True, <int> q_rows, <int> k_rows, <int> d_head, scale,
                  <const floating*> q + q_start * q_ld, <int> q_ld,
                  kb, <int> kb_ld, 0, s_tile, <int> k_rows)
        _online_update(c, n_queries, n_keys, s_tile + off, ld, q_start, q_rows, k_start, k_rows, softcap,
                       add_mask, bool_mask, m_run, l_run, o_acc)
        # o_acc (q_rows x d_v) += P (q_rows x k_rows) @ V_blk (k_rows x d_v)
        if lowp == LP_ENGINE:
            fa_lp_pack_p(<float*> s_tile, ld, q_rows, k_rows, pb, ld, rows)
            vb = <const floating*> _values_packed(c, packed, v, tab, stage, n_keys, <char*> (buf + at[SCR_VP]),
                                                  at[SCR_VP_CHUNKS], k_start, k_rows, buf)
            v_origin = packed.v_from * FA_LP_VCHUNK
            fa_lp_pv(engine, pb, ld, rows, <const uint16_t*> vb, k_start - v_origin, ld, d_v,
                     <float*> o_acc)
        elif micro:
            # vb: the values in the chunk layout, from key v_origin, holding v_next keys
            # after the tile (the next tile's, prefetched during this one).
            vb, v_origin, v_next = <const floating*> v, 0, k_end - k_start - k_rows
            if not v_in_place:
                vb = <const floating*> _values_packed(c, packed, v, tab, stage, n_keys, <char*> (buf + at[SCR_VP]),
                                                      at[SCR_VP_CHUNKS], k_start, k_rows, buf)
                v_origin = packed.v_from * FA_MK_PV_CHUNK
                v_next = min(v_next, packed.v_to * FA_MK_PV_CHUNK - k_start - k_rows)
            _mk_pv(c.mk_pv, s_tile + off, ld, q_rows, vb, k_start - v_origin, k_rows, max(v_next, 0),
                   d_v, o_acc)
        else:
            kb, kb_ld = <const floating*> v + k_start * v_ld, v_ld
            if tab != NULL:
                _gather_rows(c, v, tab, k_start, k_rows, d_v, stage)
                kb, kb_ld = <const floating*> stage, d_v
            _gemm(False, <int> q_rows, <int> d_v, <int> k_rows, 1, s_tile, <int> k_rows,
                  kb, <int> kb_ld, 1, o_acc, <int> d_v)
        k_start = k_start + k_rows
    if lowp == LP_ENGINE:
        fa_lp_end(engine)

    for i in range(q_rows):
        # (written into o_acc first where out holds 16-bit numbers)
        o_row = out + (q_start + i) * o_ld if c.out_kind == 0 else o_acc + i * d_v
        if l_run[i] == 0:
            # Every key hidden from this query: zeros, as PyTorch and FlashAttention give.
            for j in range(d_v):
                o_row[j] = 0
        else:
            inv = <floating> (1.0 / l_run[i])
            for j in range(d_v):
                o_row[j] = o_acc[i * d_v + j] * inv
        if c.out_kind != 0:
            fa_lp_narrow(<float*> o_row, d_v, c.out_kind, out16 + (q_start + i) * o_ld)
        lse[(q_start + i) * c.q_step] = <floating> (m_run[i] + log(l_run[i]))


cdef int _attention_run(const Call *c, floating *kept, int n_threads, Py_ssize_t w_start,
                        Py_ssize_t w_stop) noexcept nogil:
    """The fused kernel (see attention) for the call c, work items w_start <= w < w_stop
    (w_stop < 0: all), on n_threads: the team size, or -1 when the scratch cannot be
    allocated. kept: the scratch of attention_scratch (64-byte aligned), or NULL to
    allocate one here (its type, floating *, names the call's dtype)."""
    cdef Py_ssize_t n_work = c.n_work
    cdef Py_ssize_t at[SCR_N]
    cdef Py_ssize_t w
    cdef floating *scratch = kept
    cdef int team = 1, t
    _run_layout(c, sizeof(floating), at)
    if kept == NULL:
        scratch = <floating*> aligned_alloc(64, n_threads * at[SCR_SIZE] * sizeof(floating))
        if scratch == NULL:
            return -1
        for t in range(n_threads):  # no head's keys or values packed yet
            (<Packed*> (scratch + t * at[SCR_SIZE] + at[SCR_PACKED])).k_head = NULL
            (<Packed*> (scratch + t * at[SCR_SIZE] + at[SCR_PACKED])).v_head = NULL
    if w_stop < 0 or w_stop > n_work:
        w_stop = n_work
    if n_threads == 1:
        # No OpenMP region for serial work: entering one costs more than a tiny call.
        for w in range(w_start, w_stop):
            _attend_block(c, w, scratch, at)
    else:
        # Dynamic: on a shared machine a core that loses time to a neighbour takes fewer
        # items instead of holding the others at the barrier. Items are handed out in
        # order, so a thread's next item is mostly of the same head and reuses its packed
        # keys. Results do not depend on which thread runs an item.
        for w in prange(w_start, w_stop, num_threads=n_threads, schedule='dynamic', chunksize=1):
            _attend_block(c, w, scratch + threadid() * at[SCR_SIZE], at)
            team = fa_omp_team_size()  # every thread writes the same value
    if kept == NULL:
        free(scratch)
    return team


cdef void _call_sizes(Call *c, Py_ssize_t n_batch, Py_ssize_t n_queries, Py_ssize_t n_keys,
                      Py_ssize_t d_head, Py_ssize_t d_v, Py_ssize_t q_block,
                      Py_ssize_t k_block) noexcept nogil:
    """Set c's sizes (and its count of query blocks)."""
    c.n_batch, c.n_queries, c.n_keys, c.d_head, c.d_v = n_batch, n_queries, n_keys, d_head, d_v
    c.q_block, c.k_block = q_block, k_block
    c.n_qblocks = (n_queries + q_block - 1) // q_block
    c.n_work = n_batch * c.n_qblocks
    c.q_step, c.kv_step = 1, 1


cdef object _call_ragged(Call *c, object ragged):
    """Make c a ragged call when ragged is (seqs, work, n_queries, n_keys, q_block, q_step,
    kv_step[, pages, page_rows]): its tables (SEQ_N columns per entry; entry and first
    query per work item, at least one), the largest sizes of its entries, the row steps
    (Call.q_step) and, for keys and values in pages, the page ids and rows per page.
    Returns the tables' views, to keep them alive."""
    cdef const Py_ssize_t[:, ::1] seqs
    cdef const Py_ssize_t[:, ::1] work
    cdef const Py_ssize_t[::1] pages
    if ragged is None:
        return None
    seqs, work = ragged[0], ragged[1]
    if seqs.shape[1] != SEQ_N or work.shape[1] != 2 or work.shape[0] == 0:
        raise ValueError("attention: a ragged call's tables have the wrong shape")
    c.seqs, c.work = &seqs[0, 0], &work[0, 0]
    c.n_batch, c.n_work = seqs.shape[0], work.shape[0]
    c.n_queries, c.n_keys, c.q_block = ragged[2], ragged[3], ragged[4]
    c.q_step, c.kv_step = ragged[5], ragged[6]
    if len(ragged) > 7 and ragged[7] is not None:
        pages = ragged[7]
        c.pages, c.page_rows = &pages[0] if pages.shape[0] else NULL, ragged[8]
        if c.pages == NULL:
            raise ValueError("attention: a paged call needs its page table")
        return seqs, work, pages
    return seqs, work


cdef inline void _call_blocks(Call *c, floating *kind) noexcept nogil:
    """Set c's micro-kernel register blocks: the policy's for the compute dtype (kind's)."""
    if floating is float:
        c.mk_scores, c.mk_pv = _policy.mk_scores_f, _policy.mk_pv_f
    else:
        c.mk_scores, c.mk_pv = _policy.mk_scores_d, _policy.mk_pv_d


cdef object _call_options(Call *c, object mask, int mask_kind,
                          const Py_ssize_t[:, ::1] index, bint causal, Py_ssize_t window,
                          double scale, double softcap, object sinks, floating *kind):
    """Set c's masks, index, causal, window, scale, soft cap and sinks from attention()'s
    arguments (mask and sinks in the compute dtype, which kind names); returns the
    buffers c points into, to keep them alive for the call."""
    cdef const floating[:, :, ::1] add_mask
    cdef const unsigned char[:, :, ::1] bool_mask
    cdef const floating[::1] sink_view
    c.index = &index[0, 0]
    _call_blocks(c, kind)
    c.mask_kind, c.causal, c.window, c.scale, c.softcap = mask_kind, causal, window, scale, softcap
    kept = [index]
    if mask_kind == MASK_BOOL:
        bool_mask = mask
        c.bool_mask = &bool_mask[0, 0, 0]
        kept.append(bool_mask)
    elif mask_kind == MASK_ADD:
        add_mask = mask
        c.add_mask = &add_mask[0, 0, 0]
        kept.append(add_mask)
    if sinks is not None:
        sink_view = sinks
        c.sinks = &sink_view[0]
        kept.append(sink_view)
    return kept


cdef floating *_kept_scratch(const Call *c, object scratch, int n_threads,
                             floating *kind) except? NULL:
    """The 64-byte aligned start of scratch (attention_scratch's array) after checking that
    it is large enough for c on n_threads; NULL for None."""
    cdef unsigned char[::1] kept_view
    cdef Py_ssize_t at[SCR_N]
    if scratch is None:
        return NULL
    kept_view = scratch
    _run_layout(c, sizeof(floating), at)
    if kept_view.shape[0] < n_threads * at[SCR_SIZE] * <Py_ssize_t> sizeof(floating) + 64:
        raise ValueError("attention: the scratch is smaller than these sizes need")
    return <floating*> _round_up(<Py_ssize_t> &kept_view[0], 64)


def attention(const floating[:, :, ::1] q, const floating[:, :, ::1] k,
              const floating[:, :, ::1] v, object mask, int mask_kind,
              const Py_ssize_t[:, ::1] index, bint causal, Py_ssize_t window, double scale,
              double softcap, object sinks, floating[:, :, ::1] out, floating[:, ::1] lse,
              Py_ssize_t q_block, Py_ssize_t k_block, bint microkernels, int n_threads,
              Py_ssize_t w_start=0, Py_ssize_t w_stop=-1, object scratch=None,
              object ragged=None):
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

    ragged: None, or a ragged call (attention_varlen) as (seqs, work, n_queries, n_keys,
    q_block, q_step, kv_step): q, k, v, out (tokens, heads, width) and lse (tokens, heads)
    packed token-major, read as rows of one head (q_step = out and lse's heads, kv_step =
    k and v's); seqs (n_entries, SEQ_N) gives each entry (sequence and query head) its
    first rows and sizes, work (n_work, 2) each work item's entry and first query, the
    others its entries' largest sizes; with (..., pages, page_rows) more, k and v are
    pools (kv_heads x pages, page_rows, width) and an entry's keys lie in the pages
    pages[entry's SEQ_PAGES:] of the head whose rows start at its SEQ_KV_ROW (Call.pages).
    index and mask are then unused.
    """
    cdef floating *kept
    cdef int team
    cdef Call c
    memset(&c, 0, sizeof(Call))
    _call_sizes(&c, out.shape[0], out.shape[1], k.shape[1], q.shape[2], out.shape[2],
                q_block, k_block)
    tables = _call_ragged(&c, ragged)
    c.q, c.k, c.v = &q[0, 0, 0], &k[0, 0, 0], &v[0, 0, 0]
    c.out, c.lse = &out[0, 0, 0], &lse[0, 0]
    c.micro = FA_MICROKERNELS != 0 and microkernels
    c.src_item = sizeof(floating)
    alive = _call_options(&c, mask, mask_kind, index, causal, window, scale, softcap, sinks,
                          &out[0, 0, 0])
    kept = _kept_scratch(&c, scratch, n_threads, &out[0, 0, 0])
    with nogil:
        team = _attention_run(&c, kept, n_threads, w_start, w_stop)
    return team


cdef void _call_lowp(Call *c, str kind, Py_ssize_t d_head_bytes) except *:
    """Set c's 16-bit form (src_kind, src_item, d_head, lowp, engine, d_pad) for inputs of
    kind ("bfloat16", "float16", or "float32" allowed bfloat16 products) whose rows are
    d_head_bytes long; raises if the fused kernel does not take them (_lowp_mode)."""
    c.src_kind = _SRC_KINDS[kind]
    c.src_item = 4 if c.src_kind == FA_SRC_F32 else 2
    c.d_head = d_head_bytes // c.src_item
    c.lowp = _lowp_mode(c.src_kind, c.d_head, c.d_v)
    if c.lowp == LP_NONE:
        raise ValueError(f"attention_lowp: {kind} inputs of these head sizes run converted")
    c.micro = True
    c.engine = _policy.engine if c.lowp == LP_ENGINE else FA_ENGINE_NONE
    c.d_pad = _round_up(c.d_head, FA_LP_DSTEP)


def attention_lowp(str kind, const unsigned char[:, :, ::1] q, const unsigned char[:, :, ::1] k,
                   const unsigned char[:, :, ::1] v, object mask, int mask_kind,
                   const Py_ssize_t[:, ::1] index, bint causal, Py_ssize_t window, double scale,
                   double softcap, object sinks, str out_kind, unsigned char[:, :, ::1] out,
                   float[:, ::1] lse, Py_ssize_t q_block, Py_ssize_t k_block, int n_threads,
                   Py_ssize_t w_start=0, Py_ssize_t w_stop=-1, object scratch=None,
                   object ragged=None):
    """attention() for inputs of kind "bfloat16" or "float16" (q, k, v: their bytes, as
    uint8 arrays whose last axis is 2 D long) or "float32" allowed bfloat16 products (4 D
    long), computed in float32 (lse, mask and sinks float32): on bfloat16 tiles where
    _lowp_mode says LP_ENGINE, else widened in the packing for the float32 micro-kernels.
    out: the bytes of the output, of out_kind "float32", "bfloat16" or "float16" (rounded
    to nearest even once, from float32). The other arguments, the pieces, the scratch and
    ragged as attention()'s."""
    cdef float *kept
    cdef int team
    cdef Call c
    memset(&c, 0, sizeof(Call))
    c.out_kind = 0 if out_kind == "float32" else _SRC_KINDS[out_kind]
    _call_sizes(&c, out.shape[0], out.shape[1], k.shape[1], 0,
                out.shape[2] // (4 if c.out_kind == 0 else 2), q_block, k_block)
    _call_lowp(&c, kind, q.shape[2])
    tables = _call_ragged(&c, ragged)
    c.q, c.k, c.v = &q[0, 0, 0], &k[0, 0, 0], &v[0, 0, 0]
    c.out, c.lse = &out[0, 0, 0], &lse[0, 0]
    alive = _call_options(&c, mask, mask_kind, index, causal, window, scale, softcap, sinks,
                          &lse[0, 0])
    kept = _kept_scratch(&c, scratch, n_threads, &lse[0, 0])
    with nogil:
        team = _attention_run(&c, kept, n_threads, w_start, w_stop)
    return team


def attention_scratch(Py_ssize_t n_keys, Py_ssize_t d_head, Py_ssize_t d_v,
                      Py_ssize_t q_block, Py_ssize_t k_block, bint microkernels,
                      Py_ssize_t itemsize, int n_threads, str lowp_kind=None,
                      Py_ssize_t kv_step=1, bint paged=False):
    """The per-thread scratch of attention() with these sizes (itemsize 4: float32, 8:
    float64) on n_threads, as a uint8 array (64 bytes over, for alignment), with no keys
    packed yet; for the pieces of one long call, which then share one allocation and
    each thread's packed keys. lowp_kind: that of attention_lowp (d_head in elements).
    kv_step: a ragged call's (its values are then packed, never read in place); paged: a
    paged call's (room for its stage)."""
    cdef Py_ssize_t one_page = 0
    cdef Py_ssize_t at[SCR_N]
    cdef Call c
    memset(&c, 0, sizeof(Call))
    _call_sizes(&c, 1, q_block, n_keys, d_head, d_v, q_block, k_block)
    c.kv_step = kv_step
    if paged:
        c.pages = &one_page  # (only its being set counts here)
    c.micro = FA_MICROKERNELS != 0 and microkernels
    c.src_item = itemsize
    if lowp_kind is not None:
        _call_lowp(&c, lowp_kind, d_head * (4 if lowp_kind == "float32" else 2))
    _run_layout(&c, itemsize, at)
    return _np.zeros(n_threads * at[SCR_SIZE] * itemsize + 64, _np.uint8)

/* The micro-kernels of one dtype: included by fa_microkernels.h once per compute dtype, with
 * FA_T (float or double) and FA_SFX (f or d) defined before it, so that each function
 * exists as fa_mk_scores_f, fa_mk_scores_d and so on. No include guard, on purpose. The
 * design (register blocks, packing, runs of P V) is described in fa_microkernels.h. */
#if !defined(FA_T) || !defined(FA_SFX)
#error "define FA_T and FA_SFX before including fa_mk_kernels.h"
#endif

#if FA_MICROKERNELS

typedef FA_T FA_FN(fa_mkv_) __attribute__((vector_size(FA_MK_VBYTES)));
typedef FA_T FA_FN(fa_mkvu_) __attribute__((vector_size(FA_MK_VBYTES), aligned(sizeof(FA_T))));
enum { FA_FN(FA_MK_W_) = FA_MK_VBYTES / sizeof(FA_T) };

/* s[r][j] = sum_t q[r][t] kp[t][j] for r < mr and the nv vectors of columns from vector
 * g0 of the packed key panels kp (each d x PNV W, contiguous; the block lies within one
 * panel when nv <= PNV, and spans nv / PNV whole panels from g0 otherwise). */
static inline __attribute__((always_inline)) void FA_FN(fa_mk_scores_block_)(
    const int mr, const int nv, const FA_T *q, ptrdiff_t d, const FA_T *kp, ptrdiff_t g0,
    FA_T *s, ptrdiff_t ld)
{
    enum { W = FA_FN(FA_MK_W_), PNV = FA_MK_SCORES_NV, KR = PNV * W };
    const FA_T *base = kp + g0 / PNV * KR * d + g0 % PNV * W;
    FA_FN(fa_mkv_) c[FA_MK_MAX_MR][FA_MK_MAX_NV];  /* mr x nv used */
    for (int r = 0; r < mr; r++)
        for (int u = 0; u < nv; u++) c[r][u] = (FA_FN(fa_mkv_)){0};
    for (ptrdiff_t t = 0; t < d; t++) {
        FA_FN(fa_mkv_) b[FA_MK_MAX_NV];
        for (int u = 0; u < nv; u++)
            b[u] = *(const FA_FN(fa_mkvu_) *)(base + u / PNV * KR * d + u % PNV * W + t * KR);
        for (int r = 0; r < mr; r++) {
            const FA_FN(fa_mkv_) a = FA_FN(FA_MK_BCAST_)(q + r * d + t);
            for (int u = 0; u < nv; u++) c[r][u] += a * b[u];
        }
    }
    for (int r = 0; r < mr; r++)
        for (int u = 0; u < nv; u++)
            *(FA_FN(fa_mkvu_) *)(s + r * ld + (g0 + u) * W) = c[r][u];
}

/* Every row of q against the nv column vectors from g0, in blocks of MR rows. */
static inline __attribute__((always_inline)) void FA_FN(fa_mk_scores_cols_)(
    const int MR, const int nv, const FA_T *q, ptrdiff_t rows, ptrdiff_t d, const FA_T *kp,
    ptrdiff_t g0, FA_T *s, ptrdiff_t ld)
{
#define FA_MK_SCORES_ROWS_(h, nv_) \
    FA_FN(fa_mk_scores_block_)(h, nv_, q + i0 * d, d, kp, g0, s + i0 * ld, ld)
    ptrdiff_t i0 = 0;
    for (; i0 + MR <= rows; i0 += MR) FA_MK_SCORES_ROWS_(MR, nv);
    FA_MK_LEFTOVER(FA_MK_SCORES_ROWS_, rows - i0, nv)
#undef FA_MK_SCORES_ROWS_
}

/* s[i][j] = sum_t q[i][t] k[j][t] for i < rows, j < n_cols (a multiple of FA_MK_KEYS):
 * q is (rows x d) row-major, kp the key block packed by fa_pack_keys, s has row stride
 * ld; in register blocks of MR rows x NV vectors (the vectors left over from NV, whole
 * panels, in blocks of one panel). */
static inline __attribute__((always_inline)) void FA_FN(fa_mk_scores_mrnv_)(
    const int MR, const int NV, const FA_T *q, ptrdiff_t rows, ptrdiff_t d, const FA_T *kp,
    ptrdiff_t n_cols, FA_T *s, ptrdiff_t ld)
{
    enum { PNV = FA_MK_SCORES_NV };
    const ptrdiff_t vectors = n_cols / FA_FN(FA_MK_W_);
    ptrdiff_t g0 = 0;
    for (; g0 + NV <= vectors; g0 += NV)
        FA_FN(fa_mk_scores_cols_)(MR, NV, q, rows, d, kp, g0, s, ld);
    if (NV > PNV)
        for (; g0 < vectors; g0 += PNV)
            FA_FN(fa_mk_scores_cols_)(MR, PNV, q, rows, d, kp, g0, s, ld);
}

/* fa_mk_scores_mrnv_ with the register block `block` of FA_MK_SCORES_BLOCKS (out of range:
 * the first, the default). Every block gives the same bits: each score sums its d
 * products in order, whichever block holds its accumulator. */
static inline void FA_FN(fa_mk_scores_)(int block, const FA_T *q, ptrdiff_t rows, ptrdiff_t d,
                                         const FA_T *kp, ptrdiff_t n_cols, FA_T *s, ptrdiff_t ld)
{
    switch (block) {
#define FA_MK_CASE_(mr, nv) \
    case FA_MK_SCORES_##mr##x##nv: \
        FA_FN(fa_mk_scores_mrnv_)(mr, nv, q, rows, d, kp, n_cols, s, ld); return;
    FA_MK_SCORES_BLOCKS(FA_MK_CASE_)
#undef FA_MK_CASE_
    default: break;
    }
    FA_FN(fa_mk_scores_)(0, q, rows, d, kp, n_cols, s, ld);
}

/* o[r][c] += sum_j p[r][j] vp[j][c] for r < mr, c < nv W: one register block; vp is nv
 * vectors of columns of a packed band of values bw vectors wide (n_keys x bw W,
 * contiguous), o already offset to its column. */
static inline __attribute__((always_inline)) void FA_FN(fa_mk_pv_block_)(
    const int mr, const int nv, const int bw, const FA_T *p, ptrdiff_t ld_p, const FA_T *vp,
    ptrdiff_t n_keys, ptrdiff_t d_v, FA_T *o)
{
    enum { W = FA_FN(FA_MK_W_) };
    FA_FN(fa_mkv_) c[FA_MK_MAX_MR][FA_MK_MAX_NV];  /* mr x nv used */
    for (int r = 0; r < mr; r++)
        for (int u = 0; u < nv; u++) c[r][u] = *(const FA_FN(fa_mkvu_) *)(o + r * d_v + u * W);
    for (ptrdiff_t j = 0; j < n_keys; j++) {
        FA_FN(fa_mkv_) b[FA_MK_MAX_NV];
        for (int u = 0; u < nv; u++) b[u] = *(const FA_FN(fa_mkvu_) *)(vp + (j * bw + u) * W);
        for (int r = 0; r < mr; r++) {
            const FA_FN(fa_mkv_) a = FA_FN(FA_MK_BCAST_)(p + r * ld_p + j);
            for (int u = 0; u < nv; u++) c[r][u] += a * b[u];
        }
    }
    for (int r = 0; r < mr; r++)
        for (int u = 0; u < nv; u++) *(FA_FN(fa_mkvu_) *)(o + r * d_v + u * W) = c[r][u];
}

/* One column band of bw vectors and a run of keys: each nv vectors of it (nv divides bw)
 * for every row, in blocks of MR and then the rows left; the register blocks of the run
 * share the prefetch of the next run (next_lines lines at next, or NULL) between them. */
static inline __attribute__((always_inline)) void FA_FN(fa_mk_pv_run_)(
    const int MR, const int nv, const int bw, const FA_T *p, ptrdiff_t ld_p, ptrdiff_t rows,
    const FA_T *v, ptrdiff_t n_keys, ptrdiff_t d_v, FA_T *o, const FA_T *next,
    ptrdiff_t next_lines)
{
    enum { W = FA_FN(FA_MK_W_) };
    const ptrdiff_t blocks = rows / MR * (bw / nv);
    const ptrdiff_t per = next != NULL && blocks > 0 ? (next_lines + blocks - 1) / blocks : 0;
    ptrdiff_t line = 0;
#define FA_MK_PV_ROWS_(h, u0_) \
    FA_FN(fa_mk_pv_block_)(h, nv, bw, p + i0 * ld_p, ld_p, v + (u0_) * W, n_keys, d_v, \
                           o + i0 * d_v + (u0_) * W)
    for (int u0 = 0; u0 < bw; u0 += nv) {
        ptrdiff_t i0 = 0;
        for (; i0 + MR <= rows; i0 += MR, line += per) {
            fa_mk_prefetch_lines(next, line, line + per < next_lines ? line + per : next_lines);
            FA_MK_PV_ROWS_(MR, u0);
        }
        FA_MK_LEFTOVER(FA_MK_PV_ROWS_, rows - i0, u0)
    }
#undef FA_MK_PV_ROWS_
}

/* Where key j's values of the band at column c0 (nv vectors wide) are in the chunk
 * layout vp (see fa_pack_values). */
static inline __attribute__((always_inline)) const FA_T *FA_FN(fa_mk_pv_at_)(
    const FA_T *vp, ptrdiff_t j, ptrdiff_t c0, int nv, ptrdiff_t d_v)
{
    enum { CH = FA_MK_PV_CHUNK };
    return vp + j / CH * CH * d_v + c0 * CH + j % CH * nv * FA_FN(FA_MK_W_);
}

/* The first run of the band at column c0 from key j, up to n keys: where it starts
 * (NULL if there is no such band or no key) and its cache lines in *lines. */
static inline const FA_T *FA_FN(fa_mk_pv_first_run_)(const FA_T *vp, ptrdiff_t j, ptrdiff_t n,
                                                   ptrdiff_t c0, ptrdiff_t d_v,
                                                   ptrdiff_t *lines)
{
    enum { CH = FA_MK_PV_CHUNK, W = FA_FN(FA_MK_W_), NV = FA_MK_PV_NV };
    const int nv = c0 + NV * W <= d_v ? NV : 1;
    const ptrdiff_t keys = CH - j % CH < n ? CH - j % CH : n;
    *lines = keys * nv * FA_MK_VBYTES / 64;
    return c0 < d_v && n > 0 ? FA_FN(fa_mk_pv_at_)(vp, j, c0, nv, d_v) : NULL;
}

/* One column band of bw vectors at column c0, keys [j0, j0 + n_keys) of the chunk
 * layout vp: for each run of the band's keys within one chunk in turn, every row in
 * register blocks of MR rows x nv vectors (fa_mk_pv_run_), each run prefetching the next
 * one, and the last `next` (next_lines lines: the next band's first run, or NULL). */
static inline __attribute__((always_inline)) void FA_FN(fa_mk_pv_band_)(
    const int MR, const int nv, const int bw, const FA_T *p, ptrdiff_t ld_p, ptrdiff_t rows,
    const FA_T *vp, ptrdiff_t c0, ptrdiff_t j0, ptrdiff_t n_keys, ptrdiff_t d_v, FA_T *o,
    const FA_T *next_band, ptrdiff_t next_band_lines)
{
    enum { CH = FA_MK_PV_CHUNK };
    const ptrdiff_t end = j0 + n_keys;
    for (ptrdiff_t j = j0; j < end;) {
        const ptrdiff_t j1 = (j / CH + 1) * CH < end ? (j / CH + 1) * CH : end;
        const FA_T *next = next_band;
        ptrdiff_t lines = next_band_lines;
        if (j1 < end) {
            next = FA_FN(fa_mk_pv_at_)(vp, j1, c0, bw, d_v);
            lines = (end - j1 < CH ? end - j1 : CH) * bw * FA_MK_VBYTES / 64;
        }
        FA_FN(fa_mk_pv_run_)(MR, nv, bw, p + (j - j0), ld_p, rows,
                              FA_FN(fa_mk_pv_at_)(vp, j, c0, bw, d_v), j1 - j, d_v,
                              o + c0, next, lines);
        j = j1;
    }
}

/* o[i][c] += sum_j p[i][j] v[j0 + j][c] for i < rows, j < n_keys, c < d_v (a multiple
 * of W): p has row stride ld_p, v is the chunk layout vp (fa_pack_values) counted from
 * its chunk 0, o (rows x d_v) row-major. Bands of FA_MK_PV_NV vectors of columns, then
 * of one vector for the columns left, in register blocks of MR rows x NV vectors (NV
 * divides FA_MK_PV_NV; one vector in the band of one). next_keys (>= 0): how many keys
 * after the block are in vp too (the next block's, whose first run is prefetched during
 * this block's last). */
static inline __attribute__((always_inline)) void FA_FN(fa_mk_pv_mrnv_)(
    const int MR, const int NV, const FA_T *p, ptrdiff_t ld_p, ptrdiff_t rows, const FA_T *vp,
    ptrdiff_t j0, ptrdiff_t n_keys, ptrdiff_t next_keys, ptrdiff_t d_v, FA_T *o)
{
    enum { W = FA_FN(FA_MK_W_), BW = FA_MK_PV_NV };
    ptrdiff_t c0 = 0, lines;
    const FA_T *next;
    for (; c0 + BW * W <= d_v; c0 += BW * W) {
        next = c0 + BW * W < d_v
            ? FA_FN(fa_mk_pv_first_run_)(vp, j0, n_keys, c0 + BW * W, d_v, &lines)
            : FA_FN(fa_mk_pv_first_run_)(vp, j0 + n_keys, next_keys, 0, d_v, &lines);
        FA_FN(fa_mk_pv_band_)(MR, NV, BW, p, ld_p, rows, vp, c0, j0, n_keys, d_v, o, next,
                              lines);
    }
    for (; c0 < d_v; c0 += W) {
        next = c0 + W < d_v
            ? FA_FN(fa_mk_pv_first_run_)(vp, j0, n_keys, c0 + W, d_v, &lines)
            : FA_FN(fa_mk_pv_first_run_)(vp, j0 + n_keys, next_keys, 0, d_v, &lines);
        FA_FN(fa_mk_pv_band_)(MR, 1, 1, p, ld_p, rows, vp, c0, j0, n_keys, d_v, o, next, lines);
    }
}

/* fa_mk_pv_mrnv_ with the register block `block` of FA_MK_PV_BLOCKS (out of range: the
 * first, the default). Every block gives the same bits: each output adds its keys'
 * products in order, whichever block holds its accumulator between runs. */
static inline void FA_FN(fa_mk_pv_)(int block, const FA_T *p, ptrdiff_t ld_p, ptrdiff_t rows,
                                     const FA_T *vp, ptrdiff_t j0, ptrdiff_t n_keys,
                                     ptrdiff_t next_keys, ptrdiff_t d_v, FA_T *o)
{
    switch (block) {
#define FA_MK_CASE_(mr, nv) \
    case FA_MK_PV_##mr##x##nv: \
        FA_FN(fa_mk_pv_mrnv_)(mr, nv, p, ld_p, rows, vp, j0, n_keys, next_keys, d_v, o); return;
    FA_MK_PV_BLOCKS(FA_MK_CASE_)
#undef FA_MK_CASE_
    default: break;
    }
    FA_FN(fa_mk_pv_)(0, p, ld_p, rows, vp, j0, n_keys, next_keys, d_v, o);
}

/* The chunk layout of a head's values, which fa_mk_pv reads: keys in chunks of
 * FA_MK_PV_CHUNK (one run), chunk c holding its keys' column bands one after another:
 * the band of columns [c0, c0 + bw) at c CH d_v + c0 CH, key jj of the chunk at + jj bw
 * (bw = NV W, then W for the columns left). Each run then streams from one contiguous
 * piece rather than a line every d_v elements (whose cache sets alias when d_v is a
 * power of two). Where d_v is one band of NV W (float32 D 64 in the AVX-512 build),
 * this is v's own row-major layout, and v is read in place (fa_mk_values_in_place).
 * Chunks, not one block per tile, so that a head's values are packed once per thread
 * and serve every query block after it, whatever keys its tiles start at. */
static inline int FA_FN(fa_mk_values_in_place_)(ptrdiff_t d_v)
{
    return d_v == FA_MK_PV_NV * FA_FN(FA_MK_W_);
}

/* vp (chunks c_lo <= c < c_hi of the layout, chunk c_lo first) = v's keys
 * [c_lo CH, min(n_keys, c_hi CH)) (v: n_keys x d_v, rows ldv apart; d_v a multiple of W). */
static inline void FA_FN(fa_pack_values_)(const FA_T *v, ptrdiff_t n_keys, ptrdiff_t d_v,
                                           ptrdiff_t ldv, FA_T *vp, ptrdiff_t c_lo,
                                           ptrdiff_t c_hi)
{
    enum { W = FA_FN(FA_MK_W_), NV = FA_MK_PV_NV, CH = FA_MK_PV_CHUNK };
    /* v is read row after row, once (a pass per band read every row d_v / bw times and
     * stalled on its misses); each copy is whole vectors (d_v is a multiple of W here):
     * explicit vector moves, since GCC turned the element loop into scalar moves and
     * memcpy of a variable width into rep movsq. */
    typedef FA_FN(fa_mkvu_) V;
    const ptrdiff_t full = d_v / (NV * W) * (NV * W);
    const ptrdiff_t j_end = n_keys < c_hi * CH ? n_keys : c_hi * CH;
    for (ptrdiff_t j = c_lo * CH; j < j_end; j++) {
        const FA_T *row = v + j * ldv;
        FA_T *chunk = vp + (j / CH - c_lo) * CH * d_v;
        const ptrdiff_t jj = j % CH;
        ptrdiff_t c0 = 0;
        for (; c0 < full; c0 += NV * W)
            for (int c = 0; c < NV; c++)
                *(V *)(chunk + c0 * CH + jj * NV * W + c * W) = *(const V *)(row + c0 + c * W);
        for (; c0 < d_v; c0 += W)
            *(V *)(chunk + c0 * CH + jj * W) = *(const V *)(row + c0);
    }
}

/* kp = k (rows x d, rows ldk apart) in the panels fa_mk_scores reads: for each run of KR
 * keys, a contiguous (d x KR) panel, kp[j0 d + t KR + jj] = k[j0 + jj][t]; zero keys
 * from rows up to n_cols (a multiple of KR). Contiguous panels, not one transposed
 * (d x n_cols) matrix: with n_cols a power of two, its rows' cache sets alias, and the
 * scores kernel's loads missed L1 (BLIS packs its B panels for the same reason). */
static inline void FA_FN(fa_pack_keys_)(const FA_T *k, ptrdiff_t rows, ptrdiff_t d,
                                         ptrdiff_t ldk, FA_T *kp, ptrdiff_t n_cols)
{
    enum { KR = FA_MK_SCORES_NV * FA_FN(FA_MK_W_) };
    enum { TB = FA_FN(FA_TRANSPOSE_) };  /* KR is a multiple of TB */
    for (ptrdiff_t j0 = 0; j0 < n_cols; j0 += KR) {
        FA_T *panel = kp + j0 * d;
        const ptrdiff_t nb = rows - j0 < KR ? (rows - j0 > 0 ? rows - j0 : 0) : KR;
        ptrdiff_t jj0 = 0;
        if (d % TB == 0)  /* always, for the head sizes the micro-kernels take */
            for (; jj0 + TB <= nb; jj0 += TB)
                for (ptrdiff_t t = 0; t < d; t += TB)
                    FA_FN(fa_transpose_block_)(k + (j0 + jj0) * ldk + t, ldk,
                                                panel + t * KR + jj0, KR);
        for (ptrdiff_t t = 0; t < d; t++) {
            for (ptrdiff_t jj = jj0; jj < nb; jj++) panel[t * KR + jj] = k[(j0 + jj) * ldk + t];
            for (ptrdiff_t jj = nb; jj < KR; jj++) panel[t * KR + jj] = 0;
        }
    }
}

#else  /* no micro-kernels in this build: never called (FA_MICROKERNELS 0) */

static inline void FA_FN(fa_mk_scores_)(int block, const FA_T *q, ptrdiff_t rows, ptrdiff_t d,
                                        const FA_T *kp, ptrdiff_t n_cols, FA_T *s, ptrdiff_t ld)
{ (void)block; (void)q; (void)rows; (void)d; (void)kp; (void)n_cols; (void)s; (void)ld; }
static inline void FA_FN(fa_mk_pv_)(int block, const FA_T *p, ptrdiff_t ld_p, ptrdiff_t rows,
                                    const FA_T *vp, ptrdiff_t j0, ptrdiff_t n_keys,
                                    ptrdiff_t next_keys, ptrdiff_t d_v, FA_T *o)
{ (void)block; (void)p; (void)ld_p; (void)rows; (void)vp; (void)j0; (void)n_keys; (void)next_keys;
  (void)d_v; (void)o; }
static inline int FA_FN(fa_mk_values_in_place_)(ptrdiff_t d_v) { (void)d_v; return 1; }
static inline void FA_FN(fa_pack_keys_)(const FA_T *k, ptrdiff_t rows, ptrdiff_t d,
                                        ptrdiff_t ldk, FA_T *kp, ptrdiff_t n_cols)
{ (void)k; (void)rows; (void)d; (void)ldk; (void)kp; (void)n_cols; }
static inline void FA_FN(fa_pack_values_)(const FA_T *v, ptrdiff_t n_keys, ptrdiff_t d_v,
                                          ptrdiff_t ldv, FA_T *vp, ptrdiff_t c_lo,
                                          ptrdiff_t c_hi)
{ (void)v; (void)n_keys; (void)d_v; (void)ldv; (void)vp; (void)c_lo; (void)c_hi; }

#endif

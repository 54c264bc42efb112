/* The AMX kernels of fa_lowp.h, over the tile layer of fa_lowp_amx.h: included once with
 * the emulated tile operations and once with the native ones (FA_TILE_*, FA_AMX_FN
 * defined before it). No include guard, on purpose. Layouts: fa_lowp.h. */
#if !defined(FA_TILE_LOAD) || !defined(FA_AMX_FN)
#error "define the FA_TILE_* operations and FA_AMX_FN before including fa_lowp_amx_kernels.h"
#endif

/* s (rows_pad x n_cols, stride ld) = scale qb kp: blocks of 32 (or the last 16) rows x 32
 * keys, the head dimensions 32 at a time (A: 16 query rows x 32 dimensions; B: 16 pair
 * rows of a panel's 16 keys, 128 bytes apart). */
static void FA_AMX_FN(fa_lp_scores_)(const uint16_t *qb, ptrdiff_t rows_pad, ptrdiff_t d_pad,
                                     const uint16_t *kp, ptrdiff_t n_cols, float scale,
                                     float *s, ptrdiff_t ld)
{
    const ptrdiff_t q_stride = d_pad * 2, s_stride = ld * 4;
    for (ptrdiff_t j0 = 0; j0 < n_cols; j0 += 32) {
        const uint16_t *panel = kp + j0 * d_pad;
        for (ptrdiff_t i0 = 0; i0 < rows_pad; i0 += 32) {
            const int two = i0 + 32 <= rows_pad;
            FA_TILE_ZERO(0);
            FA_TILE_ZERO(1);
            FA_TILE_ZERO(2);
            FA_TILE_ZERO(3);
            for (ptrdiff_t t = 0; t < d_pad; t += 32) {
                FA_TILE_LOAD(4, qb + i0 * d_pad + t, q_stride);
                FA_TILE_LOAD(6, panel + t * 32, 128);
                FA_TILE_LOAD(7, panel + t * 32 + 32, 128);
                FA_TILE_DP(0, 4, 6);
                FA_TILE_DP(1, 4, 7);
                if (two) {
                    FA_TILE_LOAD(5, qb + (i0 + 16) * d_pad + t, q_stride);
                    FA_TILE_DP(2, 5, 6);
                    FA_TILE_DP(3, 5, 7);
                }
            }
            float *out = s + i0 * ld + j0;
            FA_TILE_STORE(0, out, s_stride);
            FA_TILE_STORE(1, out + 16, s_stride);
            if (two) {
                FA_TILE_STORE(2, out + 16 * ld, s_stride);
                FA_TILE_STORE(3, out + 16 * ld + 16, s_stride);
            }
            for (int r = 0; r < (two ? 32 : 16); r++)
                for (int c = 0; c < 32; c++) out[r * ld + c] *= scale;
        }
    }
}

/* Where column c's band starts and its width, in the values' layout. */
static inline void FA_AMX_FN(fa_lp_band_of_)(ptrdiff_t c, ptrdiff_t d_v, ptrdiff_t *c0,
                                             ptrdiff_t *bw)
{
    const ptrdiff_t full = d_v / FA_LP_BAND * FA_LP_BAND;
    *bw = c < full ? FA_LP_BAND : 16;
    *c0 = c < full ? c / FA_LP_BAND * FA_LP_BAND : c / 16 * 16;
}

/* o (rows_pad x d_v) += pb vp over keys [j0, j0 + n_keys): blocks of 32 (or 16) rows x 32
 * (or 16) columns held in the C tiles over all the keys, 32 keys a step (A: 16 rows x 32
 * keys of P; B: 16 key pairs x 16 columns of a band). */
static void FA_AMX_FN(fa_lp_pv_)(const uint16_t *pb, ptrdiff_t ld_p, ptrdiff_t rows_pad,
                                 const uint16_t *vp, ptrdiff_t j0, ptrdiff_t n_keys,
                                 ptrdiff_t d_v, float *o)
{
    const ptrdiff_t p_stride = ld_p * 2, o_stride = d_v * 4;
    for (ptrdiff_t c = 0; c < d_v; c += 32) {
        const int two_c = c + 32 <= d_v;
        ptrdiff_t b0, w0, b1 = 0, w1 = 16;
        FA_AMX_FN(fa_lp_band_of_)(c, d_v, &b0, &w0);
        if (two_c) FA_AMX_FN(fa_lp_band_of_)(c + 16, d_v, &b1, &w1);
        for (ptrdiff_t i0 = 0; i0 < rows_pad; i0 += 32) {
            const int two_r = i0 + 32 <= rows_pad;
            float *out = o + i0 * d_v + c;
            FA_TILE_LOAD(0, out, o_stride);
            if (two_c) FA_TILE_LOAD(1, out + 16, o_stride);
            if (two_r) FA_TILE_LOAD(2, out + 16 * d_v, o_stride);
            if (two_r && two_c) FA_TILE_LOAD(3, out + 16 * d_v + 16, o_stride);
            for (ptrdiff_t j = j0; j < j0 + n_keys; j += 32) {
                const uint16_t *p = pb + i0 * ld_p + (j - j0);
                FA_TILE_LOAD(4, p, p_stride);
                FA_TILE_LOAD(6, fa_lp_v_at(vp, j, b0, w0, d_v) + 2 * (c - b0), w0 * 4);
                FA_TILE_DP(0, 4, 6);
                if (two_c) {
                    FA_TILE_LOAD(7, fa_lp_v_at(vp, j, b1, w1, d_v) + 2 * (c + 16 - b1), w1 * 4);
                    FA_TILE_DP(1, 4, 7);
                }
                if (two_r) {
                    FA_TILE_LOAD(5, p + 16 * ld_p, p_stride);
                    FA_TILE_DP(2, 5, 6);
                    if (two_c) FA_TILE_DP(3, 5, 7);
                }
            }
            FA_TILE_STORE(0, out, o_stride);
            if (two_c) FA_TILE_STORE(1, out + 16, o_stride);
            if (two_r) FA_TILE_STORE(2, out + 16 * d_v, o_stride);
            if (two_r && two_c) FA_TILE_STORE(3, out + 16 * d_v + 16, o_stride);
        }
    }
}

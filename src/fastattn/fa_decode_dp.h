/* The decoding kernel on bfloat16 storage with bfloat16 products (precision="bfloat16"):
 * one work item as fa_decode_chunk_bf (fa_decode.h) computes it, the same partial state
 * (m, l, o) for the same merge, but the products on AVX512-BF16's vdpbf16ps, two
 * bfloat16 products summed into each float32 lane, reading the stored bits as they are:
 *  - scores: q rounded to bfloat16 once per item (qb), against the keys' bits, pairs of
 *    dimensions per lane, then the transposing tree of fa_decode.h; the scale is applied
 *    to the float32 sum, never rounded into q;
 *  - P V: each block's weights rounded to bfloat16 in pairs of keys (pb: p_j in the low
 *    half, p_j+1 in the high), against two value rows interleaved in registers
 *    (vpunpcklwd / vpunpckhwd), so that an output lane sums the pair's products. The
 *    interleave leaves each 32 columns in "pair order" (of their two accumulators, the
 *    first holds columns 0-3, 8-11, 16-19, 24-27, the second the others), which the item
 *    keeps in o (the softmax's rescale is per element) and puts back in column order at
 *    its end.
 * The softmax statistics (max, sum) are those of the float32 scores and weights, as in
 * the exact kernel, and as PyTorch's bfloat16 attention and this project's bfloat16
 * engines keep them. Half the instructions of the widening kernel per product, and no
 * widening: on a Zen 4 core, 2.3x its products per second with the data in cache.
 *
 * Head sizes: d and d_v whole multiples of 32 (the caller's rule, _k_policy.pxi); no
 * pages. AVX-512 build with GCC 10+ only (FA_HAVE_DPBF16), run only on a CPU with
 * AVX512-BF16. Results are deterministic and independent of the thread count (the order
 * of every sum is fixed by the shape); not bitwise those of the exact kernel. */
#ifndef FASTATTN_DECODE_DP_H
#define FASTATTN_DECODE_DP_H

#include "fa_decode.h"
#include "fa_lowp.h"
#include <stdlib.h>

/* The decoding kernel's kind for bfloat16 storage taking bfloat16 products (beside the
 * FA_SRC_* kinds of fa_convert.h; only the decoding kernel knows it). */
#define FA_SRC_BF16_DP 16

/* Keys ahead whose rows the kernel asks the L2 cache for (prefetcht1) as it reads each
 * key and value row: one block, the rows read next. (Zen 4, 2 threads, 16,384 tokens: the
 * step 5% faster, 8 of 8 alternating runs; the CPU's own prefetchers leave the step
 * short of the read floor once the products no longer bound it.) Prefetches past the end
 * of the storage are hints, which never fault. */
#define FA_DP_AHEAD FA_DECODE_BLOCK

#if FA_HAVE_DPBF16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512bf16")

/* Scores of RB rows (4, 2, 1) x 16/RB keys: s[g][u] = scale qb[g] . k[u], u < count.
 * Dimensions outer, keys inner: each 32 dimensions of q's rows loaded once for the pass. */
static inline __attribute__((always_inline)) void fa_dp_scores_rb(
    const uint16_t *qb, int rb, ptrdiff_t d, const uint16_t *k, int count, float scale,
    float *s)
{
    const int nk = 16 / rb;
    __m512 acc[16];
    for (int u = 0; u < 16; u++) acc[u] = _mm512_setzero_ps();
    const uint16_t *ku[16];
    for (int u = 0; u < nk; u++) ku[u] = k + (u < count ? u : count - 1) * d;
    for (int u = 0; u < nk; u++)
        for (ptrdiff_t b = 0; b < d * 2; b += 64)
            _mm_prefetch((const char *)(ku[u] + FA_DP_AHEAD * d) + b, _MM_HINT_T1);
    for (ptrdiff_t t = 0; t < d; t += 32) {
        __m512bh qv[4];
        for (int g = 0; g < rb; g++) qv[g] = (__m512bh)_mm512_loadu_si512(qb + g * d + t);
        for (int u = 0; u < nk; u++) {
            const __m512bh kv = (__m512bh)_mm512_loadu_si512(ku[u] + t);
            for (int g = 0; g < rb; g++)
                acc[g * nk + u] = _mm512_dpbf16_ps(acc[g * nk + u], qv[g], kv);
        }
    }
    const fa_vec_f r = fa_lane_sums_f((fa_vec_f *)acc) * scale;
    /* (A whole pass with a constant count: with count alone, GCC copied the rows with */
    /* rep movsq, and the step ran 1.37x slower.)                                        */
    if (count == nk)
        for (int g = 0; g < rb; g++)
            for (int u = 0; u < nk; u++) s[g * FA_DECODE_BLOCK + u] = r[g * nk + u];
    else
        for (int g = 0; g < rb; g++)
            for (int u = 0; u < count; u++) s[g * FA_DECODE_BLOCK + u] = r[g * nk + u];
}

/* Scores of the n_rows rows against cnt keys, rows in blocks of 4, 2, 1; d a constant
 * where it is one of the common head sizes (one key pointer plus constant offsets). */
#define FA_DP_SCORE_ROWS(RB, D)                                                            \
    for (; g + (RB) <= n_rows; g += (RB))                                                  \
        for (ptrdiff_t j = 0; j < cnt; j += 16 / (RB))                                     \
            fa_dp_scores_rb(qb + g * (D), (RB), (D), k + j * (D),                          \
                            (int)(cnt - j < 16 / (RB) ? cnt - j : 16 / (RB)), scale,       \
                            s + g * FA_DECODE_BLOCK + j);
#define FA_DP_SCORES(D)                                                                    \
    do {                                                                                   \
        ptrdiff_t g = 0;                                                                   \
        FA_DP_SCORE_ROWS(4, D)                                                             \
        FA_DP_SCORE_ROWS(2, D)                                                             \
        FA_DP_SCORE_ROWS(1, D)                                                             \
    } while (0)

static void fa_dp_scores(const uint16_t *qb, ptrdiff_t n_rows, ptrdiff_t d, const uint16_t *k,
                         ptrdiff_t cnt, float scale, float *s)
{
    if (d == 64) FA_DP_SCORES(64);
    else if (d == 128) FA_DP_SCORES(128);
    else FA_DP_SCORES(d);
}

/* o[g][:] += sum_j pb[g][j] v[j][:] for RB rows, W vectors of 16 columns (W even) from
 * column c, the columns in pair order; key pairs, then a last key alone (paired with a
 * zero row). */
#define FA_DP_PV_PASS(RB, W)                                                               \
    for (; c + 16 * (W) <= d_v; c += 16 * (W)) {                                           \
        __m512 a[RB][W];                                                                   \
        for (int g = 0; g < (RB); g++)                                                     \
            for (int i = 0; i < (W); i++) a[g][i] = _mm512_loadu_ps(o + g * d_v + c + 16 * i); \
        for (ptrdiff_t j = 0; j < nb; j += 2) {                                            \
            if (g == 0 && c == 0)  /* next block's rows j, j + 1, in the first pass */     \
                for (ptrdiff_t b = 0; b < d_v * 4; b += 64)                                \
                    _mm_prefetch((const char *)(v + (j + FA_DP_AHEAD) * d_v) + b, _MM_HINT_T1); \
            __m512bh x[W];                                                                 \
            for (int i = 0; i < (W) / 2; i++) {                                            \
                const __m512i lo = _mm512_loadu_si512(v + j * d_v + c + 32 * i);           \
                const __m512i hi = j + 1 < nb ? _mm512_loadu_si512(v + (j + 1) * d_v + c + 32 * i) \
                                              : _mm512_setzero_si512();                    \
                x[2 * i] = (__m512bh)_mm512_unpacklo_epi16(lo, hi);                        \
                x[2 * i + 1] = (__m512bh)_mm512_unpackhi_epi16(lo, hi);                    \
            }                                                                              \
            for (int g = 0; g < (RB); g++) {                                               \
                const __m512bh w = (__m512bh)_mm512_set1_epi32(                            \
                    (int)pb[g * (FA_DECODE_BLOCK / 2) + j / 2]);                           \
                for (int i = 0; i < (W); i++) a[g][i] = _mm512_dpbf16_ps(a[g][i], w, x[i]); \
            }                                                                              \
        }                                                                                  \
        for (int g = 0; g < (RB); g++)                                                     \
            for (int i = 0; i < (W); i++) _mm512_storeu_ps(o + g * d_v + c + 16 * i, a[g][i]); \
    }

/* Rows g, g + RB, ... while RB rows are left, each block in passes of 128, 64, 32 columns. */
#define FA_DP_PV_ROWS(RB)                                                                  \
    for (; g + (RB) <= n_rows; g += (RB)) {                                                \
        const uint32_t *pb = pb_all + g * (FA_DECODE_BLOCK / 2);                           \
        float *o = o_all + g * d_v;                                                        \
        ptrdiff_t c = 0;                                                                   \
        FA_DP_PV_PASS(RB, 8)                                                               \
        FA_DP_PV_PASS(RB, 4)                                                               \
        FA_DP_PV_PASS(RB, 2)                                                               \
    }

/* Rows in pairs (16 accumulators over 128 columns), then alone. */
static void fa_dp_pv(const uint32_t *pb_all, ptrdiff_t n_rows, ptrdiff_t nb, const uint16_t *v,
                     ptrdiff_t d_v, float *o_all)
{
    ptrdiff_t g = 0;
    FA_DP_PV_ROWS(2)
    FA_DP_PV_ROWS(1)
}

/* One work item (see the top of the file; the arguments as fa_decode_chunk_bf's, pages
 * aside): qb, scratch of n_rows * d bfloat16; pb, of n_rows * FA_DECODE_BLOCK / 2 pairs. */
static void fa_decode_chunk_bfdp(const float *q, ptrdiff_t n_rows, ptrdiff_t d,
                                 const uint16_t *k, const uint16_t *v, ptrdiff_t d_v,
                                 ptrdiff_t n_keys, float scale, float softcap, float *m,
                                 double *l, float *o, float *s, uint16_t *qb, uint32_t *pb)
{
    for (ptrdiff_t i = 0; i < n_rows * d; i++) qb[i] = fa_f32_to_bf16(q[i]);  /* once */
    for (ptrdiff_t g = 0; g < n_rows; g++) { m[g] = -INFINITY; l[g] = 0; }
    for (ptrdiff_t c = 0; c < n_rows * d_v; c++) o[c] = 0;
    for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += FA_DECODE_BLOCK) {
        const ptrdiff_t nb = n_keys - j0 < FA_DECODE_BLOCK ? n_keys - j0 : FA_DECODE_BLOCK;
        fa_dp_scores(qb, n_rows, d, k + j0 * d, nb, scale, s);
        for (ptrdiff_t g = 0; g < n_rows; g++) {
            float *sr = s + g * FA_DECODE_BLOCK;
            fa_dec_online_bf(sr, nb, softcap, m + g, l + g, o + g * d_v, d_v);
            /* 32 weights at a time into 16 pairs (vcvtne2ps2bf16: rounded to nearest    */
            /* even, as fa_f32_to_bf16, but subnormal weights flushed to zero), the row   */
            /* zero past nb so that a last lone key pairs with a zero weight.            */
            for (ptrdiff_t j = nb; j < (nb + 31) / 32 * 32; j++) sr[j] = 0;
            uint32_t *pr = pb + g * (FA_DECODE_BLOCK / 2);
            for (ptrdiff_t j = 0; j < nb; j += 32)
                _mm512_storeu_si512(pr + j / 2, (__m512i)_mm512_cvtne2ps_pbh(
                    _mm512_loadu_ps(sr + j + 16), _mm512_loadu_ps(sr + j)));
        }
        fa_dp_pv(pb, n_rows, nb, v + j0 * d_v, d_v, o);
    }
    /* Pair order back to column order, 32 columns at a time. */
    const __m512i to_first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i to_second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (ptrdiff_t c = 0; c < n_rows * d_v; c += 32) {
        const __m512 lo = _mm512_loadu_ps(o + c), hi = _mm512_loadu_ps(o + c + 16);
        _mm512_storeu_ps(o + c, _mm512_permutex2var_ps(lo, to_first, hi));
        _mm512_storeu_ps(o + c + 16, _mm512_permutex2var_ps(lo, to_second, hi));
    }
}
#pragma GCC pop_options
#else
static void fa_decode_chunk_bfdp(const float *q, ptrdiff_t n_rows, ptrdiff_t d,
                                 const uint16_t *k, const uint16_t *v, ptrdiff_t d_v,
                                 ptrdiff_t n_keys, float scale, float softcap, float *m,
                                 double *l, float *o, float *s, uint16_t *qb, uint32_t *pb)
{
    /* Never reached: the policy takes this kernel only where FA_HAVE_DPBF16. */
    (void)q; (void)n_rows; (void)d; (void)k; (void)v; (void)d_v; (void)n_keys; (void)scale;
    (void)softcap; (void)m; (void)l; (void)o; (void)s; (void)qb; (void)pb;
    abort();
}
#endif

#endif

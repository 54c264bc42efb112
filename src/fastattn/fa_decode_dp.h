/* The decoding kernels with products below float32 (precision="bfloat16"): bfloat16
 * storage with bfloat16 products (below), int8 storage with 16-bit integer products
 * (fa_decode_chunk_i8dp), float8 e4m3 storage with bfloat16 products
 * (fa_decode_chunk_f8dp) and float16 storage rounded to bfloat16 as it is loaded
 * (fa_decode_chunk_hfdp), which share its scores and P V (FA_DP_BF_*, FA_DP_I8_*,
 * FA_DP_F8_*, FA_DP_HF_* give each kind's operands).
 *
 * bfloat16 storage: one work item as fa_decode_chunk_bf (fa_decode.h) computes it, the
 * same partial state (m, l, o) for the same merge, but the products on AVX512-BF16's
 * vdpbf16ps, two bfloat16 products summed into each float32 lane, reading the stored bits
 * as they are:
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
 * Head sizes: d and d_v whole multiples of 32 (the caller's rule, _k_policy.pxi). Keys
 * and values in pages (fa_pages, a paged cache's) are read through the page map: the
 * scores by runs of rows, P V through a table of the block's value rows (a pair of keys
 * may straddle two pages), so that every sum is the one on the same rows in one run,
 * bitwise. AVX-512 build with GCC 10+ only (FA_HAVE_DPBF16), run only on a CPU with
 * AVX512-BF16 (int8: with AVX512-VNNI, which alone it needs). Results are deterministic and independent of the
 * thread count (the order of every sum is fixed by the shape); not bitwise those of the
 * exact kernel. */
#ifndef FASTATTN_DECODE_DP_H
#define FASTATTN_DECODE_DP_H

#include "fa_decode.h"
#include "fa_lowp.h"
#include <stdlib.h>

/* The decoding kernel's kind for bfloat16 storage taking bfloat16 products (beside the
 * FA_SRC_* kinds of fa_convert.h; only the decoding kernel knows it). */
#define FA_SRC_BF16_DP 16
/* ...and for int8 storage taking 16-bit integer products (fa_decode_chunk_i8dp). */
#define FA_SRC_I8_DP 17
/* ...and for float8 e4m3 storage taking bfloat16 products (fa_decode_chunk_f8dp). */
#define FA_SRC_F8_DP 18
/* ...and for float16 storage taking bfloat16 products (fa_decode_chunk_hfdp). */
#define FA_SRC_F16_DP 19

/* Keys ahead whose rows the kernel asks the L2 cache for (prefetcht1) as it reads each
 * key and value row: one block, the rows read next. (Zen 4, 2 threads, 16,384 tokens: the
 * step 5% faster, 8 of 8 alternating runs; the CPU's own prefetchers leave the step
 * short of the read floor once the products no longer bound it.) Prefetches past the end
 * of the storage are hints, which never fault. */
#define FA_DP_AHEAD FA_DECODE_BLOCK

/* The 16-bit products kernels' signature (fa_decode_chunk_bfdp, _hfdp). */
#define FA_DP_CHUNK_16BIT_SIGNATURE(S)                                                     \
static void fa_decode_chunk_##S##dp(const float *q, ptrdiff_t n_rows, ptrdiff_t d,          \
                                    const uint16_t *k, const uint16_t *v, ptrdiff_t d_v,   \
                                    ptrdiff_t n_keys, float scale, float softcap, float *m, \
                                    double *l, float *o, float *s, uint16_t *qb,           \
                                    uint32_t *pb, const fa_pages *pg)
/* The 8-bit products kernels' signature (fa_decode_chunk_i8dp, _f8dp). */
#define FA_DP_CHUNK_8BIT_SIGNATURE(S, KT)                                                  \
static void fa_decode_chunk_##S##dp(const float *q, ptrdiff_t n_rows, ptrdiff_t d,          \
                                    const KT *k, const KT *v, ptrdiff_t d_v,               \
                                    ptrdiff_t n_keys, float scale, float softcap,          \
                                    const float *ks, const float *vs, ptrdiff_t phase,     \
                                    float *m, double *l, float *o, float *s, float *qs,    \
                                    uint32_t *pw, const fa_pages *pg)

#if FA_HAVE_DPBF16
/* Two targets: the int8 kernel's 16-bit integer products need AVX512-VNNI alone (Intel
 * Cascade Lake and Ice Lake have it without AVX512-BF16), so it and the parts every kind
 * shares are compiled without bfloat16 instructions (GCC refuses any that would reach
 * them); the kinds with bfloat16 products further down, in a region that adds
 * AVX512-BF16. */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni")

/* The transposing tree of fa_decode.h on int32 lanes (exact). */
FA_DEFINE_LANE_SUMS(fa_lane_sums_i32, fa_ivec_f, fa_ivec_f, FA_N_f, fa_iota_f)

/* The four kinds of products, as the generic parts below take them: ACC the accumulator
 * type, ZERO one of them, QV(p) 32 q elements, KV(p) 32 stored elements as the product's
 * operand, DP(acc, a, b) the product instruction, SUMS(acc) the sums of the lanes of 16
 * accumulators (fa_lane_sums_*) as floats.
 *  - BF: bfloat16 keys and values (their bits), q and the weights as bfloat16 pairs;
 *  - I8: int8 keys and values sign-extended to 16 bits (vpmovsxbw), q and the weights as
 *    16-bit integers; vpdpwssd sums two exact products into each int32 lane;
 *  - F8: float8 e4m3 keys and values as bfloat16 of 2^-120 their value (the byte
 *    sign-extended, shifted left by 4, bits 11-14 cleared: exact, as the float16 widening
 *    of fa_decode.h is; e4m3's subnormals become bfloat16 subnormals, which vdpbf16ps
 *    takes as zero), against q and the weights as bfloat16 scaled by powers of two;
 *  - HF: float16 keys and values widened (vcvtph2ps) and rounded to bfloat16 pairs
 *    (vcvtne2ps2bf16: nearest even), against q and the weights as BF's. */
#define FA_DP_BF_ACC __m512
#define FA_DP_BF_ZERO _mm512_setzero_ps()
#define FA_DP_BF_QV(p) ((__m512bh)_mm512_loadu_si512(p))
#define FA_DP_BF_KV(p) ((__m512bh)_mm512_loadu_si512(p))
#define FA_DP_BF_DP(acc, a, b) _mm512_dpbf16_ps(acc, a, (__m512bh)(b))
#define FA_DP_BF_SUMS(acc) fa_lane_sums_f((fa_vec_f *)(acc))
#define FA_DP_I8_ACC fa_ivec_f  /* the type fa_lane_sums_i32 reads (not __m512i's int64s) */
#define FA_DP_I8_ZERO ((fa_ivec_f)_mm512_setzero_si512())
#define FA_DP_I8_QV(p) _mm512_loadu_si512(p)
#define FA_DP_I8_KV(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define FA_DP_I8_DP(acc, a, b) ((fa_ivec_f)_mm512_dpwssd_epi32((__m512i)(acc), a, (__m512i)(b)))
#define FA_DP_I8_SUMS(acc) ((fa_vec_f)_mm512_cvtepi32_ps((__m512i)fa_lane_sums_i32(acc)))
#define FA_DP_HF_ACC __m512
#define FA_DP_HF_ZERO _mm512_setzero_ps()
#define FA_DP_HF_QV(p) FA_DP_BF_QV(p)
#define FA_DP_HF_KV(p) _mm512_cvtne2ps_pbh(                                                \
    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p) + 1)),                         \
    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p))))
#define FA_DP_HF_DP(acc, a, b) FA_DP_BF_DP(acc, a, b)
#define FA_DP_HF_SUMS(acc) FA_DP_BF_SUMS(acc)
#define FA_DP_HF_PV_INIT(po) FA_DP_BF_PV_INIT(po)
#define FA_DP_HF_PV_DONE(acc, po, g) FA_DP_BF_PV_DONE(acc, po, g)
#define FA_DP_F8_ACC __m512
#define FA_DP_F8_ZERO _mm512_setzero_ps()
#define FA_DP_F8_QV(p) FA_DP_BF_QV(p)
#define FA_DP_F8_KV(p) ((__m512bh)_mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(    \
    _mm256_loadu_si256((const __m256i *)(p))), 4), _mm512_set1_epi16(0x87ff)))
#define FA_DP_F8_DP(acc, a, b) FA_DP_BF_DP(acc, a, b)
#define FA_DP_F8_SUMS(acc) FA_DP_BF_SUMS(acc)

/* Scores of RB rows (4, 2, 1) x 16/RB keys: s[g][u] = scale qx[g] . k[u], u < count.
 * Dimensions outer, keys inner: each 32 dimensions of q's rows loaded once for the pass. */
#define FA_DEFINE_DP_SCORES_RB(P, QT, KT)                                                  \
static inline __attribute__((always_inline)) void fa_dp_scores_rb_##P(                    \
    const QT *qx, int rb, ptrdiff_t d, const KT *k, int count, float scale, float *s)      \
{                                                                                          \
    const int nk = 16 / rb;                                                                \
    FA_DP_##P##_ACC acc[16];                                                               \
    for (int u = 0; u < 16; u++) acc[u] = FA_DP_##P##_ZERO;                                \
    const KT *ku[16];                                                                      \
    for (int u = 0; u < nk; u++) ku[u] = k + (u < count ? u : count - 1) * d;              \
    for (int u = 0; u < nk; u++)                                                           \
        for (ptrdiff_t b = 0; b < d * (ptrdiff_t)sizeof(KT); b += 64)                      \
            _mm_prefetch((const char *)(ku[u] + FA_DP_AHEAD * d) + b, _MM_HINT_T1);        \
    for (ptrdiff_t t = 0; t < d; t += 32) {                                                \
        __typeof__(FA_DP_##P##_QV(qx)) qv[4];                                              \
        for (int g = 0; g < rb; g++) qv[g] = FA_DP_##P##_QV(qx + g * d + t);               \
        for (int u = 0; u < nk; u++) {                                                     \
            const __typeof__(FA_DP_##P##_KV(k)) kv = FA_DP_##P##_KV(ku[u] + t);            \
            for (int g = 0; g < rb; g++)                                                   \
                acc[g * nk + u] = FA_DP_##P##_DP(acc[g * nk + u], qv[g], kv);              \
        }                                                                                  \
    }                                                                                      \
    const fa_vec_f r = FA_DP_##P##_SUMS(acc) * scale;                                      \
    /* (A whole pass with a constant count: with count alone, GCC copied the rows with */ \
    /* rep movsq, and the step ran 1.37x slower.)                                        */ \
    if (count == nk)                                                                       \
        for (int g = 0; g < rb; g++)                                                       \
            for (int u = 0; u < nk; u++) s[g * FA_DECODE_BLOCK + u] = r[g * nk + u];       \
    else                                                                                   \
        for (int g = 0; g < rb; g++)                                                       \
            for (int u = 0; u < count; u++) s[g * FA_DECODE_BLOCK + u] = r[g * nk + u];    \
}                                                                                          \
/* Scores of the n_rows rows against cnt keys, rows in blocks of 4, 2, 1; d a constant */ \
/* where it is one of the common head sizes (one key pointer plus constant offsets).    */ \
static void fa_dp_scores_##P(const QT *qx, ptrdiff_t n_rows, ptrdiff_t d, const KT *k,     \
                             ptrdiff_t cnt, float scale, float *s)                         \
{                                                                                          \
    if (d == 64) FA_DP_SCORES(P, 64);                                                      \
    else if (d == 128) FA_DP_SCORES(P, 128);                                               \
    else FA_DP_SCORES(P, d);                                                               \
}
#define FA_DP_SCORE_ROWS(P, RB, D)                                                         \
    for (; g + (RB) <= n_rows; g += (RB))                                                  \
        for (ptrdiff_t j = 0; j < cnt; j += 16 / (RB))                                     \
            fa_dp_scores_rb_##P(qx + g * (D), (RB), (D), k + j * (D),                      \
                                (int)(cnt - j < 16 / (RB) ? cnt - j : 16 / (RB)), scale,   \
                                s + g * FA_DECODE_BLOCK + j);
#define FA_DP_SCORES(P, D)                                                                 \
    do {                                                                                   \
        ptrdiff_t g = 0;                                                                   \
        FA_DP_SCORE_ROWS(P, 4, D)                                                          \
        FA_DP_SCORE_ROWS(P, 2, D)                                                          \
        FA_DP_SCORE_ROWS(P, 1, D)                                                          \
    } while (0)

/* o[g][:] += sum_j w[g][j] v[j][:] for RB rows, W vectors of 16 columns (W even) from
 * column c, the columns in pair order; key pairs, then a last key alone (paired with a
 * zero row). The weights pw are pairs (w_j low, w_j+1 high) of bfloat16 (BF) or 16-bit
 * integers (I8); BF accumulates into o itself, I8 into int32 lanes zeroed for the block,
 * added to o times the row's factor wf[g] at its end. */
#define FA_DP_PV_PASS(P, RB, W, ROW)                                                       \
    for (; c + 16 * (W) <= d_v; c += 16 * (W)) {                                           \
        FA_DP_##P##_ACC a[RB][W];                                                          \
        for (int g = 0; g < (RB); g++)                                                     \
            for (int i = 0; i < (W); i++) a[g][i] = FA_DP_##P##_PV_INIT(o + g * d_v + c + 16 * i); \
        for (ptrdiff_t j = 0; j < nb; j += 2) {                                            \
            if (g == 0 && c == 0)  /* next block's rows j, j + 1, in the first pass */     \
                for (ptrdiff_t b = 0; b < 2 * d_v * (ptrdiff_t)sizeof(*v); b += 64)        \
                    _mm_prefetch((const char *)(ROW(j) + FA_DP_AHEAD * d_v) + b, _MM_HINT_T1); \
            __m512i x[W];                                                                  \
            for (int i = 0; i < (W) / 2; i++) {                                            \
                const __m512i lo = (__m512i)FA_DP_##P##_KV(ROW(j) + c + 32 * i);           \
                const __m512i hi = j + 1 < nb                                              \
                    ? (__m512i)FA_DP_##P##_KV(ROW(j + 1) + c + 32 * i)                     \
                    : _mm512_setzero_si512();                                              \
                x[2 * i] = _mm512_unpacklo_epi16(lo, hi);                                  \
                x[2 * i + 1] = _mm512_unpackhi_epi16(lo, hi);                              \
            }                                                                              \
            for (int g = 0; g < (RB); g++) {                                               \
                const __m512i w = _mm512_set1_epi32(                                       \
                    (int)pw[g * (FA_DECODE_BLOCK / 2) + j / 2]);                           \
                for (int i = 0; i < (W); i++)                                              \
                    a[g][i] = FA_DP_##P##_DP(a[g][i], (__typeof__(FA_DP_##P##_QV(pw)))w, x[i]); \
            }                                                                              \
        }                                                                                  \
        for (int g = 0; g < (RB); g++)                                                     \
            for (int i = 0; i < (W); i++)                                                  \
                _mm512_storeu_ps(o + g * d_v + c + 16 * i,                                 \
                                 FA_DP_##P##_PV_DONE(a[g][i], o + g * d_v + c + 16 * i, g)); \
    }
#define FA_DP_BF_PV_INIT(po) _mm512_loadu_ps(po)
#define FA_DP_BF_PV_DONE(acc, po, g) (acc)
#define FA_DP_F8_PV_INIT(po) _mm512_setzero_ps()
#define FA_DP_F8_PV_DONE(acc, po, g) \
    _mm512_add_ps(_mm512_scalef_ps(acc, _mm512_set1_ps(wf[g])), _mm512_loadu_ps(po))
#define FA_DP_I8_PV_INIT(po) FA_DP_I8_ZERO
#define FA_DP_I8_PV_DONE(acc, po, g) \
    _mm512_fmadd_ps(_mm512_cvtepi32_ps((__m512i)(acc)), _mm512_set1_ps(wf[g]), _mm512_loadu_ps(po))

/* Rows g, g + RB, ... while RB rows are left, each block in passes of as many columns as
 * 16 accumulators hold (128 for one or two rows, 64 for four), then of half and a quarter
 * of that as fit; value row j at ROW(j). */
#define FA_DP_PV_ROWS(P, RB, ROW)                                                          \
    for (; g + (RB) <= n_rows; g += (RB)) {                                                \
        const uint32_t *pw = pw_all + g * (FA_DECODE_BLOCK / 2);                           \
        const float *wf = wf_all + g;                                                      \
        float *o = o_all + g * d_v;                                                        \
        ptrdiff_t c = 0;                                                                   \
        (void)wf;                                                                          \
        if ((RB) * 8 <= 16) FA_DP_PV_PASS(P, RB, 8, ROW)                                   \
        FA_DP_PV_PASS(P, RB, 4, ROW)                                                       \
        FA_DP_PV_PASS(P, RB, 2, ROW)                                                       \
    }

/* Rows in fours (16 accumulators over 64 columns: each pair of value rows loaded and
 * interleaved once for four rows, where pairs of rows over 128 columns did it twice; a
 * step of four rows on one Zen 4 core, cache in L2: float16 storage 15% faster, float8
 * 9%, int8 and bfloat16 4%; on a long cache within the noise), then in pairs (over 128
 * columns), then alone. wf_all: I8's factor per row (BF: unused). The value rows: v's nb rows one after another when vr is NULL, else
 * at vr[j] (a block across pages that do not follow one another; the prefetch then
 * guesses that its run goes on). Two copies of the passes, so that the rows of one run
 * cost no table. */
#define FA_DP_ROW_RUN(j) (v + (j) * d_v)
#define FA_DP_ROW_TABLE(j) (vr[j])
#define FA_DEFINE_DP_PV(P, KT)                                                             \
static void fa_dp_pv_##P(const uint32_t *pw_all, const float *wf_all, ptrdiff_t n_rows,    \
                         ptrdiff_t nb, const KT *v, const KT *const *vr, ptrdiff_t d_v,    \
                         float *o_all)                                                     \
{                                                                                          \
    ptrdiff_t g = 0;                                                                       \
    if (!vr) {                                                                             \
        FA_DP_PV_ROWS(P, 4, FA_DP_ROW_RUN)                                                 \
        FA_DP_PV_ROWS(P, 2, FA_DP_ROW_RUN)                                                 \
        FA_DP_PV_ROWS(P, 1, FA_DP_ROW_RUN)                                                 \
    } else {                                                                               \
        FA_DP_PV_ROWS(P, 4, FA_DP_ROW_TABLE)                                               \
        FA_DP_PV_ROWS(P, 2, FA_DP_ROW_TABLE)                                               \
        FA_DP_PV_ROWS(P, 1, FA_DP_ROW_TABLE)                                               \
    }                                                                                      \
}
/* The scores of a block's nb keys from key j0 of the item (in pages: run by run). */
#define FA_DP_SCORES_PAGED(P, qx, n_rows, d, k, pg, j0, nb, scale, s)                      \
    for (ptrdiff_t j_ = 0; j_ < (nb);) {                                                   \
        const ptrdiff_t run_ = FA_RUN(pg, (j0) + j_, (nb) - j_);                           \
        fa_dp_scores_##P(qx, n_rows, d, FA_KROW(k, pg, (j0) + j_, d), run_, scale, (s) + j_); \
        j_ += run_;                                                                        \
    }
/* The P V of a block of nb value rows from row j0 of the item (fa_dp_pv_P's arguments
 * but the rows): when they are one run (no pages, or pages that follow one another), from
 * its first row; else through the table vr (scratch of FA_DECODE_BLOCK pointers). */
#define FA_DP_PV_BLOCK(P, KT, pw, wf, n_rows, nb, v, pg, j0, d_v, o, vr)                   \
    do {                                                                                   \
        if (!(pg) || fa_page_run(pg, j0, nb) == (nb)) {                                    \
            fa_dp_pv_##P(pw, wf, n_rows, nb, FA_VROW(v, pg, j0, d_v), NULL, d_v, o);       \
        } else {                                                                           \
            for (ptrdiff_t j_ = 0; j_ < (nb);) {                                           \
                const ptrdiff_t run_ = fa_page_run(pg, (j0) + j_, (nb) - j_);              \
                const KT *row_ = FA_VROW(v, pg, (j0) + j_, d_v);                           \
                for (ptrdiff_t i_ = 0; i_ < run_; i_++) (vr)[j_ + i_] = row_ + i_ * (d_v); \
                j_ += run_;                                                                \
            }                                                                              \
            fa_dp_pv_##P(pw, wf, n_rows, nb, v, (const KT *const *)(vr), d_v, o);          \
        }                                                                                  \
    } while (0)

FA_DEFINE_DP_SCORES_RB(I8, int16_t, int8_t)
FA_DEFINE_DP_PV(I8, int8_t)

/* o's rows of pair order back to column order, 32 columns at a time (n: a multiple of 32). */
static inline void fa_dp_column_order(float *o, ptrdiff_t n)
{
    const __m512i to_first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i to_second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (ptrdiff_t c = 0; c < n; c += 32) {
        const __m512 lo = _mm512_loadu_ps(o + c), hi = _mm512_loadu_ps(o + c + 16);
        _mm512_storeu_ps(o + c, _mm512_permutex2var_ps(lo, to_first, hi));
        _mm512_storeu_ps(o + c + 16, _mm512_permutex2var_ps(lo, to_second, hi));
    }
}

/* The largest |x[c]|, c < n (a multiple of 16); NaN when one of them is inf or NaN. */
static inline float fa_i8dp_absmax(const float *x, ptrdiff_t n)
{
    __m512 mx = _mm512_setzero_ps(), bad = _mm512_setzero_ps();
    for (ptrdiff_t c = 0; c < n; c += 16) {
        const __m512 y = _mm512_loadu_ps(x + c);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(y));
        bad = _mm512_add_ps(bad, _mm512_mul_ps(y, _mm512_setzero_ps()));  /* NaN if inf/NaN */
    }
    const float b = _mm512_reduce_add_ps(bad);
    return b == 0 ? _mm512_reduce_max_ps(mx) : NAN;
}

/* x (n floats, whole 16s up to 512; times sc[] where sc is not NULL) to 16-bit integers:
 * out = rint(y 32767 / largest) for y = x (sc), the products kept in registers between
 * the two passes; returns largest / 32767, the factor that gives y back (0 when y is all
 * 0, with out zeros; NaN when largest is inf or NaN, whatever out holds). A largest so
 * small that 32767 / largest would overflow float32 is first scaled up by 2^64
 * (exactly), so that the multiplier stays finite: |y| up <= largest up, and the
 * multiplier <= 32767 / (largest up) (1 + 2^-24), so that no product rounds past 32767. */
static inline __attribute__((always_inline)) float fa_i8dp_to16(const float *x, const float *sc,
                                                                ptrdiff_t n, int16_t *out)
{
    __m512 y[32], mx = _mm512_setzero_ps();
    for (ptrdiff_t c = 0; c < n; c += 16) {
        y[c / 16] = _mm512_loadu_ps(x + c);
        if (sc) y[c / 16] = _mm512_mul_ps(y[c / 16], _mm512_loadu_ps(sc + c));
        mx = _mm512_max_ps(mx, _mm512_abs_ps(y[c / 16]));
    }
    const float largest = _mm512_reduce_max_ps(mx);
    if (!(largest < INFINITY)) return NAN;
    if (largest == 0) {
        memset(out, 0, (size_t)n * sizeof(int16_t));
        return 0;
    }
    const float up = largest < 1e-30f ? 0x1p64f : 1.0f;
    const __m512 mul = _mm512_set1_ps(32767.0f / (largest * up)), u = _mm512_set1_ps(up);
    for (ptrdiff_t c = 0; c < n; c += 16) {
        __m512 z = y[c / 16];
        if (up != 1) z = _mm512_mul_ps(z, u);
        _mm256_storeu_si256((__m256i *)(out + c),
                            _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(z, mul))));
    }
    return largest / 32767.0f;
}

/* One work item on 8-bit storage with products below float32 (the arguments as
 * fa_decode_chunk_i8's and _f8's):
 *  - scores: for each span of keys within one key group (FA_KV_GROUP), q times the
 *    group's channel scales, each row to 16 bits with its own factor (TO), against the
 *    stored bytes as the product's operand (FA_DP_*_KV); the row's factor then applied to
 *    its float32 sums (FIX);
 *  - P V: each block's weights times the value scales, each row to 16 bits with its own
 *    factor the same way, in pairs of keys, against pairs of value rows, the sums started
 *    from zero for the block and added to o times the factor at its end (FA_DP_*_PV_DONE).
 * int8 (FA_SRC_I8_DP): 16-bit integers (fa_i8dp_to16; vpdpwssd, exact integer sums, below
 * 2^31 while 32767 * 127 * d and 32767 * 127 * FA_DECODE_BLOCK are: the caller's rule,
 * d <= 512), the factors multiplied (q's with the scale, or NaN for a row holding inf or
 * NaN, which integers cannot carry). float8 e4m3 (FA_SRC_F8_DP): bfloat16 times powers of
 * two (fa_f8dp_to_bf16; vdpbf16ps), the powers undone by vscalefps, the scale applied to
 * the sums by the scores.
 * qs: scratch of n_rows * d 16-bit numbers then 3 n_rows floats, within n_rows * d
 * floats; pw: of n_rows * FA_DECODE_BLOCK / 2 pairs. */
#define FA_DEFINE_DP_CHUNK_8BIT(P, S, KT, QT, TO)                                          \
FA_DP_CHUNK_8BIT_SIGNATURE(S, KT)                                                          \
{                                                                                          \
    QT *qx = (QT *)qs;                                                                     \
    float *qf = qs + (n_rows * d + 1) / 2, *wf = qf + n_rows, *qr = wf + n_rows;           \
    const KT *vr[FA_DECODE_BLOCK];                                                         \
    float vs_buf[FA_DECODE_BLOCK];                                                         \
    for (ptrdiff_t g = 0; g < n_rows; g++) {                                               \
        m[g] = -INFINITY;                                                                  \
        l[g] = 0;                                                                          \
        qr[g] = FA_DP_##P##_QROW(q + g * d, d, scale);                                     \
    }                                                                                      \
    for (ptrdiff_t c = 0; c < n_rows * d_v; c++) o[c] = 0;                                 \
    for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += FA_DECODE_BLOCK) {                           \
        const ptrdiff_t nb = n_keys - j0 < FA_DECODE_BLOCK ? n_keys - j0 : FA_DECODE_BLOCK; \
        for (ptrdiff_t j = 0; j < nb;) {                                                   \
            ptrdiff_t stop;                                                                \
            const KT *kr;                                                                  \
            const float *sc;                                                               \
            FA_GROUP_SPAN(k, ks, pg, phase, j0, j, nb, d, kr, sc, stop);                   \
            for (ptrdiff_t g = 0; g < n_rows; g++)                                         \
                qf[g] = FA_DP_##P##_QFACTOR(d == 128 ? TO(q + g * d, sc, 128, qx + g * d)  \
                                            : d == 64 ? TO(q + g * d, sc, 64, qx + g * d)  \
                                                      : TO(q + g * d, sc, d, qx + g * d),  \
                                            qr[g]);                                        \
            fa_dp_scores_##P(qx, n_rows, d, kr, stop - j,                                  \
                             FA_DP_##P##_SCORE_SCALE(scale), s + j);                       \
            for (ptrdiff_t g = 0; g < n_rows; g++)                                         \
                for (ptrdiff_t u = j; u < stop; u += 16) {                                 \
                    const __mmask16 in = stop - u >= 16 ? 0xffff                           \
                                                        : (__mmask16)((1u << (stop - u)) - 1); \
                    float *su = s + g * FA_DECODE_BLOCK + u;                               \
                    _mm512_mask_storeu_ps(su, in, FA_DP_##P##_FIX(_mm512_maskz_loadu_ps(in, su), \
                                                                  _mm512_set1_ps(qf[g]))); \
                }                                                                          \
            j = stop;                                                                      \
        }                                                                                  \
        const float *vsb = FA_BLOCK_VSCALES(vs, pg, j0, nb, vs_buf);                       \
        for (ptrdiff_t g = 0; g < n_rows; g++) {                                           \
            float *sr = s + g * FA_DECODE_BLOCK;                                           \
            fa_dec_online_##S(sr, nb, softcap, m + g, l + g, o + g * d_v, d_v);            \
            for (ptrdiff_t j = 0; j < nb; j++) sr[j] *= vsb[j];                            \
            /* The row zero past nb (whole 32s), so that a last lone key pairs with a */   \
            /* zero weight.                                                            */  \
            for (ptrdiff_t j = nb; j < (nb + 31) / 32 * 32; j++) sr[j] = 0;                \
            wf[g] = TO(sr, NULL, (nb + 31) / 32 * 32, (QT *)(pw + g * (FA_DECODE_BLOCK / 2))); \
        }                                                                                  \
        FA_DP_PV_BLOCK(P, KT, pw, wf, n_rows, nb, v, pg, j0, d_v, o, vr);                  \
    }                                                                                      \
    fa_dp_column_order(o, n_rows * d_v);                                                   \
}
/* Each kind's: QROW, a row's value for the item (int8: the scale, or NaN for a row
 * holding inf or NaN); QFACTOR, a span's factor from TO's and QROW's; SCORE_SCALE, what
 * the scores multiply their sums by; FIX, the factor applied to the scores. */
#define FA_DP_I8_QROW(x, d, scale) (fa_i8dp_absmax(x, d) < INFINITY ? (scale) : NAN)
#define FA_DP_I8_QFACTOR(t, r) ((t) * (r))
#define FA_DP_I8_SCORE_SCALE(scale) 1.0f
#define FA_DP_I8_FIX(x, f) _mm512_mul_ps(x, f)
#define FA_DP_F8_QROW(x, d, scale) 0.0f
#define FA_DP_F8_QFACTOR(t, r) (t)
#define FA_DP_F8_SCORE_SCALE(scale) (scale)
#define FA_DP_F8_FIX(x, f) _mm512_scalef_ps(x, f)
FA_DEFINE_DP_CHUNK_8BIT(I8, i8, int8_t, int16_t, fa_i8dp_to16)

/* The kinds with bfloat16 products (vdpbf16ps: AVX512-BF16). */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512bf16,avx512vnni")
FA_DEFINE_DP_SCORES_RB(BF, uint16_t, uint16_t)
FA_DEFINE_DP_SCORES_RB(HF, uint16_t, uint16_t)
FA_DEFINE_DP_SCORES_RB(F8, uint16_t, uint8_t)
FA_DEFINE_DP_PV(BF, uint16_t)
FA_DEFINE_DP_PV(HF, uint16_t)
FA_DEFINE_DP_PV(F8, uint8_t)

/* One work item of 16-bit storage (see the top of the file; the arguments as
 * fa_decode_chunk_bf's): qb, scratch of n_rows * d bfloat16; pb, of n_rows *
 * FA_DECODE_BLOCK / 2 pairs. bfloat16 storage (fa_decode_chunk_bfdp) and float16
 * (fa_decode_chunk_hfdp: the keys and values rounded to bfloat16 as they are loaded). */
#define FA_DEFINE_DP_CHUNK_16BIT(P, S)                                                     \
FA_DP_CHUNK_16BIT_SIGNATURE(S)                                                             \
{                                                                                          \
    const uint16_t *vr[FA_DECODE_BLOCK];                                                   \
    for (ptrdiff_t i = 0; i < n_rows * d; i++) qb[i] = fa_f32_to_bf16(q[i]);  /* once */   \
    for (ptrdiff_t g = 0; g < n_rows; g++) { m[g] = -INFINITY; l[g] = 0; }                \
    for (ptrdiff_t c = 0; c < n_rows * d_v; c++) o[c] = 0;                                 \
    for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += FA_DECODE_BLOCK) {                           \
        const ptrdiff_t nb = n_keys - j0 < FA_DECODE_BLOCK ? n_keys - j0 : FA_DECODE_BLOCK; \
        FA_DP_SCORES_PAGED(P, qb, n_rows, d, k, pg, j0, nb, scale, s)                      \
        for (ptrdiff_t g = 0; g < n_rows; g++) {                                           \
            float *sr = s + g * FA_DECODE_BLOCK;                                           \
            fa_dec_online_##S(sr, nb, softcap, m + g, l + g, o + g * d_v, d_v);            \
            /* 32 weights at a time into 16 pairs (vcvtne2ps2bf16: rounded to nearest */   \
            /* even, as fa_f32_to_bf16, but subnormal weights flushed to zero), the   */   \
            /* row zero past nb so that a last lone key pairs with a zero weight.     */   \
            for (ptrdiff_t j = nb; j < (nb + 31) / 32 * 32; j++) sr[j] = 0;                \
            uint32_t *pr = pb + g * (FA_DECODE_BLOCK / 2);                                 \
            for (ptrdiff_t j = 0; j < nb; j += 32)                                         \
                _mm512_storeu_si512(pr + j / 2, (__m512i)_mm512_cvtne2ps_pbh(              \
                    _mm512_loadu_ps(sr + j + 16), _mm512_loadu_ps(sr + j)));               \
        }                                                                                  \
        FA_DP_PV_BLOCK(P, uint16_t, pb, NULL, n_rows, nb, v, pg, j0, d_v, o, vr);          \
    }                                                                                      \
    fa_dp_column_order(o, n_rows * d_v);                                                   \
}
FA_DEFINE_DP_CHUNK_16BIT(BF, bf)
FA_DEFINE_DP_CHUNK_16BIT(HF, hf)

/* x (n floats, a multiple of 32 up to 512; times sc[] where sc is not NULL) to bfloat16
 * times a power of two, into out: the largest magnitude L = f 2^e (f in [0.5, 1)) lands
 * in [2^99, 2^100), far from both ends of bfloat16's range, so that no product with an F8
 * operand (at most 448 2^-120) leaves float32's normal range. Returns e + 12, the
 * exponent that turns a sum of such products back into the sum of x's products with the
 * stored numbers' values over 256 (the scales' own factor; see fa_quant.h): 2^(120 - 8 -
 * (100 - e)). 0 when L is 0 (out zeros); NaN when L is inf or NaN (the sums then NaN,
 * whatever out holds). NaN elements stay NaN in bfloat16, and their sums NaN. The
 * scaling is vscalefps, exact; the products stay in registers between the two passes. */
static inline __attribute__((always_inline)) float fa_f8dp_to_bf16(const float *x,
                                                                    const float *sc,
                                                                    ptrdiff_t n, uint16_t *out)
{
    __m512 y[32], mx = _mm512_setzero_ps();
    for (ptrdiff_t c = 0; c < n; c += 16) {
        y[c / 16] = _mm512_loadu_ps(x + c);
        if (sc) y[c / 16] = _mm512_mul_ps(y[c / 16], _mm512_loadu_ps(sc + c));
        mx = _mm512_max_ps(mx, _mm512_abs_ps(y[c / 16]));
    }
    const float largest = _mm512_reduce_max_ps(mx);
    if (!(largest < INFINITY)) return NAN;
    if (largest == 0) {
        memset(out, 0, (size_t)n * sizeof(uint16_t));
        return 0;
    }
    int e;
    frexpf(largest, &e);
    const __m512 t = _mm512_set1_ps((float)(100 - e));
    for (ptrdiff_t c = 0; c < n; c += 32)
        _mm512_storeu_si512(out + c, (__m512i)_mm512_cvtne2ps_pbh(
            _mm512_scalef_ps(y[c / 16 + 1], t), _mm512_scalef_ps(y[c / 16], t)));
    return (float)(e + 12);
}

FA_DEFINE_DP_CHUNK_8BIT(F8, f8, uint8_t, uint16_t, fa_f8dp_to_bf16)
#pragma GCC pop_options
#pragma GCC pop_options
#else
/* Never reached: the policy takes these kernels only where FA_HAVE_DPBF16. */
#define FA_DP_CHUNK_16BIT_ABSENT(S)                                                        \
FA_DP_CHUNK_16BIT_SIGNATURE(S)                                                             \
{                                                                                          \
    (void)q; (void)n_rows; (void)d; (void)k; (void)v; (void)d_v; (void)n_keys;             \
    (void)scale; (void)softcap; (void)m; (void)l; (void)o; (void)s; (void)qb; (void)pb;    \
    (void)pg;                                                                              \
    abort();                                                                               \
}
FA_DP_CHUNK_16BIT_ABSENT(bf)
FA_DP_CHUNK_16BIT_ABSENT(hf)
/* Never reached either (the same rule). */
#define FA_DP_CHUNK_8BIT_ABSENT(S, KT)                                                      \
FA_DP_CHUNK_8BIT_SIGNATURE(S, KT)                                                          \
{                                                                                          \
    (void)q; (void)n_rows; (void)d; (void)k; (void)v; (void)d_v; (void)n_keys;             \
    (void)scale; (void)softcap; (void)ks; (void)vs; (void)phase; (void)m; (void)l;         \
    (void)o; (void)s; (void)qs; (void)pw; (void)pg;                                        \
    abort();                                                                               \
}
FA_DP_CHUNK_8BIT_ABSENT(i8, int8_t)
FA_DP_CHUNK_8BIT_ABSENT(f8, uint8_t)
#endif

#endif

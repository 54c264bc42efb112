/* Single-query attention (decoding): one work item is the G query rows that share a
 * key/value head, against keys [0, n_keys) of that head, read once, in blocks of
 * FA_DECODE_BLOCK keys with an online softmax. It leaves the partial state m[g] (running
 * max), l[g] (running sum, double) and o[g][:] (unnormalised output), to be merged with the
 * other key chunks of the same head in a fixed order.
 *
 * The work per key is two short dot products' worth of FMAs, so what decides the speed is
 * how the partial sums are combined. With GCC's vector extensions, in the widest vectors
 * of the build (N lanes: 16 floats for AVX-512), when N divides both head sizes:
 *  - scores: N keys at once, one accumulator vector each, each key's row read start to
 *    end (q reloaded from L1 for each); the N accumulators are then summed across lanes
 *    together by a transposing tree
 *    (log2 N levels of two shuffles and an add), which leaves key u's score in lane u;
 *  - P V: the output row's columns stay in registers (up to 16 vectors) across the block.
 * Other head sizes take a scalar loop (FA_DOT_LANES partial sums, combined as a tree).
 * Both orders are fixed by the shape alone, so results are deterministic and independent
 * of the thread count. (A first version kept 64 partial sums combined in a loop over the
 * tree's levels: GCC summed them through the stack one scalar at a time, 27 ns a key.) */
#ifndef FASTATTN_DECODE_H
#define FASTATTN_DECODE_H

#include "fa_convert.h"
#include "fa_exp.h"

/* Keys per block: each block reads its keys, then its values. Blocks of 256 rather than 64
 * switch between the two streams a quarter as often (a step about 10% faster, within a
 * tenth of a plain read of the same bytes). */
#define FA_DECODE_BLOCK 256
#define FA_DOT_LANES 64
/* fa_dot's reduction tree (32, 16, ..., 1) is written out for exactly 64 lanes. */
_Static_assert(FA_DOT_LANES == 64, "fa_dot's reduction tree is written for 64 lanes");

/* 8-bit storage (fastattn.cache, storage="int8" or "float8_e4m3"): keys hold one scale per
 * channel for each group of FA_KV_GROUP tokens (rows of the storage), values one per token.
 * The kernel folds the key scales into q (q * scale, once per group and row) and the value
 * scales into the weights (p * scale, once per key and row), so that the inner loops only
 * widen the stored bytes. */
#define FA_KV_GROUP 32

/* Where the span of keys from key j of a block (nb keys) within one key group ends: key
 * j is key `at` of the storage's rows counted from its first group (phase + j0 + j). */
static inline ptrdiff_t fa_group_span_end(ptrdiff_t at, ptrdiff_t j, ptrdiff_t nb)
{
    const ptrdiff_t stop = j + FA_KV_GROUP - at % FA_KV_GROUP;
    return stop < nb ? stop : nb;
}

/* Where the keys and values of a work item live when they are not one run of rows: in
 * pages (fixed blocks of `rows` rows of one head) of a pool, as a paged cache holds them.
 * Row r of the item (from 0) is row (first + r) of the sequence's pages: page p =
 * table[(first + r) / rows], at k + p * k_stride (elements) and v + p * v_stride, row
 * (first + r) % rows of it. The spans of the kernel break where the next page is not the
 * next in memory (pages p and p + 1 are adjacent when k_stride is a page's rows), and
 * nowhere else: a contiguous item (no page map) runs as before. The 8-bit kinds' scales
 * lie in pages too, ks_stride and vs_stride elements apart (a page holds whole key
 * groups: rows is a multiple of FA_KV_GROUP), their rows in the order of the pages'. */
typedef struct {
    const ptrdiff_t *table;
    ptrdiff_t rows, first, k_stride, v_stride, ks_stride, vs_stride;
} fa_pages;

/* Row r of an item (see fa_pages): its key row, its value row, and how many rows from it
 * on are contiguous (at most `limit`). */
#define FA_PAGE_OF(pg, r) ((pg)->table[((pg)->first + (r)) / (pg)->rows])
#define FA_PAGE_ROW(pg, r) (((pg)->first + (r)) % (pg)->rows)
#define FA_KROW(k, pg, r, d) ((pg) ? (k) + FA_PAGE_OF(pg, r) * (pg)->k_stride + FA_PAGE_ROW(pg, r) * (d) \
                                   : (k) + (r) * (d))
#define FA_VROW(v, pg, r, d_v) ((pg) ? (v) + FA_PAGE_OF(pg, r) * (pg)->v_stride + FA_PAGE_ROW(pg, r) * (d_v) \
                                     : (v) + (r) * (d_v))
#define FA_RUN(pg, r, limit) ((pg) ? fa_page_run(pg, r, limit) : (limit))
/* The 8-bit kinds' span of keys from key j of the block at row j0 of an item (nb keys),
 * within one key group: where it ends in the block (stop), its first key row (krow) and
 * its group's channel scales (sc). Without pages, k's rows and the scales of the group
 * of row phase + j0 + j (ks at the group of row 0); in pages, both from one division
 * (a page holds whole groups, so a group's span never leaves its page). */
#define FA_GROUP_SPAN(k, ks, pg, phase, j0, j, nb, d, krow, sc, stop)                      \
    do {                                                                                   \
        const ptrdiff_t at_ = ((pg) ? (pg)->first : (phase)) + (j0) + (j);                 \
        (stop) = fa_group_span_end(at_, j, nb);                                            \
        if (pg) {                                                                          \
            const ptrdiff_t row_ = at_ % (pg)->rows;                                       \
            const ptrdiff_t page_ = (pg)->table[at_ / (pg)->rows];                         \
            (krow) = (k) + page_ * (pg)->k_stride + row_ * (d);                            \
            (sc) = (ks) + page_ * (pg)->ks_stride + row_ / FA_KV_GROUP * (d);              \
        } else {                                                                           \
            (krow) = (k) + ((j0) + (j)) * (d);                                             \
            (sc) = (ks) + at_ / FA_KV_GROUP * (d);                                         \
        }                                                                                  \
    } while (0)

/* How many rows from row r of an item on lie in one run of memory (at most limit): to the
 * end of its page, and on through the pages that follow it in the pool (a sequence whose
 * blocks were taken in order is one run per kv head). The table holds a page for every
 * row below r + limit. */
static inline ptrdiff_t fa_page_run(const fa_pages *pg, ptrdiff_t r, ptrdiff_t limit)
{
    ptrdiff_t i = (pg->first + r) / pg->rows;
    ptrdiff_t run = pg->rows - (pg->first + r) % pg->rows;
    while (run < limit && pg->table[i + 1] == pg->table[i] + 1) {
        i++;
        run += pg->rows;
    }
    return run < limit ? run : limit;
}

/* The value scales of a block's nb rows from row j0 of an item: vs's own (from row j0)
 * without pages, else gathered run by run into buf (FA_DECODE_BLOCK of them). */
#define FA_BLOCK_VSCALES(vs, pg, j0, nb, buf)                                              \
    ((pg) ? fa_gather_runs(buf, vs, sizeof(*(buf)), pg, j0, nb) : (vs) + (j0))
static inline void *fa_gather_runs(void *buf, const void *vs, size_t size,
                                   const fa_pages *pg, ptrdiff_t j0, ptrdiff_t nb)
{
    for (ptrdiff_t j = 0; j < nb;) {
        const ptrdiff_t run = fa_page_run(pg, j0 + j, nb - j);
        memcpy((char *)buf + j * size, (const char *)vs + (FA_PAGE_OF(pg, j0 + j) * pg->vs_stride
                                                           + FA_PAGE_ROW(pg, j0 + j)) * size,
               run * size);
        j += run;
    }
    return buf;
}

/* P V for RB rows at once, W vectors of output columns from column c, the columns held in
 * registers across the nb keys: o[g][c] += sum_j p[g][j] v[j][c], each value vector
 * loaded (and widened) once for the RB rows. With fewer than 8 accumulators, chains of
 * FMAs would wait on the FMA latency (a d_v of 64 floats ran at a quarter of the FMA rate
 * with one row), so two sets take alternate keys and are added at the end. The order of
 * each output is fixed by the shape alone (RB and W follow from n_rows and d_v). */
#define FA_DEC_PV_PASS(T, SUFFIX, RB, W, KT, LOADV)                                        \
    for (; c + (W) * n <= d_v; c += (W) * n) {                                             \
        fa_vec_##SUFFIX a0[RB][W], a1[RB][W];                                              \
        for (int g = 0; g < (RB); g++)                                                     \
            for (int i = 0; i < (W); i++) {                                                \
                a0[g][i] = *(fa_vecu_##SUFFIX *)(o + g * d_v + c + i * n);                  \
                a1[g][i] = (fa_vec_##SUFFIX){0};                                           \
            }                                                                              \
        ptrdiff_t j = 0;                                                                   \
        if ((RB) * (W) < 8)                                                                \
            for (; j + 2 <= nb; j += 2) {                                                  \
                const KT *v0 = v + j * d_v + c, *v1 = v0 + d_v;                            \
                for (int i = 0; i < (W); i++) {                                            \
                    const fa_vec_##SUFFIX x0 = LOADV(v0 + i * n), x1 = LOADV(v1 + i * n);  \
                    for (int g = 0; g < (RB); g++) {                                       \
                        a0[g][i] += p[g * FA_DECODE_BLOCK + j] * x0;                       \
                        a1[g][i] += p[g * FA_DECODE_BLOCK + j + 1] * x1;                   \
                    }                                                                      \
                }                                                                          \
            }                                                                              \
        for (; j < nb; j++) {                                                              \
            fa_vec_##SUFFIX x[W];                                                          \
            for (int i = 0; i < (W); i++) x[i] = LOADV(v + j * d_v + c + i * n);           \
            for (int g = 0; g < (RB); g++) {                                               \
                const T pj = p[g * FA_DECODE_BLOCK + j];                                   \
                for (int i = 0; i < (W); i++) a0[g][i] += pj * x[i];                       \
            }                                                                              \
        }                                                                                  \
        for (int g = 0; g < (RB); g++)                                                     \
            for (int i = 0; i < (W); i++)                                                  \
                *(fa_vecu_##SUFFIX *)(o + g * d_v + c + i * n) =                           \
                    (RB) * (W) < 8 ? a0[g][i] + a1[g][i] : a0[g][i];                       \
    }

/* Scores of RB rows x N/RB keys at once (RB <= N): each key vector loaded (and widened)
 * once for the RB rows, q's RB vectors once for the N/RB keys. s[g][u] = scale q[g] . k[u]
 * for u < count; each (row, key) sum runs over d in the same order whatever RB is, and the
 * transposing tree sums every accumulator's lanes the same way, so a score does not depend
 * on RB. */
#define FA_DEC_SCORES_RB(T, SUFFIX, RB, KT, LOADV)                                         \
static inline __attribute__((always_inline)) void fa_dec_scores##RB##_##SUFFIX(           \
    const T *q, ptrdiff_t d, const KT *k, int count, T scale, T *s)                        \
{                                                                                          \
    enum { NK = FA_N_##SUFFIX / (RB) > 0 ? FA_N_##SUFFIX / (RB) : 1 };                     \
    const int n = FA_N_##SUFFIX;                                                           \
    /* (Sized for RB rows too, so that the blocks a narrow vector never runs compile.) */  \
    fa_vec_##SUFFIX acc[FA_N_##SUFFIX > (RB) ? FA_N_##SUFFIX : (RB)];                     \
    for (int u = 0; u < n; u++) acc[u] = (fa_vec_##SUFFIX){0};                             \
    /* Key after key, each row read start to end, q's rows from L1 again for each: a   */ \
    /* key vector loaded (and widened) once for the RB rows. (Reading the keys in step,  */ \
    /* a vector of each in turn, held a step to 64-73% of the read floor with one row,   */ \
    /* and was 10-20% slower with four.)                                                  */ \
    _Pragma("GCC unroll 16")                                                               \
    for (int u = 0; u < NK; u++) {                                                         \
        const KT *ku = k + (u < count ? u : count - 1) * d;                                \
        for (ptrdiff_t t = 0; t < d; t += n) {                                             \
            const fa_vec_##SUFFIX kv = LOADV(ku + t);                                      \
            for (int g = 0; g < (RB); g++)                                                 \
                acc[g * NK + u] += *(const fa_vecu_##SUFFIX *)(q + g * d + t) * kv;        \
        }                                                                                  \
    }                                                                                      \
    const fa_vec_##SUFFIX r = fa_lane_sums_##SUFFIX(acc) * scale;                          \
    for (int g = 0; g < (RB); g++)                                                         \
        for (int u = 0; u < count; u++) s[g * FA_DECODE_BLOCK + u] = r[g * NK + u];        \
}

/* Rows g, g + RB, ... of fa_dec_scores (while RB rows are left), each block in passes of
 * N/RB keys (the last pass may be short). */
#define FA_DEC_SCORE_ROWS(SUFFIX, RB)                                                      \
    for (; g + (RB) <= n_rows; g += (RB))                                                  \
        for (ptrdiff_t j = 0; j < cnt; j += n / (RB))                                      \
            fa_dec_scores##RB##_##SUFFIX(q + g * d, d, k + j * d,                          \
                                         (int)(cnt - j < n / (RB) ? cnt - j : n / (RB)),   \
                                         scale, s + g * FA_DECODE_BLOCK + j);

/* The transposing tree below for the widest vectors, with shuffles that keep their
 * operands (GCC built the generic shuffles as vpermt2d on AVX-512, which overwrites an
 * operand: a register copy per shuffle; as pairs of vpermd and blends on AVX2): 128-bit
 * blocks first (vshuff32x4, vshuff64x2, vperm2f128), then within blocks (vshufps,
 * vshufpd), which leaves the keys in the order of a transposed matrix, put back by one
 * permutation at the end. Every level adds the same pairs of lanes as the generic tree,
 * so the sums are bitwise its own. (`python -m fastattn tune --kernels`, its decoding
 * probe, one Zen 4 core, alternating builds: exact steps 2-7% faster; with fa_decode_dp.h's
 * P V four rows at a time, products 2-17%.)
 *  - FA_LANE_SUMS16 (AVX-512, 16 lanes of 4 bytes: float or int32): key u ends in lane
 *    4 (u % 4) + u / 4;
 *  - FA_LANE_SUMS8 (AVX-512: 8 doubles, key u in lane 2 (u % 4) + u / 4; AVX2: 8 floats,
 *    key u in lane 4 (u % 2) + u / 2). */
#define FA_SUMS_LEVEL(VT, x, count, SHUF, LO, HI, CAST)                                    \
    for (int p = 0; p < (count); p++) {                                                    \
        const CAST a = (CAST)x[2 * p], b = (CAST)x[2 * p + 1];                             \
        x[p] = (VT)SHUF(a, b, LO) + (VT)SHUF(a, b, HI);                                    \
    }
#if defined(__AVX512F__) && FA_VBYTES == 64
#define FA_LANE_SUMS16(VT, x)                                                              \
    do {                                                                                   \
        FA_SUMS_LEVEL(VT, x, 8, _mm512_shuffle_f32x4, 0x44, 0xee, __m512)                  \
        FA_SUMS_LEVEL(VT, x, 4, _mm512_shuffle_f32x4, 0x88, 0xdd, __m512)                  \
        FA_SUMS_LEVEL(VT, x, 2, _mm512_shuffle_ps, 0x44, 0xee, __m512)                     \
        FA_SUMS_LEVEL(VT, x, 1, _mm512_shuffle_ps, 0x88, 0xdd, __m512)                     \
        return (VT)_mm512_permutexvar_ps(                                                  \
            _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),       \
            (__m512)x[0]);                                                                 \
    } while (0)
#define FA_LANE_SUMS8(VT, x)                                                               \
    do {                                                                                   \
        FA_SUMS_LEVEL(VT, x, 4, _mm512_shuffle_f64x2, 0x44, 0xee, __m512d)                 \
        FA_SUMS_LEVEL(VT, x, 2, _mm512_shuffle_f64x2, 0x88, 0xdd, __m512d)                 \
        FA_SUMS_LEVEL(VT, x, 1, _mm512_shuffle_pd, 0x00, 0xff, __m512d)                    \
        return (VT)_mm512_permutexvar_pd(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7),        \
                                         (__m512d)x[0]);                                   \
    } while (0)
#define FA_LANE_SUMS_WIDE(N, VT) (sizeof(VT) == 64 && ((N) == 16 || (N) == 8))
#elif defined(__AVX2__) && FA_VBYTES == 32
#define FA_LANE_SUMS16(VT, x) do { } while (0)
#define FA_LANE_SUMS8(VT, x)                                                               \
    do {                                                                                   \
        FA_SUMS_LEVEL(VT, x, 4, _mm256_permute2f128_ps, 0x20, 0x31, __m256)                \
        FA_SUMS_LEVEL(VT, x, 2, _mm256_shuffle_ps, 0x44, 0xee, __m256)                     \
        FA_SUMS_LEVEL(VT, x, 1, _mm256_shuffle_ps, 0x88, 0xdd, __m256)                     \
        return (VT)_mm256_permutevar8x32_ps((__m256)x[0],                                  \
                                            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));    \
    } while (0)
#define FA_LANE_SUMS_WIDE(N, VT) (sizeof(VT) == 32 && (N) == 8)
#else
#define FA_LANE_SUMS16(VT, x) do { } while (0)
#define FA_LANE_SUMS8(VT, x) do { } while (0)
#define FA_LANE_SUMS_WIDE(N, VT) 0
#endif

/* NAME(x), the transposing tree below, for vectors VT of N lanes (IVT: integer vectors of
 * as many lanes, IOTA: their elements 0, 1, ...; VT may be IVT itself). */
#define FA_DEFINE_LANE_SUMS(NAME, VT, IVT, N, IOTA)                                        \
/* r[u] = sum of the lanes of x[u], u < N (x is overwritten). Level w combines pairs of  */ \
/* vectors whose segments of 2w lanes each hold one key's partial sums into segments of  */ \
/* w lanes, lower keys first, so lane u ends up with key u. The shuffle masks are        */ \
/* arithmetic on a constant 0..N-1 vector, which GCC folds to constants.                 */ \
static inline __attribute__((always_inline)) VT NAME(VT *x)                                \
{                                                                                          \
    if (FA_LANE_SUMS_WIDE(N, VT)) {                                                        \
        if ((N) == 16) FA_LANE_SUMS16(VT, x);                                              \
        else FA_LANE_SUMS8(VT, x);                                                         \
    }                                                                                      \
    const int n = (N);                                                                     \
    IVT iota;                                                                              \
    memcpy(&iota, IOTA, sizeof iota);                                                      \
    int count = n;                                                                         \
    _Pragma("GCC unroll 8")                                                                \
    for (int w = n / 2; w >= 1; w /= 2) {                                                  \
        const int segs = n / (2 * w);                                                      \
        IVT seg = iota / w;                                                                \
        IVT lo = ((seg >= segs) & n) + (seg % segs) * (2 * w) + iota % w;                  \
        IVT hi = lo + w;                                                                   \
        _Pragma("GCC unroll 16")                                                           \
        for (int p = 0; p < count / 2; p++)                                                \
            x[p] = __builtin_shuffle(x[2 * p], x[2 * p + 1], lo)                           \
                 + __builtin_shuffle(x[2 * p], x[2 * p + 1], hi);                          \
        count /= 2;                                                                        \
    }                                                                                      \
    return x[0];                                                                           \
}

/* T: the arithmetic (float or double), RS the suffix of its row operations (fa_exp.h);
 * KT: how keys and values are stored (T; uint16_t holding bfloat16 or float16, int8_t,
 * or uint8_t holding float8 e4m3, for T = float); LOADV(p): N lanes of T from KT *p;
 * LOAD1(x): one; QUANT: 1 for the 8-bit kinds, whose scales the kernel applies. */
#define FA_DEFINE_DECODE(T, IT, SUFFIX, EXP, KT, LOADV, LOAD1, RS, QUANT)                  \
typedef T fa_vec_##SUFFIX __attribute__((vector_size(FA_VBYTES)));                         \
typedef T fa_vecu_##SUFFIX __attribute__((vector_size(FA_VBYTES), aligned(sizeof(T))));    \
typedef IT fa_ivec_##SUFFIX __attribute__((vector_size(FA_VBYTES)));                       \
enum { FA_N_##SUFFIX = FA_VBYTES / sizeof(T) };                                            \
static const IT fa_iota_##SUFFIX[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; \
static inline T fa_dot_##SUFFIX(const T *a, const KT *b, ptrdiff_t n)                     \
{                                                                                          \
    T acc[FA_DOT_LANES];                                                                   \
    for (int t = 0; t < FA_DOT_LANES; t++) acc[t] = 0;                                     \
    ptrdiff_t i = 0;                                                                       \
    for (; i + FA_DOT_LANES <= n; i += FA_DOT_LANES)                                       \
        for (int t = 0; t < FA_DOT_LANES; t++) acc[t] += a[i + t] * LOAD1(b[i + t]);       \
    for (int t = 0; i + t < n; t++) acc[t] += a[i + t] * LOAD1(b[i + t]);                  \
    for (int t = 0; t < 32; t++) acc[t] += acc[t + 32];                                    \
    for (int t = 0; t < 16; t++) acc[t] += acc[t + 16];                                    \
    for (int t = 0; t < 8; t++) acc[t] += acc[t + 8];                                      \
    for (int t = 0; t < 4; t++) acc[t] += acc[t + 4];                                      \
    for (int t = 0; t < 2; t++) acc[t] += acc[t + 2];                                      \
    return acc[0] + acc[1];                                                                \
}                                                                                          \
FA_DEFINE_LANE_SUMS(fa_lane_sums_##SUFFIX, fa_vec_##SUFFIX, fa_ivec_##SUFFIX, FA_N_##SUFFIX, \
                    fa_iota_##SUFFIX)                                                      \
FA_DEC_SCORES_RB(T, SUFFIX, 1, KT, LOADV)                                                  \
FA_DEC_SCORES_RB(T, SUFFIX, 2, KT, LOADV)                                                  \
FA_DEC_SCORES_RB(T, SUFFIX, 4, KT, LOADV)                                                  \
FA_DEC_SCORES_RB(T, SUFFIX, 8, KT, LOADV)                                                  \
/* Scores of the n_rows rows against cnt keys: rows in blocks of 8, 4, 2, 1 (as many as  */ \
/* the vector has lanes), each block in passes of N/RB keys. */                             \
static inline __attribute__((always_inline)) void fa_dec_scores_##SUFFIX(                 \
    const T *q, ptrdiff_t n_rows, ptrdiff_t d, const KT *k, ptrdiff_t cnt, T scale, T *s)  \
{                                                                                          \
    const int n = FA_N_##SUFFIX;                                                           \
    ptrdiff_t g = 0;                                                                       \
    if (n >= 8) FA_DEC_SCORE_ROWS(SUFFIX, 8)                                               \
    if (n >= 4) FA_DEC_SCORE_ROWS(SUFFIX, 4)                                               \
    FA_DEC_SCORE_ROWS(SUFFIX, 2)                                                           \
    FA_DEC_SCORE_ROWS(SUFFIX, 1)                                                           \
}                                                                                          \
/* Scores of cnt keys from k (rows of d), vectorised when d is whole vectors; with d a   */ \
/* constant, the keys are one pointer plus constant offsets (with d a variable, GCC kept */ \
/* a pointer per key and spilled them: a load per FMA).                                  */ \
static inline void fa_dec_span_##SUFFIX(const T *q, ptrdiff_t n_rows, ptrdiff_t d,         \
                                        const KT *k, ptrdiff_t cnt, T scale, T *s, int vec) \
{                                                                                          \
    if (!vec) {                                                                            \
        for (ptrdiff_t j = 0; j < cnt; j++)                                                \
            for (ptrdiff_t g = 0; g < n_rows; g++)                                         \
                s[g * FA_DECODE_BLOCK + j] = scale * fa_dot_##SUFFIX(q + g * d, k + j * d, d); \
    } else if (d == 64) {                                                                  \
        fa_dec_scores_##SUFFIX(q, n_rows, 64, k, cnt, scale, s);                           \
    } else if (d == 128) {                                                                 \
        fa_dec_scores_##SUFFIX(q, n_rows, 128, k, cnt, scale, s);                          \
    } else {                                                                               \
        fa_dec_scores_##SUFFIX(q, n_rows, d, k, cnt, scale, s);                            \
    }                                                                                      \
}                                                                                          \
/* o[g][c] += sum_j p[g][j] v[j][c] for the n_rows rows, c < d_v, nb keys: rows in pairs */ \
/* (blocks of 4 ran slower), then one by one, in passes of 16/RB, then halves, of        */ \
/* vectors of columns (the 16 vectors of one row do not all fit the AVX2 register file,  */ \
/* but a 128-float row is then read in one pass rather than two).                        */ \
static inline void fa_dec_pv_##SUFFIX(const T *p_all, ptrdiff_t n_rows, ptrdiff_t nb,      \
                                      const KT *v, ptrdiff_t d_v, T *o_all)                \
{                                                                                          \
    const int n = FA_N_##SUFFIX;                                                           \
    ptrdiff_t g = 0;                                                                       \
    for (; g + 2 <= n_rows; g += 2) {                                                      \
        const T *p = p_all + g * FA_DECODE_BLOCK;                                          \
        T *o = o_all + g * d_v;                                                            \
        ptrdiff_t c = 0;                                                                   \
        FA_DEC_PV_PASS(T, SUFFIX, 2, 8, KT, LOADV)                                         \
        FA_DEC_PV_PASS(T, SUFFIX, 2, 4, KT, LOADV)                                         \
        FA_DEC_PV_PASS(T, SUFFIX, 2, 2, KT, LOADV)                                         \
        FA_DEC_PV_PASS(T, SUFFIX, 2, 1, KT, LOADV)                                         \
    }                                                                                      \
    for (; g < n_rows; g++) {                                                              \
        const T *p = p_all + g * FA_DECODE_BLOCK;                                          \
        T *o = o_all + g * d_v;                                                            \
        ptrdiff_t c = 0;                                                                   \
        FA_DEC_PV_PASS(T, SUFFIX, 1, 16, KT, LOADV)                                        \
        FA_DEC_PV_PASS(T, SUFFIX, 1, 8, KT, LOADV)                                         \
        FA_DEC_PV_PASS(T, SUFFIX, 1, 4, KT, LOADV)                                         \
        FA_DEC_PV_PASS(T, SUFFIX, 1, 2, KT, LOADV)                                         \
        FA_DEC_PV_PASS(T, SUFFIX, 1, 1, KT, LOADV)                                         \
    }                                                                                      \
}                                                                                          \
/* One row's step of the online softmax over a block's nb scores sr (softcapped first  */ \
/* when softcap > 0): the running max *m and sum *l, the output row rescaled to the new  */ \
/* max, sr left holding the block's weights e^(s - m). (Also fa_decode_dp.h's.)          */ \
static inline __attribute__((always_inline)) void fa_dec_online_##SUFFIX(                 \
    T *sr, ptrdiff_t nb, T softcap, T *m, double *l, T *orow, ptrdiff_t d_v)               \
{                                                                                          \
    if (softcap > 0) fa_softcap_row_##RS(sr, nb, softcap, (T)1 / softcap);                 \
    T m_new = fa_row_max_##RS(sr, nb);                                                     \
    if (*m > m_new) m_new = *m;                                                            \
    const T m_use = m_new == -INFINITY ? 0 : m_new;                                        \
    const T alpha = EXP(*m - m_use);                                                       \
    *m = m_new;                                                                            \
    *l = *l * alpha + fa_exp_shift_sum_##RS(sr, nb, m_use);                                \
    for (ptrdiff_t c = 0; c < d_v; c++) orow[c] *= alpha;                                  \
}                                                                                          \
/* One work item: the n_rows rows of q against keys and values [0, n_keys) (see the top */ \
/* of the file). 8-bit kinds (QUANT): ks points at the scales of the key group holding   */ \
/* key 0, which is key `phase` of its group; vs at key 0's value scale; qs is scratch of */ \
/* n_rows * d. Other kinds ignore the four. pg: NULL (k, v: contiguous rows), or the    */ \
/* page map of the item's rows and scales (fa_pages; phase then unused).                 */ \
static inline void fa_decode_chunk_##SUFFIX(                                               \
    const T *q, ptrdiff_t n_rows, ptrdiff_t d, const KT *k, const KT *v, ptrdiff_t d_v,    \
    ptrdiff_t n_keys, T scale, T softcap, const T *ks, const T *vs, ptrdiff_t phase,       \
    T *m, double *l, T *o, T *s, T *qs, const fa_pages *pg)                                \
{                                                                                          \
    const int n = FA_N_##SUFFIX;                                                           \
    const int vec = d % n == 0 && d_v % n == 0;                                            \
    for (ptrdiff_t g = 0; g < n_rows; g++) { m[g] = -INFINITY; l[g] = 0; }                \
    for (ptrdiff_t c = 0; c < n_rows * d_v; c++) o[c] = 0;                                 \
    for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += FA_DECODE_BLOCK) {                           \
        ptrdiff_t nb = n_keys - j0 < FA_DECODE_BLOCK ? n_keys - j0 : FA_DECODE_BLOCK;      \
        if (!(QUANT)) {                                                                    \
            for (ptrdiff_t j = 0; j < nb;) {  /* one span, or one per page */              \
                const ptrdiff_t run = FA_RUN(pg, j0 + j, nb - j);                          \
                fa_dec_span_##SUFFIX(q, n_rows, d, FA_KROW(k, pg, j0 + j, d), run, scale,  \
                                     s + j, vec);                                          \
                j += run;                                                                  \
            }                                                                              \
        } else {                                                                           \
            /* Spans within one key group: q times the group's channel scales, then the */ \
            /* stored bytes as they are.                                                */ \
            for (ptrdiff_t j = 0; j < nb;) {                                               \
                ptrdiff_t stop;                                                            \
                const KT *kr;                                                              \
                const T *sc;                                                               \
                FA_GROUP_SPAN(k, ks, pg, phase, j0, j, nb, d, kr, sc, stop);               \
                for (ptrdiff_t g = 0; g < n_rows; g++)                                     \
                    for (ptrdiff_t c = 0; c < d; c++) qs[g * d + c] = q[g * d + c] * sc[c]; \
                fa_dec_span_##SUFFIX(qs, n_rows, d, kr, stop - j, scale, s + j, vec);      \
                j = stop;                                                                  \
            }                                                                              \
        }                                                                                  \
        T vs_buf[QUANT ? FA_DECODE_BLOCK : 1];                                             \
        const T *vsb = QUANT ? FA_BLOCK_VSCALES(vs, pg, j0, nb, vs_buf) : NULL;            \
        for (ptrdiff_t g = 0; g < n_rows; g++) {                                           \
            T *sr = s + g * FA_DECODE_BLOCK;                                               \
            fa_dec_online_##SUFFIX(sr, nb, softcap, m + g, l + g, o + g * d_v, d_v);       \
            if (QUANT)                                                                     \
                for (ptrdiff_t j = 0; j < nb; j++) sr[j] *= vsb[j];                        \
        }                                                                                  \
        if (vec) {                                                                         \
            for (ptrdiff_t j = 0; j < nb;) {                                               \
                const ptrdiff_t run = FA_RUN(pg, j0 + j, nb - j);                          \
                fa_dec_pv_##SUFFIX(s + j, n_rows, run, FA_VROW(v, pg, j0 + j, d_v), d_v, o); \
                j += run;                                                                  \
            }                                                                              \
            continue;                                                                      \
        }                                                                                  \
        for (ptrdiff_t g = 0; g < n_rows; g++) {                                           \
            const T *sr = s + g * FA_DECODE_BLOCK;                                         \
            T *orow = o + g * d_v;                                                         \
            for (ptrdiff_t c = 0; c < d_v; c++) {                                          \
                T acc = orow[c];                                                           \
                for (ptrdiff_t j = 0; j < nb; j++)                                         \
                    acc += sr[j] * LOAD1(FA_VROW(v, pg, j0 + j, d_v)[c]);                  \
                orow[c] = acc;                                                             \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
}                                                                                          \
/* The result of one group from the partial states of its n_chunks key chunks, merged  */ \
/* in chunk order: lse = m + log(sum_c l_c e^(m_c - m)), out = sum_c o_c e^(m_c - m) / l. */ \
/* parts holds per chunk m[n_rows] then o[n_rows][d_v]; l_parts l[n_rows] per chunk.    */ \
/* sinks (NULL: none): one more key per row with logit sinks[g] and a zero value, so it  */ \
/* is one more part with m = sinks[g], l = 1 and o = 0, merged first.                    */ \
static inline void fa_decode_merge_##SUFFIX(const T *parts, const double *l_parts,        \
                                            ptrdiff_t n_chunks, ptrdiff_t n_rows,          \
                                            ptrdiff_t d_v, const T *sinks,                 \
                                            T *restrict out, T *lse)                       \
{                                                                                          \
    const ptrdiff_t part = n_rows * (1 + d_v);                                             \
    for (ptrdiff_t g = 0; g < n_rows; g++) {                                               \
        T *restrict orow = out + g * d_v;                                                  \
        T m_max = sinks ? sinks[g] : -INFINITY;                                            \
        for (ptrdiff_t c = 0; c < n_chunks; c++)                                           \
            if (parts[c * part + g] > m_max) m_max = parts[c * part + g];                  \
        /* As in the attention kernel: shift by 0 while no key is visible, and decide */  \
        /* "every key hidden" by the sum, so that NaN scores stay NaN.                */  \
        if (m_max == -INFINITY) m_max = 0;                                                 \
        for (ptrdiff_t col = 0; col < d_v; col++) orow[col] = 0;                           \
        double total = sinks ? (double)EXP(sinks[g] - m_max) : 0;                          \
        for (ptrdiff_t c = 0; c < n_chunks; c++) {                                         \
            const T weight = EXP(parts[c * part + g] - m_max);                             \
            const T *restrict oc = parts + c * part + n_rows + g * d_v;                    \
            total += l_parts[c * n_rows + g] * weight;                                     \
            for (ptrdiff_t col = 0; col < d_v; col++) orow[col] += oc[col] * weight;       \
        }                                                                                  \
        if (total == 0) {  /* every key hidden (or none): zeros, lse -inf */               \
            for (ptrdiff_t col = 0; col < d_v; col++) orow[col] = 0;                       \
            lse[g] = -INFINITY;                                                            \
            continue;                                                                      \
        }                                                                                  \
        const T inv = (T)(1.0 / total);                                                    \
        for (ptrdiff_t col = 0; col < d_v; col++) orow[col] *= inv;                        \
        lse[g] = (T)(m_max + log(total));                                                  \
    }                                                                                      \
}

#define FA_LOADV_f(p) (*(const fa_vecu_f *)(p))
#define FA_LOADV_d(p) (*(const fa_vecu_d *)(p))
#define FA_LOAD1_NATIVE(x) (x)
FA_DEFINE_DECODE(float, int32_t, f, fa_expf, float, FA_LOADV_f, FA_LOAD1_NATIVE, f, 0)
FA_DEFINE_DECODE(double, int64_t, d, fa_exp, double, FA_LOADV_d, FA_LOAD1_NATIVE, d, 0)

/* bfloat16 and float16 keys and values, read in place and widened exactly as they are
 * loaded (fa_convert.h): the arithmetic is the float32 kernel's, so the result is bitwise
 * that of the float32 kernel on the widened arrays. */
typedef uint16_t fa_vh_bf __attribute__((vector_size(FA_VBYTES / 2), aligned(2)));
typedef uint32_t fa_vw_bf __attribute__((vector_size(FA_VBYTES)));
#define FA_LOADV_bf(p) ((fa_vec_bf)(__builtin_convertvector(*(const fa_vh_bf *)(p), fa_vw_bf) << 16))
FA_DEFINE_DECODE(float, int32_t, bf, fa_expf, uint16_t, FA_LOADV_bf, fa_bf16_to_f32, f, 0)

/* float16: F16C's vcvtph2ps on a whole vector where the build has it (the AVX2 and AVX-512
 * builds), else lane by lane. */
static inline __attribute__((always_inline)) fa_vec_bf fa_halves_to_vec(fa_vh_bf h)
{
#if defined(__AVX512F__) && FA_VBYTES == 64
    return (fa_vec_bf)_mm512_cvtph_ps((__m256i)h);
#elif defined(__F16C__) && FA_VBYTES == 32
    return (fa_vec_bf)_mm256_cvtph_ps((__m128i)h);
#else
    fa_vec_bf x;
    for (int i = 0; i < FA_N_bf; i++) x[i] = fa_f16_to_f32(h[i]);
    return x;
#endif
}
#define FA_LOADV_hf(p) fa_halves_to_vec(*(const fa_vh_bf *)(p))
FA_DEFINE_DECODE(float, int32_t, hf, fa_expf, uint16_t, FA_LOADV_hf, fa_f16_to_f32, f, 0)

/* int8 (with its scales, see FA_KV_GROUP): sign-extended and converted, vpmovsxbd and
 * vcvtdq2ps (written as intrinsics: GCC 12 lowered __builtin_convertvector from 16 int8
 * to 16 int32 one element at a time in these loops, 3.5x slower). */
typedef int8_t fa_vb_i8 __attribute__((vector_size(FA_VBYTES / 4), aligned(1)));
typedef int32_t fa_vw_i8 __attribute__((vector_size(FA_VBYTES)));
static inline __attribute__((always_inline)) fa_vec_bf fa_loadv_i8(const int8_t *p)
{
#if defined(__AVX512F__) && FA_VBYTES == 64
    return (fa_vec_bf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__) && FA_VBYTES == 32
    return (fa_vec_bf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    return __builtin_convertvector(__builtin_convertvector(*(const fa_vb_i8 *)p, fa_vw_i8), fa_vec_bf);
#endif
}
#define FA_LOADV_i8(p) fa_loadv_i8(p)
#define FA_LOAD1_i8(x) ((float)(x))
FA_DEFINE_DECODE(float, int32_t, i8, fa_expf, int8_t, FA_LOADV_i8, FA_LOAD1_i8, f, 1)

/* float8 e4m3: its bits moved into those of a float16 of 1/256 its value (fa_convert.h;
 * the 256 is in the scales), then F16C as above. */
typedef int16_t fa_vs_f8 __attribute__((vector_size(FA_VBYTES / 2)));
static inline __attribute__((always_inline)) fa_vec_bf fa_loadv_f8(const uint8_t *p)
{
    /* Sign-extended, the sign lands in bits 15 and 14 after the shift; clearing bit 14
     * leaves fa_f8_to_f16_scaled's bits (vpmovsxbw, vpsllw, vpand). */
    const fa_vs_f8 h = __builtin_convertvector(*(const fa_vb_i8 *)p, fa_vs_f8);
    return fa_halves_to_vec(((fa_vh_bf)h << 7) & 0xbfff);
}
#define FA_LOADV_f8(p) fa_loadv_f8(p)
#define FA_LOAD1_f8(x) fa_f16_to_f32(fa_f8_to_f16_scaled(x))
FA_DEFINE_DECODE(float, int32_t, f8, fa_expf, uint8_t, FA_LOADV_f8, FA_LOAD1_f8, f, 1)

#endif

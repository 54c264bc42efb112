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

/* One pass of P V over W vectors of output columns from column c (see fa_dec_pv). With
 * fewer than 8 vectors, W chains of FMAs would wait on the FMA latency (a d_v of 64 floats
 * ran at a quarter of the FMA rate), so two sets of accumulators take alternate keys and
 * are added at the end: a fixed order, set by the shape alone. */
#define FA_DEC_PV_PASS(T, SUFFIX, W, KT, LOADV)                                           \
    for (; c + (W) * n <= d_v; c += (W) * n) {                                             \
        fa_vec_##SUFFIX a0[W], a1[W];                                                      \
        for (int i = 0; i < (W); i++) {                                                    \
            a0[i] = *(fa_vecu_##SUFFIX *)(o + c + i * n) * alpha;                          \
            a1[i] = (fa_vec_##SUFFIX){0};                                                  \
        }                                                                                  \
        ptrdiff_t j = 0;                                                                   \
        if ((W) < 8)                                                                       \
            for (; j + 2 <= nb; j += 2) {                                                  \
                const T p0 = p[j], p1 = p[j + 1];                                          \
                const KT *v0 = v + j * d_v + c, *v1 = v0 + d_v;                            \
                for (int i = 0; i < (W); i++) {                                            \
                    a0[i] += p0 * LOADV(v0 + i * n);                                       \
                    a1[i] += p1 * LOADV(v1 + i * n);                                       \
                }                                                                          \
            }                                                                              \
        for (; j < nb; j++) {                                                              \
            const T pj = p[j];                                                             \
            for (int i = 0; i < (W); i++)                                                  \
                a0[i] += pj * LOADV(v + j * d_v + c + i * n);                              \
        }                                                                                  \
        for (int i = 0; i < (W); i++)                                                      \
            *(fa_vecu_##SUFFIX *)(o + c + i * n) = (W) < 8 ? a0[i] + a1[i] : a0[i];        \
    }

/* T: the arithmetic (float or double), RS the suffix of its row operations (fa_exp.h);  \
 * KT: how keys and values are stored (T, or uint16_t holding bfloat16 for T = float);    \
 * LOADV(p): N lanes of T from KT *p; LOAD1(x): one. */                                    \
#define FA_DEFINE_DECODE(T, IT, SUFFIX, EXP, KT, LOADV, LOAD1, RS)                         \
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
/* r[u] = sum of the lanes of x[u], u < N (x is overwritten). Level w combines pairs of  */ \
/* vectors whose segments of 2w lanes each hold one key's partial sums into segments of  */ \
/* w lanes, lower keys first, so lane u ends up with key u. The shuffle masks are        */ \
/* arithmetic on a constant 0..N-1 vector, which GCC folds to constants.                 */ \
static inline __attribute__((always_inline)) fa_vec_##SUFFIX                              \
fa_lane_sums_##SUFFIX(fa_vec_##SUFFIX *x)                                                  \
{                                                                                          \
    const int n = FA_N_##SUFFIX;                                                           \
    fa_ivec_##SUFFIX iota;                                                                 \
    memcpy(&iota, fa_iota_##SUFFIX, sizeof iota);                                          \
    int count = n;                                                                         \
    _Pragma("GCC unroll 8")                                                                \
    for (int w = n / 2; w >= 1; w /= 2) {                                                  \
        const int segs = n / (2 * w);                                                      \
        fa_ivec_##SUFFIX seg = iota / w;                                                   \
        fa_ivec_##SUFFIX lo = ((seg >= segs) & n) + (seg % segs) * (2 * w) + iota % w;     \
        fa_ivec_##SUFFIX hi = lo + w;                                                      \
        _Pragma("GCC unroll 16")                                                           \
        for (int p = 0; p < count / 2; p++)                                                \
            x[p] = __builtin_shuffle(x[2 * p], x[2 * p + 1], lo)                           \
                 + __builtin_shuffle(x[2 * p], x[2 * p + 1], hi);                          \
        count /= 2;                                                                        \
    }                                                                                      \
    return x[0];                                                                           \
}                                                                                          \
/* s[g][u] = scale q[g] . k[u] for N keys (u < count; lanes from count on are garbage,  */ \
/* computed on the last key again), for the n_rows query rows.                           */ \
static inline __attribute__((always_inline)) void fa_dec_scores_##SUFFIX(                 \
    const T *q, ptrdiff_t n_rows, ptrdiff_t d, const KT *k, int count, T scale, T *s)      \
{                                                                                          \
    const int n = FA_N_##SUFFIX;                                                           \
    for (ptrdiff_t g = 0; g < n_rows; g++) {                                               \
        fa_vec_##SUFFIX acc[FA_N_##SUFFIX];                                                \
        for (int u = 0; u < n; u++) acc[u] = (fa_vec_##SUFFIX){0};                         \
        /* Key after key, each row read start to end (q comes from L1 again for each): */ \
        /* reading the N rows in step, a vector of each in turn, held a step to 64-73% */ \
        /* of the read floor, this order 83-92%. Each acc[u] sums in the same order.   */ \
        _Pragma("GCC unroll 16")                                                           \
        for (int u = 0; u < n; u++) {                                                      \
            const KT *ku = k + (u < count ? u : count - 1) * d;                            \
            for (ptrdiff_t t = 0; t < d; t += n)                                           \
                acc[u] += *(const fa_vecu_##SUFFIX *)(q + g * d + t) * LOADV(ku + t);      \
        }                                                                                  \
        *(fa_vecu_##SUFFIX *)(s + g * FA_DECODE_BLOCK) = fa_lane_sums_##SUFFIX(acc) * scale; \
    }                                                                                      \
}                                                                                          \
/* o[c] = alpha o[c] + sum_j p[j] v[j][c] for c < d_v, nb keys, in passes of 16, 8, 4, 2  */ \
/* and 1 vectors of columns held in registers across the keys (FA_DEC_PV_PASS). The 16  */ \
/* vectors of a pass do not all fit the AVX2 register file (GCC keeps some in L1), but  */ \
/* a 128-float row is then read in one pass rather than in two halves 512 bytes apart. */ \
static inline void fa_dec_pv_##SUFFIX(const T *p, ptrdiff_t nb, const KT *v, ptrdiff_t d_v, \
                                      T alpha, T *o)                                       \
{                                                                                          \
    const int n = FA_N_##SUFFIX;                                                           \
    ptrdiff_t c = 0;                                                                       \
    FA_DEC_PV_PASS(T, SUFFIX, 16, KT, LOADV)                                               \
    FA_DEC_PV_PASS(T, SUFFIX, 8, KT, LOADV)                                                \
    FA_DEC_PV_PASS(T, SUFFIX, 4, KT, LOADV)                                                \
    FA_DEC_PV_PASS(T, SUFFIX, 2, KT, LOADV)                                                \
    FA_DEC_PV_PASS(T, SUFFIX, 1, KT, LOADV)                                                \
}                                                                                          \
static inline void fa_decode_chunk_##SUFFIX(                                               \
    const T *q, ptrdiff_t n_rows, ptrdiff_t d, const KT *k, const KT *v, ptrdiff_t d_v,    \
    ptrdiff_t n_keys, T scale, T softcap, T *m, double *l, T *o, T *s)                     \
{                                                                                          \
    const int n = FA_N_##SUFFIX;                                                           \
    const int vec = d % n == 0 && d_v % n == 0;                                            \
    for (ptrdiff_t g = 0; g < n_rows; g++) { m[g] = -INFINITY; l[g] = 0; }                \
    for (ptrdiff_t c = 0; c < n_rows * d_v; c++) o[c] = 0;                                 \
    for (ptrdiff_t j0 = 0; j0 < n_keys; j0 += FA_DECODE_BLOCK) {                           \
        ptrdiff_t nb = n_keys - j0 < FA_DECODE_BLOCK ? n_keys - j0 : FA_DECODE_BLOCK;      \
        if (vec) {                                                                         \
            ptrdiff_t j = 0;                                                               \
            /* With d a constant, the N rows are one pointer plus constant offsets; with */ \
            /* d a variable, GCC keeps N row pointers and spills them (a load per FMA).  */ \
            if (d == 64)                                                                   \
                for (; j + n <= nb; j += n)                                                \
                    fa_dec_scores_##SUFFIX(q, n_rows, 64, k + (j0 + j) * 64, n, scale, s + j); \
            else if (d == 128)                                                             \
                for (; j + n <= nb; j += n)                                                \
                    fa_dec_scores_##SUFFIX(q, n_rows, 128, k + (j0 + j) * 128, n, scale, s + j); \
            for (; j + n <= nb; j += n)                                                    \
                fa_dec_scores_##SUFFIX(q, n_rows, d, k + (j0 + j) * d, n, scale, s + j);   \
            if (j < nb)                                                                    \
                fa_dec_scores_##SUFFIX(q, n_rows, d, k + (j0 + j) * d, (int)(nb - j),      \
                                       scale, s + j);                                      \
        } else {                                                                           \
            for (ptrdiff_t j = 0; j < nb; j++)                                             \
                for (ptrdiff_t g = 0; g < n_rows; g++)                                     \
                    s[g * FA_DECODE_BLOCK + j] =                                           \
                        scale * fa_dot_##SUFFIX(q + g * d, k + (j0 + j) * d, d);           \
        }                                                                                  \
        for (ptrdiff_t g = 0; g < n_rows; g++) {                                           \
            T *sr = s + g * FA_DECODE_BLOCK;                                               \
            if (softcap > 0) fa_softcap_row_##RS(sr, nb, softcap, (T)1 / softcap);     \
            T m_new = fa_row_max_##RS(sr, nb);                                         \
            if (m[g] > m_new) m_new = m[g];                                                \
            T m_use = m_new == -INFINITY ? 0 : m_new;                                      \
            T alpha = EXP(m[g] - m_use);                                                   \
            m[g] = m_new;                                                                  \
            l[g] = l[g] * alpha + fa_exp_shift_sum_##RS(sr, nb, m_use);                \
            T *orow = o + g * d_v;                                                         \
            if (vec) {                                                                     \
                fa_dec_pv_##SUFFIX(sr, nb, v + j0 * d_v, d_v, alpha, orow);                \
                continue;                                                                  \
            }                                                                              \
            for (ptrdiff_t c = 0; c < d_v; c++) {                                          \
                T acc = orow[c] * alpha;                                                   \
                for (ptrdiff_t j = 0; j < nb; j++) acc += sr[j] * LOAD1(v[(j0 + j) * d_v + c]); \
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
FA_DEFINE_DECODE(float, int32_t, f, fa_expf, float, FA_LOADV_f, FA_LOAD1_NATIVE, f)
FA_DEFINE_DECODE(double, int64_t, d, fa_exp, double, FA_LOADV_d, FA_LOAD1_NATIVE, d)

/* bfloat16 and float16 keys and values, read in place and widened exactly as they are
 * loaded (fa_convert.h): the arithmetic is the float32 kernel's, so the result is bitwise
 * that of the float32 kernel on the widened arrays. */
typedef uint16_t fa_vh_bf __attribute__((vector_size(FA_VBYTES / 2), aligned(2)));
typedef uint32_t fa_vw_bf __attribute__((vector_size(FA_VBYTES)));
#define FA_LOADV_bf(p) ((fa_vec_bf)(__builtin_convertvector(*(const fa_vh_bf *)(p), fa_vw_bf) << 16))
FA_DEFINE_DECODE(float, int32_t, bf, fa_expf, uint16_t, FA_LOADV_bf, fa_bf16_to_f32, f)

/* float16: F16C's vcvtph2ps on a whole vector where the build has it (the AVX2 and AVX-512
 * builds), else lane by lane. */
static inline __attribute__((always_inline)) fa_vec_bf fa_loadv_hf(const uint16_t *p)
{
#if defined(__AVX512F__) && FA_VBYTES == 64
    return (fa_vec_bf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__) && FA_VBYTES == 32
    return (fa_vec_bf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    fa_vec_bf x;
    for (int i = 0; i < FA_N_bf; i++) x[i] = fa_f16_to_f32(p[i]);
    return x;
#endif
}
#define FA_LOADV_hf(p) fa_loadv_hf(p)
FA_DEFINE_DECODE(float, int32_t, hf, fa_expf, uint16_t, FA_LOADV_hf, fa_f16_to_f32, f)

#endif

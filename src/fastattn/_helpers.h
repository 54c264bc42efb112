/* C helpers for _kernels.pyx that are clearer in C than in Cython: bit-level exp and the
 * OpenMP queries, which must still link when the build has no OpenMP.
 *
 * Design of the exp: softmax spends most of its non-GEMM time in exp, and libm's exp is a
 * call per element that GCC cannot vectorise without -ffast-math. These are branch-free
 * static inline functions that GCC vectorises where they are inlined into a loop:
 *   exp(x) = 2^n * p(r),  n = round(x / ln 2),  r = x - n ln 2 (Cody-Waite, two parts),
 * p a Taylor polynomial (degree 7 for float, 13 for double; |r| <= ln2/2 so the truncation
 * error is below 0.1 ulp), and 2^n built in the exponent bits, split in two factors so
 * that subnormal results come out right. Special values: exp(-inf) == 0 exactly (the clamp
 * sends it to a value that rounds to 0), exp(+inf) == inf, and NaN stays NaN because
 * every comparison with NaN is false, so the clamps leave it alone and it reaches p(r).
 * No float-to-int conversion of NaN happens (n comes from the round-to-nearest
 * "magic number" addition), so there is no undefined behaviour either.
 */
#ifndef FASTATTN_HELPERS_H
#define FASTATTN_HELPERS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
static inline int fa_openmp_enabled(void) { return 1; }
static inline int fa_omp_max_threads(void) { return omp_get_max_threads(); }
static inline int fa_omp_team_size(void) { return omp_get_num_threads(); }
#else
static inline int fa_openmp_enabled(void) { return 0; }
static inline int fa_omp_max_threads(void) { return 1; }
static inline int fa_omp_team_size(void) { return 1; }
#endif

#ifndef FASTATTN_BUILD_FLAGS
#define FASTATTN_BUILD_FLAGS ""
#endif
static const char *fa_build_flags = FASTATTN_BUILD_FLAGS;
#ifndef FASTATTN_ISA
#define FASTATTN_ISA "baseline"
#endif
static const char *fa_isa_name = FASTATTN_ISA;

/* In a sanitizer build (FASTATTN_SANITIZE=1), the operands handed to BLAS are checked
 * from instrumented code before each call: BLAS itself is not instrumented, so without this
 * AddressSanitizer would never see a GEMM read past q, k or v. Elsewhere it compiles away. */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <stdio.h>
#include <stdlib.h>
static inline void fa_check_matrix(const void *p, ptrdiff_t rows, ptrdiff_t cols,
                                   ptrdiff_t ld, size_t item)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const char *row = (const char *)p + r * ld * (ptrdiff_t)item;
        void *bad = __asan_region_is_poisoned((void *)row, (size_t)cols * item);
        if (bad) {
            fprintf(stderr, "fastattn: AddressSanitizer: BLAS operand out of bounds "
                            "(row %td of %td x %td, ld %td)\n", r, rows, cols, ld);
            __asan_describe_address(bad);
            abort();
        }
    }
}
#else
static inline void fa_check_matrix(const void *p, ptrdiff_t rows, ptrdiff_t cols,
                                   ptrdiff_t ld, size_t item)
{
    (void)p; (void)rows; (void)cols; (void)ld; (void)item;
}
#endif

/* CPU features, for choosing a build at import. GCC's __builtin_cpu_supports also checks
 * that the OS saves the AVX / AVX-512 register state (XGETBV), not just CPUID. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
static inline int fa_cpu_has_avx2_fma(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
static inline int fa_cpu_has_avx512(void)
{
    __builtin_cpu_init();
    return fa_cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl");
}
#else
static inline int fa_cpu_has_avx2_fma(void) { return 0; }
static inline int fa_cpu_has_avx512(void) { return 0; }
#endif
static const int fa_debug_build = FASTATTN_DEBUG_BUILD;

static inline float fa_expf(float x)
{
    /* Above 88.73 the result is inf, below -103.98 it rounds to 0. */
    if (x > 89.0f) x = 89.0f;
    if (x < -104.0f) x = -104.0f;
    const float magic = 12582912.0f;            /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x * 1.44269504088896341f + magic;
    float n = t - magic;
    float r = x - n * 0.693359375f;             /* ln 2, high part: exact product */
    r = r - n * -2.12194440e-4f;                /* ln 2, low part */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t ti;
    memcpy(&ti, &t, sizeof ti);
    int32_t ni = ti - 0x4B400000;                /* the integer n, read from t's mantissa */
    int32_t n1 = ni >> 1, n2 = ni - n1;          /* each in [-75, 64]: both 2^n1, 2^n2 normal */
    /* Shift as unsigned: for NaN input n is garbage and n + 127 may be negative (the
     * result is NaN anyway, but a negative left shift would be undefined behaviour). */
    uint32_t b1 = (uint32_t)(n1 + 127) << 23, b2 = (uint32_t)(n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return p * s1 * s2;
}

static inline double fa_exp(double x)
{
    /* Above 709.79 the result is inf, below -745.14 it rounds to 0. */
    if (x > 710.0) x = 710.0;
    if (x < -746.0) x = -746.0;
    const double magic = 6755399441055744.0;    /* 1.5 * 2^52 */
    double t = x * 1.4426950408889634074 + magic;
    double n = t - magic;
    double r = x - n * 6.93147180369123816490e-01;   /* ln 2, high part (fdlibm's ln2_hi) */
    r = r - n * 1.90821492927058770002e-10;          /* ln 2, low part */
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t ti;
    memcpy(&ti, &t, sizeof ti);
    int64_t ni = ti - 0x4338000000000000LL;
    int64_t n1 = ni >> 1, n2 = ni - n1;
    uint64_t b1 = (uint64_t)(n1 + 1023) << 52, b2 = (uint64_t)(n2 + 1023) << 52;
    double s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return p * s1 * s2;
}

/* Row reductions for the softmax, written so that GCC vectorises them without
 * -ffast-math: a floating-point max or sum across a row is a serial dependency that GCC
 * will not reassociate, so these keep FA_LANES independent partial results, updated
 * element-wise (which vectorises), and combine them in a fixed order at the end. The
 * result is therefore deterministic, and NaN is ignored by the max (x > m is false) just
 * as in the scalar loop. */
#define FA_LANES 16

#define FA_DEFINE_ROW_OPS(T, SUFFIX, EXP)                                              \
static inline T fa_row_max_##SUFFIX(const T *x, ptrdiff_t n)                            \
{                                                                                        \
    T acc[FA_LANES];                                                                     \
    for (int t = 0; t < FA_LANES; t++) acc[t] = -INFINITY;                               \
    ptrdiff_t j = 0;                                                                     \
    for (; j + FA_LANES <= n; j += FA_LANES)                                             \
        for (int t = 0; t < FA_LANES; t++) acc[t] = x[j + t] > acc[t] ? x[j + t] : acc[t]; \
    T m = -INFINITY;                                                                     \
    for (int t = 0; t < FA_LANES; t++) m = acc[t] > m ? acc[t] : m;                      \
    for (; j < n; j++) m = x[j] > m ? x[j] : m;                                          \
    return m;                                                                            \
}                                                                                        \
/* x[j] = exp(x[j] - shift) in place; returns the sum of the new x, in double. */        \
static inline double fa_exp_shift_sum_##SUFFIX(T *x, ptrdiff_t n, T shift)              \
{                                                                                        \
    for (ptrdiff_t j = 0; j < n; j++) x[j] = EXP(x[j] - shift);                          \
    double acc[FA_LANES] = {0};                                                          \
    ptrdiff_t j = 0;                                                                     \
    for (; j + FA_LANES <= n; j += FA_LANES)                                             \
        for (int t = 0; t < FA_LANES; t++) acc[t] += (double)x[j + t];                   \
    double total = 0;                                                                    \
    for (; j < n; j++) total += (double)x[j];                                            \
    for (int t = 0; t < FA_LANES; t++) total += acc[t];                                  \
    return total;                                                                        \
}                                                                                        \
/* The sum of exp(x[j] - shift), x unchanged (for log_softmax). */                      \
static inline double fa_exp_shift_total_##SUFFIX(const T *x, ptrdiff_t n, T shift)      \
{                                                                                        \
    double acc[FA_LANES] = {0};                                                          \
    ptrdiff_t j = 0;                                                                     \
    for (; j + FA_LANES <= n; j += FA_LANES)                                             \
        for (int t = 0; t < FA_LANES; t++) acc[t] += (double)EXP(x[j + t] - shift);      \
    double total = 0;                                                                    \
    for (; j < n; j++) total += (double)EXP(x[j] - shift);                               \
    for (int t = 0; t < FA_LANES; t++) total += acc[t];                                  \
    return total;                                                                        \
}

FA_DEFINE_ROW_OPS(float, f, fa_expf)
FA_DEFINE_ROW_OPS(double, d, fa_exp)

/* Single-query attention (decoding): one work item is the G query rows that share a
 * key/value head, against keys [0, n_keys) of that head, read once, in blocks of
 * FA_DECODE_BLOCK keys with an online softmax. It leaves the partial state m[g] (running
 * max), l[g] (running sum, double) and o[g][:] (unnormalised output), to be merged with the
 * other key chunks of the same head in a fixed order.
 *
 * The work per key is two short dot products' worth of FMAs, so what decides the speed is
 * how the partial sums are combined. With GCC's vector extensions, in the widest vectors
 * of the build (N lanes: 16 floats for AVX-512), when N divides both head sizes:
 *  - scores: N keys at once, one accumulator vector each, q loaded once per N FMAs; the
 *    N accumulators are then summed across lanes together by a transposing tree
 *    (log2 N levels of two shuffles and an add), which leaves key u's score in lane u;
 *  - P V: the output row's columns stay in registers (8 vectors) across the block.
 * Other head sizes take a scalar loop (FA_DOT_LANES partial sums, combined as a tree).
 * Both orders are fixed by the shape alone, so results are deterministic and independent
 * of the thread count. (A first version kept 64 partial sums combined in a loop over the
 * tree's levels: GCC summed them through the stack one scalar at a time, 27 ns a key.) */
#define FA_DECODE_BLOCK 64
#define FA_DOT_LANES 64
#if defined(__AVX512F__)
#define FA_VBYTES 64
#elif defined(__AVX__)
#define FA_VBYTES 32
#else
#define FA_VBYTES 16
#endif

/* One pass of P V over W vectors of output columns from column c (see fa_dec_pv). With
 * fewer than 8 vectors, W chains of FMAs would wait on the FMA latency (a d_v of 64 floats
 * ran at a quarter of the FMA rate), so two sets of accumulators take alternate keys and
 * are added at the end: a fixed order, set by the shape alone. */
#define FA_DEC_PV_PASS(T, SUFFIX, W)                                                      \
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
                const T *v0 = v + j * d_v + c, *v1 = v0 + d_v;                             \
                for (int i = 0; i < (W); i++) {                                            \
                    a0[i] += p0 * *(const fa_vecu_##SUFFIX *)(v0 + i * n);                 \
                    a1[i] += p1 * *(const fa_vecu_##SUFFIX *)(v1 + i * n);                 \
                }                                                                          \
            }                                                                              \
        for (; j < nb; j++) {                                                              \
            const T pj = p[j];                                                             \
            for (int i = 0; i < (W); i++)                                                  \
                a0[i] += pj * *(const fa_vecu_##SUFFIX *)(v + j * d_v + c + i * n);        \
        }                                                                                  \
        for (int i = 0; i < (W); i++)                                                      \
            *(fa_vecu_##SUFFIX *)(o + c + i * n) = (W) < 8 ? a0[i] + a1[i] : a0[i];        \
    }

#define FA_DEFINE_DECODE(T, IT, SUFFIX, EXP)                                              \
typedef T fa_vec_##SUFFIX __attribute__((vector_size(FA_VBYTES)));                         \
typedef T fa_vecu_##SUFFIX __attribute__((vector_size(FA_VBYTES), aligned(sizeof(T))));    \
typedef IT fa_ivec_##SUFFIX __attribute__((vector_size(FA_VBYTES)));                       \
enum { FA_N_##SUFFIX = FA_VBYTES / sizeof(T) };                                            \
static const IT fa_iota_##SUFFIX[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; \
static inline T fa_dot_##SUFFIX(const T *a, const T *b, ptrdiff_t n)                      \
{                                                                                          \
    T acc[FA_DOT_LANES];                                                                   \
    for (int t = 0; t < FA_DOT_LANES; t++) acc[t] = 0;                                     \
    ptrdiff_t i = 0;                                                                       \
    for (; i + FA_DOT_LANES <= n; i += FA_DOT_LANES)                                       \
        for (int t = 0; t < FA_DOT_LANES; t++) acc[t] += a[i + t] * b[i + t];              \
    for (int t = 0; i + t < n; t++) acc[t] += a[i + t] * b[i + t];                         \
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
    const T *q, ptrdiff_t n_rows, ptrdiff_t d, const T *k, int count, T scale, T *s)       \
{                                                                                          \
    const int n = FA_N_##SUFFIX;                                                           \
    for (ptrdiff_t g = 0; g < n_rows; g++) {                                               \
        fa_vec_##SUFFIX acc[FA_N_##SUFFIX];                                                \
        for (int u = 0; u < n; u++) acc[u] = (fa_vec_##SUFFIX){0};                         \
        for (ptrdiff_t t = 0; t < d; t += n) {                                             \
            fa_vec_##SUFFIX qv = *(const fa_vecu_##SUFFIX *)(q + g * d + t);               \
            _Pragma("GCC unroll 16")                                                       \
            for (int u = 0; u < n; u++)                                                    \
                acc[u] += qv * *(const fa_vecu_##SUFFIX *)(k + (u < count ? u : count - 1) * d + t); \
        }                                                                                  \
        *(fa_vecu_##SUFFIX *)(s + g * FA_DECODE_BLOCK) = fa_lane_sums_##SUFFIX(acc) * scale; \
    }                                                                                      \
}                                                                                          \
/* o[c] = alpha o[c] + sum_j p[j] v[j][c] for c < d_v, nb keys, in passes of 8, 4, 2 and  */ \
/* 1 vectors of columns held in registers across the keys (FA_DEC_PV_PASS).              */ \
static inline void fa_dec_pv_##SUFFIX(const T *p, ptrdiff_t nb, const T *v, ptrdiff_t d_v, \
                                      T alpha, T *o)                                       \
{                                                                                          \
    const int n = FA_N_##SUFFIX;                                                           \
    ptrdiff_t c = 0;                                                                       \
    FA_DEC_PV_PASS(T, SUFFIX, 8)                                                           \
    FA_DEC_PV_PASS(T, SUFFIX, 4)                                                           \
    FA_DEC_PV_PASS(T, SUFFIX, 2)                                                           \
    FA_DEC_PV_PASS(T, SUFFIX, 1)                                                           \
}                                                                                          \
static inline void fa_decode_chunk_##SUFFIX(                                               \
    const T *q, ptrdiff_t n_rows, ptrdiff_t d, const T *k, const T *v, ptrdiff_t d_v,      \
    ptrdiff_t n_keys, T scale, T *m, double *l, T *o, T *s)                                \
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
            T m_new = fa_row_max_##SUFFIX(sr, nb);                                         \
            if (m[g] > m_new) m_new = m[g];                                                \
            T m_use = m_new == -INFINITY ? 0 : m_new;                                      \
            T alpha = EXP(m[g] - m_use);                                                   \
            m[g] = m_new;                                                                  \
            l[g] = l[g] * alpha + fa_exp_shift_sum_##SUFFIX(sr, nb, m_use);                \
            T *orow = o + g * d_v;                                                         \
            if (vec) {                                                                     \
                fa_dec_pv_##SUFFIX(sr, nb, v + j0 * d_v, d_v, alpha, orow);                \
                continue;                                                                  \
            }                                                                              \
            for (ptrdiff_t c = 0; c < d_v; c++) {                                          \
                T acc = orow[c] * alpha;                                                   \
                for (ptrdiff_t j = 0; j < nb; j++) acc += sr[j] * v[(j0 + j) * d_v + c];   \
                orow[c] = acc;                                                             \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
}                                                                                          \
/* The result of one group from the partial states of its n_chunks key chunks, merged  */ \
/* in chunk order: lse = m + log(sum_c l_c e^(m_c - m)), out = sum_c o_c e^(m_c - m) / l. */ \
/* parts holds per chunk m[n_rows] then o[n_rows][d_v]; l_parts l[n_rows] per chunk.    */ \
static inline void fa_decode_merge_##SUFFIX(const T *parts, const double *l_parts,        \
                                            ptrdiff_t n_chunks, ptrdiff_t n_rows,          \
                                            ptrdiff_t d_v, T *restrict out, T *lse)        \
{                                                                                          \
    const ptrdiff_t part = n_rows * (1 + d_v);                                             \
    for (ptrdiff_t g = 0; g < n_rows; g++) {                                               \
        T *restrict orow = out + g * d_v;                                                  \
        T m_max = -INFINITY;                                                               \
        for (ptrdiff_t c = 0; c < n_chunks; c++)                                           \
            if (parts[c * part + g] > m_max) m_max = parts[c * part + g];                  \
        /* As in the attention kernel: shift by 0 while no key is visible, and decide */  \
        /* "every key hidden" by the sum, so that NaN scores stay NaN.                */  \
        if (m_max == -INFINITY) m_max = 0;                                                 \
        for (ptrdiff_t col = 0; col < d_v; col++) orow[col] = 0;                           \
        double total = 0;                                                                  \
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

FA_DEFINE_DECODE(float, int32_t, f, fa_expf)
FA_DEFINE_DECODE(double, int64_t, d, fa_exp)

/* Micro-kernels for the two GEMMs of a float32 attention tile, in the AVX-512 build.
 * Measured on this project's machine (one thread, 64 tiles of 256 queries x 512 keys x
 * D 64): OpenBLAS sgemm 98.5 GFLOP/s for the scores and 93.0 for P V (its AVX2 kernels,
 * as the machine sets OPENBLAS_CORETYPE); these 169.5 and 202.9. Elsewhere the kernels
 * call BLAS and these compile to nothing (FA_MICROKERNELS 0). */
#if defined(__AVX512F__)
#define FA_MICROKERNELS 1
typedef float fa_v16 __attribute__((vector_size(64)));
typedef float fa_v16u __attribute__((vector_size(64), aligned(4)));

/* s[i][j] = sum_t q[i][t] kt[t][j] for i < rows, j < n_cols (a multiple of 32): q is
 * (rows x d) row-major, kt the key block transposed (d x n_cols), s has row stride ld.
 * 8 rows x 32 keys per register block: 16 accumulators. */
static inline void fa_mk_scores(const float *q, ptrdiff_t rows, ptrdiff_t d,
                                const float *kt, ptrdiff_t n_cols, float *s, ptrdiff_t ld)
{
    ptrdiff_t i0 = 0;
    for (; i0 + 8 <= rows; i0 += 8)
        for (ptrdiff_t j0 = 0; j0 < n_cols; j0 += 32) {
            fa_v16 c[8][2];
            for (int r = 0; r < 8; r++) { c[r][0] = (fa_v16){0}; c[r][1] = (fa_v16){0}; }
            const float *qi = q + i0 * d;
            for (ptrdiff_t t = 0; t < d; t++) {
                fa_v16 b0 = *(const fa_v16u *)(kt + t * n_cols + j0);
                fa_v16 b1 = *(const fa_v16u *)(kt + t * n_cols + j0 + 16);
                for (int r = 0; r < 8; r++) {
                    fa_v16 a = (fa_v16){0} + qi[r * d + t];
                    c[r][0] += a * b0;
                    c[r][1] += a * b1;
                }
            }
            for (int r = 0; r < 8; r++) {
                *(fa_v16u *)(s + (i0 + r) * ld + j0) = c[r][0];
                *(fa_v16u *)(s + (i0 + r) * ld + j0 + 16) = c[r][1];
            }
        }
    for (; i0 < rows; i0++)
        for (ptrdiff_t j0 = 0; j0 < n_cols; j0 += 32) {
            fa_v16 c0 = {0}, c1 = {0};
            for (ptrdiff_t t = 0; t < d; t++) {
                fa_v16 a = (fa_v16){0} + q[i0 * d + t];
                c0 += a * *(const fa_v16u *)(kt + t * n_cols + j0);
                c1 += a * *(const fa_v16u *)(kt + t * n_cols + j0 + 16);
            }
            *(fa_v16u *)(s + i0 * ld + j0) = c0;
            *(fa_v16u *)(s + i0 * ld + j0 + 16) = c1;
        }
}

/* kt (d x ld) = k.T for a block of `rows` keys (rows x d, row-major), zero keys from
 * rows up to ld. In bands of 16 keys: their rows stay in L1 while each of the d output
 * rows gets 16 contiguous values (a plain loop over keys then dimensions wrote with a
 * stride of ld and took two thirds of the tile's non-GEMM time). */
static inline void fa_transpose_keys(const float *k, ptrdiff_t rows, ptrdiff_t d,
                                     float *kt, ptrdiff_t ld)
{
    for (ptrdiff_t j0 = 0; j0 < rows; j0 += 16) {
        ptrdiff_t nb = rows - j0 < 16 ? rows - j0 : 16;
        for (ptrdiff_t t = 0; t < d; t++)
            for (ptrdiff_t jj = 0; jj < nb; jj++)
                kt[t * ld + j0 + jj] = k[(j0 + jj) * d + t];
    }
    for (ptrdiff_t t = 0; t < d; t++)
        for (ptrdiff_t j = rows; j < ld; j++) kt[t * ld + j] = 0;
}

/* o[i][c] += sum_j p[i][j] v[j][c] for i < rows, j < n_keys, c < d_v (a multiple of 16):
 * p has row stride ld_p, v is (n_keys x d_v) and o (rows x d_v), row-major. 4 rows x 64
 * columns per register block: 16 accumulators. */
static inline void fa_mk_pv(const float *p, ptrdiff_t ld_p, ptrdiff_t rows, const float *v,
                            ptrdiff_t n_keys, ptrdiff_t d_v, float *o)
{
    ptrdiff_t c0 = 0;
    for (; c0 + 64 <= d_v; c0 += 64) {
        ptrdiff_t i0 = 0;
        for (; i0 + 4 <= rows; i0 += 4) {
            fa_v16 c[4][4];
            for (int r = 0; r < 4; r++)
                for (int u = 0; u < 4; u++) c[r][u] = *(const fa_v16u *)(o + (i0 + r) * d_v + c0 + 16 * u);
            for (ptrdiff_t j = 0; j < n_keys; j++) {
                const float *vr = v + j * d_v + c0;
                fa_v16 b0 = *(const fa_v16u *)vr, b1 = *(const fa_v16u *)(vr + 16);
                fa_v16 b2 = *(const fa_v16u *)(vr + 32), b3 = *(const fa_v16u *)(vr + 48);
                for (int r = 0; r < 4; r++) {
                    fa_v16 a = (fa_v16){0} + p[(i0 + r) * ld_p + j];
                    c[r][0] += a * b0; c[r][1] += a * b1; c[r][2] += a * b2; c[r][3] += a * b3;
                }
            }
            for (int r = 0; r < 4; r++)
                for (int u = 0; u < 4; u++) *(fa_v16u *)(o + (i0 + r) * d_v + c0 + 16 * u) = c[r][u];
        }
        for (; i0 < rows; i0++)
            for (int u = 0; u < 4; u++) {
                fa_v16 acc = *(const fa_v16u *)(o + i0 * d_v + c0 + 16 * u);
                for (ptrdiff_t j = 0; j < n_keys; j++)
                    acc += ((fa_v16){0} + p[i0 * ld_p + j]) * *(const fa_v16u *)(v + j * d_v + c0 + 16 * u);
                *(fa_v16u *)(o + i0 * d_v + c0 + 16 * u) = acc;
            }
    }
    for (; c0 < d_v; c0 += 16)  /* the last d_v % 64 columns, 16 at a time */
        for (ptrdiff_t i = 0; i < rows; i++) {
            fa_v16 acc = *(const fa_v16u *)(o + i * d_v + c0);
            for (ptrdiff_t j = 0; j < n_keys; j++)
                acc += ((fa_v16){0} + p[i * ld_p + j]) * *(const fa_v16u *)(v + j * d_v + c0);
            *(fa_v16u *)(o + i * d_v + c0) = acc;
        }
}
#else
#define FA_MICROKERNELS 0
static inline void fa_mk_scores(const float *q, ptrdiff_t rows, ptrdiff_t d, const float *kt,
                                ptrdiff_t n_cols, float *s, ptrdiff_t ld)
{
    (void)q; (void)rows; (void)d; (void)kt; (void)n_cols; (void)s; (void)ld;
}
static inline void fa_mk_pv(const float *p, ptrdiff_t ld_p, ptrdiff_t rows, const float *v,
                            ptrdiff_t n_keys, ptrdiff_t d_v, float *o)
{
    (void)p; (void)ld_p; (void)rows; (void)v; (void)n_keys; (void)d_v; (void)o;
}
static inline void fa_transpose_keys(const float *k, ptrdiff_t rows, ptrdiff_t d,
                                     float *kt, ptrdiff_t ld)
{
    (void)k; (void)rows; (void)d; (void)kt; (void)ld;
}
#endif

#endif

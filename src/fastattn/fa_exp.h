/* The vectorisable exp and the softmax row reductions built on it.
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
#ifndef FASTATTN_EXP_H
#define FASTATTN_EXP_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fa_simd.h"

/* The part both forms of each exp share: for a clamped x, unit p(r) with r = x - n ln 2
 * (unit a power of two, a constant where it is inlined), and the integer n = round(x / ln 2)
 * (read from the rounding sum's mantissa: no float-to-int conversion, so none of NaN
 * either). */
static inline __attribute__((always_inline)) float fa_expf_core(float x, int32_t *n_out,
                                                                const float unit)
{
    const float magic = 12582912.0f;            /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x * 1.44269504088896341f + magic;
    float n = t - magic;
    float r = x - n * 0.693359375f;             /* ln 2, high part: exact product */
    r = r - n * -2.12194440e-4f;                /* ln 2, low part */
    float p = unit / 5040.0f;
    p = p * r + unit / 720.0f;
    p = p * r + unit / 120.0f;
    p = p * r + unit / 24.0f;
    p = p * r + unit / 6.0f;
    p = p * r + unit * 0.5f;
    p = p * r + unit;
    p = p * r + unit;
    int32_t ti;
    memcpy(&ti, &t, sizeof ti);
    *n_out = ti - 0x4B400000;
    return p;
}

static inline __attribute__((always_inline)) double fa_exp_core(double x, int64_t *n_out,
                                                                const double unit)
{
    const double magic = 6755399441055744.0;    /* 1.5 * 2^52 */
    double t = x * 1.4426950408889634074 + magic;
    double n = t - magic;
    double r = x - n * 6.93147180369123816490e-01;   /* ln 2, high part (fdlibm's ln2_hi) */
    r = r - n * 1.90821492927058770002e-10;          /* ln 2, low part */
    double p = unit / 6227020800.0;
    p = p * r + unit / 479001600.0;
    p = p * r + unit / 39916800.0;
    p = p * r + unit / 3628800.0;
    p = p * r + unit / 362880.0;
    p = p * r + unit / 40320.0;
    p = p * r + unit / 5040.0;
    p = p * r + unit / 720.0;
    p = p * r + unit / 120.0;
    p = p * r + unit / 24.0;
    p = p * r + unit / 6.0;
    p = p * r + unit * 0.5;
    p = p * r + unit;
    p = p * r + unit;
    int64_t ti;
    memcpy(&ti, &t, sizeof ti);
    *n_out = ti - 0x4338000000000000LL;
    return p;
}

static inline float fa_expf(float x)
{
    /* Above 88.73 the result is inf, below -103.98 it rounds to 0. */
    if (x > 89.0f) x = 89.0f;
    if (x < -104.0f) x = -104.0f;
    int32_t ni;
    const float p = fa_expf_core(x, &ni, 1.0f);
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
    int64_t ni;
    const double p = fa_exp_core(x, &ni, 1.0);
    int64_t n1 = ni >> 1, n2 = ni - n1;
    uint64_t b1 = (uint64_t)(n1 + 1023) << 52, b2 = (uint64_t)(n2 + 1023) << 52;
    double s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return p * s1 * s2;
}

/* exp(x) for x <= 0 (or -inf, or NaN): the softmax loops, where x is a score minus its
 * row's maximum. Bitwise the same results as fa_expf/fa_exp there (checked over every
 * non-positive float), in fewer operations: no upper clamp, and 2^n applied as one factor
 * 2^(n + 64) built in the exponent bits (n + 64 is in [-86, 64] for float, [-1013, 64] for
 * double: always a normal number) to 2^-64 p(r), the one rounding, exactly where the
 * two-factor product rounds. The 2^-64 is in p's coefficients (`unit`): scaling them by a
 * power of two scales every Horner step's result, with its rounding, exactly (they stay
 * normal numbers), so 2^-64 p(r) costs no multiplication (checked bitwise against
 * p 2^(n + 64) 2^-64 over every non-positive float in each build, and 2e8 doubles). NaN
 * stays NaN: p is NaN, whatever the factor. A quarter fewer cycles per element than
 * fa_expf. */
static inline float fa_expf_nonpos(float x)
{
    if (x < -104.0f) x = -104.0f;
    int32_t ni;
    const float p = fa_expf_core(x, &ni, 0x1p-64f);
    uint32_t b = (uint32_t)(ni + 64 + 127) << 23;
    float s;
    memcpy(&s, &b, sizeof s);
    return p * s;
}

static inline double fa_exp_nonpos(double x)
{
    if (x < -746.0) x = -746.0;
    int64_t ni;
    const double p = fa_exp_core(x, &ni, 0x1p-64);
    uint64_t b = (uint64_t)(ni + 64 + 1023) << 52;
    double s;
    memcpy(&s, &b, sizeof s);
    return p * s;
}

/* tanh, branch-free and vectorisable like the exps above, for the soft cap of the scores
 * (c tanh(s / c), Gemma 2). With a = |y|: below a threshold an odd series, a + a^3 p(a^2):
 * for float below 0.6, p a quartic fitted minimax to tanh's relative error
 * (tools/fit_tanh_series.py: at most 0.75 ulp in float32 arithmetic there; the Taylor
 * series it replaced needed seven terms for 0.59 ulp below 0.4, and the soft cap's vector
 * loop takes the series alone only where all lanes are under the threshold, so a higher
 * one sends more vectors there); for double below 0.25, the Taylor series through x^23
 * (the first omitted term is under 2e-19 relative). Above it (1 - e) / (1 + e) with
 * e = exp(-2a) <= 1, whose cancellation costs at most 1 / (2a) ulp there. Then y's sign
 * (-0.0 too). tanh(+-inf) = +-1; NaN stays NaN (a < threshold is false for NaN, and e is
 * NaN). Measured against tanh in double over every third float in [1e-30, 20]: at most
 * 1.5 ulp (2.4 with the Taylor series below 0.4); fa_tanh against long double on 5e7
 * random doubles: at most 3.1 ulp. */
/* The series' coefficients, highest first (Horner), shared by fa_tanhf/fa_tanh and the
 * soft cap's vector loop: p(u) for float (tools/fit_tanh_series.py prints them); the odd
 * Taylor coefficients of x^23, x^21, ..., x^3 for double. */
#define FA_TANHF_COEF -0x1.825888p-8f, 0x1.54b8aap-6f, -0x1.b898ep-5f, 0x1.1109aep-3f, \
    -0x1.55553ep-2f
#define FA_TANH_COEF -113927491862.0 / 2900518163668125.0,                                \
    18888466084.0 / 194896477400625.0, -443861162.0 / 1856156927625.0,                   \
    6404582.0 / 10854718875.0, -929569.0 / 638512875.0, 21844.0 / 6081075.0,             \
    -1382.0 / 155925.0, 62.0 / 2835.0, -17.0 / 315.0, 2.0 / 15.0, -1.0 / 3.0
static inline float fa_tanhf(float y)
{
    const float a = fabsf(y);
    const float a2 = a * a;
    static const float coef[] = {FA_TANHF_COEF};
    float p = coef[0];
    for (size_t c = 1; c < sizeof coef / sizeof coef[0]; c++) p = p * a2 + coef[c];
    const float small = a + a * (a2 * p);
    const float e = fa_expf_nonpos(-2.0f * a);
    const float big = (1.0f - e) / (1.0f + e);
    const float t = a < 0.6f ? small : big;
    return copysignf(t, y);  /* -0.0 stays -0.0 */
}

static inline double fa_tanh(double y)
{
    const double a = fabs(y);
    const double a2 = a * a;
    static const double coef[] = {FA_TANH_COEF};
    double p = coef[0];
    for (size_t c = 1; c < sizeof coef / sizeof coef[0]; c++) p = p * a2 + coef[c];
    const double small = a + a * (a2 * p);
    const double e = fa_exp_nonpos(-2.0 * a);
    const double big = (1.0 - e) / (1.0 + e);
    const double t = a < 0.25 ? small : big;
    return copysign(t, y);
}

/* Row reductions for the softmax, written so that GCC vectorises them without
 * -ffast-math: a floating-point max or sum across a row is a serial dependency that GCC
 * will not reassociate, so these keep FA_LANES independent partial results and combine
 * them in a fixed order at the end. The partial results are one GCC vector of FA_LANES
 * lanes (two ymm registers of floats in the AVX2 build, one zmm in the AVX-512 build):
 * written as a loop over an array of FA_LANES scalars, GCC kept the max in 16 scalar
 * registers (vmaxss) and spilled one, measured at a fifth of a tile's softmax time. The
 * max keeps FA_MAX_NV vectors of the build's width instead (one zmm chain of compare and
 * blend per vector bound it by its latency; four chains ran 2.5x faster) and folds them, then the lanes of the last vector, as a tree. The sums are
 * deterministic and the same in every build; the max is the same value in every build
 * (only which of +0 and -0 a row of zeros gives may differ), and NaN is ignored by it
 * (x > m is false) just as in a scalar loop. */
#define FA_LANES 16
#define FA_MAX_NV 4

/* FA_VMAX(x, acc) = x > acc ? x : acc per lane (acc when x is NaN: x > acc is false),
 * which is exactly what the x86 max instructions compute (the second operand unless the
 * first is greater); FA_HMAX(v), the largest lane of a vector without NaN. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#if defined(__AVX512F__)
#define FA_VMAX_f(x, acc) ((fa_rv_f)_mm512_max_ps((__m512)(x), (__m512)(acc)))
#define FA_VMAX_d(x, acc) ((fa_rv_d)_mm512_max_pd((__m512d)(x), (__m512d)(acc)))
#define FA_HMAX_f(v) _mm512_reduce_max_ps((__m512)(v))
#define FA_HMAX_d(v) _mm512_reduce_max_pd((__m512d)(v))
#elif defined(__AVX__)
#define FA_VMAX_f(x, acc) ((fa_rv_f)_mm256_max_ps((__m256)(x), (__m256)(acc)))
#define FA_VMAX_d(x, acc) ((fa_rv_d)_mm256_max_pd((__m256d)(x), (__m256d)(acc)))
#define FA_HMAX_f(v) fa_hmax4_f(_mm_max_ps(_mm256_castps256_ps128((__m256)(v)),          \
                                           _mm256_extractf128_ps((__m256)(v), 1)))
#define FA_HMAX_d(v) fa_hmax2_d(_mm_max_pd(_mm256_castpd256_pd128((__m256d)(v)),         \
                                           _mm256_extractf128_pd((__m256d)(v), 1)))
#else
#define FA_VMAX_f(x, acc) ((fa_rv_f)_mm_max_ps((__m128)(x), (__m128)(acc)))
#define FA_VMAX_d(x, acc) ((fa_rv_d)_mm_max_pd((__m128d)(x), (__m128d)(acc)))
#define FA_HMAX_f(v) fa_hmax4_f((__m128)(v))
#define FA_HMAX_d(v) fa_hmax2_d((__m128d)(v))
#endif
static inline float fa_hmax4_f(__m128 m)
{
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
static inline double fa_hmax2_d(__m128d m)
{
    return _mm_cvtsd_f64(_mm_max_sd(m, _mm_unpackhi_pd(m, m)));
}
#else  /* elsewhere, the same per-lane select, and the lanes in turn */
#define FA_VMAX_f(x, acc) fa_vmax_f((x), (acc))
#define FA_VMAX_d(x, acc) fa_vmax_d((x), (acc))
#define FA_HMAX_f(v) fa_hmax_f(v)
#define FA_HMAX_d(v) fa_hmax_d(v)
#define FA_DEFINE_VMAX(T, IT, SUFFIX)                                                     \
static inline fa_rv_##SUFFIX fa_vmax_##SUFFIX(fa_rv_##SUFFIX x, fa_rv_##SUFFIX acc)       \
{                                                                                         \
    typedef IT VI __attribute__((vector_size(FA_VBYTES)));                            \
    const VI gt = x > acc;                                                                \
    return (fa_rv_##SUFFIX)((gt & (VI)x) | (~gt & (VI)acc));                              \
}                                                                                         \
static inline T fa_hmax_##SUFFIX(fa_rv_##SUFFIX v)                                        \
{                                                                                         \
    T m = v[0];                                                                           \
    for (int t = 1; t < (int)(FA_VBYTES / sizeof(T)); t++) m = v[t] > m ? v[t] : m;   \
    return m;                                                                             \
}
#endif
/* FA_WIDEN(p): the FA_VBYTES / 8 elements at p as a vector of doubles. GCC lowered
 * the generic conversion of float vectors in two halves and a lane insert (three
 * instructions more per vector, on the softmax's sum) where one vcvtps2pd does it. */
#if defined(__AVX512F__)
#define FA_WIDEN_f(p) ((fa_rvd_f)_mm512_cvtps_pd(_mm256_loadu_ps(p)))
#elif defined(__AVX__)
#define FA_WIDEN_f(p) ((fa_rvd_f)_mm256_cvtps_pd(_mm_loadu_ps(p)))
#else
#define FA_WIDEN_f(p) __builtin_convertvector(*(const fa_rvh_f *)(p), fa_rvd_f)
#endif
#define FA_WIDEN_d(p) (*(const fa_rvh_d *)(p))
#ifndef FA_DEFINE_VMAX
#define FA_DEFINE_VMAX(T, IT, SUFFIX)
#endif
_Static_assert(FA_MAX_NV == 4, "fa_row_max folds four vectors");

/* Lane t of the FA_LANES partial results is lane t % W of vector t / W: vectors of the
 * build's native width (GCC lowers wider generic vectors through the stack). The sums run
 * in double: FA_VBYTES / 8 lanes per vector, loaded from half as many bytes of T. */
#define FA_DEFINE_ROW_OPS(T, IT, SUFFIX, EXP)                                          \
typedef T fa_rv_##SUFFIX __attribute__((vector_size(FA_VBYTES)));                    \
typedef T fa_rvu_##SUFFIX __attribute__((vector_size(FA_VBYTES), aligned(sizeof(T)))); \
typedef IT fa_rvi_##SUFFIX __attribute__((vector_size(FA_VBYTES)));                  \
typedef double fa_rvd_##SUFFIX __attribute__((vector_size(FA_VBYTES)));             \
typedef T fa_rvh_##SUFFIX __attribute__((vector_size(FA_VBYTES / 8 * sizeof(T)),    \
                                         aligned(sizeof(T))));                           \
FA_DEFINE_VMAX(T, IT, SUFFIX)                                                            \
static inline T fa_row_max_##SUFFIX(const T *x, ptrdiff_t n)                            \
{                                                                                        \
    enum { W = FA_VBYTES / sizeof(T), NV = FA_MAX_NV };                              \
    fa_rv_##SUFFIX acc[NV];                                                              \
    for (int v = 0; v < NV; v++) acc[v] = (fa_rv_##SUFFIX){0} - (T)INFINITY;             \
    ptrdiff_t j = 0;                                                                     \
    for (; j + NV * W <= n; j += NV * W)                                                 \
        for (int v = 0; v < NV; v++)                                                     \
            acc[v] = FA_VMAX_##SUFFIX(*(const fa_rvu_##SUFFIX *)(x + j + v * W), acc[v]); \
    /* acc holds no NaN: the folds may take any order */                                \
    acc[0] = FA_VMAX_##SUFFIX(FA_VMAX_##SUFFIX(acc[0], acc[1]),                          \
                              FA_VMAX_##SUFFIX(acc[2], acc[3]));                         \
    for (; j + W <= n; j += W)  /* rows shorter than NV vectors, and tails */          \
        acc[0] = FA_VMAX_##SUFFIX(*(const fa_rvu_##SUFFIX *)(x + j), acc[0]);            \
    T m = FA_HMAX_##SUFFIX(acc[0]);                                                      \
    for (; j < n; j++) m = x[j] > m ? x[j] : m;                                          \
    return m;                                                                            \
}                                                                                        \
/* x[j] = exp(x[j] - shift) in place, shift >= max(x); returns the sum, in double. */        \
static inline double fa_exp_shift_sum_##SUFFIX(T *x, ptrdiff_t n, T shift)              \
{                                                                                        \
    enum { WD = FA_VBYTES / 8, ND = FA_LANES / WD };                                 \
    for (ptrdiff_t j = 0; j < n; j++) x[j] = EXP(x[j] - shift);                          \
    fa_rvd_##SUFFIX acc[ND];                                                             \
    for (int v = 0; v < ND; v++) acc[v] = (fa_rvd_##SUFFIX){0};                          \
    ptrdiff_t j = 0;                                                                     \
    for (; j + FA_LANES <= n; j += FA_LANES)                                             \
        for (int v = 0; v < ND; v++)                                                     \
            acc[v] += FA_WIDEN_##SUFFIX(x + j + v * WD);                                 \
    double total = 0;                                                                    \
    for (; j < n; j++) total += (double)x[j];                                            \
    for (int t = 0; t < FA_LANES; t++) total += acc[t / WD][t % WD];                     \
    return total;                                                                        \
}                                                                                        \
/* The sum of exp(x[j] - shift), shift >= max(x), x unchanged (for log_softmax). */                      \
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

/* s[j] = cap tanh(s[j] / cap), the soft cap of a row of scores (cap > 0, inv_cap = 1 / cap).
 * Vectors of the build's width whose every lane is below the series threshold (most
 * scores under a soft cap: Gemma 2's cap of 50 puts every score under 30 there) compute
 * only fa_tanhf's series, where the loop over lanes computes both forms and picks one per
 * lane; the operations are fa_tanhf's own, so every lane gets exactly its value (and the
 * tests read the kernels' tanh through this function). Other vectors, NaN among them,
 * take the loop. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#if defined(__AVX512F__)
#define FA_ALL_LANES_f(m) (_mm512_movepi32_mask((__m512i)(m)) == 0xFFFF)
#define FA_ALL_LANES_d(m) (_mm512_movepi64_mask((__m512i)(m)) == 0xFF)
#elif defined(__AVX__)
#define FA_ALL_LANES_f(m) (_mm256_movemask_ps((__m256)(m)) == 0xFF)
#define FA_ALL_LANES_d(m) (_mm256_movemask_pd((__m256d)(m)) == 0xF)
#else
#define FA_ALL_LANES_f(m) (_mm_movemask_ps((__m128)(m)) == 0xF)
#define FA_ALL_LANES_d(m) (_mm_movemask_pd((__m128d)(m)) == 0x3)
#endif
#define FA_SOFTCAP_SERIES 1
#else
#define FA_SOFTCAP_SERIES 0
#endif
#define FA_DEFINE_SOFTCAP(T, IT, SUFFIX, TANH, THRESHOLD, SIGN, ...)                     \
typedef T fa_scv_##SUFFIX __attribute__((vector_size(FA_VBYTES)));                   \
typedef T fa_scvu_##SUFFIX __attribute__((vector_size(FA_VBYTES), aligned(sizeof(T)))); \
typedef IT fa_sci_##SUFFIX __attribute__((vector_size(FA_VBYTES)));                  \
static inline void fa_softcap_row_##SUFFIX(T *s, ptrdiff_t n, T cap, T inv_cap)         \
{                                                                                        \
    enum { W = FA_VBYTES / sizeof(T) };                                              \
    static const T coef[] = {__VA_ARGS__};                                               \
    enum { N_COEF = sizeof coef / sizeof coef[0] };                                      \
    ptrdiff_t j = 0;                                                                     \
    for (; FA_SOFTCAP_SERIES && j + W <= n; j += W) {                                    \
        const fa_scv_##SUFFIX y = *(fa_scvu_##SUFFIX *)(s + j) * inv_cap;                \
        const fa_sci_##SUFFIX sign = (fa_sci_##SUFFIX)y & (IT)SIGN;                      \
        const fa_scv_##SUFFIX a = (fa_scv_##SUFFIX)((fa_sci_##SUFFIX)y & (IT)~(IT)SIGN); \
        if (FA_ALL_LANES_##SUFFIX(a < THRESHOLD)) {                                      \
            const fa_scv_##SUFFIX a2 = a * a;                                            \
            fa_scv_##SUFFIX p = (fa_scv_##SUFFIX){0} + coef[0];                          \
            for (int c = 1; c < N_COEF; c++) p = p * a2 + coef[c];                       \
            const fa_scv_##SUFFIX t = a + a * (a2 * p);                                  \
            *(fa_scvu_##SUFFIX *)(s + j) = cap * (fa_scv_##SUFFIX)((fa_sci_##SUFFIX)t | sign); \
        } else {                                                                         \
            for (int l = 0; l < W; l++) s[j + l] = cap * TANH(s[j + l] * inv_cap);       \
        }                                                                                \
    }                                                                                    \
    for (; j < n; j++) s[j] = cap * TANH(s[j] * inv_cap);                                \
}
FA_DEFINE_SOFTCAP(float, int32_t, f, fa_tanhf, 0.6f, 0x80000000u, FA_TANHF_COEF)
FA_DEFINE_SOFTCAP(double, int64_t, d, fa_tanh, 0.25, 0x8000000000000000ull, FA_TANH_COEF)

FA_DEFINE_ROW_OPS(float, int32_t, f, fa_expf_nonpos)
FA_DEFINE_ROW_OPS(double, int64_t, d, fa_exp_nonpos)

#endif

/* Low-precision tiles of the fused kernel: bfloat16 GEMMs on the CPU's matrix engine, and
 * the packing that widens 16-bit inputs for the float32 micro-kernels elsewhere.
 *
 * Engines (FA_ENGINE_*), chosen once per process by the compiled policy (_k_policy.pxi):
 *   AVX512-BF16  vdpbf16ps: two bfloat16 products per float32 lane (AMD Zen 4/5, Intel
 *                Cooper Lake and later); AVX-512 build only.
 *   AMX          tdpbf16ps on 16 x 16 float32 accumulator tiles (Intel Sapphire Rapids
 *                and later); AVX-512 build only, and only once Linux granted the tile
 *                state and a known product on the tiles matched the emulation
 *                (fa_amx_selftest).
 *   AMX emulated the same AMX kernels on a portable C emulation of the tile operations
 *                (fa_lowp_amx.h), in every build: the suite runs the AMX kernels' packing,
 *                tile loops and edges on any CPU.
 * Where none runs, bfloat16 and float16 inputs are widened to float32 while they are
 * packed for the float32 micro-kernels (fa_lp_pack_*_widen): never a full float32 copy.
 *
 * One layout serves both engines (bfloat16 elements, "pair-interleaved" as both
 * instructions take their B operand):
 *   queries  qb: rows padded with zero rows to a multiple of FA_LP_ROWS, d_head padded
 *            with zeros to d_pad (a multiple of FA_LP_DSTEP), row-major;
 *   keys     kp: panels of FA_LP_KEYS keys; in panel p (at p FA_LP_KEYS d_pad), the
 *            dimension pair t2 is a row of FA_LP_KEYS pairs, key jj's pair
 *            (k[jj][2 t2], k[jj][2 t2 + 1]) at t2 2 FA_LP_KEYS + 2 jj;
 *   values   vp: chunks of FA_LP_VCHUNK keys (chunk c at c FA_LP_VCHUNK d_v); in a chunk,
 *            bands of FA_LP_BAND columns (then of 16 for the columns left) at c0
 *            FA_LP_VCHUNK; in a band of bw columns, the key pair pr is a row of bw pairs
 *            at pr 2 bw, column cc's pair (v[2 pr][cc], v[2 pr + 1][cc]) at 2 cc;
 *   P        pb: the tile's probabilities rounded to bfloat16, rows padded like qb,
 *            columns (keys) padded with zeros to a multiple of FA_LP_KEYS.
 * The scores kernel takes panels whole; the P V kernel runs over whole steps of
 * FA_LP_KEYS keys that start at multiples of FA_LP_KEYS (the fused kernel aligns its key
 * tiles so). The products accumulate in float32; the scale is applied to the float32 sum
 * (as PyTorch's bfloat16 attention does), never rounded into the queries. */
#ifndef FASTATTN_LOWP_H
#define FASTATTN_LOWP_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fa_convert.h"
#include "fa_microkernels.h"
#include "fa_simd.h"

/* What the fused kernel's q, k, v hold (0: its compute dtype itself). */
/* (FA_SRC_BF16, FA_SRC_F16, FA_SRC_F32: fa_convert.h.) */
/* The engines; FA_ENGINE_NONE: the float32 kernels (widening 16-bit inputs). */
enum { FA_ENGINE_NONE = 0, FA_ENGINE_DPBF16 = 1, FA_ENGINE_AMX = 2, FA_ENGINE_AMX_EMU = 3 };

#define FA_LP_ROWS 16    /* query rows: a tile's height */
#define FA_LP_DSTEP 32   /* head dimensions: one tile row of bfloat16 (64 bytes) */
#define FA_LP_KEYS 32    /* keys per panel and per step of P V: two tiles' width */
#define FA_LP_VCHUNK 64  /* keys per chunk of the values' layout */
#define FA_LP_BAND 64    /* columns per band of the values' layout */

/* --------------------------------------------------------------------------- elements */

/* Element i of src (of kind FA_SRC_*) as float32, and as bfloat16 bits. */
static inline __attribute__((always_inline)) float fa_lp_widen(const void *src, ptrdiff_t i,
                                                               int kind)
{
    if (kind == FA_SRC_BF16) return fa_bf16_to_f32(((const uint16_t *)src)[i]);
    if (kind == FA_SRC_F16) return fa_f16_to_f32(((const uint16_t *)src)[i]);
    return ((const float *)src)[i];
}

static inline __attribute__((always_inline)) uint16_t fa_lp_bits(const void *src, ptrdiff_t i,
                                                                 int kind)
{
    return kind == FA_SRC_F32 ? fa_f32_to_bf16(((const float *)src)[i])
                              : ((const uint16_t *)src)[i];
}

/* --------------------------------------------------------------------------- widening
 * For the float32 micro-kernels (fa_microkernels.h): the same layouts as fa_pack_keys_f
 * and fa_pack_values_f (given as the panel width kr and the values' chunk and band), from
 * 16-bit sources. Loops over one kind each, so that the conversion is not re-decided per
 * element. */

/* dst[i] = src[i] scale (src: n bfloat16 or float16 bits, of kind), one loop per kind so
 * that each vectorises. */
static inline void fa_lp_widen_scaled(const void *src, int kind, ptrdiff_t n, float scale,
                                      float *dst)
{
    const uint16_t *h = (const uint16_t *)src;
    if (kind == FA_SRC_BF16)
        for (ptrdiff_t i = 0; i < n; i++) dst[i] = fa_bf16_to_f32(h[i]) * scale;
    else
        fa_f16_run_to_f32(h, n, scale, dst);
}

#if FA_MICROKERNELS
/* kp = keys [0, rows) of k (rows x d, rows ldk apart, 16-bit of kind) in fa_pack_keys_f's
 * panels of kr keys, zero keys up to n_cols: each run of 8 keys widened into a buffer (one
 * vectorised run where the rows are contiguous), then moved by the float 8 x 8 register
 * transpose as fa_pack_keys_f moves float32 keys. */
static inline void fa_lp_pack_keys_widen(const void *k, int kind, ptrdiff_t rows, ptrdiff_t d,
                                         ptrdiff_t ldk, float *kp, ptrdiff_t n_cols,
                                         ptrdiff_t kr)
{
    enum { TB = FA_TRANSPOSE_f, MAXD = 512 };
    float tmp[TB * MAXD];
    for (ptrdiff_t j0 = 0; j0 < n_cols; j0 += kr) {
        float *panel = kp + j0 * d;
        const ptrdiff_t nb = rows - j0 < kr ? (rows - j0 > 0 ? rows - j0 : 0) : kr;
        ptrdiff_t jj0 = 0;
        if (d % TB == 0 && d <= MAXD)
            for (; jj0 + TB <= nb; jj0 += TB) {
                for (ptrdiff_t r = 0; r < (ldk == d ? 1 : TB); r++)
                    fa_lp_widen_scaled((const uint16_t *)k + (j0 + jj0 + r) * ldk, kind,
                                       ldk == d ? TB * d : d, 1.0f, tmp + r * d);
                for (ptrdiff_t t = 0; t < d; t += TB)
                    fa_transpose_block_f(tmp + t, d, panel + t * kr + jj0, kr);
            }
        for (ptrdiff_t jj = jj0; jj < nb; jj++)
            for (ptrdiff_t t = 0; t < d; t++)
                panel[t * kr + jj] = fa_lp_widen(k, (j0 + jj) * ldk + t, kind);
        for (ptrdiff_t t = 0; t < d; t++)
            for (ptrdiff_t jj = nb; jj < kr; jj++) panel[t * kr + jj] = 0;
    }
}
#else
static inline void fa_lp_pack_keys_widen(const void *k, int kind, ptrdiff_t rows, ptrdiff_t d,
                                         ptrdiff_t ldk, float *kp, ptrdiff_t n_cols,
                                         ptrdiff_t kr)
{ (void)k; (void)kind; (void)rows; (void)d; (void)ldk; (void)kp; (void)n_cols; (void)kr; }
#endif

/* The float chunk layout of fa_pack_values_f (chunks of ch keys, bands of bw columns, then
 * of w for the columns left) from 16-bit values of kind (rows ldv apart): each band's run
 * of a row widened in place, one vectorised run. */
static inline void fa_lp_pack_values_widen(const void *v, int kind, ptrdiff_t n_keys,
                                           ptrdiff_t d_v, ptrdiff_t ldv, float *vp, ptrdiff_t c_lo,
                                           ptrdiff_t c_hi, ptrdiff_t ch, ptrdiff_t bw,
                                           ptrdiff_t w)
{
    const ptrdiff_t full = d_v / bw * bw;
    const ptrdiff_t j_end = n_keys < c_hi * ch ? n_keys : c_hi * ch;
    for (ptrdiff_t j = c_lo * ch; j < j_end; j++) {
        float *chunk = vp + (j / ch - c_lo) * ch * d_v;
        const uint16_t *row = (const uint16_t *)v + j * ldv;
        const ptrdiff_t jj = j % ch;
        ptrdiff_t c0 = 0;
        for (; c0 < full; c0 += bw)
            fa_lp_widen_scaled(row + c0, kind, bw, 1.0f, chunk + c0 * ch + jj * bw);
        for (; c0 < d_v; c0 += w)
            fa_lp_widen_scaled(row + c0, kind, d_v - c0 < w ? d_v - c0 : w, 1.0f,
                               chunk + c0 * ch + jj * w);
    }
}

/* dst[i] = src[i] (float32) as kind's bits (FA_SRC_BF16 or FA_SRC_F16), i < n. */
static inline void fa_lp_narrow(const float *src, ptrdiff_t n, int kind, uint16_t *dst)
{
    if (kind == FA_SRC_BF16)
        for (ptrdiff_t i = 0; i < n; i++) dst[i] = fa_f32_to_bf16(src[i]);
    else
        for (ptrdiff_t i = 0; i < n; i++) dst[i] = fa_f32_to_f16(src[i]);
}

/* --------------------------------------------------------------------------- engine packing */

static inline ptrdiff_t fa_lp_round(ptrdiff_t n, ptrdiff_t m) { return (n + m - 1) / m * m; }

/* qb (rows_pad x d_pad) = q (rows x d, rows ldq apart, of kind), zeros elsewhere. */
static inline void fa_lp_pack_q(const void *q, int kind, ptrdiff_t rows, ptrdiff_t d,
                                ptrdiff_t ldq, uint16_t *qb, ptrdiff_t rows_pad, ptrdiff_t d_pad)
{
    memset(qb, 0, (size_t)(rows_pad * d_pad) * sizeof(uint16_t));
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t t = 0; t < d; t++) qb[r * d_pad + t] = fa_lp_bits(q, r * ldq + t, kind);
}

/* kp = keys [0, rows) of k (rows x d, rows ldk apart, of kind) as panels (see the layout
 * above), zero keys from rows to n_cols (a multiple of FA_LP_KEYS) and zero dimensions
 * from d to d_pad. */
static inline void fa_lp_pack_keys(const void *k, int kind, ptrdiff_t rows, ptrdiff_t d,
                                   ptrdiff_t ldk, uint16_t *kp, ptrdiff_t n_cols,
                                   ptrdiff_t d_pad)
{
    enum { KR = FA_LP_KEYS };
    for (ptrdiff_t j0 = 0; j0 < n_cols; j0 += KR) {
        uint16_t *panel = kp + j0 * d_pad;
        const ptrdiff_t nb = rows - j0 < KR ? (rows - j0 > 0 ? rows - j0 : 0) : KR;
        if (nb < KR || d < d_pad) memset(panel, 0, (size_t)(KR * d_pad) * sizeof(uint16_t));
        if (kind == FA_SRC_BF16 && d % 2 == 0 && ldk % 2 == 0) {
            /* a transpose of 32-bit pairs: through registers 8 x 8 at a time where the
             * build has the float transpose, else element by element */
            const uint32_t *src = (const uint32_t *)k + j0 * (ldk / 2);
            uint32_t *dst = (uint32_t *)panel;
            ptrdiff_t jj0 = 0;
#if FA_MICROKERNELS
            if ((d / 2) % 8 == 0)
                for (; jj0 + 8 <= nb; jj0 += 8)
                    for (ptrdiff_t t2 = 0; t2 < d / 2; t2 += 8)
                        fa_transpose_block_f((const float *)(src + jj0 * (ldk / 2) + t2), ldk / 2,
                                             (float *)(dst + t2 * KR + jj0), KR);
#endif
            for (ptrdiff_t jj = jj0; jj < nb; jj++)
                for (ptrdiff_t t2 = 0; t2 < d / 2; t2++) dst[t2 * KR + jj] = src[jj * (ldk / 2) + t2];
        } else {
            for (ptrdiff_t jj = 0; jj < nb; jj++)
                for (ptrdiff_t t = 0; t < d; t++)
                    panel[(t / 2) * 2 * KR + 2 * jj + t % 2] = fa_lp_bits(k, (j0 + jj) * ldk + t, kind);
        }
    }
}

/* Where key j (even; counted from chunk 0 of vp) of the band at column c0, bw wide, is. */
static inline __attribute__((always_inline)) const uint16_t *fa_lp_v_at(
    const uint16_t *vp, ptrdiff_t j, ptrdiff_t c0, ptrdiff_t bw, ptrdiff_t d_v)
{
    enum { CH = FA_LP_VCHUNK };
    return vp + j / CH * CH * d_v + c0 * CH + (j % CH) / 2 * 2 * bw;
}

/* The pairs (a[c], b[c]) of two rows of bfloat16 bits as 32-bit words, c < n. */
static inline void fa_lp_interleave(const uint16_t *a, const uint16_t *b, ptrdiff_t n,
                                    uint32_t *out)
{
    for (ptrdiff_t c = 0; c < n; c++) out[c] = (uint32_t)a[c] | ((uint32_t)b[c] << 16);
}

/* vp (chunks c_lo <= c < c_hi, chunk c_lo first) = v's keys [c_lo CH, c_hi CH) (v: n_keys
 * x d_v, rows ldv apart, of kind; d_v a multiple of 16), zero keys from n_keys on. */
static inline void fa_lp_pack_values(const void *v, int kind, ptrdiff_t n_keys, ptrdiff_t d_v,
                                     ptrdiff_t ldv, uint16_t *vp, ptrdiff_t c_lo, ptrdiff_t c_hi)
{
    enum { CH = FA_LP_VCHUNK, BW = FA_LP_BAND, MAXD = 1024 };
    const ptrdiff_t full = d_v / BW * BW;
    uint16_t row_a[MAXD], row_b[MAXD];
    for (ptrdiff_t j = c_lo * CH; j < c_hi * CH; j += 2) {
        uint16_t *chunk = vp + (j / CH - c_lo) * CH * d_v;
        const ptrdiff_t pr = (j % CH) / 2;
        for (ptrdiff_t c1 = 0; c1 < d_v; c1 += MAXD) {  /* columns in pieces of MAXD */
            const ptrdiff_t c2 = c1 + MAXD < d_v ? c1 + MAXD : d_v;
            const uint16_t *a = row_a, *b = row_b;
            if (kind == FA_SRC_BF16 && j + 1 < n_keys) {  /* the rows themselves */
                a = (const uint16_t *)v + j * ldv + c1;
                b = a + ldv;
            } else {
                for (ptrdiff_t c = c1; c < c2; c++) {
                    row_a[c - c1] = j < n_keys ? fa_lp_bits(v, j * ldv + c, kind) : 0;
                    row_b[c - c1] = j + 1 < n_keys ? fa_lp_bits(v, (j + 1) * ldv + c, kind) : 0;
                }
            }
            /* each band's run of columns in this piece: bands of BW, then of 16 */
            for (ptrdiff_t c = c1; c < c2;) {
                const ptrdiff_t bw = c < full ? BW : 16, c0 = c < full ? c / BW * BW : c / 16 * 16;
                const ptrdiff_t end = c0 + bw < c2 ? c0 + bw : c2;
                fa_lp_interleave(a + (c - c1), b + (c - c1), end - c,
                                 (uint32_t *)(chunk + c0 * CH + pr * 2 * bw) + (c - c0));
                c = end;
            }
        }
    }
}

/* pb (rows_pad x ld_p, ld_p a multiple of FA_LP_KEYS >= cols) = s (rows x cols, row
 * stride ld_s) rounded to bfloat16, zeros elsewhere. */
static inline void fa_lp_pack_p(const float *s, ptrdiff_t ld_s, ptrdiff_t rows, ptrdiff_t cols,
                                uint16_t *pb, ptrdiff_t ld_p, ptrdiff_t rows_pad)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *row = s + r * ld_s;
        uint16_t *out = pb + r * ld_p;
        for (ptrdiff_t j = 0; j < cols; j++) out[j] = fa_f32_to_bf16(row[j]);
        for (ptrdiff_t j = cols; j < ld_p; j++) out[j] = 0;
    }
    if (rows_pad > rows) memset(pb + rows * ld_p, 0, (size_t)((rows_pad - rows) * ld_p) * 2);
}

/* --------------------------------------------------------------------------- the engines */

#include "fa_lowp_amx.h"

#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#define FA_HAVE_DPBF16 1
#include <cpuid.h>
#include <immintrin.h>

/* Register reg (0-3: EAX, EBX, ECX, EDX) of CPUID leaf 7, subleaf sub (0 without it). */
static inline unsigned int fa_cpuid7(unsigned int sub, int reg)
{
    unsigned int r[4];
    if (!__get_cpuid_count(7, sub, &r[0], &r[1], &r[2], &r[3])) return 0;
    return r[reg];
}
/* Whether the CPU has AVX512-BF16 (leaf 7 subleaf 1, EAX bit 5); AVX512-VNNI (subleaf 0,
 * ECX bit 11: the int8 decoding products of fa_decode_dp.h). */
static inline int fa_cpu_avx512_bf16(void) { return (fa_cpuid7(1, 0) >> 5) & 1; }
static inline int fa_cpu_avx512_vnni(void) { return (fa_cpuid7(0, 2) >> 11) & 1; }
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16")

/* s (rows_pad x n_cols, stride ld) = scale qb kp (see fa_lp_scores): register blocks of 8
 * rows x 32 keys (16 accumulators), a broadcast pair of q against two vectors of key
 * pairs per step. */
static void fa_lp_scores_dp(const uint16_t *qb, ptrdiff_t rows_pad, ptrdiff_t d_pad,
                            const uint16_t *kp, ptrdiff_t n_cols, float scale, float *s,
                            ptrdiff_t ld)
{
    enum { MR = 8 };
    const __m512 sc = _mm512_set1_ps(scale);
    for (ptrdiff_t j0 = 0; j0 < n_cols; j0 += FA_LP_KEYS) {
        const uint16_t *panel = kp + j0 * d_pad;
        for (ptrdiff_t i0 = 0; i0 < rows_pad; i0 += MR) {
            __m512 c[MR][2];
            for (int r = 0; r < MR; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
            const uint16_t *q = qb + i0 * d_pad;
            for (ptrdiff_t t2 = 0; t2 < d_pad / 2; t2++) {
                const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + t2 * 64);
                const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + t2 * 64 + 32);
                for (int r = 0; r < MR; r++) {
                    int32_t pair;
                    memcpy(&pair, q + r * d_pad + 2 * t2, 4);
                    const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
                    c[r][0] = _mm512_dpbf16_ps(c[r][0], a, b0);
                    c[r][1] = _mm512_dpbf16_ps(c[r][1], a, b1);
                }
            }
            for (int r = 0; r < MR; r++) {
                _mm512_storeu_ps(s + (i0 + r) * ld + j0, _mm512_mul_ps(c[r][0], sc));
                _mm512_storeu_ps(s + (i0 + r) * ld + j0 + 16, _mm512_mul_ps(c[r][1], sc));
            }
        }
    }
}

/* One band of NV vectors (16 columns each) of P V over keys [j0, j0 + n_keys): blocks of 4
 * rows x NV vectors, run by run of the values' chunks. */
static inline __attribute__((always_inline)) void fa_lp_pv_band_dp(
    const int nv, const uint16_t *pb, ptrdiff_t ld_p, ptrdiff_t rows_pad, const uint16_t *vp,
    ptrdiff_t c0, ptrdiff_t j0, ptrdiff_t n_keys, ptrdiff_t d_v, float *o)
{
    enum { MR = 4, CH = FA_LP_VCHUNK };
    const ptrdiff_t bw = nv * 16;
    for (ptrdiff_t j = j0; j < j0 + n_keys;) {
        const ptrdiff_t j1 = (j / CH + 1) * CH < j0 + n_keys ? (j / CH + 1) * CH : j0 + n_keys;
        const uint16_t *run = fa_lp_v_at(vp, j, c0, bw, d_v);
        for (ptrdiff_t i0 = 0; i0 < rows_pad; i0 += MR) {
            __m512 c[MR][4];
            for (int r = 0; r < MR; r++)
                for (int u = 0; u < nv; u++) c[r][u] = _mm512_loadu_ps(o + (i0 + r) * d_v + c0 + 16 * u);
            const uint16_t *p = pb + i0 * ld_p + (j - j0);
            for (ptrdiff_t pr = 0; pr < (j1 - j) / 2; pr++) {
                __m512bh b[4];
                for (int u = 0; u < nv; u++)
                    b[u] = (__m512bh)_mm512_loadu_si512(run + pr * 2 * bw + 32 * u);
                for (int r = 0; r < MR; r++) {
                    int32_t pair;
                    memcpy(&pair, p + r * ld_p + 2 * pr, 4);
                    const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
                    for (int u = 0; u < nv; u++) c[r][u] = _mm512_dpbf16_ps(c[r][u], a, b[u]);
                }
            }
            for (int r = 0; r < MR; r++)
                for (int u = 0; u < nv; u++) _mm512_storeu_ps(o + (i0 + r) * d_v + c0 + 16 * u, c[r][u]);
        }
        j = j1;
    }
}

/* o (rows_pad x d_v) += pb vp over keys [j0, j0 + n_keys) (see fa_lp_pv). */
static void fa_lp_pv_dp(const uint16_t *pb, ptrdiff_t ld_p, ptrdiff_t rows_pad,
                        const uint16_t *vp, ptrdiff_t j0, ptrdiff_t n_keys, ptrdiff_t d_v,
                        float *o)
{
    ptrdiff_t c0 = 0;
    for (; c0 + FA_LP_BAND <= d_v; c0 += FA_LP_BAND)
        fa_lp_pv_band_dp(4, pb, ld_p, rows_pad, vp, c0, j0, n_keys, d_v, o);
    for (; c0 < d_v; c0 += 16)
        fa_lp_pv_band_dp(1, pb, ld_p, rows_pad, vp, c0, j0, n_keys, d_v, o);
}

/* The engine's peak: n_iter steps of 16 independent vdpbf16ps chains (each instruction 16
 * lanes x 2 products, 64 FLOPs); returns a value that depends on every step. */
static float fa_dpbf16_loop(ptrdiff_t n_iter, float seed)
{
    __m512 c[16];
    for (int i = 0; i < 16; i++) c[i] = _mm512_set1_ps(seed * (float)i);
    const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;  /* 1.0 pairs */
    for (ptrdiff_t n = 0; n < n_iter; n++)
        for (int i = 0; i < 16; i++) c[i] = _mm512_dpbf16_ps(c[i], a, b);
    __m512 sum = c[0];
    for (int i = 1; i < 16; i++) sum = _mm512_add_ps(sum, c[i]);
    return _mm512_reduce_add_ps(sum);
}
#pragma GCC pop_options
#else
#define FA_HAVE_DPBF16 0
static inline int fa_cpu_avx512_bf16(void) { return 0; }
static inline int fa_cpu_avx512_vnni(void) { return 0; }
static float fa_dpbf16_loop(ptrdiff_t n_iter, float seed) { (void)n_iter; return seed; }
static void fa_lp_scores_dp(const uint16_t *qb, ptrdiff_t rows_pad, ptrdiff_t d_pad,
                            const uint16_t *kp, ptrdiff_t n_cols, float scale, float *s,
                            ptrdiff_t ld)
{ (void)qb; (void)rows_pad; (void)d_pad; (void)kp; (void)n_cols; (void)scale; (void)s; (void)ld; }
static void fa_lp_pv_dp(const uint16_t *pb, ptrdiff_t ld_p, ptrdiff_t rows_pad,
                        const uint16_t *vp, ptrdiff_t j0, ptrdiff_t n_keys, ptrdiff_t d_v,
                        float *o)
{ (void)pb; (void)ld_p; (void)rows_pad; (void)vp; (void)j0; (void)n_keys; (void)d_v; (void)o; }
#endif

/* s (rows_pad x n_cols, row stride ld) = scale qb (rows_pad x d_pad) @ K^T, K the panels
 * kp (n_cols keys, a multiple of FA_LP_KEYS), on the engine. */
static inline void fa_lp_scores(int engine, const uint16_t *qb, ptrdiff_t rows_pad,
                                ptrdiff_t d_pad, const uint16_t *kp, ptrdiff_t n_cols,
                                float scale, float *s, ptrdiff_t ld)
{
    if (engine == FA_ENGINE_DPBF16)
        fa_lp_scores_dp(qb, rows_pad, d_pad, kp, n_cols, scale, s, ld);
    else if (engine == FA_ENGINE_AMX)
        fa_lp_scores_amx(qb, rows_pad, d_pad, kp, n_cols, scale, s, ld);
    else
        fa_lp_scores_amx_emu(qb, rows_pad, d_pad, kp, n_cols, scale, s, ld);
}

/* o (rows_pad x d_v, row-major) += pb (rows_pad x n_keys of row stride ld_p) @ V, V the
 * keys [j0, j0 + n_keys) of the value layout vp (j0 and n_keys multiples of FA_LP_KEYS),
 * on the engine. */
static inline void fa_lp_pv(int engine, const uint16_t *pb, ptrdiff_t ld_p, ptrdiff_t rows_pad,
                            const uint16_t *vp, ptrdiff_t j0, ptrdiff_t n_keys, ptrdiff_t d_v,
                            float *o)
{
    if (engine == FA_ENGINE_DPBF16)
        fa_lp_pv_dp(pb, ld_p, rows_pad, vp, j0, n_keys, d_v, o);
    else if (engine == FA_ENGINE_AMX)
        fa_lp_pv_amx(pb, ld_p, rows_pad, vp, j0, n_keys, d_v, o);
    else
        fa_lp_pv_amx_emu(pb, ld_p, rows_pad, vp, j0, n_keys, d_v, o);
}

/* FLOPs of one step of the engine's peak loop (fa_lp_peak_loop). */
static inline ptrdiff_t fa_lp_peak_flops(int engine)
{
    return engine == FA_ENGINE_DPBF16 ? 16 * 16 * 4 : engine == FA_ENGINE_AMX ? 4 * 16 * 16 * 32 * 2 : 0;
}

/* The engine's peak loop on this thread: n_iter steps of independent products (AVX512-BF16:
 * 16 accumulator vectors; AMX: 4 accumulator tiles from 2 A and 2 B tiles). */
static inline float fa_lp_peak_loop(int engine, ptrdiff_t n_iter, float seed)
{
    if (engine == FA_ENGINE_DPBF16) return fa_dpbf16_loop(n_iter, seed);
    if (engine == FA_ENGINE_AMX) return fa_amx_loop(n_iter, seed);
    return seed;
}

/* A thread's tiles for a work item (AMX: the tile configuration; nothing otherwise). */
static inline void fa_lp_begin(int engine)
{
    if (engine == FA_ENGINE_AMX) fa_amx_begin();
}
static inline void fa_lp_end(int engine)
{
    if (engine == FA_ENGINE_AMX) fa_amx_end();
}

#endif

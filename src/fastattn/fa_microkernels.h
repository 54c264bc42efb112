/* Micro-kernels for the two GEMMs of an attention tile, in the AVX2 and AVX-512 builds, for
 * float32 and float64: s = Q K^T (queries against a packed key block) and o += P V (a packed
 * value block).
 * The baseline build has none (FA_MICROKERNELS 0) and its tiles call BLAS. Whether a tile
 * uses them is decided in Python (fastattn._plan.use_microkernels) and handed to the kernel.
 *
 * Design, after BLIS's haswell/skx kernels: an MR x NV register block of accumulators
 * (NV vectors of W lanes across, MR rows down) is updated once per step of the inner
 * dimension by NV contiguous vector loads and MR scalar broadcasts taken straight from
 * memory (vbroadcastss/sd m, a load-port op). The block is chosen from the register file:
 *   AVX2, 16 ymm:    6 x 2 (12 accumulators, 2 loads, 1 broadcast: 15 registers);
 *   AVX-512, 32 zmm: scores 8 x 2, P V 4 x 4 (16 accumulators), as first tuned on an EPYC.
 * 12-16 independent FMA chains cover the FMA latency (4-5 cycles) x 2 FMA ports of both
 * vendors' cores. Broadcasting as `(vec){0} + x` instead costs a scalar add and a register
 * broadcast per row and step, which on Intel compete with the FMAs for ports 0 and 5.
 * Rows left over from MR run in a block of their own height (a switch on a constant, so
 * each height compiles to its own unrolled loop), never one row at a time.
 *
 * Measured on an AMD EPYC with AVX-512 (one thread, 64 tiles of 256 queries x 512 keys x
 * D 64): OpenBLAS sgemm 98.5 GFLOP/s for the scores and 93.0 for P V (its AVX2 kernels,
 * as that machine set OPENBLAS_CORETYPE=Haswell); the AVX-512 kernels 169.5 and 202.9. */
#ifndef FASTATTN_MICROKERNELS_H
#define FASTATTN_MICROKERNELS_H

/* P V runs over the keys in runs of at most this many bytes of a value band (64 keys of a
 * 64-float band in the AVX-512 build, 256 of a 16-float band in the AVX2 build), each run
 * for every row block before the next: the run stays in L1 while the row blocks stream P
 * past it, as BLIS keeps its kc x nr panel of B in L1. Without runs each row block read the
 * whole band of the tile (128 KiB at 512 keys and D 64) from L2: 32 bytes per cycle at the
 * FMA peak, half of a Zen 5 core's L2 bandwidth and near all of what Intel's cores sustain
 * (on a Xeon, family 6 model 207, the P V kernel took 22% of a profile where the score
 * kernel, with the same FLOPs, took 15%). With runs, P V reads P once from L2, and the
 * accumulators are loaded and stored once per run (32 of each per 1024 FMAs): on a Zen 5
 * EPYC the same speed within noise (stand-alone kernel 226-230 GFLOP/s on one core either
 * way, the long attention shape in alternating builds too), bitwise the same results (each
 * output still sums its keys in order). */
#ifndef FA_MK_PV_KC_BYTES
#define FA_MK_PV_KC_BYTES 16384
#endif

#include <stddef.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define FA_MICROKERNELS 1

#if defined(__AVX512F__)
#define FA_MK_VBYTES 64
#define FA_MK_SCORES_MR 8
#define FA_MK_SCORES_NV 2
#define FA_MK_PV_MR 4
#define FA_MK_PV_NV 4
#define FA_MK_BCAST_f(p) ((fa_mkv_f)_mm512_set1_ps(*(p)))
#define FA_MK_BCAST_d(p) ((fa_mkv_d)_mm512_set1_pd(*(p)))
#else
#define FA_MK_VBYTES 32
#define FA_MK_SCORES_MR 6
#define FA_MK_SCORES_NV 2
#define FA_MK_PV_MR 6
#define FA_MK_PV_NV 2
#define FA_MK_BCAST_f(p) ((fa_mkv_f)_mm256_broadcast_ss(p))
#define FA_MK_BCAST_d(p) ((fa_mkv_d)_mm256_broadcast_sd(p))
#endif

/* Keys per chunk of the values' layout, and per run of P V: FA_MK_PV_KC_BYTES of a band of
 * FA_MK_PV_NV vectors (a band of one vector, for the columns left over, runs as long). */
#define FA_MK_PV_CHUNK (FA_MK_PV_KC_BYTES / (FA_MK_PV_NV * FA_MK_VBYTES))

/* Keys per score block: the key block is packed and padded with zero keys to a
 * multiple of this (the widest score block, float32's). */
#define FA_MK_KEYS (FA_MK_SCORES_NV * FA_MK_VBYTES / 4)

/* Packing keys is a transpose (key j, dimension t) -> (t, j). Element by element it was a
 * scalar load and store per key element, repeated for every query block: 5-6% of the
 * long attention shape on a Zen 3 EPYC (perf). These move an 8 x 8 (float) or 4 x 4
 * (double) block through registers with AVX shuffles: 8 (4) vector loads and stores. */
static inline void fa_transpose_block_f(const float *src, ptrdiff_t ld_src, float *dst,
                                        ptrdiff_t ld_dst)
{
    /* dst[c * ld_dst + r] = src[r * ld_src + c], r, c < 8 */
    __m256 r0 = _mm256_loadu_ps(src + 0 * ld_src), r1 = _mm256_loadu_ps(src + 1 * ld_src);
    __m256 r2 = _mm256_loadu_ps(src + 2 * ld_src), r3 = _mm256_loadu_ps(src + 3 * ld_src);
    __m256 r4 = _mm256_loadu_ps(src + 4 * ld_src), r5 = _mm256_loadu_ps(src + 5 * ld_src);
    __m256 r6 = _mm256_loadu_ps(src + 6 * ld_src), r7 = _mm256_loadu_ps(src + 7 * ld_src);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst + 0 * ld_dst, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst + 1 * ld_dst, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst + 2 * ld_dst, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst + 3 * ld_dst, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst + 4 * ld_dst, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst + 5 * ld_dst, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst + 6 * ld_dst, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst + 7 * ld_dst, _mm256_permute2f128_ps(u3, u7, 0x31));
}
enum { FA_TRANSPOSE_f = 8 };

static inline void fa_transpose_block_d(const double *src, ptrdiff_t ld_src, double *dst,
                                        ptrdiff_t ld_dst)
{
    /* dst[c * ld_dst + r] = src[r * ld_src + c], r, c < 4 */
    __m256d r0 = _mm256_loadu_pd(src + 0 * ld_src), r1 = _mm256_loadu_pd(src + 1 * ld_src);
    __m256d r2 = _mm256_loadu_pd(src + 2 * ld_src), r3 = _mm256_loadu_pd(src + 3 * ld_src);
    __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
    __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
    _mm256_storeu_pd(dst + 0 * ld_dst, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_storeu_pd(dst + 1 * ld_dst, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_storeu_pd(dst + 2 * ld_dst, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_storeu_pd(dst + 3 * ld_dst, _mm256_permute2f128_pd(t1, t3, 0x31));
}
enum { FA_TRANSPOSE_d = 4 };
_Static_assert((FA_MK_SCORES_NV * FA_MK_VBYTES / 4) % 8 == 0
               && (FA_MK_SCORES_NV * FA_MK_VBYTES / 8) % 4 == 0,
               "a key panel is a whole number of transpose blocks wide");

/* Software prefetch for P V: during each run of values, the run read next (of the band,
 * else the next band's first, else the next tile's first where the caller says its values
 * are in the layout already), spread over the run's register blocks: each asks for its
 * share of the run's cache lines into L1 (fa_mk_prefetch_lines; the share is computed once
 * per run, not per block). The hardware prefetchers follow a stream while it is read, but
 * a run is read by its first register block and then reused from L1 by all the others,
 * so the stream pauses for a whole run's FMAs (64 row blocks of 256 rows), and the next
 * run's first block stalled on L3 or memory (a head's values are read again for each
 * query block, and a VM's L3 is shared with other tenants). Measured on a Zen 5 EPYC, the long shape (1, 8, 4096, 4096, 64), one
 * thread, perf samples against the FLOPs: P V in place 201-204 GFLOP/s without, 213-222
 * with (the core's FMA peak is 230); the call 0.989x in paired alternating runs, 0.990x on
 * two threads. The same prefetch of the scores' next key panel measured nothing, so there
 * is none. A prefetch never faults and changes no result. */
static inline __attribute__((always_inline)) void fa_mk_prefetch_lines(
    const void *next, ptrdiff_t first, ptrdiff_t last)
{
    for (ptrdiff_t l = first; l < last; l++)
        __builtin_prefetch((const char *)next + 64 * l, 0, 3);
}

#define FA_DEFINE_MICROKERNELS(T, SUFFIX)                                                  \
typedef T fa_mkv_##SUFFIX __attribute__((vector_size(FA_MK_VBYTES)));                      \
typedef T fa_mkvu_##SUFFIX __attribute__((vector_size(FA_MK_VBYTES), aligned(sizeof(T)))); \
enum { FA_MK_W_##SUFFIX = FA_MK_VBYTES / sizeof(T) };                                      \
                                                                                           \
/* s[r][j] = sum_t q[r][t] kp[t][j] for r < mr, j < NV W: one register block; kp is one  */ \
/* packed key panel (d x NV W, contiguous).                                              */ \
static inline __attribute__((always_inline)) void fa_mk_scores_block_##SUFFIX(             \
    const int mr, const T *q, ptrdiff_t d, const T *kp, T *s, ptrdiff_t ld)                \
{                                                                                          \
    enum { W = FA_MK_W_##SUFFIX, NV = FA_MK_SCORES_NV };                                   \
    fa_mkv_##SUFFIX c[8][NV];  /* mr <= 8 rows used */                                     \
    for (int r = 0; r < mr; r++)                                                           \
        for (int u = 0; u < NV; u++) c[r][u] = (fa_mkv_##SUFFIX){0};                       \
    for (ptrdiff_t t = 0; t < d; t++) {                                                    \
        fa_mkv_##SUFFIX b[NV];                                                             \
        for (int u = 0; u < NV; u++) b[u] = *(const fa_mkvu_##SUFFIX *)(kp + (t * NV + u) * W); \
        for (int r = 0; r < mr; r++) {                                                     \
            const fa_mkv_##SUFFIX a = FA_MK_BCAST_##SUFFIX(q + r * d + t);                 \
            for (int u = 0; u < NV; u++) c[r][u] += a * b[u];                              \
        }                                                                                  \
    }                                                                                      \
    for (int r = 0; r < mr; r++)                                                           \
        for (int u = 0; u < NV; u++) *(fa_mkvu_##SUFFIX *)(s + r * ld + u * W) = c[r][u];  \
}                                                                                          \
                                                                                           \
/* s[i][j] = sum_t q[i][t] k[j][t] for i < rows, j < n_cols (a multiple of FA_MK_KEYS):  */ \
/* q is (rows x d) row-major, kp the key block packed by fa_pack_keys, s has row stride  */ \
/* ld.                                                                                   */ \
static inline void fa_mk_scores_##SUFFIX(const T *q, ptrdiff_t rows, ptrdiff_t d,          \
                                         const T *kp, ptrdiff_t n_cols, T *s, ptrdiff_t ld) \
{                                                                                          \
    enum { MR = FA_MK_SCORES_MR, KR = FA_MK_SCORES_NV * FA_MK_W_##SUFFIX };                \
    for (ptrdiff_t j0 = 0; j0 < n_cols; j0 += KR) {                                        \
        const T *panel = kp + j0 * d;                                                      \
        ptrdiff_t i0 = 0;                                                                  \
        for (; i0 + MR <= rows; i0 += MR)                                                  \
            fa_mk_scores_block_##SUFFIX(MR, q + i0 * d, d, panel, s + i0 * ld + j0, ld);   \
        switch (rows - i0) {  /* the rows left over, as one block of their height */      \
        case 7: fa_mk_scores_block_##SUFFIX(7, q + i0 * d, d, panel, s + i0 * ld + j0, ld); break; \
        case 6: fa_mk_scores_block_##SUFFIX(6, q + i0 * d, d, panel, s + i0 * ld + j0, ld); break; \
        case 5: fa_mk_scores_block_##SUFFIX(5, q + i0 * d, d, panel, s + i0 * ld + j0, ld); break; \
        case 4: fa_mk_scores_block_##SUFFIX(4, q + i0 * d, d, panel, s + i0 * ld + j0, ld); break; \
        case 3: fa_mk_scores_block_##SUFFIX(3, q + i0 * d, d, panel, s + i0 * ld + j0, ld); break; \
        case 2: fa_mk_scores_block_##SUFFIX(2, q + i0 * d, d, panel, s + i0 * ld + j0, ld); break; \
        case 1: fa_mk_scores_block_##SUFFIX(1, q + i0 * d, d, panel, s + i0 * ld + j0, ld); break; \
        default: break;                                                                    \
        }                                                                                  \
    }                                                                                      \
}                                                                                          \
                                                                                           \
/* o[r][c] += sum_j p[r][j] vp[j][c] for r < mr, c < nv W: one register block; vp is one */ \
/* packed band of values (n_keys x nv W, contiguous), o already offset to its column.    */ \
static inline __attribute__((always_inline)) void fa_mk_pv_block_##SUFFIX(                 \
    const int mr, const int nv, const T *p, ptrdiff_t ld_p, const T *vp, ptrdiff_t n_keys, \
    ptrdiff_t d_v, T *o)                                                                   \
{                                                                                          \
    enum { W = FA_MK_W_##SUFFIX };                                                         \
    fa_mkv_##SUFFIX c[8][FA_MK_PV_NV];  /* mr <= 8 rows, nv <= NV vectors used */          \
    for (int r = 0; r < mr; r++)                                                           \
        for (int u = 0; u < nv; u++) c[r][u] = *(const fa_mkvu_##SUFFIX *)(o + r * d_v + u * W); \
    for (ptrdiff_t j = 0; j < n_keys; j++) {                                               \
        fa_mkv_##SUFFIX b[FA_MK_PV_NV];                                                    \
        for (int u = 0; u < nv; u++) b[u] = *(const fa_mkvu_##SUFFIX *)(vp + (j * nv + u) * W); \
        for (int r = 0; r < mr; r++) {                                                     \
            const fa_mkv_##SUFFIX a = FA_MK_BCAST_##SUFFIX(p + r * ld_p + j);              \
            for (int u = 0; u < nv; u++) c[r][u] += a * b[u];                              \
        }                                                                                  \
    }                                                                                      \
    for (int r = 0; r < mr; r++)                                                           \
        for (int u = 0; u < nv; u++) *(fa_mkvu_##SUFFIX *)(o + r * d_v + u * W) = c[r][u]; \
}                                                                                          \
                                                                                           \
/* One column band of nv vectors and a run of keys: every row, in blocks of MR and then  */ \
/* the rows left.                                                                        */ \
static inline __attribute__((always_inline)) void fa_mk_pv_run_##SUFFIX(                   \
    const int nv, const T *p, ptrdiff_t ld_p, ptrdiff_t rows, const T *v, ptrdiff_t n_keys, \
    ptrdiff_t d_v, T *o, const T *next, ptrdiff_t next_lines)                              \
{                                                                                          \
    enum { MR = FA_MK_PV_MR };                                                             \
    /* each full register block prefetches its share, per lines, of the next run */        \
    const ptrdiff_t blocks = rows / MR;                                                    \
    const ptrdiff_t per = next != NULL && blocks > 0 ? (next_lines + blocks - 1) / blocks : 0; \
    ptrdiff_t i0 = 0, line = 0;                                                            \
    for (; i0 + MR <= rows; i0 += MR, line += per) {                                       \
        fa_mk_prefetch_lines(next, line, line + per < next_lines ? line + per : next_lines); \
        fa_mk_pv_block_##SUFFIX(MR, nv, p + i0 * ld_p, ld_p, v, n_keys, d_v, o + i0 * d_v); \
    }                                                                                      \
    switch (rows - i0) {                                                                   \
    case 7: fa_mk_pv_block_##SUFFIX(7, nv, p + i0 * ld_p, ld_p, v, n_keys, d_v, o + i0 * d_v); break; \
    case 6: fa_mk_pv_block_##SUFFIX(6, nv, p + i0 * ld_p, ld_p, v, n_keys, d_v, o + i0 * d_v); break; \
    case 5: fa_mk_pv_block_##SUFFIX(5, nv, p + i0 * ld_p, ld_p, v, n_keys, d_v, o + i0 * d_v); break; \
    case 4: fa_mk_pv_block_##SUFFIX(4, nv, p + i0 * ld_p, ld_p, v, n_keys, d_v, o + i0 * d_v); break; \
    case 3: fa_mk_pv_block_##SUFFIX(3, nv, p + i0 * ld_p, ld_p, v, n_keys, d_v, o + i0 * d_v); break; \
    case 2: fa_mk_pv_block_##SUFFIX(2, nv, p + i0 * ld_p, ld_p, v, n_keys, d_v, o + i0 * d_v); break; \
    case 1: fa_mk_pv_block_##SUFFIX(1, nv, p + i0 * ld_p, ld_p, v, n_keys, d_v, o + i0 * d_v); break; \
    default: break;                                                                        \
    }                                                                                      \
}                                                                                          \
                                                                                           \
/* Where key j's values of the band at column c0 (nv vectors wide) are in the chunk      */ \
/* layout vp (see fa_pack_values).                                                       */ \
static inline __attribute__((always_inline)) const T *fa_mk_pv_at_##SUFFIX(               \
    const T *vp, ptrdiff_t j, ptrdiff_t c0, int nv, ptrdiff_t d_v)                         \
{                                                                                          \
    enum { CH = FA_MK_PV_CHUNK };                                                          \
    return vp + j / CH * CH * d_v + c0 * CH + j % CH * nv * FA_MK_W_##SUFFIX;              \
}                                                                                          \
                                                                                           \
/* The first run of the band at column c0 from key j, up to n keys: where it starts      */ \
/* (NULL if there is no such band or no key) and its cache lines in *lines.              */ \
static inline const T *fa_mk_pv_first_run_##SUFFIX(const T *vp, ptrdiff_t j, ptrdiff_t n,  \
                                                   ptrdiff_t c0, ptrdiff_t d_v,            \
                                                   ptrdiff_t *lines)                       \
{                                                                                          \
    enum { CH = FA_MK_PV_CHUNK, W = FA_MK_W_##SUFFIX, NV = FA_MK_PV_NV };                  \
    const int nv = c0 + NV * W <= d_v ? NV : 1;                                            \
    const ptrdiff_t keys = CH - j % CH < n ? CH - j % CH : n;                              \
    *lines = keys * nv * FA_MK_VBYTES / 64;                                                \
    return c0 < d_v && n > 0 ? fa_mk_pv_at_##SUFFIX(vp, j, c0, nv, d_v) : NULL;            \
}                                                                                          \
                                                                                           \
/* One column band of nv vectors at column c0, keys [j0, j0 + n_keys) of the chunk       */ \
/* layout vp: every row, in blocks of MR and then the rows left, for each run of the     */ \
/* band's keys within one chunk in turn, each run prefetching the next one, and the last */ \
/* `next` (next_lines lines: the next band's first run, or NULL).                        */ \
static inline __attribute__((always_inline)) void fa_mk_pv_band_##SUFFIX(                  \
    const int nv, const T *p, ptrdiff_t ld_p, ptrdiff_t rows, const T *vp, ptrdiff_t c0,   \
    ptrdiff_t j0, ptrdiff_t n_keys, ptrdiff_t d_v, T *o, const T *next_band,              \
    ptrdiff_t next_band_lines)                                                             \
{                                                                                          \
    enum { CH = FA_MK_PV_CHUNK };                                                          \
    const ptrdiff_t end = j0 + n_keys;                                                     \
    for (ptrdiff_t j = j0; j < end;) {                                                     \
        const ptrdiff_t j1 = (j / CH + 1) * CH < end ? (j / CH + 1) * CH : end;            \
        const T *next = next_band;                                                         \
        ptrdiff_t lines = next_band_lines;                                                 \
        if (j1 < end) {                                                                    \
            next = fa_mk_pv_at_##SUFFIX(vp, j1, c0, nv, d_v);                              \
            lines = (end - j1 < CH ? end - j1 : CH) * nv * FA_MK_VBYTES / 64;              \
        }                                                                                  \
        fa_mk_pv_run_##SUFFIX(nv, p + (j - j0), ld_p, rows,                                \
                              fa_mk_pv_at_##SUFFIX(vp, j, c0, nv, d_v), j1 - j, d_v,       \
                              o + c0, next, lines);                                        \
        j = j1;                                                                            \
    }                                                                                      \
}                                                                                          \
                                                                                           \
/* o[i][c] += sum_j p[i][j] v[j0 + j][c] for i < rows, j < n_keys, c < d_v (a multiple   */ \
/* of W): p has row stride ld_p, v is the chunk layout vp (fa_pack_values) counted from  */ \
/* its chunk 0, o (rows x d_v) row-major. Bands of NV vectors of columns, then of one    */ \
/* vector for the columns left. next_keys (>= 0): how many keys after the block are in   */ \
/* vp too (the next block's, whose first run is prefetched during this block's last).    */ \
static inline void fa_mk_pv_##SUFFIX(const T *p, ptrdiff_t ld_p, ptrdiff_t rows, const T *vp, \
                                     ptrdiff_t j0, ptrdiff_t n_keys, ptrdiff_t next_keys,  \
                                     ptrdiff_t d_v, T *o)                                  \
{                                                                                          \
    enum { W = FA_MK_W_##SUFFIX, NV = FA_MK_PV_NV };                                       \
    ptrdiff_t c0 = 0, lines;                                                               \
    const T *next;                                                                         \
    /* (nv a constant in each loop, so that each block compiles to its own unrolled loop) */ \
    for (; c0 + NV * W <= d_v; c0 += NV * W) {                                             \
        next = c0 + NV * W < d_v                                                           \
            ? fa_mk_pv_first_run_##SUFFIX(vp, j0, n_keys, c0 + NV * W, d_v, &lines)        \
            : fa_mk_pv_first_run_##SUFFIX(vp, j0 + n_keys, next_keys, 0, d_v, &lines);     \
        fa_mk_pv_band_##SUFFIX(NV, p, ld_p, rows, vp, c0, j0, n_keys, d_v, o, next, lines); \
    }                                                                                      \
    for (; c0 < d_v; c0 += W) {                                                            \
        next = c0 + W < d_v                                                                \
            ? fa_mk_pv_first_run_##SUFFIX(vp, j0, n_keys, c0 + W, d_v, &lines)             \
            : fa_mk_pv_first_run_##SUFFIX(vp, j0 + n_keys, next_keys, 0, d_v, &lines);     \
        fa_mk_pv_band_##SUFFIX(1, p, ld_p, rows, vp, c0, j0, n_keys, d_v, o, next, lines); \
    }                                                                                      \
}                                                                                          \
                                                                                           \
/* The chunk layout of a head's values, which fa_mk_pv reads: keys in chunks of          */ \
/* FA_MK_PV_CHUNK (one run), chunk c holding its keys' column bands one after another:   */ \
/* the band of columns [c0, c0 + bw) at c CH d_v + c0 CH, key jj of the chunk at + jj bw */ \
/* (bw = NV W, then W for the columns left). Each run then streams from one contiguous   */ \
/* piece rather than a line every d_v elements (whose cache sets alias when d_v is a     */ \
/* power of two). Where d_v is one band of NV W (float32 D 64 in the AVX-512 build),     */ \
/* this is v's own row-major layout, and v is read in place (fa_mk_values_in_place).      */ \
/* Chunks, not one block per tile, so that a head's values are packed once per thread    */ \
/* and serve every query block after it, whatever keys its tiles start at.               */ \
static inline int fa_mk_values_in_place_##SUFFIX(ptrdiff_t d_v)                           \
{                                                                                          \
    return d_v == FA_MK_PV_NV * FA_MK_W_##SUFFIX;                                          \
}                                                                                          \
                                                                                           \
/* vp (chunks c_lo <= c < c_hi of the layout, chunk c_lo first) = v's keys               */ \
/* [c_lo CH, min(n_keys, c_hi CH)) (v: n_keys x d_v, row-major; d_v a multiple of W).    */ \
static inline void fa_pack_values_##SUFFIX(const T *v, ptrdiff_t n_keys, ptrdiff_t d_v,   \
                                           T *vp, ptrdiff_t c_lo, ptrdiff_t c_hi)         \
{                                                                                          \
    enum { W = FA_MK_W_##SUFFIX, NV = FA_MK_PV_NV, CH = FA_MK_PV_CHUNK };                  \
    /* v is read row after row, once (a pass per band read every row d_v / bw times and */ \
    /* stalled on its misses); each copy is whole vectors (d_v is a multiple of W here): */ \
    /* explicit vector moves, since GCC turned the element loop into scalar moves and  */ \
    /* memcpy of a variable width into rep movsq.                                       */ \
    typedef fa_mkvu_##SUFFIX V;                                                            \
    const ptrdiff_t full = d_v / (NV * W) * (NV * W);                                      \
    const ptrdiff_t j_end = n_keys < c_hi * CH ? n_keys : c_hi * CH;                       \
    for (ptrdiff_t j = c_lo * CH; j < j_end; j++) {                                        \
        const T *row = v + j * d_v;                                                        \
        T *chunk = vp + (j / CH - c_lo) * CH * d_v;                                        \
        const ptrdiff_t jj = j % CH;                                                       \
        ptrdiff_t c0 = 0;                                                                  \
        for (; c0 < full; c0 += NV * W)                                                    \
            for (int c = 0; c < NV; c++)                                                   \
                *(V *)(chunk + c0 * CH + jj * NV * W + c * W) = *(const V *)(row + c0 + c * W); \
        for (; c0 < d_v; c0 += W)                                                          \
            *(V *)(chunk + c0 * CH + jj * W) = *(const V *)(row + c0);                     \
    }                                                                                      \
}                                                                                          \
                                                                                           \
/* kp = k (rows x d, row-major) in the panels fa_mk_scores reads: for each run of KR     */ \
/* keys, a contiguous (d x KR) panel, kp[j0 d + t KR + jj] = k[j0 + jj][t]; zero keys     */ \
/* from rows up to n_cols (a multiple of KR). Contiguous panels, not one transposed      */ \
/* (d x n_cols) matrix: with n_cols a power of two, its rows' cache sets alias, and the  */ \
/* scores kernel's loads missed L1 (BLIS packs its B panels for the same reason).       */ \
static inline void fa_pack_keys_##SUFFIX(const T *k, ptrdiff_t rows, ptrdiff_t d,          \
                                         T *kp, ptrdiff_t n_cols)                          \
{                                                                                          \
    enum { KR = FA_MK_SCORES_NV * FA_MK_W_##SUFFIX };                                      \
    enum { TB = FA_TRANSPOSE_##SUFFIX };  /* KR is a multiple of TB */                    \
    for (ptrdiff_t j0 = 0; j0 < n_cols; j0 += KR) {                                        \
        T *panel = kp + j0 * d;                                                            \
        const ptrdiff_t nb = rows - j0 < KR ? (rows - j0 > 0 ? rows - j0 : 0) : KR;        \
        ptrdiff_t jj0 = 0;                                                                 \
        if (d % TB == 0)  /* always, for the head sizes the micro-kernels take */          \
            for (; jj0 + TB <= nb; jj0 += TB)                                              \
                for (ptrdiff_t t = 0; t < d; t += TB)                                      \
                    fa_transpose_block_##SUFFIX(k + (j0 + jj0) * d + t, d,                 \
                                                panel + t * KR + jj0, KR);                 \
        for (ptrdiff_t t = 0; t < d; t++) {                                                \
            for (ptrdiff_t jj = jj0; jj < nb; jj++) panel[t * KR + jj] = k[(j0 + jj) * d + t]; \
            for (ptrdiff_t jj = nb; jj < KR; jj++) panel[t * KR + jj] = 0;                 \
        }                                                                                  \
    }                                                                                      \
}

_Static_assert(FA_MK_SCORES_MR <= 8 && FA_MK_PV_MR <= 8,
               "the left-over rows switch handles register blocks of up to 8 rows");

FA_DEFINE_MICROKERNELS(float, f)
FA_DEFINE_MICROKERNELS(double, d)

#else  /* no micro-kernels in this build: never called (FA_MICROKERNELS 0) */
#define FA_MICROKERNELS 0
#define FA_MK_VBYTES 0
#define FA_MK_KEYS 1
#define FA_MK_PV_CHUNK 1
#define FA_DEFINE_MICROKERNEL_STUBS(T, SUFFIX)                                             \
static inline void fa_mk_scores_##SUFFIX(const T *q, ptrdiff_t rows, ptrdiff_t d,          \
                                         const T *kt, ptrdiff_t n_cols, T *s, ptrdiff_t ld) \
{ (void)q; (void)rows; (void)d; (void)kt; (void)n_cols; (void)s; (void)ld; }               \
static inline void fa_mk_pv_##SUFFIX(const T *p, ptrdiff_t ld_p, ptrdiff_t rows, const T *vp, \
                                     ptrdiff_t j0, ptrdiff_t n_keys, ptrdiff_t next_keys,  \
                                     ptrdiff_t d_v, T *o)                                  \
{ (void)p; (void)ld_p; (void)rows; (void)vp; (void)j0; (void)n_keys; (void)next_keys;      \
  (void)d_v; (void)o; }                                                                    \
static inline int fa_mk_values_in_place_##SUFFIX(ptrdiff_t d_v) { (void)d_v; return 1; }   \
static inline void fa_pack_keys_##SUFFIX(const T *k, ptrdiff_t rows, ptrdiff_t d,          \
                                         T *kp, ptrdiff_t n_cols)                          \
{ (void)k; (void)rows; (void)d; (void)kp; (void)n_cols; }                                  \
static inline void fa_pack_values_##SUFFIX(const T *v, ptrdiff_t n_keys, ptrdiff_t d_v,   \
                                           T *vp, ptrdiff_t c_lo, ptrdiff_t c_hi)         \
{ (void)v; (void)n_keys; (void)d_v; (void)vp; (void)c_lo; (void)c_hi; }
FA_DEFINE_MICROKERNEL_STUBS(float, f)
FA_DEFINE_MICROKERNEL_STUBS(double, d)
#endif

#endif

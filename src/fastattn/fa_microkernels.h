/* Micro-kernels for the two GEMMs of an attention tile, in the AVX2 and AVX-512 builds, for
 * float32 and float64: s = Q K^T (queries against a packed key block) and o += P V (a packed
 * value block).
 * The baseline build has none (FA_MICROKERNELS 0) and its tiles call BLAS. Whether a tile
 * uses them is the compiled policy's rule (_use_micro in _k_policy.pxi). The kernels of
 * one dtype are in fa_mk_kernels.h, included below once per dtype.
 *
 * Design, after BLIS's haswell/skx kernels: an MR x NV register block of accumulators
 * (NV vectors of W lanes across, MR rows down) is updated once per step of the inner
 * dimension by NV contiguous vector loads and MR scalar broadcasts taken straight from
 * memory (vbroadcastss/sd m, a load-port op). Several blocks are compiled per build (the
 * list below); the defaults, AVX2 6 x 2 (12 accumulators, 2 loads, 1 broadcast: 15
 * registers) and AVX-512 scores 8 x 2, P V 4 x 4 (16 accumulators), were tuned on EPYCs:
 * 12-16 independent FMA chains cover the FMA latency (4-5 cycles) x 2 FMA ports of AMD's
 * cores, while Intel's best kernels hold 24-28 (BLIS skx, OpenBLAS SkylakeX), so which
 * runs is chosen per machine (`python -m fastattn tune`), and all give the same bits. Broadcasting as `(vec){0} + x` instead costs a scalar add and a register
 * broadcast per row and step, which on Intel compete with the FMAs for ports 0 and 5.
 * Rows left over from MR run in a block of their own height (a switch on a constant, so
 * each height compiles to its own unrolled loop), never one row at a time. Against BLAS,
 * they spare the re-packing of each key and value block per tile call. */
#ifndef FASTATTN_MICROKERNELS_H
#define FASTATTN_MICROKERNELS_H

/* P V runs over the keys in runs of at most this many bytes of a value band (64 keys of a
 * 64-float band in the AVX-512 build, 256 of a 16-float band in the AVX2 build), each run
 * for every row block before the next: the run stays in L1 while the row blocks stream P
 * past it, as BLIS keeps its kc x nr panel of B in L1. Without runs each row block read the
 * whole band of the tile (128 KiB at 512 keys and D 64) from L2: 32 bytes per cycle at the
 * FMA peak, near all that Intel's cores sustain. With runs, P V reads P once from L2, and
 * the accumulators are loaded and stored once per run (32 of each per 1024 FMAs); each
 * output still sums its keys in order. */
#ifndef FA_MK_PV_KC_BYTES
#define FA_MK_PV_KC_BYTES 16384
#endif

#include <stddef.h>

#include "fa_simd.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define FA_MICROKERNELS 1

#define FA_MK_VBYTES FA_VBYTES
/* The register blocks compiled, as X(rows MR, vectors NV), the first the build's default
 * (a block's index is its place in the list); which one a call runs is the policy's (mk_scores_f/d, mk_pv_f/d: the tuning
 * file, the CPU table in fastattn._plan, or FASTATTN_MK). The packed layouts do not depend
 * on the block: keys in panels of FA_MK_SCORES_NV vectors (a block of more vectors spans
 * whole panels), values in bands of FA_MK_PV_NV vectors (a block of fewer runs each part
 * of the band in turn). AVX-512 has 32 registers: up to 28 accumulators beside the NV
 * loads and a broadcast (14 x 2 for the scores, after BLIS's skx kernels' 24-28; 6 x 4
 * for P V). AVX2 has 16: up to 12. */
#if defined(__AVX512F__)
#define FA_MK_SCORES_NV 2
#define FA_MK_PV_NV 4
#define FA_MK_SCORES_BLOCKS(X) X(8, 2) X(12, 2) X(14, 2) X(6, 4)
#define FA_MK_PV_BLOCKS(X) X(4, 4) X(8, 2) X(6, 4) X(12, 2)
#define FA_MK_BCAST_f(p) ((fa_mkv_f)_mm512_set1_ps(*(p)))
#define FA_MK_BCAST_d(p) ((fa_mkv_d)_mm512_set1_pd(*(p)))
#else
#define FA_MK_SCORES_NV 2
#define FA_MK_PV_NV 2
#define FA_MK_SCORES_BLOCKS(X) X(6, 2) X(4, 2) X(12, 1)
#define FA_MK_PV_BLOCKS(X) X(6, 2) X(4, 2) X(12, 1)
#define FA_MK_BCAST_f(p) ((fa_mkv_f)_mm256_broadcast_ss(p))
#define FA_MK_BCAST_d(p) ((fa_mkv_d)_mm256_broadcast_sd(p))
#endif
/* The largest block's rows and vectors (the accumulator arrays' bounds). */
#define FA_MK_MAX_MR 14
#define FA_MK_MAX_NV 4

/* The blocks' indices (FA_MK_SCORES_8x2 = 0, ...), counts and shapes, for the kernels'
 * switches, the policy's checks and the probe's names. */
#define FA_MK_S_ENUM_(mr, nv) FA_MK_SCORES_##mr##x##nv,
#define FA_MK_P_ENUM_(mr, nv) FA_MK_PV_##mr##x##nv,
enum { FA_MK_SCORES_BLOCKS(FA_MK_S_ENUM_) FA_MK_SCORES_N };
enum { FA_MK_PV_BLOCKS(FA_MK_P_ENUM_) FA_MK_PV_N };
#undef FA_MK_S_ENUM_
#undef FA_MK_P_ENUM_
#define FA_MK_ROWS_(mr, nv) mr,
#define FA_MK_VECS_(mr, nv) nv,
static const int fa_mk_scores_mr[] = {FA_MK_SCORES_BLOCKS(FA_MK_ROWS_)};
static const int fa_mk_scores_nv[] = {FA_MK_SCORES_BLOCKS(FA_MK_VECS_)};
static const int fa_mk_pv_mr[] = {FA_MK_PV_BLOCKS(FA_MK_ROWS_)};
static const int fa_mk_pv_nv[] = {FA_MK_PV_BLOCKS(FA_MK_VECS_)};
#undef FA_MK_ROWS_
#undef FA_MK_VECS_

/* Keys per chunk of the values' layout, and per run of P V: FA_MK_PV_KC_BYTES of a band of
 * FA_MK_PV_NV vectors (a band of one vector, for the columns left over, runs as long). */
#define FA_MK_PV_CHUNK (FA_MK_PV_KC_BYTES / (FA_MK_PV_NV * FA_MK_VBYTES))

/* Keys per score block: the key block is packed and padded with zero keys to a
 * multiple of this (the widest score block, float32's). */
#define FA_MK_KEYS (FA_MK_SCORES_NV * FA_MK_VBYTES / 4)

/* Packing keys is a transpose (key j, dimension t) -> (t, j). Element by element it was a
 * scalar load and store per key element, repeated for every query block: 5-6% of the
 * long attention shape. These move an 8 x 8 (float) or 4 x 4
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
 * share of the run's cache lines into L1 (the share is computed once per run, not per
 * block). The hardware prefetchers follow a stream while it is read, but a run is read by
 * its first register block and then reused from L1 by all the others, so the stream
 * pauses for a whole run's FMAs, and the next run's first block stalled on L3 or memory:
 * P V in place went from 88% to 95% of a core's FMA peak. (The same prefetch of the
 * scores' next key panel measured nothing, so there is none.) A prefetch never faults and
 * changes no result. */
static inline __attribute__((always_inline)) void fa_mk_prefetch_lines(
    const void *next, ptrdiff_t first, ptrdiff_t last)
{
    for (ptrdiff_t l = first; l < last; l++)
        __builtin_prefetch((const char *)next + 64 * l, 0, 3);
}

/* What the kernels rely on: every block's rows <= FA_MK_MAX_MR <= 14 (the left-over
 * split's bound), a scores block's vectors dividing FA_MK_SCORES_NV or whole panels of it,
 * a P V block's dividing FA_MK_PV_NV. */
#define FA_MK_CHECK_SCORES_(mr, nv)                                                        \
    _Static_assert((mr) >= 1 && (mr) <= FA_MK_MAX_MR                                       \
                   && (nv) <= FA_MK_MAX_NV && (FA_MK_SCORES_NV % (nv) == 0                  \
                                               || (nv) % FA_MK_SCORES_NV == 0),             \
                   "scores block " #mr "x" #nv);
#define FA_MK_CHECK_PV_(mr, nv)                                                            \
    _Static_assert((mr) >= 1 && (mr) <= FA_MK_MAX_MR                                       \
                   && FA_MK_PV_NV % (nv) == 0, "P V block " #mr "x" #nv);
FA_MK_SCORES_BLOCKS(FA_MK_CHECK_SCORES_)
FA_MK_PV_BLOCKS(FA_MK_CHECK_PV_)
#undef FA_MK_CHECK_SCORES_
#undef FA_MK_CHECK_PV_

#else  /* no micro-kernels in this build: never called (FA_MICROKERNELS 0) */
#define FA_MICROKERNELS 0
#define FA_MK_VBYTES 0
#define FA_MK_KEYS 1
#define FA_MK_PV_CHUNK 1
#define FA_MK_PV_NV 1
#define FA_MK_SCORES_NV 1
static const int fa_mk_scores_mr[] = {0};
static const int fa_mk_scores_nv[] = {0};
static const int fa_mk_pv_mr[] = {0};
static const int fa_mk_pv_nv[] = {0};
enum { FA_MK_SCORES_N = 0, FA_MK_PV_N = 0 };
#endif

/* The rows left over from a register block of MR rows (fewer than MR <= 14), as blocks of
 * at most 7 rows, each of its height (a switch on constants: each height compiles to its
 * own unrolled loop), never one row at a time; block(h, ...) runs h rows from the
 * caller's row i0, which advances past them. Shared by both kernels and dtypes. */
#define FA_MK_LEFTOVER(block, left, ...)                                         \
    for (int h_left_ = (left), h_; h_left_ > 0; h_left_ -= h_) {                \
        h_ = h_left_ <= 7 ? h_left_ : (h_left_ + 1) / 2;                        \
        switch (h_) {                                                            \
        case 7: block(7, __VA_ARGS__); break;                                    \
        case 6: block(6, __VA_ARGS__); break;                                    \
        case 5: block(5, __VA_ARGS__); break;                                    \
        case 4: block(4, __VA_ARGS__); break;                                    \
        case 3: block(3, __VA_ARGS__); break;                                    \
        case 2: block(2, __VA_ARGS__); break;                                    \
        default: block(1, __VA_ARGS__); break;                                   \
        }                                                                        \
        i0 += h_;                                                                \
    }

/* Identifiers of one dtype's micro-kernels: FA_FN(fa_mk_scores_) is fa_mk_scores_f where
 * FA_SFX is f. */
#define FA_PASTE2(a, b) a##b
#define FA_PASTE(a, b) FA_PASTE2(a, b)
#define FA_FN(name) FA_PASTE(name, FA_SFX)

#define FA_T float
#define FA_SFX f
#include "fa_mk_kernels.h"
#undef FA_T
#undef FA_SFX
#define FA_T double
#define FA_SFX d
#include "fa_mk_kernels.h"
#undef FA_T
#undef FA_SFX


#endif

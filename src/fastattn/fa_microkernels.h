/* Micro-kernels for the two GEMMs of a float32 attention tile, in the AVX-512 build.
 * Measured on an AMD EPYC (one thread, 64 tiles of 256 queries x 512 keys x
 * D 64): OpenBLAS sgemm 98.5 GFLOP/s for the scores and 93.0 for P V (its AVX2 kernels,
 * as that machine set OPENBLAS_CORETYPE=Haswell); these 169.5 and 202.9. Elsewhere the kernels
 * call BLAS and these compile to nothing (FA_MICROKERNELS 0). Whether a tile uses them
 * is decided in Python (fastattn._plan.use_microkernels) and handed to the kernel. */
#ifndef FASTATTN_MICROKERNELS_H
#define FASTATTN_MICROKERNELS_H

#include <stddef.h>

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

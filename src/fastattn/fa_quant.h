/* Quantizing keys and values for the 8-bit caches (fastattn.cache, storage="int8" or
 * "float8_e4m3"): x scaled so that its largest magnitude is the format's (127; 448), then
 * rounded to nearest even (int8: rint; e4m3: fa_f32_to_f8). The scale kept beside the bytes
 * is largest / 127 (int8), or largest / 448 * 256 (e4m3, whose widening in fa_decode.h
 * yields 1/256 of the value); the value a byte stands for is its number times the scale.
 *  - keys: one scale per channel over a group of rows (fa_quant_cols): a few channels of
 *    real models' keys are ten times the others, and a scale per token would leave the
 *    others a few steps of the format;
 *  - values: one scale per row (fa_quant_rows).
 * Both return 1 (with what they wrote meaningless) when x holds NaN or inf, else 0. The
 * multipliers are computed in double, so that a subnormal largest magnitude cannot
 * overflow them. */
#ifndef FASTATTN_QUANT_H
#define FASTATTN_QUANT_H

#include <float.h>
#include "fa_convert.h"

static inline double fa_quant_max(int kind) { return kind == FA_SRC_I8 ? 127.0 : 448.0; }
static inline float fa_quant_scale(int kind, float largest)
{
    return kind == FA_SRC_I8 ? (float)(largest / 127.0) : (float)(largest / 1.75);
}

/* Row r of x times mul[c] (or *mul with mul_stride 0), rounded, into q. */
static inline void fa_quant_row(const float *x, ptrdiff_t d, const double *mul,
                                ptrdiff_t mul_stride, int kind, void *q)
{
    if (kind == FA_SRC_I8) {
        int8_t *qi = (int8_t *)q;
        for (ptrdiff_t c = 0; c < d; c++)
            qi[c] = (int8_t)__builtin_rint(x[c] * mul[c * mul_stride]);
    } else {
        uint8_t *qf = (uint8_t *)q;
        for (ptrdiff_t c = 0; c < d; c++)
            qf[c] = fa_f32_to_f8((float)(x[c] * mul[c * mul_stride]));
    }
}

/* rows x d at x (rows x_stride apart) into q (rows d apart), one scale per channel;
 * mul: scratch of d doubles. */
static inline int fa_quant_cols(const float *x, ptrdiff_t rows, ptrdiff_t d, ptrdiff_t x_stride,
                                int kind, void *q, float *scale, double *mul)
{
    float bad = 0;
    for (ptrdiff_t c = 0; c < d; c++) scale[c] = 0;
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t c = 0; c < d; c++) {
            const float a = fabsf(x[r * x_stride + c]);
            bad += a * 0.0f;  /* NaN when a is inf or NaN */
            scale[c] = a > scale[c] ? a : scale[c];
        }
    if (bad != 0 || bad != bad) return 1;
    for (ptrdiff_t c = 0; c < d; c++) {
        mul[c] = scale[c] > 0 ? fa_quant_max(kind) / scale[c] : 0;
        scale[c] = fa_quant_scale(kind, scale[c]);
    }
    for (ptrdiff_t r = 0; r < rows; r++)
        fa_quant_row(x + r * x_stride, d, mul, 1, kind, (char *)q + r * d);
    return 0;
}

/* rows x d at x (rows x_stride apart) into q (rows d apart), one scale per row. */
static inline int fa_quant_rows(const float *x, ptrdiff_t rows, ptrdiff_t d, ptrdiff_t x_stride,
                                int kind, void *q, float *scale)
{
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float largest = 0, bad = 0;
        for (ptrdiff_t c = 0; c < d; c++) {
            const float a = fabsf(xr[c]);
            bad += a * 0.0f;
            largest = a > largest ? a : largest;
        }
        if (bad != 0 || bad != bad) return 1;
        const double mul = largest > 0 ? fa_quant_max(kind) / largest : 0;
        scale[r] = fa_quant_scale(kind, largest);
        fa_quant_row(xr, d, &mul, 0, kind, (char *)q + r * d);
    }
    return 0;
}

#endif

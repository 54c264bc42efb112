/* 16-bit floating-point numbers to and from float32, one element at a time, written so
 * that GCC vectorises loops over them: bfloat16 (the top half of a float32) and IEEE
 * float16 (through the compiler's _Float16 where it has one: F16C's vcvtph2ps/vcvtps2ph in
 * the AVX2 and AVX-512 builds; else exact software). Rounding is to nearest even; NaN
 * stays a (quiet) NaN; float16 overflows to inf. Shared by the decoding kernel
 * (fa_decode.h) and the fused kernel's 16-bit tiles (fa_lowp.h). */
#ifndef FASTATTN_CONVERT_H
#define FASTATTN_CONVERT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* What an array holds, for the kernels that take several: bfloat16 or float16 bits,
 * float32, int8 or float8 e4m3 bits (the 8-bit kinds with scales, see fa_quant.h). */
enum { FA_SRC_BF16 = 1, FA_SRC_F16 = 2, FA_SRC_F32 = 3, FA_SRC_I8 = 4, FA_SRC_F8 = 5 };

static inline float fa_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* (A select, not a branch, so that loops over it vectorise.) */
static inline uint16_t fa_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40u) : rounded;
}

#if defined(__FLT16_MAX__) && (defined(__x86_64__) || defined(__aarch64__))
static inline float fa_f16_to_f32(uint16_t h)
{
    _Float16 x;
    memcpy(&x, &h, 2);
    return (float)x;
}
static inline uint16_t fa_f32_to_f16(float f)
{
    _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, 2);
    return h;
}
#else
static inline float fa_f16_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t u;
    float f;
    if (e == 0x1f) {
        u = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) {  /* zero or subnormal: m 2^-24, exact in float32 */
        f = (float)m * 5.9604644775390625e-08f;
        return sign ? -f : f;
    } else {
        u = sign | ((e + 112u) << 23) | (m << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t fa_f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;
    if (a >= 0x477ff000u) return sign | 0x7c00u;  /* >= 65520: rounds to inf */
    if (a < 0x38800000u) {  /* below 2^-14: a subnormal (or zero) float16, m 2^-24 */
        float x;
        memcpy(&x, &a, 4);
        return sign | (uint16_t)lrintf(x * 16777216.0f);  /* exact scaling, then RNE */
    }
    uint32_t h = a - (112u << 23);
    return sign | (uint16_t)((h + 0xfffu + ((h >> 13) & 1u)) >> 13);
}
#endif

/* dst[i] = src[i] scale for n float16 numbers: whole vectors through F16C (GCC 12 does not
 * vectorise the _Float16 conversion of a loop itself), the rest one by one. */
#if defined(__F16C__)
#include <immintrin.h>
#endif
static inline void fa_f16_run_to_f32(const uint16_t *src, ptrdiff_t n, float scale, float *dst)
{
    ptrdiff_t i = 0;
#if defined(__AVX512F__)
    const __m512 s16 = _mm512_set1_ps(scale);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_mul_ps(
            _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))), s16));
#endif
#if defined(__F16C__)
    const __m256 s8 = _mm256_set1_ps(scale);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))), s8));
#endif
    for (; i < n; i++) dst[i] = fa_f16_to_f32(src[i]) * scale;
}

/* float8 e4m3 (OCP's E4M3FN: sign, 4 exponent bits of bias 7, 3 mantissa bits; no
 * infinities; largest 448). Its bits moved into a float16's (exponent field and mantissa
 * shifted by 7) make a float16 of exactly 1/256 its value, subnormals included: the
 * decoding kernel widens them with F16C and puts the 256 into the scales. */
static inline uint16_t fa_f8_to_f16_scaled(uint8_t b)
{
    return (uint16_t)(((b & 0x80u) << 8) | ((b & 0x7fu) << 7));
}
static inline float fa_f8_to_f32(uint8_t b)
{
    return fa_f16_to_f32(fa_f8_to_f16_scaled(b)) * 256.0f;
}
/* x (finite, |x| <= 448) to nearest e4m3, ties to even: below 2^-6 in steps of 2^-9
 * (subnormals; 8 steps is the smallest normal, whose code is 8), else the float32's
 * exponent and top 3 mantissa bits, rounded on the bits below (a carry moves to the next
 * binade). A select, not a branch, so that loops over it vectorise. */
static inline uint8_t fa_f32_to_f8(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint32_t a = u & 0x7fffffffu;
    float ax;
    memcpy(&ax, &a, 4);
    const uint32_t sub = (uint32_t)(int32_t)__builtin_rintf(ax * 512.0f);
    const uint32_t normal = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
    return (uint8_t)(((u >> 24) & 0x80u) | (a < 0x3c800000u ? sub : normal));
}

#endif

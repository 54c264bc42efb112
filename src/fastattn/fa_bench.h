/* The machine's own ceilings, for `python -m fastattn bench`: the FMA peak of this build's
 * instruction set and the read bandwidth of a buffer. Nothing in the library calls these.
 *
 * FMA peak: FA_FMA_CHAINS independent chains of vector FMAs (the widest vectors of the
 * build), enough to cover FMA latency x FMA ports on current x86 cores (4-5 cycles x 2
 * ports: 8-10 chains in flight), with operands that stay finite and normal. Read
 * bandwidth: a sum over the buffer with FA_READ_CHAINS vector accumulators, so that
 * neither the add latency nor the compiler's reassociation rules bound it. */
#ifndef FASTATTN_BENCH_H
#define FASTATTN_BENCH_H

#include <stddef.h>

#include "fa_simd.h"
#define FA_FMA_CHAINS 12
#define FA_READ_CHAINS 8

#define FA_DEFINE_BENCH(T, SUFFIX)                                                        \
typedef T fa_bv_##SUFFIX __attribute__((vector_size(FA_VBYTES)));                    \
typedef T fa_bvu_##SUFFIX __attribute__((vector_size(FA_VBYTES), aligned(sizeof(T)))); \
/* n_iter steps of FA_FMA_CHAINS vector FMAs; returns a value that depends on them all,  */ \
/* so the compiler cannot drop the loop. Floating-point operations: 2 x lanes x chains   */ \
/* x n_iter (fa_fma_flops_per_iter).                                                      */ \
static inline T fa_fma_loop_##SUFFIX(ptrdiff_t n_iter, T seed)                            \
{                                                                                          \
    fa_bv_##SUFFIX acc[FA_FMA_CHAINS];                                                     \
    const fa_bv_##SUFFIX a = (fa_bv_##SUFFIX){0} + (T)0.999999;                            \
    const fa_bv_##SUFFIX b = (fa_bv_##SUFFIX){0} + (T)1e-7;                                \
    for (int c = 0; c < FA_FMA_CHAINS; c++) acc[c] = (fa_bv_##SUFFIX){0} + seed + (T)c;    \
    for (ptrdiff_t i = 0; i < n_iter; i++) {                                               \
        for (int c = 0; c < FA_FMA_CHAINS; c++) acc[c] = acc[c] * a + b;                   \
    }                                                                                      \
    T total = 0;                                                                           \
    for (int c = 0; c < FA_FMA_CHAINS; c++)                                                \
        for (int u = 0; u < (int)(FA_VBYTES / sizeof(T)); u++) total += acc[c][u];   \
    return total;                                                                          \
}                                                                                          \
/* The sum of x[0:n] (n a multiple of lanes x FA_READ_CHAINS), read once.                */ \
static inline T fa_read_sum_##SUFFIX(const T *x, ptrdiff_t n)                             \
{                                                                                          \
    enum { W = FA_VBYTES / sizeof(T) };                                              \
    fa_bv_##SUFFIX acc[FA_READ_CHAINS];                                                    \
    for (int c = 0; c < FA_READ_CHAINS; c++) acc[c] = (fa_bv_##SUFFIX){0};                 \
    for (ptrdiff_t i = 0; i + W * FA_READ_CHAINS <= n; i += W * FA_READ_CHAINS)            \
        for (int c = 0; c < FA_READ_CHAINS; c++)                                           \
            acc[c] += *(const fa_bvu_##SUFFIX *)(x + i + c * W);                           \
    T total = 0;                                                                           \
    for (int c = 0; c < FA_READ_CHAINS; c++)                                               \
        for (int u = 0; u < W; u++) total += acc[c][u];                                    \
    return total;                                                                          \
}

FA_DEFINE_BENCH(float, f)
FA_DEFINE_BENCH(double, d)

/* Floating-point operations per iteration of fa_fma_loop_f/_d. */
static inline ptrdiff_t fa_fma_flops_per_iter(size_t item)
{
    return 2 * (ptrdiff_t)(FA_VBYTES / item) * FA_FMA_CHAINS;
}

#endif

/* Platform glue for the kernels: the OpenMP queries (which must still link in a build
 * without OpenMP), the facts of this build that build_info() reports, and the sanitizer
 * check of BLAS operands. Nothing here computes attention. CPU detection lives in
 * fa_cpu.h, used by the _cpu probe module alone. */
#ifndef FASTATTN_PLATFORM_H
#define FASTATTN_PLATFORM_H

#include <stddef.h>

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

#ifndef FASTATTN_DEBUG_BUILD
#define FASTATTN_DEBUG_BUILD 0
#endif
static const int fa_debug_build = FASTATTN_DEBUG_BUILD;

#endif

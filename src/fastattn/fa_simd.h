/* The vector width of this build, in bytes, defined once for every kernel header: 64 with
 * AVX-512, 32 with AVX (the AVX2 build), 16 (SSE2, the x86-64 baseline) otherwise. */
#ifndef FASTATTN_SIMD_H
#define FASTATTN_SIMD_H

#if defined(__AVX512F__)
#define FA_VBYTES 64
#elif defined(__AVX__)
#define FA_VBYTES 32
#else
#define FA_VBYTES 16
#endif

#endif

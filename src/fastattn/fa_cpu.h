/* CPU features, for choosing a kernel build at import (_cpu.pyx; the table of builds is
 * _isa.py). Compiled with the baseline flags only, so that it runs on every x86-64 CPU.
 * GCC's __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 register
 * state (XGETBV), not just CPUID. */
#ifndef FASTATTN_CPU_H
#define FASTATTN_CPU_H

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
static inline int fa_cpu_has_avx2_fma(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
static inline int fa_cpu_has_avx512(void)
{
    __builtin_cpu_init();
    return fa_cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl");
}
#else
static inline int fa_cpu_has_avx2_fma(void) { return 0; }
static inline int fa_cpu_has_avx512(void) { return 0; }
#endif

#endif

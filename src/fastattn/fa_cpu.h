/* CPU features, for choosing a kernel build at import (_cpu.pyx; the table of builds is
 * _isa.py), and the CPU's identity, which keys the tuning file (fastattn._tuning).
 * Compiled with the baseline flags only, so that it runs on every x86-64 CPU.
 * GCC's __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 register
 * state (XGETBV), not just CPUID. */
#ifndef FASTATTN_CPU_H
#define FASTATTN_CPU_H

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <cpuid.h>
#include <string.h>

/* The vendor string (12 characters and a NUL) and the display family, model and stepping
 * of CPUID leaf 1 (family and model with their extended fields, as Intel and AMD both
 * define them: the numbers lscpu and /proc/cpuinfo show). 0 if CPUID has no leaf 1. */
static inline int fa_cpu_signature(char vendor[13], int *family, int *model, int *stepping)
{
    unsigned int a, b, c, d;
    vendor[0] = 0;
    *family = *model = *stepping = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
    memcpy(vendor, &b, 4);
    memcpy(vendor + 4, &d, 4);
    memcpy(vendor + 8, &c, 4);
    vendor[12] = 0;
    if (a < 1 || !__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int base_family = (a >> 8) & 0xf, base_model = (a >> 4) & 0xf;
    *family = base_family == 0xf ? base_family + ((a >> 20) & 0xff) : base_family;
    *model = base_family == 0x6 || base_family == 0xf ? base_model + (((a >> 16) & 0xf) << 4)
                                                      : base_model;
    *stepping = a & 0xf;
    return 1;
}
static inline int fa_cpu_has_avx2_fma(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c");
}
static inline int fa_cpu_has_avx512(void)
{
    __builtin_cpu_init();
    return fa_cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl");
}
#else
static inline int fa_cpu_signature(char vendor[13], int *family, int *model, int *stepping)
{
    vendor[0] = 0;
    *family = *model = *stepping = 0;
    return 0;
}
static inline int fa_cpu_has_avx2_fma(void) { return 0; }
static inline int fa_cpu_has_avx512(void) { return 0; }
#endif

#endif

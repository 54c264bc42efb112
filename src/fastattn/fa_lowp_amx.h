/* The AMX engine of fa_lowp.h: the tile operations behind one small layer, native (Intel
 * AMX-BF16, AVX-512 build only) or a portable C emulation of them (every build), and the
 * kernels written once over that layer (fa_lowp_amx_kernels.h, included once per kind).
 *
 * Tiles, one configuration for both kernels (palette 1, every tile 16 rows x 64 bytes):
 * 0-3 the 2 x 2 float32 accumulators C (16 x 16 each), 4-5 two A operands (16 rows x 32
 * bfloat16), 6-7 two B operands (16 pair rows x 16 pairs). A block of 32 x 32 outputs per
 * step: 4 tdpbf16ps for 4 tile loads.
 *
 * Linux gives a process the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM,
 * XFEATURE_XTILEDATA); without it the first tile instruction kills the process. The
 * native engine is therefore chosen only after fa_amx_selftest: the CPU says AMX-BF16, the
 * request is granted, and a known product on the tiles equals the emulation's. Each
 * thread loads the configuration at the start of a work item and releases it at the end
 * (fa_amx_begin, fa_amx_end). */
#ifndef FASTATTN_LOWP_AMX_H
#define FASTATTN_LOWP_AMX_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* --------------------------------------------------------------------------- emulation
 * tdpbf16ps as Intel's pseudo-code states it: for each row m, pair k and column n, the
 * even product then the odd one are added to C in float32 (a product of two bfloat16 is
 * exact in float32). (The hardware also flushes subnormals to zero; the fused kernel's
 * tests bound errors, not bits, across engines.) */
typedef struct { unsigned char t[8][16][64]; } fa_emu_tiles;
static __thread fa_emu_tiles fa_emu;

static inline void fa_emu_load(int t, const void *p, ptrdiff_t stride)
{
    for (int r = 0; r < 16; r++) memcpy(fa_emu.t[t][r], (const char *)p + r * stride, 64);
}
static inline void fa_emu_store(int t, void *p, ptrdiff_t stride)
{
    for (int r = 0; r < 16; r++) memcpy((char *)p + r * stride, fa_emu.t[t][r], 64);
}
static inline void fa_emu_zero(int t) { memset(fa_emu.t[t], 0, sizeof fa_emu.t[t]); }
static inline float fa_emu_bf(const unsigned char *row, int i)
{
    uint16_t h;
    memcpy(&h, row + 2 * i, 2);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline void fa_emu_dpbf16(int c, int a, int b)
{
    for (int m = 0; m < 16; m++) {
        float acc[16];
        memcpy(acc, fa_emu.t[c][m], 64);
        for (int k = 0; k < 16; k++)
            for (int n = 0; n < 16; n++) {
                acc[n] += fa_emu_bf(fa_emu.t[a][m], 2 * k) * fa_emu_bf(fa_emu.t[b][k], 2 * n);
                acc[n] += fa_emu_bf(fa_emu.t[a][m], 2 * k + 1) * fa_emu_bf(fa_emu.t[b][k], 2 * n + 1);
            }
        memcpy(fa_emu.t[c][m], acc, 64);
    }
}

#define FA_TILE_ZERO(t) fa_emu_zero(t)
#define FA_TILE_LOAD(t, p, stride) fa_emu_load(t, p, stride)
#define FA_TILE_STORE(t, p, stride) fa_emu_store(t, p, stride)
#define FA_TILE_DP(c, a, b) fa_emu_dpbf16(c, a, b)
#define FA_AMX_FN(name) name##amx_emu
#include "fa_lowp_amx_kernels.h"
#undef FA_TILE_ZERO
#undef FA_TILE_LOAD
#undef FA_TILE_STORE
#undef FA_TILE_DP
#undef FA_AMX_FN

/* --------------------------------------------------------------------------- native */

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) \
    && __GNUC__ >= 11 && defined(__AVX512F__)
#define FA_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")
/* GCC's tile intrinsics are asm statements that do not tell the compiler they read or
 * write memory: the barriers keep packing before a load and reading after a store. */
#define FA_AMX_BARRIER() __asm__ __volatile__("" ::: "memory")
#define FA_TILE_ZERO(t) _tile_zero(t)
#define FA_TILE_LOAD(t, p, stride) do { FA_AMX_BARRIER(); _tile_loadd(t, p, stride); } while (0)
#define FA_TILE_STORE(t, p, stride) do { _tile_stored(t, p, stride); FA_AMX_BARRIER(); } while (0)
#define FA_TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#define FA_AMX_FN(name) name##amx
#include "fa_lowp_amx_kernels.h"

/* Palette 1; bytes 16-47 the bytes per row of tiles 0-15 (little-endian 16-bit), 48-63
 * their rows: tiles 0-7 of 16 rows x 64 bytes. Constant, so threads only read it. */
static const unsigned char fa_amx_cfg[64] = {
    [0] = 1,
    [16] = 64, [18] = 64, [20] = 64, [22] = 64, [24] = 64, [26] = 64, [28] = 64, [30] = 64,
    [48] = 16, [49] = 16, [50] = 16, [51] = 16, [52] = 16, [53] = 16, [54] = 16, [55] = 16,
};
static inline void fa_amx_begin(void) { _tile_loadconfig(fa_amx_cfg); }
static inline void fa_amx_end(void) { _tile_release(); }

static float fa_amx_loop(ptrdiff_t n_iter, float seed)
{
    static __thread unsigned char ab[4][16][64];
    static __thread float c[16][16];
    memset(ab, 0, sizeof ab);
    fa_amx_begin();
    FA_TILE_ZERO(0); FA_TILE_ZERO(1); FA_TILE_ZERO(2); FA_TILE_ZERO(3);
    FA_TILE_LOAD(4, ab[0], 64); FA_TILE_LOAD(5, ab[1], 64);
    FA_TILE_LOAD(6, ab[2], 64); FA_TILE_LOAD(7, ab[3], 64);
    for (ptrdiff_t n = 0; n < n_iter; n++) {
        FA_TILE_DP(0, 4, 6); FA_TILE_DP(1, 4, 7); FA_TILE_DP(2, 5, 6); FA_TILE_DP(3, 5, 7);
    }
    FA_TILE_STORE(0, c, 64);
    fa_amx_end();
    return c[0][0] + seed;
}
#undef FA_TILE_ZERO
#undef FA_TILE_LOAD
#undef FA_TILE_STORE
#undef FA_TILE_DP
#undef FA_AMX_FN
#pragma GCC pop_options

/* Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22) and the OS
 * enables the tile state in XCR0 (bits 17 and 18). */
static inline int fa_cpu_amx_bf16(void)
{
    unsigned int a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 24) & 1) || !((d >> 22) & 1)) return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0;  /* OSXSAVE */
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((lo >> 17) & 3) == 3;
}

static inline int fa_amx_request(void)
{
    /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}
#else
#define FA_HAVE_AMX 0
static inline void fa_amx_begin(void) {}
static inline void fa_amx_end(void) {}
static inline int fa_cpu_amx_bf16(void) { return 0; }
static inline int fa_amx_request(void) { return 0; }
static inline float fa_amx_loop(ptrdiff_t n_iter, float seed) { (void)n_iter; return seed; }
static void fa_lp_scores_amx(const uint16_t *qb, ptrdiff_t rows_pad, ptrdiff_t d_pad,
                             const uint16_t *kp, ptrdiff_t n_cols, float scale, float *s,
                             ptrdiff_t ld)
{ fa_lp_scores_amx_emu(qb, rows_pad, d_pad, kp, n_cols, scale, s, ld); }
static void fa_lp_pv_amx(const uint16_t *pb, ptrdiff_t ld_p, ptrdiff_t rows_pad,
                         const uint16_t *vp, ptrdiff_t j0, ptrdiff_t n_keys, ptrdiff_t d_v,
                         float *o)
{ fa_lp_pv_amx_emu(pb, ld_p, rows_pad, vp, j0, n_keys, d_v, o); }
#endif

/* The first contact with the native tiles: 0 when they may be used; 1 the CPU or OS has
 * no AMX-BF16 (or this build has no native AMX kernels); 2 Linux refused the tile state;
 * 3 a known product (small integers, exact in float32) on the tiles differs from the
 * emulation's. Called once per process before the engine is chosen. */
static inline int fa_amx_selftest(void)
{
    if (!FA_HAVE_AMX || !fa_cpu_amx_bf16()) return 1;
    if (!fa_amx_request()) return 2;
    enum { R = 32, D = 64, N = 64 };
    static uint16_t qb[R * D], kp[N * D], pb[R * N], vp[N * 32];
    static float s_native[R * N], s_emu[R * N], o_native[R * 32], o_emu[R * 32];
    for (int i = 0; i < R * D; i++) qb[i] = (uint16_t)(0x3f80 + ((i * 7) % 5) * 0x80);
    for (int i = 0; i < N * D; i++) kp[i] = (uint16_t)(0x3f80 + ((i * 3) % 7) * 0x80);
    for (int i = 0; i < R * N; i++) pb[i] = (uint16_t)(0x4000 + ((i * 5) % 3) * 0x80);
    for (int i = 0; i < N * 32; i++) vp[i] = (uint16_t)(0x3f80 + ((i * 11) % 4) * 0x80);
    memset(o_native, 0, sizeof o_native);
    memset(o_emu, 0, sizeof o_emu);
    fa_amx_begin();
    fa_lp_scores_amx(qb, R, D, kp, N, 1.0f, s_native, N);
    fa_lp_pv_amx(pb, N, R, vp, 0, N, 32, o_native);
    fa_amx_end();
    fa_lp_scores_amx_emu(qb, R, D, kp, N, 1.0f, s_emu, N);
    fa_lp_pv_amx_emu(pb, N, R, vp, 0, N, 32, o_emu);
    return memcmp(s_native, s_emu, sizeof s_emu) || memcmp(o_native, o_emu, sizeof o_emu) ? 3 : 0;
}

#endif

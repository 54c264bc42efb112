# Declarations: cimports, the C headers' functions and constants, the mask kinds.
# Part of _kernels_impl.pxi (see there).

from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_STRIDES, PyBUF_WRITABLE,
                            PyBuffer_Release, PyObject_GetBuffer)
from libc.math cimport log, sqrt, INFINITY
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from libc.stdint cimport int8_t, uint8_t, uint16_t, uint32_t
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

import numpy as _np
from time import perf_counter as _perf_counter

cdef extern from "<stdlib.h>" nogil:
    void *aligned_alloc(size_t alignment, size_t size)  # C11; size a multiple of alignment

cdef extern from "fa_platform.h" nogil:
    int fa_openmp_enabled()
    int fa_omp_max_threads()
    int fa_omp_team_size()
    const char *fa_build_flags
    const char *fa_isa_name
    const int fa_debug_build
    void fa_check_matrix(const void *p, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t ld,
                         size_t item)

cdef extern from "fa_exp.h" nogil:
    float fa_expf(float x)
    double fa_exp(double x)
    float fa_row_max_f(const float *x, Py_ssize_t n)
    double fa_row_max_d(const double *x, Py_ssize_t n)
    double fa_exp_shift_sum_f(float *x, Py_ssize_t n, float shift)
    double fa_exp_shift_sum_d(double *x, Py_ssize_t n, double shift)
    double fa_exp_shift_total_f(const float *x, Py_ssize_t n, float shift)
    double fa_exp_shift_total_d(const double *x, Py_ssize_t n, double shift)
    void fa_softcap_row_f(float *s, Py_ssize_t n, float cap, float inv_cap)
    void fa_softcap_row_d(double *s, Py_ssize_t n, double cap, double inv_cap)

cdef extern from "fa_quant.h" nogil:
    int fa_quant_cols(const float *x, Py_ssize_t rows, Py_ssize_t d, Py_ssize_t x_stride,
                      int kind, void *q, float *scale, double *mul)
    int fa_quant_rows(const float *x, Py_ssize_t rows, Py_ssize_t d, Py_ssize_t x_stride,
                      int kind, void *q, float *scale)
    float fa_f8_to_f32(uint8_t b)
    uint8_t fa_f32_to_f8(float x)

cdef extern from "fa_decode.h" nogil:
    int FA_DECODE_BLOCK
    int FA_KV_GROUP
    ctypedef struct fa_pages:
        const Py_ssize_t *table
        Py_ssize_t rows, first, k_stride, v_stride, ks_stride, vs_stride
    void fa_decode_chunk_f(const float *q, Py_ssize_t n_rows, Py_ssize_t d, const float *k,
                           const float *v, Py_ssize_t d_v, Py_ssize_t n_keys, float scale,
                           float softcap, const float *ks, const float *vs, Py_ssize_t phase,
                           float *m, double *l, float *o, float *s, float *qs,
                           const fa_pages *pg)
    void fa_decode_chunk_d(const double *q, Py_ssize_t n_rows, Py_ssize_t d, const double *k,
                           const double *v, Py_ssize_t d_v, Py_ssize_t n_keys, double scale,
                           double softcap, const double *ks, const double *vs, Py_ssize_t phase,
                           double *m, double *l, double *o, double *s, double *qs,
                           const fa_pages *pg)
    void fa_decode_chunk_bf(const float *q, Py_ssize_t n_rows, Py_ssize_t d, const uint16_t *k,
                           const uint16_t *v, Py_ssize_t d_v, Py_ssize_t n_keys, float scale,
                           float softcap, const float *ks, const float *vs, Py_ssize_t phase,
                           float *m, double *l, float *o, float *s, float *qs,
                           const fa_pages *pg)
    void fa_decode_chunk_hf(const float *q, Py_ssize_t n_rows, Py_ssize_t d, const uint16_t *k,
                           const uint16_t *v, Py_ssize_t d_v, Py_ssize_t n_keys, float scale,
                           float softcap, const float *ks, const float *vs, Py_ssize_t phase,
                           float *m, double *l, float *o, float *s, float *qs,
                           const fa_pages *pg)
    void fa_decode_chunk_i8(const float *q, Py_ssize_t n_rows, Py_ssize_t d, const int8_t *k,
                           const int8_t *v, Py_ssize_t d_v, Py_ssize_t n_keys, float scale,
                           float softcap, const float *ks, const float *vs, Py_ssize_t phase,
                           float *m, double *l, float *o, float *s, float *qs,
                           const fa_pages *pg)
    void fa_decode_chunk_f8(const float *q, Py_ssize_t n_rows, Py_ssize_t d, const uint8_t *k,
                           const uint8_t *v, Py_ssize_t d_v, Py_ssize_t n_keys, float scale,
                           float softcap, const float *ks, const float *vs, Py_ssize_t phase,
                           float *m, double *l, float *o, float *s, float *qs,
                           const fa_pages *pg)
    void fa_decode_merge_f(const float *parts, const double *l_parts, Py_ssize_t n_chunks,
                           Py_ssize_t n_rows, Py_ssize_t d_v, const float *sinks,
                           float *out, float *lse)
    void fa_decode_merge_d(const double *parts, const double *l_parts, Py_ssize_t n_chunks,
                           Py_ssize_t n_rows, Py_ssize_t d_v, const double *sinks,
                           double *out, double *lse)

cdef extern from "fa_decode_dp.h" nogil:
    int FA_SRC_BF16_DP, FA_SRC_I8_DP, FA_SRC_F8_DP, FA_SRC_F16_DP
    void fa_decode_chunk_i8dp(const float *q, Py_ssize_t n_rows, Py_ssize_t d, const int8_t *k,
                              const int8_t *v, Py_ssize_t d_v, Py_ssize_t n_keys, float scale,
                              float softcap, const float *ks, const float *vs, Py_ssize_t phase,
                              float *m, double *l, float *o, float *s, float *qs, uint32_t *pw,
                              const fa_pages *pg)
    void fa_decode_chunk_f8dp(const float *q, Py_ssize_t n_rows, Py_ssize_t d, const uint8_t *k,
                              const uint8_t *v, Py_ssize_t d_v, Py_ssize_t n_keys, float scale,
                              float softcap, const float *ks, const float *vs, Py_ssize_t phase,
                              float *m, double *l, float *o, float *s, float *qs, uint32_t *pw,
                              const fa_pages *pg)
    void fa_decode_chunk_bfdp(const float *q, Py_ssize_t n_rows, Py_ssize_t d, const uint16_t *k,
                              const uint16_t *v, Py_ssize_t d_v, Py_ssize_t n_keys, float scale,
                              float softcap, float *m, double *l, float *o, float *s,
                              uint16_t *qb, uint32_t *pb, const fa_pages *pg)
    void fa_decode_chunk_hfdp(const float *q, Py_ssize_t n_rows, Py_ssize_t d, const uint16_t *k,
                              const uint16_t *v, Py_ssize_t d_v, Py_ssize_t n_keys, float scale,
                              float softcap, float *m, double *l, float *o, float *s,
                              uint16_t *qb, uint32_t *pb, const fa_pages *pg)

cdef extern from "fa_microkernels.h" nogil:
    int FA_MICROKERNELS
    int FA_MK_VBYTES
    int FA_MK_KEYS
    int FA_MK_SCORES_N, FA_MK_PV_N
    const int *fa_mk_scores_mr
    const int *fa_mk_scores_nv
    const int *fa_mk_pv_mr
    const int *fa_mk_pv_nv
    void fa_mk_scores_f(int block, const float *q, Py_ssize_t rows, Py_ssize_t d, const float *kp,
                        Py_ssize_t n_cols, float *s, Py_ssize_t ld)
    void fa_mk_scores_d(int block, const double *q, Py_ssize_t rows, Py_ssize_t d, const double *kp,
                        Py_ssize_t n_cols, double *s, Py_ssize_t ld)
    int FA_MK_PV_CHUNK
    int FA_MK_PV_NV
    int FA_MK_SCORES_NV
    void fa_mk_pv_f(int block, const float *p, Py_ssize_t ld_p, Py_ssize_t rows, const float *vp,
                    Py_ssize_t j0, Py_ssize_t n_keys, Py_ssize_t next_keys, Py_ssize_t d_v,
                    float *o)
    void fa_mk_pv_d(int block, const double *p, Py_ssize_t ld_p, Py_ssize_t rows, const double *vp,
                    Py_ssize_t j0, Py_ssize_t n_keys, Py_ssize_t next_keys, Py_ssize_t d_v,
                    double *o)
    int fa_mk_values_in_place_f(Py_ssize_t d_v)
    int fa_mk_values_in_place_d(Py_ssize_t d_v)
    void fa_pack_keys_f(const float *k, Py_ssize_t rows, Py_ssize_t d, Py_ssize_t ldk,
                        float *kp, Py_ssize_t n_cols)
    void fa_pack_keys_d(const double *k, Py_ssize_t rows, Py_ssize_t d, Py_ssize_t ldk,
                        double *kp, Py_ssize_t n_cols)
    void fa_pack_values_f(const float *v, Py_ssize_t n_keys, Py_ssize_t d_v, Py_ssize_t ldv,
                          float *vp, Py_ssize_t c_lo, Py_ssize_t c_hi)
    void fa_pack_values_d(const double *v, Py_ssize_t n_keys, Py_ssize_t d_v, Py_ssize_t ldv,
                          double *vp, Py_ssize_t c_lo, Py_ssize_t c_hi)

cdef extern from "fa_lowp.h" nogil:
    int FA_SRC_BF16, FA_SRC_F16, FA_SRC_F32, FA_SRC_I8, FA_SRC_F8
    int FA_ENGINE_NONE, FA_ENGINE_DPBF16, FA_ENGINE_AMX, FA_ENGINE_AMX_EMU
    int FA_LP_ROWS, FA_LP_DSTEP, FA_LP_KEYS, FA_LP_VCHUNK
    int FA_HAVE_DPBF16, FA_HAVE_AMX
    int fa_cpu_avx512_bf16()
    int fa_cpu_avx512_vnni()
    int fa_cpu_amx_bf16()
    int fa_amx_selftest()
    void fa_lp_narrow(const float *src, Py_ssize_t n, int kind, uint16_t *dst)
    void fa_lp_widen_scaled(const void *src, int kind, Py_ssize_t n, float scale, float *dst)
    void fa_lp_pack_keys_widen(const void *k, int kind, Py_ssize_t rows, Py_ssize_t d,
                               Py_ssize_t ldk, float *kp, Py_ssize_t n_cols, Py_ssize_t kr)
    void fa_lp_pack_values_widen(const void *v, int kind, Py_ssize_t n_keys, Py_ssize_t d_v,
                                 Py_ssize_t ldv, float *vp, Py_ssize_t c_lo, Py_ssize_t c_hi, Py_ssize_t ch,
                                 Py_ssize_t bw, Py_ssize_t w)
    void fa_lp_pack_q(const void *q, int kind, Py_ssize_t rows, Py_ssize_t d, Py_ssize_t ldq,
                      uint16_t *qb, Py_ssize_t rows_pad, Py_ssize_t d_pad)
    void fa_lp_pack_keys(const void *k, int kind, Py_ssize_t rows, Py_ssize_t d,
                         Py_ssize_t ldk, uint16_t *kp, Py_ssize_t n_cols, Py_ssize_t d_pad)
    void fa_lp_pack_values(const void *v, int kind, Py_ssize_t n_keys, Py_ssize_t d_v,
                           Py_ssize_t ldv, uint16_t *vp, Py_ssize_t c_lo, Py_ssize_t c_hi)
    void fa_lp_pack_p(const float *s, Py_ssize_t ld_s, Py_ssize_t rows, Py_ssize_t cols,
                      uint16_t *pb, Py_ssize_t ld_p, Py_ssize_t rows_pad)
    void fa_lp_scores(int engine, const uint16_t *qb, Py_ssize_t rows_pad, Py_ssize_t d_pad,
                      const uint16_t *kp, Py_ssize_t n_cols, float scale, float *s,
                      Py_ssize_t ld)
    void fa_lp_pv(int engine, const uint16_t *pb, Py_ssize_t ld_p, Py_ssize_t rows_pad,
                  const uint16_t *vp, Py_ssize_t j0, Py_ssize_t n_keys, Py_ssize_t d_v,
                  float *o)
    Py_ssize_t fa_lp_peak_flops(int engine)
    float fa_lp_peak_loop(int engine, Py_ssize_t n_iter, float seed)
    void fa_lp_begin(int engine)
    void fa_lp_end(int engine)

cdef extern from "fa_bench.h" nogil:
    float fa_fma_loop_f(Py_ssize_t n_iter, float seed)
    double fa_fma_loop_d(Py_ssize_t n_iter, double seed)
    float fa_read_sum_f(const float *x, Py_ssize_t n)
    double fa_read_sum_d(const double *x, Py_ssize_t n)
    Py_ssize_t fa_fma_flops_per_iter(size_t item)
    int FA_VBYTES
    int FA_READ_CHAINS

# The mask kinds, as fastattn._plan.MaskKind numbers them.
cdef enum:
    MASK_NONE = 0
    MASK_ADD = 1    # floating, added to the scores
    MASK_BOOL = 2   # uint8, 0 = hidden

cdef object _ndarray = _np.ndarray
cdef object _float32 = _np.dtype(_np.float32)
cdef object _float64 = _np.dtype(_np.float64)

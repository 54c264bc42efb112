# The kernels, included by _kernels.pyx, _kernels_avx2.pyx and _kernels_avx512.pyx: one
# source compiled once per instruction set (setup.py), chosen at import (_dispatch.py).
#
# Design: this module computes and trusts its inputs. `api.py` has already checked every
# shape and dtype, made the arrays C-contiguous in the compute dtype (float32 or float64),
# materialised masks to `(n_masks, n_queries, n_keys)`, turned broadcasting and grouped-query
# heads into one index array (`index[:, b]` says which stored q, k/v and mask entries batch
# entry `b` reads, so nothing broadcast is ever copied) and held BLAS to one thread where
# these kernels call it from several threads. Nothing here raises: a kernel that can fail
# (allocation) returns a status and the wrapper raises.
#
# GEMM-shaped tile work goes to the BLAS that SciPy ships, reached through
# `scipy.linalg.cython_blas` as scikit-learn's pairwise reductions do; this module owns the
# rest: scaling, masking, the online softmax and its rescaling, written as loops over
# contiguous memory with the vectorisable exp of `fa_exp.h`. The decoding kernel is in C
# (`fa_decode.h`), and so are the tile micro-kernels of the AVX2 and AVX-512 builds
# (`fa_microkernels.h`).

from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_WRITABLE, PyBuffer_Release,
                            PyObject_GetBuffer)
from libc.math cimport log, sqrt, INFINITY
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from libc.stdint cimport uint16_t
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

import numpy as _np

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

cdef extern from "fa_decode.h" nogil:
    int FA_DECODE_BLOCK
    void fa_decode_chunk_f(const float *q, Py_ssize_t n_rows, Py_ssize_t d, const float *k,
                           const float *v, Py_ssize_t d_v, Py_ssize_t n_keys, float scale,
                           float softcap, float *m, double *l, float *o, float *s)
    void fa_decode_chunk_d(const double *q, Py_ssize_t n_rows, Py_ssize_t d, const double *k,
                           const double *v, Py_ssize_t d_v, Py_ssize_t n_keys, double scale,
                           double softcap, double *m, double *l, double *o, double *s)
    void fa_decode_chunk_bf(const float *q, Py_ssize_t n_rows, Py_ssize_t d,
                            const uint16_t *k, const uint16_t *v, Py_ssize_t d_v,
                            Py_ssize_t n_keys, float scale, float softcap, float *m,
                            double *l, float *o, float *s)
    void fa_decode_merge_f(const float *parts, const double *l_parts, Py_ssize_t n_chunks,
                           Py_ssize_t n_rows, Py_ssize_t d_v, const float *sinks,
                           float *out, float *lse)
    void fa_decode_merge_d(const double *parts, const double *l_parts, Py_ssize_t n_chunks,
                           Py_ssize_t n_rows, Py_ssize_t d_v, const double *sinks,
                           double *out, double *lse)

cdef extern from "fa_microkernels.h" nogil:
    int FA_MICROKERNELS
    int FA_MK_VBYTES
    int FA_MK_KEYS
    void fa_mk_scores_f(const float *q, Py_ssize_t rows, Py_ssize_t d, const float *kp,
                        Py_ssize_t n_cols, float *s, Py_ssize_t ld)
    void fa_mk_scores_d(const double *q, Py_ssize_t rows, Py_ssize_t d, const double *kp,
                        Py_ssize_t n_cols, double *s, Py_ssize_t ld)
    int FA_MK_PV_CHUNK
    void fa_mk_pv_f(const float *p, Py_ssize_t ld_p, Py_ssize_t rows, const float *vp,
                    Py_ssize_t j0, Py_ssize_t n_keys, Py_ssize_t next_keys, Py_ssize_t d_v,
                    float *o)
    void fa_mk_pv_d(const double *p, Py_ssize_t ld_p, Py_ssize_t rows, const double *vp,
                    Py_ssize_t j0, Py_ssize_t n_keys, Py_ssize_t next_keys, Py_ssize_t d_v,
                    double *o)
    int fa_mk_values_in_place_f(Py_ssize_t d_v)
    int fa_mk_values_in_place_d(Py_ssize_t d_v)
    void fa_pack_keys_f(const float *k, Py_ssize_t rows, Py_ssize_t d, float *kp,
                        Py_ssize_t n_cols)
    void fa_pack_keys_d(const double *k, Py_ssize_t rows, Py_ssize_t d, double *kp,
                        Py_ssize_t n_cols)
    void fa_pack_values_f(const float *v, Py_ssize_t n_keys, Py_ssize_t d_v, float *vp,
                          Py_ssize_t c_lo, Py_ssize_t c_hi)
    void fa_pack_values_d(const double *v, Py_ssize_t n_keys, Py_ssize_t d_v, double *vp,
                          Py_ssize_t c_lo, Py_ssize_t c_hi)

cdef extern from "fa_bench.h" nogil:
    float fa_fma_loop_f(Py_ssize_t n_iter, float seed)
    double fa_fma_loop_d(Py_ssize_t n_iter, double seed)
    float fa_read_sum_f(const float *x, Py_ssize_t n)
    double fa_read_sum_d(const double *x, Py_ssize_t n)
    Py_ssize_t fa_fma_flops_per_iter(size_t item)
    int FA_BENCH_VBYTES
    int FA_READ_CHAINS

# The mask kinds, as fastattn._plan.MaskKind numbers them.
cdef enum:
    MASK_NONE = 0
    MASK_ADD = 1    # floating, added to the scores
    MASK_BOOL = 2   # uint8, 0 = hidden


# --------------------------------------------------------------------------- helpers

cdef inline floating _exp(floating x) noexcept nogil:
    """exp(x), vectorisable, exact at -inf, NaN-preserving."""
    if floating is float:
        return fa_expf(x)
    else:
        return fa_exp(x)


cdef inline void _gemm(bint trans_b, int m, int n, int k, floating alpha,
                       const floating *a, int lda, const floating *b, int ldb,
                       floating beta, floating *c, int ldc) noexcept nogil:
    """Row-major C (m x n) = alpha * A (m x k) @ op(B) + beta * C; op(B) = B.T (B is n x k) if trans_b."""
    # BLAS is column-major: row-major C = A op(B) is column-major C.T = op(B).T A.T, so BLAS
    # is handed B first and A second, with m and n swapped.
    cdef char ta = b'T' if trans_b else b'N'
    cdef char tb = b'N'
    fa_check_matrix(a, m, k, lda, sizeof(floating))
    fa_check_matrix(b, n if trans_b else k, k if trans_b else n, ldb, sizeof(floating))
    fa_check_matrix(c, m, n, ldc, sizeof(floating))
    if floating is float:
        sgemm(&ta, &tb, &n, &m, &k, &alpha, <float*> b, &ldb, <float*> a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&ta, &tb, &n, &m, &k, &alpha, <double*> b, &ldb, <double*> a, &lda,
              &beta, c, &ldc)


cdef inline void _gemv_rows(int d_in, int d_out, const floating *x, const floating *w,
                            int ld_w, floating beta, floating *y) noexcept nogil:
    """y (d_out) = x (d_in) @ W (d_in x d_out, row-major, row stride ld_w) + beta * y."""
    # Row-major W is column-major W.T (d_out x d_in), so y = W.T x is gemv 'N'.
    cdef char trans = b'N'
    cdef int inc = 1
    cdef floating one = 1
    fa_check_matrix(x, 1, d_in, d_in, sizeof(floating))
    fa_check_matrix(w, d_in, d_out, ld_w, sizeof(floating))
    fa_check_matrix(y, 1, d_out, d_out, sizeof(floating))
    if floating is float:
        sgemv(&trans, &d_out, &d_in, &one, <float*> w, &ld_w, <float*> x, &inc, &beta, y, &inc)
    else:
        dgemv(&trans, &d_out, &d_in, &one, <double*> w, &ld_w, <double*> x, &inc, &beta, y, &inc)


cdef inline floating _row_max(const floating *x, Py_ssize_t n) noexcept nogil:
    """max(x), ignoring NaN; -inf for an empty or all -inf/NaN row."""
    if floating is float:
        return fa_row_max_f(x, n)
    else:
        return fa_row_max_d(x, n)


cdef inline double _exp_shift_sum(floating *x, Py_ssize_t n, floating shift) noexcept nogil:
    """x = exp(x - shift) in place; returns sum(x) in double."""
    if floating is float:
        return fa_exp_shift_sum_f(x, n, shift)
    else:
        return fa_exp_shift_sum_d(x, n, shift)


cdef inline double _exp_shift_total(const floating *x, Py_ssize_t n, floating shift) noexcept nogil:
    """sum(exp(x - shift)) in double, x unchanged."""
    if floating is float:
        return fa_exp_shift_total_f(x, n, shift)
    else:
        return fa_exp_shift_total_d(x, n, shift)


cdef inline void _softcap_row(floating *s, Py_ssize_t n, floating cap) noexcept nogil:
    """s[0:n] = cap tanh(s / cap), the soft cap of one row of scores (cap > 0)."""
    if floating is float:
        fa_softcap_row_f(s, n, cap, 1.0 / cap)
    else:
        fa_softcap_row_d(s, n, cap, 1.0 / cap)


cdef inline Py_ssize_t _round_up(Py_ssize_t n, Py_ssize_t multiple) noexcept nogil:
    """The least multiple of `multiple` that is >= n."""
    return (n + multiple - 1) // multiple * multiple


cdef inline void _mk_scores(const floating *q, Py_ssize_t rows, Py_ssize_t d,
                            const floating *kp, Py_ssize_t n_cols, floating *s,
                            Py_ssize_t ld) noexcept nogil:
    """s (rows x n_cols, stride ld) = q (rows x d) @ k.T, k packed by _pack_keys."""
    if floating is float:
        fa_mk_scores_f(q, rows, d, kp, n_cols, s, ld)
    else:
        fa_mk_scores_d(q, rows, d, kp, n_cols, s, ld)


cdef inline void _mk_pv(const floating *p, Py_ssize_t ld_p, Py_ssize_t rows,
                        const floating *vp, Py_ssize_t j0, Py_ssize_t n_keys,
                        Py_ssize_t next_keys, Py_ssize_t d_v, floating *o) noexcept nogil:
    """o (rows x d_v) += p (rows x n_keys, stride ld_p) @ v[j0:j0 + n_keys], v in the
    chunk layout vp (_pack_values, or v itself where _values_in_place); the next_keys keys
    after them are in vp too (prefetched)."""
    if floating is float:
        fa_mk_pv_f(p, ld_p, rows, vp, j0, n_keys, next_keys, d_v, o)
    else:
        fa_mk_pv_d(p, ld_p, rows, vp, j0, n_keys, next_keys, d_v, o)


cdef inline void _pack_keys(const floating *k, Py_ssize_t rows, Py_ssize_t d,
                            floating *kp, Py_ssize_t n_cols) noexcept nogil:
    """kp = k (rows x d) as the micro-kernel's key panels, zero keys up to n_cols."""
    if floating is float:
        fa_pack_keys_f(k, rows, d, kp, n_cols)
    else:
        fa_pack_keys_d(k, rows, d, kp, n_cols)


cdef inline void _pack_values(const floating *v, Py_ssize_t n_keys, Py_ssize_t d_v,
                              floating *vp, Py_ssize_t c_lo, Py_ssize_t c_hi) noexcept nogil:
    """vp = chunks [c_lo, c_hi) of v (n_keys x d_v) in the micro-kernel's chunk layout."""
    if floating is float:
        fa_pack_values_f(v, n_keys, d_v, vp, c_lo, c_hi)
    else:
        fa_pack_values_d(v, n_keys, d_v, vp, c_lo, c_hi)


cdef inline bint _values_in_place(Py_ssize_t d_v, size_t item) noexcept nogil:
    """Whether values of this width are already in the chunk layout (one band)."""
    return fa_mk_values_in_place_f(d_v) if item == 4 else fa_mk_values_in_place_d(d_v)


# --------------------------------------------------------------------------- build facts

def build_info():
    """The facts of this build: compiler flags, OpenMP, debug checks, default threads."""
    return {
        "isa": fa_isa_name.decode(),
        "microkernels": bool(FA_MICROKERNELS),
        # Lanes of the micro-kernels' vectors per dtype (0: none): d_v must be a multiple.
        "microkernel_lanes": {"float32": FA_MK_VBYTES // 4, "float64": FA_MK_VBYTES // 8},
        "compile_flags": fa_build_flags.decode(),
        "openmp": bool(fa_openmp_enabled()),
        "debug_checks": bool(fa_debug_build),
        "max_threads": fa_omp_max_threads(),
    }


def max_threads():
    """OpenMP's default team size (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return fa_omp_max_threads()


# --------------------------------------------------------------------------- projection

cdef void _project_band(const floating *x, const floating *w, const floating *b,
                        bint has_bias, floating *out, int n_rows, int d_in, int d_out,
                        Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """out[:, c0:c1] = x @ w[:, c0:c1] (+ b[c0:c1]) in one BLAS call (GEMV for one row);
    x (n_rows x d_in), w (d_in x d_out) and out (n_rows x d_out) row-major."""
    cdef Py_ssize_t i, j
    cdef floating beta = 1 if has_bias else 0
    if c1 <= c0:
        return
    if has_bias:
        for i in range(n_rows):
            for j in range(c0, c1):
                out[i * d_out + j] = b[j]
    if n_rows == 1:
        _gemv_rows(d_in, <int> (c1 - c0), x, w + c0, d_out, beta, out + c0)
    else:
        _gemm(False, n_rows, <int> (c1 - c0), d_in, 1, x, d_in, w + c0, d_out, beta,
              out + c0, d_out)


def project(const floating[:, ::1] x, const floating[:, ::1] w, const floating[::1] b,
            bint has_bias, floating[:, ::1] out, Py_ssize_t col_start=0,
            Py_ssize_t col_stop=-1, int n_threads=1):
    """out[:, c0:c1] = x @ w[:, c0:c1] (+ b[c0:c1]), (c0, c1) = (col_start, col_stop; -1:
    d_out), on n_threads of fastattn's OpenMP team, each one BLAS call (GEMV for one row)
    on an even band of rows, or of columns (edges on multiples of 16) when there are more
    of those: each thread's BLAS packs its band and all of the other operand, so the band
    is cut from the larger side. Returns the team size.

    The caller holds BLAS to one thread (fastattn._run.serial_blas), so that BLAS's own
    thread pool never starts: after a call it spins for a while, and on a 2-core Zen 5
    EPYC the first attention call after a projection threaded by OpenBLAS took 7.8 ms
    instead of 1.9. Which band holds an output can change its last bits (OpenBLAS's
    kernels for a band's edges sum in another order), as BLAS's own thread count did."""
    cdef int n_rows = <int> x.shape[0], d_in = <int> x.shape[1], d_out = <int> w.shape[1]
    cdef Py_ssize_t n_cols, t, c0, c1, r0, r1
    cdef bint by_rows
    cdef int team = 1
    if col_stop < 0 or col_stop > d_out:
        col_stop = d_out
    if col_start < 0 or col_start >= col_stop or n_rows == 0:
        return team
    n_cols = col_stop - col_start
    by_rows = n_rows > n_cols
    n_threads = max(1, min(n_threads, n_rows if by_rows else <int> (n_cols // 16)))
    with nogil:
        if n_threads == 1:
            _project_band(&x[0, 0], &w[0, 0], &b[0], has_bias, &out[0, 0], n_rows, d_in,
                          d_out, col_start, col_stop)
        else:
            for t in prange(n_threads, num_threads=n_threads, schedule='static', chunksize=1):
                if by_rows:
                    r0 = n_rows * t // n_threads
                    r1 = n_rows * (t + 1) // n_threads
                    _project_band(&x[0, 0] + r0 * d_in, &w[0, 0], &b[0], has_bias,
                                  &out[0, 0] + r0 * d_out, <int> (r1 - r0), d_in, d_out,
                                  col_start, col_stop)
                else:
                    c0 = col_start + n_cols * t // n_threads // 16 * 16
                    c1 = col_start + (n_cols if t == n_threads - 1
                                      else n_cols * (t + 1) // n_threads // 16 * 16)
                    _project_band(&x[0, 0], &w[0, 0], &b[0], has_bias, &out[0, 0], n_rows,
                                  d_in, d_out, c0, c1)
                team = fa_omp_team_size()  # every thread writes the same value
    return team


# --------------------------------------------------------------------------- masking

cdef inline void _mask_row(floating *s, Py_ssize_t n, Py_ssize_t first, Py_ssize_t visible,
                           int mask_kind, const floating *add_row,
                           const unsigned char *bool_row) noexcept nogil:
    """Apply one query's masks to its scores s[0:n]: keys j < first (sliding window),
    j >= visible (causal) and keys whose boolean mask is False become -inf; an additive
    mask is added."""
    cdef Py_ssize_t j
    if mask_kind == MASK_ADD:
        for j in range(n):
            s[j] = s[j] + add_row[j]
    elif mask_kind == MASK_BOOL:
        for j in range(n):
            if not bool_row[j]:
                s[j] = -INFINITY
    if visible < 0:
        visible = 0
    for j in range(visible, n):
        s[j] = -INFINITY
    for j in range(min(first, n)):
        s[j] = -INFINITY


def scores(const floating[:, :, ::1] q, const floating[:, :, ::1] k, object mask,
           int mask_kind, const Py_ssize_t[:, ::1] index, bint causal, Py_ssize_t window,
           double scale, double softcap, floating[:, :, ::1] out):
    """out[b] = scale * q[i0] @ k[i1].T, soft-capped (softcap > 0: c tanh(s / c)), then
    masked by mask[i2] ((i0, i1, i2) = index[:, b]): -inf where a uint8 mask (MASK_BOOL)
    is 0 or causal hides the key, + a float mask (MASK_ADD)."""
    cdef Py_ssize_t n_batch = out.shape[0], n_queries = out.shape[1], n_keys = out.shape[2]
    cdef int d_head = <int> q.shape[2]
    cdef Py_ssize_t b, i, visible
    cdef Py_ssize_t offset = n_keys - n_queries
    cdef const floating[:, :, ::1] add_mask
    cdef const unsigned char[:, :, ::1] bool_mask
    cdef const floating *add_row = NULL
    cdef const unsigned char *bool_row = NULL
    if mask_kind == MASK_BOOL:
        bool_mask = mask
    elif mask_kind == MASK_ADD:
        add_mask = mask
    with nogil:
        for b in range(n_batch):
            _gemm(True, <int> n_queries, <int> n_keys, d_head, <floating> scale,
                  &q[index[0, b], 0, 0], d_head, &k[index[1, b], 0, 0], d_head,
                  0, &out[b, 0, 0], <int> n_keys)
            for i in range(n_queries):
                if mask_kind == MASK_ADD:
                    add_row = &add_mask[index[2, b], i, 0]
                elif mask_kind == MASK_BOOL:
                    bool_row = &bool_mask[index[2, b], i, 0]
                visible = i + offset + 1 if causal else n_keys
                if softcap > 0:
                    _softcap_row(&out[b, i, 0], n_keys, <floating> softcap)
                _mask_row(&out[b, i, 0], n_keys, i + offset + 1 - window if window else 0,
                          visible, mask_kind, add_row, bool_row)


# --------------------------------------------------------------------------- softmax

cdef inline void _softmax_row(const floating *x, floating *y, Py_ssize_t n,
                              bint log_out, bint zero_masked) noexcept nogil:
    """y = softmax(x) or log_softmax(x), stable; the sum of exp is kept in double."""
    cdef floating m = _row_max(x, n)
    cdef double total
    cdef floating shift, inv
    cdef Py_ssize_t j
    if zero_masked and m == -INFINITY:
        for j in range(n):
            y[j] = 0
        return
    # With m = -inf (all -inf) or +inf, x - m is NaN: the row is NaN, as in SciPy.
    if log_out:
        shift = <floating> (m + log(_exp_shift_total(x, n, m)))
        for j in range(n):
            y[j] = x[j] - shift
    else:
        if y != x:
            for j in range(n):
                y[j] = x[j]
        inv = <floating> (1.0 / _exp_shift_sum(y, n, m))
        for j in range(n):
            y[j] = y[j] * inv


def softmax(const floating[:, ::1] x, floating[:, ::1] out, bint log_out,
            bint zero_masked, int n_threads):
    """out[i] = softmax(x[i]) (or log_softmax); zero_masked: an all -inf row gives zeros."""
    cdef Py_ssize_t n_rows = x.shape[0], n = x.shape[1], i
    for i in prange(n_rows, nogil=True, num_threads=n_threads, schedule='static'):
        _softmax_row(&x[i, 0], &out[i, 0], n, log_out, zero_masked)


# --------------------------------------------------------------------------- attention

cdef void _attend_block(
        const floating *q, const floating *k, const floating *v,
        const floating *add_mask, const unsigned char *bool_mask, int mask_kind,
        Py_ssize_t q_start, Py_ssize_t q_rows, Py_ssize_t n_queries, Py_ssize_t n_keys,
        Py_ssize_t d_head, Py_ssize_t d_v, Py_ssize_t k_block, bint causal, Py_ssize_t window,
        floating scale, floating softcap, const floating *sink, floating *s_tile,
        floating *o_acc, floating *m_run, double *l_run, floating *kp, Py_ssize_t kp_keys,
        Py_ssize_t *packed, floating *vp, Py_ssize_t vp_chunks, floating *qs, bint micro,
        floating *out, floating *lse) noexcept nogil:
    """out rows [q_start, q_start + q_rows) of softmax(scale q k.T + mask) v, by an online
    softmax over key blocks; lse (if not NULL) gets m + log(l) per row.

    softcap > 0: the scores become softcap tanh(s / softcap) before the masks. sink (NULL:
    none): one more key per row with that logit and a zero value, so the running max and
    sum start at (*sink, 1) instead of (-inf, 0).

    micro: the tile GEMMs run in this build's micro-kernels (fastattn._plan.use_microkernels)
    instead of BLAS: the query block is scaled once into qs. The keys are packed into kp
    once per thread and head, not per tile: kp has room for kp_keys keys (a multiple of
    FA_MK_KEYS, at least a tile's panels) and holds the panels of keys [packed[1],
    packed[2]) of the head whose keys start at packed[0] (as an address), in panels of
    FA_MK_KEYS counted from key 0 (zero keys pad the last). A tile whose panels are not in
    kp extends it, or when there is no room starts it again at the tile's first panel. A
    tile whose first key is inside a panel computes the scores of the whole panels it
    touches and uses the columns from `off` on; the score tile's row stride is that
    width, a multiple of FA_MK_KEYS. The values, where their layout is not already the
    micro-kernel's chunk layout, are packed likewise into vp, once per thread and head: vp
    has room for vp_chunks chunks of FA_MK_PV_CHUNK keys (at least a tile's) and holds
    chunks [packed[4], packed[5]) of the head whose values start at packed[3]."""
    cdef Py_ssize_t offset = n_keys - n_queries   # causal: query i sees keys j <= i + offset
    cdef Py_ssize_t k_end = n_keys, k_start, k_rows, i, j, gi
    cdef floating m_new, m_use, alpha, inv
    cdef floating *s_row
    cdef floating *o_row
    cdef Py_ssize_t k_begin = 0, ld = 0, off = 0, k_panel, need
    cdef const floating *vb = v
    cdef Py_ssize_t v_origin = 0, v_first, v_need, v_next
    cdef bint v_in_place = _values_in_place(d_v, sizeof(floating))
    if causal:
        # The block's last query sees keys up to q_start + q_rows - 1 + offset: later key
        # blocks are skipped whole, never computed and then masked.
        k_end = min(n_keys, q_start + q_rows + offset)
    if window:
        # ...and its first query sees none before q_start + offset - window + 1.
        k_begin = max(0, q_start + offset - window + 1)
    for i in range(q_rows):
        m_run[i] = -INFINITY if sink == NULL else sink[0]
        l_run[i] = 0 if sink == NULL or sink[0] == -INFINITY else 1
    memset(o_acc, 0, q_rows * d_v * sizeof(floating))
    if micro:
        for i in range(q_rows * d_head):
            qs[i] = q[q_start * d_head + i] * scale

    k_start = k_begin
    while k_start < k_end:
        k_rows = min(k_block, k_end - k_start)
        ld = k_rows
        if micro:
            # The tile's key panels [k_panel, need) into kp (packing what is not there
            # yet), then s_tile (q_rows x ld) = (scale Q_blk) @ (the panels' keys).T, this
            # tile's key k_start in column off.
            k_panel = k_start // FA_MK_KEYS * FA_MK_KEYS
            need = _round_up(k_start + k_rows, FA_MK_KEYS)
            if (packed[0] != <Py_ssize_t> k or k_panel < packed[1]
                    or need > packed[1] + kp_keys):
                packed[0] = <Py_ssize_t> k
                packed[1] = k_panel
                packed[2] = k_panel
            if packed[2] < need:
                _pack_keys(k + packed[2] * d_head, min(n_keys, need) - packed[2], d_head,
                           kp + (packed[2] - packed[1]) * d_head, need - packed[2])
                packed[2] = need
            off = k_start - k_panel
            ld = need - k_panel
            _mk_scores(qs, q_rows, d_head, kp + (k_panel - packed[1]) * d_head, ld, s_tile, ld)
        else:
            # s_tile (q_rows x k_rows) = scale * Q_blk @ K_blk.T
            _gemm(True, <int> q_rows, <int> k_rows, <int> d_head, scale,
                  q + q_start * d_head, <int> d_head, k + k_start * d_head, <int> d_head,
                  0, s_tile, <int> k_rows)
        for i in range(q_rows):
            gi = q_start + i
            s_row = s_tile + i * ld + off
            if softcap > 0:
                _softcap_row(s_row, k_rows, softcap)
            _mask_row(s_row, k_rows, gi + offset + 1 - window - k_start if window else 0,
                      gi + offset + 1 - k_start if causal else k_rows, mask_kind,
                      add_mask + gi * n_keys + k_start if mask_kind == MASK_ADD else NULL,
                      bool_mask + gi * n_keys + k_start if mask_kind == MASK_BOOL else NULL)
            m_new = _row_max(s_row, k_rows)
            if m_run[i] > m_new:
                m_new = m_run[i]
            # Until a row has seen a visible key its max is -inf; shift by 0 then, so that
            # exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
            m_use = m_new if m_new != -INFINITY else 0
            alpha = _exp(m_run[i] - m_use)
            m_run[i] = m_new
            l_run[i] = l_run[i] * alpha + _exp_shift_sum(s_row, k_rows, m_use)
            if alpha != 1:
                o_row = o_acc + i * d_v
                for j in range(d_v):
                    o_row[j] = o_row[j] * alpha
        # o_acc (q_rows x d_v) += P (q_rows x k_rows) @ V_blk (k_rows x d_v)
        if micro:
            # The tile's value chunks [v_first, v_need) into vp (packing what is not there
            # yet) unless v is read in place; v_next: the keys after the tile that vb holds
            # (the next tile's, prefetched during this one).
            v_next = k_end - k_start - k_rows
            if not v_in_place:
                v_first = k_start // FA_MK_PV_CHUNK
                v_need = (k_start + k_rows + FA_MK_PV_CHUNK - 1) // FA_MK_PV_CHUNK
                if (packed[3] != <Py_ssize_t> v or v_first < packed[4]
                        or v_need > packed[4] + vp_chunks):
                    packed[3] = <Py_ssize_t> v
                    packed[4] = v_first
                    packed[5] = v_first
                if packed[5] < v_need:
                    _pack_values(v + packed[4] * FA_MK_PV_CHUNK * d_v,
                                 n_keys - packed[4] * FA_MK_PV_CHUNK, d_v,
                                 vp + (packed[5] - packed[4]) * FA_MK_PV_CHUNK * d_v,
                                 packed[5] - packed[4], v_need - packed[4])
                    packed[5] = v_need
                vb = vp
                v_origin = packed[4] * FA_MK_PV_CHUNK
                v_next = min(v_next, packed[5] * FA_MK_PV_CHUNK - k_start - k_rows)
            _mk_pv(s_tile + off, ld, q_rows, vb, k_start - v_origin, k_rows, max(v_next, 0),
                   d_v, o_acc)
        else:
            _gemm(False, <int> q_rows, <int> d_v, <int> k_rows, 1,
                  s_tile, <int> k_rows, v + k_start * d_v, <int> d_v,
                  1, o_acc, <int> d_v)
        k_start = k_start + k_rows

    for i in range(q_rows):
        o_row = out + (q_start + i) * d_v
        if l_run[i] == 0:
            # Every key hidden from this query: zeros, as PyTorch and FlashAttention give.
            for j in range(d_v):
                o_row[j] = 0
        else:
            inv = <floating> (1.0 / l_run[i])
            for j in range(d_v):
                o_row[j] = o_acc[i * d_v + j] * inv
        if lse != NULL:
            lse[q_start + i] = <floating> (m_run[i] + log(l_run[i]))


# A thread keeps a head's packed keys in at most this many bytes of its scratch: all of
# them up to 65,536 keys of D 64 in float32 (16 MiB). A longer head's keys are packed in
# runs of that many, again for each query block: memory before speed at such lengths.
# The same for its packed values (where they are not read in place).
cdef enum:
    KP_MAX_BYTES = 16 * 1024 * 1024
    VP_MAX_BYTES = 16 * 1024 * 1024
# The per-thread scratch of the fused kernel, in floating elements from the start of one
# thread's part (computed once per call by _scratch_layout, carved by _attend_item).
cdef enum:
    SCR_S_TILE = 0  # score tile, q_block x s_width
    SCR_O_ACC       # output accumulator, q_block x d_v
    SCR_M_RUN       # running max, q_block
    SCR_KP          # packed keys of a head, d_head x SCR_KP_KEYS (micro-kernels only)
    SCR_VP          # packed values of a head, SCR_VP_CHUNKS chunks (micro-kernels only)
    SCR_QS          # scaled query block, q_block x d_head (micro-kernels only)
    SCR_L_RUN       # running sum, q_block doubles, 64-byte aligned
    SCR_PACKED      # which head's keys kp holds, from and to, and its values: 6 Py_ssize_t
    SCR_SIZE        # the whole part, a multiple of 64 bytes
    SCR_KP_KEYS     # (not a place) how many keys SCR_KP has room for
    SCR_VP_CHUNKS   # (not a place) how many value chunks SCR_VP has room for
    SCR_N


cdef void _scratch_layout(Py_ssize_t q_block, Py_ssize_t s_width, Py_ssize_t kp_width,
                          Py_ssize_t vp_chunks, Py_ssize_t d_head, Py_ssize_t d_v, bint micro,
                          size_t item, Py_ssize_t *at) noexcept nogil:
    """at[SCR_*] = where each buffer starts in one thread's scratch (in elements of item
    bytes), and at[SCR_SIZE] its length: each part and the doubles start 64-byte aligned."""
    cdef Py_ssize_t per_line = 64 // item
    at[SCR_S_TILE] = 0
    at[SCR_O_ACC] = at[SCR_S_TILE] + q_block * s_width
    at[SCR_M_RUN] = at[SCR_O_ACC] + q_block * d_v
    at[SCR_KP] = at[SCR_M_RUN] + q_block
    at[SCR_VP] = at[SCR_KP] + (d_head * kp_width if micro else 0)
    at[SCR_QS] = at[SCR_VP] + (vp_chunks * FA_MK_PV_CHUNK * d_v if micro else 0)
    at[SCR_L_RUN] = _round_up(at[SCR_QS] + (q_block * d_head if micro else 0), per_line)
    at[SCR_PACKED] = _round_up(at[SCR_L_RUN] + q_block * (sizeof(double) // item), per_line)
    at[SCR_SIZE] = at[SCR_PACKED] + per_line
    at[SCR_KP_KEYS] = kp_width
    at[SCR_VP_CHUNKS] = vp_chunks


cdef void _run_layout(Py_ssize_t q_block, Py_ssize_t k_block, Py_ssize_t n_keys,
                      Py_ssize_t d_head, Py_ssize_t d_v, bint micro, size_t item,
                      Py_ssize_t *at) noexcept nogil:
    """_scratch_layout for a call of the fused kernel with these sizes."""
    # Score tile width: k_block, or with micro-kernels the whole key panels a block of
    # k_block keys starting anywhere touches.
    cdef Py_ssize_t s_width = _round_up(k_block, FA_MK_KEYS) + FA_MK_KEYS if micro else k_block
    # Room for a head's packed keys, up to KP_MAX_BYTES (and at least one tile's panels).
    cdef Py_ssize_t kp_keys = KP_MAX_BYTES // (max(d_head, 1) * <Py_ssize_t> item)
    kp_keys = max(s_width, kp_keys // FA_MK_KEYS * FA_MK_KEYS)
    # Room for a head's packed values likewise (at least the chunks one tile touches), or
    # none where they are read in place.
    cdef Py_ssize_t vp_chunks = 0
    if micro and not _values_in_place(d_v, item):
        vp_chunks = max((k_block + FA_MK_PV_CHUNK - 1) // FA_MK_PV_CHUNK + 1,
                        VP_MAX_BYTES // (FA_MK_PV_CHUNK * max(d_v, 1) * <Py_ssize_t> item))
        vp_chunks = min((n_keys + FA_MK_PV_CHUNK - 1) // FA_MK_PV_CHUNK, vp_chunks)
    _scratch_layout(q_block, s_width, min(_round_up(n_keys, FA_MK_KEYS), kp_keys), vp_chunks,
                    d_head, d_v, micro, item, at)


cdef inline void _attend_item(
        Py_ssize_t w, Py_ssize_t n_qblocks, Py_ssize_t q_block, Py_ssize_t k_block,
        const floating *q, const floating *k, const floating *v,
        const floating *add_base, const unsigned char *bool_base, int mask_kind,
        const Py_ssize_t *index, Py_ssize_t n_batch, Py_ssize_t n_queries, Py_ssize_t n_keys,
        Py_ssize_t d_head, Py_ssize_t d_v, bint causal, Py_ssize_t window, floating scale,
        floating softcap, const floating *sinks, floating *buf, const Py_ssize_t *at,
        bint micro, floating *out, floating *lse) noexcept nogil:
    """Work item w: query block w % n_qblocks of batch entry w // n_qblocks."""
    cdef Py_ssize_t b = w // n_qblocks
    cdef Py_ssize_t q_start = (w % n_qblocks) * q_block
    cdef Py_ssize_t q_item = index[b], kv_item = index[n_batch + b]
    cdef Py_ssize_t mask_item = index[2 * n_batch + b]
    _attend_block(q + q_item * n_queries * d_head, k + kv_item * n_keys * d_head,
                  v + kv_item * n_keys * d_v,
                  add_base + mask_item * n_queries * n_keys if mask_kind == MASK_ADD else NULL,
                  bool_base + mask_item * n_queries * n_keys if mask_kind == MASK_BOOL else NULL,
                  mask_kind, q_start, min(q_block, n_queries - q_start), n_queries,
                  n_keys, d_head, d_v, k_block, causal, window, scale, softcap,
                  sinks + b if sinks != NULL else NULL, buf + at[SCR_S_TILE], buf + at[SCR_O_ACC], buf + at[SCR_M_RUN],
                  <double*> (buf + at[SCR_L_RUN]), buf + at[SCR_KP], at[SCR_KP_KEYS],
                  <Py_ssize_t*> (buf + at[SCR_PACKED]), buf + at[SCR_VP], at[SCR_VP_CHUNKS],
                  buf + at[SCR_QS], micro,
                  out + b * n_queries * d_v, lse + b * n_queries)


cdef int _attention_run(const floating *q, const floating *k, const floating *v,
                        const floating *add_base, const unsigned char *bool_base, int mask_kind,
                        const Py_ssize_t *index, Py_ssize_t n_batch, Py_ssize_t n_queries,
                        Py_ssize_t n_keys, Py_ssize_t d_head, Py_ssize_t d_v, bint causal,
                        Py_ssize_t window, double scale, double softcap,
                        const floating *sinks, floating *out, floating *lse,
                        Py_ssize_t q_block, Py_ssize_t k_block, bint micro,
                        int n_threads, Py_ssize_t w_start, Py_ssize_t w_stop,
                        floating *kept) noexcept nogil:
    """The fused kernel on raw pointers (see attention), work items w_start <= w < w_stop
    (w_stop < 0: all): the team size, or -1 when the scratch cannot be allocated. kept:
    the scratch of attention_scratch (64-byte aligned), or NULL to allocate one here."""
    cdef Py_ssize_t n_qblocks = (n_queries + q_block - 1) // q_block
    cdef Py_ssize_t n_work = n_batch * n_qblocks
    cdef Py_ssize_t at[SCR_N]
    cdef Py_ssize_t w
    cdef floating *scratch = kept
    cdef int team = 1, t
    _run_layout(q_block, k_block, n_keys, d_head, d_v, micro, sizeof(floating), at)
    if kept == NULL:
        scratch = <floating*> aligned_alloc(64, n_threads * at[SCR_SIZE] * sizeof(floating))
        if scratch == NULL:
            return -1
        for t in range(n_threads):  # no head's keys or values packed yet
            (<Py_ssize_t*> (scratch + t * at[SCR_SIZE] + at[SCR_PACKED]))[0] = 0
            (<Py_ssize_t*> (scratch + t * at[SCR_SIZE] + at[SCR_PACKED]))[3] = 0
    if w_stop < 0 or w_stop > n_work:
        w_stop = n_work
    if n_threads == 1:
        # No OpenMP region for serial work: entering one costs more than a tiny call.
        for w in range(w_start, w_stop):
            _attend_item(w, n_qblocks, q_block, k_block, q, k, v, add_base, bool_base,
                         mask_kind, index, n_batch, n_queries, n_keys, d_head, d_v, causal,
                         window, <floating> scale, <floating> softcap, sinks, scratch, at,
                         micro, out, lse)
    else:
        # Dynamic: on a shared machine a core that loses time to a neighbour takes fewer
        # items instead of holding the others at the barrier (Zen 5 EPYC, alternating
        # processes: long, medium and causal 0-5% faster, 128 and 256 tokens equal). Items
        # are handed out in order, so a thread's next item is mostly of the same head and
        # reuses its packed keys. Results do not depend on which thread runs an item.
        for w in prange(w_start, w_stop, num_threads=n_threads, schedule='dynamic', chunksize=1):
            _attend_item(w, n_qblocks, q_block, k_block, q, k, v, add_base, bool_base,
                         mask_kind, index, n_batch, n_queries, n_keys, d_head, d_v, causal,
                         window, <floating> scale, <floating> softcap, sinks,
                         scratch + threadid() * at[SCR_SIZE], at, micro, out, lse)
            team = fa_omp_team_size()  # every thread writes the same value
    if kept == NULL:
        free(scratch)
    return team


def attention(const floating[:, :, ::1] q, const floating[:, :, ::1] k,
              const floating[:, :, ::1] v, object mask, int mask_kind,
              const Py_ssize_t[:, ::1] index, bint causal, Py_ssize_t window, double scale,
              double softcap, object sinks, floating[:, :, ::1] out, floating[:, ::1] lse,
              Py_ssize_t q_block, Py_ssize_t k_block, bint microkernels, int n_threads,
              Py_ssize_t w_start=0, Py_ssize_t w_stop=-1, object scratch=None):
    """out[b] = softmax(scale q[i0] k[i1].T + mask[i2]) v[i1], (i0, i1, i2) = index[:, b], fused.

    causal hides keys after each query's own position; window (0: none) also hides keys
    at or before `window` positions back. Key blocks that are entirely hidden are skipped.
    softcap (0: none) caps the scores to softcap tanh(s / softcap) before the masks; sinks
    (None, or one logit per batch entry, shape (n_batch,)) adds a key with that logit and a
    zero value to every softmax row of the entry.

    mask is None (MASK_NONE), a float array added to the scores (MASK_ADD) or a uint8 array,
    0 = hidden (MASK_BOOL), of shape (n_masks, n_queries, n_keys). microkernels: run the
    tile GEMMs in this build's micro-kernels (the caller decides; ignored where the build
    has none) instead of BLAS. Work is split over (batch entry, query block); each item is
    computed start to end by one thread with the same block sizes, so results do not
    depend on the thread count, nor on running the items w_start <= w < w_stop (w_stop -1:
    to the end; item w is query block w % n_qblocks of batch entry w // n_qblocks) in
    several calls, which is how a long call lets Python handle signals between them.
    scratch: None (each call allocates its own), or the attention_scratch of this call's
    sizes and n_threads, passed to each of those calls: one allocation for all of them, and
    the keys a thread packed in one piece serve it in the next. Returns the number of
    threads that ran (the OpenMP team), or -1 if the scratch cannot be allocated.
    """
    cdef const floating[:, :, ::1] add_mask
    cdef const unsigned char[:, :, ::1] bool_mask
    cdef const floating *add_base = NULL
    cdef const unsigned char *bool_base = NULL
    cdef const floating[::1] sink_view
    cdef const floating *sink_base = NULL
    cdef int team
    cdef bint micro = FA_MICROKERNELS != 0 and microkernels
    cdef unsigned char[::1] kept_view
    cdef floating *kept = NULL
    cdef Py_ssize_t at[SCR_N]
    if scratch is not None:
        kept_view = scratch
        _run_layout(q_block, k_block, k.shape[1], q.shape[2], out.shape[2], micro,
                    sizeof(floating), at)
        if kept_view.shape[0] < n_threads * at[SCR_SIZE] * <Py_ssize_t> sizeof(floating) + 64:
            raise ValueError("attention: the scratch is smaller than these sizes need")
        kept = <floating*> _round_up(<Py_ssize_t> &kept_view[0], 64)
    if mask_kind == MASK_BOOL:
        bool_mask = mask
        bool_base = &bool_mask[0, 0, 0]
    elif mask_kind == MASK_ADD:
        add_mask = mask
        add_base = &add_mask[0, 0, 0]
    if sinks is not None:
        sink_view = sinks
        sink_base = &sink_view[0]
    with nogil:
        team = _attention_run(&q[0, 0, 0], &k[0, 0, 0], &v[0, 0, 0], add_base, bool_base,
                              mask_kind, &index[0, 0], out.shape[0], out.shape[1], k.shape[1],
                              q.shape[2], out.shape[2], causal, window, scale, softcap,
                              sink_base, &out[0, 0, 0], &lse[0, 0], q_block, k_block, micro,
                              n_threads, w_start, w_stop, kept)
    return team


def attention_scratch(Py_ssize_t n_keys, Py_ssize_t d_head, Py_ssize_t d_v,
                      Py_ssize_t q_block, Py_ssize_t k_block, bint microkernels,
                      Py_ssize_t itemsize, int n_threads):
    """The per-thread scratch of attention() with these sizes (itemsize 4: float32, 8:
    float64) on n_threads, as a uint8 array (64 bytes over, for alignment), with no keys
    packed yet; for the pieces of one long call, which then share one allocation and
    each thread's packed keys."""
    cdef bint micro = FA_MICROKERNELS != 0 and microkernels
    cdef Py_ssize_t at[SCR_N]
    _run_layout(q_block, k_block, n_keys, d_head, d_v, micro, itemsize, at)
    return _np.zeros(n_threads * at[SCR_SIZE] * itemsize + 64, _np.uint8)


# --------------------------------------------------------------------------- small calls

cdef object _ndarray = _np.ndarray
cdef object _float32 = _np.dtype(_np.float32)
cdef object _float64 = _np.dtype(_np.float64)


cdef void _tiles(Py_ssize_t n_batch, Py_ssize_t n_queries, Py_ssize_t n_keys, bint causal,
                 Py_ssize_t itemsize, Py_ssize_t q_block_max, Py_ssize_t k_block_max,
                 Py_ssize_t min_q_block, Py_ssize_t min_work_items,
                 Py_ssize_t *q_block_out, Py_ssize_t *k_block_out) noexcept nogil:
    """The tile rule of fastattn._plan.tiles (which calls tiles() below: one rule)."""
    # Causal rows see a triangle: smaller query blocks skip more and balance better.
    cdef Py_ssize_t q_block = max(1, q_block_max // 2) if causal else q_block_max
    while q_block > min_q_block and n_batch * ((n_queries + q_block - 1) // q_block) < min_work_items:
        q_block = q_block // 2
    # A float64 tile of 256 x 512 would not fit the L2 cache beside its operands.
    cdef Py_ssize_t k_block = k_block_max if itemsize == 4 else max(1, k_block_max // 2)
    q_block_out[0] = min(q_block, n_queries)
    k_block_out[0] = min(k_block, n_keys)


def tiles(Py_ssize_t n_batch, Py_ssize_t n_queries, Py_ssize_t n_keys, bint causal,
          Py_ssize_t itemsize, Py_ssize_t q_block_max, Py_ssize_t k_block_max,
          Py_ssize_t min_q_block, Py_ssize_t min_work_items):
    """(query rows, keys) per tile; see fastattn._plan.tiles."""
    cdef Py_ssize_t q_block, k_block
    _tiles(n_batch, n_queries, n_keys, causal, itemsize, q_block_max, k_block_max,
           min_q_block, min_work_items, &q_block, &k_block)
    return q_block, k_block


cdef object _small_shape(object q, object k, object v):
    """(n_batch, L_q, L_k, D, D_v, G) when q, k, v are what the small-call path takes, else
    None: NumPy arrays (not subclasses) of one native float32 or float64 dtype,
    C-contiguous, with the same batch dimensions (no broadcasting) but for grouped-query
    heads: the head axis (-3) of k and v may divide q's, G query heads per key/value head
    (G = 1 otherwise); and no empty axis."""
    cdef object dtype = getattr(q, "dtype", None)
    cdef tuple q_shape, k_shape, v_shape
    cdef Py_ssize_t ndim, i, n_batch = 1, group = 1
    if type(q) is not _ndarray or type(k) is not _ndarray or type(v) is not _ndarray:
        return None
    if (dtype is not _float32 and dtype is not _float64) or k.dtype is not dtype or v.dtype is not dtype:
        return None
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    ndim = len(q_shape)
    if ndim < 2 or len(k_shape) != ndim or len(v_shape) != ndim:
        return None
    for i in range(ndim - 2):
        if q_shape[i] != k_shape[i] or q_shape[i] != v_shape[i]:
            if (i != ndim - 3 or k_shape[i] != v_shape[i] or k_shape[i] < 1
                    or q_shape[i] % k_shape[i] != 0):
                return None
            group = q_shape[i] // k_shape[i]
        n_batch *= <Py_ssize_t> q_shape[i]
    n_queries, n_keys = q_shape[ndim - 2], k_shape[ndim - 2]
    d_head, d_v = q_shape[ndim - 1], v_shape[ndim - 1]
    if (k_shape[ndim - 1] != d_head or v_shape[ndim - 2] != n_keys or n_batch < 1
            or n_queries < 1 or n_keys < 1 or d_head < 1 or d_v < 1):
        return None
    return n_batch, n_queries, n_keys, d_head, d_v, group


cdef bint _c_buffer(object a, Py_buffer *view):
    """Acquire a's buffer if it is C-contiguous (True), else nothing (False)."""
    try:
        PyObject_GetBuffer(a, view, PyBUF_C_CONTIGUOUS)
    except (ValueError, BufferError):
        return False
    return True


cdef bint _c_buffers(object q, object k, object v, Py_buffer *qb, Py_buffer *kb,
                     Py_buffer *vb):
    """Acquire the buffers of q, k and v if all three are C-contiguous (True), else none
    of them (False)."""
    if not _c_buffer(q, qb):
        return False
    if not _c_buffer(k, kb):
        PyBuffer_Release(qb)
        return False
    if not _c_buffer(v, vb):
        PyBuffer_Release(qb)
        PyBuffer_Release(kb)
        return False
    return True


def small_attention(object q, object k, object v, bint causal, Py_ssize_t window, object scale,
                    double softcap, object sinks, tuple policy, int n_threads):
    """(attention(q, k, v, causal=causal, window=window or None, scale=scale,
    softcap=softcap or None, sinks=sinks) with every other argument at its default, the
    threads that ran), or None when the call is not a small one
    (fastattn._run.small_attention says which). scale: None (1 / sqrt(D)) or a finite
    float, as the general path's check_scale returns it. For one query per batch entry
    only: window 0 (none) or >= 1 with causal (its last `window` keys, as
    fastattn._plan.window_as_keys); softcap 0 (none) or finite > 0; sinks None or what
    _small_sinks takes.

    One query per batch entry runs the decoding kernel, of any size, on up to n_threads
    threads, grouped-query heads too; more queries (not grouped) run the fused kernel on
    one thread, below SERIAL_FLOPS.
    policy: (Q_BLOCK, K_BLOCK, MIN_Q_BLOCK, MIN_WORK_ITEMS, SERIAL_FLOPS, BLAS_SERIAL_MNK,
    micro-kernel lanes for float32, for float64 (0: BLAS), DECODE_CHUNK) from
    fastattn._plan and _run, so that the kernel, its tiles, the thread count and the
    micro-kernel choice are the general path's and the result is bitwise the same. Never
    raises but MemoryError.
    """
    cdef object shape = _small_shape(q, k, v)
    cdef Py_ssize_t n_batch, n_queries, n_keys, d_head, d_v, group, q_block, k_block, lanes, b
    cdef Py_ssize_t itemsize
    cdef double c_scale
    cdef bint micro
    cdef Py_buffer qb, kb, vb, ob
    cdef Py_ssize_t *index
    cdef void *lse
    cdef int team
    cdef object out
    cdef tuple q_shape
    if shape is None:
        return None
    n_batch, n_queries, n_keys, d_head, d_v, group = shape
    c_scale = 1.0 / sqrt(<double> d_head) if scale is None else <double> scale
    if n_queries == 1:
        return _small_decode(q, k, v, n_batch // group, group, n_keys,
                             n_keys - window if 0 < window < n_keys else 0, d_head, d_v,
                             c_scale, softcap, sinks, policy, n_threads)
    if group != 1 or window != 0 or softcap != 0 or sinks is not None:
        return None
    if 2.0 * n_batch * n_queries * n_keys * (d_head + d_v) >= <double> policy[4]:
        return None
    itemsize = 4 if q.dtype is _float32 else 8
    _tiles(n_batch, n_queries, n_keys, causal, itemsize, policy[0], policy[1], policy[2],
           policy[3], &q_block, &k_block)
    lanes = policy[6] if itemsize == 4 else policy[7]
    micro = FA_MICROKERNELS != 0 and lanes > 0 and d_head % lanes == 0 and d_v % lanes == 0
    if not micro and q_block * k_block * max(d_head, d_v) > <Py_ssize_t> policy[5]:
        return None  # a BLAS tile the general path would hold to one thread
    # C-contiguity, checked by the buffer request itself: a strided array falls back.
    if not _c_buffers(q, k, v, &qb, &kb, &vb):
        return None
    try:
        q_shape = q.shape
        out = _np.empty(q_shape[:len(q_shape) - 1] + (d_v,), q.dtype)
        PyObject_GetBuffer(out, &ob, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
        index = <Py_ssize_t*> malloc(3 * n_batch * sizeof(Py_ssize_t))
        lse = malloc(n_batch * n_queries * itemsize)
        if index == NULL or lse == NULL:
            free(index)
            free(lse)
            PyBuffer_Release(&ob)
            raise MemoryError("attention: cannot allocate the per-thread scratch")
        # The general path's index maps for this layout: q and k/v entry b, mask entry 0.
        for b in range(n_batch):
            index[b] = b
            index[n_batch + b] = b
            index[2 * n_batch + b] = 0
        with nogil:
            if itemsize == 4:
                team = _attention_run(<const float*> qb.buf, <const float*> kb.buf,
                                      <const float*> vb.buf, NULL, NULL, MASK_NONE, index,
                                      n_batch, n_queries, n_keys, d_head, d_v, causal, 0,
                                      c_scale, 0, NULL, <float*> ob.buf,
                                      <float*> lse, q_block, k_block, micro, 1, 0, -1, NULL)
            else:
                team = _attention_run(<const double*> qb.buf, <const double*> kb.buf,
                                      <const double*> vb.buf, NULL, NULL, MASK_NONE, index,
                                      n_batch, n_queries, n_keys, d_head, d_v, causal, 0,
                                      c_scale, 0, NULL, <double*> ob.buf,
                                      <double*> lse, q_block, k_block, micro, 1, 0, -1, NULL)
        free(index)
        free(lse)
        PyBuffer_Release(&ob)
        if team < 0:
            raise MemoryError("attention: cannot allocate the per-thread scratch")
        return out, team
    finally:
        PyBuffer_Release(&qb)
        PyBuffer_Release(&kb)
        PyBuffer_Release(&vb)


cdef void *_small_sinks(object sinks, object q, Py_ssize_t n_batch):
    """The sinks of a small decoding call, one per batch entry (malloc'd, the caller frees
    it), or NULL when the general path must take them: an ndarray (not a subclass) of q's
    dtype, one value per query head, shape (H,) for q (..., H, 1, D), each finite or -inf
    (check_sinks's rule: anything else is its error to raise)."""
    cdef Py_buffer sb
    cdef Py_ssize_t i, n_heads, item = 4 if q.dtype is _float32 else 8
    cdef double x
    cdef void *tiled
    cdef tuple q_shape = q.shape
    if (type(sinks) is not _ndarray or sinks.dtype is not q.dtype or sinks.ndim != 1
            or len(q_shape) < 3 or sinks.shape[0] != q_shape[len(q_shape) - 3]):
        return NULL
    n_heads = sinks.shape[0]
    if n_heads < 1 or not _c_buffer(sinks, &sb):
        return NULL
    tiled = malloc(n_batch * item)
    if tiled != NULL:
        for i in range(n_batch):  # entry i of the flattened batch is head i % H
            x = (<float*> sb.buf)[i % n_heads] if item == 4 else (<double*> sb.buf)[i % n_heads]
            if x != x or x == INFINITY:
                free(tiled)
                tiled = NULL
                break
            if item == 4:
                (<float*> tiled)[i] = <float> x
            else:
                (<double*> tiled)[i] = x
    PyBuffer_Release(&sb)
    return tiled  # NULL too if malloc failed: the general path then allocates (or raises)


cdef object _small_decode(object q, object k, object v, Py_ssize_t n_groups, Py_ssize_t group,
                          Py_ssize_t n_keys, Py_ssize_t start, Py_ssize_t d_head,
                          Py_ssize_t d_v, double scale, double softcap, object sinks,
                          tuple policy, int n_threads):
    """small_attention for one query per batch entry: kv entry g for the `group` query
    heads of group g, its keys start to n_keys, in C-contiguous arrays (None when one is
    not, or the sinks are not what _small_sinks takes)."""
    cdef Py_buffer qb, kb, vb
    cdef Py_ssize_t item = 4 if q.dtype is _float32 else 8
    cdef void *sink_buf = NULL
    if sinks is not None:
        sink_buf = _small_sinks(sinks, q, n_groups * group)
        if sink_buf == NULL:
            return None
    if not _c_buffers(q, k, v, &qb, &kb, &vb):
        free(sink_buf)
        return None
    try:
        return _decode_call(q, qb.buf, <char*> kb.buf + start * d_head * item,
                            <char*> vb.buf + start * d_v * item, n_keys * d_head,
                            n_keys * d_v, n_groups, group, n_keys - start, d_head, d_v, scale,
                            softcap, sink_buf, policy[4], policy[8], n_threads)
    finally:
        free(sink_buf)
        PyBuffer_Release(&qb)
        PyBuffer_Release(&kb)
        PyBuffer_Release(&vb)


cdef tuple _decode_call(object q, const void *q_buf, const void *k_buf, const void *v_buf,
                        Py_ssize_t k_item, Py_ssize_t v_item, Py_ssize_t n_groups,
                        Py_ssize_t group, Py_ssize_t n_keys, Py_ssize_t d_head, Py_ssize_t d_v,
                        double scale, double softcap, const void *sinks, double serial_flops,
                        Py_ssize_t chunk, int n_threads):
    """(out, threads that ran): the general path's decoding call (fastattn._run.run_decode)
    with this scale, soft cap (0: none) and sinks (NULL: none; else one per query row, in
    q's dtype), for the single queries of q (its
    buffer q_buf, C-contiguous: n_groups groups of `group` query heads) against kv entry
    g (k_item, v_item elements apart in k_buf, v_buf; rows contiguous) for group g. Its
    thread rule (one below serial_flops, else at most one per work item of `chunk` keys:
    fastattn._plan's SERIAL_FLOPS and DECODE_CHUNK) and chunks, so that the result is
    bitwise the general path's."""
    cdef Py_ssize_t g
    cdef Py_ssize_t n_work = n_groups * ((n_keys + chunk - 1) // chunk)
    cdef int team = 1
    cdef Py_buffer ob
    cdef Py_ssize_t *index
    cdef void *lse
    cdef tuple q_shape = q.shape
    cdef bint single = q.dtype is _float32
    cdef object out = _np.empty(q_shape[:len(q_shape) - 1] + (d_v,), q.dtype)
    if 2.0 * n_groups * group * n_keys * (d_head + d_v) >= serial_flops:
        team = <int> min(<Py_ssize_t> n_threads, n_work)
    PyObject_GetBuffer(out, &ob, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE)
    index = <Py_ssize_t*> malloc(n_groups * sizeof(Py_ssize_t))
    lse = malloc(n_groups * group * (4 if single else 8))
    if index == NULL or lse == NULL:
        free(index)
        free(lse)
        PyBuffer_Release(&ob)
        raise MemoryError("attention: cannot allocate the decoding scratch")
    for g in range(n_groups):
        index[g] = g
    with nogil:
        if single:
            team = _decode_run(<const float*> q_buf, k_buf, v_buf, False, k_item, v_item,
                               index, n_groups, group, d_head, n_keys, d_v,
                               scale, softcap, <const float*> sinks,
                               <float*> ob.buf, <float*> lse, chunk, team)
        else:
            team = _decode_run(<const double*> q_buf, k_buf, v_buf, False, k_item, v_item,
                               index, n_groups, group, d_head, n_keys, d_v,
                               scale, softcap, <const double*> sinks,
                               <double*> ob.buf, <double*> lse, chunk, team)
    free(index)
    free(lse)
    PyBuffer_Release(&ob)
    if team < 0:
        raise MemoryError("attention: cannot allocate the decoding scratch")
    return out, team


def cache_decode(object q, object k_store, object v_store, Py_ssize_t start, Py_ssize_t n_keys,
                 double serial_flops, Py_ssize_t chunk, int n_threads):
    """(attention(q, cache=c), threads that ran) with every other argument at its
    default, read from the cache's storage arrays (B, H_kv, rows, D or D_v), rows start
    to start + n_keys; or None: q must be a C-contiguous ndarray (B, H, 1, D) in the
    storage's dtype (float32 or float64), with H a multiple of H_kv (fastattn.cache.
    decode_step checked the shapes). Reading the storage, not a view of it, spares NumPy
    building the buffer description of a new view at every step. The general path's
    decoding call, bitwise (see _decode_call)."""
    cdef Py_buffer qb, kb, vb
    cdef tuple q_shape, k_shape, v_shape
    cdef Py_ssize_t rows, item
    cdef object dtype = getattr(q, "dtype", None)
    if (type(q) is not _ndarray or (dtype is not _float32 and dtype is not _float64)
            or k_store.dtype is not dtype or v_store.dtype is not dtype):
        return None
    q_shape, k_shape, v_shape = q.shape, k_store.shape, v_store.shape
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4 or q_shape[2] != 1:
        return None
    rows = k_shape[2]
    if (v_shape[2] != rows or n_keys < 1 or start < 0 or start + n_keys > rows
            or k_shape[0] * k_shape[1] < 1):
        return None
    if not _c_buffers(q, k_store, v_store, &qb, &kb, &vb):
        return None
    item = 4 if dtype is _float32 else 8
    try:
        return _decode_call(q, qb.buf, <char*> kb.buf + start * kb.shape[3] * item,
                            <char*> vb.buf + start * vb.shape[3] * item,
                            rows * kb.shape[3], rows * vb.shape[3], kb.shape[0] * kb.shape[1],
                            q_shape[1] // kb.shape[1], n_keys, kb.shape[3], vb.shape[3],
                            1.0 / sqrt(<double> kb.shape[3]), 0, NULL, serial_flops, chunk,
                            n_threads)
    finally:
        PyBuffer_Release(&qb)
        PyBuffer_Release(&kb)
        PyBuffer_Release(&vb)


# --------------------------------------------------------------------------- decoding

cdef int _decode_run(const floating *q, const void *k, const void *v, bint kv_bf16,
                     Py_ssize_t k_item, Py_ssize_t v_item, const Py_ssize_t *kv_index,
                     Py_ssize_t n_groups, Py_ssize_t n_rows, Py_ssize_t d, Py_ssize_t n_keys,
                     Py_ssize_t d_v, double scale, double softcap, const floating *sink_base,
                     floating *out, floating *lse, Py_ssize_t chunk,
                     int n_threads) noexcept nogil:
    """The decoding kernel on raw pointers (see decode); k and v hold floating, or
    bfloat16 (kv_bf16, floating = float). k_item, v_item: elements between kv heads."""
    cdef Py_ssize_t n_chunks = (n_keys + chunk - 1) // chunk
    cdef Py_ssize_t n_work = n_groups * n_chunks
    # Partial state per work item: m (n_rows), o (n_rows * d_v), in floating; l in double.
    cdef Py_ssize_t part = n_rows * (1 + d_v)
    # The scores of each thread start on a cache line (rows of FA_DECODE_BLOCK keys are
    # whole lines): the kernel stores and reloads them as full vectors.
    cdef Py_ssize_t s_size = n_rows * FA_DECODE_BLOCK
    cdef floating *parts = <floating*> malloc(n_work * part * sizeof(floating))
    cdef double *l_parts = <double*> malloc(n_work * n_rows * sizeof(double))
    cdef floating *s_all = <floating*> aligned_alloc(64, n_threads * s_size * sizeof(floating))
    cdef Py_ssize_t w, grp, k0, k_at, v_at
    cdef int team = 1
    cdef int *team_out = &team
    if parts == NULL or l_parts == NULL or s_all == NULL:
        free(parts)
        free(l_parts)
        free(s_all)
        return -1
    with parallel(num_threads=n_threads):
        for w in prange(n_work, schedule='static'):
            grp = w // n_chunks
            k0 = (w % n_chunks) * chunk
            k_at = kv_index[grp] * k_item + k0 * d
            v_at = kv_index[grp] * v_item + k0 * d_v
            if floating is float:
                if kv_bf16:
                    fa_decode_chunk_bf(q + grp * n_rows * d, n_rows, d,
                                       <const uint16_t*> k + k_at, <const uint16_t*> v + v_at,
                                       d_v, min(chunk, n_keys - k0), <float> scale,
                                       <float> softcap, parts + w * part, l_parts + w * n_rows,
                                       parts + w * part + n_rows, s_all + threadid() * s_size)
                else:
                    fa_decode_chunk_f(q + grp * n_rows * d, n_rows, d,
                                      <const float*> k + k_at, <const float*> v + v_at, d_v,
                                      min(chunk, n_keys - k0), <float> scale, <float> softcap,
                                      parts + w * part, l_parts + w * n_rows,
                                      parts + w * part + n_rows, s_all + threadid() * s_size)
            else:
                fa_decode_chunk_d(q + grp * n_rows * d, n_rows, d,
                                  <const double*> k + k_at, <const double*> v + v_at, d_v,
                                  min(chunk, n_keys - k0), scale, softcap,
                                  parts + w * part, l_parts + w * n_rows,
                                  parts + w * part + n_rows, s_all + threadid() * s_size)
            team_out[0] = fa_omp_team_size()
        # Each group's chunks, merged in chunk order (after the loop's barrier).
        for grp in prange(n_groups, schedule='static'):
            if floating is float:
                fa_decode_merge_f(parts + grp * n_chunks * part, l_parts + grp * n_chunks * n_rows,
                                  n_chunks, n_rows, d_v,
                                  sink_base + grp * n_rows if sink_base != NULL else NULL,
                                  out + grp * n_rows * d_v, lse + grp * n_rows)
            else:
                fa_decode_merge_d(parts + grp * n_chunks * part, l_parts + grp * n_chunks * n_rows,
                                  n_chunks, n_rows, d_v,
                                  sink_base + grp * n_rows if sink_base != NULL else NULL,
                                  out + grp * n_rows * d_v, lse + grp * n_rows)
    free(parts)
    free(l_parts)
    free(s_all)
    return team


def decode(const floating[:, :, ::1] q, const floating[:, :, :] k,
           const floating[:, :, :] v, const Py_ssize_t[::1] kv_index, double scale,
           double softcap, object sinks, floating[:, :, ::1] out, floating[:, ::1] lse,
           Py_ssize_t chunk, int n_threads):
    """out[i] = softmax(scale q[i] k[kv_index[i]].T) v[kv_index[i]] for groups of single queries.

    softcap (0: none) caps the scores to softcap tanh(s / softcap); sinks (None, or one
    logit per query row, shaped like lse) adds a key with that logit and a zero value.

    q is (n_groups, G, D): the G query heads that share one key/value head, each with one
    query; k, v are (n_kv, L_k, D) and (n_kv, L_k, D_v) with contiguous rows (the caller
    checks) and any stride between kv heads (a cache's storage is read in place). The
    keys are split in chunks of `chunk` (fixed, not the thread count); the work items
    (group, chunk) run in parallel and their partial states are merged per group in chunk
    order, so results are bitwise thread-invariant. Returns the number of threads that
    ran, or -1 if the scratch cannot be allocated.
    """
    cdef const floating[:, ::1] sink_view
    cdef const floating *sink_base = NULL
    cdef int team
    if sinks is not None:
        sink_view = sinks
        sink_base = &sink_view[0, 0]
    with nogil:
        team = _decode_run(&q[0, 0, 0], &k[0, 0, 0], &v[0, 0, 0], False,
                           k.strides[0] // sizeof(floating), v.strides[0] // sizeof(floating),
                           &kv_index[0], q.shape[0], q.shape[1], q.shape[2], k.shape[1],
                           v.shape[2], scale, softcap, sink_base, &out[0, 0, 0], &lse[0, 0],
                           chunk, n_threads)
    return team


def decode_bf16(const float[:, :, ::1] q, const uint16_t[:, :, :] k,
                const uint16_t[:, :, :] v, const Py_ssize_t[::1] kv_index, double scale,
                double softcap, object sinks, float[:, :, ::1] out, float[:, ::1] lse,
                Py_ssize_t chunk, int n_threads):
    """decode() with bfloat16 keys and values (their bits as uint16), read in place and
    widened to float32 as they are loaded: bitwise decode() on the widened arrays."""
    cdef const float[:, ::1] sink_view
    cdef const float *sink_base = NULL
    cdef int team
    if sinks is not None:
        sink_view = sinks
        sink_base = &sink_view[0, 0]
    with nogil:
        team = _decode_run(&q[0, 0, 0], &k[0, 0, 0], &v[0, 0, 0], True,
                           k.strides[0] // sizeof(uint16_t), v.strides[0] // sizeof(uint16_t),
                           &kv_index[0], q.shape[0], q.shape[1], q.shape[2], k.shape[1],
                           v.shape[2], scale, softcap, sink_base, &out[0, 0, 0], &lse[0, 0],
                           chunk, n_threads)
    return team


# --------------------------------------------------------------------------- ceilings

def fma_loop(bint double, Py_ssize_t n_iter, int n_threads):
    """Run the FMA-peak loop (fa_bench.h) n_iter times on each of n_threads threads;
    returns the floating-point operations done (the caller times the call)."""
    cdef int t
    cdef double sink = 0
    with nogil:
        for t in prange(n_threads, num_threads=n_threads, schedule='static', chunksize=1):
            if double:
                sink += fa_fma_loop_d(n_iter, t)
            else:
                sink += fa_fma_loop_f(n_iter, <float> t)
    if sink != sink:  # the loop's result is used, so it cannot be dropped
        return 0.0
    return float(n_threads) * n_iter * fa_fma_flops_per_iter(sizeof(double) if double else sizeof(float))


def read_sum(const floating[::1] x, int n_threads):
    """Sum x once, split in n_threads contiguous parts read in parallel (the bytes-read
    ceiling of the decode rows; x.shape[0] a multiple of read_sum_multiple())."""
    cdef Py_ssize_t n = x.shape[0], part, t
    cdef double total = 0
    part = n // n_threads
    with nogil:
        for t in prange(n_threads, num_threads=n_threads, schedule='static', chunksize=1):
            if floating is float:
                total += fa_read_sum_f(&x[0] + t * part, part)
            else:
                total += fa_read_sum_d(&x[0] + t * part, part)
    return total


def read_sum_multiple():
    """read_sum reads whole blocks of this many bytes per thread."""
    return FA_BENCH_VBYTES * FA_READ_CHAINS


# --------------------------------------------------------------------------- testing aid

def tanh(const floating[::1] x, floating[::1] out):
    """out = tanh(x) with the kernels' own tanh, as the soft cap computes it (a cap of 1,
    exact: both of its vector paths and the scalar one), for the accuracy tests."""
    cdef Py_ssize_t i
    with nogil:
        for i in range(x.shape[0]):
            out[i] = x[i]
        if x.shape[0] > 0:
            _softcap_row(&out[0], x.shape[0], 1.0)


def exp(const floating[::1] x, floating[::1] out):
    """out = exp(x) with the kernels' own exp (for the accuracy tests)."""
    cdef Py_ssize_t i
    with nogil:
        for i in range(x.shape[0]):
            out[i] = _exp(x[i])

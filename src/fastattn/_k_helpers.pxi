# Helpers: the per-dtype wrappers of the C helpers and BLAS, buffers, build facts.
# Part of _kernels_impl.pxi (see there).

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


cdef inline void _mk_scores(int block, const floating *q, Py_ssize_t rows, Py_ssize_t d,
                            const floating *kp, Py_ssize_t n_cols, floating *s,
                            Py_ssize_t ld) noexcept nogil:
    """s (rows x n_cols, stride ld) = q (rows x d) @ k.T, k packed by _pack_keys, in the
    register block `block` (an index of the build's, mk_blocks())."""
    if floating is float:
        fa_mk_scores_f(block, q, rows, d, kp, n_cols, s, ld)
    else:
        fa_mk_scores_d(block, q, rows, d, kp, n_cols, s, ld)


cdef inline void _mk_pv(int block, const floating *p, Py_ssize_t ld_p, Py_ssize_t rows,
                        const floating *vp, Py_ssize_t j0, Py_ssize_t n_keys,
                        Py_ssize_t next_keys, Py_ssize_t d_v, floating *o) noexcept nogil:
    """o (rows x d_v) += p (rows x n_keys, stride ld_p) @ v[j0:j0 + n_keys], v in the
    chunk layout vp (_pack_values, or v itself where _values_in_place); the next_keys keys
    after them are in vp too (prefetched). In the register block `block`."""
    if floating is float:
        fa_mk_pv_f(block, p, ld_p, rows, vp, j0, n_keys, next_keys, d_v, o)
    else:
        fa_mk_pv_d(block, p, ld_p, rows, vp, j0, n_keys, next_keys, d_v, o)


cdef inline void _pack_keys(const floating *k, Py_ssize_t rows, Py_ssize_t d, Py_ssize_t ldk,
                            floating *kp, Py_ssize_t n_cols) noexcept nogil:
    """kp = k (rows x d, rows ldk apart) as the micro-kernel's key panels, zero keys up
    to n_cols."""
    if floating is float:
        fa_pack_keys_f(k, rows, d, ldk, kp, n_cols)
    else:
        fa_pack_keys_d(k, rows, d, ldk, kp, n_cols)


cdef inline void _pack_values(const floating *v, Py_ssize_t n_keys, Py_ssize_t d_v,
                              Py_ssize_t ldv, floating *vp, Py_ssize_t c_lo,
                              Py_ssize_t c_hi) noexcept nogil:
    """vp = chunks [c_lo, c_hi) of v (n_keys x d_v, rows ldv apart) in the micro-kernel's
    chunk layout."""
    if floating is float:
        fa_pack_values_f(v, n_keys, d_v, ldv, vp, c_lo, c_hi)
    else:
        fa_pack_values_d(v, n_keys, d_v, ldv, vp, c_lo, c_hi)


cdef inline bint _values_in_place(Py_ssize_t d_v, size_t item) noexcept nogil:
    """Whether values of this width are already in the chunk layout (one band)."""
    return fa_mk_values_in_place_f(d_v) if item == 4 else fa_mk_values_in_place_d(d_v)


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


def mk_blocks():
    """The register blocks of this build's micro-kernels, {"scores": names, "pv": names},
    each name "<rows>x<vectors>" at its index (the first: the build's default); empty
    lists in a build without micro-kernels."""
    return {"scores": [f"{fa_mk_scores_mr[i]}x{fa_mk_scores_nv[i]}" for i in range(FA_MK_SCORES_N)],
            "pv": [f"{fa_mk_pv_mr[i]}x{fa_mk_pv_nv[i]}" for i in range(FA_MK_PV_N)]}


def max_threads():
    """OpenMP's default team size (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return fa_omp_max_threads()

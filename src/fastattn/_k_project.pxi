# Projection: x @ w (+ b) in bands of rows or columns, one BLAS call per thread.
# Part of _kernels_impl.pxi (see there).

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
    thread pool never starts: after a call it spins for a while, and the first attention
    call after a projection threaded by OpenBLAS took 4x its time. Which band holds an
    output can change its last bits (OpenBLAS's kernels for a band's edges sum in another
    order), as BLAS's own thread count did."""
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

# Scores, masks and softmax: the unfused building blocks.
# Part of _kernels_impl.pxi (see there).

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

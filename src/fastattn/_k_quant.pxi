# The 8-bit caches' storage: quantizing appended keys and values (fa_quant.h).
# Part of _kernels_impl.pxi (see there).

_QUANT_KINDS = {"int8": (FA_SRC_I8, _np.int8), "float8_e4m3": (FA_SRC_F8, _np.uint8)}


def quantize(const float[:, :, :, :] x, Py_ssize_t group, str kind, int n_threads):
    """(q, scales) for x (B, H, T, D) float32 (rows contiguous, any other strides) stored
    as kind ("int8", or "float8_e4m3" as its bits in uint8), or None when x holds NaN or
    inf: q (B, H, T, D); with group > 0 one scale per channel for each group of `group`
    rows (the last may be short), scales (B, H, ceil(T / group), D) (keys); with group 0
    one per row, scales (B, H, T) (values). Each (B, H) entry is one work item."""
    cdef int c_kind = _QUANT_KINDS[kind][0]
    cdef Py_ssize_t n_b = x.shape[0], n_h = x.shape[1], n_t = x.shape[2], d = x.shape[3]
    cdef Py_ssize_t n_groups = _round_up(n_t, group) // group if group > 0 else 0
    q = _np.empty((n_b, n_h, n_t, d), _QUANT_KINDS[kind][1])
    cdef tuple s_shape = (n_b, n_h, n_t)
    if group > 0:
        s_shape = (n_b, n_h, n_groups, d)
    scales = _np.empty(s_shape, _np.float32)
    if q.size == 0:
        return q, scales
    if x.strides[3] != 4:
        raise ValueError("quantize: the rows of x must be contiguous")
    cdef int8_t[::1] q_flat = q.reshape(-1).view(_np.int8)
    cdef float[::1] s_flat = scales.reshape(-1)
    cdef char *q_base = <char*> &q_flat[0]
    cdef float *s_base = &s_flat[0]
    cdef Py_ssize_t n_work = n_b * n_h, w, b, h, t0, rows
    cdef int bad = 0
    cdef int *bad_out = &bad
    cdef double *mul
    n_threads = _team(n_threads, 4.0 * n_work * n_t * d, n_work)
    mul = <double*> malloc(max(n_threads * d, 1) * sizeof(double))
    if mul == NULL:
        raise MemoryError("KVCache: cannot allocate the quantizing scratch")
    with nogil, parallel(num_threads=n_threads):
        for w in prange(n_work, schedule='static'):
            b = w // n_h
            h = w % n_h
            if group > 0:
                t0 = 0
                while t0 < n_t:
                    rows = min(group, n_t - t0)
                    if fa_quant_cols(&x[b, h, t0, 0], rows, d, x.strides[2] // 4, c_kind,
                                     q_base + (w * n_t + t0) * d,
                                     s_base + (w * n_groups + t0 // group) * d,
                                     mul + threadid() * d):
                        bad_out[0] = 1
                    t0 = t0 + group
            elif fa_quant_rows(&x[b, h, 0, 0], n_t, d, x.strides[2] // 4, c_kind,
                               q_base + w * n_t * d, s_base + w * n_t):
                bad_out[0] = 1
    free(mul)
    return None if bad else (q, scales)


KV_GROUP = FA_KV_GROUP


def f8_to_f32(const uint8_t[::1] bits):
    """float8 e4m3 bits as float32, by the kernels' conversion (fa_f8_to_f32)."""
    result = _np.empty(bits.shape[0], _np.float32)
    cdef float[::1] r = result
    cdef Py_ssize_t i
    for i in range(bits.shape[0]):
        r[i] = fa_f8_to_f32(bits[i])
    return result


def f32_to_f8(const float[::1] x):
    """x (finite, |x| <= 448) rounded to float8 e4m3 bits by the kernels' conversion
    (fa_f32_to_f8): for the tests."""
    result = _np.empty(x.shape[0], _np.uint8)
    cdef uint8_t[::1] r = result
    cdef Py_ssize_t i
    for i in range(x.shape[0]):
        r[i] = fa_f32_to_f8(x[i])
    return result

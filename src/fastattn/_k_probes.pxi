# Probes: the machine's ceilings for the benchmark, and the kernels' own exp and tanh for the tests.
# Part of _kernels_impl.pxi (see there).

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


def engine_loop(Py_ssize_t n_iter, int n_threads):
    """Run the policy's bfloat16 engine's peak loop (fa_lp_peak_loop) n_iter times on each
    of n_threads threads; returns the floating-point operations done (0: no engine, or the
    emulation, whose speed is no ceiling)."""
    cdef int engine = _policy.engine, t
    cdef double sink = 0
    if engine != FA_ENGINE_DPBF16 and engine != FA_ENGINE_AMX:
        return 0.0
    with nogil:
        for t in prange(n_threads, num_threads=n_threads, schedule='static', chunksize=1):
            sink += fa_lp_peak_loop(engine, n_iter, <float> t)
    if sink != sink:
        return 0.0
    return float(n_threads) * n_iter * fa_lp_peak_flops(engine)


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
    return FA_VBYTES * FA_READ_CHAINS


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


# --------------------------------------------------------------------------- 16-bit numbers

def narrow16(const float[::1] x, str kind):
    """x rounded to bfloat16 or float16 ("bfloat16"/"float16") by the kernels' own
    conversion (fa_lp_narrow), as uint16 bits: for the tests."""
    result = _np.empty(x.shape[0], _np.uint16)
    cdef uint16_t[::1] r = result
    if x.shape[0]:
        fa_lp_narrow(&x[0], x.shape[0], _SRC_KINDS[kind], &r[0])
    return result


def widen16(const uint16_t[::1] bits, str kind):
    """The bits of bfloat16 or float16 numbers as float32, by the kernels' own conversion
    (fa_lp_widen_scaled with scale 1): for the tests."""
    result = _np.empty(bits.shape[0], _np.float32)
    cdef float[::1] r = result
    if bits.shape[0]:
        fa_lp_widen_scaled(&bits[0], _SRC_KINDS[kind], bits.shape[0], 1.0, &r[0])
    return result


# --------------------------------------------------------------------------- micro-kernels

cdef floating *_aligned_view(object array, floating *kind):
    """The 64-byte aligned start of a uint8 array (64 bytes over), as floating."""
    cdef unsigned char[::1] bytes_ = array
    return <floating*> _round_up(<Py_ssize_t> &bytes_[0], 64)


cdef object _probe_run(floating *kind, bint pv, int block, Py_ssize_t rows,
                       Py_ssize_t n_keys, Py_ssize_t d, Py_ssize_t reps):
    cdef Py_ssize_t item = sizeof(floating), i, r
    cdef Py_ssize_t n_cols = _round_up(n_keys, FA_MK_KEYS)
    rng = _np.random.default_rng(0)
    # q (rows x d) or p (rows x n_keys), the keys packed (n_cols x d) or the values in the
    # chunk layout (whole chunks x d), and the scores (rows x n_cols) or output (rows x d)
    a_n = rows * (n_keys if pv else d)
    b_n = (_round_up(n_keys, FA_MK_PV_CHUNK) if pv else n_cols) * d
    c_n = rows * (d if pv else n_cols)
    arrays = [_np.zeros(n * item + 64, _np.uint8) for n in (a_n, b_n, c_n)]
    source = rng.standard_normal(max(a_n, n_keys * d)).astype(
        _np.float32 if floating is float else _np.float64)
    cdef const floating[::1] src = source
    cdef floating *a = _aligned_view(arrays[0], kind)
    cdef floating *b = _aligned_view(arrays[1], kind)
    cdef floating *c = _aligned_view(arrays[2], kind)
    for i in range(a_n):
        a[i] = src[i] * 0.125
    if pv:
        _pack_values(&src[0], n_keys, d, d, b, 0, (n_keys + FA_MK_PV_CHUNK - 1) // FA_MK_PV_CHUNK)
    else:
        _pack_keys(&src[0], n_keys, d, d, b, n_cols)
    for r in range(reps + 1):  # one run to warm, then reps timed
        if r == 1:
            start = _perf_counter()
        with nogil:
            if pv:
                _mk_pv(block, a, n_keys, rows, b, 0, n_keys, 0, d, c)
            else:
                _mk_scores(block, a, rows, d, b, n_cols, c, n_cols)
    return _perf_counter() - start


def mk_probe(str kernel, Py_ssize_t itemsize, int block, Py_ssize_t rows, Py_ssize_t n_keys,
             Py_ssize_t d, Py_ssize_t reps):
    """Run one micro-kernel ("scores": rows queries against n_keys packed keys, or "pv":
    rows of P times n_keys values in the chunk layout; head size d, float32 or float64 by
    itemsize) in register block `block` (mk_blocks()) reps times on one thread, on
    operands in their packed layouts, for the kernel probe; returns the seconds the reps
    took (after one run to warm the caches). Floating-point operations: 2 rows n_keys d
    per run."""
    names = mk_blocks()["pv" if kernel == "pv" else "scores"]
    if not FA_MICROKERNELS or kernel not in ("scores", "pv") or block not in range(len(names)):
        raise ValueError(f"mk_probe: no {kernel} block {block} in this build ({mk_blocks()})")
    if itemsize not in (4, 8) or rows < 1 or n_keys < 1 or reps < 1 or d < 1 \
            or d % (FA_MK_VBYTES // itemsize):
        raise ValueError("mk_probe: rows, n_keys, reps >= 1 and d whole vectors")
    cdef bint pv = kernel == "pv"
    if itemsize == 4:
        return _probe_run(<float*> NULL, pv, block, rows, n_keys, d, reps)
    return _probe_run(<double*> NULL, pv, block, rows, n_keys, d, reps)

# The kernel-choice rules, and the values they read: each rule is written once, here, and
# both the compiled small-call and decoding entries and fastattn._plan / _run (through
# the wrappers at the end) call it. The values live in one struct; set_policy() is the
# one way to change them (fastattn._plan at import, with this machine's tuning;
# `python -m fastattn tune` and the tests).
#
# No rule reads the thread count except the team rule itself: tiles, chunks and the
# micro-kernel choice depend on the shape alone, so results are bitwise the same for any
# number of threads.

cdef struct Policy:
    Py_ssize_t q_block          # query rows of the largest tile (tuned)
    Py_ssize_t k_block          # keys of the largest tile (tuned)
    Py_ssize_t min_q_block      # query blocks are never halved below this many rows...
    Py_ssize_t min_work_items   # ...and are halved until a call has this many work items
    Py_ssize_t decode_chunk     # keys per work item of the decoding kernel
    double serial_flops         # a call of fewer floating-point operations runs on one thread
    double blas_serial_mnk      # a BLAS call over m n k would start BLAS's own threads
    Py_ssize_t softmax_serial   # softmax of fewer elements runs on one thread
    Py_ssize_t lanes_f          # vector lanes of float32 tiles' micro-kernels (0: BLAS)
    Py_ssize_t lanes_d          # ...of float64 tiles'
    int engine                  # the matrix engine of bfloat16 tiles (ENGINES; 0: none)
    int mk_scores_f             # the register block of float32 tiles' scores (mk_blocks())
    int mk_pv_f                 # ...of their P V
    int mk_scores_d             # ...of float64 tiles' scores
    int mk_pv_d                 # ...of their P V

cdef Policy _policy
_SRC_KINDS = {"bfloat16": FA_SRC_BF16, "float16": FA_SRC_F16, "float32": FA_SRC_F32}
# Defaults. Tiles of 256 x 512 were fastest for long sequences on every CPU swept (within
# 5% of their neighbours); eight work items let up to eight threads share a call evenly; a
# team costs more to wake than 2 MFLOP of work saves. OpenBLAS runs a GEMM on the calling
# thread when m n k <= 65536 * 4 (interface/gemm.c: SMP_THRESHOLD_MIN *
# GEMM_MULTITHREAD_THRESHOLD).
_policy.q_block = 256
_policy.k_block = 512
_policy.min_q_block = 32
_policy.min_work_items = 8
_policy.decode_chunk = 512
_policy.serial_flops = 2e6
_policy.blas_serial_mnk = 65536 * 4
_policy.softmax_serial = 100_000
_policy.lanes_f = FA_MK_VBYTES // 4
_policy.lanes_d = FA_MK_VBYTES // 8
_policy.engine = FA_ENGINE_NONE  # fastattn._plan chooses this CPU's at import (engines())
# The build's first register blocks; fastattn._plan chooses this CPU's at import (its
# tuning, the CPU table, or FASTATTN_MK). All give the same bits.
_policy.mk_scores_f = 0
_policy.mk_pv_f = 0
_policy.mk_scores_d = 0
_policy.mk_pv_d = 0

# The build's own micro-kernel lanes (0: none), the only values lanes_f / lanes_d may take
# besides 0.
cdef Py_ssize_t _BUILD_LANES_F = FA_MK_VBYTES // 4
cdef Py_ssize_t _BUILD_LANES_D = FA_MK_VBYTES // 8


def policy():
    """The values the kernel-choice rules read, as a dict (a copy)."""
    return dict(_policy)


def set_policy(**values):
    """Set some of the values the kernel-choice rules read (names as policy() gives them);
    returns the previous values of those names, for restoring. Refuses, changing nothing,
    an unknown name or a value out of range."""
    cdef dict current = dict(_policy)
    cdef dict new = dict(current)
    for name, value in values.items():
        if name not in current:
            raise ValueError(f"set_policy: no value named {name!r}; the names are {sorted(current)}")
        new[name] = value
    for name in ("q_block", "k_block", "min_q_block", "min_work_items", "decode_chunk"):
        if int(new[name]) != new[name] or new[name] < 1:
            raise ValueError(f"set_policy: {name} must be an integer >= 1, got {new[name]!r}")
    for name, build in (("lanes_f", _BUILD_LANES_F), ("lanes_d", _BUILD_LANES_D)):
        if new[name] not in (0, build):
            raise ValueError(f"set_policy: {name} must be 0 (BLAS tiles) or this build's "
                             f"{build}, got {new[name]!r}")
    if new["engine"] != current["engine"] and engines().get(
            ENGINES[new["engine"]] if new["engine"] in range(len(ENGINES)) else None) != "ok":
        raise ValueError(f"set_policy: engine {new['engine']!r} cannot run here: "
                         f"{engines()}")
    for name, count in (("mk_scores_f", FA_MK_SCORES_N), ("mk_scores_d", FA_MK_SCORES_N),
                        ("mk_pv_f", FA_MK_PV_N), ("mk_pv_d", FA_MK_PV_N)):
        if new[name] not in range(max(count, 1)):
            raise ValueError(f"set_policy: {name} must be the index of one of this build's "
                             f"register blocks {mk_blocks()}, got {new[name]!r}")
    for name in ("serial_flops", "blas_serial_mnk", "softmax_serial"):
        if not new[name] >= 0:
            raise ValueError(f"set_policy: {name} must be >= 0, got {new[name]!r}")
    _policy.q_block = new["q_block"]
    _policy.k_block = new["k_block"]
    _policy.min_q_block = new["min_q_block"]
    _policy.min_work_items = new["min_work_items"]
    _policy.decode_chunk = new["decode_chunk"]
    _policy.serial_flops = new["serial_flops"]
    _policy.blas_serial_mnk = new["blas_serial_mnk"]
    _policy.softmax_serial = new["softmax_serial"]
    _policy.lanes_f = new["lanes_f"]
    _policy.lanes_d = new["lanes_d"]
    _policy.engine = new["engine"]
    _policy.mk_scores_f = new["mk_scores_f"]
    _policy.mk_pv_f = new["mk_pv_f"]
    _policy.mk_scores_d = new["mk_scores_d"]
    _policy.mk_pv_d = new["mk_pv_d"]
    return {name: current[name] for name in values}


# --------------------------------------------------------------------------- engines

# The engines of bfloat16 tiles by their number in Policy.engine (fa_lowp.h).
ENGINES = ("none", "avx512bf16", "amx", "amx-emulated")
cdef int _amx_status = -1  # fa_amx_selftest(), once per process (-1: not asked yet)
_AMX_WHY = {1: "this CPU, OS or build has no AMX-BF16",
            2: "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)",
            3: "a known product on the AMX tiles differed from the emulation's"}


def engines():
    """{engine name: "ok" or why it cannot run here}. The native AMX engine is tried the
    first time this is asked (the tile permission, then a known product on the tiles
    against the emulation); a refusal or a mismatch says so and turns it off for the
    process, never a crash."""
    global _amx_status
    if _amx_status < 0:
        _amx_status = fa_amx_selftest() if FA_HAVE_AMX and fa_cpu_amx_bf16() else 1
    return {
        "none": "ok",
        "avx512bf16": ("ok" if FA_HAVE_DPBF16 and fa_cpu_avx512_bf16() else
                       "this CPU or build has no AVX512-BF16"),
        "amx": "ok" if _amx_status == 0 else _AMX_WHY[_amx_status],
        "amx-emulated": "ok",
    }


# --------------------------------------------------------------------------- the rules

cdef inline void _tiles(Py_ssize_t n_batch, Py_ssize_t n_queries, Py_ssize_t n_keys,
                        bint causal, size_t item, Py_ssize_t *q_block_out,
                        Py_ssize_t *k_block_out) noexcept nogil:
    """(query rows, keys) per tile of the fused kernel for this shape."""
    # Causal rows see a triangle: smaller query blocks skip more and balance better.
    cdef Py_ssize_t q_block = max(1, _policy.q_block // 2) if causal else _policy.q_block
    while (q_block > _policy.min_q_block
           and n_batch * ((n_queries + q_block - 1) // q_block) < _policy.min_work_items):
        q_block = q_block // 2
    # A float64 tile of as many keys would not fit the L2 cache beside its operands.
    cdef Py_ssize_t k_block = _policy.k_block if item == 4 else max(1, _policy.k_block // 2)
    q_block_out[0] = min(q_block, n_queries)
    k_block_out[0] = min(k_block, n_keys)


cdef inline bint _use_micro(size_t item, Py_ssize_t d_head, Py_ssize_t d_v) noexcept nogil:
    """Whether a tile's GEMMs run in the micro-kernels (rather than BLAS): where the build
    has them for this dtype and the policy keeps them, for head sizes of whole vectors."""
    cdef Py_ssize_t lanes = _policy.lanes_f if item == 4 else _policy.lanes_d
    return FA_MICROKERNELS != 0 and lanes > 0 and d_head % lanes == 0 and d_v % lanes == 0


# How the fused kernel takes 16-bit inputs (and float32 ones allowed bfloat16 products):
cdef enum:
    LP_NONE = 0     # not at all: they are converted to the compute dtype first
    LP_WIDEN = 1    # widened to float32 as they are packed for the float32 micro-kernels
    LP_ENGINE = 2   # bfloat16 tiles on the policy's engine


cdef inline int _lowp_mode(int src_kind, Py_ssize_t d_head, Py_ssize_t d_v) noexcept nogil:
    """How the fused kernel takes inputs of src_kind (FA_SRC_*): bfloat16 (and float32
    allowed bfloat16 products) on the engine where there is one and d_v is whole tiles of
    16 columns; bfloat16 and float16 widened in the packing where the float32 micro-kernels
    take the head sizes; else LP_NONE (float32 inputs then run exact)."""
    if (_policy.engine != FA_ENGINE_NONE and (src_kind == FA_SRC_BF16 or src_kind == FA_SRC_F32)
            and d_head > 0 and d_v > 0 and d_v % 16 == 0):
        return LP_ENGINE
    if (src_kind == FA_SRC_BF16 or src_kind == FA_SRC_F16) and d_head > 0 and d_v > 0 \
            and _use_micro(4, d_head, d_v):
        return LP_WIDEN
    return LP_NONE


cdef int _vnni = -1  # fa_cpu_avx512_vnni(), once per process (-1: not asked yet)


cdef inline int _decode_kind(int kv_kind, bint products, Py_ssize_t d,
                             Py_ssize_t d_v) noexcept nogil:
    """The decoding kernel's kind for storage of kv_kind when the call allows products
    below float32 (precision="bfloat16"), for head sizes of whole 32s (fa_decode_dp.h):
    int8 FA_SRC_I8_DP where the CPU has AVX512-VNNI and d <= 512 (its integer sums'
    bound), whatever the engine (its 16-bit integer products hold no bfloat16: Intel
    Cascade Lake and Ice Lake have VNNI without AVX512-BF16); the others where the
    policy's engine runs bfloat16 natively (AVX512-BF16, or AMX, whose CPUs have it;
    FASTATTN_ENGINE=none turns these off): bfloat16 storage FA_SRC_BF16_DP, float16
    FA_SRC_F16_DP (rounded to bfloat16 as it is loaded), float8 e4m3 FA_SRC_F8_DP. Else
    kv_kind itself (the exact, widening kernel)."""
    global _vnni
    if not (products and FA_HAVE_DPBF16
            and d > 0 and d % 32 == 0 and d_v > 0 and d_v % 32 == 0):
        return kv_kind
    if kv_kind == FA_SRC_I8:
        if d <= 512:
            if _vnni < 0:
                _vnni = fa_cpu_avx512_vnni()
            if _vnni:
                return FA_SRC_I8_DP
        return kv_kind
    if not (_policy.engine == FA_ENGINE_DPBF16 or _policy.engine == FA_ENGINE_AMX):
        return kv_kind
    if kv_kind == FA_SRC_BF16:
        return FA_SRC_BF16_DP
    if kv_kind == FA_SRC_F16:
        return FA_SRC_F16_DP
    if kv_kind == FA_SRC_F8:
        return FA_SRC_F8_DP
    return kv_kind


_PRODUCT_KINDS = {"bfloat16": (FA_SRC_BF16, FA_SRC_BF16_DP),
                  "float16": (FA_SRC_F16, FA_SRC_F16_DP), "int8": (FA_SRC_I8, FA_SRC_I8_DP),
                  "float8_e4m3": (FA_SRC_F8, FA_SRC_F8_DP)}


def decode_products(Py_ssize_t d, Py_ssize_t d_v, str storage="bfloat16"):
    """Whether a decoding call on storage ("bfloat16", "float16", "int8", "float8_e4m3";
    any other: False) allowed products below float32 takes them (_decode_kind), for head
    sizes d and d_v."""
    if storage not in _PRODUCT_KINDS:
        return False
    kind, product_kind = _PRODUCT_KINDS[storage]
    return _decode_kind(kind, True, d, d_v) == product_kind


cdef inline bint _blas_would_thread(double m, double n, double k) noexcept nogil:
    """Whether BLAS would start its own threads for an m x n x k GEMM (so that a caller
    on fastattn's threads must hold it to one)."""
    return m * n * k > _policy.blas_serial_mnk


cdef inline int _team(int n_threads, double flops, Py_ssize_t n_work) noexcept nogil:
    """Threads for a call: one below serial_flops, else at most one per work item."""
    if flops < _policy.serial_flops:
        return 1
    return <int> max(1, min(<Py_ssize_t> n_threads, n_work))


cdef inline Py_ssize_t _decode_chunks(Py_ssize_t n_keys) noexcept nogil:
    """The decoding kernel's key chunks (work items per group): fixed by the shape."""
    return (n_keys + _policy.decode_chunk - 1) // _policy.decode_chunk


cdef inline double _default_scale(Py_ssize_t d_head) noexcept nogil:
    """The score scale when none is given: 1 / sqrt(D), and 1 for D = 0 (every score 0)."""
    return 1.0 / sqrt(<double> d_head) if d_head > 0 else 1.0


cdef inline Py_ssize_t _window_first_key(Py_ssize_t n_keys, Py_ssize_t window) noexcept nogil:
    """A single causal query's first visible key under a sliding window (0: none): under
    the bottom-right alignment it is the newest token and sees exactly the last `window`
    keys, so a window is the same call on those keys."""
    return n_keys - window if 0 < window < n_keys else 0


cdef inline Py_ssize_t _gqa_group(Py_ssize_t h_q, Py_ssize_t h_kv) noexcept nogil:
    """Query heads per key/value head for head axes h_q (of q) and h_kv (of k and v) when
    h_kv divides h_q (grouped-query attention; 1 for equal axes, h_q for one key/value
    head), else -1: they do not fit."""
    if h_q == h_kv:
        return 1
    if h_kv < 1 or h_q % h_kv != 0:
        return -1
    return h_q // h_kv


cdef inline bint _sink_ok(double sink) noexcept nogil:
    """A sink logit must be finite or -inf (no sink)."""
    return sink == sink and sink != INFINITY


cdef inline bint _decode_eligible(Py_ssize_t n_queries, int mask_kind, Py_ssize_t window,
                                  bint q_broadcast, Py_ssize_t d_head, Py_ssize_t d_v,
                                  bint return_weights) noexcept nogil:
    """Whether a call runs in the decoding kernel: one query per batch entry, no mask and
    no window left (a single query's window is taken as its last keys first), q not
    broadcast, neither head size empty, and no weights asked for."""
    return (n_queries == 1 and mask_kind == MASK_NONE and window == 0 and not q_broadcast
            and d_head > 0 and d_v > 0 and not return_weights)


# --------------------------------------------------------------------------- for Python

def tiles(Py_ssize_t n_batch, Py_ssize_t n_queries, Py_ssize_t n_keys, bint causal,
          Py_ssize_t itemsize):
    """(query rows, keys) per tile of the fused kernel for this shape (_tiles)."""
    cdef Py_ssize_t q_block, k_block
    _tiles(n_batch, n_queries, n_keys, causal, itemsize, &q_block, &k_block)
    return q_block, k_block


def use_microkernels(Py_ssize_t itemsize, Py_ssize_t d_head, Py_ssize_t d_v):
    """Whether a tile's GEMMs run in the micro-kernels (_use_micro)."""
    return _use_micro(itemsize, d_head, d_v)


def lowp_mode(str kind, Py_ssize_t d_head, Py_ssize_t d_v):
    """How the fused kernel takes inputs of this kind ("bfloat16", "float16", or "float32"
    allowed bfloat16 products): "engine", "widen" or None (_lowp_mode)."""
    cdef int mode = _lowp_mode(_SRC_KINDS[kind], d_head, d_v)
    return "engine" if mode == LP_ENGINE else "widen" if mode == LP_WIDEN else None


def blas_would_thread(double m, double n, double k):
    """Whether BLAS would start its own threads for an m x n x k GEMM (_blas_would_thread)."""
    return _blas_would_thread(m, n, k)


def team(int n_threads, double flops, Py_ssize_t n_work):
    """Threads for a call of this many FLOPs and work items (_team)."""
    return _team(n_threads, flops, n_work)


def softmax_threads(Py_ssize_t n_elements, int n_threads):
    """Threads for a softmax over this many elements: one below softmax_serial."""
    return 1 if n_elements < _policy.softmax_serial else n_threads


def default_scale(Py_ssize_t d_head):
    """The score scale when none is given (_default_scale)."""
    return _default_scale(d_head)


def window_first_key(Py_ssize_t n_keys, Py_ssize_t window):
    """A single causal query's first visible key under a window (_window_first_key)."""
    return _window_first_key(n_keys, window)


def gqa_group(Py_ssize_t h_q, Py_ssize_t h_kv):
    """Query heads per key/value head, or -1 when the head axes do not fit (_gqa_group)."""
    return _gqa_group(h_q, h_kv)


def sinks_valid(const floating[::1] sinks):
    """Whether every sink logit is finite or -inf (_sink_ok)."""
    cdef Py_ssize_t i
    for i in range(sinks.shape[0]):
        if not _sink_ok(sinks[i]):
            return False
    return True


def decode_eligible(Py_ssize_t n_queries, int mask_kind, Py_ssize_t window, bint q_broadcast,
                    Py_ssize_t d_head, Py_ssize_t d_v, bint return_weights):
    """Whether a call runs in the decoding kernel (_decode_eligible)."""
    return _decode_eligible(n_queries, mask_kind, window, q_broadcast, d_head, d_v,
                            return_weights)

# Stub for the compiled module fastattn._kernels (see _kernels_impl.pxi). The kernels
# trust their inputs: fastattn._validation and fastattn._plan check and normalise
# everything first, and fastattn._run calls the kernels; _plan, _validation and tune also
# ask the policy's rules. Trailing comments give the C type of each argument; `floating`
# is float32 or float64, the same for every floating argument of one call.

from typing import Any, Optional

import numpy as np
import numpy.typing as npt

def build_info() -> dict[str, Any]: ...
def mk_blocks() -> dict[str, list[str]]: ...  # {"scores": ["8x2", ...], "pv": [...]}; first: default
def max_threads() -> int: ...
def project(
    x: npt.NDArray[np.floating],        # const floating[:, ::1]  (n_rows, d_in)
    w: npt.NDArray[np.floating],        # const floating[:, ::1]  (d_in, d_out)
    b: npt.NDArray[np.floating],        # const floating[::1]     (d_out,) or a dummy
    has_bias: bool,                     # bint
    out: npt.NDArray[np.floating],      # floating[:, ::1]        (n_rows, d_out)
    col_start: int = 0,                 # Py_ssize_t: the columns of w and out to compute
    col_stop: int = -1,                 # Py_ssize_t (-1: d_out)
    n_threads: int = 1,                 # int: bands on this many threads
) -> int: ...  # the team that ran
def scores(
    q: npt.NDArray[np.floating],        # const floating[:, :, ::1]  (n_q_stored, L_q, D)
    k: npt.NDArray[np.floating],        # const floating[:, :, ::1]  (n_kv_stored, L_k, D)
    mask: Optional[np.ndarray],         # object: None, uint8 or floating (n_masks, L_q, L_k)
    mask_kind: int,                     # int: fastattn._plan.MaskKind (NONE, ADD, BOOL)
    index: npt.NDArray[np.intp],        # const Py_ssize_t[:, ::1]   (3, n_batch)
    causal: bool,                       # bint
    window: int,                        # Py_ssize_t (0: no sliding window)
    scale: float,                       # double
    softcap: float,                     # double (0: none)
    out: npt.NDArray[np.floating],      # floating[:, :, ::1]        (n_batch, L_q, L_k)
) -> None: ...
def softmax(
    x: npt.NDArray[np.floating],        # const floating[:, ::1]
    out: npt.NDArray[np.floating],      # floating[:, ::1] (may be x itself)
    log_out: bool,                      # bint
    zero_masked: bool,                  # bint
    n_threads: int,                     # int
) -> None: ...
def attention(
    q: npt.NDArray[np.floating],        # const floating[:, :, ::1]  (n_q_stored, L_q, D)
    k: npt.NDArray[np.floating],        # const floating[:, :, ::1]  (n_kv_stored, L_k, D)
    v: npt.NDArray[np.floating],        # const floating[:, :, ::1]  (n_kv_stored, L_k, D_v)
    mask: Optional[np.ndarray],         # object: None, uint8 or floating (n_masks, L_q, L_k)
    mask_kind: int,                     # int: fastattn._plan.MaskKind (NONE, ADD, BOOL)
    index: npt.NDArray[np.intp],        # const Py_ssize_t[:, ::1]   (3, n_batch)
    causal: bool,                       # bint
    window: int,                        # Py_ssize_t (0: no sliding window)
    scale: float,                       # double
    softcap: float,                     # double (0: none)
    sinks: Optional[np.ndarray],        # object: None or const floating[::1] (n_batch,)
    out: npt.NDArray[np.floating],      # floating[:, :, ::1]        (n_batch, L_q, D_v)
    lse: npt.NDArray[np.floating],      # floating[:, ::1]           (n_batch, L_q)
    q_block: int,                       # Py_ssize_t
    k_block: int,                       # Py_ssize_t
    microkernels: bool,                 # bint: fastattn._plan.use_microkernels
    n_threads: int,                     # int
    w_start: int = 0,                   # Py_ssize_t: first work item
    w_stop: int = -1,                   # Py_ssize_t: past the last work item (-1: all)
    scratch: Optional[np.ndarray] = None,  # object: None or attention_scratch(...)
    ragged: Optional[tuple] = None,     # object: None, or (seqs (n_entries, 7) intp, work
                                        #   (n_work, 2) intp, n_queries, n_keys, q_block,
                                        #   q_step, kv_step[, pages intp, page_rows]):
                                        #   attention_varlen's call (q, k, v, out, lse packed
                                        #   token-major), or a PagedKVCache's prefill
) -> int: ...  # threads that ran, or -1 when the scratch cannot be allocated
def attention_lowp(
    kind: str,                          # str: "bfloat16", "float16", or "float32" allowed
                                        #   bfloat16 products (_plan's AttentionPlan.lowp)
    q: npt.NDArray[np.uint8],           # const unsigned char[:, :, ::1] (n_q_stored, L_q, D bytes)
    k: npt.NDArray[np.uint8],           # const unsigned char[:, :, ::1] (n_kv_stored, L_k, D bytes)
    v: npt.NDArray[np.uint8],           # const unsigned char[:, :, ::1] (n_kv_stored, L_k, D_v bytes)
    mask: Optional[np.ndarray],         # object: None, uint8 or float32 (n_masks, L_q, L_k)
    mask_kind: int,                     # int
    index: npt.NDArray[np.intp],        # const Py_ssize_t[:, ::1]   (3, n_batch)
    causal: bool,                       # bint
    window: int,                        # Py_ssize_t
    scale: float,                       # double
    softcap: float,                     # double
    sinks: Optional[np.ndarray],        # object: None or const float[::1] (n_batch,)
    out_kind: str,                      # str: "float32", "bfloat16" or "float16"
    out: npt.NDArray[np.uint8],         # unsigned char[:, :, ::1]   (n_batch, L_q, D_v bytes)
    lse: npt.NDArray[np.float32],       # float[:, ::1]              (n_batch, L_q)
    q_block: int,                       # Py_ssize_t
    k_block: int,                       # Py_ssize_t
    n_threads: int,                     # int
    w_start: int = 0,                   # Py_ssize_t
    w_stop: int = -1,                   # Py_ssize_t
    scratch: Optional[np.ndarray] = None,  # object: None or attention_scratch(..., lowp_kind)
    ragged: Optional[tuple] = None,     # object: as attention()'s
) -> int: ...  # threads that ran, or -1 when the scratch cannot be allocated
def attention_scratch(
    n_keys: int, d_head: int, d_v: int, q_block: int, k_block: int,  # Py_ssize_t
    microkernels: bool,                 # bint
    itemsize: int,                      # Py_ssize_t: 4 or 8
    n_threads: int,                     # int
    lowp_kind: Optional[str] = None,    # str: attention_lowp's kind (itemsize 4 then)
    kv_step: int = 1,                   # Py_ssize_t: a ragged call's (attention(ragged=))
    paged: bool = False,                # bint: a paged call's (room for its stage)
) -> npt.NDArray[np.uint8]: ...
def decode(
    q: npt.NDArray[np.floating],        # const floating[:, :, ::1]  (n_groups, G, D)
    k: np.ndarray,                      # object: (n_kv, L_k, D), rows contiguous; q's dtype,
                                        #   or for float32 q uint16 (bfloat16 bits), float16,
                                        #   int8 or uint8 (float8 e4m3 bits) with ks, vs
    v: np.ndarray,                      # object: (n_kv, L_k, D_v), likewise
    kv_index: npt.NDArray[np.intp],     # const Py_ssize_t[::1]      (n_groups,)
    scale: float,                       # double
    softcap: float,                     # double (0: none)
    sinks: Optional[np.ndarray],        # object: None or const floating[:, ::1] (n_groups, G)
    out: npt.NDArray[np.floating],      # floating[:, :, ::1]        (n_groups, G, D_v)
    lse: npt.NDArray[np.floating],      # floating[:, ::1]           (n_groups, G)
    n_threads: int,                     # int: the most threads it may use
    ks: Optional[np.ndarray] = ...,     # object: 8-bit key scales (n_kv, groups, D) float32
    vs: Optional[np.ndarray] = ...,     # object: 8-bit value scales (n_kv, L_k) float32
    phase: int = ...,                   # Py_ssize_t: key 0's row in its group of scales
    products: bool = ...,               # bint: bfloat16 k, v may take bfloat16 products
) -> int: ...  # threads that ran, or -1 when the scratch cannot be allocated
def decode_paged(
    q: npt.NDArray[np.floating],        # const floating[:, :, ::1]  (n_groups, G, D)
    k_pool: np.ndarray,                 # object: (H_kv, num_blocks, block, D), C-contiguous;
                                        #   q's dtype, or for float32 q uint16 (bfloat16
                                        #   bits), float16, int8 or uint8 (float8 e4m3
                                        #   bits; block a multiple of KV_GROUP) with scales
    v_pool: np.ndarray,                 # object: (H_kv, num_blocks, block, D_v), the same
    groups: npt.NDArray[np.intp],       # const Py_ssize_t[:, ::1] (n_groups, 4): kv head,
                                        #   first visible key, visible keys, table offset
    table: npt.NDArray[np.intp],        # const Py_ssize_t[::1]: the sequences' block ids
    scale: float,                       # double
    softcap: float,                     # double (0: none)
    sinks: Optional[np.ndarray],        # object: None or const floating[:, ::1] (n_groups, G)
    out: npt.NDArray[np.floating],      # floating[:, :, ::1]        (n_groups, G, D_v)
    lse: npt.NDArray[np.floating],      # floating[:, ::1]           (n_groups, G)
    n_threads: int,                     # int
    ks_pool: Optional[np.ndarray] = ...,  # object: 8-bit key scales (H_kv, num_blocks,
                                        #   block / KV_GROUP, D) float32, C-contiguous
    vs_pool: Optional[np.ndarray] = ...,  # object: 8-bit value scales (H_kv, num_blocks,
                                        #   block) float32, C-contiguous
    products: bool = ...,               # bint: as decode()'s
) -> int: ...  # threads that ran, or -1 when the scratch cannot be allocated
def small_attention(
    q: Any, k: Any, v: Any,             # object: anything; None unless small ndarrays
    causal: bool,                       # bint
    window: int,                        # Py_ssize_t: 0 (none) or >= 1 with causal
    scale: Optional[float],             # object: None (1 / sqrt(D)) or a finite float
    softcap: float,                     # double: 0 (none) or finite > 0
    sinks: Any,                         # object: None, or (H,) in q's dtype
    n_threads: int,                     # int: the most threads a decoding call may use
) -> Optional[tuple[npt.NDArray[np.floating], int]]: ...  # (out, threads that ran)
def cache_decode(
    q: Any, k_store: Any, v_store: Any,  # object: None unless q is what it takes
    start: int, n_keys: int,            # Py_ssize_t: the rows of the storage held
    n_threads: int,                     # int: the most threads it may use
    ks_store: Any = ..., vs_store: Any = ...,  # object: an 8-bit storage's scales, or None
) -> Optional[tuple[npt.NDArray[np.floating], int]]: ...  # (out, threads that ran)
# The kernel-choice policy (_k_policy.pxi): its values, and its rules.
def policy() -> dict[str, float]: ...
def set_policy(**values: float) -> dict[str, float]: ...  # the previous values of those names
def tiles(
    n_batch: int, n_queries: int, n_keys: int,  # Py_ssize_t
    causal: bool,                       # bint
    itemsize: int,                      # Py_ssize_t: 4 or 8
) -> tuple[int, int]: ...  # (query rows, keys) per tile
def use_microkernels(itemsize: int, d_head: int, d_v: int) -> bool: ...
def lowp_mode(kind: str, d_head: int, d_v: int) -> Optional[str]: ...  # "engine", "widen", None
def decode_products(d: int, d_v: int, storage: str = ...) -> bool: ...  # products below float32?
ENGINES: tuple[str, ...]  # the bfloat16 engines, by their number in the policy's engine
def engines() -> dict[str, str]: ...  # {engine: "ok" or why it cannot run here}
def blas_would_thread(m: float, n: float, k: float) -> bool: ...
def team(n_threads: int, flops: float, n_work: int) -> int: ...
def softmax_threads(n_elements: int, n_threads: int) -> int: ...
def default_scale(d_head: int) -> float: ...
def window_first_key(n_keys: int, window: int) -> int: ...
def gqa_group(h_q: int, h_kv: int) -> int: ...  # -1: the head axes do not fit
def sinks_valid(sinks: npt.NDArray[np.floating]) -> bool: ...  # const floating[::1]
def decode_eligible(n_queries: int, mask_kind: int, window: int, q_broadcast: bool,
                    d_head: int, d_v: int, return_weights: bool) -> bool: ...
def fma_loop(double: bool, n_iter: int, n_threads: int) -> float: ...  # flops done
def engine_loop(n_iter: int, n_threads: int) -> float: ...  # flops done (0: no engine)
def read_sum(
    x: npt.NDArray[np.floating],        # const floating[::1]
    n_threads: int,                     # int
) -> float: ...
def read_sum_multiple() -> int: ...
def mk_probe(
    kernel: str,                        # str: "scores" or "pv"
    itemsize: int,                      # Py_ssize_t: 4 (float32) or 8 (float64)
    block: int,                         # int: an index of mk_blocks()[kernel]
    rows: int, n_keys: int, d: int,     # Py_ssize_t: the operands' sizes (d whole vectors)
    reps: int,                          # Py_ssize_t: timed runs (after one to warm)
) -> float: ...  # seconds the reps took
def exp(
    x: npt.NDArray[np.floating],        # const floating[::1]
    out: npt.NDArray[np.floating],      # floating[::1]
) -> None: ...
def tanh(
    x: npt.NDArray[np.floating],        # const floating[::1]
    out: npt.NDArray[np.floating],      # floating[::1]
) -> None: ...
def narrow16(
    x: npt.NDArray[np.float32],         # const float[::1]
    kind: str,                          # str: "bfloat16" or "float16"
) -> npt.NDArray[np.uint16]: ...
def widen16(
    bits: npt.NDArray[np.uint16],       # const uint16_t[::1]
    kind: str,                          # str: "bfloat16" or "float16"
) -> npt.NDArray[np.float32]: ...
# The 8-bit caches' storage (_k_quant.pxi).
KV_GROUP: int                           # tokens per group of key scales (FA_KV_GROUP)
def quantize(
    x: npt.NDArray[np.float32],         # const float[:, :, :, :] (B, H, T, D), rows contiguous
    group: int,                         # Py_ssize_t: rows per key scale group, or 0 (per row)
    kind: str,                          # str: "int8" or "float8_e4m3"
    n_threads: int,                     # int
) -> Optional[tuple[np.ndarray, npt.NDArray[np.float32]]]: ...  # (bytes, scales); None on NaN/inf
def f8_to_f32(bits: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]: ...
def f32_to_f8(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]: ...

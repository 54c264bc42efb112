# Stub for the compiled module fastattn._kernels (see _kernels.pyx). The kernels trust
# their inputs: fastattn._validation and fastattn._plan check and normalise everything
# first, and fastattn._run is their only caller. Trailing
# comments give the C type of each argument; `floating` is float32 or float64, the same
# for every floating argument of one call.

from typing import Any, Optional

import numpy as np
import numpy.typing as npt

def build_info() -> dict[str, Any]: ...
def max_threads() -> int: ...
def project(
    x: npt.NDArray[np.floating],        # const floating[:, ::1]  (n_rows, d_in)
    w: npt.NDArray[np.floating],        # const floating[:, ::1]  (d_in, d_out)
    b: npt.NDArray[np.floating],        # const floating[::1]     (d_out,) or a dummy
    has_bias: bool,                     # bint
    out: npt.NDArray[np.floating],      # floating[:, ::1]        (n_rows, d_out)
    col_start: int = 0,                 # Py_ssize_t: the columns of w and out to compute
    col_stop: int = -1,                 # Py_ssize_t (-1: d_out)
) -> None: ...
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
) -> int: ...  # threads that ran, or -1 when the scratch cannot be allocated
def decode(
    q: npt.NDArray[np.floating],        # const floating[:, :, ::1]  (n_groups, G, D)
    k: npt.NDArray[np.floating],        # const floating[:, :, :]    (n_kv, L_k, D), rows contiguous
    v: npt.NDArray[np.floating],        # const floating[:, :, :]    (n_kv, L_k, D_v), rows contiguous
    kv_index: npt.NDArray[np.intp],     # const Py_ssize_t[::1]      (n_groups,)
    scale: float,                       # double
    softcap: float,                     # double (0: none)
    sinks: Optional[np.ndarray],        # object: None or const floating[:, ::1] (n_groups, G)
    out: npt.NDArray[np.floating],      # floating[:, :, ::1]        (n_groups, G, D_v)
    lse: npt.NDArray[np.floating],      # floating[:, ::1]           (n_groups, G)
    chunk: int,                         # Py_ssize_t
    n_threads: int,                     # int
) -> int: ...  # threads that ran, or -1 when the scratch cannot be allocated
def decode_bf16(
    q: npt.NDArray[np.float32],         # const float[:, :, ::1]     (n_groups, G, D)
    k: npt.NDArray[np.uint16],          # const uint16_t[:, :, :]    bfloat16 bits (n_kv, L_k, D)
    v: npt.NDArray[np.uint16],          # const uint16_t[:, :, :]    bfloat16 bits (n_kv, L_k, D_v)
    kv_index: npt.NDArray[np.intp],     # const Py_ssize_t[::1]      (n_groups,)
    scale: float,                       # double
    softcap: float,                     # double (0: none)
    sinks: Optional[np.ndarray],        # object: None or const float[:, ::1] (n_groups, G)
    out: npt.NDArray[np.float32],       # float[:, :, ::1]           (n_groups, G, D_v)
    lse: npt.NDArray[np.float32],       # float[:, ::1]              (n_groups, G)
    chunk: int,                         # Py_ssize_t
    n_threads: int,                     # int
) -> int: ...  # decode() with bfloat16 keys and values widened as they are read
def tiles(
    n_batch: int, n_queries: int, n_keys: int,  # Py_ssize_t
    causal: bool,                       # bint
    itemsize: int,                      # Py_ssize_t: 4 or 8
    q_block_max: int, k_block_max: int, min_q_block: int, min_work_items: int,  # Py_ssize_t
) -> tuple[int, int]: ...  # (query rows, keys) per tile: fastattn._plan.tiles
def small_attention(
    q: Any, k: Any, v: Any,             # object: anything; None unless small ndarrays
    causal: bool,                       # bint
    window: int,                        # Py_ssize_t: 0 (none) or >= 1 with causal
    scale: Optional[float],             # object: None (1 / sqrt(D)) or a finite float
    softcap: float,                     # double: 0 (none) or finite > 0
    sinks: Any,                         # object: None, or (H,) in q's dtype
    policy: tuple[int, ...],            # tuple: see fastattn._run.small_attention
    n_threads: int,                     # int: the most threads a decoding call may use
) -> Optional[tuple[npt.NDArray[np.floating], int]]: ...  # (out, threads that ran)
def cache_decode(
    q: Any, k_store: Any, v_store: Any,  # object: None unless q is what it takes
    start: int, n_keys: int,            # Py_ssize_t: the rows of the storage held
    serial_flops: float,                # double: fastattn._plan.SERIAL_FLOPS
    chunk: int,                         # Py_ssize_t: fastattn._plan.DECODE_CHUNK
    n_threads: int,                     # int: the most threads it may use
) -> Optional[tuple[npt.NDArray[np.floating], int]]: ...  # (out, threads that ran)
def fma_loop(double: bool, n_iter: int, n_threads: int) -> float: ...  # flops done
def read_sum(
    x: npt.NDArray[np.floating],        # const floating[::1]
    n_threads: int,                     # int
) -> float: ...
def read_sum_multiple() -> int: ...
def exp(
    x: npt.NDArray[np.floating],        # const floating[::1]
    out: npt.NDArray[np.floating],      # floating[::1]
) -> None: ...
def tanh(
    x: npt.NDArray[np.floating],        # const floating[::1]
    out: npt.NDArray[np.floating],      # floating[::1]
) -> None: ...

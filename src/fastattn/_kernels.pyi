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
    out: npt.NDArray[np.floating],      # floating[:, :, ::1]        (n_batch, L_q, D_v)
    lse: npt.NDArray[np.floating],      # floating[:, ::1]           (n_batch, L_q)
    q_block: int,                       # Py_ssize_t
    k_block: int,                       # Py_ssize_t
    microkernels: bool,                 # bint: fastattn._plan.use_microkernels
    n_threads: int,                     # int
) -> int: ...  # threads that ran, or -1 when the scratch cannot be allocated
def decode(
    q: npt.NDArray[np.floating],        # const floating[:, :, ::1]  (n_groups, G, D)
    k: npt.NDArray[np.floating],        # const floating[:, :, :]    (n_kv, L_k, D), rows contiguous
    v: npt.NDArray[np.floating],        # const floating[:, :, :]    (n_kv, L_k, D_v), rows contiguous
    kv_index: npt.NDArray[np.intp],     # const Py_ssize_t[::1]      (n_groups,)
    scale: float,                       # double
    out: npt.NDArray[np.floating],      # floating[:, :, ::1]        (n_groups, G, D_v)
    lse: npt.NDArray[np.floating],      # floating[:, ::1]           (n_groups, G)
    chunk: int,                         # Py_ssize_t
    n_threads: int,                     # int
) -> int: ...  # threads that ran, or -1 when the scratch cannot be allocated
def exp(
    x: npt.NDArray[np.floating],        # const floating[::1]
    out: npt.NDArray[np.floating],      # floating[::1]
) -> None: ...

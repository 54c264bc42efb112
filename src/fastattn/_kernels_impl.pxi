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

include "_k_decl.pxi"
include "_k_helpers.pxi"
include "_k_policy.pxi"
include "_k_project.pxi"
include "_k_scores.pxi"
include "_k_fused.pxi"
include "_k_decode.pxi"
include "_k_small.pxi"
include "_k_probes.pxi"

# The kernels, included by _kernels.pyx, _kernels_avx2.pyx and _kernels_avx512.pyx: one
# source compiled once per instruction set (setup.py), chosen at import (_dispatch.py).
#
# Design: this module computes and trusts its inputs. The Python side (_validation and
# _plan) has checked every shape and dtype, made the arrays C-contiguous in the compute
# dtype (float32 or float64; 16-bit inputs of the fused kernel's attention_lowp and
# bfloat16 keys and values of the decoding kernel stay as their bits), materialised masks to `(n_masks, n_queries, n_keys)`, turned broadcasting and
# grouped-query heads into one index array (`index[:, b]` says which stored q, k/v and mask
# entries batch entry `b` reads, so nothing broadcast is ever copied) and held BLAS to one
# thread where these kernels call it from several threads. The exceptions are the entries
# of the small-call path and the cache's plain step, which check what they take and
# return None for anything else. Nothing here raises but MemoryError and the scratch
# check of attention(): a kernel that can fail (allocation) returns a status and the
# wrapper raises.
#
# GEMM-shaped tile work goes to the micro-kernels of the AVX2 and AVX-512 builds
# (`fa_microkernels.h`), to bfloat16 tiles on the CPU's matrix engine (`fa_lowp.h`: AMX,
# AVX512-BF16, or the AMX kernels on an emulation of the tiles) or to the BLAS that SciPy ships, reached through
# `scipy.linalg.cython_blas` as scikit-learn's pairwise reductions do; this module owns the
# rest: scaling, masking, the online softmax and its rescaling, written as loops over
# contiguous memory with the vectorisable exp of `fa_exp.h`. The decoding kernel is in C
# (`fa_decode.h`).
#
# One file a job, included in this order:
#   _k_decl      cimports, the C headers' declarations, the mask kinds
#   _k_helpers   per-dtype wrappers of the C helpers and BLAS, buffers, build facts
#   _k_policy    the kernel-choice rules and the one struct of values they read
#   _k_project   projection: x @ w (+ b) in bands, one BLAS call per thread
#   _k_scores    scores, masks and softmax (the unfused building blocks)
#   _k_fused     the fused kernel: work items, tiles, the online softmax
#   _k_decode    the decoding kernel's runner and entries
#   _k_quant     the 8-bit caches' quantizing of appended keys and values
#   _k_small     the small-call path
#   _k_probes    the benchmark's ceilings, and the kernels' exp, tanh and 16-bit
#                conversions for the tests

include "_k_decl.pxi"
include "_k_helpers.pxi"
include "_k_policy.pxi"
include "_k_project.pxi"
include "_k_scores.pxi"
include "_k_fused.pxi"
include "_k_decode.pxi"
include "_k_quant.pxi"
include "_k_small.pxi"
include "_k_probes.pxi"

"""fastattn's compiled kernels, built for AVX-512 (F, DQ, BW, VL); see _kernels_impl.pxi."""

include "_kernels_impl.pxi"

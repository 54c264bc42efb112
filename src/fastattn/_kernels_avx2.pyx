"""fastattn's compiled kernels, built for AVX2 + FMA; see _kernels_impl.pxi."""

include "_kernels_impl.pxi"

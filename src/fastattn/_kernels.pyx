"""fastattn's compiled kernels, built for baseline x86-64 (or the platform's default); see _kernels_impl.pxi."""

include "_kernels_impl.pxi"

"""The instruction-set builds of the kernels: one table, read by setup.py (what to
compile, with which flags), by _dispatch.py (which build this CPU runs) and by the tests
and tools/test_wheel.sh (which builds a wheel must carry).

This module imports nothing from the package, so that setup.py can load it by path before
the package is built.

Adding an ISA: one row here (ordered from the most portable to the fastest), one
``_kernels_<name>.pyx`` that includes ``_kernels_impl.pxi``, its ``.pyi`` stub, and a
``cpu_features()`` entry in ``_cpu.pyx`` for the row's ``cpu`` key.
"""

from collections import namedtuple

__all__ = ["Build", "BUILDS", "X86_ONLY"]

# name: what FASTATTN_ISA and build_info()["isa"] say; module: the extension's name;
# flags: GCC flags added to the common ones; cpu: the key of _cpu.cpu_features() that must
# be true for this CPU to run it (None: every CPU).
Build = namedtuple("Build", "name module flags cpu")

# The instruction set matters: float32 attention runs about 1.3x faster with AVX2+FMA
# than in the baseline build, and faster again with AVX-512.
BUILDS = (
    Build("baseline", "_kernels", (), None),
    # (F16C, on every CPU with AVX2, converts float16 in the decoding kernel and the
    # 16-bit packing; it changes no other code.)
    Build("avx2", "_kernels_avx2", ("-mavx2", "-mfma", "-mf16c"), "avx2"),
    Build("avx512", "_kernels_avx512",
          ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl",
           "-mprefer-vector-width=512"), "avx512"),
)

# The builds beyond baseline exist on x86-64 with a GCC-compatible compiler only.
X86_ONLY = tuple(b.name for b in BUILDS if b.cpu is not None)

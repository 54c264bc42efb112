"""Build the Cython kernels.

Compiler directives live here, once. ``FASTATTN_DEBUG=1`` turns bounds, wraparound and
initialisation checks back on (a debug build for finding out-of-bounds access);
``FASTATTN_NO_OPENMP=1`` builds without OpenMP (the kernels then run single-threaded);
``FASTATTN_SANITIZE=1`` builds with AddressSanitizer and UndefinedBehaviorSanitizer (load
it with libasan preloaded: tools/check_build.sh does it all).
"""

import os
import platform
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


debug = _flag("FASTATTN_DEBUG")
openmp = not _flag("FASTATTN_NO_OPENMP")
sanitize = _flag("FASTATTN_SANITIZE")

directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
    "embedsignature": True,
}

# No -ffast-math: masking relies on exp(-inf) == 0 and on NaN propagating.
# -fno-trapping-math only lets GCC vectorise loops with conditional float operations;
# results, NaN and inf are unchanged (PyTorch builds with it too).
compile_args = ["-O3", "-fno-trapping-math"]
link_args = []
if debug:
    compile_args = ["-O1", "-g"]
if sanitize:
    sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer"]
    compile_args = ["-O1", "-g"] + sanitizers
    link_args = link_args + sanitizers
if openmp:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
if sys.platform == "win32":  # MSVC spells these differently
    compile_args = ["/O2"] + (["/openmp"] if openmp else [])
    link_args = []

# One implementation (_kernels_impl.pxi), one extension per instruction set; _dispatch.py
# imports the best one the CPU runs. The instruction set matters: on a 2-core AVX-512
# machine float32 attention (1, 8, 2048, 2048, 64) took 70 ms baseline, 55 ms with AVX2+FMA
# and 51 ms with AVX-512; float64 (1, 8, 512, 512, 64) 9.6, 6.7 and 5.8 ms.
ISA_FLAGS = {"_kernels": ("baseline", [])}
if platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32":
    ISA_FLAGS["_kernels_avx2"] = ("avx2", ["-mavx2", "-mfma"])
    ISA_FLAGS["_kernels_avx512"] = (
        "avx512",
        ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl",
         "-mprefer-vector-width=512"],
    )


def extension(module, isa, isa_flags):
    flags = compile_args + isa_flags
    return Extension(
        f"fastattn.{module}",
        sources=[f"src/fastattn/{module}.pyx"],
        include_dirs=["src/fastattn"],
        depends=["src/fastattn/_kernels_impl.pxi", "src/fastattn/_helpers.h"],
        extra_compile_args=flags,
        extra_link_args=link_args,
        define_macros=[
            ("FASTATTN_BUILD_FLAGS", '"%s"' % " ".join(flags)),
            ("FASTATTN_ISA", '"%s"' % isa),
            ("FASTATTN_DEBUG_BUILD", "1" if debug else "0"),
        ],
    )


extensions = [extension(module, isa, flags) for module, (isa, flags) in ISA_FLAGS.items()]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
    ),
)

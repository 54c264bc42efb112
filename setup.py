"""Build the Cython kernels.

Compiler directives live here, once. ``FASTATTN_DEBUG=1`` turns bounds, wraparound and
initialisation checks back on (a debug build for finding out-of-bounds access);
``FASTATTN_NO_OPENMP=1`` builds without OpenMP (the kernels then run single-threaded).
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


debug = _flag("FASTATTN_DEBUG")
openmp = not _flag("FASTATTN_NO_OPENMP")

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
if openmp:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
if sys.platform == "win32":  # MSVC spells these differently
    compile_args = ["/O2"] + (["/openmp"] if openmp else [])
    link_args = []

build_flags = " ".join(compile_args)
ext = Extension(
    "fastattn._kernels",
    sources=["src/fastattn/_kernels.pyx"],
    include_dirs=["src/fastattn"],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    define_macros=[
        ("FASTATTN_BUILD_FLAGS", '"%s"' % build_flags),
        ("FASTATTN_DEBUG_BUILD", "1" if debug else "0"),
        ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
    ],
)

setup(
    ext_modules=cythonize(
        [ext],
        compiler_directives=directives,
    ),
)

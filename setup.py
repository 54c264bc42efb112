"""Build the Cython kernels.

Compiler directives live here, once. ``FASTATTN_DEBUG=1`` turns bounds, wraparound and
initialisation checks back on (a debug build for finding out-of-bounds access);
``FASTATTN_NO_OPENMP=1`` builds without OpenMP (the kernels then run single-threaded);
``FASTATTN_SANITIZE=1`` builds with AddressSanitizer and UndefinedBehaviorSanitizer (load
it with libasan preloaded: tools/check_build.sh does it all).
"""

import glob
import importlib.util
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


def _load_isa_table():
    """src/fastattn/_isa.py, loaded by path: the package is not built yet."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "fastattn", "_isa.py")
    spec = importlib.util.spec_from_file_location("_fastattn_isa", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# One implementation (_kernels_impl.pxi), one extension per instruction set of _isa.BUILDS;
# _dispatch.py imports the best one the CPU runs, as the _cpu probe (baseline flags) says.
_isa = _load_isa_table()
x86 = platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"
builds = [b for b in _isa.BUILDS if x86 or b.name not in _isa.X86_ONLY]
headers = sorted(glob.glob("src/fastattn/fa_*.h"))


def extension(module, isa, isa_flags, depends):
    flags = compile_args + list(isa_flags)
    return Extension(
        f"fastattn.{module}",
        sources=[f"src/fastattn/{module}.pyx"],
        include_dirs=["src/fastattn"],
        depends=depends,
        extra_compile_args=flags,
        extra_link_args=link_args,
        define_macros=[
            ("FASTATTN_BUILD_FLAGS", '"%s"' % " ".join(flags)),
            ("FASTATTN_ISA", '"%s"' % isa),
            ("FASTATTN_DEBUG_BUILD", "1" if debug else "0"),
        ],
    )


kernel_sources = ["src/fastattn/_kernels_impl.pxi"] + sorted(glob.glob("src/fastattn/_k_*.pxi"))
extensions = [extension(b.module, b.name, b.flags, kernel_sources + headers) for b in builds]
extensions.append(extension("_cpu", "baseline", (), ["src/fastattn/fa_cpu.h"]))

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
    ),
)

"""Choose the compiled kernels for this CPU, once, at import.

The same kernels are built for several instruction sets (setup.py): baseline x86-64,
AVX2 + FMA, and AVX-512. The best one the CPU and OS can run is imported;
``FASTATTN_ISA=baseline|avx2|avx512`` forces one (for testing every build on one
machine), and forcing one the CPU cannot run is an error rather than a crash.
"""

import importlib
import os

from . import _kernels as _baseline

__all__ = ["kernels", "isa", "available", "load"]

_MODULES = {"baseline": "_kernels", "avx2": "_kernels_avx2", "avx512": "_kernels_avx512"}


def available():
    """The instruction sets that are both built into this install and runnable here."""
    features = _baseline.cpu_features()
    found = ["baseline"]
    for name in ("avx2", "avx512"):
        if features[name]:
            try:
                importlib.import_module(f"fastattn.{_MODULES[name]}")
            except ImportError:
                continue
            found.append(name)
    return found


def load(name=None):
    """The kernels module for an instruction set (default: FASTATTN_ISA, else the best)."""
    name = name or os.environ.get("FASTATTN_ISA", "").strip().lower() or None
    runnable = available()
    if name is None:
        name = runnable[-1]
    elif name not in _MODULES:
        raise ImportError(f"FASTATTN_ISA={name!r} is not one of {sorted(_MODULES)}")
    elif name not in runnable:
        raise ImportError(
            f"FASTATTN_ISA={name!r}: this build or CPU cannot run it; available here: {runnable}"
        )
    return importlib.import_module(f"fastattn.{_MODULES[name]}")


kernels = load()
isa = kernels.build_info()["isa"]

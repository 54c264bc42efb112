"""Choose the compiled kernels for this CPU, once, at import.

The same kernels are built for each instruction set of ``_isa.BUILDS`` (setup.py). The
best one the CPU and OS can run (``_cpu.cpu_features()``) is imported;
``FASTATTN_ISA=<name>`` forces one (for testing every build on one machine), and forcing
one the CPU cannot run is an error rather than a crash.
"""

import importlib
import os

from ._cpu import cpu_features
from ._isa import BUILDS

__all__ = ["kernels", "isa", "available", "load"]

_MODULES = {b.name: b.module for b in BUILDS}


def available():
    """The instruction sets that are both built into this install and runnable here."""
    features = cpu_features()
    found = []
    for build in BUILDS:
        if build.cpu is not None and not features.get(build.cpu, False):
            continue
        try:
            importlib.import_module(f"fastattn.{build.module}")
        except ImportError:
            continue
        found.append(build.name)
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

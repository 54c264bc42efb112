"""What this CPU (and OS) can run, for choosing a kernel build at import (_dispatch.py).

A module of its own, compiled with the baseline flags only: it must run on any CPU
before anything knows which builds that CPU can execute.
"""

cdef extern from "fa_cpu.h" nogil:
    int fa_cpu_has_avx2_fma()
    int fa_cpu_has_avx512()


def cpu_features():
    """{"avx2": bool, "avx512": bool}: the keys are the ``cpu`` column of _isa.BUILDS."""
    return {"avx2": bool(fa_cpu_has_avx2_fma()), "avx512": bool(fa_cpu_has_avx512())}

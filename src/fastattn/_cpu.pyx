"""What this CPU (and OS) can run, for choosing a kernel build at import (_dispatch.py).

Also the CPU's identity from CPUID, which keys the tuning file (_tuning.py).

A module of its own, compiled with the baseline flags only: it must run on any CPU
before anything knows which builds that CPU can execute.
"""

cdef extern from "fa_cpu.h" nogil:
    int fa_cpu_has_avx2_fma()
    int fa_cpu_has_avx512()
    int fa_cpu_signature(char *vendor, int *family, int *model, int *stepping)


def cpu_features():
    """{"avx2": bool, "avx512": bool}: the keys are the ``cpu`` column of _isa.BUILDS."""
    return {"avx2": bool(fa_cpu_has_avx2_fma()), "avx512": bool(fa_cpu_has_avx512())}


def cpu_signature():
    """(vendor, family, model, stepping) from CPUID, as lscpu shows them (e.g.
    ("AuthenticAMD", 26, 2, 1)); ("", 0, 0, 0) where there is no CPUID."""
    cdef char vendor[13]
    cdef int family, model, stepping
    fa_cpu_signature(vendor, &family, &model, &stepping)
    return (vendor.decode("ascii", "replace"), family, model, stepping)

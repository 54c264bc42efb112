"""Command line: ``python -m fastattn bench [...]``, ``python -m fastattn tune [...]`` and
``python -m fastattn info``."""

import os
import sys

# OpenBLAS settings that some machines set for old OpenBLAS builds; they hold a current
# NumPy or SciPy to older kernels, so the benchmark runs without them.
_OPENBLAS_RESTRICTIONS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def info():
    """Print the version, how the kernels were built, OpenMP, threads and BLAS."""
    import platform

    import numpy as np

    import fastattn
    from fastattn import _dispatch, _plan, _tuning

    _kernels = _dispatch.kernels
    b = _kernels.build_info()
    print(f"fastattn {fastattn.__version__}")
    print(f"instruction set: {b['isa']} (runnable here: {', '.join(_dispatch.available())}; "
          f"FASTATTN_ISA={os.environ.get('FASTATTN_ISA', '')!r})")
    print(f"kernels: {_kernels.__file__}")
    print(f"compiler flags: {b['compile_flags']}")
    print(f"debug checks: {'on' if b['debug_checks'] else 'off'}")
    print(f"OpenMP: {'on' if b['openmp'] else 'off'}, default threads {b['max_threads']}")
    print(_plan.tile_summary())
    engines = _kernels.engines()
    print(f"bfloat16 engine: {_plan.ENGINE} (FASTATTN_ENGINE="
          f"{os.environ.get('FASTATTN_ENGINE', '')!r}); "
          + "; ".join(f"{name}: {why}" for name, why in engines.items()))
    print(f"float32 precision default: {_plan.float32_precision()}")
    print(f"tuning file: {_tuning.path() or 'none (FASTATTN_TUNING is off)'}")
    print(f"python {platform.python_version()} on {platform.machine()}, NumPy {np.__version__}")
    try:
        from threadpoolctl import threadpool_info

        for lib in threadpool_info():
            # (what threadpoolctl does not know, an OpenMP runtime's version, is left out)
            name = " ".join(str(x) for x in (lib["internal_api"], lib.get("version")) if x)
            about = ", ".join(str(x) for x in (lib.get("architecture"),
                                               f"{lib['num_threads']} threads") if x)
            print(f"{lib['user_api']}: {name} ({about}) {lib['filepath']}")
    except ImportError:  # pragma: no cover
        pass
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m fastattn {bench,tune,info} [options]\n"
              "  bench   time attention, softmax and projection against NumPy (and PyTorch)\n"
              "  tune    measure this machine's tiles, tile GEMMs and register blocks, and store them\n"
              "  info    version, build flags, OpenMP, threads and BLAS")
        return 0 if argv else 2
    if argv[0] == "bench":
        restricting = [name for name in _OPENBLAS_RESTRICTIONS if name in os.environ]
        if restricting and os.environ.get("FASTATTN_BENCH_REEXEC") != "1":
            # OpenBLAS reads these when NumPy loads it, before this code runs: start again
            # without them, so that the peers run the kernels their users get.
            env = {k: v for k, v in os.environ.items() if k not in restricting}
            env["FASTATTN_BENCH_REEXEC"] = "1"
            env["FASTATTN_BENCH_UNSET"] = ", ".join(f"{k}={os.environ[k]}" for k in restricting)
            os.execve(sys.executable, [sys.executable, "-m", "fastattn", *argv], env)
        from fastattn.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[0] == "tune":
        from fastattn.tune import main as tune_main

        return tune_main(argv[1:])
    if argv[0] == "info":
        if len(argv) > 1:
            print("usage: python -m fastattn info\n\nThe build, the CPU, the kernels chosen "
                  "and the threads.", file=sys.stdout if argv[1] in ("-h", "--help") else sys.stderr)
            return 0 if argv[1] in ("-h", "--help") else 2
        return info()
    print(f"unknown command {argv[0]!r}; use bench, tune or info", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Run the whole test suite against another build of the kernels, in one command.
#   tools/check_build.sh debug      Cython bounds, wraparound and initialisation checks on
#                                   (FASTATTN_DEBUG=1): an out-of-range index raises.
#   tools/check_build.sh address    AddressSanitizer + UndefinedBehaviorSanitizer
#                                   (FASTATTN_SANITIZE=1): any out-of-bounds read or write
#                                   of a heap buffer (NumPy's arrays, the kernels' scratch,
#                                   BLAS operands) or any undefined behaviour aborts the run.
#   tools/check_build.sh no-openmp  The build without OpenMP (FASTATTN_NO_OPENMP=1): the
#                                   same results, single-threaded.
# The build happens in a copy of the sources, in a fresh virtual environment, so the
# checkout and its in-place build are left alone. Extra arguments go to pytest.
set -euo pipefail
mode=${1:-address}
shift || true
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap '/bin/rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
# The runtime and test requirements (with ml_dtypes, so that the bfloat16 paths run), and
# the build requirements of pyproject.toml.
python -m pip install --quiet "numpy>=1.25" "scipy>=1.11" "threadpoolctl>=3.1" \
    "pytest>=7" "hypothesis>=6.80" "setuptools>=77" "Cython>=3.0,<3.4" "ml_dtypes>=0.4"
cp -r "$root/src" "$root/tests" "$root/setup.py" "$root/pyproject.toml" "$root/README.md" "$work/"
cd "$work"
find src -name '*.so' -delete
find src -name '*.c' -delete

case "$mode" in
debug)
    FASTATTN_DEBUG=1 python setup.py --quiet build_ext --inplace
    PYTHONPATH=src python -m fastattn info | sed -n '4,6p'
    PYTHONPATH=src python -m pytest -q -p no:cacheprovider tests "$@"
    ;;
address)
    FASTATTN_SANITIZE=1 python setup.py --quiet build_ext --inplace
    libasan=$(gcc -print-file-name=libasan.so)
    # Python's own allocator is switched to malloc so ASan sees every object too; leak
    # checking is off because CPython frees little at exit by design (leaks are tested
    # by tests/test_resources.py instead).
    export LD_PRELOAD="$libasan" PYTHONMALLOC=malloc
    export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    PYTHONPATH=src python -m fastattn info | sed -n '4,6p'
    # Canary: a kernel call that reads past q on purpose (its index names batch entry 1 of
    # a 1-entry q) must be caught, or this run proves nothing.
    if PYTHONPATH=src python - > canary.log 2>&1 <<'PY'
import numpy as np
from fastattn import _dispatch
q = np.ones((1, 16, 8)); k = np.ones((1, 16, 8)); out = np.empty((1, 16, 8)); lse = np.empty((1, 16))
_dispatch.kernels.attention(q, k, k, None, 0, np.array([[1], [0], [0]], dtype=np.intp), False, 0,
                            1.0, 0.0, None, out, lse, 16, 16, False, 1)  # no mask; BLAS tiles
PY
    then
        echo "AddressSanitizer missed a deliberate out-of-bounds read" >&2
        exit 1
    fi
    grep -q "BLAS operand out of bounds" canary.log
    grep -q "is located" canary.log
    echo "canary: AddressSanitizer caught a deliberate out-of-bounds read, as it should"
    for isa in $(PYTHONPATH=src python -c "import fastattn._dispatch as d; print(' '.join(d.available()))"); do
        echo "== AddressSanitizer, FASTATTN_ISA=$isa"
        FASTATTN_ISA=$isa PYTHONPATH=src python -m pytest -q -p no:cacheprovider tests "$@"
    done
    ;;
no-openmp)
    FASTATTN_NO_OPENMP=1 python setup.py --quiet build_ext --inplace
    PYTHONPATH=src python -m fastattn info | sed -n '4,6p'
    FASTATTN_NO_OPENMP=1 PYTHONPATH=src python -m pytest -q -p no:cacheprovider tests "$@"
    ;;
*)
    echo "usage: tools/check_build.sh debug|address|no-openmp [pytest args]" >&2
    exit 2
    ;;
esac

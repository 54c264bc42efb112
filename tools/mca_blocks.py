"""The micro-kernels' register blocks under llvm-mca's CPU models: a prediction, per block
and CPU model, of the inner loop's cycles per step and its share of two FMAs per cycle,
for CPUs this project cannot run on (Intel's, here, from an AMD machine).

    python tools/mca_blocks.py [--isa avx512|avx2] [--dtype float|double] [--cpus a,b,...]

It compiles a small file around fa_microkernels.h with the build's own flags (_isa.py,
setup.py's -O3 -fno-trapping-math), one function per block of FA_MK_SCORES_BLOCKS and
FA_MK_PV_BLOCKS (head size 64), finds in each the loop whose body holds rows x vectors
FMAs (one step of the register block), and runs llvm-mca on that body. Needs gcc and
llvm-mca on PATH. A model is not the machine: it sees one loop in steady state from L1,
no cache misses, and its port tables are approximations (LLVM 14 gives the AVX-512 x2
blocks, with a broadcast per two FMAs, a cycle in nine more than the x4 ones). `python -m
fastattn tune --kernels` measures the real thing.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src", "fastattn")

HARNESS = """
#include "fa_microkernels.h"
#define S(mr, nv) void s_##mr##x##nv(const T *q, ptrdiff_t rows, const T *kp, ptrdiff_t n, T *s) \\
    { FA_PASTE(fa_mk_scores_mrnv_, SFX)(mr, nv, q, rows, 64, kp, n, s, n); }
#define P(mr, nv) void p_##mr##x##nv(const T *p, ptrdiff_t rows, const T *vp, ptrdiff_t n, T *o) \\
    { FA_PASTE(fa_mk_pv_mrnv_, SFX)(mr, nv, p, n, rows, vp, 0, n, 0, 64, o); }
FA_MK_SCORES_BLOCKS(S)
FA_MK_PV_BLOCKS(P)
"""


def isa_flags(isa):
    sys.path.insert(0, SRC)
    from _isa import BUILDS  # by path: the package need not be built
    return next(b.flags for b in BUILDS if b.name == isa)


def loop_bodies(asm):
    """{function: the body of its loop with rows x vectors FMAs (the shortest such)}."""
    funcs, cur = {}, None
    for line in asm.splitlines():
        m = re.match(r"^([sp]_\d+x\d+):", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
        elif cur is not None:
            cur.append(line)
    bodies = {}
    for name, lines in funcs.items():
        mr, nv = map(int, name[2:].split("x"))
        labels = {l.rstrip(":"): i for i, l in enumerate(lines) if re.match(r"^\.L\d+:", l)}
        for i, line in enumerate(lines):
            m = re.match(r"\s+j\w+\s+(\.L\d+)", line)
            if m and labels.get(m.group(1), i) < i:
                body = [b for b in lines[labels[m.group(1)] + 1:i + 1] if not b.strip().startswith(".")]
                if (sum("vfmadd" in b for b in body) == mr * nv
                        and (name not in bodies or len(body) < len(bodies[name]))):
                    bodies[name] = body
    return bodies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", default="avx512", choices=("avx512", "avx2"))
    parser.add_argument("--dtype", default="float", choices=("float", "double"))
    parser.add_argument("--cpus", default=None,
                        help="llvm-mca -mcpu names (default: Intel server cores of the ISA)")
    args = parser.parse_args(argv)
    for tool in ("gcc", "llvm-mca"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on PATH")
    cpus = (args.cpus or ("skylake-avx512,icelake-server,sapphirerapids" if args.isa == "avx512"
                          else "haswell,skylake")).split(",")
    with tempfile.TemporaryDirectory() as tmp:
        c = os.path.join(tmp, "blocks.c")
        with open(c, "w") as f:
            f.write(f"#define T {args.dtype}\n#define SFX {args.dtype[0]}\n" + HARNESS)
        asm = subprocess.run(["gcc", "-O3", "-fno-trapping-math", *isa_flags(args.isa),
                              "-I", SRC, "-S", "-o", "-", c],
                             check=True, capture_output=True, text=True).stdout
    print(f"{args.isa} build, {args.dtype}: one step of each register block's loop, "
          f"cycles per step (llvm-mca, 200 iterations) and share of 2 FMAs per cycle")
    for name, body in loop_bodies(asm).items():
        mr, nv = map(int, name[2:].split("x"))
        cells = []
        for cpu in cpus:
            run = subprocess.run(["llvm-mca", f"-mcpu={cpu}", "-iterations=200"],
                                 input="\n".join(body), capture_output=True, text=True)
            if run.returncode:
                first = (run.stderr.strip().splitlines() or ["?"])[0]
                print(f"llvm-mca -mcpu={cpu} cannot model the {args.isa} build's loop: {first}",
                      file=sys.stderr)
                return 1
            out = run.stdout
            cycles = float(re.search(r"Total Cycles:\s+(\d+)", out).group(1)) / 200
            cells.append(f"{cpu} {cycles:5.1f} ({mr * nv / cycles / 2:4.0%})")
        kernel = "scores" if name[0] == "s" else "P V"
        print(f"  {kernel:6} {name[2:]:>5}  {mr * nv:2d} FMAs, {len(body):2d} instructions: "
              + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The micro-kernels' register blocks: every block the build compiles gives the same bits
as its default (each output sums in the same order whichever block holds it), whatever
the shape's leftover rows and column bands; how a block is chosen (FASTATTN_MK, the
tuning file, the CPU table) and the kernel probe (``tune --kernels``). Runs on every
build CI forces, so every block of every build runs on any CPU; the timings are never
asserted."""

import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn import _dispatch, _plan, _tuning, tune
from fastattn._dispatch import kernels as _kernels

from conftest import float64_attention, kernel_policy

BLOCKS = _kernels.mk_blocks()
LANES = _plan.MICROKERNEL_LANES
needs_micro = pytest.mark.skipif(not BLOCKS["scores"], reason="this build has no micro-kernels")
SUFFIX = {np.float32: "f", np.float64: "d"}
# The tiles in the micro-kernels whatever FASTATTN_TILE_GEMM says (CI runs the suite with
# =blas too): these tests are about the micro-kernels.
MICRO = {"lanes_f": LANES.get(4, 0), "lanes_d": LANES.get(8, 0)}


def _shapes(dtype):
    """(B, H, L_q, L_k, D, D_v, causal): rows that leave every block's height over (7, 13,
    300), a head size of whole vectors and one with a band of one vector left (D_v = a
    full band + one vector), and keys not a multiple of any panel."""
    w = LANES.get(np.dtype(dtype).itemsize, 8)
    band = {16: 4, 8: 4 if dtype == np.float64 else 2, 4: 2}.get(w, 2)  # the values' band
    return [(1, 2, 7, 45, 4 * w, 4 * w, False), (2, 3, 300, 337, 4 * w, (band + 1) * w, True),
            (1, 1, 13, 129, 2 * w, w, False), (1, 2, 61, 1000, 8 * w, 8 * w, True)]


@needs_micro
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_register_block_gives_the_default_blocks_bits(dtype):
    rng = np.random.default_rng(11)
    sfx = SUFFIX[dtype]
    for b, h, lq, lk, d, d_v, causal in _shapes(dtype):
        q = rng.standard_normal((b, h, lq, d)).astype(dtype)
        k = rng.standard_normal((b, h, lk, d)).astype(dtype)
        v = rng.standard_normal((b, h, lk, d_v)).astype(dtype)
        with kernel_policy(**MICRO, **{f"mk_scores_{sfx}": 0, f"mk_pv_{sfx}": 0}):
            assert _kernels.use_microkernels(np.dtype(dtype).itemsize, d, d_v)
            expected, lse = fastattn.attention(q, k, v, causal=causal, return_lse=True)
        mask = np.arange(lk) <= np.arange(lq)[:, None] + (lk - lq) if causal else None
        oracle, _ = float64_attention(q, k, v, mask)
        tol = 2e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(expected, oracle, rtol=tol, atol=tol)
        for s in range(len(BLOCKS["scores"])):
            for p in range(len(BLOCKS["pv"])):
                with kernel_policy(**MICRO, **{f"mk_scores_{sfx}": s, f"mk_pv_{sfx}": p}):
                    got, got_lse = fastattn.attention(q, k, v, causal=causal, return_lse=True)
                case = (BLOCKS["scores"][s], BLOCKS["pv"][p], (b, h, lq, lk, d, d_v, causal))
                assert np.array_equal(got, expected), case
                assert np.array_equal(got_lse, lse), case


@needs_micro
def test_every_register_block_widening_16_bit_inputs():
    """bfloat16 inputs widened for the float32 micro-kernels (no engine) take the float32
    blocks: the same bits in each."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(12)
    w = LANES[4]
    q, k, v = (rng.standard_normal((1, 2, 50, 4 * w)).astype(ml_dtypes.bfloat16)
               for _ in range(3))
    with kernel_policy(**MICRO, engine=0, mk_scores_f=0, mk_pv_f=0):
        assert _kernels.lowp_mode("bfloat16", 4 * w, 4 * w) == "widen"
        expected = fastattn.attention(q, k, v, causal=True)
        for s in range(len(BLOCKS["scores"])):
            for p in range(len(BLOCKS["pv"])):
                with kernel_policy(mk_scores_f=s, mk_pv_f=p):
                    got = fastattn.attention(q, k, v, causal=True)
                assert np.array_equal(got.view(np.uint16), expected.view(np.uint16)), (s, p)


def test_block_names_and_the_policy_refuse_what_the_build_lacks():
    if BLOCKS["scores"]:
        for names in BLOCKS.values():
            assert all(n.count("x") == 1 and all(x.isdigit() for x in n.split("x")) for n in names)
            assert len(set(names)) == len(names)
    else:
        assert BLOCKS == {"scores": [], "pv": []}
    for name, count in (("mk_scores_f", len(BLOCKS["scores"])), ("mk_pv_d", len(BLOCKS["pv"]))):
        for bad in (-1, max(count, 1), 1.5, "8x2"):
            with pytest.raises(ValueError, match=name):
                _kernels.set_policy(**{name: bad})


def test_the_cpu_table_names_blocks_its_builds_have():
    """A row of MK_TABLE for a build names blocks of that build, for both dtypes (a typo
    would fail every import on that CPU)."""
    for (vendor, family, isa), row in _plan.MK_TABLE.items():
        assert isinstance(vendor, str) and isinstance(family, int)
        assert isa in ("avx2", "avx512")  # the builds with micro-kernels
        assert set(row) == {"float32", "float64"}
        if isa == _dispatch.isa:
            for blocks in row.values():
                assert set(blocks) == {"scores", "pv"}
                assert all(blocks[k] in BLOCKS[k] for k in blocks), (vendor, family, isa)


@needs_micro
def test_parse_mk_takes_this_builds_names_only():
    s, p = BLOCKS["scores"][-1], BLOCKS["pv"][-1]
    assert _plan.parse_mk("") == {}
    assert _plan.parse_mk(f"scores={s}") == {"scores": s}
    assert _plan.parse_mk(f" PV = {p} , scores={s}") == {"pv": p, "scores": s}
    for bad, match in ((f"scores={s},scores={s}", "expected"), ("tiles=8x2", "expected"),
                       (s, "expected"), ("scores=99x9", "not one of this build's")):
        with pytest.raises(ValueError, match=match):
            _plan.parse_mk(bad)


CHILD = """
import numpy as np, fastattn
from fastattn import _plan
p = _plan._kernels.policy()
print(p["mk_scores_f"], p["mk_pv_f"], p["mk_scores_d"], p["mk_pv_d"])
print(_plan.tile_summary())
"""


def _child(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("FASTATTN_MK", "FASTATTN_TILE_GEMM")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", CHILD], env=full, capture_output=True, text=True)


@needs_micro
def test_fastattn_mk_forces_the_blocks_of_both_dtypes(tmp_path):
    s, p = BLOCKS["scores"][-1], BLOCKS["pv"][-1]
    child = _child(FASTATTN_MK=f"scores={s},pv={p}", FASTATTN_TUNING="off")
    assert child.returncode == 0, child.stderr
    numbers, summary = child.stdout.splitlines()
    last_s, last_p = len(BLOCKS["scores"]) - 1, len(BLOCKS["pv"]) - 1
    assert numbers == f"{last_s} {last_p} {last_s} {last_p}"
    assert f"float32 scores {s}, P V {p}" in summary and "(FASTATTN_MK)" in summary
    child = _child(FASTATTN_MK="scores=99x9")
    assert child.returncode != 0 and "ImportError" in child.stderr and "99x9" in child.stderr


def test_a_build_without_micro_kernels_has_nothing_to_force():
    child = _child(FASTATTN_MK="scores=8x2", FASTATTN_ISA="baseline", FASTATTN_TUNING="off")
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines()[0] == "0 0 0 0"


@needs_micro
def test_choice_order_forced_then_tuned_then_cpu_table(monkeypatch):
    vendor, family = fastattn._cpu.cpu_signature()[:2]
    first = {"scores": BLOCKS["scores"][0], "pv": BLOCKS["pv"][0]}
    monkeypatch.setattr(_plan, "MK_TABLE", {})
    assert _plan.mk_choice(None, {}) == ({"float32": first, "float64": first}, "build default")
    row = {"float32": {"scores": BLOCKS["scores"][1]}, "float64": {"pv": BLOCKS["pv"][1]}}
    monkeypatch.setattr(_plan, "MK_TABLE", {(vendor, family, _dispatch.isa): row})
    blocks, why = _plan.mk_choice(None, {})
    assert why == "CPU table"
    assert blocks == {"float32": dict(first, scores=BLOCKS["scores"][1]),
                      "float64": dict(first, pv=BLOCKS["pv"][1])}
    # another vendor, family or build: not this row
    for other in ((vendor + "x", family), (vendor, family + 1)):
        assert _plan.mk_defaults(other + (0, 0)) == {"float32": first, "float64": first}
    assert _plan.mk_defaults(isa="baseline") == {"float32": first, "float64": first}
    tuned = {"mk_blocks": {"float64": {"scores": BLOCKS["scores"][-1]}}}
    blocks, why = _plan.mk_choice(tuned, {})
    assert why == "tuned" and blocks["float64"]["scores"] == BLOCKS["scores"][-1]
    assert blocks["float32"] == dict(first, scores=BLOCKS["scores"][1])
    blocks, why = _plan.mk_choice(tuned, {"pv": BLOCKS["pv"][-1]})
    assert why == "FASTATTN_MK" and {b["pv"] for b in blocks.values()} == {BLOCKS["pv"][-1]}
    policy = _plan.mk_policy(blocks)
    assert policy["mk_pv_f"] == policy["mk_pv_d"] == len(BLOCKS["pv"]) - 1
    assert policy["mk_scores_d"] == len(BLOCKS["scores"]) - 1
    with kernel_policy(**policy):  # mk_in_use reads back what mk_policy set
        assert _plan.mk_in_use() == blocks


@needs_micro
def test_the_tuning_file_stores_blocks_and_refuses_unknown_ones(tmp_path, monkeypatch):
    file = tmp_path / "tuning.json"
    monkeypatch.setenv(_tuning.ENV, str(file))
    entry = {"q_block": 128, "k_block": 256, "tile_gemm": {"float32": "micro"},
             "mk_blocks": {"float32": {"scores": BLOCKS["scores"][-1], "pv": BLOCKS["pv"][0]}}}
    _tuning.save(_dispatch.isa, entry)
    assert _tuning.load(_dispatch.isa, BLOCKS) == entry
    for bad in ({"float32": {"scores": "99x9"}}, {"float16": {}}, {"float32": {"tiles": "8x2"}},
                {"float32": ["8x2"]}, [], {"float32": {"pv": 8}}):
        with pytest.raises(ValueError, match="mk_blocks"):
            _tuning.validate(dict(entry, mk_blocks=bad), BLOCKS)
    file.write_text(json.dumps({"format": 1, "machines": {
        _tuning.machine_key(_dispatch.isa): dict(entry, mk_blocks={"float32": {"pv": "99x9"}})}}))
    with pytest.warns(RuntimeWarning, match="ignoring the tuning file"):
        assert _tuning.load(_dispatch.isa, BLOCKS) is None


@needs_micro
def test_the_probe_runs_every_block_of_both_kernels():
    for kernel in ("scores", "pv"):
        for b in range(len(BLOCKS[kernel])):
            for size in (4, 8):
                w = LANES[size]
                assert _kernels.mk_probe(kernel, size, b, 13, 40, 2 * w, 2) > 0
    for args in (("qk", 4, 0, 8, 8, 64, 1), ("scores", 4, len(BLOCKS["scores"]), 8, 8, 64, 1),
                 ("pv", 2, 0, 8, 8, 64, 1), ("pv", 4, 0, 0, 8, 64, 1), ("pv", 4, 0, 8, 8, 64, 0),
                 ("scores", 4, 0, 8, 8, LANES[4] + 1, 1)):
        with pytest.raises(ValueError, match="mk_probe"):
            _kernels.mk_probe(*args)


@needs_micro
def test_tune_kernels_reports_every_block_against_the_peak(monkeypatch, capsys):
    monkeypatch.setattr(tune, "PROBE_SETS", {4: (("L1", 9, 40, 2 * LANES[4]),),
                                             8: (("L1", 9, 40, 2 * LANES[8]),)})
    rows = tune.probe_kernels(rounds=1, min_time=0.0)
    assert len(rows) == 2 * (len(BLOCKS["scores"]) + len(BLOCKS["pv"]))
    assert {(r["dtype"], r["kernel"], r["block"]) for r in rows} == {
        (d, k, b) for d in ("float32", "float64") for k in ("scores", "pv") for b in BLOCKS[k]}
    assert all(r["gflops"] > 0 and r["peak"] > 0 for r in rows)
    text = capsys.readouterr().out
    assert "FMA peak of one core" in text and "(in use)" in text
    assert text.count("GFLOP/s") >= len(rows)


def test_tune_kernels_reports_the_decoding_step_of_every_storage(monkeypatch, capsys):
    # Small operands: the table's rows, not the speed, are under test. (Every build has
    # the decoding kernel; the baseline build has no micro-kernels, whose probe says so.)
    if BLOCKS["scores"]:
        monkeypatch.setattr(tune, "PROBE_SETS", {4: (("L1", 9, 40, 2 * LANES[4]),),
                                                 8: (("L1", 9, 40, 2 * LANES[8]),)})
    monkeypatch.setattr(tune, "DECODE_PROBE", {"rows": 3, "tokens": 40, "d": 64})
    assert tune.main(["--kernels", "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    rows = tune.probe_decode(rounds=1, min_time=0.0)
    storages = (None, "bfloat16", "float16", "int8", "float8_e4m3")
    expected = {(s, None) for s in storages} | {
        (s, "bfloat16") for s in storages[1:] if _kernels.decode_products(64, 64, s)}
    assert {(r["storage"], r["precision"]) for r in rows} == expected
    assert all(r["us"] > 0 and r["gflops"] > 0 and r["peak"] > 0 for r in rows)
    assert "decoding probe: one step of 3 query rows against 40 cached tokens, D 64" in text
    assert text.count("GFLOP/s") >= len(rows)


def test_tune_kernels_without_micro_kernels_says_so(monkeypatch, capsys):
    monkeypatch.setattr(_plan, "MK_BLOCKS", {"scores": [], "pv": []})
    assert tune.probe_kernels(rounds=1) == []
    assert "has no micro-kernels" in capsys.readouterr().out


TOOL = os.path.join(os.path.dirname(__file__), "..", "tools", "mca_blocks.py")


@pytest.mark.skipif(not os.path.exists(TOOL), reason="tools/ is not shipped")
@pytest.mark.skipif(not all(map(__import__("shutil").which, ("gcc", "llvm-mca"))),
                    reason="needs gcc and llvm-mca")
@pytest.mark.parametrize("isa, cpu", [("avx512", "skylake-avx512"), ("avx2", "skylake")])
def test_the_llvm_mca_tool_finds_every_blocks_loop(isa, cpu):
    """tools/mca_blocks.py finds, for each block of the build's lists, the loop of one
    register-block step (rows x vectors FMAs) and models it."""
    text = open(os.path.join(os.path.dirname(TOOL), "..", "src", "fastattn",
                             "fa_microkernels.h")).read()
    branch = text.split("#if defined(__AVX512F__)\n#define FA_MK_SCORES_NV")[1].split("#else")
    lists = branch[0] if isa == "avx512" else branch[1]
    expected = {(k, f"{mr}x{nv}") for k, name in (("scores", "SCORES"), ("P V", "PV"))
                for mr, nv in re.findall(r"X\((\d+), (\d+)\)",
                                         re.search(rf"FA_MK_{name}_BLOCKS\(X\)(.*)", lists).group(1))}
    child = subprocess.run([sys.executable, TOOL, "--isa", isa, "--cpus", cpu],
                           capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    found = set(re.findall(rf"^\s+(scores|P V)\s+(\d+x\d+)\s+\d+ FMAs.*{cpu}\s+[\d.]+ \(\s*\d+%\)",
                           child.stdout, re.M))
    assert found == expected
    # a model without the build's instructions is an error that says so
    if isa == "avx512":
        child = subprocess.run([sys.executable, TOOL, "--isa", isa, "--cpus", "skylake"],
                               capture_output=True, text=True)
        assert child.returncode == 1 and "cannot model" in child.stderr


def test_tune_prints_the_blocks_it_chose(monkeypatch, capsys):
    monkeypatch.setenv(_tuning.ENV, "off")
    entry = {"q_block": 256, "k_block": 512, "tile_gemm": {"float32": "micro"},
             "mk_blocks": {"float32": {"scores": "12x2", "pv": "6x4"}}}
    monkeypatch.setattr(tune, "tune", lambda **kwargs: entry)
    assert tune.main(["--dry-run"]) == 0
    assert "register blocks float32 scores 12x2, P V 6x4" in capsys.readouterr().out

"""The tuning file and ``python -m fastattn tune``: what is stored, what an import reads,
what it refuses, and that a tuned process computes exactly what the same choices made by
hand compute. (The timings themselves are never asserted: which candidate wins is the
machine's business.)"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn import _dispatch, _plan, _tuning, tune
from fastattn._dispatch import kernels as _kernels
from fastattn.__main__ import main as cli

from conftest import float64_attention

ISA = _dispatch.isa


@pytest.fixture
def tuning_file(tmp_path, monkeypatch):
    file = tmp_path / "sub" / "tuning.json"  # a directory that does not exist yet
    monkeypatch.setenv(_tuning.ENV, str(file))
    return file


ENTRY = {"q_block": 128, "k_block": 256, "tile_gemm": {"float32": "blas", "float64": "micro"}}


def test_auto_lanes_drop_the_dtypes_tuned_to_blas():
    lanes = _plan.MICROKERNEL_LANES
    assert _plan.auto_lanes(None) == lanes
    assert _plan.auto_lanes(ENTRY) == {s: n for s, n in lanes.items() if s != 4}
    assert _plan.auto_lanes(dict(ENTRY, tile_gemm={})) == lanes
    assert _plan.auto_lanes(dict(ENTRY, tile_gemm={"float32": "blas", "float64": "blas"})) == {}


def test_choose_keeps_the_default_unless_a_candidate_is_clearly_faster():
    assert tune.choose("a", {"a": 1.0, "b": 0.95}) == "a"    # 5%: noise on a shared machine
    assert tune.choose("a", {"a": 1.0, "b": 0.92}) == "b"
    assert tune.choose("a", {"a": 1.0, "b": 0.90, "c": 0.80}) == "c"
    assert tune.choose("a", {"a": 1.0, "b": 1.5}) == "a"
    assert tune.choose("a", {"a": 1.0, "b": 0.97}, margin=0.02) == "b"


def test_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(_tuning.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _tuning.path() == os.path.join(str(tmp_path), "fastattn", "tuning.json")
    for off in ("", "off", " OFF "):
        monkeypatch.setenv(_tuning.ENV, off)
        assert _tuning.path() is None
        assert _tuning.load(ISA) is None
        with pytest.raises(RuntimeError, match="no tuning file"):
            _tuning.save(ISA, ENTRY)
        assert not _tuning.forget(ISA)


def test_save_load_forget_round_trip_keeps_other_machines(tuning_file):
    assert _tuning.load(ISA) is None and not _tuning.forget(ISA)  # no file yet
    other = "GenuineIntel family 6 model 207 stepping 2; avx512; fastattn 0.0; scipy 1"
    tuning_file.parent.mkdir()
    tuning_file.write_text(json.dumps({"format": 1, "machines": {other: ENTRY}}))
    assert _tuning.load(ISA) is None  # another machine's entry is not this one's
    assert _tuning.save(ISA, dict(ENTRY, measured="2026-12-03")) == str(tuning_file)
    assert _tuning.load(ISA) == dict(ENTRY, measured="2026-12-03")
    stored = json.loads(tuning_file.read_text())["machines"]
    assert set(stored) == {other, _tuning.machine_key(ISA)}
    assert _tuning.forget(ISA) and _tuning.load(ISA) is None
    assert set(json.loads(tuning_file.read_text())["machines"]) == {other}
    assert [p.name for p in tuning_file.parent.iterdir()] == ["tuning.json"]  # no temp files


def test_the_key_names_cpu_build_versions_and_blas_restrictions(monkeypatch):
    vendor, family, model, stepping = fastattn._cpu.cpu_signature()
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    key = _tuning.machine_key(ISA)
    assert f"family {family} model {model} stepping {stepping}" in key
    assert ISA in key and fastattn.__version__ in key and "scipy" in key
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert _tuning.machine_key(ISA) == key + "; OPENBLAS_CORETYPE=Haswell"


@pytest.mark.skipif(not fastattn._cpu.cpu_signature()[0], reason="no CPUID here")
def test_cpu_signature_matches_the_operating_system():
    vendor, family, model, stepping = fastattn._cpu.cpu_signature()
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                          if ":" in line)
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert (vendor, str(family), str(model)) == (
        fields["vendor_id"], fields["cpu family"], fields["model"])
    assert str(stepping) == fields.get("stepping", str(stepping))


@pytest.mark.parametrize("bad", [
    {"q_block": 0, "k_block": 256, "tile_gemm": {}},
    {"q_block": 128, "k_block": 1 << 20, "tile_gemm": {}},
    {"q_block": True, "k_block": 256, "tile_gemm": {}},
    {"q_block": 128.0, "k_block": 256, "tile_gemm": {}},
    {"q_block": 128, "k_block": 256, "tile_gemm": {"float32": "fast"}},
    {"q_block": 128, "k_block": 256, "tile_gemm": {"4": "blas"}},
    {"q_block": 128, "k_block": 256, "tile_gemm": {"float16": "blas"}},
    {"q_block": 128, "k_block": 256},
    [128, 256],
])
def test_an_entry_that_does_not_validate_is_ignored_with_a_warning(tuning_file, bad):
    with pytest.raises(ValueError):
        _tuning.validate(bad)
    tuning_file.parent.mkdir()
    tuning_file.write_text(json.dumps({"format": 1, "machines": {_tuning.machine_key(ISA): bad}}))
    with pytest.warns(RuntimeWarning, match="ignoring the tuning file"):
        assert _tuning.load(ISA) is None


@pytest.mark.parametrize("text", ["{", "[]", '{"format": 2, "machines": {}}', '{"format": 1}'])
def test_an_unreadable_file_is_ignored_with_a_warning_and_replaced_on_save(tuning_file, text):
    tuning_file.parent.mkdir()
    tuning_file.write_text(text)
    with pytest.warns(RuntimeWarning, match="ignoring the tuning file"):
        assert _tuning.load(ISA) is None
    _tuning.save(ISA, ENTRY)
    assert _tuning.load(ISA) == ENTRY


CHILD = """
import sys, numpy as np, fastattn
from fastattn import _plan
rng = np.random.default_rng(5)
out = {}
for dtype in (np.float32, np.float64):
    q, k, v = (rng.standard_normal((2, 3, 300, 64)).astype(dtype) for _ in range(3))
    out[np.dtype(dtype).name] = (fastattn.attention(q, k, v), fastattn.attention(q[:, :, :7], k, v))
np.savez(sys.argv[1], **{f"{n}_{i}": a for n, pair in out.items() for i, a in enumerate(pair)})
p = _plan._kernels.policy()
print(p["q_block"], p["k_block"], sorted(_plan.tile_lanes()))
print(_plan.tile_summary())
"""


def _inputs():
    rng = np.random.default_rng(5)
    result = {}
    for dtype in (np.float32, np.float64):
        result[np.dtype(dtype).name] = tuple(rng.standard_normal((2, 3, 300, 64)).astype(dtype)
                                             for _ in range(3))
    return result


@pytest.mark.parametrize("forced", [None, "micro"])
def test_a_tuned_process_computes_what_the_same_choices_compute(tuning_file, tmp_path,
                                                                 monkeypatch, forced):
    _tuning.save(ISA, dict(ENTRY, measured="2026-12-03"))
    env = dict(os.environ)
    env.pop("FASTATTN_TILE_GEMM", None)
    if forced:
        env["FASTATTN_TILE_GEMM"] = forced
    result = tmp_path / "child.npz"
    child = subprocess.run([sys.executable, "-c", CHILD, str(result)], env=env,
                           capture_output=True, text=True, check=True)
    numbers, summary = child.stdout.splitlines()
    lanes = set(_plan.MICROKERNEL_LANES)
    expect_lanes = sorted(lanes if forced else lanes - {4})
    assert numbers == f"128 256 {expect_lanes}"
    assert (f"FASTATTN_TILE_GEMM={forced}" if forced else "tuned on this machine 2026-12-03") in summary
    # The same choices made by hand in this process: bitwise the same results.
    lanes = {"micro": _plan.MICROKERNEL_LANES, "auto": _plan.auto_lanes(ENTRY)}[forced or "auto"]
    saved = _kernels.set_policy(q_block=128, k_block=256, lanes_f=lanes.get(4, 0),
                                lanes_d=lanes.get(8, 0))
    try:
        got = np.load(result)
        for name, (q, k, v) in _inputs().items():
            mine = (fastattn.attention(q, k, v), fastattn.attention(q[:, :, :7], k, v))
            for i, expected in enumerate(mine):
                np.testing.assert_array_equal(got[f"{name}_{i}"], expected)
            oracle, _ = float64_attention(q, k, v)
            tol = 2e-5 if name == "float32" else 1e-12
            np.testing.assert_allclose(got[f"{name}_0"], oracle, rtol=tol, atol=tol)
    finally:
        _kernels.set_policy(**saved)


@pytest.mark.timing
def test_tune_measures_every_candidate_and_restores_the_plan():
    saved = _kernels.policy()
    lines = []

    class Out:
        def write(self, text):
            lines.append(text)

    shapes = {4: (1, 2, 40, 70, 16), 8: (1, 2, 40, 70, 16)}
    entry = tune.tune(shapes=shapes, rounds=1, min_time=0.0, out=Out())
    assert _kernels.policy() == saved
    _tuning.validate(entry)
    assert (entry["q_block"], entry["k_block"]) in tune.CANDIDATE_TILES
    assert set(entry["tile_gemm"]) == {f"float{8 * s}" for s in _plan.MICROKERNEL_LANES}
    text = "".join(lines)
    for q_block, k_block in tune.CANDIDATE_TILES:
        assert f"{q_block} x {k_block}:" in text
    # the register blocks are measured for each dtype whose tiles stay in the micro-kernels
    micro = [d for d, g in entry["tile_gemm"].items() if g == "micro"]
    assert sorted(entry["mk_blocks"]) == sorted(micro)
    for dtype in micro:
        for kernel in ("scores", "pv"):
            assert entry["mk_blocks"][dtype][kernel] in _plan.MK_BLOCKS[kernel]
            for block in _plan.MK_BLOCKS[kernel]:
                assert f"{dtype} {kernel} {block:>10}:" in text
    blocks = len(_plan.MK_BLOCKS["scores"]) + len(_plan.MK_BLOCKS["pv"])
    assert len(entry["median_ms"]) == (len(tune.CANDIDATE_TILES) + 2 * len(_plan.MICROKERNEL_LANES)
                                       + blocks * len(micro))
    assert all(t > 0 for t in entry["median_ms"].values())


def test_cli_show_forget_and_errors(tuning_file, capsys):
    assert cli(["tune", "--show"]) == 0
    out = capsys.readouterr().out
    assert _tuning.machine_key(ISA) in out and str(tuning_file) in out
    assert "no entry for this machine" in (cli(["tune", "--forget"]), capsys.readouterr().out)[1]
    _tuning.save(ISA, ENTRY)
    assert cli(["tune", "--forget"]) == 0 and "entry removed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["tune", "--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err

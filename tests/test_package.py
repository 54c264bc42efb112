"""The installed package: compiled, documented, typed, and its examples run."""

import doctest
import importlib.machinery
import importlib.resources
import os
import re

import numpy as np
import pytest

import fastattn
from fastattn import _dispatch, api, layers
from fastattn._plan import MaskKind

_kernels = _dispatch.kernels


@pytest.mark.parametrize("isa", _dispatch.available())
def test_kernels_are_compiled_extensions_with_openmp(isa):
    # A pure-Python fallback must never pass silently.
    module = _dispatch.load(isa)
    assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    info = module.build_info()
    assert info["isa"] == isa
    # A build made with FASTATTN_NO_OPENMP=1 is tested with the same variable set.
    expect_openmp = os.environ.get("FASTATTN_NO_OPENMP", "") not in ("1", "true", "yes", "on")
    assert info["openmp"] == expect_openmp, f"OpenMP {'off' if expect_openmp else 'on'} in this build"
    assert "-ffast-math" not in info["compile_flags"]


def test_dispatch_picks_the_best_runnable_build_or_the_forced_one():
    runnable = _dispatch.available()
    forced = os.environ.get("FASTATTN_ISA")
    assert _dispatch.isa == (forced or runnable[-1])
    with pytest.raises(ImportError, match="FASTATTN_ISA"):
        _dispatch.load("sse9")


def test_every_runnable_build_agrees():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 70, 24)) for _ in range(3))
    results = {}
    for isa in _dispatch.available():
        module = _dispatch.load(isa)
        out = np.empty_like(q)
        lse = np.empty((2, 70))
        index = np.array([[0, 1]] * 3, dtype=np.intp)
        assert module.attention(q, k, v, None, MaskKind.NONE, index, True, 0, 0.2, 0.0, None, out, lse, 16, 32,
                                False, 1) == 1  # threads (float64: BLAS tiles)
        results[isa] = out
    for isa, out in results.items():
        np.testing.assert_allclose(out, results["baseline"], rtol=1e-12, atol=1e-14, err_msg=isa)


def test_package_ships_stub_and_py_typed():
    files = importlib.resources.files("fastattn")
    assert files.joinpath("py.typed").is_file()
    assert files.joinpath("_kernels.pyi").is_file()


def test_public_names():
    assert fastattn.__version__
    for name in fastattn.__all__:
        assert hasattr(fastattn, name), name
    for name in ("project", "scores", "softmax", "log_softmax", "attention", "self_attention"):
        assert callable(getattr(fastattn.reference, name)), name


@pytest.mark.parametrize("module", [api, layers], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", ["project", "scores", "softmax", "log_softmax", "attention", "merge_attention",
                                  "self_attention"])
def test_every_public_function_is_documented(name):
    doc = getattr(fastattn, name).__doc__
    for section in ("Parameters", "Returns", "Notes", "Examples"):
        assert section in doc, f"{name} lacks {section}"


def test_exp_accuracy_and_special_values():
    for dtype in (np.float32, np.float64):
        x = np.linspace(-80 if dtype == np.float32 else -700, 80 if dtype == np.float32 else 700,
                        200001).astype(dtype)
        got = np.empty_like(x)
        _kernels.exp(x, got)
        want = np.exp(x.astype(np.longdouble))
        ulps = np.abs(got - want) / np.spacing(want.astype(dtype)).astype(np.longdouble)
        assert float(ulps.max()) < 1.5, dtype
        special = np.array([-np.inf, np.inf, np.nan, 0.0, -1e30, 1e30], dtype)
        got = np.empty_like(special)
        _kernels.exp(special, got)
        assert got[0] == 0.0 and got[1] == np.inf and np.isnan(got[2]) and got[3] == 1.0
        assert got[4] == 0.0 and got[5] == np.inf


def _readme_python_blocks():
    """The ```python blocks of README.md (none when the tests run outside a clone)."""
    import pathlib
    readme = pathlib.Path(__file__).resolve().parent.parent / "README.md"
    if not readme.is_file():
        return []
    return re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(_readme_python_blocks())))
def test_readme_examples_run(index):
    # Each README example runs as written, in a fresh namespace; one that needs an optional
    # package is skipped without it. The dask example starts a LocalCluster under
    # `if __name__ == "__main__"`, so here it only defines names (tests/test_dask.py runs one).
    code = _readme_python_blocks()[index]
    for module in ("torch", "transformers", "dask", "distributed"):
        if re.search(rf"^\s*(import|from) {module}\b|import .*\b{module}\b", code, re.M):
            pytest.importorskip(module)
    if "model.set_attn_implementation" in code and "model =" not in code:
        pytest.skip("a fragment: `model` is the user's (docs/integrations/transformers.rst runs it)")
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("module, blocked, extra", [
    ("fastattn.torch", "torch", "torch"),
    ("fastattn.integrations.transformers", "torch", "transformers"),
    ("fastattn.integrations.transformers", "transformers", "transformers"),
    ("fastattn.dask", "dask", "dask"),
])
def test_an_optional_module_without_its_package_names_the_extra(monkeypatch, module, blocked, extra):
    import importlib
    import sys
    if blocked == "transformers":
        pytest.importorskip("torch")  # else the message names torch, which is missing first
    for name in list(sys.modules):
        if name == blocked or name.startswith(blocked + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, blocked, None)  # importing it now fails
    for name in ("fastattn.torch", "fastattn.integrations.transformers", "fastattn.dask"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # imported afresh, restored after
    with pytest.raises(ImportError, match=rf"{module} needs {blocked}.*pip install 'fastattn\[{extra}\]'"):
        importlib.import_module(module)

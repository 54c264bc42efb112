"""The tuning file: what ``python -m fastattn tune`` measured on this machine, read once
at import by _plan.

Design: the choices that depend on the microarchitecture rather than on the shape (whether
a tile's GEMMs run in the build's micro-kernels or in BLAS, for each compute dtype, the
micro-kernels' register blocks, and the largest tile) have defaults measured on the CPUs seen so far (_plan). A CPU where
they are wrong is set right by one command, ``python -m fastattn tune``
(fastattn.tune), which times the candidates on that machine and stores the winners
here. An entry is keyed by everything its measurement depended on: the CPU (CPUID
vendor, family, model, stepping), the kernel build, fastattn's and SciPy's versions
(SciPy's BLAS runs the BLAS tiles) and the OpenBLAS settings that restrict BLAS's
kernels. Another machine, build or version sharing the file does not read it. Nothing is
measured at import: with no entry, the defaults hold, and results on a machine change
only when someone runs ``tune`` there.

The file is JSON, at ``$FASTATTN_TUNING`` if set (empty or ``off``: no file is read or
written), else ``$XDG_CACHE_HOME/fastattn/tuning.json`` (``~/.cache`` without
XDG_CACHE_HOME). An unreadable file or an entry that does not validate is ignored with a
warning, never an error: the defaults always work.
"""

import json
import os
import sys
import tempfile
import warnings

from ._cpu import cpu_signature
from ._version import __version__

__all__ = ["ENV", "path", "machine_key", "load", "save", "forget", "validate"]

ENV = "FASTATTN_TUNING"
_FORMAT = 1
# What an entry may set, and the bounds that keep a hand-edited file from asking for
# absurd tiles (the kernels take any size >= 1; these are the sane ones).
_BLOCK_RANGE = (8, 8192)
_GEMMS = ("micro", "blas")


def path():
    """The tuning file's path, or None when FASTATTN_TUNING is empty or "off"."""
    value = os.environ.get(ENV)
    if value is not None:
        value = value.strip()
        return None if value.lower() in ("", "off") else os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastattn", "tuning.json")


def machine_key(isa):
    """The key of this machine's entry: the CPU, the kernel build `isa`, fastattn's and
    SciPy's versions and the OpenBLAS kernel restrictions in force."""
    vendor, family, model, stepping = cpu_signature()
    scipy = sys.modules.get("scipy")
    restrictions = ",".join(f"{name}={os.environ[name]}"
                            for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                            if name in os.environ)
    return (f"{vendor or '?'} family {family} model {model} stepping {stepping}; {isa}; "
            f"fastattn {__version__}; scipy {getattr(scipy, '__version__', '?')}"
            + (f"; {restrictions}" if restrictions else ""))


def validate(entry, mk_blocks=None):
    """The entry if it is a well-formed tuning (dict with q_block, k_block and
    tile_gemm {"float32": "micro"|"blas", "float64": ...}, and optionally mk_blocks
    {"float32": {"scores": name, "pv": name}, "float64": ...}, the names among the build's
    `mk_blocks` ({"scores": names, "pv": names}) where given); else ValueError saying what
    is wrong."""
    if not isinstance(entry, dict):
        raise ValueError("an entry is a JSON object")
    for name in ("q_block", "k_block"):
        value = entry.get(name)
        if (not isinstance(value, int) or isinstance(value, bool)
                or not _BLOCK_RANGE[0] <= value <= _BLOCK_RANGE[1]):
            raise ValueError(f"{name} must be an integer in {list(_BLOCK_RANGE)}, got {value!r}")
    gemm = entry.get("tile_gemm")
    if (not isinstance(gemm, dict) or set(gemm) - {"float32", "float64"}
            or any(g not in _GEMMS for g in gemm.values())):
        raise ValueError(f"tile_gemm must map 'float32'/'float64' to one of {_GEMMS}, "
                         f"got {gemm!r}")
    blocks = entry.get("mk_blocks", {})
    if (not isinstance(blocks, dict) or set(blocks) - {"float32", "float64"}
            or any(not isinstance(b, dict) or set(b) - {"scores", "pv"}
                   or any(not isinstance(n, str) for n in b.values()) for b in blocks.values())
            or (mk_blocks is not None
                and any(n not in mk_blocks[k] for b in blocks.values() for k, n in b.items()))):
        raise ValueError(f"mk_blocks must map 'float32'/'float64' to {{'scores': name, "
                         f"'pv': name}} of this build's blocks {mk_blocks}, got {blocks!r}")
    return entry


def _read(file):
    with open(file, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != _FORMAT \
            or not isinstance(data.get("machines"), dict):
        raise ValueError(f"not a fastattn tuning file of format {_FORMAT}")
    return data


def load(isa, mk_blocks=None):
    """This machine's entry in the tuning file, or None (no file, no entry, or one that
    does not validate, register blocks checked against `mk_blocks`: then a
    RuntimeWarning, and the defaults hold)."""
    file = path()
    if file is None or not os.path.exists(file):
        return None
    try:
        entry = _read(file)["machines"].get(machine_key(isa))
        return None if entry is None else validate(entry, mk_blocks)
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        warnings.warn(f"fastattn: ignoring the tuning file {file} ({e}); the built-in "
                      f"defaults hold. Run `python -m fastattn tune` to measure again.",
                      RuntimeWarning, stacklevel=2)
        return None


def _write(file, data):
    """Replace the file atomically, so that a process importing fastattn meanwhile reads
    the old file or the new one, never half of one."""
    directory = os.path.dirname(file) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, file)
    except BaseException:
        os.unlink(tmp)
        raise


def _existing(file):
    try:
        return _read(file)
    except (OSError, ValueError):  # absent or unreadable: start a new file
        return {"format": _FORMAT, "machines": {}}


def save(isa, entry):
    """Store `entry` as this machine's (replacing any); the file's path. Other machines'
    entries in the file are kept."""
    file = path()
    if file is None:
        raise RuntimeError(f"{ENV} is {os.environ.get(ENV)!r}: no tuning file to write")
    data = _existing(file)
    data["machines"][machine_key(isa)] = validate(entry)
    _write(file, data)
    return file


def forget(isa):
    """Remove this machine's entry; whether there was one."""
    file = path()
    if file is None or not os.path.exists(file):
        return False
    data = _existing(file)
    if data["machines"].pop(machine_key(isa), None) is None:
        return False
    _write(file, data)
    return True

"""A generator of hostile inputs, in the manner of bottleneck's tests/util.py.

Each maker returns (label, value): arrays that are empty on some axis, 0-d and 1-d where
2-d is needed, huge or infinite or NaN, byte-swapped, Fortran-ordered, negatively
strided, read-only, views of views, integer/bool/float16/complex/object/string arrays,
Python lists and scalars.
"""

import numpy as np


def _awkward_layouts(label, a):
    """The same values in awkward layouts (each a fresh array, never a view of `a`)."""
    yield label, a
    if a.ndim >= 2:
        yield label + " fortran", np.asfortranarray(a)
        yield label + " transposed-view", np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    if a.ndim >= 1 and a.shape[-1] > 0:
        yield label + " negative-stride", np.ascontiguousarray(a[..., ::-1])[..., ::-1]
        big = np.zeros(a.shape[:-1] + (3 * a.shape[-1],), a.dtype)
        big[..., ::3] = a
        yield label + " view-of-view", big[..., ::3][...]
    if a.dtype.itemsize > 1 and a.dtype.kind in "fiuc":
        yield label + " byteswapped", a.astype(a.dtype.newbyteorder())
    ro = a.copy()
    ro.setflags(write=False)
    yield label + " readonly", ro


def arrays(shape, rng, dtypes=("float64", "float32", "float16", "int64", "bool")):
    """Well-formed arrays of one shape in many dtypes, values and layouts."""
    for dtype in dtypes:
        if dtype == "bool":
            a = rng.random(shape) > 0.5
        elif np.dtype(dtype).kind == "i":
            a = rng.integers(-3, 4, size=shape).astype(dtype)
        else:
            a = rng.standard_normal(shape).astype(dtype)
        yield from _awkward_layouts(f"{dtype}{shape}", a)


def special_values(shape, rng):
    """float64 arrays of one shape holding huge, infinite and NaN entries."""
    n = int(np.prod(shape))
    if n == 0:
        return
    base = rng.standard_normal(shape)
    for label, fill in (("huge", 1e4), ("hugeneg", -1e4), ("inf", np.inf), ("neginf", -np.inf),
                        ("nan", np.nan)):
        a = base.copy()
        a.reshape(-1)[rng.integers(n)] = fill
        yield f"{label}{shape}", a
    a = np.full(shape, -np.inf)
    yield f"all-neginf{shape}", a
    a = base * 1e4
    yield f"x1e4{shape}", a


def bad_values(shape):
    """Values that must be refused with a TypeError or ValueError naming the argument."""
    yield "complex", np.ones(shape, complex)
    yield "object", np.ones(shape, object)
    yield "string", np.full(shape, "a")
    yield "longdouble", np.ones(shape, np.longdouble)
    yield "datetime", np.zeros(shape, "datetime64[s]")
    yield "ragged-list", [[1.0, 2.0], [3.0]]
    yield "none", None
    yield "dict", {"a": 1}


def wrong_ranks(rng):
    yield "0-d", np.float64(1.5)
    yield "python-scalar", 2.0
    yield "1-d", rng.standard_normal(4)
    yield "empty-1-d", np.zeros(0)

"""fastattn for PyTorch users: the same functions, torch tensors in and out.

Every fastattn function already takes torch tensors (CPU, no gradient) without copying
them; it returns NumPy arrays. The functions here return torch tensors instead, sharing
the result's memory (``torch.from_numpy``; bfloat16 results through an int16 view), so
nothing is copied on the way out either. ``out=`` may be a torch tensor: it is written in
place and returned. Importing this module imports torch; the rest of fastattn never does.

Examples
--------
>>> import torch, fastattn.torch as fa
>>> q = k = v = torch.ones(1, 2, 3, 4)
>>> fa.attention(q, k, v, causal=True).shape
torch.Size([1, 2, 3, 4])
"""

import functools

import numpy as np

from . import api
from ._validation import as_array, is_bfloat16, require

torch = require("torch", "torch", "fastattn.torch")

__all__ = ["attention", "scores", "softmax", "log_softmax", "self_attention",
           "merge_attention", "project", "to_torch"]


def to_torch(a):
    """An ndarray as a torch tensor sharing its memory (bfloat16 included)."""
    if a is None:
        return None
    if is_bfloat16(a.dtype):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _returning_torch(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = kwargs.get("out")
        if isinstance(out, torch.Tensor):
            kwargs["out"] = as_array("out", out)
        result = fn(*args, **kwargs)
        if isinstance(result, tuple):
            converted = tuple(to_torch(r) for r in result)
            return (out,) + converted[1:] if isinstance(out, torch.Tensor) else converted
        return out if isinstance(out, torch.Tensor) else to_torch(result)

    wrapper.__doc__ = (f"{fn.__name__} of fastattn, returning torch tensors (see "
                       f"fastattn.{fn.__name__}).\n\n" + (fn.__doc__ or ""))
    return wrapper


attention = _returning_torch(api.attention)
scores = _returning_torch(api.scores)
softmax = _returning_torch(api.softmax)
log_softmax = _returning_torch(api.log_softmax)
self_attention = _returning_torch(api.self_attention)
merge_attention = _returning_torch(api.merge_attention)
project = _returning_torch(api.project)

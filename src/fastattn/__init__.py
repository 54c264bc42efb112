"""fastattn: exact transformer self-attention for the CPU, from Python.

Cython kernels (projection, scores, a stable softmax and the fused attention that chains
them) behind a NumPy-style API, with a pure-Python reference, ``fastattn.reference``,
that every kernel is checked against.
"""

from . import reference
from ._version import __version__
from .api import (attention, get_float32_precision, log_softmax, merge_attention, project,
                  scores, self_attention, set_float32_precision, softmax)
from .cache import KVCache
from .layers import MultiHeadAttention
from .paged import PagedKVCache
from .varlen import attention_varlen

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "PagedKVCache",
    "__version__",
    "attention",
    "attention_varlen",
    "get_float32_precision",
    "log_softmax",
    "merge_attention",
    "project",
    "reference",
    "scores",
    "self_attention",
    "set_float32_precision",
    "softmax",
]

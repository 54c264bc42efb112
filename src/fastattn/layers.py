"""Layers built from the public functions: multi-head attention."""

import numpy as np

from ._run import project_qkv
from ._validation import (as_array, check_flag, check_precision, check_sinks, check_softcap,
                          dtypes, positive_int, qkv_arguments)
from .api import attention, project

__all__ = ["MultiHeadAttention"]


class MultiHeadAttention:
    """Multi-head attention with input and output projections, batch first.

    Parameters
    ----------
    w_q : array_like, shape (embed_dim, num_heads * head_dim)
    w_k : array_like, shape (kdim, num_kv_heads * head_dim)
    w_v : array_like, shape (vdim, num_kv_heads * head_dim)
    w_o : array_like, shape (num_heads * head_dim, out_dim)
        Projection matrices, applied as ``x @ w`` (the transpose of PyTorch's ``weight``).
    num_heads : int
    num_kv_heads : int, optional
        Key/value heads for grouped-query attention; must divide ``num_heads``. Defaults
        to ``num_heads``.
    b_q, b_k, b_v, b_o : array_like, optional
        Biases.
    softcap : float > 0, optional
        Soft-cap every head's scores, as in :func:`fastattn.attention` (Gemma 2).
    sinks : array_like, shape (num_heads,), optional
        One attention-sink logit per query head, as in :func:`fastattn.attention`
        (GPT-OSS).
    precision : {"highest", "bfloat16"}, optional
        Of the attention of float32 projections, as in :func:`fastattn.attention`
        (default: :func:`fastattn.get_float32_precision` at each call).

    Notes
    -----
    ``heads_h = attention(x W_q,h, kv W_k,g(h), kv W_v,g(h))`` with ``g(h) = h // (H /
    H_kv)``, and ``out = concat_h(heads_h) W_o + b_o``. With ``num_kv_heads == num_heads``
    this is PyTorch's ``nn.MultiheadAttention(batch_first=True)``; use
    :meth:`from_torch_state_dict` to load one.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> w = [rng.standard_normal((8, 8)) for _ in range(4)]
    >>> mha = fastattn.MultiHeadAttention(*w, num_heads=2)
    >>> mha(rng.standard_normal((3, 5, 8)), causal=True).shape
    (3, 5, 8)
    """

    def __init__(self, w_q, w_k, w_v, w_o, *, num_heads, num_kv_heads=None,
                 b_q=None, b_k=None, b_v=None, b_o=None, softcap=None, sinks=None,
                 precision=None):
        names = ("w_q", "w_k", "w_v", "w_o")
        ws = [as_array(n, w) for n, w in zip(names, (w_q, w_k, w_v, w_o))]
        for n, w in zip(names, ws):
            if w.ndim != 2:
                raise ValueError(f"{n} must be 2-D, got {n}.shape={w.shape}")
        num_heads = positive_int("num_heads", num_heads)
        dividing = f"a positive integer dividing num_heads={num_heads}"
        num_kv_heads = positive_int("num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads,
                                    what=dividing)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must be {dividing}, got {num_kv_heads}")
        w_q, w_k, w_v, w_o = ws
        if w_q.shape[1] % num_heads:
            raise ValueError(f"w_q.shape[1] must be a multiple of num_heads={num_heads}, got w_q.shape={w_q.shape}")
        head_dim = w_q.shape[1] // num_heads
        kv_width = num_kv_heads * head_dim
        if w_k.shape[1] != kv_width or w_v.shape[1] != kv_width:
            raise ValueError(
                f"w_k and w_v must have num_kv_heads * head_dim = {kv_width} columns, "
                f"got w_k.shape={w_k.shape} and w_v.shape={w_v.shape}"
            )
        if w_o.shape[0] != w_q.shape[1]:
            raise ValueError(f"w_o must have {w_q.shape[1]} rows (num_heads * head_dim), got w_o.shape={w_o.shape}")
        biases = {}
        for n, b, width in (("b_q", b_q, w_q.shape[1]), ("b_k", b_k, kv_width),
                            ("b_v", b_v, kv_width), ("b_o", b_o, w_o.shape[1])):
            if b is not None:
                b = as_array(n, b)
                if b.shape != (width,):
                    raise ValueError(f"{n} must have shape ({width},), got {n}.shape={b.shape}")
            biases[n] = b
        self.w_q, self.w_k, self.w_v, self.w_o = w_q, w_k, w_v, w_o
        self.b_q, self.b_k, self.b_v, self.b_o = (biases[n] for n in ("b_q", "b_k", "b_v", "b_o"))
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        check_softcap(softcap)
        self.softcap = softcap
        if sinks is not None:
            sinks = as_array("sinks", sinks)
            if sinks.shape != (num_heads,):
                raise ValueError(f"sinks must have shape ({num_heads},) (one per head), "
                                 f"got sinks.shape={sinks.shape}")
            check_sinks(sinks, (num_heads,), np.dtype(np.float64))
        self.sinks = sinks
        self.precision = check_precision(precision)

    @classmethod
    def from_torch_state_dict(cls, state_dict, num_heads):
        """Build from the arrays of a PyTorch ``nn.MultiheadAttention`` state dict.

        Parameters
        ----------
        state_dict : mapping of str to array_like
            ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``,
            ``v_proj_weight`` when kdim/vdim differ from embed_dim), ``out_proj.weight``,
            and the biases ``in_proj_bias`` and ``out_proj.bias`` when present, as NumPy
            arrays (``{k: t.numpy() for k, t in m.state_dict().items()}``); torch is not
            imported.
        num_heads : int

        Returns
        -------
        MultiHeadAttention
            Equal to the module's forward with ``batch_first=True``.

        Examples
        --------
        From PyTorch: ``from_torch_state_dict({k: t.numpy() for k, t in
        torch.nn.MultiheadAttention(8, 2, batch_first=True).state_dict().items()},
        num_heads=2)``. The same layout built by hand (PyTorch's ``weight`` is
        ``(d_out, d_in)``; fastattn applies ``x @ w`` with ``w`` of shape ``(d_in, d_out)``):

        >>> import numpy as np, fastattn
        >>> rng = np.random.default_rng(0)
        >>> e = 8
        >>> sd = {"in_proj_weight": rng.standard_normal((3 * e, e)),
        ...       "in_proj_bias": rng.standard_normal(3 * e),
        ...       "out_proj.weight": rng.standard_normal((e, e)),
        ...       "out_proj.bias": rng.standard_normal(e)}
        >>> mha = fastattn.MultiHeadAttention.from_torch_state_dict(sd, num_heads=2)
        >>> bool((mha.w_q == sd["in_proj_weight"][:e].T).all()), mha.head_dim
        (True, 4)
        >>> mha(rng.standard_normal((1, 5, e))).shape   # (batch, L, embed), batch first
        (1, 5, 8)
        """
        sd = {key: np.asarray(value) for key, value in state_dict.items()}
        if "bias_k" in sd or "bias_v" in sd:
            raise ValueError("add_bias_kv=True (bias_k, bias_v) is not supported")
        if "in_proj_weight" in sd:
            w = sd["in_proj_weight"]
            e = w.shape[0] // 3
            w_q, w_k, w_v = w[:e].T, w[e:2 * e].T, w[2 * e:].T
        else:
            try:
                w_q, w_k, w_v = (sd[f"{n}_proj_weight"].T for n in "qkv")
            except KeyError as exc:
                raise ValueError(f"state_dict has neither in_proj_weight nor {exc.args[0]}") from None
        b_q = b_k = b_v = None
        if "in_proj_bias" in sd:
            b = sd["in_proj_bias"]
            e = b.shape[0] // 3
            b_q, b_k, b_v = b[:e], b[e:2 * e], b[2 * e:]
        if "out_proj.weight" not in sd:
            raise ValueError("state_dict has no out_proj.weight")
        return cls(w_q, w_k, w_v, sd["out_proj.weight"].T, num_heads=num_heads,
                   b_q=b_q, b_k=b_k, b_v=b_v, b_o=sd.get("out_proj.bias"))

    def _check_cache(self, cache, compute):
        """A cache this layer can append to: its head counts, sizes and dtype."""
        from .cache import KVCache
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a fastattn.KVCache, got {type(cache).__name__}")
        mine = (self.num_kv_heads, self.head_dim, self.head_dim)
        theirs = (cache.kv_heads, cache.head_dim, cache.value_dim)
        if mine != theirs:
            raise ValueError(f"the cache does not fit this layer: the layer has num_kv_heads="
                             f"{mine[0]}, head_dim={mine[1]}; the cache kv_heads={theirs[0]}, "
                             f"head_dim={theirs[1]}, value_dim={theirs[2]}")
        if cache.dtype != compute:
            raise ValueError(f"the cache holds {cache.dtype} and this layer computes in "
                             f"{compute}: make the cache with dtype={compute}")

    def _split_heads(self, x, n_heads):
        """(..., L, n_heads * head_dim) -> (..., n_heads, L, head_dim), a view."""
        x = x.reshape(x.shape[:-1] + (n_heads, self.head_dim))
        return x.swapaxes(-2, -3)  # moveaxis of adjacent axes, without its ~3 us of Python

    def __call__(self, query, key=None, value=None, *, cache=None, mask=None, causal=None,
                 scale=None, return_weights=False, num_threads=None):
        """Attend ``query`` to ``key``/``value`` (self-attention when they are omitted).

        Parameters
        ----------
        query : array_like, shape (..., L_q, embed_dim)
        key : array_like, shape (..., L_k, kdim), optional
            Defaults to ``query``.
        value : array_like, shape (..., L_k, vdim), optional
            Defaults to ``key``.
        cache : KVCache, optional
            Incremental decoding (self-attention only): the new tokens' keys and values
            are projected, appended to the cache (shape (batch, num_kv_heads, capacity,
            head_dim); ``query`` is (batch, L_new, embed_dim), or (L_new, embed_dim) for a
            batch of one), and the queries attend to everything cached.
        mask : array_like, bool or float, broadcastable to (..., num_heads, L_q, L_k)
            As in :func:`fastattn.attention` (True = may attend). A per-batch mask of
            shape (B, L_q, L_k) needs a head axis: ``mask[:, None]``.
        causal : bool, optional
            As in :func:`fastattn.attention`; defaults to True with a cache (the new tokens
            see the cached ones and each other up to themselves), False otherwise.
        scale, num_threads
            As in :func:`fastattn.attention`.
        return_weights : bool, default False
            Also return the weights of every head, shape (..., num_heads, L_q, L_k).

        Returns
        -------
        out : ndarray, shape (..., L_q, out_dim)
        weights : ndarray, if ``return_weights``
        """
        return_weights = check_flag("return_weights", return_weights)
        causal = cache is not None if causal is None else causal
        query = as_array("query", query)
        if cache is not None and (key is not None or value is not None):
            raise ValueError("a cache is for self-attention: pass query only")
        if key is None and value is None:
            query, ws, bs, _, compute, result_dtype = qkv_arguments(
                query, self.w_q, self.w_k, self.w_v, self.b_q, self.b_k, self.b_v)
            if cache is not None:
                self._check_cache(cache, compute)
            q, k, v = project_qkv(query, ws, bs, compute)
        else:
            key = query if key is None else as_array("key", key)
            value = key if value is None else as_array("value", value)
            params = [(n, a) for n, a in (("w_q", self.w_q), ("w_k", self.w_k), ("w_v", self.w_v),
                                          ("b_q", self.b_q), ("b_k", self.b_k), ("b_v", self.b_v))
                      if a is not None]
            compute, result_dtype = dtypes([("query", query), ("key", key), ("value", value)] + params)
            # Intermediates stay in the compute dtype (float32 for float16 inputs).
            query, key, value = (a.astype(compute, copy=False) for a in (query, key, value))
            q = project(query, self.w_q, self.b_q)
            k = project(key, self.w_k, self.b_k)
            v = project(value, self.w_v, self.b_v)
        if q.ndim < 2 or k.ndim < 2:
            raise ValueError(
                f"query, key and value must have at least 2 dimensions (..., L, features), "
                f"got query.shape={query.shape}"
            )
        q, k, v = (self._split_heads(q, self.num_heads), self._split_heads(k, self.num_kv_heads),
                   self._split_heads(v, self.num_kv_heads))
        unbatched = cache is not None and q.ndim == 3
        if cache is not None:
            if unbatched:  # (L_new, embed_dim): a batch of one
                q, k, v = q[None], k[None], v[None]
            cache.append(k, v)
            k = v = None  # attention reads them from the cache
        heads = attention(q, k, v, cache=cache, mask=mask, causal=causal, scale=scale,
                          softcap=self.softcap, sinks=self.sinks,
                          return_weights=return_weights, num_threads=num_threads,
                          precision=self.precision)
        heads, weights = heads if return_weights else (heads, None)
        if unbatched:
            heads = heads[0]
            weights = None if weights is None else weights[0]
        merged = heads.swapaxes(-3, -2)
        merged = merged.reshape(merged.shape[:-2] + (-1,))
        out = project(merged, self.w_o, self.b_o)
        out = out.astype(np.result_type(result_dtype, out.dtype), copy=False)
        return (out, weights) if return_weights else out

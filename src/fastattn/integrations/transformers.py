"""fastattn as an attention backend of Hugging Face transformers.

>>> import torch, transformers
>>> import fastattn.integrations.transformers as fa_tf
>>> fa_tf.register()                             # adds "fastattn" to transformers
'fastattn'
>>> _ = torch.manual_seed(0)
>>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
>>> model = transformers.LlamaForCausalLM(config).eval()   # tiny and random: no download
>>> ids = torch.randint(0, 64, (1, 12))
>>> with torch.no_grad():
...     model.set_attn_implementation("sdpa")
...     sdpa = model(ids).logits
...     model.set_attn_implementation("fastattn")  # or from_pretrained(..., attn_implementation="fastattn")
...     ours = model(ids).logits
>>> bool((ours - sdpa).abs().max() < 1e-5)
True

``register(name)`` adds an attention function and a mask function under ``name`` to
transformers' ``AttentionInterface`` and ``AttentionMaskInterface``; then
``attn_implementation=name`` (in ``from_pretrained``/``from_config``) or
``model.set_attn_implementation(name)`` runs every attention layer of the model through
:func:`fastattn.attention`, on the CPU, for inference.

What it does with what transformers hands it:

- grouped-query heads go to the kernel as they are (no ``repeat_kv``);
- a mask that is only causal, or causal with a sliding window, is never built: the mask
  function returns None for it (as sdpa's does) and the layer's ``sliding_window`` goes to
  the kernel's own ``causal``/``window``, which skip whole hidden blocks; a mask with
  padding (left-padded batches) is the boolean mask transformers builds, True = attend,
  fastattn's own convention;
- ``scaling``, ``softcap`` (Gemma 2) and ``s_aux`` (GPT-OSS sinks) map to ``scale``,
  ``softcap`` and ``sinks``;
- float32 and bfloat16 tensors are read in place (bfloat16 needs ml_dtypes) and the
  output shares the result's memory.

Dropout in training, ``output_attentions``, gradients and tensors off the CPU raise a
``ValueError`` saying so. A query row whose keys are all masked (a padding position)
gets zeros, where sdpa gives NaN or a uniform average: compare models only at real
tokens.
"""


from .. import api
from .._validation import require

torch = require("torch", "transformers", "fastattn.integrations.transformers")
require("transformers", "transformers", "fastattn.integrations.transformers", load=False)
from ..torch import to_torch  # noqa: E402 (after the check that names the extra)

__all__ = ["register", "attention_forward", "mask"]


def _sdpa_mask():
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask


def mask(*args, local_size=None, **kwargs):
    """transformers' sdpa mask (boolean, True = attend, or None when it needs none),
    except that a causal sliding window alone does not force a materialised mask: then it
    returns None and the attention function passes the layer's ``sliding_window`` to the
    kernel. Whenever a mask is built (padding), the mask function transformers passes
    already encodes the window. Chunked and bidirectional windows keep sdpa's rule."""
    config = kwargs.get("config")
    causal_window = (kwargs.get("allow_is_causal_skip") is True and local_size is not None
                     and local_size == getattr(config, "sliding_window", None)
                     and getattr(config, "attention_chunk_size", None) is None)
    return _sdpa_mask()(*args, local_size=None if causal_window else local_size, **kwargs)


def _array(name, t):
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"fastattn computes no gradients ({name} requires grad): run the "
                         f"model under torch.no_grad() or torch.inference_mode()")
    return t.detach()


def _plain(t):
    """A float32/float64 tensor on the CPU as the ndarray sharing its memory, which
    attention's compiled path takes (a decoding step then spends no Python on planning:
    inside a model, with the interpreter's caches cold after the layer's matmuls, that
    planning cost 150-250 us a call, measured); anything else as it is."""
    if t.device.type == "cpu" and (t.dtype == torch.float32 or t.dtype == torch.float64):
        return t.numpy()
    return t


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, softcap=None, s_aux=None, is_causal=None,
                      **kwargs):
    """The attention of one transformers layer: query (B, H, L_q, D), key and value
    (B, H_kv, L_k, D); returns ``(output (B, L_q, H, D_v), None)``."""
    if dropout and getattr(module, "training", False):
        raise ValueError("fastattn does not apply attention dropout: call model.eval() "
                         "(it is for inference)")
    if kwargs.get("output_attentions"):
        raise ValueError("fastattn does not return attention weights (output_attentions="
                         "True): use attn_implementation='eager' for them")
    if kwargs.get("position_bias") is not None or kwargs.get("head_mask") is not None:
        raise ValueError("fastattn does not take position_bias or head_mask: use "
                         "attn_implementation='eager' for this model")
    q = _plain(_array("query", query))
    k = _plain(_array("key", key))
    v = _plain(_array("value", value))
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    causal = False
    window = None
    mask_array = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            # An additive float mask (a custom one): min-value entries hide keys.
            mask_array = attention_mask.detach()
        else:
            mask_array = attention_mask
    else:
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        if is_causal:
            causal = True
            window = sliding_window
            if n_queries > 1 and n_keys > n_queries:
                # transformers skips the mask for a first chunk against a longer cache
                # whose further slots are future tokens (q_offset 0): top-left causal,
                # which is causal over the first n_queries keys.
                k, v = k[..., :n_queries, :], v[..., :n_queries, :]
    sinks = None
    if s_aux is not None:
        sinks = _plain(_array("s_aux", s_aux).to(torch.float32))
    out = api.attention(q, k, v, mask=mask_array, causal=causal, window=window,
                        scale=scaling, softcap=softcap, sinks=sinks)
    return to_torch(out).transpose(1, 2), None


def register(name="fastattn"):
    """Register fastattn with transformers under ``name``: its attention function and its
    mask function. Then ``attn_implementation=name`` selects it. Returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask)
    return name

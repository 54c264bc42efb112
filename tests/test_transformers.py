"""fastattn as a transformers attention backend: tiny random-weight models built from
configs (no download) give the logits of transformers' own eager attention at every real
token, batched with left padding, and the same greedy tokens."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastattn.integrations.transformers as fa_tf  # noqa: E402

NAME = fa_tf.register()
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=0, eos_token_id=None, bos_token_id=None)


def config(kind):
    if kind == "llama":  # grouped-query attention
        return transformers.LlamaConfig(**COMMON)
    if kind == "mistral":  # sliding window on every layer, shorter than the prompts
        return transformers.MistralConfig(**COMMON, sliding_window=5)
    if kind == "qwen2":  # sliding window on the second layer only
        return transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=1,
                                        layer_types=["full_attention", "sliding_attention"])
    if kind == "gemma2":  # soft-capped scores, alternating sliding/full layers
        return transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=5,
                                         attn_logit_softcapping=3.0,
                                         final_logit_softcapping=30.0,
                                         query_pre_attn_scalar=16)
    if kind == "gpt_oss":  # attention sinks (s_aux), sliding layers
        common = dict(COMMON, intermediate_size=64)
        return transformers.GptOssConfig(**common, head_dim=16, sliding_window=5,
                                         num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(kind)


def model_of(kind):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(kind),
                                                          attn_implementation="eager")
    if kind == "gpt_oss":
        for layer in model.model.layers:  # sinks start at zero: make them matter
            layer.self_attn.sinks.data.normal_(0.0, 2.0)
    return model.eval()


def batch(seed=1, length=11, pads=(0, 4)):
    """Two prompts, the second left-padded by pads[1] tokens (id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (len(pads), length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n] = 0
        mask[row, :n] = 0
    return ids, mask


KINDS = ["llama", "mistral", "qwen2", "gemma2", "gpt_oss"]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_eager_at_every_real_token(kind):
    model = model_of(kind)
    ids, mask = batch()
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation(NAME)
        ours = model(input_ids=ids, attention_mask=mask).logits
        # Unpadded: the mask is pure causal (+ window), which the kernel applies itself.
        plain = model(input_ids=ids[:1]).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], eager[real], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(plain[0], eager[0], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_picks_the_same_tokens(kind):
    model = model_of(kind)
    ids, mask = batch(seed=2, length=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids, **kwargs)
        model.set_attn_implementation(NAME)
        ours = model.generate(ids, **kwargs)
    assert torch.equal(ours, eager), (ours, eager)


def test_bfloat16_model_runs_and_stays_close():
    model = model_of("llama")
    ids, mask = batch(seed=3)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        model = model.to(torch.bfloat16)
        model.set_attn_implementation(NAME)
        ours = model(input_ids=ids, attention_mask=mask).logits
    assert ours.dtype == torch.bfloat16
    real = mask.bool()
    # bfloat16 weights and activations: 8 bits of mantissa, a few layers deep.
    err = (ours[real].float() - reference[real]).abs().max().item()
    assert err < 0.1 * reference[real].abs().max().item(), err


def test_unsupported_options_raise_clearly():
    model = model_of("llama")
    model.set_attn_implementation(NAME)
    ids, _ = batch()
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, output_attentions=True)
    with pytest.raises(ValueError, match="no gradients"):
        model(input_ids=ids)  # grad enabled and weights that require it
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with torch.no_grad(), pytest.raises(ValueError, match="dropout"):
        model(input_ids=ids)


def test_attention_forward_takes_sinks_softcap_and_gqa_directly():
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.standard_normal((2, 4, 6, 8)).astype(np.float32))
    k = torch.from_numpy(rng.standard_normal((2, 2, 6, 8)).astype(np.float32))
    v = torch.from_numpy(rng.standard_normal((2, 2, 6, 8)).astype(np.float32))
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])

    class Module:
        is_causal = True
        training = False

    out, weights = fa_tf.attention_forward(Module(), q, k, v, None, scaling=0.3, softcap=2.0,
                                           s_aux=sinks, sliding_window=3)
    assert weights is None and out.shape == (2, 6, 4, 8)
    import fastattn
    expected = fastattn.attention(q.numpy(), k.numpy(), v.numpy(), causal=True, window=3,
                                  scale=0.3, softcap=2.0, sinks=sinks.numpy())
    assert np.array_equal(out.transpose(1, 2).numpy(), expected)


def test_decoding_steps_take_the_compiled_path(monkeypatch):
    # A grouped-query decoding step hands attention plain arrays (the tensors' memory) and
    # transformers' float scale: the compiled path runs it, with no planning in Python.
    from fastattn import _run
    taken = []
    small = _run.small_attention
    monkeypatch.setattr(_run, "small_attention",
                        lambda *args: taken.append(small(*args)) or taken[-1])
    model = model_of("llama")
    ids = batch(seed=3, length=6, pads=(0,))[0]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids, **kwargs)
        model.set_attn_implementation(NAME)
        ours = model.generate(ids, **kwargs)
    assert torch.equal(ours, eager), (ours, eager)
    layers = model.config.num_hidden_layers
    # the prompt (6 queries over grouped heads: the general path), then 3 steps of 1 query
    assert len(taken) == 4 * layers
    assert all(t is None for t in taken[:layers])
    assert all(t is not None for t in taken[layers:])


def test_continuous_batching_takes_no_custom_attention():
    """transformers' continuous batching (generate_batch) accepts only its own
    implementations ('paged|eager', 'sdpa', flash) and reads its own paged cache before the
    attention function is called, so fastattn's paged kernel has no place in it (the
    serving guide says so). If transformers opens it, this fails: then wire PagedKVCache in."""
    model = model_of("llama")
    if not hasattr(model, "generate_batch"):
        pytest.skip(f"transformers {transformers.__version__} has no continuous batching")
    model.set_attn_implementation(NAME)
    settings = transformers.GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1,
                                             pad_token_id=0)
    with pytest.raises(ValueError, match="not supported for continuous batching"):
        model.generate_batch([[1, 2, 3], [4, 5, 6, 7, 8]], generation_config=settings)

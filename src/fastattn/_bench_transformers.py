"""``python -m fastattn bench --transformers``: a random-weight Llama of about 100M
parameters (no download) run end to end by transformers with ``attn_implementation=
"fastattn"`` against ``"sdpa"``: prefill of one long prompt, greedy decoding tokens/s, and
the share of each step spent inside the attention function.

Method: one model, its attention implementation switched between the two, samples taken
in turn (median of ``repeat``), each after a warm-up call; the attention share comes
from a separate run with the attention function wrapped by a timer."""

import statistics
import time

__all__ = ["main"]


def _config(transformers, quick):
    size = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2) if quick else dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4)
    return transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096,
                                    tie_word_embeddings=True, **size)


class _Timed:
    """An attention function that records the time of each of its calls in `calls`."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.calls.append(time.perf_counter() - t)


def main(threads=None, quick=False, dtype="float32", repeat=None):
    try:
        import torch
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        print("bench --transformers needs torch and transformers: "
              "pip install 'fastattn[transformers]'")
        return 1
    from ._timing import cpu_description
    from .integrations import transformers as fa_tf

    fa_tf.register("fastattn")
    if threads:
        torch.set_num_threads(threads)
    repeat = repeat or (2 if quick else 3)
    prompt_len, new_tokens, decode_prompt = (256, 8, 64) if quick else (2048, 32, 128)
    if dtype != "float32" and not quick:
        prompt_len = 4096  # the prefill length models in bfloat16 are measured at
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(transformers, quick),
                                                          attn_implementation="sdpa").eval()
    model = model.to(getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"fastattn bench --transformers: transformers {transformers.__version__}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"cpu: {cpu_description()}")
    print(f"model: random Llama, {n_params / 1e6:.0f}M parameters, "
          f"{model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads "
          f"({model.config.num_key_value_heads} key/value), {dtype}, batch 1")

    g = torch.Generator().manual_seed(1)
    long_ids = torch.randint(0, 32000, (1, prompt_len), generator=g)
    short_ids = torch.randint(0, 32000, (1, decode_prompt), generator=g)

    def prefill():
        with torch.no_grad():
            model(input_ids=long_ids)

    def decode():
        with torch.no_grad():
            model.generate(short_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)

    results = {}
    for what, fn in (("prefill", prefill), ("decode", decode)):
        samples = {"sdpa": [], "fastattn": []}
        for impl in samples:  # warm-up of both
            model.set_attn_implementation(impl)
            fn()
        for _ in range(repeat):
            for impl in samples:
                model.set_attn_implementation(impl)
                t = time.perf_counter()
                fn()
                samples[impl].append(time.perf_counter() - t)
        results[what] = {impl: statistics.median(s) for impl, s in samples.items()}

    shares, per_call, inside = {}, {}, {}
    for impl, fn in (("sdpa", AttentionInterface._global_mapping["sdpa"]),
                     ("fastattn", fa_tf.attention_forward)):
        timed = _Timed(fn)
        name = f"timed_{impl}"
        AttentionInterface.register(name, timed)
        AttentionMaskInterface.register(name, sdpa_mask if impl == "sdpa" else fa_tf.mask)
        model.set_attn_implementation(name)
        for what, fn_run in (("prefill", prefill), ("decode", decode)):
            timed.calls = []
            t = time.perf_counter()
            fn_run()
            shares[impl, what] = sum(timed.calls) / (time.perf_counter() - t)
            inside[impl, what] = sum(timed.calls)
        # a layer's call in a decoding step, inside the model (its caches cold)
        per_call[impl] = statistics.median(timed.calls)

    print()
    print("| run | sdpa | fastattn | sdpa / fastattn | attention share (sdpa, fastattn) |")
    print("|---|---|---|---|---|")
    p = results["prefill"]
    print(f"| prefill {prompt_len} tokens | {p['sdpa']:.2f} s | {p['fastattn']:.2f} s | "
          f"{p['sdpa'] / p['fastattn']:.2f}x | {shares['sdpa', 'prefill']:.0%}, "
          f"{shares['fastattn', 'prefill']:.0%} |")
    print(f"| attention inside the prefill | {inside['sdpa', 'prefill']:.2f} s | "
          f"{inside['fastattn', 'prefill']:.2f} s | "
          f"{inside['sdpa', 'prefill'] / inside['fastattn', 'prefill']:.2f}x | |")
    d = results["decode"]
    print(f"| decode {new_tokens} tokens after {decode_prompt} | "
          f"{new_tokens / d['sdpa']:.1f} tokens/s | {new_tokens / d['fastattn']:.1f} tokens/s | "
          f"{d['sdpa'] / d['fastattn']:.2f}x | {shares['sdpa', 'decode']:.0%}, "
          f"{shares['fastattn', 'decode']:.0%} |")
    print(f"\nmedians of {repeat} alternating samples; decode includes generate()'s own "
          "overhead; the share is the time inside the attention function")
    print(f"one layer's attention call in a decoding step, inside the model (median): "
          f"sdpa {per_call['sdpa'] * 1e6:.0f} us, fastattn "
          f"{per_call['fastattn'] * 1e6:.0f} us")
    return 0

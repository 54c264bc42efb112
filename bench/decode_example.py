"""Decode 256 tokens through a MultiHeadAttention layer with a KVCache, and compare with
recomputing full causal attention over the whole sequence at every step.

Run: python bench/decode_example.py
"""

import time

import numpy as np

import fastattn
from fastattn._timing import cpu_description

embed, heads, kv_heads, head_dim, prompt, new_tokens = 512, 8, 2, 64, 256, 256
rng = np.random.default_rng(0)
w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
layer = fastattn.MultiHeadAttention(w(embed, heads * head_dim), w(embed, kv_heads * head_dim),
                                    w(embed, kv_heads * head_dim), w(heads * head_dim, embed),
                                    num_heads=heads, num_kv_heads=kv_heads)
tokens = rng.standard_normal((1, prompt + new_tokens, embed), dtype=np.float32)

# With a cache: the prompt once, then one token per step (each step projects one token,
# appends its key and value, and attends one query per head to the cache).
cache = fastattn.KVCache(1, kv_heads, prompt + new_tokens, head_dim)
layer(tokens[:, :prompt], cache=cache)
start = time.perf_counter()
steps = [layer(tokens[:, t:t + 1], cache=cache) for t in range(prompt, prompt + new_tokens)]
cached = time.perf_counter() - start

# Without: full causal attention over everything so far, keeping the last row, every step.
start = time.perf_counter()
recomputed = [layer(tokens[:, :t + 1], causal=True)[:, -1:] for t in range(prompt, prompt + new_tokens)]
full = time.perf_counter() - start

err = max(float(np.abs(a - b).max()) for a, b in zip(steps, recomputed))
print(f"cpu: {cpu_description()}, {fastattn._dispatch.kernels.max_threads()} threads")
print(f"KVCache:    {new_tokens / cached:8.0f} tokens/s ({cached / new_tokens * 1e3:.3f} ms per token)")
print(f"recompute:  {new_tokens / full:8.0f} tokens/s ({full / new_tokens * 1e3:.3f} ms per token)")
print(f"speed-up {full / cached:.1f}x, largest difference between the two {err:.1e}")

"""Attention inside a model's loop: a transformer layer's projections and causal attention,
called back to back as a model calls them, in fastattn, in PyTorch and in NumPy.

    python bench/layer_loop.py [TOKENS] [WIDTH] [HEADS] [LAYERS]

Per layer: q, k, v = x @ w_q, x @ w_k, x @ w_v; causal multi-head attention; x @ w_o.
Defaults: 512 tokens, width 512, 8 heads (D 64), float32, 8 layers per pass, 2 threads
each (torch.set_num_threads; fastattn's OpenMP default; NumPy's OpenBLAS as it starts).
Each library runs whole passes in turn, 0.3 s apart, so that none runs while another's
threads are still awake, and times the second of two passes, so that none starts on
sleeping vCPUs; the medians of 15 such passes, per layer, with the attention's share.

A library that runs its projections on one thread pool and its attention on another pays
when the first pool's threads keep spinning after their call: before fastattn ran its
projections on its own threads (BLAS held to one thread), a layer here took 8-16 ms
instead of 5 on a 2-core Zen 5 EPYC. NumPy's row shows what a plain NumPy model pays
(its attention is the softmax of the full score matrix).
"""

import statistics
import sys
import time

import numpy as np

import fastattn


def numpy_attention(q, k, v):
    s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    s[..., np.triu_indices(s.shape[-1], 1)[0], np.triu_indices(s.shape[-1], 1)[1]] = -np.inf
    s = np.exp(s - s.max(-1, keepdims=True))
    return (s / s.sum(-1, keepdims=True)) @ v


def main(argv):
    tokens, width, heads, layers = ([int(a) for a in argv] + [512, 512, 8, 8][len(argv):])[:4]
    d = width // heads
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((tokens, width), dtype=np.float32)
    ws = [[rng.standard_normal((width, width), dtype=np.float32) / width ** 0.5
           for _ in range(4)] for _ in range(layers)]

    # Heads as a model lays them out: (batch 1, heads, tokens, d), views of the projection
    # (torch's flash kernel takes 4-D inputs only; 3-D ones go to its math path, 4x slower).
    def split(a):  # (tokens, width) -> (1, heads, tokens, d)
        return a.reshape(1, tokens, heads, d).transpose(0, 2, 1, 3)

    def merge(a):
        return np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(tokens, width)

    def fastattn_layer(x, w):
        q, k, v = (split(fastattn.project(x, wi)) for wi in w[:3])
        t = time.perf_counter()
        o = fastattn.attention(q, k, v, causal=True)
        return fastattn.project(merge(o), w[3]), time.perf_counter() - t

    def numpy_layer(x, w):
        q, k, v = (split(x @ wi) for wi in w[:3])
        t = time.perf_counter()
        o = numpy_attention(q, k, v)
        return merge(o) @ w[3], time.perf_counter() - t

    runners = {"fastattn": fastattn_layer, "numpy": numpy_layer}
    try:
        import torch

        torch.set_num_threads(2)
        tws = [[torch.from_numpy(wi) for wi in w] for w in ws]
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def torch_layer(x, w):
            with torch.no_grad():
                q, k, v = (split_t(x @ wi) for wi in w[:3])
                t = time.perf_counter()
                o = sdpa(q, k, v, is_causal=True)
                return o.transpose(1, 2).reshape(tokens, width) @ w[3], time.perf_counter() - t

        def split_t(a):
            return a.reshape(1, tokens, heads, d).transpose(1, 2)

        runners["torch"] = torch_layer
    except ImportError:
        tws = None

    def one_pass(name):
        run, x = runners[name], x0 if name != "torch" else torch.from_numpy(x0)
        weights = tws if name == "torch" else ws
        t, attn = time.perf_counter(), 0.0
        for w in weights:
            x, a = run(x, w)
            attn += a
        one_pass.last[name] = np.asarray(x)
        return (time.perf_counter() - t) / layers, attn / layers

    one_pass.last = {}
    for name in runners:
        one_pass(name)
    for name, y in one_pass.last.items():  # the contenders compute the same layers
        np.testing.assert_allclose(y, one_pass.last["numpy"], rtol=1e-3, atol=1e-3,
                                   err_msg=name)
    results = {name: [] for name in runners}
    for _ in range(15):
        for name in runners:
            time.sleep(0.3)
            one_pass(name)  # warm again after the gap: no pass starts on sleeping vCPUs
            results[name].append(one_pass(name))
    print(f"{tokens} tokens, width {width}, {heads} heads of {d}, causal, float32; "
          f"{layers} layers per pass, medians of 15 passes, per layer:")
    base = statistics.median(t for t, _ in results["fastattn"])
    for name, samples in results.items():
        layer = statistics.median(t for t, _ in samples)
        attn = statistics.median(a for _, a in samples)
        print(f"  {name:8s} {layer * 1e3:7.2f} ms, attention {attn * 1e3:6.2f} ms"
              + (f"   ({layer / base:.2f}x fastattn's time)" if name != "fastattn" else ""))


if __name__ == "__main__":
    main(sys.argv[1:])

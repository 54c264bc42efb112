"""``python -m fastattn bench --varlen``: packed batches of sequences of different lengths.

- ragged causal prefill: 24 sequences of 32 to 2048 tokens (a geometric spread, shuffled),
  16 query heads over 4 key/value heads, D 64, float32: ``attention_varlen`` against a
  per-sequence loop of ``fastattn.attention`` writing into the same packed output, and
  against torch's SDPA on the batch padded to its longest sequence with a boolean mask
  (as torch users run a ragged batch on the CPU).
- paged prefill chunk: 512 queries after 1,536 cached tokens in a ``PagedKVCache``,
  against ``attention_varlen`` on the same keys packed.
- mixed decode batch: 48 sequences of one query against 64 to 8192 cached tokens each,
  32 heads over 8, D 128, in a ``PagedKVCache`` of 16-token blocks (each sequence's
  blocks in order, then interleaved with the others' as decoding grows them), against a
  per-sequence loop over ``KVCache``s holding the same tokens and the read floor of the
  keys' and values' bytes; and once more with int8 storage (blocks of 32, interleaved),
  against a loop over int8 ``KVCache``s, the floor that of the int8 bytes and scales,
  exact and with ``precision="bfloat16"`` (16-bit integer products where the CPU has
  them) for both.

Contenders alternate, medians of several samples (bench.py's method); the machine's
ceilings (FMA peak, a large matmul, copy bandwidth) are measured in the same run.
"""

import numpy as np

__all__ = ["main"]


def _lengths(n, lo, hi, seed):
    lengths = np.round(np.geomspace(lo, hi, n)).astype(np.int64)
    np.random.default_rng(seed).shuffle(lengths)
    return lengths


def _prefill(threads, repeat, min_time, gap, quick):
    from . import api, bench, varlen
    from ._dispatch import kernels as _kernels
    from ._timing import time_alternating

    n_seqs, top, heads, kv_heads, d = (8, 256, 4, 2, 32) if quick else (24, 2048, 16, 4, 64)
    lengths = _lengths(n_seqs, 32, top, 0)
    cu = np.concatenate([[0], np.cumsum(lengths)])
    rng = np.random.default_rng(0)
    q = rng.standard_normal((cu[-1], heads, d), dtype=np.float32)
    k = rng.standard_normal((cu[-1], kv_heads, d), dtype=np.float32)
    v = rng.standard_normal((cu[-1], kv_heads, d), dtype=np.float32)
    out = np.empty_like(q)

    def loop():
        for s in range(n_seqs):
            a, b = cu[s], cu[s + 1]
            out[a:b] = api.attention(q[a:b].transpose(1, 0, 2), k[a:b].transpose(1, 0, 2),
                                     v[a:b].transpose(1, 0, 2), causal=True,
                                     num_threads=threads).transpose(1, 0, 2)

    contenders = {"fastattn": lambda: varlen.attention_varlen(q, k, v, cu, cu, causal=True,
                                                              num_threads=threads),
                  "loop": loop}
    torch = bench._torch()
    if torch is not None:
        longest = int(lengths.max())
        pad = [torch.zeros(n_seqs, h, longest, d) for h in (heads, kv_heads, kv_heads)]
        mask = torch.zeros(n_seqs, 1, longest, longest, dtype=torch.bool)
        for s in range(n_seqs):
            a, b = cu[s], cu[s + 1]
            for t, src in zip(pad, (q, k, v)):
                t[s, :, :b - a] = torch.from_numpy(src[a:b]).transpose(0, 1)
            mask[s, 0, :b - a, :b - a] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
            mask[s, 0, b - a:, 0] = True  # padding rows see one key (no NaN rows)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run_torch():
            with torch.no_grad():
                return sdpa(*pad, attn_mask=mask, enable_gqa=True)
        contenders["torch"] = run_torch
    # The FMA peak sampled between the row's samples too, as bench's attention rows do.
    fma_flops = _kernels.fma_loop(False, 200_000, threads)
    contenders["fma"] = lambda: _kernels.fma_loop(False, 200_000, threads)
    times = time_alternating(contenders, repeat, min_time, gap, fastest=("fma",))
    times["fma"] = fma_flops / times["fma"] / 1e9
    flops = float(sum(4.0 * heads * d * n * (n + 1) / 2 for n in lengths))
    shape = (f"{n_seqs} sequences of {lengths.min()}-{lengths.max()} tokens "
             f"({cu[-1]} in all), {heads} heads over {kv_heads}, D {d}, causal")
    return "ragged causal prefill", shape, times, flops


def _decode(threads, repeat, min_time, gap, quick, block_size=16, interleaved=False,
            storage=None, precision=None):
    from . import api
    from ._dispatch import kernels as _kernels
    from ._timing import time_alternating
    from .cache import KVCache
    from .paged import PagedKVCache

    n_seqs, top, heads, kv_heads, d = (8, 1024, 8, 2, 64) if quick else (48, 8192, 32, 8, 128)
    lengths = _lengths(n_seqs, 64, top, 1)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((n_seqs, heads, d), dtype=np.float32)
    paged = PagedKVCache(int(sum(-(-lengths // block_size))), block_size, kv_heads, d,
                         storage=storage)
    ids, caches, kvs = [], [], []
    for n in lengths:
        k = rng.standard_normal((int(n), kv_heads, d), dtype=np.float32)
        v = rng.standard_normal((int(n), kv_heads, d), dtype=np.float32)
        ids.append(paged.new_sequence())
        kvs.append((k, v))
        c = KVCache(1, kv_heads, int(n), d, storage=storage)
        c.append(k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None])
        caches.append(c)
    # In order: each sequence appended whole, its blocks one after another in the pool.
    # Interleaved: the sequences grown a block at a time in turn, as decoding grows them,
    # so that no two blocks of a sequence are neighbours.
    step = block_size if interleaved else int(lengths.max())
    for at in range(0, int(lengths.max()), step):
        for sid, (k, v) in zip(ids, kvs):
            paged.append(sid, k[at:at + step], v[at:at + step])
    del kvs
    qs = [q[s][None, :, None, :] for s in range(n_seqs)]
    cu = np.arange(n_seqs + 1)

    def loop():
        for s in range(n_seqs):
            api.attention(qs[s], cache=caches[s], num_threads=threads, precision=precision)

    # Bytes read per token and kv head: keys and values, and 8-bit storage's scales (a
    # value's, and a key group's per channel shared by its 32 tokens).
    per_token = {None: 8 * d, "bfloat16": 4 * d, "float16": 4 * d,
                 "int8": 2 * d + 4 + 4 * d / 32, "float8_e4m3": 2 * d + 4 + 4 * d / 32}[storage]
    moved = int(int(lengths.sum()) * kv_heads * per_token)
    block = _kernels.read_sum_multiple() * threads
    floor_buf = np.ones(-(-moved // block) * block // 4, np.float32)
    contenders = {"fastattn": lambda: paged.attention(q, ids, cu, num_threads=threads,
                                                      precision=precision),
                  "loop": loop, "floor": lambda: _kernels.read_sum(floor_buf, threads)}
    times = time_alternating(contenders, repeat, min_time, gap, fastest=("floor",))
    order = "interleaved" if interleaved else "in order"
    held = "" if storage is None else f" with storage={storage!r}"
    if precision is not None:
        held += f" (both with precision={precision!r})"
    shape = (f"PagedKVCache{held}, blocks of {block_size} {order}: {n_seqs} sequences of 1 query "
             f"and {lengths.min()}-{lengths.max()} cached tokens ({lengths.sum()} in all), "
             f"{heads} heads over {kv_heads}, D {d}")
    label = ", ".join(x for x in (storage, precision and "products", order) if x)
    return f"mixed decode batch ({label})", shape, times, moved


def _paged_prefill(threads, repeat, min_time, gap, quick):
    """A prefill chunk of 512 tokens after 1,536 cached ones, from a PagedKVCache of
    16-token blocks, against attention_varlen on the same keys packed."""
    from . import varlen
    from ._timing import time_alternating
    from .paged import PagedKVCache

    cached, chunk, heads, kv_heads, d = (96, 32, 8, 2, 64) if quick else (1536, 512, 32, 8, 128)
    n = cached + chunk
    rng = np.random.default_rng(2)
    k = rng.standard_normal((n, kv_heads, d), dtype=np.float32)
    v = rng.standard_normal((n, kv_heads, d), dtype=np.float32)
    q = rng.standard_normal((chunk, heads, d), dtype=np.float32)
    paged = PagedKVCache(-(-n // 16), 16, kv_heads, d)
    sid = paged.new_sequence()
    paged.append(sid, k[:cached], v[:cached])
    paged.append(sid, k[cached:], v[cached:])
    cu_q, cu_k = np.array([0, chunk]), np.array([0, n])
    contenders = {
        "fastattn": lambda: paged.attention(q, [sid], cu_q, num_threads=threads),
        "loop": lambda: varlen.attention_varlen(q, k, v, cu_q, cu_k, causal=True,
                                                num_threads=threads)}
    times = time_alternating(contenders, repeat, min_time, gap)
    flops = 4.0 * heads * d * sum(cached + i + 1 for i in range(chunk))
    shape = (f"PagedKVCache, blocks of 16: a chunk of {chunk} queries after {cached} cached "
             f"tokens, {heads} heads over {kv_heads}, D {d}, causal; the loop column: "
             f"attention_varlen on the same keys packed")
    return "paged prefill chunk", shape, times, flops


def main(threads=None, quick=False, repeat=None, min_time=0.05, gap=0.2):
    from . import bench
    from ._timing import ceilings, cpu_description
    from ._validation import check_threads

    threads = check_threads(threads)
    repeat = repeat or (3 if quick else 7)
    torch = bench._torch()
    if torch is not None:
        torch.set_num_threads(threads)
    print(f"fastattn bench --varlen, {threads} threads, float32, medians of {repeat} "
          f"alternating samples")
    print(f"cpu: {cpu_description()}")
    ceil = ceilings(threads)
    print(f"ceilings measured now: FMA peak ({bench.info_isa()}) {ceil['fma_float32']:.1f} "
          f"GFLOP/s, float32 matmul (2048^3) {ceil['matmul_gflops']:.1f} GFLOP/s, copy "
          f"(64 MiB) {ceil['copy_gbs']:.1f} GB/s")
    print()
    print("| case | shape | fastattn | rate | per-sequence loop | loop / fastattn | "
          "torch, padded + mask | torch / fastattn |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = bench._fmt_time
    runs = (_prefill, _decode, lambda *a: _decode(*a, interleaved=True),
            lambda *a: _decode(*a, block_size=32, interleaved=True, storage="int8"),
            lambda *a: _decode(*a, block_size=32, interleaved=True, storage="int8",
                               precision="bfloat16"),
            _paged_prefill)
    for run in runs:
        name, shape, times, work = run(threads, repeat, min_time, gap, quick)
        fa, loop, tt = times["fastattn"], times["loop"], times.get("torch")
        if "floor" in times:
            rate = (f"{work / fa / 1e9:.1f} GB/s of keys and values (read floor "
                    f"{fmt(times['floor'])}: {100 * times['floor'] / fa:.0f}%)")
        else:
            peak = max(ceil["fma_float32"], times.get("fma", 0.0))
            rate = f"{work / fa / 1e9:.1f} GFLOP/s ({100 * work / fa / 1e9 / peak:.0f}% of FMA peak)"
        print(f"| {name} | {shape} | {fmt(fa)} | {rate} | {fmt(loop)} | {loop / fa:.2f}x | "
              f"{fmt(tt)} | {'—' if tt is None else f'{tt / fa:.2f}x'} |", flush=True)
    return 0

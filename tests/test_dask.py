"""fastattn.dask: attention over dask arrays equals fastattn.attention on the whole arrays,
whatever the chunking (hypothesis draws it: uneven, empty chunks, one chunk), masks,
grouped heads, causal/window, softcap and sinks; hidden block pairs make no task; and on a
LocalCluster of worker processes a worker killed mid-computation changes nothing and keys
larger than a worker's memory limit stream through."""

import os
import signal
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

da = pytest.importorskip("dask.array")

import fastattn  # noqa: E402
from fastattn import dask as fd  # noqa: E402
from fastattn._dispatch import kernels  # noqa: E402
from conftest import assert_close  # noqa: E402


def chunking(draw, n, allow_empty=True):
    """A chunking of n: 1..4 pieces, uneven, sometimes with an empty chunk."""
    if n == 0:
        return (0,)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    pieces = [b - a for a, b in zip([0] + cuts, cuts + [n])]
    if not allow_empty:
        pieces = [p for p in pieces if p] or [n]
    return tuple(pieces)


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    h_kv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2]))
    n_q, n_k = draw(st.integers(1, 40)), draw(st.integers(0, 50))
    d, d_v = draw(st.integers(1, 8)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    q = rng.standard_normal((2, h_kv * group, n_q, d)).astype(dtype)
    k = rng.standard_normal((2, h_kv, n_k, d)).astype(dtype)
    v = rng.standard_normal((2, h_kv, n_k, d_v)).astype(dtype)
    causal = draw(st.booleans())
    kwargs = dict(causal=causal,
                  window=draw(st.sampled_from([None, 1, 3, 17])) if causal else None,
                  softcap=draw(st.sampled_from([None, 3.0])),
                  sinks=draw(st.sampled_from([None, rng.standard_normal(h_kv * group)])))
    mask_kind = draw(st.sampled_from(["none", "bool", "float", "dead-block"]))
    mask = None
    if mask_kind == "bool":
        mask = rng.random((n_q, n_k)) > 0.3
    elif mask_kind == "float":
        mask = rng.standard_normal((2, 1, n_q, n_k))
    elif mask_kind == "dead-block":  # a whole chunk pair fully masked
        mask = np.ones((n_q, n_k), bool)
        mask[: n_q // 2, : n_k // 2] = False
    q_chunks = (1, max(1, group * draw(st.integers(1, h_kv))), chunking(draw, n_q), d)
    k_chunks = (draw(st.sampled_from([1, 2])), 1, chunking(draw, n_k), d)
    return (seed, q, k, v, mask, kwargs, q_chunks, k_chunks,
            draw(st.sampled_from([2, 3, 8])), chunking(draw, n_q, False))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_dask_equals_attention_on_the_whole_arrays(case):
    seed, q, k, v, mask, kwargs, q_chunks, k_chunks, split_every, m_chunks = case
    expected, lse = fastattn.attention(q, k, v, mask=mask, return_lse=True, **kwargs)
    dq = da.from_array(q, chunks=q_chunks)
    dk = da.from_array(k, chunks=k_chunks)
    dm = None if mask is None else da.from_array(mask, chunks=mask.shape[:-2] + (m_chunks, -1))
    out, out_lse = fd.attention(dq, dk, v, mask=dm, return_lse=True, split_every=split_every,
                                **kwargs)
    info = f"seed {seed} {kwargs['causal']} {kwargs['window']} q {q_chunks} k {k_chunks}"
    out, out_lse = out.compute(scheduler="sync"), out_lse.compute(scheduler="sync")
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert_close(out, expected, q.dtype, info, magnitude=4)
    assert_close(out_lse, lse, q.dtype, info + " lse", magnitude=20)


def partial_tasks(arr):
    return sum(1 for key in dict(arr.__dask_graph__()) if str(key[0]).startswith("fastattn-partial"))


def test_causal_graph_has_about_half_the_tasks_and_attention_delegates():
    rng = np.random.default_rng(0)
    q = da.from_array(rng.standard_normal((1, 2, 512, 16)), chunks=(1, 2, 64, 16))
    k = da.from_array(rng.standard_normal((1, 2, 512, 16)), chunks=(1, 2, 64, 16))
    full = fd.attention(q, k, k)
    causal = fastattn.attention(q, k, k, causal=True)  # delegated: still lazy
    window = fd.attention(q, k, k, causal=True, window=64)
    assert isinstance(causal, da.Array)
    assert partial_tasks(full) == 64
    assert partial_tasks(causal) == 36  # 8 diagonal + 28 below it
    assert partial_tasks(window) == 15  # the diagonal and the one block before it
    expected = fastattn.attention(q.compute(), k.compute(), k.compute(), causal=True)
    assert_close(causal.compute(), expected, np.float64, "causal", magnitude=4)


def test_numpy_inputs_and_errors():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 6, 4)), rng.standard_normal((3, 6, 2))
    got = fd.attention(q, k, v, causal=True).compute()
    assert_close(got, fastattn.attention(q, k, v, causal=True), np.float64, "numpy in", magnitude=4)
    with pytest.raises(ValueError, match="k and v"):
        fd.attention(q, k, v[:, :5])
    with pytest.raises(TypeError, match="mask"):
        fd.attention(q, k, v, mask=np.ones((5, 6), np.int64))
    with pytest.raises(ValueError, match="split_every"):
        fd.attention(q, k, v, split_every=1)
    with pytest.raises(ValueError, match="no weights"):
        fastattn.attention(da.from_array(q), k, v, return_weights=True)


# --------------------------------------------------------------------------- cluster

@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  memory_limit="300MiB", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


@pytest.mark.cluster
def test_a_worker_killed_mid_computation_changes_nothing(client):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((8, 2, 2048, 64)).astype(np.float32)
    k = rng.standard_normal((8, 2, 8192, 64)).astype(np.float32)
    v = rng.standard_normal((8, 2, 8192, 64)).astype(np.float32)
    expected = fastattn.attention(q, k, v)
    dq = da.from_array(q, chunks=(1, 2, 1024, 64)).persist()
    dk = da.from_array(k, chunks=(1, 2, 2048, 64)).persist()
    dv = da.from_array(v, chunks=(1, 2, 2048, 64)).persist()
    out = fd.attention(dq, dk, dv)
    future = client.compute(out)

    def partials_done(dask_scheduler):
        return sum(1 for ts in dask_scheduler.tasks.values()
                   if ts.state == "memory" and "fastattn-partial" in str(ts.key))

    deadline = time.time() + 120
    while client.run_on_scheduler(partials_done) == 0 and time.time() < deadline:
        time.sleep(0.02)
    assert not future.done(), "finished before a worker could be killed: enlarge the case"
    victim = next(iter(client.run(os.getpid).values()))
    os.kill(victim, signal.SIGKILL)  # mid-computation; its nanny starts a new worker
    got = future.result(timeout=600)
    assert_close(got, expected, np.float32, "a worker killed", magnitude=4)
    assert victim not in client.run(os.getpid).values()


@pytest.mark.cluster
def test_keys_larger_than_a_worker_memory_limit_stream_through(client, tmp_path):
    """1 GiB of keys and values in memmaps, workers limited to 300 MiB each: each task
    reads its own 16 MiB blocks, no worker holds all the keys."""
    n_keys, d = 1 << 19, 128
    k = np.lib.format.open_memmap(tmp_path / "k.npy", "w+", np.float32, (2, n_keys, d))
    v = np.lib.format.open_memmap(tmp_path / "v.npy", "w+", np.float32, (2, n_keys, d))
    rng = np.random.default_rng(3)
    step = 1 << 16
    for start in range(0, n_keys, step):
        k[:, start:start + step] = rng.standard_normal((2, step, d), dtype=np.float32)
        v[:, start:start + step] = rng.standard_normal((2, step, d), dtype=np.float32)
    k.flush()
    v.flush()
    q = rng.standard_normal((2, 4, d)).astype(np.float32)
    expected = fastattn.attention(q, k, v)

    def load(path, start, stop):
        return np.ascontiguousarray(np.load(path, mmap_mode="r")[:, start:stop])

    import dask
    chunk = 1 << 14
    blocks = [da.from_delayed(dask.delayed(load)(str(tmp_path / name), s, s + chunk),
                              (2, chunk, d), np.float32)
              for name in ("k.npy", "v.npy") for s in range(0, n_keys, chunk)]
    dk = da.concatenate(blocks[: n_keys // chunk], axis=1)
    dv = da.concatenate(blocks[n_keys // chunk:], axis=1)
    import psutil
    import threading
    workers = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
    peak, done = [0.0], threading.Event()

    def sample():  # resident memory of every worker process, every 10 ms
        while not done.is_set():
            for w in workers:
                try:
                    peak[0] = max(peak[0], w.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        got = fd.attention(q, dk, dv).compute()
    finally:
        done.set()
        sampler.join()
    assert_close(got, expected, np.float32, "memmap", magnitude=4)
    peak = peak[0]
    print(f"peak worker memory {peak:.0f} MiB for {2 * k.nbytes / 2**20:.0f} MiB of keys and values")
    assert peak < 300, f"a worker peaked at {peak:.0f} MiB"


@pytest.mark.cluster
def test_sharded_cache_decodes_as_one_cache(client):
    rng = np.random.default_rng(4)
    b, h, h_kv, d = 1, 4, 2, 16
    sharded = fd.ShardedKVCache(client, b, h_kv, d, shard_capacity=40, n_shards=3)
    single = fastattn.KVCache(b, h_kv, 120, d)
    assert len({id(s) for s in sharded.shards}) == 3 and set(sharded.workers) <= set(
        client.scheduler_info()["workers"])
    prompt_k = rng.standard_normal((b, h_kv, 70, d)).astype(np.float32)  # spans two shards
    prompt_v = rng.standard_normal((b, h_kv, 70, d)).astype(np.float32)
    sharded.append(prompt_k, prompt_v)
    single.append(prompt_k, prompt_v)
    assert sharded.lengths == [40, 30, 0]
    # A causal chunk of 5 queries: the last 5 tokens, which straddle nothing here.
    q5 = rng.standard_normal((b, h, 5, d)).astype(np.float32)
    assert_close(sharded.attention(q5), fastattn.attention(q5, cache=single, causal=True),
                 np.float32, "5 causal queries", magnitude=4)
    sinks = rng.standard_normal(h).astype(np.float32)
    for step in range(15):  # crosses into the third shard at token 80
        k1 = rng.standard_normal((b, h_kv, 1, d)).astype(np.float32)
        v1 = rng.standard_normal((b, h_kv, 1, d)).astype(np.float32)
        sharded.append(k1, v1)
        q = rng.standard_normal((b, h, 1, d)).astype(np.float32)
        got, got_lse = sharded.attention(q, sinks=sinks, softcap=5.0, return_lse=True)
        want, want_lse = fastattn.attention(q, k1, v1, cache=single, sinks=sinks, softcap=5.0,
                                            return_lse=True)
        assert_close(got, want, np.float32, f"step {step}", magnitude=4)
        assert_close(got_lse, want_lse, np.float32, f"step {step} lse", magnitude=20)
    assert sharded.lengths == [40, 40, 5] and len(sharded) == 85
    with pytest.raises(ValueError, match="do not fit"):
        sharded.append(np.zeros((b, h_kv, 40, d), np.float32), np.zeros((b, h_kv, 40, d), np.float32))
    assert sharded.lengths == [40, 40, 5]


@pytest.mark.cluster
def test_sharded_cache_holds_its_shards_in_the_storage_asked(client):
    rng = np.random.default_rng(5)
    b, h, h_kv, d = 1, 4, 2, 32
    sharded = fd.ShardedKVCache(client, b, h_kv, d, shard_capacity=40, n_shards=3,
                                storage="int8")
    exact = fastattn.KVCache(b, h_kv, 120, d)
    k, v = (rng.standard_normal((b, h_kv, 100, d)).astype(np.float32) for _ in range(2))
    for lo, hi in ((0, 70), (70, 71), (71, 100)):
        sharded.append(k[:, :, lo:hi], v[:, :, lo:hi])
        exact.append(k[:, :, lo:hi], v[:, :, lo:hi])
    for q in (rng.standard_normal((b, h, 1, d)), rng.standard_normal((b, h, 3, d))):
        q = q.astype(np.float32)
        got, want = sharded.attention(q), fastattn.attention(q, cache=exact, causal=True)
        rel = np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2))
        assert 1e-5 < rel < 3e-2, rel  # quantized (so held in int8), within int8's bound
        # precision="bfloat16" reaches the shards: their int8 steps take the 16-bit
        # integer products where this CPU has them, within the same bound.
        fast = sharded.attention(q, precision="bfloat16")
        rel = np.sqrt(np.mean((fast - want) ** 2) / np.mean(want ** 2))
        assert rel < 3e-2, rel
        if q.shape[2] == 1:  # (every shard's own step; 3 queries mask the last shard)
            assert (not np.array_equal(fast, got)) == kernels.decode_products(d, d, "int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        sharded.attention(q, precision="fast")
    with pytest.raises(ValueError, match="storage must be one of"):
        fd.ShardedKVCache(client, b, h_kv, d, shard_capacity=40, n_shards=1, storage="int4")

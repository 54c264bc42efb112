"""PagedKVCache: a pool of blocks shared by many sequences, attention over a mixed batch.

Against attention on each sequence's keys alone (float64, then the compute dtype's
tolerance), against the pure-Python reference, bitwise against a KVCache step where the
blocks are whole spans of the decoding kernel, bitwise across thread counts; forks and
releases against a model of what each sequence holds (hypothesis); a full pool, and every
hostile argument, refused by name with nothing changed.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastattn
from fastattn import reference

from conftest import assert_close


def _filled(rng, lengths, block_size, kv_heads, d, dtype=np.float32, storage=None, pieces=2):
    """A cache holding one sequence per length (appended in `pieces` parts), and its ids."""
    blocks = sum(-(-n // block_size) for n in lengths) + 2
    cache = fastattn.PagedKVCache(blocks, block_size, kv_heads, d, dtype=dtype, storage=storage)
    ids = []
    for n in lengths:
        sid = cache.new_sequence()
        k, v = rng.standard_normal((2, n, kv_heads, d))
        cuts = np.linspace(0, n, pieces + 1).astype(int)
        for a, b in zip(cuts[:-1], cuts[1:]):
            cache.append(sid, k[a:b], v[a:b])
        ids.append(sid)
    return cache, ids


def _alone(cache, ids, q, cu, **kw):
    """float64 attention of each sequence's queries on what the cache holds for it."""
    outs, lses = [], []
    for i, sid in enumerate(ids):
        qs = q[cu[i]:cu[i + 1]].astype(np.float64).transpose(1, 0, 2)
        k = cache.keys(sid).astype(np.float64).transpose(1, 0, 2)
        v = cache.values(sid).astype(np.float64).transpose(1, 0, 2)
        o, lse = fastattn.attention(qs, k, v, return_lse=True, **kw)
        outs.append(o.transpose(1, 0, 2))
        lses.append(lse.T)
    return np.concatenate(outs), np.concatenate(lses)


def _held(storage, k, v=None):
    """(keys, values) a float32 cache with `storage` holds for the tokens k (n, H, D) and
    v (default k), by a KVCache: the pool must hold the same."""
    v = k if v is None else v
    flat = fastattn.KVCache(1, k.shape[1], len(k), k.shape[2], storage=storage)
    flat.append(k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None])
    return flat.keys[0].transpose(1, 0, 2), flat.values[0].transpose(1, 0, 2)


LENGTHS = [0, 1, 15, 16, 17, 700, 33, 5]
QUERIES = [1, 1, 3, 1, 2, 5, 1, 7]


@pytest.mark.parametrize("dtype,storage", [(np.float32, None), (np.float64, None),
                                           (np.float32, "bfloat16"), (np.float32, "float16")])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 5)])
@pytest.mark.parametrize("heads,kv_heads,d,block", [(8, 2, 64, 16), (3, 3, 20, 7), (4, 1, 16, 1)])
def test_each_sequence_as_attention_alone(dtype, storage, causal, window, heads, kv_heads, d,
                                          block):
    rng = np.random.default_rng(heads + d + block)
    cache, ids = _filled(rng, LENGTHS, block, kv_heads, d, dtype, storage)
    cu = np.concatenate([[0], np.cumsum(QUERIES)])
    q = rng.standard_normal((cu[-1], heads, d))
    sinks = rng.standard_normal(heads)
    kw = dict(causal=causal, window=window, softcap=6.0, sinks=sinks)
    out, lse = cache.attention(q, ids, cu, return_lse=True, **kw)
    compute = np.float32 if storage else dtype
    assert out.dtype == compute and out.shape == (cu[-1], heads, d)
    assert lse.dtype == compute and lse.shape == (cu[-1], heads)
    # (q as the kernel reads it: in the compute dtype)
    want_out, want_lse = _alone(cache, ids, q.astype(compute), cu, **kw)
    assert_close(out, want_out, compute, "out", magnitude=3.0)
    assert_close(lse, want_lse, compute, "lse", magnitude=10.0)


def test_against_the_reference():
    rng = np.random.default_rng(1)
    cache, ids = _filled(rng, [3, 0, 6, 4], 2, 2, 3, np.float64)
    cu = np.array([0, 2, 3, 4, 7])
    q = rng.standard_normal((7, 4, 3))
    sinks = [0.5, -np.inf, 1.0, -1.0]
    out, lse = cache.attention(q, ids, cu, causal=True, softcap=2.0, sinks=sinks, return_lse=True)
    for i, sid in enumerate(ids):
        qs = q[cu[i]:cu[i + 1]].transpose(1, 0, 2)
        k = np.repeat(cache.keys(sid).transpose(1, 0, 2), 2, axis=0)
        v = np.repeat(cache.values(sid).transpose(1, 0, 2), 2, axis=0)
        want_out, want_lse = reference.attention(qs, k, v, causal=True, softcap=2.0,
                                                 sinks=sinks, return_lse=True)
        assert_close(out[cu[i]:cu[i + 1]].transpose(1, 0, 2), want_out, np.float64, f"seq {i}")
        assert_close(lse[cu[i]:cu[i + 1]].T, want_lse, np.float64, f"lse {i}")


@pytest.mark.parametrize("storage,block", [
    (storage, block) for storage in (None, "bfloat16", "float16") for block in (1, 16, 100, 256)
] + [(storage, block) for storage in ("int8", "float8_e4m3") for block in (32, 96, 256)])
def test_a_decoding_step_on_blocks_in_order_is_bitwise_a_kvcache_step(storage, block):
    """A sequence whose blocks follow one another in the pool is read in one run: its
    steps run exactly as on a KVCache holding the same tokens (appended in the same
    pieces: 8-bit storage re-quantizes the group still filling as tokens join it)."""
    rng = np.random.default_rng(2)
    n, kv_heads, heads, d = 1300, 2, 8, 64
    k, v = rng.standard_normal((2, n, kv_heads, d)).astype(np.float32)
    k[:, :, :3] *= 10  # (outlier channels: the key scales matter)
    paged = fastattn.PagedKVCache(-(-n // block), block, kv_heads, d, storage=storage)
    sid = paged.new_sequence()
    flat = fastattn.KVCache(1, kv_heads, n, d, storage=storage)
    for a, b in [(0, 5), (5, 40), (40, 41), (41, 1299), (1299, 1300)]:
        paged.append(sid, k[a:b], v[a:b])
        flat.append(k[a:b].transpose(1, 0, 2)[None], v[a:b].transpose(1, 0, 2)[None])
    np.testing.assert_array_equal(paged.keys(sid), flat.keys[0].transpose(1, 0, 2))
    np.testing.assert_array_equal(paged.values(sid), flat.values[0].transpose(1, 0, 2))
    q = rng.standard_normal((1, heads, d)).astype(np.float32)
    out, lse = paged.attention(q, [sid], [0, 1], return_lse=True)
    want, want_lse = fastattn.attention(q[:, :, None, :], cache=flat, return_lse=True)
    np.testing.assert_array_equal(out[0], want[0, :, 0])
    np.testing.assert_array_equal(lse[0], want_lse[0, :, 0])


EIGHT_BIT = ["int8", "float8_e4m3"]


@pytest.mark.parametrize("storage", EIGHT_BIT)
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 5), (True, 40)])
@pytest.mark.parametrize("heads,kv_heads,d,block", [(8, 2, 64, 32), (3, 3, 20, 64)])
def test_eight_bit_storage_as_attention_alone(storage, causal, window, heads, kv_heads, d,
                                              block):
    """int8 and float8 e4m3 pools: decoding rows and prefill chunks (both in the decoding
    kernel, reading bytes and scales through the block tables), windows starting inside a
    key group, against float64 attention on the keys and values the pool holds."""
    rng = np.random.default_rng(heads + d + block)
    lengths = [0, 1, 31, 32, 33, 700, 65, 5]
    cache, ids = _filled(rng, lengths, block, kv_heads, d, storage=storage, pieces=3)
    cu = np.concatenate([[0], np.cumsum(QUERIES)])
    q = rng.standard_normal((cu[-1], heads, d))
    sinks = rng.standard_normal(heads)
    kw = dict(causal=causal, window=window, softcap=6.0, sinks=sinks)
    out, lse = cache.attention(q, ids, cu, return_lse=True, **kw)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    want_out, want_lse = _alone(cache, ids, q.astype(np.float32), cu, **kw)
    assert_close(out, want_out, np.float32, "out", magnitude=3.0)
    assert_close(lse, want_lse, np.float32, "lse", magnitude=10.0)
    for threads in (1, 3):
        np.testing.assert_array_equal(out, cache.attention(q, ids, cu, num_threads=threads,
                                                           **kw))


@pytest.mark.parametrize("storage", [None, "int8"])
@pytest.mark.parametrize("queries,window", [([1, 1, 1], None), ([1, 1, 1], 4),
                                            ([0, 2, 1], None), ([2, 0, 1], 4)])
def test_as_many_queries_as_sequences_need_not_be_one_each(storage, queries, window):
    """A batch of decoding steps (one query per sequence) takes a shorter way to its
    groups; as many queries as sequences, but not one each, must not."""
    rng = np.random.default_rng(len(queries) + sum(queries[:2]))
    cache, ids = _filled(rng, [40, 9, 70], 32, 2, 32, storage=storage)
    cu = np.concatenate([[0], np.cumsum(queries)])
    q = rng.standard_normal((cu[-1], 4, 32)).astype(np.float32)
    out, lse = cache.attention(q, ids, cu, causal=True, window=window, return_lse=True)
    want_out, want_lse = _alone(cache, ids, q, cu, causal=True, window=window)
    assert_close(out, want_out, np.float32, "out", magnitude=3.0)
    assert_close(lse, want_lse, np.float32, "lse", magnitude=10.0)


@pytest.mark.parametrize("storage", EIGHT_BIT)
def test_eight_bit_forks_hold_their_own_group_still_filling(storage):
    """A fork in the middle of a key group shares its block and the group's exact keys;
    each then appends its own tokens: the shared block is copied (bytes and scales), and
    each sequence holds exactly what a KVCache given its tokens holds, the other
    untouched."""
    rng = np.random.default_rng(9)
    kv_heads, d = 2, 16
    cache = fastattn.PagedKVCache(6, 32, kv_heads, d, storage=storage)
    k = rng.standard_normal((50, kv_heads, d)) * np.linspace(0.1, 20, d)
    a = cache.new_sequence()
    cache.append(a, k[:20], -k[:20])
    b = cache.fork(a)
    pool = cache._k.nbytes * 2 + cache._ks.nbytes + cache._vs.nbytes
    assert cache.nbytes == pool + 20 * kv_heads * d * 4  # the shared group counted once
    cache.append(b, k[20:50], -k[20:50])
    cache.append(a, 3 * k[20:23], -3 * k[20:23])

    for sid, tokens in [(a, np.concatenate([k[:20], 3 * k[20:23]])), (b, k[:50])]:
        want_k, want_v = _held(storage, tokens, -tokens)
        np.testing.assert_array_equal(cache.keys(sid), want_k)
        np.testing.assert_array_equal(cache.values(sid), want_v)
    # the open groups' exact keys are counted: a holds 23 of a group, b 18
    assert cache.nbytes == pool + (23 + 18) * kv_heads * d * 4
    cache.release(b)
    assert cache.nbytes == pool + 23 * kv_heads * d * 4


@pytest.mark.parametrize("storage", EIGHT_BIT)
def test_eight_bit_storage_refuses_nan_and_inf(storage):
    cache = fastattn.PagedKVCache(2, 32, 1, 2, storage=storage)
    sid = cache.new_sequence()
    cache.append(sid, np.ones((3, 1, 2)), np.ones((3, 1, 2)))
    before = cache.keys(sid)
    with pytest.raises(ValueError, match="k holds NaN or inf"):
        cache.append(sid, np.full((1, 1, 2), np.inf), np.ones((1, 1, 2)))
    with pytest.raises(ValueError, match="v holds NaN or inf"):
        cache.append(sid, np.ones((1, 1, 2)), np.full((1, 1, 2), np.nan))
    assert cache.length(sid) == 3 and cache.free_blocks == 1
    np.testing.assert_array_equal(cache.keys(sid), before)


def test_bitwise_across_threads_and_pieces(monkeypatch):
    """Decoding rows and prefill chunks (the fused kernel, which gathers the pages as it
    packs them; in many pieces too, as a long call runs for Ctrl-C)."""
    rng = np.random.default_rng(3)
    cache, ids = _filled(rng, [5000, 3, 700, 64, 300], 16, 2, 64)
    cu = np.array([0, 1, 2, 6, 7, 207])
    q = rng.standard_normal((207, 8, 64)).astype(np.float32)
    one = cache.attention(q, ids, cu, num_threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(one, cache.attention(q, ids, cu, num_threads=threads))
    from fastattn import _run
    monkeypatch.setattr(_run, "PIECE_FLOPS", 1e5)
    np.testing.assert_array_equal(one, cache.attention(q, ids, cu, num_threads=2))


def test_a_prefill_chunk_is_bitwise_attention_varlen_on_its_keys():
    """A chunk of several queries runs in the fused kernel, reading the keys from the
    pages as attention_varlen reads them packed: the same result, bit for bit."""
    rng = np.random.default_rng(7)
    cache, ids = _filled(rng, [300, 40, 1000], 16, 2, 64)
    cu = np.array([0, 30, 70, 75])
    q = rng.standard_normal((75, 8, 64)).astype(np.float32)
    out, lse = cache.attention(q, ids, cu, window=100, softcap=5.0, return_lse=True)
    k = np.concatenate([cache.keys(s) for s in ids])
    v = np.concatenate([cache.values(s) for s in ids])
    cu_k = np.array([0, 300, 340, 1340])
    want, want_lse = fastattn.attention_varlen(q, k, v, cu, cu_k, causal=True, window=100,
                                               softcap=5.0, return_lse=True)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, want_lse)


def test_fork_shares_blocks_and_copies_on_write():
    rng = np.random.default_rng(4)
    cache = fastattn.PagedKVCache(6, 4, 1, 2)
    a = cache.new_sequence()
    ka, va = rng.standard_normal((2, 6, 1, 2))
    cache.append(a, ka, va)
    b = cache.fork(a)
    assert cache.free_blocks == 4 and cache.length(b) == 6
    kb, vb = rng.standard_normal((2, 3, 1, 2))
    cache.append(b, kb, vb)     # the shared half-filled block is copied first
    assert cache.free_blocks == 2
    np.testing.assert_array_equal(cache.keys(a), ka.astype(np.float32))
    np.testing.assert_array_equal(cache.keys(b), np.concatenate([ka, kb]).astype(np.float32))
    np.testing.assert_array_equal(cache.values(b), np.concatenate([va, vb]).astype(np.float32))
    cache.release(a)            # a's last block is its own; the first stays with b
    assert cache.free_blocks == 3
    np.testing.assert_array_equal(cache.keys(b), np.concatenate([ka, kb]).astype(np.float32))
    cache.release(b)
    assert cache.free_blocks == 6 and cache.sequences == []


def test_a_full_pool_raises_and_changes_nothing():
    rng = np.random.default_rng(5)
    cache = fastattn.PagedKVCache(4, 4, 1, 2)
    a = cache.new_sequence()
    k = rng.standard_normal((10, 1, 2))
    cache.append(a, k, k)
    b = cache.fork(a)
    before = (cache.keys(a), cache.keys(b), cache.free_blocks)
    with pytest.raises(ValueError, match="the pool is full: appending 3 tokens .* needs 2 free "
                                         "blocks of 4 tokens, 1 are free"):
        cache.append(b, k[:3], k[:3])  # a copy of the shared tail and one more block
    np.testing.assert_array_equal(cache.keys(a), before[0])
    np.testing.assert_array_equal(cache.keys(b), before[1])
    assert cache.free_blocks == before[2] == 1 and cache.length(b) == 10
    cache.release(a)               # b holds every block of a: none returns
    assert cache.free_blocks == 1
    cache.append(b, k[:3], k[:3])  # the tail is b's alone now: no copy, one block
    assert cache.length(b) == 13 and cache.free_blocks == 0
    np.testing.assert_array_equal(cache.keys(b), np.concatenate([k, k[:3]]).astype(np.float32))


@st.composite
def operations(draw):
    ops = []
    for _ in range(draw(st.integers(1, 12))):
        ops.append(draw(st.one_of(
            st.tuples(st.just("new")),
            st.tuples(st.just("append"), st.integers(0, 40), st.sampled_from([0, 1, 3, 4, 5, 9, 17])),
            st.tuples(st.just("fork"), st.integers(0, 40)),
            st.tuples(st.just("release"), st.integers(0, 40)))))
    return ops


@given(operations(), st.sampled_from([1, 4, 5]), st.integers(0, 2**32 - 1))
def test_property_sequences_hold_what_was_appended(ops, block, seed):
    rng = np.random.default_rng(seed)
    cache = fastattn.PagedKVCache(12, block, 2, 4, dtype=np.float64)
    model = {}
    for op in ops:
        live = sorted(model)
        if op[0] == "new":
            model[cache.new_sequence()] = np.zeros((0, 2, 4))
        elif not live:
            continue
        elif op[0] == "append":
            sid = live[op[1] % len(live)]
            k = rng.standard_normal((op[2], 2, 4))
            free = cache.free_blocks
            try:
                cache.append(sid, k, -k)
            except ValueError as e:
                assert "the pool is full" in str(e) and cache.free_blocks == free
            else:
                model[sid] = np.concatenate([model[sid], k])
        elif op[0] == "fork":
            sid = live[op[1] % len(live)]
            model[cache.fork(sid)] = model[sid].copy()
        else:
            sid = live[op[1] % len(live)]
            cache.release(sid)
            del model[sid]
        if model and rng.random() < 0.5:  # attention between the operations too (its
            _attend_all(cache, model, rng)  # block tables follow every change of blocks)
    assert cache.sequences == sorted(model)
    for sid, k in model.items():
        np.testing.assert_array_equal(cache.keys(sid), k)
        np.testing.assert_array_equal(cache.values(sid), -k)
    # Blocks: each held one is counted once however many sequences share it.
    held = {b for blocks, _ in cache._seqs.values() for b in blocks}
    assert cache.free_blocks == 12 - len(held)
    assert set(cache._tables) <= set(model)  # released sequences' tables are dropped
    if model:
        _attend_all(cache, model, rng)


def _attend_all(cache, model, rng):
    """One decoding query per sequence of the model against the float64 attention on the
    keys the model says it holds (values: their negatives)."""
    ids = sorted(model)
    cu = np.arange(len(ids) + 1)
    q = rng.standard_normal((len(ids), 4, 4))
    out, lse = cache.attention(q, ids, cu, return_lse=True)
    for i, sid in enumerate(ids):
        k = model[sid].transpose(1, 0, 2)[None]
        want, want_lse = fastattn.attention(q[i][None, :, None], k, -k, return_lse=True)
        assert_close(out[i], want[0, :, 0], np.float64, "out", magnitude=3.0)
        assert_close(lse[i], want_lse[0, :, 0], np.float64, "lse", magnitude=10.0)


def test_sixteen_bit_storage_refuses_nan_and_overflow():
    cache = fastattn.PagedKVCache(2, 4, 1, 2, storage="float16")
    sid = cache.new_sequence()
    with pytest.raises(ValueError, match="v holds NaN or inf"):
        cache.append(sid, np.ones((1, 1, 2)), np.full((1, 1, 2), np.nan))
    with pytest.raises(ValueError, match="k holds values beyond float16's range"):
        cache.append(sid, np.full((1, 1, 2), 1e6), np.ones((1, 1, 2)))
    assert cache.length(sid) == 0 and cache.free_blocks == 2


def _cache():
    cache = fastattn.PagedKVCache(4, 4, 2, 8)
    sid = cache.new_sequence()
    cache.append(sid, np.ones((5, 2, 8)), np.ones((5, 2, 8)))
    return cache, sid


@pytest.mark.parametrize("call,error,words", [
    (lambda c, s: c.append(s + 7, np.ones((1, 2, 8)), np.ones((1, 2, 8))), ValueError,
     "seq_id 7 is not a sequence of this cache"),
    (lambda c, s: c.append(True, np.ones((1, 2, 8)), np.ones((1, 2, 8))), TypeError,
     "seq_id must be a sequence id"),
    (lambda c, s: c.append(s, np.ones((1, 3, 8)), np.ones((1, 3, 8))), ValueError,
     "k must have shape (n_new, kv_heads, head_dim)"),
    (lambda c, s: c.append(s, np.ones((2, 2, 8)), np.ones((1, 2, 8))), ValueError,
     "k and v must bring the same number of tokens"),
    (lambda c, s: c.append(s, np.ones((1, 2, 8), complex), np.ones((1, 2, 8))), TypeError,
     "complex"),
    (lambda c, s: c.fork(s + 3), ValueError, "seq_id 3 is not a sequence"),
    (lambda c, s: c.release(-1), ValueError, "seq_id -1 is not a sequence"),
    (lambda c, s: c.attention(np.ones((1, 4, 8)), [s + 1], [0, 1]), ValueError,
     "seq_ids entry 1 is not a sequence"),
    (lambda c, s: c.attention(np.ones((1, 4, 8)), s, [0, 1]), TypeError,
     "seq_ids must be a sequence of ids"),
    (lambda c, s: c.attention(np.ones((2, 4, 8)), [s], [0, 1]), ValueError,
     "cu_seqlens_q must end at the packed length 2"),
    (lambda c, s: c.attention(np.ones((1, 4, 8)), [s, s], [0, 1]), ValueError,
     "cu_seqlens_q must have as many offsets"),
    (lambda c, s: c.attention(np.ones((1, 3, 8)), [s], [0, 1]), ValueError,
     "kv_heads (2) must divide the query heads (3)"),
    (lambda c, s: c.attention(np.ones((1, 4, 6)), [s], [0, 1]), ValueError,
     "q must be packed as (total_q, H, head_dim=8)"),
    (lambda c, s: c.attention(np.ones((1, 4, 8)), [s], [0, 1], causal=False, window=2),
     ValueError, "window needs causal=True"),
    (lambda c, s: fastattn.PagedKVCache(4, 4, 2, 8, storage="int4"), ValueError,
     "storage must be one of [None, 'bfloat16', 'float16', 'int8', 'float8_e4m3']"),
    (lambda c, s: fastattn.PagedKVCache(4, 48, 2, 8, storage="int8"), ValueError,
     "storage='int8' needs block_size a multiple of 32"),
    (lambda c, s: fastattn.PagedKVCache(0, 4, 2, 8), ValueError, "num_blocks"),
    (lambda c, s: fastattn.PagedKVCache(4, 2.0, 2, 8), TypeError, "block_size"),
    (lambda c, s: fastattn.PagedKVCache(4, 4, 2, 8, dtype=np.float16), TypeError,
     "dtype must be float32 or float64"),
])
def test_hostile_arguments(call, error, words):
    import re
    cache, sid = _cache()
    before = (cache.keys(sid), cache.free_blocks)
    with pytest.raises(error, match=re.escape(words)):
        call(cache, sid)
    np.testing.assert_array_equal(cache.keys(sid), before[0])
    assert cache.free_blocks == before[1]


def test_released_ids_stay_released():
    cache, sid = _cache()
    cache.release(sid)
    with pytest.raises(ValueError, match="released, or never made"):
        cache.length(sid)
    assert cache.new_sequence() != sid  # ids are never reused


def test_blocks_out_of_order_read_as_they_lie():
    """A sequence made in the holes that released sequences left holds blocks that are not
    neighbours, so the kernel's spans break at its block ends; the result stays within
    rounding of attention on its keys (and bitwise across threads)."""
    rng = np.random.default_rng(6)
    cache = fastattn.PagedKVCache(12, 5, 2, 32)
    ids = [cache.new_sequence() for _ in range(6)]
    for sid in ids:
        k, v = rng.standard_normal((2, 10, 2, 32))
        cache.append(sid, k, v)
    assert cache.free_blocks == 0
    for sid in ids[1::2]:
        cache.release(sid)
    a = cache.new_sequence()
    k, v = rng.standard_normal((2, 30, 2, 32))
    cache.append(a, k[:7], v[:7])
    cache.append(a, k[7:], v[7:])
    blocks = cache._seqs[a][0]
    assert len(blocks) == 6 and any(y != x + 1 for x, y in zip(blocks, blocks[1:]))
    q = rng.standard_normal((3, 4, 32))
    cu = np.array([0, 1, 3])
    out, lse = cache.attention(q, [a, ids[0]], cu, return_lse=True, num_threads=1)
    want, want_lse = _alone(cache, [a, ids[0]], q.astype(np.float32), cu, causal=True)
    assert_close(out, want, np.float32, "out", magnitude=3.0)
    assert_close(lse, want_lse, np.float32, "lse", magnitude=10.0)
    np.testing.assert_array_equal(out, cache.attention(q, [a, ids[0]], cu, num_threads=2))


def test_sequences_grown_in_turn_keep_their_blocks_neighbours():
    """The allocator: a growing sequence takes the block after its last when free, and a
    new one starts in the middle of the largest free run."""
    cache = fastattn.PagedKVCache(64, 4, 1, 2)
    ids = [cache.new_sequence() for _ in range(4)]
    for _ in range(6):
        for sid in ids:
            cache.append(sid, np.ones((4, 1, 2)), np.ones((4, 1, 2)))
    for sid in ids:
        blocks = cache._seqs[sid][0]
        assert blocks == list(range(blocks[0], blocks[0] + 6)), blocks


@pytest.mark.parametrize("storage,block", [(None, 4), ("int8", 32), ("float8_e4m3", 32)])
@pytest.mark.parametrize("fork", [False, True])
def test_an_append_interrupted_midway_is_rolled_back(fork, storage, block):
    """Ctrl-C while the values are written: the blocks taken return, a shared tail is
    shared again, every sequence holds what it held (8-bit: the keys and scales of the
    group still filling, already rewritten, are put back)."""
    rng = np.random.default_rng(8)
    cache = fastattn.PagedKVCache(8, block, 1, 2, storage=storage)
    a = cache.new_sequence()
    k = rng.standard_normal((6, 1, 2))
    cache.append(a, k, k)
    b = cache.fork(a) if fork else a
    before = {s: cache.keys(s) for s in cache.sequences}
    blocks = {s: list(cache._seqs[s][0]) for s in cache.sequences}
    refs, free = cache._refs.copy(), cache.free_blocks
    original = cache._v

    class InterruptOnWrite:
        def __setitem__(self, key, value):
            raise KeyboardInterrupt

        def __getitem__(self, key):
            return original[key]

    cache._v = InterruptOnWrite()
    with pytest.raises(KeyboardInterrupt):
        cache.append(b, rng.standard_normal((7, 1, 2)), rng.standard_normal((7, 1, 2)))
    cache._v = original
    assert cache.free_blocks == free and (cache._refs == refs).all()
    assert {s: cache._seqs[s][0] for s in cache.sequences} == blocks
    for s, keys in before.items():
        np.testing.assert_array_equal(cache.keys(s), keys)
    cache.append(b, k[:3], k[:3])  # and it still works
    np.testing.assert_array_equal(cache.keys(b), _held(storage, np.concatenate([k, k[:3]]))[0])
    np.testing.assert_array_equal(cache.keys(a), _held(storage, np.concatenate([k, k[:3]])
                                                       if not fork else k)[0])

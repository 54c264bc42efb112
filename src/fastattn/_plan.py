"""From validated arguments to what the kernels need: the plan of a scores/attention call.

Design: a call is planned in two steps. ``layout()`` does the shape logic (batch
broadcasting, grouped-query heads, the index maps that replace copies of broadcast
entries) and depends on shapes alone, so it is cached. ``plan_attention()`` adds the
arrays, the mask kind, the flags and the dtypes, and returns an immutable
``AttentionPlan``, complete when _run receives it: its route (``Route``: nothing to do,
no keys, the decoding kernel or the fused one), and for the fused kernel its tiles and
whether they run in the micro-kernels. Those decisions are asked of the compiled policy
(_k_policy.pxi), whose rules depend on the shape, never on the thread count, so that
results are bitwise identical for any number of threads.
"""

import dataclasses
import enum
import functools
import math
import os
import warnings
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _dispatch, _tuning
from ._cpu import cpu_signature as _cpu_signature
from ._dispatch import kernels as _kernels
from ._validation import (INT_MAX, as_array, check_flag, check_precision, check_scale,
                          check_sinks, check_softcap, check_window, dtypes_of, is_bfloat16,
                          memory_limit, refuse_huge)

__all__ = ["MaskKind", "Route", "Layout", "AttentionPlan", "layout", "plan_attention",
           "refuse_huge_plan", "use_microkernels", "decode_eligible",
           "frozen", "DEFAULTS", "DEFAULT_Q_BLOCK",
           "DEFAULT_K_BLOCK", "MICROKERNEL_LANES", "TILE_GEMM", "TUNED", "auto_lanes",
           "policy_for", "tile_lanes", "tile_summary", "MK_BLOCKS", "MK_TABLE", "parse_mk",
           "mk_defaults", "mk_choice", "mk_policy", "mk_in_use"]


# --------------------------------------------------------------------------- the policy

# The kernel-choice rules and the values they read are compiled (_k_policy.pxi); this
# module only sets the values at import, from this machine's tuning and the environment.
# The compiled defaults, before anything here changed them:
DEFAULTS = _kernels.policy()
DEFAULT_Q_BLOCK = DEFAULTS["q_block"]
DEFAULT_K_BLOCK = DEFAULTS["k_block"]
# This machine's tuning (fastattn._tuning: what `python -m fastattn tune` measured here),
# or None; it replaces the default tile size and tile GEMMs.
TUNED = _tuning.load(_dispatch.isa, _kernels.mk_blocks())
# The micro-kernels' vector lanes per compute dtype in this build (fa_microkernels.h),
# keyed by the dtype's itemsize (4 or 8); {} in the baseline build, whose tiles always
# call BLAS.
MICROKERNEL_LANES = {size: DEFAULTS[name] for size, name in ((4, "lanes_f"), (8, "lanes_d"))
                     if DEFAULTS[name]}
# Where a tile's GEMMs run: "auto" (the default) in the build's micro-kernels, for each
# compute dtype whose head sizes are whole vectors, unless this machine's tuning found BLAS
# faster for that dtype; FASTATTN_TILE_GEMM=micro or =blas forces one (to test and time
# each path on any machine).
TILE_GEMM = os.environ.get("FASTATTN_TILE_GEMM", "auto").strip().lower() or "auto"
if TILE_GEMM not in ("auto", "micro", "blas"):
    raise ImportError(f"FASTATTN_TILE_GEMM={TILE_GEMM!r} is not 'auto', 'micro' or 'blas'")


def auto_lanes(tuned):
    """The micro-kernel lanes FASTATTN_TILE_GEMM=auto uses with the tuning `tuned` (None:
    every dtype the build has micro-kernels for; else less those tuned to BLAS)."""
    if not tuned:
        return MICROKERNEL_LANES
    gemm = tuned["tile_gemm"]
    return {size: lanes for size, lanes in MICROKERNEL_LANES.items()
            if gemm.get(f"float{8 * size}", "micro") == "micro"}


def policy_for(tuned, tile_gemm):
    """The policy values a tuning entry (or None) and a FASTATTN_TILE_GEMM value choose:
    the largest tile and the micro-kernel lanes of each dtype (0: its tiles in BLAS)."""
    lanes = {"auto": auto_lanes(tuned), "micro": MICROKERNEL_LANES, "blas": {}}[tile_gemm]
    return {"q_block": tuned["q_block"] if tuned else DEFAULT_Q_BLOCK,
            "k_block": tuned["k_block"] if tuned else DEFAULT_K_BLOCK,
            "lanes_f": lanes.get(4, 0), "lanes_d": lanes.get(8, 0)}


_kernels.set_policy(**policy_for(TUNED, TILE_GEMM))


# The micro-kernels' register blocks (fa_microkernels.h): several are compiled per build,
# named "<rows>x<vectors>", the build's first the default; all give the same bits, only
# their speed differs by CPU. Which one a dtype's tiles run: FASTATTN_MK if set (forces
# one, to test and time each: "scores=12x2,pv=6x4", either part alone), else this
# machine's tuning, else MK_TABLE's row for the CPU, else the build's first.
MK_BLOCKS = _kernels.mk_blocks()
# (CPUID vendor, family, build) -> the blocks that `python -m fastattn tune` chose there
# (bench/RESULTS.md, "Register blocks"). Keyed by family, not model, on purpose: a row
# then serves a vendor's generation, and the models of one family seen so far shared
# their cores' FMA and load ports. A CPU not listed takes the build's first blocks.
MK_TABLE = {
    # EPYCs of family 25 (Zen 3, Zen 4), measured on a Zen 4 (model 17, 2026-12-07) in
    # both builds: every block within 0.90-1.02x of the build's first in the public call,
    # none faster by the 8% tune asks for (the kernel probe: AVX-512 blocks at 80-97% of a
    # core's FMA peak, AVX2's 12x1 at 71-80%). The AVX2 default was tuned on a Zen 3.
    ("AuthenticAMD", 25, "avx512"): {"float32": {"scores": "8x2", "pv": "4x4"},
                                     "float64": {"scores": "8x2", "pv": "4x4"}},
    ("AuthenticAMD", 25, "avx2"): {"float32": {"scores": "6x2", "pv": "6x2"},
                                   "float64": {"scores": "6x2", "pv": "6x2"}},
}


def parse_mk(value):
    """{"scores": name, "pv": name} (either may be absent) from a FASTATTN_MK value; a
    ValueError naming what is wrong for anything but this build's block names. In a build
    without micro-kernels (baseline) there is nothing to choose: {}."""
    chosen = {}
    if not MK_BLOCKS["scores"]:
        return chosen
    for part in filter(None, (p.strip() for p in value.split(","))):
        kernel, sep, name = (x.strip().lower() for x in part.partition("="))
        if not sep or kernel not in MK_BLOCKS or kernel in chosen:
            raise ValueError(f"FASTATTN_MK={value!r}: expected 'scores=<block>,pv=<block>' "
                             f"(either alone)")
        if name not in MK_BLOCKS[kernel]:
            raise ValueError(f"FASTATTN_MK={value!r}: {kernel} block {name!r} is not one of "
                             f"this build's ({_dispatch.isa}): {MK_BLOCKS[kernel]}")
        chosen[kernel] = name
    return chosen


def _mk_row(signature=None, isa=None):
    """MK_TABLE's row for a CPU (CPUID `signature`, build `isa`; default: this machine's),
    or None."""
    vendor, family = (signature or _cpu_signature())[:2]
    return MK_TABLE.get((vendor, family, isa or _dispatch.isa))


def mk_defaults(signature=None, isa=None):
    """{"float32": {"scores": name, "pv": name}, "float64": ...}: the blocks MK_TABLE
    gives this CPU (CPUID `signature`, build `isa`; default: this machine's), else the
    build's first blocks."""
    row = _mk_row(signature, isa) or {}
    first = {kernel: names[0] for kernel, names in MK_BLOCKS.items() if names}
    return {dtype: dict(first, **row.get(dtype, {})) for dtype in ("float32", "float64")}


def mk_choice(tuned, forced):
    """The blocks each dtype's tiles run ({"float32": {"scores": name, "pv": name}, ...})
    and why, in words: FASTATTN_MK's `forced` ({kernel: name}), over the tuning entry
    `tuned`'s, over mk_defaults()."""
    blocks = mk_defaults()
    why = "CPU table" if _mk_row() else "build default"
    if tuned and tuned.get("mk_blocks"):
        for dtype, chosen in tuned["mk_blocks"].items():
            blocks[dtype].update(chosen)
        why = "tuned"
    if forced:
        for chosen in blocks.values():
            chosen.update(forced)
        why = "FASTATTN_MK"
    return blocks, why


_MK_SUFFIX = {"float32": "f", "float64": "d"}  # of the policy's mk_<kernel>_<f|d>


def mk_policy(blocks):
    """The policy values (mk_scores_f, mk_pv_f, mk_scores_d, mk_pv_d) of mk_choice's
    blocks."""
    if not MK_BLOCKS["scores"]:
        return {}
    return {f"mk_{kernel}_{_MK_SUFFIX[dtype]}": MK_BLOCKS[kernel].index(name)
            for dtype, chosen in blocks.items() for kernel, name in chosen.items()}


def mk_in_use():
    """The blocks the policy runs now, in mk_choice's form (mk_policy's inverse); {} in a
    build without micro-kernels."""
    if not MK_BLOCKS["scores"]:
        return {}
    p = _kernels.policy()
    return {dtype: {kernel: MK_BLOCKS[kernel][p[f"mk_{kernel}_{sfx}"]] for kernel in MK_BLOCKS}
            for dtype, sfx in _MK_SUFFIX.items()}


try:
    MK_FORCED = parse_mk(os.environ.get("FASTATTN_MK", ""))
except ValueError as e:
    raise ImportError(str(e)) from None
MK_IN_USE, MK_WHY = mk_choice(TUNED, MK_FORCED)
_kernels.set_policy(**mk_policy(MK_IN_USE))


# The matrix engine of bfloat16 tiles (fa_lowp.h): "auto" (the default) takes AMX where
# it passed its first contact, else AVX512-BF16, else none (16-bit inputs widened for the
# float32 micro-kernels); FASTATTN_ENGINE=<name> forces one of _kernels.ENGINES, as
# FASTATTN_ISA forces a build ("amx-emulated" runs the AMX kernels on any CPU, slowly: for
# testing them). Forcing one that cannot run here is an error, never a crash.
def choose_engine(requested):
    """The engine name for a FASTATTN_ENGINE value ("" or "auto": the best here)."""
    status = _kernels.engines()
    if requested in ("", "auto"):
        if "refused" in status["amx"] or "differed" in status["amx"]:
            # The CPU has AMX, and it cannot be used: say so once, and why.
            fallback = "avx512bf16" if status["avx512bf16"] == "ok" else "the float32 kernels"
            warnings.warn(f"fastattn: the AMX engine is off for this process: {status['amx']}; "
                          f"bfloat16 runs on {fallback}", RuntimeWarning, stacklevel=2)
        for name in ("amx", "avx512bf16"):
            if status[name] == "ok":
                return name
        return "none"
    if requested not in status:
        raise ImportError(f"FASTATTN_ENGINE={requested!r} is not 'auto' or one of {sorted(status)}")
    if status[requested] != "ok":
        raise ImportError(f"FASTATTN_ENGINE={requested!r} cannot run here: {status[requested]}")
    return requested


ENGINE = choose_engine(os.environ.get("FASTATTN_ENGINE", "auto").strip().lower())
_kernels.set_policy(engine=_kernels.ENGINES.index(ENGINE))


class MaskKind(enum.IntEnum):
    """How the kernels read a mask (the numbers are the kernels' MASK_* constants)."""
    NONE = 0
    ADD = 1     # floating, added to the scores
    BOOL = 2    # boolean, passed as uint8: 0 = hidden

    @classmethod
    def of(cls, mask):
        """The kind of a mask array, or TypeError for a dtype that is neither."""
        if mask is None:
            return cls.NONE
        if mask.dtype.kind == "b":
            return cls.BOOL
        if mask.dtype.kind == "f" and mask.dtype.itemsize in (2, 4, 8):
            return cls.ADD
        raise TypeError(
            f"mask must be boolean (True = may attend) or floating (added to the scores), "
            f"got dtype {mask.dtype}"
        )


# --------------------------------------------------------------------------- layout

@dataclasses.dataclass(frozen=True)
class Layout:
    """The shape logic of one call: shapes, counts and index maps (read-only arrays)."""
    batch: tuple                # the broadcast batch shape of the results
    q_batch: tuple              # the stored batch shapes of q, k/v and the mask
    kv_batch: tuple
    mask_batch: tuple
    n_queries: int
    n_keys: int
    d_head: int
    d_v: int                    # 0 when there is no v (scores)
    n_batch: int                # entries of batch, q_batch, kv_batch and mask_batch
    n_q_items: int
    n_kv_items: int
    n_mask_items: int
    index: np.ndarray           # (3, n_batch): the stored q, k/v and mask entry of each
    decode_group: int           # single-query attention: batch entries per kv entry
    decode_kv: np.ndarray       # ...and the kv entry of each group
    max_elements: int           # the most elements any array of the call can have


def _broadcast(shapes, what):
    """np.broadcast_shapes of the batch shapes in shapes ((name, batch shape, the whole
    shape), ...), or ValueError naming each batch shape beside its array's shape."""
    try:
        return np.broadcast_shapes(*(batch for _, batch, _ in shapes))
    except ValueError:
        described = " and ".join(
            f"{name}'s {tuple(shape[:-2])}"
            + (f" (read as {batch} by grouped-query heads)" if batch != tuple(shape[:-2]) else "")
            + f" ({name}.shape={shape})" for name, batch, shape in shapes)
        raise ValueError(f"{what} do not broadcast: {described}") from None


@functools.lru_cache(maxsize=256)
def layout(q_shape, k_shape, v_shape, mask_shape):
    """The Layout of a call from its shapes (v_shape None for scores, mask_shape None
    without a mask); ValueError naming the shapes when they do not fit together."""
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if shape is not None and len(shape) < 2:
            want = "(..., L_k, D_v)" if name == "v" else f"(..., L_{name}, D)"
            raise ValueError(f"{name} must have at least 2 dimensions {want}, got {name}.shape={shape}")
    if q_shape[-1] != k_shape[-1]:
        raise ValueError(
            f"q and k must have the same head dimension D, got q.shape={q_shape} and k.shape={k_shape}"
        )
    n_queries, d_head = q_shape[-2:]
    n_keys = k_shape[-2]
    kv_batch = k_shape[:-2]
    if v_shape is not None:
        if v_shape[-2] != n_keys:
            raise ValueError(
                f"k and v must have the same number of keys, got k.shape={k_shape} and v.shape={v_shape}"
            )
        kv_batch = _broadcast([("k", k_shape[:-2], k_shape), ("v", v_shape[:-2], v_shape)],
                              "the batch dimensions of k and v")
    q_batch = q_shape[:-2]

    # Grouped-query attention: query heads h share key/value head h // (H_q / H_kv).
    # (A head axis of 1 broadcasts, as in NumPy.)
    group = 1
    kv_heads_as = kv_batch
    if q_batch and kv_batch and 1 not in (q_batch[-1], kv_batch[-1]):
        group = _kernels.gqa_group(q_batch[-1], kv_batch[-1])
        if group < 0:
            raise ValueError(
                f"the head axis (-3) of k and v must divide that of q for grouped-query attention, "
                f"got q.shape={q_shape} and k.shape={k_shape}"
            )
        if group != 1:
            kv_heads_as = kv_batch[:-1] + (q_batch[-1],)
    # (k's batch as the query heads read it: with grouped heads, its head axis as q's)
    shapes = [("q", q_batch, q_shape), ("k", kv_heads_as, k_shape)]
    mask_batch = ()
    if mask_shape is not None:
        mask_batch = mask_shape[:-2] if len(mask_shape) > 2 else ()
        shapes.append(("mask", mask_batch, mask_shape))
    batch = _broadcast(shapes, "the batch dimensions of q, k/v and mask")
    if mask_shape is not None:
        tail = mask_shape[-2:]
        try:
            ok = np.broadcast_shapes(tail, (n_queries, n_keys)) == (n_queries, n_keys)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"mask must broadcast to (..., L_q, L_k) = {batch + (n_queries, n_keys)}, "
                f"got mask.shape={mask_shape}"
            )
    d_v = v_shape[-1] if v_shape is not None else 0
    if max(n_queries, n_keys, d_head, d_v) > INT_MAX:
        raise ValueError(
            f"L_q, L_k, D and D_v above 2**31 - 1 are not supported (BLAS dimensions are C ints), "
            f"got q.shape={q_shape} and k.shape={k_shape}"
        )
    refuse_huge("the batch index", 3 * math.prod(batch) + math.prod(kv_batch), 8,
                f"broadcast batch {batch} from q.shape={q_shape} and k.shape={k_shape}")
    n_batch, n_q_items = math.prod(batch), math.prod(q_batch)
    n_kv_items, n_mask_items = math.prod(kv_batch), math.prod(mask_batch)
    index, decode_group, decode_kv = _index_maps(q_batch, kv_batch, group, mask_batch, batch)
    return Layout(
        batch=batch, q_batch=q_batch, kv_batch=kv_batch, mask_batch=mask_batch,
        n_queries=n_queries, n_keys=n_keys, d_head=d_head, d_v=d_v,
        n_batch=n_batch, n_q_items=n_q_items, n_kv_items=n_kv_items, n_mask_items=n_mask_items,
        index=index, decode_group=decode_group, decode_kv=decode_kv,
        # Only calls that might not fit in memory go through the detailed check
        # (refuse_huge_plan), which costs microseconds.
        max_elements=max(n_batch * n_queries * max(n_keys, d_v, 1),
                         n_q_items * n_queries * d_head,
                         n_kv_items * n_keys * max(d_head, d_v),
                         n_mask_items * n_queries * n_keys),
    )


def _batch_index(batch_shape, out_batch):
    """For each entry of the broadcast batch, the index of the stored entry it reads."""
    ids = np.arange(math.prod(batch_shape), dtype=np.intp).reshape(batch_shape)
    return np.broadcast_to(ids, out_batch).reshape(-1)


@functools.lru_cache(maxsize=256)
def _index_maps(q_batch, kv_batch, group, mask_batch, batch):
    """index[:, b], the stored q, k/v and mask entries that batch entry b reads, and the
    decoding groups: the costly part of layout() (about 20 us), cached by the batch shapes
    alone, so that a new key or query length (every step of a growing cache) reuses it."""
    kv_ids = np.arange(math.prod(kv_batch), dtype=np.intp).reshape(kv_batch)
    if group > 1:
        kv_ids = np.repeat(kv_ids, group, axis=-1)
    index = frozen(np.stack([
        _batch_index(q_batch, batch),
        np.broadcast_to(kv_ids, batch).reshape(-1),
        _batch_index(mask_batch, batch),
    ]))
    return (index, *_decode_groups(index[1]))


def _decode_groups(kv_index):
    """For single-query attention: the number G of consecutive batch entries that read
    the same key/value entry (the query heads of a grouped-query group, or everything
    when k/v are broadcast), and the kv entry of each group. G = 1 when there is none."""
    n = kv_index.shape[0]
    if n == 0:
        return 1, kv_index
    run = int(np.argmax(kv_index != kv_index[0])) or n
    if n % run == 0 and np.all(kv_index.reshape(-1, run) == kv_index[::run, None]):
        return run, frozen(kv_index[::run])
    return 1, kv_index


def frozen(a):
    """a, C-contiguous and read-only (index arrays shared between calls through caches)."""
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


# --------------------------------------------------------------------------- the plan

class Route(enum.IntEnum):
    """Which way an attention call runs (decided once, in plan_attention)."""
    EMPTY = 0       # no batch entry or no query: nothing to compute
    NO_KEYS = 1     # no key: every query fully masked
    DECODE = 2      # one query per batch entry: the decoding kernel
    FUSED = 3       # the fused kernel


class AttentionPlan(NamedTuple):
    """A validated scores/attention call: its layout, its arrays (not yet converted to
    the compute dtype), the mask kind, the flags and the dtypes, and for attention the
    kernel decisions, complete when _run receives it. Immutable; a NamedTuple rather than
    a frozen dataclass because it is built on every call (a frozen dataclass's __init__
    cost about 4 us of a 20 us tiny call)."""
    layout: Layout
    q: np.ndarray
    k: np.ndarray
    v: Optional[np.ndarray]     # None for scores
    mask: Optional[np.ndarray]
    mask_kind: MaskKind
    causal: bool
    window: int                 # 0: no sliding window
    scale: float
    softcap: float              # 0.0: none
    sinks: Optional[np.ndarray]  # None, or one logit per batch entry: shape layout.batch
    compute: np.dtype           # float32 or float64: what the kernels run in
    result: np.dtype            # what the caller gets back
    named: Any                  # ((name, array), ...): the inputs out= may not overlap
    route: Optional[Route] = None   # attention: which kernel runs it (None for scores)
    q_block: int = 0            # Route.FUSED: query rows and keys per tile...
    k_block: int = 0
    micro: bool = False         # ...and whether the tile GEMMs run in the micro-kernels
    lowp: Optional[str] = None  # Route.FUSED: "bfloat16" or "float16" when the kernel reads
                                # q, k, v as they are (attention_lowp), "float32" when it
                                # may round them to bfloat16 (precision="bfloat16")


_new_plan = tuple.__new__


def plan_attention(q, k, v, mask, causal, scale, window=None, softcap=None, sinks=None, *,
                   with_v=True, return_weights=False, precision=None):
    """Validate q, k, v (if with_v), mask, the flags, softcap, sinks and precision into an
    AttentionPlan; with v, an attention call's route and kernel choices too (they depend
    on return_weights and, for float32 inputs, on precision)."""
    precision = check_precision(precision) or _float32_precision
    q = as_array("q", q)
    k = as_array("k", k)
    if not with_v:
        named = (("q", q), ("k", k))
        compute, result = dtypes_of(("q", "k"), (q.dtype, k.dtype))
    else:
        v = as_array("v", v)
        named = (("q", q), ("k", k), ("v", v))
        compute, result = dtypes_of(("q", "k", "v"), (q.dtype, k.dtype, v.dtype))
    if mask is not None:
        mask = as_array("mask", mask)
        named += (("mask", mask),)
    mask_kind = MaskKind.of(mask)
    lay = layout(q.shape, k.shape, v.shape if with_v else None,
                 None if mask is None else mask.shape)
    causal = check_flag("causal", causal)
    # In AttentionPlan's field order; tuple.__new__ skips the generated __new__ (5,600
    # instructions with its argument binding, a quarter of this function).
    plan = _new_plan(AttentionPlan, (lay, q, k, v if with_v else None, mask, mask_kind, causal,
                                     check_window(window, causal), check_scale(scale, lay.d_head),
                                     check_softcap(softcap), check_sinks(sinks, lay.batch, compute),
                                     compute, result, named, None, 0, 0, False, None))
    return _routed(plan, return_weights, precision) if with_v else plan


def _routed(plan, return_weights, precision="highest"):
    """plan with its route and kernel choices: a single query with a window becomes the
    same call on its last keys (window_as_keys) where the decoding kernel takes it."""
    lay = plan.layout
    head = plan[:_N_CALL_FIELDS]  # the plan's fields before its decisions
    if lay.n_batch == 0 or lay.n_queries == 0:
        return _new_plan(AttentionPlan, head + (_EMPTY, 0, 0, False, None))
    if lay.n_keys == 0:
        return _new_plan(AttentionPlan, head + (_NO_KEYS, 0, 0, False, None))
    if plan.window:
        decoding = window_as_keys(plan)
        if decode_eligible(decoding, return_weights):
            return _new_plan(AttentionPlan, decoding[:_N_CALL_FIELDS] + (_DECODE, 0, 0, False, None))
    elif decode_eligible(plan, return_weights):
        return _new_plan(AttentionPlan, head + (_DECODE, 0, 0, False, None))
    # (An empty head size runs as one zero column.)
    compute = plan.compute
    q_block, k_block = _kernels.tiles(lay.n_batch, lay.n_queries, lay.n_keys, plan.causal,
                                      compute.itemsize)
    micro = _kernels.use_microkernels(compute.itemsize, lay.d_head or 1, lay.d_v or 1)
    lowp = _lowp_kind(plan, precision)
    if lowp is not None and _kernels.lowp_mode(lowp, lay.d_head, lay.d_v) is None:
        lowp = None
    # (Built as tuples: _replace costs a microsecond.)
    return _new_plan(AttentionPlan, head + (_FUSED, q_block, k_block, micro, lowp))


def _lowp_kind(plan, precision):
    """What the fused kernel may read q, k, v as: "bfloat16" or "float16" when all three
    are, "float32" when all three are float32 and precision allows bfloat16 products; else
    None (converted to the compute dtype)."""
    dtypes = (plan.q.dtype, plan.k.dtype, plan.v.dtype)
    if all(is_bfloat16(d) for d in dtypes):
        return "bfloat16"
    if all(d == np.float16 for d in dtypes):
        return "float16"
    if precision == "bfloat16" and all(d == np.float32 for d in dtypes):
        return "float32"
    return None


# --------------------------------------------------------------------------- precision

_float32_precision = "highest"  # set_float32_precision's


def float32_precision():
    """The module default of precision (set_float32_precision)."""
    return _float32_precision


def set_float32_precision(precision):
    """Set the default precision of float32 attention (see fastattn.set_float32_precision);
    returns the previous one."""
    global _float32_precision
    old = _float32_precision
    _float32_precision = check_precision(precision, allow_none=False)
    return old


_N_CALL_FIELDS = AttentionPlan._fields.index("route")
_EMPTY, _NO_KEYS, _DECODE, _FUSED = Route.EMPTY, Route.NO_KEYS, Route.DECODE, Route.FUSED


def refuse_huge_plan(plan, results):
    """Refuse, naming the shapes, a call whose arrays could not be allocated: the results
    (name, element count) and the contiguous copies the kernels would need."""
    lay, compute, q, k, v = plan.layout, plan.compute, plan.q, plan.k, plan.v
    if lay.max_elements * compute.itemsize <= memory_limit():
        return
    shapes = f"q.shape={q.shape}, k.shape={k.shape}" + ("" if v is None else f", v.shape={v.shape}")
    for name, n in results:
        refuse_huge(f"the {name}", n, compute.itemsize, shapes)
    copies = [("copy of q", q, lay.n_q_items * lay.n_queries * lay.d_head),
              ("copy of k", k, lay.n_kv_items * lay.n_keys * lay.d_head)]
    if v is not None:
        copies.append(("copy of v", v, lay.n_kv_items * lay.n_keys * lay.d_v))
    for name, a, n in copies:
        if a.dtype != compute or not a.flags.c_contiguous or a.size != n:
            refuse_huge(f"the {name}", n, compute.itemsize, shapes)
    if plan.mask_kind != MaskKind.NONE:
        refuse_huge("the mask", lay.n_mask_items * lay.n_queries * lay.n_keys,
                    compute.itemsize if plan.mask_kind == MaskKind.ADD else 1, shapes)


# --------------------------------------------------------------------------- kernel choices

def tile_lanes():
    """{itemsize: vector lanes} of the compute dtypes whose tiles run in the micro-kernels,
    as the policy says now."""
    p = _kernels.policy()
    return {size: p[name] for size, name in ((4, "lanes_f"), (8, "lanes_d")) if p[name]}


def use_microkernels(compute, d_head, d_v):
    """Whether a tile's GEMMs run in this build's micro-kernels rather than BLAS (the
    compiled rule: a dtype of tile_lanes(), both head sizes whole vectors)."""
    return _kernels.use_microkernels(compute.itemsize, d_head, d_v)


def tile_summary():
    """Where tiles run and how large, and why, in words (bench's header, ``info``)."""
    lanes = tile_lanes()
    p = _kernels.policy()
    where = ", ".join(f"{name} {'micro-kernels' if size in lanes else 'BLAS'}"
                      for name, size in (("float32", 4), ("float64", 8)))
    if TILE_GEMM != "auto":
        why = f"FASTATTN_TILE_GEMM={TILE_GEMM}"
    elif TUNED:
        why = f"tuned on this machine {TUNED.get('measured', '')}".rstrip()
    else:
        why = "built-in defaults; `python -m fastattn tune` measures this machine's"
    summary = f"tile GEMMs {where}, tiles up to {p['q_block']} x {p['k_block']} ({why})"
    blocks = "; ".join(f"{dtype} scores {b['scores']}, P V {b['pv']}"
                       for dtype, b in mk_in_use().items())
    if blocks:
        summary += f"; register blocks {blocks} ({MK_WHY})"
    return summary


def window_as_keys(plan):
    """A single-query plan with a sliding window as the same call without one: under
    causal's bottom-right alignment the one query is the newest and sees exactly the last
    `window` keys, so k and v become views of those (the decoding kernel then reads only
    them; the fused kernel would take one-row tiles). Any other plan unchanged."""
    lay = plan.layout
    if not plan.window or lay.n_queries != 1 or plan.mask_kind != MaskKind.NONE:
        return plan
    k, v, n_keys = plan.k, plan.v, lay.n_keys
    first = _kernels.window_first_key(n_keys, plan.window)
    if first:
        k = k[..., first:, :]
        v = v[..., first:, :]
        lay = layout(plan.q.shape, k.shape, v.shape, None)
    return plan._replace(layout=lay, k=k, v=v, window=0)


def decode_eligible(plan, return_weights):
    """Whether a call runs in the single-query (decoding) kernel: one query per batch
    entry, no mask or window, q not broadcast, and neither head size empty."""
    lay = plan.layout
    return _kernels.decode_eligible(lay.n_queries, plan.mask_kind, plan.window,
                                    lay.q_batch != lay.batch, lay.d_head, lay.d_v,
                                    return_weights)

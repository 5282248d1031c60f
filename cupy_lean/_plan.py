"""Launch plans: everything a launch needs, built once per signature.

A :class:`Signature` is the metadata of one call: the shapes, strides and
dtypes of every array, the alignment of their pointers, where the lengths
live, and the options. It determines the validation result and everything
about a launch except the data pointers. A :class:`Plan` built from it holds
the kernel spec and compiled kernels, the grid, the decomposition, the kernel
parameters (in ctypes storage: a launch rewrites only the pointers) and its
own workspace. Plans live in the package's one cache (``_cache``) keyed on the
signature and the device.

Workspace rules (what makes graphs and streams safe):

* A plan owns its workspace (or uses the one the caller passed to
  :func:`cupy_lean.plan`); no two plans share one.
* Eager launches of one plan are ordered on the GPU: when a launch comes on a
  stream other than the previous launch's, the new stream first waits for the
  work already queued on the previous one (an event), so two streams never use
  the workspace at once. The per-thread default stream is one handle in every
  thread but a stream per thread: a launch there records its event at once,
  as no other thread can queue work on that stream later.
* A plan that is dropped (evicted, or a caller's plan collected) frees its
  eager workspace in stream order: CuPy's pool reuses a block only on the
  stream that allocated it, so where the last launch ran on another stream,
  the allocating stream first waits for it (``_free_after_use``).
* A launch captured into a CUDA graph gets a workspace of its own, kept as
  long as the plan lives, so no two graphs (and no graph and an eager call)
  share a workspace: graphs can be replayed in any order, on any streams,
  concurrently.
* Unit counters (stream-K: how many partial states of a unit, or of a group
  of its contributors, have arrived) are zeroed when a workspace is made
  and reset by the kernel that used them, so they are zero whenever no
  launch is running. A launch that starts always completes: a fault inside
  a kernel is sticky in CUDA (the context and every workspace in it are
  lost), and a launch the driver refuses never starts. What can still leave counts behind is a write from
  outside into a caller's workspace: :meth:`Plan.rearm` zeroes the counters
  (on the current stream, before the next launch), and a launch call that
  raises re-arms the workspace before the plan's next launch.
"""

from __future__ import annotations

import ctypes
import math
import threading
import warnings
from typing import NamedTuple, Optional

import numpy as np

from . import _cache, _launch
from . import kernels as K
from ._dtypes import KERNEL_TAG
from .schedule import (combine_row_blocks, merge_balanced_tiles, merges_by_launch, num_splits_heuristic,
                       uniform_variant)

__all__ = ["Signature", "Plan", "signature", "get_plan", "aligned_grid"]

_LOG2E = 1.4426950408889634
COUNTER_ALIGN = 256  # bytes: the fp32 slots start on this boundary
_LEGACY = (0, 1)  # handles of the legacy default stream (one stream for the process)
_PTDS = 2  # the per-thread default stream's handle: a different stream in each thread


def _same_stream(a, a_thread, b, b_thread):
    """Whether CuPy stream objects ``a`` (used from thread ``a_thread``) and
    ``b`` (from ``b_thread``) are one CUDA stream: the legacy default stream
    twice, the per-thread default stream from one thread, or one object
    (which holds its handle, so it cannot be reused)."""
    if a.ptr in _LEGACY or b.ptr in _LEGACY:
        return a.ptr in _LEGACY and b.ptr in _LEGACY
    if a.ptr == _PTDS or b.ptr == _PTDS:
        return a.ptr == b.ptr and a_thread == b_thread
    return a is b


class Signature(NamedTuple):
    """The metadata of a call (hashable): it determines validation and the
    launch, everything but the data pointers."""

    dtypes: tuple  # q, k, v
    q: tuple  # (shape, strides in bytes) of each array
    k: tuple
    v: tuple
    out: Optional[tuple]  # (shape, strides), None: allocated by the call
    kv_lens: Optional[tuple]  # ("gpu" | "cpu", shape, dtype, strides, device | None)
    block_table: Optional[tuple]
    aligned: tuple  # q, k, v pointers 16-byte aligned; out pointer 8-byte aligned
    scale: Optional[float]
    schedule: str
    num_ctas: Optional[int]
    tile_size: Optional[int]
    stages: Optional[int]
    ctas_per_sm: Optional[int]
    features: Optional[tuple] = None  # (sinks meta | None, window_left | None, softcap | None)
    min_tiles_per_cta: Optional[int] = None
    merge_balance: Optional[int] = None  # None: the default (kernels.TUNING)
    devices: Optional[tuple] = None  # device of q, k, v and out (None: absent); kv_lens' and block_table's: their meta
    # batch_invariant=True run as split-K (kernels.TUNING["invariant_splits"]): the combine keeps one CTA
    # per unit, so its arithmetic (lanes and loads per thread follow a CTA's rows) never follows the batch
    invariant: bool = False


class UniformScales(tuple):
    """``(k_scale, v_scale)`` from :func:`gpu_fp8_scales` where each is one
    value for every KV head (a float, or a GPU array of shape () or of
    stride 0, broadcast into a ``(heads_kv,)`` array): a plan in head pairs
    takes them (the unit of pair j reads the value, or entry j, which holds
    the same value)."""

    __slots__ = ()


def gpu_fp8_scales(k_scale, v_scale, heads_kv):
    """``(k_scale, v_scale)`` of a GPU fp8 call, each a float (one scale for
    every KV head, passed by value: None is 1) or a float32 GPU array of shape
    ``(heads_kv,)`` (read at launch). Host numbers and arrays are checked
    (finite, > 0); a host array stays on the host (copied at launch, refused
    inside a CUDA graph capture); GPU arrays of shape () or (heads_kv,) are
    used as they are (shape (): broadcast into a new ``(heads_kv,)`` array).
    A :class:`UniformScales` where neither is a per-head array."""
    if (k_scale is None or (type(k_scale) is float and 0.0 < k_scale < math.inf)) and \
            (v_scale is None or (type(v_scale) is float and 0.0 < v_scale < math.inf)):
        return UniformScales((1.0 if k_scale is None else k_scale, 1.0 if v_scale is None else v_scale))
    from ._arrays import to_gpu, where as _where
    from .validation import fp8_scales

    _bind_cupy()  # (this may run before any plan of the process is made)
    out, uniform = [], True
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        if sc is None:
            out.append(1.0)
        elif type(sc) is float and 0.0 < sc < math.inf:  # (the common case, as fp8_scales would take it)
            out.append(sc)
        elif _where(sc) == "gpu":
            x = to_gpu(sc, name)
            check_devices(_cp.cuda.runtime.getDevice(), **{name: x})
            if x.ndim > 1 or (x.ndim == 1 and x.shape != (heads_kv,)) or x.dtype.kind != "f":
                raise (TypeError if x.dtype.kind != "f" else ValueError)(
                    f"{name}: expected floats of shape () or ({heads_kv},), got {x.dtype} {tuple(x.shape)}")
            uniform = uniform and (x.ndim == 0 or heads_kv == 1 or x.strides == (0,))
            if not (x.dtype == np.float32 and x.shape == (heads_kv,) and x.flags.c_contiguous):
                with _relaxed_capture_mode():  # a global-mode capture refuses cudaMalloc otherwise
                    y = _cp.empty((heads_kv,), dtype=_cp.float32)
                    y[...] = x  # one kernel, no temporary (kept by the launch, read by a captured graph)
                x = y
            out.append(x)  # used in place: a captured graph reads its values at replay
        else:  # a number: by value; an array: copied at launch
            arr = fp8_scales(sc, None, heads_kv)[0]
            out.append(float(arr[0]) if np.ndim(sc) == 0 else arr.astype(np.float32))
            uniform = uniform and (np.ndim(sc) == 0 or heads_kv == 1)
    return UniformScales(out) if uniform else tuple(out)


def check_q_lens(q_lens, batch, q_len, check_values):
    """``q_lens`` of a call with ``q_len`` query tokens per sequence, of
    shape ``(batch,)``: on the GPU as int32 (used in place when it is; its
    values read at launch, clamped to ``[0, q_len]`` by the kernel, checked
    here when ``check_values``), or host integers (always checked, copied at
    launch)."""
    from ._arrays import host_ints, to_gpu, where as _where

    gpu = _where(q_lens) == "gpu"
    x = to_gpu(q_lens, "q_lens") if gpu else host_ints(q_lens, "q_lens")
    if gpu:
        _bind_cupy()  # (the first call of a process checks q_lens before it makes a plan)
        check_devices(_cp.cuda.runtime.getDevice(), q_lens=x)
    if tuple(x.shape) != (batch,) or x.dtype.kind not in "iu":
        raise (TypeError if x.dtype.kind not in "iu" else ValueError)(
            f"q_lens: expected integers of shape ({batch},), got {x.dtype} {tuple(x.shape)}")
    if batch and (check_values or not gpu):  # on the given dtype: a cast to int32 could wrap
        from .validation import check_range

        check_range(x, 0, q_len, "q_lens", "q_len")
    return _index_array(x, 0, q_len, "q_lens") if gpu else x


def sinks_meta(x):
    """Signature entry of a GPU sinks array."""
    return (x.shape, x.dtype, x.strides)


def _meta(x):
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return ("cpu", x.shape, x.dtype, x.strides, None)
    return ("gpu", x.shape, x.dtype, x.strides, x.data.device_id)


def signature(q, k, v, out, kv_lens, block_table, scale, schedule, num_ctas, tile_size,
              stages=None, ctas_per_sm=None, features=None, min_tiles_per_cta=None, merge_balance=None):
    """The :class:`Signature` of CuPy arrays (``kv_lens`` / ``block_table``
    CuPy, NumPy or None) and options."""
    qd, kd, vd = q.data, k.data, v.data
    od = None if out is None else out.data
    return Signature(
        (q.dtype, k.dtype, v.dtype), (q.shape, q.strides), (k.shape, k.strides), (v.shape, v.strides),
        None if out is None else (out.shape, out.strides, out.dtype),
        None if kv_lens is None else _meta(kv_lens), None if block_table is None else _meta(block_table),
        (not qd.ptr & 15, not kd.ptr & 15, not vd.ptr & 15, None if od is None else not od.ptr & 7),
        scale, schedule, num_ctas, tile_size, stages, ctas_per_sm, features, min_tiles_per_cta, merge_balance,
        # (a call whose arrays live on another device than the current one finds no plan: the slow
        # path refuses it, naming the array)
        (qd.device_id, kd.device_id, vd.device_id, None if od is None else od.device_id))


def _device_of(x):
    """The device of a CuPy array; None for None, host and other arrays."""
    if x is None or isinstance(x, np.ndarray):
        return None
    return getattr(getattr(x, "data", None), "device_id", None)


def check_devices(device, **arrays):
    """Raises ValueError naming the first GPU array (CuPy; NumPy and None
    are skipped) that lives on another device than ``device``, the current
    one: a kernel launched there would read another device's memory."""
    for name, x in arrays.items():
        d = _device_of(x)
        if d is not None and d != device:
            raise ValueError(f"{name}: the array is on device {d}, the current device is {device} (call under "
                             f"cupy.cuda.Device({d}) or torch.cuda.device({d}), with every array on that device)")


def aligned_grid(units, tiles_per_unit, grid, min_fraction=0.85):
    """For uniform lengths: a grid of at least ``min_fraction * grid`` CTAs
    whose stream-K ranges start and end on unit boundaries (each CTA takes an
    equal share of one unit, or whole units), else ``grid``. A unit boundary
    inside a CTA's range costs a publication and a merge (measured 2-3 us per
    boundary on an H100), more than the few SMs left idle."""
    if units <= 0 or tiles_per_unit <= 0:
        return grid
    if units < grid:
        p = grid // units
        while p > 1 and tiles_per_unit % p:
            p -= 1
        g = units * p
    else:
        per = -(-units // grid)
        if units % per:
            return grid
        g = units // per
    return g if g >= min_fraction * grid else grid


def check_tile_count(batch, unit_tiles, tile, paged):
    """Raises ValueError when ``batch`` sequences of up to ``unit_tiles``
    tiles could hold 2**31 tiles or more: the kernel sums the tiles of every
    sequence in 32 bits (only reachable with a paged cache whose sequences
    share pages, or a cache far past any GPU's memory)."""
    if batch * unit_tiles >= 2**31:
        name = "block_table" if paged else "k"
        raise ValueError(f"{name}: {batch} sequences of up to {unit_tiles} tiles of {tile} tokens may hold "
                         f"{batch * unit_tiles} tiles, expected fewer than 2**31 (the kernel counts them in "
                         f"32 bits); split the batch")


def _kv_strides(meta, itemsize, copy, page_size, name):
    """The element strides (sequence or page, token, head) the kernel gets
    for K or V (``meta``: the signature's (shape, strides)), and whether the
    array is read through a contiguous copy: when ``copy`` already, or when
    a paged cache's (``page_size`` > 0) page stride or page rows reach 2**31
    bytes or run backwards (the loader forms page offsets unsigned, in 32
    bits). The strides of length-1
    (sequence or page, token) axes are 0: such a stride is never needed, and
    the kernel forms (unread, zero-filled) row addresses from it past a
    tile's tokens, which must stay as aligned as the array's start."""
    shape = meta[0]

    def strides(contiguous):
        st = _elem_strides(_contig(shape, itemsize) if contiguous else meta[1], itemsize, 3)
        return tuple(0 if i < 2 and int(shape[i]) == 1 else x for i, x in enumerate(st))

    st = strides(copy)
    if page_size and not _page_strides_fit(st, itemsize, page_size):
        copy, st = True, strides(True)
        if not _page_strides_fit(st, itemsize, page_size):
            raise ValueError(f"{name}: the GPU kernels support pages of under 2 GB, got pages of "
                             f"{abs(st[0]) * itemsize} bytes")
    return st, copy


def _paired_kv_meta(meta):
    """K's or V's (shape, byte strides) read in head pairs: ``(..., heads_kv
    / 2, 128)`` with a head stride of 128 elements (the caller's heads lie 64
    elements apart, kernels.pair_heads)."""
    shape, strides = meta[0], meta[1]
    return (tuple(shape[:-2]) + (int(shape[-2]) // 2, 2 * int(shape[-1])),
            tuple(strides[:-2]) + (2 * int(strides[-2]), int(strides[-1])))


def _pair_rows(shape, strides, itemsize):
    """The row arguments of the ``lean_pair_heads`` kernel for a 64-wide q or
    out of ``shape`` ((batch, heads_q, 64) or (batch, q_len, heads_q, 64))
    and byte ``strides``: (rows, tokens, heads_q, element strides of
    sequence, token, head and element; those of axes of length 1 are 0, as
    they are never stepped over); None where a stride is not a whole number
    of elements (the plan then runs without pairs)."""
    strides = [0 if int(n) == 1 else int(s) for n, s in zip(shape, strides)]  # (never stepped over)
    if any(s % itemsize for s in strides):
        return None
    st = [s // itemsize for s in strides]
    if len(shape) == 3:
        st.insert(1, 0)
    tokens = int(shape[1]) if len(shape) == 4 else 1
    rows = int(shape[0]) * tokens * int(shape[-2])
    return (np.int64(rows), np.int32(tokens), np.int32(shape[-2])) + tuple(np.int64(x) for x in st)


def _page_strides_fit(strides, itemsize, page_size):
    """Whether a paged cache's page stride and a page's rows (``page_size``
    token strides) are non-negative and below 2**31 bytes, as the kernel's
    loader needs (it forms page and row offsets unsigned)."""
    return (0 <= strides[0] and 0 <= strides[1] and strides[0] * itemsize < 2**31
            and strides[1] * itemsize * page_size < 2**31)


def _elem_strides(strides, itemsize, n):
    return [s // itemsize for s in strides[:n]]


class Plan:
    """A launch plan: build with :func:`cupy_lean.plan`, run with
    :meth:`run` (or through :func:`cupy_lean.attention`, which keeps one plan
    per signature).

    Attributes
    ----------
    signature : Signature
        The call metadata the plan was built for.
    spec : cupy_lean.kernels.Spec
        Compile-time parameters of the kernel (dtype, head_dim, query tiles,
        tile size, pipeline stages, paged).
    many_units : bool
        The tile was chosen for a call of many units
        (:func:`cupy_lean.kernels.many_unit_config`) rather than the default
        configuration (only when no tile size, stages or other schedule was
        given).
    varied_lengths_tile : bool
        The tile was chosen for several sequences of lengths the plan
        cannot see (:func:`cupy_lean.kernels.varied_length_tile`: head_dim
        64 with ``kv_lens`` or pages; only when no tile size, stages or
        other schedule was given).
    one_cta_per_unit : bool
        That rule also gave each unit a CTA of its own (``uniform_variant``
        1, not the model's choice).
    grid : int
        CTAs launched (lean: the persistent grid, or units x chunks when the
        plan runs its split-K variant; split/head: units x splits; with
        lanes, all lanes' CTAs).
    lanes : int
        KV-head lanes run side by side (:func:`cupy_lean.kernels.head_lanes`:
        fp8 at head_dim 64 in NHD); 1: none.
    paired : bool
        The call runs in head pairs (:func:`cupy_lean.kernels.pair_heads`:
        fp8 at head_dim 64, an even number of adjacent KV heads, pages of a
        few tokens): ``spec``, ``grid``, ``units`` and the schedule are those
        of a head_dim-128 call of ``heads_kv / 2`` KV heads whose query heads
        are padded by zeros; ``signature``, ``meta`` and the arrays the plan
        takes and returns stay the caller's. A launch given per-head
        ``k_scale`` / ``v_scale`` arrays runs a plan without pairs, made at
        its first such launch (its workspaces are its own, not counted in
        ``cache_bytes``).
    uniform_variant : int
        0: the plan runs its schedule as asked; n >= 1: a lean plan of equal
        lengths runs split-K with n chunks per unit instead
        (:func:`cupy_lean.schedule.uniform_variant`).
    tile_us : float
        One unit's tile of K and V over the device's DRAM bandwidth, the
        unit of that model's time (0 where no equal-length variant could
        run).
    workspace_bytes : int
        Size of one workspace: unit (and merge group) counters, then fp32
        partial-state slots, then (``merge_launch``) two ints per unit.
    cache_bytes : int
        GPU bytes the plan's own workspaces hold, the count the cache caps
        (``_cache.MAX_PLAN_BYTES``): the eager workspace and the spare kept
        zeroed for a capture, each ``max(workspace_bytes, 256)``, both
        allocated by the first eager launch and counted at that size from
        the plan's creation (constant). 0 with a caller's ``workspace=``.
        Not counted: the workspaces of captured launches (the graphs',
        freed only with the plan).
    merge_launch : bool
        Stream-K with few units for the grid: partial units are merged by the
        combine launch, not by their last contributor in the kernel.
    runtime_split : bool
        Each launch may run split-K in one wave instead of stream-K when the
        lengths on the GPU favour it
        (``cupy_lean.schedule.runtime_split_chunks``): with ``merge_launch``,
        or without it for sequences of varied lengths where
        ``kernels.TUNING["runtime_split_in_kernel"]`` is on (each unit's
        chunks then merged by its last arriving chunk).
    split_scale, split_slack_tiles : int
        With ``runtime_split``, the rule's ``split_scale`` and
        ``split_slack_tiles``: split-K is run when its busiest CTA streams
        at most ``split_scale`` times stream-K's busiest CTA's tiles plus
        ``split_slack_tiles`` tiles (``kernels.launch_split_rule``: 1 and
        one tile with the merge launch, 2 and no tile with the in-kernel
        merge, by default); 0 and 0 without it.
    split_cap_tiles : int
        With ``runtime_split``, the rule's cap: the factor lets the split's
        busiest CTA stream at most this many tiles more than stream-K's
        (``split_slack_tiles`` come on top)
        (``kernels.launch_split_cap``: the in-kernel merge's
        ``kernels.TUNING["runtime_split_in_kernel_cap_bytes"]`` in tiles;
        2**30, none, with the merge launch); 0 without it.
    pdl : bool
        Launched with programmatic dependent launch (sm_90 and newer,
        ``kernels.TUNING["pdl"]``): each kernel may be scheduled during the
        previous one's tail in the stream and waits for it before any memory
        access.
    """

    def __init__(self, sig: Signature, meta, *, workspace=None, pair=True):
        import cupy as cp

        self.signature = sig
        self.meta = meta
        self.kv_layout = "NHD"  # axis order of the k, v that run() takes (set by cupy_lean.plan)
        m = meta
        B, D, Hkv, g = m.batch, m.head_dim, m.heads_kv, m.group
        f_sinks, f_window, f_softcap, f_kv8 = (tuple(sig.features or ()) + (None,) * 4)[:4]
        self.q_len = int(sig.q[0][1]) if len(sig.q[0]) == 4 else 0  # 0: q of 3 dimensions
        bits = ((K.FEATURES["sinks"] if f_sinks is not None else 0)
                | (K.FEATURES["softcap"] if f_softcap is not None else 0)
                | (K.FEATURES["window"] if f_window is not None else 0)
                | (K.FEATURES["qlen"] if self.q_len else 0)
                | (K.FP8_FEATURES[f_kv8] if f_kv8 is not None else 0))
        self.kv8 = f_kv8  # "e4m3" | "e5m2": an fp8 cache (uint8 storage)
        self.has_sinks = f_sinks is not None
        rows = g * max(self.q_len, 1)  # query rows of a unit
        # a lean plan of equal lengths (a dense cache without kv_lens, or one sequence: any
        # layout, any kv_lens) with no stream-K option may run another decomposition (the
        # equal-length variant, below; one CTA per unit by many_unit_config)
        self.equal_lengths = (sig.kv_lens is None and not m.paged) or B == 1
        # an option that fixes the stream-K grid or ranges (merge_balance 0 is the default: no floor);
        # such a plan keeps stream-K and its in-kernel merge
        stream_k_knob = (sig.num_ctas is not None or sig.ctas_per_sm is not None
                         or sig.min_tiles_per_cta is not None or bool(sig.merge_balance))
        variants_ok = (sig.schedule == "lean" and self.equal_lengths and K.TUNING["uniform_variants"]
                       and not stream_k_knob)
        # head pairs (kernels.pair_heads): an fp8 cache at head_dim 64 of an even number of adjacent KV heads
        # runs as a head_dim-128 call of heads_kv / 2 heads and groups of 2 x group query heads, each query head
        # padded by zeros to the half of its KV head in the pair (launch: _pair_copy); K and V as they are, with
        # a head stride of 128 elements. The caller's shapes stay the plan's (signature, meta, out_shape)
        D0 = D
        isz = sig.dtypes[0].itemsize
        out_rows = None if sig.out is None else _pair_rows(sig.out[0], sig.out[1], isz)
        self.paired = bool(pair) and K.pair_heads(
            f_kv8, D, Hkv, rows, sig.k[1], sig.v[1], m.page_size if m.paged else 0, sig.schedule,
            stream_k_knob or sig.tile_size is not None or sig.stages is not None, sig.invariant) \
            and _pair_rows(sig.q[0], sig.q[1], isz) is not None and (sig.out is None or out_rows is not None)
        sig_k, sig_v = sig.k, sig.v
        if self.paired:
            D, Hkv, g = 2 * D, Hkv // 2, 2 * g
            rows = g * max(self.q_len, 1)
            sig_k, sig_v = (_paired_kv_meta(x) for x in (sig.k, sig.v))
        self._unpaired = None  # the plan without pairs, for launches with per-head fp8 scales (made when needed)
        smem_limit = K.device_smem_limit()
        # head lanes (kernels.FEATURES["head_lanes"]): an fp8 cache at head_dim 64 whose neighbouring KV
        # heads' rows are adjacent (64 bytes apart) runs as `lanes` copies of one schedule side by side, lane
        # l taking KV heads l, lanes + l, ...; each planned here as a call of heads_kv / lanes heads on
        # SMs / lanes SMs; the launch interleaves their CTAs
        all_sms = K.device_sm_count()
        self.lanes = lanes = K.head_lanes(f_kv8, D, Hkv, sig_k[1], sig_v[1], sig.schedule, stream_k_knob,
                                          sig.invariant, all_sms)
        if lanes > 1:
            bits |= K.FEATURES["head_lanes"]
        Hkv_h = Hkv // lanes  # KV heads of a lane
        sms = all_sms // lanes  # the SMs a lane's schedule is made for

        def spec_at(tile):  # this call's spec at a tile size (None: the default)
            return K.make_spec(KERNEL_TAG[sig.dtypes[0]], D, rows, m.paged, tile, sig.stages, smem_limit=smem_limit,
                               features=bits, page_size=m.page_size if m.paged else None)

        tile_size, self.many_units, self.one_cta_per_unit = sig.tile_size, False, False
        self.varied_lengths_tile = False
        if tile_size is None and sig.stages is None and sig.schedule == "lean" and B * Hkv_h:
            unit_tokens = m.capacity if f_window is None else min(m.capacity, f_window + max(self.q_len, 1))
            many = K.many_unit_config(D, rows, B * Hkv_h, unit_tokens, sms, m.paged,
                                      sig.kv_lens is None, bits, lambda t: K.kernels_for(spec_at(t)).occupancy,
                                      one_cta_per_unit=variants_ok)
            if many is not None:
                (tile_size, self.one_cta_per_unit), self.many_units = many, True
            elif not self.equal_lengths:  # several sequences whose lengths the plan cannot see
                tile_size = K.varied_length_tile(D, rows, bits, lambda t: K.kernels_for(spec_at(t)).occupancy,
                                                 paged=m.paged)
                self.varied_lengths_tile = tile_size is not None
        spec = spec_at(tile_size)
        kern = K.kernels_for(spec)
        self.spec, self.kernels = spec, kern
        self.device = cp.cuda.runtime.getDevice()
        tile = spec.tile
        units = B * Hkv_h  # (of a lane)
        self._lane_heads = Hkv_h
        max_unit_tiles = -(-(m.capacity if f_window is None else min(m.capacity, f_window + max(self.q_len, 1)))
                           // tile)
        slot_stride = -(-rows * (D + 2) // 4) * 4
        check_tile_count(B, max_unit_tiles, tile, m.paged)
        # units and grid: of the whole launch; lanes: each lane has its share of them (_lane_units, _lane_grid)
        self.units, self.tile, self.max_unit_tiles = units * lanes, tile, max_unit_tiles
        self._lane_units = units
        self.num_sms = kern.num_sms
        self.host_lens = sig.kv_lens is not None and sig.kv_lens[0] == "cpu"
        self.aligned_grid_applied = False
        self.merge_balance = K.TUNING["merge_balance"] if sig.merge_balance is None else sig.merge_balance
        # equal lengths (a dense cache without kv_lens, or one sequence) and no stream-K knob
        # given: the lean plan may run its split-K variant (0: stream-K; n >= 1: n chunks per
        # unit), by schedule.uniform_variant's model (batches of several sequences with kv_lens
        # or pages keep stream-K: the plan cannot see their lengths, docs/design.md).
        # The variant chooses the decomposition; when it keeps stream-K, aligned_grid below
        # still lays that grid on unit boundaries where it can.
        self.uniform_variant, self.tile_us = 0, 0.0
        self.merge_launch = False  # STREAM_K: partial units merged by the combine launch (else in the kernel)
        if variants_ok and units * max_unit_tiles > 0:
            # one unit's tile (K and V of `tile` tokens; fp8: 1 byte per element) over the DRAM bandwidth
            kv_item = 1 if f_kv8 is not None else sig.dtypes[0].itemsize
            hbm = kern.hbm_bytes_per_us / lanes  # a lane's share
            self.tile_us = 2 * tile * D * kv_item / hbm
            self.uniform_variant = 1 if self.one_cta_per_unit else uniform_variant(
                units, max_unit_tiles, kern.ctas_per_sm * sms, sms, tile_us=self.tile_us,
                state_bytes=4 * slot_stride, unit_rows=rows, head_dim=D, threads=spec.threads,
                **K.uniform_model_args(D, sms, hbm))
        if sig.schedule == "lean" and not self.uniform_variant:
            self.ctas_per_sm = sig.ctas_per_sm or kern.ctas_per_sm
            full = sig.num_ctas if sig.num_ctas is not None else self.ctas_per_sm * sms
            grid = max(1, min(full, max(units * max_unit_tiles, 1)))
            if sig.kv_lens is None and units * max_unit_tiles:
                # uniform lengths: the kernel's range floor is known here, so the grid
                # (and its unit alignment below) follows it
                floor = max(sig.min_tiles_per_cta or 1,
                            merge_balanced_tiles(max_unit_tiles, self.merge_balance, 16 * spec.m_tiles, tile)
                            if self.merge_balance else 1)
                if floor > 1:
                    grid = max(1, min(grid, units * max_unit_tiles // floor))
            if sig.num_ctas is None and sig.kv_lens is None:
                ag = aligned_grid(units, max_unit_tiles, grid)
                self.aligned_grid_applied = ag != grid
                grid = ag
            decomp, ns = K.Decomposition.STREAM_K, 1
            slots = 2 * grid
            # few units for the grid (pieces of a unit ~ grid / units): their partial states are
            # merged by a combine launch, rows spread over CTAs, instead of by each unit's last
            # contributor alone (kernels.TUNING["merge_launch_pieces"]; not with a stream-K knob given)
            self.merge_launch = not stream_k_knob and merges_by_launch(grid, units,
                                                                       K.TUNING["merge_launch_pieces"])
        else:
            self.ctas_per_sm = None
            if self.uniform_variant:
                ns = self.uniform_variant
            elif sig.schedule == "head":
                ns = 1
            elif sig.num_ctas is not None:
                ns = max(1, sig.num_ctas // max(units, 1))
            else:
                ns = num_splits_heuristic(units, max_unit_tiles, kern.num_sms)
            grid = units * ns
            decomp = K.Decomposition.SPLIT_K
            slots = grid if ns > 1 else 0
        self.grid, self._lane_grid, self.decomposition, self.num_splits = grid * lanes, grid, decomp, ns
        self.slot_stride = slot_stride
        # stream-K: a counter per unit, then one per slot for the groups of
        # the two-level merge (schedule.merge_group_size)
        counters = units + (slots if decomp == K.Decomposition.STREAM_K else 0)
        # (lanes: each lane's; lane l's counters and slots follow lane l - 1's)
        self.lane_counters, self.lane_slots = counters, slots
        self.counter_bytes = -(-max(counters * lanes, 1) * 4 // COUNTER_ALIGN) * COUNTER_ALIGN
        # merge_launch: each unit's pieces and first slot (two ints), after the slots
        self.meta_bytes = 8 * units * lanes if self.merge_launch else 0
        if slots * slot_stride >= 2**31:  # the kernel's merge indexes the slots in 32 bits
            per_cta = 2 if decomp == K.Decomposition.STREAM_K else 1  # partial states per CTA
            if sig.invariant:
                raise ValueError(f"batch_invariant: {units} units x {ns} chunks need {slots} partial states of "
                                 f"{slot_stride} floats, 2**31 floats or more (the kernels index them in 32 "
                                 f"bits); call with fewer sequences, or set kernels.TUNING['invariant_splits'] "
                                 f"lower (0: one CTA per unit, no partial states) for every call")
            what = "num_ctas" if sig.num_ctas is not None else f"schedule={sig.schedule!r}"
            raise ValueError(f"{what}: a grid of {grid} CTAs needs {slots} partial states of {slot_stride} "
                             f"floats, 2**31 floats or more (the kernels index them in 32 bits); expected at "
                             f"most {(2**31 - 1) // (per_cta * slot_stride)} CTAs for this shape")
        self.workspace_bytes = self.counter_bytes + lanes * slots * slot_stride * 4 + self.meta_bytes
        self.threads, self.smem = spec.threads, spec.smem_bytes
        self._attn_ptr, self._combine_ptr = kern.attn.kernel.ptr, kern.combine.kernel.ptr

        # Strides the kernel sees: those of the arrays, or of the contiguous
        # copies made for arrays the kernel cannot read in place.
        isz = sig.dtypes[0].itemsize
        self.copy_q = not _aligned_layout(sig.q, sig.aligned[0], 16)
        self.copy_k = not _aligned_layout(sig.k, sig.aligned[1], 16)
        self.copy_v = not _aligned_layout(sig.v, sig.aligned[2], 16)
        out_shape = (B, self.q_len, m.heads_q, D0) if self.q_len else (B, m.heads_q, D0)
        self.out_shape, self.lse_shape = out_shape, out_shape[:-1]
        self.copy_out = sig.out is not None and not _aligned_layout(sig.out[:2], sig.aligned[3], 8)
        q_shape, k_out_shape = sig.q[0], out_shape  # (of the q and out the kernel reads and writes)
        if self.paired:  # q padded into a contiguous (..., heads_q, 128) temporary, out written into another
            q_shape = k_out_shape = out_shape[:-1] + (D,)
            self.copy_q = self.copy_out = True
            self._pair_shape = k_out_shape
            self._pair_fn = K.util_function("lean_pair_heads")
            self._pair_q_args = _pair_rows(sig.q[0], sig.q[1], isz)
            self._pair_out_args = _pair_rows(out_shape, sig.out[1] if sig.out is not None else _contig(out_shape, isz),
                                             isz)
        qs = _elem_strides(_contig(q_shape, isz) if self.copy_q else sig.q[1], isz, 3 if self.q_len else 2)
        ksz, vsz = sig.dtypes[1].itemsize, sig.dtypes[2].itemsize  # 1 for an fp8 cache (uint8 storage)
        ks, self.copy_k = _kv_strides(sig_k, ksz, self.copy_k, m.page_size if m.paged else 0, "k")
        vs, self.copy_v = _kv_strides(sig_v, vsz, self.copy_v, m.page_size if m.paged else 0, "v")
        os_ = _elem_strides(sig.out[1] if (sig.out is not None and not self.copy_out)
                            else _contig(k_out_shape, isz), isz, 3 if self.q_len else 2)
        if self.q_len:  # (per sequence, per query token, per head)
            (q_sb, q_st, q_sh), (o_sb, o_st, o_sh) = qs, os_
            qs, os_ = (q_sb, q_sh), (o_sb, o_sh)
        else:
            q_st = o_st = 0
        # Index arrays the kernel reads directly: int32 on the GPU with unit
        # stride on the last axis (the kernel reads kv_lens[b]: any stride for
        # one sequence, a broadcast one copied); others are converted per call.
        self.lens_direct = (sig.kv_lens is not None and sig.kv_lens[0] == "gpu"
                            and sig.kv_lens[2] == np.int32 and B > 0 and (sig.kv_lens[3] == (4,) or B == 1))
        tb = sig.block_table
        self.table_direct = (tb is not None and tb[0] == "gpu" and tb[2] == np.int32
                             and (tb[1][1] <= 1 or tb[3][1] == 4))
        if tb is None:
            bt_sb = 0
        elif self.table_direct:
            bt_sb = tb[3][0] // 4
        else:
            bt_sb = tb[1][1]  # contiguous int32 copy
        prm = K.Params()
        prm.q_sb, prm.q_sh = qs
        prm.q_len, prm.q_st, prm.o_st = max(self.q_len, 1), q_st, o_st
        prm.k_sb, prm.k_st, prm.k_sh = ks
        prm.v_sb, prm.v_st, prm.v_sh = vs
        prm.o_sb, prm.o_sh = os_
        prm.bt_sb = bt_sb
        prm.batch, prm.heads_kv, prm.group, prm.capacity = B, Hkv_h, g, m.capacity
        # lanes: the kernel maps a lane's heads to the call's and finds its share of the workspace
        prm.lanes, prm.lane_counters, prm.lane_slots, prm.lane_meta = lanes, counters, slots * slot_stride, 2 * units
        prm.lane_magic, prm.lane_shift = K.index_divisor(lanes, "lanes")
        prm.page_size, prm.num_pages = max(m.page_size, 1), m.num_pages
        prm.page_magic, prm.page_shift = K.index_divisor(prm.page_size)
        prm.decomposition, prm.num_splits = int(decomp), ns
        # merge launch: the kernel may run split-K in one wave when a launch's lengths favour it
        # the launch-time split: a default stream-K plan with the merge launch, or (TUNING
        # "runtime_split_in_kernel") one of varied lengths without it, whose chunks are then merged in the
        # kernel (equal lengths: uniform_variant's model chose the decomposition on the host)
        self.runtime_split = decomp == K.Decomposition.STREAM_K and K.launch_time_split(
            self.merge_launch, stream_k_knob, not self.equal_lengths)
        self.split_scale, self.split_slack_tiles, self.split_cap_tiles = 0, 0, 0
        if self.runtime_split:
            kv_isz = 1 if f_kv8 is not None else sig.dtypes[0].itemsize
            self.split_scale, self.split_slack_tiles = K.launch_split_rule(self.merge_launch, tile, D, kv_isz)
            self.split_cap_tiles = K.launch_split_cap(self.merge_launch, tile, D, kv_isz)
        prm.runtime_split, prm.split_slack = self.split_scale, self.split_slack_tiles  # (0, 0): stream-K always
        prm.split_cap = self.split_cap_tiles
        prefetch_key = "split_prefetch_paged" if m.paged else "split_prefetch"
        K._check_tuning_value(prefetch_key, K.TUNING[prefetch_key])
        prm.split_prefetch = int(K.TUNING[prefetch_key]) if self.runtime_split else 0
        prm.scale_log2 = m.scale * _LOG2E
        prm.slot_stride = slot_stride
        prm.window_left = -1 if f_window is None else f_window
        prm.min_tiles_per_cta = sig.min_tiles_per_cta or 1
        prm.merge_balance = self.merge_balance
        if f_softcap is not None:
            prm.softcap_scale = m.scale / f_softcap
            prm.softcap_log2 = f_softcap * _LOG2E
        self._params = prm
        self._ptrs = K.pointer_view(prm)  # a launch sets the pointers with one slice assignment
        self._param_arr = (ctypes.c_void_p * 1)(ctypes.addressof(prm))
        self._param_addr = ctypes.addressof(self._param_arr)
        self._combine = (decomp == K.Decomposition.SPLIT_K and ns > 1) or self.merge_launch
        # sm_90+: both launches may start while the previous kernel in the stream finishes (its tail
        # overlaps their launch; the kernels wait for it before touching memory)
        self.pdl = bool(K.TUNING["pdl"] and kern.pdl and _launch.available())
        self._attn_launch = self._combine_launch = None
        if self.pdl:
            self._attn_launch = _launch.Launcher(self._attn_ptr, spec.threads, spec.smem_bytes, self._param_addr)
            self._combine_launch = _launch.Launcher(self._combine_ptr, spec.threads, 0, self._param_addr)
        # CTAs per unit of the combine launch (each merges a share of the unit's rows); stream-K: the
        # pieces of a unit of average length
        if not self._combine:
            self.combine_blocks = 0
        elif sig.invariant:  # the combine's arithmetic must not follow the batch
            self.combine_blocks = 1
        else:
            self.combine_blocks = combine_row_blocks(max(units, 1), rows, sms,
                                                     -(-grid // units) + 1 if self.merge_launch else ns, D,
                                                     spec.threads)
        # The common case: q, k, v and out used in place, kv_lens int32 on the
        # GPU, block_table (if any) int32 on the GPU.
        self._direct = (not (self.copy_q or self.copy_k or self.copy_v or self.copy_out)
                        and self.lens_direct and (tb is None or self.table_direct))
        _bind_cupy()
        retry_deferred_frees()
        if workspace is not None and _capture_id(_cp.cuda.get_current_stream()) is not None:
            raise ValueError("workspace: plan(workspace=...) zeroes the workspace's counters when the plan is made, "
                             "and inside a CUDA graph capture that zeroing would run only at replay; make the plan "
                             "before the capture begins")
        self._lock = threading.Lock()
        self._graph_workspaces = []  # workspaces (and temporaries) of captured launches
        self.captured = False
        self._user_ws = workspace is not None
        self._ws = None
        self._stream = None  # stream of the previous eager launch (held: its handle cannot be reused)
        self._stream_thread = None  # the thread of that launch (the per-thread default stream is per thread)
        self._last_ev = None  # recorded after the last eager use when that was on a per-thread default stream
        self._ptds_ev = None  # the event object used for it
        if workspace is not None:
            self._ws = _check_workspace(workspace, self.workspace_bytes)
            self._ws[:self.counter_bytes].fill(0)
            # the first launch, on whatever stream, is ordered after this zeroing
            self._stream, self._stream_thread = _cp.cuda.get_current_stream(), threading.get_ident()
            self._note_eager_use(self._stream)
        self._ws_stream = self._ws_thread = None  # the stream (and thread) the eager workspace was allocated on
        # eager workspaces set aside when their stream began a capture: the jobs of _free_after_use
        self._set_aside = []
        self._spare_ev = None  # recorded after the spare's zeroing
        self._cached = False  # set by get_plan: the cache holds this plan
        self._spare = None  # zeroed workspace for the next captured launch
        self._rearm = set()  # workspace addresses whose counters are zeroed before their next launch
        self._capture_id = self._capture_ws = None  # (capture, stream) in progress and its workspace

    # ------------------------------------------------------------ reporting

    def _combine_text(self):
        if self.combine_blocks > 1:
            return f"{self.combine_blocks} CTAs per unit (its rows split over them)"
        return "one CTA per unit"

    def describe(self) -> str:
        """What launches: the spec, the grid and the decomposition."""
        s, m = self.signature, self.meta
        lines = [
            f"plan: {s.schedule} schedule, {s.dtypes[0]}, batch {m.batch}, heads {m.heads_q}/{m.heads_kv} "
            f"(group {m.group}), head_dim {m.head_dim}, "
            + (f"paged (page_size {m.page_size}, {m.num_pages} pages, {m.max_pages} per sequence)"
               if m.paged else f"dense (seqlen {m.seqlen})"),
            f"  kernel: {self.spec.name} (tile {self.spec.tile} tokens, {self.spec.stages} stages, "
            f"{self.threads} threads, {self.smem} B shared memory"
            + ("; the tile of many units, kernels.many_unit_config)" if self.many_units else
               "; the tile of sequences of varied lengths, kernels.varied_length_tile)" if self.varied_lengths_tile
               else ")"),
            f"  device {self.device}: {self.num_sms} SMs, occupancy {self.kernels.occupancy} CTA/SM"
            + ("; programmatic dependent launch (each kernel waits for the one before it in the stream)"
               if self.pdl else ""),
            f"  units {self.units} (batch x heads_kv" + (" / 2" if self.paired else "")
            + f"), up to {self.max_unit_tiles} tiles per unit",
        ]
        if self.paired:
            lines.append(f"  head pairs: KV heads 2j and 2j + 1 read as one head of head_dim {2 * m.head_dim} (fp8 rows of "
                         f"{m.head_dim} bytes side by side), a call of {m.heads_kv // 2} KV heads and "
                         f"{2 * m.group} query heads each, q padded by zeros and each output row's half copied out "
                         f"(kernels.pair_heads); per-head k_scale / v_scale arrays launch the plan without pairs")
        if self.lanes > 1:
            L = self.lanes
            lines.append(f"  head lanes: {L} lanes side by side (lane l: KV heads l, {L} + l, ...), CTAs "
                         f"{L}c .. {L}c + {L - 1} on neighbouring heads; each lane: units {self._lane_units} (batch "
                         f"x heads_kv / {L}), up to {self.max_unit_tiles} tiles per unit, {self._lane_grid} CTAs of "
                         f"the grid below planned for {self.num_sms // L} SMs")
        if self.uniform_variant:
            why = "one sequence" if m.batch == 1 else "every sequence has the same length"
            lines.append(f"  grid: {self.grid} CTAs = {self.units} units x {self.num_splits} chunks ({why}: "
                         f"the lean plan's split-K variant, "
                         + ("one CTA per unit by cupy_lean.kernels.many_unit_config)" if self.one_cta_per_unit
                            else "by the streaming model of cupy_lean.schedule.uniform_variant)")
                         + (f"; then a combine launch of {self._combine_text()}" if self.num_splits > 1 else ""))
        elif s.schedule == "lean":
            note = " (aligned to unit boundaries for uniform lengths)" if self.aligned_grid_applied else ""
            lines.append(f"  grid: {self.grid} persistent CTAs{note}; {self.ctas_per_sm} CTA/SM requested"
                         + (f", num_ctas={s.num_ctas}" if s.num_ctas is not None else "")
                         + (f", at most one CTA per {s.min_tiles_per_cta} tiles" if s.min_tiles_per_cta else "")
                         + (f", ranges of at least ceil(sqrt({self.merge_balance} x longest unit's tiles x "
                            f"{16 * self.spec.m_tiles} rows / {self.spec.tile})) tiles (merge balance)"
                            if self.merge_balance else "")
                         + "; each CTA takes an equal share (+-1 tile) of all tiles, derived on the GPU "
                           "from kv_lens at run time"
                         + (f"; partial units merged by a combine launch of {self._combine_text()} (few "
                            f"units for the grid)" if self.merge_launch else
                            "; partial units merged by their last contributor")
                         + (f"; a launch whose lengths favour it runs split-K in one wave instead "
                            f"(its busiest CTA at most "
                            + ("" if self.split_scale == 1 else f"{self.split_scale} x ")
                            + f"stream-K's busiest CTA's tiles + {self.split_slack_tiles} tile(s)"
                            + ("" if self.split_cap_tiles >= 1 << 30 or self.split_scale == 1 else
                               f", the factor adding at most {self.split_cap_tiles} tile(s)")
                            + "; "
                            f"cupy_lean.schedule.runtime_split_chunks, decided on the GPU)"
                            + ("" if self.merge_launch else ", its chunks merged the same way")
                            if self.runtime_split else ""))
        else:
            lines.append(f"  grid: {self.grid} CTAs = {self.units} units x {self.num_splits} splits"
                         + (f"; then a combine launch of {self._combine_text()}" if self.num_splits > 1 else ""))
        if s.features is not None:
            f = s.features
            lines.append("  features: " + ", ".join(x for x in (
                "sinks" if f[0] is not None else "", f"window_left={f[1]}" if f[1] is not None else "",
                f"softcap={f[2]}" if f[2] is not None else "",
                f"fp8 {self.kv8} K/V" if self.kv8 is not None else "") if x))
        lines.append(f"  workspace: {self.workspace_bytes} bytes ({self.counter_bytes} of counters, "
                     f"{(self.workspace_bytes - self.counter_bytes - self.meta_bytes) // (4 * self.slot_stride)} "
                     f"partial-state slots of {self.slot_stride * 4} bytes"
                     + (f", {self.meta_bytes} of unit records for the combine launch)" if self.meta_bytes else ")"))
        return "\n".join(lines)

    def __repr__(self):
        return f"<cupy_lean.Plan {self.spec.name} {self.signature.schedule} grid={self.grid}>"

    # ------------------------------------------------------------ launching

    def _drop_pdl(self, exc):
        """The driver refused a programmatic launch: warn once and launch
        this plan plainly from now on (the kernels' wait is then a no-op)."""
        self._attn_launch = self._combine_launch = None
        self.pdl = False
        warnings.warn(f"cupy_lean: programmatic dependent launch refused by the driver ({exc}); this plan "
                      f"launches without it from now on (kernels.TUNING['pdl'] = False turns it off)",
                      RuntimeWarning, stacklevel=4)

    def rearm(self):
        """Zero the unit counters of the plan's eager workspace (its own or
        the caller's ``workspace=``) on CuPy's current stream, ordered after
        the plan's previous launch and before its next one, as a launch on
        this stream would be. The counters are zero after every completed
        launch; call this only when something outside the plan may have
        written into that workspace (a caller's ``workspace=`` reused for
        other data), and outside a CUDA graph capture (a captured zeroing
        would run only at replay). The workspaces of captured launches are
        the graphs'; nothing outside writes them."""
        stream = _cp.cuda.get_current_stream()
        if _capture_id(stream) is not None:
            raise RuntimeError("rearm: CuPy's current stream is capturing a CUDA graph, where the zeroing would run "
                               "only at replay; call rearm() outside the capture")
        with self._lock:
            if self._ws is None:
                return
            if self._order_after_previous(stream, threading.get_ident(), _cp):
                return  # the plan's own workspace was set aside: the next launch takes a fresh, zeroed one
            self._ws[:self.counter_bytes].fill(0)
            self._rearm.discard(self._ws.data.ptr)
            self._note_eager_use(stream)

    def _note_eager_use(self, stream):
        """After work on the eager workspace queued on ``stream`` by this
        thread: on a per-thread default stream, an event that another thread
        (which cannot queue work on this thread's stream) can wait for."""
        if stream.ptr == _PTDS:
            if self._ptds_ev is None:
                self._ptds_ev = _cp.cuda.Event(block=False, disable_timing=True)
            self._ptds_ev.record(stream)
            self._last_ev = self._ptds_ev


    def run(self, q, k, v, *, kv_lens=None, block_table=None, out=None, lse=None, return_lse=False, sinks=None,
            q_lens=None, k_scale=None, v_scale=None):
        """Launch on CuPy's current stream with new data of the planned
        signature (same shapes, strides, dtypes and alignment).

        Parameters are those of :func:`cupy_lean.attention`; ``lse`` is an
        optional float32 ``(batch, heads_q)`` array (``(batch, q_len,
        heads_q)`` for a 4-D ``q``) to write the log-sum-exp into (implies
        ``return_lse``). Returns ``out`` or ``(out, lse)``. What the plan
        fixed stays fixed: the window, the soft-cap, the fp8 format, and
        whether there are sinks. So ``sinks`` (their values, read per call)
        must be given exactly when the plan was made with ``sinks=``;
        ``q_lens`` applies to plans of a 4-D ``q``; ``k_scale`` /
        ``v_scale`` to plans of an fp8 cache.

        Raises
        ------
        ValueError
            When an array does not match the plan's signature (the message
            names the field, what was planned and what was given), or the
            current device is not the plan's.
        """
        from ._arrays import foreign_capture_state, host_ints, refuse_immutable, to_cpu, to_gpu, torch_views, where

        current = _cp.cuda.runtime.getDevice()
        refuse_immutable(out, "out")
        refuse_immutable(lse, "lse")
        if current != self.device:
            raise ValueError(f"device: the plan was made on device {self.device}, the current device is {current} "
                             f"(run it under cupy.cuda.Device({self.device}))")

        if self.kv8 is not None:  # PyTorch float8 K/V: their uint8 storage
            from ._arrays import torch_fp8_storage

            k, v, _ = torch_fp8_storage(k, v, self.kv8)
        # PyTorch CUDA tensors on CuPy's device and stream: viewed from their pointers
        views = torch_views((q, k, v, out, lse, kv_lens, block_table, sinks, q_lens, k_scale, v_scale),
                            lambda: current)
        if views is not None:
            q, k, v, out, lse, kv_lens, block_table, sinks, q_lens, k_scale, v_scale = views
        cap = foreign_capture_state(q, k, v, out)  # one query of the capture state for the call's arrays
        q, k, v = to_gpu(q, "q", cap), to_gpu(k, "k", cap), to_gpu(v, "v", cap)
        if self.kv_layout == "HND" and k.ndim == v.ndim == 4:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if out is not None:
            out = to_gpu(out, "out", cap, output=True)
        # index arrays as plan() takes them: GPU ones as CuPy views; host ones (NumPy, lists, CPU
        # tensors) as NumPy, kv_lens kept on the host, a block_table checked (with host kv_lens) and then
        # copied to the GPU
        host_table = None
        if kv_lens is not None:
            kv_lens = to_gpu(kv_lens, "kv_lens", cap) if where(kv_lens) == "gpu" else host_ints(kv_lens, "kv_lens")
        if block_table is not None:
            if where(block_table) == "gpu":
                block_table = to_gpu(block_table, "block_table", cap)
            else:
                host_table = host_ints(block_table, "block_table")
                block_table = to_gpu(host_table, "block_table", cap)  # (refused inside a capture)
        s = self.signature
        feats = None
        if s.features is not None:
            if (sinks is None) != (s.features[0] is None):
                raise ValueError(f"sinks: the plan was made {'with' if s.features[0] else 'without'} sinks, "
                                 f"got {'none' if sinks is None else 'sinks'}")
            if sinks is not None:
                if where(sinks) != "gpu":  # host values (NumPy, a list, a CPU tensor): checked as attention()
                    from .validation import check_sink_values  # checks them, then copied

                    sinks = to_cpu(sinks, "sinks")
                    check_sink_values(sinks)
                    # copied as the plan's sinks were (plan() copies host sinks as float32; GPU ones keep theirs)
                    sinks = np.ascontiguousarray(sinks, dtype=s.features[0][1])
                sinks = to_gpu(sinks, "sinks", cap)
                check_devices(current, sinks=sinks)
            feats = (None if sinks is None else sinks_meta(sinks),) + tuple(s.features[1:])
        elif sinks is not None:
            raise ValueError("sinks: the plan was made without sinks")
        got = signature(q, k, v, out, kv_lens, block_table, s.scale, s.schedule, s.num_ctas, s.tile_size,
                        s.stages, s.ctas_per_sm, feats, s.min_tiles_per_cta, s.merge_balance)
        if got != s:
            check_devices(current, q=q, k=k, v=v, out=out, kv_lens=kv_lens, block_table=block_table)
            for name in Signature._fields:
                a, b = getattr(s, name), getattr(got, name)
                if a != b:
                    raise ValueError(f"{name}: the plan was made for {a}, got {b}")
        if self.host_lens:
            _check_host_lens(self.meta, kv_lens, host_table)
        if lse is not None:
            lse = to_gpu(lse, "lse", cap, output=True)
            if not self._lse_ok(lse):
                check_devices(current, lse=lse)
                raise ValueError(f"lse: expected a C-contiguous float32 array of shape "
                                 f"{self.lse_shape}, got {lse.dtype} {lse.shape} "
                                 f"with strides {lse.strides}")
        if q_lens is not None:
            if not self.q_len:
                raise ValueError("q_lens: needs a plan for q of shape (batch, q_len, heads_q, head_dim)")
            q_lens = check_q_lens(q_lens, self.meta.batch, self.q_len, False)
        scales = None
        if self.kv8 is not None:
            scales = gpu_fp8_scales(k_scale, v_scale, self.meta.heads_kv)
        elif k_scale is not None or v_scale is not None:
            raise ValueError("k_scale, v_scale: the plan was made for a cache that is not fp8")
        res_out, res_lse = self._launch(q, k, v, kv_lens, block_table, out, lse, return_lse or lse is not None,
                                        sinks, q_lens, scales)
        return (res_out, res_lse) if (return_lse or lse is not None) else res_out

    def _extra_args(self, q_lens, scales):
        """The q_lens / fp8-scale Params fields of a launch, ``((q_lens ptr,
        k_scale ptr, v_scale ptr, k_scale value, v_scale value), arrays)``.
        Host arrays are copied here, and refused, naming them, inside a CUDA
        graph capture (a replay would not see new values)."""
        arrays = [q_lens] + list(scales or (1.0, 1.0))  # q_lens, k_scale, v_scale
        if any(isinstance(x, np.ndarray) for x in arrays):
            from ._arrays import to_gpu

            arrays = [x if not isinstance(x, np.ndarray) else _index_array(x, 0, self.q_len, name) if i == 0
                      else to_gpu(x, name) for i, (name, x) in enumerate(zip(("q_lens", "k_scale", "v_scale"), arrays))]
        ptrs = tuple(0 if x is None or isinstance(x, float) else x.data.ptr for x in arrays)
        values = tuple(x if isinstance(x, float) else 1.0 for x in arrays[1:])
        return ptrs + values, arrays

    def _lse_ok(self, lse):
        """lse can be written in place: float32, (batch, heads_q), C-contiguous,
        on the plan's device."""
        return (lse.shape == self.lse_shape and lse.dtype == np.float32
                and lse.flags.c_contiguous and lse.data.device_id == self.device)

    def __del__(self):
        # CuPy's pool hands a freed block out again only on the stream that allocated it, ordered
        # after what is queued there; a workspace last used on another stream is ordered there
        # first (the cache evicting a plan, a caller dropping theirs)
        try:
            jobs = list(self._set_aside)
            if not self._user_ws:
                jobs.append((self._ws, self._ws_stream, self._ws_thread, self._stream, self._stream_thread,
                             self._last_ev))
            _free_after_use(jobs, self.device)
        except Exception:  # a plan that failed to build, or CuPy already gone at exit
            pass

    def _new_workspace(self, cp):
        return cp.zeros(self._one_workspace_bytes(), dtype=cp.uint8)

    def _one_workspace_bytes(self):
        return max(self.workspace_bytes, COUNTER_ALIGN)

    @property
    def cache_bytes(self) -> int:
        """The eager workspace and the spare (see the class docstring)."""
        return 0 if self._user_ws else 2 * self._one_workspace_bytes()

    def _order_after_previous(self, stream, thread, cp):
        """Order work on the eager workspace queued next on ``stream`` (by
        ``thread``) after everything queued on the stream of the previous
        eager launch: the workspace is never in use on two streams. Returns
        True where that stream cannot take an event now (it is capturing a
        graph, or it is the legacy default stream while a blocking stream
        captures): the plan's workspace was set aside instead, and the
        caller takes a fresh one."""
        prev, prev_thread = self._stream, self._stream_thread
        if prev is stream and (stream.ptr != _PTDS or prev_thread == thread):
            return False  # (the common case: the stream of the previous launch)
        if prev is not None and not _same_stream(prev, prev_thread, stream, thread):
            if prev.ptr == _PTDS and prev_thread != thread:
                # another thread's per-thread stream, on which this thread cannot queue anything:
                # the event recorded after the launch there
                if self._last_ev is not None:
                    stream.wait_event(self._last_ev)
            elif _enqueue_refused(prev):
                # The previous stream has begun a capture since: an event recorded on it now would be
                # part of that capture (or invalidate it) and would pull this eager launch into it.
                # This launch takes a fresh workspace instead (zeroed on its own stream); the old one is
                # kept alive for the launches queued before the capture began.
                if self._user_ws:
                    raise RuntimeError(
                        "workspace: the plan's previous eager launch was on a stream that is now capturing a "
                        "CUDA graph, so a launch on another stream cannot be ordered after it on the caller's "
                        "workspace; launch on the capturing stream, or give this stream a plan of its own")
                # (prev is this thread's per-thread stream or another stream: the job records its event
                # later, or takes the one noted after prev's last use; later notes use a new object)
                self._set_aside.append((self._ws, self._ws_stream, self._ws_thread, prev, prev_thread,
                                        self._last_ev if prev.ptr == _PTDS else None))
                self._ws = None
                self._stream, self._stream_thread, self._last_ev, self._ptds_ev = stream, thread, None, None
                return True
            else:
                ev = cp.cuda.Event(block=False, disable_timing=True)
                ev.record(prev)
                stream.wait_event(ev)
        # (_last_ev stays until a note replaces it: read only while _stream is a per-thread stream,
        # which every eager call there notes, also when it raises)
        self._stream, self._stream_thread = stream, thread
        return False

    def _workspace_for(self, stream, thread, capture_id, cp):
        """The workspace of this launch by ``thread`` (see the module
        docstring); called under the plan's lock. ``capture_id``:
        :func:`_capture_id` of the stream."""
        capturing = capture_id is not None
        if capturing and not self.captured:
            self.captured = True  # (before the cache is asked: see _cache.keep_if_evicted)
            if self._cached:
                _cache.keep_if_evicted(self)
        if self._user_ws:  # the caller's workspace, for eager and captured launches alike
            if not capturing:
                self._order_after_previous(stream, thread, cp)
            return self._ws, capturing
        if capturing:
            if capture_id and (capture_id, stream.ptr) == self._capture_id:
                # Launches of one capture on one stream are ordered in its
                # graph: they share. (A stream forked into the capture has the
                # same capture id but may run beside it: its own workspace.)
                return self._capture_ws, True
            ws = self._spare
            self._spare = None
            if ws is not None:
                self._spare_ev.synchronize()  # its zeroing, queued outside the capture, done (relaxed mode)
            else:  # no zeroed spare (a capture after a capture): the zeroing is captured into the graph
                ws = self._new_workspace(cp)  # the capture mode is relaxed (_launch)
            self._capture_id, self._capture_ws = (capture_id, stream.ptr), ws
            return ws, True
        # Eager. What it allocates is allocated with the capture mode relaxed: another thread may be
        # capturing in global mode (torch.cuda.graph), which refuses a cudaMalloc from any thread.
        if self._order_after_previous(stream, thread, cp) or self._ws is None:
            with _relaxed_capture_mode():
                self._ws = self._new_workspace(cp)  # zeroed on this stream, before the launch
            self._ws_stream, self._ws_thread = stream, thread
        if self._spare is None:
            # Prepared outside any capture, so that a capture allocates and zeroes nothing: the
            # capture waits (on the host) for this event instead.
            ev = cp.cuda.Event(block=False, disable_timing=True)
            with _relaxed_capture_mode():
                spare = self._new_workspace(cp)
            ev.record(stream)
            self._spare, self._spare_ev = spare, ev
        return self._ws, False

    def _launch(self, q, k, v, lens, table, out, lse, want_lse, sinks=None, q_lens=None, scales=None):
        """The hot path: arrays are CuPy (index arrays CuPy or NumPy) and match
        the signature. Inside a capture, what the call allocates (workspace,
        temporaries, ``out`` when not given) is allocated with this thread's
        capture mode relaxed: a global-mode capture (``torch.cuda.graph``)
        refuses cudaMalloc otherwise."""
        stream = _cp.cuda.get_current_stream()
        capture_id = _capture_id(stream)
        if capture_id is None:
            return self._launch_on(stream, capture_id, q, k, v, lens, table, out, lse, want_lse, sinks, q_lens,
                                   scales)
        with _relaxed_capture_mode():
            return self._launch_on(stream, capture_id, q, k, v, lens, table, out, lse, want_lse, sinks, q_lens,
                                   scales)

    def _launch_on(self, stream, capture_id, q, k, v, lens, table, out, lse, want_lse, sinks, q_lens, scales):
        cp = _cp
        m = self.meta
        if self.paired and type(scales) is not UniformScales:
            # per-head scale arrays: a pair's two heads have two scales, which the unit's one scale
            # cannot carry; the plan without pairs launches
            with self._lock:
                if self._unpaired is None:  # (built under the TUNING of this first launch)
                    self._unpaired = Plan(self.signature, self.meta, pair=False)
                if capture_id is not None and not self.captured:
                    # the graph's workspace and temporaries are the plan without pairs', which lives as
                    # long as this one: this one is kept as any captured plan is (_cache.keep_if_evicted)
                    self.captured = True
                    if self._cached:
                        _cache.keep_if_evicted(self)
            return self._unpaired._launch_on(stream, capture_id, q, k, v, lens, table, out, lse, want_lse, sinks,
                                             q_lens, scales)
        if out is None:
            out = cp.empty(self.out_shape, dtype=q.dtype)
        if want_lse and lse is None:
            lse = cp.empty(self.lse_shape, dtype=cp.float32)
        if m.batch == 0:
            return out, lse
        temps = out_k = None
        grid, lanes = self._lane_grid, self.lanes
        if self._direct:  # nothing to convert or copy; lengths (if any) on the GPU
            out_k, lens32, table32 = out, lens, table
        else:
            # an empty call first: it returns before anything is copied (a copy queued inside a
            # capture and then dropped would be written by every replay after its memory is reused)
            total = None
            if self.host_lens:
                if capture_id is not None:  # (the conversion below would refuse it, after an early return)
                    refuse_host_in_capture("kv_lens")
                host = np.asarray(lens, dtype=np.int64)
                total = self._lane_heads * int((-(-np.clip(host, 0, m.capacity) // self.tile)).sum())
            elif lens is None:
                total = self._lane_units * self.max_unit_tiles
            if total == 0:
                out.fill(0)
                if lse is not None:
                    if self.has_sinks:
                        lse[...] = sinks[None, :]  # cast in the copy: no temporary
                    else:
                        lse.fill(-np.inf)
                if capture_id is not None:  # the fills are graph nodes: what they write lives as long as the plan
                    with self._lock:
                        self._graph_workspaces.append((None, None, None, None, None, None, None, out, lse))
                return out, lse
            if total is not None and self.decomposition == K.Decomposition.STREAM_K and not self.runtime_split:
                grid = min(grid, total)  # (the runtime split's chunks per unit come from the full grid)
            if self.copy_q and not self.paired:  # (pairs: q padded below, once nothing else can refuse the call)
                q = temps = cp.array(q, copy=True, order="C")  # a new (aligned) buffer even if q is contiguous
            if self.copy_k:
                k = cp.array(k, copy=True, order="C")
                temps = (temps, k)
            if self.copy_v:
                v = cp.array(v, copy=True, order="C")
                temps = (temps, v)
            lens32 = None
            if lens is not None:
                lens32 = lens if self.lens_direct else _index_array(lens, 0, m.capacity, "kv_lens")
            table32 = None
            if table is not None:
                table32 = table if self.table_direct else _index_array(table, 0, max(m.num_pages - 1, 0),
                                                                       "block_table")
            out_k = cp.empty(self._pair_shape if self.paired else out.shape, dtype=q.dtype) if self.copy_out else out

        sinks32 = None
        if self.has_sinks:
            sinks32 = sinks if (sinks.dtype == cp.float32 and sinks.flags.c_contiguous) else \
                cp.ascontiguousarray(sinks, dtype=cp.float32)
        extra = None  # q_lens and fp8 scales: only plans for them look at them
        if self.q_len or self.kv8 is not None:
            extra = self._extra_args(q_lens, scales)
        if self.paired:
            q = self._pair_copy(q, cp.empty(self._pair_shape, dtype=q.dtype), self._pair_q_args, 1)
            temps = (temps, q)
        thread = threading.get_ident()
        with self._lock:
            try:
                ws, captured = self._workspace_for(stream, thread, capture_id, cp)
                if captured:  # the workspace, temporaries and outputs the graph uses live as long as the plan
                    # (out and lse too: allocated here inside a capture and dropped by the caller, every replay
                    # would write into memory the pool had given to something else)
                    self._graph_workspaces.append((ws, temps, lens32, table32, out_k, sinks32, extra, out, lse))
                if sinks32 is not None:
                    self._params.sinks = sinks32.data.ptr
                if extra is not None:
                    (self._params.q_lens, self._params.k_scale, self._params.v_scale, self._params.k_scale_value,
                     self._params.v_scale_value) = extra[0]
                wp = ws.data.ptr
                self._ptrs[:] = (q.data.ptr, k.data.ptr, v.data.ptr, out_k.data.ptr,
                                 0 if lse is None else lse.data.ptr, 0 if lens32 is None else lens32.data.ptr,
                                 0 if table32 is None else table32.data.ptr, wp + self.counter_bytes, wp,
                                 wp + self.workspace_bytes - self.meta_bytes if self.meta_bytes else 0)
                sp = stream.ptr
                if self._rearm and wp in self._rearm:
                    if not captured:  # (a captured zeroing runs at replay: the next eager launch zeroes too)
                        self._rearm.discard(wp)
                    ws[:self.counter_bytes].fill(0)
                try:
                    attn_done = combine_done = False
                    if self._attn_launch is not None:  # programmatic launches
                        try:
                            self._attn_launch(grid * lanes, 1, sp)
                            attn_done = True
                            if self._combine:
                                self._combine_launch(self.units, self.combine_blocks, sp)
                                combine_done = True
                        except Exception as exc:  # refused: plain launches from now on (the kernels' wait: a no-op)
                            if capture_id is not None:  # a capture the failure has invalidated: no retry, and
                                raise                   # the plan keeps its programmatic launches
                            self._drop_pdl(exc)
                    if not attn_done:
                        _driver.launchKernel(self._attn_ptr, grid * lanes, 1, 1, self.threads, 1, 1, self.smem, sp,
                                             self._param_addr, 0)
                    if self._combine and not combine_done:
                        _driver.launchKernel(self._combine_ptr, self.units, self.combine_blocks, 1,
                                             self.threads, 1, 1, 0, sp, self._param_addr, 0)
                except Exception:
                    self._rearm.add(wp)  # zero the counters before this workspace's next launch
                    raise
            finally:
                # on this thread's per-thread default stream, the event another thread waits for after
                # whatever this call queued there (a workspace's zeroing, a launch), also when it raised
                if capture_id is None and self._stream_thread == thread and self._stream is not None \
                        and self._stream.ptr == _PTDS:
                    self._note_eager_use(self._stream)
        if self.paired:
            self._pair_copy(out_k, out, self._pair_out_args, 0)
        elif out_k is not out:
            out[...] = out_k
        return out, lse

    def _pair_copy(self, src, dst, rows_args, pad):
        """Head pairs: q padded into the 128-wide ``dst`` (``pad`` 1) or the
        wanted halves of the 128-wide ``src`` into ``dst`` (0), on the
        current stream. ``rows_args``: the 64-wide array's rows and element
        strides (:func:`_pair_rows`)."""
        n = rows_args[0] * (128 if pad else 64)
        grid = (max(1, min(-(-n // 256), 8 * self.num_sms)),)
        self._pair_fn(grid, (256,), (src, dst) + rows_args + (np.int32(self.meta.group), np.int32(pad)))
        return dst


_cp = _driver = None
_get_capture_info = None
_deferred = []  # (job, device) of _free_after_use, to try again once no stream involved is capturing
_kept = []  # workspaces whose last stream could not be ordered (an error): never freed
_free_lock = threading.RLock()  # (reentrant: a collection inside it may run a plan's __del__)


def _free_after_use(jobs, device):
    """Lets the workspaces of ``jobs`` go back to CuPy's pool safely. A job
    is (workspace, the stream it was allocated on and that stream's thread,
    the stream of its last eager use and that thread, the event recorded
    after that use where it was a per-thread default stream, else None).
    The pool reuses a block only on the stream that allocated it, so where
    the last use ran on another stream, the allocating stream first waits
    for an event after that use (another thread's per-thread default stream,
    on which this thread cannot queue a wait: this thread waits for the
    event on the host). Where no event can be recorded or waited for now (a
    stream capturing a graph, the legacy stream while a blocking stream
    captures) the workspace is kept and retried by
    :func:`retry_deferred_frees`."""
    me = threading.get_ident()
    later, kept = [], []
    for job in jobs:
        ws, alloc, alloc_thread, used, used_thread, used_ev = job
        if ws is None or alloc is None or used is None or _same_stream(alloc, alloc_thread, used, used_thread):
            continue  # stream-ordered already (or never launched)
        try:
            with _cp.cuda.Device(device):
                if used.ptr == _PTDS and used_thread != me:
                    ev = used_ev  # noted by the using thread after its last use
                    if ev is None:  # (none: nothing was queued there)
                        continue
                elif _enqueue_refused(used):
                    later.append((job, device))
                    continue
                else:
                    ev = _cp.cuda.Event(block=False, disable_timing=True)
                    ev.record(used)
                if alloc.ptr == _PTDS and alloc_thread != me:
                    # only the allocating thread can queue a wait on its stream: wait here, on the host
                    with _relaxed_capture_mode():
                        ev.synchronize()
                    continue
                if _enqueue_refused(alloc):
                    later.append((job, device))
                    continue
                alloc.wait_event(ev)
        except Exception:  # e.g. a foreign stream destroyed since: never reuse that memory
            kept.append(ws)
    if later or kept:
        with _free_lock:
            _deferred.extend(later)
            _kept.extend(kept)


def retry_deferred_frees():
    """Orders and frees the workspaces :func:`_free_after_use` kept for later
    (called when a plan is built)."""
    if not _deferred:
        return
    with _free_lock:
        jobs = list(_deferred)
        _deferred.clear()
    for job, device in jobs:
        _free_after_use([job], device)


def _enqueue_refused(stream):
    """Whether queueing work (an event record or wait) on ``stream``, a
    stream of this thread, would join or invalidate a graph capture now: it
    is capturing, or it is the legacy default stream while a blocking stream
    captures (CUDA refuses implicit synchronisation with a capture)."""
    if stream.ptr in _LEGACY:
        return _legacy_blocked()
    return _capture_id(stream) is not None


_is_capturing = None


def _legacy_blocked():
    """Whether the legacy default stream cannot take work now: a blocking
    stream (``cupy.cuda.Stream()``) of this context is capturing a graph."""
    global _is_capturing
    if _is_capturing is None:
        _is_capturing = _launch.driver_function("cuStreamIsCapturing",
                                                [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]) or False
    if _is_capturing:
        status = ctypes.c_int()
        rc = _is_capturing(None, ctypes.byref(status))
        if rc == 906:  # CUDA_ERROR_STREAM_CAPTURE_IMPLICIT
            return True
        if rc == 0:
            return status.value != 0
        # another error (no context current on this thread yet): the runtime's answer binds one
    try:
        return bool(_cp.cuda.Stream.null.is_capturing())
    except Exception:  # refused: a blocking capture in progress
        return True


def capturing():
    """Whether CuPy's current stream is capturing a CUDA graph."""
    _bind_cupy()
    return _capture_id(_cp.cuda.get_current_stream()) is not None


def refuse_host_in_capture(name):
    """Raises ValueError naming the host array ``name`` when CuPy's current
    stream is capturing a CUDA graph: a host array is copied to the GPU by
    each call, and a replay would read a staging buffer reused since (and
    never see new values)."""
    if capturing():
        raise ValueError(f"{name}: inside a CUDA graph capture pass GPU arrays; a host array is "
                         f"copied by each call, and a replay would read a staging buffer reused since")


def _capture_id(stream):
    """The id of the capture in progress on ``stream`` (unique in the
    process, never reused), 0 when capturing but the id cannot be read, None
    when not capturing (the legacy default stream never is)."""
    global _get_capture_info
    if stream.ptr == 0:
        return None
    if _get_capture_info is None:
        fn = _launch.driver_function("cuStreamGetCaptureInfo_v2", [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint64),
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p])
        if fn is not None:
            def info(ptr, fn=fn, byref=ctypes.byref, c_int=ctypes.c_int, c_uint64=ctypes.c_uint64):
                status, cid = c_int(), c_uint64()  # per call: threads must not share them
                if fn(ptr, byref(status), byref(cid), None, None, None) != 0:
                    raise RuntimeError("cuStreamGetCaptureInfo failed")
                return None if status.value == 0 else cid.value  # active or invalidated: capturing
        else:
            def info(ptr):
                with warnings.catch_warnings():  # deprecated in CuPy 14; this runs only without libcuda
                    warnings.simplefilter("ignore", DeprecationWarning)
                    s = _cp.cuda.ExternalStream(ptr)
                return 0 if s.is_capturing() else None
        _get_capture_info = info
    try:
        return _get_capture_info(stream.ptr)
    except RuntimeError:
        return 0 if stream.is_capturing() else None


class _relaxed_capture_mode:
    """This thread's stream-capture mode set to relaxed for the block (and
    restored after it): a capture begun in global mode, as
    ``torch.cuda.graph`` begins one, makes a cudaMalloc from any thread an
    error that invalidates the capture; relaxed lets this thread allocate a
    workspace (the allocation is not part of the graph; its zeroing, queued
    on the capturing stream, is). A driver without the call leaves the mode
    as it is."""

    _fn = None

    def __enter__(self):
        fn = _relaxed_capture_mode._fn
        if fn is None:
            fn = _launch.driver_function("cuThreadExchangeStreamCaptureMode", [ctypes.POINTER(ctypes.c_int)]) \
                or False
            _relaxed_capture_mode._fn = fn
        self._mode = None
        if fn:
            mode = ctypes.c_int(2)  # CU_STREAM_CAPTURE_MODE_RELAXED
            if fn(ctypes.byref(mode)) == 0:
                self._mode = mode
        return self

    def __exit__(self, *exc):
        if self._mode is not None:
            _relaxed_capture_mode._fn(ctypes.byref(self._mode))  # the previous mode back
        return False


def _bind_cupy():
    """Module-level handles on CuPy for the hot path (no import per call)."""
    global _cp, _driver
    if _driver is None:
        import cupy
        from cupy_backends.cuda.api import driver

        _cp, _driver = cupy, driver


def _contig(shape, isz):
    st, acc = [], isz
    for n in reversed(shape):
        st.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(st))


def _aligned_layout(meta, ptr_aligned, nbytes):
    """Pointer aligned and every stride but the last (of axes longer than 1)
    a multiple of ``nbytes``."""
    shape, strides = meta[0], meta[1]
    return bool(ptr_aligned) and all(s % nbytes == 0 for s, n in zip(strides[:-1], shape[:-1]) if n > 1)


def _index_array(x, low, high, name):
    """int32 on the GPU, contiguous on the last axis; values outside
    [low, high] kept outside it (clipped to low - 1 / high + 1) so a check
    still sees them. A host array is copied, and refused, naming it, inside
    a CUDA graph capture."""
    import cupy as cp

    if isinstance(x, np.ndarray):
        refuse_host_in_capture(name)
        return cp.asarray(np.clip(x.astype(np.int64), low - 1, high + 1).astype(np.int32))
    if x.dtype != cp.int32:
        # one kernel into the array the launch keeps: inside a capture, a temporary of a chain of
        # kernels would go back to the memory pool when the capture ends while every replay still
        # writes it (over whatever array the pool has handed that memory to since)
        with _relaxed_capture_mode():  # a global-mode capture refuses cudaMalloc otherwise (see _launch)
            y = cp.empty(x.shape, dtype=cp.int32)
            _clip_to_int32()(x, low - 1, high + 1, y)
        return y
    if x.ndim and x.shape[-1] > 1 and x.strides[-1] != 4:
        with _relaxed_capture_mode():
            x = cp.ascontiguousarray(x)
    return x


_CLIP_INT32 = None


def _clip_to_int32():
    """Elementwise kernel: an integer array (any width or sign, read as a
    64-bit signed value, as ``astype(int64)`` reads it) clipped to ``[lo,
    hi]`` into int32."""
    global _CLIP_INT32
    if _CLIP_INT32 is None:
        import cupy as cp

        _CLIP_INT32 = cp.ElementwiseKernel(
            "T x, int64 lo, int64 hi", "int32 y",
            "const long long w = (long long)x; y = (int)(w < lo ? lo : (w > hi ? hi : w));",
            "cupy_lean_clip_to_int32")
    return _CLIP_INT32


def _check_workspace(ws, nbytes):
    import cupy as cp

    if not isinstance(ws, cp.ndarray):
        raise TypeError(f"workspace: expected a CuPy array, got {type(ws).__name__}")
    if not ws.flags.c_contiguous or ws.data.ptr % 256:
        raise ValueError("workspace: expected a contiguous array aligned to 256 bytes")
    if ws.nbytes < nbytes:
        raise ValueError(f"workspace: expected at least {nbytes} bytes (Plan.workspace_bytes), got {ws.nbytes}")
    return ws.view(cp.uint8).reshape(-1)


def _check_host_lens(meta, lens, table):
    from .validation import check_host_values

    check_host_values(meta, None if lens is None else np.asarray(lens),
                      table if isinstance(table, np.ndarray) else None)


def plan_key(device, sig):
    """The cache key of the plan of ``sig`` on ``device``: also the TUNING
    values (kernels.TUNING.key), which shape a plan."""
    return ("plan", device, sig, K.TUNING.key)


def get_plan(sig, build_meta):
    """The cached plan of ``sig`` on the current device, built (after
    ``build_meta()`` validated the call) when missing."""
    import cupy as cp

    key = plan_key(cp.cuda.runtime.getDevice(), sig)
    plan = _cache.get(key)
    if plan is None:
        meta = build_meta()
        plan = _cache.get_or_build(key, lambda: _cached_plan(sig, meta))
    return plan


def _cached_plan(sig, meta):
    plan = Plan(sig, meta)
    plan._cached = True  # (a capture of it then checks that the cache still holds it)
    return plan

"""GPU helpers below the front end: the synchronising value check of
kv_lens / block_table, merge_states, and the kernel's schedule dump."""

from __future__ import annotations

import math

import cupy as cp
import numpy as np

from . import kernels as K
from ._dtypes import BFLOAT16
from ._plan import _index_array

_NULL = np.uint64(0)
_U64_MAX = np.uint64(2**64 - 1)


def device_check(m, lens, table):
    """Raise ValueError naming the first bad kv_lens or block_table value
    (checked on the GPU; synchronises)."""
    lens32 = _index_array(lens, 0, m.capacity, "kv_lens")  # given: a call checks values only when kv_lens is
    table32 = None if table is None else _index_array(table, 0, max(m.num_pages - 1, 0), "block_table")
    bad = cp.full(1, _U64_MAX, dtype=cp.uint64)
    fn = K.util_function("lean_check_inputs")
    bt_sb = np.int64(table32.strides[0] // 4) if table32 is not None else np.int64(0)
    grid = max(1, min(m.batch, 4096))
    fn((grid,), (128,), (lens32, table32 if table32 is not None else _NULL, np.int32(m.batch),
                         np.int32(m.capacity), np.int32(max(m.page_size, 1)), np.int32(m.num_pages),
                         np.int32(m.max_pages), bt_sb, bad))
    code = int(bad.get()[0])
    if code == 2**64 - 1:
        return
    stride = m.max_pages + 1
    b, j = divmod(code, stride)
    if j == 0:
        val = int(cp.asnumpy(lens)[b])
        raise ValueError(
            f"kv_lens: expected values in [0, {m.capacity}] (the cache capacity), got kv_lens[{b}] = {val}")
    j -= 1
    val = int(cp.asnumpy(table)[b, j])
    raise ValueError(
        f"block_table: expected page indices in [0, {m.num_pages}) for the pages in use, "
        f"got block_table[{b}, {j}] = {val}")


_MERGE = {np.dtype(np.float16): "merge_states_f16", np.dtype(np.float32): "merge_states_f32",
          BFLOAT16: "merge_states_bf16"}


def merge_states(outs, lses):
    parts = int(outs.shape[0])
    rest = tuple(outs.shape[1:-1])
    D = int(outs.shape[-1])
    R = int(math.prod(rest))
    out = cp.empty(rest + (D,), dtype=outs.dtype)
    lse = cp.empty(rest, dtype=cp.float32)
    if R * D == 0:
        if R:
            lse[...] = _merge_lse_only(lses.reshape(parts, R)).reshape(rest)
        return out, lse
    o = cp.ascontiguousarray(outs.reshape(parts, R, D))
    s = cp.ascontiguousarray(lses.reshape(parts, R).astype(cp.float32, copy=False))
    fn = K.util_function(_MERGE[outs.dtype])
    n = R * D
    block = 256
    grid = max(1, min(-(-n // block), 65535 * 8))
    fn((grid,), (block,), (o, s, out, lse, np.int32(parts), np.int64(R), np.int32(D)))
    return out, lse


def _merge_lse_only(lses):
    s = lses.astype(cp.float64)
    mx = s.max(axis=0)
    safe = cp.where(cp.isneginf(mx), 0.0, mx)
    tot = cp.exp(s - safe).sum(axis=0)
    return cp.where(tot == 0, -cp.inf, safe + cp.log(cp.where(tot == 0, 1.0, tot))).astype(cp.float32)


def device_schedule(kv_lens, heads_kv, *, tile_size, num_ctas=None, num_splits=None, max_segments=64,
                    min_tiles_per_cta=1, merge_balance=0, runtime_split=False, split_slack_tiles=1,
                    merge_launch=True, split_scale=1, split_cap_tiles=1 << 30):
    """The schedule as the kernel derives it (its schedule-dump entry: no
    attention is computed; the kernel spec has 16 state rows). Stream-K with ``num_ctas`` CTAs, or split-K with
    ``num_splits`` chunks per unit. Returns, per CTA, None (no work) or
    ``(begin, end, [(unit, tile_begin, tile_end, partial, slot,
    first_contributor, contributors), ...])``, the quantities of
    :func:`cupy_lean.lean_schedule` / :func:`cupy_lean.split_schedule`.
    ``runtime_split``: stream-K as a plan with the launch-time split runs
    it (``lean_schedule(merge_launch=..., runtime_split=True,
    split_slack_tiles=..., split_scale=..., split_cap_tiles=...)``), with the merge launch's unit records
    (``merge_launch``) or without them (its chunks merged in the kernel)."""
    lens_host = np.asarray(kv_lens)
    lens32 = cp.asarray(lens_host, dtype=cp.int32)
    B = int(lens32.shape[0])
    spec = K.make_spec("f16", 128, 1, False, tile_size)
    kern = K.kernels_for(spec)
    prm = K.Params()
    prm.batch, prm.heads_kv, prm.group = B, heads_kv, 1
    prm.capacity = max(1, int(lens_host.max()) if B else 1)
    prm.page_size = 1
    prm.page_magic, prm.page_shift = K.index_divisor(1)
    prm.window_left, prm.min_tiles_per_cta, prm.merge_balance = -1, min_tiles_per_cta, merge_balance
    if num_splits is None:
        prm.decomposition, prm.num_splits, grid = K.Decomposition.STREAM_K, 1, num_ctas
    else:
        prm.decomposition, prm.num_splits, grid = K.Decomposition.SPLIT_K, num_splits, B * heads_kv * num_splits
    stride = K.DUMP_HEADER + K.DUMP_RECORD * max_segments
    rec = cp.full(grid * stride, -1, dtype=cp.int32)  # CTAs without work leave it as it is
    prm.slot_stride = stride
    prm.kv_lens, prm.partials = lens32.data.ptr, rec.data.ptr
    meta = None
    if runtime_split:
        from .schedule import _check_split_cap, _check_split_rule

        split_slack_tiles, split_scale = _check_split_rule(split_slack_tiles, split_scale)  # ctypes would wrap
        prm.runtime_split, prm.split_slack = split_scale, split_slack_tiles
        prm.split_cap = _check_split_cap(split_cap_tiles)
        if merge_launch:  # the unit records the split's first chunk writes
            meta = cp.zeros(max(1, 2 * B * heads_kv), dtype=cp.int32)
            prm.unit_meta = meta.data.ptr
    K.launch_params(kern.dump, grid, spec.threads, spec.smem_bytes, cp.cuda.get_current_stream().ptr, prm)
    raw = rec.reshape(grid, stride).get()
    del meta
    res = []
    for c in range(grid):
        if raw[c, 0] < 0:
            res.append(None)
            continue
        n = int(raw[c, 2])
        segs = [tuple(int(x) for x in raw[c, K.DUMP_HEADER + K.DUMP_RECORD * i: K.DUMP_HEADER + K.DUMP_RECORD * (i + 1)])
                for i in range(min(n, max_segments))]
        res.append((int(raw[c, 0]), int(raw[c, 1]), segs))
    return res

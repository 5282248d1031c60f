"""GPU path of the front end: arrays already validated by attention.py."""

from __future__ import annotations

import ctypes
import math
import threading

import cupy as cp
from cupy_backends.cuda.api import driver as _driver
import numpy as np

from . import kernels as K
from .attention import BFLOAT16
from .schedule import num_splits_heuristic

_LOG2E = 1.4426950408889634
_NULL = np.uint64(0)
_U64_MAX = np.uint64(2**64 - 1)


def is_aligned(ptr, strides, shape, nbytes):
    """True when the pointer and every stride but the last (of axes longer
    than 1) are multiples of ``nbytes``: vector accesses of that width stay
    aligned everywhere."""
    acc = ptr
    for s_ in strides[:-1]:
        acc |= s_
    if not acc % nbytes:  # common case: one test
        return True
    return ptr % nbytes == 0 and all(s % nbytes == 0 for s, n in zip(strides[:-1], shape[:-1]) if n > 1)


def _aligned16(x):
    """x itself if its pointer and strides allow 16-byte loads, else a
    contiguous copy."""
    return x if is_aligned(x.data.ptr, x.strides, x.shape, 16) else cp.ascontiguousarray(x)


def _index_array(x, low, high):
    """int32, contiguous on the last axis, values outside [low, high] kept
    outside it (clipped to low - 1 / high + 1) so a check still sees them."""
    if isinstance(x, np.ndarray):
        x = np.clip(x.astype(np.int64), low - 1, high + 1).astype(np.int32)
        return cp.asarray(x)
    if x.dtype != cp.int32:
        x = cp.clip(x.astype(cp.int64), low - 1, high + 1).astype(cp.int32)
    if x.ndim and x.shape[-1] > 1 and x.strides[-1] != 4:
        x = cp.ascontiguousarray(x)
    return x


def _device_check(m, lens_orig, lens32, table_orig, table32):
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
        val = int(cp.asnumpy(lens_orig)[b])
        raise ValueError(
            f"kv_lens: expected values in [0, {m.capacity}] (the cache capacity), got kv_lens[{b}] = {val}")
    j -= 1
    val = int(cp.asnumpy(table_orig)[b, j])
    raise ValueError(
        f"block_table: expected page indices in [0, {m.num_pages}) for the pages in use, "
        f"got block_table[{b}, {j}] = {val}")


def _strides(x, n):
    isz = x.dtype.itemsize
    return [x.strides[i] // isz for i in range(n)]


_CTYPES = {"ptr": ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32,
           np.float32: ctypes.c_float}


class _Pack:
    """Kernel parameters kept in ctypes storage: a launch only rewrites the
    pointer fields and hands the array of addresses to cuLaunchKernel."""

    def __init__(self, signature, values):
        if len(values) != len(signature):
            raise TypeError(f"kernel launch: expected {len(signature)} arguments, got {len(values)}")
        self.cvals = [_CTYPES[kind](val) for (_, kind), val in zip(signature, values)]
        self.arr = (ctypes.c_void_p * len(self.cvals))(*[ctypes.addressof(c) for c in self.cvals])
        self.addr = ctypes.addressof(self.arr)


class _Plan:
    __slots__ = ("spec", "attn_ptr", "combine_ptr", "grid", "threads", "smem", "mode", "ns", "units",
                 "pack", "ws", "counters", "max_grid", "tile")


_plans: dict = {}


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


def _make_plan(q, k, v, out_k, lens32, table32, m, sched, num_ctas, tile_size):
    B, Hq, D, Hkv, g = m.batch, m.heads_q, m.head_dim, m.heads_kv, m.group
    dt = "f16" if q.dtype == np.float16 else "bf16"
    spec = K.make_spec(dt, D, g, m.paged, tile_size)
    kern = K.kernels_for(spec)
    tile = spec.tile
    units = B * Hkv
    max_unit_tiles = -(-m.capacity // tile)
    slot_stride = -(-g * (D + 2) // 4) * 4
    p = _Plan()
    p.spec, p.tile, p.units = spec, tile, units
    if sched == "lean":
        per_sm = K.OVERRIDES["ctas_per_sm"] or kern.ctas_per_sm
        grid = num_ctas if num_ctas is not None else per_sm * kern.num_sms
        grid = max(1, min(grid, units * max_unit_tiles))
        if num_ctas is None and lens32 is None:
            grid = aligned_grid(units, max_unit_tiles, grid)
        mode, ns = 0, 1
        ws_floats = 2 * grid * slot_stride
    else:
        if sched == "head":
            ns = 1
        elif num_ctas is not None:
            ns = max(1, num_ctas // units)
        else:
            ns = num_splits_heuristic(units, max_unit_tiles, kern.num_sms)
        grid = units * ns
        mode = 1
        ws_floats = grid * slot_stride if ns > 1 else 0
    p.grid = p.max_grid = grid
    p.mode, p.ns = mode, ns
    p.threads, p.smem = spec.threads, spec.smem_bytes
    p.attn_ptr, p.combine_ptr = kern.attn.kernel.ptr, kern.combine.kernel.ptr
    p.ws, p.counters = K.workspace(ws_floats, units)
    qs, ks, vs, os_ = _strides(q, 2), _strides(k, 3), _strides(v, 3), _strides(out_k, 2)
    bt_sb = table32.strides[0] // 4 if table32 is not None else 0
    values = [0] * 9 + [
        qs[0], qs[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], os_[0], os_[1], bt_sb,
        B, Hkv, g, m.capacity, max(m.page_size, 1), m.num_pages, mode, ns,
        m.scale * _LOG2E, slot_stride,
    ]
    p.pack = _Pack(K.ATTN_SIGNATURE, values)
    return p


def attention(q, k, v, lens, table, m, out, return_lse, sched, num_ctas, tile_size, validate, sig=None):
    B, Hq, D = m.batch, m.heads_q, m.head_dim
    if out is None:
        out = cp.empty((B, Hq, D), dtype=q.dtype)
    lse = cp.empty((B, Hq), dtype=cp.float32) if return_lse else None
    if B == 0:
        return out, lse
    q, k, v = _aligned16(q), _aligned16(k), _aligned16(v)

    host_lens = None
    lens32 = None
    if lens is not None:
        if isinstance(lens, np.ndarray):
            host_lens = lens.astype(np.int64)
        lens32 = _index_array(lens, 0, m.capacity)
    table32 = None
    if table is not None:
        table32 = _index_array(table, 0, max(m.num_pages - 1, 0))
    if validate and (isinstance(lens, cp.ndarray) or isinstance(table, cp.ndarray)):
        _device_check(m, lens, lens32, table, table32)

    # the kernel stores 4 outputs (8 bytes) at a time
    out_k = out if is_aligned(out.data.ptr, out.strides, out.shape, 8) else cp.empty((B, Hq, D), dtype=q.dtype)

    stream = cp.cuda.get_current_stream()
    ov = K.OVERRIDES
    if sig is not None and out_k is out and table32 is table:
        # sig (from the front end) holds every shape, stride, dtype and option
        key = (sig, threading.get_ident(), cp.cuda.runtime.getDevice(), stream.ptr, ov["stages"],
               ov["ctas_per_sm"])
    else:
        key = (threading.get_ident(), cp.cuda.runtime.getDevice(), stream.ptr, q.shape, q.strides, k.shape,
               k.strides, v.strides, q.dtype, out_k.strides, lens is None,
               None if table32 is None else (table32.shape, table32.strides), sched, num_ctas, tile_size,
               m.scale, ov["stages"], ov["ctas_per_sm"])
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 512:
            _plans.clear()
        plan = _plans[key] = _make_plan(q, k, v, out_k, lens32, table32, m, sched, num_ctas, tile_size)

    grid = plan.grid
    if host_lens is not None or lens is None:
        if lens is None:
            total = plan.units * (-(-m.capacity // plan.tile))
        else:
            total = m.heads_kv * int((-(-host_lens // plan.tile)).sum())
        if total == 0:
            out_k.fill(0)
            if lse is not None:
                lse.fill(-np.inf)
            if out_k is not out:
                out[...] = out_k
            return out, lse
        if plan.mode == 0:
            grid = min(plan.max_grid, total)

    cv = plan.pack.cvals
    cv[0].value = q.data.ptr
    cv[1].value = k.data.ptr
    cv[2].value = v.data.ptr
    cv[3].value = out_k.data.ptr
    cv[4].value = 0 if lse is None else lse.data.ptr
    cv[5].value = 0 if lens32 is None else lens32.data.ptr
    cv[6].value = 0 if table32 is None else table32.data.ptr
    cv[7].value = plan.ws.data.ptr
    cv[8].value = plan.counters.data.ptr
    _driver.launchKernel(plan.attn_ptr, grid, 1, 1, plan.threads, 1, 1, plan.smem, stream.ptr,
                         plan.pack.addr, 0)
    if plan.mode == 1 and plan.ns > 1:
        _driver.launchKernel(plan.combine_ptr, plan.units, 1, 1, plan.threads, 1, 1, 0, stream.ptr,
                             plan.pack.addr, 0)
    if out_k is not out:
        out[...] = out_k
    return out, lse


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


def device_lean_schedule(kv_lens, heads_kv, *, tile_size, num_ctas, max_segments=64):
    """Run the kernel's own schedule derivation (mode 2: no attention) and
    return, per CTA, ``(start, end, [(unit, tile_begin, tile_end, partial),
    ...])``. For tests: the device schedule must equal
    :func:`cupy_lean.lean_schedule`."""
    lens32 = cp.asarray(np.asarray(kv_lens), dtype=cp.int32)
    B = int(lens32.shape[0])
    cap = max(1, int(np.asarray(kv_lens).max()) if B else 1)
    spec = K.make_spec("f16", 128, 1, False, tile_size)
    kern = K.kernels_for(spec)
    stride = 3 + 4 * max_segments
    ws = cp.zeros(num_ctas * stride, dtype=cp.int32)
    ws[0::stride] = -1  # CTAs without work leave this untouched
    out = cp.empty((max(B, 1), heads_kv, 128), dtype=cp.float16)
    counters = cp.zeros(max(B * heads_kv, 1), dtype=cp.int32)
    z = np.int64(0)
    args = (out, out, out, out, _NULL, lens32, _NULL, ws.view(cp.float32), counters,
            z, z, z, z, z, z, z, z, np.int64(heads_kv * 128), np.int64(128), z,
            np.int32(B), np.int32(heads_kv), np.int32(1), np.int32(cap), np.int32(1), np.int32(0),
            np.int32(2), np.int32(1), np.float32(1.0), np.int32(stride))
    K.launch(kern.attn, num_ctas, spec.threads, args, spec.smem_bytes)
    raw = ws.reshape(num_ctas, stride).get()
    res = []
    for c in range(num_ctas):
        if raw[c, 0] < 0:
            res.append(None)
            continue
        n = int(raw[c, 2])
        segs = [tuple(int(x) for x in raw[c, 3 + 4 * i: 7 + 4 * i]) for i in range(min(n, max_segments))]
        res.append((int(raw[c, 0]), int(raw[c, 1]), segs))
    return res

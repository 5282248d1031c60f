"""Front end: validate, normalise arrays, dispatch (NumPy -> reference, GPU ->
kernels)."""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import reference, schedule as _schedule
from .kernels import HEAD_DIMS, MAX_GROUP, MAX_PAGE_SIZE, TILE_SIZES

__all__ = ["attention", "merge_states"]

try:  # ml_dtypes is a dependency; guard anyway so the error is clear.
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BFLOAT16 = None

_GPU_DTYPES = tuple(d for d in (np.dtype(np.float16), BFLOAT16) if d is not None)
_CPU_DTYPES = _GPU_DTYPES + (np.dtype(np.float32), np.dtype(np.float64))
MAX_NUM_CTAS = 1 << 20


def _dtype_names(dts):
    return ", ".join(str(d) for d in dts)


# ------------------------------------------------------------------ devices

_CUPY_NDARRAY = None


def _where(x):
    """'cpu', 'gpu' or None (None: not an array we know)."""
    if type(x) is _CUPY_NDARRAY:
        return "gpu"
    if isinstance(x, np.ndarray):
        return "cpu"
    mod = type(x).__module__
    if mod.startswith("cupy"):
        return "gpu"
    if hasattr(x, "__cuda_array_interface__"):
        return "gpu"
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None:
        try:
            kind = int(dev()[0])
        except Exception:  # pragma: no cover - foreign object
            return None
        return "gpu" if kind in (2, 3, 13) else "cpu"  # CUDA, CUDA host, CUDA managed
    return None


def _to_gpu(x, name):
    import cupy

    if isinstance(x, cupy.ndarray):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        return cupy.asarray(x)
    if hasattr(x, "__dlpack__"):
        return cupy.from_dlpack(x)
    return cupy.asarray(x)


def _to_cpu(x, name):
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__dlpack__") and not isinstance(x, (list, tuple)):
        try:
            return np.from_dlpack(x)
        except Exception:
            pass
    return np.asarray(x)


def _host_ints(x, name):
    """An index array given on the host (NumPy, list) or fetched from the GPU
    for the NumPy path. An empty list becomes an empty int64 array."""
    if _where(x) == "gpu":
        import cupy

        return cupy.asnumpy(_to_gpu(x, name))
    arr = np.asarray(x)
    if arr.size == 0 and not np.issubdtype(arr.dtype, np.integer) and isinstance(x, (list, tuple)):
        arr = arr.astype(np.int64)
    return arr


# ------------------------------------------------------------------ validation

def _check_rank(x, name, ndim, axes):
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions {axes}, got shape {tuple(x.shape)}")


def _check_last_contiguous(x, name):
    if x.size and x.shape[-1] > 1 and x.strides[-1] != x.dtype.itemsize:
        raise ValueError(
            f"{name}: expected unit stride on the last axis (head_dim), got a stride of "
            f"{x.strides[-1] // max(x.dtype.itemsize, 1)} elements"
        )


def _check_int(value, name, low, high=None):
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}: expected an integer {rng}, got {value}")
    return value


class _Meta:
    __slots__ = ("batch", "heads_q", "heads_kv", "head_dim", "group", "paged", "seqlen",
                 "page_size", "num_pages", "max_pages", "capacity", "scale")


def _validate(q, k, v, kv_lens, block_table, scale, out, sched, num_ctas, tile_size, gpu):
    _check_rank(q, "q", 3, "(batch, heads_q, head_dim)")
    paged = block_table is not None
    kaxes = "(num_pages, page_size, heads_kv, head_dim)" if paged else "(batch, seqlen, heads_kv, head_dim)"
    _check_rank(k, "k", 4, kaxes)
    _check_rank(v, "v", 4, kaxes)
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    batch, hq, d = (int(s) for s in q.shape)
    hkv = int(k.shape[2])
    if int(k.shape[3]) != d:
        raise ValueError(f"k: expected head_dim {d} (q.shape[2]), got {int(k.shape[3])}")
    if hkv < 1:
        raise ValueError(f"k: expected heads_kv >= 1, got {hkv}")
    if hq % hkv != 0 or hq == 0:
        raise ValueError(f"q: heads_q must be a positive multiple of heads_kv, got heads_q={hq}, heads_kv={hkv}")
    if not paged and int(k.shape[0]) != batch:
        raise ValueError(f"k: expected batch {batch} (q.shape[0]), got {int(k.shape[0])}")

    supported = _GPU_DTYPES if gpu else _CPU_DTYPES
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in supported:
            where = "GPU" if gpu else "NumPy"
            raise TypeError(f"{name}: the {where} path supports dtypes {_dtype_names(supported)}, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_last_contiguous(x, name)

    m = _Meta()
    m.batch, m.heads_q, m.heads_kv, m.head_dim, m.group = batch, hq, hkv, d, hq // hkv
    m.paged = paged
    if gpu:
        if d not in HEAD_DIMS:
            raise ValueError(f"head_dim: the GPU kernels support {HEAD_DIMS}, got {d}")
        if m.group > MAX_GROUP:
            raise ValueError(f"heads_q / heads_kv: the GPU kernels support groups of 1 to {MAX_GROUP}, got {m.group}")

    if paged:
        m.num_pages, m.page_size = int(k.shape[0]), int(k.shape[1])
        if block_table.ndim != 2 or int(block_table.shape[0]) != batch:
            raise ValueError(
                f"block_table: expected shape (batch, max_pages) with batch {batch}, got {tuple(block_table.shape)}")
        if not np.issubdtype(block_table.dtype, np.integer):
            raise TypeError(f"block_table: expected an integer dtype, got {block_table.dtype}")
        m.max_pages = int(block_table.shape[1])
        if m.page_size < 1:
            raise ValueError(f"k: expected page_size >= 1, got {m.page_size}")
        if gpu and m.page_size > MAX_PAGE_SIZE:
            raise ValueError(f"k: the GPU kernels support page sizes 1 to {MAX_PAGE_SIZE}, got {m.page_size}")
        m.capacity = m.max_pages * m.page_size
        if kv_lens is None:
            raise ValueError("kv_lens: required with a paged cache (block_table given)")
        m.seqlen = None
    else:
        m.seqlen = int(k.shape[1])
        m.capacity = m.seqlen
        m.num_pages = m.page_size = m.max_pages = 0
    if gpu and m.capacity >= 2**31:
        raise ValueError(f"k: capacity per sequence must be below 2**31 tokens, got {m.capacity}")

    if kv_lens is not None:
        if kv_lens.ndim != 1 or int(kv_lens.shape[0]) != batch:
            raise ValueError(f"kv_lens: expected shape ({batch},), got {tuple(kv_lens.shape)}")
        if not np.issubdtype(kv_lens.dtype, np.integer):
            raise TypeError(f"kv_lens: expected an integer dtype, got {kv_lens.dtype}")

    if out is not None:
        if not hasattr(out, "shape") or not hasattr(out, "dtype") or isinstance(out, (list, tuple)):
            raise TypeError(f"out: expected an array of shape {(batch, hq, d)}, got {type(out).__name__}")
        flags = getattr(out, "flags", None)
        if flags is not None and hasattr(flags, "writeable") and not flags.writeable:
            raise ValueError("out: expected a writeable array, got a read-only one")
        if tuple(out.shape) != (batch, hq, d):
            raise ValueError(f"out: expected shape {(batch, hq, d)}, got {tuple(out.shape)}")
        if out.dtype != q.dtype:
            raise TypeError(f"out: expected dtype {q.dtype} (q's dtype), got {out.dtype}")
        _check_last_contiguous(out, "out")

    if scale is None:
        m.scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    else:
        if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, np.floating, np.integer)):
            raise TypeError(f"scale: expected a real number, got {type(scale).__name__} {scale!r}")
        try:
            fscale = float(scale)
        except OverflowError:
            fscale = math.inf
        if not math.isfinite(fscale):
            raise ValueError(f"scale: expected a finite number, got {fscale if math.isnan(fscale) or fscale != math.inf or isinstance(scale, float) else scale}")
        m.scale = fscale

    if not isinstance(sched, str) or sched not in _schedule.SCHEDULES:
        raise ValueError(f"schedule: expected one of {_schedule.SCHEDULES}, got {sched!r}")
    if tile_size is not None:
        tile_size = _check_int(tile_size, "tile_size", 1)
        if tile_size not in TILE_SIZES:
            raise ValueError(f"tile_size: expected one of {TILE_SIZES}, got {tile_size}")
    if num_ctas is not None:
        _check_int(num_ctas, "num_ctas", 1, MAX_NUM_CTAS)
    return m


def _check_host_values(m, lens, table):
    """Range checks of kv_lens / block_table given on the host."""
    if lens is not None and lens.size:
        bad = np.nonzero((lens < 0) | (lens > m.capacity))[0]
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"kv_lens: expected values in [0, {m.capacity}] (the cache capacity), got kv_lens[{i}] = {int(lens[i])}")
    if table is not None and table.size and lens is not None:
        used = -(-lens.astype(np.int64) // m.page_size)
        cols = np.arange(table.shape[1])
        mask = cols[None, :] < used[:, None]
        badm = mask & ((table < 0) | (table >= m.num_pages))
        if badm.any():
            b, j = (int(x) for x in np.argwhere(badm)[0])
            raise ValueError(
                f"block_table: expected page indices in [0, {m.num_pages}) for the pages in use, "
                f"got block_table[{b}, {j}] = {int(table[b, j])}")


# ------------------------------------------------------------------ public API

def attention(q, k, v, *, kv_lens=None, block_table=None, scale=None, return_lse=False, out=None,
              schedule="lean", num_ctas=None, tile_size=None, validate=True):
    """Decode attention: one new query token per sequence over its KV cache.

    For every sequence ``b`` and query head ``i`` (KV head ``i // group``,
    ``group = heads_q / heads_kv``)::

        out[b, i] = softmax(scale * k[b, :L, i // group] @ q[b, i]) @ v[b, :L, i // group]

    with ``L = kv_lens[b]``. NumPy inputs run the float64 reference on the CPU
    (the result is cast to q's dtype); GPU inputs (CuPy, or any object with
    ``__cuda_array_interface__`` / CUDA ``__dlpack__``, such as PyTorch and JAX
    arrays) run the fused LeanAttention kernel on CuPy's current stream and
    return CuPy arrays.

    Parameters
    ----------
    q : array, shape (batch, heads_q, head_dim)
        Query of the newest token of each sequence.
    k, v : array, shape (batch, seqlen, heads_kv, head_dim)
        Dense KV cache, any strides with unit stride on the last axis: a
        ``(batch, heads_kv, seqlen, head_dim)`` cache passed as
        ``.transpose(0, 2, 1, 3)`` works without a copy. With ``block_table``,
        the paged cache ``(num_pages, page_size, heads_kv, head_dim)``.
    kv_lens : array of int, shape (batch,), optional
        Length of each sequence, in ``[0, capacity]`` (``seqlen``, or
        ``max_pages * page_size`` when paged). Default: every sequence is
        ``seqlen`` long. Required with ``block_table``. A length of 0 gives
        zeros and ``lse = -inf``. int32 on the GPU avoids a conversion.
    block_table : array of int, shape (batch, max_pages), optional
        Page indices of each sequence's cache, in order; pages may be in any
        order in the cache. Only the first ``ceil(kv_lens[b] / page_size)``
        entries of row ``b`` are read.
    scale : float, optional
        Softmax scale, default ``1 / sqrt(head_dim)``.
    return_lse : bool
        Also return the log-sum-exp (natural log) of the scaled scores.
    out : array, shape (batch, heads_q, head_dim), optional
        Written in place and returned (q's dtype, same device).
    schedule : {"lean", "split", "head"}
        ``"lean"``: stream-K over all tiles, one launch (the product).
        ``"split"``: FlashDecoding (fixed chunks per unit, then a combine
        launch). ``"head"``: FlashAttention-2 (one CTA per unit). All three give
        the same result up to rounding; they exist to compare.
    num_ctas : int, optional
        Grid size override (lean: persistent CTAs, default fills the GPU at the
        kernel's occupancy; split: total CTAs, ``num_splits = num_ctas //
        units``; ignored by head).
    tile_size : int, optional
        KV tokens per tile, one of 16, 32, 64, 128 (a compile-time parameter);
        default by head_dim (128 at 64, 64 at 128, 32 at 256).
    validate : bool
        GPU only: check ``kv_lens`` and ``block_table`` values that live on
        the GPU with a small kernel, then synchronise to raise ``ValueError``
        on a bad value. ``False`` skips it (for CUDA graphs and hot loops);
        either way the kernel clamps lengths to the capacity and treats pages
        outside the cache as empty, so it never reads out of bounds.

    Returns
    -------
    out : array, shape (batch, heads_q, head_dim), q's dtype
    lse : array of float32, shape (batch, heads_q)
        Only with ``return_lse=True``.

    Raises
    ------
    ValueError, TypeError
        For bad shapes, dtypes, strides, lengths, page indices, scale,
        schedule, tile size or CTA count; the message names the argument, what
        was expected and what was given.
    """
    global _CUPY_NDARRAY, _gpu_mod
    if _CUPY_NDARRAY is not None and _cacheable(q, k, v, out, kv_lens, block_table, scale):
        # CuPy inputs whose shapes, strides and dtypes were validated before:
        # the same checks would pass again (values of GPU kv_lens and
        # block_table are still checked by _gpu when validate=True).
        sig = _signature(q, k, v, out, kv_lens, block_table, scale, schedule, num_ctas, tile_size)
        m = _FAST.get(sig)
        if m is not None:
            res_out, res_lse = _gpu_mod.attention(q, k, v, kv_lens, block_table, m, out, return_lse,
                                                  schedule, num_ctas, tile_size, validate, sig)
            return (res_out, res_lse) if return_lse else res_out
    places = {n: _where(x) for n, x in (("q", q), ("k", k), ("v", v))}
    if out is not None:
        places["out"] = _where(out)
    gpu = "gpu" in places.values()
    if gpu and any(p != "gpu" for p in places.values()):
        desc = ", ".join(f"{n} on the {'GPU' if p == 'gpu' else 'CPU'}" for n, p in places.items())
        raise TypeError(f"q, k, v, out: expected arrays on one device, got {desc}")
    if gpu:
        if _CUPY_NDARRAY is None:
            from .kernels import _cupy

            _CUPY_NDARRAY = _cupy().ndarray  # clear error naming the extra when CuPy is missing
        q, k, v = _to_gpu(q, "q"), _to_gpu(k, "k"), _to_gpu(v, "v")
        out_arr = _to_gpu(out, "out") if out is not None else None
        lens = None
        if kv_lens is not None:
            lens = _to_gpu(kv_lens, "kv_lens") if _where(kv_lens) == "gpu" else _host_ints(kv_lens, "kv_lens")
        table = None
        if block_table is not None:
            table = (_to_gpu(block_table, "block_table") if _where(block_table) == "gpu"
                     else _host_ints(block_table, "block_table"))
    else:
        q, k, v = _to_cpu(q, "q"), _to_cpu(k, "k"), _to_cpu(v, "v")
        out_arr = out if (out is None or isinstance(out, (list, tuple))) else _to_cpu(out, "out")
        lens = None if kv_lens is None else _host_ints(kv_lens, "kv_lens")
        table = None if block_table is None else _host_ints(block_table, "block_table")

    m = _validate(q, k, v, lens, table, scale, out_arr, schedule, num_ctas, tile_size, gpu)
    host_lens = lens if isinstance(lens, np.ndarray) else None
    host_table = table if isinstance(table, np.ndarray) else None
    if host_lens is not None or host_table is not None:
        _check_host_values(m, host_lens, host_table)

    if gpu:
        if _gpu_mod is None:
            from . import _gpu as _gpu_mod
        res_out, res_lse = _gpu_mod.attention(q, k, v, lens, table, m, out_arr, return_lse, schedule,
                                              num_ctas, tile_size, validate)
        if _cacheable(q, k, v, out_arr, lens, table, scale):
            if len(_FAST) > 256:
                _FAST.clear()
            _FAST[_signature(q, k, v, out_arr, lens, table, scale, schedule, num_ctas, tile_size)] = m
    else:
        res_out, res_lse = _cpu_attention(q, k, v, lens, table, m, out_arr)
    return (res_out, res_lse) if return_lse else res_out


_FAST: dict = {}
_gpu_mod = None


def _cacheable(q, k, v, out, lens, table, scale):
    """Every array a CuPy ndarray (or None) and scale None or a float: the
    validation result then depends only on :func:`_signature`."""
    nd = _CUPY_NDARRAY
    return (type(q) is nd and type(k) is nd and type(v) is nd
            and (out is None or type(out) is nd) and (lens is None or type(lens) is nd)
            and (table is None or type(table) is nd) and (scale is None or type(scale) is float))


def _signature(q, k, v, out, lens, table, scale, schedule, num_ctas, tile_size):
    return (q.shape, q.strides, q.dtype, k.shape, k.strides, k.dtype, v.shape, v.strides, v.dtype,
            None if out is None else (out.shape, out.strides, out.dtype),
            None if lens is None else (lens.shape, lens.dtype),
            None if table is None else (table.shape, table.strides, table.dtype),
            scale, schedule, num_ctas, tile_size)


def _cpu_attention(q, k, v, lens, table, m, out):
    if m.batch == 0:
        o = np.zeros((0, m.heads_q, m.head_dim), dtype=q.dtype)
        lse = np.zeros((0, m.heads_q), dtype=np.float32)
    else:
        with np.errstate(all="ignore"):
            o64, lse64 = reference.attention(q, k, v, kv_lens=lens, block_table=table, scale=m.scale)
            o = o64.astype(q.dtype)
        lse = lse64.astype(np.float32)
    if out is not None:
        out[...] = o
        o = out
    return o, lse


def merge_states(outs, lses):
    """Merge attention results computed over disjoint parts of the same KV
    sequences.

    Parameters
    ----------
    outs : array, shape (parts, ..., head_dim)
        Normalised attention outputs of each part, stacked on a leading axis
        (e.g. ``(parts, batch, heads, head_dim)``). float16, bfloat16 or
        float32 (NumPy also float64).
    lses : array, shape (parts, ...)
        Log-sum-exp (natural log) of each part, as returned with
        ``return_lse=True``; ``-inf`` marks an empty part.

    Returns
    -------
    out : array, shape (..., head_dim), outs' dtype
    lse : float32 array, shape (...)
        The attention result over the union of the parts. Where every part is
        empty: zeros and ``-inf``. NumPy in, NumPy out; GPU in, CuPy out (parts
        merged in order, deterministic).
    """
    where = {_where(outs), _where(lses)}
    gpu = "gpu" in where
    if gpu and where != {"gpu"}:
        raise TypeError("outs, lses: expected arrays on one device, got one on the GPU and one on the CPU")
    if gpu:
        outs, lses = _to_gpu(outs, "outs"), _to_gpu(lses, "lses")
    else:
        outs, lses = _to_cpu(outs, "outs"), _to_cpu(lses, "lses")
    if outs.ndim < 2:
        raise ValueError(f"outs: expected at least 2 dimensions (parts, ..., head_dim), got shape {tuple(outs.shape)}")
    if tuple(lses.shape) != tuple(outs.shape[:-1]):
        raise ValueError(f"lses: expected shape {tuple(outs.shape[:-1])} (outs.shape[:-1]), got {tuple(lses.shape)}")
    if outs.shape[0] < 1:
        raise ValueError("outs: expected at least one part on axis 0, got 0")
    allowed = _GPU_DTYPES + (np.dtype(np.float32),) + (() if gpu else (np.dtype(np.float64),))
    if outs.dtype not in allowed:
        raise TypeError(f"outs: expected dtype among {_dtype_names(allowed)}, got {outs.dtype}")
    if not (np.issubdtype(lses.dtype, np.floating) or lses.dtype == BFLOAT16):
        raise TypeError(f"lses: expected a floating dtype, got {lses.dtype}")
    if gpu:
        from . import _gpu

        return _gpu.merge_states(outs, lses)
    with np.errstate(all="ignore"):
        o, s = reference.merge_states(outs, lses)
    return o.astype(outs.dtype), s.astype(np.float32)

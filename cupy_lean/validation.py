"""Validation of attention() arguments, shared by the front end and plans.

Every error names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import schedule as _schedule
from ._dtypes import BFLOAT16, CPU_DTYPES, FP8_DTYPES, GPU_DTYPES, dtype_names
from .kernels import HEAD_DIMS, MAX_GROUP, MAX_PAGE_SIZE, TILE_SIZES

MAX_NUM_CTAS = 1 << 20


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


class Meta:
    """The validated shape of a call, as :func:`validate` returns it: batch,
    heads (query, KV, and their ratio ``group``), ``head_dim``, whether the
    cache is ``paged`` (then ``page_size``, ``num_pages`` and ``max_pages``,
    the block table's columns), ``seqlen`` (the dense cache's token axis),
    ``capacity`` (tokens a sequence may hold) and the softmax ``scale``."""

    __slots__ = ("batch", "heads_q", "heads_kv", "head_dim", "group", "paged", "seqlen",
                 "page_size", "num_pages", "max_pages", "capacity", "scale")


KV_LAYOUTS = ("NHD", "HND")


def kv_layout_views(k, v, kv_layout, paged):
    """k, v as NHD views (tokens before heads): an HND cache
    ``(batch | num_pages, heads_kv, seqlen | page_size, head_dim)`` is
    transposed without a copy."""
    if not isinstance(kv_layout, str) or kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout: expected one of {KV_LAYOUTS}, got {kv_layout!r}")
    if kv_layout == "NHD":
        return k, v
    axes = "(num_pages, heads_kv, page_size, head_dim)" if paged else "(batch, heads_kv, seqlen, head_dim)"
    _check_rank(k, "k", 4, axes + " (kv_layout='HND')")
    _check_rank(v, "v", 4, axes + " (kv_layout='HND')")
    return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


#: Longest sequence capacity of the GPU kernels (tile counts stay within 32 bits).
MAX_CAPACITY = 2**31 - 256


def validate(q, k, v, kv_lens, block_table, scale, out, sched, num_ctas, tile_size, gpu, kv8=None):
    """Check the arguments of one :func:`cupy_lean.attention` call and return
    its :class:`Meta`; raise ValueError or TypeError naming the argument,
    the expected and the actual value. ``q`` is 3-D here (for a 4-D ``q``
    the front end passes one query token's slice and checks the ``q_len``
    axis itself); ``gpu`` adds the kernels' limits
    (head_dim, group, page size, dtypes, ``num_ctas``, ``tile_size``);
    ``kv8``: the fp8 format of an fp8 cache (None: K and V share q's dtype).
    Values on the GPU (lengths, block tables) are checked here only where
    they are on the host; the front end's ``validate=True`` checks the rest
    on the device."""
    if q.ndim != 3:
        raise ValueError(f"q: expected 3 dimensions (batch, heads_q, head_dim) or 4 (batch, q_len, heads_q, "
                         f"head_dim), got shape {tuple(q.shape)}")
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
    if d < 1:
        raise ValueError(f"q: expected head_dim >= 1 (q.shape[-1]), got {d}")
    if hq % hkv != 0 or hq == 0:
        raise ValueError(f"q: heads_q must be a positive multiple of heads_kv, got heads_q={hq}, heads_kv={hkv} "
                         f"(heads_kv: k's axis 2 as {kaxes}, its axis 1 with kv_layout='HND')")
    if not paged and int(k.shape[0]) != batch:
        raise ValueError(f"k: expected batch {batch} (q.shape[0]), got {int(k.shape[0])}")

    supported = GPU_DTYPES if gpu else CPU_DTYPES
    fp8 = not gpu and k.dtype in FP8_DTYPES.values()  # an fp8 cache (NumPy path), q in its own precision
    if gpu and kv8 is not None:  # an fp8 cache on the GPU: uint8 storage read as kv_dtype
        for name, x in (("k", k), ("v", v)):
            if x.dtype != np.uint8:
                raise TypeError(f"{name}: kv_dtype={kv8!r} on the GPU reads uint8 storage, got {x.dtype}")
        fp8 = True
    for name, x in (("q", q),) + ((("k", k), ("v", v)) if not fp8 else ()):
        if x.dtype not in supported:
            where = "GPU" if gpu else "NumPy"
            hint = (" (an fp8 cache stored as uint8 needs kv_dtype='e4m3' or 'e5m2')"
                    if name != "q" and x.dtype == np.uint8 else "")
            raise TypeError(f"{name}: the {where} path supports dtypes {dtype_names(supported)}, got {x.dtype}{hint}")
    if fp8 and v.dtype != k.dtype:
        raise TypeError(f"v: expected k's fp8 dtype {k.dtype}, got {v.dtype}")
    if not fp8 and not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_last_contiguous(x, name)

    m = Meta()
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
    if gpu and m.capacity > MAX_CAPACITY:
        raise ValueError(f"k: capacity per sequence must be at most {MAX_CAPACITY} tokens (2**31 - 256: the "
                         f"kernel counts tiles in 32 bits), got {m.capacity}")

    if kv_lens is not None:
        if kv_lens.ndim != 1 or int(kv_lens.shape[0]) != batch:
            raise ValueError(f"kv_lens: expected shape ({batch},), got {tuple(kv_lens.shape)}")
        if kv_lens.dtype == object:  # Python integers too large for int64 (a list made into an array)
            vals = kv_lens.tolist()
            big = [i for i, x in enumerate(vals) if isinstance(x, int) and not isinstance(x, bool)
                   and not 0 <= x <= m.capacity]
            if big and all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
                raise ValueError(f"kv_lens: expected values in [0, {m.capacity}] (the cache capacity), "
                                 f"got kv_lens[{big[0]}] = {vals[big[0]]}")
        if not np.issubdtype(kv_lens.dtype, np.integer):
            raise TypeError(f"kv_lens: expected an integer dtype, got {kv_lens.dtype}")

    check_out(out, (batch, hq, d), q.dtype)

    if scale is None:
        m.scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    else:
        fscale = _check_real(scale, "scale")
        if not math.isfinite(fscale):
            raise ValueError(f"scale: expected a finite number, got {_real_text(scale, fscale)}")
        m.scale = fscale

    validate_options(sched, num_ctas, tile_size)
    return m


def _output_array(x, name, shape, what):
    """The checks every output array gets: an array (not a list), writeable,
    of ``shape``; ``what`` names the expected array in the TypeError."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or isinstance(x, (list, tuple)):
        raise TypeError(f"{name}: expected {what} of shape {tuple(shape)}, got {type(x).__name__}")
    flags = getattr(x, "flags", None)
    if flags is not None and hasattr(flags, "writeable") and not flags.writeable:
        raise ValueError(f"{name}: expected a writeable array, got a read-only one")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")


def check_out(out, shape, dtype):
    """Checks of an ``out`` array (None: nothing to check): an array of
    ``shape`` and ``dtype`` (q's), writeable, unit stride on the last axis,
    no two elements at one address (strides that may overlap are refused)."""
    if out is None:
        return
    _output_array(out, "out", shape, "an array")
    if out.dtype != dtype:
        raise TypeError(f"out: expected dtype {dtype} (q's dtype), got {out.dtype}")
    _check_last_contiguous(out, "out")
    _check_no_overlap(out, "out")


def _check_no_overlap(a, name):
    """Refuses an array two of whose elements may share an address. Taken
    from the smallest stride up, each axis's stride must reach past all that
    the axes inside it span: a sufficient test, which refuses only
    interleaved layouts that no array library makes."""
    if a.size <= 1:
        return
    span = a.dtype.itemsize  # bytes covered by the axes taken so far, from the first element on
    for st, n, axis in sorted((abs(st), n, axis) for axis, (n, st) in enumerate(zip(a.shape, a.strides)) if n > 1):
        if st == 0:  # an expanded array: every row would be written to the same place
            raise ValueError(f"{name}: expected elements that do not overlap, got a stride of 0 on axis {axis} "
                             f"(of size {n})")
        if st < span:
            raise ValueError(f"{name}: expected elements that do not overlap, got strides {tuple(a.strides)} for "
                             f"shape {tuple(a.shape)} (itemsize {a.dtype.itemsize}): axis {axis}'s stride {st} is "
                             f"less than the {span} bytes the axes inside it span")
        span = st * (n - 1) + span


def check_lse(lse, shape):
    """Checks of an ``lse`` array (None: nothing to check): a C-contiguous,
    writeable float32 array of ``shape``."""
    if lse is None:
        return
    _output_array(lse, "lse", shape, "a float32 array")
    if lse.dtype != np.float32:
        raise TypeError(f"lse: expected dtype float32, got {lse.dtype}")
    if getattr(lse, "flags", None) is not None and not lse.flags.c_contiguous:
        raise ValueError(f"lse: expected a C-contiguous array, got strides {tuple(lse.strides)}")


def check_batch_invariant(sched, num_ctas):
    """``batch_invariant=True`` fixes each sequence's decomposition (split-K
    of a fixed chunk count, or one CTA per unit with 'head'): schedule
    'lean' or 'head' and no CTA count."""
    if sched not in ("lean", "head") or num_ctas is not None:
        raise ValueError(f"batch_invariant: needs schedule 'lean' or 'head' and num_ctas None (the "
                         f"decomposition is fixed per sequence), got schedule={sched!r}, num_ctas={num_ctas!r}")


def check_lean_options(sched, ctas_per_sm=None, min_tiles_per_cta=None, merge_balance=None):
    """The stream-K options shape the lean schedule only: refused (not
    ignored) with the split and head schedules. ``merge_balance`` 0 is the
    default (off) and passes."""
    if sched not in ("split", "head"):  # lean, or a bad schedule (named by validate_options)
        return
    given = [f"{name}={value!r}" for name, value in (("ctas_per_sm", ctas_per_sm),
                                                     ("min_tiles_per_cta", min_tiles_per_cta),
                                                     ("merge_balance", merge_balance or None))
             if value is not None]
    if given:
        raise ValueError(f"{given[0].split('=')[0]}: a stream-K option, for schedule 'lean' only; got "
                         f"{', '.join(given)} with schedule={sched!r}")


def validate_options(sched, num_ctas, tile_size):
    """Checks of the schedule, CTA count and tile size options."""
    if not isinstance(sched, str) or sched not in _schedule.SCHEDULES:
        raise ValueError(f"schedule: expected one of {_schedule.SCHEDULES}, got {sched!r}")
    if tile_size is not None:
        tile_size = _check_int(tile_size, "tile_size", 1)
        if tile_size not in TILE_SIZES:
            raise ValueError(f"tile_size: expected one of {TILE_SIZES}, got {tile_size}")
    if num_ctas is not None:
        _check_int(num_ctas, "num_ctas", 1, MAX_NUM_CTAS)


class Features:
    """Validated optional semantics of a call (None / False: off)."""

    __slots__ = ("sinks", "window_left", "softcap", "kv_scales", "kv8")

    def __init__(self, sinks=None, window_left=None, softcap=None):
        self.sinks, self.window_left, self.softcap = sinks, window_left, softcap
        self.kv_scales = None  # fp8 cache: (k_scale, v_scale) per KV head
        self.kv8 = None  # GPU fp8 cache: "e4m3" | "e5m2"

    def any(self):
        """Whether any optional semantics is on (sinks, a window, a
        soft-cap or an fp8 cache)."""
        return (self.sinks is not None or self.window_left is not None or self.softcap is not None
                or self.kv8 is not None)


def scalar(value):
    """A NumPy 0-d array of real numbers as its value (others as they are)."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
        return value[()]
    return value


def _check_real(value, name):
    value = scalar(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:  # an integer past float's range
        return math.inf if value > 0 else -math.inf


def _real_text(value, f):
    """``value`` (read as the float ``f``) for a message: an integer past
    float's range by its size, not its hundreds of digits."""
    value = scalar(value)
    if isinstance(value, (int, np.integer)) and not math.isfinite(f):
        return f"an integer of {len(str(abs(int(value))))} digits"
    return repr(f)


def check_sink_values(sinks):
    """Host ``sinks`` as float64, refusing NaN and +inf (-inf: no sink for
    that head)."""
    vals = np.asarray(sinks, dtype=np.float64)
    bad = np.nonzero(np.isnan(vals) | (vals == np.inf))[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"sinks: expected finite values (or -inf: no sink), got sinks[{i}] = {vals[i]}")
    return vals


def validate_features(m, sinks, window_left, softcap, gpu):
    """Checks of the optional semantics: ``sinks`` (heads_q,) real values
    (NaN and +inf refused; -inf is "no sink" for that head), ``window_left``
    an integer >= 0 (None or -1: no window), ``softcap`` a finite number > 0
    (None: none). Returns :class:`Features` (sinks as float64 on the CPU)."""
    f = Features()
    if sinks is not None:
        if not hasattr(sinks, "shape") or not hasattr(sinks, "dtype"):
            raise TypeError(f"sinks: expected an array of shape ({m.heads_q},), got {type(sinks).__name__}")
        if not (np.issubdtype(sinks.dtype, np.floating) or sinks.dtype == BFLOAT16):
            raise TypeError(f"sinks: expected a floating dtype, got {sinks.dtype}")
        if tuple(sinks.shape) != (m.heads_q,):
            raise ValueError(f"sinks: expected shape ({m.heads_q},) (one logit per query head), "
                             f"got {tuple(sinks.shape)}")
        if not gpu:
            f.sinks = check_sink_values(sinks)
        else:
            f.sinks = sinks
    if window_left is not None:
        w = _check_int(window_left, "window_left", -1)
        # A window of at least the capacity sees every key: clamped there, so
        # the kernel's 32-bit field never wraps.
        f.window_left = None if w == -1 else min(w, max(int(m.capacity), 0))
    if softcap is not None:
        c = _check_real(softcap, "softcap")
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"softcap: expected a finite number > 0 (None: no soft-capping), got "
                             f"{_real_text(softcap, c)}")
        f.softcap = c
    return f


def fp8_cache(k, v, kv_dtype, k_scale, v_scale):
    """``(k, v)`` as the fp8 view of an fp8 KV cache, or None for a cache
    that is not fp8 (then no scale may be given).

    ``kv_dtype`` ("e4m3" or "e5m2") reads ``uint8`` storage as that type;
    without it ``k`` and ``v`` must already be ``float8_e4m3fn`` /
    ``float8_e5m2`` (ml_dtypes, or PyTorch through DLPack). The scales'
    values are checked by :func:`fp8_scales`, once :func:`validate` has
    checked k and v (their rank and shape give ``heads_kv``)."""
    if kv_dtype is not None:
        if not isinstance(kv_dtype, str) or kv_dtype not in FP8_DTYPES:
            raise ValueError(f"kv_dtype: expected one of {tuple(FP8_DTYPES)}, got {kv_dtype!r}")
        for name, x in (("k", k), ("v", v)):
            if x.dtype not in (np.dtype(np.uint8), FP8_DTYPES[kv_dtype]):
                raise TypeError(f"{name}: kv_dtype={kv_dtype!r} reads uint8 storage, got {x.dtype}")
        k, v = k.view(FP8_DTYPES[kv_dtype]), v.view(FP8_DTYPES[kv_dtype])
    elif k.dtype not in FP8_DTYPES.values():
        for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
            if sc is not None:
                raise ValueError(f"{name}: only with an fp8 KV cache (k of dtype float8_e4m3fn / float8_e5m2, "
                                 f"or kv_dtype=), got k of dtype {k.dtype}")
        return None
    return k, v


def fp8_scales(k_scale, v_scale, heads_kv):
    """``k_scale`` / ``v_scale`` of an fp8 cache as float64 arrays of shape
    ``(heads_kv,)``: a number or such an array (host values), finite and > 0;
    None: 1."""
    scales = []
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        if sc is None:
            scales.append(np.ones(heads_kv))
            continue
        try:
            arr = np.asarray(sc, dtype=np.float64) if not isinstance(sc, (bool, str, bytes)) else None
        except (TypeError, ValueError):  # a complex number, an object that is no number
            arr = None
        if arr is None or arr.ndim > 1 or (arr.ndim == 1 and arr.shape != (heads_kv,)):
            # not a number (TypeError) or numbers of another shape (ValueError)
            raise (TypeError if arr is None else ValueError)(
                f"{name}: expected a number or an array of shape ({heads_kv},), got "
                f"{type(sc).__name__} {getattr(sc, 'shape', sc)!r}")
        bad = ~(np.isfinite(arr) & (arr > 0))
        if bad.any():
            i = int(np.argmax(bad))
            got = f"{float(arr)}" if arr.ndim == 0 else f"{name}[{i}] = {float(arr[i])}"
            raise ValueError(f"{name}: expected finite values > 0, got {got}")
        scales.append(np.broadcast_to(arr, (heads_kv,)).copy())
    return scales[0], scales[1]


def check_range(x, lo, hi, name, bound):
    """Raise ValueError naming the first entry of the 1-D integer array ``x``
    (NumPy or CuPy) outside ``[lo, hi]``; ``bound`` says what ``hi`` is."""
    bad = (x < lo) | (x > hi)
    if bool(bad.any()):
        i = int(bad.argmax())
        raise ValueError(f"{name}: expected values in [{lo}, {hi}] ({bound}), got {name}[{i}] = {int(x[i])}")


def check_host_values(m, lens, table):
    """Range checks of kv_lens / block_table given on the host."""
    if lens is not None and lens.size:
        check_range(lens, 0, m.capacity, "kv_lens", "the cache capacity")
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


def validate_merge(outs, lses, gpu):
    """Checks of merge_states' arguments (front end and reference alike)."""
    if outs.ndim < 2:
        raise ValueError(f"outs: expected at least 2 dimensions (parts, ..., head_dim), got shape {tuple(outs.shape)}")
    if tuple(lses.shape) != tuple(outs.shape[:-1]):
        raise ValueError(f"lses: expected shape {tuple(outs.shape[:-1])} (outs.shape[:-1]), got {tuple(lses.shape)}")
    if outs.shape[0] < 1:
        raise ValueError("outs: expected at least one part on axis 0, got 0")
    allowed = GPU_DTYPES + (np.dtype(np.float32),) + (() if gpu else (np.dtype(np.float64),))
    if outs.dtype not in allowed:
        raise TypeError(f"outs: expected dtype among {dtype_names(allowed)}, got {outs.dtype}")
    if not (np.issubdtype(lses.dtype, np.floating) or lses.dtype == BFLOAT16):
        raise TypeError(f"lses: expected a floating dtype, got {lses.dtype}")
    if not gpu and lses.size:  # host values: NaN and +inf would make every merged row NaN
        vals = np.asarray(lses, dtype=np.float64)
        bad = np.isnan(vals) | (vals == np.inf)
        if bad.any():
            i = tuple(int(j) for j in np.argwhere(bad)[0])
            raise ValueError(f"lses: expected finite values or -inf (an empty part), got lses{list(i)} = "
                             f"{vals[i]}")

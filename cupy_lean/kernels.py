"""Kernel specs, run-time compilation (NVRTC through ``cupy.RawModule``) and
launches.

A *spec* is the set of compile-time parameters of the attention kernel:
dtype, head dim, query tiles per unit (``m_tiles = ceil(group / 16)`` rounded
up to a power of two), tile size, pipeline depth and paged-or-dense. Each spec
is one ``RawModule`` whose name is built from those parameters only; every
other quantity (lengths, strides, counts, scale) is a kernel argument, so a new
batch size or context length never recompiles.

The hash of every file in ``kernels_cu/`` goes into the compile options, so
CuPy's on-disk cache recompiles when a header changes.

Nothing here imports CuPy at module import time: ``import cupy_lean`` works on
a machine without CuPy, and :func:`compile_cubin` compiles a spec with NVRTC
alone (no GPU needed), which is what the CPU tests do for sm_80 and sm_90.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import functools
import hashlib
import math
import os
import pathlib
import re

import numpy as np

from . import _cache
from .schedule import MERGE_TREE_FROM, _check_positive_int

__all__ = [
    "Spec",
    "make_spec",
    "shipped_specs",
    "compile_cubin",
    "compile_options",
    "kernel_dir",
    "warmup",
    "Decomposition",
    "Params",
]

HEAD_DIMS = (64, 128, 256)
TILE_SIZES = (16, 32, 64, 128)
M_TILES = (1, 2, 4, 8)
MAX_GROUP = 128
MAX_PAGE_SIZE = 256
LENS_CACHE = 256  # lengths kept in shared memory (the kernel static_asserts it equals its own)


#: Optional semantics a spec can compile in (``LEAN_FEATURES`` bits).
FEATURES = {"sinks": 1, "softcap": 2, "window": 4, "qlen": 8, "fp8_e4m3": 16, "fp8_e5m2": 32,
            "page_rows": 64, "fp8_wide_k": 128, "head_lanes": 256}
#: ``page_rows``: a paged cache whose page size the loader's run of rows per
#: thread (:attr:`Spec.run_rows`) does not divide (e.g. 1) reads the block
#: table per row; other page sizes read it once per run (see make_spec).
#: ``fp8_wide_k`` (fp8 specs, with ``TUNING["fp8_wide_k_reads"]``): each lane
#: reads 16 bytes of a K row per load instead of 4, q's columns regrouped to
#: match (an experiment; see the kernel's FP8_WIDE_K).
#: ``head_lanes`` (fp8 specs; the plan sets it, see :func:`head_lanes`): the
#: launch runs ``Params.lanes`` copies of one schedule side by side, lane l on
#: KV heads l, L + l, ..., CTAs cL .. cL + L - 1 doing the same work on L
#: neighbouring heads at once (the kernel's LANES).
#: fp8 K/V formats and their feature bits.
FP8_FEATURES = {"e4m3": FEATURES["fp8_e4m3"], "e5m2": FEATURES["fp8_e5m2"]}
FP8_BITS = FEATURES["fp8_e4m3"] | FEATURES["fp8_e5m2"]


class Decomposition(enum.IntEnum):
    """How the kernel cuts the work (``lean::Decomposition`` in the source)."""

    STREAM_K = 0  #: LeanAttention: even tile ranges over a persistent grid, partial units merged by the last
    SPLIT_K = 1  #: ``num_splits`` chunks per unit, one CTA each, then a combine launch (1: one CTA per unit)


class Params(ctypes.Structure):
    """The kernel's one parameter (``lean::Params``, passed as ``const
    __grid_constant__``), field by field. The compile options carry every
    field's name and size in order, and the struct's size; the source
    ``static_assert``s that its own list is the same, so a drift fails the
    compile (CPU tests) instead of a launch."""

    _fields_ = [
        ("q", ctypes.c_uint64), ("k", ctypes.c_uint64), ("v", ctypes.c_uint64), ("out", ctypes.c_uint64),
        ("lse", ctypes.c_uint64), ("kv_lens", ctypes.c_uint64), ("block_table", ctypes.c_uint64),
        ("partials", ctypes.c_uint64), ("counters", ctypes.c_uint64), ("unit_meta", ctypes.c_uint64),
        ("q_sb", ctypes.c_int64), ("q_sh", ctypes.c_int64),
        ("k_sb", ctypes.c_int64), ("k_st", ctypes.c_int64), ("k_sh", ctypes.c_int64),
        ("v_sb", ctypes.c_int64), ("v_st", ctypes.c_int64), ("v_sh", ctypes.c_int64),
        ("o_sb", ctypes.c_int64), ("o_sh", ctypes.c_int64), ("bt_sb", ctypes.c_int64),
        ("batch", ctypes.c_int32), ("heads_kv", ctypes.c_int32), ("group", ctypes.c_int32),
        ("capacity", ctypes.c_int32), ("page_size", ctypes.c_int32), ("num_pages", ctypes.c_int32),
        ("decomposition", ctypes.c_int32), ("num_splits", ctypes.c_int32),
        ("scale_log2", ctypes.c_float), ("slot_stride", ctypes.c_int32),
        ("sinks", ctypes.c_uint64), ("softcap_scale", ctypes.c_float), ("softcap_log2", ctypes.c_float),
        ("window_left", ctypes.c_int32), ("min_tiles_per_cta", ctypes.c_int32), ("merge_balance", ctypes.c_int32),
        ("q_len", ctypes.c_int32), ("q_st", ctypes.c_int64), ("o_st", ctypes.c_int64),
        ("q_lens", ctypes.c_uint64), ("k_scale", ctypes.c_uint64), ("v_scale", ctypes.c_uint64),
        ("k_scale_value", ctypes.c_float), ("v_scale_value", ctypes.c_float),
        ("runtime_split", ctypes.c_int32), ("split_slack", ctypes.c_int32), ("split_cap", ctypes.c_int32),
        ("page_magic", ctypes.c_uint32), ("page_shift", ctypes.c_int32),
        ("split_prefetch", ctypes.c_int32), ("lanes", ctypes.c_int32), ("lane_counters", ctypes.c_int32),
        ("lane_slots", ctypes.c_int64), ("lane_meta", ctypes.c_int32),
        ("lane_magic", ctypes.c_uint32), ("lane_shift", ctypes.c_int32),
    ]


def index_divisor(d, name="page_size"):
    """``(magic, shift)`` for the kernel's division of an index by ``d`` (a
    token index by the page size, a block index by the lane count) without
    a divide: ``n // d == ((n * magic >> 32) + n) >> shift`` for every
    ``0 <= n < 2**31`` (``shift`` = ceil(log2 d), ``magic`` = floor(2**32
    (2**shift - d) / d) + 1, below 2**32; the sum stays under 2**32).
    ``name``: the argument an error names."""
    d = _check_positive_int(d, name)  # (2.5 would divide by 2)
    shift = (d - 1).bit_length()
    return ((1 << 32) * ((1 << shift) - d)) // d + 1, shift


#: The pointer fields, first in :class:`Params` (a launch sets them with one
#: slice assignment through :func:`pointer_view`).
POINTER_FIELDS = ("q", "k", "v", "out", "lse", "kv_lens", "block_table", "partials", "counters",
                  "unit_meta")
#: Schedule dump records (``lean::DUMP_HEADER`` / ``DUMP_RECORD``): ints per CTA header and per segment.
DUMP_HEADER, DUMP_RECORD = 3, 7


def pointer_view(params):
    """The pointer fields of a :class:`Params` as one ``c_uint64`` array over
    the same memory."""
    return (ctypes.c_uint64 * len(POINTER_FIELDS)).from_buffer(params)


def _params_layout_options():
    fields = ",".join(f'{{"{name}",{ctypes.sizeof(ct)}}}' for name, ct in Params._fields_)
    return [f"-DLEAN_HOST_PARAMS={fields}", f"-DLEAN_HOST_PARAMS_SIZE={ctypes.sizeof(Params)}",
            f"-DLEAN_HOST_STREAM_K={int(Decomposition.STREAM_K)}",
            f"-DLEAN_HOST_SPLIT_K={int(Decomposition.SPLIT_K)}",
            f"-DLEAN_HOST_LENS_CACHE={LENS_CACHE}",
            f"-DLEAN_HOST_DUMP_HEADER={DUMP_HEADER}", f"-DLEAN_HOST_DUMP_RECORD={DUMP_RECORD}",
            f"-DLEAN_HOST_MERGE_TREE_FROM={MERGE_TREE_FROM}"]

_CUPY_HINT = (
    "CuPy is needed for GPU arrays: install cupy-lean with the extra of your CUDA driver, "
    "pip install -e '.[cuda13]' (CUDA 13) or -e '.[cuda12]' (CUDA 12) from a checkout; NumPy arrays "
    "run the CPU path without CuPy"
)


def _cupy():
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError(_CUPY_HINT) from exc
    return cupy


def require_device():
    """Raise RuntimeError saying what is missing when CuPy sees no usable
    CUDA GPU (no GPU, no driver, or a driver older than CuPy's CUDA)."""
    cp = _cupy()
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        if "InsufficientDriver" in why:  # what the CUDA runtime also says with no NVIDIA driver at all
            why += "; CUDA reports this too when no NVIDIA driver is installed"
    else:
        if n > 0:
            return
        why = "no CUDA device found"
    try:
        built = cp.cuda.runtime.runtimeGetVersion()
        cuda = f"CUDA {built // 1000}.{built % 1000 // 10}"
    except Exception:
        cuda = "its CUDA version"
    raise RuntimeError(
        f"cupy_lean: no usable CUDA GPU ({why}). CuPy {cp.__version__} is built for {cuda}: the GPU path needs "
        f"an NVIDIA GPU and a driver at least that new (nvidia-smi shows both), and the cupy-lean extra that "
        f"matches the driver ('.[cuda13]' or '.[cuda12]'). NumPy arrays run the CPU path without a GPU.")


# --------------------------------------------------------------------- sources

@functools.lru_cache(maxsize=None)
def kernel_dir() -> pathlib.Path:
    """Folder of the CUDA sources: inside the installed package, or the
    checkout's top-level ``kernels_cu/``."""
    here = pathlib.Path(__file__).resolve().parent
    for cand in (here / "kernels_cu", here.parent / "kernels_cu"):
        if (cand / "lean_attention.cu").is_file():
            return cand
    raise FileNotFoundError(
        f"cupy_lean: CUDA sources not found in {here / 'kernels_cu'} or {here.parent / 'kernels_cu'}"
    )


@functools.lru_cache(maxsize=None)
def _sources():
    d = kernel_dir()
    files = sorted(p for p in d.iterdir() if p.suffix in (".cu", ".cuh"))
    h = hashlib.sha256()
    texts = {}
    for p in files:
        data = p.read_bytes()
        h.update(p.name.encode() + b"\0" + data + b"\0")
        texts[p.name] = data.decode()
    return texts, h.hexdigest()[:16]


def source_hash() -> str:
    """Hash of every kernel source file (part of the compile options)."""
    return _sources()[1]


# --------------------------------------------------------------------- specs

#: The dtype names of :class:`Spec`, and the NumPy names :func:`make_spec`
#: and :func:`warmup` also take for them.
SPEC_DTYPES = {"f16": "float16", "bf16": "bfloat16"}


def _spec_dtype(dtype):
    """``dtype`` as a :class:`Spec` dtype name ("f16" / "bf16"), from that
    name or NumPy's ("float16" / "bfloat16"); ValueError naming it else."""
    name = str(dtype)
    for short, long in SPEC_DTYPES.items():
        if name in (short, long):
            return short
    raise ValueError(f"dtype: expected one of {tuple(SPEC_DTYPES)} or {tuple(SPEC_DTYPES.values())}, got {dtype!r}")


def _pow2_at_least(n):
    p = 1
    while p < n:
        p *= 2
    return p


@dataclasses.dataclass(frozen=True)
class Spec:
    """Compile-time parameters of one attention module (one NVRTC
    compilation): ``dtype`` of q, out (and 16-bit K/V), ``"f16"`` or
    ``"bf16"``; ``head_dim``; ``m_tiles`` 16-row query tiles per unit (a
    power of two); ``tile`` tokens per K/V tile; ``stages`` of the copy
    pipeline; ``paged`` cache; ``features``, the :data:`FEATURES` bits
    compiled in. Build one with :func:`make_spec`, which checks the values
    and picks the defaults. ``"float16"`` / ``"bfloat16"`` are taken as the
    short names; another ``dtype`` raises ValueError."""

    dtype: str  # "f16" or "bf16"
    head_dim: int
    m_tiles: int
    tile: int
    stages: int
    paged: bool
    features: int = 0  # FEATURES bits compiled in (0: the plain kernel)

    def __post_init__(self):
        object.__setattr__(self, "dtype", _spec_dtype(self.dtype))  # NumPy's names as the short ones

    @property
    def name(self) -> str:
        """The spec's name: its fields, and its optional features."""
        extra = "".join(f"_{n}" for n, bit in FEATURES.items() if self.features & bit)
        return (f"lean_{self.dtype}_d{self.head_dim}_m{self.m_tiles}_t{self.tile}"
                f"_s{self.stages}_{'paged' if self.paged else 'dense'}{extra}")

    # Warp layout, mirrored from kernels_cu/lean_attention.cu.
    @property
    def warps_n(self) -> int:
        """Warps along a tile's tokens (per 16-row query tile)."""
        wide = 2 if (self.m_tiles == 1 and self.tile >= 128) else 1
        return min(max(1, 4 // self.m_tiles) * wide, max(1, self.tile // (16 * self.m_tiles)))

    @property
    def threads(self) -> int:
        """Threads per CTA."""
        return 32 * self.m_tiles * self.warps_n

    @property
    def fp8(self) -> bool:
        """K/V are fp8 bytes (either format)."""
        return bool(self.features & FP8_BITS)

    @property
    def run_rows(self) -> int:
        """Paged: consecutive rows (tokens) of a tile one loader thread
        copies; when it divides the page size they lie on one page."""
        kcpr = self.head_dim * (1 if self.fp8 else 2) // 16  # 16-byte chunks per K/V row
        return max(1, self.tile // (self.threads // kcpr))

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory of a CTA: the K/V and q ring stages, the
        paged mask, the warps' statistics and the length cache."""
        d, t, s, mt = self.head_dim, self.tile, self.stages, self.m_tiles
        fp8 = self.fp8
        kv = 2 * t * d * (1 if fp8 else 2)  # the ring holds fp8 K/V as bytes
        qslot = mt * 16 * d * 2
        off_mask = s * kv + s * qslot
        mask = ((s * t + 15) // 16) * 16 if self.paged else 0
        stats = 2 * self.warps_n * mt * 16 * 4
        return off_mask + mask + stats + LENS_CACHE * 4 + 64 * 4

    @property
    def entry(self) -> str:
        """Name of the attention kernel in the compiled module."""
        return f"{self.name}_attention"

    @property
    def combine_entry(self) -> str:
        """Name of the combine (merge launch) kernel."""
        return f"{self.name}_combine"

    @property
    def dump_entry(self) -> str:
        """Name of the kernel that writes the schedule a launch would run
        (for tests against the NumPy mirror)."""
        return f"{self.name}_schedule_dump"


def _fits(tile, stages, head_dim, m_tiles, paged, budget):
    return Spec("f16", head_dim, m_tiles, tile, stages, paged).smem_bytes <= budget


def _hashable(value):
    """``value``, or its type and repr where it cannot be hashed (a list set
    by an experiment): the same items, the same key."""
    try:
        hash(value)
    except TypeError:
        return (type(value).__name__, repr(value))
    return value


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer past the float range
        return False


def _is_bool(v):
    return isinstance(v, (bool, np.bool_))


def _int_from(low, high=None):
    def check(v):
        return _is_int(v) and low <= v and (high is None or v <= high)
    text = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    return check, text


def _fraction():
    return (lambda v: _is_number(v) and 0 < v <= 1), "a number in (0, 1]"


def _per_head_dim(item, text):
    def check(v):
        return (isinstance(v, dict) and all(isinstance(k, str) or _is_int(k) for k in v)
                and all(item(x) for x in v.values()))
    return check, f"a dict from head_dims ('128' or 128) to {text}"


def _points(v):
    try:
        return len(v) > 0 and all(len(p) == 2 and all(_is_number(x) for x in p) for p in v)
    except TypeError:
        return False


# what each TUNING key's reader takes (checked when a value is set on the package's TUNING; readers whose
# key can go wrong past that check, e.g. a value set through dict.__setitem__, call _check_tuning_value too)
_TUNING_CHECKS = {
    "kv_tile_bytes": _int_from(1),
    "min_warps": _int_from(1),
    "deep_pipeline_smem": _int_from(0),
    "max_smem": _int_from(0),
    "one_cta_per_sm_above": _int_from(0),
    "max_ctas_per_sm": _int_from(1),
    "merge_balance": ((lambda v: _is_number(v) and v >= 0), "a number >= 0"),
    "uniform_variants": (_is_bool, "True or False"),
    "uniform_saturation": _fraction(),
    "uniform_model": ((lambda v: v in ("rates", "saturation") and isinstance(v, str)), '"rates" or "saturation"'),
    "partial_grid_time": _per_head_dim(_points, "lists of [fraction, time] pairs"),
    "cta_stream_gbs": _per_head_dim(lambda x: _is_number(x) and x > 0, "positive numbers (GB/s)"),
    "read_fraction": _fraction(),
    "fallback_hbm_tbps": ((lambda v: _is_number(v) and v > 0), "a positive number (TB/s)"),
    "many_units_d64": (_is_bool, "True or False"),
    "many_units_d64_t64_per_sm": _int_from(0),
    "short_unit_tokens": _int_from(0),
    "varied_lengths_d64_tile": ((lambda v: _is_int(v) and (v == 0 or (16 <= v <= 128 and v % 16 == 0))),
                                "0 or a tile of 16 to 128 tokens, a multiple of 16"),
    "fp8_varied_lengths_tile": ((lambda v: _is_bool(v) or (isinstance(v, str) and v == "paged")),
                                'True, False or "paged"'),
    "config_rules_with_features": (_is_bool, "True or False"),
    "many_units_d64_with_fp8": (_is_bool, "True or False"),
    "many_units_d64_fp8_max_unit_bytes": _int_from(0),
    "invariant_splits": _int_from(0),
    "merge_launch_pieces": _int_from(0),
    "runtime_split": (_is_bool, "True or False"),
    "runtime_split_in_kernel": (_is_bool, "True or False"),
    "runtime_split_in_kernel_scale": _int_from(1, 64),
    "runtime_split_in_kernel_cap_bytes": _int_from(0),
    "runtime_split_slack_bytes": _int_from(0),
    "split_prefetch": ((lambda v: _is_int(v) and v in (0, 1, 2)), "0, 1 or 2"),
    "split_prefetch_paged": ((lambda v: _is_int(v) and v in (0, 1, 2)), "0, 1 or 2"),
    "fp8_wide_k_reads": (_is_bool, "True or False"),
    "fp8_stage_factor": ((lambda v: _is_number(v) and v >= 1), "a number >= 1"),
    "fp8_head_lanes": (_is_bool, "True or False"),
    "fp8_head_lanes_sm_fraction": _fraction(),
    "fp8_head_lanes_group": _int_from(1),
    "fp8_head_lanes_count": ((lambda v: v is None or (_is_int(v) and v >= 1)), "None or an integer >= 1"),
    "fp8_pair_heads_max_page": _int_from(0),
    "fp8_pair_heads_dense": (_is_bool, "True or False"),
    "pdl": (_is_bool, "True or False"),
}


def _check_tuning_value(name, value):
    """Raise ValueError naming ``kernels.TUNING[name]``, what it takes and
    ``value`` when its reader would not take ``value``."""
    check, text = _TUNING_CHECKS[name]
    if not check(value):
        raise ValueError(f'kernels.TUNING["{name}"] must be {text}, got {value!r}')


class _Tuning(dict):
    """The dict of :data:`TUNING`: ``key`` is a small integer naming its
    current items (the same items, the same integer), kept current by every
    change. A launch plan's cache key includes it, so a plan made under other
    values is not reused after a change, and setting the values back finds
    the plans made under them again (an integer: the per-call lookup hashes
    no snapshot). A dict, so that experiments can log it (JSON): every
    mutating dict method is overridden below."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._changed()

    def _changed(self):
        keys = self.__dict__.setdefault("_keys", {})  # (a copy or unpickling sets items before attributes)
        items = tuple(sorted((name, _hashable(value)) for name, value in self.items()))
        self.key = keys.setdefault(items, len(keys))

    def _check_keys(self, names):
        # the package's TUNING (known set after it is built; copies have none): a key it does not
        # have would be read by nothing, so an experiment's typo would silently measure the default
        known = self.__dict__.get("_known")
        if known is not None:
            unknown = sorted(str(n) for n in names if n not in known)
            if unknown:
                raise ValueError(f"TUNING: unknown keys {unknown} (nothing reads them); TUNING has {sorted(known)}")

    def _check_items(self, items):
        # the package's TUNING: a key it does not have, or a value its reader would take wrongly
        # (runtime_split="False" counts as true, kv_tile_bytes="32k" fails deep in default_config)
        self._check_keys(items)
        if self.__dict__.get("_known") is not None:
            for name, value in items.items():
                _check_tuning_value(name, value)

    def __setitem__(self, name, value):
        self._check_items({name: value})
        super().__setitem__(name, value)
        self._changed()

    def __delitem__(self, name):
        super().__delitem__(name)
        self._changed()

    def update(self, *args, **kwargs):
        items = dict(*args, **kwargs)
        self._check_items(items)
        super().update(items)
        self._changed()

    def __ior__(self, other):
        self.update(other)
        return self

    def pop(self, *args):
        out = super().pop(*args)
        self._changed()
        return out

    def popitem(self):
        out = super().popitem()
        self._changed()
        return out

    def setdefault(self, name, default=None):
        if name not in self:
            self._check_items({name: default})
        out = super().setdefault(name, default)
        self._changed()
        return out

    def clear(self):
        super().clear()
        self._changed()


#: Tuning constants of the default configurations (measured on an H100, see
#: bench/NOTES.md), in one place. A change applies to the calls after it
#: (plans are cached per call signature and these values). Setting a key it
#: does not have, or a value its reader would not take (a type or range
#: each key's comment gives), raises ValueError naming the key.
TUNING = _Tuning({
    "kv_tile_bytes": 32 * 1024,  # K+V bytes of the first tile tried: tile = kv_tile_bytes / (4 * head_dim)
    "min_warps": 8,  # the tile doubles (up to 128) while that adds warps and the CTA has fewer
    "deep_pipeline_smem": 160 * 1024,  # 4 stages only up to this much shared memory
    "max_smem": 216 * 1024,  # 3 stages (2 at head_dim 256) up to this; nothing above it
    "one_cta_per_sm_above": 100 * 1024,  # two such CTAs did not co-reside reliably
    "max_ctas_per_sm": 2,
    # stream-K ranges >= sqrt(a x longest unit's tiles x state rows / tile) tiles; 0: no floor (since the
    # one-pass merge and the merge tree, the floor cost more streaming SMs than the merge it saved)
    "merge_balance": 0,
    # equal lengths (no kv_lens and a dense cache, or one sequence): the lean plan runs split-K or one CTA per unit where
    # schedule.uniform_variant's model says it streams as fast (False: always stream-K)
    "uniform_variants": True,
    # with "uniform_model" "saturation" (below): that model's wave of w CTAs streams at the whole DRAM bandwidth when w >= this fraction of the
    # grid, at w / (fraction x grid) of it below (schedule.uniform_variant's saturation). Measured on an
    # H100 (bench/NOTES.md session 29): w CTAs each streaming one unit (tools/cta_rate.py) read at
    # 0.94-0.99x stream-K's speed at 0.6-0.85 of the SMs with head_dim 64 and 128, at 0.996-1.0x from
    # 0.9 on; tools/spec_sweep.py on 10 dense calls of 0.85-2 GB whose split fills 70-90% of the SMs
    # (seed 29100101): 0.8 took 0.990x 0.7's time (0.952-1.026), and on 18 calls of 2k-40k tokens
    # (seed 20124321, where 0.7 was fitted to the split's wins) 0.998x (0.989-1.007). A fraction in (0, 1]
    "uniform_saturation": 0.8,
    # the equal-length model (schedule.uniform_variant): "rates" prices a wave of w CTAs by the measured
    # partial_grid_time and the CTAs' own streaming rate (cta_stream_gbs); "saturation" by the step above
    # (the model before 2026-12-06). On the stored H100 sweeps (38 dense calls, bench/NOTES.md session 30)
    # "rates" took 1.0025x / 1.0005x / 1.000x the best measured variant's time per seed, the saturation
    # step at 0.8 1.013x / 1.017x / 1.000x; it also gives the 9 H200 cases of the step's CPU test.
    "uniform_model": "rates",
    # per head_dim (a string key: TUNING stays JSON), [w / SMs, time over stream-K's on every SM] of w CTAs each streaming
    # one 8 MB unit (tools/cta_rate.py, H100 80GB HBM3, groups 1 and 8 averaged; session 29): a dip of
    # 1-6% between 0.6 and 0.85 of the SMs, none from 0.9 (schedule.partial_grid_time makes it
    # non-increasing in the fraction)
    "partial_grid_time": {
        "64": [[0.303, 1.389], [0.447, 1.002], [0.598, 1.005], [0.697, 1.01], [0.75, 1.025], [0.803, 1.022],
               [0.848, 1.022], [0.902, 0.997], [0.947, 0.997], [1.0, 0.977]],
        "128": [[0.303, 1.112], [0.447, 0.994], [0.598, 1.054], [0.697, 1.064], [0.75, 1.047], [0.803, 1.033],
               [0.848, 1.012], [0.902, 0.997], [0.947, 0.997], [1.0, 0.998]],
        "256": [[0.303, 1.291], [0.447, 1.09], [0.598, 1.019], [0.697, 1.011], [0.75, 1.008], [0.803, 1.0],
               [0.848, 0.997], [0.902, 0.999], [0.947, 0.998], [1.0, 0.998]]},
    # GB/s one CTA streams alone (40 CTAs of one unit each, the same measurement): with fewer than
    # read_fraction x DRAM bandwidth / this CTAs, the CTAs set the pace, not DRAM (an H200's 4.8 TB/s
    # needs ~0.64 of 132 SMs at head_dim 64, an H100's 3.35 ~0.45)
    "cta_stream_gbs": {"64": 51.1, "128": 63.7, "256": 55.2},
    "read_fraction": 0.9,  # of the DRAM bandwidth the driver reports, what stream-K reads (H100: 3.0-3.1 of 3.35)
    "fallback_hbm_tbps": 3.0,  # DRAM bandwidth assumed where the driver reports no memory clock
    # many units (many_unit_config), equal lengths, at least one unit per SM: at head_dim 64 one CTA
    # per unit (False: no such rule), at 64-token tiles up to this many units per SM, 32 above
    "many_units_d64": True,
    "many_units_d64_t64_per_sm": 2,
    # otherwise 32-token tiles for units of at most this many tokens (0: the default tile always)
    "short_unit_tokens": 640,
    # a lean call at head_dim 64 over sequences of varied lengths (kv_lens or pages, several sequences):
    # this tile (0: the default tile), half the default's, two CTAs of 4 warps per SM (varied_length_tile)
    "varied_lengths_d64_tile": 64,
    # ... also for an fp8 cache with no other feature: "paged" (paged caches only), True (ragged ones too) or
    # False (none); see varied_length_tile
    "fp8_varied_lengths_tile": "paged",
    # the two rules above (many_unit_config, varied_length_tile) also for calls with an optional feature
    # (sinks, window, soft-cap, query tokens, fp8; the window's length counting as the unit's tokens).
    # False: such calls keep the default tile. Measured on an H100 (bench/NOTES.md session 25, 8 fp8
    # family shapes, tools/fp8_timing.py --tuning config_rules_with_features=True): True took 1.035x the
    # e4m3 time (0.999-1.158, slower on the head_dim 64 calls), so it stays off
    "config_rules_with_features": False,
    # ... except many_unit_config's head_dim-64 rule (one CTA per unit at 64- or 32-token tiles) for a call
    # whose only optional feature is an fp8 cache, and units of at most many_units_d64_fp8_max_unit_bytes of
    # K and V: the rule overlaps each unit's fixed costs, which an fp8 unit (half the bytes for the same
    # work per tile) exposes more; on a long unit those costs are small, and one CTA per unit streams
    # slower than stream-K's grid. Measured on an H100 (bench/NOTES.md session 33, tools/fp8_timing.py,
    # dense head_dim 64, 132-408 units, e4m3): on 9 shapes of 954-10441 tokens (at most 1.34 MB of K and V
    # per unit) the rule took 0.72-0.94 of the default's time; on 4 of 16236-75810 tokens (2.1-9.7 MB)
    # 1.04-1.14, 0.87 on one of 31844 tokens (group 2), 1.03 on one of 719 tokens and 132 units. The
    # varied-length rule takes fp8 only in paged caches (fp8_varied_lengths_tile) and the short-unit rule
    # stays off for fp8 (not measured with fp8). With config_rules_with_features on, these two keys do not apply (every feature call
    # takes both rules, uncapped)
    "many_units_d64_with_fp8": True,
    "many_units_d64_fp8_max_unit_bytes": 3 << 19,  # 1.5 MiB: 12288 tokens at head_dim 64
    # batch_invariant=True: n >= 2 runs split-K with n chunks per unit whatever the batch (a chunk:
    # ceil(unit tiles / n) tiles, so a sequence's chunks depend on its own length only), merged in chunk
    # order by one combine CTA per unit; 0 runs one CTA per unit (the head decomposition). Measured on an
    # H100 (bench/NOTES.md session 24, 8 family shapes): 16 took 1.14x lean's time (geomean, 1.00-1.76),
    # the head decomposition 3.48x (1.01-23.3); bitwise invariant on the GPU test
    "invariant_splits": 16,
    # stream-K with at least this many CTAs per unit (grid >= n x units; 0: never): partial units merged by
    # a combine launch (rows spread over CTAs) instead of by each unit's last contributor in the kernel
    # (measured on ragged/paged calls of 2-20 units, bench/NOTES.md session 15)
    "merge_launch_pieces": 8,
    # with the merge launch (and without it, see runtime_split_in_kernel): each launch runs split-K in one
    # wave instead of stream-K when its busiest CTA would stream at most runtime_split_slack_bytes of K and
    # V more, in whole tiles, at least one (without the merge launch: runtime_split_in_kernel_scale times
    # stream-K's busiest, plus those bytes in tiles, none at least; launch_split_rule,
    # schedule.runtime_split_chunks, decided on the GPU from kv_lens). False: neither
    "runtime_split": True,
    # the same launch-time choice for default stream-K plans of several sequences of varied lengths
    # (kv_lens or pages; equal-length plans keep schedule.uniform_variant's choice) without the merge launch
    # (fewer than merge_launch_pieces CTAs per unit): the split's chunks are then merged in the kernel by each unit's
    # last arriving chunk, as stream-K's pieces are (no combine launch). Measured on an H100
    # (bench/NOTES.md session 26, tools/spec_sweep.py --family --configs default,sk_split_inkernel, 48
    # ragged/paged shapes up to 60 MB, seeds 341712192 and 99162041): 0.993x and 0.995x the time
    # (geomean), 0.84-0.86x where the split is taken, at most 1.012x where it is not. False: stream-K
    "runtime_split_in_kernel": True,
    # the in-kernel merge's rule (runtime_split_in_kernel): the split is taken when its busiest CTA streams
    # at most this many times stream-K's busiest CTA's tiles (plus runtime_split_slack_bytes, here without
    # the one-tile floor). A stream-K CTA that cuts a unit stores a partial and the unit's last piece merges
    # on the streaming path, so its cuts cost about its own range again. Measured on an H100
    # (bench/NOTES.md session 27, tools/spec_sweep.py --family --layouts ragged,paged --configs
    # sk_split_off,sk_split_force, 138 in-kernel shapes of 12 seeds up to 60 MB): 2 took 0.962x stream-K's
    # time (geomean; the best choice per shape 0.958x), the previous rule (1, one tile) 0.987x; 2 of 138
    # shapes above 1.02x (1.023, 1.043). Held out (6 other seeds, 72 in-kernel shapes): 0.980x the
    # previous rule's time. Integer, 1 to 64
    "runtime_split_in_kernel_scale": 2,
    # ... and at most this many bytes of K and V (in whole tiles) above stream-K's busiest CTA's range: the
    # factor prices a cut unit's merge as a CTA's range again, which holds on small calls only (the cut's
    # cost does not grow with the range). Fitted on the same 210 in-kernel shapes of session 27 (up to 60 MB:
    # 0.962x stream-K's time at 256 KB, 0.961x without a cap) and on calls of 60 MB to 2.4 GB (bench/NOTES.md
    # session 32), where the factor alone took the split with its busiest CTA up to 1.8x stream-K's range
    # (b9 32/2 head_dim 256 ragged, 1.2 GB: 431 us against FlashInfer's 405). 1 << 62: no cap
    "runtime_split_in_kernel_cap_bytes": 256 * 1024,
    # 0: one tile with the merge launch (none in the kernel's rule). Measured on an H200 (bench/NOTES.md session 17): 192 KB took the split on two held-out
    # shapes where it ran 1.08x and 1.12x stream-K's time (the launch-time split ran 8-11% slower than a
    # host-planned split of the same chunks), so the default stays at one tile
    "runtime_split_slack_bytes": 0,
    # sm_90 and newer, a plan with the launch-time split: each CTA of the attention kernel prefetches into
    # L2 the first tiles (and query rows) that the split would give it while the lengths are scanned and
    # the split decided, so that its first copies hit L2 when the split is taken (where stream-K is kept
    # the lines serve the CTAs that stream them). Results are the same either way. 0: no prefetch; 1: by
    # 128-byte lines; 2: one bulk prefetch per row (the TMA unit); GPUs older than sm_90 ignore it.
    # Measured on an H100 (bench/NOTES.md session 28, tools/spec_sweep.py --family --layouts ragged,paged --configs
    # default,sk_no_prefetch,sk_prefetch_bulk, 4 seeds, 90 shapes up to 60 MB): by lines 0.969x the time
    # without (geomean) on the 41 dense-layout shapes (0.895-1.014), 1.003x on the 49 paged ones (0.938-1.06,
    # whose rows wait for their page first; that run prefetched paged caches too, as spec_sweep's
    # sk_paged_prefetch_lines does now); by bulk prefetches 1.04-1.05x (up to 1.29x: one TMA operation per
    # row queues the first copies behind it). Held out (2 other seeds, 29 dense-layout shapes): 0.973x
    # (0.907-1.004)
    "split_prefetch": 1,
    # the same for paged caches (see above: no gain measured), where each row's page is read first
    "split_prefetch_paged": 0,
    # fp8 K/V: each lane reads a 16-byte chunk of a K row per shared-memory load (four score steps'
    # bytes) instead of 4 bytes, q's columns regrouped to match, and at head_dim >= 128 a K/V ring
    # swizzle that keeps those reads conflict-free (the spec gets FEATURES["fp8_wide_k"]). Measured on an
    # H200 (bench/NOTES.md session 26, tools/fp8_timing.py --family 8 --seed 760110712 --tuning
    # fp8_wide_k_reads=True): e4m3 time 0.980x with fp16 q (0.919-1.049) and 1.021x with bf16 q
    # (0.997-1.053), slower on some shapes with either, so it stays off
    "fp8_wide_k_reads": False,
    # fp8 K/V specs take up to this many times the 16-bit spec's pipeline stages (as many as fit max_smem;
    # an explicit stages= is kept): 1 keeps the 16-bit spec's depth (its stages then hold half the bytes;
    # at head_dim 256 two 2-stage CTAs share an SM). 2 was the default before; measured on an H100
    # (bench/NOTES.md session 34, tools/fp8_timing.py --tuning fp8_stage_factor=2, 18 fresh family shapes
    # a seed) it took 1.048x and 1.053x the time of 1 with fp16 q and 1.065x with bf16 q
    "fp8_stage_factor": 1,
    # fp8 caches at head_dim 64 whose neighbouring KV heads' rows are adjacent (NHD, two or more KV heads,
    # the lean schedule without a stream-K option): run the heads as lanes side by side (head_lanes,
    # FEATURES["head_lanes"]), so that the 64-byte rows that share a 128-byte line are read together.
    # Measured on an H100 with two lanes (bench/NOTES.md session 35, 20 family shapes of 3 fresh seeds):
    # 0.744-0.87x the time on the four large calls whose stream-K CTAs took neighbouring heads at
    # different times (the DRAM then opened a row per 64 bytes), 0.89-0.99x on the other large ones,
    # 0.93-1.02x on calls under 80 MB of fp8 bytes
    "fp8_head_lanes": True,
    # head_lanes: a count whose lanes (sms // lanes SMs each) keep at least this fraction of the SMs busy ...
    "fp8_head_lanes_sm_fraction": 0.9,
    # ... the smallest one of at least this many lanes (else the largest). Measured on an H100 (bench/NOTES.md
    # session 36, every divisor on 4 built calls of 16-32 KV heads and the head_dim-64 shapes of two family
    # seeds): odd counts of 3 and 5 kept 0.88-0.96x of the time without lanes on calls of 25-27 heads where
    # 7-27 lanes took 0.72-0.81x; among 8 or more lanes and the larger ones the differences were within the
    # run-to-run spread (0.70-0.82x)
    "fp8_head_lanes_group": 8,
    # an experiment: this many lanes where it divides heads_kv (and head_lanes' other conditions hold),
    # else none; None: head_lanes' choice
    "fp8_head_lanes_count": None,
    # fp8 caches at head_dim 64 of an even number of KV heads whose rows are adjacent (NHD): read two
    # neighbouring KV heads as one head_dim-128 head (pair_heads), q padded by zeros and the output's wanted
    # halves copied out by two small kernels, in paged caches of pages of at most this many tokens (0: never).
    # Measured on an H100 (bf16 q, bench/NOTES.md session 46), 16 family calls of one-token pages against pairs
    # off: 0.62-0.93x the time on 10 of the 11 calls of 50 us or more at 16 bits, 1.13x on the other (62 short
    # sequences, 14 query heads per KV head), 1.05-1.29x on the 5 smaller ones (two more launches); 0.91x
    # geomean ...
    "fp8_pair_heads_max_page": 1,
    # ... and in dense caches (or ragged ones, kv_lens over a dense cache). Pairs on larger pages and dense
    # caches: 0.70-0.99x on 5 of 8 calls over 75 us, 1.06-1.10x on the other 3, 1.02-1.55x on all 13 smaller ones
    "fp8_pair_heads_dense": False,
    # sm_90 and newer: launch the attention and combine kernels with programmatic dependent launch (each may
    # be scheduled during the previous kernel's tail in the stream; it waits for that kernel before it reads
    # or writes memory). False: plain launches
    "pdl": True,
})
assert set(_TUNING_CHECKS) == set(TUNING)
for _name, _value in TUNING.items():
    _check_tuning_value(_name, _value)
TUNING._known = frozenset(TUNING)  # setting any other key, or a value its reader would not take, raises ValueError


def uniform_model_args(head_dim, num_sms, hbm_bytes_per_us):
    """The keyword arguments of :func:`cupy_lean.schedule.uniform_variant`
    that :data:`TUNING` selects for a plan of ``head_dim`` on a device of
    ``num_sms`` SMs reading ``hbm_bytes_per_us`` (bytes per microsecond):
    ``"uniform_model"`` "rates" (the measured ``"partial_grid_time"`` of
    that head_dim; ``cta_bound``, the fraction of the SMs below which the
    CTAs' own rate ``"cta_stream_gbs"`` sets the pace: ``read_fraction x
    bandwidth / (rate x num_sms)``; no slack) or "saturation" (the step at
    ``"uniform_saturation"``). Raises ValueError naming the key of a bad
    value."""
    model = TUNING["uniform_model"]
    _check_tuning_value("uniform_model", model)  # (set past TUNING's own check: named here)
    if model == "saturation":
        return {"saturation": uniform_saturation()}
    from .schedule import _check_partial_grid

    table, rates, frac = TUNING["partial_grid_time"], TUNING["cta_stream_gbs"], TUNING["read_fraction"]
    key = str(head_dim)  # JSON keys (an int key is taken too)

    def entry(d):
        if not isinstance(d, dict):
            raise TypeError
        return d[key] if key in d else d[head_dim]

    try:
        points = _check_partial_grid(entry(table))
    except (KeyError, TypeError, ValueError, IndexError, OverflowError):
        raise ValueError(f'kernels.TUNING["partial_grid_time"] must map head_dim {head_dim} to (fraction, '
                         f'relative time) pairs, fractions increasing in (0, 1], got '
                         f'{table.get(key, table.get(head_dim)) if isinstance(table, dict) else table!r}') from None
    try:
        rate = entry(rates)
        ok = all(not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) for x in (rate, frac))
        ok = ok and rate > 0 and 0 < frac <= 1
    except (KeyError, TypeError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f'kernels.TUNING["cta_stream_gbs"][{key!r}] must be a positive number and '
                         f'TUNING["read_fraction"] one in (0, 1], got '
                         f'{rates.get(key, rates.get(head_dim)) if isinstance(rates, dict) else rates!r} and '
                         f'{frac!r}')
    bound = float(frac) * hbm_bytes_per_us / 1e3 / (float(rate) * max(1, num_sms))
    return {"partial_grid": points, "cta_bound": bound, "slack": 0.0}


def uniform_saturation():
    """:data:`TUNING` ``"uniform_saturation"``, checked: the fraction of the
    grid whose CTAs saturate DRAM in :func:`cupy_lean.schedule.uniform_variant`'s
    model. Raises ValueError naming the key unless it is a number in (0, 1]."""
    v = TUNING["uniform_saturation"]
    _check_tuning_value("uniform_saturation", v)
    return float(v)


def launch_time_split(merge_launch, stream_k_knob, varied_lengths):
    """Whether a lean stream-K plan's launches choose split-K in one wave
    from their lengths (:func:`cupy_lean.schedule.runtime_split_chunks`):
    :data:`TUNING` ``"runtime_split"`` with the merge launch, and also
    without it (``"runtime_split_in_kernel"``: the chunks merged in the
    kernel) for a plan given no stream-K knob (``stream_k_knob``) over
    sequences of varied lengths (``varied_lengths``; an equal-length plan's
    decomposition is chosen on the host)."""
    return bool(TUNING["runtime_split"] and (merge_launch or (
        TUNING["runtime_split_in_kernel"] and not stream_k_knob and varied_lengths)))


def launch_split_cap(merge_launch, tile_size, head_dim, kv_itemsize):
    """``split_cap_tiles`` of the launch-time split's rule
    (:func:`cupy_lean.schedule.runtime_split_chunks`): with the chunks merged
    in the kernel, :data:`TUNING` ``"runtime_split_in_kernel_cap_bytes"`` of
    K and V in whole tiles of ``tile_size`` tokens at ``head_dim`` with
    elements of ``kv_itemsize`` bytes (at most 2**30 tiles); with the merge
    launch 2**30 (its factor is 1: the cap cannot bind)."""
    from .schedule import runtime_split_slack

    if merge_launch:
        return 1 << 30
    cap = TUNING["runtime_split_in_kernel_cap_bytes"]
    _check_tuning_value("runtime_split_in_kernel_cap_bytes", cap)  # the key's value only; the rest below
    return runtime_split_slack(tile_size, head_dim, kv_itemsize, cap, at_least=0)


def launch_split_rule(merge_launch, tile_size, head_dim, kv_itemsize):
    """``(split_scale, split_slack_tiles)`` of the launch-time split's rule
    (:func:`cupy_lean.schedule.runtime_split_chunks`) for a plan with the
    merge launch (``merge_launch``) or with its chunks merged in the kernel,
    of ``tile_size`` tokens at ``head_dim`` with K/V elements of
    ``kv_itemsize`` bytes: with the merge launch 1 and
    :data:`TUNING` ``"runtime_split_slack_bytes"`` in tiles (at least one);
    in the kernel ``"runtime_split_in_kernel_scale"`` and those bytes in
    tiles (possibly none)."""
    from .schedule import runtime_split_slack

    slack = runtime_split_slack(tile_size, head_dim, kv_itemsize, TUNING["runtime_split_slack_bytes"],
                                at_least=1 if merge_launch else 0)
    if merge_launch:
        return 1, slack
    scale = TUNING["runtime_split_in_kernel_scale"]
    _check_tuning_value("runtime_split_in_kernel_scale", scale)  # the kernel's range for the factor, 1 to 64
    return int(scale), slack  # (the slack: at most 2**30 tiles, runtime_split_slack's bound)


@contextlib.contextmanager
def tuning(**changes):
    """:data:`TUNING` with ``changes`` for the block, restored after it (an
    experiment's switch: ``with kernels.tuning(pdl=False): ...``). Raises
    ValueError naming a key that :data:`TUNING` does not have (nothing is
    changed then)."""
    unknown = sorted(set(changes) - set(TUNING))
    if unknown:
        raise ValueError(f"tuning: unknown keys {unknown}; TUNING has {sorted(TUNING)}")
    saved = {name: TUNING[name] for name in changes}
    TUNING.update(changes)
    try:
        yield TUNING
    finally:
        TUNING.update(saved)


#: Opt-in shared memory per block (bytes) by architecture; the plan asks the
#: device itself, this table serves the CPU tests and the docs.
SMEM_OPTIN = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}
DEFAULT_SMEM_LIMIT = SMEM_OPTIN["sm_90"]


def default_config(head_dim, m_tiles, paged, smem_limit=DEFAULT_SMEM_LIMIT):
    """Default (tile, stages) of a spec on a device whose blocks may use
    ``smem_limit`` bytes of shared memory, or None when nothing fits.

    A tile of ``TUNING["kv_tile_bytes"]`` of K+V, doubled (up to 128 tokens)
    while that gives the CTA more warps and it has fewer than
    ``TUNING["min_warps"]``; then 4 stages if they fit in
    ``deep_pipeline_smem``, else 3, else 2 in ``max_smem`` (head_dim 256: 2
    stages); the tile is halved until something fits. Every budget is capped
    by ``smem_limit``. Measured over family shapes (``python -m bench.tune``):
    more warps per CTA, then the deepest pipeline, is what made a default
    fast at every head_dim.
    """
    deep = min(TUNING["deep_pipeline_smem"], smem_limit)
    most = min(TUNING["max_smem"], smem_limit)

    def warps(t):
        return Spec("f16", head_dim, m_tiles, t, 2, paged).threads // 32

    tile = max(16, min(128, TUNING["kv_tile_bytes"] // (4 * head_dim)))
    while tile < 128 and warps(tile) < TUNING["min_warps"] and warps(2 * tile) > warps(tile):
        tile *= 2  # a CTA of fewer warps streams, stores and reduces with too few threads
    while tile >= 16:
        if head_dim < 256:
            if _fits(tile, 4, head_dim, m_tiles, paged, deep):
                return tile, 4
            if _fits(tile, 3, head_dim, m_tiles, paged, most):
                return tile, 3
        if _fits(tile, 2, head_dim, m_tiles, paged, most):
            return tile, 2
        tile //= 2
    return None


def _features_block(features):
    """Whether a call's optional features (``FEATURES`` bits) keep it on the
    default tile: any feature, unless ``TUNING["config_rules_with_features"]``."""
    return bool(features) and not TUNING["config_rules_with_features"]


def _fp8_only(features):
    """Whether a call's optional features are an fp8 cache and nothing else
    (its format bit, and the wide-K-reads and head-lanes bits that go with
    it)."""
    f = int(features)
    return bool(f & FP8_BITS) and not f & ~(FP8_BITS | FEATURES["fp8_wide_k"] | FEATURES["head_lanes"])


def many_unit_config(head_dim, group, units, tokens, num_sms, paged, uniform, features=0, occupancy=None,
                     one_cta_per_unit=True):
    """The ``(tile, one_cta_per_unit)`` of a call of many units, or None for
    the default configuration.

    Applies to a dense cache of equal lengths (``uniform``: no ``kv_lens``
    given) of ``tokens`` tokens with at least one unit (sequence x KV head)
    per SM, ``group`` query rows per unit up to 16 and no optional feature
    (``features``: the spec's ``FEATURES`` bits: sinks, window, soft-cap, a
    q with a query-token axis, fp8; with
    ``TUNING["config_rules_with_features"]`` features do not matter, and a
    windowed plan passes the window's tokens as ``tokens``; a call whose only
    feature is an fp8 cache takes the head_dim-64 rule below, and only that
    one, with ``TUNING["many_units_d64_with_fp8"]``, for units of at most
    ``TUNING["many_units_d64_fp8_max_unit_bytes"]`` of K and V):

    - head_dim 64 (``TUNING["many_units_d64"]``; only where the plan may
      run one CTA per unit, ``one_cta_per_unit``: False with an option that
      fixes the stream-K grid): one CTA per unit, at 64-token tiles while
      there are at most ``TUNING["many_units_d64_t64_per_sm"]`` units per SM
      and 32-token tiles above, whatever the length, when one wave of
      resident CTAs holds every unit (``units <= occupancy(tile) *
      num_sms``; ``occupancy``: a
      function of the tile giving that spec's CTAs per SM; None, for a
      check by hand without a GPU, assumes one wave holds any count, which
      a device does not: on an H200 at most 5 x 132 units at tile 32 and
      3 x 132 at tile 64);
    - otherwise, units of at most ``TUNING["short_unit_tokens"]`` tokens at
      head_dim 64 or 128: 32-token tiles, the equal-length variant's model
      choosing the decomposition (``one_cta_per_unit`` False).

    The default tile (128 tokens there, one CTA of 8 warps per SM) streams
    each unit's tiles and leaves its fixed costs (query load, pipeline fill,
    the store) one after another on one CTA. At head_dim 64, 64-token tiles
    fit three CTAs of 4 warps per SM on an H200 and 32-token tiles five of 2
    warps, whose fixed costs overlap and which keep more of K and V in flight
    (192 and 160 KB per SM against 128); with up to two units per SM the
    32-token tile leaves an SM 4 warps or fewer, and the 64-token tile is
    faster. Measured on an H200 (``tools/spec_sweep.py``,
    ``bench/results/spec_sweep_s*.json``, fp16, dense shapes from seven
    seeds): at head_dim 64 and 300-10000 tokens, one CTA per unit at tile 64
    against tile 32 took 0.60-0.97 of the time on the 14 shapes of 125-232
    units and 1.01-1.24 on the 17 of 300-650 (six seeds); on 35 shapes of
    155-650 units the rule took 0.894 of the old default's time (geomean,
    0.64-1.04), and 0.92-1.04 on the 6 of a seventh seed it was not fitted
    to. At head_dim 128 the 32-token tile took 0.64-0.98 on units of
    303-640 tokens and 0.93-1.32 on longer ones (no rule there); head_dim
    256 was 1.27-1.66x slower."""
    blocked = _features_block(features)
    fp8_d64 = (blocked and head_dim == 64 and _fp8_only(features) and TUNING["many_units_d64_with_fp8"]
               and 2 * head_dim * tokens <= TUNING["many_units_d64_fp8_max_unit_bytes"])
    if (paged or not uniform or (blocked and not fp8_d64) or head_dim not in (64, 128) or group > 16
            or units < num_sms or tokens <= 0):
        return None
    if head_dim == 64 and TUNING["many_units_d64"] and one_cta_per_unit:
        tile = 64 if units <= TUNING["many_units_d64_t64_per_sm"] * num_sms else 32
        if occupancy is None or units <= occupancy(tile) * num_sms:
            return tile, True
    if blocked:  # an fp8 call past the head_dim-64 rule keeps the default tile
        return None
    if tokens <= TUNING["short_unit_tokens"]:
        return 32, False
    return None


def head_lanes(kv8, head_dim, heads_kv, k_strides, v_strides, schedule="lean", stream_k_knob=False,
               batch_invariant=False, sms=132):
    """How many lanes a call runs its KV heads in side by side (the spec bit
    ``FEATURES["head_lanes"]``, ``TUNING["fp8_head_lanes"]``); 1: none.

    ``kv8``: the fp8 format of the cache, or None (16-bit K/V: never).
    ``k_strides`` / ``v_strides``: byte strides of K and V as the kernel
    reads them, ``(sequence or page, token, head, element)`` (the NHD view;
    an HND cache is its transpose). ``sms``: the device's SMs. Lanes are
    made where a KV head's row is 64 bytes (fp8 at head_dim 64) and the next
    head's row follows it (a head stride of 64 bytes: two rows per 128-byte
    line), with at least two KV heads, the lean schedule, no stream-K option
    (``num_ctas``, ``ctas_per_sm``, ``min_tiles_per_cta``,
    ``merge_balance``) and not ``batch_invariant``.

    L lanes run the schedule of a call of ``heads_kv / L`` heads on
    ``sms // L`` SMs each, lane l taking heads l, L + l, ..., so a token's
    heads are read in groups of L neighbours at once. The count is a divisor
    L >= 2 of ``heads_kv`` whose lanes keep ``TUNING["fp8_head_lanes_sm_fraction"]``
    of the SMs busy (``L * (sms // L)``): the smallest such one of at least
    ``TUNING["fp8_head_lanes_group"]`` (a group of 8 rows: 512 bytes), else
    the largest (none: 1). More lanes read longer runs of a token's row at
    once; with an odd count every other group ends inside a line, which
    longer groups make rarer; fewer lanes keep more SMs per lane.
    ``TUNING["fp8_head_lanes_count"]`` forces a count where it divides
    ``heads_kv``. Why and what it measured: ``docs/design.md``, "Head
    lanes"."""
    if not (TUNING["fp8_head_lanes"] and _adjacent_fp8_rows(kv8, head_dim, heads_kv, k_strides, v_strides, schedule,
                                                             stream_k_knob, batch_invariant)):
        return 1
    forced = TUNING["fp8_head_lanes_count"]
    if forced is not None:
        forced = int(forced)
        return forced if 2 <= forced <= sms and heads_kv % forced == 0 else 1
    group, frac = int(TUNING["fp8_head_lanes_group"]), float(TUNING["fp8_head_lanes_sm_fraction"])
    counts = [L for L in range(2, min(heads_kv, sms) + 1) if heads_kv % L == 0 and L * (sms // L) >= frac * sms]
    return min((L for L in counts if L >= group), default=max(counts, default=1))


def _adjacent_fp8_rows(kv8, head_dim, heads_kv, k_strides, v_strides, schedule, knobs, batch_invariant):
    """What head lanes and head pairs both need: an fp8 cache at head_dim 64
    (64-byte rows) of two KV heads or more whose neighbouring heads' rows
    are adjacent in K and V (a head stride of 64 bytes, unit element stride,
    in the NHD view's byte strides), the lean schedule with no option fixing
    its configuration (``knobs``), not ``batch_invariant``."""
    return (kv8 is not None and head_dim == 64 and heads_kv >= 2 and schedule == "lean" and not knobs
            and not batch_invariant
            and all(int(st[2]) == head_dim and int(st[3]) == 1 for st in (k_strides, v_strides)))


def pair_heads(kv8, head_dim, heads_kv, rows, k_strides, v_strides, page_size, schedule="lean", knobs=False,
               batch_invariant=False):
    """Whether a call runs its KV heads in pairs (``TUNING["fp8_pair_heads_max_page"]``,
    ``TUNING["fp8_pair_heads_dense"]``): two neighbouring KV heads read as
    one head of head_dim 128, as a head_dim-128 call of ``heads_kv / 2``
    KV heads and ``2 x group`` query heads per KV head.

    ``kv8``: the fp8 format of the cache, or None (16-bit: never).
    ``rows``: the query rows of a KV head (``group x q_len``).
    ``k_strides`` / ``v_strides``: byte strides of K and V in the NHD view.
    ``page_size``: the paged cache's, or 0 for a dense cache. ``knobs``: a
    tile size, stages, num_ctas or another stream-K option was given (the
    call is an experiment on its own shapes: never paired).

    At head_dim 64 an fp8 row of a KV head is 64 bytes; where a cache's
    tokens lie at scattered places (pages of one token) each such row is a
    request for half of a 128-byte line, and the call streams well under
    the 16-bit rate. In the NHD layout the next KV head's row follows, so
    a pair of heads is one 128-byte row. The query heads of head ``2j`` get
    their values in the first 64 columns of a 128-wide q and zeros in the
    second; those of head ``2j + 1`` the other way round: ``q' . k'`` is
    ``q . k`` exactly. Each output row's wanted half is copied out. Paired
    when: fp8, head_dim 64, an even ``heads_kv``, both K and V with a head
    stride of 64 bytes and unit element stride, ``2 x rows`` within
    :data:`MAX_GROUP` (128), the lean schedule with no option fixing its
    configuration, not ``batch_invariant``, and the page size within
    ``TUNING["fp8_pair_heads_max_page"]`` (dense caches:
    ``TUNING["fp8_pair_heads_dense"]``). A non-finite stored key of one
    head then also reaches the scores of the other head of its pair
    (``0 x inf`` is NaN): that head's rows are NaN where without pairs they
    are finite. The plan (``Plan._launch_on``) runs a call given per-head
    scale arrays without pairs: each unit reads one scale."""
    if not (heads_kv % 2 == 0 and 2 * rows <= MAX_GROUP
            and _adjacent_fp8_rows(kv8, head_dim, heads_kv, k_strides, v_strides, schedule, knobs, batch_invariant)):
        return False
    if page_size:
        return page_size <= int(TUNING["fp8_pair_heads_max_page"])
    return bool(TUNING["fp8_pair_heads_dense"])


def varied_length_tile(head_dim, group, features=0, occupancy=None, paged=False):
    """The tile of a lean call whose sequences may differ in length (a
    ``kv_lens`` or a paged cache, and more than one sequence, so the plan
    cannot see the lengths and runs stream-K), or None for the default.

    At head_dim 64 with up to 16 query rows per unit and no optional feature
    (``features``: the spec's ``FEATURES`` bits; any, with
    ``TUNING["config_rules_with_features"]``; an fp8 cache and no other
    where ``TUNING["fp8_varied_lengths_tile"]`` allows: ``"paged"``, the
    default, for a paged cache (``paged``), True for any):
    ``TUNING["varied_lengths_d64_tile"]``
    (64) tokens, half the default, so that two CTAs of 4 warps share an SM
    where one of 8 ran. Each CTA's fixed costs (the length scan, the query
    load, the pipeline fill, page-table reads) then overlap the other's
    streaming, and stream-K cuts its ranges at half the granularity.
    Measured on an H200 (``tools/spec_sweep.py --family --head-dims 64``,
    fp16, ``bench/results/spec_sweep_d64_s20124331.json`` and
    ``spec_sweep_t64_s20124411.json``): paged batches of 6-432 units and 11-331
    MB took 0.87-0.99 of the default's time (9 of 9 shapes), ragged ones of
    up to 45 MB 0.86-0.99 (7 of 7), ragged ones of 275-1400 MB 0.99-1.003
    (4). Dense calls without ``kv_lens`` keep their rules (tile 64 took
    0.99-1.13 of their time there, slower on 3 of 5), and so do calls of
    one sequence (the equal-length variant; 1.08 on the one such shape).
    ``occupancy``: a function of the tile giving that spec's CTAs per SM;
    the rule needs two (a GPU of about 100 KB of shared memory per SM fits
    one such CTA, and that was not measured); None, for a check by hand
    without a GPU, assumes they fit.

    fp8 (measured on an H100, 64- against 128-token tiles, family seeds
    20261607-9 and 20261704-6, ``bench/results/fp8_vt64_h100_*.json``,
    ``fp8_varied_lengths_tile_h100_*.json``; to repeat:
    ``tools/fp8_timing.py --tuning fp8_varied_lengths_tile=True`` against
    ``False``): the fp8 kernel's 8-warp CTA
    runs alone on an SM (213 registers a thread), its 4-warp 64-token one
    two to an SM. Paged calls took 0.83-1.00 of the 128-token tile's time
    (13 batches of 10-1156 MB, pages of 1-64 tokens; none slower); they
    stream at most ~2.2 TB/s of fp8 bytes (page-table reads, scattered
    pages), and the second CTA hides the first's fixed costs. Ragged calls
    (a dense cache with ``kv_lens``) took 0.80-1.06 on 10 calls up to 265
    MB but 1.07-1.28 on 6 of 618-739 MB, which stream near the read ceiling with
    128-token tiles: a 64-token fp8 tile carries 8 KB of K and V, as a
    32-token 16-bit one does, so its per-tile work per byte is twice the
    16-bit tile 64's. The plan cannot tell a large ragged call from a small
    one (it sees the cache's capacity), so ragged fp8 calls keep the
    default."""
    tile = TUNING["varied_lengths_d64_tile"]
    fp8_mode = TUNING["fp8_varied_lengths_tile"]
    _check_tuning_value("fp8_varied_lengths_tile", fp8_mode)
    fp8_ok = (bool(paged) if fp8_mode == "paged" else bool(fp8_mode)) and _fp8_only(features)
    if head_dim != 64 or group > 16 or (_features_block(features) and not fp8_ok) or not tile:
        return None
    if occupancy is not None and occupancy(int(tile)) < 2:
        return None
    return int(tile)


def default_ctas_per_sm(spec, occupancy):
    """CTAs per SM of the lean grid: one for specs over
    ``TUNING["one_cta_per_sm_above"]`` bytes of shared memory, else the
    occupancy, at most ``TUNING["max_ctas_per_sm"]``."""
    if spec.smem_bytes > TUNING["one_cta_per_sm_above"]:
        return 1
    return max(1, min(TUNING["max_ctas_per_sm"], occupancy))


def make_spec(dtype, head_dim, group, paged, tile_size=None, stages=None,
              smem_limit=DEFAULT_SMEM_LIMIT, features=0, page_size=None) -> Spec:
    """The spec that serves ``group`` query heads per KV head at ``head_dim``
    on a device allowing ``smem_limit`` bytes of shared memory per block.

    ``dtype``: q's (and out's) type, ``"f16"`` / ``"bf16"`` or NumPy's
    ``"float16"`` / ``"bfloat16"`` (any other raises ValueError naming
    ``dtype``). ``tile_size`` / ``stages``: override the default tile
    (one of :data:`TILE_SIZES`) and pipeline depth.

    ``features`` (bits of :data:`FEATURES`) compiles optional semantics in.
    ``page_size`` (paged): the ``page_rows`` feature is added when the
    spec's :attr:`Spec.run_rows` does not divide it, and always with a
    sliding window (None: the spec for page sizes it divides; a kernel
    launched with another page size traps).
    Raises ValueError naming the limit when no configuration (or not the
    requested ``tile_size`` / ``stages``) fits it.
    """
    dtype = _spec_dtype(dtype)  # (Spec takes either name too; here before any other use)
    # integers, not floats that happen to be whole (128.0 would name a spec "d128.0" that NVRTC refuses)
    for name, value, low in (("head_dim", head_dim, 1), ("group", group, 1), ("tile_size", tile_size, 1),
                             ("stages", stages, 2), ("page_size", page_size, 1), ("features", features, 0)):
        if value is not None:
            _check_positive_int(value, name, low)
    if not isinstance(paged, (bool, np.bool_)):
        raise TypeError(f"paged: expected True or False, got {type(paged).__name__} {paged!r}")
    if stages is not None and stages > 6:
        raise ValueError(f"stages: expected an integer in [2, 6], got {stages}")
    if features & ~sum(FEATURES.values()):
        raise ValueError(f"features: expected a sum of FEATURES bits {FEATURES}, got {features}")
    if features & FP8_BITS == FP8_BITS:
        raise ValueError(f"features: one fp8 format (fp8_e4m3 or fp8_e5m2), got both bits in {features}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: the GPU kernels support {HEAD_DIMS}, got {head_dim}")
    if not 1 <= group <= MAX_GROUP:
        raise ValueError(f"heads_q / heads_kv: the GPU kernels support groups of 1 to {MAX_GROUP}, got {group}")
    mt = _pow2_at_least(-(-group // 16))
    paged = bool(paged)
    if tile_size is None:
        cfg = default_config(head_dim, mt, paged, smem_limit)
        if cfg is None:
            need = Spec(dtype, head_dim, mt, 16, 2, paged).smem_bytes
            raise ValueError(
                f"heads_q / heads_kv: group {group} at head_dim {head_dim} needs at least {need} bytes of shared "
                f"memory per block (16-token tiles, 2 stages), over this device's limit of {smem_limit} bytes")
        tile, st = cfg
    else:
        if tile_size not in TILE_SIZES:
            raise ValueError(f"tile_size: expected one of {TILE_SIZES}, got {tile_size}")
        tile = tile_size
        st = next((c for c in (4, 3) if _fits(tile, c, head_dim, mt, paged,
                                               min(TUNING["deep_pipeline_smem"], smem_limit))), 2)
        if st == 2 and head_dim < 256 and _fits(tile, 3, head_dim, mt, paged, min(TUNING["max_smem"], smem_limit)):
            st = 3  # as default_config: 3 stages up to max_smem
    if int(features) & FP8_BITS and TUNING["fp8_wide_k_reads"]:
        features = int(features) | FEATURES["fp8_wide_k"]
    if int(features) & FEATURES["fp8_wide_k"] and not int(features) & FP8_BITS:
        raise ValueError(f"features: the fp8_wide_k bit needs an fp8 bit, got {int(features)}")
    if int(features) & FEATURES["head_lanes"] and not int(features) & FP8_BITS:
        raise ValueError(f"features: the head_lanes bit needs an fp8 bit, got {int(features)}")
    if stages is not None:
        st = int(stages)
    elif int(features) & FP8_BITS:
        # fp8 tiles carry half the bytes; the 16-bit depth holds enough of them in flight
        # (TUNING["fp8_stage_factor"] 1; more: up to that many times the stages, as many as fit max_smem)
        budget = min(TUNING["max_smem"], smem_limit)
        st = next((c for c in range(min(6, int(TUNING["fp8_stage_factor"] * st)), st, -1)
                   if Spec(dtype, head_dim, mt, tile, c, paged, int(features)).smem_bytes <= budget), st)
    spec = Spec(dtype, head_dim, mt, tile, st, paged, int(features))
    if paged and (int(features) & FEATURES["window"] or (page_size is not None and int(page_size) % spec.run_rows)):
        # a window starts a unit's tiles at any token: runs cross pages
        spec = Spec(dtype, head_dim, mt, tile, st, paged, int(features) | FEATURES["page_rows"])
    if spec.smem_bytes > smem_limit:
        what = "stages" if stages is not None else "tile_size"
        raise ValueError(
            f"{what}: tile {tile} with {st} stages needs {spec.smem_bytes} bytes of shared memory at head_dim "
            f"{head_dim} and group {group}, over this device's limit of {smem_limit} bytes; use a smaller "
            f"{'stages' if stages is not None else 'tile_size'}")
    return spec


def shipped_specs():
    """Every spec reachable without a tile override and no optional feature:
    the default tile of dtypes x head dims x query-tile counts x
    dense/paged, the dense tiles :func:`many_unit_config` chooses (32 and
    64 tokens at head_dim 64, 32 at head_dim 128; one query tile) and the
    paged one of :func:`varied_length_tile` (64 tokens at head_dim 64)."""
    out = []
    for dtype in ("f16", "bf16"):
        for d in HEAD_DIMS:
            for mt in M_TILES:
                for paged in (False, True):
                    out.append(make_spec(dtype, d, mt * 16, paged))
        for d, tile in ((64, 32), (64, 64), (128, 32)):
            out.append(make_spec(dtype, d, 16, False, tile_size=tile))
        out.append(make_spec(dtype, 64, 16, True, tile_size=64))  # varied_length_tile, paged
    return out


#: Environment variable: "1" compiles fp8 specs with the e4m3 conversion of
#: GPUs before sm_89 (bit moves) on every GPU, so that a newer GPU can test
#: that path; read when a spec is compiled (once per spec and process).
FP8_BITMOVES_ENV = "CUPY_LEAN_FP8_BITMOVES"


def compile_options(spec: Spec | None):
    """NVRTC options of a spec (None: the helper module)."""
    _, h = _sources()
    opts = ["-std=c++17", f"-I{kernel_dir()}", f"-DLEAN_SRC_HASH={h}"]
    if spec is not None and spec.fp8 and os.environ.get(FP8_BITMOVES_ENV) == "1":
        opts.append("-DLEAN_FP8_BITMOVES=1")
    if spec is not None:
        opts += [
            f"-DLEAN_BF={1 if spec.dtype == 'bf16' else 0}",
            f"-DLEAN_D={spec.head_dim}",
            f"-DLEAN_MT={spec.m_tiles}",
            f"-DLEAN_TILE={spec.tile}",
            f"-DLEAN_STAGES={spec.stages}",
            f"-DLEAN_PAGED={1 if spec.paged else 0}",
            f"-DLEAN_FEATURES={spec.features}",
            f"-DLEAN_ENTRY={spec.entry}",
            f"-DLEAN_COMBINE_ENTRY={spec.combine_entry}",
            f"-DLEAN_DUMP_ENTRY={spec.dump_entry}",
            f"-DLEAN_HOST_SMEM_BYTES={spec.smem_bytes}",
            f"-DLEAN_HOST_THREADS={spec.threads}", f"-DLEAN_HOST_RUN_ROWS={spec.run_rows}",
        ] + _params_layout_options()
    return tuple(opts)


def _source_of(spec):
    texts, _ = _sources()
    return texts["util.cu" if spec is None else "lean_attention.cu"]


def _nvrtc(spec: Spec | None, target: str, output: str, log=None, extra=()):
    """NVRTC on a spec's source (None: the helper module) for
    ``--gpu-architecture=target``; ``output``: "cubin" or "ptx"; ``log``: a
    list that gets ptxas's report; ``extra``: more NVRTC options. A failure
    raises with NVRTC's log. Unannotated functions (the kernels' local
    lambdas) compile as device code, as CuPy's RawModule compiles the
    package's modules: NVRTC 13.0 refuses them otherwise, 13.5 does not."""
    from cupy.cuda import nvrtc

    name = "util.cu" if spec is None else f"{spec.name}.cu"
    prog = nvrtc.createProgram(_source_of(spec), name, [], [])
    try:
        opts = list(compile_options(spec)) + [f"--gpu-architecture={target}", "--device-as-default-execution-space",
                                               *extra]
        if log is not None:
            opts.append("--ptxas-options=-v")
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed on {name} for {target}:\n{nvrtc.getProgramLog(prog)}") from exc
        if log is not None:
            log.append(nvrtc.getProgramLog(prog))
        return nvrtc.getCUBIN(prog) if output == "cubin" else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)


def _arch_number(arch):
    """``"sm_90"`` -> ``"90"`` (``"sm_90a"`` -> ``"90a"``); anything else, or
    an architecture before sm_80 (the kernels need Ampere's copies and warp
    reductions), raises ValueError naming ``arch``."""
    m = re.fullmatch(r"sm_(\d+)([a-z]?)", arch) if isinstance(arch, str) else None
    if m is None:
        raise ValueError(f"arch: expected a real architecture such as 'sm_80' or 'sm_90', got {arch!r}")
    if int(m.group(1)) < 80:
        raise ValueError(f"arch: the kernels need sm_80 or newer (cp.async, warp reductions), got {arch!r}")
    return m.group(1) + m.group(2)


def compile_ptx(spec: Spec, arch: str = "sm_90", lineinfo: bool = False) -> str:
    """The PTX of a spec for ``arch`` ("sm_80", "sm_90", ...), as NVRTC emits
    it for the virtual architecture: for reading what the kernel asks of the
    hardware without a GPU (``lineinfo``: with the source lines, which
    ptxas ``-lineinfo`` carries into the cubin)."""
    out = _nvrtc(spec, f"compute_{_arch_number(arch)}", "ptx", extra=("-lineinfo",) if lineinfo else ())
    return out.decode() if isinstance(out, bytes) else out


def compile_cubin(spec: Spec | None, arch: str = "sm_90", log=None) -> bytes:
    """Compile a spec (None: the helper module) with NVRTC for ``arch``
    (``"sm_80"``, ``"sm_90"``, ...) and return the cubin. Needs NVRTC, not a
    GPU. ``log``: a list that receives the compiler's report (ptxas's
    register and spill lines); a failure raises with NVRTC's log."""
    return _nvrtc(spec, f"sm_{_arch_number(arch)}", "cubin", log)


# --------------------------------------------------------------------- modules

def _device_id():
    return _cupy().cuda.runtime.getDevice()


_CU_FUNC_ATTRIBUTE_PTX_VERSION = 5  # cuda.h: the virtual architecture a function's code was made for


class _Kernels:
    """Compiled functions and launch constants of one spec on one device."""

    def __init__(self, spec):
        from cupy_backends.cuda.api import driver

        cp = _cupy()
        self.spec = spec
        mod = cp.RawModule(code=_source_of(spec), options=compile_options(spec))
        mod.compile()
        self.module = mod
        self.attn = mod.get_function(spec.entry)
        self.combine = mod.get_function(spec.combine_entry)
        self.dump = mod.get_function(spec.dump_entry)
        smem = spec.smem_bytes
        if smem > 48 * 1024:
            self.attn.max_dynamic_shared_size_bytes = smem
            self.dump.max_dynamic_shared_size_bytes = smem
        # Ask for the largest shared-memory carveout: without it the driver may
        # pick a smaller one and fit fewer CTAs per SM than the occupancy
        # calculation (which assumes the largest) reports.
        self.attn.preferred_shared_memory_carveout = 100
        attrs = cp.cuda.Device().attributes  # one driver query per attribute: read once
        self.num_sms = attrs["MultiProcessorCount"]
        # griddepcontrol.wait is in the kernels when their PTX was made for compute_90 or newer (CuPy
        # builds for the lower of the device and NVRTC's newest target): read from the loaded function
        self.pdl = driver.funcGetAttribute(_CU_FUNC_ATTRIBUTE_PTX_VERSION, self.attn.kernel.ptr) >= 90
        self.occupancy = max(1, driver.occupancyMaxActiveBlocksPerMultiprocessor(
            self.attn.kernel.ptr, spec.threads, smem))
        self._attrs = {name: attrs.get(name) for name in ("MemoryClockRate", "GlobalMemoryBusWidth")}

    # Read from TUNING when a plan asks (the kernels stay loaded for the process; a TUNING change
    # applies to the next plan made)
    @property
    def ctas_per_sm(self) -> int:
        """CTAs per SM of a default grid (:func:`default_ctas_per_sm`)."""
        return default_ctas_per_sm(self.spec, self.occupancy)

    @property
    def hbm_bytes_per_us(self) -> float:
        """The device's DRAM bandwidth estimate (:func:`hbm_bytes_per_us`)."""
        return hbm_bytes_per_us(self._attrs)


def hbm_bytes_per_us(attrs):
    """The device's DRAM bandwidth in bytes per microsecond: its memory clock
    x 2 (double data rate) x bus width, or ``TUNING["fallback_hbm_tbps"]``
    where the driver does not report both. An estimate for the plan's models (the
    read ceiling measured by ``bench`` is 90-95% of it on H100 and H200).
    ``attrs``: ``cupy.cuda.Device().attributes``."""
    khz = int(attrs.get("MemoryClockRate", 0) or 0)
    bits = int(attrs.get("GlobalMemoryBusWidth", 0) or 0)
    bw = khz * 1e3 * 2 * bits / 8 / 1e6
    return bw if bw >= 1e5 else TUNING["fallback_hbm_tbps"] * 1e6


def _device_attribute(attr):
    """One attribute of the current device (one driver query; CuPy's
    ``Device().attributes`` asks for every attribute)."""
    rt = _cupy().cuda.runtime
    return int(rt.deviceGetAttribute(attr, rt.getDevice()))


def device_sm_count():
    """Streaming multiprocessors of the current device."""
    return _device_attribute(_cupy().cuda.runtime.cudaDevAttrMultiProcessorCount)


def device_smem_limit():
    """Opt-in shared memory per block of the current device, in bytes."""
    return _device_attribute(_cupy().cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin)


def kernels_for(spec) -> _Kernels:
    """The compiled kernels of ``spec`` on the current device (the package's
    one cache holds them)."""
    require_device()
    return _cache.get_or_build(("spec", _device_id(), spec), lambda: _Kernels(spec))


def _util_module():
    def build():
        mod = _cupy().RawModule(code=_source_of(None), options=compile_options(None))
        mod.compile()
        return mod

    return _cache.get_or_build(("util", _device_id()), build)


def util_function(name):
    """A function of the helper module (merge_states, input checks)."""
    return _util_module().get_function(name)


def warmup(dtypes=("float16", "bfloat16"), head_dims=(128,), groups=(1, 4, 8), paged=(False, True),
           tile_size=None):
    """Compile (or load from CuPy's disk cache) the kernels for these
    parameters ahead of the first call, so that it does not pay the
    compilation (seconds per kernel). Every combination of ``dtypes`` (q's
    type: "float16" / "bfloat16", or "f16" / "bf16"), ``head_dims`` (of
    :data:`HEAD_DIMS`), ``groups`` (query heads per KV head), ``paged``
    (False: dense cache, True: paged) at ``tile_size`` (None: the default
    tile; else one of :data:`TILE_SIZES`). Returns the specs prepared.
    Kernels of optional features (sinks, windows, fp8, ...) and of the
    other tiles a call may choose compile at their first call. Raises
    RuntimeError without a GPU, ValueError naming a bad value."""
    require_device()
    limit = device_smem_limit()
    specs = []
    for dt in dtypes:
        name = _spec_dtype(dt)
        for d in head_dims:
            for g in groups:
                for p in paged:
                    s = make_spec(name, d, g, p, tile_size, smem_limit=limit)
                    kernels_for(s)
                    specs.append(s)
    _util_module()
    return specs


# --------------------------------------------------------------------- launch

def launch_params(func, grid, threads, smem, stream_ptr, params):
    """Launch an entry of an attention module with one :class:`Params` (the
    driver copies the struct at the call, also into a graph being captured)."""
    from cupy_backends.cuda.api import driver

    arr = (ctypes.c_void_p * 1)(ctypes.addressof(params))
    driver.launchKernel(func.kernel.ptr, int(grid), 1, 1, int(threads), 1, 1, int(smem), int(stream_ptr),
                        ctypes.addressof(arr), 0)

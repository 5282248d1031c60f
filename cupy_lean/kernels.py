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

import dataclasses
import functools
import hashlib
import os
import pathlib
import numpy as np

from . import _cache

__all__ = [
    "Spec",
    "make_spec",
    "shipped_specs",
    "compile_cubin",
    "compile_options",
    "kernel_dir",
    "warmup",
]

HEAD_DIMS = (64, 128, 256)
TILE_SIZES = (16, 32, 64, 128)
M_TILES = (1, 2, 4, 8)
MAX_GROUP = 128
MAX_PAGE_SIZE = 256
LENS_CACHE = 256  # must match kernels_cu/lean_attention.cu

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

def _pow2_at_least(n):
    p = 1
    while p < n:
        p *= 2
    return p


@dataclasses.dataclass(frozen=True)
class Spec:
    """Compile-time parameters of one attention module."""

    dtype: str  # "f16" or "bf16"
    head_dim: int
    m_tiles: int
    tile: int
    stages: int
    paged: bool

    @property
    def name(self) -> str:
        return (f"lean_{self.dtype}_d{self.head_dim}_m{self.m_tiles}_t{self.tile}"
                f"_s{self.stages}_{'paged' if self.paged else 'dense'}")

    # Warp layout, mirrored from kernels_cu/lean_attention.cu.
    @property
    def warps_n(self) -> int:
        wide = 2 if (self.m_tiles == 1 and self.tile >= 128) else 1
        return min(max(1, 4 // self.m_tiles) * wide, max(1, self.tile // (16 * self.m_tiles)))

    @property
    def threads(self) -> int:
        return 32 * self.m_tiles * self.warps_n

    @property
    def smem_bytes(self) -> int:
        d, t, s, mt = self.head_dim, self.tile, self.stages, self.m_tiles
        kv = 2 * t * d * 2
        qslot = mt * 16 * d * 2
        off_mask = s * kv + s * qslot
        mask = ((s * t + 15) // 16) * 16 if self.paged else 0
        stats = 2 * self.warps_n * mt * 16 * 4
        return off_mask + mask + stats + LENS_CACHE * 4 + 64 * 4

    @property
    def entry(self) -> str:
        return f"{self.name}_attention"

    @property
    def combine_entry(self) -> str:
        return f"{self.name}_combine"


def _fits(tile, stages, head_dim, m_tiles, paged, budget):
    return Spec("f16", head_dim, m_tiles, tile, stages, paged).smem_bytes <= budget


def default_config(head_dim, m_tiles, paged):
    """Default (tile, stages) of a spec.

    Measured on an H100 (bench/NOTES.md): a 32 KB K+V tile and a 3-4 stage
    cp.async pipeline at one CTA per SM stream at about 3 TB/s; configurations
    above about 160 KB of shared memory, and two CTAs per SM at 115 KB each,
    ran markedly slower. So: tile = 8192 / head_dim tokens (32 KB of K+V), as
    many stages (up to 4) as fit in 160 KB, at least 2; head_dim 256 keeps
    32-token tiles and 2 stages, small enough for two CTAs per SM.
    """
    tile = max(16, min(128, 8192 // head_dim))
    if head_dim >= 256:
        while tile > 16 and not _fits(tile, 2, head_dim, m_tiles, paged, 200 * 1024):
            tile //= 2
        return tile, 2
    while True:
        for stages in (4, 3):
            if _fits(tile, stages, head_dim, m_tiles, paged, 160 * 1024):
                return tile, stages
        if _fits(tile, 2, head_dim, m_tiles, paged, 200 * 1024) or tile == 16:
            return tile, 2
        tile //= 2


def default_ctas_per_sm(spec, occupancy):
    """CTAs per SM of the lean grid: one for specs over 100 KB of shared
    memory (two of them did not co-reside reliably), else the occupancy, at
    most two."""
    if spec.smem_bytes > 100 * 1024:
        return 1
    return max(1, min(2, occupancy))


def make_spec(dtype, head_dim, group, paged, tile_size=None, stages=None) -> Spec:
    """The spec that serves ``group`` query heads per KV head at ``head_dim``."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: the GPU kernels support {HEAD_DIMS}, got {head_dim}")
    if not 1 <= group <= MAX_GROUP:
        raise ValueError(f"heads_q / heads_kv: the GPU kernels support groups of 1 to {MAX_GROUP}, got {group}")
    mt = _pow2_at_least(-(-group // 16))
    tile, st = default_config(head_dim, mt, bool(paged))
    if tile_size is not None:
        if tile_size not in TILE_SIZES:
            raise ValueError(f"tile_size: expected one of {TILE_SIZES}, got {tile_size}")
        tile = tile_size
        st = None
        for cand in (4, 3, 2):
            if _fits(tile, cand, head_dim, mt, bool(paged), 160 * 1024):
                st = cand
                break
        if st is None:
            st = 2
    if stages is not None:
        st = int(stages)
    spec = Spec(dtype, head_dim, mt, tile, st, bool(paged))
    if spec.smem_bytes > 227 * 1024:
        raise ValueError(
            f"tile_size: {tile} needs {spec.smem_bytes} bytes of shared memory at head_dim "
            f"{head_dim} and group {group}, over the 227 KB limit; use a smaller tile_size"
        )
    return spec


def shipped_specs():
    """Every spec reachable with default tile sizes: dtypes x head dims x
    query-tile counts x dense/paged."""
    out = []
    for dtype in ("f16", "bf16"):
        for d in HEAD_DIMS:
            for mt in M_TILES:
                for paged in (False, True):
                    out.append(make_spec(dtype, d, mt * 16, paged))
    return out


def compile_options(spec: Spec | None):
    """NVRTC options of a spec (None: the helper module)."""
    _, h = _sources()
    opts = ["-std=c++17", f"-I{kernel_dir()}", f"-DLEAN_SRC_HASH={h}"]
    if spec is not None:
        opts += [
            f"-DLEAN_BF={1 if spec.dtype == 'bf16' else 0}",
            f"-DLEAN_D={spec.head_dim}",
            f"-DLEAN_MT={spec.m_tiles}",
            f"-DLEAN_TILE={spec.tile}",
            f"-DLEAN_STAGES={spec.stages}",
            f"-DLEAN_PAGED={1 if spec.paged else 0}",
            f"-DLEAN_ENTRY={spec.entry}",
            f"-DLEAN_COMBINE_ENTRY={spec.combine_entry}",
        ]
    return tuple(opts)


def _source_of(spec):
    texts, _ = _sources()
    return texts["util.cu" if spec is None else "lean_attention.cu"]


def compile_cubin(spec: Spec | None, arch: str = "sm_90", log=None) -> bytes:
    """Compile a spec (None: the helper module) with NVRTC for ``arch`` and
    return the cubin. Needs NVRTC, not a GPU."""
    from cupy.cuda import nvrtc

    src = _source_of(spec)
    name = "util.cu" if spec is None else f"{spec.name}.cu"
    prog = nvrtc.createProgram(src, name, [], [])
    try:
        opts = list(compile_options(spec)) + [f"--gpu-architecture={arch}"]
        if log is not None:
            opts.append("--ptxas-options=-v")
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed on {name} for {arch}:\n{nvrtc.getProgramLog(prog)}") from exc
        if log is not None:
            log.append(nvrtc.getProgramLog(prog))
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


# --------------------------------------------------------------------- modules

def _device_id():
    return _cupy().cuda.runtime.getDevice()


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
        smem = spec.smem_bytes
        if smem > 48 * 1024:
            self.attn.max_dynamic_shared_size_bytes = smem
        # Ask for the largest shared-memory carveout: without it the driver may
        # pick a smaller one and fit fewer CTAs per SM than the occupancy
        # calculation (which assumes the largest) reports.
        self.attn.preferred_shared_memory_carveout = 100
        dev = cp.cuda.Device()
        self.num_sms = dev.attributes["MultiProcessorCount"]
        self.occupancy = max(1, driver.occupancyMaxActiveBlocksPerMultiprocessor(
            self.attn.kernel.ptr, spec.threads, smem))
        self.ctas_per_sm = default_ctas_per_sm(spec, self.occupancy)


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
    parameters ahead of the first call. Returns the specs prepared."""
    require_device()
    specs = []
    for dt in dtypes:
        name = {"float16": "f16", "bfloat16": "bf16", "f16": "f16", "bf16": "bf16"}[str(dt)]
        for d in head_dims:
            for g in groups:
                for p in paged:
                    s = make_spec(name, d, g, p, tile_size)
                    kernels_for(s)
                    specs.append(s)
    _util_module()
    return specs


# --------------------------------------------------------------------- launch

_I32, _I64, _F32, _PTR = np.int32, np.int64, np.float32, "ptr"

# Argument kinds of the attention and combine entries, in order.
ATTN_SIGNATURE = (
    ("q", _PTR), ("k", _PTR), ("v", _PTR), ("out", _PTR), ("lse", _PTR),
    ("kv_lens", _PTR), ("block_table", _PTR), ("ws", _PTR), ("counters", _PTR),
    ("q_sb", _I64), ("q_sh", _I64), ("k_sb", _I64), ("k_st", _I64), ("k_sh", _I64),
    ("v_sb", _I64), ("v_st", _I64), ("v_sh", _I64), ("o_sb", _I64), ("o_sh", _I64),
    ("bt_sb", _I64),
    ("batch", _I32), ("heads_kv", _I32), ("group", _I32), ("capacity", _I32),
    ("page_size", _I32), ("num_pages", _I32), ("mode", _I32), ("num_splits", _I32),
    ("scale_log2", _F32), ("slot_stride", _I32),
)

_NULL = np.uint64(0)


def check_args(signature, args):
    """Check a launch's arguments against the entry's signature: count, and
    for every scalar the exact NumPy type of the C parameter (a Python float
    would reach a ``float`` parameter as a double). Pointers are CuPy arrays or
    ``np.uint64(0)`` for null."""
    if len(args) != len(signature):
        raise TypeError(f"kernel launch: expected {len(signature)} arguments, got {len(args)}")
    cp = _cupy()
    for (name, kind), a in zip(signature, args):
        if kind == _PTR:
            if not (isinstance(a, cp.ndarray) or (isinstance(a, np.uint64) and a == 0)):
                raise TypeError(f"kernel launch: argument {name} expected a CuPy array or null, got {type(a).__name__}")
        elif type(a) is not kind:
            raise TypeError(f"kernel launch: argument {name} expected {np.dtype(kind).name}, got {type(a).__name__}")


_DEBUG_CHECKS = os.environ.get("CUPY_LEAN_CHECK_ARGS", "0") == "1"


def launch(func, grid, block, args, shared_mem=0, signature=ATTN_SIGNATURE):
    """Launch on CuPy's current stream (argument checks with
    ``CUPY_LEAN_CHECK_ARGS=1``; the tests turn them on)."""
    if _DEBUG_CHECKS:
        check_args(signature, args)
    func((int(grid),), (int(block),), args, shared_mem=int(shared_mem))

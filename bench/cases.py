"""Benchmark cases and their GPU inputs.

A :class:`Case` is pure data (NumPy only), so the case list, the K/V byte
counts and the floors can be computed without a GPU. :func:`build_inputs`
makes the CuPy arrays of one case: ``n_copies`` independent copies of q, K and
V (rotated over by the timing so that the bytes read per graph replay are far
over the L2 size), shared ``kv_lens`` and ``block_table``, and the page lists
FlashInfer's paged layout needs (views of the same memory, never a copy).

Layouts
-------
``"dense"``
    Uniform length ``N``: cache ``(batch, N, heads_kv, head_dim)``, cupy_lean
    gets ``kv_lens=None``.
``"ragged"``
    Lengths ``lens``: dense cache of capacity ``max(lens)`` rounded up to the
    page size, cupy_lean gets ``kv_lens`` (CuPy int32).
``"paged"``
    Lengths ``lens``: page pool ``(num_pages, page_size, heads_kv, head_dim)``
    (page size 16 for the fixed cases) whose pages are handed out in a
    shuffled order (fixed seed), cupy_lean gets ``kv_lens`` and
    ``block_table`` (CuPy int32).

Dense and ragged caches have a capacity rounded up to the page size (so that
FlashInfer can view them as pages); a dense case hands cupy_lean and SDPA a
view of its first ``N`` tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "Case",
    "PAGE_SIZE",
    "DTYPES",
    "all_cases",
    "short_case_names",
    "select_cases",
    "floor_us",
    "build_inputs",
    "Inputs",
]

PAGE_SIZE = 16
K = 1024
DTYPES = ("float16", "bfloat16")
ITEMSIZE = {"float16": 2, "bfloat16": 2}
#: HBM read ceiling of an H100 80GB HBM3 measured with a 16-byte read kernel
#: (DESIGN.md); used for the floors listed before a measurement exists.
H100_CEILING_TBPS = 3.07


def _fmt_len(n: int) -> str:
    return f"{n // K}k" if n % K == 0 and n >= K else str(n)


@dataclasses.dataclass(frozen=True)
class Case:
    """One decode-attention shape."""

    name: str
    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    lens: Tuple[int, ...]  # one length per sequence
    layout: str  # "dense" | "ragged" | "paged"
    family: str  # series label of the speedup plot
    page_size: int = PAGE_SIZE  # tokens per page (paged; the page view of the others for FlashInfer)

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def uniform(self) -> bool:
        return self.layout == "dense"

    @property
    def total_tokens(self) -> int:
        return int(sum(self.lens))

    @property
    def max_len(self) -> int:
        return int(max(self.lens)) if self.lens else 0

    @property
    def mean_len(self) -> float:
        return self.total_tokens / max(1, self.batch)

    @property
    def context(self) -> int:
        """Context length on the speedup plot's axis: the length of a uniform
        case, the mean length of a ragged one."""
        return self.max_len if self.uniform else int(round(self.mean_len))

    @property
    def capacity(self) -> int:
        """Tokens per sequence of the dense cache: the max length rounded up
        to the page size, so that FlashInfer can view it as pages (a dense
        case hands cupy_lean and SDPA a view of the first ``N`` tokens)."""
        return -(-self.max_len // self.page_size) * self.page_size

    def pages(self) -> np.ndarray:
        """Pages used by each sequence."""
        return -(-np.asarray(self.lens, dtype=np.int64) // self.page_size)

    def kv_bytes(self, itemsize: int = 2) -> int:
        """Bytes of K and V read: ``2 * sum(kv_lens) * heads_kv * head_dim * itemsize``."""
        return 2 * self.total_tokens * self.heads_kv * self.head_dim * itemsize

    def alloc_bytes(self, itemsize: int = 2) -> int:
        """Device bytes of one copy of K and V (q and out are negligible)."""
        per_token = self.heads_kv * self.head_dim * itemsize
        if self.layout == "paged":
            return 2 * int(self.pages().sum()) * self.page_size * per_token
        return 2 * self.batch * self.capacity * per_token

    def describe(self) -> str:
        if self.uniform:
            ln = _fmt_len(self.max_len)
        else:
            ln = f"{len(self.lens)} seqs, {self.total_tokens} tokens, max {self.max_len}"
        return (f"batch {self.batch}, heads {self.heads_q}/{self.heads_kv}, head_dim {self.head_dim}, "
                f"{self.layout}, {ln}")

    def row_fields(self, itemsize: int = 2) -> dict:
        """The case's columns of a result row."""
        return {
            "case": self.name, "family": self.family, "layout": self.layout, "page_size": self.page_size,
            "batch": self.batch,
            "heads_q": self.heads_q, "heads_kv": self.heads_kv, "head_dim": self.head_dim,
            "context": self.context, "max_len": self.max_len, "total_tokens": self.total_tokens,
            "kv_bytes": self.kv_bytes(itemsize),
        }

    def to_json(self) -> dict:
        lens = list(self.lens)
        return {
            "name": self.name, "batch": self.batch, "page_size": self.page_size, "heads_q": self.heads_q, "heads_kv": self.heads_kv,
            "head_dim": self.head_dim, "layout": self.layout, "family": self.family,
            "total_tokens": self.total_tokens, "max_len": self.max_len, "context": self.context,
            "lens": lens if len(set(lens)) > 1 else None,
        }


def _dense(batch, hq, hkv, n, d=128):
    name = f"b{batch}_h{hq}x{hkv}_d{d}_{_fmt_len(n)}"
    fam = f"B={batch} {hq}/{hkv} d{d}"
    return Case(name, batch, hq, hkv, d, (n,) * batch, "dense", fam)


def _ragged_lens() -> List[Tuple[str, Tuple[int, ...]]]:
    """The four ragged batches (fixed seeds)."""
    out = []
    out.append(("128k+31x1k", (128 * K,) + (1 * K,) * 31))
    rng = np.random.default_rng(20240516)
    ln = rng.lognormal(mean=math.log(6 * K), sigma=0.75, size=16)
    out.append(("lognorm16", tuple(int(x) for x in np.clip(np.rint(ln), 64, 64 * K))))
    rng = np.random.default_rng(20240517)
    out.append(("unif64", tuple(int(x) for x in rng.integers(2 * K, 32 * K, size=64, endpoint=True))))
    out.append(("2x64k+62x512", (64 * K,) * 2 + (512,) * 62))
    return out


def all_cases() -> List[Case]:
    """Every case of the default sweep, in sweep order."""
    cs = []
    for n in (1 * K, 8 * K, 64 * K, 256 * K, 512 * K):
        cs.append(_dense(1, 32, 32, n))
    for n in (4 * K, 32 * K, 128 * K):
        cs.append(_dense(1, 32, 8, n))
    cs.append(_dense(1, 64, 8, 128 * K))
    cs.append(_dense(8, 32, 8, 8 * K))
    cs.append(_dense(8, 32, 8, 16 * K))
    cs.append(_dense(32, 32, 8, 1 * K))
    cs.append(_dense(64, 32, 8, 2 * K))
    cs.append(_dense(16, 32, 32, 4 * K, d=64))
    cs.append(_dense(1, 8, 8, 256 * K, d=64))
    cs.append(_dense(4, 16, 8, 32 * K, d=256))
    for layout in ("ragged", "paged"):
        for tag, lens in _ragged_lens():
            cs.append(Case(f"{layout}_{tag}", len(lens), 32, 8, 128, lens, layout,
                           f"{layout} 32/8 d128"))
    names = [c.name for c in cs]
    assert len(set(names)) == len(names), names
    return cs


def short_case_names() -> List[str]:
    """Cases of ``--short`` (fp16 only)."""
    return ["b1_h32x32_d128_1k", "b1_h32x8_d128_4k", "b1_h32x8_d128_32k", "b8_h32x8_d128_8k",
            "ragged_128k+31x1k", "paged_lognorm16"]


def select_cases(filters: Optional[Sequence[str]] = None, short: bool = False) -> List[Case]:
    """Cases whose name contains any of ``filters`` (all when empty); with
    ``short`` only the short set."""
    cs = all_cases()
    if short:
        keep = set(short_case_names())
        cs = [c for c in cs if c.name in keep]
    if filters:
        cs = [c for c in cs if any(f in c.name for f in filters)]
    return cs


def floor_us(case: Case, ceiling_tbps: float = H100_CEILING_TBPS, itemsize: int = 2) -> float:
    """K/V bytes over the read ceiling, in microseconds."""
    return case.kv_bytes(itemsize) / (ceiling_tbps * 1e12) * 1e6


# ---------------------------------------------------------------------- GPU inputs

_FILL_SRC = r"""
extern "C" __global__ void bench_fill(unsigned short* __restrict__ out, long long n,
                                      unsigned int seed, int bf16, int shift) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
    unsigned int h = (unsigned int)i * 0x9E3779B1u ^ (unsigned int)(i >> 32) * 0x85EBCA77u ^ seed;
    h ^= h >> 16; h *= 0x7FEB352Du; h ^= h >> 15; h *= 0x846CA68Bu; h ^= h >> 16;
    const int k = (int)(h & 511u) - 256;          // x = k / 256 * 2^shift: exact in fp16 and bf16
    unsigned short bits = 0;
    if (k != 0) {
      const unsigned int u = __float_as_uint(ldexpf((float)k * (1.0f / 256.0f), shift));
      if (bf16) {
        bits = (unsigned short)(u >> 16);
      } else {
        const unsigned int sign = (u >> 16) & 0x8000u;
        const int e = (int)((u >> 23) & 0xffu) - 127 + 15;
        bits = (unsigned short)(sign | ((unsigned int)e << 10) | ((u >> 13) & 0x3ffu));
      }
    }
    out[i] = bits;
  }
}
"""

_fill_kernel = None


#: q is filled with values in [-16, 16) (K and V in [-1, 1)): scores then have a
#: standard deviation near 5 whatever head_dim, so the softmax is peaked, each
#: output is dominated by a few V rows and is O(0.1-1), and an output diff of
#: 1e-2 means something. With q in [-1, 1) the scores' deviation was 0.33: a
#: flat softmax whose outputs (about 0.01) are the mean of V, against which a
#: kernel that skipped part of K/V would still pass DIFF_TOL.
Q_SHIFT = 4


def _fill(arr, seed: int, bf16: bool, shift: int = 0):
    """Fill a contiguous 16-bit CuPy array with pseudo-random values
    k / 256 * 2**shift, k in [-256, 256), from a hash of the index (no
    temporary arrays; exact in float16 and bfloat16 for shift in [-6, 7])."""
    if not -6 <= shift <= 7:
        raise ValueError(f"shift: expected an integer in [-6, 7], got {shift!r}")
    import cupy as cp

    global _fill_kernel
    if _fill_kernel is None:
        _fill_kernel = cp.RawKernel(_FILL_SRC, "bench_fill")
    flat = arr.view(cp.uint16).reshape(-1)
    n = int(flat.size)
    if n == 0:
        return
    threads = 256
    blocks = int(min(-(-n // threads), 65536))
    _fill_kernel((blocks,), (threads,), (flat, np.int64(n), np.uint32(seed & 0xFFFFFFFF), np.int32(bool(bf16)), np.int32(shift)))


def cupy_dtype(name: str):
    if name == "float16":
        return np.dtype(np.float16)
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    raise ValueError(f"dtype: expected float16 or bfloat16, got {name!r}")


@dataclasses.dataclass
class Inputs:
    """GPU inputs of one case and dtype; copy ``i`` is ``(q[i], k[i], v[i])``."""

    case: Case
    dtype: str
    n_copies: int
    q: list
    k: list
    v: list
    kv_lens: object  # CuPy int32 (batch,) or None (dense)
    block_table: object  # CuPy int32 (batch, max_pages) or None
    # FlashInfer page lists (host NumPy int32) and each copy's page views
    fi_indptr: np.ndarray
    fi_indices: np.ndarray
    fi_last_page_len: np.ndarray
    fi_pages: list  # per copy: (k_pages, v_pages), each (num_pages, 16, heads_kv, head_dim)

    def index_kwargs(self) -> dict:
        """``kv_lens`` / ``block_table`` keyword arguments of a cupy_lean call
        on these inputs (the ones the layout has)."""
        kw = {}
        if self.kv_lens is not None:
            kw["kv_lens"] = self.kv_lens
        if self.block_table is not None:
            kw["block_table"] = self.block_table
        return kw

    def free(self):
        self.q = self.k = self.v = self.fi_pages = []
        self.kv_lens = self.block_table = None


def _seed(case: Case, dtype: str, copy: int, which: int) -> int:
    s = 0x12345
    for ch in f"{case.name}|{dtype}|{copy}|{which}":
        s = (s * 1000003 + ord(ch)) & 0xFFFFFFFF
    return s


def page_lists(case: Case, seed: int = 7):
    """Host page bookkeeping of a case.

    Returns ``(num_pages, block_table, indptr, indices, last_page_len)``:
    ``block_table`` (batch, max_pages) int32 (unused entries 0), and
    FlashInfer's CSR page lists. Dense and ragged cases view their dense cache
    ``(batch, capacity, H, D)`` as ``batch * capacity / 16`` pages in order
    (``block_table`` is then None); paged cases hand pages out in a shuffled
    order.
    """
    lens = np.asarray(case.lens, dtype=np.int64)
    npg = case.pages()
    indptr = np.zeros(case.batch + 1, dtype=np.int32)
    indptr[1:] = np.cumsum(npg)
    ps = case.page_size
    last = np.where(lens > 0, lens - (npg - 1) * ps, 0).astype(np.int32)
    if case.layout == "paged":
        total = int(npg.sum())
        perm = np.random.default_rng(seed).permutation(total).astype(np.int32)
        max_pages = int(npg.max()) if npg.size else 0
        table = np.zeros((case.batch, max(max_pages, 1)), dtype=np.int32)
        for b in range(case.batch):
            table[b, : npg[b]] = perm[indptr[b]: indptr[b + 1]]
        return total, table, indptr, perm.copy(), last
    if case.capacity % ps:
        raise ValueError(f"{case.name}: capacity {case.capacity} is not a multiple of the page size")
    per_seq = case.capacity // ps
    indices = np.concatenate([b * per_seq + np.arange(npg[b], dtype=np.int64) for b in range(case.batch)])
    return case.batch * per_seq, None, indptr, indices.astype(np.int32), last


def build_inputs(case: Case, dtype: str, n_copies: int) -> Inputs:
    """CuPy inputs of ``case`` with ``n_copies`` independent copies of q, K, V."""
    import cupy as cp

    dt = cupy_dtype(dtype)
    bf16 = dtype == "bfloat16"
    B, Hq, Hkv, D = case.batch, case.heads_q, case.heads_kv, case.head_dim
    num_pages, table, indptr, indices, last = page_lists(case)
    if case.layout == "paged":
        kv_shape = (num_pages, case.page_size, Hkv, D)
    else:
        kv_shape = (B, case.capacity, Hkv, D)
    qs, ks, vs, pages = [], [], [], []
    for c in range(n_copies):
        q = cp.empty((B, Hq, D), dtype=dt)
        k = cp.empty(kv_shape, dtype=dt)
        v = cp.empty(kv_shape, dtype=dt)
        _fill(q, _seed(case, dtype, c, 0), bf16, Q_SHIFT)
        _fill(k, _seed(case, dtype, c, 1), bf16)
        _fill(v, _seed(case, dtype, c, 2), bf16)
        qs.append(q)
        ks.append(k)
        vs.append(v)
        pshape = (num_pages, case.page_size, Hkv, D)
        pages.append((k.reshape(pshape), v.reshape(pshape)))
        if case.layout == "dense" and case.capacity != case.max_len:
            k, v = k[:, :case.max_len], v[:, :case.max_len]  # views: the first N tokens
        ks[-1], vs[-1] = k, v
    kv_lens = None if case.layout == "dense" else cp.asarray(np.asarray(case.lens, dtype=np.int32))
    bt = cp.asarray(table) if table is not None else None
    cp.cuda.Device().synchronize()
    return Inputs(case, dtype, n_copies, qs, ks, vs, kv_lens, bt, indptr, indices, last, pages)


def plan_copies(case: Case, rotate_bytes: float, mem_bytes: float, max_copies: int = 64,
                itemsize: int = 2) -> int:
    """Copies to rotate over: enough that ``copies * kv_bytes >= rotate_bytes``,
    2 rather than 1 while two copies take at most 8 GB, within ``mem_bytes`` of
    allocations and ``max_copies``."""
    kvb = max(1, case.kv_bytes(itemsize))
    alloc = max(1, case.alloc_bytes(itemsize))
    n = max(1, -(-int(rotate_bytes) // kvb))
    if n == 1 and 2 * alloc <= min(mem_bytes, 8e9):
        n = 2
    n = min(n, max_copies, max(1, int(mem_bytes // alloc)))
    return max(1, n)

"""Argument checks of :func:`cupy_lean.attention` and :func:`cupy_lean.merge_states`
(NumPy path).

One test per bad input: the exception type, and a message that names the
argument and shows the value given. Tests marked ``# Was a gap, fixed:`` describe inputs
that the package does not yet reject (or accept) properly; they are strict
xfails, so they start failing - and the mark must go - once the package is
fixed.
"""

import dataclasses
import sys
import warnings

import ml_dtypes
import numpy as np
import pytest

import cupy_lean

BF16 = np.dtype(ml_dtypes.bfloat16)
B, HQ, HKV, D, S = 2, 4, 2, 8, 10
NUM_PAGES, PAGE = 6, 4

def dense(dtype=np.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, HQ, D)).astype(dtype)
    k = rng.standard_normal((B, S, HKV, D)).astype(dtype)
    v = rng.standard_normal((B, S, HKV, D)).astype(dtype)
    return dict(q=q, k=k, v=v, kv_lens=np.array([3, S], dtype=np.int32))


def paged(dtype=np.float32):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((B, HQ, D)).astype(dtype)
    k = rng.standard_normal((NUM_PAGES, PAGE, HKV, D)).astype(dtype)
    v = rng.standard_normal((NUM_PAGES, PAGE, HKV, D)).astype(dtype)
    # Sequence 0: 5 tokens on pages 4, 1; sequence 1: 9 tokens on pages 0, 5, 2.
    table = np.array([[4, 1, -1], [0, 5, 2]], dtype=np.int32)
    return dict(q=q, k=k, v=v, kv_lens=np.array([5, 9], dtype=np.int32), block_table=table)


def call(args, **changes):
    kw = dict(args)
    kw.update(changes)
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    return cupy_lean.attention(q, k, v, **kw)


def strided(shape, step=2, dtype=np.float32):
    """An array of ``shape`` whose last axis has stride ``step`` elements."""
    full = np.zeros(shape[:-1] + (shape[-1] * step,), dtype=dtype)
    return full[..., ::step]


# (id, base, changes, exception, message regex)
ATTENTION_CASES = [
    # ranks
    ("q rank 2", dense, lambda a: dict(q=a["q"][0]), ValueError,
     r"q: expected 3 dimensions .*got shape \(4, 8\)"),
    ("q rank 5", dense, lambda a: dict(q=a["q"][None, None]), ValueError,
     r"q: expected 3 dimensions .* or 4 .*got shape \(1, 1, 2, 4, 8\)"),
    ("q rank 4 batch", dense, lambda a: dict(q=a["q"][None]), ValueError,
     r"k: expected batch 1 \(q.shape\[0\]\), got 2"),
    ("k rank 3", dense, lambda a: dict(k=a["k"][0]), ValueError,
     r"k: expected 4 dimensions \(batch, seqlen, heads_kv, head_dim\), got shape \(10, 2, 8\)"),
    ("v rank 5", dense, lambda a: dict(v=a["v"][..., None]), ValueError,
     r"v: expected 4 dimensions .*got shape \(2, 10, 2, 8, 1\)"),
    ("paged k rank 3", paged, lambda a: dict(k=a["k"][0], v=a["v"][0]), ValueError,
     r"k: expected 4 dimensions \(num_pages, page_size, heads_kv, head_dim\), got shape \(4, 2, 8\)"),
    # batch
    ("k batch", dense, lambda a: dict(k=np.zeros((3, S, HKV, D), np.float32),
                                      v=np.zeros((3, S, HKV, D), np.float32)), ValueError,
     r"k: expected batch 2 \(q\.shape\[0\]\), got 3"),
    ("v batch", dense, lambda a: dict(v=np.zeros((3, S, HKV, D), np.float32)), ValueError,
     r"v: expected the shape of k \(2, 10, 2, 8\), got \(3, 10, 2, 8\)"),
    ("q batch", dense, lambda a: dict(q=np.zeros((1, HQ, D), np.float32),
                                      kv_lens=np.array([3])), ValueError,
     r"k: expected batch 1 \(q\.shape\[0\]\), got 2"),
    # heads
    ("v heads", dense, lambda a: dict(v=np.zeros((B, S, 1, D), np.float32)), ValueError,
     r"v: expected the shape of k \(2, 10, 2, 8\), got \(2, 10, 1, 8\)"),
    ("heads_q not a multiple", dense, lambda a: dict(q=np.zeros((B, 3, D), np.float32)), ValueError,
     r"q: heads_q must be a positive multiple of heads_kv, got heads_q=3, heads_kv=2"),
    ("heads_q < heads_kv", dense, lambda a: dict(q=np.zeros((B, 1, D), np.float32)), ValueError,
     r"q: heads_q .* got heads_q=1, heads_kv=2"),
    ("heads_q 0", dense, lambda a: dict(q=np.zeros((B, 0, D), np.float32)), ValueError,
     r"q: heads_q .* got heads_q=0, heads_kv=2"),
    ("heads_kv 0", dense, lambda a: dict(k=np.zeros((B, S, 0, D), np.float32),
                                         v=np.zeros((B, S, 0, D), np.float32)), ValueError,
     r"k: expected heads_kv >= 1, got 0"),
    ("heads_kv read from an HND cache as NHD", dense,
     lambda a: dict(k=np.zeros((B, HKV, S, D), np.float32), v=np.zeros((B, HKV, S, D), np.float32)), ValueError,
     r"heads_q=4, heads_kv=10 \(heads_kv: k's axis 2 as \(batch, seqlen, heads_kv, head_dim\), its axis 1 "
     r"with kv_layout='HND'\)"),
    # head_dim
    ("head_dim 0", dense, lambda a: dict(q=np.zeros((B, HQ, 0), np.float32), k=np.zeros((B, S, HKV, 0), np.float32),
                                         v=np.zeros((B, S, HKV, 0), np.float32)), ValueError,
     r"q: expected head_dim >= 1 \(q.shape\[-1\]\), got 0"),
    ("k head_dim", dense, lambda a: dict(k=np.zeros((B, S, HKV, 16), np.float32),
                                         v=np.zeros((B, S, HKV, 16), np.float32)), ValueError,
     r"k: expected head_dim 8 \(q\.shape\[2\]\), got 16"),
    ("v head_dim", dense, lambda a: dict(v=np.zeros((B, S, HKV, 4), np.float32)), ValueError,
     r"v: expected the shape of k \(2, 10, 2, 8\), got \(2, 10, 2, 4\)"),
    ("paged head_dim", paged, lambda a: dict(q=np.zeros((B, HQ, 16), np.float32)), ValueError,
     r"k: expected head_dim 16 \(q\.shape\[2\]\), got 8"),
    # dtypes
    ("mixed dtypes k v", dense, lambda a: dict(k=a["k"].astype(np.float16), v=a["v"].astype(np.float16)),
     TypeError, r"q, k, v: expected one dtype, got q float32, k float16, v float16"),
    ("mixed dtypes v", dense, lambda a: dict(v=a["v"].astype(np.float64)),
     TypeError, r"q, k, v: expected one dtype, got q float32, k float32, v float64"),
    ("mixed dtypes q bf16", dense, lambda a: dict(q=a["q"].astype(BF16)),
     TypeError, r"q, k, v: expected one dtype, got q bfloat16, k float32, v float32"),
    ("int32", dense, lambda a: {n: a[n].astype(np.int32) for n in "qkv"},
     TypeError, r"q: the NumPy path supports dtypes float16, bfloat16, float32, float64, got int32"),
    ("k int32", dense, lambda a: dict(k=a["k"].astype(np.int32)),
     TypeError, r"k: the NumPy path supports dtypes .*, got int32"),
    ("complex64", dense, lambda a: {n: a[n].astype(np.complex64) for n in "qkv"},
     TypeError, r"q: the NumPy path supports dtypes .*, got complex64"),
    ("v complex128", dense, lambda a: dict(v=a["v"].astype(np.complex128)),
     TypeError, r"v: the NumPy path supports dtypes .*, got complex128"),
    ("bool", dense, lambda a: dict(q=a["q"] > 0),
     TypeError, r"q: the NumPy path supports dtypes .*, got bool"),
    # kv_lens
    ("kv_lens too long", dense, lambda a: dict(kv_lens=np.array([1, 2, 3])), ValueError,
     r"kv_lens: expected shape \(2,\), got \(3,\)"),
    ("kv_lens 2-D", dense, lambda a: dict(kv_lens=np.array([[1], [2]])), ValueError,
     r"kv_lens: expected shape \(2,\), got \(2, 1\)"),
    ("kv_lens scalar", dense, lambda a: dict(kv_lens=3), ValueError,
     r"kv_lens: expected shape \(2,\), got \(\)"),
    ("kv_lens float", dense, lambda a: dict(kv_lens=np.array([3.0, 4.0])), TypeError,
     r"kv_lens: expected an integer dtype, got float64"),
    ("kv_lens float list", dense, lambda a: dict(kv_lens=[3, 4.5]), TypeError,
     r"kv_lens: expected an integer dtype, got float64"),
    ("kv_lens bool", dense, lambda a: dict(kv_lens=np.array([True, False])), TypeError,
     r"kv_lens: expected an integer dtype, got bool"),
    ("kv_lens past int64", dense, lambda a: dict(kv_lens=[2**70, 1]), ValueError,
     r"kv_lens: expected values in \[0, 10\] .*got kv_lens\[0\] = 1180591620717411303424"),
    ("kv_lens negative", dense, lambda a: dict(kv_lens=np.array([3, -1])), ValueError,
     r"kv_lens: expected values in \[0, 10\] .*got kv_lens\[1\] = -1"),
    ("kv_lens over capacity", dense, lambda a: dict(kv_lens=np.array([11, 3])), ValueError,
     r"kv_lens: expected values in \[0, 10\] .*got kv_lens\[0\] = 11"),
    ("paged kv_lens over capacity", paged, lambda a: dict(kv_lens=np.array([5, 13])), ValueError,
     r"kv_lens: expected values in \[0, 12\] .*got kv_lens\[1\] = 13"),
    ("paged kv_lens negative", paged, lambda a: dict(kv_lens=np.array([-4, 9])), ValueError,
     r"kv_lens: .*got kv_lens\[0\] = -4"),
    ("paged without kv_lens", paged, lambda a: dict(kv_lens=None), ValueError,
     r"kv_lens: required with a paged cache \(block_table given\)"),
    # block_table
    ("block_table batch", paged, lambda a: dict(block_table=np.zeros((3, 3), np.int32)), ValueError,
     r"block_table: expected shape \(batch, max_pages\) with batch 2, got \(3, 3\)"),
    ("block_table 1-D", paged, lambda a: dict(block_table=np.zeros(3, np.int32)), ValueError,
     r"block_table: expected shape \(batch, max_pages\) with batch 2, got \(3,\)"),
    ("block_table 3-D", paged, lambda a: dict(block_table=a["block_table"][..., None]), ValueError,
     r"block_table: expected shape .*got \(2, 3, 1\)"),
    ("block_table float", paged, lambda a: dict(block_table=a["block_table"].astype(np.float32)),
     TypeError, r"block_table: expected an integer dtype, got float32"),
    ("block_table negative page", paged,
     lambda a: dict(block_table=np.array([[4, -1, -1], [0, 5, 2]])), ValueError,
     r"block_table: expected page indices in \[0, 6\) .*got block_table\[0, 1\] = -1"),
    ("block_table page past the cache", paged,
     lambda a: dict(block_table=np.array([[4, 1, -1], [0, 5, 6]])), ValueError,
     r"block_table: expected page indices in \[0, 6\) .*got block_table\[1, 2\] = 6"),
    ("block_table huge page", paged,
     lambda a: dict(block_table=np.array([[2**40, 1, -1], [0, 5, 2]])), ValueError,
     r"block_table: .*got block_table\[0, 0\] = 1099511627776"),
    # strides
    ("k last axis strided", dense, lambda a: dict(k=strided((B, S, HKV, D))), ValueError,
     r"k: expected unit stride on the last axis \(head_dim\), got a stride of 2 elements"),
    ("v last axis strided", dense, lambda a: dict(v=strided((B, S, HKV, D), 3)), ValueError,
     r"v: expected unit stride on the last axis \(head_dim\), got a stride of 3 elements"),
    ("q last axis strided", dense, lambda a: dict(q=strided((B, HQ, D))), ValueError,
     r"q: expected unit stride on the last axis \(head_dim\), got a stride of 2 elements"),
    ("k last axis reversed", dense, lambda a: dict(k=a["k"][..., ::-1]), ValueError,
     r"k: expected unit stride on the last axis \(head_dim\), got a stride of -1 elements"),
    ("paged k strided", paged, lambda a: dict(k=strided((NUM_PAGES, PAGE, HKV, D))), ValueError,
     r"k: expected unit stride .*got a stride of 2 elements"),
    # out
    ("out shape", dense, lambda a: dict(out=np.zeros((B, HQ, D + 1), np.float32)), ValueError,
     r"out: expected shape \(2, 4, 8\), got \(2, 4, 9\)"),
    ("out rank", dense, lambda a: dict(out=np.zeros((B, HQ * D), np.float32)), ValueError,
     r"out: expected shape \(2, 4, 8\), got \(2, 32\)"),
    ("out dtype", dense, lambda a: dict(out=np.zeros((B, HQ, D), np.float64)), TypeError,
     r"out: expected dtype float32 \(q's dtype\), got float64"),
    ("out dtype bf16", dense, lambda a: dict(out=np.zeros((B, HQ, D), BF16)), TypeError,
     r"out: expected dtype float32 \(q's dtype\), got bfloat16"),
    ("out strided", dense, lambda a: dict(out=strided((B, HQ, D))), ValueError,
     r"out: expected unit stride on the last axis \(head_dim\), got a stride of 2 elements"),
    # lse, return_lse, validate
    ("lse shape", dense, lambda a: dict(lse=np.zeros((B, HQ + 1), np.float32)), ValueError,
     r"lse: expected shape \(2, 4\), got \(2, 5\)"),
    ("lse dtype", dense, lambda a: dict(lse=np.zeros((B, HQ), np.float64)), TypeError,
     r"lse: expected dtype float32, got float64"),
    ("lse strided", dense, lambda a: dict(lse=np.zeros((HQ, B), np.float32).T), ValueError,
     r"lse: expected a C-contiguous array"),
    ("return_lse string", dense, lambda a: dict(return_lse="no"), TypeError,
     r"return_lse: expected True or False, got str 'no'"),
    ("validate int", dense, lambda a: dict(validate=2), TypeError,
     r"validate: expected True or False, got int 2"),
    # scale
    ("scale nan", dense, lambda a: dict(scale=float("nan")), ValueError,
     r"scale: expected a finite number, got nan"),
    ("scale inf", dense, lambda a: dict(scale=float("inf")), ValueError,
     r"scale: expected a finite number, got inf"),
    ("scale -inf float32", dense, lambda a: dict(scale=np.float32("-inf")), ValueError,
     r"scale: expected a finite number, got -inf"),
    ("scale string", dense, lambda a: dict(scale="0.5"), TypeError,
     r"scale: expected a real number, got str '0\.5'"),
    ("scale complex", dense, lambda a: dict(scale=0.5 + 1j), TypeError,
     r"scale: expected a real number, got complex \(0\.5\+1j\)"),
    ("scale bool", dense, lambda a: dict(scale=True), TypeError,
     r"scale: expected a real number, got bool True"),
    ("scale list", dense, lambda a: dict(scale=[0.5]), TypeError,
     r"scale: expected a real number, got list \[0\.5\]"),
    # schedule
    ("schedule unknown", dense, lambda a: dict(schedule="flash"), ValueError,
     r"schedule: expected one of \('lean', 'split', 'head'\), got 'flash'"),
    ("schedule case", dense, lambda a: dict(schedule="LEAN"), ValueError,
     r"schedule: expected one of .*got 'LEAN'"),
    ("schedule None", dense, lambda a: dict(schedule=None), ValueError,
     r"schedule: expected one of .*got None"),
    # tile_size
    ("tile_size 0", dense, lambda a: dict(tile_size=0), ValueError,
     r"tile_size: expected an integer >= 1, got 0"),
    ("tile_size -16", dense, lambda a: dict(tile_size=-16), ValueError,
     r"tile_size: expected an integer >= 1, got -16"),
    ("tile_size 48", dense, lambda a: dict(tile_size=48), ValueError,
     r"tile_size: expected one of \(16, 32, 64, 128\), got 48"),
    ("tile_size 256", dense, lambda a: dict(tile_size=256), ValueError,
     r"tile_size: expected one of \(16, 32, 64, 128\), got 256"),
    ("tile_size str", dense, lambda a: dict(tile_size="64"), TypeError,
     r"tile_size: expected an integer, got str '64'"),
    ("tile_size float", dense, lambda a: dict(tile_size=64.0), TypeError,
     r"tile_size: expected an integer, got float 64\.0"),
    ("tile_size bool", dense, lambda a: dict(tile_size=True), TypeError,
     r"tile_size: expected an integer, got bool True"),
    # num_ctas
    ("num_ctas 0", dense, lambda a: dict(num_ctas=0), ValueError,
     r"num_ctas: expected an integer in \[1, 1048576\], got 0"),
    ("num_ctas -1", dense, lambda a: dict(num_ctas=-1), ValueError,
     r"num_ctas: expected an integer in \[1, 1048576\], got -1"),
    ("num_ctas too many", dense, lambda a: dict(num_ctas=2**21), ValueError,
     r"num_ctas: expected an integer in \[1, 1048576\], got 2097152"),
    ("num_ctas 2.5", dense, lambda a: dict(num_ctas=2.5), TypeError,
     r"num_ctas: expected an integer, got float 2\.5"),
    ("num_ctas True", dense, lambda a: dict(num_ctas=True), TypeError,
     r"num_ctas: expected an integer, got bool True"),
    ("num_ctas np.bool_", dense, lambda a: dict(num_ctas=np.bool_(True)), TypeError,
     r"num_ctas: expected an integer, got bool.*True"),
    ("num_ctas str", dense, lambda a: dict(num_ctas="8"), TypeError,
     r"num_ctas: expected an integer, got str '8'"),
]


@pytest.mark.parametrize("base, changes, exc, match",
                         [c[1:] for c in ATTENTION_CASES], ids=[c[0] for c in ATTENTION_CASES])
def test_attention_rejects(base, changes, exc, match):
    args = base()
    with pytest.raises(exc, match=match) as info:
        call(args, **changes(args))
    assert type(info.value) is exc  # not a subclass such as OverflowError


# ------------------------------------------------------------------ accepted inputs

def test_unused_block_table_entries_are_not_checked():
    """Entries past ceil(kv_lens[b] / page_size) may hold anything."""
    args = paged()
    table = np.array([[4, 1, -1], [0, 5, 2]], dtype=np.int64)
    ref = call(args, block_table=table)
    for junk in (-1, -(2**40), NUM_PAGES, 2**40):
        t = table.copy()
        t[0, 2] = junk
        np.testing.assert_array_equal(call(args, block_table=t), ref)
    # A length-0 sequence reads no page at all.
    t = np.array([[-1, -1, -1], [0, 5, 2]])
    out, lse = call(args, block_table=t, kv_lens=np.array([0, 9]), return_lse=True)
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
    # The pages in use are the ones read: the result equals the dense gather.
    dense_k = np.concatenate([args["k"][[4, 1]], np.zeros((1, PAGE, HKV, D), np.float32)]).reshape(-1, HKV, D)
    dense_v = np.concatenate([args["v"][[4, 1]], np.zeros((1, PAGE, HKV, D), np.float32)]).reshape(-1, HKV, D)
    seq0 = cupy_lean.attention(args["q"][:1], dense_k[None], dense_v[None], kv_lens=np.array([5]))
    np.testing.assert_allclose(ref[:1], seq0, rtol=1e-6)


@pytest.mark.parametrize(
    "changes",
    [
        dict(kv_lens=[3, 10]),  # a list
        dict(kv_lens=np.array([3, 10], np.uint16)),
        dict(kv_lens=np.array([0, 0], np.int64)),
        dict(scale=np.float32(0.25)),
        dict(scale=1),
        dict(scale=-0.5),
        dict(tile_size=np.int64(64)),
        dict(num_ctas=np.int32(7)),
        dict(num_ctas=2**20),
        dict(schedule="head", num_ctas=1, tile_size=16),
    ],
    ids=lambda c: ",".join(f"{k}={v!r}" for k, v in c.items()),
)
def test_attention_accepts(changes):
    args = dense()
    out = call(args, **changes)
    assert out.shape == (B, HQ, D) and out.dtype == np.float32
    assert np.all(np.isfinite(out))


# Was a gap, fixed: an out= array that cannot be written fails with NumPy's own message
# ("assignment destination is read-only"), which does not name `out`.
def test_attention_rejects_read_only_out():
    args = dense()
    buf = np.zeros((B, HQ, D), np.float32)
    buf.flags.writeable = False
    with pytest.raises(ValueError, match=r"out: .*(read-only|writeable)"):
        call(args, out=buf)


# Was a gap, fixed: out= that is not an ndarray (here a nested list) is converted to a new
# array, written and returned; the caller's object is silently left unchanged.
def test_attention_rejects_out_that_is_not_an_array():
    args = dense()
    buf = np.zeros((B, HQ, D), np.float32).tolist()
    with pytest.raises(TypeError, match=r"out: .*list"):
        call(args, out=buf)


# Was a gap, fixed: a Python int too large for a float escapes as OverflowError from
# float(scale) instead of the ValueError naming `scale`.
def test_attention_rejects_huge_integer_scale():
    args = dense()
    with pytest.raises(ValueError, match=r"^scale: expected a finite number, got an integer of 401 digits$"):
        call(args, scale=10**400)


# page_size 0 (an empty paged cache) must be reported as such, not as a
# stride problem (zero-size arrays have zero strides on NumPy >= 2).
def test_attention_rejects_page_size_zero():
    args = paged()
    z = np.zeros((NUM_PAGES, 0, HKV, D), np.float32)
    with pytest.raises(ValueError, match=r"k: expected page_size >= 1, got 0"):
        call(args, k=z, v=z)


# Was a gap, fixed: kv_lens=[] (batch 0) becomes a float64 array and is rejected as
# "kv_lens: expected an integer dtype, got float64" (lean_schedule accepts it).
def test_attention_accepts_empty_kv_lens_list_for_batch_zero():
    q = np.zeros((0, HQ, D), np.float32)
    k = np.zeros((0, S, HKV, D), np.float32)
    out = cupy_lean.attention(q, k, k, kv_lens=[])
    assert out.shape == (0, HQ, D)


# A paged cache with no pages at all, every sequence of length 0, is valid:
# zeros and lse -inf.
def test_attention_accepts_empty_page_pool():
    args = paged()
    z = np.zeros((0, PAGE, HKV, D), np.float32)
    out, lse = call(args, k=z, v=z, kv_lens=np.array([0, 0]),
                    block_table=np.full((B, 3), -1), return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


# ------------------------------------------------------------------ merge_states

def states(parts=3, rows=4, d=8, dtype=np.float32):
    rng = np.random.default_rng(2)
    return (rng.standard_normal((parts, rows, d)).astype(dtype),
            rng.standard_normal((parts, rows)).astype(np.float32))


MERGE_CASES = [
    ("outs 1-D", lambda o, s: (o[0, 0], s[0]), ValueError,
     r"outs: expected at least 2 dimensions \(parts, \.\.\., head_dim\), got shape \(8,\)"),
    ("outs 0-D", lambda o, s: (np.float32(1.0), s[0]), ValueError,
     r"outs: expected at least 2 dimensions .*got shape \(\)"),
    ("lses shape", lambda o, s: (o, s[:, :3]), ValueError,
     r"lses: expected shape \(3, 4\) \(outs\.shape\[:-1\]\), got \(3, 3\)"),
    ("lses with head_dim", lambda o, s: (o, np.zeros(o.shape, np.float32)), ValueError,
     r"lses: expected shape \(3, 4\) .*got \(3, 4, 8\)"),
    ("no parts", lambda o, s: (o[:0], s[:0]), ValueError,
     r"outs: expected at least one part on axis 0, got 0"),
    ("outs int32", lambda o, s: (o.astype(np.int32), s), TypeError,
     r"outs: expected dtype among float16, bfloat16, float32, float64, got int32"),
    ("outs complex", lambda o, s: (o.astype(np.complex128), s), TypeError,
     r"outs: expected dtype among .*got complex128"),
    ("outs bool", lambda o, s: (o > 0, s), TypeError,
     r"outs: expected dtype among .*got bool"),
    ("lses int", lambda o, s: (o, s.astype(np.int64)), TypeError,
     r"lses: expected a floating dtype, got int64"),
    ("lses complex", lambda o, s: (o, s.astype(np.complex64)), TypeError,
     r"lses: expected a floating dtype, got complex64"),
]


@pytest.mark.parametrize("change, exc, match", [c[1:] for c in MERGE_CASES],
                         ids=[c[0] for c in MERGE_CASES])
def test_merge_states_rejects(change, exc, match):
    outs, lses = change(*states())
    with pytest.raises(exc, match=match) as info:
        cupy_lean.merge_states(outs, lses)
    assert type(info.value) is exc


# Was a gap, fixed: bfloat16 lses are rejected ("lses: expected a floating dtype, got
# bfloat16": np.issubdtype(bfloat16, np.floating) is False) although bfloat16
# outs are accepted and float16 lses are.
def test_merge_states_accepts_bfloat16_lses():
    outs, lses = states(dtype=BF16)
    out, lse = cupy_lean.merge_states(outs, lses.astype(BF16))
    assert out.dtype == BF16 and lse.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64])
@pytest.mark.parametrize("lse_dtype", [np.float16, np.float32, np.float64])
def test_merge_states_accepts(dtype, lse_dtype):
    outs, lses = states(dtype=dtype)
    out, lse = cupy_lean.merge_states(outs, lses.astype(lse_dtype))
    assert out.dtype == np.dtype(dtype) and out.shape == (4, 8)
    assert lse.dtype == np.float32 and lse.shape == (4,)
    assert np.all(np.isfinite(out.astype(np.float64))) and np.all(np.isfinite(lse))


# ---------------------------------------------------------------- signatures and plans (no GPU needed)

class _FakeData:
    def __init__(self, ptr, device_id=0):
        self.ptr = ptr
        self.device_id = device_id


class _FakeArray:
    """Just the metadata a signature reads."""

    def __init__(self, shape, strides, dtype, ptr=4096, device=0):
        self.shape, self.strides, self.dtype = tuple(shape), tuple(strides), np.dtype(dtype)
        self.data = _FakeData(ptr, device)


def _sig(**over):
    from cupy_lean._plan import signature

    q = _FakeArray((2, 8, 64), (1024, 128, 2), np.float16)
    k = _FakeArray((2, 100, 2, 64), (25600, 256, 128, 2), np.float16)
    args = dict(q=q, k=k, v=k, out=None, kv_lens=None, block_table=None, scale=None, schedule="lean",
                num_ctas=None, tile_size=None)
    args.update(over)
    return signature(**args)


def test_signature_is_hashable_and_sees_every_launch_input():
    from cupy_lean._plan import check_devices

    base = _sig()
    assert hash(base) == hash(_sig()) and base == _sig()
    k_other = _FakeArray((2, 100, 2, 64), (25600, 256, 128, 2), np.float16, ptr=4098)
    variants = [
        _sig(q=_FakeArray((3, 8, 64), (1024, 128, 2), np.float16)),  # shape
        _sig(q=_FakeArray((2, 8, 64), (2048, 128, 2), np.float16)),  # strides
        _sig(q=_FakeArray((2, 8, 64), (1024, 128, 2), BF16)),  # dtype
        _sig(k=k_other),  # alignment of a pointer
        _sig(scale=0.5), _sig(schedule="split"), _sig(num_ctas=7), _sig(tile_size=32),
        _sig(kv_lens=np.zeros(2, np.int32)),
        _sig(q=_FakeArray((2, 8, 64), (1024, 128, 2), np.float16, device=1)),  # the device an array is on
    ]
    assert len({base, *variants}) == len(variants) + 1
    # data pointers that keep the alignment do not change the signature
    assert _sig(k=_FakeArray((2, 100, 2, 64), (25600, 256, 128, 2), np.float16, ptr=1 << 40)) == base
    # an array on another device than the current one is refused, naming it
    check_devices(0, q=_FakeArray((2, 8, 64), (1024, 128, 2), np.float16), kv_lens=np.zeros(2), out=None)
    with pytest.raises(ValueError, match=r"k: the array is on device 3, the current device is 0 .*Device\(3\)"):
        check_devices(0, q=_FakeArray((2, 8, 64), (1024, 128, 2), np.float16),
                      k=_FakeArray((2, 100, 2, 64), (25600, 256, 128, 2), np.float16, device=3))


def test_layers_below_the_front_end_do_not_import_it():
    import pathlib

    pkg = pathlib.Path(cupy_lean.__file__).parent
    for name in ("_gpu.py", "kernels.py", "_plan.py", "_cache.py", "validation.py", "reference.py"):
        assert "from .attention" not in (pkg / name).read_text()


def test_no_gpu_says_what_is_missing():
    """CuPy installed, no GPU (CI): the GPU entry points say what is wrong and
    what to do instead of a bare CUDA runtime error."""
    pytest.importorskip("cupy")
    if cupy_lean.gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match=r"no usable CUDA GPU .*driver.*NumPy arrays run the CPU path"):
        cupy_lean.warmup()


class _ForeignGpuArray:
    """What a PyTorch or JAX GPU array shows CuPy: the CUDA array interface."""

    def __init__(self, shape, typestr="<f2"):
        strides = np.zeros(shape).strides
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (1 << 20, False),
                                         "version": 3, "strides": tuple(x // 8 * 2 for x in strides)}


def test_gpu_arrays_without_a_usable_gpu_say_what_is_missing():
    """Arrays of another GPU library on a machine where CuPy cannot use the
    GPU (no driver here; in use, a driver older than CuPy's CUDA): attention()
    says what is missing, not a bare CUDA runtime error, whatever else is
    wrong with the call."""
    pytest.importorskip("cupy")
    if cupy_lean.gpu_available():
        pytest.skip("a GPU is present")
    kv = _ForeignGpuArray((2, 16, 2, 64))
    for hq in (8, 7):  # 7 query heads over 2 KV heads is wrong too
        q = _ForeignGpuArray((2, hq, 64))
        with pytest.raises(RuntimeError, match=r"no usable CUDA GPU .*driver"):
            cupy_lean.attention(q, kv, kv)


@pytest.mark.parametrize("base", [dense, paged])
def test_kv_layout_hnd_equals_nhd(base):
    args = base()
    nhd_out, nhd_lse = call(args, return_lse=True)
    hnd = dict(args, k=np.ascontiguousarray(args["k"].transpose(0, 2, 1, 3)),
               v=np.ascontiguousarray(args["v"].transpose(0, 2, 1, 3)))
    out, lse = call(hnd, return_lse=True, kv_layout="HND")
    assert np.array_equal(out, nhd_out) and np.array_equal(lse, nhd_lse)


def test_kv_layout_errors():
    args = dense()
    with pytest.raises(ValueError, match=r"kv_layout: expected one of \('NHD', 'HND'\), got 'HDN'"):
        call(args, kv_layout="HDN")
    with pytest.raises(ValueError, match=r"k: expected 4 dimensions \(batch, heads_kv, seqlen, head_dim\) "
                                         r"\(kv_layout='HND'\), got shape \(2, 10, 2\)"):
        call(args, k=args["k"][..., 0], kv_layout="HND")


def test_config_object_is_checked_before_any_gpu_work():
    import cupy_lean

    q = np.zeros((1, 4, 64), np.float16)
    k = v = np.zeros((1, 16, 1, 64), np.float16)
    with pytest.raises(TypeError, match="config: expected a cupy_lean.Config, got dict"):
        cupy_lean.plan(q, k, v, config={"tile_size": 32})
    with pytest.raises(ValueError, match=r"config: .*got both \(config and tile_size, stages\)"):
        cupy_lean.plan(q, k, v, config=cupy_lean.Config(tile_size=32), tile_size=64, stages=3)
    c = cupy_lean.Config(tile_size=32, stages=3)
    assert (c.schedule, c.tile_size, c.stages, c.ctas_per_sm, c.num_ctas) == ("lean", 32, 3, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.tile_size = 64
    # a bad field is refused where the configuration is written
    for kw, exc, text in ((dict(schedule="x"), ValueError, "schedule: expected one of"),
                          (dict(tile_size=7), ValueError, "tile_size: expected one of (16, 32, 64, 128), got 7"),
                          (dict(num_ctas=-3), ValueError, "num_ctas: expected an integer in [1, "),
                          (dict(stages=7), ValueError, "stages: expected an integer in [2, 6], got 7"),
                          (dict(ctas_per_sm=0), ValueError, "ctas_per_sm: expected an integer in [1, 32], got 0"),
                          (dict(min_tiles_per_cta=2.5), TypeError, "min_tiles_per_cta: expected an integer"),
                          (dict(merge_balance=-1), ValueError, "merge_balance: expected an integer in [0, "),
                          (dict(schedule="split", merge_balance=3), ValueError,
                           "merge_balance: a stream-K option, for schedule 'lean' only; got merge_balance=3 with "
                           "schedule='split'"),
                          (dict(schedule="head", ctas_per_sm=2, min_tiles_per_cta=4), ValueError,
                           "ctas_per_sm: a stream-K option, for schedule 'lean' only; got ctas_per_sm=2, "
                           "min_tiles_per_cta=4 with schedule='head'")):
        with pytest.raises(exc) as e:
            cupy_lean.Config(**kw)
        assert text in str(e.value)
    # the same refusal from plan()'s arguments, before any GPU work; merge_balance 0 (off) passes
    with pytest.raises(ValueError, match="min_tiles_per_cta: a stream-K option, for schedule 'lean' only"):
        cupy_lean.plan(q, k, v, schedule="split", min_tiles_per_cta=2)
    assert cupy_lean.Config(schedule="split", merge_balance=0).merge_balance == 0
    with pytest.raises(ValueError, match="schedule: expected one of"):  # a bad schedule is named as such
        cupy_lean.Config(schedule="Lean", ctas_per_sm=2)


def test_lists_of_arrays_of_different_shapes_name_the_argument():
    a, l = np.zeros((2, 3, 4)), np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"outs: expected a sequence of arrays of one shape"):
        cupy_lean.merge_states([a, a[:1]], [l, l])


def test_page_strides_fit_32_bits():
    from cupy_lean._plan import _page_strides_fit

    assert _page_strides_fit((16 * 8 * 128, 8 * 128, 128), 2, 16)
    assert not _page_strides_fit((-(2**10), 64, 1), 2, 16)  # a reversed page order: read through a copy
    assert not _page_strides_fit((2**10, -64, 1), 2, 16)  # reversed tokens in a page: the same
    assert not _page_strides_fit((2**30, 64, 1), 2, 16)  # a page stride of 2**31 bytes
    assert not _page_strides_fit((256, 2**23, 1), 1, 256)  # a page's rows span 2**31 bytes


def test_kv_strides_zero_unit_axes_and_copy_wide_pages():
    from cupy_lean._plan import _kv_strides

    # a one-token cache with an odd token stride: past-the-tile row addresses stay aligned
    assert _kv_strides(((2, 1, 1, 64), (6, 2, 128, 2)), 2, False, 0, "k") == ((3, 0, 64), False)
    # one page (or sequence)
    assert _kv_strides(((1, 7, 8, 64), (8192, 128, 16, 2)), 2, False, 0, "k") == ((0, 64, 8), False)
    assert _kv_strides(((5, 7, 1, 64), (8192, 128, 16, 2)), 2, False, 0, "k") == ((4096, 64, 8), False)  # heads kept
    # a page stride of 2**31 bytes: read through a contiguous copy
    assert _kv_strides(((2, 16, 1, 64), (2**31, 128, 128, 2)), 2, False, 16, "k") == ((1024, 64, 64), True)
    # pages in reverse order (cache[::-1]): a copy, whose strides are the contiguous ones
    assert _kv_strides(((3, 16, 2, 64), (-4096, 256, 128, 2)), 2, False, 16, "k") == ((2048, 128, 64), True)
    with pytest.raises(ValueError, match="v: the GPU kernels support pages of under 2 GB"):
        _kv_strides(((2, 256, 2**16, 64), (2**32, 2**23, 128, 2)), 2, False, 256, "v")


def test_dlpack_exchange_inside_a_capture_asks_for_no_stream_sync():
    """Inside a graph capture a GPU array from another library is taken with
    ``stream=-1`` (no synchronisation): PyTorch would otherwise record an
    event on its own stream, which invalidates a capture running on ours.
    Every other keyword reaches the producer unchanged."""
    from cupy_lean._arrays import _NoSync

    seen = {}

    class Producer:
        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, stream=None, **kwargs):
            seen.update(stream=stream, **kwargs)
            return "capsule"

    w = _NoSync(Producer())
    assert w.__dlpack_device__() == (2, 0)
    assert w.__dlpack__(stream=7, max_version=(1, 0)) == "capsule"
    assert seen == {"stream": -1, "max_version": (1, 0)}


class _Producer:
    """A foreign GPU array as DLPack sees it: records the stream each
    ``__dlpack__`` call received in ``seen``; ``refuse``: raises for -1."""

    def __init__(self, seen, refuse=False):
        self.seen, self.refuse = seen, refuse

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None, **kwargs):
        self.seen.append(stream)
        if self.refuse and stream == -1:
            raise BufferError("stream -1 not supported")
        return "capsule"


@pytest.mark.parametrize("capturing,refuse,fail_after,want", [
    (False, False, False, [123]),  # not capturing: the usual exchange on the consumer's stream
    (True, False, False, [-1]),  # capturing: no producer synchronisation
    (True, True, False, [-1, 123]),  # a producer that refuses stream -1: the usual exchange
    (True, False, True, [-1]),  # the exchange itself failed: an error naming q, no second exchange
])
def test_to_gpu_asks_for_no_sync_only_inside_a_capture(monkeypatch, capturing, refuse, fail_after, want):
    """What ``to_gpu`` asks a foreign GPU array for, with the capture state
    and CuPy's DLPack import stood in (no GPU here): the stream each
    ``__dlpack__`` call received, in order."""
    cupy = pytest.importorskip("cupy")
    from cupy_lean import _arrays, _plan

    seen = []

    def from_dlpack(obj):
        obj.__dlpack__(stream=123)  # as CuPy does: its current stream
        if fail_after:
            raise RuntimeError("unsupported dtype")
        return np.zeros(2, np.float32)

    monkeypatch.setattr(_plan, "capturing", lambda: capturing)
    monkeypatch.setattr(cupy, "from_dlpack", from_dlpack)
    if fail_after:
        with pytest.raises(TypeError, match="q: could not view .*Producer through DLPack inside a CUDA graph"):
            _arrays.to_gpu(_Producer(seen, refuse), "q")
    else:
        assert _arrays.to_gpu(_Producer(seen, refuse), "q").dtype == np.float32
    assert seen == want


def test_capture_state_is_asked_once_per_call(monkeypatch):
    """The per-call path asks whether the stream is capturing once for the
    call's foreign arrays (foreign_capture_state), and to_gpu given that
    state does not ask again."""
    cupy = pytest.importorskip("cupy")
    from cupy_lean import _arrays, _plan

    asked = []
    monkeypatch.setattr(_plan, "capturing", lambda: asked.append(1) or True)
    streams = []
    monkeypatch.setattr(cupy, "from_dlpack", lambda obj: obj.__dlpack__(stream=5) and np.zeros(1, np.float32))
    assert _arrays.foreign_capture_state(None, None) is None and asked == []
    cap = _arrays.foreign_capture_state(None, _Producer(streams))
    assert cap is True and len(asked) == 1
    for name in ("q", "k", "v"):
        _arrays.to_gpu(_Producer(streams), name, cap)
    assert len(asked) == 1 and streams == [-1, -1, -1]
    _arrays.to_gpu(_Producer(streams), "out", False)  # a known state outside a capture: the usual exchange
    assert len(asked) == 1 and streams[-1] == 5


@pytest.mark.parametrize("capturing", [False, True])
def test_host_dlpack_producer_is_copied_or_refused_never_viewed(monkeypatch, capturing):
    """A DLPack producer on the host (NumPy: kDLCPU) is never exchanged
    through DLPack: outside a capture it is copied to the GPU; inside one it
    is refused with the ValueError naming it (CuPy's own refusal of a CPU
    capsule was a TypeError that hid the reason)."""
    cupy = pytest.importorskip("cupy")
    from cupy_lean import _arrays, _plan

    exchanged, copied = [], []
    monkeypatch.setattr(_plan, "capturing", lambda: capturing)
    monkeypatch.setattr(cupy, "from_dlpack", lambda obj: exchanged.append(obj))
    monkeypatch.setattr(cupy, "asarray", lambda x: copied.append(x) or np.zeros(2, np.float32))
    host = np.arange(4, dtype=np.int32)
    assert host.__dlpack_device__()[0] == 1
    if capturing:
        with pytest.raises(ValueError, match="k_scale: inside a CUDA graph capture pass GPU arrays"):
            _arrays.to_gpu(host, "k_scale")
        assert copied == []
    else:
        assert _arrays.to_gpu(host, "k_scale").dtype == np.float32
        assert len(copied) == 1
    assert exchanged == []


def test_relaxed_capture_mode_is_set_and_restored(monkeypatch):
    """Inside a capture the launch's allocations run with this thread's
    capture mode relaxed (2) and the caller's mode comes back after, also
    when the block raises; the driver call stood in (no GPU here)."""
    from cupy_lean import _plan

    thread_mode = [0]  # CU_STREAM_CAPTURE_MODE_GLOBAL, as torch.cuda.graph sets it
    seen = []

    def exchange(ref):
        m = ref._obj
        thread_mode[0], m.value = m.value, thread_mode[0]
        seen.append(thread_mode[0])
        return 0

    monkeypatch.setattr(_plan._relaxed_capture_mode, "_fn", exchange)
    with _plan._relaxed_capture_mode():
        assert thread_mode[0] == 2
    assert thread_mode[0] == 0 and seen == [2, 0]
    with pytest.raises(RuntimeError):
        with _plan._relaxed_capture_mode():
            raise RuntimeError("allocation failed")
    assert thread_mode[0] == 0


# ------------------------------------------- every path checks what the 3-D call checks

def _q4_case(seed=0, batch=3, q_len=3, hq=4, hkv=2, d=8, n=12):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, hq, d)).astype(np.float32)
    k = rng.standard_normal((batch, n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((batch, n, hkv, d)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("fn", ["attention", "reference"])
@pytest.mark.parametrize("lens, exc, text", [
    ([-5, 2, 0], ValueError, "kv_lens[0] = -5"),
    ([100, 2, 0], ValueError, "kv_lens[0] = 100"),
    ([12.7, 2, 0], TypeError, "kv_lens: expected an integer dtype"),
    ([12, 2], ValueError, "kv_lens: expected shape (3,), got (2,)"),
    ("3,3,3", TypeError, "kv_lens: expected an array of integers"),
])
def test_query_tokens_check_kv_lens_as_one_token_does(fn, lens, exc, text):
    q, k, v = _q4_case()
    f = cupy_lean.attention if fn == "attention" else cupy_lean.reference.attention
    with pytest.raises(exc) as e:
        f(q, k, v, kv_lens=lens)
    assert text in str(e.value)
    with pytest.raises(exc) as e3:  # the same message as with one query token
        f(q[:, 0], k, v, kv_lens=lens)
    assert str(e3.value) == str(e.value)


def test_query_tokens_and_fp8_paths_check_out_and_lse_as_one_token_does():
    q, k, v = _q4_case()
    lens = np.array([12, 5, 0])
    ro = np.zeros(q.shape, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a writeable array"):
        cupy_lean.attention(q, k, v, kv_lens=lens, out=ro)
    lse_ro = np.zeros(q.shape[:3], np.float32)
    lse_ro.flags.writeable = False
    out = np.full(q.shape, np.nan, np.float32)
    with pytest.raises(ValueError, match="lse: expected a writeable array"):
        cupy_lean.attention(q, k, v, kv_lens=lens, out=out, lse=lse_ro)
    assert np.isnan(out).all()  # refused before anything was written
    with pytest.raises(TypeError, match=r"out: expected dtype float32 \(q's dtype\), got float16"):
        cupy_lean.attention(q, k, v, kv_lens=lens, out=np.zeros(q.shape, np.float16))
    with pytest.raises(TypeError, match="out: expected an array of shape"):
        cupy_lean.attention(q, k, v, kv_lens=lens, out=[1, 2])
    wide = np.zeros(q.shape[:3] + (2 * q.shape[3],), np.float32)[..., ::2]
    with pytest.raises(ValueError, match="out: expected unit stride on the last axis"):
        cupy_lean.attention(q, k, v, kv_lens=lens, out=wide)
    lse_t = np.zeros(q.shape[:3][::-1], np.float32).T
    with pytest.raises(ValueError, match="lse: expected a C-contiguous array"):
        cupy_lean.attention(q, k, v, kv_lens=lens, lse=lse_t)
    with pytest.raises(ValueError, match="batch_invariant: needs schedule 'lean' or 'head'"):
        cupy_lean.attention(q, k, v, kv_lens=lens, batch_invariant=True, schedule="split")
    # 3-D q with an fp8 cache (the NumPy reference path): the same checks
    k8 = k.astype(ml_dtypes.float8_e4m3fn)
    v8 = v.astype(ml_dtypes.float8_e4m3fn)
    out3 = np.full(q[:, 0].shape, np.nan, np.float32)
    with pytest.raises(ValueError, match="lse: expected a writeable array"):
        cupy_lean.attention(q[:, 0], k8, v8, kv_lens=lens, out=out3, lse=lse_ro[:, 0])
    assert np.isnan(out3).all()
    with pytest.raises(ValueError, match="batch_invariant"):
        cupy_lean.attention(q[:, 0], k8, v8, kv_lens=lens, batch_invariant=True, num_ctas=4)
    # and the valid call still fills out and lse
    lse = np.full(q.shape[:3], np.nan, np.float32)
    cupy_lean.attention(q, k, v, kv_lens=lens, out=out, lse=lse)
    ref_o, ref_l = cupy_lean.reference.attention(q, k, v, kv_lens=lens)
    np.testing.assert_allclose(out, ref_o, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, ref_l, rtol=1e-5)


def test_three_d_read_only_lse_is_refused_before_out_is_written():
    q, k, v = _q4_case()
    q = q[:, 0]
    out = np.full(q.shape, np.nan, np.float32)
    lse = np.zeros(q.shape[:2], np.float32)
    lse.flags.writeable = False
    with pytest.raises(ValueError, match="lse: expected a writeable array"):
        cupy_lean.attention(q, k, v, out=out, lse=lse)
    assert np.isnan(out).all()


def test_emulate_checks_its_arrays_as_attention_does():
    from cupy_lean import reference as R

    q, k, v = _q4_case()
    q = q[:, 0]
    lens = np.array([12, 5, 0])
    s = cupy_lean.lean_schedule(lens, 2, tile_size=4, num_ctas=5)
    o, l = R.emulate(s, q, k, v, kv_lens=lens)
    ro, rl = R.attention(q, k, v, kv_lens=lens)
    np.testing.assert_allclose(o, ro, atol=1e-12)
    bad = [
        (dict(kv_lens=np.array([50, 5, 0])), ValueError, "kv_lens[0] = 50"),
        (dict(kv_lens=np.array([12.0, 5, 0])), TypeError, "kv_lens: expected an integer dtype"),
        (dict(kv_lens=lens, sinks=np.zeros(5)), ValueError, "sinks: expected shape (4,)"),
        (dict(kv_lens=lens, sinks=np.zeros(3)), ValueError, "sinks: expected shape (4,)"),
        (dict(kv_lens=lens, scale=float("nan")), ValueError, "scale: expected a finite number"),
        (dict(kv_lens=lens, softcap=0.0), ValueError, "softcap: expected a finite number > 0"),
        (dict(kv_lens=lens, softcap=-1.0), ValueError, "softcap: expected a finite number > 0"),
        (dict(kv_lens=lens, window_left=-2), ValueError, "window_left: expected an integer >= -1"),
        (dict(kv_lens=lens, window_left=2.7), TypeError, "window_left: expected an integer"),
        (dict(kv_lens=np.array([12, 5])), ValueError, "kv_lens: expected shape (3,)"),
        (dict(kv_lens=np.array([11, 5, 0])), ValueError, "schedule: built for kv_lens [12, 5, 0], the call's "
                                                         "kv_lens are [11, 5, 0]"),
    ]
    for kw, exc, text in bad:
        with pytest.raises(exc) as e:
            R.emulate(s, q, k, v, **kw)
        assert text in str(e.value), (kw, str(e.value))
    with pytest.raises(ValueError, match="q: heads_q must be a positive multiple of heads_kv"):
        R.emulate(s, q[:, :3], k, v, kv_lens=lens)
    with pytest.raises(ValueError, match="k: expected head_dim 8"):
        R.emulate(s, q, k[..., :4], v[..., :4], kv_lens=lens)
    with pytest.raises(ValueError, match="q: expected 3 dimensions"):
        R.emulate(s, q[0], k, v, kv_lens=lens)
    with pytest.raises(TypeError, match="schedule: expected a cupy_lean.Schedule"):
        R.emulate("lean", q, k, v, kv_lens=lens)
    # paged: a page index out of range (-1 would wrap to the last page)
    kp = k.reshape(9, 4, 2, 8)
    table = np.array([[0, 1, 2], [3, -1, 5], [6, 7, 8]])
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = -1"):
        R.emulate(cupy_lean.lean_schedule(np.array([12, 5, 0]), 2, tile_size=4, num_ctas=5), q, kp, kp,
                  kv_lens=np.array([12, 5, 0]), block_table=table)


def test_merge_states_refuses_nan_and_plus_inf_lses_on_the_host():
    outs = np.ones((2, 3, 8), np.float32)
    lses = np.zeros((2, 3), np.float32)
    lses[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"lses: expected finite values or -inf \(an empty part\), got lses\[1, 2\] = inf"):
        cupy_lean.merge_states(outs, lses)
    lses[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"lses\[1, 2\] = nan"):
        cupy_lean.reference.merge_states(outs, lses)
    lses[1, 2] = -np.inf  # an empty part is fine
    o, l = cupy_lean.merge_states(outs, lses)
    assert np.isfinite(o).all() and np.isfinite(l).all()


@pytest.mark.parametrize("bad", ["abc", 1j, object()])
def test_fp8_scales_name_the_argument_for_values_that_are_no_numbers(bad):
    q, k, v = _q4_case()
    k8 = k.astype(ml_dtypes.float8_e4m3fn)
    with pytest.raises(TypeError, match="k_scale: expected a number or an array of shape"):
        cupy_lean.attention(q[:, 0], k8, k8, k_scale=bad)


def test_scalars_as_zero_d_arrays_and_huge_integers():
    q, k, v = _q4_case()
    q = q[:, 0]
    a = cupy_lean.attention(q, k, v, scale=np.array(0.5), softcap=np.array(3.0))
    b = cupy_lean.attention(q, k, v, scale=0.5, softcap=3.0)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="softcap: expected a finite number > 0 .* an integer of 401 digits"):
        cupy_lean.attention(q, k, v, softcap=10**400)
    with pytest.raises(TypeError, match="scale: expected a real number"):
        cupy_lean.attention(q, k, v, scale=np.array([0.5]))
    with pytest.raises(TypeError, match="sinks: expected an array, got str 'abc'"):
        cupy_lean.attention(q, k, v, sinks="abc")


def test_schedule_helpers_check_their_arguments():
    from cupy_lean import schedule as S

    with pytest.raises(TypeError, match="max_unit_tiles: expected an integer"):
        S.num_splits_heuristic(4, 10.5, 132)
    with pytest.raises(TypeError, match="num_units: expected an integer"):
        S.num_splits_heuristic("4", 10, 132)
    for kw, name in ((dict(num_sms=0), "num_sms"), (dict(num_sms=-5), "num_sms"), (dict(max_splits=-3), "max_splits")):
        args = dict(num_units=4, max_unit_tiles=10, num_sms=132) | kw
        with pytest.raises(ValueError, match=f"{name}: expected an integer >= 1"):
            S.num_splits_heuristic(**args)
    assert S.num_splits_heuristic(0, 10, 132) == 1 and S.num_splits_heuristic(4, 0, 132) == 1
    with pytest.raises(ValueError, match="state_rows: expected an integer >= 1, got 0"):
        S.merge_group_size(20, 0, 1024)
    with pytest.raises(ValueError, match="threads: a row of head_dim 2048 needs at least"):
        S.merge_batches(1, 1, 2048, 32)
    assert S.merge_batches(1, 1, 1024, 32) >= 1


def test_pinned_host_memory_is_host_memory():
    """A DLPack producer on kDLCUDAHost (pinned host memory, PyTorch's
    pin_memory()) is a host array: CuPy cannot view it, so with GPU inputs
    it must be refused as a mix of devices, never copied into a temporary
    that an ``out=`` would then not receive."""
    from cupy_lean import _arrays

    class Dev:
        def __init__(self, kind):
            self.kind = kind

        def __dlpack_device__(self):
            return (self.kind, 0)

    assert _arrays.where(Dev(1)) == "cpu" and _arrays.where(Dev(3)) == "cpu"
    assert _arrays.where(Dev(2)) == "gpu" and _arrays.where(Dev(13)) == "gpu"
    assert not _arrays._dlpack_on_gpu(Dev(3)) and _arrays._dlpack_on_gpu(Dev(2))


def test_jax_arrays_are_refused_as_outputs():
    JaxArray = type("ArrayImpl", (), {"__module__": "jaxlib.xla_extension"})
    q, k, v = _q4_case()
    q = q[:, 0]
    for name in ("out", "lse"):
        with pytest.raises(TypeError, match=f"{name}: JAX arrays are immutable, got jaxlib.xla_extension.ArrayImpl"):
            cupy_lean.attention(q, k, v, **{name: JaxArray()})


def test_overlapping_out_is_refused():
    q, k, v = _q4_case()
    q = q[:, 0]
    row = np.zeros((1,) + q.shape[1:], np.float32)
    expanded = np.lib.stride_tricks.as_strided(row, shape=q.shape, strides=(0,) + row.strides[1:], writeable=True)
    with pytest.raises(ValueError, match="out: expected elements that do not overlap, got a stride of 0 on axis 0"):
        cupy_lean.attention(q, k, v, out=expanded)
    one = np.zeros((1,) + q.shape[1:], np.float32)
    cupy_lean.attention(q[:1], k[:1], v[:1], out=np.lib.stride_tricks.as_strided(
        one, shape=one.shape, strides=(0,) + one.strides[1:], writeable=True))  # a size-1 axis: any stride


def test_an_output_that_cannot_be_viewed_is_refused_not_copied(monkeypatch):
    """``out`` / ``lse`` from a producer whose DLPack exchange fails: viewed
    through ``__cuda_array_interface__`` when it has one, else refused
    naming it (a copy would receive the results, the caller's array not)."""
    cupy = pytest.importorskip("cupy")
    from cupy_lean import _arrays, _plan

    monkeypatch.setattr(_plan, "capturing", lambda: False)

    def fail(obj):
        raise RuntimeError("exchange refused")

    monkeypatch.setattr(cupy, "from_dlpack", fail)
    viewed = []
    monkeypatch.setattr(cupy, "asarray", lambda x: viewed.append(x) or np.zeros(2, np.float32))

    class GpuProducer:
        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, stream=None):
            raise AssertionError("not reached: from_dlpack is replaced")

    class WithInterface(GpuProducer):
        __cuda_array_interface__ = {"shape": (2,), "typestr": "<f4", "data": (1 << 20, False), "version": 3}

    with pytest.raises(TypeError, match="out: could not view .*GpuProducer on the GPU without a copy"):
        _arrays.to_gpu(GpuProducer(), "out", output=True)
    assert viewed == []
    _arrays.to_gpu(WithInterface(), "lse", output=True)  # viewed through its interface
    assert len(viewed) == 1
    _arrays.to_gpu(GpuProducer(), "q")  # an input may be copied
    assert len(viewed) == 2


def test_q_lens_and_fp8_scale_checks_bind_cupy_before_use(monkeypatch):
    """check_q_lens / gpu_fp8_scales may be the first GPU code of a process
    (before any plan binds the module's CuPy handle): they bind it."""
    cupy = pytest.importorskip("cupy")
    from cupy_lean import _arrays, _plan

    class Dev:  # what CuPy's runtime says without a GPU here
        @staticmethod
        def getDevice():
            return 0

    monkeypatch.setattr(_plan, "_cp", None)
    monkeypatch.setattr(_plan, "_driver", None)
    monkeypatch.setattr(cupy.cuda, "runtime", Dev)
    fake = _FakeArray((3,), (4,), np.int32)
    fake.ndim, fake.flags = 1, type("F", (), {"c_contiguous": True})()
    monkeypatch.setattr(_arrays, "where", lambda x: "gpu")
    monkeypatch.setattr(_arrays, "to_gpu", lambda x, name, *a, **k: x)
    monkeypatch.setattr(_plan, "_index_array", lambda x, lo, hi, name: x)
    assert _plan.check_q_lens(fake, 3, 2, False) is fake
    assert _plan._cp is cupy


def test_out_whose_rows_overlap_is_refused():
    """An ``out`` with no stride 0 whose rows still share addresses (a
    stride smaller than the row it steps over) would have its rows written
    over each other: refused naming ``out``; layouts that interleave without
    overlap (a transposed or sliced out) are accepted and written whole."""
    q, k, v = _q4_case()
    q = q[:, 0]
    b, h, d = q.shape
    buf = np.zeros(b * h * d, np.float32)
    rows_overlap = np.lib.stride_tricks.as_strided(buf, (b, h, d), (h * d * 4, d * 8, 4), writeable=True)  # bytes
    with pytest.raises(ValueError, match=r"out: expected elements that do not overlap, got strides \(128, 64, 4\) "
                                         r".* axis 0's stride 128 is less than the 224 bytes"):
        cupy_lean.attention(q, k, v, out=rows_overlap)
    want = cupy_lean.attention(q, k, v)
    for out in (np.full((h, b, d), np.nan, np.float32).transpose(1, 0, 2),
                np.full((b, 3, h, d), np.nan, np.float32)[:, 1],
                np.full((b, h, 2 * d), np.nan, np.float32)[:, :, ::1][:, :, d:]):
        assert cupy_lean.attention(q, k, v, out=out) is out
        np.testing.assert_array_equal(out, want)


class _StandInTensor:
    """A stand-in for a PyTorch tensor (CI has no PyTorch): its type's module
    is "torch"; shape, element strides, dtype name, data pointer, device (-1:
    the CPU) and flags (layout, nested, grad, neg). Its DLPack export fails
    the test."""

    def __init__(self, shape=(4,), stride=(1,), dtype="float16", ptr=4096, device=0, **flags):
        self.shape, self._stride, self.dtype, self._ptr, self._device = shape, stride, dtype, ptr, device
        self.layout = flags.get("layout", "strided")
        self.is_nested = flags.get("nested", False)
        self.requires_grad = flags.get("grad", False)
        self._neg = flags.get("neg", False)
        self.is_cuda = device >= 0

    def stride(self):
        return self._stride

    def data_ptr(self):
        return self._ptr

    def is_neg(self):
        return self._neg

    def numel(self):
        return int(np.prod(self.shape))

    def get_device(self):
        return self._device

    def __dlpack__(self, stream=None):
        raise AssertionError("exported")


_StandInTensor.__module__ = "torch"


def test_a_torch_tensor_with_a_lazy_negation_or_no_memory_is_refused():
    """DLPack exports a PyTorch tensor's memory without its negative bit (the
    values would be read with the wrong sign) and a freed storage as pointer
    0: both refused, naming the argument, on the CPU and GPU imports."""
    from cupy_lean import _arrays

    Tensor = _StandInTensor
    with pytest.raises(TypeError, match=r"q: the tensor has its negative bit set .* q.resolve_neg\(\)"):
        _arrays.to_cpu(Tensor(neg=True), "q")
    with pytest.raises(ValueError, match="k: the tensor's storage has no memory"):
        _arrays._refuse_torch_bits(Tensor(ptr=0), "k")
    _arrays._refuse_torch_bits(Tensor((0,), ptr=0), "k")  # empty: nothing to read
    _arrays._refuse_torch_bits(Tensor(), "k")


def test_torch_layout_reads_a_tensors_memory_as_numpy_would():
    """The layout a PyTorch CUDA tensor is viewed from without a DLPack
    exchange (pointer, bytes spanned, shape, dtype, byte strides), checked
    on CPU tensors against NumPy's view of the same memory: contiguous,
    a strided slice, a broadcast (stride 0) and bfloat16. Tensors whose
    memory does not hold their values as they are, or that the exchange
    refuses, get None (the exchange then decides): a lazy negation,
    requires_grad, a subclass, no elements, a dtype the package does not
    read, sparse and nested tensors. torch_views gives None for a CPU
    tensor, a subclass and a q that is not a tensor."""
    torch = pytest.importorskip("torch")
    from cupy_lean import _arrays

    def numpy_bytes(x):
        a = x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
        bounds = getattr(getattr(np.lib, "array_utils", None), "byte_bounds", None) or np.byte_bounds
        lo, hi = bounds(a)
        return lo, hi - lo, a.strides

    wide = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8).to(torch.float16)
    for x, dt in ((torch.zeros((2, 3, 4), dtype=torch.float16), np.float16),
                  (wide[:, :, 3:7], np.float16),
                  (wide.transpose(0, 1)[1:], np.float16),
                  (torch.zeros((1, 5), dtype=torch.int32).expand(4, 5), np.int32),
                  (torch.zeros((3, 6), dtype=torch.bfloat16)[:, ::2], "bfloat16")):
        ptr, span, shape, dtype, strides = _arrays.torch_layout(x, torch)
        lo, size, np_strides = numpy_bytes(x)
        assert (ptr, span, shape, strides) == (lo, size, tuple(x.shape), np_strides)
        assert dtype.name == np.dtype(dt).name if dt != "bfloat16" else dtype.name == "bfloat16"
    z = torch.zeros(3, dtype=torch.complex64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (nested tensors: "in prototype stage")
        nested = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    for x in (z.conj().imag, torch.zeros(3, requires_grad=True), torch.nn.Parameter(torch.zeros(3)),
              torch.zeros((0, 4), dtype=torch.float16), torch.zeros(3, dtype=torch.float64),
              torch.zeros(3, dtype=torch.int8), torch.zeros((2, 3), dtype=torch.float16).to_sparse(),
              nested):
        assert _arrays.torch_layout(x, torch) is None, x
    host = np.zeros(3, np.int32)
    no_device = lambda: pytest.fail("the device was asked without a CUDA tensor")  # noqa: E731
    assert _arrays.torch_views((torch.zeros(3, dtype=torch.float16), None), no_device) is None
    assert _arrays.torch_views((host, None, 1.5), no_device) is None  # q not a tensor: nothing to view
    param = torch.nn.Parameter(torch.zeros(3), requires_grad=False)  # a subclass: the exchange
    assert _arrays.torch_views((param, host), no_device) is None


def test_torch_layout_and_views_with_a_stand_in_for_torch(monkeypatch):
    """The same reading with a stand-in for torch (CI has no PyTorch): byte
    strides and the span from element strides (a slice, a broadcast), the
    dtype map, and each tensor the view leaves to the DLPack exchange (None):
    not strided, nested, requires_grad, negated, no elements, pointer 0, an
    unknown dtype, a subclass, a CPU tensor, another device, another stream.
    With one stream and device, torch_views builds each view from the layout
    (a stand-in CuPy records what it was given)."""
    import types

    from cupy_lean import _arrays

    torch = types.ModuleType("torch")
    for name in ("float16", "float32", "int32", "int64", "uint8", "bfloat16", "float64", "strided", "sparse_coo"):
        setattr(torch, name, name)

    Tensor = torch.Tensor = _StandInTensor
    stream = {"torch": 7}
    torch.cuda = types.SimpleNamespace(current_stream=lambda d: types.SimpleNamespace(cuda_stream=stream["torch"]))
    monkeypatch.setitem(sys.modules, "torch", torch)

    got = _arrays.torch_layout(Tensor((4, 3, 8), (48, 16, 1)), torch)  # a slice [..., :8] of (4, 3, 16)
    assert got == (4096, 2 * (1 + 3 * 48 + 2 * 16 + 7), (4, 3, 8), np.dtype(np.float16), (96, 32, 2))
    got = _arrays.torch_layout(Tensor((5, 6), (0, 1), "int32"), torch)  # a broadcast row
    assert got == (4096, 4 * 6, (5, 6), np.dtype(np.int32), (0, 4))
    assert _arrays.torch_layout(Tensor((2,), (1,), "bfloat16"), torch)[3].name == "bfloat16"
    for t in (Tensor((2,), (1,), layout="sparse_coo"), Tensor((2,), (1,), nested=True), Tensor((2,), (1,), grad=True),
              Tensor((2,), (1,), neg=True), Tensor((0, 2), (2, 1)), Tensor((2,), (1,), ptr=0),
              Tensor((2,), (1,), "float64")):
        assert _arrays.torch_layout(t, torch) is None

    class Sub(Tensor):
        pass

    made = []
    fake_cupy = types.ModuleType("cupy")
    fake_cupy.cuda = types.SimpleNamespace(
        get_current_stream=lambda: types.SimpleNamespace(ptr=7),
        UnownedMemory=lambda ptr, size, owner, device: ("mem", ptr, size, owner, device),
        MemoryPointer=lambda mem, offset: ("ptr", mem, offset))
    fake_cupy.ndarray = lambda shape, dtype, memptr, strides: made.append((shape, dtype, memptr, strides)) or "view"
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    a, b = Tensor((4, 3, 8), (48, 16, 1)), Tensor((3,), (1,), "int32")
    host = np.zeros(2)
    assert _arrays.torch_views((a, None, host, b), lambda: 0) == ["view", None, host, "view"]
    assert made[0] == ((4, 3, 8), np.dtype(np.float16), ("ptr", ("mem", 4096, 2 * 184, a, 0), 0), (96, 32, 2))
    assert made[1][2][1][3] is b  # each view's memory holds its tensor
    for xs in ((a, Sub((2,), (1,))), (a, Tensor((2,), (1,), device=-1)), (a, Tensor((2,), (1,), device=1)),
               (Tensor((2,), (1,), grad=True),)):
        assert _arrays.torch_views(xs, lambda: 0) is None
    assert _arrays.torch_views((host, a), lambda: 0) is None  # q not a tensor: the caller's other path
    stream["torch"] = 8  # PyTorch's current stream is not CuPy's
    assert _arrays.torch_views((a,), lambda: 0) is None

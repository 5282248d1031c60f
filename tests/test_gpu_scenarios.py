"""GPU tests of user scenarios the other GPU tests did not cover in full:
an explicit small tile with a CTA count off the SM count, a batch of 300
ragged sequences with empty and one-token ones, and kv_lens as a Python list
and as int64 arrays. Outputs (and lse) are prefilled with NaN so that a row
the kernel never writes cannot pass; everything is checked against the
float64 reference.

Skipped cleanly without a CUDA GPU.
"""

import numpy as np
import pytest

import cupy_lean

from test_gpu import BF16, GPU, NUM_SMS, check_close, make_inputs, to_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")]

if GPU:
    import cupy as cp


def _nan_out_lse(q):
    """NaN-filled ``out`` (q's dtype) and float32 ``lse`` for a 3-D ``q``."""
    out = cp.full(q.shape, cp.nan, dtype=q.dtype)
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    return out, lse


def _assert_bitwise(a, b):
    a, b = cp.ascontiguousarray(a), cp.ascontiguousarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    view = cp.uint16 if a.dtype.itemsize == 2 else cp.uint32
    assert bool(cp.array_equal(a.view(view), b.view(view))), "results differ bitwise"


# ---------------------------------------------------------------- tile_size and num_ctas together

@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("tile,dtype", [(16, np.float16), (32, BF16)])
def test_explicit_tile_size_with_num_ctas_off_the_sm_count(tile, dtype, layout):
    """tile_size=16 / 32 together with num_ctas not a multiple of the SM
    count (fewer CTAs than SMs, and a little more than one wave): the plan
    takes both (its tile and its grid are the ones asked for), and out and
    lse, NaN-prefilled, match the reference, ragged lengths with 0 and 1."""
    rng = np.random.default_rng(4000 + tile + len(layout))
    lens = [3001, 0, 1, 777, tile + 1]
    q, k, v, L, table = make_inputs(rng, len(lens), 12, 3, 128, dtype, lens, layout, page_size=16)
    qd, kd, vd, ld, td = to_gpu(q), to_gpu(k), to_gpu(v), cp.asarray(L), to_gpu(table)
    for num_ctas in (37, NUM_SMS + 13):
        assert num_ctas % NUM_SMS != 0
        out, lse = _nan_out_lse(qd)
        p = cupy_lean.plan(qd, kd, vd, kv_lens=ld, block_table=td, out=out, tile_size=tile, num_ctas=num_ctas)
        assert p.spec.tile == tile and p.grid == num_ctas, p.describe()
        res = cupy_lean.attention(qd, kd, vd, kv_lens=ld, block_table=td, out=out, lse=lse, tile_size=tile,
                                  num_ctas=num_ctas)
        assert res[0] is out and res[1] is lse
        check_close(out, lse, q, k, v, L, table, dtype)


# ---------------------------------------------------------------- a batch of 300

@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_batch_300_with_empty_and_one_token_sequences(layout):
    """300 ragged sequences, some empty and some of one token, through the
    default lean plan and the split schedule: NaN-prefilled out and lse match
    the reference; empty sequences give zeros and -inf (check_close), and a
    one-token sequence gives its one value row."""
    rng = np.random.default_rng(300 + len(layout))
    lens = rng.integers(2, 160, 300)
    lens[::9] = 0
    lens[4::13] = 1
    lens[-1] = 1
    hq, hkv, d = 4, 1, 64
    q, k, v, L, table = make_inputs(rng, 300, hq, hkv, d, np.float16, lens, layout, page_size=16)
    assert (L == 0).sum() > 10 and (L == 1).sum() > 10
    qd, kd, vd, ld, td = to_gpu(q), to_gpu(k), to_gpu(v), cp.asarray(L), to_gpu(table)
    ones = np.flatnonzero(L == 1)
    if table is None:
        first = v[ones, 0]                                # (n, hkv, d): each one-token sequence's value row
    else:
        first = v[table[ones, 0], 0]
    want = np.repeat(first.astype(np.float64), hq // hkv, axis=1)  # (n, hq, d)
    for sched in ("lean", "split"):
        out, lse = _nan_out_lse(qd)
        cupy_lean.attention(qd, kd, vd, kv_lens=ld, block_table=td, out=out, lse=lse, schedule=sched)
        check_close(out, lse, q, k, v, L, table, np.float16)
        got = cp.asnumpy(out[cp.asarray(ones)]).astype(np.float64)
        assert np.abs(got - want).max() < 4e-3


# ---------------------------------------------------------------- kv_lens types

@pytest.mark.parametrize("layout", ["dense", "paged"])
def test_kv_lens_as_python_list_and_int64_arrays(layout):
    """kv_lens as a Python list, a NumPy int64 array (both on the host) and a
    CuPy int64 array, with GPU q/k/v: each call, NaN-prefilled, matches the
    reference (out and lse); the two host forms give the same bits, and the
    int64 GPU array the bits of the int32 one."""
    rng = np.random.default_rng(909 + len(layout))
    lens = [700, 0, 1, 333, 64]
    q, k, v, L, table = make_inputs(rng, len(lens), 16, 4, 128, np.float16, lens, layout, page_size=16)
    qd, kd, vd, td = to_gpu(q), to_gpu(k), to_gpu(v), to_gpu(table)
    results = {}
    for name, kl in (("list", [int(x) for x in L]), ("host_int64", L.astype(np.int64)),
                     ("gpu_int64", cp.asarray(L.astype(np.int64))), ("gpu_int32", cp.asarray(L))):
        out, lse = _nan_out_lse(qd)
        res_out, res_lse = cupy_lean.attention(qd, kd, vd, kv_lens=kl, block_table=td, out=out, lse=lse,
                                               return_lse=True)
        cp.cuda.Device().synchronize()
        assert res_out is out and res_lse is lse
        check_close(out, lse, q, k, v, L, table, np.float16)
        results[name] = (out, lse)
    for a, b in (("list", "host_int64"), ("gpu_int64", "gpu_int32")):
        _assert_bitwise(results[a][0], results[b][0])
        _assert_bitwise(results[a][1], results[b][1])

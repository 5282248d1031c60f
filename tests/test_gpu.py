"""GPU tests: the CUDA kernels against the float64 reference.

Skipped cleanly on a machine without a CUDA GPU (CI); run on the H100 before a
kernel change lands.
"""

import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import cupy_lean
from cupy_lean import reference

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None


def _gpu_ok():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


GPU = _gpu_ok()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")]

if GPU:
    import cupy as cp

    NUM_SMS = cp.cuda.Device().attributes["MultiProcessorCount"]
else:  # pragma: no cover
    cp = None
    NUM_SMS = 132

GPU_SETTINGS = settings(deadline=None, max_examples=int(os.environ.get("GPU_EXAMPLES", "40")),
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                        derandomize=False)


# ---------------------------------------------------------------- helpers

def _round(x, dtype):
    return np.asarray(x).astype(dtype).astype(np.float64)


def naive_lowp(q, k, v, lens, table, scale, dtype):
    """The same attention computed naively in the input precision: scores,
    probabilities and output rounded to the dtype (fp32 sums)."""
    B, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    out = np.zeros((B, hq, d))
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        kb, vb = reference.gather_kv(k, v, b, n, table)
        for h in range(hkv):
            qq = q[b, h * g:(h + 1) * g].astype(np.float64)
            s = _round(qq @ kb[:, h].T * scale, dtype)
            s = s - s.max(axis=1, keepdims=True)
            p = np.exp(s)
            p = _round(p / p.sum(axis=1, keepdims=True), dtype)
            out[b, h * g:(h + 1) * g] = _round(p @ vb[:, h], dtype)
    return out


def make_inputs(rng, B, hq, hkv, d, dtype, lens, layout, page_size=16, cap_extra=0):
    lens = np.asarray(lens, dtype=np.int32)
    cap = int(lens.max()) + cap_extra if B else 1
    cap = max(cap, 1)
    q = rng.standard_normal((B, hq, d)).astype(dtype)
    table = None
    if layout == "paged":
        used = [-(-int(n) // page_size) for n in lens]
        num_pages = sum(used) + 3
        perm = rng.permutation(num_pages)
        maxp = max(max(used) if used else 1, 1) + 1
        table = np.full((B, maxp), -1, dtype=np.int32)
        pos = 0
        for b, u in enumerate(used):
            table[b, :u] = perm[pos:pos + u]
            pos += u
        k = rng.standard_normal((num_pages, page_size, hkv, d)).astype(dtype)
        v = rng.standard_normal((num_pages, page_size, hkv, d)).astype(dtype)
    elif layout == "strided":
        k = rng.standard_normal((B, hkv, cap, d)).astype(dtype).transpose(0, 2, 1, 3)
        v = rng.standard_normal((B, hkv, cap, d)).astype(dtype).transpose(0, 2, 1, 3)
    else:
        k = rng.standard_normal((B, cap, hkv, d)).astype(dtype)
        v = rng.standard_normal((B, cap, hkv, d)).astype(dtype)
    return q, k, v, lens, table


def to_gpu(x):
    if x is None:
        return None
    if x.ndim == 4 and not x.flags.c_contiguous:  # keep the strided layout on the GPU
        base = cp.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
        return base.transpose(0, 2, 1, 3)
    return cp.asarray(x)


def check_close(out, lse, q, k, v, lens, table, dtype, scale=None):
    d = q.shape[2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    ref_o, ref_lse = reference.attention(q, k, v, kv_lens=lens, block_table=table, scale=scale)
    naive = naive_lowp(q, k, v, lens, table, scale, dtype)
    floor = 1e-3 if dtype == np.float16 else 4e-3
    bound = 2 * np.abs(naive - ref_o).max(initial=0.0) + floor
    got = cp.asnumpy(out).astype(np.float64)
    err = np.abs(got - ref_o).max(initial=0.0)
    assert np.isfinite(got).all()
    assert err <= bound, f"max error {err:.3e} over bound {bound:.3e}"
    if lse is not None:
        got_lse = cp.asnumpy(lse).astype(np.float64)
        empty = np.isneginf(ref_lse)
        assert np.array_equal(np.isneginf(got_lse), empty)
        assert np.abs(got_lse[~empty] - ref_lse[~empty]).max(initial=0.0) < 2e-3
        assert (got[np.repeat(empty[..., None], d, axis=-1)] == 0).all()


# ---------------------------------------------------------------- random cases

TILE = {64: 128, 128: 64, 256: 32}


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([np.float16, BF16]))
    d = draw(st.sampled_from([64, 128, 256]))
    group = draw(st.sampled_from([1, 2, 4, 5, 8, 16, 17, 32, 64, 128]))
    hkv = draw(st.integers(1, 3)) if group <= 16 else 1
    B = draw(st.integers(1, 4))
    t = TILE[d]
    edge = [0, 1, t - 1, t, t + 1, 2 * t + 3]
    if d == 64:  # kv_lens of several sequences at head_dim 64: 64-token tiles (kernels.varied_length_tile)
        edge += [63, 64, 65, 131]
    lens = draw(st.lists(st.one_of(st.sampled_from(edge), st.integers(0, 700)), min_size=B, max_size=B))
    layout = draw(st.sampled_from(["dense", "strided", "paged"]))
    page_size = draw(st.sampled_from([1, 3, 16, 64, 256])) if layout == "paged" else 16
    sched = draw(st.sampled_from(["lean", "lean", "split", "head"]))
    num_ctas = draw(st.sampled_from([None, 1, 7, NUM_SMS, 2 * NUM_SMS, 100000]))
    lens_on_gpu = draw(st.booleans())
    seed = draw(st.integers(0, 2**31))
    return dict(dtype=dtype, d=d, group=group, hkv=hkv, B=B, lens=lens, layout=layout,
                page_size=page_size, sched=sched, num_ctas=num_ctas, lens_on_gpu=lens_on_gpu, seed=seed)


def _case(dtype=np.float16, d=128, group=4, hkv=2, B=3, lens=(0, 1, 65), layout="dense", page_size=16,
          sched="lean", num_ctas=None, lens_on_gpu=True, seed=0):
    return dict(dtype=dtype, d=d, group=group, hkv=hkv, B=B, lens=list(lens), layout=layout,
                page_size=page_size, sched=sched, num_ctas=num_ctas, lens_on_gpu=lens_on_gpu, seed=seed)


@GPU_SETTINGS
@given(cases())
@example(_case(lens=(0, 0, 0)))
@example(_case(lens=(1, 63, 64)))
@example(_case(lens=(65, 0, 129), num_ctas=1))
@example(_case(lens=(65, 0, 129), num_ctas=7, sched="split"))
@example(_case(lens=(700, 3, 64), num_ctas=100000, sched="head"))
@example(_case(d=64, group=1, hkv=3, lens=(127, 128, 129), layout="paged", page_size=1))
@example(_case(d=256, group=17, hkv=1, lens=(33, 31, 500), layout="strided", dtype=BF16))
@example(_case(d=128, group=128, hkv=1, B=1, lens=(300,), layout="paged", page_size=256))
@example(_case(d=256, group=128, hkv=1, B=1, lens=(1,), num_ctas=100000, sched="split"))
def test_against_reference(c):
    rng = np.random.default_rng(c["seed"])
    B, hkv = c["B"], c["hkv"]
    q, k, v, lens, table = make_inputs(rng, B, hkv * c["group"], hkv, c["d"], c["dtype"], c["lens"][:B],
                                       c["layout"], c["page_size"])
    kv_lens = cp.asarray(lens) if c["lens_on_gpu"] else lens
    if (c["layout"] == "dense" and not c["lens_on_gpu"] and len(set(lens.tolist())) == 1
            and int(lens[0]) == k.shape[1] and rng.random() < 0.5):
        kv_lens = None  # uniform lengths: the kv_lens=None fast path
    try:
        out, lse = cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=kv_lens,
                                       block_table=to_gpu(table), return_lse=True, schedule=c["sched"],
                                       num_ctas=c["num_ctas"])
    except ValueError as e:
        # a grid whose partial states (up to 2 per CTA) pass 2**31 floats is refused, naming num_ctas and the limit
        slot = -(-c["group"] * (c["d"] + 2) // 4) * 4
        assert c["num_ctas"] == 100000 and 2 * slot * c["num_ctas"] >= 2**31, e
        assert str(e).startswith("num_ctas:") and "expected at most" in str(e), e
        return
    assert isinstance(out, cp.ndarray) and out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == cp.float32 and lse.shape == q.shape[:2]
    check_close(out, lse, q, k, v, lens, table, c["dtype"])


# ---------------------------------------------------------------- schedule

def _expected_records(host, c):
    """Schedule-dump records of CTA c computed from the NumPy schedule."""
    seg = host.segments
    out = []
    for r in seg[seg["cta"] == c]:
        u = int(r["unit"])
        if r["partial"]:
            first = int(seg["cta"][(seg["unit"] == u) & seg["partial"]].min())
            count = int(host.contributors[u])
        else:
            first, count = -1, 0
        out.append((u, int(r["tile_begin"]), int(r["tile_end"]), int(r["partial"]), int(r["slot"]), first, count))
    return out


@settings(deadline=None, max_examples=30)
@given(st.lists(st.integers(0, 2000), min_size=1, max_size=40), st.integers(1, 8),
       st.sampled_from([16, 64, 128]), st.integers(1, 600), st.sampled_from([1, 1, 3, 8]),
       st.sampled_from([0, 0, 1, 4]))
@example([0, 64, 65, 1], 2, 64, 3, 1, 0)
@example([5], 1, 16, 100, 1, 0)
@example([4000, 3, 0, 129], 3, 16, 7, 1, 0)
@example([4000, 3, 0, 129], 3, 16, 300, 8, 0)
@example([24050], 1, 64, 132, 1, 1)
@example([3103, 2900, 17], 2, 32, 264, 2, 3)
def test_device_schedule_equals_numpy(lens, hkv, tile, num_ctas, min_tiles, merge_balance):
    """The kernel's stream-K schedule (its dump entry) equals schedule.py's:
    ranges, segments, slots, first contributor and contributor counts (also
    with the merge balance, whose square root the kernel takes in float)."""
    from cupy_lean import _gpu

    host = cupy_lean.lean_schedule(lens, hkv, tile_size=tile, num_ctas=num_ctas, min_tiles_per_cta=min_tiles,
                                   merge_balance=merge_balance)
    dev = _gpu.device_schedule(lens, hkv, tile_size=tile, num_ctas=num_ctas, min_tiles_per_cta=min_tiles,
                               merge_balance=merge_balance)
    for c in range(num_ctas):
        if c >= host.num_ctas:
            assert dev[c] is None
            continue
        start, end, segs = dev[c]
        assert (start, end) == (host.cta_start[c], host.cta_end[c])
        expect = _expected_records(host, c)
        assert segs == expect[:len(segs)] and len(segs) == min(len(expect), 64)


@settings(deadline=None, max_examples=15)
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=12), st.integers(1, 4),
       st.sampled_from([16, 64]), st.integers(1, 9))
@example([0, 5, 64], 2, 16, 4)
def test_device_split_schedule_equals_numpy(lens, hkv, tile, num_splits):
    from cupy_lean import _gpu

    host = cupy_lean.split_schedule(lens, hkv, tile_size=tile, num_splits=num_splits)
    dev = _gpu.device_schedule(lens, hkv, tile_size=tile, num_splits=num_splits)
    assert len(dev) == host.num_ctas
    for c in range(host.num_ctas):
        expect = _expected_records(host, c)
        if not expect:
            assert dev[c] is None
            continue
        start, end, segs = dev[c]
        assert (start, end) == (host.cta_start[c], host.cta_end[c])
        assert segs == expect


@settings(deadline=None, max_examples=15)
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=6), st.integers(1, 3),
       st.sampled_from([16, 64]), st.integers(8, 140), st.integers(0, 12), st.integers(1, 3),
       st.sampled_from([0, 1, 2, 5, 1 << 30]))
@example([3000, 2990, 3001], 1, 16, 132, 1, 1, 1 << 30)
@example([1, 700, 0], 2, 16, 40, 1, 1, 1 << 30)
@example([9001, 1, 0], 1, 16, 132, 1, 1, 1 << 30)
@example([9001, 1, 0], 1, 16, 132, 8, 1, 1 << 30)
@example([1000, 1000, 4000], 1, 16, 132, 0, 2, 1 << 30)  # split by the factor alone (6 tiles per chunk, 3 per CTA)
@example([1000, 1000, 4000], 1, 16, 132, 0, 2, 2)  # ... not when the cap holds the factor to 3 + 2 tiles
@example([1000, 1000, 4000], 1, 16, 132, 0, 2, 3)  # ... split at 3 + 3
@example([1000, 1000, 4000], 1, 16, 132, 2, 1, 1 << 30)  # factor 1, slack 2: stream-K (6 > 3 + 2)
@pytest.mark.parametrize("merge_launch", [True, False])
def test_device_runtime_split_schedule_equals_numpy(merge_launch, lens, hkv, tile, num_ctas, slack, scale, cap):
    """With the runtime split on (and the merge launch's unit records, or
    without them: the in-kernel merge), the kernel runs what
    lean_schedule(merge_launch=..., runtime_split=True,
    split_slack_tiles=slack, split_scale=scale, split_cap_tiles=cap) says:
    the split-K in one wave (chunk ranges within the unit, slot 2 x cta, the
    unit's first CTA and chunk count) where the rule picks it, else
    stream-K."""
    from cupy_lean import _gpu

    host = cupy_lean.lean_schedule(lens, hkv, tile_size=tile, num_ctas=num_ctas, merge_launch=merge_launch,
                                   runtime_split=True, split_slack_tiles=slack, split_scale=scale,
                                   split_cap_tiles=cap)
    dev = _gpu.device_schedule(lens, hkv, tile_size=tile, num_ctas=num_ctas, runtime_split=True,
                               split_slack_tiles=slack, merge_launch=merge_launch, split_scale=scale,
                               split_cap_tiles=cap)
    for c in range(num_ctas):
        expect = _expected_records(host, c) if c < host.num_ctas else []
        if not expect:
            assert dev[c] is None or not dev[c][2]
            continue
        start, end, segs = dev[c]
        assert (start, end) == (host.cta_start[c], host.cta_end[c])
        assert segs == expect[:len(segs)] and len(segs) == min(len(expect), 64)


# ---------------------------------------------------------------- properties

def _big_case(seed=1, dtype=np.float16, lens=(5000, 1, 0, 3001, 64, 777)):
    rng = np.random.default_rng(seed)
    return make_inputs(rng, len(lens), 32, 8, 128, dtype, list(lens), "dense")


def test_bitwise_deterministic():
    q, k, v, lens, table = _big_case()
    args = [to_gpu(x) for x in (q, k, v)]
    dl = cp.asarray(lens)
    first = cupy_lean.attention(*args, kv_lens=dl, return_lse=True, num_ctas=3 * NUM_SMS)
    for _ in range(5):
        again = cupy_lean.attention(*args, kv_lens=dl, return_lse=True, num_ctas=3 * NUM_SMS)
        assert cp.array_equal(first[0].view(cp.uint16), again[0].view(cp.uint16))
        assert cp.array_equal(first[1].view(cp.uint32), again[1].view(cp.uint32))
    check_close(first[0], first[1], q, k, v, lens, table, np.float16)


_SPIN = r"""
extern "C" __global__ void spin(long long cycles, int* flag) {
  extern __shared__ int buf[];
  long long t0 = clock64();
  while (clock64() - t0 < cycles) { if (buf[threadIdx.x] == 12345) flag[0] = 1; }
}
"""


def test_not_resident_and_oversubscribed():
    """Correct, and not hung, when most SMs are busy with another kernel and
    when the grid is 16x the SM count."""
    q, k, v, lens, table = _big_case(seed=2)
    qd, kd, vd, dl = to_gpu(q), to_gpu(k), to_gpu(v), cp.asarray(lens)
    spin = cp.RawKernel(_SPIN, "spin")
    smem = 200 * 1024
    spin.max_dynamic_shared_size_bytes = smem
    flag = cp.zeros(1, dtype=cp.int32)
    busy = cp.cuda.Stream(non_blocking=True)
    work = cp.cuda.Stream(non_blocking=True)
    rate = cp.cuda.Device().attributes["ClockRate"] * 1000  # Hz
    with busy:
        spin((NUM_SMS - 4,), (256,), (np.int64(int(rate * 0.3)), flag), shared_mem=smem)
    with work:
        out, lse = cupy_lean.attention(qd, kd, vd, kv_lens=dl, return_lse=True, num_ctas=2 * NUM_SMS)
        out2, lse2 = cupy_lean.attention(qd, kd, vd, kv_lens=dl, return_lse=True, num_ctas=16 * NUM_SMS)
    work.synchronize()
    busy.synchronize()
    check_close(out, lse, q, k, v, lens, table, np.float16)
    check_close(out2, lse2, q, k, v, lens, table, np.float16)


def test_two_streams_concurrently():
    cases_ = [_big_case(seed=s, lens=lens) for s, lens in ((3, (4000, 100, 9000)), (4, (1, 2, 12000, 64)))]
    streams = [cp.cuda.Stream(non_blocking=True) for _ in cases_]
    gpu_in = [[to_gpu(x) for x in c[:3]] + [cp.asarray(c[3])] for c in cases_]
    results = [None, None]
    barrier = threading.Barrier(2)

    def run(i):
        with streams[i]:
            barrier.wait()
            for _ in range(5):
                results[i] = cupy_lean.attention(*gpu_in[i][:3], kv_lens=gpu_in[i][3], return_lse=True,
                                                 validate=False)
        streams[i].synchronize()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (q, k, v, lens, table), (out, lse) in zip(cases_, results):
        check_close(out, lse, q, k, v, lens, table, np.float16)


def test_cuda_graph_with_changing_lengths():
    rng = np.random.default_rng(5)
    q, k, v, lens, table = make_inputs(rng, 4, 16, 4, 128, np.float16, [3000, 17, 0, 1200], "paged",
                                       page_size=16, cap_extra=0)
    qd, kd, vd, td = to_gpu(q), to_gpu(k), to_gpu(v), to_gpu(table)
    dl = cp.asarray(lens)
    out = cp.empty(q.shape, dtype=q.dtype)
    stream = cp.cuda.Stream(non_blocking=True)
    owned = np.array([-(-int(n) // 16) * 16 for n in lens])  # tokens on pages each sequence owns
    with stream:
        # eager call first: compiles, and sizes this stream's workspace
        cupy_lean.attention(qd, kd, vd, kv_lens=dl, block_table=td, out=out, validate=False)
        stream.synchronize()
        stream.begin_capture()
        try:
            cupy_lean.attention(qd, kd, vd, kv_lens=dl, block_table=td, out=out, validate=False)
        finally:
            graph = stream.end_capture()
        for new in ([3000, 17, 0, 1200], [1, 2999, 640, 0], [0, 0, 0, 0], [2048, 2048, 1, 1199]):
            new = np.minimum(np.asarray(new), owned).astype(np.int32)
            dl[...] = cp.asarray(new)
            graph.launch(stream)
            stream.synchronize()
            check_close(out, None, q, k, v, new, table, np.float16)


def test_torch_tensor_input():
    torch = pytest.importorskip("torch")
    q, k, v, lens, table = _big_case(seed=6, lens=(300, 5, 1000))
    tq, tk, tv = (torch.from_numpy(x.view(np.int16)).view(torch.float16).cuda() for x in (q, k, v))
    tl = torch.from_numpy(lens).cuda()
    out, lse = cupy_lean.attention(tq, tk, tv, kv_lens=tl, return_lse=True)
    assert isinstance(out, cp.ndarray)
    check_close(out, lse, q, k, v, lens, table, np.float16)


# ---------------------------------------------------------------- bad values on the GPU

def test_device_validation_raises():
    q, k, v, lens, table = make_inputs(np.random.default_rng(7), 2, 8, 2, 64, np.float16, [100, 50], "paged")
    qd, kd, vd = to_gpu(q), to_gpu(k), to_gpu(v)
    bad = cp.asarray(np.array([100, 10**6], dtype=np.int32))
    with pytest.raises(ValueError, match=r"kv_lens\[1\] = 1000000"):
        cupy_lean.attention(qd, kd, vd, kv_lens=bad, block_table=cp.asarray(table), validate=True)
    neg = cp.asarray(np.array([-3, 5], dtype=np.int64))
    with pytest.raises(ValueError, match=r"kv_lens\[0\] = -3"):
        cupy_lean.attention(qd, kd, vd, kv_lens=neg, block_table=cp.asarray(table), validate=True)
    t2 = table.copy()
    t2[1, 1] = k.shape[0] + 5
    with pytest.raises(ValueError, match=r"block_table\[1, 1\]"):
        cupy_lean.attention(qd, kd, vd, kv_lens=cp.asarray(lens), block_table=cp.asarray(t2), validate=True)
    # a host table with lengths on the GPU: checked as GPU values are (its pages in use follow those lengths)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\]"):
        cupy_lean.attention(qd, kd, vd, kv_lens=cp.asarray(lens), block_table=t2, validate=True)


def test_device_validation_of_a_block_table_near_two_billion_tokens():
    """validate=True on a sequence at the capacity limit (2**31 - 256
    tokens at most) in pages of 255, the largest page size below the GPU
    path's 256 that is not a power of two: the check kernel counts the pages
    in use (in 64 bits) and names a bad entry in the last of them."""
    ps = 255
    max_pages = (2**31 - 256) // ps  # 8,421,504 pages: 2,147,483,520 tokens is past the limit, so one fewer
    max_pages -= max_pages * ps > 2**31 - 256
    qd = cp.zeros((1, 2, 64), dtype=cp.float16)
    kd = cp.zeros((2, ps, 1, 64), dtype=cp.float16)
    table = cp.zeros((1, max_pages), dtype=cp.int32)
    table[0, max_pages - 1] = 7  # the last page in use: outside a cache of 2 pages
    lens = cp.asarray(np.array([max_pages * ps], dtype=np.int32))
    with pytest.raises(ValueError, match=rf"block_table\[0, {max_pages - 1}\] = 7"):
        cupy_lean.attention(qd, kd, kd, kv_lens=lens, block_table=table, validate=True)


def test_bad_values_without_validation_are_safe():
    """validate=False: lengths over the capacity are clamped; pages outside the
    cache are masked (read as empty)."""
    rng = np.random.default_rng(8)
    q, k, v, lens, table = make_inputs(rng, 2, 8, 2, 128, np.float16, [300, 200], "dense")
    over = cp.asarray(np.array([10**9, -5], dtype=np.int32))
    out, lse = cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=over, return_lse=True,
                                   validate=False)
    check_close(out, lse, q, k, v, np.array([k.shape[1], 0]), None, np.float16)

    q, k, v, lens, table = make_inputs(rng, 2, 8, 2, 128, np.float16, [64, 64], "paged", page_size=16)
    t2 = table.copy()
    t2[0, 1] = 10**6  # tokens 16..31 of sequence 0 are on a page outside the cache
    out, lse = cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens),
                                   block_table=cp.asarray(t2), return_lse=True, validate=False)
    # expected: sequence 0 without its second page
    kk = np.concatenate([k[t2[0, 0]], k[t2[0, 2]], k[t2[0, 3]]])[None]
    vv = np.concatenate([v[t2[0, 0]], v[t2[0, 2]], v[t2[0, 3]]])[None]
    ref0, lse0 = reference.attention(q[:1], kk, vv)
    got = cp.asnumpy(out[0]).astype(np.float64)
    assert np.abs(got - ref0[0]).max() < 5e-3
    assert abs(float(lse[0, 0]) - lse0[0, 0]) < 2e-3


# ---------------------------------------------------------------- page sizes and the loader's runs

@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("page_size", [1, 2, 8, 12, 16, 48, 64])
def test_every_page_size_against_the_loader_run(d, page_size):
    """A loader thread copies a run of consecutive rows of a tile and reads
    the block table once per run when the run divides the page size, else per
    row (the page_rows spec). Both, at every head_dim, with ragged lengths
    that are multiples of nothing, a page outside the cache in the middle of
    a sequence (its tokens read as absent) and NaN-prefilled outputs; the
    spec is the one the page size calls for."""
    rng = np.random.default_rng(d * 1000 + page_size)
    lens = [777, 1, 0, 2049, 130]
    q, k, v, lens, table = make_inputs(rng, len(lens), 6, 2, d, np.float16, lens, "paged", page_size=page_size)
    out = cp.full(q.shape, cp.nan, dtype=cp.float16)
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    p = cupy_lean.plan(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens), block_table=cp.asarray(table),
                       out=out)
    want_rows = page_size % p.spec.run_rows != 0
    assert ("page_rows" in p.spec.name) == want_rows, (p.spec.name, p.spec.run_rows)
    p.run(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens), block_table=cp.asarray(table), out=out, lse=lse)
    check_close(out, lse, q, k, v, lens, table, np.float16)
    # a page outside the cache: sequence 3 without the tokens of its page 2
    t2 = table.copy()
    t2[3, 2] = 10**6
    out.fill(cp.nan)
    lse.fill(cp.nan)
    cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens), block_table=cp.asarray(t2),
                        out=out, lse=lse, validate=False)
    n3 = int(lens[3])
    keep = [j for j in range(n3) if j // page_size != 2]
    kk = np.concatenate([k[t2[3, j // page_size], j % page_size][None] for j in keep])[None]
    vv = np.concatenate([v[t2[3, j // page_size], j % page_size][None] for j in keep])[None]
    ref3, lse3 = reference.attention(q[3:4], kk, vv)
    assert np.abs(cp.asnumpy(out[3]).astype(np.float64) - ref3[0]).max() < 5e-3
    assert np.abs(cp.asnumpy(lse[3]) - lse3[0]).max() < 2e-3
    others = [0, 1, 2, 4]
    check_close(out[others], lse[others], q[others], k, v, lens[others], table[others], np.float16)


def test_paged_cache_with_pages_in_reverse_order():
    """A paged cache viewed backwards (``cache[::-1]``, a negative page
    stride) with the block table renumbered to match, and one whose tokens
    run backwards in each page: read through a contiguous copy (the loader's
    page offsets are unsigned), same result as the plain cache."""
    rng = np.random.default_rng(83)
    lens = [333, 17, 0, 200]
    q, k, v, lens, table = make_inputs(rng, len(lens), 8, 2, 128, np.float16, lens, "paged", page_size=16)
    n = k.shape[0]
    table_r = np.where(table >= 0, n - 1 - table, -1).astype(np.int32)
    out = cp.full(q.shape, cp.nan, dtype=cp.float16)
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    kg, vg = cp.asarray(k), cp.asarray(v)
    cupy_lean.attention(to_gpu(q), kg[::-1], vg[::-1], kv_lens=cp.asarray(lens), block_table=cp.asarray(table_r),
                        out=out, lse=lse)
    check_close(out, lse, q, k, v, lens, table, np.float16)
    out.fill(cp.nan)
    lse.fill(cp.nan)
    kt = cp.ascontiguousarray(kg[:, ::-1])[:, ::-1]  # the same values, tokens stored backwards
    vt = cp.ascontiguousarray(vg[:, ::-1])[:, ::-1]
    cupy_lean.attention(to_gpu(q), kt, vt, kv_lens=cp.asarray(lens), block_table=cp.asarray(table), out=out, lse=lse)
    check_close(out, lse, q, k, v, lens, table, np.float16)


# ---------------------------------------------------------------- units cut into many pieces

@pytest.mark.parametrize("d,hq,hkv,n,layout,ctas", [
    (256, 24, 2, 20011, "dense", None),    # the default grid: ~35 pieces per unit, groups of 6
    (256, 24, 2, 20011, "paged", 264),     # as many as the merge balance allows
    (64, 8, 1, 65537, "dense", 132),       # ~57 pieces per unit: groups of 8
    (128, 16, 2, 9001, "strided", 80),     # ~20 pieces per unit: groups of 5
    (128, 16, 2, 9001, "dense", 30),       # ~8 pieces: one merge
])
def test_units_cut_into_many_pieces(d, hq, hkv, n, layout, ctas):
    """Few long units over the whole grid: every unit's states are merged in
    two levels from 16 pieces on (schedule.merge_group_size). Output
    prefilled with NaN, lse checked, and two replays of a captured call give
    the first call's bits: the group counters are back at zero after each
    launch."""
    rng = np.random.default_rng(d + n)
    lens = [n, n - 977]
    q, k, v, lens, table = make_inputs(rng, 2, hq, hkv, d, np.float16, lens, layout)
    kw = dict(kv_lens=cp.asarray(lens), block_table=to_gpu(table), num_ctas=ctas)
    out = cp.full(q.shape, cp.nan, dtype=cp.float16)
    lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
    qg, kg, vg = to_gpu(q), to_gpu(k), to_gpu(v)
    cupy_lean.attention(qg, kg, vg, out=out, lse=lse, return_lse=True, **kw)
    check_close(out, lse, q, k, v, lens, table, np.float16)
    first = out.copy()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        cupy_lean.attention(qg, kg, vg, out=out, lse=lse, return_lse=True, **kw)
        graph = stream.end_capture()
        for _ in range(2):
            out.fill(cp.nan)
            graph.launch(stream)
            stream.synchronize()
            assert cp.array_equal(out, first)


# ---------------------------------------------------------------- API details

def test_out_argument_and_batch_zero():
    q, k, v, lens, table = _big_case(seed=9, lens=(100, 2000))
    out = cp.full(q.shape, cp.nan, dtype=cp.float16)
    res = cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=lens, out=out)
    assert res is out
    check_close(out, None, q, k, v, lens, table, np.float16)
    e = cupy_lean.attention(cp.zeros((0, 4, 64), cp.float16), cp.zeros((0, 5, 2, 64), cp.float16),
                            cp.zeros((0, 5, 2, 64), cp.float16), return_lse=True)
    assert e[0].shape == (0, 4, 64) and e[1].shape == (0, 4)


def test_nan_propagates_to_its_sequence_only():
    q, k, v, lens, table = _big_case(seed=10, lens=(500, 600))
    k = k.copy()
    k[0, 10, 0, 3] = np.nan
    out = cp.asnumpy(cupy_lean.attention(to_gpu(q), to_gpu(k), to_gpu(v), kv_lens=cp.asarray(lens)))
    g = 4
    assert np.isnan(out[0, :g].astype(np.float32)).all()
    assert np.isfinite(out[1].astype(np.float32)).all()
    assert np.isfinite(out[0, g:].astype(np.float32)).all()


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32])
def test_merge_states_gpu(dtype):
    rng = np.random.default_rng(11)
    outs = rng.standard_normal((3, 2, 5, 64)).astype(dtype)
    lses = rng.standard_normal((3, 2, 5)).astype(np.float32)
    lses[1, 0, 0] = -np.inf
    lses[:, 1, 1] = -np.inf
    o, s = cupy_lean.merge_states(cp.asarray(outs), cp.asarray(lses))
    ro, rs = reference.merge_states(outs, lses)
    tol = 1e-5 if dtype == np.float32 else (2e-3 if dtype == np.float16 else 1.6e-2)
    assert np.abs(cp.asnumpy(o).astype(np.float64) - ro).max() < tol
    got = cp.asnumpy(s).astype(np.float64)
    assert np.isneginf(got[1, 1]) and (cp.asnumpy(o)[1, 1].astype(np.float64) == 0).all()
    fin = np.isfinite(rs)
    assert np.abs(got[fin] - rs[fin]).max() < 1e-5


def test_split_equals_lean_equals_head():
    q, k, v, lens, table = _big_case(seed=12, lens=(9000, 10, 0, 4100))
    args = [to_gpu(x) for x in (q, k, v)]
    res = {s: cupy_lean.attention(*args, kv_lens=cp.asarray(lens), return_lse=True, schedule=s)
           for s in ("lean", "split", "head")}
    for s, (o, l) in res.items():
        check_close(o, l, q, k, v, lens, table, np.float16)


def test_long_context_64bit_offsets():
    """Offsets past 2**31 elements: 3 sequences of 1M tokens x 8 KV heads x
    128, so sequence 2 starts at element 2**31."""
    n = 1 << 20
    free = cp.cuda.runtime.memGetInfo()[0]
    if free < 16 * 2**30:
        pytest.skip("needs 16 GB of free GPU memory")
    rng = np.random.default_rng(13)
    B, hkv, d = 3, 8, 128
    k = cp.zeros((B, n, hkv, d), dtype=cp.float16)
    v = cp.zeros((B, n, hkv, d), dtype=cp.float16)
    tail = 512
    kt = rng.standard_normal((tail, hkv, d)).astype(np.float16)
    vt = rng.standard_normal((tail, hkv, d)).astype(np.float16)
    k[2, n - tail:] = cp.asarray(kt)
    v[2, n - tail:] = cp.asarray(vt)
    q = rng.standard_normal((B, hkv, d)).astype(np.float16)
    # reference for batch 2: n - tail zero keys (score 0) + the tail
    s_tail = (q[2, :, None, :].astype(np.float64) * kt.transpose(1, 0, 2)).sum(-1) / np.sqrt(d)  # (hkv, tail)
    mx = np.maximum(s_tail.max(axis=1), 0.0)
    w0 = (n - tail) * np.exp(0.0 - mx)
    wt = np.exp(s_tail - mx[:, None])
    ref = (wt[:, :, None] * vt.transpose(1, 0, 2).astype(np.float64)).sum(1) / (w0 + wt.sum(1))[:, None]
    # the default plan (for equal lengths it may take the split-K variant) and stream-K forced
    for cfg in (None, cupy_lean.Config(ctas_per_sm=1)):
        p = cupy_lean.plan(cp.asarray(q), k, v, config=cfg)
        out = p.run(cp.asarray(q), k, v)
        got = cp.asnumpy(out[2]).astype(np.float64)
        assert np.abs(got - ref).max() < 1e-3

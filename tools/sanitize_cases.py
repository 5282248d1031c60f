"""A small representative set of calls for compute-sanitizer (tools/sanitize.sh):
lean with partial units and empty sequences, units cut into many pieces
(the two-level merge), few units merged by the combine launch, paged,
strided, split, head, bf16, large group, merge_states, the launch-time
split merged in the kernel, fp8 (head pairs too). Exits non-zero on a wrong
result."""

import sys

import numpy as np

sys.path.insert(0, ".")
import cupy as cp  # noqa: E402

import cupy_lean  # noqa: E402
from cupy_lean import reference  # noqa: E402


def run(dtype, d, hq, hkv, lens, layout="dense", sched="lean", num_ctas=None, page_size=16):
    rng = np.random.default_rng(0)
    lens = np.asarray(lens, dtype=np.int32)
    B, cap = len(lens), max(int(lens.max()), 1)
    q = rng.standard_normal((B, hq, d)).astype(dtype)
    table = None
    if layout == "paged":
        used = [-(-int(n) // page_size) for n in lens]
        npages = sum(used) + 1
        perm = rng.permutation(npages)
        table = np.full((B, max(used) + 1), -1, np.int32)
        pos = 0
        for b, u in enumerate(used):
            table[b, :u] = perm[pos:pos + u]
            pos += u
        k = rng.standard_normal((npages, page_size, hkv, d)).astype(dtype)
        v = rng.standard_normal((npages, page_size, hkv, d)).astype(dtype)
    else:
        k = rng.standard_normal((B, cap, hkv, d)).astype(dtype)
        v = rng.standard_normal((B, cap, hkv, d)).astype(dtype)
    kd, vd = cp.asarray(k), cp.asarray(v)
    if layout == "strided":
        kd = cp.ascontiguousarray(kd.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        vd = cp.ascontiguousarray(vd.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    out, lse = cupy_lean.attention(cp.asarray(q), kd, vd, kv_lens=cp.asarray(lens),
                                   block_table=None if table is None else cp.asarray(table),
                                   return_lse=True, schedule=sched, num_ctas=num_ctas)
    ref, _ = reference.attention(q, k, v, kv_lens=lens, block_table=table)
    err = float(np.abs(cp.asnumpy(out).astype(np.float64) - ref).max())
    ok = err < 2e-2
    print(f"{np.dtype(dtype).name:8s} d={d} {hq}/{hkv} {layout:7s} {sched:5s} ctas={num_ctas} "
          f"lens={lens.tolist()} err={err:.2e} {'ok' if ok else 'WRONG'}")
    return ok


def run_fp8():
    """e4m3 K/V read straight from the byte ring (paged, partial units) at
    head_dim 64 and 256."""
    import ml_dtypes

    ok = True
    rng = np.random.default_rng(5)
    for d, hq, hkv in ((64, 20, 1), (256, 8, 2)):
        lens = np.array([400, 0, 97], np.int32)
        q = rng.standard_normal((3, hq, d)).astype(np.float16)
        k = rng.standard_normal((3, 400, hkv, d)).astype(ml_dtypes.float8_e4m3fn)
        v = rng.standard_normal((3, 400, hkv, d)).astype(ml_dtypes.float8_e4m3fn)
        out = cupy_lean.attention(cp.asarray(q), cp.asarray(k.view(np.uint8)), cp.asarray(v.view(np.uint8)),
                                  kv_lens=cp.asarray(lens), kv_dtype="e4m3", k_scale=0.5, num_ctas=5)
        ref, _ = reference.attention(q, k, v, kv_lens=lens, k_scale=0.5)
        err = float(np.abs(cp.asnumpy(out).astype(np.float64) - ref).max())
        ok &= err < 2e-2
        print(f"fp8 e4m3 d={d} {hq}/{hkv} lens={lens.tolist()} err={err:.2e} {'ok' if err < 2e-2 else 'WRONG'}")
    # head pairs (kernels.pair_heads: one-token pages, 4 KV heads at head_dim 64): the padding and
    # unpairing kernels and the head_dim-128 call, out a strided slice (rows 256 bytes apart)
    lens = np.array([300, 0, 1, 77], np.int32)
    q = rng.standard_normal((4, 12, 64)).astype(np.float16)
    perm = rng.permutation(int(lens.sum()) + 2)
    table = np.full((4, int(lens.max()) + 1), -1, np.int32)
    pos = 0
    for b, n in enumerate(lens):
        table[b, :n] = perm[pos:pos + n]
        pos += n
    k = rng.standard_normal((len(perm), 1, 4, 64)).astype(ml_dtypes.float8_e4m3fn)
    v = rng.standard_normal((len(perm), 1, 4, 64)).astype(ml_dtypes.float8_e4m3fn)
    wide = cp.full((4, 12, 128), cp.nan, dtype=cp.float16)
    args = (cp.asarray(q), cp.asarray(k.view(np.uint8)), cp.asarray(v.view(np.uint8)))
    kw = dict(kv_lens=cp.asarray(lens), block_table=cp.asarray(table), kv_dtype="e4m3")
    paired = cupy_lean.plan(*args, **kw).paired
    cupy_lean.attention(*args, **kw, k_scale=0.5, out=wide[:, :, 32:96])
    ref, _ = reference.attention(q, k, v, kv_lens=lens, block_table=table, k_scale=0.5)
    err = float(np.abs(cp.asnumpy(wide[:, :, 32:96]).astype(np.float64) - ref).max())
    rest = bool(cp.isnan(wide[:, :, :32]).all()) and bool(cp.isnan(wide[:, :, 96:]).all())
    good = err < 2e-2 and rest and paired
    ok &= good
    print(f"fp8 e4m3 head pairs (paired {paired}) d=64 12/4 pages of 1 lens={lens.tolist()} err={err:.2e} "
          f"rest of out untouched {rest} {'ok' if good else 'WRONG'}")
    return ok


def run_graph():
    """Two graphs of one plan captured on a fresh stream, replayed on two
    streams at once."""
    rng = np.random.default_rng(3)
    lens = np.array([700, 0, 90], np.int32)
    q = rng.standard_normal((3, 8, 128)).astype(np.float16)
    k = rng.standard_normal((3, 700, 2, 128)).astype(np.float16)
    qd, kd, ld = cp.asarray(q), cp.asarray(k), cp.asarray(lens)
    outs = [cp.full(q.shape, cp.nan, cp.float16) for _ in range(2)]
    p = cupy_lean.plan(qd, kd, kd, kv_lens=ld, out=outs[0], num_ctas=5)
    cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    graphs = []
    with s:
        p.run(qd, kd, kd, kv_lens=ld, out=outs[0])
        for o in outs:
            s.begin_capture()
            p.run(qd, kd, kd, kv_lens=ld, out=o)
            graphs.append(s.end_capture())
    s.synchronize()
    streams = [cp.cuda.Stream(non_blocking=True) for _ in graphs]
    for g, st in zip(graphs, streams):
        g.launch(st)
    cp.cuda.Device().synchronize()
    ref, _ = reference.attention(q, k, k, kv_lens=lens)
    err = max(float(np.abs(cp.asnumpy(o).astype(np.float64) - ref).max()) for o in outs)
    ok = err < 2e-2
    print(f"graphs of one plan, replayed concurrently: err={err:.2e} {'ok' if ok else 'WRONG'}")
    return ok


def main():
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    ok = True
    ok &= run(np.float16, 128, 8, 2, [300, 0, 129, 64], num_ctas=7)
    ok &= run(np.float16, 128, 8, 2, [300, 0, 129, 64], num_ctas=1)
    ok &= run(bf16, 64, 4, 4, [200, 17], layout="paged", num_ctas=5, page_size=3)
    ok &= run(np.float16, 256, 34, 2, [90, 33], layout="strided", num_ctas=4)
    # the paged loader's two paths at head_dim 256: a run of rows on one page, and per-row pages (shuffles)
    ok &= run(np.float16, 256, 12, 1, [333, 64], layout="paged", num_ctas=6, page_size=16)
    ok &= run(np.float16, 256, 12, 1, [333, 64], layout="paged", num_ctas=6, page_size=1)
    ok &= run(np.float16, 128, 4, 1, [500, 5], sched="split")
    # split-K with 33 chunks: empty chunks publish empty states, the merge's lanes split the states (d64, group 2)
    ok &= run(np.float16, 64, 4, 2, [0, 1, 70, 33 * 64 + 5], sched="split", num_ctas=33 * 8)
    ok &= run(bf16, 128, 16, 2, [500, 0], sched="head")
    ok &= run(np.float16, 64, 128, 1, [150], num_ctas=3)
    # units cut into 16+ pieces: the two-level merge (in-place group states, group counters)
    ok &= run(np.float16, 256, 24, 2, [9000, 8000], num_ctas=90)
    ok &= run(bf16, 64, 8, 1, [9000], layout="paged", num_ctas=40, page_size=5)
    # few units for the default grid: stream-K pieces merged by the combine launch (unit records),
    # a unit whole in one CTA and an empty one among them
    ok &= run(np.float16, 128, 24, 1, [7001, 1, 0, 3000], layout="paged", page_size=16)  # split-K at run time
    ok &= run(np.float16, 128, 24, 1, [60000, 1, 0, 5], layout="paged", page_size=16)  # skewed: stream-K
    # the launch-time split merged in the kernel (TUNING runtime_split_in_kernel): 4 chunks per unit,
    # and 24 through the merge tree (merge launch off)
    from cupy_lean import kernels as K
    with K.tuning(runtime_split_in_kernel=True):
        ok &= run(np.float16, 128, 30, 15, [1000, 990], layout="paged", page_size=16)
        with K.tuning(merge_launch_pieces=0):
            # even lengths: the split at any of the plan's tiles and grids (24 chunks with tiles per unit)
            ok &= run(np.float16, 128, 24, 1, [3001, 1, 0, 2990], layout="paged", page_size=16)
    outs = cp.asarray(np.random.default_rng(1).standard_normal((3, 4, 64)).astype(np.float16))
    lses = cp.asarray(np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32))
    cupy_lean.merge_states(outs, lses)
    ok &= run_graph()
    ok &= run_fp8()
    cp.cuda.Device().synchronize()
    print("all ok" if ok else "SOME WRONG")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

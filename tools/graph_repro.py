"""Graphs captured one after another (the sequence of tests/test_gpu_use.py's
graph test, with attention() only, so that it also runs against older
versions): prints, per graph and replay, whether rows were left unwritten or
the replay differs from an eager call. Diagnostic tool; exit status 1 on a
failure."""
import json
import os
import sys

import numpy as np
import cupy as cp
import cupy_lean


def make(rng, kind, B_lens, hq, hkv, d, ps=16):
    lens = np.asarray(B_lens, np.int32)
    B = len(lens)
    q = cp.asarray(rng.standard_normal((B, hq, d), dtype=np.float32).astype(np.float16))
    if kind == "paged":
        pages = -(-lens // ps)
        npg = int(pages.sum()) + 3
        perm = rng.permutation(npg)
        table = np.full((B, int(pages.max()) + 1), -1, np.int32)
        o = 0
        for b in range(B):
            table[b, :pages[b]] = perm[o:o + pages[b]]
            o += pages[b]
        k = cp.asarray(rng.standard_normal((npg, ps, hkv, d), dtype=np.float32).astype(np.float16))
        v = cp.asarray(rng.standard_normal((npg, ps, hkv, d), dtype=np.float32).astype(np.float16))
        return dict(q=q, k=k, v=v, lens=cp.asarray(lens), table=cp.asarray(table), host_lens=lens,
                    owned=pages * ps)
    cap = int(lens.max())
    k = cp.asarray(rng.standard_normal((B, cap, hkv, d), dtype=np.float32).astype(np.float16))
    v = cp.asarray(rng.standard_normal((B, cap, hkv, d), dtype=np.float32).astype(np.float16))
    return dict(q=q, k=k, v=v, lens=cp.asarray(lens), table=None, host_lens=lens, owned=np.full(B, cap))


SYNC = os.environ.get("SYNC", "0") == "1"  # order the legacy-stream writes before the graph's stream


def main():
    rng = np.random.default_rng(int(sys.argv[1]) if len(sys.argv) > 1 else 70)
    specs = [("paged", "lean", 64, 8, 128, rng.integers(1000, 20000, 32)),
             ("paged", "split", 64, 8, 128, None),
             ("ragged", "lean", 32, 8, 128, np.clip(rng.lognormal(np.log(6000), 0.75, 24), 1, 30000).astype(int)),
             ("ragged", "split", 32, 8, 128, None),
             ("dense", "lean", 28, 4, 64, np.full(5, 3001)),
             ("paged", "lean", 64, 8, 128, rng.integers(1000, 20000, 32)),
             ("dense", "split", 28, 4, 64, np.full(5, 3001)),
             ("ragged", "lean", 16, 2, 256, rng.integers(1, 9000, 7))]
    graphs, bad, case = [], 0, None
    for i, (kind, sched, hq, hkv, d, lens) in enumerate(specs):
        if lens is not None:
            case = make(rng, "paged" if kind == "paged" else "dense", lens, hq, hkv, d)
        c = case
        out = cp.full(c["q"].shape, cp.nan, cp.float16)

        def call(c=c, out=out, sched=sched):
            cupy_lean.attention(c["q"], c["k"], c["v"], kv_lens=c["lens"], block_table=c["table"], out=out,
                                schedule=sched, validate=False)

        if SYNC:
            cp.cuda.Device().synchronize()
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            call()
            s.synchronize()
            s.begin_capture()
            call()
            g = s.end_capture()
        ptr = s.ptr
        del s
        graphs.append((g, c, out, sched))
        bad += check(rng, i, graphs[-1], ptr)
    for i in reversed(range(len(graphs))):
        bad += check(rng, i, graphs[i], "again")
    print(json.dumps({"failures": bad, "sync": SYNC}))
    return 1 if bad else 0


def check(rng, i, item, tag):
    g, c, out, sched = item
    new = np.minimum(rng.integers(0, int(c["host_lens"].max()) + 1, len(c["host_lens"])), c["owned"]).astype(np.int32)
    c["lens"][...] = cp.asarray(new)
    out.fill(cp.nan)
    if SYNC:
        cp.cuda.Device().synchronize()
    s = cp.cuda.Stream(non_blocking=True)
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    e0.record(s)
    g.launch(s)
    e1.record(s)
    e1.synchronize()
    us = cp.cuda.get_elapsed_time(e0, e1) * 1e3
    ref = cupy_lean.attention(c["q"], c["k"], c["v"], kv_lens=c["lens"], block_table=c["table"], schedule=sched)
    cp.cuda.Device().synchronize()
    nan_rows = int(cp.isnan(out).any(axis=2).sum())
    same = bool(cp.array_equal(out.view(cp.uint16), ref.view(cp.uint16)))
    print(json.dumps(dict(graph=i, sched=sched, stream=str(tag), us=round(us, 1), nan_rows=nan_rows,
                          equal_to_eager=same)))
    return int(nan_rows > 0 or not same)


if __name__ == "__main__":
    sys.exit(main())

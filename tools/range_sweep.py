"""Time a call against the length of its stream-K ranges: the same shape
with ``Config(min_tiles_per_cta=n, merge_balance=0)`` for each n (longer
ranges: fewer CTAs streaming, fewer pieces per unit to merge), the plain
default and the balance off, device time per call from CUDA-graph replays
over rotating copies (cold L2). The data a range-length rule is fitted to.

    python tools/range_sweep.py [--shapes B,HQ,HKV,D,N[,PAGE];...] [--n 1,2,3,4,6,8,12,16] [--tree-from T] [--out F.json]

Lengths are N for every sequence, given as a GPU array (as a ragged batch
gives them: the kernel derives its ranges on the GPU).
"""

import argparse
import json
import sys

import numpy as np

sys.path.insert(0, ".")
import cupy as cp  # noqa: E402

import cupy_lean  # noqa: E402
from cupy_lean.bench import graph_time  # noqa: E402

SHAPES = ("1,6,1,256,6212;3,45,3,256,2696;2,2,1,64,89577;16,2,2,128,580;1,49,1,128,24050,16;"
          "2,104,2,256,3103;1,128,1,128,30000;4,64,1,64,8000;1,42,3,256,6747,1;2,7,1,256,23600;"
          "8,8,1,256,4000;1,16,1,128,100000")


def decode_inputs(shape, rng, rotate_mb=150):
    """fp16 inputs of shape text "B,HQ,HKV,D,N[,PAGE]": (dims, q, table, kvs)
    with dims = (B, HQ, HKV, D, N, PAGE or 0) and kvs a list of (k, v)
    copies of about ``rotate_mb`` MB in all (at most 8; cold L2 when timed
    over them in turn). Paged: pages in a random order."""
    f = [int(x) for x in shape.split(",")]
    b, hq, hkv, d, n = f[:5]
    ps = f[5] if len(f) > 5 else 0
    q = cp.asarray(rng.standard_normal((b, hq, d)), dtype=cp.float16)
    if ps:
        pages = -(-n // ps)
        k = cp.asarray(rng.standard_normal((b * pages, ps, hkv, d)), dtype=cp.float16)
        table = cp.asarray(rng.permutation(b * pages).reshape(b, pages).astype(np.int32))
    else:
        k = cp.asarray(rng.standard_normal((b, n, hkv, d)), dtype=cp.float16)
        table = None
    v = k.copy()
    copies = int(min(8, max(1, -(-rotate_mb // (2 * k.nbytes / 1e6)))))
    kvs = [(k, v)] + [(k.copy(), v.copy()) for _ in range(copies - 1)]
    return (b, hq, hkv, d, n, ps), q, table, kvs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=SHAPES, help="B,HQ,HKV,D,N[,PAGE] separated by ';'")
    ap.add_argument("--n", default="1,2,3,4,6,8,12,16,24", help="min_tiles_per_cta values (balance off)")
    ap.add_argument("--tree-from", type=int, default=None,
                    help="compile with this MERGE_TREE_FROM (pieces from which a unit merges in two levels)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.tree_from is not None:
        from cupy_lean import kernels as K

        K.MERGE_TREE_FROM = a.tree_from  # read when a spec is compiled (its -D options)
    rng = np.random.default_rng(a.seed)
    rows = []
    for text in a.shapes.split(";"):
        (b, hq, hkv, d, n, ps), q, table, kvs = decode_inputs(text, rng)
        k, v = kvs[0]
        out = cp.empty_like(q)
        mb = 2 * k.nbytes / 1e6
        copies = len(kvs)
        lens = cp.full((b,), n, dtype=cp.int32)
        variants = [("default", None), ("balance 0", cupy_lean.Config(merge_balance=0))]
        variants += [(f"n {m}", cupy_lean.Config(min_tiles_per_cta=m, merge_balance=0))
                     for m in (int(x) for x in a.n.split(","))]
        res = {"shape": text, "kv_mb": mb, "times": {}}
        line = []
        for name, cfg in variants:
            pl = cupy_lean.plan(q, k, v, kv_lens=lens, block_table=table, out=out, config=cfg)

            def call(i, pl=pl):
                pl.run(q, *kvs[i], kv_lens=lens, block_table=table, out=out)

            us = graph_time(call, copies, n_calls=max(20, copies), repeats=5)
            res["times"][name] = us
            line.append(f"{name} {us:.1f}")
        res["tile"], res["rows"], res["grid"] = pl.spec.tile, 16 * pl.spec.m_tiles, pl.grid
        rows.append(res)
        best = min(res["times"], key=res["times"].get)
        print(f"{text} ({mb:.1f} MB, tile {pl.spec.tile}, rows {res['rows']}): " + ", ".join(line)
              + f"; best {best}", flush=True)
        kvs = k = v = q = None  # free the copies before the next shape
        cp.get_default_memory_pool().free_all_blocks()
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

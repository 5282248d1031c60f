"""Where the time of a small decode call goes: device time per call (CUDA-graph
replays) of the same shape with every length 0 (launch, prologue and the empty
outputs), 1 token per sequence (one tile per unit: launch, prologue, first-load
latency, store, no merge), the real lengths, and the real lengths with one CTA
per unit (no merge); an empty kernel gives the graph's launch cost.

    python tools/fixed_cost.py [--seed S] [--out FILE.json]

With --shape B,HQ,HKV,D,N[,PAGE] only that shape is timed, once per CTA count
in --ctas (0: the library's choice) and once with the split schedule, lengths
given as a GPU array (as a ragged batch gives them):

    python tools/fixed_cost.py --shape 1,24,2,256,63828 --ctas 0,2,16,32,64,124

--lens L1,L2,... times the shape at each of these lengths (the cache holds N
tokens): with --ctas 0,UNITS (one CTA per unit: no merge) and --no-split it
separates a small call's fixed cost, its per-tile cost and its merge:

    python tools/fixed_cost.py --shape 3,45,3,256,2696 --lens 1,64,512,2696 --ctas 0,9 --no-split
"""

import argparse
import json
import sys

import numpy as np

sys.path.insert(0, ".")
import cupy as cp  # noqa: E402

import cupy_lean  # noqa: E402
from cupy_lean.bench import graph_time  # noqa: E402

SHAPES = [  # (name, batch, heads_q, heads_kv, head_dim, length, page_size or 0)
    ("b1 108/9 d64 4379", 1, 108, 9, 64, 4379, 0),
    ("b2 32/2 d128 6400", 2, 32, 2, 128, 6400, 0),
    ("b5 60/5 d256 3859", 5, 60, 5, 256, 3859, 0),
    ("b3 99/9 d128 6451 paged16", 3, 99, 9, 128, 6451, 16),
    ("b16 32/8 d128 1000", 16, 32, 8, 128, 1000, 0),
    ("b51 12/2 d128 2737", 51, 12, 2, 128, 2737, 0),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--shape", default="", help="B,HQ,HKV,D,N[,PAGE]: time this shape only")
    ap.add_argument("--ctas", default="0", help="with --shape: CTA counts to time (0: default)")
    ap.add_argument("--lens", default="", help="with --shape: lengths to time (default N), each <= N")
    ap.add_argument("--no-split", action="store_true", help="with --shape: skip the split schedule")
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    if a.shape:
        f = [int(x) for x in a.shape.split(",")]
        b, hq, hkv, d, n = f[:5]
        ps = f[5] if len(f) > 5 else 0
        name = f"b{b} {hq}/{hkv} d{d} {n}" + (f" paged{ps}" if ps else "")
        lens = [int(x) for x in a.lens.split(",")] if a.lens else [n]
        if max(lens) > n or min(lens) < 0:
            raise SystemExit(f"--lens: expected lengths in [0, {n}], got {a.lens}")
        labels = []
        for length in lens:
            at = f"len {length}, " if a.lens else ""
            labels += [(at + (f"num_ctas {c}" if c else "default"), length, {"num_ctas": c} if c else {})
                       for c in (int(x) for x in a.ctas.split(","))]
            if not a.no_split:
                labels.append((at + "split", length, {"schedule": "split"}))
        rows = [time_shape(rng, name, b, hq, hkv, d, n, ps, labels)]
        if a.out:
            with open(a.out, "w") as fh:
                json.dump(rows, fh, indent=1)
        return
    empty = cp.RawKernel('extern "C" __global__ void nothing() {}', "nothing")
    t_empty = graph_time(lambda i: empty((1,), (32,), ()), 1, n_calls=20)
    rows = [{"case": "empty kernel", "us": t_empty}]
    print(f"empty kernel: {t_empty:.2f} us")
    for name, b, hq, hkv, d, n, ps in SHAPES:
        rows.append(time_shape(rng, name, b, hq, hkv, d, n, ps,
                               (("len 0", 0, {}), ("len 1", 1, {}), (f"len {n}", n, {}),
                                (f"len {n}, one CTA per unit", n, {"num_ctas": b * hkv}),
                                (f"len {n}, split", n, {"schedule": "split"}))))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


def time_shape(rng, name, b, hq, hkv, d, n, ps, labels):
    """Device microseconds of one shape under each (label, length, kwargs)."""
    q = cp.asarray(rng.standard_normal((b, hq, d)), dtype=cp.float16)
    if ps:
        pages = -(-n // ps)
        k = cp.asarray(rng.standard_normal((b * pages, ps, hkv, d)), dtype=cp.float16)
        v = cp.asarray(rng.standard_normal((b * pages, ps, hkv, d)), dtype=cp.float16)
        table = cp.asarray(rng.permutation(b * pages).reshape(b, pages).astype(np.int32))
    else:
        k = cp.asarray(rng.standard_normal((b, n, hkv, d)), dtype=cp.float16)
        v = cp.asarray(rng.standard_normal((b, n, hkv, d)), dtype=cp.float16)
        table = None
    out = cp.empty_like(q)
    mb = 2 * b * n * hkv * d * 2 / 1e6
    copies = int(min(8, max(1, -(-150 // mb))))  # rotating copies: cold L2 on the real lengths
    kvs = [(k, v)] + [(k.copy(), v.copy()) for _ in range(copies - 1)]
    res = {"case": name, "kv_mb": mb}
    for label, lens, kw in labels:
        kv = cp.full((b,), lens, dtype=cp.int32)
        t = graph_time(lambda i: cupy_lean.attention(q, *kvs[i], kv_lens=kv, block_table=table, out=out, **kw),
                       copies, n_calls=max(20, copies))
        res[label.split(",")[0] if "," not in label else label] = t
        print(f"{name:28s} {mb:7.1f} MB  {label:34s} {t:7.2f} us")
    return res


if __name__ == "__main__":
    main()

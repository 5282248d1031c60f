"""Time a ragged batch of query tokens (q_lens) on the GPU: every sequence
with q_len tokens, against half of them with none (padding slots of a
serving batch). Device time per call from CUDA-graph replays
(cupy_lean.bench.graph_time, median of 7).

    PYTHONPATH=. python tools/qlens_padding_timing.py [--seed 7] [--out FILE]

Shape: batch 64, 32 query heads on 8 KV heads, head_dim 128, fp16, q_len 4,
kv_lens drawn in [1000, 8192]. A sequence with q_lens[b] = 0 reads no key or
value, so the padded call should take about half the time of the full one.
"""

import argparse
import json

import numpy as np


def main():
    import cupy as cp

    import cupy_lean
    from cupy_lean.bench import graph_time

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    B, hq, hkv, d, ql, cap = 64, 32, 8, 128, 4, 8192
    k = cp.asarray(rng.standard_normal((B, cap, hkv, d)).astype(np.float16))
    v = cp.asarray(rng.standard_normal((B, cap, hkv, d)).astype(np.float16))
    q = cp.asarray(rng.standard_normal((B, ql, hq, d)).astype(np.float16))
    lens = cp.asarray(rng.integers(1000, cap + 1, B).astype(np.int32))
    out = cp.empty_like(q)
    res = []
    for name, nq in (("every sequence q_len tokens", np.full(B, ql)),
                     ("half the sequences 0 tokens", np.where(np.arange(B) % 2 == 0, ql, 0))):
        nq_gpu = cp.asarray(nq.astype(np.int32))
        us = graph_time(lambda i, nq_gpu=nq_gpu: cupy_lean.attention(q, k, v, kv_lens=lens, q_lens=nq_gpu,
                                                                      out=out), 1)
        res.append({"case": name, "us": round(us, 2)})
        print(res[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

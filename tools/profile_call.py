"""cProfile of the hot path of attention() (GPU)."""
import cProfile
import pstats

import cupy as cp
import numpy as np

import cupy_lean

q = cp.asarray(np.random.standard_normal((1, 32, 128)).astype(np.float16))
k = cp.asarray(np.random.standard_normal((1, 1024, 8, 128)).astype(np.float16))
lens = cp.full(1, 1000, dtype=cp.int32)
out = cp.empty_like(q)
for _ in range(20):
    cupy_lean.attention(q, k, k, kv_lens=lens, out=out)
cp.cuda.Device().synchronize()
pr = cProfile.Profile()
pr.enable()
for _ in range(2000):
    cupy_lean.attention(q, k, k, kv_lens=lens, out=out)
pr.disable()
cp.cuda.Device().synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(12)

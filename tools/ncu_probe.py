"""One lean and one split call at b1 32/32 8k for Nsight Compute."""
import sys
sys.path.insert(0, ".")
import cupy as cp
import numpy as np
import cupy_lean

q = cp.asarray(np.random.default_rng(0).standard_normal((1, 32, 128)).astype(np.float16))
k = cp.random.standard_normal((1, 8192, 32, 128), dtype=cp.float32).astype(cp.float16)
v = cp.random.standard_normal((1, 8192, 32, 128), dtype=cp.float32).astype(cp.float16)
for s in ("lean", "split", "lean", "split"):
    cupy_lean.attention(q, k, v, schedule=s)
cp.cuda.Device().synchronize()

"""Quick device timing of lean / split / head on a few decode shapes (CUDA
events, eager launches back to back, inputs far over the L2 size or rotated).
Usage: python tools/quick_timing.py [--tile T] [--stages S]"""

import argparse
import sys

import numpy as np

sys.path.insert(0, ".")
import cupy as cp  # noqa: E402

import cupy_lean  # noqa: E402

SHAPES = [  # (name, B, Hq, Hkv, N, D)
    ("b1 32/32 128k", 1, 32, 32, 131072, 128),
    ("b1 32/32 1k", 1, 32, 32, 1024, 128),
    ("b1 32/8 32k", 1, 32, 8, 32768, 128),
    ("b8 32/8 8k", 8, 32, 8, 8192, 128),
    ("b1 64/8 128k", 1, 64, 8, 131072, 128),
    ("b4 16/8 d256 32k", 4, 16, 8, 32768, 256),
    ("b16 32/32 d64 4k", 16, 32, 32, 4096, 64),
]


def read_ceiling():
    n = 1 << 28  # 2 GiB of float4... (16 B each) -> 4 GiB; use 2 GiB
    n = (2 << 30) // 16
    buf = cp.empty(n * 4, dtype=cp.float32)
    buf.fill(1)
    k = cp.RawKernel(r"""
    extern "C" __global__ void rd(const float4* __restrict__ x, long long n, float* out) {
      float acc = 0.f;
      for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float4 v = __ldcs(x + i); acc += v.x + v.y + v.z + v.w; }
      if (acc == 12345.f) out[0] = acc;
    }""", "rd")
    out = cp.zeros(1, cp.float32)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    args = (buf, np.int64(n), out)
    k((sms * 8,), (512,), args)
    s, e = cp.cuda.Event(), cp.cuda.Event()
    s.record()
    for _ in range(10):
        k((sms * 8,), (512,), args)
    e.record()
    e.synchronize()
    t = cp.cuda.get_elapsed_time(s, e) / 10 / 1000
    del buf
    return n * 16 / t / 1e12


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tile", type=int, default=None)
    args = p.parse_args()
    ceil = read_ceiling()
    print(f"read ceiling {ceil:.2f} TB/s")
    rng = np.random.default_rng(0)
    for name, B, hq, hkv, n, d in SHAPES:
        kv_bytes = 2 * B * n * hkv * d * 2
        copies = max(1, min(8, int(200e6 // kv_bytes) + 1))
        sets = []
        for _ in range(copies):
            q = cp.asarray(rng.standard_normal((B, hq, d)).astype(np.float16))
            k = cp.random.standard_normal((B, n, hkv, d), dtype=cp.float32).astype(cp.float16)
            v = cp.random.standard_normal((B, n, hkv, d), dtype=cp.float32).astype(cp.float16)
            sets.append((q, k, v))
        row = [f"{name:18s} {kv_bytes / 1e6:8.1f} MB floor {kv_bytes / ceil / 1e6:7.1f} us"]
        for sched in ("lean", "split", "head"):
            for q, k, v in sets:
                cupy_lean.attention(q, k, v, schedule=sched, tile_size=args.tile)
            cp.cuda.Device().synchronize()
            reps = max(3, min(200, int(2e9 // kv_bytes)))
            s, e = cp.cuda.Event(), cp.cuda.Event()
            s.record()
            for i in range(reps):
                q, k, v = sets[i % copies]
                cupy_lean.attention(q, k, v, schedule=sched, tile_size=args.tile)
            e.record()
            e.synchronize()
            us = cp.cuda.get_elapsed_time(s, e) * 1000 / reps
            row.append(f"{sched} {us:8.1f} us ({kv_bytes / us / 1e6:5.2f} TB/s)")
        print(" | ".join(row), flush=True)
        del sets
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()

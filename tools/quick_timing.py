"""Quick device timing of lean / split / head on a few decode shapes: device
time per call from CUDA-graph replays over rotating input copies (cold L2),
plus host-side cost per call. Usage: python tools/quick_timing.py [--variants 128:3:1,64:4:2] [--shapes NAME]"""

import argparse
import sys
import time

import numpy as np

sys.path.insert(0, ".")
import cupy as cp  # noqa: E402

import cupy_lean  # noqa: E402

SHAPES = [  # (name, B, Hq, Hkv, N, D)
    ("b1 32/32 128k", 1, 32, 32, 131072, 128),
    ("b1 32/32 1k", 1, 32, 32, 1024, 128),
    ("b1 32/32 8k", 1, 32, 32, 8192, 128),
    ("b1 32/8 32k", 1, 32, 8, 32768, 128),
    ("b8 32/8 8k", 8, 32, 8, 8192, 128),
    ("b1 64/8 128k", 1, 64, 8, 131072, 128),
    ("b4 16/8 d256 32k", 4, 16, 8, 32768, 256),
    ("b16 32/32 d64 4k", 16, 32, 32, 4096, 64),
]


def read_ceiling():
    n = (2 << 30) // 16
    buf = cp.ones(n * 4, dtype=cp.float32)
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


def graph_time(fn, sets, reps=5):
    """Device us per call over the input sets (the package's graph timing)."""
    from cupy_lean.bench import graph_time as package_graph_time

    return package_graph_time(lambda i: fn(*sets[i]), len(sets), repeats=reps, n_calls=len(sets))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="")
    p.add_argument("--variants", default="", help="lean variants tile:stages:ctas_per_sm, comma-separated")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-host", action="store_true")
    args = p.parse_args()
    ceil = read_ceiling()
    print(f"read ceiling {ceil:.2f} TB/s")
    rng = np.random.default_rng(0)
    for name, B, hq, hkv, n, d in SHAPES:
        if args.shapes and args.shapes not in name:
            continue
        kv_bytes = 2 * B * n * hkv * d * 2
        copies = max(2, min(16, int(300e6 // kv_bytes) + 1))
        sets = []
        for _ in range(copies):
            q = cp.asarray(rng.standard_normal((B, hq, d)).astype(np.float16))
            k = cp.random.standard_normal((B, n, hkv, d), dtype=cp.float32).astype(cp.float16)
            v = cp.random.standard_normal((B, n, hkv, d), dtype=cp.float32).astype(cp.float16)
            sets.append((q, k, v))
        cp.cuda.Device().synchronize()  # input generation must not overlap the timing
        row = [f"{name:17s} floor {kv_bytes / ceil / 1e6:6.1f} us"]
        variants = [tuple(int(x) for x in v.split(":")) for v in args.variants.split(",") if v]
        variants = [v + (None,) * (4 - len(v)) for v in variants]
        runs = [("lean", None, None, None, None)] + [("lean",) + v for v in variants]
        if not args.no_baselines:
            runs += [("split", None, None, None, None), ("head", None, None, None, None)]
        runs += [("lean", None, None, None, None)]
        for sched, tile, stages, per_sm, nct in runs:
            try:
                q0, k0, v0 = sets[0]
                plan = cupy_lean.plan(q0, k0, v0, schedule=sched, tile_size=tile, num_ctas=nct, stages=stages,
                                      ctas_per_sm=per_sm)

                def fn(q, k, v, plan=plan):
                    plan.run(q, k, v)
                us = graph_time(fn, sets)
                lab = sched + (f"/t{tile}s{stages}c{per_sm}" if tile else "") + (f"n{nct}" if nct else "")
                row.append(f"{lab} {us:7.1f} ({kv_bytes / us / 1e6:4.2f})")
            except Exception as exc:
                row.append(f"{sched}/t{tile}s{stages}: {type(exc).__name__}: {str(exc)[:80]}")
        print(" | ".join(row), flush=True)
        del sets
        cp.get_default_memory_pool().free_all_blocks()
    if args.no_host:
        return
    # host cost per call (small shape, kernel time ~ few us)
    q = cp.asarray(rng.standard_normal((1, 32, 128)).astype(np.float16))
    k = cp.asarray(rng.standard_normal((1, 1024, 32, 128)).astype(np.float16))
    v = k.copy()
    for sched in ("lean", "split", "head"):
        cupy_lean.attention(q, k, v, schedule=sched)
        cp.cuda.Device().synchronize()
        t = time.perf_counter()
        for _ in range(500):
            cupy_lean.attention(q, k, v, schedule=sched)
        cp.cuda.Device().synchronize()
        print(f"eager per call {sched}: {(time.perf_counter() - t) / 500 * 1e6:.1f} us")
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(300):
        cupy_lean.attention(q, k, v)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()

"""Run the lean kernel on chosen family shapes for Nsight Compute: what
bounds a shape that misses the read floor (achieved DRAM throughput, warp
stalls, grid).

    ncu --kernel-name regex:lean_.*attention --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section LaunchStats --section WarpStateStats \\
        python tools/ncu_family.py --seed S --family N --case f12 [--dtype float16] [--fp8]

Runs the case's default plan four times (the first compiles); profile the
fourth launch.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--family", type=int, required=True)
    ap.add_argument("--case", required=True, help="name prefix, e.g. f12")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--fp8", action="store_true", help="K/V as e4m3 bytes (the high bytes of the fp16 cache)")
    a = ap.parse_args()
    import cupy as cp

    import cupy_lean
    from bench import cases as C
    from bench import family as F

    case = next(c for c in F.draw(a.family, a.seed) if c.name.startswith(a.case + "_"))
    inp = C.build_inputs(case, a.dtype, 1)
    kw = inp.index_kwargs()
    out = cp.empty_like(inp.q[0])
    if a.fp8:
        inp.k[0] = cp.ascontiguousarray(inp.k[0].view(cp.uint8)[..., 1::2])
        inp.v[0] = cp.ascontiguousarray(inp.v[0].view(cp.uint8)[..., 1::2])
    p = cupy_lean.plan(inp.q[0], inp.k[0], inp.v[0], out=out, **kw, **({"kv_dtype": "e4m3"} if a.fp8 else {}))
    print(case.name, f"{case.kv_bytes() / 1e6:.1f} MB")
    print(p.describe())
    for _ in range(4):
        p.run(inp.q[0], inp.k[0], inp.v[0], out=out, **kw)
    cp.cuda.Device().synchronize()


if __name__ == "__main__":
    main()

"""Run the lean kernel on chosen family shapes for Nsight Compute: what
bounds a shape that misses the read floor (achieved DRAM throughput, warp
stalls, grid).

One shape, every section (the fourth launch; the first three compile and warm):

    ncu --kernel-name regex:lean_.*attention --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section LaunchStats --section WarpStateStats \\
        python tools/ncu_family.py --seed S --family N --case f12 [--dtype float16] [--fp8]

Many shapes in one process (``--case all`` or ``--case f03,f07``; several
``--dtypes``): each call's launches are profiled between
``cudaProfilerStart`` / ``Stop`` and preceded by a marker kernel
``lean_ncu_marker`` whose grid is the call's index in ``--index-out`` (a
JSON list of ``{index, case, dtype, fp8, mb}``), so a report's kernels can
be told apart without NVTX:

    ncu --profile-from-start off --clock-control none --metrics M1,M2,... \\
        --export rep python tools/ncu_family.py --seed S --family N --case all \\
        --dtypes float16,bfloat16 --index-out index.json
    ncu --import rep.ncu-rep --csv --page raw --print-units base > raw.csv
    python tools/ncu_table.py --raw raw.csv --index index.json [--bench bench_family_sS.json]

``tools/ncu_family.sh`` runs those three steps with the metrics the table reads.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MARKER = "lean_ncu_marker"
_MARKER_SRC = 'extern "C" __global__ void lean_ncu_marker() {}'


def _pick(cases, spec):
    if spec == "all":
        return list(cases)
    want = [w for w in spec.split(",") if w]
    out = []
    for w in want:
        hit = [c for c in cases if c.name.startswith(w + "_")]
        if not hit:
            raise SystemExit(f"--case: no family shape named {w}_* (have {', '.join(c.name.split('_')[0] for c in cases)})")
        out.extend(hit)
    return out


def _call(case, dtype, fp8):
    """(plan, run) of the case's default plan on fresh inputs."""
    import cupy as cp

    import cupy_lean
    from bench import cases as C

    inp = C.build_inputs(case, dtype, 1)
    kw = inp.index_kwargs()
    out = cp.empty_like(inp.q[0])
    if fp8:  # e4m3 bytes: the high byte of each fp16 value
        inp.k[0] = cp.ascontiguousarray(inp.k[0].view(cp.uint8)[..., 1::2])
        inp.v[0] = cp.ascontiguousarray(inp.v[0].view(cp.uint8)[..., 1::2])
    p = cupy_lean.plan(inp.q[0], inp.k[0], inp.v[0], out=out, **kw, **({"kv_dtype": "e4m3"} if fp8 else {}))

    def run():
        p.run(inp.q[0], inp.k[0], inp.v[0], out=out, **kw)

    return p, run, inp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--family", type=int, required=True)
    ap.add_argument("--case", required=True, help="name prefix (f12), a comma list (f03,f07) or 'all'")
    ap.add_argument("--dtype", default=None, help="one q dtype (the single-shape mode's; default float16)")
    ap.add_argument("--dtypes", default=None, help="comma list of q dtypes (the batch mode)")
    ap.add_argument("--fp8", action="store_true", help="K/V as e4m3 bytes (the high bytes of the fp16 cache)")
    ap.add_argument("--index-out", default=None,
                    help="batch mode: write the calls' index here and bracket each call with the profiler API")
    a = ap.parse_args()
    import cupy as cp

    from bench import family as F

    cases = _pick(F.draw(a.family, a.seed), a.case)
    if a.index_out is None:
        if len(cases) != 1:
            raise SystemExit("--case: one shape without --index-out (the batch mode)")
        case = cases[0]
        p, run, _ = _call(case, a.dtype or "float16", a.fp8)
        print(case.name, f"{case.kv_bytes(1 if a.fp8 else 2) / 1e6:.1f} MB")
        print(p.describe())
        for _ in range(4):
            run()
        cp.cuda.Device().synchronize()
        return

    from cupy.cuda import runtime

    marker = cp.RawKernel(_MARKER_SRC, MARKER)
    dtypes = [d for d in (a.dtypes or a.dtype or "float16").split(",") if d]
    index = []
    for dt in dtypes:
        for case in cases:
            i = len(index) + 1
            p, run, inp = _call(case, dt, a.fp8)
            for _ in range(3):  # compile, then warm
                run()
            cp.cuda.Device().synchronize()
            runtime.profilerStart()
            marker((i,), (32,), ())
            run()
            cp.cuda.Device().synchronize()
            runtime.profilerStop()
            mb = case.kv_bytes(1 if a.fp8 else 2) / 1e6
            index.append({"index": i, "case": case.name, "dtype": dt, "fp8": a.fp8, "mb": mb,
                          "plan": p.describe()})
            print(f"{i:3d} {case.name} {dt} {mb:.1f} MB", flush=True)
            with open(a.index_out, "w") as f:  # after every call: a run that dies keeps what it profiled
                json.dump(index, f, indent=1)
            inp.free()
            del p, run, inp
            cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()

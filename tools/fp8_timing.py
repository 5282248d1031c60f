"""fp8 K/V against fp16 K/V on family shapes, lean only (the same shapes, the
same timing as the benchmark: CUDA-graph replays over rotating copies).

    python tools/fp8_timing.py --family 16 --seed S [--dtype bfloat16] [--stages 2,3] [--only 3,7]
                               [--tuning KEY=VALUE ...] [--out fp8.json]

For each shape: the time with K/V in q's dtype (fp16 by default, or bf16),
the e4m3 time (uint8 storage: the high byte of each of those values, scales
per head; q and out stay in that dtype), their ratio, and the fp8 call's
bytes per second. fp8 reads half the bytes: the target ratio is about 0.5.
``--stages``: the fp8 call also through plans of these pipeline depths (the
default spec's tile; a depth that does not fit the device is skipped), to
see how the fp8 time depends on the bytes in flight. ``--only``: only the
drawn shapes of these indices (the same shapes as in the full run).
``--tuning KEY=VALUE`` (repeatable; the value read as a Python literal):
the e4m3 call timed again with ``cupy_lean.kernels.TUNING`` changed so, in
the same process (an A/B of a switch; the next call after a change plans
anew).
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", type=int, default=16)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"), help="q, out (and the 16-bit K/V)")
    ap.add_argument("--stages", default="", help="comma-separated pipeline depths to time the fp8 call at too")
    ap.add_argument("--only", default="", help="comma-separated indices of the drawn shapes to time (default: all)")
    ap.add_argument("--tuning", action="append", default=[], metavar="KEY=VALUE",
                    help="time the e4m3 call again with kernels.TUNING[KEY] = VALUE (a Python literal)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from bench.run import parse_tuning

    tuned = parse_tuning(a.tuning)  # (SystemExit naming a bad item or key)
    only = {int(x) for x in a.only.split(",") if x.strip()}
    import cupy as cp

    import cupy_lean
    from bench import cases as C
    from bench import family as F
    from cupy_lean.bench import graph_time
    from cupy_lean.kernels import tuning

    rows = []
    for idx, case in enumerate(F.draw(a.family, a.seed)):
        if only and idx not in only:
            continue
        n_copies = C.plan_copies(case, 256e6, 30e9)
        inp = C.build_inputs(case, a.dtype, n_copies)
        kw = inp.index_kwargs()
        outs = [cp.empty_like(x) for x in inp.q]
        t16 = graph_time(lambda i: cupy_lean.attention(inp.q[i], inp.k[i], inp.v[i], out=outs[i], **kw), n_copies)
        # the high bytes (fp16: the e5m2 of the same values), timed as e4m3 (the same bytes read)
        k8 = [x.view(cp.uint8)[..., 1::2] for x in inp.k]
        v8 = [x.view(cp.uint8)[..., 1::2] for x in inp.v]
        del inp.k[:], inp.v[:]
        k8 = [cp.ascontiguousarray(x) for x in k8]
        v8 = [cp.ascontiguousarray(x) for x in v8]
        ks = cp.full(case.heads_kv, 0.5, dtype=cp.float32)

        def fp8_call(i):
            return cupy_lean.attention(inp.q[i], k8[i], v8[i], out=outs[i], kv_dtype="e4m3", k_scale=ks,
                                       v_scale=ks, **kw)

        t8 = graph_time(fp8_call, n_copies)
        t8_tuned = None
        if tuned:
            with tuning(**tuned):
                t8_tuned = graph_time(fp8_call, n_copies)
        by_stages = {}
        for st in (int(x) for x in a.stages.split(",") if x.strip()):
            try:
                p = cupy_lean.plan(inp.q[0], k8[0], v8[0], out=outs[0], kv_dtype="e4m3", stages=st, **kw)
            except ValueError as exc:  # does not fit this device's shared memory
                by_stages[st] = None
                print(f"    stages {st}: {exc}", flush=True)
                continue
            by_stages[st] = graph_time(lambda i: p.run(inp.q[i], k8[i], v8[i], out=outs[i], k_scale=ks, v_scale=ks,
                                                       **kw), n_copies)
        b8 = case.kv_bytes() / 2
        rows.append({"case": case.name, "kv_bytes_fp16": case.kv_bytes(), "fp16_us": t16, "fp8_us": t8,
                     "ratio": t8 / t16, "fp8_tbps": b8 / t8 / 1e6, "fp16_tbps": case.kv_bytes() / t16 / 1e6,
                     "fp8_us_by_stages": by_stages, "tuning": tuned or None, "fp8_us_tuned": t8_tuned})
        extra = "".join(f"  s{k} {v:.1f}" for k, v in by_stages.items() if v is not None)
        if t8_tuned is not None:
            extra += f"  tuned e4m3 {t8_tuned:.1f} us ({t8_tuned / t8:.3f}x)"
        print(f"{case.name:48s} fp16 {t16:8.1f} us ({rows[-1]['fp16_tbps']:.2f} TB/s)  e4m3 {t8:8.1f} us "
              f"({rows[-1]['fp8_tbps']:.2f} TB/s)  ratio {t8 / t16:.3f}{extra}", flush=True)
        inp.free()
        k8 = v8 = outs = None  # free before the next shape
        cp.get_default_memory_pool().free_all_blocks()
    g = math.exp(sum(math.log(r["ratio"]) for r in rows) / len(rows))
    print(f"fp8 seed {a.seed} {a.dtype}: {len(rows)} shapes; fp8 / 16-bit time geomean {g:.3f}, "
          f"min {min(r['ratio'] for r in rows):.3f}, max {max(r['ratio'] for r in rows):.3f}")
    if tuned and rows:
        ab = [r["fp8_us_tuned"] / r["fp8_us"] for r in rows]
        print(f"tuned {tuned}: e4m3 time tuned / default geomean "
              f"{math.exp(sum(math.log(x) for x in ab) / len(ab)):.3f}, min {min(ab):.3f}, max {max(ab):.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"seed": a.seed, "dtype": a.dtype, "rows": rows, "geomean_ratio": g}, f, indent=1)


if __name__ == "__main__":
    main()

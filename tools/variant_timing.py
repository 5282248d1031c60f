"""Time a few kernel configurations against the default on family shapes of
chosen head_dims (a quick check of one default before a full bench.tune).

    python tools/variant_timing.py --seed S --n 40 --head-dims 256 \
        --configs t64s3c1,t32s4c1 [--max 8] [--out FILE.json]

Prints, per shape, the default's time and each configuration's time over it
(device us from CUDA-graph replays over rotating copies), then the geomean.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(text):
    import re
    m = re.fullmatch(r"t(\d+)s(\d+)c(\d+)", text)
    if not m:
        raise SystemExit(f"--configs: expected tTILEsSTAGEScCTAS_PER_SM, got {text!r}")
    return tuple(int(x) for x in m.groups())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--n", type=int, default=40, help="family shapes drawn (then filtered)")
    ap.add_argument("--head-dims", default="256")
    ap.add_argument("--configs", required=True)
    ap.add_argument("--max", type=int, default=8, help="shapes timed at most")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import cupy as cp

    import cupy_lean
    from bench import cases as C
    from bench import family as F
    from cupy_lean.bench import graph_time

    dims = {int(x) for x in a.head_dims.split(",")}
    configs = [_config(c) for c in a.configs.split(",")]
    shapes = [c for c in F.draw(a.n, a.seed) if c.head_dim in dims][:a.max]
    rows, logs = [], {c: [] for c in configs}
    for case in shapes:
        n_copies = C.plan_copies(case, 256e6, 30e9)
        inp = C.build_inputs(case, "float16", n_copies)
        kw = inp.index_kwargs()
        outs = [cp.empty_like(q) for q in inp.q]

        def timed(cfg):
            p = cupy_lean.plan(inp.q[0], inp.k[0], inp.v[0], out=outs[0], config=cfg, **kw)
            return p, graph_time(lambda i: p.run(inp.q[i], inp.k[i], inp.v[i], out=outs[i], **kw), n_copies,
                                 repeats=5)

        p0, t0 = timed(None)
        rec = {"case": case.name, "default": f"t{p0.spec.tile}s{p0.spec.stages}c{p0.ctas_per_sm}", "us": t0}
        line = f"{case.name:52s} {rec['default']} {t0:8.1f} us"
        for c in configs:
            try:
                _, t = timed(cupy_lean.Config(tile_size=c[0], stages=c[1], ctas_per_sm=c[2]))
                rec[f"t{c[0]}s{c[1]}c{c[2]}"] = t
                logs[c].append(math.log(t / t0))
                line += f" | t{c[0]}s{c[1]}c{c[2]} {t:8.1f} ({t / t0:.3f})"
            except Exception as exc:
                line += f" | t{c[0]}s{c[1]}c{c[2]} {type(exc).__name__}: {str(exc)[:60]}"
        print(line, flush=True)
        rows.append(rec)
        inp.free()
        cp.get_default_memory_pool().free_all_blocks()
    for c, xs in logs.items():
        if xs:
            print(f"t{c[0]}s{c[1]}c{c[2]} / default: geomean {math.exp(sum(xs) / len(xs)):.3f} over {len(xs)} shapes")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"seed": a.seed, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""Time the decompositions lean can run for one shape against each other:
the default plan, one CTA per unit (``schedule="head"``), split-K with the
heuristic's and with p = 2..4 splits per unit, and stream-K on a grid of
``units x p`` CTAs (p = 1: every CTA streams one whole unit when lengths are
uniform). Family shapes drawn from a seed, fp16, device time per call from
CUDA-graph replays over rotating copies (cold L2). The data a rule choosing
among the decompositions is fitted to (and checked against on other seeds).

    python tools/grid_sweep.py --family 40 --seed S [--time-budget 240] [--out F.json]
    python tools/grid_sweep.py --report F.json [F.json ...]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import family as F  # noqa: E402
from bench.tune import family_inputs  # noqa: E402


def configs(units, full, tiles, full_cps):
    """(name, Config kwargs) to time on a shape of ``units`` units of at most
    ``tiles`` tiles, on a device whose default lean grid is ``full`` CTAs
    (``full_cps`` per SM; given explicitly, it forces stream-K)."""
    out = [("default", {}), ("stream_k", {"ctas_per_sm": full_cps}), ("head", {"schedule": "head"}),
           ("split", {"schedule": "split"})]
    for p in range(1, 7):
        if units * p > full or (p > 1 and p > tiles):
            break
        out.append((f"lean_p{p}", {"num_ctas": units * p}))
        if 2 <= p <= 4:
            out.append((f"split_p{p}", {"schedule": "split", "num_ctas": units * p}))
    if units < full:
        out.append(("lean_full", {"num_ctas": full}))
    return out


def report(paths):
    """Per shape: each decomposition's time over the default's (best first)."""
    import math

    logs = {}
    for path in paths:
        doc = json.load(open(path))
        print(f"seed {doc['seed']} ({doc['gpu']})")
        for r in doc["shapes"]:
            t = {k: v for k, v in r["times"].items() if v}
            d = t.get("default")
            if not d:
                continue
            order = sorted(t, key=t.get)
            print(f"  {r['case']:46s} {r['kv_bytes'] / 1e6:8.1f} MB units {r['units']:4d} tiles "
                  f"{r['max_unit_tiles']:5d} grid {r['default_grid']:4d}/{r['full_grid']:4d} default {d:7.1f} us | "
                  + " ".join(f"{k} {t[k] / d:.3f}" for k in order[:4]))
            for k in t:
                logs.setdefault((r["layout"] == "dense", k), []).append(math.log(t[k] / d))
    for (dense, k), v in sorted(logs.items()):
        print(f"{'dense' if dense else 'ragged/paged':13s} {k:10s} geomean over default {math.exp(sum(v) / len(v)):.3f}"
              f"  min {math.exp(min(v)):.3f}  ({len(v)} shapes)")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        return report(sys.argv[2:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", type=int, default=40)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=0.0, help="start no new shape after this many seconds")
    ap.add_argument("--layouts", default="dense,ragged,paged", help="comma-separated layouts to time")
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    import cupy as cp

    import cupy_lean
    from cupy_lean.bench import graph_time

    seed = a.seed if a.seed is not None else F.new_seed()
    shapes = [c for c in F.draw(a.family, seed) if c.layout in a.layouts.split(",")]
    doc = {"seed": seed, "family": a.family, "gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
           "shapes": []}
    for case, inp, kw, outs, n_copies in family_inputs(shapes, a.time_budget, "grid_sweep"):
        base = cupy_lean.plan(inp.q[0], inp.k[0], inp.v[0], out=outs[0], **kw)
        cps = base.kernels.ctas_per_sm
        full = cps * base.num_sms
        rec = {"case": case.name, "layout": case.layout, "head_dim": case.head_dim, "group": case.group,
               "units": base.units, "tile": base.tile, "max_unit_tiles": base.max_unit_tiles,
               "lens": list(case.lens), "kv_bytes": case.kv_bytes(), "full_grid": full,
               "default_grid": base.grid, "aligned_grid_applied": base.aligned_grid_applied, "times": {}}
        for name, cfg in configs(base.units, full, base.max_unit_tiles, cps):
            try:
                p = cupy_lean.plan(inp.q[0], inp.k[0], inp.v[0], out=outs[0], config=cupy_lean.Config(**cfg), **kw)
                rec["times"][name] = graph_time(
                    lambda i: p.run(inp.q[i], inp.k[i], inp.v[i], out=outs[i], **kw), n_copies, repeats=5)
            except Exception as exc:  # recorded, not fatal
                rec["times"][name] = None
                rec.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:200]
        t = {k: v for k, v in rec["times"].items() if v}
        best = min(t, key=t.get)
        print(f"{case.name}: default {t.get('default', float('nan')):.1f} us, best {best} {t[best]:.1f} us",
              flush=True)
        doc["shapes"].append(rec)
    out = a.out or f"grid_sweep_{seed}.json"
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"grid_sweep: wrote {out}")


if __name__ == "__main__":
    main()

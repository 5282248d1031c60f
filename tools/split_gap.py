"""Where the launch-time split-K loses time against the same chunks planned
on the host. For family shapes where a lean plan has the merge launch, the
default plan is built with the launch-time split forced on (its slack set to
``--slack-kb`` of K and V, so the kernel splits) and compared with
``schedule="split"`` at the same grid, tile and stages (the same chunks per
unit). Both are compiled with phase timestamps (``tools/timeline.py``): the
attention kernel's CTAs and the combine launch's blocks (start, the wait for
the attention kernel, its unit's record read, end), for the last call of a
CUDA-graph replay over rotating copies.

    python tools/split_gap.py --seed S [--shapes 8] [--max-mb 80] [--max-units 44] [--slack-kb 4096]
                              [--define NAME=VALUE] [--out F.json]
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timeline as T  # noqa: E402  (tools/, beside this script)


def combine_summary(ct, t0):
    """The combine blocks' stamps relative to the attention kernel's first
    start ``t0`` (us): min / median / max of start, waited, record read, end
    and, inside the merge (thread 0's first row pass), the first round of
    state loads in, every state absorbed, the lanes merged, the row stored."""
    ct = ct.astype(np.int64)
    live = ct[:, 0] > 0
    if not live.any():
        return {}
    out = {"blocks": int(live.sum())}
    for k, name in enumerate(("c_start", "c_waited", "c_meta", "c_end", "c_loaded", "c_absorbed", "c_lanes",
                              "c_stored")[:ct.shape[1]]):
        col = ct[live, k]
        col = col[col > 0] - t0
        if len(col):
            out[name] = [float(np.min(col)) / 1e3, float(np.median(col)) / 1e3, float(np.max(col)) / 1e3]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--shapes", type=int, default=8)
    ap.add_argument("--max-mb", type=float, default=80.0)
    ap.add_argument("--min-units", type=int, default=0)
    ap.add_argument("--max-units", type=int, default=44)
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--slack-kb", type=int, default=4096, help="launch-time split slack (KB of K and V)")
    ap.add_argument("--define", action="append", default=[],
                    help="NAME=VALUE: one more -D option for the kernels (e.g. LEAN_WARM_PARAMS=0)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import cupy as cp

    import cupy_lean
    from bench.tune import family_inputs
    from cupy_lean import _cache
    from cupy_lean import kernels as K
    from cupy_lean.bench import graph_time
    from spec_sweep import family_shapes

    T.instrument()
    if a.define:
        stamped = K.compile_options

        def with_defines(spec):
            opts = stamped(spec)
            return opts + tuple(f"-D{d}" for d in a.define) if spec is not None else opts

        K.compile_options = with_defines
    K.TUNING["runtime_split_slack_bytes"] = a.slack_kb * 1024
    K.TUNING["uniform_variants"] = False  # equal lengths too: the stream-K kernel, not a host-planned variant
    K.TUNING["merge_launch_pieces"] = 1  # the merge launch (and so the launch-time split) at any CTAs per unit
    _cache.clear()
    shapes = family_shapes(a.shapes, a.seed, [int(x) for x in a.head_dims.split(",")],
                           ["dense", "ragged", "paged"], a.max_mb, 0, a.max_units, a.min_units)
    rows = []
    for case, inp, idx, outs, n_copies in family_inputs(shapes, 0, "split_gap"):
        row = {"case": case.name, "units": case.batch * case.heads_kv, "kv_bytes": case.kv_bytes()}
        for name, kw in (("launch", {}), ("host", None)):
            try:
                if kw is None:  # the same grid, tile and stages, split on the host
                    ref = row["plans"]["launch"]
                    kw = {"schedule": "split", "num_ctas": ref["grid"], "tile_size": ref["tile"],
                          "stages": ref["stages"]}
                pl = cupy_lean.plan(inp.q[0], inp.k[0], inp.v[0], out=outs[0], **idx, **kw)
                mod = K.kernels_for(pl.spec).module
                tl = cp.ndarray((T.MAX_CTAS, T.WIDTH), cp.uint64, mod.get_global("lean_timeline"))
                ct = cp.ndarray((T.MAX_CTAS, 8), cp.uint64, mod.get_global("lean_ctimeline"))
                n_calls = max(20, n_copies)
                seen = [0]

                def call(i, pl=pl, tl=tl, ct=ct):
                    seen[0] += 1
                    if seen[0] == n_calls + 1:  # zeroed in the graph before its last call
                        tl.fill(0)
                        ct.fill(0)
                    pl.run(inp.q[i], inp.k[i], inp.v[i], out=outs[i], **idx)

                us = graph_time(call, n_copies, n_calls=n_calls, repeats=5)
                t = cp.asnumpy(tl)
                s = T.summary(t, pl.grid)
                t0 = int(t[:pl.grid, 0][t[:pl.grid, 0] > 0].min())
                s.update(combine_summary(cp.asnumpy(ct), t0))
                s.update(call_us=us, grid=pl.grid, tile=pl.tile, stages=pl.spec.stages, spec=pl.spec.name,
                         merge_launch=bool(pl.merge_launch), runtime_split=bool(pl.runtime_split))
                row.setdefault("plans", {})[name] = s
            except Exception as exc:
                row.setdefault("plans", {})[name] = {"error": str(exc)}
        rows.append(row)
        la, ho = row["plans"].get("launch", {}), row["plans"].get("host", {})
        print(f"{case.name:40s} units {row['units']:3d} {row['kv_bytes'] / 1e6:6.1f} MB", flush=True)
        for name, s in (("launch", la), ("host", ho)):
            if "error" in s or "call_us" not in s:
                print(f"   {name}: {s}")
                continue
            crit = dict(zip(T.PHASES, s["critical_cta"]))
            cend = s.get("c_end", [0, 0, 0])
            print(f"   {name:6s} {s['call_us']:6.2f} us/call  grid {s['grid']} {s['spec']}  attn span "
                  f"{s['span_us']:.2f}  found med/max {s['found'][1]:.2f}/{s['found'][2]:.2f}  "
                  f"tile0 med {s['tile0'][1]:.2f}  crit end {crit.get('end', -1):.2f}  "
                  + "".join(f"{k} med {s[k][1]:.2f}  " for k in ("scanned", "made", "decided", "wait_us") if k in s)
                  + (f"combine start {s['c_start'][0]:.2f}/{s['c_start'][2]:.2f} waited {s['c_waited'][0]:.2f}/"
                     f"{s['c_waited'][2]:.2f} meta max {s['c_meta'][2]:.2f} end {cend[1]:.2f}/{cend[2]:.2f}"
                     + "".join(f" {k[2:]} med {s[k][1]:.2f}" for k in ("c_loaded", "c_absorbed", "c_lanes", "c_stored")
                               if k in s)
                     if "c_start" in s else "no combine"), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"seed": a.seed, "shapes": rows}, f, indent=1)


if __name__ == "__main__":
    main()

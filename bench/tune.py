"""Measure kernel configurations over family shapes, and check the package's
default rules against the measurements.

    python -m bench.tune measure --family 40 [--seed S] [--groups 1 16] [--out bench/results/tune_S.json]
    python -m bench.tune fit bench/results/tune_*.json

``measure`` draws shapes from the family (bench/family.py), and times every
configuration that fits the device (tile size x pipeline stages x CTAs per
SM, plus the split schedule; with the default tile and stages also
``min_tiles_per_cta`` and ``merge_balance`` variants) on each, with the same
timing as the benchmark (CUDA-graph replays over rotating input copies, cold
L2). One JSON file per run: the shapes, their features (head_dim, query
tiles, paged, units, tiles, K/V bytes) and the time of every configuration.

``fit`` reads such files and prints, per group of shapes (head_dim, query
tiles, paged, small/large), the configuration with the best geometric mean
of (time / the shape's best time), then scores the package's rules on every
shape: the default (tile, stages) of ``kernels.default_config`` and the
merge balance ``a`` of ``kernels.TUNING`` (each candidate ``a`` scored; the
range floor it implies is looked up at the nearest measured
``min_tiles_per_cta`` below it). The package's constants are chosen from this
output, one rule for all shapes, never one per shape; run ``measure`` on
fresh seeds before trusting it: a rule fitted to the shapes it is judged on
is a defect.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cases as C  # noqa: E402
from bench import family as F  # noqa: E402

SMALL_BYTES = 64e6  # below this a call is "small": fixed costs and the reduction tail dominate
STAGES = (2, 3, 4)
CTAS_PER_SM = (1, 2)
MIN_TILES = (2, 3, 4, 8, 16)  # tried with the default tile and stages, merge balance off
MERGE_BALANCE = (1, 2, 4)  # tried with the default tile and stages


def configs_for(spec_args, smem_limit, sm_smem=None):
    """Every (schedule, tile, stages, ctas_per_sm, min_tiles_per_cta,
    merge_balance) for a spec of ``spec_args`` = (dtype, head_dim, group,
    paged) whose CTA fits ``smem_limit`` (per block) and whose CTAs per SM fit
    ``sm_smem`` (per SM, 1 KB of it reserved per CTA; default: the block limit
    + 1 KB). Lean configurations run with the merge balance off unless they
    name one."""
    from cupy_lean import kernels as K

    dtype, d, group, paged = spec_args
    out = [("split", None, None, None, 1, 0)]
    try:
        default = K.make_spec(dtype, d, group, paged, smem_limit=smem_limit)
    except ValueError:  # nothing fits this device
        return out
    for tile, stages, cps in itertools.product(K.TILE_SIZES, STAGES, CTAS_PER_SM):
        try:
            s = K.make_spec(dtype, d, group, paged, tile, stages, smem_limit=smem_limit)
        except ValueError:
            continue
        if cps * (s.smem_bytes + 1024) > (sm_smem or smem_limit + 1024):
            continue
        out.append(("lean", tile, stages, cps, 1, 0))
        if (tile, stages) == (default.tile, default.stages):
            out += [("lean", tile, stages, cps, m, 0) for m in MIN_TILES]
            out += [("lean", tile, stages, cps, 1, a) for a in MERGE_BALANCE]
    return out


def config_name(cfg):
    sched, tile, stages, cps, mt, mb = cfg
    if sched != "lean":
        return sched
    return f"lean_t{tile}_s{stages}_c{cps}" + (f"_m{mt}" if mt > 1 else "") + (f"_b{mb}" if mb else "")


def parse_name(name):
    """(schedule, tile, stages, ctas_per_sm, min_tiles_per_cta, merge_balance) of a name."""
    if name == "split":
        return ("split", None, None, None, 1, 0)
    parts = name.split("_")[1:]
    vals = {p[0]: int(p[1:]) for p in parts}
    return ("lean", vals["t"], vals["s"], vals["c"], vals.get("m", 1), vals.get("b", 0))


def features(case):
    mt = 1
    while mt * 16 < case.group:
        mt *= 2
    return {"head_dim": case.head_dim, "m_tiles": mt, "paged": case.layout == "paged",
            "units": case.batch * case.heads_kv, "kv_bytes": case.kv_bytes(),
            "group": case.group, "layout": case.layout, "page_size": case.page_size}


def group_key(feat):
    return (feat["head_dim"], feat["m_tiles"], bool(feat["paged"]),
            "small" if feat["kv_bytes"] < SMALL_BYTES else "large")


def family_inputs(shapes, time_budget, label):
    """For each shape in turn: ``(case, inputs, index kwargs, outputs,
    copies)``, fp16 with enough rotating copies of K and V (~256 MB) that a
    graph replay over them reads from DRAM; a shape's arrays are freed when
    the next one is asked for. Stops, saying so, once ``time_budget``
    seconds (0: no limit) have passed."""
    import cupy as cp

    t0 = time.time()
    for i, case in enumerate(shapes):
        if time_budget and time.time() - t0 > time_budget:
            print(f"{label}: time budget reached after {i} shapes", flush=True)
            return
        n_copies = C.plan_copies(case, 256e6, 30e9)
        inp = C.build_inputs(case, "float16", n_copies)
        outs = [cp.empty_like(q) for q in inp.q]
        yield case, inp, inp.index_kwargs(), outs, n_copies
        inp.free()
        inp = outs = None  # free before the next shape
        cp.get_default_memory_pool().free_all_blocks()


def measure(args):
    import cupy as cp

    import cupy_lean
    from cupy_lean import kernels as K
    from cupy_lean.bench import graph_time

    seed = args.seed if args.seed is not None else F.new_seed()
    print(f"tune: {args.family} shapes, seed {seed}", flush=True)
    shapes = F.draw(args.family, seed, tuple(args.groups))
    if args.head_dims:
        dims = {int(x) for x in args.head_dims.split(",")}
        shapes = [c for c in shapes if c.head_dim in dims]
    only = set(args.configs.split(",")) if args.configs else None
    limit = K.device_smem_limit()
    sm_smem = int(cp.cuda.Device().attributes["MaxSharedMemoryPerMultiprocessor"])
    doc = {"seed": seed, "family": args.family, "smem_limit": limit,
           "gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "shapes": []}
    for case, inp, kw, outs, n_copies in family_inputs(shapes, args.time_budget, "tune"):
        rec = {"case": case.name, "features": features(case), "lens": list(case.lens), "times": {}}
        default = cupy_lean.plan(inp.q[0], inp.k[0], inp.v[0], out=outs[0], **kw)
        # the stream-K configuration of the default spec (a default plan of equal lengths may run split-K:
        # schedule.uniform_variant; the configurations timed here name ctas_per_sm, so stream-K)
        rec["default"] = f"lean_t{default.spec.tile}_s{default.spec.stages}_c{default.kernels.ctas_per_sm}" + (
            f"_b{default.merge_balance}" if default.merge_balance else "")
        for c in configs_for(("f16", case.head_dim, case.group, case.layout == "paged"), limit, sm_smem):
            if only is not None and config_name(c) not in only | {rec["default"]}:
                continue
            sched, tile, stages, cps, mt, mb = c
            cfg = cupy_lean.Config(schedule=sched, tile_size=tile, stages=stages, ctas_per_sm=cps,
                                   min_tiles_per_cta=mt if mt > 1 else None, merge_balance=mb)
            name = config_name(c)
            try:
                p = cupy_lean.plan(inp.q[0], inp.k[0], inp.v[0], out=outs[0], config=cfg, **kw)
                us = graph_time(lambda i: p.run(inp.q[i], inp.k[i], inp.v[i], out=outs[i], **kw), n_copies,
                                repeats=5)
            except Exception as exc:  # a configuration that cannot run is recorded, not fatal
                rec["times"][name] = None
                rec.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            rec["times"][name] = us
        best = min((t, n) for n, t in rec["times"].items() if t)
        print(f"  {case.name}: best {best[1]} {best[0]:.1f} us, default {rec['default']} "
              f"{rec['times'].get(rec['default']) or float('nan'):.1f} us", flush=True)
        doc["shapes"].append(rec)
    out = args.out or os.path.join("bench", "results", f"tune_{seed}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"tune: wrote {out}")
    return 0


def fit(docs):
    """The configuration table: ``{group_key: (config name, geomean ratio,
    shapes)}`` from measurement documents."""
    groups = {}
    for doc in docs:
        for rec in doc["shapes"]:
            times = {n: t for n, t in rec["times"].items() if t}
            if not times:
                continue
            best = min(times.values())
            groups.setdefault(group_key(rec["features"]), []).append({n: t / best for n, t in times.items()})
    table = {}
    for key, ratios in groups.items():
        names = set.intersection(*(set(r) for r in ratios))  # measured on every shape of the group
        if not names:
            continue
        score = {n: math.exp(sum(math.log(r[n]) for r in ratios) / len(ratios)) for n in names}
        name = min(score, key=lambda n: (score[n], n))
        table[key] = (name, score[name], len(ratios))
    return table


def _geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def score_rules(docs, balances=(0, 1, 2, 4, 8)):
    """The package's rules scored on measured shapes: ``{"default_tile":
    {head_dim: (geomean, max, shapes)}, "merge_balance": {a: (geomean, max,
    shapes)}}``, each a ratio of the rule's time to the shape's best time.

    The default (tile, stages) is scored with the merge balance off (the
    plain configuration of that name). A merge balance ``a`` implies a range
    floor of ``merge_balanced_tiles(longest unit's tiles, a, rows, tile)``
    tiles; it is scored at the largest measured ``min_tiles_per_cta`` variant
    of the default (tile, stages) not above that floor."""
    from cupy_lean import kernels as K
    from cupy_lean.schedule import merge_balanced_tiles

    tiles, bal = {}, {a: [] for a in balances}
    for doc in docs:
        for rec in doc["shapes"]:
            times = {n: t for n, t in rec["times"].items() if t}
            feat = rec["features"]
            if not times or "lens" not in rec:
                continue
            best = min(times.values())
            spec = K.make_spec("f16", feat["head_dim"], feat["group"], feat["paged"],
                               smem_limit=doc.get("smem_limit", K.DEFAULT_SMEM_LIMIT))
            base = f"lean_t{spec.tile}_s{spec.stages}_c1"
            if base not in times:
                continue
            tiles.setdefault(feat["head_dim"], []).append(times[base] / best)
            variants = {1: times[base]}
            variants.update({m: times[f"{base}_m{m}"] for m in MIN_TILES if f"{base}_m{m}" in times})
            longest = max(-(-x // spec.tile) for x in rec["lens"])
            for a in balances:
                floor = merge_balanced_tiles(longest, a, 16 * spec.m_tiles, spec.tile) if a else 1
                m = max(x for x in variants if x <= floor)
                bal[a].append(variants[m] / best)
    return {"default_tile": {d: (_geomean(r), max(r), len(r)) for d, r in sorted(tiles.items())},
            "merge_balance": {a: (_geomean(r), max(r), len(r)) for a, r in bal.items() if r}}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="time every fitting configuration on family shapes (needs a GPU)")
    m.add_argument("--family", type=int, default=30, metavar="N")
    m.add_argument("--seed", type=int, default=None)
    m.add_argument("--out", default=None)
    m.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS")
    m.add_argument("--groups", type=int, nargs=2, default=(1, 16), metavar=("LOW", "HIGH"),
                   help="range of query heads per KV head to draw (default: the family's 1 16)")
    m.add_argument("--head-dims", default="", help="comma-separated: time only the drawn shapes of these head_dims")
    m.add_argument("--configs", default="",
                   help="comma-separated configuration names (e.g. lean_t64_s3_c1): time only these and the "
                        "default")
    f = sub.add_parser("fit", help="best configuration per group, and the package's rules scored")
    f.add_argument("files", nargs="+")
    a = ap.parse_args(argv)
    if a.cmd == "measure":
        return measure(a)
    docs = []
    for path in a.files:
        with open(path) as fh:
            docs.append(json.load(fh))
    table = fit(docs)
    print("best configuration per group (geomean of time / best time over its shapes):")
    for key in sorted(table):
        name, score, n = table[key]
        print(f"  {key}: {name}  ({score:.3f}, {n} shapes)")
    from cupy_lean import kernels as K

    rules = score_rules(docs)
    print("the package's default (tile, stages), merge balance off, by head_dim (geomean, max of time / best):")
    for d, (g, mx, n) in rules["default_tile"].items():
        print(f"  head_dim {d}: {g:.3f}, max {mx:.2f} ({n} shapes)")
    print(f"merge balance a (the package uses {K.TUNING['merge_balance']}), all shapes:")
    for bal, (g, mx, n) in rules["merge_balance"].items():
        print(f"  a = {bal}: {g:.3f}, max {mx:.2f} ({n} shapes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

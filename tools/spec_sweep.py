"""Time kernel configurations (tile size, CTAs per SM, decomposition) on
dense decode shapes of many units: 0.8x to 5x as many units as SMs
(``--units``), where
one CTA per unit may need several waves and stream-K cuts nearly every
unit. For each shape: lean's default plan, tile sizes 128 (the default
tile of head_dim 64 and 128 outside kernels.many_unit_config's rules), 64
and 32 (more CTAs per SM fit), one CTA per unit at each tile size, and
PyTorch SDPA's cuDNN backend when torch is there. Device time per call from
CUDA-graph replays over rotating copies (cold L2), fp16. The data
many_unit_config's rules were fitted to; check them on other seeds, never
tune per shape.

    python tools/spec_sweep.py --shapes 12 --seed S [--head-dims 64,128] [--lengths 300,2000]
                               [--max-mb 400] [--sm-fraction 0.7,0.9] [--time-budget 200] [--out F.json]
    python tools/spec_sweep.py --family --layouts paged,ragged --max-mb 60 --shapes 12 --seed S ...

With ``--family`` the shapes come from the benchmark's family instead
(``bench.family.draw``; ragged and paged ones get their ``kv_lens`` and
``block_table``), e.g. the small paged calls where fixed costs dominate.

Also times tile 64 at 3 and tile 32 at 4 CTAs per SM and one CTA per SM
(``sk``; all three stream-K), the split-K schedule's own chunk count
(``split``) and split-K with as many chunks per unit as fit the SMs in one
wave (``split_sms``); with ``--family`` also tile 64 at one CTA per SM and
a stream-K grid of half the SMs. ``--configs a,b,...`` times only those.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cases as C  # noqa: E402
from bench.tune import family_inputs  # noqa: E402

CONFIGS = [("default", {}), ("t128", {"tile_size": 128}), ("t64", {"tile_size": 64}), ("t32", {"tile_size": 32}),
           ("head", {"schedule": "head"}), ("head_t64", {"schedule": "head", "tile_size": 64}),
           ("head_t32", {"schedule": "head", "tile_size": 32}),
           ("t64_c3", {"tile_size": 64, "ctas_per_sm": 3}), ("t32_c4", {"tile_size": 32, "ctas_per_sm": 4}),
           ("sk", {"ctas_per_sm": 1}), ("split", {"schedule": "split"}), ("split_sms", "split_sms")]
# with --family also: tile 64 at one CTA per SM, a stream-K grid of half the SMs
FAMILY_CONFIGS = [("t64_c1", {"tile_size": 64, "ctas_per_sm": 1}), ("half", "half")]
# the default plan with kernels.TUNING["merge_launch_pieces"] set: stream-K's partial units merged by a
# combine launch whenever the grid has a CTA per unit ("sk_launch") or never ("sk_inkernel")
TUNING_CONFIGS = {"sk_launch": {"merge_launch_pieces": 1}, "sk_inkernel": {"merge_launch_pieces": 0},
                  "sk_launch2": {"merge_launch_pieces": 2}, "sk_launch4": {"merge_launch_pieces": 4},
                  "sk_nosplit": {"runtime_split": False},  # no launch-time choice of split-K
                  # the launch-time split also without the merge launch (its chunks merged in the kernel):
                  # the default since session 26; sk_split_off is the stream-K it replaced
                  "sk_split_inkernel": {"runtime_split_in_kernel": True},
                  "sk_split_off": {"runtime_split_in_kernel": False},
                  "sk_split_inkernel_all": {"runtime_split_in_kernel": True, "merge_launch_pieces": 0},
                  # the launch-time split always taken where a plan has it (slack beyond any batch)
                  "sk_split_force": {"runtime_split_slack_bytes": 1 << 40},
                  # the in-kernel split's rule with factor 1 and no slack (the default before session 27 had
                  # factor 1 and one tile; time it from sk_split_force / sk_split_off by the rule)
                  "sk_scale1": {"runtime_split_in_kernel_scale": 1},
                  # the in-kernel split's factor without its byte cap (the rule of sessions 27-31)
                  "sk_nocap": {"runtime_split_in_kernel_cap_bytes": 1 << 62},
                  # no L2 prefetch of the launch-time split's first tiles during the scan (sm_90+)
                  # (dense layouts; the paged_ ones set the key of paged caches, off by default)
                  "sk_no_prefetch": {"split_prefetch": 0}, "sk_prefetch_lines": {"split_prefetch": 1},
                  "sk_prefetch_bulk": {"split_prefetch": 2},
                  "sk_paged_prefetch_lines": {"split_prefetch_paged": 1},
                  "sk_paged_prefetch_bulk": {"split_prefetch_paged": 2},
                  "sk_force_no_prefetch": {"runtime_split_slack_bytes": 1 << 40, "split_prefetch": 0},
                  # equal-length plans: schedule.uniform_variant's saturation step (the model before the measured
                  # rates, the default since 2026-12-06) at a fraction of the grid (0.8 its last value; 0.7 before)
                  "sat06": {"uniform_model": "saturation", "uniform_saturation": 0.6},
                  "sat07": {"uniform_model": "saturation", "uniform_saturation": 0.7},
                  "sat08": {"uniform_model": "saturation", "uniform_saturation": 0.8},
                  "sat09": {"uniform_model": "saturation", "uniform_saturation": 0.9}}
CONFIGS += [(name, "tuning") for name in TUNING_CONFIGS]


def draw(n, seed, num_sms, head_dims=(64, 128, 256), lengths=(300, 2000), units_per_sm=(0.8, 5.0), max_mb=400.0,
         sm_fraction=None):
    """``n`` dense shapes: units (batch x KV heads) from ``units_per_sm[0]`` to
    ``units_per_sm[1]`` times the SMs (default 0.8x to 5x),
    lengths in ``lengths`` (multiples of nothing), at most ``max_mb`` MB of K and V
    (the batch cut to fit), every head_dim, groups 1-16. ``sm_fraction``
    (LOW, HIGH): keep only shapes whose split of ``num_sms // units`` chunks
    per unit would occupy that fraction of the SMs, ``LOW <= (num_sms // units) x
    units / num_sms < HIGH`` (drawing on until ``n`` are found): the regime where
    the equal-length model weighs a split on part of the GPU against stream-K."""
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while len(out) < n and i < 1000 * max(n, 1):
        d = int(rng.choice(list(head_dims)))
        g = int(rng.integers(1, 17))
        units = int(rng.integers(max(1, int(units_per_sm[0] * num_sms)), max(2, int(units_per_sm[1] * num_sms))))
        hkv = int(rng.choice([1, 2, 3, 4, 5, 8, 12]))
        nlen = int(rng.integers(*lengths)) | 1
        b = max(1, min(units // hkv, int(max_mb * 1e6 // (nlen * hkv * d * 4))))  # at most max_mb of K/V
        i += 1
        if sm_fraction is not None:
            u = b * hkv
            if u > num_sms or not sm_fraction[0] <= (num_sms // u) * u / num_sms < sm_fraction[1]:
                continue
        out.append(C.Case(f"s{len(out):02d}_b{b}_h{hkv * g}x{hkv}_d{d}_{nlen}", b, hkv * g, hkv, d, (nlen,) * b,
                          "dense", "sweep"))
    return out


def family_shapes(n, seed, head_dims, layouts, max_mb, max_batch=0, max_units=0, min_units=0, draw_size=20,
                  only=(), min_mb=0.0, max_group=0):
    """The first ``n`` shapes of the benchmark's family (``bench.family.draw``,
    any layout) from ``seed`` with a head_dim in ``head_dims``, a layout in
    ``layouts`` ("dense", "ragged", "paged"), at most ``max_mb`` MB of K
    and V (0: any), at least ``min_mb``, at most ``max_batch`` sequences, at least ``min_units`` and at most ``max_units`` units
    (batch x KV heads; 0: any), drawn ``draw_size``
    at a time from ``seed``, ``seed + 1``, ... (``bench.run --family N --seed S``'s
    shapes are the draw of ``draw_size=N`` from ``S``); ``only``: names (e.g. "f28")
    of which a shape's name must contain one (empty: any); ``max_group``: at most this many query heads per
    KV head (0: any)"""
    import dataclasses

    from bench import family as F

    bad = sorted(set(layouts) - set(F.LAYOUTS))
    if bad:
        raise ValueError(f"layouts: expected some of {F.LAYOUTS}, got {bad}")
    out, s = [], seed
    while len(out) < n and s < seed + 1000:
        out += [dataclasses.replace(c, name=f"s{s}_{c.name}") for c in F.draw(draw_size, s)  # seed_family name
                if c.head_dim in head_dims and c.layout in layouts and (not max_mb or c.kv_bytes() <= max_mb * 1e6)
                and c.kv_bytes() >= min_mb * 1e6
                and (not max_batch or c.batch <= max_batch)
                and (not max_units or c.batch * c.heads_kv <= max_units)
                and c.batch * c.heads_kv >= min_units
                and (not max_group or c.heads_q // c.heads_kv <= max_group)
                and (not only or any(f"{o}_" in c.name + "_" for o in only))]
        s += 1
    return out[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", type=int, default=12)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds; start no new shape after it")
    ap.add_argument("--out", default=None)
    ap.add_argument("--head-dims", default="64,128,256", help="comma-separated")
    ap.add_argument("--lengths", default="300,2000", help="LOW,HIGH: the range of the lengths drawn")
    ap.add_argument("--units", default="0.8,5", help="LOW,HIGH: units drawn per SM (dense shapes)")
    ap.add_argument("--family", action="store_true",
                    help="shapes of the benchmark's family (ragged and paged too) instead of many-unit dense ones")
    ap.add_argument("--layouts", default="dense,ragged,paged", help="with --family: comma-separated")
    ap.add_argument("--max-mb", type=float, default=0.0,
                    help="at most this much K and V read (0: any with --family, 400 MB without)")
    ap.add_argument("--sm-fraction", default="",
                    help="LOW,HIGH, without --family: only shapes whose split of SMs // units chunks per unit "
                         "occupies that fraction of the SMs")
    ap.add_argument("--min-mb", type=float, default=0.0, help="with --family: at least this many MB of K and V")
    ap.add_argument("--max-batch", type=int, default=0, help="with --family: at most this many sequences (0: any)")
    ap.add_argument("--max-units", type=int, default=0, help="with --family: at most this many units (0: any)")
    ap.add_argument("--min-units", type=int, default=0, help="with --family: at least this many units")
    ap.add_argument("--max-group", type=int, default=0, help="with --family: at most this many query heads per KV head")
    ap.add_argument("--draw", type=int, default=20, help="with --family: shapes per draw (a family run's N)")
    ap.add_argument("--only", default="", help="with --family: comma-separated shape names (f28,f05) to keep")
    ap.add_argument("--configs", default="", help="comma-separated names of the configurations to time (default: all)")
    a = ap.parse_args()
    known = [n for n, _ in CONFIGS + (FAMILY_CONFIGS if a.family else [])]
    unknown = sorted(set(a.configs.split(",")) - set(known)) if a.configs else []
    if unknown:
        ap.error(f"--configs: expected names among {known}, got {unknown}")
    import cupy as cp

    import cupy_lean
    from cupy_lean import kernels as K
    from bench import peers as P
    from bench.timing import calls_per_graph, graph_time_cupy, graph_time_torch

    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    try:
        sdpa = P.Sdpa("sdpa-cudnn")
        P.import_torch()
    except Exception as exc:  # no torch: lean only
        print(f"sdpa-cudnn: skipped ({exc})")
        sdpa = None
    rows = []
    dims = [int(x) for x in a.head_dims.split(",")]
    if a.family:
        shapes = family_shapes(a.shapes, a.seed, dims, a.layouts.split(","), a.max_mb, a.max_batch,
                               a.max_units, a.min_units, a.draw, [o for o in a.only.split(",") if o], a.min_mb,
                               a.max_group)
    else:
        shapes = draw(a.shapes, a.seed, sms, dims, tuple(int(x) for x in a.lengths.split(",")),
                      tuple(float(x) for x in a.units.split(",")), a.max_mb or 400.0,
                      tuple(float(x) for x in a.sm_fraction.split(",")) if a.sm_fraction else None)
    for case, inp, idx, outs, n_copies in family_inputs(shapes, a.time_budget, "spec_sweep"):
        row = {"case": case.name, "units": case.batch * case.heads_kv, "kv_bytes": case.kv_bytes(), "times": {},
               "plans": {}}
        for name, kw in CONFIGS + (FAMILY_CONFIGS if a.family else []):
            if a.configs and name not in a.configs.split(","):
                continue
            if kw == "half":
                kw = {"num_ctas": sms // 2}
            elif kw == "split_sms":  # split-K, floor(SMs / units) chunks per unit
                kw = {"schedule": "split", "num_ctas": max(sms, row["units"])}
            changes = {}
            if kw == "tuning":  # the default plan built under another tuning value
                changes, kw = dict(TUNING_CONFIGS[name]), {}
            try:
                with K.tuning(**changes):  # a plan keeps the values it was made under
                    p = cupy_lean.plan(inp.q[0], inp.k[0], inp.v[0], out=outs[0], **idx, **kw)
                call = lambda i, p=p: p.run(inp.q[i], inp.k[i], inp.v[i], out=outs[i], **idx)  # noqa: E731
                call(0)
                est = graph_time_cupy(call, n_copies, n_copies)["median_us"]
                row["times"][name] = graph_time_cupy(call, n_copies, calls_per_graph(n_copies, est))["median_us"]
                row["plans"][name] = " | ".join(x.strip() for x in p.describe().splitlines()[1:4])
            except Exception as exc:
                row["times"][name] = None
                row["plans"][name] = f"error: {exc}"
        if sdpa is not None and case.layout == "dense":  # SDPA takes dense batches only
            try:
                bnd = sdpa.setup(inp)
                with bnd.context():
                    est = graph_time_torch(bnd.graph_call, n_copies, n_copies)["median_us"]
                    row["times"]["sdpa-cudnn"] = graph_time_torch(bnd.graph_call, n_copies,
                                                                  calls_per_graph(n_copies, est))["median_us"]
                bnd.release()
            except Exception as exc:
                row["times"]["sdpa-cudnn"] = None
                row["plans"]["sdpa-cudnn"] = f"error: {exc}"
        t = {k: v for k, v in row["times"].items() if v}
        d = t.get("default")
        rest = sorted(t.items(), key=lambda kv: kv[1])
        print(f"{case.name:34s} units {row['units']:4d} {row['kv_bytes'] / 1e6:7.1f} MB "
              + (f"default {d:6.1f} us | " + " ".join(f"{k} {v / d:.3f}" for k, v in rest) if d else
                 "default failed | " + " ".join(f"{k} {v:.1f} us" for k, v in rest)), flush=True)
        rows.append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"seed": a.seed, "draw": a.draw, "gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
                       "shapes": rows}, f, indent=1)


if __name__ == "__main__":
    main()

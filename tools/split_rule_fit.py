"""Fit the launch-time split's rule (``kernels.TUNING
["runtime_split_in_kernel_scale"]`` and the merge launch's) from sweeps.

Input: ``tools/spec_sweep.py --family --layouts ragged,paged --configs
default,sk_split_off,sk_split_force[,split]`` JSON files, or the compact file
this script writes (``--save``). Each shape is rebuilt from its seed on the
CPU (``spec_sweep.family_shapes``) to get what the kernel's rule sees: the
grid, stream-K's busiest CTA's tiles (``per``), the chunks per unit of the
split (``ns = grid // units``) and the longest unit's chunk. For every factor
``m`` and slack ``k`` of the form ``chunk <= m x per + k`` it prints, per path
(merge launch / in-kernel merge) and per half of the seeds, the geometric
mean of the chosen time over stream-K's (``sk_split_off``), how many shapes
the rule makes more than 2% slower, and the best per-shape choice's mean;
then, for the in-kernel merge, the factor 2 with a cap of ``c`` bytes of K and
V in whole tiles, ``chunk <= min(2 x per, per + c / tile bytes)``
(``kernels.TUNING["runtime_split_in_kernel_cap_bytes"]``), by size class.

    python tools/split_rule_fit.py sweep1.json [sweep2.json ...] [--save compact.json]
    python tools/split_rule_fit.py bench/results/split_rule_h100_s27.json
"""

import argparse
import itertools
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cupy_lean.__main__ import _default_ctas_per_sm  # noqa: E402
from cupy_lean.kernels import TUNING, make_spec, varied_length_tile  # noqa: E402
from cupy_lean.schedule import _stream_k_ctas, merges_by_launch, _split_rule_allows  # noqa: E402

TIMES = ("sk_split_off", "sk_split_force")


def features(case):
    """What the kernel's rule sees for a family ``case`` on the default fp16
    plan of an H100 (132 SMs): path, per, ns, the longest unit's chunk."""
    g = case.heads_q // case.heads_kv
    lens = list(case.lens)
    tile = None
    if len(lens) > 1:
        tile = varied_length_tile(case.head_dim, g, 0, lambda t: _default_ctas_per_sm(
            make_spec("f16", case.head_dim, g, False, t), capped=False))
    spec = make_spec("f16", case.head_dim, g, False, tile)
    units = len(lens) * case.heads_kv
    longest = -(-max(lens) // spec.tile)
    # the plan's grid: at most one CTA per tile of the cache's capacity (max length rounded up to the page)
    grid = max(1, min(_default_ctas_per_sm(spec) * 132, units * -(-case.capacity // spec.tile)))
    total = int((-(-np.array(lens) // spec.tile)).sum()) * case.heads_kv
    per = -(-total // _stream_k_ctas(total, grid, 1))
    ns = grid // units
    return dict(units=units, tile=spec.tile, tile_bytes=4 * spec.tile * case.head_dim, grid=grid, total=total,
                longest=longest, per=per, ns=ns,
                chunk=-(-longest // ns) if ns else 0,
                launch=bool(merges_by_launch(grid, units, TUNING["merge_launch_pieces"])))


def load(paths):
    """Rows of every shape with both times (compact files as they are)."""
    from spec_sweep import family_shapes

    rows = []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        if "rows" in doc:  # a compact file
            rows += doc["rows"]
            continue
        # every ragged or paged shape of the seeds the sweep drew from (at any size), by name
        by = {c.name: c for c in family_shapes(4 * len(doc["shapes"]) + 40, doc["seed"], (64, 128, 256),
                                               ("ragged", "paged"), 0, draw_size=doc.get("draw", 20))}
        for r in doc["shapes"]:
            t = r["times"]
            if r["case"] not in by or not all(t.get(k) for k in TIMES):
                continue
            x = features(by[r["case"]])
            x.update(case=r["case"], seed=doc["seed"], kv_bytes=r["kv_bytes"],
                     times={k: v for k, v in t.items() if v})
            rows.append(x)
    return rows


def evaluate(rows, scale, slack, cap_bytes=None):
    """(geomean of the chosen time over stream-K's, shapes over 1.02x, worst)
    of the rule ``chunk <= min(scale x per, per + cap tiles) + slack``
    (``cap_bytes`` None: no cap)."""
    def taken(x):  # the package's rule on a measured row (no cap: one larger than any factor's reach)
        cap = (scale - 1) * x["per"] if cap_bytes is None else cap_bytes // tile_bytes(x)
        return x["ns"] >= 1 and _split_rule_allows(x["chunk"], x["per"], scale, slack, cap)

    r = [(x["times"]["sk_split_force"] if taken(x) else x["times"]["sk_split_off"]) / x["times"]["sk_split_off"]
         for x in rows]
    return math.exp(sum(map(math.log, r)) / len(r)), sum(v > 1.02 for v in r), max(r)


def tile_bytes(row):
    """K and V bytes of one tile of a row's fp16 plan (compact files before
    the field: from the head_dim in the shape's name)."""
    if "tile_bytes" in row:
        return row["tile_bytes"]
    import re

    return 4 * row["tile"] * int(re.search(r"_d(\d+)_", row["case"]).group(1))


def evaluate_cap(rows, cap_bytes, scale=2):
    """evaluate() of ``chunk <= min(scale x per, per + cap tiles)``, no slack."""
    return evaluate(rows, scale, 0, cap_bytes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--save", help="write the rows (shape, features, times) to this compact JSON file")
    a = ap.parse_args(argv)
    rows = [r for r in load(a.files) if r["ns"] >= 1 and r["times"]["sk_split_force"] != r["times"]["sk_split_off"]]
    if a.save:
        with open(a.save, "w") as f:
            json.dump({"rows": rows}, f, indent=0)
    seeds = sorted({r["seed"] for r in rows})
    half = set(seeds[::2])
    for launch in (True, False):
        path = [r for r in rows if r["launch"] == launch]
        if not path:
            continue
        parts = [p for p in ([r for r in path if r["seed"] in half], [r for r in path if r["seed"] not in half]) if p]
        best = math.exp(sum(math.log(min(r["times"][k] for k in TIMES) / r["times"]["sk_split_off"])
                            for r in path) / len(path))
        print(f"{'merge launch' if launch else 'in-kernel merge'}: {len(path)} shapes of {len(seeds)} seeds "
              f"(halves {' / '.join(str(len(p)) for p in parts)}); best choice per shape {best:.3f}x stream-K")
        for scale, slack in itertools.product((1, 2, 3), (0, 1, 2)):
            cols = " | ".join("%.3f, %2d over 1.02x (worst %.3f)" % evaluate(p, scale, slack) for p in parts)
            print(f"  chunk <= {scale} x per + {slack}: {cols} | all {evaluate(path, scale, slack)[0]:.3f}")
        if launch:
            continue
        classes = [(name, [r for r in path if lo <= r["kv_bytes"] < hi]) for name, lo, hi in
                   (("up to 60 MB", 0, 60e6), ("60 MB and more", 60e6, float("inf")))]
        classes = [(n, c) for n, c in classes if c]
        print("  the factor 2 with a cap (per size class: geomean over stream-K, shapes over 1.02x, worst):")
        for kb in (0, 64, 128, 192, 256, 384, 512, 1024, None):
            cap = (1 << 62) if kb is None else kb * 1024
            cols = " | ".join(f"{n} ({len(c)}) %.3f, %2d (worst %.3f)" % evaluate_cap(c, cap) for n, c in classes)
            print(f"    cap {'none' if kb is None else f'{kb} KB':>7}: {cols}")


if __name__ == "__main__":
    main()

"""Where an fp8 call's time goes against its fp16 twin: time over the floor.

    python tools/fp8_excess.py bench/results/fp8_*.json [--tbps 3.35]

Reads the JSON files of ``tools/fp8_timing.py`` and prints, per shape, the
fp16 and e4m3 times, their ratio, and each call's time over its floor (its
K/V bytes over ``--tbps``, the HBM read rate; fp8 reads half the bytes).
A call's time over the floor is what it spends on anything but streaming at
that rate: launch, prologue, merge, and streaming below the rate. If the
fp8 call had its fp16 twin's overhead, its ratio would be ``(over16 +
floor16 / 2) / t16`` (the "same overhead" column): on a small call this is
far above 0.5, since the overhead does not halve with the bytes. The
``extra`` column (over8 - over16) is the fp8 call's own excess. Summary by
head_dim and by size: the median extra and the geomean ratios.
"""

import argparse
import glob
import json
import math
import re
import statistics
import sys


def rows_of(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            rows += json.load(f)["rows"]
    return rows


def excess(row, tbps):
    """The row's times over their floors (us) and the same-overhead ratio."""
    floor16 = row["kv_bytes_fp16"] / (tbps * 1e12) * 1e6
    over16 = row["fp16_us"] - floor16
    over8 = row["fp8_us"] - floor16 / 2
    return dict(floor16=floor16, over16=over16, over8=over8, extra=over8 - over16,
                ratio=row["fp8_us"] / row["fp16_us"], same=(over16 + floor16 / 2) / row["fp16_us"])


def head_dim(case):
    m = re.search(r"_d(\d+)_", case)
    return int(m.group(1)) if m else None


def geomean(xs):
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--tbps", type=float, default=3.35, help="HBM read rate (TB/s) for the floors (H100 SXM: 3.35)")
    a = ap.parse_args(argv)
    paths = [p for pat in a.files for p in sorted(glob.glob(pat))]
    if not paths:
        sys.exit(f"files: no file matches {a.files}")
    rows = sorted(rows_of(paths), key=lambda r: r["kv_bytes_fp16"])
    print(f"{len(rows)} shapes from {len(paths)} files; floors at {a.tbps} TB/s")
    print(f"{'case':46s} {'MB16':>8s} {'t16':>7s} {'t8':>7s} {'ratio':>6s} {'same':>6s} "
          f"{'over16':>7s} {'over8':>7s} {'extra':>6s}")
    for r in rows:
        e = excess(r, a.tbps)
        r["_e"] = e
        print(f"{r['case'][:46]:46s} {r['kv_bytes_fp16'] / 1e6:8.1f} {r['fp16_us']:7.1f} {r['fp8_us']:7.1f} "
              f"{e['ratio']:6.3f} {e['same']:6.3f} {e['over16']:7.1f} {e['over8']:7.1f} {e['extra']:6.1f}")
    print("\ngroup                 n  ratio  same  median extra (us)")
    groups = {}
    for r in rows:
        mb = r["kv_bytes_fp16"] / 1e6
        size = "< 60 MB" if mb < 60 else ("60-300 MB" if mb < 300 else ">= 300 MB")
        groups.setdefault(f"d{head_dim(r['case'])}", []).append(r)
        groups.setdefault(size, []).append(r)
    for name in sorted(groups, key=lambda g: (not g.startswith("d"), g)):
        g = groups[name]
        print(f"{name:18s} {len(g):4d}  {geomean(r['_e']['ratio'] for r in g):.3f} "
              f"{geomean(r['_e']['same'] for r in g):.3f}  {statistics.median(r['_e']['extra'] for r in g):6.1f}")
    return rows


if __name__ == "__main__":
    main()

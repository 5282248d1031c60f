"""Read what ``tools/device_cycle.sh saturation`` measured, for the
equal-length model's saturating fraction (``kernels.TUNING
["uniform_saturation"]``):

- from ``tools/cta_rate.py`` JSON: per head_dim and group, DRAM bandwidth
  ``B`` (stream-K on the full grid), each CTA's own rate ``r`` (GB/s per CTA
  where w CTAs still stream below ``knee`` of ``B``: the rate a CTA's
  dependency chains allow) and the fraction of the SMs that would saturate
  DRAM, ``B / (r x SMs)``;
- from ``tools/spec_sweep.py`` JSON (the band and short-call sweeps): per
  file, each configuration's time over the default's, as a geometric mean
  and its range, and how many shapes it makes faster or slower by more than 2%.

    python tools/saturation_fit.py [--rates cta_rate.json] [--sweeps sat_S.json ...] [--knee 0.9]
"""

import argparse
import json
import math
import statistics


def rates(doc, knee=0.9):
    """Rows (head_dim, group, B TB/s, r GB/s per CTA, fraction of the SMs
    that saturates, points used) from a cta_rate document; ``r`` is the
    median per-CTA rate over the CTA counts whose total stays below
    ``knee x B``, None where every count saturates."""
    groups = {}
    for row in doc["rows"]:
        th, ts = row["times"].get("head"), row["times"].get("stream_k")
        if th:
            groups.setdefault((row["head_dim"], row["group"]), []).append(
                (row["ctas"], row["sms"], row["kv_bytes"] / th / 1e6, row["kv_bytes"] / ts / 1e6 if ts else None))
    out = []
    for (d, g), pts in sorted(groups.items()):
        full = [s for _, _, _, s in pts if s]
        if not full:
            continue
        b = statistics.median(full)
        below = [tb / w * 1e3 for w, _, tb, _ in pts if tb < knee * b]
        r = statistics.median(below) if below else None
        sms = pts[0][1]
        out.append((d, g, b, r, (b * 1e3 / (r * sms)) if r else None, len(below)))
    return out


def sweep(doc):
    """{config: (geomean over default, min, max, faster, slower, n)} of a
    spec_sweep document, over the shapes where both were timed."""
    ratios = {}
    for row in doc["shapes"]:
        t = row["times"]
        d = t.get("default")
        if not d:
            continue
        for k, v in t.items():
            if k != "default" and v:
                ratios.setdefault(k, []).append(v / d)
    out = {}
    for k, xs in ratios.items():
        g = math.exp(sum(math.log(x) for x in xs) / len(xs))
        out[k] = (g, min(xs), max(xs), sum(x < 0.98 for x in xs), sum(x > 1.02 for x in xs), len(xs))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="", help="tools/cta_rate.py JSON")
    ap.add_argument("--sweeps", nargs="*", default=[], help="tools/spec_sweep.py JSON files")
    ap.add_argument("--knee", type=float, default=0.9, help="a count streams below this fraction of B: unsaturated")
    a = ap.parse_args(argv)
    if not 0 < a.knee <= 1:
        ap.error(f"--knee: expected a number in (0, 1], got {a.knee}")
    if a.rates:
        with open(a.rates) as f:
            doc = json.load(f)
        print(f"{doc.get('gpu', '?')}: B = stream-K on the full grid; r = GB/s per CTA below {a.knee} B")
        for d, g, b, r, frac, n in rates(doc, a.knee):
            print(f"  d{d:3d} g{g:2d}: B {b:5.2f} TB/s, " + (f"r {r:5.1f} GB/s per CTA ({n} counts), saturates at "
                                                             f"{frac:.2f} of the SMs" if r else "every count saturates"))
    for path in a.sweeps:
        with open(path) as f:
            doc = json.load(f)
        print(f"{path} (seed {doc.get('seed')}, {doc.get('gpu', '?')}): time over the default's")
        for k, (g, lo, hi, faster, slower, n) in sorted(sweep(doc).items()):
            print(f"  {k:12s} {g:.3f}x ({lo:.3f}-{hi:.3f}) over {n}: {faster} faster, {slower} slower by > 2%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Hot instructions of an Nsight Compute report: the SASS lines with the most
warp-stall samples and their main stall reasons.

    ncu --kernel-name regex:lean_.*attention --launch-skip 3 --launch-count 1 \\
        --section SourceCounters --section WarpStateStats -o rep python tools/ncu_family.py ...
    ncu -i rep.ncu-rep --page source --csv --print-source sass > src.csv
    python tools/ncu_hot.py src.csv [--top 40]

Also prints the samples per contiguous address range between the report's
hottest lines, so that a loop (the tile loop, the merge) shows as one block.
"""
import argparse
import csv
import re
import sys


def _num(x):
    try:
        return float(str(x).replace(",", ""))
    except ValueError:
        return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    lines = open(a.csv, errors="replace").read().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"#"') or ln.startswith('"Address"')
                  or "Source" in ln and "Address" in ln), None)
    if start is None:
        sys.exit("no header found:\n" + "\n".join(lines[:20]))
    rows = list(csv.DictReader(lines[start:]))
    cols = list(rows[0].keys())
    samp = next(c for c in cols if "Sampling (All" in c)
    src = next(c for c in cols if c.strip() == "Source")
    addr = next((c for c in cols if c.strip() == "Address"), None)
    stalls = [c for c in cols if c.startswith("stall_") or "Stall" in c and c != samp and "Not Issued" not in c
              and "Sampling" not in c]
    total = sum(_num(r[samp]) for r in rows)
    print(f"{len(rows)} instructions, {total:.0f} samples; columns: {samp!r}")
    print("stall columns:", stalls[:30])
    order = sorted(range(len(rows)), key=lambda i: -_num(rows[i][samp]))
    for i in order[: a.top]:
        r = rows[i]
        why = sorted(((_num(r[c]), c) for c in stalls), reverse=True)[:3]
        print(f"{i:6d} {r.get(addr, '') if addr else '':>8} {_num(r[samp]) / max(total, 1) * 100:5.1f}%  "
              f"{r[src].strip()[:70]:70s} " + " ".join(f"{c}={v:.0f}" for v, c in why if v))
    # blocks of 64 instructions: where the time goes at a coarser grain
    print("\nsamples per block of 64 instructions (>= 1%):")
    for b0 in range(0, len(rows), 64):
        s = sum(_num(r[samp]) for r in rows[b0:b0 + 64])
        if s >= 0.01 * total:
            ops = {}
            for r in rows[b0:b0 + 64]:
                op = re.split(r"[\s.]", r[src].strip().lstrip("@!P0123456789T ").strip())[0]
                ops[op] = ops.get(op, 0) + 1
            top = sorted(ops.items(), key=lambda kv: -kv[1])[:5]
            print(f"  {b0:6d}-{b0 + 63:6d} {s / total * 100:5.1f}%  " + " ".join(f"{k}:{v}" for k, v in top))


if __name__ == "__main__":
    main()

"""Markdown results table for the README from a bench JSON file.
Usage: python tools/results_md.py bench/results/bench_full.json"""

import json
import sys


def main(path):
    d = json.load(open(path))
    rows = [r for r in d["rows"] if r.get("status") == "ok"]
    by = {}
    for r in rows:
        by.setdefault((r["case"], r["dtype"]), {})[r["method"]] = r
    peers = ["sdpa-flash", "sdpa-cudnn", "flashinfer", "flashinfer-tc"]
    out = ["| case | dtype | K/V MB | floor us | lean us | lean TB/s | % ceiling | split us | head us | best peer | peer us | lean vs best peer |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for (case, dt), m in by.items():
        lean = m.get("lean")
        if not lean:
            continue
        best = min((m[p] for p in peers if p in m and m[p].get("device_us")), key=lambda r: r["device_us"], default=None)
        f = lambda r: f"{r['device_us']:.1f}" if r and r.get("device_us") else "-"
        out.append(
            f"| {case} | {'fp16' if dt == 'float16' else 'bf16'} | {lean['kv_bytes'] / 1e6:.1f} | {lean['bound_us']:.1f} | "
            f"{lean['device_us']:.1f} | {lean['tbps']:.2f} | {100 * lean['frac_ceiling']:.0f}% | {f(m.get('split'))} | "
            f"{f(m.get('head'))} | {best['method'] if best else '-'} | {f(best)} | "
            f"{(best['device_us'] / lean['device_us']) if best else float('nan'):.2f}x |")
    print("\n".join(out))
    print()
    for t in d.get("targets", []):
        print(f"- **{t['status']}** {t['name']}: {t['detail']}")


if __name__ == "__main__":
    main(sys.argv[1])

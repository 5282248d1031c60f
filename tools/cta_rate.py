"""How fast w CTAs stream, for w from a quarter of the SMs to all of them:
the data behind the equal-length model's saturating fraction
(``kernels.TUNING["uniform_saturation"]``, ``schedule.uniform_variant``).

For each head_dim and group, a dense call of w sequences of one KV head
each, every sequence ``--unit-mb`` MB of K and V, run with one CTA per unit
(``schedule="head"``: w CTAs, each streaming its own unit from first tile to
last, as the split and one-CTA-per-unit variants do), and the same shape on
the default stream-K grid (``ctas_per_sm`` given: every SM busy). Device
time per call from CUDA-graph replays over rotating copies (cold L2).
Prints and writes, per (head_dim, group, w): TB/s, GB/s per CTA and the
time over stream-K's. A model where each CTA streams at most ``r`` GB/s
(a property of the kernel spec) and DRAM at most ``B`` saturates at
``w = B / r`` CTAs, a fraction ``B / (r x grid)`` that differs by spec;
At the end it prints the two measured inputs of the equal-length model
(``schedule.uniform_variant`` with ``kernels.TUNING["uniform_model"]``
"rates") as TUNING values for this GPU: per head_dim, ``partial_grid_time``
(w / SMs, head / stream-K time; the mean over groups) and
``cta_stream_gbs`` (GB/s per CTA at the fewest CTAs measured, where the
CTAs' own rate sets the pace). ``--fit F.json`` prints them from a stored
run without a GPU. The package's defaults are this tool's output for
``bench/results/cta_rate_h100_s29.json`` (an H100 80GB HBM3).

    python tools/cta_rate.py [--head-dims 64,128,256] [--groups 1,4,8,16] [--fractions 0.3,...,1.0]
                             [--unit-mb 8] [--dtype float16] [--time-budget 240] [--out F.json]
    python tools/cta_rate.py --fit bench/results/cta_rate_h100_s29.json
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cases as C  # noqa: E402

FRACTIONS = (0.3, 0.45, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


def shapes(num_sms, head_dims, groups, fractions, unit_mb, itemsize=2):
    """(head_dim, group, w, Case): w = round(fraction x SMs) sequences of
    one KV head and ``group`` query heads, each ``unit_mb`` MB of K and V
    (the length odd, a multiple of no tile)."""
    out = []
    for d in head_dims:
        n = int(unit_mb * 1e6 // (2 * d * itemsize)) | 1
        for g in groups:
            seen = set()
            for f in fractions:
                w = max(1, min(num_sms, round(f * num_sms)))
                if w in seen:
                    continue
                seen.add(w)
                out.append((d, g, w, C.Case(f"w{w}_h{g}x1_d{d}_{n}", w, g, 1, d, (n,) * w, "dense", "cta_rate")))
    return out


def tuning_values(rows):
    """``(partial_grid_time, cta_stream_gbs)`` from the rows of a run, in
    TUNING's JSON form (head_dim as a string key): per head_dim, the points
    ``[round(w / SMs, 3), round(mean head / stream-K time over the groups, 3)]`` for each w measured with both, and the mean
    GB/s per CTA (K/V bytes / head time / w) at the smallest w, rounded to
    0.1."""
    by = {}
    for r in rows:
        th, ts = (r.get("times") or {}).get("head"), (r.get("times") or {}).get("stream_k")
        if th and ts:
            by.setdefault(r["head_dim"], {}).setdefault(r["ctas"], []).append((th / ts, r["kv_bytes"] / th / 1e3 / r["ctas"],
                                                                                 r["sms"]))
    table, rates = {}, {}
    for d, per in sorted(by.items()):
        pts = []
        for w in sorted(per):
            xs = per[w]
            pts.append((round(w / xs[0][2], 3), round(sum(x[0] for x in xs) / len(xs), 3)))
        table[str(d)] = [list(x) for x in pts]
        first = per[min(per)]
        rates[str(d)] = round(sum(x[1] for x in first) / len(first), 1)
    return table, rates


def print_tuning(rows):
    table, rates = tuning_values(rows)
    print("TUNING values for this GPU (kernels.TUNING):")
    print(f'  "partial_grid_time": {json.dumps(table)},')
    print(f'  "cta_stream_gbs": {json.dumps(rates)},')


def main():
    if "--fit" in sys.argv[1:]:
        i = sys.argv.index("--fit")
        if i + 1 >= len(sys.argv):
            raise SystemExit("--fit: expected a JSON file of this tool")
        with open(sys.argv[i + 1]) as f:
            print_tuning(json.load(f)["rows"])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--groups", default="1,4,8,16")
    ap.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS),
                    help="CTAs as fractions of the SMs (each rounded, at least 1, at most the SMs)")
    ap.add_argument("--unit-mb", type=float, default=8.0, help="MB of K and V per sequence (per CTA)")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds; start no new shape after it")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    fr = [float(x) for x in a.fractions.split(",")]
    bad = [f for f in fr if not 0 < f <= 1]
    if bad:
        ap.error(f"--fractions: expected numbers in (0, 1], got {bad}")
    if a.unit_mb <= 0:
        ap.error(f"--unit-mb: expected a positive number, got {a.unit_mb}")
    import cupy as cp

    import cupy_lean
    from bench.timing import calls_per_graph, graph_time_cupy

    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    todo = shapes(sms, [int(x) for x in a.head_dims.split(",")], [int(x) for x in a.groups.split(",")], fr,
                  a.unit_mb, 2)
    rows, t0 = [], time.time()
    for d, g, w, case in todo:
        if a.time_budget and time.time() - t0 > a.time_budget:
            print(f"cta_rate: time budget reached after {len(rows)} shapes", flush=True)
            break
        n_copies = C.plan_copies(case, 256e6, 30e9)
        inp = C.build_inputs(case, a.dtype, n_copies)
        outs = [cp.empty_like(q) for q in inp.q]
        row = {"head_dim": d, "group": g, "ctas": w, "sms": sms, "case": case.name, "kv_bytes": case.kv_bytes(),
               "times": {}, "plans": {}}
        idx = inp.index_kwargs()
        for name in ("head", "stream_k"):
            try:
                if name == "head":
                    kw = {"schedule": "head"}
                else:  # stream-K on the default plan's grid (a stream-K knob given: no other variant)
                    kw = {"ctas_per_sm": cupy_lean.plan(inp.q[0], inp.k[0], inp.v[0], out=outs[0],
                                                        **idx).kernels.ctas_per_sm}
                p = cupy_lean.plan(inp.q[0], inp.k[0], inp.v[0], out=outs[0], **idx, **kw)
                call = lambda i, p=p: p.run(inp.q[i], inp.k[i], inp.v[i], out=outs[i], **idx)  # noqa: E731
                call(0)
                est = graph_time_cupy(call, n_copies, n_copies)["median_us"]
                row["times"][name] = graph_time_cupy(call, n_copies, calls_per_graph(n_copies, est))["median_us"]
                row["plans"][name] = " | ".join(x.strip() for x in p.describe().splitlines()[:4])
            except Exception as exc:
                row["times"][name] = None
                row["plans"][name] = f"error: {exc}"
        th, ts = row["times"]["head"], row["times"]["stream_k"]
        if th:
            tbps = case.kv_bytes() / th / 1e6
            print(f"d{d:3d} g{g:2d} {w:4d} CTAs ({w / sms:.2f} of the SMs) {case.kv_bytes() / 1e6:7.1f} MB: "
                  f"{th:8.1f} us {tbps:5.2f} TB/s {tbps * 1e3 / w:6.1f} GB/s per CTA"
                  + (f" | stream-K {ts:8.1f} us, head / stream-K {th / ts:.3f}" if ts else ""), flush=True)
        else:
            print(f"d{d:3d} g{g:2d} {w:4d} CTAs: {row['plans']['head']}", flush=True)
        rows.append(row)
        inp.free()
        inp = outs = None
        cp.get_default_memory_pool().free_all_blocks()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "dtype": a.dtype,
                       "unit_mb": a.unit_mb, "rows": rows}, f, indent=1)
    print_tuning(rows)


if __name__ == "__main__":
    main()

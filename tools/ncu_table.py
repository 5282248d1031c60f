"""What bounds each family call: Nsight Compute's raw page of a
``tools/ncu_family.py --index-out`` run, one row per call.

    python tools/ncu_table.py --raw raw.csv --index index.json [--bench bench_family_sS.json] [--out table.json]
                              [--against other_table.json]

``raw.csv`` is ``ncu --import rep.ncu-rep --csv --page raw --print-units base``.
A call's kernels are those between its marker (``lean_ncu_marker``, grid =
the call's index) and the next marker. Per call: the kernels' summed time,
and of its longest kernel the DRAM throughput (% of peak), issue slots
busy, achieved occupancy, grid, registers and the three largest stall
reasons (warp cycles per issued instruction spent in each). With
``--bench``, the family run's lean time, its limit ``1.05 x bound + 4 us``
and the best peer join each row (by case and dtype). With ``--against``
(another run's ``--out``, e.g. the fp16 calls beside an ``--fp8`` run):
each call's time over the other's, with both DRAM and issue figures.
"""

import argparse
import csv
import json
import math

MARKER = "lean_ncu_marker"
STALL = "smsp__average_warps_issue_stalled_"
STALL_END = "_per_issue_active.ratio"
COLS = {
    "time": "gpu__time_duration.sum",
    "dram": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "issue": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "occupancy": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "grid": "launch__grid_size",
    "registers": "launch__registers_per_thread",
    "latency": "smsp__average_warp_latency_per_inst_issued.ratio",
}
#: the metrics tools/ncu_family.sh asks for (the stall reasons by name: ncu refuses a run naming one it lacks)
STALLS = ("barrier", "branch_resolving", "dispatch_stall", "drain", "imc_miss", "lg_throttle", "long_scoreboard",
          "math_pipe_throttle", "membar", "mio_throttle", "misc", "no_instruction", "not_selected", "short_scoreboard",
          "sleeping", "tex_throttle", "wait")
METRICS = tuple(COLS.values()) + ("dram__bytes_read.sum",) + tuple(STALL + s + STALL_END for s in STALLS)
#: the fallback's metrics
CORE = (COLS["time"], COLS["dram"], COLS["grid"], COLS["occupancy"], COLS["issue"])
_TIME_SCALE = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6,
               "s": 1e6}


def _num(s):
    try:
        return float(str(s).replace(",", ""))
    except ValueError:
        return None


def read_raw(path):
    """Kernels of an ncu raw CSV in launch order: dicts of name and metric values
    (time in microseconds, whatever unit ncu printed it in)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if start is None or start + 1 >= len(rows):
        raise ValueError(f"{path}: no ncu raw table (no 'Kernel Name' header and units row)")
    head, units, body = rows[start], rows[start + 1], rows[start + 2:]
    ki = head.index("Kernel Name")
    out = []
    for r in body:
        if len(r) != len(head):
            continue
        k = {"name": r[ki]}
        for h, u, v in zip(head, units, r):
            if h == COLS["time"]:
                t = _num(v)
                if t is not None and u.strip() not in _TIME_SCALE:
                    raise ValueError(f"{path}: unknown time unit {u.strip()!r} of {h}")
                k[h] = None if t is None else t * _TIME_SCALE[u.strip()]
            elif "__" in h:
                k[h] = _num(v)
        out.append(k)
    return out


def calls(kernels, expect=None):
    """{marker grid: [kernels after that marker]}. ``expect``: the index's
    call numbers in order; the report's markers must begin with exactly
    those (a missing marker would put its call's kernels under the previous
    call; markers past them, of a run that died, are ignored)."""
    by, cur, seen = {}, None, []
    for k in kernels:
        if k["name"].startswith(MARKER):
            cur = int(k.get(COLS["grid"]) or 0)
            if cur in by:
                raise ValueError(f"marker {cur} appears twice in the report")
            by[cur] = []
            seen.append(cur)
        elif cur is not None:
            by[cur].append(k)
    expect = None if expect is None else list(expect)
    if expect is not None and seen[len(expect):]:  # a run that died after a marker, before its index entry
        import sys

        print(f"ncu_table: markers {seen[len(expect):]} are past the index's last call; ignored", file=sys.stderr)
    if expect is not None and seen[:len(expect)] != expect:
        missing = sorted(set(expect) - set(seen))
        extra = sorted(set(seen) - set(expect))
        raise ValueError(f"the report's markers {seen[:8]}... are not the index's calls in order "
                         f"(missing {missing[:8]}, not in the index {extra[:8]})")
    return by


def summarize(ks):
    """One call's row from its kernels: the sum of their times and the
    longest kernel's throughput, occupancy and three largest stalls."""
    if not ks:
        return {"kernels": 0}
    main = max(ks, key=lambda k: k.get(COLS["time"]) or 0)
    row = {"kernels": len(ks), "ncu_us": sum(k.get(COLS["time"]) or 0 for k in ks),
           "main": main["name"]}
    for key, m in COLS.items():
        if key != "time":
            row[key] = main.get(m)
    row["main_us"] = main.get(COLS["time"])
    stalls = {m[len(STALL):-len(STALL_END)]: v for m, v in main.items()
              if m.startswith(STALL) and m.endswith(STALL_END) and v is not None and "selected" != m[len(STALL):-len(STALL_END)]}
    row["stalls"] = sorted(stalls.items(), key=lambda p: -p[1])[:3]
    return row


def join_bench(rows, bench):
    """Add each row's family-run figures (lean's time, the limit, the best peer)."""
    by = {(r["case"], r["dtype"]): r for r in bench["rows"] if r.get("method") == "lean"}
    for row in rows:
        b = by.get((row["case"], row["dtype"]))
        if not b or row.get("fp8"):
            continue
        row["lean_us"] = b.get("device_us")
        bound = b.get("bound_us")
        row["limit_us"] = None if bound is None else 1.05 * bound + 4.0
        row["bound_us"] = bound
        row["best_peer"] = b.get("best_peer")
        row["best_peer_us"] = b.get("best_peer_us")
        row["miss"] = (row["lean_us"] is not None and row["limit_us"] is not None
                       and row["lean_us"] > row["limit_us"])
    return rows


def table(index, kernels, bench=None):
    by = calls(kernels, [e["index"] for e in index])
    rows = []
    for e in index:
        row = dict(e)
        row.pop("plan", None)
        row.update(summarize(by.get(e["index"], [])))
        rows.append(row)
    return join_bench(rows, bench) if bench else rows


def _f(x, fmt):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(rows):
    lines = ["| call | MB | lean us | limit us | ncu us | DRAM % | issue % | occ % | grid | regs | cyc/issue | top stalls |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        st = ", ".join(f"{n} {v:.1f}" for n, v in r.get("stalls", []))
        name = f"{r['case'].split('_')[0]} {'bf16' if 'bf' in r['dtype'] else 'fp16'}{' e4m3' if r.get('fp8') else ''}" + (
            " MISS" if r.get("miss") else "")
        lines.append(f"| {name} | {_f(r.get('mb'), '.1f')} | {_f(r.get('lean_us'), '.1f')} | "
                     f"{_f(r.get('limit_us'), '.1f')} | {_f(r.get('ncu_us'), '.1f')} | {_f(r.get('dram'), '.1f')} | "
                     f"{_f(r.get('issue'), '.1f')} | {_f(r.get('occupancy'), '.1f')} | {_f(r.get('grid'), '.0f')} | "
                     f"{_f(r.get('registers'), '.0f')} | {_f(r.get('latency'), '.1f')} | {st} |")
    return "\n".join(lines)


def compare(rows, base):
    """Rows of one table (e.g. fp8) against another's of the same calls (e.g.
    fp16, any dtype given): the ncu time ratio and both DRAM / issue figures,
    keyed by case (and dtype where ``base`` has it)."""
    by = {}
    for r in base:
        by.setdefault(r["case"], {})[r["dtype"]] = r
    out = []
    for r in rows:
        cand = by.get(r["case"], {})
        b = cand.get(r["dtype"]) or next(iter(cand.values()), None)
        if b is None or not b.get("ncu_us") or r.get("ncu_us") is None:
            continue
        out.append({"case": r["case"], "ratio": r["ncu_us"] / b["ncu_us"], "ncu_us": r["ncu_us"],
                    "base_us": b["ncu_us"], "dram": r.get("dram"), "base_dram": b.get("dram"),
                    "issue": r.get("issue"), "base_issue": b.get("issue"), "stalls": r.get("stalls", [])})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", required=True)
    ap.add_argument("--index", required=True)
    ap.add_argument("--bench", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--against", default=None,
                    help="another run's --out table (e.g. the fp16 calls): print this run's time over it")
    a = ap.parse_args()
    with open(a.index) as f:
        index = json.load(f)
    bench = None
    if a.bench:
        with open(a.bench) as f:
            bench = json.load(f)
    rows = table(index, read_raw(a.raw), bench)
    print(markdown(rows))
    if a.against:
        with open(a.against) as f:
            cmp = compare(rows, json.load(f))
        print("\n| call | time over the other | ncu us | other us | DRAM % | other DRAM % | issue % | other issue % |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for c in cmp:
            print(f"| {c['case'].split('_')[0]} | {c['ratio']:.3f} | {c['ncu_us']:.1f} | {c['base_us']:.1f} | "
                  f"{_f(c['dram'], '.1f')} | {_f(c['base_dram'], '.1f')} | {_f(c['issue'], '.1f')} | "
                  f"{_f(c['base_issue'], '.1f')} |")
        if cmp:
            g = math.exp(sum(math.log(c["ratio"]) for c in cmp) / len(cmp))
            print(f"\n{len(cmp)} calls: time over the other, geomean {g:.3f}, "
                  f"min {min(c['ratio'] for c in cmp):.3f}, max {max(c['ratio'] for c in cmp):.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

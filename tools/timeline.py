"""The critical path of one decode call, CTA by CTA: the kernel is compiled
with phase timestamps (-DLEAN_TIMELINE, %globaltimer in ns) and the last call
of a CUDA-graph replay (rotating copies: cold L2) is read back. Sampling
profilers weigh a phase by how many SMs spend time in it; a small call's
time is set by its slowest chain (the last contributor of a unit, then that
unit's merge), which this shows. Slot 19 holds the CTA's SM (%smid): the
CTAs are also grouped by whether they had their TPC (SMs 2i and 2i + 1) or
their SM to themselves, with each group's start-to-end times.

    python tools/timeline.py --shape 3,45,3,256,2696[,PAGE] [--lens L | --ragged L0:L1:L2] [--ctas C]
                             [--schedule lean|split] [--merge auto|kernel] [--kv-dtype e4m3]
                             [--tuning KEY=VALUE ...] [--out F.json]

The lengths go in as ``kv_lens``, so a lean plan of several sequences may
take the launch-time split-K (stamp ``decided``; its last chunk of a unit
merges) instead of stream-K: ``--tuning runtime_split=False`` keeps
stream-K there.

``--kv-dtype``: an fp8 cache (uint8 storage: the high byte of each fp16
value, scales 0.5), to see where an fp8 call's time goes against the same
shape's 16-bit one.

E.g. the prologue of stream-K against split-K on a small ragged batch of few
units: ``--shape 3,12,1,128,8000,16 --ragged 8000:900:3000`` with and
without ``--schedule split --ctas 132``.

Phases per CTA (ns from the first CTA's start): 0 start, 1 work found
(find_work), 2 first tile in shared memory, 3 last segment streamed, 4 its
state stored, 5 its arrival counted, 6 its merge done (merging CTAs only),
7 end; inside the prologue: 8 lengths read and scanned (find_work's pass
1), 17 the stream-K split made, 18 the launch-time split-K taken (when it
is), 9 the stream-K start found, 10 the first tiles' copies issued; inside
the first tile: 11 scores, 12 softmax update, 13 P V; slots 14 and 15 hold
the SM's cycle counter at start and end (the SM clock, printed); 16 the
CTA's start before its wait for the previous kernel (printed as the wait);
19 the SM; inside a WN > 1 kernel's store of the CTA's last segment: 20 every
warp's tiles done, 21 the warps' row stats shared, 22 the first pass's
scratch written, 23 its rows reduced and emitted.
"""

import argparse
import json
import sys

import numpy as np

sys.path.insert(0, ".")
import cupy as cp  # noqa: E402

import cupy_lean  # noqa: E402
from cupy_lean import kernels as K  # noqa: E402
from cupy_lean.bench import graph_time  # noqa: E402

MAX_CTAS = 2048
WIDTH = 32  # stamps per CTA (the kernel's row of lean_timeline)
PHASES = ["start", "found", "tile0", "streamed", "stored", "arrived", "merged", "end", "scanned", "split",
          "issued", "t0_scores", "t0_absorb", "t0_pv", None, None, None, "made", "decided", None,
          "st_warps", "st_stats", "st_scratch", "st_reduced"]


def instrument():
    plain = K.compile_options

    def with_timeline(spec):
        opts = plain(spec)
        return opts + (f"-DLEAN_TIMELINE={MAX_CTAS}",) if spec is not None else opts

    K.compile_options = with_timeline


def summary(t, grid):
    t = t[:grid].astype(np.int64)
    live = t[:, 0] > 0
    t0 = t[live, 0].min()
    rel = np.where(t > 0, t - t0, -1)[:, :len(PHASES)]
    rel[:, [k for k, name in enumerate(PHASES) if name is None]] = -1
    out = {"ctas": int(live.sum()), "span_us": float((t[live, 7].max() - t0) / 1e3)}
    # slot 16: the CTA's start before the wait for the previous kernel; start - it: the wait
    waited = live & (t[:, 16] > 0)
    if waited.any():
        w = (t[waited, 0] - t[waited, 16]) / 1e3
        out["wait_us"] = [float(np.min(w)), float(np.median(w)), float(np.max(w))]
    # slots 14, 15: the SM clock (cycles) at start and end; / the ns between: GHz
    ok = live & (t[:, 15] > t[:, 14]) & (t[:, 7] > t[:, 0])
    if ok.any():
        out["sm_mhz"] = float(np.median((t[ok, 15] - t[ok, 14]) / (t[ok, 7] - t[ok, 0]))) * 1e3
    for k, name in enumerate(PHASES):
        if name is None:
            continue
        col = rel[live, k]
        col = col[col >= 0]
        if len(col):
            out[name] = [float(np.min(col)) / 1e3, float(np.median(col)) / 1e3, float(np.max(col)) / 1e3]
    merging = rel[live & (t[:, 6] > 0)]
    out["merging_ctas"] = int(len(merging))
    if len(merging):
        last = merging[np.argmax(merging[:, 7])]
        out["critical_merger"] = [float(x) / 1e3 for x in last]
        out["merge_us"] = [float(np.min(merging[:, 6] - merging[:, 5])) / 1e3,
                           float(np.median(merging[:, 6] - merging[:, 5])) / 1e3,
                           float(np.max(merging[:, 6] - merging[:, 5])) / 1e3]
    crit = rel[live][np.argmax(rel[live, 7])]
    out["critical_cta"] = [float(x) / 1e3 for x in crit]
    # slot 19: %smid. CTAs by how many recorded CTAs share their SM and their TPC (SMs 2i, 2i + 1):
    # the start-to-end time of each group (does a CTA that shares its TPC stream slower?)
    done = live & (t[:, 7] > t[:, 0])
    if done.any():
        sm = t[done, 19]
        dur = (t[done, 7] - t[done, 0]) / 1e3
        per_sm = np.bincount(sm, minlength=int(sm.max()) + 1)[sm]
        per_tpc = np.bincount(sm // 2, minlength=int(sm.max()) // 2 + 1)[sm // 2]
        groups = {}
        for name, sel in (("alone", (per_tpc == 1)), ("tpc_shared", (per_tpc > 1) & (per_sm == 1)),
                          ("sm_shared", per_sm > 1)):
            if sel.any():
                groups[name] = {"ctas": int(sel.sum()), "us": [float(np.min(dur[sel])), float(np.median(dur[sel])),
                                                               float(np.max(dur[sel]))]}
        out["by_tpc"] = groups
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True, help="B,HQ,HKV,D,N[,PAGE]")
    ap.add_argument("--lens", default="", help="lengths to time, each <= N (default N)")
    ap.add_argument("--ctas", default="0", help="CTA counts (0: default)")
    ap.add_argument("--tile", type=int, default=None, help="tile_size (default: the library's)")
    ap.add_argument("--stages", type=int, default=None, help="pipeline stages (default: the library's)")
    ap.add_argument("--merge-balance", type=int, default=None, help="Config(merge_balance=...) (default: the library's)")
    ap.add_argument("--schedule", choices=("lean", "split"), default="lean",
                    help="split: FlashDecoding's split-K, --ctas giving units x chunks (default lean: stream-K)")
    ap.add_argument("--merge", choices=("auto", "kernel"), default="auto",
                    help="stream-K's merge: the plan's choice (auto; the combine launch with few units, "
                         "whose time is in us/call but not in the stamps) or always in the kernel")
    ap.add_argument("--ragged", default="",
                    help="colon-separated lengths, one per sequence (each <= N), timed instead of --lens")
    ap.add_argument("--kv-dtype", choices=("e4m3", "e5m2"), default=None,
                    help="an fp8 cache (the high bytes of the fp16 K/V, uint8 storage)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tuning", action="append", default=[], metavar="KEY=VALUE",
                    help="kernels.TUNING[KEY] = VALUE (a Python literal) for these plans, e.g. runtime_split=False: "
                         "stream-K where the launch-time split would be taken")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    from bench.run import parse_tuning

    K.TUNING.update(parse_tuning(a.tuning))  # (SystemExit naming a bad item or key)
    # the stamps are of the attention kernel: keep plans of equal lengths (e.g. batch 1) on the
    # decomposition asked for, not the equal-length variant the plan may choose
    K.TUNING["uniform_variants"] = False
    if a.merge == "kernel":
        K.TUNING["merge_launch_pieces"] = 0
    instrument()
    from range_sweep import decode_inputs  # tools/, beside this script

    (b, hq, hkv, d, n, ps), q, table, kvs = decode_inputs(a.shape, np.random.default_rng(a.seed))
    fp8 = {}
    if a.kv_dtype:
        if q.dtype != cp.float16:
            raise SystemExit("--kv-dtype: takes the high bytes of fp16 K/V")
        kvs = [tuple(cp.ascontiguousarray(x.view(cp.uint8)[..., 1::2]) for x in pair) for pair in kvs]
        fp8 = {"k_scale": 0.5, "v_scale": 0.5}
    k, v = kvs[0]
    out = cp.empty_like(q)
    copies = len(kvs)
    rows = []
    name = f"b{b} {hq}/{hkv} d{d} {n}" + (f" paged{ps}" if ps else "") + (f" {a.kv_dtype}" if a.kv_dtype else "")
    if a.ragged:
        per_seq = [int(x) for x in a.ragged.split(":")]
        if len(per_seq) != b or max(per_seq) > n or min(per_seq) < 0:
            raise SystemExit(f"--ragged: expected {b} lengths in [0, {n}], got {per_seq}")
        lengths = [per_seq]
    else:
        lengths = [int(x) for x in a.lens.split(",")] if a.lens else [n]
    for length in lengths:
        for c in (int(x) for x in a.ctas.split(",")):
            kv = cp.asarray(np.broadcast_to(np.asarray(length, np.int32), (b,)).copy())
            if a.merge_balance is not None:
                kw = {"config": cupy_lean.Config(tile_size=a.tile, stages=a.stages, num_ctas=c or None,
                                                 merge_balance=a.merge_balance)}
            else:
                kw = {"num_ctas": c} if c else {}
                kw.update(tile_size=a.tile, stages=a.stages, schedule=a.schedule)
            pl = cupy_lean.plan(q, k, v, kv_lens=kv, block_table=table, out=out, kv_dtype=a.kv_dtype, **kw)
            glob = K.kernels_for(pl.spec).module.get_global("lean_timeline")
            tl = cp.ndarray((MAX_CTAS, WIDTH), cp.uint64, glob)

            n_calls = max(20, copies)
            seen = [0]

            def call(i, kv=kv, pl=pl, tl=tl):
                # graph_time calls once, then captures n_calls calls: the table
                # is zeroed (in the graph) before the last one, whose stamps stay
                seen[0] += 1
                if seen[0] == n_calls + 1:
                    tl.fill(0)
                pl.run(q, *kvs[i], kv_lens=kv, block_table=table, out=out, **fp8)

            us = graph_time(call, copies, n_calls=n_calls, repeats=5)
            s = summary(cp.asnumpy(tl), pl.grid)
            s.update(case=name, length=length, num_ctas=c or None, grid=pl.grid, call_us=us,
                     schedule=a.schedule, merge_launch=bool(getattr(pl, "merge_launch", False)))
            rows.append(s)
            print(f"{name} len {length} {a.schedule} ctas {c or 'default'} (grid {pl.grid}, {pl.spec.name}"
                  + (", merge launch" if s["merge_launch"] else "") + f"): {us:.2f} us/call, "
                  f"kernel span {s['span_us']:.2f} us, {s['merging_ctas']} merging CTAs, "
                  f"SM clock {s.get('sm_mhz', 0):.0f} MHz")
            for key in [x for x in PHASES if x] + ["wait_us"]:
                if key in s:
                    lo, med, hi = s[key]
                    print(f"   {key:10s} min {lo:7.2f}  median {med:7.2f}  max {hi:7.2f} us")
            for key in ("critical_cta", "critical_merger"):
                if key in s:
                    print(f"   {key}: " + " ".join(f"{nm}={x:.2f}" for nm, x in zip(PHASES, s[key]) if nm and x >= 0))
            for g, v in s.get("by_tpc", {}).items():
                print(f"   {g:10s} {v['ctas']:4d} CTAs, start to end min {v['us'][0]:7.2f}  median {v['us'][1]:7.2f}  "
                      f"max {v['us'][2]:7.2f} us")
            if "merge_us" in s:
                print("   merge duration min/median/max: " + " / ".join(f"{x:.2f}" for x in s["merge_us"]) + " us")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()

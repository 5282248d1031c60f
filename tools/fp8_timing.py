"""fp8 K/V against fp16 K/V on family shapes, lean only (the same shapes, the
same timing as the benchmark: CUDA-graph replays over rotating copies).

    python tools/fp8_timing.py --family 16 --seed S [--dtype bfloat16] [--stages 2,3] [--only 3,7]
                               [--tuning KEY=VALUE ...] [--out fp8.json]

For each shape: the time with K/V in q's dtype (fp16 by default, or bf16),
the e4m3 time (uint8 storage: the high byte of each of those values, scales
per head; q and out stay in that dtype), their ratio, and the fp8 call's
bytes per second. fp8 reads half the bytes: the target ratio is about 0.5.
``--stages``: the fp8 call also through plans of these pipeline depths (the
default spec's tile; a depth that does not fit the device is skipped), to
see how the fp8 time depends on the bytes in flight. ``--only``: only the
drawn shapes of these indices (the same shapes as in the full run).
``--tuning KEY=VALUE`` (repeatable; the value read as a Python literal):
the e4m3 call timed again with ``cupy_lean.kernels.TUNING`` changed so, in
the same process (an A/B of a switch; the next call after a change plans
anew). ``--matched-bytes``: both calls also on the same shape with every
length doubled. (1) The 16-bit time over the doubled e4m3 time (which reads
the 16-bit call's bytes): the fp8 rate at equal bytes, a lower bound (twice
the tokens: twice the scores and exponentials per byte). (2) The marginal
time per token: (doubled e4m3 - e4m3) / (doubled 16-bit - 16-bit), the
time each added token costs, without the per-call fixed cost (launch,
prologue, merge) that both pay once; 0.5 is half the time per token.
``--flashinfer``: FlashInfer's paged decode (the peer; PyTorch and
FlashInfer must import) on the same pages, with 16-bit K/V and with the same
e4m3 bytes (``kv_data_type=torch.float8_e4m3fn``), its CUDA-core wrapper or,
where that refuses the shape, its tensor-core one: how a peer's fp8 call
compares with its 16-bit one on the same shapes (a refusal is recorded).
The e4m3 calls get ``k_scale = v_scale = 0.5`` by value
(``--per-head-scales``: as GPU arrays of one per KV head, which calls in
head pairs, ``cupy_lean.kernels.pair_heads``, do not take: those then run
without pairs). FlashInfer's fp8 call gets ``k_scale`` only: 0.5.0 applies a ``v_scale`` by
a separate kernel after the attention, which the 16-bit call does not run.
"""

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", type=int, default=16)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"), help="q, out (and the 16-bit K/V)")
    ap.add_argument("--stages", default="", help="comma-separated pipeline depths to time the fp8 call at too")
    ap.add_argument("--only", default="", help="comma-separated indices of the drawn shapes to time (default: all)")
    ap.add_argument("--tuning", action="append", default=[], metavar="KEY=VALUE",
                    help="time the e4m3 call again with kernels.TUNING[KEY] = VALUE (a Python literal)")
    ap.add_argument("--matched-bytes", action="store_true",
                    help="also time e4m3 with every length doubled (the 16-bit call's bytes)")
    ap.add_argument("--flashinfer", action="store_true",
                    help="also time FlashInfer's paged decode with 16-bit and with e4m3 K/V")
    ap.add_argument("--per-head-scales", action="store_true",
                    help="k_scale / v_scale as GPU arrays of one scale per KV head (default: 0.5 by value)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from bench.run import parse_tuning

    tuned = parse_tuning(a.tuning)  # (SystemExit naming a bad item or key)
    only = {int(x) for x in a.only.split(",") if x.strip()}
    import cupy as cp

    import cupy_lean
    from bench import cases as C
    from bench import family as F
    from cupy_lean.bench import graph_time
    from cupy_lean.kernels import tuning

    def e4m3_of(x):  # the high byte of each 16-bit value (fp16: its e5m2), read as e4m3: the same bytes
        return cp.ascontiguousarray(x.view(cp.uint8)[..., 1::2])

    def timed_inputs(case):
        """``case``'s inputs and 16-bit time, then its K/V as e4m3 bytes (the 16-bit K/V lists emptied; the
        FlashInfer page views ``inp.fi_pages`` still hold that memory until ``inp.free()``):
        ``(inp, kw, outs, t16, k8, v8, ks, fp8_call, copies)``."""
        n = C.plan_copies(case, 256e6, 30e9)
        inp = C.build_inputs(case, a.dtype, n)
        kw = inp.index_kwargs()
        outs = [cp.empty_like(x) for x in inp.q]
        t16 = graph_time(lambda i: cupy_lean.attention(inp.q[i], inp.k[i], inp.v[i], out=outs[i], **kw), n)
        # the high bytes (fp16: the e5m2 of the same values), timed as e4m3 (the same bytes read)
        k8 = [e4m3_of(x) for x in inp.k]
        v8 = [e4m3_of(x) for x in inp.v]
        del inp.k[:], inp.v[:]
        # one scale by value (a serving cache's per-tensor scale), or one per KV head (--per-head-scales: a
        # GPU array, which a call in head pairs does not take: it runs without pairs, kernels.pair_heads)
        ks = cp.full(case.heads_kv, 0.5, dtype=cp.float32) if a.per_head_scales else 0.5

        def fp8_call(i):
            return cupy_lean.attention(inp.q[i], k8[i], v8[i], out=outs[i], kv_dtype="e4m3", k_scale=ks,
                                       v_scale=ks, **kw)

        return inp, kw, outs, t16, k8, v8, ks, fp8_call, n

    def time_doubled(case):
        """The 16-bit and the e4m3 call on ``case`` with every length doubled (us)."""
        c2 = dataclasses.replace(case, name=case.name + "_x2", lens=tuple(2 * n for n in case.lens))
        inp2, _, _, t16, _, _, _, call2, n2 = timed_inputs(c2)
        inp2.fi_pages = []  # (their 16-bit memory: not needed here)
        t = graph_time(call2, n2)
        inp2.free()
        return t16, t

    def time_flashinfer(case, inp, est_us):
        """FlashInfer's paged decode on ``inp``'s pages: ``{variant, fi16_us, fi8_us}`` or ``{error}``
        (``est_us``: about how long a call takes, for the calls per graph)."""
        from bench import peers as P
        from bench import timing as T

        try:
            flashinfer, torch = P.import_flashinfer(), P.import_torch()
        except Exception as exc:
            return {"error": str(exc)[:200]}
        tdt = P.torch_dtype(torch, a.dtype)
        idx = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.int32))
               for x in (inp.fi_indptr, inp.fi_indices, inp.fi_last_page_len)]
        qs = [P.to_torch(x, a.dtype) for x in inp.q]
        outs = [torch.empty_like(x) for x in qs]
        p16 = [(P.to_torch(kp, a.dtype), P.to_torch(vp, a.dtype)) for kp, vp in inp.fi_pages]
        p8 = [tuple(torch.from_dlpack(e4m3_of(x)).view(torch.float8_e4m3fn) for x in kv) for kv in inp.fi_pages]
        n = len(qs)
        res, errors = {}, []
        for tc in (False, True):  # the CUDA-core wrapper refuses some groups: then the tensor-core one
            try:
                for name, kv_dt, pages, scales in (("fi16_us", tdt, p16, {}),
                                                   ("fi8_us", torch.float8_e4m3fn, p8, {"k_scale": 0.5})):
                    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(P._fi_workspace(), "NHD", use_tensor_cores=tc)
                    w.plan(*idx, case.heads_q, case.heads_kv, case.head_dim, case.page_size, pos_encoding_mode="NONE",
                           q_data_type=tdt, kv_data_type=kv_dt)
                    call = (lambda i, w=w, pages=pages, scales=scales: w.run(qs[i], pages[i], out=outs[i], **scales))
                    res[name] = T.graph_time_torch(call, n, T.calls_per_graph(n, est_us))["median_us"]
                res["variant"] = "flashinfer-tc" if tc else "flashinfer"
                break
            except Exception as exc:
                errors.append(f"{'tc' if tc else 'cuda-core'}: {type(exc).__name__}: {str(exc)[:160]}")
                res = {}
        if not res:
            res = {"error": "; ".join(errors)}
        elif errors:
            res["refused"] = errors[0]
        qs = outs = p16 = p8 = None
        P.torch_release()
        return res

    rows = []
    for idx, case in enumerate(F.draw(a.family, a.seed)):
        if only and idx not in only:
            continue
        inp, kw, outs, t16, k8, v8, ks, fp8_call, n_copies = timed_inputs(case)
        t8 = graph_time(fp8_call, n_copies)
        t8_tuned = None
        if tuned:
            with tuning(**tuned):
                t8_tuned = graph_time(fp8_call, n_copies)
        by_stages = {}
        for st in (int(x) for x in a.stages.split(",") if x.strip()):
            try:
                p = cupy_lean.plan(inp.q[0], k8[0], v8[0], out=outs[0], kv_dtype="e4m3", stages=st, **kw)
            except ValueError as exc:  # does not fit this device's shared memory
                by_stages[st] = None
                print(f"    stages {st}: {exc}", flush=True)
                continue
            by_stages[st] = graph_time(lambda i: p.run(inp.q[i], k8[i], v8[i], out=outs[i], k_scale=ks, v_scale=ks,
                                                       **kw), n_copies)
        fi = time_flashinfer(case, inp, t16) if a.flashinfer else None
        b8 = case.kv_bytes() / 2
        inp.free()
        k8 = v8 = outs = fp8_call = p = None  # free before the next inputs (fp8_call holds them too)
        cp.get_default_memory_pool().free_all_blocks()
        t16x2, t8x2 = time_doubled(case) if a.matched_bytes else (None, None)
        marginal = None if t8x2 is None or t16x2 <= t16 else (t8x2 - t8) / (t16x2 - t16)
        rows.append({"case": case.name, "kv_bytes_fp16": case.kv_bytes(), "fp16_us": t16, "fp8_us": t8,
                     "ratio": t8 / t16, "fp8_tbps": b8 / t8 / 1e6, "fp16_tbps": case.kv_bytes() / t16 / 1e6,
                     "fp8_us_by_stages": by_stages, "tuning": tuned or None, "fp8_us_tuned": t8_tuned,
                     "fp16_doubled_us": t16x2, "fp8_doubled_us": t8x2,
                     "rate_at_equal_bytes": None if t8x2 is None else t16 / t8x2, "marginal_ratio": marginal,
                     "flashinfer": fi})
        extra = "".join(f"  s{k} {v:.1f}" for k, v in by_stages.items() if v is not None)
        if fi is not None:
            extra += (f"  {fi['variant']}: 16-bit {fi['fi16_us']:.1f} us, e4m3 {fi['fi8_us']:.1f} us "
                      f"(ratio {fi['fi8_us'] / fi['fi16_us']:.3f})" if "fi8_us" in fi else f"  FlashInfer: {fi['error']}")
        if t8x2 is not None:
            extra += (f"  x2 lengths: 16-bit {t16x2:.1f} us, e4m3 {t8x2:.1f} us (rate at equal bytes "
                      f"{t16 / t8x2:.3f}, marginal ratio {'-' if marginal is None else f'{marginal:.3f}'})")
        if t8_tuned is not None:
            extra += f"  tuned e4m3 {t8_tuned:.1f} us ({t8_tuned / t8:.3f}x)"
        print(f"{case.name:48s} {a.dtype[:4]} {t16:8.1f} us ({rows[-1]['fp16_tbps']:.2f} TB/s)  e4m3 {t8:8.1f} us "
              f"({rows[-1]['fp8_tbps']:.2f} TB/s)  ratio {t8 / t16:.3f}{extra}", flush=True)
        cp.get_default_memory_pool().free_all_blocks()
    if not rows:
        print(f"fp8 seed {a.seed}: no shape selected")
        return
    g = math.exp(sum(math.log(r["ratio"]) for r in rows) / len(rows))
    print(f"fp8 seed {a.seed} {a.dtype}: {len(rows)} shapes; fp8 / 16-bit time geomean {g:.3f}, "
          f"min {min(r['ratio'] for r in rows):.3f}, max {max(r['ratio'] for r in rows):.3f}")
    if a.matched_bytes and rows:
        eq = [r["rate_at_equal_bytes"] for r in rows]
        print(f"fp8 seed {a.seed} {a.dtype}: e4m3 bytes per second over 16-bit at equal bytes (lengths doubled) "
              f"geomean {math.exp(sum(math.log(x) for x in eq) / len(eq)):.3f}, min {min(eq):.3f}, "
              f"max {max(eq):.3f}")
        # the marginal ratio where the 16-bit increment is at least 5 us (smaller ones are mostly noise),
        # and over all shapes as one ratio of summed increments
        mr = [r["marginal_ratio"] for r in rows
              if r["marginal_ratio"] is not None and r["fp16_doubled_us"] - r["fp16_us"] >= 5.0]
        d8 = sum(r["fp8_doubled_us"] - r["fp8_us"] for r in rows)
        d16 = sum(r["fp16_doubled_us"] - r["fp16_us"] for r in rows)
        if mr:
            print(f"fp8 seed {a.seed} {a.dtype}: marginal time per token e4m3 / 16-bit (lengths doubled): "
                  f"geomean {math.exp(sum(math.log(max(x, 1e-3)) for x in mr) / len(mr)):.3f} over {len(mr)} shapes "
                  f"whose 16-bit time grew by >= 5 us (min {min(mr):.3f}, max {max(mr):.3f}); "
                  f"summed increments {d8:.1f} / {d16:.1f} us = {d8 / d16:.3f}")
    fr = [(r["flashinfer"]["fi8_us"] / r["flashinfer"]["fi16_us"], r["ratio"]) for r in rows
          if r.get("flashinfer") and "fi8_us" in r["flashinfer"]]
    if fr:
        print(f"fp8 seed {a.seed} {a.dtype}: FlashInfer e4m3 / 16-bit time geomean "
              f"{math.exp(sum(math.log(x) for x, _ in fr) / len(fr)):.3f} on {len(fr)} shapes (lean on the same: "
              f"{math.exp(sum(math.log(y) for _, y in fr) / len(fr)):.3f})")
    if tuned and rows:
        ab = [r["fp8_us_tuned"] / r["fp8_us"] for r in rows]
        print(f"tuned {tuned}: e4m3 time tuned / default geomean "
              f"{math.exp(sum(math.log(x) for x in ab) / len(ab)):.3f}, min {min(ab):.3f}, max {max(ab):.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"seed": a.seed, "dtype": a.dtype, "rows": rows, "geomean_ratio": g}, f, indent=1)


if __name__ == "__main__":
    main()

"""Head lanes at head_dim 64 (kernels.head_lanes): for each fp8 call of two
KV heads or more, the e4m3 NHD time with lanes off, with each lane count
(divisors of heads_kv, at most five of them) and with the same bytes laid
out heads-first (HND), and each lane count's largest |difference| from the
lanes-off output. CUDA-graph replays over rotating copies, as the
benchmark times.

    python tools/lanes_time.py --seeds 0,S1,S2 [--family 24] [--budget SEC] [--out lanes.json]

Seed 0: four built calls of 16-32 KV heads (c0-c3); any other seed: the
head_dim-64 shapes of that family draw. K/V are the high bytes of the
family's fp16 values, scales 0.5 per head. Printed per call: each count's
time over lanes-off (``*``: the rule's count), HND's, and the TB/s of fp8
bytes.
"""

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", required=True, help="comma-separated; 0: the built calls")
    ap.add_argument("--family", type=int, default=24)
    ap.add_argument("--budget", type=float, default=0, help="seconds after which no new call starts (0: none)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import cupy as cp

    import cupy_lean
    from bench import cases as C
    from bench import family as F
    from cupy_lean import kernels as K
    from cupy_lean.bench import graph_time
    from cupy_lean.kernels import tuning

    built = [
        C.Case("c0_b4_h54x27_d64_dense_60000", 4, 54, 27, 64, (60000,) * 4, "dense", "built"),
        C.Case("c1_b8_h32x32_d64_ragged", 8, 32, 32, 64, (41234, 12345, 30001, 45000, 9999, 27777, 38888, 20202),
               "ragged", "built"),
        C.Case("c2_b16_h64x16_d64_paged16_20000", 16, 64, 16, 64, (20000,) * 16, "paged", "built", 16),
        C.Case("c3_b3_h50x25_d64_dense_40000", 3, 50, 25, 64, (40000,) * 3, "dense", "built"),
    ]
    t0, rows, sms = time.time(), [], K.device_sm_count()
    hnd = lambda x: cp.ascontiguousarray(x.transpose(0, 2, 1, 3))
    for seed in (int(s) for s in a.seeds.split(",")):
        for case in (built if seed == 0 else F.draw(a.family, seed)):
            if case.head_dim != 64 or case.heads_kv < 2:
                continue
            if a.budget and time.time() - t0 > a.budget:
                print("budget: stopped")
                break
            H = case.heads_kv
            n_copies = C.plan_copies(case, 256e6, 30e9)
            inp = C.build_inputs(case, "float16", n_copies)
            kw = inp.index_kwargs()
            outs = [cp.empty_like(x) for x in inp.q]
            k8 = [cp.ascontiguousarray(x.view(cp.uint8)[..., 1::2]) for x in inp.k]
            v8 = [cp.ascontiguousarray(x.view(cp.uint8)[..., 1::2]) for x in inp.v]
            del inp.k[:], inp.v[:]
            sc = cp.full(H, 0.5, dtype=cp.float32)  # (per-head scales: never head pairs, kernels.pair_heads)

            def call(i, lay="NHD"):
                return cupy_lean.attention(inp.q[i], k8[i], v8[i], out=outs[i], kv_dtype="e4m3", k_scale=sc,
                                           v_scale=sc, kv_layout=lay, **kw)

            nhd = (H * 64, H * 64, 64, 1)
            rule = K.head_lanes("e4m3", 64, H, nhd, nhd, sms=sms)
            r = {"seed": seed, "case": case.name, "mb8": case.kv_bytes() / 2e6, "H": H, "rule": rule, "t": {}, "d": {}}
            with tuning(fp8_head_lanes=False):
                call(0)
                ref = outs[0].copy()
                r["t"]["off"] = graph_time(call, n_copies)
            counts = [L for L in range(2, min(H, sms) + 1) if H % L == 0]
            if len(counts) > 5:
                counts = sorted({counts[0], counts[1], counts[len(counts) // 2], counts[-1], rule} - {1})
            for L in counts:
                with tuning(fp8_head_lanes=True, fp8_head_lanes_count=L):
                    outs[0].fill(cp.nan)
                    call(0)
                    diff = cp.abs(outs[0].astype(cp.float32) - ref.astype(cp.float32))
                    r["d"][L] = float("nan") if bool(cp.isnan(diff).any()) else float(diff.max())
                    r["t"][L] = graph_time(call, n_copies)
            for i in range(n_copies):
                k8[i], v8[i] = hnd(k8[i]), hnd(v8[i])
            with tuning(fp8_head_lanes=False):
                r["t"]["hnd"] = graph_time(lambda i: call(i, "HND"), n_copies)
            rows.append(r)
            mb, off = r["mb8"], r["t"]["off"]
            parts = "  ".join(f"L{L} {r['t'][L] / off:.3f}{'*' if L == rule else ''}" for L in counts)
            print(f"{case.name[:42]:42s} {mb:6.0f} MB off {off:7.1f} us ({mb / off:.2f} TB/s)  {parts}  "
                  f"HND {r['t']['hnd'] / off:.3f} ({mb / r['t']['hnd']:.2f})  d {max(r['d'].values(), default=0):.1e}",
                  flush=True)
            inp.free()
            k8 = v8 = outs = None
            cp.get_default_memory_pool().free_all_blocks()
    xs = [r["t"][r["rule"]] / r["t"]["off"] for r in rows if r["rule"] > 1]
    if xs:
        print(f"rule / off over {len(xs)} calls: geomean {math.exp(sum(map(math.log, xs)) / len(xs)):.3f}, "
              f"min {min(xs):.3f}, max {max(xs):.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"seeds": a.seeds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

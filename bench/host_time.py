"""Host time per eager call of ``cupy_lean.attention`` (and of torch SDPA
when PyTorch is installed), on shapes whose GPU time is small.

Two figures per case, from 7 loops of 300 calls per variant:

* ``issue_us``: median over 7 interleaved loops of the wall time until the 300 calls have returned, divided by 300,
  before any synchronisation: the host cost of a call (the GPU queue is deep
  enough that it never blocks here).
* ``wall_us``: the same loop including the final synchronisation: the
  per-call rate when host and GPU overlap (max of host and GPU time).

Usage: ``python -m bench.host_time [--out FILE.json] [--label NAME]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

CASES = {  # name: (batch, heads_q, heads_kv, head_dim, kv_len): GPU time well under the host time
    "b1_h32x8_d128_1k": (1, 32, 8, 128, 1024),
    "b2_h8x1_d64_300": (2, 8, 1, 64, 300),
}


def _one_loop(fn, sync, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def _measure(variants, sync, n=300, loops=7):
    """Loops of every variant interleaved (so that machine noise hits all
    alike); median over the loops."""
    for fn in variants.values():
        for _ in range(10):
            fn()
    sync()
    got = {name: [] for name in variants}
    for _ in range(loops):
        for name, fn in variants.items():
            got[name].append(_one_loop(fn, sync, n))
    return {name: {"issue_us": statistics.median(a for a, _ in r), "wall_us": statistics.median(b for _, b in r),
                   "issue_min_us": min(a for a, _ in r)} for name, r in got.items()}


def main(argv=None):
    import cupy as cp

    import cupy_lean

    ap = argparse.ArgumentParser(prog="python -m bench.host_time", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--label", default="", help="label printed with the results")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(1)
    res = {}
    sync = cp.cuda.Device().synchronize
    for name, (B, hq, hkv, d, n) in CASES.items():
        q = cp.asarray(rng.standard_normal((B, hq, d), dtype=np.float32).astype(np.float16))
        k = cp.asarray(rng.standard_normal((B, n, hkv, d), dtype=np.float32).astype(np.float16))
        v = cp.asarray(rng.standard_normal((B, n, hkv, d), dtype=np.float32).astype(np.float16))
        lens = cp.full(B, n - 3, dtype=cp.int32)
        out = cp.empty_like(q)
        variants = {
            "default (kv_lens on the GPU)": lambda: cupy_lean.attention(q, k, v, kv_lens=lens),
            "out=": lambda: cupy_lean.attention(q, k, v, kv_lens=lens, out=out),
            "validate=True (synchronises)": lambda: cupy_lean.attention(q, k, v, kv_lens=lens, validate=True),
        }
        if hasattr(cupy_lean, "plan"):  # older versions had no plans
            p = cupy_lean.plan(q, k, v, kv_lens=lens, out=out)
            variants["plan.run(out=)"] = lambda: p.run(q, k, v, kv_lens=lens, out=out)
        # calls with optional features (hot from their second call where the arguments are CuPy arrays,
        # ints, floats and strs; the np.float64 soft-cap row validates every call, as older versions did)
        sinks = cp.zeros(hq, dtype=cp.float32)
        k8, v8 = k.view(cp.uint8)[..., 1::2], v.view(cp.uint8)[..., 1::2]
        k8, v8 = cp.ascontiguousarray(k8), cp.ascontiguousarray(v8)
        vsc = cp.full(hkv, 0.5, dtype=cp.float32)
        q4 = cp.asarray(rng.standard_normal((B, 2, hq, d), dtype=np.float32).astype(np.float16))
        out4 = cp.empty_like(q4)
        qn = cp.full(B, 2, dtype=cp.int32)
        variants.update({
            "sinks=, out=": lambda: cupy_lean.attention(q, k, v, kv_lens=lens, out=out, sinks=sinks),
            "sinks=, window_left=, out=": lambda: cupy_lean.attention(q, k, v, kv_lens=lens, out=out, sinks=sinks,
                                                                      window_left=128),
            "softcap=, out=": lambda: cupy_lean.attention(q, k, v, kv_lens=lens, out=out, softcap=30.0),
            "softcap=np.float64, out= (validates)": lambda: cupy_lean.attention(q, k, v, kv_lens=lens, out=out,
                                                                                softcap=np.float64(30.0)),
            "fp8 e4m3, out=": lambda: cupy_lean.attention(q, k8, v8, kv_lens=lens, out=out, kv_dtype="e4m3",
                                                          k_scale=0.5, v_scale=0.5),
            "fp8 e4m3, GPU v_scale, out=": lambda: cupy_lean.attention(q, k8, v8, kv_lens=lens, out=out,
                                                                       kv_dtype="e4m3", k_scale=0.5, v_scale=vsc),
            "q_len 2, q_lens=, out=": lambda: cupy_lean.attention(q4, k, v, kv_lens=lens, out=out4, q_lens=qn),
            "batch_invariant=True, out=": lambda: cupy_lean.attention(q, k, v, kv_lens=lens, out=out,
                                                                      batch_invariant=True),
        })
        try:
            ps = cupy_lean.plan(q, k, v, kv_lens=lens, out=out, sinks=sinks)
            variants["plan.run(out=, sinks=)"] = lambda: ps.run(q, k, v, kv_lens=lens, out=out, sinks=sinks)
        except TypeError:  # a version whose plan() takes no features
            pass
        try:
            import torch
            import torch.nn.functional as F

            tq = torch.from_dlpack(q).unsqueeze(2)  # (B, Hq, 1, D)
            tk = torch.from_dlpack(k).permute(0, 2, 1, 3)  # (B, Hkv, N, D), no copy
            tv = torch.from_dlpack(v).permute(0, 2, 1, 3)
            variants["torch SDPA (peer)"] = lambda: F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)
            # cupy_lean called with PyTorch tensors (exchanged through DLPack on every call)
            tqq, tkk, tvv = torch.from_dlpack(q), torch.from_dlpack(k), torch.from_dlpack(v)
            tl, to = torch.from_dlpack(lens), torch.from_dlpack(out)
            variants["torch tensors, out="] = lambda: cupy_lean.attention(tqq, tkk, tvv, kv_lens=tl, out=to)
            tsk = torch.from_dlpack(sinks)
            variants["torch tensors, sinks=, out="] = lambda: cupy_lean.attention(tqq, tkk, tvv, kv_lens=tl, out=to,
                                                                                  sinks=tsk)
            side = torch.cuda.Stream()

            def on_side():  # PyTorch's current stream is not CuPy's: the exchange orders them
                with torch.cuda.stream(side):
                    cupy_lean.attention(tqq, tkk, tvv, kv_lens=tl, out=to)

            variants["torch tensors on a PyTorch side stream, out="] = on_side
            # the parts of one tensor's exchange: PyTorch's export with CuPy's stream, CuPy's whole import
            sarg = cp.cuda.get_current_stream().ptr or 1
            variants["(one tensor) torch __dlpack__(stream)"] = lambda: tqq.__dlpack__(stream=sarg)
            variants["(one tensor) cupy.from_dlpack"] = lambda: cp.from_dlpack(tqq)
        except Exception:  # PyTorch missing: no peer row
            pass
        for var, r in _measure(variants, sync).items():
            res[f"{name} | {var}"] = r
    for key, r in res.items():
        print(f"{args.label:8s} {key:55s} host {r['issue_us']:6.1f} us/call (min {r['issue_min_us']:5.1f})  with GPU {r['wall_us']:7.1f} us/call")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Context-parallel decode over several GPUs (cupy_lean.distributed):
time per decode step, the share spent exchanging and merging the ranks'
(out, lse), and the scaling efficiency against one GPU on the same total
context.

    python -m bench.distributed [--gpus 1,2,4,8] [--contexts 262144,1048576,4194304]
                                [--batch 1] [--heads 32/8] [--head-dim 128] [--out FILE.json]

One process drives the GPUs (``attention_devices``: each GPU computes the
full query over its shard of every sequence, an NCCL all-gather exchanges
the per-head states, every GPU merges them in rank order). World sizes above
the number of visible GPUs are skipped and reported. Times are CUDA-event
medians over repeated eager steps (K/V far larger than L2): ``step`` is the
whole decode step seen from GPU 0, ``local`` the slowest shard's attention,
``exchange`` the all-gather plus the merge (step - local).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_ints(s, name):
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{name}: expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise SystemExit(f"{name}: expected integers >= 1, got {s!r}")
    return vals


def parse_heads(s):
    try:
        hq, hkv = (int(x) for x in s.split("/"))
    except ValueError:
        raise SystemExit(f"--heads: expected HQ/HKV, e.g. 32/8, got {s!r}") from None
    if hkv < 1 or hq % hkv:
        raise SystemExit(f"--heads: heads_q must be a multiple of heads_kv >= 1, got {s!r}")
    return hq, hkv


def shard_bytes(context, world, batch, hkv, d, itemsize=2):
    """K/V bytes of the largest shard (what one GPU must hold)."""
    per = -(-context // world)
    return 2 * batch * per * hkv * d * itemsize


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def run_case(world, context, batch, hq, hkv, d, repeats=20):
    import cupy as cp
    import numpy as np
    from cupy.cuda import nccl

    import cupy_lean
    from cupy_lean import distributed

    lens = np.full(batch, context, dtype=np.int64)
    starts, lengths = distributed.shard_ranges(lens, world)
    shards = []
    for r in range(world):
        with cp.cuda.Device(r):
            n = int(lengths[r].max())
            rng = cp.random.default_rng(r)
            q = rng.standard_normal((batch, hq, d), dtype=cp.float32).astype(cp.float16)
            k = rng.standard_normal((batch, max(n, 1), hkv, d), dtype=cp.float32).astype(cp.float16)
            v = rng.standard_normal((batch, max(n, 1), hkv, d), dtype=cp.float32).astype(cp.float16)
            shards.append(dict(device=r, q=q, k=k, v=v, kv_lens=cp.asarray(lengths[r], dtype=cp.int32)))
    comms = nccl.NcclCommunicator.initAll(list(range(world)))
    for _ in range(3):
        distributed.attention_devices(shards, comms=comms)
    for r in range(world):
        cp.cuda.Device(r).synchronize()
    steps, locals_ = [], []
    for _ in range(repeats):
        ev = []
        for r in range(world):
            with cp.cuda.Device(r):
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record()
                cupy_lean.attention(shards[r]["q"], shards[r]["k"], shards[r]["v"], kv_lens=shards[r]["kv_lens"],
                               return_lse=True)
                e1.record()
                ev.append((e0, e1))
        for r in range(world):
            cp.cuda.Device(r).synchronize()
        locals_.append(max(cp.cuda.get_elapsed_time(a, b) for a, b in ev) * 1e3)
        with cp.cuda.Device(0):
            s0, s1 = cp.cuda.Event(), cp.cuda.Event()
            s0.record()
        distributed.attention_devices(shards, comms=comms)
        with cp.cuda.Device(0):
            s1.record()
        for r in range(world):
            cp.cuda.Device(r).synchronize()
        steps.append(cp.cuda.get_elapsed_time(s0, s1) * 1e3)
    step, local = _median(steps), _median(locals_)
    del shards
    for r in range(world):
        with cp.cuda.Device(r):
            cp.get_default_memory_pool().free_all_blocks()
    return {"world": world, "context": context, "batch": batch, "heads_q": hq, "heads_kv": hkv, "head_dim": d,
            "step_us": step, "local_us": local, "exchange_us": max(step - local, 0.0),
            "exchange_share": max(step - local, 0.0) / step,
            "kv_bytes_per_gpu": shard_bytes(context, world, batch, hkv, d)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--contexts", default="262144,1048576,4194304")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    worlds, contexts = parse_ints(a.gpus, "--gpus"), parse_ints(a.contexts, "--contexts")
    hq, hkv = parse_heads(a.heads)
    import cupy as cp

    visible = cp.cuda.runtime.getDeviceCount()
    free = min(cp.cuda.Device(i).mem_info[0] for i in range(visible))
    rows, skipped = [], []
    for ctx in contexts:
        base = None
        for w in worlds:
            need = shard_bytes(ctx, w, a.batch, hkv, a.head_dim) * 1.5  # fp32 temporaries while filling
            if w > visible:
                skipped.append(f"{w} GPUs x {ctx} tokens: {visible} GPU(s) visible")
                continue
            if need > free:
                skipped.append(f"{w} GPUs x {ctx} tokens: {need / 1e9:.1f} GB per GPU, {free / 1e9:.1f} GB free")
                continue
            r = run_case(w, ctx, a.batch, hq, hkv, a.head_dim, a.repeats)
            if w == 1:
                base = r["step_us"]
            r["efficiency_vs_1gpu"] = (base / (w * r["step_us"])) if base else None
            rows.append(r)
            eff = f"{r['efficiency_vs_1gpu']:.2f}" if base else "n/a"
            print(f"{w} GPU(s)  context {ctx:>8}  step {r['step_us']:9.1f} us  local {r['local_us']:9.1f} us  "
                  f"exchange {r['exchange_us']:7.1f} us ({100 * r['exchange_share']:.1f}%)  "
                  f"K/V per GPU {r['kv_bytes_per_gpu'] / 1e9:.2f} GB  efficiency {eff}", flush=True)
    for s in skipped:
        print(f"skipped: {s}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpu": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "visible_gpus": visible,
                       "rows": rows, "skipped": skipped}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

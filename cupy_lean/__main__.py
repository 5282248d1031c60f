"""Command line: ``python -m cupy_lean demo|bench|schedule``."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import attention, gpu_available, lean_schedule, reference

# A realistic decode step: 8 KV heads, 32 query heads (GQA group 4), head_dim
# 128, a ragged batch of sequences up to 16k tokens (one empty).
DEMO_LENS = [16384, 9217, 4096, 12001, 777, 65, 0, 3000]
DEMO_HEADS_Q, DEMO_HEADS_KV, DEMO_HEAD_DIM = 32, 8, 128
H100_SMS = 132


def _demo_inputs(seed=0):
    rng = np.random.default_rng(seed)
    lens = np.array(DEMO_LENS, dtype=np.int32)
    b, cap = len(lens), int(lens.max())
    q = rng.standard_normal((b, DEMO_HEADS_Q, DEMO_HEAD_DIM)).astype(np.float16)
    k = rng.standard_normal((b, cap, DEMO_HEADS_KV, DEMO_HEAD_DIM)).astype(np.float16)
    v = rng.standard_normal((b, cap, DEMO_HEADS_KV, DEMO_HEAD_DIM)).astype(np.float16)
    return q, k, v, lens


def demo(argv=None):
    p = argparse.ArgumentParser(prog="python -m cupy_lean demo")
    p.add_argument("--png", default="lean_schedule.png", help="where to write the schedule picture")
    p.add_argument("--cpu", action="store_true", help="use the NumPy path even with a GPU")
    args = p.parse_args(argv)

    q, k, v, lens = _demo_inputs()
    kv_bytes = 2 * int(lens.sum()) * DEMO_HEADS_KV * DEMO_HEAD_DIM * 2
    print(f"cupy-lean demo: batch {len(lens)}, heads {DEMO_HEADS_Q}/{DEMO_HEADS_KV}, head_dim "
          f"{DEMO_HEAD_DIM}, fp16, kv_lens {lens.tolist()} ({kv_bytes / 1e6:.1f} MB of K/V)")
    ref_out, ref_lse = reference.attention(q, k, v, kv_lens=lens)
    on_gpu = gpu_available() and not args.cpu

    if on_gpu:
        import cupy as cp

        from .kernels import _Kernels, make_spec

        spec = make_spec("f16", DEMO_HEAD_DIM, DEMO_HEADS_Q // DEMO_HEADS_KV, False)
        kern = _Kernels(spec)
        num_ctas = kern.ctas_per_sm * kern.num_sms
        qd, kd, vd, ld = (cp.asarray(x) for x in (q, k, v, lens))
        out, lse = attention(qd, kd, vd, kv_lens=ld, return_lse=True)
        cp.cuda.Device().synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        reps = 50
        start.record()
        for _ in range(reps):
            attention(qd, kd, vd, kv_lens=ld, validate=False)
        stop.record()
        stop.synchronize()
        us = cp.cuda.get_elapsed_time(start, stop) * 1000 / reps
        err = float(np.abs(cp.asnumpy(out).astype(np.float64) - ref_out).max())
        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
        print(f"GPU: {name}; lean kernel {us:.1f} us per call (warm L2, eager), "
              f"{kv_bytes / us / 1e6:.2f} TB/s; max |out - float64 reference| = {err:.2e}")
    else:
        num_ctas = 2 * H100_SMS
        out, lse = attention(q, k, v, kv_lens=lens, return_lse=True)
        err = float(np.abs(out.astype(np.float64) - ref_out).max())
        print(f"attention() on NumPy arrays: max |out - float64 reference| = {err:.2e}")

    sched = lean_schedule(lens, DEMO_HEADS_KV, tile_size=64, num_ctas=num_ctas)
    em_out, em_lse = reference.emulate(sched, q, k, v, kv_lens=lens)
    em_err = float(np.nanmax(np.abs(em_out - ref_out)))
    lse_ok = np.array_equal(np.isneginf(em_lse), np.isneginf(ref_lse))
    print(f"emulate(lean schedule) vs reference: max |diff| = {em_err:.2e}, "
          f"empty sequences give lse=-inf: {lse_ok}")
    print()
    print(sched.describe())
    try:
        sched.plot(args.png)
        print(f"\nschedule picture written to {args.png}")
    except ImportError as exc:
        print(f"\n(no picture: {exc})")
    if on_gpu:
        print("\nRan on the GPU (CUDA kernels via CuPy/NVRTC).")
    else:
        print("\nNo GPU used: this ran on the CPU through the NumPy reference path "
              f"(schedule shown for a {H100_SMS}-SM H100 at 2 CTAs per SM).")
    ok = err < 1e-2 and em_err < 1e-9 and lse_ok
    return 0 if ok else 1


def schedule_cmd(argv=None):
    p = argparse.ArgumentParser(prog="python -m cupy_lean schedule")
    p.add_argument("--lens", required=True, help="comma-separated kv lengths, e.g. 131072,1024,1024")
    p.add_argument("--heads-kv", type=int, default=8)
    p.add_argument("--tile-size", type=int, default=64)
    p.add_argument("--num-ctas", type=int, default=2 * H100_SMS)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    lens = [int(x) for x in args.lens.split(",") if x]
    s = lean_schedule(lens, args.heads_kv, tile_size=args.tile_size, num_ctas=args.num_ctas)
    print(s.describe())
    if args.png:
        s.plot(args.png)
        print(f"picture written to {args.png}")
    return 0


def bench_cmd(argv=None):
    try:
        from bench import run as bench_run
    except ImportError:
        print("the benchmark lives in the repository's bench/ folder: run from a checkout")
        return 1
    return bench_run.main(["--short"] + list(argv or []))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = {"demo": demo, "bench": bench_cmd, "schedule": schedule_cmd}
    if not argv or argv[0] not in cmds:
        print("usage: python -m cupy_lean {demo|bench|schedule} [options]")
        return 2
    t = time.time()
    rc = cmds[argv[0]](argv[1:])
    if argv[0] == "demo":
        print(f"({time.time() - t:.1f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())

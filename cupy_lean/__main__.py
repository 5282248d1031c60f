"""Command line: ``python -m cupy_lean demo|bench|schedule``."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

import numpy as np

from . import attention, gpu_available, lean_schedule, reference
from .schedule import check_png_path, merges_by_launch

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
    """The demo: one decode step on a realistic ragged batch, checked against
    the float64 reference, and the lean schedule it runs."""
    args = _parse(["demo"] + list(argv or []))
    png = args.png or os.path.join(tempfile.mkdtemp(prefix="cupy_lean_"), "lean_schedule.png")

    q, k, v, lens = _demo_inputs()
    kv_bytes = 2 * int(lens.sum()) * DEMO_HEADS_KV * DEMO_HEAD_DIM * 2
    print(f"cupy-lean demo: batch {len(lens)}, heads {DEMO_HEADS_Q}/{DEMO_HEADS_KV}, head_dim "
          f"{DEMO_HEAD_DIM}, fp16, kv_lens {lens.tolist()} ({kv_bytes / 1e6:.1f} MB of K/V)")
    on_gpu = gpu_available() and not args.cpu
    if not on_gpu:
        print("no GPU used (" + ("--cpu" if args.cpu else "no usable CUDA GPU; why is printed at the end")
              + "): the NumPy path runs instead; "
              "it takes 10 to 30 seconds on a CPU")
    ref_out, ref_lse = reference.attention(q, k, v, kv_lens=lens)

    if on_gpu:
        import cupy as cp

        from .kernels import _Kernels, make_spec

        spec = make_spec("f16", DEMO_HEAD_DIM, DEMO_HEADS_Q // DEMO_HEADS_KV, False)
        kern = _Kernels(spec)
        num_ctas = kern.ctas_per_sm * kern.num_sms
        grid_note = f"{kern.ctas_per_sm} CTA per SM on this GPU's {kern.num_sms} SMs"
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
        from .kernels import make_spec

        spec = make_spec("f16", DEMO_HEAD_DIM, DEMO_HEADS_Q // DEMO_HEADS_KV, False)
        num_ctas = _default_ctas_per_sm(spec) * H100_SMS
        grid_note = f"no GPU: the default plan on a {H100_SMS}-SM H100 assumed"
        out, lse = attention(q, k, v, kv_lens=lens, return_lse=True)
        err = float(np.abs(out.astype(np.float64) - ref_out).max())
        print(f"attention() on NumPy arrays: max |out - float64 reference| = {err:.2e}")

    from .kernels import TUNING

    launch = merges_by_launch(num_ctas, len(lens) * DEMO_HEADS_KV, TUNING["merge_launch_pieces"])
    sched = _plan_schedule(lens, DEMO_HEADS_KV, spec, num_ctas, TUNING["merge_balance"], launch)
    em_out, em_lse = reference.emulate(sched, q, k, v, kv_lens=lens)
    em_err = float(np.nanmax(np.abs(em_out - ref_out)))
    lse_ok = np.array_equal(np.isneginf(em_lse), np.isneginf(ref_lse))
    print(f"emulate({sched.kind} schedule) vs reference: max |diff| = {em_err:.2e}, "
          f"empty sequences give lse=-inf: {lse_ok}")
    print()
    print(sched.describe(grid_note=grid_note))
    try:
        sched.plot(png, grid_note=grid_note)
        print(f"\nschedule picture written to {png}")
    except ImportError as exc:
        print(f"\n(no picture: {exc})")
    if on_gpu:
        print("\nRan on the GPU (CUDA kernels via CuPy/NVRTC).")
    else:
        print("\nNo GPU used: this ran on the CPU through the NumPy reference path "
              f"(schedule shown as the default plan would launch it on a {H100_SMS}-SM H100).")
        if not args.cpu:
            print(f"(CuPy could not use a GPU here: {_no_gpu_reason()})")
    ok = err < 1e-2 and em_err < 1e-9 and lse_ok
    return 0 if ok else 1


def _default_ctas_per_sm(spec, capped=True):
    """CTAs per SM of the default lean grid without a device to ask (the
    occupancy taken as what an H100's shared memory allows; ``capped=False``:
    that occupancy itself, without the grid's cap)."""
    from .kernels import SMEM_OPTIN, default_ctas_per_sm

    occupancy = max(1, (SMEM_OPTIN["sm_90"] + 1024) // (spec.smem_bytes + 1024))
    return default_ctas_per_sm(spec, occupancy) if capped else occupancy


def _no_gpu_reason():
    from .kernels import require_device

    try:
        require_device()
    except (ImportError, RuntimeError) as exc:
        return str(exc)
    return "--cpu was not given, yet no GPU was used"  # pragma: no cover


def _plan_schedule(lens, heads_kv, spec, num_ctas, merge_balance, merge_launch, knob=False):
    """The lean schedule a plan of fp16 ``spec`` runs for these lengths,
    with the launch-time split where kernels.launch_time_split says so
    (``knob``: a stream-K knob was given; one sequence is an equal-length
    plan)."""
    from .kernels import launch_split_cap, launch_split_rule, launch_time_split

    scale, slack = launch_split_rule(merge_launch, spec.tile, spec.head_dim, 2)
    cap = launch_split_cap(merge_launch, spec.tile, spec.head_dim, 2)
    return lean_schedule(lens, heads_kv, tile_size=spec.tile, num_ctas=num_ctas, merge_balance=merge_balance,
                         state_rows=16 * spec.m_tiles, merge_launch=merge_launch,
                         runtime_split=launch_time_split(merge_launch, knob, len(lens) > 1), split_slack_tiles=slack,
                         split_scale=scale, split_cap_tiles=cap)


def schedule_cmd(argv=None):
    """Print (and draw) the lean schedule of a batch."""
    args = _parse(["schedule"] + list(argv or []))
    try:
        return _schedule(args)
    except ValueError as exc:  # a combination the kernels do not take (e.g. a group past the largest)
        print(f"python -m cupy_lean schedule: error: {exc}", file=sys.stderr)
        return 2


def _schedule(args):
    """schedule_cmd's work on parsed arguments."""
    from .kernels import TUNING, make_spec, varied_length_tile

    tile = args.tile_size
    if tile is None and len(args.lens) > 1:  # kv_lens of several sequences: the plan's tile rule for them
        tile = varied_length_tile(args.head_dim, args.group, 0, lambda t: _default_ctas_per_sm(
            make_spec("f16", args.head_dim, args.group, False, t), capped=False))
    spec = make_spec("f16", args.head_dim, args.group, False, tile)
    cps = _default_ctas_per_sm(spec)
    num_ctas = args.num_ctas if args.num_ctas is not None else cps * args.sms
    mb = TUNING["merge_balance"] if args.merge_balance is None else args.merge_balance
    # the default plan's grid (at most one CTA per tile of the longest unit's length) and merge (a
    # stream-K knob given keeps it in the kernel)
    units = len(args.lens) * args.heads_kv
    longest = -(-max(args.lens) // spec.tile) if args.lens else 0
    grid = max(1, min(num_ctas, units * longest)) if args.num_ctas is None else num_ctas
    launch = (args.num_ctas is None and not args.merge_balance
              and merges_by_launch(grid, units, TUNING["merge_launch_pieces"]))
    s = _plan_schedule(args.lens, args.heads_kv, spec, grid, mb, launch,
                       knob=args.num_ctas is not None or bool(args.merge_balance))
    src = (f"--num-ctas {args.num_ctas}" if args.num_ctas is not None
           else f"{cps} CTA(s) per SM on {args.sms} SMs"
           + (" (--sms default: an H100's / H200's)" if args.sms == H100_SMS else "")
           + (f", at most one per tile: {grid}" if grid != num_ctas else "")
           ) + f", tile {spec.tile}, merge balance {mb}"
    print(f"(grid: {grid} CTAs, {src})")
    print(s.describe())  # the grid's source is the line above
    if s.num_ctas < grid:
        print(f"(work for {s.num_ctas} of the grid's {grid} CTAs: "
              + ("no sequence has a key" if s.num_ctas == 0
                 else "the split-K chosen at launch gives each CTA one whole chunk of a unit" if s.kind == "split"
                 else "fewer tiles than CTAs" if s.total_tiles < grid
                 else "the merge balance gives each CTA a range of at least a minimum size") + ")")
    if len(args.lens) == 1 and args.num_ctas is None and not args.merge_balance:
        print("(one sequence: the default plan may run its split-K variant or one CTA per unit instead of "
              "this stream-K schedule; cupy_lean.schedule.uniform_variant chooses, Plan.describe() says which)")
    if args.png:
        s.plot(args.png, grid_note=src)
        print(f"picture written to {args.png}")
    return 0


def bench_cmd(argv=None):
    """Time the package's decompositions and kernel variants on this GPU."""
    from .bench import main as bench_main

    return bench_main(argv)


def _lens(text):
    from .bench import int_list  # ("5,,6" or "5,": a length left out; "": none, said below)

    vals = int_list(text) if text.strip() else []
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected one or more lengths >= 0, got {text!r}")
    from .validation import MAX_CAPACITY

    if max(vals) > MAX_CAPACITY:
        raise argparse.ArgumentTypeError(f"expected lengths of at most {MAX_CAPACITY} tokens (the kernels' "
                                         f"longest sequence), got {max(vals)}")
    return vals


def _positive(text, low=1):
    from .bench import int_at_least  # (bench's options take the same check)

    return int_at_least(low)(text)


def _non_negative(text):
    return _positive(text, 0)


def _png(text):
    try:
        return check_png_path(text)  # Schedule.plot's own check, before the work
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("path: ")) from None


def _parser():
    from .kernels import TILE_SIZES

    p = argparse.ArgumentParser(
        prog="python -m cupy_lean",
        description="cupy-lean: LeanAttention decode attention for CuPy.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    d = sub.add_parser("demo", help="one decode step on a ragged batch, checked against the float64 reference",
                       description="Run one decode step (32/8 heads, head_dim 128, a ragged fp16 batch) on the GPU, "
                                   "or through the NumPy reference without one; check it; print and draw the "
                                   "lean schedule.")
    d.add_argument("--png", type=_png, default=None,
                   help="where to write the schedule picture (default: a new temporary folder)")
    d.add_argument("--cpu", action="store_true", help="use the NumPy path even with a GPU")
    sc = sub.add_parser("schedule", help="print (and draw) the lean schedule of a batch",
                        description="Print a summary of the stream-K decomposition of a batch as the default "
                                    "plan cuts it, or of the split-K in one wave its launches choose for these "
                                    "lengths (grid, tiles per CTA, segments, partial units and their "
                                    "contributors, which merge runs); --png draws every unit and CTA. "
                                    "max_tiles: tiles of the busiest CTAs; heavy_ctas: how many have that many "
                                    "(the rest one fewer).")
    sc.add_argument("--lens", type=_lens, required=True, help="comma-separated KV lengths, e.g. 131072,1024,1024")
    sc.add_argument("--heads-kv", type=_positive, default=8, help="KV heads (default 8)")
    sc.add_argument("--tile-size", type=int, choices=TILE_SIZES, default=None,
                    help="tokens per tile (default: the default plan's, by --head-dim and --group, and "
                         "with several --lens kernels.varied_length_tile)")
    sc.add_argument("--head-dim", type=int, choices=(64, 128, 256), default=128, help="head_dim (default 128)")
    sc.add_argument("--group", type=_positive, default=4, help="query heads per KV head (default 4)")
    sc.add_argument("--merge-balance", type=_non_negative, default=None,
                    help="ranges of at least sqrt(a x longest unit x rows / tile) tiles (default: the package's)")
    sc.add_argument("--num-ctas", type=_positive, default=None,
                    help="CTAs of the grid (default: the default plan's CTAs per SM, see --sms)")
    sc.add_argument("--sms", type=_positive, default=H100_SMS,
                    help=f"SM count the default grid assumes (default {H100_SMS}: an H100 SXM's or H200's)")
    sc.add_argument("--png", type=_png, default=None, help="also draw the schedule into this PNG file")
    sub.add_parser("bench", help="time lean/split/head and tile, CTA and pipeline variants on this GPU "
                                 "(python -m cupy_lean bench --help)", add_help=False)
    return p


def _parse(argv):
    # "--lens -5,3": argparse takes a value starting with "-" for an option and says only that --lens
    # expected an argument; joined as "--lens=-5,3" the value reaches _lens, which says what is wrong
    out, argv, i = [], list(argv), 0
    while i < len(argv):
        if argv[i] == "--lens" and i + 1 < len(argv) and re.fullmatch(r"-[0-9][0-9,\s-]*", argv[i + 1]):
            out.append(f"--lens={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return _parser().parse_args(out)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        try:
            return bench_cmd(argv[1:])
        except RuntimeError as exc:  # no usable GPU: say so, no traceback
            print(exc, file=sys.stderr)
            return 1
    args = _parse(argv)  # --help, a missing or unknown command, bad options: message and exit 2
    t = time.time()
    rc = {"demo": demo, "schedule": schedule_cmd}[args.command](argv[1:])
    if args.command == "demo":
        print(f"({time.time() - t:.1f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())

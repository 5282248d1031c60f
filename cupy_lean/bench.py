"""``python -m cupy_lean bench``: time cupy-lean's own decompositions on this
GPU, for quick kernel experiments.

Each variant (a schedule, and optionally a tile size, CTA count, pipeline
depth or CTAs per SM) is built as a :func:`cupy_lean.plan` and timed as the
device time per call of CUDA-graph replays: a graph of calls over rotating
copies of the inputs (``--cold-l2``: enough copies that K and V come from
memory, not the L2 cache) is replayed ``--repeats`` times and the median is
reported, with the bandwidth ``K/V bytes / time``. Comparisons with other
libraries live in the repository's ``bench/`` folder, not here.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

__all__ = ["main", "graph_time"]


def graph_time(call, n_copies, repeats=7, n_calls=None):
    """Median device microseconds per ``call(i)`` from replays of a CUDA graph
    of ``n_calls`` calls (call ``i`` uses copy ``i % n_copies``)."""
    import cupy as cp

    n_calls = n_calls or max(n_copies, 8)
    cp.cuda.Device().synchronize()  # inputs written on the default stream are complete
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        call(0)
        stream.synchronize()
        stream.begin_capture()
        try:
            for i in range(n_calls):
                call(i % n_copies)
        finally:
            graph = stream.end_capture()  # a capture left open would break every later call
        graph.launch(stream)
        stream.synchronize()
        times = []
        for _ in range(repeats):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(stream)
            graph.launch(stream)
            e1.record(stream)
            e1.synchronize()
            times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / n_calls)
    return statistics.median(times)


def int_list(text):
    """An argparse type: comma-separated integers, none left empty (the
    command line's ``--lens`` reads its lengths with it too)."""
    items = text.split(",")
    if any(not x.strip() for x in items):  # "5,,6", "5," or "": a value left out
        raise argparse.ArgumentTypeError(f"expected comma-separated integers with none left empty, got {text!r}")
    try:
        return [int(x) for x in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def int_at_least(low):
    """An argparse type: the integer of a text, at least ``low`` (else a
    message naming the text and the bound)."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v
    return parse


def check_args(p, args):
    """What the options must be, checked before any GPU work (``p.error``:
    the message names the option, exit status 2): lengths >= 0 with at least
    one, heads_q a multiple of heads_kv, known schedules, tile sizes of the
    kernels, positive grids, 2 to 6 stages, positive CTAs per SM."""
    from .kernels import TILE_SIZES

    if min(args.lens) < 0:
        p.error(f"--lens: expected lengths >= 0, got {min(args.lens)}")
    if args.heads_q % args.heads_kv:
        p.error(f"--heads-q: expected a multiple of --heads-kv ({args.heads_kv}), got {args.heads_q}")
    scheds = args.schedules.split(",")
    bad = [s for s in scheds if s not in ("lean", "split", "head")]
    if bad or not args.schedules:
        p.error(f"--schedules: expected comma-separated names from lean, split, head, got {args.schedules!r}")
    for opt, vals, ok, want in (("--tile-sizes", args.tile_sizes, lambda t: t in TILE_SIZES, f"from {TILE_SIZES}"),
                                ("--num-ctas", args.num_ctas, lambda n: n >= 1, ">= 1"),
                                ("--stages", args.stages, lambda n: 2 <= n <= 6, "from 2 to 6"),
                                ("--ctas-per-sm", args.ctas_per_sm, lambda n: n >= 1, ">= 1")):
        wrong = [x for x in vals or [] if not ok(x)]
        if wrong:
            p.error(f"{opt}: expected values {want}, got {wrong[0]}")


def parser():
    """The argument parser of ``python -m cupy_lean bench``."""
    from .kernels import HEAD_DIMS, TILE_SIZES

    p = argparse.ArgumentParser(prog="python -m cupy_lean bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--lens", type=int_list, default=[8192, 3000, 17000, 1],
                   help="comma-separated KV lengths, one per sequence (default 8192,3000,17000,1)")
    p.add_argument("--heads-q", type=int_at_least(1), default=32, help="query heads (default 32)")
    p.add_argument("--heads-kv", type=int_at_least(1), default=8, help="KV heads (default 8)")
    p.add_argument("--head-dim", type=int, choices=HEAD_DIMS, default=128, help="head_dim (default 128)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="default float16")
    p.add_argument("--page-size", type=int_at_least(0), default=0, help="paged cache with this page size (default: dense)")
    p.add_argument("--schedules", default="lean,split,head", help="comma-separated (default lean,split,head)")
    p.add_argument("--tile-sizes", type=int_list, default=None,
                   help=f"lean variants with these tile sizes, from {TILE_SIZES} (default: the configured one)")
    p.add_argument("--num-ctas", type=int_list, default=None, help="lean variants with these grid sizes")
    p.add_argument("--stages", type=int_list, default=None, help="lean variants with these pipeline depths (2-6)")
    p.add_argument("--ctas-per-sm", type=int_list, default=None, help="lean variants with these CTAs per SM")
    p.add_argument("--cold-l2", action="store_true",
                   help="rotate input copies over 4x the L2 size, so K/V are read from memory")
    p.add_argument("--repeats", type=int_at_least(1), default=7, help="timed graph replays (median; default 7)")
    return p


def _inputs(args, rng):
    import cupy as cp

    from ._dtypes import BFLOAT16

    dt = np.float16 if args.dtype == "float16" else BFLOAT16
    lens = np.asarray(args.lens, dtype=np.int32)
    B, d, hkv = len(lens), args.head_dim, args.heads_kv
    q = cp.asarray(rng.standard_normal((B, args.heads_q, d)).astype(dt))
    table = None
    if args.page_size:
        ps = args.page_size
        pages = -(-lens // ps)
        n_pages = int(pages.sum()) + 1
        perm = rng.permutation(n_pages)
        table = np.zeros((B, max(int(pages.max()), 1)), dtype=np.int32)
        pos = 0
        for b in range(B):
            table[b, :pages[b]] = perm[pos:pos + pages[b]]
            pos += pages[b]
        shape = (n_pages, ps, hkv, d)
        table = cp.asarray(table)
    else:
        shape = (B, max(int(lens.max()), 1), hkv, d)
    k = cp.random.standard_normal(shape, dtype=cp.float32).astype(dt)
    v = cp.random.standard_normal(shape, dtype=cp.float32).astype(dt)
    return q, k, v, cp.asarray(lens), table


def main(argv=None):
    """``python -m cupy_lean bench``: time the decompositions and kernel
    variants on this GPU; returns the exit status."""
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    from .kernels import require_device

    require_device()
    import cupy as cp

    import cupy_lean

    rng = np.random.default_rng(0)
    first = _inputs(args, rng)
    kv_bytes = 2 * int(np.sum(args.lens)) * args.heads_kv * args.head_dim * 2
    l2 = int(cp.cuda.Device().attributes["L2CacheSize"])
    n_copies = 1
    if args.cold_l2:
        free = cp.cuda.runtime.memGetInfo()[0]
        n_copies = int(min(max(2, -(-4 * l2 // max(kv_bytes, 1))), max(1, free // (3 * max(kv_bytes, 1))), 64))
    sets = [first] + [_inputs(args, rng) for _ in range(n_copies - 1)]
    outs = [cp.empty_like(s[0]) for s in sets]
    variants = [dict(schedule=s) for s in args.schedules.split(",") if s]
    for key, name in (("tile_sizes", "tile_size"), ("num_ctas", "num_ctas"), ("stages", "stages"),
                      ("ctas_per_sm", "ctas_per_sm")):
        for val in getattr(args, key) or []:
            variants.append({"schedule": "lean", name: val})
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"{name}: batch {len(args.lens)}, heads {args.heads_q}/{args.heads_kv}, head_dim {args.head_dim}, "
          f"{args.dtype}, {'paged %d' % args.page_size if args.page_size else 'dense'}, "
          f"{kv_bytes / 1e6:.1f} MB of K/V, {n_copies} input cop{'y' if n_copies == 1 else 'ies'} "
          f"({'cold' if args.cold_l2 else 'warm'} L2)")
    print(f"{'variant':34s} {'kernel':40s} {'grid':>6s} {'us':>9s} {'TB/s':>6s}")
    for var in variants:
        label = ", ".join(f"{k}={v}" for k, v in var.items())
        q, k, v, lens, table = first
        try:
            p = cupy_lean.plan(q, k, v, kv_lens=lens, block_table=table, out=outs[0], **var)
        except (ValueError, TypeError) as exc:
            print(f"{label:34s} refused: {exc}")
            continue

        def call(i, p=p):
            qq, kk, vv, ll, tt = sets[i]
            p.run(qq, kk, vv, kv_lens=ll, block_table=tt, out=outs[i])

        us = graph_time(call, n_copies, repeats=args.repeats)
        print(f"{label:34s} {p.spec.name:40s} {p.grid:6d} {us:9.1f} {kv_bytes / us / 1e6:6.2f}")
    return 0

"""An experiment for fp8 caches at head_dim 64: read two neighbouring KV
heads as one 128-wide head (128 contiguous bytes a token instead of 64).

At head_dim 64 an fp8 row of one KV head is 64 bytes. Where tokens lie at
scattered places (pages of one or a few tokens), each CTA then asks the
memory system for half-lines, and such calls stream at about 0.6x of the
16-bit rate. In the usual layout (tokens, heads, head_dim) the next head's
64 bytes follow, so K and V viewed as ``(..., heads_kv / 2, 128)`` are the
same memory read in full lines. The scores of query head i use only its own
KV head's half: with ``q`` padded by zeros in the other half (``pair_q``),
``q' . k'`` is exactly ``q . k`` (the zeros add nothing), so the paired call
is a head_dim-128 call of ``heads_kv / 2`` KV heads whose output rows carry
the wanted half (``unpair_out``) and, in the other half, values nobody
asked for. The scale must be passed as the head_dim-64 one. Scales per KV
head differ within a pair and are not handled here (one float each). An
odd last KV head runs as a call of its own (``paired_attention``).

    python tools/pair_heads_probe.py --family 18 --seed S [--dtype bfloat16] [--only 3,7] [--out F.json]

The package now does this itself (``cupy_lean.kernels.pair_heads``, one
launch of head pairs with the padding and unpairing kernels); the probe
turns that off for its plain e4m3 call and stays as the experiment it was.

Times, per drawn shape with head_dim 64 and two or more KV heads (an odd
last one takes a second, unpaired call of its own): the 16-bit
call, the e4m3 call, and the paired e4m3 call (the attention call alone,
with the padding and unpairing done by CuPy slice copies, and with one
kernel launch each: the package's ``lean_pair_heads``), plus the largest difference between the
paired and the plain e4m3 outputs. CPU: ``--check`` runs the transform
on small NumPy inputs through the reference path and compares (no GPU).
"""

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pair_q(q, group, out=None):
    """``q`` of shape ``(..., heads_q, 64)`` as ``(..., heads_q, 128)`` with
    query head i's values in the half of its KV head's place in a pair
    (``(i // group) % 2``) and zeros in the other half. ``out``: a buffer of
    that shape whose other halves are zero already (only the wanted halves
    are written)."""
    xp = sys.modules["cupy"] if type(q).__module__.startswith("cupy") else np
    *lead, hq, d = q.shape
    pairs = hq // (2 * group)
    if out is None:
        out = xp.zeros((*lead, hq, 2 * d), dtype=q.dtype)
    src = q.reshape(*lead, pairs, 2, group, d)
    dst = out.reshape(*lead, pairs, 2, group, 2, d)
    for j in (0, 1):
        dst[..., j, :, j, :] = src[..., j, :, :]
    return out


def unpair_out(o, group, out=None):
    """The wanted half of each row of a paired call's output ``(..., heads_q,
    128)``: ``(..., heads_q, 64)``, written into ``out`` when given."""
    xp = sys.modules["cupy"] if type(o).__module__.startswith("cupy") else np
    *lead, hq, d2 = o.shape
    d, pairs = d2 // 2, hq // (2 * group)
    if out is None:
        out = xp.empty((*lead, hq, d), dtype=o.dtype)
    src = o.reshape(*lead, pairs, 2, group, 2, d)
    dst = out.reshape(*lead, pairs, 2, group, d)
    for j in (0, 1):
        dst[..., j, :, :] = src[..., j, :, j, :]
    return out


def pair_kv(x):
    """The first ``2 * (heads_kv // 2)`` KV heads of a ``(..., heads_kv, 64)``
    cache whose heads lie 64 elements apart (the usual layout), viewed as
    ``(..., heads_kv // 2, 128)`` (no copy; an odd last head is left out)."""
    xp = sys.modules["cupy"] if type(x).__module__.startswith("cupy") else np
    *lead, hkv, d = x.shape
    st, isz = x.strides, x.itemsize
    if st[-1] != isz or st[-2] != d * isz:
        raise ValueError(f"pair_kv: needs heads {d} elements apart, got strides {st}")
    return xp.lib.stride_tricks.as_strided(x, shape=(*lead, hkv // 2, 2 * d), strides=(*st[:-2], 2 * d * isz, isz))


def paired_attention(attention, q, k, v, group, out, **kw):
    """``attention(q, k, v, out=out, **kw)`` computed through paired heads:
    one call on the pairs (q padded), and for an odd KV head count one more
    call on the last KV head and its query heads. ``out`` is written and
    returned; per-query-head ``sinks`` are split between the calls."""
    hkv = k.shape[-2]
    n = 2 * (hkv // 2) * group  # query heads of the pairs
    sinks = kw.pop("sinks", None)
    sa = {} if sinks is None else {"sinks": sinks[:n]}
    oa = attention(pair_q(q[..., :n, :], group), pair_kv(k), pair_kv(v), **kw, **sa)
    unpair_out(oa, group, out=out[..., :n, :])
    if hkv % 2:
        sb = {} if sinks is None else {"sinks": sinks[n:]}
        attention(q[..., n:, :], k[..., n // group:, :], v[..., n // group:, :], out=out[..., n:, :], **kw, **sb)
    return out


def check_cpu(seed=3):
    """The transform on NumPy inputs (the reference path), against the plain
    call: fp8 (uint8 storage), ragged lengths, sinks, a window, a soft-cap."""
    import ml_dtypes

    import cupy_lean

    rng = np.random.default_rng(seed)
    worst = 0.0
    for b, hkv, group, paged in ((3, 4, 3, False), (2, 6, 1, True), (4, 2, 5, True), (2, 3, 2, True),
                                 (3, 5, 1, False)):
        hq, d, n = hkv * group, 64, 70
        lens = rng.integers(0, n + 1, size=b).astype(np.int32)
        q = rng.standard_normal((b, hq, d)).astype(np.float16)
        kf = rng.standard_normal((b, n, hkv, d)).astype(ml_dtypes.float8_e4m3fn)
        vf = rng.standard_normal((b, n, hkv, d)).astype(ml_dtypes.float8_e4m3fn)
        k8, v8 = kf.view(np.uint8), vf.view(np.uint8)
        kw = dict(kv_lens=lens, kv_dtype="e4m3", k_scale=0.5, v_scale=1.5, sinks=rng.standard_normal(hq),
                  window_left=40, softcap=20.0, scale=0.125)
        if paged:  # one-token pages in a shuffled order
            perm = rng.permutation(b * n)
            table = perm.reshape(b, n).astype(np.int32)
            pages_k = np.empty((b * n, 1, hkv, d), np.uint8)
            pages_v = np.empty_like(pages_k)
            pages_k[perm] = k8.reshape(b * n, 1, hkv, d)
            pages_v[perm] = v8.reshape(b * n, 1, hkv, d)
            k8, v8, kw["block_table"] = pages_k, pages_v, table
        want = cupy_lean.attention(q, k8, v8, **kw)
        got = paired_attention(cupy_lean.attention, q, k8, v8, group, np.full_like(q, np.nan), **kw)
        if not np.isfinite(got).all():  # (a row the paired calls left unwritten stays NaN)
            return float("inf")
        worst = max(worst, float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()))
    print(f"pair_heads check (NumPy reference path): max |paired - plain| = {worst:.3g}")
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", type=int, default=18)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--only", default="", help="comma-separated indices of the drawn shapes")
    ap.add_argument("--check", action="store_true", help="CPU check of the transform only")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.check:
        return 0 if check_cpu() < 1e-2 else 1
    if a.seed is None:
        ap.error("--seed is needed (or --check)")
    import cupy as cp

    import cupy_lean
    from bench import cases as C
    from bench import family as F
    from cupy_lean.bench import graph_time

    only = {int(x) for x in a.only.split(",") if x.strip()}
    # the plain e4m3 call without the package's own head pairs (kernels.pair_heads, which grew out of this
    # probe): the probe's baseline is the unpaired call
    cupy_lean.kernels.TUNING["fp8_pair_heads_max_page"] = 0
    from cupy_lean import _plan
    from cupy_lean import kernels as K

    pair_k = K.util_function("lean_pair_heads")  # (the package's padding / unpairing kernel)
    rows = []
    for idx, case in enumerate(F.draw(a.family, a.seed)):
        if (only and idx not in only) or case.head_dim != 64 or case.heads_kv < 2:
            continue
        g, odd = case.group, case.heads_kv % 2
        nq = 2 * (case.heads_kv // 2) * g  # query heads of the pairs (an odd last KV head: a second call)
        n = C.plan_copies(case, 256e6, 30e9)
        inp = C.build_inputs(case, a.dtype, n)
        kw = inp.index_kwargs()
        outs = [cp.empty_like(x) for x in inp.q]
        t16 = graph_time(lambda i: cupy_lean.attention(inp.q[i], inp.k[i], inp.v[i], out=outs[i], **kw), n)
        k8 = [cp.ascontiguousarray(x.view(cp.uint8)[..., 1::2]) for x in inp.k]
        v8 = [cp.ascontiguousarray(x.view(cp.uint8)[..., 1::2]) for x in inp.v]
        del inp.k[:], inp.v[:]
        inp.fi_pages = []
        f8 = dict(kv_dtype="e4m3", k_scale=0.5, v_scale=0.5, scale=1 / 8.0, **kw)
        t8 = graph_time(lambda i: cupy_lean.attention(inp.q[i], k8[i], v8[i], out=outs[i], **f8), n)
        plain = outs[0].copy()
        qp = [pair_q(x[..., :nq, :], g) for x in inp.q]
        op = [cp.empty(x.shape, dtype=x.dtype) for x in qp]
        kp, vp = [pair_kv(x) for x in k8], [pair_kv(x) for x in v8]
        last = nq // g  # the odd last KV head

        def calls(i):  # the paired call (q padded already), and the odd last head's own call
            cupy_lean.attention(qp[i], kp[i], vp[i], out=op[i], **f8)
            if odd:
                cupy_lean.attention(inp.q[i][..., nq:, :], k8[i][..., last:, :], v8[i][..., last:, :],
                                    out=outs[i][..., nq:, :], **f8)

        tp = graph_time(calls, n)

        def whole(i):  # the copies a fused version would do, and the calls
            pair_q(inp.q[i][..., :nq, :], g, out=qp[i])
            calls(i)
            unpair_out(op[i], g, out=outs[i][..., :nq, :])

        tw = graph_time(whole, n)
        outs[0].fill(cp.nan)
        whole(0)
        diff = float(cp.abs(outs[0].astype(cp.float32) - plain.astype(cp.float32)).max())  # (NaN: a row unwritten)
        tf = diff_f = None
        if not odd:  # (the kernels take whole contiguous q / out)
            rows_q = _plan._pair_rows(inp.q[0].shape, inp.q[0].strides, 2)
            rows_o = _plan._pair_rows(outs[0].shape, outs[0].strides, 2)
            grid = (int(min(1024, -(-int(rows_q[0]) * 128 // 256))),)

            def fused(i):  # one padding kernel, the call, one unpairing kernel
                pair_k(grid, (256,), (inp.q[i], qp[i]) + rows_q + (np.int32(g), np.int32(1)))
                cupy_lean.attention(qp[i], kp[i], vp[i], out=op[i], **f8)
                pair_k(grid, (256,), (op[i], outs[i]) + rows_o + (np.int32(g), np.int32(0)))

            try:
                tf = graph_time(fused, n)
                outs[0].fill(cp.nan)
                fused(0)
                diff_f = float(cp.abs(outs[0].astype(cp.float32) - plain.astype(cp.float32)).max())
            except Exception as exc:  # (an experiment: say why, keep the other columns)
                tf = diff_f = None
                print(f"    fused copies failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        rows.append({"case": case.name, "fp16_us": t16, "fp8_us": t8, "paired_fp8_us": tp, "paired_with_copies_us": tw,
                     "paired_fused_us": tf, "max_abs_diff": diff, "max_abs_diff_fused": diff_f, "odd": bool(odd)})
        fz = "" if tf is None else f"  fused {tf:8.1f} ({tf / t16:.3f}, diff {diff_f:.2g})"
        print(f"{case.name:48s} 16-bit {t16:8.1f} us  e4m3 {t8:8.1f} ({t8 / t16:.3f})  paired {tp:8.1f} "
              f"({tp / t16:.3f})  with copies {tw:8.1f} ({tw / t16:.3f}){fz}  diff {diff:.2g}", flush=True)
        inp.free()
        k8 = v8 = kp = vp = qp = op = outs = None
        cp.get_default_memory_pool().free_all_blocks()
    if rows:
        gm = lambda key: math.exp(sum(math.log(r[key] / r["fp16_us"]) for r in rows) / len(rows))  # noqa: E731
        fused = "" if any(r["paired_fused_us"] is None for r in rows) else f", fused {gm('paired_fused_us'):.3f}"
        fused += f" ({sum(r['odd'] for r in rows)} of odd KV head counts: two calls)"
        print(f"pair_heads seed {a.seed} {a.dtype}: {len(rows)} shapes; time / 16-bit geomean: e4m3 "
              f"{gm('fp8_us'):.3f}, paired {gm('paired_fp8_us'):.3f}, paired with copies "
              f"{gm('paired_with_copies_us'):.3f}{fused}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"seed": a.seed, "dtype": a.dtype, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

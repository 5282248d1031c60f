"""A one-minute GPU check of the kernel paths most likely to break, before the
full GPU suite: each case runs the lean kernel once into a NaN-prefilled
output and compares it with the float64 reference; a hang is caught by the
caller's timeout (device_cycle's ``smoke`` step runs this under one).

    python tools/smoke.py [--cpu]

(``--cpu``: the same cases through the NumPy path, to check this script
without a GPU; about two minutes on 2 cores.)

Cases: fp16 / bf16 q over e4m3 and e5m2 caches at head_dim 64, 128, 256 with
one and two query tiles, dense and paged; paged fp16 at page sizes 1, 7, 16,
48 (the page divisor) with lengths past 2^17; a few-unit ragged batch (the
merge launch and the launch-time split); a batch of 300 sequences; on the
GPU also the host side of launches (two streams, a graph, a caller's
workspace, a dropped plan). Prints one line per case and a summary; exits 1
on any failure.
"""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inputs(rng, lens, hq, hkv, d, dt, layout, page_size=16):
    from bench import cases as C

    q = rng.standard_normal((len(lens), hq, d)).astype(dt)
    case = C.Case("smoke", len(lens), hq, hkv, d, tuple(int(n) for n in lens), layout, "smoke", page_size)
    if layout == "paged":  # pages handed out in a shuffled order (the benchmark's page lists)
        pages, table, *_ = C.page_lists(case, seed=int(rng.integers(1 << 30)))
        shape = (pages, page_size, hkv, d)
    else:
        table, shape = None, (len(lens), max(case.max_len, 1), hkv, d)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    return q, k, v, np.asarray(lens, np.int32), table


class _NumPyAsCuPy:
    """The few CuPy calls used here, on NumPy (``--cpu``)."""
    float32 = np.float32
    nan = np.nan
    asarray = staticmethod(np.asarray)
    full = staticmethod(np.full)
    asnumpy = staticmethod(np.asarray)


def main(argv=None):
    import ml_dtypes

    args = sys.argv[1:] if argv is None else argv
    if set(args) - {"--cpu"}:  # --help, or anything else: the usage, nothing run
        raise SystemExit(__doc__ if set(args) & {"-h", "--help"} else f"unknown arguments {args}\n{__doc__}")
    if "--cpu" in args:
        cp = _NumPyAsCuPy()
    else:
        import cupy as cp

    import cupy_lean
    from cupy_lean import reference

    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(7)
    cases = []
    for fmt, f8 in (("e4m3", ml_dtypes.float8_e4m3fn), ("e5m2", ml_dtypes.float8_e5m2)):
        for dt in (np.float16, bf16):
            for d, hq, hkv in ((64, 8, 2), (128, 20, 1), (256, 6, 2)):
                for layout in ("dense", "paged"):
                    cases.append(("fp8", fmt, f8, dt, d, hq, hkv, layout, 16, [2049, 1, 0, 333]))
    for ps in (1, 7, 16, 48):
        cases.append(("plain", None, None, np.float16, 128, 8, 2, "paged", ps, [140001, 3, 9000]))
    cases.append(("plain", None, None, bf16, 64, 16, 4, "paged", 16, [30001, 17, 0, 9000]))  # few units
    cases.append(("plain", None, None, np.float16, 128, 4, 1, "dense", 16, list(rng.integers(0, 700, 300))))
    failed = 0
    t0 = time.time()
    for kind, fmt, f8, dt, d, hq, hkv, layout, ps, lens in cases:
        q, k, v, L, table = _inputs(rng, lens, hq, hkv, d, dt, layout, ps)
        kw = dict(kv_lens=cp.asarray(L))
        if table is not None:
            kw["block_table"] = cp.asarray(table)
        name = f"{kind} {fmt or ''} {np.dtype(dt).name} d{d} {hq}/{hkv} {layout} page {ps} B{len(L)}"
        try:
            if kind == "fp8":
                ks = rng.uniform(0.5, 2.0, hkv)
                k8, v8 = (k / ks[None, None, :, None]).astype(f8), (v * 2.0).astype(f8)
                ro, rl = reference.attention(q, k8, v8, kv_lens=L, block_table=table, k_scale=ks, v_scale=0.5)
                out = cp.full(q.shape, cp.nan, dtype=q.dtype)
                lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
                cupy_lean.attention(cp.asarray(q), cp.asarray(k8.view(np.uint8)), cp.asarray(v8.view(np.uint8)),
                                    kv_dtype=fmt, k_scale=cp.asarray(ks, dtype=cp.float32), v_scale=0.5,
                                    out=out, lse=lse, **kw)
            else:
                k16, v16 = k.astype(dt), v.astype(dt)
                ro, rl = reference.attention(q, k16, v16, kv_lens=L, block_table=table)
                out = cp.full(q.shape, cp.nan, dtype=q.dtype)
                lse = cp.full(q.shape[:2], cp.nan, dtype=cp.float32)
                cupy_lean.attention(cp.asarray(q), cp.asarray(k16), cp.asarray(v16), out=out, lse=lse, **kw)
            g = cp.asnumpy(out).astype(np.float64)
            gl = cp.asnumpy(lse).astype(np.float64)
            tol = (4e-3 if dt == np.float16 else 2e-2) * max(1.0, np.abs(ro).max())
            err = float(np.abs(g - ro).max()) if np.isfinite(g).all() else float("inf")
            fin = np.isfinite(rl)
            lerr = float(np.abs(gl[fin] - rl[fin]).max()) if fin.any() else 0.0
            ok = err < tol and lerr < 2e-3 * max(1.0, np.abs(rl[fin]).max() if fin.any() else 1.0) \
                and np.array_equal(np.isfinite(gl), fin)
        except Exception as exc:  # report and go on: one broken path must not hide the others
            ok, err, lerr = False, float("nan"), float("nan")
            name += f" ({type(exc).__name__}: {exc})"
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: out err {err:.2e}, lse err {lerr:.2e}", flush=True)
    n = len(cases)
    if not isinstance(cp, _NumPyAsCuPy):
        for name, ok, detail in _launch_path_cases(cp, cupy_lean, reference, rng):
            n += 1
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} launch path: {name}{detail}", flush=True)
    print(f"smoke: {n - failed} of {n} passed in {time.time() - t0:.0f} s")
    return 1 if failed else 0


def _launch_path_cases(cp, cupy_lean, reference, rng):
    """The host side of launches (streams, a graph, a caller's workspace, a
    dropped plan), each into a NaN-prefilled output against the reference:
    ``(name, ok, detail)`` per case."""
    lens = np.array([9000, 300, 5000, 77], np.int32)
    q = rng.standard_normal((4, 32, 128)).astype(np.float16)
    k = rng.standard_normal((4, 9000, 4, 128)).astype(np.float16)
    v = rng.standard_normal((4, 9000, 4, 128)).astype(np.float16)
    ro, _ = reference.attention(q, k, v, kv_lens=lens)
    qg, kg, vg, lg = cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(lens)
    cp.cuda.Device().synchronize()

    def check(out):
        g = cp.asnumpy(out).astype(np.float64)
        err = float(np.abs(g - ro).max()) if np.isfinite(g).all() else float("inf")
        return err < 4e-3 * max(1.0, np.abs(ro).max()), f": out err {err:.2e}"

    def case(name, fn):
        try:
            return (name,) + check(fn())
        except Exception as exc:  # report and go on
            return name, False, f" ({type(exc).__name__}: {exc})"

    def two_streams():
        s1, s2 = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
        with s1:
            cupy_lean.attention(qg, kg, vg, kv_lens=lg, num_ctas=40)
        with s2:
            out = cp.full(q.shape, cp.nan, dtype=cp.float16)
            cupy_lean.attention(qg, kg, vg, kv_lens=lg, num_ctas=40, out=out)
            s2.synchronize()
        return out

    def graph():
        s = cp.cuda.Stream(non_blocking=True)
        out = cp.full(q.shape, cp.nan, dtype=cp.float16)
        with s:
            cupy_lean.attention(qg, kg, vg, kv_lens=lg, num_ctas=41, out=out)
            s.synchronize()
            s.begin_capture()
            try:
                cupy_lean.attention(qg, kg, vg, kv_lens=lg, num_ctas=41, out=out)
            finally:
                g = s.end_capture()
            out.fill(cp.nan)
            g.launch(s)
            s.synchronize()
        return out

    def caller_workspace():
        p = cupy_lean.plan(qg, kg, vg, kv_lens=lg, num_ctas=42)
        ws = cp.full(p.workspace_bytes, 0xFF, dtype=cp.uint8)
        p = cupy_lean.plan(qg, kg, vg, kv_lens=lg, num_ctas=42, workspace=ws)
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            out = cp.full(q.shape, cp.nan, dtype=cp.float16)
            p.run(qg, kg, vg, kv_lens=lg, out=out)
            s.synchronize()
        return out

    def dropped_plan():
        import gc

        a, b = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
        p = cupy_lean.plan(qg, kg, vg, kv_lens=lg, num_ctas=43)
        nbytes = max(p.workspace_bytes, 256)
        with a:
            p.run(qg, kg, vg, kv_lens=lg)
            a.synchronize()
        with b:
            out = cp.full(q.shape, cp.nan, dtype=cp.float16)
            p.run(qg, kg, vg, kv_lens=lg, out=out)
        del p
        gc.collect()
        with a:
            for blk in [cp.empty(nbytes, dtype=cp.uint8) for _ in range(4)]:
                blk.fill(1)
        b.synchronize()
        a.synchronize()
        return out

    return [case("two streams", two_streams), case("a graph replayed", graph),
            case("a caller's workspace on another stream", caller_workspace),
            case("a plan dropped while its launch runs", dropped_plan)]


if __name__ == "__main__":
    sys.exit(main())

"""Decode-attention sweep: ``python -m bench.run`` (or ``python bench/run.py``).

In one process: the HBM read ceiling (a streaming read kernel of our own),
then every (dtype, case) with cupy_lean's three schedules and the peers that
import (PyTorch SDPA flash / cuDNN on dense uniform cases, FlashInfer's paged
decode with and without tensor cores everywhere). Each row: K/V bytes, device
time per call (CUDA-graph replays over rotating input copies, cold L2),
eager per-call latency from Python, TB/s, fraction of the ceiling, speedup
over the best peer, max abs difference from lean's output. Writes CSV, JSON
and two PNGs under ``--out`` (default ``bench/results``), prints a short table
and the targets last.

``main(argv)`` is the entry point (``python -m cupy_lean bench`` calls
``main(["--short"])``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import signal
import sys
import time
from typing import Dict, List, Optional

if __package__ in (None, ""):  # python bench/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cases as C  # noqa: E402
from bench import report as R  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "bench", "results")
DTYPE_ALIASES = {"float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
                 "bfloat16": "bfloat16", "bf16": "bfloat16"}
DEFAULT_BUDGET_S = 400.0

#: Errors after which the CUDA context is unusable: stop starting new cases.
STICKY = ("illegal memory access", "illegal address", "unspecified launch failure", "misaligned address",
          "cudaErrorLaunchFailure", "CUDA_ERROR_ILLEGAL", "device-side assert", "hardware stack error",
          "illegal instruction")


DIFF_TOL = R.DIFF_TOL


def _note(r, text):
    r["note"] = f"{r['note']}; {text}" if r.get("note") else text


class _Stop(BaseException):
    """SIGTERM: finish writing the results."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Decode-attention sweep of cupy_lean's schedules (lean, split, head) against PyTorch SDPA "
                    "and FlashInfer: device time under CUDA graphs with cold L2, eager latency, bandwidth, "
                    "speedups and targets; CSV, JSON and PNG under --out.")
    p.add_argument("--short", action="store_true",
                   help="a few cases, fp16 only (what `python -m cupy_lean bench` runs)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated dtypes among float16,bfloat16 (fp16, bf16 accepted); "
                        "default both, fp16 with --short")
    p.add_argument("--cases", default=None,
                   help="comma-separated substrings; keep cases whose name contains one (see --list)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods among {','.join(R.METHODS)}; default all but invariant "
                        f"(lean with batch_invariant=True)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="output folder (default bench/results)")
    p.add_argument("--tag", default=None, help="file name tag: bench_TAG.{csv,json} (default full / short)")
    p.add_argument("--no-peers", action="store_true", help="only cupy_lean's three schedules")
    p.add_argument("--time-budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                   help=f"stop starting new cases after this much wall time, then write what was "
                        f"measured (default {DEFAULT_BUDGET_S:.0f}; 0 = no limit)")
    p.add_argument("--repeats", type=int, default=7, help="timed graph replays per measurement (median)")
    p.add_argument("--rotate-mb", type=float, default=256.0,
                   help="K/V bytes the rotating input copies add up to at least (default 256 MB, L2 is 50 MB)")
    p.add_argument("--mem-gb", type=float, default=40.0,
                   help="device memory the input copies of one case may take (default 40 GB)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--prebuild", action="store_true",
                   help="only compile: cupy_lean's kernels and FlashInfer's JIT modules of the selection, then exit")
    p.add_argument("--list", action="store_true", help="list the selected cases with K/V bytes and floors, then exit")
    p.add_argument("--family", type=int, default=None, metavar="N",
                   help="instead of the fixed cases, N shapes drawn at random from the family (bench/family.py): "
                        "what speed is judged on; ends with the family summary lines")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of --family (default: a fresh one, printed)")
    p.add_argument("--tuning", action="append", default=[], metavar="KEY=VALUE",
                   help="set cupy_lean.kernels.TUNING[KEY] = VALUE (a Python literal) for the whole run, e.g. "
                        "invariant_splits=16; repeatable; recorded in the JSON's meta")
    return p


def parse_tuning(items: List[str]) -> dict:
    """``KEY=VALUE`` strings as a dict of TUNING changes (values: Python
    literals); SystemExit naming a malformed item or an unknown key."""
    import ast

    from cupy_lean.kernels import TUNING

    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or key not in TUNING:
            raise SystemExit(f"--tuning: expected KEY=VALUE with KEY among {sorted(TUNING)}, got {item!r}")
        try:
            out[key] = ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            raise SystemExit(f"--tuning: {key}: expected a Python literal, got {val.strip()!r}") from None
    return out


def _split(s: Optional[str]) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def parse_dtypes(s: Optional[str], short: bool) -> List[str]:
    names = _split(s)
    if not names:
        return ["float16"] if short else list(C.DTYPES)
    out = []
    for n in names:
        d = DTYPE_ALIASES.get(n.lower())
        if d is None:
            raise SystemExit(f"--dtypes: expected float16 or bfloat16, got {n!r}")
        if d not in out:
            out.append(d)
    return out


def parse_methods(s: Optional[str], no_peers: bool) -> List[str]:
    names = _split(s) or list(R.DEFAULT_METHODS)
    for n in names:
        if n not in R.METHODS:
            raise SystemExit(f"--methods: expected names among {', '.join(R.METHODS)}, got {n!r}")
    if no_peers:
        names = [n for n in names if n in R.OURS]
    # lean first: it is the reference of max_abs_diff
    return sorted(dict.fromkeys(names), key=R.METHODS.index)


def list_cases(cases, dtypes, ceiling_tbps=C.H100_CEILING_TBPS) -> str:
    lines = [f"{'case':<24} {'layout':<7} {'B':>3} {'Hq/Hkv':>7} {'D':>4} {'tokens':>9} {'KV MB':>9} "
             f"{'floor us':>9}  (floor: K/V bytes at {ceiling_tbps} TB/s, a typical H100 read ceiling; a run "
             f"measures its own; dtypes {','.join(dtypes)})"]
    for c in cases:
        lines.append(f"{c.name:<24} {c.layout:<7} {c.batch:>3} {c.heads_q:>3}/{c.heads_kv:<3} {c.head_dim:>4} "
                     f"{c.total_tokens:>9} {c.kv_bytes() / 1e6:>9.1f} {C.floor_us(c, ceiling_tbps):>9.1f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- progress

class Progress:
    """A text progress bar on stderr (one line per step when not a TTY)."""

    def __init__(self, total: int, stream=None):
        self.total = max(1, total)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()

    def _bar(self, done):
        w = 24
        k = int(w * done / self.total)
        return "[" + "#" * k + "." * (w - k) + "]"

    def step(self, done: int, label: str):
        el = time.perf_counter() - self.t0
        msg = f"{self._bar(done)} {done}/{self.total} {el:5.0f}s {label}"
        if self.tty:
            self.stream.write("\r" + msg[:150].ljust(150))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def info(self, msg: str):
        if self.tty:
            self.stream.write("\r" + " " * 150 + "\r")
        self.stream.write(msg + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def log(msg: str):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------------- meta

def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def collect_meta(args, cases, dtypes, methods) -> dict:
    import cupy as cp
    import numpy as np

    import cupy_lean

    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props.get("name", b"?")
    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    gpu = {
        "name": name,
        "device_id": dev.id,
        "compute_capability": f"{props.get('major', '?')}.{props.get('minor', '?')}",
        "sm_count": int(props.get("multiProcessorCount", 0)),
        "l2_bytes": int(props.get("l2CacheSize", 0)),
        "memory_bytes": int(props.get("totalGlobalMem", 0)),
    }
    try:
        rt = _cuda_version(cp.cuda.runtime.runtimeGetVersion())
    except Exception:
        rt = None
    try:
        drv = _cuda_version(cp.cuda.runtime.driverGetVersion())
    except Exception:
        drv = None
    versions = {
        "cupy_lean": getattr(cupy_lean, "__version__", "?"),
        "cupy": cp.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cuda_runtime": rt,
        "cuda_driver": drv,
        "torch": None, "torch_cuda": None, "cudnn": None, "flashinfer": None,
    }
    return {
        "gpu": gpu,
        "versions": versions,
        "read_ceiling_tbps": None,
        "read_ceiling": None,
        "argv": None,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "dtypes": dtypes,
        "methods": methods,
        "timing": {
            "device_us": "median over replays of a CUDA graph of n_calls calls over n_copies rotating input "
                         "copies (copies * K/V bytes >= rotate_bytes), per call",
            "eager_us": "wall time of back-to-back calls on copy 0 from Python / count, one sync at the end; "
                        "median of 3 loops",
            "repeats": args.repeats,
            "rotate_bytes": args.rotate_mb * 1e6,
            "mem_bytes": args.mem_gb * 1e9,
            "cupy_lean_call": "attention(q, k, v, kv_lens=None|int32, block_table=None|int32, schedule=..., "
                              "validate=False); out= preallocated inside graphs",
        },
        "time_budget_s": args.time_budget,
        "tuning_changes": parse_tuning(args.tuning),
        "stopped_early": None,
        "notes": [],
        "cases": [c.to_json() for c in cases],
    }


# ---------------------------------------------------------------------- the sweep

class Sweep:
    def __init__(self, args, cases, dtypes, methods, argv):
        self.args = args
        self.cases = cases
        self.dtypes = dtypes
        self.method_names = methods
        self.argv = argv
        self.t0 = time.perf_counter()
        self.rows: List[dict] = []
        self.row_index: Dict[tuple, dict] = {}
        self.deferred: Dict[tuple, List[str]] = {}  # (case, dtype) -> FlashInfer methods not yet run
        self.remeasure: Dict[tuple, List[str]] = {}  # (case, dtype) -> methods whose eager ran during the JIT build
        self.builder = None
        self.fatal: Optional[str] = None
        self.stop_reason: Optional[str] = None
        self.tag = args.tag or (f"family_s{args.seed}" if args.family else ("short" if args.short else "full"))

    # .................................................................. helpers

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        b = self.args.time_budget
        return bool(b and b > 0 and self.elapsed() > b)

    def free(self):
        import cupy as cp

        from bench import peers

        for step in (lambda: cp.cuda.Device().synchronize(),
                     lambda: peers.torch_release() if "mod" in peers._torch_state else None,
                     lambda: cp.get_default_memory_pool().free_all_blocks(),
                     lambda: cp.get_default_pinned_memory_pool().free_all_blocks()):
            try:
                step()
            except Exception as exc:  # a broken context shows in the next rows
                log(f"  cleanup: {type(exc).__name__}: {exc}"[:300])

    def base_row(self, case, dtype, mname, kind) -> dict:
        r = {f: None for f in R.FIELDS}
        r.update(case.row_fields(2))
        r.update(dtype=dtype, method=mname, kind=kind, status="ok")
        return r

    def add_row(self, r):
        key = (r["case"], r["dtype"], r["method"])
        old = self.row_index.get(key)
        if old is not None:
            old.update(r)
        else:
            self.rows.append(r)
            self.row_index[key] = r

    def add_fi_failed_row(self, case, dtype, m):
        """An error row for a FlashInfer method whose JIT build failed."""
        r = self.base_row(case, dtype, m.name, m.kind)
        why = self.builder.failed.get((dtype, case.head_dim, m.name == "flashinfer-tc"), "?")
        r.update(status="error", error="FlashInfer JIT build failed: " + why[-600:])
        self.add_row(r)

    def write(self, final=False):
        meta = self.meta
        meta["wall_s"] = self.elapsed()
        meta["stopped_early"] = self.stop_reason
        from bench import peers

        meta["versions"].update({k: v for k, v in peers.peer_versions().items() if v is not None})
        if self.builder is not None:
            meta["flashinfer_jit"] = {"groups": self.builder.log, "max_jobs": os.environ.get("MAX_JOBS"),
                                      "running": self.builder.running}
        return R.write_all(self.args.out, self.tag, meta, self.rows, plots=final and not self.args.no_plots)

    # .................................................................. setup

    def setup_peers(self, progress_log):
        from bench import peers

        names = list(self.method_names)
        notes = self.meta["notes"]
        if any(n in R.PEERS for n in names):
            try:
                peers.import_torch()
            except peers.Unavailable as exc:
                dropped = [n for n in names if n in R.PEERS]
                names = [n for n in names if n not in R.PEERS]
                notes.append(f"skipped {', '.join(dropped)}: {exc}")
        if any(n in R.FLASHINFER for n in names):
            try:
                peers.import_flashinfer()
                combos = peers.fi_combos(self.cases, self.dtypes, names)
                self.builder = peers.FlashInferBuild(combos, self.dtypes).start()
                progress_log(f"FlashInfer JIT build started in the background: {len(combos)} modules, "
                             f"MAX_JOBS={os.environ.get('MAX_JOBS')}")
            except peers.Unavailable as exc:
                dropped = [n for n in names if n in R.FLASHINFER]
                names = [n for n in names if n not in R.FLASHINFER]
                notes.append(f"skipped {', '.join(dropped)}: {exc}")
            except Exception as exc:  # generating the JIT specs failed: plan() will try itself
                notes.append(f"FlashInfer JIT prebuild not started ({type(exc).__name__}: {exc}); "
                             f"plan() compiles on first use")
        for n in notes:
            progress_log("note: " + n)
        self.method_names = names
        self.methods = peers.make_methods(names, self.builder)

    def fi_state(self, method, case, dtype) -> str:
        if self.builder is None:
            return "ready"
        return self.builder.state((dtype, case.head_dim, method.name == "flashinfer-tc"))

    # .................................................................. checks

    def check_diff(self, r, dtype, d, against):
        if not math.isfinite(d):
            _note(r, f"non-finite output (or non-finite {against})")
            return
        r["max_abs_diff"] = d
        tol = DIFF_TOL.get(dtype, 5e-2)
        if d > tol:
            _note(r, f"MISMATCH vs {against}: max abs diff {d:.3g} > {tol:g}")

    def check_lean(self, r, inp, out0):
        """lean's max_abs_diff: against a float32 CuPy reference where the
        case is dense and small enough, else None (not checked here: lean is
        the reference of the peers' diffs, and a note says so)."""
        import cupy as cp

        from bench import peers

        r["max_abs_diff"] = None
        try:
            ref32 = peers.reference_f32(inp)
        except Exception as exc:
            _note(r, f"float32 reference failed: {type(exc).__name__}: {exc}"[:200])
            return
        if ref32 is None:
            if not bool(cp.isfinite(out0).all()):
                _note(r, "non-finite output")
            _note(r, "output not checked against a reference (the peers' diffs are against it)")
            return
        self.check_diff(r, inp.dtype, float(cp.abs(out0 - ref32).max()), "float32 reference")
        if r.get("max_abs_diff") is not None:
            _note(r, "max_abs_diff vs a float32 reference")

    # .................................................................. one unit

    def run_unit(self, case, dtype, plan):
        """Measure ``plan``: a list of (method, mode) with mode "full" (graph +
        eager + diff), "eager" (re-time eager only) or "ref" (only lean's
        output, the reference of the diffs)."""
        import cupy as cp

        from bench import timing

        a = self.args
        n_copies = C.plan_copies(case, a.rotate_mb * 1e6, a.mem_gb * 1e9)
        ceil = self.meta.get("read_ceiling_tbps") or C.H100_CEILING_TBPS
        est_us = C.floor_us(case, ceil) + 5.0
        n_calls = timing.calls_per_graph(n_copies, est_us)
        inp = None
        ref = None
        build_running = self.builder is not None and self.builder.running
        try:
            inp = C.build_inputs(case, dtype, n_copies)
            for m, mode in plan:
                if self.fatal:
                    break
                r = self.base_row(case, dtype, m.name, m.kind) if mode == "full" else None
                if r is not None:
                    reason = m.applicable(case)
                    if reason:
                        r.update(status="n/a", note=reason)
                        self.add_row(r)
                        continue
                    r.update(n_copies=n_copies, n_calls=n_calls)
                bound = None
                try:
                    bound = m.setup(inp)
                    with bound.context():
                        out0 = bound.first_output()
                        try:
                            if m.name == "lean":
                                ref = out0
                                if r is not None:
                                    self.check_lean(r, inp, out0)
                            elif ref is not None and r is not None:
                                self.check_diff(r, dtype, float(cp.abs(out0 - ref).max()), "lean")
                        except Exception as exc:  # a check must not lose the timing
                            if r is not None:
                                _note(r, f"output check failed: {type(exc).__name__}: {exc}"[:200])
                        del out0
                        if mode == "ref":
                            continue
                        if mode == "full":
                            timer = timing.graph_time_cupy if bound.framework == "cupy" else timing.graph_time_torch
                            g = timer(bound.graph_call, n_copies, n_calls, a.repeats)
                            r.update(device_us=g["median_us"], device_us_min=g["min_us"], device_us_max=g["max_us"])
                            dev_us = g["median_us"]
                        else:
                            dev_us = (self.row_index.get((case.name, dtype, m.name)) or {}).get("device_us")
                        e = timing.eager_time(bound.eager_call, bound.sync, timing.eager_calls(dev_us))
                        if mode == "full":
                            r["eager_us"] = e
                            if bound.note:
                                _note(r, bound.note)
                            if build_running or (self.builder is not None and self.builder.running):
                                self.remeasure.setdefault((case.name, dtype), []).append(m.name)
                        else:
                            old = self.row_index.get((case.name, dtype, m.name))
                            if old is not None:
                                prev = old.get("eager_us")
                                old["eager_us"] = e if prev is None else min(prev, e)
                                _note(old, "eager: min of two measurements, the first during the FlashInfer JIT build")
                except Exception as exc:
                    msg = f"{type(exc).__name__}: {exc}".strip()
                    if r is not None:
                        r.update(status="error", error=msg[:800], device_us=None)
                    else:
                        log(f"  {case.name} {dtype} {m.name} ({mode}): {msg[:300]}")
                    if any(s.lower() in msg.lower() for s in STICKY):
                        self.fatal = f"{case.name} {dtype} {m.name}: {msg[:300]}"
                finally:
                    if bound is not None:
                        try:
                            bound.release()
                        except Exception:
                            pass
                    if r is not None:
                        self.add_row(r)
        except Exception as exc:  # building the inputs failed (memory?): every planned row says so
            msg = f"inputs: {type(exc).__name__}: {exc}"[:800]
            for m, mode in plan:
                if mode == "full" and (case.name, dtype, m.name) not in self.row_index:
                    r = self.base_row(case, dtype, m.name, m.kind)
                    r.update(status="error", error=msg)
                    self.add_row(r)
            if any(s.lower() in msg.lower() for s in STICKY):
                self.fatal = msg
        finally:
            if inp is not None:
                inp.free()
            del inp, ref
            self.free()

    # .................................................................. passes

    def main_pass(self, prog):
        units = [(dt, c) for dt in self.dtypes for c in self.cases]
        done = 0
        for i, (dt, case) in enumerate(units):
            if self.fatal:
                self.stop_reason = f"CUDA context unusable after: {self.fatal}"
                break
            if self.over_budget():
                self.stop_reason = (f"time budget {self.args.time_budget:g} s reached after {i} of "
                                    f"{len(units)} case-dtypes")
                break
            prog.step(i, f"{case.name} {R.SHORT_DTYPE[dt]}")
            plan = []
            for m in self.methods:
                if m.name in R.FLASHINFER and m.applicable(case) is None:
                    st = self.fi_state(m, case, dt)
                    if st == "building":
                        self.deferred.setdefault((case.name, dt), []).append(m.name)
                        continue
                    if st == "failed":
                        self.add_fi_failed_row(case, dt, m)
                        continue
                plan.append((m, "full"))
            self.run_unit(case, dt, plan)
            done = i + 1
            prog.info(self.unit_summary(case, dt, done, len(units)))
            self.write(final=False)
        prog.step(done, "main pass done")

    def catch_up(self, prog):
        """FlashInfer rows deferred while its JIT build ran, and eager
        re-measurements of the rows timed during the build."""
        keys = list(dict.fromkeys(list(self.deferred) + list(self.remeasure)))
        if not keys:
            return
        if self.builder is not None and self.builder.running:
            left = (self.args.time_budget - self.elapsed()) if self.args.time_budget else None
            prog.info(f"waiting for the FlashInfer JIT build ({'no limit' if left is None else f'{max(0, left):.0f} s left'})")
            self.builder.wait(None if left is None else max(0.0, left))
        by_case = {c.name: c for c in self.cases}
        for j, (cname, dt) in enumerate(keys):
            case = by_case[cname]
            fi = self.deferred.get((cname, dt), [])
            if self.fatal or self.over_budget():
                why = "CUDA context unusable" if self.fatal else "time budget reached"
                for mn in fi:
                    r = self.base_row(case, dt, mn, "peer")
                    r.update(status="skipped", note=f"FlashInfer JIT build or catch-up not done: {why}")
                    self.add_row(r)
                for mn in self.remeasure.get((cname, dt), []):
                    old = self.row_index.get((cname, dt, mn))
                    if old is not None:
                        _note(old, "eager measured while the FlashInfer JIT build ran (not re-measured)")
                self.stop_reason = self.stop_reason or f"catch-up cut short: {why}"
                continue
            plan = []
            re = set(self.remeasure.get((cname, dt), []))
            for m in self.methods:
                if m.name in fi:
                    st = self.fi_state(m, case, dt)
                    if st == "failed":
                        self.add_fi_failed_row(case, dt, m)
                        continue
                    plan.append((m, "full"))
                elif m.name in re:
                    plan.append((m, "eager"))
                elif m.name == "lean" and fi and (cname, dt, "lean") in self.row_index:
                    plan.append((m, "ref"))
            plan.sort(key=lambda p: R.METHODS.index(p[0].name))
            if not plan:
                continue
            prog.info(f"catch-up {j + 1}/{len(keys)}: {cname} {R.SHORT_DTYPE[dt]} "
                      f"({', '.join(f'{m.name}:{mode}' for m, mode in plan)})")
            self.run_unit(case, dt, plan)
            self.write(final=False)

    def unit_summary(self, case, dt, done, total) -> str:
        get = lambda m: self.row_index.get((case.name, dt, m))  # noqa: E731
        parts = []
        for m in R.METHODS:
            r = get(m)
            if r is None:
                continue
            if r["status"] == "ok" and r.get("device_us") is not None:
                parts.append(f"{m} {r['device_us']:.1f}")
            elif r["status"] == "error":
                parts.append(f"{m} ERR")
        return f"  [{done}/{total} {self.elapsed():.0f}s] {case.name} {R.SHORT_DTYPE[dt]}: " + ", ".join(parts) + " us"

    # .................................................................. prebuild

    def prebuild(self) -> int:
        import cupy_lean

        t0 = time.perf_counter()
        combos = sorted({(dt, c.head_dim, c.group, c.layout == "paged") for dt in self.dtypes for c in self.cases})
        for dt, d, g, paged in combos:
            cupy_lean.warmup(dtypes=(dt,), head_dims=(d,), groups=(g,), paged=(paged,))
        log(f"cupy_lean: {len(combos)} kernel specs ready in {time.perf_counter() - t0:.0f} s")
        rc = 0
        if self.builder is not None:
            self.builder.wait()
            for e in self.builder.log:
                log(f"FlashInfer JIT {e['modules']}: {e['seconds']:.0f} s" + (f" FAILED {e['error'][:400]}" if e["error"] else ""))
            rc = 1 if self.builder.failed else 0
        for n in self.meta["notes"]:
            log("note: " + n)
        return rc

    # .................................................................. main

    def run(self) -> int:
        import cupy_lean

        if not cupy_lean.gpu_available():
            log("bench: no CUDA GPU visible to CuPy; nothing to measure (use --list to see the cases)")
            return 2
        self.meta = collect_meta(self.args, self.cases, self.dtypes, self.method_names)
        self.meta["argv"] = self.argv
        if self.args.family:
            self.meta["family"] = {"n": self.args.family, "seed": self.args.seed}
        prog = Progress(len(self.cases) * len(self.dtypes))
        self.setup_peers(prog.info)
        if self.args.prebuild:
            return self.prebuild()
        from bench import timing

        prog.info("measuring the HBM read ceiling ...")
        ceil = timing.read_ceiling()
        self.meta["read_ceiling_tbps"] = ceil["tbps"]
        self.meta["read_ceiling"] = ceil
        prog.info(f"read ceiling {ceil['tbps']:.3f} TB/s ({ceil['bytes'] / 1e9:.2f} GB, "
                  f"{ceil['blocks_per_sm']} blocks/SM x {ceil['threads']} threads)")
        try:
            self.main_pass(prog)
            self.catch_up(prog)
        except (KeyboardInterrupt, _Stop) as exc:
            self.stop_reason = f"interrupted ({type(exc).__name__})"
        except Exception as exc:  # a bug of the harness: keep what was measured
            import traceback

            traceback.print_exc()
            self.stop_reason = f"harness error: {type(exc).__name__}: {exc}"[:500]
        prog.close()
        written = self.write(final=True)
        targets = written.pop("targets")
        for k, v in written.items():
            log(f"{k}: {v}")
        if self.stop_reason:
            log(f"stopped early: {self.stop_reason}")
        # the table and the targets are the last thing printed
        gpu = self.meta["gpu"]["name"]
        print(R.format_table(self.rows, self.meta["read_ceiling_tbps"], gpu))
        print(R.format_diffs(self.rows, DIFF_TOL))
        for n in self.meta["notes"]:
            print("note: " + n)
        if self.args.family:
            print(R.format_family_summary(self.rows, self.args.seed))
        else:
            print(R.format_targets(targets))
        sys.stdout.flush()
        return 0


def main(argv=None) -> int:
    """Run the sweep; ``argv`` as for the command line (``None``: sys.argv)."""
    args = build_parser().parse_args(argv)
    dtypes = parse_dtypes(args.dtypes, args.short or bool(args.family))
    if args.family is not None:
        from bench import family

        if args.family < 1:
            raise SystemExit(f"--family: expected a number of shapes >= 1, got {args.family}")
        if args.seed is None:
            args.seed = family.new_seed()
        print(f"family: {args.family} shapes, seed {args.seed} (repeat with --family {args.family} "
              f"--seed {args.seed})", flush=True)
        cases = family.draw(args.family, args.seed)
        if args.cases:
            cases = [c for c in cases if any(f in c.name for f in _split(args.cases))]
    else:
        cases = C.select_cases(_split(args.cases), short=args.short)
    if not cases:
        raise SystemExit(f"--cases: no case matches {args.cases!r} (see --list)")
    methods = parse_methods(args.methods, args.no_peers)
    if not methods:
        raise SystemExit("--methods: nothing left to run")
    tuned = parse_tuning(args.tuning)
    if args.list:
        print(list_cases(cases, dtypes))
        return 0
    if not tuned:
        return _run(args, cases, dtypes, methods, argv)
    from cupy_lean.kernels import tuning

    print(f"TUNING changed for this run: {tuned}", flush=True)
    with tuning(**tuned):  # restored after the run (main() may be called from code)
        return _run(args, cases, dtypes, methods, argv)


def _run(args, cases, dtypes, methods, argv) -> int:
    """The sweep of :func:`main` once its arguments are parsed."""

    def _term(signum, frame):
        raise _Stop()

    old = None
    try:
        old = signal.signal(signal.SIGTERM, _term)
    except ValueError:  # not the main thread
        pass
    try:
        return Sweep(args, cases, dtypes, methods, list(sys.argv[1:] if argv is None else argv)).run()
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    raise SystemExit(main())

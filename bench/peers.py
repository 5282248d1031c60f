"""The methods a case is timed with: cupy_lean's three schedules and the
external peers (PyTorch SDPA flash / cuDNN, FlashInfer paged decode).

Every method has the same shape: ``applicable(case)`` (None, or why it does
not apply: the row says "n/a"), ``setup(inputs)`` returning a :class:`Bound`
with

* ``graph_call(i)``: one call on input copy ``i``, capturable (no allocation
  outside the framework's graph pool, no synchronisation);
* ``eager_call(i)``: the call as a user writes it;
* ``first_output()``: one eager call on copy 0 (compiles what needs
  compiling), its output as a CuPy float32 ``(batch, heads_q, head_dim)``
  array, used for the cross-check against lean;
* ``framework``: ``"cupy"`` or ``"torch"`` (how the graph is captured);
* ``context()``: held around the whole measurement (SDPA's backend choice);
* ``release()``.

PyTorch and FlashInfer are imported here only, on first use; a peer that does
not import is skipped with the reason. Their tensors are DLPack views of the
CuPy inputs (no copies): SDPA's K/V ``(batch, heads_kv, seqlen, head_dim)``
is the ``(batch, seqlen, heads_kv, head_dim)`` cache transposed, and
FlashInfer's NHD pages ``(num_pages, 16, heads_kv, head_dim)`` are the dense
cache reshaped or the paged pool itself.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Dict, List, Optional

import numpy as np

from bench.cases import Case
from bench.report import FLASHINFER, OURS, SDPA
from bench.report import METHODS as ALL_METHODS

FI_WORKSPACE_BYTES = 256 << 20


def to_f32(arr):
    """A CuPy float32 copy of a float16 / bfloat16 CuPy array (bfloat16
    widened by a shift of its bits, so CuPy's own bfloat16 support is not
    needed)."""
    import cupy as cp

    if arr.dtype == np.float16 or arr.dtype == np.float32:
        return arr.astype(cp.float32)
    if arr.dtype.itemsize == 2:  # bfloat16
        bits = cp.ascontiguousarray(arr).view(cp.uint16).astype(cp.uint32) << 16
        return bits.view(cp.float32)
    return arr.astype(cp.float32)


#: Largest dense K (elements) :func:`reference_f32` works on.
REF_MAX_ELEMS = 1 << 26


def reference_f32(inp):
    """Float32 attention of copy 0 of a dense uniform case, computed with
    CuPy einsums (a check of lean beside the peers); None for other layouts
    and for K larger than :data:`REF_MAX_ELEMS` elements."""
    import cupy as cp

    case = inp.case
    if case.layout != "dense":
        return None
    B, N, Hkv, D, g = case.batch, case.max_len, case.heads_kv, case.head_dim, case.group
    if B * N * Hkv * D > REF_MAX_ELEMS:
        return None
    q = to_f32(inp.q[0]).reshape(B, Hkv, g, D)
    k = to_f32(inp.k[0])  # (B, N, Hkv, D)
    s = cp.einsum("bhgd,bnhd->bhgn", q, k) * np.float32(1.0 / np.sqrt(D))
    del k
    s -= s.max(axis=-1, keepdims=True)
    p = cp.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    del s
    v = to_f32(inp.v[0])
    o = cp.einsum("bhgn,bnhd->bhgd", p, v)
    return o.reshape(B, case.heads_q, D)


class Unavailable(Exception):
    """A peer that cannot run here (not installed, fails to import)."""


class Bound:
    framework = "cupy"
    note = None

    def context(self):
        return contextlib.nullcontext()

    def sync(self):
        import cupy as cp

        cp.cuda.Device().synchronize()

    def release(self):
        pass


# ---------------------------------------------------------------------- torch helpers

_torch_state: Dict[str, object] = {}


def import_torch():
    """torch, or raise :class:`Unavailable` with the reason."""
    if "mod" in _torch_state:
        return _torch_state["mod"]
    if "err" in _torch_state:
        raise Unavailable(_torch_state["err"])
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False")
    except Exception as exc:  # ImportError, or a CPU-only build
        _torch_state["err"] = f"PyTorch unavailable: {type(exc).__name__}: {exc}"
        raise Unavailable(_torch_state["err"]) from exc
    _torch_state["mod"] = torch
    return torch


def torch_dtype(torch, name):
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def to_torch(arr, dtype_name):
    """A torch view of a CuPy array (DLPack, no copy). bfloat16 goes through
    an int16 view where the DLPack exchange does not carry it."""
    torch = import_torch()
    want = torch_dtype(torch, dtype_name)
    try:
        t = torch.from_dlpack(arr)
        if t.dtype == want:
            return t
    except Exception:
        pass
    import cupy as cp

    t = torch.from_dlpack(arr.view(cp.int16))
    return t.view(want)


def torch_to_cupy_f32(t, shape):
    """A CuPy float32 copy of a torch tensor, reshaped."""
    import cupy as cp

    torch = import_torch()
    tf = t.detach().float().contiguous().reshape(shape)
    torch.cuda.synchronize()
    out = cp.from_dlpack(tf).copy()
    cp.cuda.Device().synchronize()
    return out


def torch_release():
    torch = _torch_state.get("mod")
    if torch is not None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- ours

class Ours:
    """cupy_lean.attention with one schedule ("invariant": the default one
    with ``batch_invariant=True``)."""

    kind = "ours"

    def __init__(self, schedule):
        self.name = schedule
        self.schedule = "lean" if schedule == "invariant" else schedule
        self.extra = {"batch_invariant": True} if schedule == "invariant" else {}

    def applicable(self, case: Case) -> Optional[str]:
        return None

    def setup(self, inp):
        import cupy as cp
        import cupy_lean

        sched, extra = self.schedule, self.extra
        attention = cupy_lean.attention
        lens, table = inp.kv_lens, inp.block_table
        q, k, v = inp.q, inp.k, inp.v
        outs = [cp.empty_like(x) for x in q]

        b = Bound()
        b.framework = "cupy"

        def graph_call(i):
            return attention(q[i], k[i], v[i], kv_lens=lens, block_table=table, out=outs[i],
                             schedule=sched, validate=False, **extra)

        def eager_call(i):
            return attention(q[i], k[i], v[i], kv_lens=lens, block_table=table, schedule=sched,
                             validate=False, **extra)

        def first_output():
            return to_f32(eager_call(0))

        b.graph_call, b.eager_call, b.first_output = graph_call, eager_call, first_output

        def release():
            outs.clear()

        b.release = release
        return b


# ---------------------------------------------------------------------- PyTorch SDPA

class Sdpa:
    """torch.nn.functional.scaled_dot_product_attention with one backend
    forced through ``torch.nn.attention.sdpa_kernel``; dense uniform cases
    only. q ``(B, Hq, 1, D)``, K/V ``(B, Hkv, N, D)`` views of the cache;
    GQA through ``enable_gqa=True``, or, where the backend refuses it, K/V
    heads expanded into a copy made outside the timing (noted in the row)."""

    kind = "peer"

    def __init__(self, name):
        self.name = name
        self.backend_name = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}[name]

    def applicable(self, case: Case) -> Optional[str]:
        if case.layout != "dense":
            return "n/a: SDPA runs dense uniform batches only"
        return None

    def setup(self, inp):
        torch = import_torch()
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, self.backend_name)
        case = inp.case
        g = case.group
        qs = [to_torch(x, inp.dtype).unsqueeze(2) for x in inp.q]  # (B, Hq, 1, D)
        ks = [to_torch(x, inp.dtype).transpose(1, 2) for x in inp.k]  # (B, Hkv, N, D)
        vs = [to_torch(x, inp.dtype).transpose(1, 2) for x in inp.v]
        b = Bound()
        b.framework = "torch"
        state = {"gqa": g > 1}

        def call(i):
            return F.scaled_dot_product_attention(qs[i], ks[i], vs[i], enable_gqa=state["gqa"])

        b.context = lambda: sdpa_kernel(backend)
        if g > 1:
            try:
                with sdpa_kernel(backend):
                    call(0)
                torch.cuda.synchronize()
            except RuntimeError as exc:
                # The backend refuses enable_gqa: expand K/V heads (a copy,
                # made here, outside the timing; the kernel then reads g x
                # the bytes, which is what this peer costs for GQA).
                need = case.alloc_bytes(2) * g * len(ks)
                free = torch.cuda.mem_get_info()[0]
                if need > 0.8 * free:
                    raise RuntimeError(f"enable_gqa refused ({exc}); expanded K/V would need "
                                       f"{need / 1e9:.1f} GB") from exc
                ks = [x.repeat_interleave(g, dim=1) for x in ks]
                vs = [x.repeat_interleave(g, dim=1) for x in vs]
                state["gqa"] = False
                try:
                    with sdpa_kernel(backend):
                        call(0)
                    torch.cuda.synchronize()
                except RuntimeError as exc2:
                    raise RuntimeError(f"with enable_gqa: {exc}; with K/V heads expanded: {exc2}") from exc2
                b.note = f"enable_gqa refused by the backend; K/V heads expanded {g}x (copy outside timing)"
        shape = (case.batch, case.heads_q, case.head_dim)
        b.graph_call = call
        b.eager_call = call

        def first_output():
            with sdpa_kernel(backend):
                o = call(0)
            return torch_to_cupy_f32(o, shape)

        b.first_output = first_output
        b.sync = torch.cuda.synchronize

        def release():
            qs.clear()
            ks.clear()
            vs.clear()
            torch_release()

        b.release = release
        return b


# ---------------------------------------------------------------------- FlashInfer

_fi_state: Dict[str, object] = {}


def import_flashinfer():
    """flashinfer, or raise :class:`Unavailable` with the reason."""
    if "mod" in _fi_state:
        return _fi_state["mod"]
    if "err" in _fi_state:
        raise Unavailable(_fi_state["err"])
    try:
        import_torch()
        os.environ.setdefault("FLASHINFER_LOGGING_LEVEL", "warning")
        import flashinfer  # noqa: F401
    except Unavailable as exc:
        _fi_state["err"] = f"FlashInfer needs PyTorch: {exc}"
        raise Unavailable(_fi_state["err"]) from exc
    except Exception as exc:
        _fi_state["err"] = f"FlashInfer unavailable: {type(exc).__name__}: {exc}"
        raise Unavailable(_fi_state["err"]) from exc
    _fi_state["mod"] = flashinfer
    return flashinfer


def _fi_workspace():
    torch = import_torch()
    ws = _fi_state.get("ws")
    if ws is None:
        ws = torch.zeros(FI_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
        _fi_state["ws"] = ws
    return ws


class FlashInfer:
    """flashinfer.BatchDecodeWithPagedKVCacheWrapper, NHD pages of the case's page size,
    ``use_tensor_cores`` False or True; ``plan()`` once per case, outside the
    timing; ``run(q, (k_pages, v_pages), out=...)`` timed."""

    kind = "peer"

    def __init__(self, name, builder=None):
        self.name = name
        self.tensor_cores = name == "flashinfer-tc"
        self.builder = builder

    def applicable(self, case: Case) -> Optional[str]:
        if case.layout != "paged" and case.capacity % case.page_size:
            return f"n/a: capacity {case.capacity} is not a multiple of {case.page_size}"
        return None

    def setup(self, inp):
        flashinfer = import_flashinfer()
        torch = import_torch()
        case = inp.case
        tdt = torch_dtype(torch, inp.dtype)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            _fi_workspace(), "NHD", use_tensor_cores=self.tensor_cores)
        indptr = torch.from_numpy(np.ascontiguousarray(inp.fi_indptr, dtype=np.int32))
        indices = torch.from_numpy(np.ascontiguousarray(inp.fi_indices, dtype=np.int32))
        last = torch.from_numpy(np.ascontiguousarray(inp.fi_last_page_len, dtype=np.int32))
        t0 = time.perf_counter()
        wrapper.plan(indptr, indices, last, case.heads_q, case.heads_kv, case.head_dim, case.page_size,
                     pos_encoding_mode="NONE", q_data_type=tdt, kv_data_type=tdt)
        torch.cuda.synchronize()
        plan_s = time.perf_counter() - t0
        qs = [to_torch(x, inp.dtype) for x in inp.q]  # (B, Hq, D)
        pages = [(to_torch(kp, inp.dtype), to_torch(vp, inp.dtype)) for kp, vp in inp.fi_pages]
        outs = [torch.empty_like(x) for x in qs]
        b = Bound()
        b.framework = "torch"
        if plan_s > 5.0:
            b.note = f"plan() took {plan_s:.0f} s (JIT compile inside plan)"

        def graph_call(i):
            return wrapper.run(qs[i], pages[i], out=outs[i])

        def eager_call(i):
            return wrapper.run(qs[i], pages[i])

        shape = (case.batch, case.heads_q, case.head_dim)

        def first_output():
            return torch_to_cupy_f32(eager_call(0), shape)

        b.graph_call, b.eager_call, b.first_output = graph_call, eager_call, first_output
        b.sync = torch.cuda.synchronize

        def release():
            nonlocal wrapper
            qs.clear()
            pages.clear()
            outs.clear()
            wrapper = None
            torch_release()

        b.release = release
        return b


class FlashInferBuild:
    """Compiles FlashInfer's JIT modules for the (dtype, head_dim,
    tensor_cores) combinations of the sweep in a background thread, so that
    the sweep of our own schedules runs meanwhile. Combinations are built in
    groups (one ninja run each, ``MAX_JOBS`` parallel jobs, default CPUs - 2):
    first dtype by dtype at head_dim 128 (most cases), then the other head
    dims. The module names are the ones ``plan()`` builds (pos_encoding NONE,
    no sliding window, no soft cap, int32 indices), so ``plan()`` then only
    loads them."""

    def __init__(self, combos, dtype_order):
        flashinfer = import_flashinfer()
        torch = import_torch()
        from flashinfer.jit import gen_batch_decode_module, gen_batch_prefill_module

        dorder = {d: i for i, d in enumerate(dtype_order)}
        groups: Dict[tuple, list] = {}
        for dt, d, tc in combos:
            key = (0 if d == 128 else 1, dorder.get(dt, 9))
            groups.setdefault(key, []).append((dt, d, tc))
        self.groups = [sorted(groups[k]) for k in sorted(groups)]
        self._specs: Dict[tuple, object] = {}
        for dt, d, tc in combos:
            tdt = torch_dtype(torch, dt)
            if tc:
                spec = gen_batch_prefill_module("fa2", tdt, tdt, tdt, torch.int32, d, d, 0, False, False, False)
            else:
                spec = gen_batch_decode_module(tdt, tdt, tdt, torch.int32, d, d, 0, False, False)
            self._specs[(dt, d, tc)] = spec
        self._build = flashinfer.jit.build_jit_specs
        self.ready: set = set()
        self.failed: Dict[tuple, str] = {}
        self.log: List[dict] = []
        self._thread: Optional[threading.Thread] = None
        self._done = threading.Event()
        self._t0 = None

    def start(self):
        os.environ.setdefault("MAX_JOBS", str(max(1, (os.cpu_count() or 4) - 2)))
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="flashinfer-jit", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        try:
            for group in self.groups:
                t0 = time.perf_counter()
                err = None
                try:
                    self._build([self._specs[c] for c in group], verbose=False)
                    self.ready.update(group)
                except Exception as exc:  # ninja or nvcc failed: the rows say why
                    err = f"{type(exc).__name__}: {exc}"[-2000:]
                    for c in group:
                        self.failed[c] = err
                self.log.append({"modules": [list(c) for c in group], "seconds": time.perf_counter() - t0,
                                 "done_at_s": time.perf_counter() - self._t0, "error": err})
        finally:
            self._done.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._done.is_set()

    def state(self, combo) -> str:
        """"ready", "failed" or "building" for ``(dtype, head_dim, tensor_cores)``."""
        if combo in self.ready:
            return "ready"
        if combo in self.failed:
            return "failed"
        if self._done.is_set() or combo not in self._specs:
            return "ready"  # not ours to build: plan() builds what is missing
        return "building"

    def wait(self, timeout=None) -> bool:
        return self._done.wait(timeout)


def fi_combos(cases: List[Case], dtypes, methods) -> set:
    """(dtype, head_dim, tensor_cores) of the FlashInfer modules a sweep needs."""
    out = set()
    for m in methods:
        if m not in FLASHINFER:
            continue
        for dt in dtypes:
            for c in cases:
                out.add((dt, c.head_dim, m == "flashinfer-tc"))
    return out


def make_methods(names, builder=None):
    out = []
    for n in names:
        if n in OURS:
            out.append(Ours(n))
        elif n in SDPA:
            out.append(Sdpa(n))
        elif n in FLASHINFER:
            out.append(FlashInfer(n, builder))
        else:
            raise ValueError(f"method: expected one of {ALL_METHODS}, got {n!r}")
    return out


def peer_versions() -> Dict[str, Optional[str]]:
    v: Dict[str, Optional[str]] = {"torch": None, "torch_cuda": None, "cudnn": None, "flashinfer": None}
    torch = _torch_state.get("mod")
    if torch is not None:
        v["torch"] = torch.__version__
        v["torch_cuda"] = torch.version.cuda
        try:
            v["cudnn"] = str(torch.backends.cudnn.version())
        except Exception:
            pass
    fi = _fi_state.get("mod")
    if fi is not None:
        v["flashinfer"] = getattr(fi, "__version__", "?")
    return v

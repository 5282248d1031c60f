"""Timing: the HBM read ceiling, device time per call from CUDA-graph
replays, and eager per-call latency from Python.

Device time (``device_us``): a graph of ``n_calls`` calls is captured, call
``i`` on input copy ``i % n_copies`` (the copies together are far over the L2
size, so every call reads K and V from HBM); the graph is replayed once to warm
up, then ``repeats`` times, each replay timed with CUDA events and divided by
``n_calls``; the median over the replays is reported (min and max beside it).

Eager latency (``eager_us``): ``n`` back-to-back calls on copy 0 from Python,
one synchronisation at the end, wall time / ``n``; the median of three such
loops. It includes the host-side cost of a call (argument checks, launch);
when the GPU time per call is larger, it is the GPU time.

CuPy calls are captured with ``cupy.cuda.Stream.begin_capture`` on a
non-blocking stream; PyTorch calls (SDPA, FlashInfer) with
``torch.cuda.CUDAGraph``.
"""

from __future__ import annotations

import gc
import statistics
import time

import numpy as np

__all__ = ["read_ceiling", "graph_time_cupy", "graph_time_torch", "eager_time", "calls_per_graph"]


def _summary(times_us):
    ts = sorted(float(t) for t in times_us)
    return {
        "median_us": statistics.median(ts),
        "min_us": ts[0],
        "max_us": ts[-1],
        "replays": len(ts),
    }


def calls_per_graph(n_copies: int, est_us: float, target_us: float = 2000.0, max_calls: int = 1024) -> int:
    """Calls in one graph: a multiple of ``n_copies`` (every copy as often),
    enough that a replay lasts about ``target_us``, at least 2."""
    n_copies = max(1, int(n_copies))
    want = max(2, int(np.ceil(target_us / max(est_us, 1.0))), n_copies)
    reps = max(1, int(np.ceil(want / n_copies)))
    n = reps * n_copies
    if n > max_calls:
        n = max(n_copies, (max_calls // n_copies) * n_copies)
    return n


# ---------------------------------------------------------------------- read ceiling

_READ_SRC = r"""
extern "C" __global__ void bench_read(const uint4* __restrict__ p, long long n,
                                      unsigned int* __restrict__ out) {
  unsigned int acc = 0u;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = p[i];
    const uint4 b = p[i + stride];
    const uint4 c = p[i + 2 * stride];
    const uint4 d = p[i + 3 * stride];
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
    acc ^= c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < n; i += stride) {
    const uint4 a = p[i];
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  __shared__ unsigned int s;
  if (threadIdx.x == 0) s = 0u;
  __syncthreads();
  atomicXor(&s, acc);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = s;  // one value per block: the reads stay
}
"""

#: (blocks per SM, threads per block) tried; the best median is the ceiling.
READ_CONFIGS = ((2, 1024), (4, 512), (8, 256), (4, 1024), (16, 256))


def read_ceiling(nbytes: int = 2 << 30, repeats: int = 10) -> dict:
    """HBM read bandwidth of a streaming read kernel of our own: every thread
    reads 16-byte vectors (four in flight) in a grid-stride loop over a
    ``nbytes`` buffer and the block writes one XOR of what it read. Each grid
    shape in :data:`READ_CONFIGS` is launched ``repeats`` times (after two
    warm-ups), timed with CUDA events; the best median is reported."""
    import cupy as cp

    dev = cp.cuda.Device()
    sms = int(dev.attributes["MultiProcessorCount"])
    kern = cp.RawKernel(_READ_SRC, "bench_read")
    n16 = int(nbytes) // 16
    buf = cp.empty(n16 * 16, dtype=cp.uint8)
    buf.fill(1)
    vec = buf.view(cp.uint32)  # the kernel sees uint4; any 16-byte aligned buffer
    stream = cp.cuda.Stream(non_blocking=True)
    results = []
    try:
        with stream:
            for per_sm, threads in READ_CONFIGS:
                blocks = per_sm * sms
                out = cp.empty(blocks, dtype=cp.uint32)
                args = (vec, np.int64(n16), out)
                for _ in range(2):
                    kern((blocks,), (threads,), args)
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                ts = []
                for _ in range(repeats):
                    e0.record(stream)
                    kern((blocks,), (threads,), args)
                    e1.record(stream)
                    e1.synchronize()
                    ts.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3)
                s = _summary(ts)
                s.update(blocks_per_sm=per_sm, threads=threads,
                         tbps=n16 * 16 / (s["median_us"] * 1e-6) / 1e12)
                results.append(s)
                del out
        stream.synchronize()
    finally:
        del buf, vec
        cp.get_default_memory_pool().free_all_blocks()
    best = max(results, key=lambda r: r["tbps"])
    return {
        "tbps": best["tbps"],
        "bytes": n16 * 16,
        "median_us": best["median_us"],
        "blocks_per_sm": best["blocks_per_sm"],
        "threads": best["threads"],
        "configs": results,
    }


# ---------------------------------------------------------------------- graphs

_capture_stream = None


def _cupy_stream():
    import cupy as cp

    global _capture_stream
    if _capture_stream is None:
        _capture_stream = cp.cuda.Stream(non_blocking=True)
    return _capture_stream


def graph_time_cupy(call, n_copies: int, n_calls: int, repeats: int = 7) -> dict:
    """Device time per call of ``call(i)`` (CuPy work on the current stream)
    from replays of a CUDA graph of ``n_calls`` calls over ``n_copies``
    copies. ``call`` must not allocate nor synchronise (pass ``out=``,
    ``validate=False``); it is called once on the capture stream first (plans
    and compiled kernels exist before the capture). The device is
    synchronised before that call: inputs written on the default stream are
    complete before the non-blocking capture stream reads them."""
    import cupy as cp

    stream = _cupy_stream()
    cp.cuda.Device().synchronize()
    with stream:
        call(0)
    stream.synchronize()
    with stream:
        stream.begin_capture()
        try:
            for i in range(n_calls):
                call(i % n_copies)
        except BaseException:
            try:
                stream.end_capture()
            except Exception:
                pass
            raise
        graph = stream.end_capture()
    try:
        graph.launch(stream)
        stream.synchronize()
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        ts = []
        for _ in range(repeats):
            e0.record(stream)
            graph.launch(stream)
            e1.record(stream)
            e1.synchronize()
            ts.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / n_calls)
    finally:
        del graph
    out = _summary(ts)
    out.update(n_calls=n_calls, n_copies=n_copies)
    return out


def graph_time_torch(call, n_copies: int, n_calls: int, repeats: int = 7) -> dict:
    """As :func:`graph_time_cupy` for PyTorch work: warm-up on a side stream,
    capture with ``torch.cuda.graph``, replays timed with ``torch.cuda.Event``."""
    import torch

    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(0)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    outs = []
    with torch.cuda.graph(g):
        for i in range(n_calls):
            outs.append(call(i % n_copies))
    try:
        g.replay()
        torch.cuda.synchronize()
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(repeats):
            e0.record()
            g.replay()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) * 1e3 / n_calls)
    finally:
        del outs, g
    out = _summary(ts)
    out.update(n_calls=n_calls, n_copies=n_copies)
    return out


# ---------------------------------------------------------------------- eager

def eager_time(call, sync, n_calls: int, loops: int = 3, warmup: int = 3) -> float:
    """Per-call wall time of ``n_calls`` back-to-back ``call(0)`` from Python,
    ``sync()`` once at the end; median of ``loops`` loops, in microseconds."""
    for _ in range(warmup):
        call(0)
    sync()
    res = []
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(loops):
            t0 = time.perf_counter()
            for _ in range(n_calls):
                call(0)
            sync()
            res.append((time.perf_counter() - t0) / n_calls * 1e6)
    finally:
        if was:
            gc.enable()
    return statistics.median(res)


def eager_calls(device_us: float, budget_s: float = 0.05, lo: int = 5, hi: int = 1000) -> int:
    """Calls per eager loop: about ``budget_s`` of work, within [lo, hi]."""
    per = max(float(device_us or 0.0), 8.0) * 1e-6
    return int(min(hi, max(lo, budget_s / per)))

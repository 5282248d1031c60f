"""cupy-lean: LeanAttention decode attention for CuPy.

Public API:

* :func:`attention` — decode attention over dense, ragged or paged KV caches
  (NumPy in: float64 reference on the CPU; GPU in: fused CUDA kernel).
* :func:`plan` — a launch plan for repeated calls of one signature
  (``Plan.run``, ``Plan.describe()``, ``Plan.workspace_bytes``), with a
  kernel :class:`Config` for experiments.
* :func:`merge_states` — merge attention results over disjoint KV parts.
* :func:`lean_schedule`, :func:`split_schedule`, :func:`head_schedule` — the
  work decompositions as NumPy data, with ``describe()`` and ``plot()``.
* :func:`warmup` — compile the GPU kernels ahead of the first call;
  :func:`clear_cache` — drop the cached plans (their workspaces) and kernels.
* :mod:`cupy_lean.reference` — float64 reference and ``emulate``.
"""

from . import reference
from .attention import Config, attention, merge_states, plan
from ._plan import Plan
from .kernels import warmup
from .schedule import Schedule, head_schedule, lean_schedule, num_splits_heuristic, split_schedule

__version__ = "0.1.0"

__all__ = [
    "attention",
    "plan",
    "Plan",
    "Config",
    "merge_states",
    "lean_schedule",
    "split_schedule",
    "head_schedule",
    "num_splits_heuristic",
    "Schedule",
    "warmup",
    "clear_cache",
    "reference",
    "gpu_available",
    "__version__",
]


def clear_cache() -> None:
    """Drop every launch plan and kernel module that :func:`attention`
    keeps (one plan per call signature and device, each owning workspaces
    of partial states: with many signatures, e.g. a ``batch_invariant=True``
    call per batch size, these can hold GBs of GPU memory). The cache itself
    evicts its least recently used plans beyond 1024 plans or 2 GiB of
    their workspaces (``cupy_lean._cache.MAX_PLANS`` and
    ``MAX_PLAN_BYTES``, which may be changed); this drops them all at once. Their memory goes back to CuPy's
    pool (a plan's launch still running on another stream frees it behind
    an event); kernels reload from CuPy's disk cache on the next call.
    Plans that CUDA graphs were captured from stay alive for the life of the
    process, since graphs may still replay them and read their workspaces.
    Plans from :func:`plan` are the caller's and not affected. Needs no
    GPU."""
    from . import _cache

    _cache.clear()


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False

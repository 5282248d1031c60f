"""The package's one cache.

Everything expensive to build is kept here, keyed on what determines it and
on the CUDA device, never on a stream or a data pointer (CuPy and the driver
reuse both): compiled kernel modules under ``("spec", device, spec)``, the
helper module under ``("util", device)`` and launch plans under
``("plan", device, signature)``. Plans are evicted least recently used
first (by their last lookup or build) beyond either cap: :data:`MAX_PLANS` plans, or
:data:`MAX_PLAN_BYTES` bytes of GPU workspace that the cached plans hold
(each plan's ``cache_bytes``; the plan just built is never evicted, so one
plan larger than the byte cap still works, alone). An evicted plan frees its
workspaces as any dropped plan does (in stream order: ``_plan.Plan.__del__``);
a plan that CUDA graphs were captured from is kept alive after eviction,
because those graphs point at its workspaces, and no longer counts towards
either cap. Both caps may be lowered or raised at any time; a lowered cap
takes effect when the next plan is added.
"""

from __future__ import annotations

import atexit
import itertools
import sys
import threading

MAX_PLANS = 1024
# GPU bytes the cached plans may hold (their eager workspace and spare). A few
# percent of an 80 GB GPU, and far above what the plans of a usual process
# hold (a lean plan's workspace is 2 partial states per CTA: a few MB); it
# is reached by many large-batch plans, e.g. batch_invariant=True (split-K of
# a fixed chunk count per unit) once per batch size, at ~0.3 GB a plan for
# 256 sequences x 8 KV heads x group 8 at head_dim 128, which without a cap
# grew to tens of GB. Past it the least recently used plans are rebuilt when
# called again (host work and a zeroed workspace; kernels stay cached).
MAX_PLAN_BYTES = 2 << 30

_entries: dict = {}
_lock = threading.RLock()  # plans build kernels under the same lock
_num_plans = 0
_num_plan_bytes = 0  # the cache_bytes of the cached plans (constant per plan), summed
_retained: list = []  # evicted plans that captured graphs still use
# each cached plan's ``_cache_tick``: the tick of its last lookup or build (eviction takes the least
# recent first). An attribute, not a dict by key: the hot path's lookup hashes the signature once.
_tick = itertools.count()  # next() is atomic under the GIL


def get(key):
    """The cached value, or None. A hit marks the plan as used now."""
    val = _entries.get(key)
    if val is not None and key[0] == "plan":
        val._cache_tick = next(_tick)
    return val


def get_or_build(key, build):
    """The cached value of ``key``, built once (under a lock) when missing;
    a plan found or built is marked as used now."""
    val = get(key)
    if val is not None:
        return val
    with _lock:
        val = _entries.get(key)
        if val is None:
            val = build()
            _put_locked(key, val)
    return val


def _plan_bytes(plan):
    """The GPU bytes ``plan`` is counted for (``Plan.cache_bytes``; 0 for an
    entry without it)."""
    return getattr(plan, "cache_bytes", 0)


def _over_caps():
    return _num_plans > MAX_PLANS or _num_plan_bytes > MAX_PLAN_BYTES


def _put_locked(key, val):
    global _num_plans, _num_plan_bytes
    _entries[key] = val
    if key[0] != "plan":
        return
    _num_plans += 1
    _num_plan_bytes += _plan_bytes(val)
    val._cache_tick = next(_tick)
    if not _over_caps():
        return
    # least recently used first, down to both caps (either may have been lowered meanwhile); never
    # the new plan. A lookup racing with this may have set a tick after the list was taken: harmless
    # (that plan is evicted by its older position, as if the lookup came just after).
    olds = sorted((k for k in _entries if k[0] == "plan" and k is not key),
                  key=lambda k: getattr(_entries[k], "_cache_tick", -1))
    for old in olds:
        if not _over_caps():
            break
        plan = _entries.pop(old)
        _num_plans -= 1
        _num_plan_bytes -= _plan_bytes(plan)
        if getattr(plan, "captured", False):
            _retained.append(plan)


def keep_if_evicted(plan):
    """Called (once) when a launch of a cached ``plan`` is first captured
    into a CUDA graph, after ``plan.captured`` is set: a plan the cache
    dropped meanwhile (eviction or :func:`clear` on another thread, which
    read ``captured`` before it was set) is kept alive here, as the graph
    will read its workspaces."""
    with _lock:
        if not any(v is plan for v in _entries.values()) and not any(v is plan for v in _retained):
            _retained.append(plan)


def clear():
    """Drop every entry (kernels are reloaded from CuPy's disk cache on the
    next call). Plans that graphs were captured from stay alive."""
    global _num_plans, _num_plan_bytes
    with _lock:
        for key, val in _entries.items():
            if key[0] == "plan" and getattr(val, "captured", False):
                _retained.append(val)
        _entries.clear()
        _num_plans = _num_plan_bytes = 0


def size():
    return len(_entries)


def plan_bytes():
    """The GPU bytes the cached plans are counted for (the sum of their
    ``cache_bytes``; plans kept only for captured graphs not included)."""
    return _num_plan_bytes


@atexit.register
def _shutdown():
    """Release kernel modules and workspaces while CUDA is still up (at
    interpreter exit CuPy's driver bindings go first, and late unloads print
    errors)."""
    _entries.clear()
    _retained.clear()
    plan_module = sys.modules.get(__package__ + "._plan")
    if plan_module is not None:  # workspaces kept for a later ordered free (see _plan._free_after_use)
        plan_module._deferred.clear()
        plan_module._kept.clear()

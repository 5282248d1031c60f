"""The package's one cache.

Everything expensive to build is kept here, keyed on what determines it and
on the CUDA device, never on a stream or a data pointer (CuPy and the driver
reuse both): compiled kernel modules under ``("spec", device, spec)``, the
helper module under ``("util", device)`` and launch plans under
``("plan", device, signature)``. Plans are evicted oldest first beyond
:data:`MAX_PLANS`; a plan that CUDA graphs were captured from is kept alive
after eviction, because those graphs point at its workspaces.
"""

from __future__ import annotations

import atexit
import sys
import threading

MAX_PLANS = 1024

_entries: dict = {}
_lock = threading.RLock()  # plans build kernels under the same lock
_num_plans = 0
_retained: list = []  # evicted plans that captured graphs still use


def get(key):
    """The cached value, or None."""
    return _entries.get(key)


def get_or_build(key, build):
    """The cached value of ``key``, built once (under a lock) when missing."""
    val = _entries.get(key)
    if val is not None:
        return val
    with _lock:
        val = _entries.get(key)
        if val is None:
            val = build()
            _put_locked(key, val)
    return val


def _put_locked(key, val):
    global _num_plans
    _entries[key] = val
    if key[0] != "plan":
        return
    _num_plans += 1
    if _num_plans <= MAX_PLANS:
        return
    for old in list(_entries):  # oldest first, down to MAX_PLANS (it may have been lowered meanwhile)
        if _num_plans <= MAX_PLANS:
            break
        if old[0] == "plan" and old is not key:
            plan = _entries.pop(old)
            _num_plans -= 1
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
    global _num_plans
    with _lock:
        for key, val in _entries.items():
            if key[0] == "plan" and getattr(val, "captured", False):
                _retained.append(val)
        _entries.clear()
        _num_plans = 0


def size():
    return len(_entries)


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

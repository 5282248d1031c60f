"""Kernel launches with programmatic dependent launch (sm_90 and newer).

A kernel launched with the driver's "programmatic stream serialization"
attribute may be scheduled while the kernel before it in the stream is still
running, once every CTA of that kernel has signalled (``griddepcontrol.
launch_dependents``) or exited. The attention and combine kernels start with
``griddepcontrol.wait``, which returns when the previous kernel has completed
and its memory is visible, and signal nothing early (their dependents are let
in as their CTAs exit), so only the launch and the CTAs' dispatch overlap the
previous kernel's tail: the kernels read and write nothing before the wait. Inside a CUDA graph capture the
attribute becomes a programmatic edge of the graph.

CuPy has no binding of ``cuLaunchKernelEx``; this module calls it from the
driver library through ``ctypes``. A :class:`Launcher` holds one launch's
configuration, so the hot path sets the grid and the stream and calls."""

from __future__ import annotations

import ctypes

# cuda.h: CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _AttrValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("flag", ctypes.c_int)]


class _Attr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _Config(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attr)), ("numAttrs", ctypes.c_uint)]


def driver_function(name, argtypes):
    """The driver API function ``name`` (a ``CUresult`` returning C function
    of ``argtypes``) from the driver library CuPy has loaded, through
    ``ctypes``, or None where there is no such library or function."""
    try:
        fn = getattr(ctypes.CDLL("libcuda.so.1"), name)
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = argtypes
    return fn


_launch_ex = None


def _driver_entry():
    """``cuLaunchKernelEx``, or None where the driver lacks it (before CUDA
    12.0)."""
    global _launch_ex
    if _launch_ex is None:
        _launch_ex = driver_function("cuLaunchKernelEx", [ctypes.POINTER(_Config), ctypes.c_void_p,
                                                           ctypes.c_void_p, ctypes.c_void_p]) or False
    return _launch_ex or None


def available():
    """Whether this process can launch with the programmatic attribute."""
    return _driver_entry() is not None


class Launcher:
    """One kernel's launch with programmatic stream serialization: ``func_ptr``
    (a ``CUfunction``), ``threads`` per block, ``smem`` dynamic shared memory
    bytes and ``params_addr`` (the address of the kernel's ``void*`` argument
    array), fixed; :meth:`__call__` sets the grid and the stream."""

    def __init__(self, func_ptr, threads, smem, params_addr):
        self._fn = _driver_entry()
        if self._fn is None:
            raise RuntimeError("cuLaunchKernelEx is not in this driver")
        self._attr = _Attr()
        self._attr.id = _PROGRAMMATIC_STREAM_SERIALIZATION
        self._attr.value.flag = 1
        cfg = self._cfg = _Config()
        cfg.gridDimY = cfg.gridDimZ = 1
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = int(threads), 1, 1
        cfg.sharedMemBytes = int(smem)
        cfg.attrs = ctypes.pointer(self._attr)
        cfg.numAttrs = 1
        self._cfg_ref = ctypes.byref(cfg)
        self._func = ctypes.c_void_p(int(func_ptr))
        self._params = ctypes.c_void_p(int(params_addr))

    def __call__(self, grid_x, grid_y, stream_ptr):
        cfg = self._cfg
        cfg.gridDimX, cfg.gridDimY, cfg.hStream = grid_x, grid_y, stream_ptr or None
        status = self._fn(self._cfg_ref, self._func, self._params, None)
        if status:
            from cupy_backends.cuda.api.driver import CUDADriverError

            raise CUDADriverError(status)

"""Where an array lives, and zero-copy conversion to CuPy or NumPy.

GPU arrays of any library come in through DLPack or
``__cuda_array_interface__`` without a copy. A 2-byte element type that
arrives as raw bytes (``|V2``: how CuPy sees PyTorch's and JAX's bfloat16) is
read as bfloat16 when the producer names its dtype bfloat16, and refused
otherwise.
"""

from __future__ import annotations

import sys

import numpy as np

from ._dtypes import BFLOAT16

_CUPY_NDARRAY = None  # cupy.ndarray once CuPy has been imported by a GPU call


def cupy_ndarray():
    global _CUPY_NDARRAY
    if _CUPY_NDARRAY is None:
        from .kernels import _cupy

        _CUPY_NDARRAY = _cupy().ndarray  # clear error naming the extra when CuPy is missing
    return _CUPY_NDARRAY


def where(x):
    """'gpu', 'cpu' or None (None: not an array we know)."""
    if type(x) is _CUPY_NDARRAY:
        return "gpu"
    if isinstance(x, np.ndarray):
        return "cpu"
    if type(x).__module__.startswith("cupy"):
        return "gpu"
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None:
        try:
            kind = int(dev()[0])
        except Exception:  # pragma: no cover - foreign object
            return None
        # CUDA, CUDA managed memory; CUDA host (pinned) memory is host memory, as its producer says
        # (PyTorch: device 'cpu'), and CuPy cannot view it
        return "gpu" if kind in _DLPACK_GPU else "cpu"
    try:
        if getattr(x, "__cuda_array_interface__", None) is not None:
            return "gpu"
    except Exception:  # e.g. PyTorch bfloat16 refuses the interface
        return "gpu"
    return None


def refuse_immutable(x, name):
    """Raises TypeError for an output array its library does not let anyone
    write (JAX arrays are immutable: a kernel writing one would change a
    value JAX may have cached or still be reading)."""
    if x is not None and type(x).__module__.split(".")[0] in ("jax", "jaxlib"):
        raise TypeError(f"{name}: JAX arrays are immutable, got {type(x).__module__}.{type(x).__name__}; "
                        f"leave {name} out and use the returned array (jax.dlpack.from_dlpack views it)")


def _producer_dtype_name(x):
    dt = getattr(x, "dtype", None)
    return "" if dt is None else str(dt).rsplit(".", 1)[-1]


def _fix_void(arr, src, name):
    """A CuPy/NumPy array whose dtype came through as raw 2-byte voids."""
    if arr.dtype.kind != "V":
        return arr
    if arr.dtype.itemsize == 2 and BFLOAT16 is not None and _producer_dtype_name(src) == "bfloat16":
        return arr.view(BFLOAT16)
    raise TypeError(
        f"{name}: got an element type of {arr.dtype.itemsize} raw bytes ({arr.dtype.str}) from "
        f"{type(src).__module__}.{type(src).__name__} whose dtype is {getattr(src, 'dtype', '?')!s}; "
        "expected float16 or bfloat16")


class _NoSync:
    """A DLPack producer seen through a wrapper that asks it for no stream
    synchronisation (``stream=-1``, as the DLPack protocol defines it)."""

    __slots__ = ("_x", "refused")

    def __init__(self, x):
        self._x = x
        self.refused = False  # the producer raised when asked for stream -1

    def __dlpack_device__(self):
        return self._x.__dlpack_device__()

    def __dlpack__(self, stream=None, **kwargs):
        try:
            return self._x.__dlpack__(stream=-1, **kwargs)
        except Exception:
            self.refused = True
            raise


def _producer_capturing(x):
    """Whether ``x`` is a PyTorch tensor and PyTorch's current stream is
    capturing a graph (then its synchronisation event is part of it)."""
    torch = sys.modules.get("torch")
    if torch is None or not _from_torch(x):
        return False
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:  # pragma: no cover - a torch without CUDA
        return False


_DLPACK_GPU = (2, 13)  # kDLCUDA, kDLCUDAManaged (not kDLCUDAHost, 3: pinned host memory)


def _dlpack_on_gpu(x):
    """Whether a DLPack producer says its memory is CUDA memory CuPy can
    view (True when it does not say): a host array (NumPy's kDLCPU) is
    copied, never viewed."""
    try:
        return int(x.__dlpack_device__()[0]) in _DLPACK_GPU
    except Exception:
        return True


def foreign_capture_state(*xs):
    """Whether CuPy's current stream is capturing a CUDA graph, asked once
    for a call's arrays when one of them is not a CuPy array (the state
    :func:`to_gpu` needs for it); None when all are CuPy arrays or None."""
    nd = cupy_ndarray()
    if all(x is None or type(x) is nd for x in xs):
        return None
    from ._plan import capturing

    return capturing()


def to_gpu(x, name, capture=None, output=False):
    """A CuPy view of a GPU array (no copy); anything else is copied to the
    GPU, and refused, naming it, inside a CUDA graph capture. ``capture``:
    whether CuPy's current stream is capturing, when the caller knows
    (:func:`foreign_capture_state`); None: asked here, for a foreign array.
    ``output``: an array the call writes (``out``, ``lse``), never copied:
    one that cannot be viewed raises TypeError naming it (a copy would
    receive the results instead)."""
    nd = cupy_ndarray()
    if type(x) is nd:
        return x
    not_an_array(x, name)
    import cupy

    if isinstance(x, cupy.ndarray):
        return x
    from ._plan import capturing, refuse_host_in_capture

    if capture is None:
        capture = capturing()
    # a host array is copied (or refused in a capture), never exchanged; the
    # producer's device is asked only inside a capture (off the eager path),
    # where a failed exchange cannot fall back
    host = isinstance(x, np.ndarray) or (capture and not _dlpack_on_gpu(x))
    if not host and hasattr(x, "__dlpack__"):
        _refuse_torch_bits(x, name)
        arr = None
        if capture and not _producer_capturing(x):
            # Inside a capture the producer must not order its own stream
            # before ours: an event recorded on a stream that is not
            # capturing (e.g. PyTorch's legacy default stream) invalidates
            # the capture. Stream -1 asks for no synchronisation; ordering a
            # replay after the writes to its inputs is the caller's, as for
            # any graph. A producer whose own current stream takes part in a
            # capture keeps the plain exchange (its event is a graph edge).
            w = _NoSync(x)
            try:
                arr = cupy.from_dlpack(w)
            except Exception as exc:
                if not w.refused:  # the exchange itself failed: a second one would invalidate the capture
                    raise TypeError(f"{name}: could not view {type(x).__module__}.{type(x).__name__} through "
                                    f"DLPack inside a CUDA graph capture: {exc}") from exc
        if arr is None:  # not capturing, or a producer that refused stream -1
            try:
                arr = cupy.from_dlpack(x)
            except Exception:
                arr = None
        if arr is not None:
            return _fix_void(arr, x, name)
    if output and not isinstance(x, np.ndarray) and not _has_cuda_interface(x):
        raise TypeError(f"{name}: could not view {type(x).__module__}.{type(x).__name__} on the GPU without a "
                        f"copy (its DLPack exchange failed and it has no __cuda_array_interface__), and a copy "
                        f"would receive the results instead; pass a CuPy array, or leave {name} out and use "
                        f"the returned array")
    if capture:
        refuse_host_in_capture(name)
    return _fix_void(cupy.asarray(x), x, name)


_TORCH_DTYPES = (None, None)  # (the torch module, its dtype -> NumPy dtype of the tensors torch_views reads)


def _torch_dtypes(torch):
    global _TORCH_DTYPES
    if _TORCH_DTYPES[0] is not torch:
        m = {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32),
             torch.int32: np.dtype(np.int32), torch.int64: np.dtype(np.int64), torch.uint8: np.dtype(np.uint8)}
        if BFLOAT16 is not None:
            m[torch.bfloat16] = BFLOAT16
        _TORCH_DTYPES = (torch, m)
    return _TORCH_DTYPES[1]


def torch_layout(x, torch):
    """``(pointer, bytes spanned, shape, NumPy dtype, byte strides)`` of a
    plain PyTorch tensor (exactly ``torch.Tensor``, strided, not nested)
    whose memory holds its values as they are: a dtype of
    :func:`_torch_dtypes`, at least one element, no lazy negation, not
    requiring grad (DLPack refuses those, and a write to one would bypass
    autograd). None for anything else (the DLPack exchange then decides,
    with its own errors)."""
    if type(x) is not torch.Tensor or x.layout is not torch.strided or x.is_nested:
        return None  # (sparse and nested tensors have no one pointer and strides)
    dt = _torch_dtypes(torch).get(x.dtype)
    if dt is None or x.requires_grad or x.is_neg():
        return None
    shape = tuple(x.shape)
    isz = dt.itemsize
    strides = tuple(st * isz for st in x.stride())
    ptr = x.data_ptr()
    if ptr == 0 or 0 in shape:
        return None
    span = isz + sum((n - 1) * st for n, st in zip(shape, strides))
    return ptr, span, shape, dt, strides


def torch_views(xs, current_device):
    """``xs`` (q first) with each PyTorch CUDA tensor replaced by a CuPy view
    of its memory (no copy, no DLPack exchange), or None when q is not a
    PyTorch tensor or any tensor among them needs the exchange: a subclass
    of ``torch.Tensor``, one that
    :func:`torch_layout` does not read, one not in CUDA memory of CuPy's
    current device (``current_device()``, asked only once a
    CUDA tensor is seen), or PyTorch's current stream on that device being
    another stream than CuPy's (the exchange then orders PyTorch's stream
    before CuPy's). With one stream there is nothing to order, and nothing
    is recorded on it (the same inside a CUDA graph capture). A view keeps
    its tensor alive."""
    torch = sys.modules.get("torch")
    tensor = getattr(torch, "Tensor", None)
    if tensor is None or not isinstance(xs[0], tensor):
        return None
    cupy = device = None
    res = []
    for x in xs:
        if x is None or not isinstance(x, tensor):
            res.append(x)
            continue
        if type(x) is not tensor or not x.is_cuda:  # (a subclass, e.g. a Parameter; a CPU or other device's tensor)
            return None
        d = x.get_device()
        if device is None:
            device = current_device()
            if d != device:
                return None
            import cupy

            if torch.cuda.current_stream(device).cuda_stream != cupy.cuda.get_current_stream().ptr:
                return None
        elif d != device:
            return None
        lay = torch_layout(x, torch)
        if lay is None:
            return None
        ptr, span, shape, dt, strides = lay
        mem = cupy.cuda.UnownedMemory(ptr, span, x, device)
        res.append(cupy.ndarray(shape, dt, cupy.cuda.MemoryPointer(mem, 0), strides))
    return res


def _from_torch(x):
    """Whether ``x`` is a PyTorch object (its type's top module)."""
    return type(x).__module__.split(".")[0] == "torch"


def _refuse_torch_bits(x, name):
    """A PyTorch tensor whose values are not what its memory holds (a lazy
    negation, which DLPack exports without it) or whose memory is gone (a
    freed storage, pointer 0) is refused, naming it, by either import;
    anything else passes."""
    if not _from_torch(x):
        return
    try:
        neg = bool(x.is_neg())
        # (a meta tensor has no memory either: its import says so)
        gone = x.numel() > 0 and not getattr(x, "is_meta", False) and x.data_ptr() == 0
    except Exception:  # not a plain tensor: the import says what is wrong
        return
    if neg:
        raise TypeError(f"{name}: the tensor has its negative bit set (a lazy negation that DLPack does not "
                        f"carry); pass {name}.resolve_neg()")
    if gone:
        raise ValueError(f"{name}: the tensor's storage has no memory (data pointer 0, e.g. freed with "
                         f"untyped_storage().resize_(0))")


def _has_cuda_interface(x):
    """Whether CuPy can view ``x`` through ``__cuda_array_interface__``."""
    try:
        return getattr(x, "__cuda_array_interface__", None) is not None
    except Exception:  # e.g. PyTorch bfloat16 refuses the interface
        return False


def not_an_array(x, name, what="an array"):
    """Refuses what no caller means as an array (None, text, a mapping, a
    set), naming the argument, before NumPy turns it into a 0-d object."""
    if x is None or isinstance(x, (str, bytes, dict, set, frozenset)):
        raise TypeError(f"{name}: expected {what}, got {type(x).__name__}"
                        + ("" if x is None else f" {x!r}"[:80]))


def to_cpu(x, name):
    if isinstance(x, np.ndarray):
        return x
    not_an_array(x, name)
    if isinstance(x, (list, tuple)):
        return _asarray(x, name, "a sequence of arrays of one shape")
    if hasattr(x, "__dlpack__"):
        _refuse_torch_bits(x, name)
        try:
            arr = np.from_dlpack(x)
        except Exception:
            # NumPy's DLPack import refuses bfloat16: a PyTorch tensor's bits as int16, viewed back (no copy)
            if BFLOAT16 is not None and _producer_dtype_name(x) == "bfloat16" and type(x).__module__ == "torch":
                try:
                    return np.from_dlpack(x.view(sys.modules["torch"].int16)).view(BFLOAT16)
                except Exception:  # e.g. a tensor that requires grad: said below
                    pass
        else:
            return _fix_void(arr, x, name)
    try:
        return np.asarray(x)
    except (TypeError, RuntimeError, ValueError) as exc:
        # the producer's own refusal (a tensor that requires grad, on the meta device, of a dtype NumPy
        # lacks, with the conjugate bit set) does not say which argument it was
        raise TypeError(f"{name}: could not read {type(x).__module__}.{type(x).__name__} of dtype "
                        f"{getattr(x, 'dtype', '?')!s} as a NumPy array on the CPU: {exc}") from exc


def _asarray(x, name, what):
    """``np.asarray(x)``; a ragged list or tuple (NumPy's ValueError names
    no argument) is refused naming ``name``, ``what`` was expected and the
    rows' shapes. Nothing is checked beforehand: no cost on a good call."""
    try:
        return np.asarray(x)
    except ValueError as exc:
        if not isinstance(x, (list, tuple)):
            raise

        def shape(e):
            try:
                return tuple(np.shape(e))
            except ValueError:  # itself ragged
                return "ragged"

        raise ValueError(f"{name}: expected {what}, got a ragged sequence (rows of shapes "
                         f"{[shape(e) for e in x][:8]})") from exc


def host_ints(x, name):
    """An index array given on the host (NumPy, list) or fetched from the GPU
    for the NumPy path. An empty list becomes an empty int64 array."""
    if where(x) == "gpu":
        import cupy

        return cupy.asnumpy(to_gpu(x, name))
    not_an_array(x, name, "an array of integers")
    arr = _asarray(x, name, "a rectangular array of integers")
    if arr.size == 0 and not np.issubdtype(arr.dtype, np.integer) and isinstance(x, (list, tuple)):
        arr = arr.astype(np.int64)
    return arr


def torch_fp8_storage(k, v, kv_dtype):
    """PyTorch float8 K/V (which CuPy cannot import) as their uint8 storage
    and the matching kv_dtype; other arrays as they are."""
    names = {"torch.float8_e4m3fn": "e4m3", "torch.float8_e5m2": "e5m2"}
    fmt = names.get(str(getattr(k, "dtype", "")))
    if fmt is None or not _from_torch(k):
        return k, v, kv_dtype
    if str(getattr(v, "dtype", "")) != str(k.dtype):
        raise TypeError(f"v: expected k's dtype {k.dtype}, got {getattr(v, 'dtype', type(v).__name__)}")
    if kv_dtype is not None and kv_dtype != fmt:
        raise ValueError(f"kv_dtype: k is {k.dtype}, got kv_dtype={kv_dtype!r}")

    u8 = sys.modules["torch"].uint8
    return k.view(u8), v.view(u8), fmt

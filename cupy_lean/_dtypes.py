"""Element types understood by the package (no CuPy import)."""

from __future__ import annotations

import numpy as np

try:  # ml_dtypes is a dependency; guard anyway so the error is clear.
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
    E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
    E5M2 = np.dtype(ml_dtypes.float8_e5m2)
except ImportError:  # pragma: no cover
    BFLOAT16 = E4M3 = E5M2 = None

FLOAT16 = np.dtype(np.float16)
GPU_DTYPES = tuple(d for d in (FLOAT16, BFLOAT16) if d is not None)
CPU_DTYPES = GPU_DTYPES + (np.dtype(np.float32), np.dtype(np.float64))

#: fp8 KV-cache element types, by the names ``kv_dtype=`` takes.
FP8_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}

#: Kernel dtype tag of each GPU element type.
KERNEL_TAG = {FLOAT16: "f16", BFLOAT16: "bf16"}


def dtype_names(dts):
    """The dtypes ``dts`` as a comma-separated list, for error messages."""
    return ", ".join(str(d) for d in dts)

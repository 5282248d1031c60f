"""Element types understood by the package (no CuPy import)."""

from __future__ import annotations

import numpy as np

try:  # ml_dtypes is a dependency; guard anyway so the error is clear.
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BFLOAT16 = None

FLOAT16 = np.dtype(np.float16)
GPU_DTYPES = tuple(d for d in (FLOAT16, BFLOAT16) if d is not None)
CPU_DTYPES = GPU_DTYPES + (np.dtype(np.float32), np.dtype(np.float64))

#: Kernel dtype tag of each GPU element type.
KERNEL_TAG = {FLOAT16: "f16", BFLOAT16: "bf16"}


def dtype_names(dts):
    return ", ".join(str(d) for d in dts)

"""Fused kernels for the `@fusable` functions (`minilm/fusion.py`) on the CPU: one pass over the
array instead of the several passes (and array-sized temporaries) of the NumPy body.

    gelu_tanh   0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))    elementwise, rows in parallel

In a 512-token prefill of the 270M, GELU's NumPy body holds about five (512, 2048) float32
temporaries (4 MB each) at once; this holds only its result. Each kernel takes what its reference
takes and computes the reference's float32 operations in the same order (tanh from another libm:
within 2 ulp); anything else (another dtype, a non-contiguous array) returns NotImplemented and
the reference runs. Tested against the references in tests/test_fusion.py.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_C = np.float32(math.sqrt(2 / math.pi))
_K = np.float32(0.044715)


@njit(parallel=True, cache=True)
def _gelu_tanh_kernel(x, out, c, k):
    """x, out: (rows, cols) float32."""
    for r in prange(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[r, j]
            out[r, j] = np.float32(0.5) * v * (np.float32(1.0) + np.tanh(c * (v + k * v * v * v)))


def gelu_tanh(x):
    """`nn.gelu_tanh` for a C-contiguous float32 array, in one pass."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or not x.flags.c_contiguous or x.ndim == 0:
        return NotImplemented
    out = np.empty_like(x)
    rows = x.reshape(-1, x.shape[-1]) if x.size else x.reshape(0, 1)
    _gelu_tanh_kernel(rows, out.reshape(rows.shape), _C, _K)
    return out


FUSED = {"gelu_tanh": gelu_tanh}

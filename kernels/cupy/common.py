"""What the CuPy kernels share: the CuPy import, moving arrays, dtypes, and `prepare_weight`.

Importing this module (any module of the package does) raises `minilm.errors.ConfigError` without
CuPy or without a CUDA device.

Arrays in and out: every argument may be a NumPy or a CuPy array. When the activations (`x`, `q`)
are CuPy arrays the result is a CuPy array and nothing goes back to the host (the weights live on
the GPU once `prepare_weight` has copied them there at load; a NumPy weight would be copied to the
device on every call). When they are NumPy arrays the result is a NumPy array of the reference's
dtype.

Precision rules (as in `kernels/numba/compile.py`): float32 and bfloat16 run on the GPU,
everything computed and accumulated in float32. CuPy has no bfloat16, so a bfloat16 NumPy array is
widened to float32 on the host (exact) before it is copied to the device, and a bfloat16 result is
rounded once on the way back. Other dtypes (float64, float16) run the NumPy reference on the host.
The output dtype is the reference's (ml_dtypes' bf16 @ bf16 gives float32, so bf16 linear and
attention give float32). Matmuls are plain float32 cuBLAS: CuPy leaves TF32 off unless CUPY_TF32=1
is set, and with TF32 on the results would miss the tests' 1e-5 tolerance.

Axis names: batch, num_heads, num_kv_heads, groups = num_heads // num_kv_heads, seq, kv_seq,
head_dim, tokens, top_k, hidden_size, num_experts, moe_intermediate_size.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from minilm.errors import ConfigError

_INSTALL_HINT = "CuPy is not installed / no CUDA device: pip install minilm[gpu]"

try:
    import cupy as cp

    if cp.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("cupy.cuda.runtime.getDeviceCount() == 0")
except Exception as err:  # ImportError, or CUDA's errors when there is no driver or device
    raise ConfigError(f"{_INSTALL_HINT} ({type(err).__name__}: {err})") from err

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_KERNEL_DTYPES = (np.dtype(np.float32), BFLOAT16)

# ---------------------------------------------------------------------------------------------
# Moving arrays: NumPy or CuPy in, float32 CuPy for the kernels, the caller's kind out
# ---------------------------------------------------------------------------------------------


def _is_cupy(a):
    return isinstance(a, cp.ndarray)


def _runs_on_gpu(*arrays):
    """True when every array is float32 or bfloat16 (the dtypes the GPU path computes)."""
    return all(a is None or np.dtype(a.dtype) in _KERNEL_DTYPES for a in arrays)


def _to_device_f32(a):
    """A float32 CuPy array with the values of `a` (NumPy or CuPy; bf16 widened on the host)."""
    if _is_cupy(a):
        return a.astype(cp.float32, copy=False)
    return cp.asarray(np.asarray(a).astype(np.float32, copy=False))


def _to_host(a):
    return cp.asnumpy(a) if _is_cupy(a) else np.asarray(a)


def _result(y, out_dtype, as_cupy):
    """Return the float32 device result `y` as the caller expects it."""
    if as_cupy:
        return y.astype(out_dtype, copy=False)
    return cp.asnumpy(y).astype(out_dtype, copy=False)  # bf16 rounding happens here, on the host


def _matmul_dtype(a_dtype, b_dtype):
    """The dtype NumPy gives `a @ b` for these dtypes (bf16 @ bf16 is float32 with ml_dtypes)."""
    return (np.zeros((1, 1), a_dtype) @ np.zeros((1, 1), b_dtype)).dtype


def _reference_on_host(reference, as_cupy, *args, **kwargs):
    """Run a NumPy reference on host copies (dtypes the GPU path does not compute)."""

    def host(a):
        return _to_host(a) if hasattr(a, "dtype") else a

    result = reference(*[host(a) for a in args], **{name: host(a) for name, a in kwargs.items()})
    if not as_cupy:
        return result
    if isinstance(result, tuple):
        return tuple(None if r is None else cp.asarray(r) for r in result)
    return cp.asarray(result)


def prepare_weight(weight):
    """`ops.prepare_weight` on this backend, called once per weight at load: the weight in GPU
    memory (a copy of a host array; a CuPy array as it is)."""
    return weight if _is_cupy(weight) else cp.asarray(np.asarray(weight))

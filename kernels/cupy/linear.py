"""linear on the GPU: y = x W^T + b, one cuBLAS gemm. Conventions: `common.py`."""

from __future__ import annotations

import numpy as np

from minilm import ops
from minilm.errors import InputError

from .common import _is_cupy, _matmul_dtype, _reference_on_host, _result, _runs_on_gpu, _to_device_f32, cp

# ---------------------------------------------------------------------------------------------
# linear: y = x W^T + b, one cuBLAS gemm
# ---------------------------------------------------------------------------------------------


def linear(x, weight, bias=None):
    """CuPy version of `ops.linear_reference`: x (..., in_features), weight (out_features, in_features)."""
    if x.ndim < 1 or weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise InputError(
            f"linear: x {x.shape} and weight {weight.shape} do not fit: expected x (..., in_features) "
            f"and weight (out_features, in_features) with the same in_features"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise InputError(f"linear: bias has shape {bias.shape}, expected ({weight.shape[0]},)")
    if type(x) is type(weight) is cp.ndarray and x.dtype == weight.dtype == cp.float32 and bias is None:
        # the common case (decode, prefill), without the conversions below; as one 2-D gemm, which
        # CuPy launches with half the overhead of a batched (..., in) @ (in, out)
        return (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(*x.shape[:-1], weight.shape[0])
    as_cupy = _is_cupy(x)
    if not _runs_on_gpu(x, weight, bias):
        return _reference_on_host(ops.linear_reference, as_cupy, x, weight, bias)
    out_dtype = _matmul_dtype(np.dtype(x.dtype), np.dtype(weight.dtype))
    if bias is not None:
        out_dtype = np.result_type(out_dtype, np.dtype(bias.dtype))
    y = _to_device_f32(x) @ _to_device_f32(weight).T  # (..., out_features), cuBLAS sgemm
    if bias is not None:
        y += _to_device_f32(bias)
    return _result(y, out_dtype, as_cupy)


def linear_input_grad(dy, weight):
    """CuPy version of `ops.linear_input_grad_reference`: dy (..., out_features), weight
    (out_features, in_features) -> dx (..., in_features) float32, one cuBLAS gemm."""
    if dy.ndim < 1 or weight.ndim != 2 or dy.shape[-1] != weight.shape[0]:
        raise InputError(
            f"linear_input_grad: dy {dy.shape} and weight {weight.shape} do not fit: expected dy "
            f"(..., out_features) and weight (out_features, in_features)"
        )
    as_cupy = _is_cupy(dy)
    dx = _to_device_f32(dy) @ _to_device_f32(weight)  # (..., in_features)
    return _result(dx, np.float32, as_cupy)

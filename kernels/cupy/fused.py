"""Fused kernels for the `@fusable` functions (`minilm/fusion.py`): each one kernel launch on the
GPU instead of the several array passes its NumPy body takes. Conventions: `common.py`.

    rms_norm        x / sqrt(mean(x^2) + eps) * w           one block per row (a tree reduction)
    gemma_rms_norm  x * (1 / sqrt(mean(x^2) + eps)) * (1 + w)
    layer_norm      (x - mean) / sqrt(var + eps) * w + b    two passes over the row, in registers
    gelu_tanh       0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))      elementwise
    apply_rope      x * cos + rotate_half(x) * sin          elementwise, reading x through its strides

Each takes what its reference takes, computes in float32 with the reference's order of float32
operations (the row sums are reassociated: a tree instead of NumPy's pairwise sum, ~1e-7
relative), and returns a new C-contiguous float32 CuPy array. Anything else (NumPy arrays,
other dtypes, an x whose last axis is not contiguous) returns NotImplemented: the reference runs.
"""

from __future__ import annotations

import math

import numpy as np

from .common import cp

_THREADS = 128  # threads per row for the norms (a power of two, for the tree reduction)

_NORMS_SOURCE = r"""
// Row r of x lives at x + r0 * s0 + r1 * s1 + r2 * s2 (its three leading indices and their element
// strides; the last axis is contiguous); y is C-contiguous, row r at y + r * dim.
__device__ long long row_offset(long long r, int n1, int n2, long long s0, long long s1, long long s2) {
    long long i2 = r % n2, i1 = (r / n2) % n1, i0 = r / ((long long)n1 * n2);
    return i0 * s0 + i1 * s1 + i2 * s2;
}

__device__ float block_sum(float value, float* shared) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
        __syncthreads();
    }
    float total = shared[0];
    __syncthreads();
    return total;
}

// kind 0: rms_norm (Llama): w * (x / sqrt(mean(x^2) + eps))
// kind 1: gemma_rms_norm:   (x * (1 / sqrt(mean(x^2) + eps))) * (1 + w)
// kind 2: layer_norm:       ((x - mean) / sqrt(mean((x - mean)^2) + eps)) * w + b
extern "C" __global__ void norm_rows(
    const float* x, const float* w, const float* b, float* y, int dim, float eps, int kind,
    int n1, int n2, long long s0, long long s1, long long s2)
{
    extern __shared__ float shared[];
    const long long r = blockIdx.x;
    const float* xr = x + row_offset(r, n1, n2, s0, s1, s2);
    float* yr = y + r * dim;
    float mean = 0.0f;
    if (kind == 2) {
        float s = 0.0f;
        for (int j = threadIdx.x; j < dim; j += blockDim.x) s += xr[j];
        mean = block_sum(s, shared) / (float)dim;
    }
    float sq = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = xr[j] - mean;
        sq += v * v;
    }
    const float variance = block_sum(sq, shared) / (float)dim;
    if (kind == 0) {
        const float root = sqrtf(variance + eps);
        for (int j = threadIdx.x; j < dim; j += blockDim.x) yr[j] = w[j] * (xr[j] / root);
    } else if (kind == 1) {
        const float inverse = 1.0f / sqrtf(variance + eps);
        for (int j = threadIdx.x; j < dim; j += blockDim.x) yr[j] = (xr[j] * inverse) * (1.0f + w[j]);
    } else {
        const float root = sqrtf(variance + eps);
        for (int j = threadIdx.x; j < dim; j += blockDim.x) yr[j] = ((xr[j] - mean) / root) * w[j] + b[j];
    }
}

// out (batch, heads, seq, head_dim) C-contiguous; x read through element strides; cos/sin
// (cos_batch, seq, rope_dim) C-contiguous (cos_batch 1: shared by every row of the batch).
// rotate_half: value i < rope_dim/2 pairs with -x[i + half], i >= half with x[i - half].
extern "C" __global__ void rope(
    const float* x, const float* cos_, const float* sin_, float* out,
    long long n, int heads, int seq, int head_dim, int rope_dim, int cos_batch,
    long long sb, long long sh, long long ss)
{
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const int i = (int)(idx % head_dim);
    long long t = idx / head_dim;
    const int s = (int)(t % seq);
    t /= seq;
    const int h = (int)(t % heads);
    const long long bb = t / heads;
    const float* xr = x + bb * sb + h * sh + s * ss;
    if (i >= rope_dim) { out[idx] = xr[i]; return; }
    const long long c = ((cos_batch == 1 ? 0 : bb) * seq + s) * rope_dim + i;
    const int half = rope_dim / 2;
    const float partner = i < half ? -xr[i + half] : xr[i - half];
    out[idx] = xr[i] * cos_[c] + partner * sin_[c];
}
"""

_module = cp.RawModule(code=_NORMS_SOURCE)
_norm_rows = _module.get_function("norm_rows")
_rope = _module.get_function("rope")

_C, _K = np.float32(math.sqrt(2 / math.pi)), np.float32(0.044715)
_gelu_tanh = cp.ElementwiseKernel(
    "float32 x, float32 c, float32 k",
    "float32 y",
    "y = (0.5f * x) * (1.0f + tanhf(c * (x + ((k * x) * x) * x)))",
    "minilm_gelu_tanh",
)


def _float32_gpu(*arrays):
    return all(isinstance(a, cp.ndarray) and a.dtype == cp.float32 for a in arrays)


def _rows(x):
    """(rows, n1, n2, s0, s1, s2): x's leading axes as three (size, element stride) pairs, padded
    with ones in front (x of 1 to 4 dimensions), or None when its last axis is not contiguous."""
    if x.ndim == 0 or x.ndim > 4 or (x.shape[-1] > 1 and x.strides[-1] != 4):
        return None
    n0, n1, n2 = (1,) * (4 - x.ndim) + x.shape[:-1]
    s0, s1, s2 = (0,) * (4 - x.ndim) + tuple(s // 4 for s in x.strides[:-1])
    return n0 * n1 * n2, n1, n2, s0, s1, s2


def _norm(x, weight, bias, eps, kind):
    if not _float32_gpu(x, weight, *(() if bias is None else (bias,))) or weight.shape != x.shape[-1:]:
        return NotImplemented
    rows = _rows(x)
    if rows is None:
        return NotImplemented
    count, n1, n2, s0, s1, s2 = rows
    y = cp.empty(x.shape, dtype=cp.float32)
    if count:
        b = bias if bias is not None else weight
        args = (x, cp.ascontiguousarray(weight), cp.ascontiguousarray(b), y, np.int32(x.shape[-1]), np.float32(eps))
        args += (np.int32(kind), np.int32(n1), np.int32(n2), np.int64(s0), np.int64(s1), np.int64(s2))
        _norm_rows((count,), (_THREADS,), args, shared_mem=_THREADS * 4)
    return y


def rms_norm(x, weight, eps):
    return _norm(x, weight, None, eps, 0)


def gemma_rms_norm(x, weight, eps):
    return _norm(x, weight, None, eps, 1)


def layer_norm(x, weight, bias, eps):
    return _norm(x, weight, bias, eps, 2)


def gelu_tanh(x):
    if not _float32_gpu(x):
        return NotImplemented
    return _gelu_tanh(x, _C, _K)


def apply_rope(x, cos, sin):
    if not _float32_gpu(x, cos, sin) or x.ndim != 4 or cos.ndim != 3 or cos.shape != sin.shape:
        return NotImplemented
    batch, heads, seq, head_dim = x.shape
    rope_dim = cos.shape[-1]
    if cos.shape[0] not in (1, batch) or cos.shape[1] != seq or rope_dim > head_dim or rope_dim % 2:
        return NotImplemented
    if head_dim > 1 and x.strides[-1] != 4:
        return NotImplemented
    out = cp.empty(x.shape, dtype=cp.float32)
    n = out.size
    if n:
        sb, sh, ss = (s // 4 for s in x.strides[:3])
        args = (x, cp.ascontiguousarray(cos), cp.ascontiguousarray(sin), out, np.int64(n), np.int32(heads))
        args += (np.int32(seq), np.int32(head_dim), np.int32(rope_dim), np.int32(cos.shape[0]))
        args += (np.int64(sb), np.int64(sh), np.int64(ss))
        _rope(((n + 255) // 256,), (256,), args)
    return out


FUSED = {
    "rms_norm": rms_norm,
    "gemma_rms_norm": gemma_rms_norm,
    "layer_norm": layer_norm,
    "gelu_tanh": gelu_tanh,
    "apply_rope": apply_rope,
}

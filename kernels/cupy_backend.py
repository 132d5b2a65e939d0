"""CuPy GPU kernels for the three ops of `minilm.ops`: linear, attention and expert dispatch.

Importing this module registers the backend "cupy" (`minilm.ops.set_backend("cupy")`); without
CuPy or without a CUDA device the import raises `minilm.errors.ConfigError`.

Arrays in and out: every argument may be a NumPy or a CuPy array. When the activations (`x`, `q`)
are CuPy arrays the result is a CuPy array and nothing goes back to the host (keep the weights on
the GPU as float32 CuPy arrays: a NumPy weight is copied to the device on every call). When they
are NumPy arrays the result is a NumPy array of the reference's dtype.

Precision rules (as in `numba_backend`): float32 and bfloat16 run on the GPU, everything computed
and accumulated in float32. CuPy has no bfloat16, so a bfloat16 NumPy array is widened to float32
on the host (exact) before it is copied to the device, and a bfloat16 result is rounded once on the
way back. Other dtypes (float64, float16) run the NumPy reference on the host. The output dtype is
the reference's (ml_dtypes' bf16 @ bf16 gives float32, so bf16 linear and attention give float32).
Matmuls are plain float32 cuBLAS: CuPy leaves TF32 off unless CUPY_TF32=1 is set, and with TF32
on the results would miss the tests' 1e-5 tolerance.

Axis names: batch, num_heads, num_kv_heads, groups = num_heads // num_kv_heads, seq, kv_seq,
head_dim, tokens, top_k, hidden_size, num_experts, moe_intermediate_size.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from minilm import nn, ops
from minilm.errors import ConfigError, InputError

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


# ---------------------------------------------------------------------------------------------
# attention: cuBLAS for q k^T and p v, one RawKernel for scale -> soft cap -> bias -> mask -> softmax
# ---------------------------------------------------------------------------------------------

_SOFTMAX_THREADS = 256  # threads per block (a power of two, for the tree reductions)

_MASKED_SOFTMAX_SOURCE = r"""
// One query row per block: turn raw scores q.k into attention weights, in place semantics of
// minilm.ops.attention_reference: s = soft_cap(scores * scale) + bias; s = -inf where masked;
// softmax with nn.softmax's rules (row max -> 0 if not finite, sum -> 1 if 0). A row whose mask
// allows no key attends uniformly to every key (all scores 0), as the reference does.
//
// scores, weights: (batch, num_heads, seq, kv_seq) float32, contiguous; row = (b, h, i)
// mask: bool, element strides (mask_sb, mask_si, mask_sj) of its (batch, 1, seq, kv_seq) view
// bias: float32, element strides (bias_sb, bias_sh, bias_si, bias_sj) of its
//       (batch, num_heads, seq, kv_seq) view (zero strides where it broadcasts)

// Infinities without <math.h> (NVRTC compiles without the C headers)
#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)

__device__ float block_reduce(float value, float* shared, bool take_max) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float other = shared[threadIdx.x + stride];
            shared[threadIdx.x] = take_max ? fmaxf(shared[threadIdx.x], other) : shared[threadIdx.x] + other;
        }
        __syncthreads();
    }
    float result = shared[0];
    __syncthreads();  // shared[] is reused by the next reduction
    return result;
}

extern "C" __global__ void masked_softmax(
    const float* scores, float* weights,
    const bool* mask, int has_mask, long long mask_sb, long long mask_si, long long mask_sj,
    const float* bias, int has_bias, long long bias_sb, long long bias_sh, long long bias_si, long long bias_sj,
    float scale, float cap, int has_cap,
    int num_heads, int seq, int kv_seq)
{
    extern __shared__ float shared[];  // (blockDim.x,)
    const long long row = blockIdx.x;
    const int i = (int)(row % seq);
    const int h = (int)((row / seq) % num_heads);
    const long long b = row / ((long long)seq * num_heads);
    const float* s_row = scores + row * kv_seq;
    float* w_row = weights + row * kv_seq;

    // 1. transformed scores (-inf where masked), their max, and whether any key is visible
    float local_max = NEG_INF;
    float local_visible = 0.0f;
    for (int j = threadIdx.x; j < kv_seq; j += blockDim.x) {
        float s = NEG_INF;
        if (!has_mask || mask[b * mask_sb + i * mask_si + j * mask_sj]) {
            s = s_row[j] * scale;
            if (has_cap) s = cap * tanhf(s / cap);
            if (has_bias) s += bias[b * bias_sb + h * bias_sh + i * bias_si + j * bias_sj];
            local_visible = 1.0f;
        }
        w_row[j] = s;
        local_max = fmaxf(local_max, s);
    }
    float row_max = block_reduce(local_max, shared, true);
    if (block_reduce(local_visible, shared, true) == 0.0f) {  // sees nothing: every score 0
        for (int j = threadIdx.x; j < kv_seq; j += blockDim.x) w_row[j] = 0.0f;
        row_max = 0.0f;
    }
    if (!(fabsf(row_max) < POS_INF)) row_max = 0.0f;  // not finite (inf or NaN) -> 0, as nn.softmax

    // 2. exponentials and their sum (each thread revisits the columns it wrote)
    float local_sum = 0.0f;
    for (int j = threadIdx.x; j < kv_seq; j += blockDim.x) {
        float e = expf(w_row[j] - row_max);
        w_row[j] = e;
        local_sum += e;
    }
    float total = block_reduce(local_sum, shared, false);
    if (total == 0.0f) total = 1.0f;

    // 3. normalise
    for (int j = threadIdx.x; j < kv_seq; j += blockDim.x) {
        w_row[j] = w_row[j] / total;
    }
}
"""
_masked_softmax = cp.RawKernel(_MASKED_SOFTMAX_SOURCE, "masked_softmax")


def _element_strides(a):
    return tuple(np.int64(s // a.itemsize) for s in a.strides)


def attention(q, k, v, mask=None, *, scale, bias=None, soft_cap=None, return_weights=False):
    """CuPy version of `ops.attention_reference` (same arguments, same result).

    scores = q k^T as one batched cuBLAS gemm per kv head group (GQA: the `groups` query heads of
    a kv head are stacked along the rows, so K is never repeated), the masked softmax as one
    RawKernel launch (one block per query row), then weights @ v as a second batched gemm.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise InputError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} must all be 4-D (batch, heads, seq, head_dim)")
    batch, num_heads, seq, head_dim = q.shape
    _, num_kv_heads, kv_seq, _ = k.shape
    if tuple(k.shape) != (batch, num_kv_heads, kv_seq, head_dim) or tuple(v.shape) != tuple(k.shape):
        raise InputError(
            f"attention: k {k.shape} and v {v.shape} must both be (batch={batch}, num_kv_heads, kv_seq, head_dim={head_dim})"
        )
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise InputError(f"attention: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    groups = num_heads // num_kv_heads
    as_cupy = _is_cupy(q)
    if not _runs_on_gpu(q, k, v):
        return _reference_on_host(
            ops.attention_reference, as_cupy, q, k, v, mask,
            scale=scale, bias=bias, soft_cap=soft_cap, return_weights=return_weights,
        )  # fmt: skip

    qd, kd, vd = _to_device_f32(q), _to_device_f32(k), _to_device_f32(v)
    # (batch, num_kv_heads, groups * seq, head_dim): the query heads sharing a kv head, stacked
    qg = cp.ascontiguousarray(qd).reshape(batch, num_kv_heads, groups * seq, head_dim)
    scores = cp.matmul(qg, kd.swapaxes(-1, -2))  # (batch, num_kv_heads, groups * seq, kv_seq)
    scores = cp.ascontiguousarray(scores).reshape(batch, num_heads, seq, kv_seq)
    weights = cp.empty_like(scores)  # (batch, num_heads, seq, kv_seq) float32

    try:
        if mask is None:
            mask_view = cp.ones((1, 1, 1, 1), dtype=cp.bool_)
        else:
            mask_view = cp.asarray(mask).astype(cp.bool_, copy=False)
        mask_view = cp.broadcast_to(mask_view, (batch, 1, seq, kv_seq))
        bias_view = cp.zeros((1, 1, 1, 1), cp.float32) if bias is None else _to_device_f32(bias)
        bias_view = cp.broadcast_to(bias_view, (batch, num_heads, seq, kv_seq))
    except ValueError as err:
        raise InputError(
            f"attention: mask {None if mask is None else mask.shape} must broadcast to {(batch, 1, seq, kv_seq)} "
            f"and bias {None if bias is None else bias.shape} to {(batch, num_heads, seq, kv_seq)}"
        ) from err
    mask_sb, _, mask_si, mask_sj = _element_strides(mask_view)
    bias_sb, bias_sh, bias_si, bias_sj = _element_strides(bias_view)
    rows = batch * num_heads * seq
    if rows and kv_seq:
        _masked_softmax(
            (rows,), (_SOFTMAX_THREADS,),
            (
                scores, weights,
                mask_view, np.int32(mask is not None), mask_sb, mask_si, mask_sj,
                bias_view, np.int32(bias is not None), bias_sb, bias_sh, bias_si, bias_sj,
                np.float32(scale), np.float32(0.0 if soft_cap is None else soft_cap), np.int32(soft_cap is not None),
                np.int32(num_heads), np.int32(seq), np.int32(kv_seq),
            ),
            shared_mem=_SOFTMAX_THREADS * 4,
        )  # fmt: skip
    wg = weights.reshape(batch, num_kv_heads, groups * seq, kv_seq)
    out = cp.matmul(wg, vd).reshape(batch, num_heads, seq, head_dim)  # (batch, num_heads, seq, head_dim)

    out_dtype = _matmul_dtype(np.dtype(q.dtype), np.dtype(v.dtype))
    out = _result(out, out_dtype, as_cupy)
    return out, (_result(weights, np.dtype(q.dtype), as_cupy) if return_weights else None)


# ---------------------------------------------------------------------------------------------
# moe_dispatch: sort the (token, slot) pairs by expert, one cuBLAS gemm per projection per expert
# ---------------------------------------------------------------------------------------------

# act(gate) * up, fused, written as in minilm.nn (float32; exact gelu's erf in double as there).
_GATED_ACTIVATIONS = {
    "silu": cp.ElementwiseKernel(
        "float32 g, float32 u", "float32 h", "h = g / (1.0f + expf(-g)) * u", "minilm_silu_gated"
    ),
    "gelu": cp.ElementwiseKernel(
        "float32 g, float32 u", "float32 h",
        "h = 0.5f * g * (1.0f + (float)erf((double)(g / 1.41421356237309515f))) * u",
        "minilm_gelu_gated",
    ),
    "gelu_tanh": cp.ElementwiseKernel(
        "float32 g, float32 u", "float32 h",
        "h = 0.5f * g * (1.0f + tanhf(0.797884560802865406f * (g + 0.044715f * g * g * g))) * u",
        "minilm_gelu_tanh_gated",
    ),
}  # fmt: skip
_ACTIVATION_KERNEL = {
    "silu": "silu", "swish": "silu", "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
}  # fmt: skip


def _gated(g, u, activation):
    """act(g) * u on the device: one fused kernel for the known activations."""
    if activation in _ACTIVATION_KERNEL:
        return _GATED_ACTIVATIONS[_ACTIVATION_KERNEL[activation]](g, u)
    return cp.asarray(nn.activation(activation)(cp.asnumpy(g))) * u  # a new activation: host, slow


def moe_dispatch(x, top_k_index, top_k_weights, gate_proj, up_proj, down_proj, activation="silu"):
    """CuPy version of `ops.moe_dispatch_reference`.

    1. sort the tokens * top_k (token, slot) pairs by expert (argsort of the unique key
       expert * pairs + pair, so the order is the same on every run), count pairs per expert;
    2. gather x in that order, so each chosen expert's tokens are one contiguous block, and run
       the expert once on it: two gemms, the fused activation, one gemm (cuBLAS);
    3. out[t] = sum_j w[t, j] * y[rank of (t, j)], slots added in order j = 0..top_k-1.
    The per-expert counts come to the host once (num_experts integers) to slice the blocks.
    """
    nn.activation(activation)  # raises ConfigError naming an unknown activation
    tokens, hidden = x.shape
    num_experts, inter, _ = gate_proj.shape
    if (
        tuple(gate_proj.shape) != (num_experts, inter, hidden)
        or tuple(up_proj.shape) != tuple(gate_proj.shape)
        or tuple(down_proj.shape) != (num_experts, hidden, inter)
    ):
        raise InputError(
            f"moe_dispatch: gate_proj {gate_proj.shape}, up_proj {up_proj.shape}, down_proj {down_proj.shape} "
            f"do not fit x {x.shape}: expected (num_experts, moe_intermediate_size, {hidden}) twice and "
            f"(num_experts, {hidden}, moe_intermediate_size)"
        )
    if top_k_index.ndim != 2 or top_k_index.shape[0] != tokens or tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise InputError(
            f"moe_dispatch: top_k_index {top_k_index.shape} and top_k_weights {top_k_weights.shape} "
            f"must both be (tokens={tokens}, top_k)"
        )
    as_cupy = _is_cupy(x)
    if not _runs_on_gpu(x, top_k_weights, gate_proj, up_proj, down_proj):
        return _reference_on_host(
            ops.moe_dispatch_reference, as_cupy, x, top_k_index, top_k_weights, gate_proj, up_proj, down_proj, activation
        )
    top_k = top_k_index.shape[1]
    pairs = tokens * top_k
    expert_of_pair = cp.asarray(top_k_index).astype(cp.int64).reshape(pairs)  # (pairs,), pair = t * top_k + j
    if pairs and bool(((expert_of_pair < 0) | (expert_of_pair >= num_experts)).any()):
        raise InputError(f"moe_dispatch: top_k_index holds expert ids outside 0..{num_experts - 1}")

    # 1. group the pairs by expert
    pair_ids = cp.arange(pairs, dtype=cp.int64)
    pair_of_rank = cp.argsort(expert_of_pair * pairs + pair_ids)  # (pairs,) expert-major, token order inside
    rank_of_pair = cp.empty_like(pair_of_rank)
    rank_of_pair[pair_of_rank] = pair_ids  # (pairs,) inverse permutation
    counts = cp.asnumpy(cp.bincount(expert_of_pair, minlength=num_experts))  # (num_experts,) on the host
    starts = np.concatenate([[0], np.cumsum(counts)])  # (num_experts + 1,)

    # 2. each chosen expert once, on its contiguous block of tokens
    xs = _to_device_f32(x)[pair_of_rank // top_k]  # (pairs, hidden_size), rank order
    y = cp.empty((pairs, hidden), cp.float32)  # (pairs, hidden_size), rank order
    for e in np.flatnonzero(counts):
        lo, hi = int(starts[e]), int(starts[e + 1])
        g = xs[lo:hi] @ _to_device_f32(gate_proj[e]).T  # (pairs_e, moe_intermediate_size)
        u = xs[lo:hi] @ _to_device_f32(up_proj[e]).T
        y[lo:hi] = _gated(g, u, activation) @ _to_device_f32(down_proj[e]).T  # (pairs_e, hidden_size)

    # 3. weighted sum over each token's slots
    w = _to_device_f32(top_k_weights)  # (tokens, top_k)
    y_by_pair = y[rank_of_pair].reshape(tokens, top_k, hidden)  # (tokens, top_k, hidden_size)
    out = cp.zeros((tokens, hidden), cp.float32)
    for j in range(top_k):
        out += w[:, j, None] * y_by_pair[:, j]
    return _result(out, np.dtype(x.dtype), as_cupy)


ops.register_backend("cupy", {"linear": linear, "attention": attention, "moe_dispatch": moe_dispatch,
                              "to_device": lambda a: cp.asarray(a)})

"""attention on the GPU: cuBLAS for q k^T and weights @ v, one RawKernel for the masked softmax
(scale -> soft cap -> bias -> mask -> softmax, `nn.softmax`'s rules); for one query position
(decode), one RawKernel for all of it. Conventions: `common.py`."""

from __future__ import annotations

import numpy as np

from minilm import ops
from minilm.errors import InputError

from .common import _is_cupy, _matmul_dtype, _reference_on_host, _result, _runs_on_gpu, _to_device_f32, cp

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


_DECODE_SOURCE = r"""
// Decode attention, one query position: one block per (batch, head) does it all, reading each key
// and value once. The scores live in shared memory (kv_seq floats); the same rules as
// masked_softmax above: scale -> soft cap -> bias -> mask -> softmax (max -> 0 when not finite,
// sum -> 1 when 0, uniform over every key when the mask hides all of them).
//   q (batch, num_heads, 1, head_dim), k/v (batch, num_kv_heads, kv_seq, head_dim): element
//   strides per axis, head_dim contiguous; out (batch, num_heads, 1, head_dim) C-contiguous.
//   Query head h reads kv head h / groups (GQA).
#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)

__device__ float reduce_block(float value, float* red, bool take_max) {
    red[threadIdx.x] = value;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float other = red[threadIdx.x + stride];
            red[threadIdx.x] = take_max ? fmaxf(red[threadIdx.x], other) : red[threadIdx.x] + other;
        }
        __syncthreads();
    }
    float result = red[0];
    __syncthreads();
    return result;
}

extern "C" __global__ void decode_attention(
    const float* q, const float* k, const float* v, float* out,
    const bool* mask, int has_mask, long long mask_sb, long long mask_sj,
    const float* bias, int has_bias, long long bias_sb, long long bias_sh, long long bias_sj,
    float scale, float cap, int has_cap,
    int num_heads, int groups, int kv_seq, int head_dim,
    long long q_sb, long long q_sh, long long k_sb, long long k_sh, long long k_ss,
    long long v_sb, long long v_sh, long long v_ss)
{
    extern __shared__ float smem[];
    float* p = smem;             // (kv_seq,) scores, then probabilities
    float* red = smem + kv_seq;  // (blockDim.x,) for the reductions
    const int h = blockIdx.x % num_heads;
    const long long b = blockIdx.x / num_heads;
    const int kvh = h / groups;
    const float* qr = q + b * q_sb + h * q_sh;
    const float* kb = k + b * k_sb + kvh * k_sh;
    const float* vb = v + b * v_sb + kvh * v_sh;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;

    // 1. q . k_j, one warp per key
    for (int j = warp; j < kv_seq; j += warps) {
        const float* kr = kb + j * k_ss;
        float s = 0.0f;
        for (int d = lane; d < head_dim; d += 32) s += qr[d] * kr[d];
        for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffff, s, offset);
        if (lane == 0) p[j] = s;
    }
    __syncthreads();

    // 2. scale -> soft cap -> bias -> mask, the row max, whether any key is visible
    float local_max = NEG_INF, local_visible = 0.0f;
    for (int j = threadIdx.x; j < kv_seq; j += blockDim.x) {
        float s = NEG_INF;
        if (!has_mask || mask[b * mask_sb + j * mask_sj]) {
            s = p[j] * scale;
            if (has_cap) s = cap * tanhf(s / cap);
            if (has_bias) s += bias[b * bias_sb + h * bias_sh + j * bias_sj];
            local_visible = 1.0f;
        }
        p[j] = s;
        local_max = fmaxf(local_max, s);
    }
    float row_max = reduce_block(local_max, red, true);
    if (reduce_block(local_visible, red, true) == 0.0f) {
        for (int j = threadIdx.x; j < kv_seq; j += blockDim.x) p[j] = 0.0f;
        row_max = 0.0f;
    }
    if (!(fabsf(row_max) < POS_INF)) row_max = 0.0f;

    // 3. softmax
    float local_sum = 0.0f;
    for (int j = threadIdx.x; j < kv_seq; j += blockDim.x) {
        float e = expf(p[j] - row_max);
        p[j] = e;
        local_sum += e;
    }
    float total = reduce_block(local_sum, red, false);
    if (total == 0.0f) total = 1.0f;
    for (int j = threadIdx.x; j < kv_seq; j += blockDim.x) p[j] = p[j] / total;
    __syncthreads();

    // 4. out = sum_j p_j v_j, one thread per output dimension (coalesced rows of v)
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < kv_seq; j++) acc += p[j] * vb[j * v_ss + d];
        out[blockIdx.x * (long long)head_dim + d] = acc;
    }
}
"""
_decode_attention = cp.RawKernel(_DECODE_SOURCE, "decode_attention")
_DECODE_THREADS = 256
_DECODE_MAX_KEYS = 10_240  # scores in shared memory: 40 KB of the 48 KB a block gets by default


def _decode(q, k, v, mask, scale, bias, soft_cap):
    """One query position (decode), q/k/v float32 CuPy arrays: the whole attention in one launch.
    None when the arguments do not fit it (the general path runs)."""
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads, kv_seq = k.shape[1], k.shape[2]
    if kv_seq == 0 or kv_seq > _DECODE_MAX_KEYS or any(a.strides[-1] != 4 for a in (q, k, v) if head_dim > 1):
        return None
    try:
        mask_view = None if mask is None else cp.broadcast_to(cp.asarray(mask, dtype=cp.bool_), (batch, 1, 1, kv_seq))
        bias_view = None if bias is None else cp.broadcast_to(_to_device_f32(bias), (batch, num_heads, 1, kv_seq))
    except ValueError:
        return None  # the general path raises the error that names the shapes
    placeholder = cp.empty((1,), cp.float32)
    mask_sb, _, _, mask_sj = _element_strides(mask_view) if mask is not None else (0, 0, 0, 0)
    bias_sb, bias_sh, _, bias_sj = _element_strides(bias_view) if bias is not None else (0, 0, 0, 0)
    out = cp.empty((batch, num_heads, 1, head_dim), cp.float32)
    (q_sb, q_sh, _, _), (k_sb, k_sh, k_ss, _), (v_sb, v_sh, v_ss, _) = map(_element_strides, (q, k, v))
    _decode_attention(
        (batch * num_heads,), (_DECODE_THREADS,),
        (
            q, k, v, out,
            placeholder if mask is None else mask_view, np.int32(mask is not None),
            np.int64(mask_sb), np.int64(mask_sj),
            placeholder if bias is None else bias_view, np.int32(bias is not None),
            np.int64(bias_sb), np.int64(bias_sh), np.int64(bias_sj),
            np.float32(scale), np.float32(0.0 if soft_cap is None else soft_cap), np.int32(soft_cap is not None),
            np.int32(num_heads), np.int32(num_heads // num_kv_heads), np.int32(kv_seq), np.int32(head_dim),
            q_sb, q_sh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss,
        ),
        shared_mem=(kv_seq + _DECODE_THREADS) * 4,
    )  # fmt: skip
    return out


def _element_strides(a):
    return tuple(np.int64(s // a.itemsize) for s in a.strides)


def attention(q, k, v, mask=None, *, scale, bias=None, soft_cap=None, return_weights=False):
    """CuPy version of `ops.attention_reference` (same arguments, same result).

    scores = q k^T as one batched cuBLAS gemm per kv head group (GQA: the `groups` query heads of
    a kv head are stacked along the rows, so K is never repeated), the masked softmax as one
    RawKernel launch (one block per query row), then weights @ v as a second batched gemm.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise InputError(
            f"attention: q {q.shape}, k {k.shape}, v {v.shape} must all be 4-D (batch, heads, seq, head_dim)"
        )
    batch, num_heads, seq, head_dim = q.shape
    _, num_kv_heads, kv_seq, _ = k.shape
    if tuple(k.shape) != (batch, num_kv_heads, kv_seq, head_dim) or tuple(v.shape) != tuple(k.shape):
        raise InputError(
            f"attention: k {k.shape} and v {v.shape} must both be "
            f"(batch={batch}, num_kv_heads, kv_seq, head_dim={head_dim})"
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

    if seq == 1 and not return_weights and all(_is_cupy(a) and a.dtype == cp.float32 for a in (q, k, v)):
        out = _decode(q, k, v, mask, scale, bias, soft_cap)  # decode: one launch
        if out is not None:
            return out, None
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

"""moe_dispatch on the GPU: sort the (token, slot) pairs by expert, one cuBLAS gemm per projection
per chosen expert, a fused activation kernel, slots added in order. Conventions: `common.py`."""

from __future__ import annotations

import numpy as np

from minilm import nn, ops
from minilm.errors import InputError

from .common import _is_cupy, _reference_on_host, _result, _runs_on_gpu, _to_device_f32, cp

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
    if (
        top_k_index.ndim != 2
        or top_k_index.shape[0] != tokens
        or tuple(top_k_weights.shape) != tuple(top_k_index.shape)
    ):
        raise InputError(
            f"moe_dispatch: top_k_index {top_k_index.shape} and top_k_weights {top_k_weights.shape} "
            f"must both be (tokens={tokens}, top_k)"
        )
    as_cupy = _is_cupy(x)
    if not _runs_on_gpu(x, top_k_weights, gate_proj, up_proj, down_proj):
        return _reference_on_host(
            ops.moe_dispatch_reference,
            as_cupy,
            x,
            top_k_index,
            top_k_weights,
            gate_proj,
            up_proj,
            down_proj,
            activation,
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

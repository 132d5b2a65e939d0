"""moe_dispatch on the CPU: out[t] = sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(x[t]).

The (token, slot) pairs are grouped by expert with a counting sort, each chosen expert runs once
on its contiguous group (compiled kernels for a few pairs per expert, as in decode; BLAS above
EXPERT_KERNEL_MAX_PAIRS), and every token adds its results back. Experts nobody chose cost nothing.

Expert sums: each (token, slot) result is written to its own row, then every token adds its top_k
rows in slot order j = 0..top_k-1 (the reference adds them in expert-id order). The order never
depends on threads, so results are bit-for-bit repeatable. Precision rules: `compile.py`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from minilm import nn, ops
from minilm.errors import InputError

from .compile import _add_scaled, _as_float32, _dot, _kernel_array, _launch, _to_f32

# ---------------------------------------------------------------------------------------------
# moe_dispatch: out[t] = sum_j w[t, j] * expert_{idx[t, j]}(x[t])
# ---------------------------------------------------------------------------------------------

# Activation names (as in nn.ACTIVATIONS) -> code the compiled kernel switches on.
_ACTIVATION_CODES = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2, "gelu_fast": 2}
# Experts with at most this many (token, slot) pairs on average run in the compiled kernels;
# above it the expert products are compute-bound and go to BLAS, one expert at a time.
EXPERT_KERNEL_MAX_PAIRS = 4


@njit(cache=True)
def _activation(x, code):
    """The activation with this code, in float32, written as in minilm.nn (x: float32 scalar)."""
    if code == 0:  # silu: x * sigmoid(x)
        return x / (np.float32(1.0) + np.exp(-x))
    if code == 1:  # gelu, exact: x * Phi(x), erf in float64 as nn.gelu does
        return np.float32(0.5) * x * (np.float32(1.0) + np.float32(math.erf(np.float64(x / np.float32(math.sqrt(2))))))
    # gelu, tanh approximation
    c = np.float32(math.sqrt(2 / math.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


@njit(cache=True)
def _group_by_expert(top_k_index, num_experts):
    """Counting sort of the (token, slot) pairs by expert id; pair p = token * top_k + slot.

    top_k_index (tokens, top_k) int ->
      starts       (num_experts + 1,): the pairs of expert e have ranks starts[e] .. starts[e+1]-1
      pair_of_rank (tokens * top_k,):  the pair at each rank (token order within an expert: stable)
      rank_of_pair (tokens * top_k,):  the inverse permutation
    Two passes over the pairs, whatever num_experts is: experts with no token cost nothing.
    """
    tokens, top_k = top_k_index.shape
    starts = np.zeros(num_experts + 1, np.int64)
    for t in range(tokens):
        for j in range(top_k):
            starts[top_k_index[t, j] + 1] += 1  # count of expert e, stored at e + 1
    for e in range(num_experts):
        starts[e + 1] += starts[e]  # prefix sum: first rank of each expert
    next_rank = starts[:-1].copy()  # (num_experts,)
    pair_of_rank = np.empty(tokens * top_k, np.int64)
    rank_of_pair = np.empty(tokens * top_k, np.int64)
    for t in range(tokens):
        for j in range(top_k):
            e = top_k_index[t, j]
            rank = next_rank[e]
            next_rank[e] += 1
            pair_of_rank[rank] = t * top_k + j
            rank_of_pair[t * top_k + j] = rank
    return starts, pair_of_rank, rank_of_pair


@njit(parallel=True, cache=True)
def _experts_up_kernel(x, pair_of_rank, starts, active, gate_proj, up_proj, top_k, act_code, h):
    """h[r] = act(gate_proj[e] x_t) * (up_proj[e] x_t) for every rank r, of token t, of expert e.

    x          (tokens, hidden_size)                              float32 or bf16 bits
    gate/up    (num_experts, moe_intermediate_size, hidden_size)  float32 or bf16 bits
    active     (num_active,) the experts that received a pair
    h          (tokens * top_k, moe_intermediate_size)            float32, in rank order

    prange over (active expert, intermediate row i): the two weight rows are read once and dotted
    with each of the expert's tokens; experts nobody chose are never touched.
    """
    inter = gate_proj.shape[1]
    for f in prange(active.shape[0] * inter):
        e = active[f // inter]
        i = f % inter
        for rank in range(starts[e], starts[e + 1]):
            t = pair_of_rank[rank] // top_k
            g = _dot(gate_proj[e, i], x[t])
            u = _dot(up_proj[e, i], x[t])
            h[rank, i] = _activation(g, act_code) * u


@njit(parallel=True, cache=True)
def _experts_down_kernel(h, starts, active, down_proj, y):
    """y[r] = down_proj[e] h[r] for every rank r of expert e.

    h (tokens * top_k, moe_intermediate_size) float32; down_proj (num_experts, hidden_size,
    moe_intermediate_size) float32 or bf16 bits; y (tokens * top_k, hidden_size) float32.
    prange over (active expert, hidden row o), as in _experts_up_kernel.
    """
    hidden = down_proj.shape[1]
    for f in prange(active.shape[0] * hidden):
        e = active[f // hidden]
        o = f % hidden
        for rank in range(starts[e], starts[e + 1]):
            y[rank, o] = _dot(down_proj[e, o], h[rank])


@njit(parallel=True, cache=True)
def _combine_kernel(y, rank_of_pair, top_k_weights, out):
    """out[t] = sum_j top_k_weights[t, j] * y[rank of (t, j)], slots added in order j = 0..top_k-1.

    y (tokens * top_k, hidden_size) float32; top_k_weights (tokens, top_k) float32 or bf16 bits;
    out (tokens, hidden_size) float32. prange over tokens: each writes only its own row, so the
    scatter-add needs no atomics and its order never depends on the threads.
    """
    tokens, top_k = top_k_weights.shape
    for t in prange(tokens):
        o = out[t]  # (hidden_size,)
        o[:] = 0.0
        for j in range(top_k):
            w = _to_f32(top_k_weights[t, j])
            _add_scaled(o, w, y[rank_of_pair[t * top_k + j]])  # o += w * y_r, (hidden_size,)


def _experts_blas(x, pair_of_rank, top_k, starts, active, gate_proj, up_proj, down_proj, activation):
    """The expert products for large groups: one BLAS call per projection per active expert.

    Gathers the tokens in rank order once (no per-expert np.nonzero), so each expert's rows are
    one contiguous slice. Returns y (tokens * top_k, hidden_size) float32 in rank order.
    """
    act = nn.activation(activation)
    xs = _as_float32(x)[pair_of_rank // top_k]  # (tokens * top_k, hidden_size), rank order
    y = np.empty((xs.shape[0], down_proj.shape[1]), np.float32)
    for e in active:
        lo, hi = starts[e], starts[e + 1]
        g = xs[lo:hi] @ _as_float32(gate_proj[e]).T  # (pairs_e, moe_intermediate_size)
        u = xs[lo:hi] @ _as_float32(up_proj[e]).T
        y[lo:hi] = (act(g) * u) @ _as_float32(down_proj[e]).T  # (pairs_e, hidden_size)
    return y


def moe_dispatch(x, top_k_index, top_k_weights, gate_proj, up_proj, down_proj, activation="silu"):
    """Numba version of `ops.moe_dispatch_reference`: group the (token, slot) pairs by expert,
    run each chosen expert once on its contiguous group, then add the weighted results per token."""
    x, top_k_index, top_k_weights = np.asarray(x), np.asarray(top_k_index), np.asarray(top_k_weights)
    gate_proj, up_proj, down_proj = np.asarray(gate_proj), np.asarray(up_proj), np.asarray(down_proj)
    nn.activation(activation)  # raises ConfigError naming an unknown activation
    tokens, hidden = x.shape
    num_experts, inter, _ = gate_proj.shape
    if (
        gate_proj.shape != (num_experts, inter, hidden)
        or up_proj.shape != gate_proj.shape
        or down_proj.shape != (num_experts, hidden, inter)
    ):
        raise InputError(
            f"moe_dispatch: gate_proj {gate_proj.shape}, up_proj {up_proj.shape}, down_proj "
            f"{down_proj.shape} do not fit x {x.shape}: expected (num_experts, moe_intermediate_size, "
            f"{hidden}) twice and (num_experts, {hidden}, moe_intermediate_size)"
        )
    if top_k_index.ndim != 2 or top_k_index.shape[0] != tokens or top_k_weights.shape != top_k_index.shape:
        raise InputError(
            f"moe_dispatch: top_k_index {top_k_index.shape} and top_k_weights {top_k_weights.shape} "
            f"must both be (tokens={tokens}, top_k)"
        )
    if top_k_index.size and (top_k_index.min() < 0 or top_k_index.max() >= num_experts):
        raise InputError(
            f"moe_dispatch: top_k_index holds expert ids {top_k_index.min()}..{top_k_index.max()}, "
            f"outside 0..{num_experts - 1}"
        )
    arrays = [_kernel_array(a) for a in (x, top_k_weights, gate_proj, up_proj, down_proj)]
    if any(a is None for a in arrays):
        return ops.moe_dispatch_reference(x, top_k_index, top_k_weights, gate_proj, up_proj, down_proj, activation)
    kx, kw, kgate, kup, kdown = arrays
    if kgate.dtype != kup.dtype:  # compile for one (gate, up) dtype pair only
        kgate, kup = _as_float32(gate_proj), _as_float32(up_proj)
    top_k = top_k_index.shape[1]
    index = np.ascontiguousarray(top_k_index, dtype=np.int64)  # (tokens, top_k)
    starts, pair_of_rank, rank_of_pair = _group_by_expert(index, num_experts)
    active = np.flatnonzero(np.diff(starts))  # (num_active,) experts with at least one pair
    if tokens * top_k <= EXPERT_KERNEL_MAX_PAIRS * max(len(active), 1) and activation in _ACTIVATION_CODES:
        h = np.empty((tokens * top_k, inter), np.float32)  # (pairs, moe_intermediate_size), rank order
        _launch(
            _experts_up_kernel, kx, pair_of_rank, starts, active, kgate, kup, top_k, _ACTIVATION_CODES[activation], h
        )
        y = np.empty((tokens * top_k, hidden), np.float32)  # (pairs, hidden_size), rank order
        _launch(_experts_down_kernel, h, starts, active, kdown, y)
    else:
        y = _experts_blas(x, pair_of_rank, top_k, starts, active, gate_proj, up_proj, down_proj, activation)
    out = np.empty((tokens, hidden), np.float32)
    _launch(_combine_kernel, y, rank_of_pair, kw, out)
    return out.astype(x.dtype, copy=False)

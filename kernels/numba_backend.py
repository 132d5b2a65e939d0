"""Numba CPU kernels for the three ops of `minilm.ops`: linear, attention and expert dispatch.

Importing this module registers the backend "numba" (`minilm.ops.set_backend("numba")`). Each
public function here has the signature of its NumPy reference in `minilm/ops.py` and returns what
the reference returns, to the tolerances stated in `tests/test_kernels.py`.

Axis names, as in the references:
    batch, num_heads, num_kv_heads, groups = num_heads // num_kv_heads, seq (query positions),
    kv_seq (key positions), head_dim, in_features, out_features, tokens, top_k, hidden_size,
    num_experts, moe_intermediate_size

Precision rules (the same in every kernel)
------------------------------------------
* float32 and bfloat16 (`ml_dtypes.bfloat16`) inputs run in the kernels; any other dtype (float64,
  float16) falls back to the NumPy reference, which is slower but gives the same answer.
* Numba cannot compute in bfloat16. A bfloat16 array is passed to the kernels as its raw bits
  (`a.view(np.uint16)`) and each element is widened to float32 as it is loaded (`_to_f32`: the 16
  bits become the high half of a float32, which is exact). So there is no converted copy of a
  bfloat16 weight or KV cache, and all arithmetic and every accumulator is float32.
* The output dtype is the reference's: NumPy is asked what the reference's last operation would
  give for these input dtypes (`_matmul_dtype`); e.g. ml_dtypes' bfloat16 @ bfloat16 gives float32,
  so bf16 linear and attention return float32 and bf16 `moe_dispatch` returns bfloat16 (the
  reference's `zeros_like(x)`). A float32 result is rounded to bfloat16 once, at the end.
  The bf16 reference rounds some intermediates to bf16 (the scale, the attention weights, the
  running expert sum); the kernels do not, so they are the more accurate of the two.
* Dot products are float32 sums whose order the compiler may change (`fastmath={"reassoc",
  "contract"}` on `_dot` only: reassociation and fused multiply-add, nothing that changes inf/NaN
  handling), the same freedom BLAS takes; without it the loop does not vectorise and the decode
  gemv is 5x slower. Everything else (softmax, masks, soft cap, activations) is strict IEEE
  (`fastmath=False`) and follows the reference's order of operations.
* Softmax follows `minilm.nn.softmax` exactly: subtract the row max (0 if the max is not finite),
  exponentiate, divide each term by the sum (by 1 if the sum is 0). A query row whose mask allows
  no key attends uniformly to all keys, as `ops.attention_reference` does (transformers' behaviour).
* Expert sums: each (token, slot) result is written to its own row, then every token adds its
  top_k rows in slot order j = 0..top_k-1 (the reference adds them in expert-id order). The order
  never depends on threads, so results are bit-for-bit repeatable.

Compilation is cached on disk (`cache=True`, in `kernels/__pycache__`), so only the first process
after an edit pays for it; each new dtype combination compiles once.
"""

from __future__ import annotations

import functools
import math

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from minilm import nn, ops
from minilm.errors import InputError

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# Reassociation and fused multiply-add for dot products only (see the module docstring).
_SUM_IN_ANY_ORDER = {"reassoc", "contract"}

# ---------------------------------------------------------------------------------------------
# Loading float32 or bfloat16 elements as float32
# ---------------------------------------------------------------------------------------------


@intrinsic
def _bf16_bits_to_f32(typingctx, bits):
    """The float32 whose high 16 bits are `bits` (a bfloat16's bit pattern) and low 16 bits are 0.
    This is the exact value of the bfloat16: the widening conversion, done with a shift."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.uint16), codegen


def _to_f32(value):
    """An element of a kernel array as float32 (float32 as is; uint16 = bfloat16 bits, widened)."""
    raise NotImplementedError("only callable from compiled code")


@overload(_to_f32, inline="always")
def _to_f32_overload(value):
    if value == types.uint16:
        return lambda value: _bf16_bits_to_f32(value)
    if isinstance(value, types.Float):
        return lambda value: np.float32(value)
    return None


def _kernel_array(a):
    """The array a kernel reads: float32 as is, bfloat16 as its uint16 bits; None for other dtypes."""
    if a.dtype == np.float32:
        return a
    if a.dtype == BFLOAT16:
        return a.view(np.uint16)
    return None


def _as_float32(a):
    """A float32 array with the values of `a` (copies bf16; used only on the BLAS paths)."""
    return a.astype(np.float32, copy=False)


@functools.lru_cache(maxsize=None)
def _matmul_dtype(a_dtype, b_dtype):
    """The dtype NumPy gives `a @ b` for these dtypes (bf16 @ bf16 is float32 with ml_dtypes)."""
    return (np.zeros((1, 1), a_dtype) @ np.zeros((1, 1), b_dtype)).dtype


@njit(fastmath=_SUM_IN_ANY_ORDER, cache=True)
def _dot(a, b):
    """sum_i a[i] * b[i] in float32. a, b: (n,) float32 or bfloat16 bits.

    The one place where the compiler may reorder a sum (so that it becomes SIMD code)."""
    acc = np.float32(0.0)
    for i in range(a.shape[0]):
        acc += _to_f32(a[i]) * _to_f32(b[i])
    return acc


def _numba_type(value, is_output):
    """The numba type a kernel argument is compiled for (see `_launch`)."""
    if isinstance(value, np.ndarray):
        dtype = numba.from_dtype(value.dtype)
        if is_output:
            return types.Array(dtype, value.ndim, "C")
        return types.Array(dtype, value.ndim, "A", readonly=True)
    if isinstance(value, (bool, np.bool_)):
        return types.boolean
    if isinstance(value, np.float32):
        return types.float32
    if isinstance(value, (int, np.integer)):
        return types.int64
    raise TypeError(f"no kernel argument type for {type(value).__name__}")


@functools.lru_cache(maxsize=None)
def _entry_point(kernel, signature):
    """`kernel` compiled for `signature`: loaded from the disk cache, or compiled once."""
    return kernel.compile(signature)


def _launch(kernel, *args, outputs=1):
    """Run `kernel(*args)`; its last `outputs` arguments are the arrays it writes.

    Every input array is compiled for as a read-only array of any memory layout, and every output
    as a C-contiguous array we allocated, so one compiled kernel per dtype combination serves
    contiguous tensors, transposed views and broadcast masks alike (numba's default would compile
    a new kernel for each layout it meets, seconds each).
    """
    n = len(args) - outputs
    signature = tuple(_numba_type(a, is_output=i >= n) for i, a in enumerate(args))
    _entry_point(kernel, signature)(*args)


# ---------------------------------------------------------------------------------------------
# linear: y = x W^T + b
# ---------------------------------------------------------------------------------------------

# Up to this many rows of x, the compiled kernel (which reads W once for all rows) beats BLAS;
# above it, the product is compute-bound and NumPy's BLAS does it better.
GEMV_MAX_ROWS = 4


@njit(parallel=True, cache=True)
def _gemv_kernel(x, weight, bias, has_bias, out):
    """out[r, o] = sum_i x[r, i] * weight[o, i] (+ bias[o]), for a few rows r.

    x      (rows, in_features)           float32 or bf16 bits
    weight (out_features, in_features)   float32 or bf16 bits
    bias   (out_features,)               float32 or bf16 bits (ignored unless has_bias)
    out    (rows, out_features)          float32

    prange over output features o: each thread streams its share of weight rows from memory
    once and dots each with every row of x (which stays in cache). For decode (rows = 1) this is
    a memory-bound gemv, so bf16 weights, read as 16 bits, are twice as fast as float32.
    """
    rows = x.shape[0]
    out_features = weight.shape[0]
    for o in prange(out_features):
        for r in range(rows):
            y = _dot(weight[o], x[r])
            if has_bias:
                y += _to_f32(bias[o])
            out[r, o] = y


def linear(x, weight, bias=None):
    """Numba version of `ops.linear_reference`: x (..., in_features), weight (out_features, in_features)."""
    x, weight = np.asarray(x), np.asarray(weight)
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise InputError(
            f"linear: x {x.shape} and weight {weight.shape} do not fit: expected x (..., in_features) "
            f"and weight (out_features, in_features) with the same in_features"
        )
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (weight.shape[0],):
            raise InputError(f"linear: bias has shape {bias.shape}, expected ({weight.shape[0]},)")
    out_dtype = _matmul_dtype(x.dtype, weight.dtype)
    if bias is not None:
        out_dtype = np.result_type(out_dtype, bias.dtype)
    kx, kw = _kernel_array(x), _kernel_array(weight)
    kb = _kernel_array(bias) if bias is not None else kw[:1, 0]  # unused; the weight's type compiles once
    if kx is None or kw is None or kb is None:
        return ops.linear_reference(x, weight, bias)  # float64 / float16: the reference
    lead, in_features = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x2 = kx.reshape(rows, in_features)  # (rows, in_features), a view when x is contiguous
    if rows <= GEMV_MAX_ROWS:
        y = np.empty((rows, weight.shape[0]), np.float32)  # (rows, out_features)
        _launch(_gemv_kernel, x2, kw, kb, bias is not None, y)
    else:
        # Compute-bound: BLAS sgemm (a bf16 weight is widened to a float32 copy first).
        y = _as_float32(x.reshape(rows, in_features)) @ _as_float32(weight).T
        if bias is not None:
            y += _as_float32(bias)
    return y.reshape(*lead, weight.shape[0]).astype(out_dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# attention: softmax(soft_cap(q k^T * scale) + bias, masked) @ v, grouped-query heads
# ---------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _attention_kernel(q, k, v, mask, bias, has_bias, scale, cap, has_cap, keep_weights, out, weights):
    """Fused attention, one query row at a time, never materialising the (seq, kv_seq) matrix.

    q       (batch, num_heads, seq, head_dim)         float32 or bf16 bits
    k, v    (batch, num_kv_heads, kv_seq, head_dim)   float32 or bf16 bits, read in place (GQA:
                                                     query head h reads kv head h // groups)
    mask    (batch, 1, seq, kv_seq) bool             broadcast view (zero strides), True = may attend
    bias    (batch, num_heads, seq, kv_seq)           broadcast view, float32
    out     (batch, num_heads, seq, head_dim)         float32, written
    weights (batch, num_heads, seq, kv_seq)           float32, written when keep_weights

    prange over (batch, head). For each query row i of that head, three passes over the keys:
      1. s_j = soft_cap(q_i . k_j * scale) + bias_ij for the keys the mask allows; their max m
         (masked keys cost nothing: no dot product, no exp, no read of v)
      2. p_j = exp(s_j - m) / sum_j' exp(s_j' - m)     (nn.softmax: m -> 0 if not finite,
                                                        sum -> 1 if 0)
      3. out_i = sum_j p_j v_j                          (vectorised over head_dim)
    A row whose mask allows no key attends uniformly to every key (p_j = 1 / kv_seq), as the
    reference does to match transformers' additive mask.
    """
    batch, num_heads, seq, head_dim = q.shape
    kv_seq = k.shape[2]
    groups = num_heads // k.shape[1]
    for bh in prange(batch * num_heads):
        b = bh // num_heads
        h = bh % num_heads
        kv_h = h // groups
        p = np.empty(kv_seq, np.float32)  # (kv_seq,) scores of one query row, then its weights
        for i in range(seq):
            sees_nothing = True
            for j in range(kv_seq):
                if mask[b, 0, i, j]:
                    sees_nothing = False
                    break
            # 1. scores of the allowed keys (all scores 0 for a row that sees nothing)
            row_max = np.float32(-np.inf)
            for j in range(kv_seq):
                if sees_nothing:
                    p[j] = 0.0
                    row_max = np.float32(0.0)
                elif mask[b, 0, i, j]:
                    s = _dot(q[b, h, i], k[b, kv_h, j]) * scale
                    if has_cap:
                        s = cap * np.tanh(s / cap)
                    if has_bias:
                        s += _to_f32(bias[b, h, i, j])
                    p[j] = s
                    row_max = max(row_max, s)
            if not np.isfinite(row_max):
                row_max = np.float32(0.0)
            # 2. softmax over the allowed keys; masked keys get weight 0
            total = np.float32(0.0)
            for j in range(kv_seq):
                if sees_nothing or mask[b, 0, i, j]:
                    e = np.exp(p[j] - row_max)
                    p[j] = e
                    total += e
                else:
                    p[j] = 0.0
            if total == 0.0:
                total = np.float32(1.0)
            # 3. weighted sum of the values
            o = out[b, h, i]  # (head_dim,)
            o[:] = 0.0
            for j in range(kv_seq):
                if sees_nothing or mask[b, 0, i, j]:
                    w = p[j] / total
                    p[j] = w
                    vj = v[b, kv_h, j]  # (head_dim,)
                    for d in range(head_dim):
                        o[d] += w * _to_f32(vj[d])
            if keep_weights:
                weights[b, h, i, :] = p


def attention(q, k, v, mask=None, *, scale, bias=None, soft_cap=None, return_weights=False):
    """Numba version of `ops.attention_reference` (same arguments, same result)."""
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise InputError(
            f"attention: q {q.shape}, k {k.shape}, v {v.shape} must all be 4-D "
            f"(batch, heads, seq, head_dim)"
        )
    batch, num_heads, seq, head_dim = q.shape
    _, num_kv_heads, kv_seq, _ = k.shape
    if k.shape != (batch, num_kv_heads, kv_seq, head_dim) or v.shape != k.shape:
        raise InputError(
            f"attention: k {k.shape} and v {v.shape} must both be "
            f"(batch={batch}, num_kv_heads, kv_seq, head_dim={head_dim})"
        )
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise InputError(f"attention: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    kq, kk, kv = _kernel_array(q), _kernel_array(k), _kernel_array(v)
    if kq is None or kk is None or kv is None:
        return ops.attention_reference(
            q, k, v, mask, scale=scale, bias=bias, soft_cap=soft_cap, return_weights=return_weights
        )  # float64 / float16: the reference
    if kk.dtype != kv.dtype:  # one of k, v bf16 and the other float32: compile for one pair only
        kk, kv = _as_float32(k), _as_float32(v)
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float32)  # small before broadcasting (e.g. ALiBi's (1, heads, 1, kv_seq))
    try:
        if mask is None:
            mask_view = np.broadcast_to(np.True_, (batch, 1, seq, kv_seq))
        else:
            mask_view = np.broadcast_to(np.asarray(mask, dtype=bool), (batch, 1, seq, kv_seq))
        if bias is None:
            bias_view = np.broadcast_to(np.float32(0.0), (batch, num_heads, seq, kv_seq))
        else:
            bias_view = np.broadcast_to(bias, (batch, num_heads, seq, kv_seq))
    except ValueError as err:
        raise InputError(
            f"attention: mask {None if mask is None else np.shape(mask)} must broadcast to "
            f"(batch, 1, seq, kv_seq) = {(batch, 1, seq, kv_seq)} and bias "
            f"{None if bias is None else bias.shape} to {(batch, num_heads, seq, kv_seq)}"
        ) from err
    out = np.empty((batch, num_heads, seq, head_dim), np.float32)
    if return_weights:
        weights = np.empty((batch, num_heads, seq, kv_seq), np.float32)
    else:
        weights = np.empty((1, 1, 1, 1), np.float32)  # unused
    _launch(
        _attention_kernel, kq, kk, kv, mask_view, bias_view, bias is not None,
        np.float32(scale), np.float32(0.0 if soft_cap is None else soft_cap), soft_cap is not None,
        bool(return_weights), out, weights, outputs=2,
    )  # fmt: skip
    out = out.astype(_matmul_dtype(q.dtype, v.dtype), copy=False)
    return out, (weights.astype(q.dtype, copy=False) if return_weights else None)


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
            yr = y[rank_of_pair[t * top_k + j]]  # (hidden_size,)
            for d in range(o.shape[0]):
                o[d] += w * yr[d]


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
        _launch(_experts_up_kernel, kx, pair_of_rank, starts, active, kgate, kup, top_k, _ACTIVATION_CODES[activation], h)
        y = np.empty((tokens * top_k, hidden), np.float32)  # (pairs, hidden_size), rank order
        _launch(_experts_down_kernel, h, starts, active, kdown, y)
    else:
        y = _experts_blas(x, pair_of_rank, top_k, starts, active, gate_proj, up_proj, down_proj, activation)
    out = np.empty((tokens, hidden), np.float32)
    _launch(_combine_kernel, y, rank_of_pair, kw, out)
    return out.astype(x.dtype, copy=False)


ops.register_backend("numba", {"linear": linear, "attention": attention, "moe_dispatch": moe_dispatch})

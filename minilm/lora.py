"""LoRA (Hu et al., 2021): a frozen weight plus a trainable low-rank update, `LoraWeight`.

A linear layer y = x W^T (W of shape (out_features, in_features), the Hugging Face layout) is
adapted by adding a product of two thin matrices, scaled:

    y = x W^T + scaling * (x A^T) B^T         A (rank, in_features), B (out_features, rank)
      = x (W + scaling * B A)^T               the merged weight: W + delta, delta = scaling * B A

W stays frozen; only A and B are trained (rank * (in + out) numbers instead of in * out).
PEFT initialises B to zeros, so the adapted model starts as the base model; scaling = alpha / rank.

Grouped form. keras' `EinsumDense.enable_lora` adapts the *kernel* of an einsum layer: for a
query kernel of shape (num_heads, hidden_size, head_dim) it adds `lora_kernel_a` of shape
(num_heads, hidden_size, rank) and `lora_kernel_b` of shape (rank, head_dim): one A per head and
one B that every head shares. In the (out, in) layout that is `groups` blocks of rows, each with
its own A and the one shared B:

    lora_A (groups, rank, in_features)            A[g] = lora_kernel_a[g].T
    lora_B (out_features // groups, rank)         B    = lora_kernel_b.T
    y[..., g-th block of out_features // groups] += scaling * (x A[g]^T) B^T

groups = 1 is PEFT's LoRA (lora_A[0] is PEFT's `lora_A.weight`, lora_B its `lora_B.weight`);
groups = num_heads (or num_kv_heads for a value kernel) is keras'.

The base weight is whatever `ops.linear` reads: a float array in the (out, in) layout (any shape
whose last axis is in_features and whose leading axes multiply to out_features, e.g. BLOOM's
(num_heads, 3, head_dim, hidden_size) view), or a quantized weight (GGUF blocks: LoRA over a
quantized model is QLoRA's idea). `ops.linear(x, lora_weight)` computes the formula above with
three products through the kernel seam, on every backend. `enabled = False` skips the update
(the base model); `merged()` is W + delta as a plain array; `delta()` is the update alone.

Backward (`lora_linear_backward`, below its forward): with upstream gradient dy = dL/dy,

    dx      = dy W  +  scaling * sum_g (dy_g B) A[g]        dy_g: the g-th block of dy's features
    dA[g]   = scaling * (dy_g B)^T x                         (rank, in_features)
    dB      = scaling * sum_g dy_g^T (x A[g]^T)              (out_features // groups, rank)

W gets no gradient (frozen). Axis names: tokens (all leading axes of x flattened), in_features,
out_features, groups, rank.
"""

from __future__ import annotations

import numpy as np

from . import ops
from .errors import InputError


class LoraWeight:
    """A frozen base weight with a low-rank update: base + scaling * (the blocks of B @ A[g]).

    base     (out_features, in_features) array, or a view of it whose last axis is in_features,
             or a quantized weight; frozen
    lora_A   (groups, rank, in_features) float32, trainable
    lora_B   (out_features // groups, rank) float32, trainable
    scaling  float (PEFT: lora_alpha / rank; keras: lora_alpha / rank, alpha defaulting to rank)
    enabled  False: the layer computes with the base weight alone

    `ops.linear(x, w)` dispatches on `has_backward`. The optimizer changes `lora_A` and `lora_B` in
    place (or assigns new arrays of the same shapes).
    """

    is_lora = True  # what `ops.prepare_weight`, `ops.like` and `ops.to_host` look for
    has_backward = True  # `ops.linear` calls `linear`, `ops.linear_backward` calls `backward`

    def __init__(self, base, lora_A, lora_B, scaling=1.0, enabled=True):
        shape = tuple(base.shape)
        if len(shape) < 2:
            raise InputError(f"LoraWeight: the base weight must have shape (out_features, in_features); got {shape}")
        out_features, in_features = int(np.prod(shape[:-1])), shape[-1]
        lora_A, lora_B = _float_array(lora_A, "lora_A"), _float_array(lora_B, "lora_B")
        if lora_A.ndim == 2:  # PEFT's (rank, in_features): one group
            lora_A = lora_A[None]
        if lora_A.ndim != 3 or lora_A.shape[2] != in_features:
            raise InputError(
                f"LoraWeight: lora_A must have shape (groups, rank, in_features={in_features}) or (rank, "
                f"in_features); got {lora_A.shape}"
            )
        groups, rank = lora_A.shape[:2]
        if out_features % groups or lora_B.shape != (out_features // groups, rank):
            raise InputError(
                f"LoraWeight: lora_B must have shape (out_features // groups, rank) = "
                f"({out_features} // {groups}, {rank}); got {lora_B.shape}"
            )
        self.base, self.lora_A, self.lora_B = base, lora_A, lora_B
        self.scaling, self.enabled = float(scaling), bool(enabled)

    # -- what the layer looks like ---------------------------------------------------------

    @property
    def shape(self):
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def in_features(self):
        return self.shape[-1]

    @property
    def out_features(self):
        return int(np.prod(self.shape[:-1]))

    @property
    def groups(self):
        return self.lora_A.shape[0]

    @property
    def rank(self):
        return self.lora_A.shape[1]

    def reshape(self, *shape):
        """The same adapter over a reshaped base (BLOOM's (num_heads, 3, head_dim, hidden) view
        read as (3 * hidden, hidden)): the rows keep their order, so A and B are shared, not copied."""
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if shape[-1] != self.in_features:
            raise InputError(f"LoraWeight.reshape: the last axis must stay in_features={self.in_features}; got {shape}")
        return LoraWeight(self.base.reshape(shape), self.lora_A, self.lora_B, self.scaling, self.enabled)

    def matrix(self):
        """The base as an (out_features, in_features) matrix (a view; a quantized base as it is)."""
        return self.base if self.ndim == 2 else self.base.reshape(self.out_features, self.in_features)

    def with_arrays(self, convert):
        """The same adapter with `convert` applied to base, lora_A and lora_B (e.g.
        `ops.prepare_weight` to place them where the backend reads them)."""
        return LoraWeight(convert(self.base), convert(self.lora_A), convert(self.lora_B), self.scaling, self.enabled)

    def __repr__(self):
        return (
            f"LoraWeight(base {self.shape}, rank={self.rank}, groups={self.groups}, "
            f"scaling={self.scaling:g}, enabled={self.enabled})"
        )

    # -- the update, as a matrix -------------------------------------------------------------

    def delta(self):
        """scaling * B A[g] for every group, stacked: (out_features, in_features) float32 (no base)."""
        A, B = ops.to_host(self.lora_A), ops.to_host(self.lora_B)
        blocks = np.einsum("or,gri->goi", B, A)  # (groups, out_features // groups, in_features)
        return np.float32(self.scaling) * blocks.reshape(self.out_features, self.in_features)

    def merged(self):
        """base + delta as a plain host array of the base's shape and dtype (the base's dtype is
        float32 for a quantized base). With `enabled` False: the base alone."""
        base = np.asarray(ops.to_host(self.base))
        if not self.enabled:
            return base.copy()
        dtype = base.dtype
        merged = base.astype(np.float32) + self.delta().reshape(base.shape)
        return merged.astype(dtype)

    # -- forward: y = x W^T + scaling * (x A[g]^T) B^T --------------------------------------

    def linear(self, x, bias=None):
        """The forward, called by `ops.linear(x, self, bias)`. x: (..., in_features) -> (..., out_features)"""
        y = ops.linear(x, self.matrix(), bias)  # (..., out_features)
        if not self.enabled:
            return y
        lead, groups, rank = x.shape[:-1], self.groups, self.rank
        a = self.lora_A.reshape(groups * rank, self.in_features)  # (groups * rank, in_features): all A[g] stacked
        t = ops.linear(x, a).reshape(*lead, groups, rank)  # (..., groups, rank): x A[g]^T per group
        u = ops.linear(t, self.lora_B)  # (..., groups, out_features // groups): (x A[g]^T) B^T
        return y + (self.scaling * u.reshape(*lead, self.out_features)).astype(y.dtype, copy=False)

    def backward(self, dy, x):
        """`lora_linear_backward` (below), called by `ops.linear_backward`: (dx, {"lora_A": dA, "lora_B": dB})."""
        dx, d_a, d_b = lora_linear_backward(dy, x, self)
        return dx, {"lora_A": d_a, "lora_B": d_b}


def lora_linear_backward(dy, x, weight):
    """Gradients of y = ops.linear(x, weight) for a LoraWeight (the bias, if any, is frozen).

    dy: (..., out_features) upstream gradient; x: (..., in_features) the forward's input
    -> dx (..., in_features) float32, dA (groups, rank, in_features), dB (out_features // groups, rank)
    With `enabled` False: dx from the base alone, dA and dB zeros (the update took no part).
    """
    dy, x = np.asarray(dy, dtype=np.float32), np.asarray(x, dtype=np.float32)
    lead, groups = x.shape[:-1], weight.groups
    dx = ops.linear_input_grad(dy, weight.matrix())  # (..., in_features): dy W, W frozen
    if not weight.enabled:
        return dx, np.zeros_like(weight.lora_A), np.zeros_like(weight.lora_B)
    A, B, s = weight.lora_A, weight.lora_B, np.float32(weight.scaling)
    x2 = x.reshape(-1, weight.in_features)  # (tokens, in_features)
    dy_g = dy.reshape(-1, groups, weight.out_features // groups)  # (tokens, groups, out_features // groups)
    t = np.einsum("ni,gri->ngr", x2, A)  # (tokens, groups, rank): x A[g]^T, the forward's middle
    dt = s * (dy_g @ B)  # (tokens, groups, rank): gradient at the middle, dy_g B
    dA = np.einsum("ngr,ni->gri", dt, x2)  # (groups, rank, in_features): dt_g^T x
    dB = s * np.einsum("ngo,ngr->or", dy_g, t)  # (out_features // groups, rank): sum_g dy_g^T t_g
    dx = dx + np.einsum("ngr,gri->ni", dt, A).reshape(*lead, weight.in_features)  # + sum_g dt_g A[g]
    return dx, dA.astype(np.float32), dB.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Full fine-tuning of one linear layer (value_and_grad's full_params)
# ---------------------------------------------------------------------------------------------


class FullWeight:
    """A plain weight whose own gradient the backward pass computes: y = x W^T + b as usual, and

        dx = dy W,   dW = dy^T x   (out_features, in_features), summed over every position

    `value_and_grad(..., full_params=[names])` wraps the named weights for one call."""

    is_lora = False
    has_backward = True

    def __init__(self, base):
        self.base = base

    @property
    def shape(self):
        return tuple(self.base.shape)

    def reshape(self, *shape):
        return FullWeight(self.base.reshape(*shape))

    def linear(self, x, bias=None):
        return ops.linear(x, self.base, bias)

    def backward(self, dy, x):
        """(dx (..., in_features), {"weight": dW (out_features, in_features) float32})."""
        dy2 = np.asarray(dy, np.float32).reshape(-1, self.base.shape[0])  # (tokens, out_features)
        x2 = np.asarray(x, np.float32).reshape(-1, self.base.shape[1])  # (tokens, in_features)
        return ops.linear_input_grad(dy, self.base), {"weight": dy2.T @ x2}


# ---------------------------------------------------------------------------------------------
# keras' EinsumDense kernels <-> the grouped (out, in) form
# ---------------------------------------------------------------------------------------------


def from_keras_kernels(base, lora_kernel_a, lora_kernel_b, scaling):
    """A LoraWeight from keras' `lora_kernel_a` (groups, in_features, rank) or (in_features, rank)
    and `lora_kernel_b` (rank, out_features // groups); base in the (out, in) layout."""
    a = np.asarray(lora_kernel_a, dtype=np.float32)
    a = a[None] if a.ndim == 2 else a  # (groups, in_features, rank)
    return LoraWeight(base, a.transpose(0, 2, 1), np.asarray(lora_kernel_b, dtype=np.float32).T, scaling)


def to_keras_kernels(weight):
    """keras' (lora_kernel_a, lora_kernel_b) of a LoraWeight: (groups, in_features, rank), or
    (in_features, rank) for one group, and (rank, out_features // groups)."""
    a = ops.to_host(weight.lora_A).transpose(0, 2, 1)  # (groups, in_features, rank)
    return (a[0] if weight.groups == 1 else a), ops.to_host(weight.lora_B).T


def _float_array(a, name):
    if not hasattr(a, "shape") or not np.issubdtype(np.dtype(a.dtype), np.floating):
        raise InputError(f"LoraWeight: {name} must be a float array; got {type(a).__name__}")
    return a

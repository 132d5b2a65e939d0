"""The one seam for speed: matmul (linear), attention and expert dispatch.

Model files call `ops.linear`, `ops.attention` and `ops.moe_dispatch`. The plain NumPy versions
below are the reference: read them to learn what each operation computes. Compiled versions
(Numba on the CPU, CuPy on the GPU) live in `kernels/` (installed as `minilm.kernels`) and
register themselves under a backend name; `set_backend` picks which one runs. Model code never
changes and never knows which backend is active. A fourth op, `prepare_weight`, runs once per
weight when a model loads: it puts the weight where, and in the form, the backend reads it; with
it `reads_quantized` says whether the backend computes straight from a GGUF matrix's blocks
(`minilm.io.quants.QuantizedWeight`), which then never becomes float32. A `minilm.lora.LoraWeight`
(a frozen weight plus a low-rank update) is recognised by `linear` itself (`has_backward`), which computes
it with three products of the active backend. For training, `linear_input_grad` is the backward
product dx = dy W through a frozen (possibly quantized) weight; `linear_backward`,
`attention_backward` and `moe_dispatch_backward` (NumPy, after their forwards) are the gradients
of the three ops: upstream gradient and the forward's inputs in, input gradients out.

Shapes:
    linear:        x (..., in_features), weight (out_features, in_features) -> (..., out_features)
    linear_input_grad: dy (..., out_features), weight (out_features, in_features) -> (..., in_features)
    attention:     q (batch, num_heads, seq, head_dim), k/v (batch, num_kv_heads, kv_seq, head_dim)
    moe_dispatch:  x (tokens, hidden_size), top_k_index/top_k_weights (tokens, top_k),
                   gate_proj/up_proj (num_experts, moe_intermediate_size, hidden_size),
                   down_proj (num_experts, hidden_size, moe_intermediate_size)
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from . import activations, fusion, nn
from .activations import tap
from .errors import ConfigError
from .io.quants import QuantizedWeight

# ---------------------------------------------------------------------------------------------
# NumPy reference implementations
# ---------------------------------------------------------------------------------------------


def linear_reference(x, weight, bias=None):
    """y = x W^T + b, with W stored as (out_features, in_features) like torch.nn.Linear."""
    y = x @ weight.T  # (..., out_features)
    if bias is not None:
        y = y + bias
    return y


def linear_input_grad_reference(dy, weight):
    """dx = dy W: the gradient of y = x W^T + b with respect to x, in float32 (the backward pass).
    A quantized weight is dequantized (`np.asarray`)."""
    return np.asarray(dy, dtype=np.float32) @ np.asarray(weight, dtype=np.float32)  # (..., in_features)


def attention_reference(q, k, v, mask=None, *, scale, bias=None, soft_cap=None, return_weights=False, p=None):
    """Scaled dot-product attention with grouped-query heads.

    scores = soft_cap(q k^T * scale) + bias, then -inf where `mask` is False, softmax over keys,
    then a weighted sum of the values. Every feature of every model is one of these arguments:

      mask      (batch|1, 1, seq, kv_seq) bool: causal, sliding window, padding, image spans
      bias      (batch|1, num_heads|1, seq|1, kv_seq) float: ALiBi
      soft_cap  float: Gemma's attention logit soft cap, cap * tanh(scores / cap)

    A query row whose keys are all masked (a left-padding query) attends uniformly to every key,
    exactly what transformers' additive mask (finfo.min on every score) produces; never NaN.
    p: the attention module's weights, which name its taps (`minilm.capture`); None taps nothing.
    Returns (output (batch, num_heads, seq, head_dim), weights (batch, num_heads, seq, kv_seq) or None).
    """
    b, num_heads, seq, head_dim = q.shape
    num_kv_heads, kv_seq = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    # GQA without copying the cache: query heads grouped under the key/value head they share.
    qg = q.reshape(b, num_kv_heads, groups, seq, head_dim)  # (batch, num_kv_heads, groups, seq, head_dim)
    scores = qg @ k[:, :, None].swapaxes(-1, -2)  # (batch, num_kv_heads, groups, seq, kv_seq)
    scores = scores.reshape(b, num_heads, seq, kv_seq) * np.asarray(scale, dtype=q.dtype)
    scores = tap(p, "scores", scores)  # q k^T * scale: before the soft cap, the bias and the mask
    if soft_cap is not None:
        scores = nn.soft_cap(scores, np.asarray(soft_cap, dtype=scores.dtype))
    if bias is not None:
        scores = scores + bias
    scores = scores.astype(np.float32, copy=False)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
        nothing_visible = ~np.any(mask, axis=-1, keepdims=True)  # (batch|1, 1, seq, 1)
        scores = np.where(nothing_visible, 0.0, scores)  # uniform weights, as transformers gives
    scores = tap(p, "scores_masked", scores)  # what the softmax sees: capped, biased, -inf where masked
    weights = nn.softmax(scores, axis=-1).astype(q.dtype, copy=False)  # (batch, num_heads, seq, kv_seq)
    weights = tap(p, "attn_weights", weights)
    wg = weights.reshape(b, num_kv_heads, groups, seq, kv_seq)
    out = (wg @ v[:, :, None]).reshape(b, num_heads, seq, head_dim)  # (batch, num_heads, seq, head_dim)
    return out, (weights if return_weights else None)


def moe_dispatch_reference(x, top_k_index, top_k_weights, gate_proj, up_proj, down_proj, activation="silu"):
    """Mixture of experts: send each token to its top-k experts and sum their weighted outputs.

    out[t] = sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(x[t]),
    expert_e(x) = down_proj[e] @ (act(gate_proj[e] @ x) * (up_proj[e] @ x))   (a gated MLP)

    Loops over the experts that received at least one token, as transformers' eager code does.
    """
    act = nn.activation(activation)
    out = np.zeros_like(x)  # (tokens, hidden_size)
    for e in np.unique(top_k_index):
        token_idx, slot = np.nonzero(top_k_index == e)  # tokens routed to expert e, and which of their k slots
        h = x[token_idx]  # (tokens_e, hidden_size)
        h = act(h @ gate_proj[e].T) * (h @ up_proj[e].T)  # (tokens_e, moe_intermediate_size)
        h = h @ down_proj[e].T  # (tokens_e, hidden_size)
        np.add.at(out, token_idx, h * top_k_weights[token_idx, slot, None])
    return out


# ---------------------------------------------------------------------------------------------
# Backward of attention and expert dispatch (training; NumPy only, the products are BLAS)
# ---------------------------------------------------------------------------------------------


def attention_backward(dout, q, k, v, mask=None, *, scale, bias=None, soft_cap=None):
    """Gradients of `attention_reference`'s output with respect to q, k and v. It recomputes the
    forward keeping its intermediates, then walks back (all float32):

        raw = q k^T        scaled = raw * scale      capped = soft_cap(scaled)
        scores = capped + bias, masked               w = softmax(scores)        out = w v

        dv = w^T dout                     (summed over the query heads of a key/value head: GQA)
        dw = dout v^T
        dscores = w * (dw - sum_k(dw * w))        (softmax; masked keys have w = 0, so get 0)
        draw = soft_cap'(scaled) * dscores * scale
        dq = draw k,   dk = draw^T q          (dk summed over the query heads of a group)

    The bias (ALiBi) and the mask are constants. A query that sees no key attends uniformly to
    every key (as transformers' additive mask gives); its dscores are the softmax backward at
    those uniform weights, which is what torch's autograd computes through the finfo.min mask
    (not the true derivative, 0: PITFALLS.md). Masks whose every query sees a key avoid that case.

    dout, q: (batch, num_heads, seq, head_dim); k, v: (batch, num_kv_heads, kv_seq, head_dim)
    -> dq like q, dk like k, dv like v
    """
    f32 = np.float32
    dout, q, k, v = (np.asarray(a, dtype=f32) for a in (dout, q, k, v))
    b, num_heads, seq, head_dim = q.shape
    num_kv_heads, kv_seq = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    qg = q.reshape(b, num_kv_heads, groups, seq, head_dim)  # (batch, num_kv_heads, groups, seq, head_dim)
    dg = dout.reshape(b, num_kv_heads, groups, seq, head_dim)
    # forward again, keeping what the backward needs
    scaled = (qg @ k[:, :, None].swapaxes(-1, -2)).reshape(b, num_heads, seq, kv_seq) * f32(scale)
    scores = scaled if soft_cap is None else nn.soft_cap(scaled, f32(soft_cap))
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
        scores = np.where(~np.any(mask, axis=-1, keepdims=True), 0.0, scores)  # no key visible: uniform
    w = nn.softmax(scores.astype(f32), axis=-1)  # (batch, num_heads, seq, kv_seq)
    wg = w.reshape(b, num_kv_heads, groups, seq, kv_seq)
    # and back
    dv = (wg.swapaxes(-1, -2) @ dg).sum(axis=2)  # (batch, num_kv_heads, kv_seq, head_dim)
    dw = (dg @ v[:, :, None].swapaxes(-1, -2)).reshape(b, num_heads, seq, kv_seq)  # (batch, num_heads, seq, kv_seq)
    dscores = nn.softmax_backward(dw, w)  # (batch, num_heads, seq, kv_seq)
    if soft_cap is not None:
        dscores = nn.soft_cap_backward(dscores, scaled, soft_cap)
    draw = (dscores * f32(scale)).reshape(b, num_kv_heads, groups, seq, kv_seq)
    dq = (draw @ k[:, :, None]).reshape(b, num_heads, seq, head_dim)  # (batch, num_heads, seq, head_dim)
    dk = (draw.swapaxes(-1, -2) @ qg).sum(axis=2)  # (batch, num_kv_heads, kv_seq, head_dim)
    return dq, dk, dv


def moe_dispatch_backward(dout, x, top_k_index, top_k_weights, gate_proj, up_proj, down_proj, activation="silu"):
    """Gradients of `moe_dispatch_reference` with respect to x and to the routing weights (the
    experts' matrices are frozen). Per expert e and the tokens t routed to it (slot j):

        g = x W_gate^T,  u = x W_up^T,  a = act(g) * u,  o = a W_down^T,  out[t] += w[t, j] * o
        dw[t, j] = <dout[t], o>                   the routing weight's gradient (to the router)
        do = w[t, j] dout[t],  da = do W_down,  dg = act'(g) * (da * u),  du = da * act(g)
        dx[t] += dg W_gate + du W_up

    dout, x: (tokens, hidden_size); top_k_index, top_k_weights: (tokens, top_k)
    -> dx (tokens, hidden_size), dweights (tokens, top_k), float32
    """
    act, act_backward = nn.activation(activation), nn.activation_backward(activation)
    dout, x = np.asarray(dout, dtype=np.float32), np.asarray(x, dtype=np.float32)
    dx = np.zeros_like(x)  # (tokens, hidden_size)
    dweights = np.zeros(top_k_index.shape, np.float32)  # (tokens, top_k)
    for e in np.unique(top_k_index):
        token_idx, slot = np.nonzero(top_k_index == e)  # tokens routed to expert e, and which of their k slots
        h = x[token_idx]  # (tokens_e, hidden_size)
        g, u = linear(h, gate_proj[e]), linear(h, up_proj[e])  # (tokens_e, moe_intermediate_size) each
        o = linear(act(g) * u, down_proj[e])  # (tokens_e, hidden_size)
        dweights[token_idx, slot] = np.sum(dout[token_idx] * o, axis=-1)
        do = dout[token_idx] * np.asarray(top_k_weights, np.float32)[token_idx, slot, None]  # (tokens_e, hidden_size)
        da = linear_input_grad(do, down_proj[e])  # (tokens_e, moe_intermediate_size)
        dg, du = act_backward(da * u, g), da * act(g)
        np.add.at(dx, token_idx, linear_input_grad(dg, gate_proj[e]) + linear_input_grad(du, up_proj[e]))
    return dx, dweights


# ---------------------------------------------------------------------------------------------
# Backend registry: which implementation of each op runs
# ---------------------------------------------------------------------------------------------

OPS = (
    "linear",
    "attention",
    "moe_dispatch",
    "prepare_weight",
    "reads_quantized",
    "fused",
    "linear_input_grad",
    "decoders",
)

_BACKENDS = {
    "numpy": {
        "linear": linear_reference,
        "attention": attention_reference,
        "moe_dispatch": moe_dispatch_reference,
        "prepare_weight": np.asarray,  # a QuantizedWeight is dequantized (quants.py, the reference)
        "reads_quantized": lambda weight: False,
        "fused": {},  # {name: kernel} for `fusion.fusable` functions (norms, RoPE, activations)
        "linear_input_grad": linear_input_grad_reference,
        "decoders": {},  # {model_type: factory}: a compiled decode step (see `compiled_decoder`)
    }
}
# Backends in kernels/ register lazily on first use, so importing minilm never compiles anything.
_LAZY_BACKENDS = {"numba": "minilm.kernels.numba", "cupy": "minilm.kernels.cupy"}
# The backend `minilm.generate()` (and `python -m minilm`) uses when the program chose none
# (`set_backend`, `use_backend`, $MINILM_BACKEND): the compiled CPU kernels, which decode the
# shipped Gemma 3 270M faster than the NumPy reference (README, "Speed").
FAST_CPU_BACKEND = "numba"
_active = {"name": None, "chosen": False}  # chosen: set_backend / use_backend was called


def register_backend(name, implementations):
    """Make `implementations` ({op name: function}) selectable as backend `name`.
    Ops a backend leaves out fall back to the NumPy reference."""
    unknown = set(implementations) - set(OPS)
    if unknown:
        raise ConfigError(f"backend {name!r} registers unknown ops {sorted(unknown)}; ops are {OPS}")
    not_fusable = set(implementations.get("fused", {})) - set(fusion.FUSABLE)
    if not_fusable:
        raise ConfigError(f"backend {name!r} fuses {sorted(not_fusable)}, which no @fusable function is named")
    _BACKENDS[name] = dict(_BACKENDS["numpy"], **implementations)


def available_backends():
    return sorted(set(_BACKENDS) | set(_LAZY_BACKENDS))


def _load(name):
    if name not in _BACKENDS:
        if name not in _LAZY_BACKENDS:
            raise ConfigError(f"unknown backend {name!r}; choose one of {available_backends()}")
        import importlib

        importlib.import_module(_LAZY_BACKENDS[name])  # registers itself
    return _BACKENDS[name]


def set_backend(name):
    """Choose the implementation of matmul, attention and expert dispatch: "numpy" (the readable
    reference), "numba" (compiled CPU kernels) or "cupy" (GPU). Returns the previous name."""
    previous = get_backend()
    _load(name)
    _active["name"], _active["chosen"] = name, True
    return previous


def get_backend():
    """The active backend: the last `set_backend`, else $MINILM_BACKEND, else "numpy"."""
    if _active["name"] is None:
        _active["name"] = os.environ.get("MINILM_BACKEND", "numpy")
    return _active["name"]


def backend_is_chosen():
    """True when the program picked a backend: `set_backend` (or `use_backend`) ran, or
    $MINILM_BACKEND is set. `minilm.generate()` picks its own default only when not."""
    return _active["chosen"] or bool(os.environ.get("MINILM_BACKEND"))


@contextmanager
def use_backend(name):
    """Run a block with another backend: `with ops.use_backend("numba"): model(ids)`.
    Afterwards everything is as before, including whether a backend counts as chosen."""
    before = dict(_active)
    set_backend(name)
    try:
        yield
    finally:
        _active.update(before)


def _impl(op):
    return _load(get_backend())[op]


def _fused_kernel(name):
    """The active backend's fused kernel for the `@fusable` function `name`, or None."""
    return _load(get_backend())["fused"].get(name)


fusion.set_lookup(_fused_kernel)


# ---------------------------------------------------------------------------------------------
# The ops the models call
# ---------------------------------------------------------------------------------------------


def linear(x, weight, bias=None):
    if getattr(weight, "has_backward", False):  # a LoraWeight (base product + low-rank update) or FullWeight
        return weight.linear(x, bias)
    return _impl("linear")(x, weight, bias)


def linear_input_grad(dy, weight):
    """dx = dy W for a frozen weight (out_features, in_features): the backward of `linear`."""
    return _impl("linear_input_grad")(dy, weight)


def linear_backward(dy, x, weight, name="", grads=None):
    """The backward of `linear(x, weight, bias)`: dx = dy W through the weight (frozen).

    A LoraWeight's adapter gradients go into `grads` (a dict) as "<name>.lora_A" (groups, rank,
    in_features) and "<name>.lora_B" (out_features // groups, rank); a `minilm.lora.FullWeight`'s
    as "<name>.weight"; a plain or quantized weight adds nothing.
    dy: (..., out_features), x: (..., in_features) -> dx (..., in_features) float32"""
    if not getattr(weight, "has_backward", False):
        return linear_input_grad(dy, weight)
    dx, own = weight.backward(dy, x)
    if grads is not None:
        grads.update({f"{name}.{kind}": g for kind, g in own.items()})
    return dx


def attention(q, k, v, mask=None, *, scale, bias=None, soft_cap=None, return_weights=False, p=None):
    """p: the attention module's weights. When a `minilm.capture` / `intervene` block asks for its
    scores or weights, which the kernels never store, the reference computes this call (on the host)."""
    if activations.hooks and activations.wants(p, *ATTENTION_TAPS):
        return attention_tapped(
            q, k, v, mask, scale=scale, bias=bias, soft_cap=soft_cap, p=p, return_weights=return_weights
        )
    return _impl("attention")(q, k, v, mask, scale=scale, bias=bias, soft_cap=soft_cap, return_weights=return_weights)


ATTENTION_TAPS = ("scores", "scores_masked", "attn_weights")  # the quantities inside attention


def attention_tapped(q, k, v, mask, *, scale, bias, soft_cap, p, return_weights):
    """The reference attention with its taps, on host copies of the inputs (any backend); the
    results go back where q lives."""
    host = [to_host(a) for a in (q, k, v, mask, bias)]
    out, weights = attention_reference(
        *host[:4], scale=scale, bias=host[4], soft_cap=soft_cap, return_weights=True, p=p
    )
    return like(out, q), (like(weights, q) if return_weights else None)


def moe_dispatch(x, top_k_index, top_k_weights, gate_proj, up_proj, down_proj, activation="silu"):
    return _impl("moe_dispatch")(x, top_k_index, top_k_weights, gate_proj, up_proj, down_proj, activation)


def compiled_decoder(model, cache, attention_mask, capacity):
    """The active backend's compiled decode step for `model`, or None: then every new token runs
    the model's readable forward, op by op, which is the reference.

    A decode step is small (one token through every layer) and runs hundreds of times, so its cost
    is in the calls between the ops: a few hundred NumPy, Numba or CuPy calls a token. A backend
    may register a factory per model type (`"decoders": {"gemma3_text": factory}`) that builds one
    compiled step (Numba: one jitted function per token; CuPy: the step captured as a CUDA graph).
    `factory(model, cache, attention_mask, capacity)` copies the KV cache that the prompt's
    forward filled, holds its own for `capacity` positions, and returns an object with
    `step(tokens, position) -> logits`: tokens (batch,) int64, position the int position of those
    tokens -> (batch, vocab_size) float32, what `model(tokens[:, None], ...).logits[:, -1]` gives
    (tests/test_decoders.py checks it against the forward). The factory returns None for what it
    does not cover (a LoRA weight, padding, a batch, an unknown weight type).

    Never while `minilm.capture` / `intervene` is active (they need the readable forward), nor with
    $MINILM_COMPILED_DECODE=0 (to compare both paths)."""
    if activations.hooks or os.environ.get("MINILM_COMPILED_DECODE", "1") == "0":
        return None
    factory = _impl("decoders").get(getattr(model.config, "model_type", None))
    return None if factory is None else factory(model, cache, attention_mask, capacity)


# ---------------------------------------------------------------------------------------------
# Where arrays live: weights prepared once for the backend, small per-call arrays next to them
# ---------------------------------------------------------------------------------------------


def prepare_weight(array):
    """Called once per weight when a model loads its weights (and by `model.to_device()`), never
    per call: where the weight lives and in what form the active backend reads it.

    numpy: the array as it is (`np.asarray`). cupy: a copy in GPU memory. numba: for a float32
    matrix whose every block of columns is exactly a scale times int8 codes (a dequantized Q8_0 /
    Q5_0 / Q6_K tensor), a read-only view that also holds those codes, which decode reads instead
    of the float32 values; any other weight as it is. The result may share memory with `array`, so
    pass an array the model owns (`load_state_dict` prepares its own copy of the checkpoint).

    A `QuantizedWeight` (a GGUF matrix kept as its blocks) comes back as it is when the backend
    computes with its blocks (`reads_quantized`), else dequantized to float32. A LoraWeight: its
    base and adapter arrays, each prepared."""
    if getattr(array, "is_lora", False):
        return array.with_arrays(prepare_weight)
    return _impl("prepare_weight")(array)


def reads_quantized(weight):
    """True when the active backend's `linear` computes straight from this `QuantizedWeight`'s
    blocks (numba: Q8_0, Q5_0, Q4_K, Q6_K); then `load_state_dict` keeps it as blocks and makes
    no float32 copy. False on the NumPy reference, which dequantizes every weight once, at load."""
    return _impl("reads_quantized")(weight)


def like(x, reference):
    """A small array built on the host (mask, positions, cos/sin) placed where `reference`
    lives, so that a forward pass never mixes devices. A no-op for NumPy arrays."""
    if getattr(reference, "is_lora", False):
        reference = reference.lora_A
    if isinstance(reference, (np.ndarray, QuantizedWeight)) or np.isscalar(reference):
        return np.asarray(x)
    return np.asarray(x, like=reference)  # NEP 35: the reference's array library creates it


def to_host(x):
    """A NumPy array, copied back from the GPU when needed (logits for sampling, losses). A
    LoraWeight comes back as a LoraWeight of host arrays."""
    if getattr(x, "is_lora", False):
        return x.with_arrays(to_host)
    if x is None or isinstance(x, (np.ndarray, QuantizedWeight)):  # blocks are on the host already
        return x
    return x.get() if hasattr(x, "__cuda_array_interface__") else np.asarray(x)

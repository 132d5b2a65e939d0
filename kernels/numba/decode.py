"""A compiled decode step for Gemma 3 (`ops.compiled_decoder`): one token through every layer with
a handful of compiled calls per layer, no per-token allocation, no dispatch through `ops`.

The readable forward (minilm/models/gemma3.py) decodes a token in a few hundred op calls, each with
its Python around it: shape checks, reshapes, fusion lookups, a new array per intermediate, a KV
cache that concatenates. This step computes the same math from preallocated buffers:

    x = scaled_embedding(token)                            (the reference's own function, one row)
    per layer:
      xn = norm(x)                                         (fused into the previous layer's end)
      q, k, v = xn W_q^T, xn W_k^T, xn W_v^T               gemv kernels of linear.py / quantized.py
      attn = _attend(q, k, v)   QK-norm, RoPE, write k, v into this layer's ring, softmax(q k^T) v
      o = attn W_o^T
      x += norm(o);  hn = norm(x)                          `_add_normed_then_norm`
      a = gelu_tanh(hn W_gate^T) * (hn W_up^T)             `_gelu_tanh_times`
      f = a W_down^T
      x += norm(f);  xn = next layer's norm(x)             `_add_normed_then_norm` (last: final norm)
    logits = xn W_head^T, soft-capped                      the LM head's gemv, `_soft_cap`

The KV cache the prompt's forward filled is copied, once, into buffers of its own: a global layer
holds `capacity` positions, a sliding layer a ring of min(sliding_window, capacity) slots, position
p in slot p % slots (the new key overwrites the one that just left the window).

Every matrix runs the gemv kernel `ops.linear` would pick for it (Q8_0 `QuantizedWeight`s from their
blocks, Q5_0 from its repacked int8 codes, an `Int8BlockWeight` from its codes, a plain float32
matrix with the float32 gemv), called straight with buffers made once; Q4_K and Q6_K are unpacked
once into byte codes (below), which read several times faster than their bit fields. The LM head
runs on all of numba's threads (prange over output rows), the layers on LAYER_THREADS (all by
default; see there). `gemma3_decoder` returns None for what it does not cover (a batch, padding, LoRA, bfloat16,
another weight type or activation); the forward then decodes every token.
"""

from __future__ import annotations

import os
import weakref

import numba
import numpy as np
from numba import njit, prange

from minilm.errors import InputError
from minilm.io.quants import QuantizedWeight
from minilm.models.gemma3 import layer_type_rope_table, scaled_embedding

from . import linear, quantized
from .compile import _SUM_IN_ANY_ORDER

_NO_BIAS = np.zeros(1, np.float32)  # the bias argument of a gemv without one (never read)
# Numba threads for the layers' gemvs (the LM head, most of the bytes a token reads, always gets
# them all). Each parallel gemv forks and joins the threads, seven times a layer. On an idle 2-core
# machine the layers on both threads decode the 270M at ~24 ms/token against ~34 ms on one; but when
# other processes keep the cores busy, every join waits for a scheduler tick: measured with two other
# busy processes, 1114 ms/token on both threads against 60 ms with the layers on one (one parallel
# region per token). $MINILM_DECODE_LAYER_THREADS: 0 (default) = all of numba's threads, 1 = one.
LAYER_THREADS = int(os.environ.get("MINILM_DECODE_LAYER_THREADS", "0")) or None  # None: all
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # nn.ACTIVATIONS' names of gelu_tanh


# ---------------------------------------------------------------------------------------------
# The glue between the gemvs: norms, QK-norm + RoPE + attention, GELU, soft cap
# ---------------------------------------------------------------------------------------------


@njit(inline="always", fastmath=_SUM_IN_ANY_ORDER)
def _norm_into(x, weight, eps, out):
    """out = gemma_rms_norm(x, weight, eps) = x * (1 / sqrt(mean(x^2) + eps)) * (1 + weight), float32.
    x, weight, out: (dim,); out may be x."""
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    inv = np.float32(1.0) / np.sqrt(total / np.float32(x.shape[0]) + eps)
    for i in range(x.shape[0]):
        out[i] = (x[i] * inv) * (np.float32(1.0) + weight[i])


@njit(inline="always")
def _rope_in_place(x, cos, sin):
    """apply_rope for one head: x[i] cos[i] - x[i + h] sin[i], x[i + h] cos[i + h] + x[i] sin[i + h],
    h = rope_dim / 2; dimensions past rope_dim unchanged. x: (head_dim,), cos, sin: (rope_dim,)"""
    half = cos.shape[0] // 2
    for i in range(half):
        a, b = x[i], x[i + half]
        x[i] = a * cos[i] - b * sin[i]
        x[i + half] = b * cos[i + half] + a * sin[i + half]


@njit(cache=True, fastmath=_SUM_IN_ANY_ORDER)
def _norm(x, weight, eps, out):
    """out = gemma_rms_norm(x, weight, eps). x, weight, out: (hidden_size,)"""
    _norm_into(x, weight, eps, out)


@njit(cache=True, fastmath=_SUM_IN_ANY_ORDER)
def _attend(q, k, v, q_norm, k_norm, qk_norm, eps, cos, sin, keys, values, position, window, scale, cap, has_cap,
            scores, out):  # fmt: skip
    """One token's attention in a layer (`gemma3.attention` between the projections and o_proj).

    q (num_heads * head_dim,), k, v (num_kv_heads * head_dim,): the projections (q, k normed and
    rotated in place); q_norm, k_norm (head_dim,): QK-norm weights (used if qk_norm); cos, sin
    (rope_dim,); keys, values (num_kv_heads, slots, head_dim): the layer's cache, position p in slot
    p % slots; this token's k, v go to slot position % slots, then each query head attends to the
    min(position + 1, window) latest positions (window: the sliding window, or more than the
    positions for a global layer): softmax(soft_cap(q k * scale)) v. scores (slots,): scratch;
    out (num_heads * head_dim,).
    """
    num_kv_heads, slots, head_dim = keys.shape
    num_heads = q.shape[0] // head_dim
    groups = num_heads // num_kv_heads
    for h in range(num_heads):
        qh = q[h * head_dim : (h + 1) * head_dim]
        if qk_norm:
            _norm_into(qh, q_norm, eps, qh)
        _rope_in_place(qh, cos, sin)
    slot = position % slots
    for g in range(num_kv_heads):
        kh = k[g * head_dim : (g + 1) * head_dim]
        if qk_norm:
            _norm_into(kh, k_norm, eps, kh)
        _rope_in_place(kh, cos, sin)
        keys[g, slot, :] = kh
        values[g, slot, :] = v[g * head_dim : (g + 1) * head_dim]
    seen = min(position + 1, window)  # keys positions first .. position
    first = position - seen + 1
    for h in range(num_heads):
        g = h // groups
        qh = q[h * head_dim : (h + 1) * head_dim]
        best = np.float32(-np.inf)
        for j in range(seen):
            key = keys[g, (first + j) % slots]
            dot = np.float32(0.0)
            for i in range(head_dim):
                dot += qh[i] * key[i]
            s = dot * scale
            if has_cap:
                s = cap * np.tanh(s / cap)
            scores[j] = s
            best = max(best, s)
        total = np.float32(0.0)
        for j in range(seen):
            e = np.exp(scores[j] - best)
            scores[j] = e
            total += e
        o = out[h * head_dim : (h + 1) * head_dim]
        o[:] = 0.0
        for j in range(seen):
            weight = scores[j] / total
            value = values[g, (first + j) % slots]
            for i in range(head_dim):
                o[i] += weight * value[i]


@njit(cache=True, fastmath=_SUM_IN_ANY_ORDER)
def _add_normed_then_norm(y, post_norm, has_post_norm, x, next_norm, eps, out):
    """The end of a sandwich and the start of the next: x += norm(y, post_norm) (or y, without the
    post norm), then out = norm(x, next_norm). y, x, out: (hidden_size,); y is overwritten."""
    if has_post_norm:
        _norm_into(y, post_norm, eps, y)
    for i in range(x.shape[0]):
        x[i] += y[i]
    _norm_into(x, next_norm, eps, out)


@njit(cache=True)
def _gelu_tanh_times(gate, up, out):
    """out = gelu_tanh(gate) * up (`nn.gelu_tanh`: 0.5 x (1 + tanh(c (x + k x^3)))), float32."""
    c, k = np.float32(np.sqrt(2 / np.pi)), np.float32(0.044715)
    for i in range(gate.shape[0]):
        x = gate[i]
        out[i] = ((np.float32(0.5) * x) * (np.float32(1.0) + np.tanh(c * (x + k * x * x * x)))) * up[i]


@njit(cache=True)
def _soft_cap(logits, cap):
    """logits = cap * tanh(logits / cap), in place (`nn.soft_cap`). logits: (vocab_size,)"""
    for i in range(logits.shape[0]):
        logits[i] = cap * np.tanh(logits[i] / cap)


# ---------------------------------------------------------------------------------------------
# K-quants repacked for decode: codes of one byte per value next to float32 scales
# ---------------------------------------------------------------------------------------------
# Q4_K and Q6_K rebuild each value from bit fields spread over a 144- / 210-byte block (quantized.py
# `_row_dot_q4_k` / `_row_dot_q6_k`): in a gemv that is compute-bound, ~1 GB/s on one core. Unpacked
# once into one byte per value and a float32 scale (and offset) per sub-block, with the reference's
# float32 operations for those scales, the values are the same bit for bit and the gemv reads them as
# fast as the int8 codes of Q5_0 (linear.py `_gemv_int8_kernel`):
#     Q6_K  w = scale[o, i // 16] * code[o, i]                    code = q - 32, int8
#     Q4_K  w = scale[o, i // 32] * q[o, i] - offset[o, i // 32]     q 0..15, two to a byte:
#           byte 16 b + j of a row holds q[32 b + j] (low nibble) and q[32 b + 16 + j] (high)
# The memory costs more than the blocks (1.2x Q6_K, 1.3x Q4_K: 18 MB more for the 270M), built once
# per weight, the first time a decoder reads it, and kept with the weight (`_repacked`).


@njit(cache=True)  # once per weight: one thread, quicker to compile
def _unpack_q6_k(blocks, codes, scales):
    """codes (out_features, in_features) int8 = q - 32; scales (out_features, in_features // 16)
    float32 = d * sc (`_decode_block`'s Q6_K rule). blocks (out_features, row_bytes) uint8."""
    for o in range(blocks.shape[0]):
        b = blocks[o]
        for blk in range(codes.shape[1] // 256):
            start = 210 * blk
            d = quantized._f16(b, start + 208)
            for sub in range(16):
                sc = np.int32(b[start + 192 + sub])
                scales[o, 16 * blk + sub] = d * np.float32(sc - 256 if sc > 127 else sc)
            for half in range(2):
                ql, qh = start + 64 * half, start + 128 + 32 * half
                for group in range(4):
                    low_at, low_shift, high_shift = ql + 32 * (group & 1), 4 * (group >> 1), 2 * group
                    for j in range(32):
                        low = (np.int32(b[low_at + j]) >> low_shift) & 15
                        high = (np.int32(b[qh + j]) >> high_shift) & 3
                        codes[o, 256 * blk + 128 * half + 32 * group + j] = (low | (high << 4)) - 32


@njit(cache=True)  # once per weight: one thread, quicker to compile
def _unpack_q4_k(blocks, codes, scales, offsets):
    """codes (out_features, in_features // 2) uint8, q two to a byte (above); scales, offsets
    (out_features, in_features // 32) float32 = d * sc, dmin * m (`_decode_block`'s Q4_K rule).
    blocks (out_features, row_bytes) uint8."""
    for o in range(blocks.shape[0]):
        b = blocks[o]
        for blk in range(blocks.shape[1] // 144):
            start = 144 * blk
            d, dmin, sc = quantized._f16(b, start), quantized._f16(b, start + 2), start + 4
            for s in range(8):
                scale, low_min = quantized._q4_k_scale_min(b, sc, s)
                scales[o, 8 * blk + s] = d * np.float32(scale)
                offsets[o, 8 * blk + s] = dmin * np.float32(low_min)
                qs, shift = start + 16 + 32 * (s >> 1), 4 * (s & 1)
                for j in range(16):
                    low, high = (np.int32(b[qs + j]) >> shift) & 15, (np.int32(b[qs + 16 + j]) >> shift) & 15
                    codes[o, 128 * blk + 16 * s + j] = low | (high << 4)


_REPACKED = weakref.WeakKeyDictionary()  # QuantizedWeight -> its unpacked arrays, as long as it lives


def _repacked(weight):
    """(codes, scales) of a Q6_K weight, (codes, scales, offsets) of a Q4_K one, built once."""
    if weight not in _REPACKED:
        out_features, in_features = weight.shape
        if weight.type_name == "Q6_K":
            arrays = (np.empty(weight.shape, np.int8), np.empty((out_features, in_features // 16), np.float32))
            _unpack_q6_k(weight.blocks, *arrays)
        else:
            arrays = (np.empty((out_features, in_features // 2), np.uint8),) + tuple(
                np.empty((out_features, in_features // 32), np.float32) for _ in range(2)
            )
            _unpack_q4_k(weight.blocks, *arrays)
        _REPACKED[weight] = arrays
    return _REPACKED[weight]


@njit(parallel=True, cache=True, fastmath=_SUM_IN_ANY_ORDER)
def _gemv_affine_u4(x, codes, scales, offsets, bias, has_bias, out):
    """out[0, o] = sum_i x[0, i] * (scales[o, b] * q[o, i] - offsets[o, b]) (+ bias[o]), b = i // 32:
    the Q4_K values (see above), four rows at a time in 32 lanes, as `_gemv_int8_kernel`; lane j
    takes the low nibbles, lane 16 + j the high ones. x (1, in_features), codes (out_features,
    in_features // 2) uint8, scales / offsets (out_features, in_features // 32) float32,
    out (1, out_features)."""
    out_features, in_features = codes.shape[0], 2 * codes.shape[1]
    n_quads = out_features // 4
    n_chunks = min(max(n_quads, 1), 256)
    for chunk in prange(n_chunks):
        acc = np.empty((4, 32), np.float32)
        for quad in range(chunk * n_quads // n_chunks, (chunk + 1) * n_quads // n_chunks):
            o0 = 4 * quad
            acc[:] = 0.0
            for b in range(in_features // 32):
                s0, s1, s2, s3 = scales[o0, b], scales[o0 + 1, b], scales[o0 + 2, b], scales[o0 + 3, b]
                m0, m1, m2, m3 = offsets[o0, b], offsets[o0 + 1, b], offsets[o0 + 2, b], offsets[o0 + 3, b]
                for j in range(16):
                    x_low, x_high = x[0, 32 * b + j], x[0, 32 * b + 16 + j]
                    c0, c1 = np.int32(codes[o0, 16 * b + j]), np.int32(codes[o0 + 1, 16 * b + j])
                    c2, c3 = np.int32(codes[o0 + 2, 16 * b + j]), np.int32(codes[o0 + 3, 16 * b + j])
                    acc[0, j] += (s0 * np.float32(c0 & 15) - m0) * x_low
                    acc[1, j] += (s1 * np.float32(c1 & 15) - m1) * x_low
                    acc[2, j] += (s2 * np.float32(c2 & 15) - m2) * x_low
                    acc[3, j] += (s3 * np.float32(c3 & 15) - m3) * x_low
                    acc[0, 16 + j] += (s0 * np.float32(c0 >> 4) - m0) * x_high
                    acc[1, 16 + j] += (s1 * np.float32(c1 >> 4) - m1) * x_high
                    acc[2, 16 + j] += (s2 * np.float32(c2 >> 4) - m2) * x_high
                    acc[3, 16 + j] += (s3 * np.float32(c3 >> 4) - m3) * x_high
            for k in range(4):
                y = np.float32(0.0)
                for j in range(32):
                    y += acc[k, j]
                out[0, o0 + k] = y + bias[o0 + k] if has_bias else y
    for o in range(4 * n_quads, out_features):  # the last rows
        y = np.float32(0.0)
        for i in range(in_features):
            c = np.int32(codes[o, 16 * (i >> 5) + (i & 15)])
            q = (c >> 4) if (i & 31) >= 16 else (c & 15)
            y += (scales[o, i >> 5] * np.float32(q) - offsets[o, i >> 5]) * x[0, i]
        out[0, o] = y + bias[o] if has_bias else y


# ---------------------------------------------------------------------------------------------
# One gemv per matrix: the kernel `linear` would run, and its arguments, found once
# ---------------------------------------------------------------------------------------------


def gemv_plan(weight, bias=None):
    """(kernel, arguments) such that `kernel(x, *arguments, out)` computes out = x W^T + b for
    x (1, in_features), out (1, out_features) float32, with the kernel `linear` runs for this weight
    in decode; None for a weight it has no plan for (LoRA, bfloat16, a type kept dequantized)."""
    if getattr(weight, "is_lora", False) or getattr(weight, "has_backward", False):
        return None
    if bias is not None and (np.shape(bias) != (weight.shape[0],) or np.asarray(bias).dtype != np.float32):
        return None
    b = _NO_BIAS if bias is None else np.ascontiguousarray(bias)
    has_bias = bias is not None
    if isinstance(weight, QuantizedWeight):
        if not quantized.reads_quantized(weight):
            return None
        codes = quantized.repacked_codes(weight)
        if codes is not None:  # Q5_0: its int8 codes
            return linear._gemv_int8_kernel, (codes, quantized.block_scales(weight), b, has_bias)
        if weight.type_name == "Q6_K":
            return linear._gemv_int8_kernel, (*_repacked(weight), b, has_bias)
        if weight.type_name == "Q4_K":
            return _gemv_affine_u4, (*_repacked(weight), b, has_bias)
        return quantized._GEMV[weight.type_name], (weight.blocks, *quantized._gemv_scales(weight), b, has_bias)
    if getattr(weight, "codes", None) is not None:  # an Int8BlockWeight (linear.py)
        return linear._gemv_int8_kernel, (weight.codes, weight.scales, b, has_bias)
    if isinstance(weight, np.ndarray) and weight.dtype == np.float32 and weight.ndim == 2:
        return linear._gemv_kernel, (np.ascontiguousarray(weight), b, has_bias)
    return None


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------


def _float32_vector(a, size):
    """`a` as a contiguous float32 (size,) array, or None if it is not float32 of that shape."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != (size,):
        return None
    return np.ascontiguousarray(a)


class _Layer:
    """What one decoder layer's step reads: gemv plans, norm weights, its KV buffers."""

    __slots__ = (
        "q", "k", "v", "o", "gate", "up", "down", "input_norm", "post_attention_norm",
        "pre_feedforward_norm", "post_feedforward_norm", "q_norm", "k_norm", "keys", "values", "window", "kind",
    )  # fmt: skip


def gemma3_decoder(model, cache, attention_mask, capacity):
    """`ops.compiled_decoder` for Gemma 3 on this backend: a `Gemma3Decoder`, or None for a batch,
    padding, a cache it cannot read, a weight or an activation it has no kernel for."""
    cfg = model.config
    mask = np.asarray(attention_mask)
    if cache is None or mask.ndim != 2 or mask.shape[0] != 1 or not np.all(mask == 1):
        return None
    if cfg.hidden_activation not in _GELU_TANH:
        return None
    p = model.params
    table = p.model.embed_tokens.weight
    if not isinstance(table, QuantizedWeight) and getattr(table, "dtype", None) != np.float32:
        return None
    head = gemv_plan(p.lm_head.weight)
    hidden = cfg.hidden_size
    final_norm = _float32_vector(p.model.norm.weight, hidden)
    if head is None or final_norm is None:
        return None
    past = cache.get_seq_length(0)
    if not 0 < past < capacity:
        return None
    layers = []
    for i, lp in enumerate(p.model.layers):
        layer = _layer(cfg, i, lp, cache, past, capacity)
        if layer is None:
            return None
        layers.append(layer)
    return Gemma3Decoder(cfg, table, layers, final_norm, head, past, capacity)


def _layer(cfg, i, lp, cache, past, capacity):
    """One layer's `_Layer`, its KV buffers filled from the cache; None if something is not covered."""
    hidden, d, kvh = cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads
    layer = _Layer()
    attn, mlp = lp.self_attn, lp.mlp
    for name, module, proj in (
        ("q", attn, "q_proj"),
        ("k", attn, "k_proj"),
        ("v", attn, "v_proj"),
        ("o", attn, "o_proj"),
        ("gate", mlp, "gate_proj"),
        ("up", mlp, "up_proj"),
        ("down", mlp, "down_proj"),
    ):
        plan = gemv_plan(module[proj].weight, module[proj].get("bias"))
        if plan is None:
            return None
        setattr(layer, name, plan)
    unused = np.zeros(hidden, np.float32)  # a norm the config turns off (never read)
    layer.input_norm = _float32_vector(lp.input_layernorm.weight, hidden)
    layer.pre_feedforward_norm = _float32_vector(lp.pre_feedforward_layernorm.weight, hidden)
    layer.post_attention_norm = (
        _float32_vector(lp.post_attention_layernorm.weight, hidden) if cfg.use_post_attention_norm else unused
    )
    layer.post_feedforward_norm = (
        _float32_vector(lp.post_feedforward_layernorm.weight, hidden) if cfg.use_post_ffw_norm else unused
    )
    zeros_d = np.zeros(d, np.float32)
    layer.q_norm = _float32_vector(attn.q_norm.weight, d) if cfg.use_query_key_norm else zeros_d
    layer.k_norm = _float32_vector(attn.k_norm.weight, d) if cfg.use_query_key_norm else zeros_d
    norms = (layer.input_norm, layer.pre_feedforward_norm, layer.post_attention_norm, layer.post_feedforward_norm)
    if any(n is None for n in norms + (layer.q_norm, layer.k_norm)):
        return None
    # The cache: the last `kept` positions, oldest first, (1, num_kv_heads, kept, head_dim) each.
    if cache.get_seq_length(i) != past:
        return None
    keys, values = cache.layer(i)
    if any(not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 4 for a in (keys, values)):
        return None
    kept = keys.shape[2]
    if keys.shape != (1, kvh, kept, d) or values.shape != keys.shape:
        return None
    window = cfg.layer_window(i)
    slots = capacity if window is None else min(window, capacity)
    layer.window = capacity + 1 if window is None else window  # a global layer sees every position
    layer.kind = cfg.layer_types[i]
    layer.keys = np.zeros((kvh, slots, d), np.float32)  # (num_kv_heads, slots, head_dim)
    layer.values = np.zeros((kvh, slots, d), np.float32)
    copied = min(kept, slots)
    if kept < min(past, layer.window - 1):  # the cache lacks keys this window still sees
        return None
    where = np.arange(past - copied, past) % slots  # the slots of the last `copied` positions
    layer.keys[:, where] = keys[0, :, kept - copied :]
    layer.values[:, where] = values[0, :, kept - copied :]
    return layer


class Gemma3Decoder:
    """One Gemma 3 token at a time, batch 1, from `position` = the prompt's length on; see the
    module docstring. `step(tokens (1,) int64, position) -> logits (1, vocab_size) float32`."""

    def __init__(self, cfg, table, layers, final_norm, head, past, capacity):
        self.cfg, self.table, self.layers, self.final_norm, self.head = cfg, table, layers, final_norm, head
        self.next_position, self.capacity = past, capacity
        h, kvh, d, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        buffer = lambda n: np.zeros((1, n), np.float32)  # noqa: E731  (1, n): a gemv's x or out
        self.x = buffer(hidden)  # the residual stream
        self.xn = buffer(hidden)  # its norm: the input of q/k/v or of the MLP
        self.q, self.k, self.v = buffer(h * d), buffer(kvh * d), buffer(kvh * d)
        self.attn = buffer(h * d)  # attention's output per head, before o_proj
        self.y = buffer(hidden)  # o_proj's or the MLP's output
        self.gate, self.up = buffer(cfg.intermediate_size), buffer(cfg.intermediate_size)
        self.act = buffer(cfg.intermediate_size)
        self.scores = np.zeros(max(layer.keys.shape[1] for layer in layers), np.float32)
        self.eps = np.float32(cfg.rms_norm_eps)
        self.scale = np.float32(np.asarray(cfg.query_pre_attn_scalar**-0.5, np.float32))
        cap = cfg.attention_soft_cap
        self.cap, self.has_cap = np.float32(cap if cap is not None else 1.0), cap is not None
        final = cfg.final_logit_softcapping
        self.final_cap = None if final is None else np.float32(final)
        # layer type -> cos, sin (capacity, rope_dim): built once, a row per token
        self.rope = {kind: layer_type_rope_table(cfg, kind, capacity) for kind in sorted(set(cfg.layer_types))}
        self.vocab_rows = head[1][0].shape[0]  # the LM head's out_features

    def step(self, tokens, position):
        tokens = np.asarray(tokens)
        if tokens.shape != (1,) or position != self.next_position:
            raise InputError(
                f"this decoder takes one token (shape (1,)) at position {self.next_position}, got shape "
                f"{tokens.shape} at position {position}"
            )
        if position >= self.capacity:
            raise InputError(f"this decoder holds {self.capacity} positions; position {position} does not fit")
        cfg, eps, x, xn, y = self.cfg, self.eps, self.x, self.xn, self.y
        x[0] = scaled_embedding(tokens[:, None], self.table)[0, 0]  # (hidden_size,): the reference's rounding
        _norm(x[0], self.layers[0].input_norm, eps, xn[0])
        has_post_attention, has_post_ffw = cfg.use_post_attention_norm, cfg.use_post_ffw_norm
        threads = numba.get_num_threads()
        if LAYER_THREADS is not None:
            numba.set_num_threads(min(LAYER_THREADS, threads))
        for i, L in enumerate(self.layers):
            L.q[0](xn, *L.q[1], self.q)
            L.k[0](xn, *L.k[1], self.k)
            L.v[0](xn, *L.v[1], self.v)
            cos, sin = self.rope[L.kind]
            cos, sin = cos[position], sin[position]  # (rope_dim,) this position's row
            _attend(self.q[0], self.k[0], self.v[0], L.q_norm, L.k_norm, cfg.use_query_key_norm, eps, cos, sin,
                    L.keys, L.values, position, L.window, self.scale, self.cap, self.has_cap, self.scores,
                    self.attn[0])  # fmt: skip
            L.o[0](self.attn, *L.o[1], y)
            _add_normed_then_norm(
                y[0], L.post_attention_norm, has_post_attention, x[0], L.pre_feedforward_norm, eps, xn[0]
            )
            L.gate[0](xn, *L.gate[1], self.gate)
            L.up[0](xn, *L.up[1], self.up)
            _gelu_tanh_times(self.gate[0], self.up[0], self.act[0])
            L.down[0](self.act, *L.down[1], y)
            following = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.final_norm
            _add_normed_then_norm(y[0], L.post_feedforward_norm, has_post_ffw, x[0], following, eps, xn[0])
        numba.set_num_threads(threads)
        logits = np.empty((1, self.vocab_rows), np.float32)  # the caller keeps it: a new array per token
        self.head[0](xn, *self.head[1], logits)
        if self.final_cap is not None:
            _soft_cap(logits[0], self.final_cap)
        self.next_position = position + 1
        return logits

"""Qwen3-MoE: a decoder-only transformer whose feed-forward layers are mixtures of experts.

Read top to bottom: config -> attention (GQA, QK-norm, RoPE) -> sparse MoE block (router,
top-k experts) -> decoder layer -> model -> heads -> load-balancing loss.

Axes: batch, seq, hidden_size, num_heads (num_attention_heads), num_kv_heads
(num_key_value_heads), head_dim, num_experts, top_k (num_experts_per_tok), tokens = batch * seq.

Backward pass (training, `minilm/grad.py`): each `*_backward` follows its forward, takes the
upstream gradient plus what the forward saw, and returns the input gradients (and the LoRA
adapters' gradients, named like the params). A layer's backward recomputes that layer's forward
from its saved input and walks back. The gradient reaches the router through the top-k routing
weights (and the load-balancing loss); which experts are picked is piecewise constant.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import nn, ops
from ..activations import tap
from ..config import PretrainedConfig, check_positive
from ..errors import CheckpointError, ConfigError
from ..heads import ForCausalLM, ForQuestionAnswering, ForSequenceClassification, ForTokenClassification
from ..modeling import BaseModel, prepare_inputs
from ..rope import apply_rope, apply_rope_backward, compute_inv_freq, rope_cos_sin

# ---------------------------------------------------------------------------------------------
# Config (transformers' Qwen3MoeConfig names and defaults)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Qwen3MoeConfig(PretrainedConfig):
    model_type = "qwen3_moe"

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144  # dense MLP layers (mlp_only_layers / off the sparse step)
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int | None = None
    attention_dropout: float = 0.0
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_experts: int = 128
    norm_topk_prob: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: list | None = None

    @classmethod
    def _rename_legacy_keys(cls, d):
        # transformers 5 writes the expert count as num_local_experts (its attribute_map); the Hub as num_experts
        if "num_local_experts" in d:
            d.setdefault("num_experts", d.pop("num_local_experts"))
        return d

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads if self.num_attention_heads else 0
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        super().__post_init__()

    def validate(self):
        super().validate()
        check_positive(
            self,
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_experts_per_tok",
            "decoder_sparse_step",
        )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}"
            )
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"mlp_only_layers {bad} are not layer indices of a {self.num_hidden_layers}-layer model")

    @property
    def window(self):
        """The sliding window every layer uses, or None (transformers 5: all layers when enabled)."""
        return self.sliding_window if self.use_sliding_window else None

    def is_sparse_layer(self, layer_idx):
        """MoE block or dense MLP? Sparse unless listed in mlp_only_layers or off the sparse step."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


# ---------------------------------------------------------------------------------------------
# Attention: GQA with QK-norm before RoPE
# ---------------------------------------------------------------------------------------------


def attention(x, p, cfg, layer_idx, cos, sin, mask, cache, output_attentions):
    """x: (batch, seq, hidden_size) -> (batch, seq, hidden_size), attention weights or None"""
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = ops.linear(x, p.q_proj.weight, p.q_proj.get("bias"))  # (batch, seq, num_heads * head_dim)
    k = ops.linear(x, p.k_proj.weight, p.k_proj.get("bias"))  # (batch, seq, num_kv_heads * head_dim)
    v = ops.linear(x, p.v_proj.weight, p.v_proj.get("bias"))  # (batch, seq, num_kv_heads * head_dim)
    q = nn.split_heads(q, h, d)  # (batch, num_heads, seq, head_dim)
    k, v = nn.split_heads(k, kvh, d), nn.split_heads(v, kvh, d)  # (batch, num_kv_heads, seq, head_dim) each
    q, k, v = tap(p, "queries", q), tap(p, "keys", k), tap(p, "values", v)
    q = nn.rms_norm(q, p.q_norm.weight, cfg.rms_norm_eps)  # QK-norm: RMSNorm over head_dim, per head
    k = nn.rms_norm(k, p.k_norm.weight, cfg.rms_norm_eps)
    q, k = tap(p, "queries_normed", q), tap(p, "keys_normed", k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k = tap(p, "queries_rope", q), tap(p, "keys_rope", k)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # (batch, num_kv_heads, kv_seq, head_dim)
    out, weights = ops.attention(q, k, v, mask, scale=d**-0.5, return_weights=output_attentions, p=p)
    out = tap(p, "attn_output_heads", out)  # (batch, num_heads, seq, head_dim): each head's output, before o_proj
    return ops.linear(nn.merge_heads(out), p.o_proj.weight, p.o_proj.get("bias")), weights


def attention_backward(dout, x, p, cfg, cos, sin, mask):
    """Gradients of `attention` (no cache): recompute it keeping q, k, v at each step, then walk
    back o_proj -> attention -> RoPE -> QK-norm -> q/k/v projections.
    dout, x: (batch, seq, hidden_size) -> dx (batch, seq, hidden_size), {adapter name: gradient}"""
    h, kvh, d, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    q0 = nn.split_heads(ops.linear(x, p.q_proj.weight, p.q_proj.get("bias")), h, d)  # (batch, num_heads, seq, head_dim)
    k0 = nn.split_heads(ops.linear(x, p.k_proj.weight, p.k_proj.get("bias")), kvh, d)  # (batch, kvh, seq, head_dim)
    v = nn.split_heads(ops.linear(x, p.v_proj.weight, p.v_proj.get("bias")), kvh, d)
    q1, k1 = nn.rms_norm(q0, p.q_norm.weight, eps), nn.rms_norm(k0, p.k_norm.weight, eps)
    q2, k2 = apply_rope(q1, cos, sin), apply_rope(k1, cos, sin)
    out, _ = ops.attention(q2, k2, v, mask, scale=d**-0.5)  # (batch, num_heads, seq, head_dim)
    # walk back
    grads = {}
    dmerged = ops.linear_backward(dout, nn.merge_heads(out), p.o_proj.weight, "o_proj", grads)  # (batch, seq, h * d)
    dq2, dk2, dv = ops.attention_backward(nn.split_heads(dmerged, h, d), q2, k2, v, mask, scale=d**-0.5)
    dq1, dk1 = apply_rope_backward(dq2, cos, sin), apply_rope_backward(dk2, cos, sin)
    dq0 = nn.rms_norm_backward(dq1, q0, p.q_norm.weight, eps)[0]
    dk0 = nn.rms_norm_backward(dk1, k0, p.k_norm.weight, eps)[0]
    dx = ops.linear_backward(nn.merge_heads(dq0), x, p.q_proj.weight, "q_proj", grads)
    dx += ops.linear_backward(nn.merge_heads(dk0), x, p.k_proj.weight, "k_proj", grads)
    dx += ops.linear_backward(nn.merge_heads(dv), x, p.v_proj.weight, "v_proj", grads)
    return dx, grads


# ---------------------------------------------------------------------------------------------
# Feed-forward: dense gated MLP, or the sparse mixture of experts
# ---------------------------------------------------------------------------------------------


def mlp(x, p, cfg):
    """Gated MLP (SwiGLU): down(act(gate(x)) * up(x)). (..., hidden_size) -> (..., hidden_size)"""
    act = nn.activation(cfg.hidden_act)
    hidden = act(ops.linear(x, p.gate_proj.weight)) * ops.linear(x, p.up_proj.weight)  # (..., intermediate_size)
    hidden = tap(p, "intermediate", hidden)
    return ops.linear(hidden, p.down_proj.weight)


def mlp_backward(dout, x, p, cfg):
    """Gradients of the gated MLP: with g = gate(x), u = up(x), a = act(g) * u, out = down(a):
    da = dout W_down, dg = act'(g) * (da * u), du = da * act(g), dx = dg W_gate + du W_up.
    dout, x: (..., hidden_size) -> dx (..., hidden_size), {adapter name: gradient}"""
    act, act_backward = nn.activation(cfg.hidden_act), nn.activation_backward(cfg.hidden_act)
    g, u = ops.linear(x, p.gate_proj.weight), ops.linear(x, p.up_proj.weight)  # (..., intermediate_size) each
    grads = {}
    da = ops.linear_backward(dout, act(g) * u, p.down_proj.weight, "down_proj", grads)  # (..., intermediate_size)
    dx = ops.linear_backward(act_backward(da * u, g), x, p.gate_proj.weight, "gate_proj", grads)
    dx += ops.linear_backward(da * act(g), x, p.up_proj.weight, "up_proj", grads)
    return dx, grads


def top_k_experts(probs, top_k):
    """The k most probable experts per token; ties go to the lower expert index (stable sort).
    probs: (tokens, num_experts) -> (tokens, top_k) int64"""
    return np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]


def route(router_logits, top_k, norm_topk_prob, p=None):
    """Pick each token's top-k experts: softmax over ALL experts (float32), then top-k,
    renormalised to sum to one only when norm_topk_prob. (p: the MoE block's weights, naming its taps.)

    router_logits: (tokens, num_experts) -> indices (tokens, top_k) int64, weights (tokens, top_k)
    """
    probs = nn.softmax(router_logits.astype(np.float32), axis=-1)  # (tokens, num_experts)
    probs = tap(p, "router_probs", probs)
    top_k_index = top_k_experts(probs, top_k)  # (tokens, top_k)
    top_k_weights = np.take_along_axis(probs, top_k_index, axis=-1)  # (tokens, top_k)
    if norm_topk_prob:
        top_k_weights = top_k_weights / top_k_weights.sum(axis=-1, keepdims=True)
    return top_k_index, top_k_weights


def route_backward(dweights, router_logits, top_k_index, norm_topk_prob):
    """Gradient of the routing weights with respect to the router logits (the choice of experts
    is piecewise constant: no gradient through it). With p = softmax(logits), w = p[top_k]:

        norm_topk_prob: w' = w / S, S = sum(w)   ->   dw = (dw' - sum(dw' * w')) / S
        dp = dw scattered back to the chosen experts (0 elsewhere);   dlogits = softmax'(dp)

    dweights: (tokens, top_k); router_logits: (tokens, num_experts) -> (tokens, num_experts) float32
    """
    probs = nn.softmax(router_logits.astype(np.float32), axis=-1)  # (tokens, num_experts)
    weights = np.take_along_axis(probs, top_k_index, axis=-1)  # (tokens, top_k)
    dweights = np.asarray(dweights, np.float32)
    if norm_topk_prob:
        total = weights.sum(axis=-1, keepdims=True)  # (tokens, 1)
        normed = weights / total
        dweights = (dweights - np.sum(dweights * normed, axis=-1, keepdims=True)) / total
    dprobs = np.zeros_like(probs)
    np.put_along_axis(dprobs, top_k_index, dweights, axis=-1)  # (tokens, num_experts)
    return nn.softmax_backward(dprobs, probs)


def sparse_moe_block(x, p, cfg):
    """Router + experts.
    x: (batch, seq, hidden_size) -> (batch, seq, hidden_size), router_logits (tokens, num_experts)"""
    b, s, hidden = x.shape
    tokens = x.reshape(b * s, hidden)  # (tokens, hidden_size)
    router_logits = ops.linear(tokens, p.gate.weight)  # (tokens, num_experts)
    router_logits = tap(p, "router_logits", router_logits)
    top_k_index, top_k_weights = route(router_logits, cfg.num_experts_per_tok, cfg.norm_topk_prob, p)
    top_k_index = tap(p, "expert_indices", top_k_index)  # (tokens, top_k): the experts each token chose
    top_k_weights = tap(p, "expert_weights", top_k_weights)  # (tokens, top_k): their weights
    e, weights = p.experts, top_k_weights.astype(x.dtype)
    out = ops.moe_dispatch(tokens, top_k_index, weights, e.gate_proj, e.up_proj, e.down_proj, cfg.hidden_act)
    return out.reshape(b, s, hidden), router_logits  # (batch, seq, hidden_size), (tokens, num_experts)


def sparse_moe_block_backward(dout, x, p, cfg, drouter_logits=None):
    """Gradients of `sparse_moe_block`: back through the experts (to x and to the routing
    weights), then the routing weights to the router logits, then the router to x.
    drouter_logits: (tokens, num_experts), a gradient arriving at the router logits from elsewhere
    (the load-balancing loss), or None.
    dout, x: (batch, seq, hidden_size) -> dx (batch, seq, hidden_size), {adapter name: gradient}"""
    b, s, hidden = x.shape
    tokens = x.reshape(b * s, hidden)  # (tokens, hidden_size)
    router_logits = ops.linear(tokens, p.gate.weight)  # (tokens, num_experts)
    top_k_index, top_k_weights = route(router_logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    e = p.experts
    dout = dout.reshape(b * s, hidden)  # (tokens, hidden_size)
    dtokens, dweights = ops.moe_dispatch_backward(  # (tokens, hidden_size), (tokens, top_k)
        dout, tokens, top_k_index, top_k_weights, e.gate_proj, e.up_proj, e.down_proj, cfg.hidden_act
    )
    dlogits = route_backward(dweights, router_logits, top_k_index, cfg.norm_topk_prob)  # (tokens, num_experts)
    if drouter_logits is not None:
        dlogits = dlogits + drouter_logits
    grads = {}
    dtokens += ops.linear_backward(dlogits, tokens, p.gate.weight, "gate", grads)
    return dtokens.reshape(b, s, hidden), grads


# ---------------------------------------------------------------------------------------------
# Decoder layer and model
# ---------------------------------------------------------------------------------------------


def decoder_layer(x, p, cfg, layer_idx, cos, sin, mask, cache, output_attentions):
    """Pre-norm residual block: x + attn(norm(x)), then h + ffn(norm(h))."""
    normed = nn.rms_norm(x, p.input_layernorm.weight, cfg.rms_norm_eps)  # (batch, seq, hidden_size)
    attn_out, weights = attention(normed, p.self_attn, cfg, layer_idx, cos, sin, mask, cache, output_attentions)
    attn_out = tap(p.self_attn, "output", attn_out)  # (batch, seq, hidden_size)
    h = x + attn_out
    normed = nn.rms_norm(h, p.post_attention_layernorm.weight, cfg.rms_norm_eps)
    if cfg.is_sparse_layer(layer_idx):
        ffn_out, router_logits = sparse_moe_block(normed, p.mlp, cfg)
    else:
        ffn_out, router_logits = mlp(normed, p.mlp, cfg), None
    ffn_out = tap(p.mlp, "output", ffn_out)  # (batch, seq, hidden_size)
    return h + ffn_out, weights, router_logits


def decoder_layer_backward(dout, x, p, cfg, layer_idx, cos, sin, mask, drouter_logits=None):
    """Gradients of `decoder_layer` (no cache): recompute the layer from its input x, then back
    through the feed-forward half and the attention half (each residual passes dout on).
    dout, x: (batch, seq, hidden_size) -> dx, {adapter name: gradient} (names under the layer)"""
    eps = cfg.rms_norm_eps
    normed = nn.rms_norm(x, p.input_layernorm.weight, eps)  # (batch, seq, hidden_size)
    h = x + attention(normed, p.self_attn, cfg, layer_idx, cos, sin, mask, None, False)[0]
    ffn_in = nn.rms_norm(h, p.post_attention_layernorm.weight, eps)
    if cfg.is_sparse_layer(layer_idx):
        dffn_in, ffn_grads = sparse_moe_block_backward(dout, ffn_in, p.mlp, cfg, drouter_logits)
    else:
        dffn_in, ffn_grads = mlp_backward(dout, ffn_in, p.mlp, cfg)
    dh = dout + nn.rms_norm_backward(dffn_in, h, p.post_attention_layernorm.weight, eps)[0]
    dnormed, attn_grads = attention_backward(dh, normed, p.self_attn, cfg, cos, sin, mask)
    dx = dh + nn.rms_norm_backward(dnormed, x, p.input_layernorm.weight, eps)[0]
    grads = {f"mlp.{k}": g for k, g in ffn_grads.items()}
    grads.update({f"self_attn.{k}": g for k, g in attn_grads.items()})
    return dx, grads


def qwen3_moe_model(
    p,
    cfg,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    use_cache=None,
    output_attentions=False,
    output_hidden_states=False,
    output_router_logits=None,
):
    """The backbone: embeddings -> decoder layers -> final RMSNorm."""
    inputs = prepare_inputs(
        cfg, p.embed_tokens.weight, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, use_cache
    )
    x = inputs.embed(p.embed_tokens.weight)  # (batch, seq, hidden_size)
    x = tap(p.embed_tokens, "output", x)
    cos, sin = map(inputs.place, rope_cos_sin(inputs.position_ids, *compute_inv_freq(cfg)))  # (batch, seq, head_dim)
    mask = inputs.mask(cfg.window)  # (batch or 1, 1, seq, past + seq)

    all_hidden, all_attentions, all_router_logits = [], [], []
    for layer_idx, layer in enumerate(p.layers):
        all_hidden.append(x)
        x, weights, router_logits = decoder_layer(
            x, layer, cfg, layer_idx, cos, sin, mask, inputs.cache, output_attentions
        )
        x = tap(layer, "output", x)  # the residual stream after this layer
        all_attentions.append(weights)
        if router_logits is not None:
            all_router_logits.append(router_logits)
    x = nn.rms_norm(x, p.norm.weight, cfg.rms_norm_eps)  # (batch, seq, hidden_size)
    x = tap(p.norm, "output", x)
    all_hidden.append(x)
    if output_router_logits is None:
        output_router_logits = cfg.output_router_logits
    return inputs.output(
        x,
        hidden_states=all_hidden if output_hidden_states else None,
        attentions=all_attentions if output_attentions else None,
        router_logits=all_router_logits if output_router_logits else None,
    )


def qwen3_moe_backward(
    p, cfg, dout, hidden_states, input_ids, attention_mask=None, position_ids=None, drouter_logits=None
):
    """The backbone's backward: from dout = dL/d(last_hidden_state) back to the embeddings.

    hidden_states: the forward's (output_hidden_states=True, no cache): each layer's input, then
    the final normed output. drouter_logits: one (tokens, num_experts) gradient per sparse layer
    (the load-balancing loss's), or None. Each layer is recomputed from its input.
    -> {adapter name: gradient} (names under the backbone), dembeds (batch, seq, hidden_size)
    """
    inputs = prepare_inputs(cfg, p.embed_tokens.weight, input_ids, None, attention_mask, position_ids, None, False)
    cos, sin = map(inputs.place, rope_cos_sin(inputs.position_ids, *compute_inv_freq(cfg)))  # (batch, seq, head_dim)
    mask = inputs.mask(cfg.window)  # (batch or 1, 1, seq, seq)
    sparse = [i for i in range(len(p.layers)) if cfg.is_sparse_layer(i)]
    drouter = dict(zip(sparse, drouter_logits, strict=True)) if drouter_logits is not None else {}
    last = len(p.layers) - 1
    x_out = decoder_layer(hidden_states[last], p.layers[last], cfg, last, cos, sin, mask, None, False)[0]
    d = nn.rms_norm_backward(dout, x_out, p.norm.weight, cfg.rms_norm_eps)[0]  # (batch, seq, hidden_size)
    grads = {}
    for i in reversed(range(len(p.layers))):
        layer = p.layers[i]
        d, layer_grads = decoder_layer_backward(d, hidden_states[i], layer, cfg, i, cos, sin, mask, drouter.get(i))
        grads.update({f"layers.{i}.{k}": g for k, g in layer_grads.items()})
    return grads, d


def qwen3_moe_shapes(cfg):
    """Every tensor of the backbone, named as in Hugging Face checkpoints (experts stacked)."""
    h, d = cfg.hidden_size, cfg.head_dim
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    for i in range(cfg.num_hidden_layers):
        L = f"layers.{i}."
        shapes.update(
            {
                L + "input_layernorm.weight": (h,),
                L + "post_attention_layernorm.weight": (h,),
                L + "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
                L + "self_attn.k_proj.weight": (cfg.num_key_value_heads * d, h),
                L + "self_attn.v_proj.weight": (cfg.num_key_value_heads * d, h),
                L + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
                L + "self_attn.q_norm.weight": (d,),
                L + "self_attn.k_norm.weight": (d,),
            }
        )
        if cfg.attention_bias:
            for name, rows in (
                ("q", cfg.num_attention_heads * d),
                ("k", cfg.num_key_value_heads * d),
                ("v", cfg.num_key_value_heads * d),
                ("o", h),
            ):
                shapes[L + f"self_attn.{name}_proj.bias"] = (rows,)
        if cfg.is_sparse_layer(i):
            e, m = cfg.num_experts, cfg.moe_intermediate_size
            shapes.update(
                {
                    L + "mlp.gate.weight": (e, h),
                    L + "mlp.experts.gate_proj": (e, m, h),
                    L + "mlp.experts.up_proj": (e, m, h),
                    L + "mlp.experts.down_proj": (e, h, m),
                }
            )
        else:
            m = cfg.intermediate_size
            shapes.update(
                {
                    L + "mlp.gate_proj.weight": (m, h),
                    L + "mlp.up_proj.weight": (m, h),
                    L + "mlp.down_proj.weight": (h, m),
                }
            )
    return shapes


def stack_experts(tensors, cfg):
    """Checkpoint layouts -> the model's (num_experts, out, in) stacks, per sparse layer.

    Hub layout (one tensor per expert):   ...mlp.experts.{e}.gate_proj.weight (moe_intermediate, hidden)
    transformers 5 fused layout:          ...mlp.experts.gate_up_proj (num_experts, 2 * moe_intermediate, hidden)
                                          ...mlp.experts.down_proj    (num_experts, hidden, moe_intermediate)
    """
    out = dict(tensors)
    for name in [k for k in tensors if k.endswith("mlp.experts.gate_up_proj")]:
        prefix = name[: -len("gate_up_proj")]
        gate_up = out.pop(name)
        half = gate_up.shape[1] // 2
        out[prefix + "gate_proj"], out[prefix + "up_proj"] = gate_up[:, :half], gate_up[:, half:]
    per_expert = {}
    for name in [k for k in tensors if ".mlp.experts." in k and k.endswith(".weight")]:
        prefix, rest = name.split(".mlp.experts.")
        e, proj, _ = rest.split(".")
        per_expert.setdefault((prefix, proj), {})[int(e)] = out.pop(name)
    for (prefix, proj), experts in per_expert.items():
        missing = sorted(set(range(cfg.num_experts)) - set(experts))
        if missing or len(experts) != cfg.num_experts:
            raise CheckpointError(
                f"{prefix}.mlp.experts: expected {cfg.num_experts} experts' {proj}, "
                f"missing {missing[:5]} or extra {sorted(set(experts) - set(range(cfg.num_experts)))[:5]}"
            )
        shapes = {a.shape for a in experts.values()}
        if len(shapes) != 1:
            raise CheckpointError(
                f"{prefix}.mlp.experts.*.{proj}.weight: experts have different shapes {sorted(shapes)}"
            )
        out[f"{prefix}.mlp.experts.{proj}"] = np.stack([experts[i] for i in range(cfg.num_experts)])
    return out


def unstack_experts(tensors, cfg):
    """The model's expert stacks -> the Hub's one-tensor-per-expert layout (what save writes)."""
    out = {}
    for name, value in tensors.items():
        if ".mlp.experts." in name and name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj"):
            prefix, proj = name.rsplit(".", 1)
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{proj}.weight"] = value[e]
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face-style classes
# ---------------------------------------------------------------------------------------------


class Qwen3MoeModel(BaseModel):
    """The bare Qwen3-MoE transformer: `model(input_ids).last_hidden_state`."""

    config_class = Qwen3MoeConfig
    backbone_shapes = staticmethod(qwen3_moe_shapes)
    backbone_forward = staticmethod(qwen3_moe_model)
    backbone_backward = staticmethod(qwen3_moe_backward)
    to_model_layout = staticmethod(stack_experts)  # checkpoint layout -> model layout, once at load
    to_checkpoint_layout = staticmethod(unstack_experts)  # and back, for save_pretrained


def load_balancing_loss(router_logits, num_experts, top_k, attention_mask=None):
    """Switch-Transformer auxiliary loss over all sparse layers together:

        num_experts * sum_e (fraction of routed slots that chose e) * (mean router probability of e)

    averaged over the tokens the attention mask keeps. router_logits: tuple of (tokens, num_experts),
    the tokens of this call; attention_mask: (batch, past + seq), of which the last seq columns count.
    """
    router_logits = [ops.to_host(r) for r in router_logits]  # a scalar loss: computed on the host
    if attention_mask is not None:  # the columns of this call's tokens (generation passes past + seq columns)
        attention_mask = np.asarray(attention_mask)
        seq = router_logits[0].shape[0] // attention_mask.shape[0]
        attention_mask = attention_mask[:, attention_mask.shape[1] - seq :]  # (batch, seq)
    logits = np.concatenate(router_logits, axis=0).astype(np.float32)  # (layers * tokens, num_experts)
    probs = nn.softmax(logits, axis=-1)  # (layers * tokens, num_experts)
    top_k_index = top_k_experts(probs, top_k)  # (layers * tokens, top_k)
    chosen = np.zeros_like(probs)
    np.put_along_axis(chosen, top_k_index, 1.0, axis=-1)  # one-hot of the k chosen experts
    if attention_mask is None:
        keep = np.ones(probs.shape[0], np.float32)
    else:
        keep = np.tile(np.asarray(attention_mask, np.float32).reshape(-1), len(router_logits))  # (layers * tokens,)
    tokens_per_expert = (chosen * keep[:, None]).sum(0) / keep.sum()  # (num_experts,)
    prob_per_expert = (probs * keep[:, None]).sum(0) / keep.sum()  # (num_experts,)
    return np.float32(num_experts * np.sum(tokens_per_expert * prob_per_expert))


def load_balancing_loss_backward(router_logits, num_experts, top_k, attention_mask=None):
    """Gradient of `load_balancing_loss` with respect to each layer's router logits. The
    fractions of routed slots are piecewise constant, so only the mean probabilities carry it:

        dL/dprobs[t, e] = num_experts * tokens_per_expert[e] * keep[t] / sum(keep),
        then the softmax backward per token.

    router_logits: tuple of (tokens, num_experts) -> list of (tokens, num_experts) float32
    """
    router_logits = [ops.to_host(r) for r in router_logits]
    if attention_mask is not None:
        attention_mask = np.asarray(attention_mask)
        seq = router_logits[0].shape[0] // attention_mask.shape[0]
        attention_mask = attention_mask[:, attention_mask.shape[1] - seq :]  # (batch, seq)
    logits = np.concatenate(router_logits, axis=0).astype(np.float32)  # (layers * tokens, num_experts)
    probs = nn.softmax(logits, axis=-1)
    chosen = np.zeros_like(probs)
    np.put_along_axis(chosen, top_k_experts(probs, top_k), 1.0, axis=-1)
    if attention_mask is None:
        keep = np.ones(probs.shape[0], np.float32)
    else:
        keep = np.tile(np.asarray(attention_mask, np.float32).reshape(-1), len(router_logits))  # (layers * tokens,)
    tokens_per_expert = (chosen * keep[:, None]).sum(0) / keep.sum()  # (num_experts,)
    dprobs = num_experts * tokens_per_expert[None, :] * keep[:, None] / keep.sum()  # (layers * tokens, num_experts)
    dlogits = nn.softmax_backward(dprobs.astype(np.float32), probs)
    return np.split(dlogits, len(router_logits), axis=0)


class Qwen3MoeForCausalLM(ForCausalLM):
    """Causal LM; with router logits requested, adds the load-balancing aux loss to the loss."""

    config_class = Qwen3MoeConfig
    base_model_class = Qwen3MoeModel

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=False,
        output_hidden_states=False,
        output_router_logits=None,
        logits_to_keep=0,
    ):
        cfg = self.config
        if output_router_logits is None:
            output_router_logits = cfg.output_router_logits
        out = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep,
            output_router_logits=output_router_logits,
        )
        if output_router_logits and out.router_logits:
            out.aux_loss = load_balancing_loss(
                out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, attention_mask
            )
            if out.loss is not None:
                out.loss = np.float32(out.loss + cfg.router_aux_loss_coef * out.aux_loss)
        return out


class Qwen3MoeForSequenceClassification(ForSequenceClassification):
    config_class = Qwen3MoeConfig
    base_model_class = Qwen3MoeModel


class Qwen3MoeForTokenClassification(ForTokenClassification):
    config_class = Qwen3MoeConfig
    base_model_class = Qwen3MoeModel


class Qwen3MoeForQuestionAnswering(ForQuestionAnswering):
    config_class = Qwen3MoeConfig
    base_model_class = Qwen3MoeModel
    base_model_prefix = "transformer"  # as transformers names it for this head

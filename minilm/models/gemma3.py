"""Gemma 3 (text): a decoder-only transformer with interleaved local (sliding-window) and global
attention layers, each kind with its own RoPE base.

Read top to bottom: config -> Gemma's RMSNorm and scaled embeddings -> RoPE per layer type ->
attention (GQA, QK-norm, query_pre_attn_scalar, optional logit soft cap) -> GELU-tanh MLP ->
decoder layer (four norms) -> model -> causal-LM head (final logit soft cap). (keras-hub-style API:
`minilm/keras/gemma3.py`.)

What Gemma 3 changes against a Llama-style decoder (transformers' `modular_gemma3.py`):

    RMSNorm            x / rms(x) * (1 + w)           weights are offsets from one, float32 inside
    embeddings         table[ids] * sqrt(hidden_size)  the constant rounded to the model dtype
    attention scale    query_pre_attn_scalar ** -0.5   not necessarily head_dim ** -0.5
    layer kinds        layer_types[i]: "sliding_attention" (window `sliding_window`, RoPE base
                       rope_local_base_freq, no scaling) or "full_attention" (RoPE base rope_theta,
                       with rope_scaling); 270M: five sliding layers, then one global, repeated
    sandwich norms     h = x + norm(attn(norm(x)));  out = h + norm(mlp(norm(h)))
    soft caps          final_logit_softcapping in the LM head only: cap * tanh(logits / cap);
                       attn_logit_softcapping is read but, as in transformers, not applied
                       unless apply_attn_logit_softcapping (keras-hub's attention_logit_soft_cap)
    KV cache           sliding layers keep only their window (SlidingWindowCache, a ring buffer)

Axes: batch, seq, kv_seq (keys the layer attends to), hidden_size, num_heads
(num_attention_heads), num_kv_heads (num_key_value_heads), head_dim, vocab_size.

Backward pass (training, `minilm/grad.py`): each `*_backward` follows its forward, takes the
upstream gradient plus what the forward saw, and returns the input gradients (and the LoRA
adapters' gradients, named like the params). A layer's backward recomputes that layer's forward
from its saved input and walks back: the training forward keeps only each layer's input.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import nn, ops
from ..activations import tap
from ..cache import SlidingWindowCache
from ..config import PretrainedConfig, check_layer_count, check_positive
from ..errors import ConfigError, InputError
from ..fusion import fusable
from ..heads import ForCausalLM
from ..modeling import BaseModel, prepare_inputs
from ..rope import apply_rope, apply_rope_backward, compute_inv_freq, rope_cos_sin, rope_type

SLIDING, FULL = "sliding_attention", "full_attention"  # the two values of config.layer_types

# ---------------------------------------------------------------------------------------------
# Config (transformers 5.23's Gemma3TextConfig names and defaults)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Gemma3TextConfig(PretrainedConfig):
    model_type = "gemma3_text"

    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0  # global layers (transformers 5: rope_parameters["full_attention"])
    rope_local_base_freq: float = 10_000.0  # sliding layers (rope_parameters["sliding_attention"])
    rope_scaling: dict | None = None  # global layers only
    attention_bias: bool = False
    attention_dropout: float = 0.0
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6  # legacy: builds layer_types when a config has none
    layer_types: list | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool = False
    # keras-hub options that transformers' Gemma3TextConfig does not have. The defaults are what
    # every released Gemma 3 and transformers do; `to_dict` leaves them out while they hold them.
    use_query_key_norm: bool = True
    use_post_attention_norm: bool = True
    use_post_ffw_norm: bool = True
    # transformers (4.50 .. 5.23) stores attn_logit_softcapping for Gemma 3 but never passes it to
    # the attention function, so a set cap changes nothing there. keras-hub, Google's reference
    # code and Gemma 2 apply it. False reproduces transformers; Gemma3Backbone sets True.
    apply_attn_logit_softcapping: bool = False

    KERAS_ONLY_DEFAULTS = {
        "use_query_key_norm": True,
        "use_post_attention_norm": True,
        "use_post_ffw_norm": True,
        "apply_attn_logit_softcapping": False,
    }

    def __post_init__(self):
        check_layer_count(self)  # before the per-layer list below
        if self.layer_types is None:  # transformers: layer i is global when (i + 1) % pattern == 0
            pattern = self.sliding_window_pattern
            if not isinstance(pattern, int) or pattern < 1:
                raise ConfigError(
                    f"Gemma3TextConfig.sliding_window_pattern must be a positive integer, got {pattern!r}"
                )
            self.layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        super().__post_init__()

    def validate(self):
        super().validate()
        check_positive(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            raise ConfigError(f"layer_types holds {unknown}; Gemma 3 layers are {SLIDING!r} or {FULL!r}")
        if SLIDING in self.layer_types:
            check_positive(self, "sliding_window")
        if not self.query_pre_attn_scalar or self.query_pre_attn_scalar <= 0:
            raise ConfigError(f"query_pre_attn_scalar must be > 0, got {self.query_pre_attn_scalar!r}")
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            cap = getattr(self, name)
            if cap is not None and not cap > 0:
                raise ConfigError(f"{name} must be None or > 0, got {cap!r}")
        if self.use_bidirectional_attention:
            raise ConfigError(
                "use_bidirectional_attention=True (EmbeddingGemma) is not implemented: minilm's Gemma 3 is causal"
            )

    @classmethod
    def from_dict(cls, config_dict):
        # transformers 5 may give the sliding layers their own rope scaling; minilm keeps their
        # RoPE plain (rope_local_base_freq, as every released Gemma 3) and says so rather than drop it.
        params = config_dict.get("rope_parameters") if isinstance(config_dict, dict) else None
        sliding = params.get(SLIDING) if isinstance(params, dict) else None
        if isinstance(sliding, dict) and rope_type(sliding) != "default":
            raise ConfigError(
                f"rope_parameters[{SLIDING!r}] has rope_type {rope_type(sliding)!r}; minilm's "
                "Gemma 3 supports rope scaling on the full-attention layers only"
            )
        return super().from_dict(config_dict)

    def to_dict(self):
        d = super().to_dict()
        for name, default in self.KERAS_ONLY_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    def layer_window(self, layer_idx):
        """The sliding window of layer `layer_idx`, or None for a global layer."""
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING else None

    @property
    def attention_soft_cap(self):
        """The attention-logit soft cap the model applies (None: as transformers, see above)."""
        return self.attn_logit_softcapping if self.apply_attn_logit_softcapping else None


# ---------------------------------------------------------------------------------------------
# Gemma's RMSNorm and scaled embeddings
# ---------------------------------------------------------------------------------------------


@fusable
def gemma_rms_norm(x, weight, eps):
    """Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + weight), all in float32, cast back.

    The weight is an offset from one (zeros = plain RMSNorm); Llama's RMSNorm multiplies by
    `weight` itself and casts before multiplying. x: (..., dim), weight: (dim,)
    """
    x32 = x.astype(np.float32, copy=False)
    variance = np.add.reduce(x32 * x32, axis=-1, keepdims=True) / np.float32(x.shape[-1])  # mean(x^2): (..., 1)
    normed = x32 * (np.float32(1) / np.sqrt(variance + np.float32(eps)))  # (..., dim)
    return (normed * (np.float32(1) + weight.astype(np.float32, copy=False))).astype(x.dtype, copy=False)


def gemma_rms_norm_backward(dy, x, weight, eps):
    """Gradients of Gemma's RMSNorm: RMSNorm's with the scale 1 + w (nn.rms_norm_backward).
    dy, x: (..., dim), weight: (dim,) -> dx (..., dim), dweight (dim,), float32"""
    return nn.rms_norm_backward(dy, x, np.float32(1) + weight.astype(np.float32, copy=False), eps)


def scaled_embedding(input_ids, table):
    """table[ids] * sqrt(hidden_size), with the constant rounded to the table's dtype first
    (in bfloat16, sqrt(640) = 25.298 becomes 25.25, as in transformers and keras-hub).
    input_ids: (batch, seq) -> (batch, seq, hidden_size)"""
    normalizer = table.dtype.type(np.float32(table.shape[1] ** 0.5))  # a scalar of the table's dtype
    return table[input_ids] * normalizer


def scaled_embedding_backward(dy, input_ids, table):
    """Gradient of `scaled_embedding` with respect to the table: each row collects the gradients
    of the positions that looked it up, times the same normalizer.
    dy: (batch, seq, hidden_size) -> dtable (vocab_size, hidden_size) float32"""
    normalizer = np.float32(table.dtype.type(np.float32(table.shape[1] ** 0.5)))
    dtable = np.zeros(table.shape, np.float32)
    np.add.at(dtable, np.asarray(input_ids).reshape(-1), np.asarray(dy, np.float32).reshape(-1, table.shape[1]))
    return dtable * normalizer


# ---------------------------------------------------------------------------------------------
# Positions: one RoPE per layer type
# ---------------------------------------------------------------------------------------------


def layer_type_rope(cfg, layer_type, seq_len):
    """(inv_freq, attention_scaling) for one layer type.

    sliding: base rope_local_base_freq (10 000), never scaled
    full:    base rope_theta (1 000 000), with rope_scaling (e.g. linear x8 on the 4B+ models)
    """
    if layer_type == SLIDING:
        return compute_inv_freq(cfg, seq_len, base=cfg.rope_local_base_freq, scaling={"rope_type": "default"})
    return compute_inv_freq(cfg, seq_len, base=cfg.rope_theta, scaling=cfg.rope_scaling)


def layer_type_rope_table(cfg, layer_type, end):
    """cos, sin (end, rope_dim) float32 of one layer type: row p is what `gemma3_model` computes for a
    token at position p fed last (seq_len = p + 1, which a dynamic rope type scales by). Compiled
    decode steps (kernels/*/decode.py) build it once and read a row per token."""
    inv_freq, scaling = layer_type_rope(cfg, layer_type, end)
    shortest = layer_type_rope(cfg, layer_type, 1)
    if np.array_equal(shortest[0], inv_freq) and shortest[1] == scaling:  # the length plays no part: one call
        cos, sin = rope_cos_sin(np.arange(end)[None], inv_freq, scaling)  # (1, end, rope_dim) each
        return cos[0], sin[0]
    rows = [rope_cos_sin(np.array([[p]]), *layer_type_rope(cfg, layer_type, p + 1)) for p in range(end)]
    return np.concatenate([cos[0] for cos, _ in rows]), np.concatenate([sin[0] for _, sin in rows])


# ---------------------------------------------------------------------------------------------
# Attention: GQA with QK-norm before RoPE, scale query_pre_attn_scalar ** -0.5
# ---------------------------------------------------------------------------------------------


def attention(x, p, cfg, layer_idx, cos, sin, inputs, output_attentions):
    """x: (batch, seq, hidden_size) -> (batch, seq, hidden_size), attention weights or None"""
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = ops.linear(x, p.q_proj.weight, p.q_proj.get("bias"))  # (batch, seq, num_heads * head_dim)
    k = ops.linear(x, p.k_proj.weight, p.k_proj.get("bias"))  # (batch, seq, num_kv_heads * head_dim)
    v = ops.linear(x, p.v_proj.weight, p.v_proj.get("bias"))  # (batch, seq, num_kv_heads * head_dim)
    q = nn.split_heads(q, h, d)  # (batch, num_heads, seq, head_dim)
    k, v = nn.split_heads(k, kvh, d), nn.split_heads(v, kvh, d)  # (batch, num_kv_heads, seq, head_dim) each
    q, k, v = tap(p, "queries", q), tap(p, "keys", k), tap(p, "values", v)
    if cfg.use_query_key_norm:  # QK-norm: Gemma's RMSNorm over head_dim, per head
        q = gemma_rms_norm(q, p.q_norm.weight, cfg.rms_norm_eps)
        k = gemma_rms_norm(k, p.k_norm.weight, cfg.rms_norm_eps)
        q, k = tap(p, "queries_normed", q), tap(p, "keys_normed", k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k = tap(p, "queries_rope", q), tap(p, "keys_rope", k)
    if inputs.cache is not None:
        k, v = inputs.cache.update(layer_idx, k, v)  # (batch, num_kv_heads, kv_seq, head_dim)
    mask = inputs.mask(cfg.layer_window(layer_idx), k.shape[2])  # (batch or 1, 1, seq, kv_seq): the keys returned
    scale, cap = cfg.query_pre_attn_scalar**-0.5, cfg.attention_soft_cap
    out, weights = ops.attention(q, k, v, mask, scale=scale, soft_cap=cap, return_weights=output_attentions, p=p)
    out = tap(p, "attn_output_heads", out)  # (batch, num_heads, seq, head_dim): each head's output, before o_proj
    return ops.linear(nn.merge_heads(out), p.o_proj.weight, p.o_proj.get("bias")), weights


def attention_backward(dout, x, p, cfg, layer_idx, cos, sin, inputs):
    """Gradients of `attention` (no cache): recompute it keeping q, k, v at each step, then walk
    back o_proj -> attention -> RoPE -> QK-norm -> q/k/v projections.
    dout, x: (batch, seq, hidden_size) -> dx (batch, seq, hidden_size), {adapter name: gradient}"""
    h, kvh, d, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    q0 = nn.split_heads(ops.linear(x, p.q_proj.weight, p.q_proj.get("bias")), h, d)  # (batch, num_heads, seq, head_dim)
    k0 = nn.split_heads(ops.linear(x, p.k_proj.weight, p.k_proj.get("bias")), kvh, d)  # (batch, kvh, seq, head_dim)
    v = nn.split_heads(ops.linear(x, p.v_proj.weight, p.v_proj.get("bias")), kvh, d)
    q1, k1 = q0, k0
    if cfg.use_query_key_norm:
        q1, k1 = gemma_rms_norm(q0, p.q_norm.weight, eps), gemma_rms_norm(k0, p.k_norm.weight, eps)
    q2, k2 = apply_rope(q1, cos, sin), apply_rope(k1, cos, sin)
    mask = inputs.mask(cfg.layer_window(layer_idx), k2.shape[2])  # (batch or 1, 1, seq, seq)
    scale, cap = cfg.query_pre_attn_scalar**-0.5, cfg.attention_soft_cap
    out, _ = ops.attention(q2, k2, v, mask, scale=scale, soft_cap=cap)  # (batch, num_heads, seq, head_dim)
    # walk back
    grads = {}
    dmerged = ops.linear_backward(dout, nn.merge_heads(out), p.o_proj.weight, "o_proj", grads)  # (batch, seq, h * d)
    dq2, dk2, dv = ops.attention_backward(nn.split_heads(dmerged, h, d), q2, k2, v, mask, scale=scale, soft_cap=cap)
    dq1, dk1 = apply_rope_backward(dq2, cos, sin), apply_rope_backward(dk2, cos, sin)
    dq0, dk0 = dq1, dk1
    if cfg.use_query_key_norm:
        dq0 = gemma_rms_norm_backward(dq1, q0, p.q_norm.weight, eps)[0]
        dk0 = gemma_rms_norm_backward(dk1, k0, p.k_norm.weight, eps)[0]
    dx = ops.linear_backward(nn.merge_heads(dq0), x, p.q_proj.weight, "q_proj", grads)
    dx += ops.linear_backward(nn.merge_heads(dk0), x, p.k_proj.weight, "k_proj", grads)
    dx += ops.linear_backward(nn.merge_heads(dv), x, p.v_proj.weight, "v_proj", grads)
    return dx, grads


# ---------------------------------------------------------------------------------------------
# Feed-forward: gated MLP with GELU (tanh approximation)
# ---------------------------------------------------------------------------------------------


def mlp(x, p, cfg):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)). (..., hidden_size) -> (..., hidden_size)"""
    act = nn.activation(cfg.hidden_activation)
    hidden = act(ops.linear(x, p.gate_proj.weight)) * ops.linear(x, p.up_proj.weight)  # (..., intermediate_size)
    hidden = tap(p, "intermediate", hidden)
    return ops.linear(hidden, p.down_proj.weight)


def mlp_backward(dout, x, p, cfg):
    """Gradients of the gated MLP: with g = gate(x), u = up(x), a = act(g) * u, out = down(a):
    da = dout W_down, dg = act'(g) * (da * u), du = da * act(g), dx = dg W_gate + du W_up.
    dout, x: (..., hidden_size) -> dx (..., hidden_size), {adapter name: gradient}"""
    act, act_backward = nn.activation(cfg.hidden_activation), nn.activation_backward(cfg.hidden_activation)
    g, u = ops.linear(x, p.gate_proj.weight), ops.linear(x, p.up_proj.weight)  # (..., intermediate_size) each
    grads = {}
    da = ops.linear_backward(dout, act(g) * u, p.down_proj.weight, "down_proj", grads)  # (..., intermediate_size)
    dx = ops.linear_backward(act_backward(da * u, g), x, p.gate_proj.weight, "gate_proj", grads)
    dx += ops.linear_backward(da * act(g), x, p.up_proj.weight, "up_proj", grads)
    return dx, grads


# ---------------------------------------------------------------------------------------------
# Decoder layer and model
# ---------------------------------------------------------------------------------------------


def decoder_layer(x, p, cfg, layer_idx, cos, sin, inputs, output_attentions):
    """Sandwich norms: h = x + norm(attn(norm(x))), then h + norm(mlp(norm(h)))."""
    eps = cfg.rms_norm_eps
    normed = gemma_rms_norm(x, p.input_layernorm.weight, eps)  # (batch, seq, hidden_size)
    attn_out, weights = attention(normed, p.self_attn, cfg, layer_idx, cos, sin, inputs, output_attentions)
    attn_out = tap(p.self_attn, "output", attn_out)  # (batch, seq, hidden_size), before the post-attention norm
    if cfg.use_post_attention_norm:
        attn_out = gemma_rms_norm(attn_out, p.post_attention_layernorm.weight, eps)
    h = x + attn_out
    ffn_out = mlp(gemma_rms_norm(h, p.pre_feedforward_layernorm.weight, eps), p.mlp, cfg)
    ffn_out = tap(p.mlp, "output", ffn_out)  # (batch, seq, hidden_size), before the post-feedforward norm
    if cfg.use_post_ffw_norm:
        ffn_out = gemma_rms_norm(ffn_out, p.post_feedforward_layernorm.weight, eps)
    return h + ffn_out, weights


def decoder_layer_backward(dout, x, p, cfg, layer_idx, cos, sin, inputs):
    """Gradients of `decoder_layer` (no cache): recompute the layer from its input x, keeping the
    inputs of each norm, then back through the two sandwiches (each residual passes dout on).
    dout, x: (batch, seq, hidden_size) -> dx, {adapter name: gradient} (names under the layer)"""
    eps = cfg.rms_norm_eps
    normed = gemma_rms_norm(x, p.input_layernorm.weight, eps)  # (batch, seq, hidden_size)
    attn_out, _ = attention(normed, p.self_attn, cfg, layer_idx, cos, sin, inputs, False)
    post_attn = attn_out
    if cfg.use_post_attention_norm:
        post_attn = gemma_rms_norm(attn_out, p.post_attention_layernorm.weight, eps)
    h = x + post_attn
    ffn_in = gemma_rms_norm(h, p.pre_feedforward_layernorm.weight, eps)
    # h + norm(mlp(norm(h))): dh = dout + the path through the MLP
    dffn = dout
    if cfg.use_post_ffw_norm:
        dffn = gemma_rms_norm_backward(dout, mlp(ffn_in, p.mlp, cfg), p.post_feedforward_layernorm.weight, eps)[0]
    dffn_in, mlp_grads = mlp_backward(dffn, ffn_in, p.mlp, cfg)
    dh = dout + gemma_rms_norm_backward(dffn_in, h, p.pre_feedforward_layernorm.weight, eps)[0]
    # x + norm(attn(norm(x))): dx = dh + the path through attention
    dattn = dh
    if cfg.use_post_attention_norm:
        dattn = gemma_rms_norm_backward(dh, attn_out, p.post_attention_layernorm.weight, eps)[0]
    dnormed, attn_grads = attention_backward(dattn, normed, p.self_attn, cfg, layer_idx, cos, sin, inputs)
    dx = dh + gemma_rms_norm_backward(dnormed, x, p.input_layernorm.weight, eps)[0]
    grads = {f"mlp.{k}": g for k, g in mlp_grads.items()}
    grads.update({f"self_attn.{k}": g for k, g in attn_grads.items()})
    return dx, grads


def make_cache(cfg):
    """transformers' default cache for Gemma 3: global layers keep every position, sliding layers
    a ring buffer of their window. Pass `past_key_values=KVCache(num_hidden_layers)` to use the
    reference cache instead (keeps everything; the window is then only a mask)."""
    return SlidingWindowCache([cfg.layer_window(i) for i in range(cfg.num_hidden_layers)])


def gemma3_model(
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
    token_type_ids=None,
    pixel_values=None,
):
    """The backbone: scaled embeddings -> decoder layers (sliding / global) -> final norm.
    token_type_ids (1 on image tokens; the multimodal model's): tokens of one image attend both ways."""
    if pixel_values is not None:
        raise InputError(
            "this Gemma 3 is text-only (Gemma3ForCausalLM, model_type gemma3_text): it has no vision tower to read "
            "pixel_values; images need a Gemma3ForConditionalGeneration checkpoint (model_type gemma3)"
        )
    inputs = prepare_inputs(
        cfg,
        p.embed_tokens.weight,
        input_ids,
        inputs_embeds,
        attention_mask,
        position_ids,
        past_key_values,
        use_cache,
        new_cache=make_cache,
        token_type_ids=token_type_ids,
    )
    x = inputs.embed(p.embed_tokens.weight, lookup=scaled_embedding)  # (batch, seq, hidden_size)
    x = tap(p.embed_tokens, "output", x)  # the scaled embeddings
    seq_len = int(np.max(inputs.position_ids)) + 1  # what a dynamic rope type scales by, as in transformers
    positions = inputs.place(inputs.position_ids)  # the angles are computed where the weights live
    rope = {}
    for kind in sorted(set(cfg.layer_types)):
        inv_freq, scaling = layer_type_rope(cfg, kind, seq_len)
        rope[kind] = rope_cos_sin(positions, inputs.place(inv_freq), scaling)  # (batch, seq, head_dim) x2

    all_hidden, all_attentions = [], []
    for layer_idx, layer in enumerate(p.layers):
        all_hidden.append(x)
        cos, sin = rope[cfg.layer_types[layer_idx]]
        x, weights = decoder_layer(x, layer, cfg, layer_idx, cos, sin, inputs, output_attentions)
        x = tap(layer, "output", x)  # the residual stream after this layer
        all_attentions.append(weights)
    x = gemma_rms_norm(x, p.norm.weight, cfg.rms_norm_eps)  # (batch, seq, hidden_size)
    x = tap(p.norm, "output", x)
    all_hidden.append(x)
    return inputs.output(
        x,
        hidden_states=all_hidden if output_hidden_states else None,
        attentions=all_attentions if output_attentions else None,
    )


def gemma3_backward(p, cfg, dout, hidden_states, input_ids, attention_mask=None, position_ids=None):
    """The backbone's backward: from dout = dL/d(last_hidden_state) back to the embeddings.

    hidden_states: the forward's (output_hidden_states=True, no cache): each layer's input, then
    the final normed output. Each layer is recomputed from its input (gradient checkpointing).
    -> {adapter name: gradient} (names under the backbone, e.g. "layers.3.self_attn.q_proj.lora_A"),
       dembeds (batch, seq, hidden_size): the gradient at the scaled embeddings
    """
    inputs = prepare_inputs(cfg, p.embed_tokens.weight, input_ids, None, attention_mask, position_ids, None, False)
    seq_len = int(np.max(inputs.position_ids)) + 1
    rope = {
        kind: tuple(map(inputs.place, rope_cos_sin(inputs.position_ids, *layer_type_rope(cfg, kind, seq_len))))
        for kind in sorted(set(cfg.layer_types))
    }  # (batch, seq, head_dim) x2 per layer type, as in the forward
    last = len(p.layers) - 1
    cos, sin = rope[cfg.layer_types[last]]
    x_out, _ = decoder_layer(hidden_states[last], p.layers[last], cfg, last, cos, sin, inputs, False)  # before the norm
    d = gemma_rms_norm_backward(dout, x_out, p.norm.weight, cfg.rms_norm_eps)[0]  # (batch, seq, hidden_size)
    grads = {}
    for layer_idx in reversed(range(len(p.layers))):
        cos, sin = rope[cfg.layer_types[layer_idx]]
        d, layer_grads = decoder_layer_backward(
            d, hidden_states[layer_idx], p.layers[layer_idx], cfg, layer_idx, cos, sin, inputs
        )
        grads.update({f"layers.{layer_idx}.{k}": g for k, g in layer_grads.items()})
    return grads, d


def gemma3_shapes(cfg):
    """Every tensor of the backbone, named as in Hugging Face checkpoints."""
    h, d, m = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_rows, kv_rows = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    for i in range(cfg.num_hidden_layers):
        L = f"layers.{i}."
        shapes.update(
            {
                L + "input_layernorm.weight": (h,),
                L + "pre_feedforward_layernorm.weight": (h,),
                L + "self_attn.q_proj.weight": (q_rows, h),
                L + "self_attn.k_proj.weight": (kv_rows, h),
                L + "self_attn.v_proj.weight": (kv_rows, h),
                L + "self_attn.o_proj.weight": (h, q_rows),
                L + "mlp.gate_proj.weight": (m, h),
                L + "mlp.up_proj.weight": (m, h),
                L + "mlp.down_proj.weight": (h, m),
            }
        )
        if cfg.use_post_attention_norm:
            shapes[L + "post_attention_layernorm.weight"] = (h,)
        if cfg.use_post_ffw_norm:
            shapes[L + "post_feedforward_layernorm.weight"] = (h,)
        if cfg.use_query_key_norm:
            shapes[L + "self_attn.q_norm.weight"] = (d,)
            shapes[L + "self_attn.k_norm.weight"] = (d,)
        if cfg.attention_bias:
            for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows), ("o", h)):
                shapes[L + f"self_attn.{name}_proj.bias"] = (rows,)
    return shapes


# ---------------------------------------------------------------------------------------------
# Hugging Face-style classes
# ---------------------------------------------------------------------------------------------


class Gemma3TextModel(BaseModel):
    """The bare Gemma 3 text transformer: `model(input_ids).last_hidden_state`."""

    config_class = Gemma3TextConfig
    backbone_shapes = staticmethod(gemma3_shapes)
    backbone_forward = staticmethod(gemma3_model)
    backbone_backward = staticmethod(gemma3_backward)

    def norm_init_value(self):
        return 0.0  # Gemma norms scale by (1 + w): zeros are the neutral weights


class Gemma3ForCausalLM(ForCausalLM):
    """Causal LM: logits = hidden @ embed_tokens^T (tied), soft-capped when final_logit_softcapping
    is set: cap * tanh(logits / cap), in the head only (hidden states are never capped)."""

    config_class = Gemma3TextConfig
    base_model_class = Gemma3TextModel

    def norm_init_value(self):
        return 0.0

    def compute_logits(self, hidden):
        """(batch, seq, hidden_size) -> (batch, seq, vocab_size)"""
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else nn.soft_cap(logits, cap)

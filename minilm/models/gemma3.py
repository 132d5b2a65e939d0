"""Gemma 3 (text): a decoder-only transformer with interleaved local (sliding-window) and global
attention layers, each kind with its own RoPE base.

Read top to bottom: config -> Gemma's RMSNorm and scaled embeddings -> RoPE per layer type ->
attention (GQA, QK-norm, query_pre_attn_scalar, optional logit soft cap) -> GELU-tanh MLP ->
decoder layer (four norms) -> model -> causal-LM head (final logit soft cap) -> keras-hub backbone.

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
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import nn, ops
from ..backbone import Backbone, TokenEmbedding
from ..cache import SlidingWindowCache
from ..config import PretrainedConfig, check_positive
from ..errors import ConfigError
from ..heads import ForCausalLM
from ..modeling import BaseModel, ModelOutput, check_model_inputs
from ..rope import apply_rope, compute_inv_freq, rope_cos_sin, rope_type

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

    KERAS_ONLY_DEFAULTS = {"use_query_key_norm": True, "use_post_attention_norm": True, "use_post_ffw_norm": True,
                           "apply_attn_logit_softcapping": False}

    def __post_init__(self):
        if self.layer_types is None:  # transformers: layer i is global when (i + 1) % pattern == 0
            pattern = self.sliding_window_pattern
            if not isinstance(pattern, int) or pattern < 1:
                raise ConfigError(f"Gemma3TextConfig.sliding_window_pattern must be a positive integer, got {pattern!r}")
            self.layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        super().__post_init__()

    def validate(self):
        super().validate()
        check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers="
                              f"{self.num_hidden_layers}")
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
            raise ConfigError("use_bidirectional_attention=True (EmbeddingGemma) is not implemented: minilm's "
                              "Gemma 3 is causal")

    @classmethod
    def from_dict(cls, config_dict):
        # transformers 5 may give the sliding layers their own rope scaling; minilm keeps their
        # RoPE plain (rope_local_base_freq, as every released Gemma 3) and says so rather than drop it.
        sliding = (config_dict.get("rope_parameters") or {}).get(SLIDING) or {}
        if rope_type(sliding) != "default":
            raise ConfigError(f"rope_parameters[{SLIDING!r}] has rope_type {rope_type(sliding)!r}; minilm's "
                              "Gemma 3 supports rope scaling on the full-attention layers only")
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


def gemma_rms_norm(x, weight, eps):
    """Gemma's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + weight), all in float32, cast back.

    The weight is an offset from one (zeros = plain RMSNorm); Llama's RMSNorm multiplies by
    `weight` itself and casts before multiplying. x: (..., dim), weight: (dim,)
    """
    x32 = x.astype(np.float32, copy=False)
    variance = np.add.reduce(x32 * x32, axis=-1, keepdims=True) / np.float32(x.shape[-1])  # mean(x^2): (..., 1)
    normed = x32 * (np.float32(1) / np.sqrt(variance + np.float32(eps)))  # (..., dim)
    return (normed * (np.float32(1) + weight.astype(np.float32, copy=False))).astype(x.dtype, copy=False)


def scaled_embedding(input_ids, table):
    """table[ids] * sqrt(hidden_size), with the constant rounded to the table's dtype first
    (in bfloat16, sqrt(640) = 25.298 becomes 25.25, as in transformers and keras-hub).
    input_ids: (batch, seq) -> (batch, seq, hidden_size)"""
    normalizer = table.dtype.type(np.float32(table.shape[1] ** 0.5))  # a scalar of the table's dtype
    return table[input_ids] * normalizer


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


# ---------------------------------------------------------------------------------------------
# Attention: GQA with QK-norm before RoPE, scale query_pre_attn_scalar ** -0.5
# ---------------------------------------------------------------------------------------------


def attention_mask_for_keys(attention_mask, q_idx, kv_seq, window):
    """Boolean mask for the kv_seq keys a cache returned: the LAST kv_seq positions, oldest first
    (the reference KVCache returns them all; SlidingWindowCache the ones a window can still see).

    q_idx: (seq,) the queries' columns in attention_mask, (batch, past + seq) or None
    -> (batch or 1, 1, seq, kv_seq) bool

    sliding_window=3, KVCache     k: 0 1 2 3 4       SlidingWindowCache  k: 2 3 4
    q=4                              . . x x x                              x x x
    """
    end = q_idx[-1] + 1
    k_idx = np.arange(end - kv_seq, end)  # (kv_seq,) the keys' columns
    padding = None if attention_mask is None else attention_mask[:, k_idx]  # (batch, kv_seq)
    return nn.attention_mask_4d(padding, q_idx, k_idx, window)


def attention(x, p, cfg, layer_idx, cos, sin, mask_for, cache, output_attentions):
    """x: (batch, seq, hidden_size) -> (batch, seq, hidden_size), attention weights or None"""
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = nn.split_heads(ops.linear(x, p.q_proj.weight, p.q_proj.get("bias")), h, d)  # (batch, num_heads, seq, head_dim)
    k = nn.split_heads(ops.linear(x, p.k_proj.weight, p.k_proj.get("bias")), kvh, d)  # (batch, num_kv_heads, seq, head_dim)
    v = nn.split_heads(ops.linear(x, p.v_proj.weight, p.v_proj.get("bias")), kvh, d)  # (batch, num_kv_heads, seq, head_dim)
    if cfg.use_query_key_norm:  # QK-norm: Gemma's RMSNorm over head_dim, per head
        q = gemma_rms_norm(q, p.q_norm.weight, cfg.rms_norm_eps)
        k = gemma_rms_norm(k, p.k_norm.weight, cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # (batch, num_kv_heads, kv_seq, head_dim)
    mask = mask_for(cfg.layer_window(layer_idx), k.shape[2])  # (batch or 1, 1, seq, kv_seq)
    out, weights = ops.attention(q, k, v, mask, scale=cfg.query_pre_attn_scalar**-0.5,
                                 soft_cap=cfg.attention_soft_cap, return_weights=output_attentions)
    return ops.linear(nn.merge_heads(out), p.o_proj.weight, p.o_proj.get("bias")), weights


# ---------------------------------------------------------------------------------------------
# Feed-forward: gated MLP with GELU (tanh approximation)
# ---------------------------------------------------------------------------------------------


def mlp(x, p, cfg):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)). (..., hidden_size) -> (..., hidden_size)"""
    act = nn.activation(cfg.hidden_activation)
    return ops.linear(act(ops.linear(x, p.gate_proj.weight)) * ops.linear(x, p.up_proj.weight), p.down_proj.weight)


# ---------------------------------------------------------------------------------------------
# Decoder layer and model
# ---------------------------------------------------------------------------------------------


def decoder_layer(x, p, cfg, layer_idx, cos, sin, mask_for, cache, output_attentions):
    """Sandwich norms: h = x + norm(attn(norm(x))), then h + norm(mlp(norm(h)))."""
    eps = cfg.rms_norm_eps
    attn_out, weights = attention(gemma_rms_norm(x, p.input_layernorm.weight, eps), p.self_attn, cfg, layer_idx,
                                  cos, sin, mask_for, cache, output_attentions)
    if cfg.use_post_attention_norm:
        attn_out = gemma_rms_norm(attn_out, p.post_attention_layernorm.weight, eps)
    h = x + attn_out
    ffn_out = mlp(gemma_rms_norm(h, p.pre_feedforward_layernorm.weight, eps), p.mlp, cfg)
    if cfg.use_post_ffw_norm:
        ffn_out = gemma_rms_norm(ffn_out, p.post_feedforward_layernorm.weight, eps)
    return h + ffn_out, weights


def make_cache(cfg):
    """transformers' default cache for Gemma 3: global layers keep every position, sliding layers
    a ring buffer of their window. Pass `past_key_values=KVCache(num_hidden_layers)` to use the
    reference cache instead (keeps everything; the window is then only a mask)."""
    return SlidingWindowCache([cfg.layer_window(i) for i in range(cfg.num_hidden_layers)])


def gemma3_model(p, cfg, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, use_cache=None, output_attentions=False, output_hidden_states=False):
    """The backbone: scaled embeddings -> decoder layers (sliding / global) -> final norm."""
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    input_ids, inputs_embeds, attention_mask, batch, seq = check_model_inputs(
        cfg, input_ids, inputs_embeds, attention_mask, position_ids, past)
    if use_cache and past_key_values is None:
        past_key_values = make_cache(cfg)
    if inputs_embeds is None:
        table = p.embed_tokens.weight
        x = scaled_embedding(ops.like(input_ids, table), table)  # (batch, seq, hidden_size)
    else:
        x = ops.like(inputs_embeds, p.norm.weight).astype(p.norm.weight.dtype)  # used as given (not scaled)
    if position_ids is None:
        position_ids = np.arange(past, past + seq)[None]  # (1, seq); generate() passes mask-aware positions
    seq_len = int(np.max(position_ids)) + 1  # what a dynamic rope type scales by, as in transformers
    rope = {kind: tuple(ops.like(a, x) for a in rope_cos_sin(position_ids, *layer_type_rope(cfg, kind, seq_len)))
            for kind in sorted(set(cfg.layer_types))}  # (batch, seq, head_dim) x2 per layer type
    q_idx = np.arange(past, past + seq)  # the queries' columns in attention_mask (and cache slots)
    masks = {}

    def mask_for(window, kv_seq):
        """The mask for keys a cache returned, built once per (window, kv_seq) and shared by the layers."""
        if (window, kv_seq) not in masks:
            masks[window, kv_seq] = ops.like(attention_mask_for_keys(attention_mask, q_idx, kv_seq, window), x)
        return masks[window, kv_seq]

    all_hidden, all_attentions = [], []
    for layer_idx, layer in enumerate(p.layers):
        all_hidden.append(x)
        cos, sin = rope[cfg.layer_types[layer_idx]]
        x, weights = decoder_layer(x, layer, cfg, layer_idx, cos, sin, mask_for, past_key_values, output_attentions)
        all_attentions.append(weights)
    x = gemma_rms_norm(x, p.norm.weight, cfg.rms_norm_eps)  # (batch, seq, hidden_size)
    all_hidden.append(x)
    return ModelOutput(
        last_hidden_state=x,
        past_key_values=past_key_values if use_cache or past_key_values is not None else None,
        hidden_states=tuple(all_hidden) if output_hidden_states else None,
        attentions=tuple(all_attentions) if output_attentions else None,
    )


def gemma3_shapes(cfg):
    """Every tensor of the backbone, named as in Hugging Face checkpoints."""
    h, d, m = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_rows, kv_rows = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    for i in range(cfg.num_hidden_layers):
        L = f"layers.{i}."
        shapes.update({
            L + "input_layernorm.weight": (h,),
            L + "pre_feedforward_layernorm.weight": (h,),
            L + "self_attn.q_proj.weight": (q_rows, h),
            L + "self_attn.k_proj.weight": (kv_rows, h),
            L + "self_attn.v_proj.weight": (kv_rows, h),
            L + "self_attn.o_proj.weight": (h, q_rows),
            L + "mlp.gate_proj.weight": (m, h),
            L + "mlp.up_proj.weight": (m, h),
            L + "mlp.down_proj.weight": (h, m),
        })
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


# ---------------------------------------------------------------------------------------------
# keras-hub-style backbone
# ---------------------------------------------------------------------------------------------


class Gemma3TokenEmbedding(TokenEmbedding):
    """keras-hub's ReversibleEmbedding with `logit_soft_cap`: reverse=True gives capped logits."""

    def __call__(self, inputs, reverse=False):
        out = super().__call__(inputs, reverse=reverse)
        cap = self._backbone.config.final_logit_softcapping
        return nn.soft_cap(out, cap) if reverse and cap is not None else out


class Gemma3Backbone(Backbone):
    """keras-hub's Gemma3Backbone arguments on top of Gemma3TextModel (text only).

    keras-hub's layer pattern is fixed: with use_sliding_window_attention, layer i is local when
    i % 6 < 5; local layers use RoPE base 10 000 and global ones 1 000 000, each with its own
    linear scaling factor (positions / factor). query_head_dim_normalize scales queries by
    head_dim ** -0.5, else by (hidden_dim // num_query_heads) ** -0.5 (this is what keras-hub
    documents; its decoder block currently hard-codes True).
    """

    model_class = Gemma3TextModel

    def __init__(self, vocabulary_size, image_size, num_layers, num_query_heads, num_key_value_heads, hidden_dim,
                 intermediate_dim, head_dim, query_head_dim_normalize=True, use_query_key_norm=True,
                 use_post_ffw_norm=False, use_post_attention_norm=False, attention_logit_soft_cap=None,
                 final_logit_soft_cap=None, use_sliding_window_attention=False, sliding_window_size=1024,
                 local_rope_scaling_factor=1.0, global_rope_scaling_factor=1.0, vision_encoder=None,
                 layer_norm_epsilon=1e-6, dropout=0, dtype=None, **kwargs):
        if vision_encoder is not None:
            # The seam for images: encode -> pool to mm_tokens_per_image -> RMSNorm -> project, then
            # interleave with the text embeddings and let one image's tokens attend bidirectionally.
            raise NotImplementedError("Gemma3Backbone(vision_encoder=...) is not implemented: minilm's Gemma 3 is "
                                      "text only; pass vision_encoder=None")
        if local_rope_scaling_factor != 1.0:
            raise ConfigError(f"local_rope_scaling_factor={local_rope_scaling_factor}: minilm's Gemma 3 (like every "
                              "released checkpoint) scales RoPE on the global layers only; use 1.0")
        hf_config = Gemma3TextConfig(
            vocab_size=vocabulary_size, num_hidden_layers=num_layers, num_attention_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads, hidden_size=hidden_dim, intermediate_size=intermediate_dim,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim if query_head_dim_normalize else hidden_dim // num_query_heads,
            use_query_key_norm=use_query_key_norm, use_post_ffw_norm=use_post_ffw_norm,
            use_post_attention_norm=use_post_attention_norm,
            attn_logit_softcapping=attention_logit_soft_cap,
            apply_attn_logit_softcapping=attention_logit_soft_cap is not None,
            final_logit_softcapping=final_logit_soft_cap,
            layer_types=[SLIDING if use_sliding_window_attention and i % 6 < 5 else FULL for i in range(num_layers)],
            sliding_window=sliding_window_size, rope_local_base_freq=10_000.0, rope_theta=1_000_000.0,
            rope_scaling=(None if global_rope_scaling_factor == 1.0
                          else {"rope_type": "linear", "factor": float(global_rope_scaling_factor)}),
            rms_norm_eps=layer_norm_epsilon, attention_dropout=dropout)
        self.image_size = image_size
        super().__init__(hf_config, dtype=dtype, params=kwargs.get("params"))

    @property
    def token_embedding(self):
        return Gemma3TokenEmbedding(self)

    def get_config(self):
        return {**super().get_config(), "image_size": getattr(self, "image_size", None)}

    @classmethod
    def from_hf_config(cls, c):
        """keras-hub arguments for a Gemma3TextConfig; ConfigError for what keras-hub cannot express."""
        sliding = SLIDING in c.layer_types
        keras_types = [SLIDING if sliding and i % 6 < 5 else FULL for i in range(c.num_hidden_layers)]
        scaling = c.rope_scaling or {}
        problems = []
        if c.layer_types != keras_types:
            problems.append(f"layer_types {c.layer_types} (keras-hub: local when i % 6 < 5)")
        if (c.rope_theta, c.rope_local_base_freq) != (1_000_000.0, 10_000.0):
            problems.append(f"rope_theta={c.rope_theta}, rope_local_base_freq={c.rope_local_base_freq} "
                            "(keras-hub: 1e6 and 1e4)")
        if scaling and rope_type(scaling) != "linear":
            problems.append(f"rope_scaling {scaling} (keras-hub: linear only)")
        if c.query_pre_attn_scalar not in (c.head_dim, c.hidden_size // c.num_attention_heads):
            problems.append(f"query_pre_attn_scalar={c.query_pre_attn_scalar} (keras-hub: head_dim or "
                            "hidden_size // num_attention_heads)")
        if c.attn_logit_softcapping is not None and not c.apply_attn_logit_softcapping:
            problems.append("attn_logit_softcapping set but not applied (as in transformers; keras-hub applies it)")
        if problems:
            raise ConfigError("Gemma3Backbone cannot express this Gemma3TextConfig: " + "; ".join(problems))
        return dict(
            vocabulary_size=c.vocab_size, image_size=None, num_layers=c.num_hidden_layers,
            num_query_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            hidden_dim=c.hidden_size, intermediate_dim=c.intermediate_size, head_dim=c.head_dim,
            query_head_dim_normalize=c.query_pre_attn_scalar == c.head_dim,
            use_query_key_norm=c.use_query_key_norm, use_post_ffw_norm=c.use_post_ffw_norm,
            use_post_attention_norm=c.use_post_attention_norm, attention_logit_soft_cap=c.attention_soft_cap,
            final_logit_soft_cap=c.final_logit_softcapping, use_sliding_window_attention=sliding,
            sliding_window_size=c.sliding_window, local_rope_scaling_factor=1.0,
            global_rope_scaling_factor=float(scaling.get("factor", 1.0)), vision_encoder=None,
            layer_norm_epsilon=c.rms_norm_eps, dropout=c.attention_dropout)

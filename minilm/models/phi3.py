"""Phi-3 (Microsoft, 2024): a Llama-style decoder (RMSNorm, GQA, RoPE, SwiGLU) with fused
projections and LongRoPE for long contexts.

Read top to bottom: config -> attention (RoPE for this call: short or long factors, see
`minilm.rope.rope_for_positions`) -> MLP -> decoder layer -> model -> heads.

Checkpoint layout, fixed once at load (and written back on save):
  - self_attn.qkv_proj (num_heads * head_dim + 2 * num_kv_heads * head_dim, hidden_size): three
    contiguous blocks q | k | v, split into q_proj / k_proj / v_proj;
  - mlp.gate_up_proj (2 * intermediate_size, hidden_size): gate rows then up rows, split into
    gate_proj / up_proj.

LongRoPE (rope_scaling type "longrope", or "su" in the first Phi-3 configs; transformers' Phi-3
also reads "yarn" as longrope) as transformers 5.23 runs it:
  - one factor set per forward call: long_factor iff max(position_ids over the whole batch) + 1 >
    original_max_position_embeddings, else short_factor (`dynamic_rope_update`). cos and sin are
    multiplied by the same attention factor sqrt(1 + ln(s) / ln(original)), s = max / original,
    for both sets. In a padded batch, a short row switches to long factors when the LONGEST row
    crosses, so a row can generate differently in a batch than alone.
  - a forward call does not re-rotate keys already in the cache. Generation therefore drops the
    cache once (`Phi3ForCausalLM.prepare_inputs_for_generation`): at the first step where the
    padded sequence holds >= original + 1 tokens while the cache holds <= original, the whole
    sequence is run again without a cache, so every key is rotated with the long factors; from
    then on the cache grows normally. transformers does this for every Phi-3 config (it only
    asks whether original_max_position_embeddings exists), and so does `cache_is_stale` here.
    Calling the model step by step yourself with a cache built on short factors mixes the two
    sets, exactly as in transformers.

Axes: batch, seq, kv_seq (past + seq), hidden_size, num_heads (num_attention_heads), num_kv_heads
(num_key_value_heads), head_dim (hidden_size // num_heads), rope_dim (head_dim *
partial_rotary_factor), intermediate_size.

Backward pass (training, `minilm/grad.py`): each `*_backward` follows its forward, takes the
upstream gradient plus what the forward saw, and returns the input gradients (and the LoRA
adapters' gradients, named like the params). A layer's backward recomputes that layer's forward
from its saved input and walks back. PEFT's LoRA on the fused qkv_proj (or gate_up_proj) is one
A and one B: here, a LoraWeight on each of q_proj, k_proj, v_proj sharing that A, each with its
rows of B; the fused adapter's gradients are the sum of the A gradients and the B rows stacked.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import nn, ops
from ..activations import tap
from ..config import PretrainedConfig, check_positive
from ..errors import CheckpointError, ConfigError
from ..heads import ForCausalLM, ForSequenceClassification, ForTokenClassification
from ..modeling import BaseModel, prepare_inputs
from ..rope import apply_rope, apply_rope_backward, check_rope_scaling, rope_for_positions, rope_type

# ---------------------------------------------------------------------------------------------
# Config (transformers' Phi3Config names and defaults)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Phi3Config(PretrainedConfig):
    model_type = "phi3"

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096  # where longrope switches from short to long factors
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "longrope", "short_factor": [...], "long_factor": [...]}
    partial_rotary_factor: float = 1.0  # Phi-4-mini: 0.75
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 32000
    pad_token_id: int | None = 32000
    sliding_window: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.rope_scaling = _longrope_spelling(self.rope_scaling)
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
            "max_position_embeddings",
            "original_max_position_embeddings",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"Phi3Config: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads} (head_dim must be an integer)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"Phi3Config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(f"Phi3Config: partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]")
        if self.sliding_window is not None:
            check_positive(self, "sliding_window")
        if rope_type(self.rope_scaling) not in ("default", "longrope"):
            raise ConfigError(
                f"Phi3Config: rope_scaling type {rope_type(self.rope_scaling)!r} is not one Phi-3 "
                "supports (longrope, also spelled su)"
            )
        check_rope_scaling(self)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


def _longrope_spelling(scaling):
    """Phi-3's rope_scaling spellings -> {"rope_type": "longrope", ...} (or None for plain RoPE):
    {"type": "su"} (Phi-3 at release), {"type": "longrope"}, {"rope_type": "longrope"}, and
    "yarn", which transformers' Phi3Config also renames to longrope."""
    if not scaling:
        return None
    scaling = dict(scaling)
    kind = scaling.pop("type", None)
    kind = scaling.get("rope_type", kind)
    if kind in (None, "default"):
        return None
    scaling["rope_type"] = "longrope" if kind in ("su", "yarn", "longrope") else kind
    return scaling


# ---------------------------------------------------------------------------------------------
# Attention and MLP
# ---------------------------------------------------------------------------------------------


def attention(x, p, cfg, layer_idx, cos, sin, mask, cache, output_attentions):
    """Grouped-query attention with RoPE. x: (batch, seq, hidden_size) -> (batch, seq, hidden_size)"""
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = nn.split_heads(ops.linear(x, p.q_proj.weight), h, d)  # (batch, num_heads, seq, head_dim)
    k = nn.split_heads(ops.linear(x, p.k_proj.weight), kvh, d)  # (batch, num_kv_heads, seq, head_dim)
    v = nn.split_heads(ops.linear(x, p.v_proj.weight), kvh, d)  # (batch, num_kv_heads, seq, head_dim)
    q, k, v = tap(p, "queries", q), tap(p, "keys", k), tap(p, "values", v)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # the first rope_dim dimensions rotate
    q, k = tap(p, "queries_rope", q), tap(p, "keys_rope", k)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # (batch, num_kv_heads, kv_seq, head_dim)
    out, weights = ops.attention(q, k, v, mask, scale=d**-0.5, return_weights=output_attentions, p=p)
    out = tap(p, "attn_output_heads", out)  # (batch, num_heads, seq, head_dim): each head's output, before o_proj
    return ops.linear(nn.merge_heads(out), p.o_proj.weight), weights


def attention_backward(dout, x, p, cfg, cos, sin, mask):
    """Gradients of `attention` (no cache): recompute q, k, v, then walk back o_proj ->
    attention -> RoPE (partial: the last head_dim - rope_dim dimensions pass through) -> projections.
    dout, x: (batch, seq, hidden_size) -> dx (batch, seq, hidden_size), {adapter name: gradient}"""
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q0 = nn.split_heads(ops.linear(x, p.q_proj.weight), h, d)  # (batch, num_heads, seq, head_dim)
    k0 = nn.split_heads(ops.linear(x, p.k_proj.weight), kvh, d)  # (batch, num_kv_heads, seq, head_dim)
    v = nn.split_heads(ops.linear(x, p.v_proj.weight), kvh, d)
    q1, k1 = apply_rope(q0, cos, sin), apply_rope(k0, cos, sin)
    out, _ = ops.attention(q1, k1, v, mask, scale=d**-0.5)  # (batch, num_heads, seq, head_dim)
    # walk back
    grads = {}
    dmerged = ops.linear_backward(dout, nn.merge_heads(out), p.o_proj.weight, "o_proj", grads)  # (batch, seq, h * d)
    dq1, dk1, dv = ops.attention_backward(nn.split_heads(dmerged, h, d), q1, k1, v, mask, scale=d**-0.5)
    dq0, dk0 = apply_rope_backward(dq1, cos, sin), apply_rope_backward(dk1, cos, sin)
    dx = ops.linear_backward(nn.merge_heads(dq0), x, p.q_proj.weight, "q_proj", grads)
    dx += ops.linear_backward(nn.merge_heads(dk0), x, p.k_proj.weight, "k_proj", grads)
    dx += ops.linear_backward(nn.merge_heads(dv), x, p.v_proj.weight, "v_proj", grads)
    return dx, grads


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


# ---------------------------------------------------------------------------------------------
# Decoder layer and model
# ---------------------------------------------------------------------------------------------


def decoder_layer(x, p, cfg, layer_idx, cos, sin, mask, cache, output_attentions):
    """Pre-norm residual block: h = x + attn(norm(x)), then h + mlp(norm(h))."""
    normed = nn.rms_norm(x, p.input_layernorm.weight, cfg.rms_norm_eps)  # (batch, seq, hidden_size)
    attn_out, weights = attention(normed, p.self_attn, cfg, layer_idx, cos, sin, mask, cache, output_attentions)
    attn_out = tap(p.self_attn, "output", attn_out)  # (batch, seq, hidden_size)
    h = x + attn_out
    ffn_out = mlp(nn.rms_norm(h, p.post_attention_layernorm.weight, cfg.rms_norm_eps), p.mlp, cfg)
    ffn_out = tap(p.mlp, "output", ffn_out)  # (batch, seq, hidden_size)
    return h + ffn_out, weights


def decoder_layer_backward(dout, x, p, cfg, cos, sin, mask):
    """Gradients of `decoder_layer` (no cache): recompute the layer from its input x, then back
    through the MLP half and the attention half (each residual passes dout on).
    dout, x: (batch, seq, hidden_size) -> dx, {adapter name: gradient} (names under the layer)"""
    eps = cfg.rms_norm_eps
    normed = nn.rms_norm(x, p.input_layernorm.weight, eps)  # (batch, seq, hidden_size)
    h = x + attention(normed, p.self_attn, cfg, None, cos, sin, mask, None, False)[0]
    mlp_in = nn.rms_norm(h, p.post_attention_layernorm.weight, eps)
    dmlp_in, mlp_grads = mlp_backward(dout, mlp_in, p.mlp, cfg)
    dh = dout + nn.rms_norm_backward(dmlp_in, h, p.post_attention_layernorm.weight, eps)[0]
    dnormed, attn_grads = attention_backward(dh, normed, p.self_attn, cfg, cos, sin, mask)
    dx = dh + nn.rms_norm_backward(dnormed, x, p.input_layernorm.weight, eps)[0]
    grads = {f"mlp.{k}": g for k, g in mlp_grads.items()}
    grads.update({f"self_attn.{k}": g for k, g in attn_grads.items()})
    return dx, grads


def phi3_model(
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
):
    """The backbone: embeddings -> decoder layers -> final RMSNorm."""
    inputs = prepare_inputs(
        cfg, p.embed_tokens.weight, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, use_cache
    )
    x = inputs.embed(p.embed_tokens.weight)  # (batch, seq, hidden_size)
    x = tap(p.embed_tokens, "output", x)
    cos, sin = rope_for_positions(cfg, inputs.position_ids)  # (batch, seq, rope_dim); longrope: short or long set
    cos, sin = inputs.place(cos), inputs.place(sin)
    mask = inputs.mask(cfg.sliding_window)  # (batch or 1, 1, seq, past + seq)

    all_hidden, all_attentions = [], []
    for layer_idx, layer in enumerate(p.layers):
        all_hidden.append(x)
        x, weights = decoder_layer(x, layer, cfg, layer_idx, cos, sin, mask, inputs.cache, output_attentions)
        x = tap(layer, "output", x)  # the residual stream after this layer
        all_attentions.append(weights)
    x = nn.rms_norm(x, p.norm.weight, cfg.rms_norm_eps)  # (batch, seq, hidden_size)
    x = tap(p.norm, "output", x)
    all_hidden.append(x)
    return inputs.output(
        x,
        hidden_states=all_hidden if output_hidden_states else None,
        attentions=all_attentions if output_attentions else None,
    )


def phi3_backward(p, cfg, dout, hidden_states, input_ids, attention_mask=None, position_ids=None):
    """The backbone's backward: from dout = dL/d(last_hidden_state) back to the embeddings.
    hidden_states: the forward's (output_hidden_states=True, no cache): each layer's input, then
    the final normed output. Each layer is recomputed from its input.
    -> {adapter name: gradient} (names under the backbone), dembeds (batch, seq, hidden_size)"""
    inputs = prepare_inputs(cfg, p.embed_tokens.weight, input_ids, None, attention_mask, position_ids, None, False)
    cos, sin = map(inputs.place, rope_for_positions(cfg, inputs.position_ids))  # (batch, seq, rope_dim)
    mask = inputs.mask(cfg.sliding_window)  # (batch or 1, 1, seq, seq)
    last = len(p.layers) - 1
    x_out = decoder_layer(hidden_states[last], p.layers[last], cfg, last, cos, sin, mask, None, False)[0]
    d = nn.rms_norm_backward(dout, x_out, p.norm.weight, cfg.rms_norm_eps)[0]  # (batch, seq, hidden_size)
    grads = {}
    for i in reversed(range(len(p.layers))):
        d, layer_grads = decoder_layer_backward(d, hidden_states[i], p.layers[i], cfg, cos, sin, mask)
        grads.update({f"layers.{i}.{k}": g for k, g in layer_grads.items()})
    return grads, d


def phi3_shapes(cfg):
    """Every tensor of the backbone in the model's layout (q/k/v and gate/up split)."""
    h, d, m = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_rows, kv_rows = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    for i in range(cfg.num_hidden_layers):
        L = f"layers.{i}."
        shapes.update(
            {
                L + "input_layernorm.weight": (h,),
                L + "post_attention_layernorm.weight": (h,),
                L + "self_attn.q_proj.weight": (q_rows, h),
                L + "self_attn.k_proj.weight": (kv_rows, h),
                L + "self_attn.v_proj.weight": (kv_rows, h),
                L + "self_attn.o_proj.weight": (h, q_rows),
                L + "mlp.gate_proj.weight": (m, h),
                L + "mlp.up_proj.weight": (m, h),
                L + "mlp.down_proj.weight": (h, m),
            }
        )
    return shapes


def split_fused(tensors, cfg):
    """Checkpoint -> model: qkv_proj rows [q | k | v] -> q_proj, k_proj, v_proj; gate_up_proj
    rows [gate | up] -> gate_proj, up_proj."""
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = {}
    for name, value in tensors.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            _check_rows(name, value, q_rows + 2 * kv_rows, "num_heads * head_dim + 2 * num_kv_heads * head_dim")
            prefix = name[: -len("qkv_proj.weight")]
            out[prefix + "q_proj.weight"] = value[:q_rows]
            out[prefix + "k_proj.weight"] = value[q_rows : q_rows + kv_rows]
            out[prefix + "v_proj.weight"] = value[q_rows + kv_rows :]
        elif name.endswith("mlp.gate_up_proj.weight"):
            _check_rows(name, value, 2 * cfg.intermediate_size, "2 * intermediate_size")
            prefix = name[: -len("gate_up_proj.weight")]
            out[prefix + "gate_proj.weight"] = value[: cfg.intermediate_size]
            out[prefix + "up_proj.weight"] = value[cfg.intermediate_size :]
        else:
            out[name] = value
    return out


def _check_rows(name, value, rows, formula):
    if value.ndim != 2 or value.shape[0] != rows:
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(value.shape)}; the config gives {formula} = {rows} rows"
        )


def fuse_projections(tensors, cfg):
    """Model -> checkpoint: the inverse of split_fused (what save_pretrained writes)."""
    out = {}
    for name, value in tensors.items():
        if name.endswith("self_attn.q_proj.weight"):
            prefix = name[: -len("q_proj.weight")]
            out[prefix + "qkv_proj.weight"] = np.concatenate(
                [value, tensors[prefix + "k_proj.weight"], tensors[prefix + "v_proj.weight"]]
            )
        elif name.endswith("mlp.gate_proj.weight"):
            prefix = name[: -len("gate_proj.weight")]
            out[prefix + "gate_up_proj.weight"] = np.concatenate([value, tensors[prefix + "up_proj.weight"]])
        elif not name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")):
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face-style classes
# ---------------------------------------------------------------------------------------------


class Phi3Model(BaseModel):
    """The bare Phi-3 transformer: `model(input_ids).last_hidden_state`."""

    config_class = Phi3Config
    backbone_shapes = staticmethod(phi3_shapes)
    backbone_forward = staticmethod(phi3_model)
    backbone_backward = staticmethod(phi3_backward)
    to_model_layout = staticmethod(split_fused)  # checkpoint layout -> model layout, once at load
    to_checkpoint_layout = staticmethod(fuse_projections)  # and back, for save_pretrained


class Phi3ForCausalLM(ForCausalLM):
    """Causal LM (untied lm_head unless tie_word_embeddings, as in Phi-4-mini)."""

    config_class = Phi3Config
    base_model_class = Phi3Model

    def cache_is_stale(self, cache, total_length):
        """transformers' Phi3ForCausalLM.prepare_inputs_for_generation: drop the cache (and re-run
        everything, now with long factors) at the first step where the padded sequence reaches
        original + 1 tokens while the cache still holds <= original of them."""
        original = self.config.original_max_position_embeddings
        return total_length >= original + 1 and cache.get_seq_length() <= original


class Phi3ForSequenceClassification(ForSequenceClassification):
    config_class = Phi3Config
    base_model_class = Phi3Model


class Phi3ForTokenClassification(ForTokenClassification):
    config_class = Phi3Config
    base_model_class = Phi3Model

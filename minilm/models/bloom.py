"""BLOOM (BigScience, 2022): a decoder-only transformer with ALiBi instead of position embeddings.

Read top to bottom: config -> ALiBi (slopes, bias) -> attention (fused, per-head interleaved
QKV) -> MLP (tanh GELU) -> block -> model -> heads. (keras-hub-style API: `minilm/keras/bloom.py`.)

What BLOOM does differently from GPT-2:
  - no position embeddings: each head adds slope_h * (position of the key) to its scores (ALiBi,
    Press et al., 2022); key positions come from cumsum(attention_mask), so left padding shifts
    nothing;
  - a LayerNorm right after the word embeddings (word_embeddings_layernorm);
  - the fused query_key_value weight is interleaved per head: its rows are (n_head, 3, head_dim),
    i.e. [q_0 k_0 v_0 q_1 k_1 v_1 ...], not three contiguous blocks. The model keeps the tensor
    in that shape, fixed once at load; saving writes the (3 * hidden_size, hidden_size) layout back.

Axes: batch, seq, kv_seq (past + seq), hidden_size, num_heads (n_head), head_dim
(hidden_size // n_head). The MLP is always 4 * hidden_size wide.

Backward pass (training, `minilm/grad.py`): each `*_backward` follows its forward, takes the
upstream gradient plus what the forward saw, and returns the input gradients (and the LoRA
adapters' gradients, named like the params). A layer's backward recomputes that layer's forward
from its saved input and walks back. The ALiBi bias and the masks are constants (no gradient).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import nn, ops
from ..activations import tap
from ..config import PretrainedConfig, check_positive
from ..errors import CheckpointError, ConfigError
from ..heads import ForCausalLM, ForQuestionAnswering, ForSequenceClassification, ForTokenClassification
from ..modeling import BaseModel, prepare_inputs

# ---------------------------------------------------------------------------------------------
# Config (transformers' BloomConfig names and defaults)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BloomConfig(PretrainedConfig):
    model_type = "bloom"

    vocab_size: int = 250880
    hidden_size: int = 64  # Hub configs often spell it n_embed
    n_layer: int = 2  # also read as num_hidden_layers
    n_head: int = 8  # also read as num_attention_heads
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None
    apply_residual_connection_post_layernorm: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    pretraining_tp: int = 1  # tensor-parallel slicing of the output matmuls: same sums, inference ignores it
    slow_but_exact: bool = False
    tie_word_embeddings: bool = True

    @classmethod
    def _rename_legacy_keys(cls, d):
        """Hub BLOOM configs say n_embed (which wins over hidden_size, as in transformers), and
        some num_attention_heads / num_hidden_layers (transformers' aliases of n_head / n_layer)."""
        if d.get("n_embed") is not None:
            d["hidden_size"] = d.pop("n_embed")
        d.pop("n_embed", None)
        for alias, name in (("num_attention_heads", "n_head"), ("num_hidden_layers", "n_layer")):
            if alias in d:
                d.setdefault(name, d.pop(alias))
        return d

    def validate(self):
        super().validate()
        check_positive(self, "vocab_size", "hidden_size", "n_layer", "n_head")
        if self.hidden_size % self.n_head:
            raise ConfigError(
                f"BloomConfig: hidden_size={self.hidden_size} is not divisible by "
                f"n_head={self.n_head} (head_dim = hidden_size / n_head must be an integer)"
            )

    @property
    def num_hidden_layers(self):
        return self.n_layer

    @property
    def num_attention_heads(self):
        return self.n_head

    @property
    def head_dim(self):
        return self.hidden_size // self.n_head


# ---------------------------------------------------------------------------------------------
# ALiBi: a linear bias per head instead of position embeddings
# ---------------------------------------------------------------------------------------------


def alibi_slopes(num_heads):
    """The head slopes m_h of ALiBi, (num_heads,) float32.

    For n a power of two, a geometric series starting at and stepping by 2^(-8/n):
        n = 8:  1/2, 1/4, 1/8, ..., 1/256
    Otherwise the series of the closest smaller power of two c, then every other term of the
    series for 2c (its odd powers), interleaving the two:
        n = 6:  c = 4: 2^-2, 2^-4, 2^-6, 2^-8;  then 2^-1, 2^-3 (from 2c = 8)
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float32(2.0 ** (-8 / closest))
    slopes = _powers(base, np.arange(1, 1 + closest))
    if closest != num_heads:
        extra_base = np.float32(2.0 ** (-8 / (2 * closest)))
        remaining = min(closest, num_heads - closest)
        slopes = np.concatenate([slopes, _powers(extra_base, np.arange(1, 1 + 2 * remaining, 2))])
    return slopes


def _powers(base, exponents):
    """base ** exponents for a float32 base, rounded once to float32."""
    return (np.float64(base) ** exponents).astype(np.float32)


def alibi_bias(attention_mask, num_heads):
    """The ALiBi term added to the attention scores: slope_h * (position of key k).

    Positions count real tokens only, (cumsum(mask) - 1) * mask, so a left-padded row starts at
    0 like an unpadded one. The bias depends on the key alone: softmax is shift-invariant per
    query, so this equals the paper's -m_h * (q - k) on every visible key.

        mask  0 0 1 1 1   ->  positions  0 0 0 1 2   ->  head h:  m_h * [0 0 0 1 2]

    attention_mask: (batch, kv_seq) 0/1 -> (batch, num_heads, 1, kv_seq) float32
    """
    mask = np.asarray(attention_mask).astype(np.int64)
    positions = (np.cumsum(mask, axis=-1) - 1) * mask  # (batch, kv_seq)
    return alibi_slopes(num_heads)[None, :, None, None] * positions[:, None, None, :].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Attention and MLP
# ---------------------------------------------------------------------------------------------


def self_attention(x, p, cfg, layer_idx, alibi, mask, cache, output_attentions):
    """x: (batch, seq, hidden_size) -> (batch, seq, hidden_size), attention weights or None"""
    b, s, hidden = x.shape
    h, d = cfg.n_head, cfg.head_dim
    w = p.query_key_value.weight  # (num_heads, 3, head_dim, hidden_size): per head, q k v rows
    b_qkv = p.query_key_value.bias  # (num_heads, 3, head_dim)
    qkv = ops.linear(x, w.reshape(3 * hidden, hidden), b_qkv.reshape(3 * hidden))  # (batch, seq, 3 * hidden_size)
    qkv = qkv.reshape(b, s, h, 3, d).transpose(3, 0, 2, 1, 4)  # (3, batch, num_heads, seq, head_dim)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (batch, num_heads, seq, head_dim) each
    q, k, v = tap(p, "queries", q), tap(p, "keys", k), tap(p, "values", v)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # (batch, num_heads, kv_seq, head_dim)
    # scores = q k^T / sqrt(head_dim) + slope_h * key position, then the causal / padding mask
    out, weights = ops.attention(q, k, v, mask, scale=d**-0.5, bias=alibi, return_weights=output_attentions, p=p)
    out = tap(p, "attn_output_heads", out)  # (batch, num_heads, seq, head_dim): each head's output, before dense
    return ops.linear(nn.merge_heads(out), p.dense.weight, p.dense.bias), weights


def self_attention_backward(dout, x, p, cfg, alibi, mask):
    """Gradients of `self_attention` (no cache): recompute the fused projection, then walk back
    dense -> attention (ALiBi a constant) -> the per-head interleaved q, k, v rows -> query_key_value.
    dout, x: (batch, seq, hidden_size) -> dx (batch, seq, hidden_size), {adapter name: gradient}"""
    b, s, hidden = x.shape
    h, d = cfg.n_head, cfg.head_dim
    w = p.query_key_value.weight.reshape(3 * hidden, hidden)  # rows (num_heads, 3, head_dim) flattened
    qkv = ops.linear(x, w, p.query_key_value.bias.reshape(3 * hidden))  # (batch, seq, 3 * hidden_size)
    q, k, v = qkv.reshape(b, s, h, 3, d).transpose(3, 0, 2, 1, 4)  # (batch, num_heads, seq, head_dim) each
    out, _ = ops.attention(q, k, v, mask, scale=d**-0.5, bias=alibi)  # (batch, num_heads, seq, head_dim)
    # walk back
    grads = {}
    dmerged = ops.linear_backward(dout, nn.merge_heads(out), p.dense.weight, "dense", grads)  # (batch, seq, hidden)
    dq, dk, dv = ops.attention_backward(nn.split_heads(dmerged, h, d), q, k, v, mask, scale=d**-0.5, bias=alibi)
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 2, 0, 4).reshape(b, s, 3 * hidden)  # back to the fused rows
    dx = ops.linear_backward(dqkv, x, w, "query_key_value", grads)
    return dx, grads


def mlp(x, p):
    """dense_4h_to_h(gelu_tanh(dense_h_to_4h(x))). (..., hidden_size) -> (..., hidden_size)"""
    hidden = nn.gelu_tanh(ops.linear(x, p.dense_h_to_4h.weight, p.dense_h_to_4h.bias))  # (..., 4 * hidden_size)
    hidden = tap(p, "intermediate", hidden)
    return ops.linear(hidden, p.dense_4h_to_h.weight, p.dense_4h_to_h.bias)


def mlp_backward(dout, x, p):
    """Gradients of `mlp`: with a = dense_h_to_4h(x): da = dout W_4h_to_h, then gelu_tanh'(a),
    then dx = (that) W_h_to_4h. dout, x: (..., hidden_size) -> dx, {adapter name: gradient}"""
    a = ops.linear(x, p.dense_h_to_4h.weight, p.dense_h_to_4h.bias)  # (..., 4 * hidden_size)
    grads = {}
    dgelu = ops.linear_backward(dout, nn.gelu_tanh(a), p.dense_4h_to_h.weight, "dense_4h_to_h", grads)
    dx = ops.linear_backward(nn.gelu_tanh_backward(dgelu, a), x, p.dense_h_to_4h.weight, "dense_h_to_4h", grads)
    return dx, grads


# ---------------------------------------------------------------------------------------------
# Block and model
# ---------------------------------------------------------------------------------------------


def bloom_block(x, p, cfg, layer_idx, alibi, mask, cache, output_attentions):
    """Pre-LayerNorm residual block. The residual is x, or the normed x when
    apply_residual_connection_post_layernorm (no released checkpoint sets it)."""
    eps = cfg.layer_norm_epsilon
    normed = nn.layer_norm(x, p.input_layernorm.weight, p.input_layernorm.bias, eps)
    residual = normed if cfg.apply_residual_connection_post_layernorm else x
    attn_out, weights = self_attention(normed, p.self_attention, cfg, layer_idx, alibi, mask, cache, output_attentions)
    attn_out = tap(p.self_attention, "output", attn_out)  # (batch, seq, hidden_size)
    h = residual + attn_out
    normed = nn.layer_norm(h, p.post_attention_layernorm.weight, p.post_attention_layernorm.bias, eps)
    residual = normed if cfg.apply_residual_connection_post_layernorm else h
    ffn_out = tap(p.mlp, "output", mlp(normed, p.mlp))  # (batch, seq, hidden_size)
    return residual + ffn_out, weights


def bloom_block_backward(dout, x, p, cfg, alibi, mask):
    """Gradients of `bloom_block` (no cache): recompute the block from its input x, then back
    through the MLP half and the attention half; a residual passes its gradient to x (or to the
    normed x, with apply_residual_connection_post_layernorm).
    dout, x: (batch, seq, hidden_size) -> dx, {adapter name: gradient} (names under the block)"""
    eps, post = cfg.layer_norm_epsilon, cfg.apply_residual_connection_post_layernorm
    ln1, ln2 = p.input_layernorm, p.post_attention_layernorm
    normed = nn.layer_norm(x, ln1.weight, ln1.bias, eps)  # (batch, seq, hidden_size)
    h = (normed if post else x) + self_attention(normed, p.self_attention, cfg, None, alibi, mask, None, False)[0]
    normed2 = nn.layer_norm(h, ln2.weight, ln2.bias, eps)
    # out = residual2 + mlp(normed2)
    dnormed2, mlp_grads = mlp_backward(dout, normed2, p.mlp)
    dnormed2 = dnormed2 + dout if post else dnormed2
    dh = nn.layer_norm_backward(dnormed2, h, ln2.weight, eps)[0] + (0 if post else dout)
    # h = residual + attention(normed)
    dnormed, attn_grads = self_attention_backward(dh, normed, p.self_attention, cfg, alibi, mask)
    dnormed = dnormed + dh if post else dnormed
    dx = nn.layer_norm_backward(dnormed, x, ln1.weight, eps)[0] + (0 if post else dh)
    grads = {f"mlp.{k}": g for k, g in mlp_grads.items()}
    grads.update({f"self_attention.{k}": g for k, g in attn_grads.items()})
    return dx, grads


def bloom_model(
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
    """The backbone: embeddings -> LayerNorm -> blocks -> final LayerNorm. position_ids are
    accepted and ignored: ALiBi takes positions from the attention mask."""
    inputs = prepare_inputs(
        cfg,
        p.word_embeddings.weight,
        input_ids,
        inputs_embeds,
        attention_mask,
        position_ids,
        past_key_values,
        use_cache,
    )
    x = inputs.embed(p.word_embeddings.weight)  # (batch, seq, hidden_size)
    x = tap(p.word_embeddings, "output", x)
    x = nn.layer_norm(x, p.word_embeddings_layernorm.weight, p.word_embeddings_layernorm.bias, cfg.layer_norm_epsilon)
    x = tap(p.word_embeddings_layernorm, "output", x)
    keys = inputs.attention_mask
    if keys is None:
        keys = np.ones((inputs.batch, inputs.past + inputs.seq), np.int64)  # every key is a token
    alibi = inputs.place(alibi_bias(keys, cfg.n_head).astype(x.dtype))  # (batch, num_heads, 1, kv_seq)
    alibi = tap(p, "alibi", alibi)  # the bias every layer adds to its scores
    mask = inputs.mask()  # (batch or 1, 1, seq, kv_seq)

    all_hidden, all_attentions = [], []
    for layer_idx, layer in enumerate(p.h):
        all_hidden.append(x)
        x, weights = bloom_block(x, layer, cfg, layer_idx, alibi, mask, inputs.cache, output_attentions)
        x = tap(layer, "output", x)  # the residual stream after this block
        all_attentions.append(weights)
    x = nn.layer_norm(x, p.ln_f.weight, p.ln_f.bias, cfg.layer_norm_epsilon)  # (batch, seq, hidden_size)
    x = tap(p.ln_f, "output", x)
    all_hidden.append(x)
    return inputs.output(
        x,
        hidden_states=all_hidden if output_hidden_states else None,
        attentions=all_attentions if output_attentions else None,
    )


def bloom_backward(p, cfg, dout, hidden_states, input_ids, attention_mask=None, position_ids=None):
    """The backbone's backward: from dout = dL/d(last_hidden_state) back to the word embeddings.
    hidden_states: the forward's (output_hidden_states=True, no cache): each block's input (the
    first one after the embedding LayerNorm), then the final normed output.
    -> {adapter name: gradient} (names under the backbone), dembeds (batch, seq, hidden_size):
       the gradient at the word embeddings, before their LayerNorm"""
    inputs = prepare_inputs(cfg, p.word_embeddings.weight, input_ids, None, attention_mask, position_ids, None, False)
    keys = inputs.attention_mask
    if keys is None:
        keys = np.ones((inputs.batch, inputs.seq), np.int64)
    alibi = inputs.place(alibi_bias(keys, cfg.n_head).astype(hidden_states[0].dtype))  # (batch, num_heads, 1, seq)
    mask = inputs.mask()  # (batch or 1, 1, seq, seq)
    eps, last = cfg.layer_norm_epsilon, len(p.h) - 1
    x_out = bloom_block(hidden_states[last], p.h[last], cfg, last, alibi, mask, None, False)[0]
    d = nn.layer_norm_backward(dout, x_out, p.ln_f.weight, eps)[0]  # (batch, seq, hidden_size)
    grads = {}
    for i in reversed(range(len(p.h))):
        d, block_grads = bloom_block_backward(d, hidden_states[i], p.h[i], cfg, alibi, mask)
        grads.update({f"h.{i}.{k}": g for k, g in block_grads.items()})
    embeds = inputs.embed(p.word_embeddings.weight)  # (batch, seq, hidden_size)
    d = nn.layer_norm_backward(d, embeds, p.word_embeddings_layernorm.weight, eps)[0]
    return grads, d


def bloom_shapes(cfg):
    """Every tensor of the backbone, named as in Hugging Face checkpoints; query_key_value in
    the model's (num_heads, 3, head_dim, ...) view."""
    hidden, h, d = cfg.hidden_size, cfg.n_head, cfg.head_dim
    shapes = {
        "word_embeddings.weight": (cfg.vocab_size, hidden),
        "word_embeddings_layernorm.weight": (hidden,),
        "word_embeddings_layernorm.bias": (hidden,),
        "ln_f.weight": (hidden,),
        "ln_f.bias": (hidden,),
    }
    for i in range(cfg.n_layer):
        L = f"h.{i}."
        shapes.update(
            {
                L + "input_layernorm.weight": (hidden,),
                L + "input_layernorm.bias": (hidden,),
                L + "self_attention.query_key_value.weight": (h, 3, d, hidden),
                L + "self_attention.query_key_value.bias": (h, 3, d),
                L + "self_attention.dense.weight": (hidden, hidden),
                L + "self_attention.dense.bias": (hidden,),
                L + "post_attention_layernorm.weight": (hidden,),
                L + "post_attention_layernorm.bias": (hidden,),
                L + "mlp.dense_h_to_4h.weight": (4 * hidden, hidden),
                L + "mlp.dense_h_to_4h.bias": (4 * hidden,),
                L + "mlp.dense_4h_to_h.weight": (hidden, 4 * hidden),
                L + "mlp.dense_4h_to_h.bias": (hidden,),
            }
        )
    return shapes


def view_qkv_per_head(tensors, cfg):
    """Checkpoint -> model: query_key_value (3 * hidden_size, ...) viewed as (n_head, 3, head_dim, ...)."""
    out = dict(tensors)
    for name, value in tensors.items():
        if name.endswith(("self_attention.query_key_value.weight", "self_attention.query_key_value.bias")):
            if value.ndim == (4 if name.endswith("weight") else 3):
                continue  # already in the model's view (a state_dict passed back in)
            if value.shape[0] != 3 * cfg.hidden_size:
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(value.shape)}; BLOOM's fused QKV needs "
                    f"{3 * cfg.hidden_size} = 3 * hidden_size rows"
                )
            out[name] = value.reshape(cfg.n_head, 3, cfg.head_dim, *value.shape[1:])
    return out


def fuse_qkv_rows(tensors, cfg):
    """Model -> checkpoint: the (n_head, 3, head_dim, ...) view back to (3 * hidden_size, ...)."""
    return {
        name: value.reshape(3 * cfg.hidden_size, *value.shape[3:]) if ".query_key_value." in name else value
        for name, value in tensors.items()
    }


# ---------------------------------------------------------------------------------------------
# Hugging Face-style classes (every BLOOM head keeps the backbone under `transformer.`)
# ---------------------------------------------------------------------------------------------


class BloomModel(BaseModel):
    """The bare BLOOM transformer: `model(input_ids).last_hidden_state`."""

    config_class = BloomConfig
    base_model_prefix = "transformer"
    embedding_name = "word_embeddings.weight"
    backbone_shapes = staticmethod(bloom_shapes)
    backbone_forward = staticmethod(bloom_model)
    backbone_backward = staticmethod(bloom_backward)
    to_model_layout = staticmethod(view_qkv_per_head)  # checkpoint layout -> model layout, once at load
    to_checkpoint_layout = staticmethod(fuse_qkv_rows)  # and back, for save_pretrained


class BloomForCausalLM(ForCausalLM):
    """Causal LM with the LM head tied to word_embeddings."""

    config_class = BloomConfig
    base_model_class = BloomModel
    base_model_prefix = "transformer"


class BloomForSequenceClassification(ForSequenceClassification):
    """score.weight (no bias), read at the last non-pad token."""

    config_class = BloomConfig
    base_model_class = BloomModel
    base_model_prefix = "transformer"


class BloomForTokenClassification(ForTokenClassification):
    """classifier.weight + classifier.bias (not `score` as in transformers' generic head)."""

    config_class = BloomConfig
    base_model_class = BloomModel
    base_model_prefix = "transformer"
    classifier_name = "classifier"


class BloomForQuestionAnswering(ForQuestionAnswering):
    """qa_outputs.weight + qa_outputs.bias."""

    config_class = BloomConfig
    base_model_class = BloomModel
    base_model_prefix = "transformer"

"""keras-hub's `Backbone.enable_lora(rank, target_layer_names=None)` on minilm's backbones.

What keras-hub 0.32 does (keras_hub/src/models/backbone.py, keras 3.15's EinsumDense.enable_lora):

    every layer of the backbone is set trainable=False (every weight frozen), then each layer whose
    name is in target_layer_names (default `default_lora_layer_names()`: "query_dense",
    "value_dense", "query", "value") is set trainable=True again and gets, for its kernel K,

        lora_kernel_a   K.shape[:-1] + (rank,)   he_uniform (limit sqrt(6 / fan_in)), float32
        lora_kernel_b   (rank, K.shape[-1])      zeros
        y = einsum(x, K) + (lora_alpha / rank) * einsum(x, lora_kernel_a) @ lora_kernel_b,  lora_alpha = rank

    K itself is frozen; the layer's bias (BLOOM's query_dense / value_dense have one) stays trainable.

For a query kernel of shape (hidden, num_heads, head_dim) ("btm,mnh->btnh") or (num_heads, hidden,
head_dim) (Gemma's "btd,ndh->btnh"), lora_kernel_a holds one (hidden, rank) matrix per head and
lora_kernel_b one (rank, head_dim) matrix that every head shares: minilm's `LoraWeight` with
groups = num_heads (num_kv_heads for key and value). An output kernel (num_heads, head_dim, hidden)
("btnh,nhd->btd") sums over heads, so its LoRA is a plain one (groups = 1) over heads * head_dim inputs.

minilm keeps BLOOM's query, key and value in one fused (num_heads, 3, head_dim, hidden) weight. Its
query and value adapters become one LoraWeight over the fused weight with groups = 3 * num_heads (one
per head and slot) and rank 2 * rank: B = [B_query | B_value] and, per head, A = [A_query; 0] on the
query rows, [0; A_value] on the value rows, zeros on the key rows. The product is exactly keras';
`lora_masks` marks the blocks that must stay zero, and training multiplies their gradients by zero.

`trainable_weights` gives keras' weights in keras' layout and under keras' paths (views of minilm's
arrays: `assign` writes through).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError
from ..lora import LoraWeight
from ..peft import LoraConfig, lora_weights, node_at

DEFAULT_LORA_LAYER_NAMES = ["query_dense", "value_dense", "query", "value"]  # keras-hub's Backbone


class Variable:
    """One keras weight as minilm holds it: `path` (keras' "transformer_layer_0/self_attention/query/
    lora_kernel_a"), `shape`, `numpy()` (a view in keras' layout), `assign(value)` (writes through)."""

    def __init__(self, path, view, trainable=True):
        self.path, self.view, self.trainable = path, view, trainable

    @property
    def name(self):
        return self.path.rsplit("/", 1)[-1]

    @property
    def shape(self):
        return tuple(self.view.shape)

    def numpy(self):
        return self.view

    def assign(self, value):
        value = np.asarray(value, dtype=np.float32)
        if value.shape != self.shape:
            raise ConfigError(f"{self.path}: cannot assign shape {value.shape} to a weight of shape {self.shape}")
        np.copyto(self.view, value)

    def __repr__(self):
        return f"<Variable path={self.path}, shape={self.shape}>"


def he_uniform(rng, shape):
    """keras' HeUniform: U(-limit, limit), limit = sqrt(6 / fan_in), fan_in as keras' compute_fans
    (2-D: shape[0]; more axes: shape[-2] * prod(shape[:-2]))."""
    fan_in = shape[0] if len(shape) == 2 else shape[-2] * math.prod(shape[:-2])
    limit = math.sqrt(6.0 / fan_in)
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def enable_lora(backbone, spec, rank, target_layer_names=None, seed=0):
    """keras-hub's Backbone.enable_lora on `backbone.model`, with the family's `spec` (`KerasLoraSpec`)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"enable_lora: rank must be a positive integer, got {rank!r}")
    model = backbone.model
    if getattr(model, "lora_config", None) is not None:
        raise ConfigError("lora is already enabled. This can only be done once per layer.")  # keras' message
    names = DEFAULT_LORA_LAYER_NAMES if target_layer_names is None else list(target_layer_names)
    unknown = [n for n in names if n not in spec.layers and n not in DEFAULT_LORA_LAYER_NAMES]
    if unknown:
        raise ConfigError(
            f"enable_lora: minilm's {spec.family} backbone adapts the attention layers {sorted(spec.layers)}; "
            f"{unknown} are not implemented"
        )
    chosen = [n for n in spec.layers if n in names]  # a default name this family lacks is skipped, as keras-hub
    rng = np.random.default_rng(seed)
    cfg = model.config
    variables, masks, modules = [], {}, {}
    for i in range(cfg.num_hidden_layers):
        attention = node_at(model.params, spec.attention_path.format(i=i))
        layer_vars = {}
        if spec.fused_qkv:
            layer_vars = _bloom_qkv(attention, chosen, rank, rng, cfg, masks, f"{spec.attention_path.format(i=i)}")
        else:
            for name in chosen:
                module, kind = spec.layers[name]
                layer_vars[name] = _einsum_lora(attention, module, kind, spec.kernel_layout, rank, rng, cfg)
        for name in chosen:
            prefix = spec.keras_path.format(i=i, name=name)
            for weight_name, view in layer_vars[name]:
                variables.append(Variable(f"{prefix}/{weight_name}", view))
        for name in chosen:
            module = spec.layers[name][0]
            path = f"{spec.attention_path.format(i=i)}.{module}"
            modules[f"{path}"] = [(path, 0, 0)]
    model.lora_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=chosen)
    model.lora_modules = modules
    model.lora_masks = masks
    model.lora_style = "keras"
    backbone._lora_variables = variables
    return variables


def _einsum_lora(attention, module, kind, layout, rank, rng, cfg):
    """Wrap attention.<module>.weight in a LoraWeight as keras' EinsumDense.enable_lora on its kernel.
    Returns [(keras weight name, view in keras' layout)]."""
    node = attention[module]
    base = node["weight"]  # (out_features, in_features)
    out_features, in_features = int(np.prod(base.shape[:-1])), base.shape[-1]
    if kind == "output":  # kernel (num_heads, head_dim, hidden): lora_kernel_a (num_heads, head_dim, rank)
        heads = cfg.num_attention_heads
        a_keras = he_uniform(rng, (heads, in_features // heads, rank))
        A = np.ascontiguousarray(a_keras.reshape(in_features, rank).T)[None]  # (1, rank, heads * head_dim)
        B = np.zeros((out_features, rank), np.float32)  # (hidden, rank) = lora_kernel_b.T
        weight = LoraWeight(base, A, B, 1.0)
        a_view = weight.lora_A[0].T.reshape(heads, in_features // heads, rank)
    else:  # a per-head input kernel: (hidden, heads, head_dim) or Gemma's (heads, hidden, head_dim)
        groups = cfg.num_attention_heads if kind == "query" else cfg.num_key_value_heads
        shape = (in_features, groups, rank) if layout == "mnh" else (groups, in_features, rank)
        a_keras = he_uniform(rng, shape)
        A = a_keras.transpose(1, 2, 0) if layout == "mnh" else a_keras.transpose(0, 2, 1)  # (groups, rank, in)
        weight = LoraWeight(base, np.ascontiguousarray(A), np.zeros((out_features // groups, rank), np.float32), 1.0)
        a_view = weight.lora_A.transpose(2, 0, 1) if layout == "mnh" else weight.lora_A.transpose(0, 2, 1)
    node["weight"] = weight
    views = [("lora_kernel_a", a_view), ("lora_kernel_b", weight.lora_B.T)]
    if "bias" in node:
        views.insert(0, ("bias", node["bias"]))
    return views


def _bloom_qkv(attention, chosen, rank, rng, cfg, masks, path):
    """BLOOM: keras' query_dense / value_dense LoRA inside minilm's fused (heads, 3, head_dim, hidden)
    weight (see the module docstring). Returns {keras layer name: [(weight name, view)]}."""
    node = attention["query_key_value"]
    base, bias = node["weight"], node["bias"]  # (heads, 3, head_dim, hidden), (heads, 3, head_dim)
    heads, _, head_dim, hidden = base.shape
    slots = {"query_dense": 0, "value_dense": 2}
    A = np.zeros((heads, 3, 2 * rank, hidden), np.float32)  # groups = (head, slot), rank 2r: [query | value]
    B = np.zeros((head_dim, 2 * rank), np.float32)  # [B_query | B_value]
    mask_A, mask_B = np.zeros(A.shape, bool), np.zeros(B.shape, bool)
    for name in chosen:
        slot, half = slots[name], slice(0, rank) if name == "query_dense" else slice(rank, 2 * rank)
        a_keras = he_uniform(rng, (hidden, heads, rank))  # lora_kernel_a (hidden, heads, rank)
        A[:, slot, half, :] = a_keras.transpose(1, 2, 0)
        mask_A[:, slot, half, :] = True
        mask_B[:, half] = True
    weight = LoraWeight(base, A.reshape(heads * 3, 2 * rank, hidden), B, 1.0)
    node["weight"] = weight
    masks[f"{path}.query_key_value.lora_A"] = mask_A.reshape(weight.lora_A.shape)
    masks[f"{path}.query_key_value.lora_B"] = mask_B
    A4 = weight.lora_A.reshape(heads, 3, 2 * rank, hidden)  # a view of the adapter's A
    found = {}
    for name in chosen:
        slot, half = slots[name], slice(0, rank) if name == "query_dense" else slice(rank, 2 * rank)
        found[name] = [
            ("bias", bias[:, slot, :]),  # (heads, head_dim): keras' bias_axes "nh"
            ("lora_kernel_a", A4[:, slot, half, :].transpose(2, 0, 1)),  # (hidden, heads, rank)
            ("lora_kernel_b", weight.lora_B[:, half].T),  # (rank, head_dim)
        ]
    return found


class KerasLoraSpec:
    """Where a family's keras-hub attention layers live, in keras and in minilm.

    layers:         {keras layer name: (minilm module under the attention node, "query" | "key" |
                    "value" | "output")}
    keras_path:     keras' weight path of a layer, e.g. "decoder_block_{i}/attention/{name}"
    attention_path: the attention node in minilm's weight tree, e.g. "layers.{i}.self_attn"
    kernel_layout:  "mnh" (kernel (hidden, heads, head_dim)) or "nmh" (Gemma: (heads, hidden, head_dim))
    """

    def __init__(self, family, layers, keras_path, attention_path, kernel_layout="mnh", fused_qkv=False):
        self.family, self.layers, self.keras_path = family, layers, keras_path
        self.attention_path, self.kernel_layout, self.fused_qkv = attention_path, kernel_layout, fused_qkv


def trainable_weights(backbone):
    """keras' trainable_weights: after enable_lora, the LoRA kernels (and trainable biases) in keras'
    order and layout; before, every weight (under minilm's tensor names: keras' paths differ)."""
    variables = getattr(backbone, "_lora_variables", None)
    if variables is not None:
        return list(variables)
    return [Variable(name, value) for name, value in backbone_state(backbone).items()]


def backbone_state(backbone):
    state = dict(backbone.model.state_dict())
    if backbone.extra_weights is not None:
        state.update(backbone.extra_weights.state_dict())
    return state


def has_lora(backbone):
    return bool(lora_weights(backbone.model))

"""Gemma 3's eyes: the SigLIP vision tower and the multimodal projector.

An image becomes `mm_tokens_per_image` soft tokens in the text model's embedding space:

    pixel_values (batch, num_channels, image_size, image_size), normalised to [-1, 1]
      -> patch embedding: cut into patch_size x patch_size squares, one linear map per square
      -> + learned position embedding (one vector per patch, no RoPE)
      -> num_hidden_layers x SigLIP encoder layer (pre-LayerNorm ViT block: bidirectional
         multi-head attention, GELU-tanh MLP, both with biases)
      -> post-LayerNorm                                   (batch, num_patches, vision_hidden)
      -> projector: average-pool the patch grid down to sqrt(mm_tokens_per_image) per side,
         Gemma's RMSNorm (`mm_soft_emb_norm`, weights offset from one), then x @ W into the
         text hidden size                             (batch, mm_tokens_per_image, text_hidden)

Released Gemma 3 (4B, 12B, 27B): image_size 896, patch_size 14, so a 64 x 64 grid of 4096 patches,
pooled 4 x 4 into 16 x 16 = 256 soft tokens; vision hidden 1152, 27 layers, 16 heads.

Read top to bottom: configs (SiglipVisionConfig, Gemma3Config) -> patch embedding -> position
embedding -> encoder layer (attention, MLP) -> vision tower -> projector -> tensor names.
The full model that places the soft tokens in the text is `minilm/models/gemma3_multimodal.py`.

Axes: batch, num_channels, image_size, patch_size, grid (= image_size // patch_size),
num_patches (= grid ** 2), vision_hidden (vision_config.hidden_size), num_heads, head_dim
(= vision_hidden // num_heads), intermediate_size, text_hidden (text_config.hidden_size).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import nn, ops
from ..config import PretrainedConfig, check_positive
from ..errors import ConfigError, InputError
from .gemma3 import Gemma3TextConfig, gemma_rms_norm

# ---------------------------------------------------------------------------------------------
# Configs (transformers 5.23's SiglipVisionConfig and Gemma3Config names)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SiglipVisionConfig(PretrainedConfig):
    """The vision tower's config.json section (`vision_config`). Defaults are transformers'
    SiglipVisionConfig, except `vision_use_head` (False: Gemma 3 never uses the pooling head)."""

    model_type = "siglip_vision_model"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = False

    def validate(self):
        super().validate()
        check_positive(
            self,
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "image_size",
            "patch_size",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"SiglipVisionConfig.hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"SiglipVisionConfig.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        nn.activation(self.hidden_act)  # ConfigError for an unknown name
        if self.vision_use_head:
            raise ConfigError(
                "SiglipVisionConfig.vision_use_head=True (SigLIP's attention-pooling head) is not implemented: "
                "Gemma 3 reads the patch features, never the pooled head"
            )

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self):
        """grid: patches along one side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.patches_per_side**2


@dataclasses.dataclass
class Gemma3Config(PretrainedConfig):
    """The multimodal Gemma 3 config.json: a text config, a vision config and the image tokens.

    The Hub spells the special tokens two ways (transformers maps one onto the other):
    `image_token_index` / `image_token_id`, `boi_token_index` / `boi_token_id`,
    `eoi_token_index` / `eoi_token_id`; both are read, the `*_index` spelling is written.

    boi_token_index    <start_of_image>   the placeholder a prompt holds, and the soft tokens' left fence
    image_token_index  <image_soft_token> repeated mm_tokens_per_image times: replaced by the soft tokens
    eoi_token_index    <end_of_image>     the soft tokens' right fence
    """

    model_type = "gemma3"

    text_config: dict | None = None
    vision_config: dict | None = None
    mm_tokens_per_image: int = 256
    boi_token_index: int = 255_999
    eoi_token_index: int = 256_000
    image_token_index: int = 262_144
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    ALIASES = {
        "image_token_id": "image_token_index",
        "boi_token_id": "boi_token_index",
        "eoi_token_id": "eoi_token_index",
    }

    def __post_init__(self):
        self.text_config = _sub_config(Gemma3TextConfig, self.text_config, "text_config")
        self.vision_config = _sub_config(SiglipVisionConfig, self.vision_config, "vision_config")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # generation reads them here
            if getattr(self, name) is None:
                setattr(self, name, getattr(self.text_config, name))
        super().__post_init__()

    def validate(self):
        super().validate()
        check_positive(self, "mm_tokens_per_image")
        for name in ("boi_token_index", "eoi_token_index", "image_token_index"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"Gemma3Config.{name} must be a token id (an integer >= 0), got {value!r}")
        side = math.isqrt(self.mm_tokens_per_image)
        if side * side != self.mm_tokens_per_image:
            raise ConfigError(
                f"Gemma3Config.mm_tokens_per_image={self.mm_tokens_per_image} is not a square number: the "
                "projector pools the patch grid to a square of soft tokens"
            )
        grid = self.vision_config.patches_per_side
        if grid % side:
            raise ConfigError(
                f"Gemma3Config.mm_tokens_per_image={self.mm_tokens_per_image} needs {side} soft tokens per side, "
                f"which does not divide the {grid} x {grid} patch grid (image_size / patch_size)"
            )

    @classmethod
    def _rename_legacy_keys(cls, d):
        for alias, name in cls.ALIASES.items():
            if alias in d:
                value = d.pop(alias)
                if name in d and d[name] != value:
                    raise ConfigError(f"config.json sets {name}={d[name]!r} and {alias}={value!r}: which one?")
                d[name] = value
        return d

    def to_dict(self):
        d = super().to_dict()
        d["text_config"] = self.text_config.to_dict()
        d["vision_config"] = self.vision_config.to_dict()
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # they live in text_config
            if d[name] == getattr(self.text_config, name):
                del d[name]
        return d

    @property
    def pool_kernel(self):
        """Patches per soft token along one side: grid // sqrt(mm_tokens_per_image) (4 on Gemma 3)."""
        return self.vision_config.patches_per_side // math.isqrt(self.mm_tokens_per_image)


def _sub_config(cls, value, name):
    """A sub-config from None (defaults), a config.json dict, or a config object as it is."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        d = {k: v for k, v in value.items() if k != "model_type"}
        return cls.from_dict(d)
    raise ConfigError(f"Gemma3Config.{name} must be an object or a {cls.__name__}, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Patch embedding: a convolution with stride = kernel = patch_size, written as reshape + matmul
# ---------------------------------------------------------------------------------------------


def check_pixel_values(pixel_values, vcfg):
    """(batch, num_channels, image_size, image_size) floats, or an InputError naming what is off."""
    pixel_values = np.asarray(pixel_values)
    expected = (vcfg.num_channels, vcfg.image_size, vcfg.image_size)
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
        raise InputError(
            f"pixel_values must have shape (batch, num_channels, image_size, image_size) = (batch, {expected[0]}, "
            f"{expected[1]}, {expected[2]}); got {pixel_values.shape} (resize and normalise images with "
            "minilm.io.image_processor first)"
        )
    if pixel_values.shape[0] == 0:
        raise InputError("pixel_values holds no image (batch = 0)")
    if pixel_values.dtype.kind not in "fV":
        raise InputError(f"pixel_values must be floating point (normalised pixels); got dtype {pixel_values.dtype}")
    return pixel_values


def patchify(pixel_values, patch_size):
    """Cut images into non-overlapping squares and flatten each, channels first inside a patch.

    pixel_values (batch, C, H, W) with H = W = grid * patch_size
    -> (batch, grid * grid, C * patch_size * patch_size), patches in reading order (row by row)

        image, grid = 2:   +----+----+     patch 0 = top-left, 1 = top-right,
                           | 0  | 1  |     2 = bottom-left, 3 = bottom-right
                           +----+----+
                           | 2  | 3  |
                           +----+----+
    """
    b, c, h, w = pixel_values.shape
    gh, gw = h // patch_size, w // patch_size
    x = pixel_values.reshape(b, c, gh, patch_size, gw, patch_size)  # (batch, C, grid_y, p, grid_x, p)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # (batch, grid_y, grid_x, C, p, p)
    return x.reshape(b, gh * gw, c * patch_size * patch_size)  # (batch, num_patches, C * p * p)


def patch_embedding(pixel_values, p, vcfg):
    """SigLIP's Conv2d(num_channels -> vision_hidden, kernel = stride = patch_size, no padding).

    With stride equal to the kernel the windows do not overlap, so the convolution is one matrix
    product per patch: the conv weight (vision_hidden, C, p, p) read as a matrix (vision_hidden,
    C * p * p) times the flattened patch (C * p * p), plus the bias. `patchify` flattens each patch
    in the same (C, p, p) order as the weight, which is what makes the two agree.

    p: `embeddings.patch_embedding` (weight (vision_hidden, C, p, p), bias (vision_hidden,))
    pixel_values (batch, C, image_size, image_size) -> (batch, num_patches, vision_hidden)
    """
    patches = patchify(pixel_values.astype(p.weight.dtype, copy=False), vcfg.patch_size)  # (batch, num_patches, C*p*p)
    weight = p.weight.reshape(p.weight.shape[0], -1)  # (vision_hidden, C * p * p)
    return ops.linear(patches, weight, p.bias)  # (batch, num_patches, vision_hidden)


def position_embedding(x, p):
    """Learned absolute positions: one vector per patch index, added (no RoPE in the vision tower).

    p: `embeddings.position_embedding` (weight (num_patches, vision_hidden))
    x (batch, num_patches, vision_hidden) -> same shape"""
    return x + p.weight[None]  # (batch, num_patches, vision_hidden)


# ---------------------------------------------------------------------------------------------
# Encoder layer: pre-LayerNorm ViT block (bidirectional attention, GELU-tanh MLP, biases)
# ---------------------------------------------------------------------------------------------


def vision_attention(x, p, vcfg, output_attentions=False):
    """Multi-head self-attention where every patch sees every patch (no mask, no positions:
    those were added once, at the input). Scale head_dim ** -0.5.

    p: `self_attn` (q_proj, k_proj, v_proj, out_proj, each with weight and bias)
    x (batch, num_patches, vision_hidden) -> (batch, num_patches, vision_hidden), weights or None"""
    h, d = vcfg.num_attention_heads, vcfg.head_dim
    q = nn.split_heads(ops.linear(x, p.q_proj.weight, p.q_proj.bias), h, d)  # (batch, num_heads, num_patches, head_dim)
    k = nn.split_heads(ops.linear(x, p.k_proj.weight, p.k_proj.bias), h, d)
    v = nn.split_heads(ops.linear(x, p.v_proj.weight, p.v_proj.bias), h, d)
    out, weights = ops.attention(q, k, v, None, scale=d**-0.5, return_weights=output_attentions)
    return ops.linear(nn.merge_heads(out), p.out_proj.weight, p.out_proj.bias), weights


def vision_mlp(x, p, vcfg):
    """fc2(act(fc1(x))), act = hidden_act (GELU, tanh approximation). (..., vision_hidden) -> same"""
    act = nn.activation(vcfg.hidden_act)
    return ops.linear(act(ops.linear(x, p.fc1.weight, p.fc1.bias)), p.fc2.weight, p.fc2.bias)


def siglip_encoder_layer(x, p, vcfg, output_attentions=False):
    """h = x + attn(LN1(x)); out = h + mlp(LN2(h)). p: `encoder.layers[i]`"""
    eps = vcfg.layer_norm_eps
    attn_out, weights = vision_attention(
        nn.layer_norm(x, p.layer_norm1.weight, p.layer_norm1.bias, eps), p.self_attn, vcfg, output_attentions
    )
    h = x + attn_out  # (batch, num_patches, vision_hidden)
    return h + vision_mlp(nn.layer_norm(h, p.layer_norm2.weight, p.layer_norm2.bias, eps), p.mlp, vcfg), weights


# ---------------------------------------------------------------------------------------------
# The vision tower
# ---------------------------------------------------------------------------------------------


def vision_tower(pixel_values, p, vcfg, output_hidden_states=False, output_attentions=False):
    """SigLIP's vision transformer without its pooling head (transformers' SiglipVisionModel,
    vision_use_head=False): patches -> positions -> encoder layers -> post-LayerNorm.

    p: `vision_tower.vision_model` (embeddings, encoder.layers, post_layernorm)
    pixel_values (batch, num_channels, image_size, image_size) -> (batch, num_patches, vision_hidden)

    With output_hidden_states / output_attentions, returns (features, hidden_states, attentions)
    instead: the input of every layer plus the last layer's output (before the post-LayerNorm),
    and each layer's attention weights (batch, num_heads, num_patches, num_patches)."""
    pixel_values = check_pixel_values(pixel_values, vcfg)
    x = patch_embedding(ops.like(pixel_values, p.post_layernorm.weight), p.embeddings.patch_embedding, vcfg)
    x = position_embedding(x, p.embeddings.position_embedding)  # (batch, num_patches, vision_hidden)
    hidden_states, attentions = [], []
    for layer in p.encoder.layers:
        hidden_states.append(x)
        x, weights = siglip_encoder_layer(x, layer, vcfg, output_attentions)
        attentions.append(weights)
    hidden_states.append(x)
    features = nn.layer_norm(x, p.post_layernorm.weight, p.post_layernorm.bias, vcfg.layer_norm_eps)
    if output_hidden_states or output_attentions:
        return (
            features,
            (tuple(hidden_states) if output_hidden_states else None),
            (tuple(attentions) if output_attentions else None),
        )
    return features  # (batch, num_patches, vision_hidden)


# ---------------------------------------------------------------------------------------------
# Multimodal projector: pool the patch grid, normalise, project into the text model
# ---------------------------------------------------------------------------------------------


def average_pool(features, cfg):
    """Average each pool_kernel x pool_kernel square of the patch grid into one soft token
    (torch's AvgPool2d with kernel = stride = pool_kernel).

        grid 4, mm_tokens_per_image 4 (2 per side), kernel 2:
            patches  0  1 |  2  3        soft token 0 = mean of patches 0 1 4 5
                     4  5 |  6  7                   1 = mean of 2 3 6 7
                     -----+------                   2 = mean of 8 9 12 13
                     8  9 | 10 11                   3 = mean of 10 11 14 15
                    12 13 | 14 15

    features (batch, num_patches, vision_hidden) -> (batch, mm_tokens_per_image, vision_hidden)"""
    b, _, d = features.shape
    grid, k = cfg.vision_config.patches_per_side, cfg.pool_kernel
    side = grid // k  # soft tokens per side
    squares = features.reshape(b, side, k, side, k, d)  # (batch, row, k, column, k, vision_hidden)
    pooled = squares.mean(axis=(2, 4), dtype=np.float32).astype(features.dtype, copy=False)  # (batch, side, side, d)
    return pooled.reshape(b, side * side, d)  # (batch, mm_tokens_per_image, vision_hidden)


def multimodal_projector(features, p, cfg):
    """Gemma3MultiModalProjector: pool -> Gemma RMSNorm (1 + w, vision layer_norm_eps) -> x @ W.

    `mm_input_projection_weight` is stored (vision_hidden, text_hidden) and used as x @ W (not
    as a torch Linear's (out, in) weight).

    p: `multi_modal_projector` (mm_soft_emb_norm.weight, mm_input_projection_weight)
    features (batch, num_patches, vision_hidden) -> (batch, mm_tokens_per_image, text_hidden)"""
    pooled = average_pool(features, cfg)  # (batch, mm_tokens_per_image, vision_hidden)
    normed = gemma_rms_norm(pooled, p.mm_soft_emb_norm.weight, cfg.vision_config.layer_norm_eps)
    return normed @ p.mm_input_projection_weight  # (batch, mm_tokens_per_image, text_hidden)


def image_features(pixel_values, p, cfg):
    """Images to soft tokens: vision tower, then projector. p: the tree holding `vision_tower`
    and `multi_modal_projector`. -> (batch, mm_tokens_per_image, text_hidden)"""
    features = vision_tower(pixel_values, p.vision_tower.vision_model, cfg.vision_config)
    return multimodal_projector(features, p.multi_modal_projector, cfg)


# ---------------------------------------------------------------------------------------------
# Tensor names (as in the released Gemma 3 checkpoints)
# ---------------------------------------------------------------------------------------------


def siglip_shapes(vcfg):
    """Every tensor of the vision tower, named as under `vision_tower.vision_model.`"""
    d, m, c, ps = vcfg.hidden_size, vcfg.intermediate_size, vcfg.num_channels, vcfg.patch_size
    shapes = {
        "embeddings.patch_embedding.weight": (d, c, ps, ps),
        "embeddings.patch_embedding.bias": (d,),
        "embeddings.position_embedding.weight": (vcfg.num_patches, d),
    }
    for i in range(vcfg.num_hidden_layers):
        L = f"encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[L + norm + ".weight"] = (d,)
            shapes[L + norm + ".bias"] = (d,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[L + f"self_attn.{proj}.weight"] = (d, d)
            shapes[L + f"self_attn.{proj}.bias"] = (d,)
        shapes.update(
            {
                L + "mlp.fc1.weight": (m, d),
                L + "mlp.fc1.bias": (m,),
                L + "mlp.fc2.weight": (d, m),
                L + "mlp.fc2.bias": (d,),
            }
        )
    shapes["post_layernorm.weight"] = (d,)
    shapes["post_layernorm.bias"] = (d,)
    return shapes


def vision_shapes(cfg):
    """The vision tower and the projector of a Gemma3Config, named as in the released checkpoints:
    `vision_tower.vision_model.*` and `multi_modal_projector.*`."""
    shapes = {f"vision_tower.vision_model.{k}": v for k, v in siglip_shapes(cfg.vision_config).items()}
    vision_hidden, text_hidden = cfg.vision_config.hidden_size, cfg.text_config.hidden_size
    shapes["multi_modal_projector.mm_input_projection_weight"] = (vision_hidden, text_hidden)
    shapes["multi_modal_projector.mm_soft_emb_norm.weight"] = (vision_hidden,)
    return shapes

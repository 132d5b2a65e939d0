"""Rotary position embeddings (Su et al., 2021), every `rope_type` in one place.

Each variant is one pure function `(config, seq_len) -> (inv_freq, attention_scaling)`:
`inv_freq` (head_dim // 2,) are the rotation speeds of the dimension pairs, and
`attention_scaling` multiplies cos and sin (1.0 except for yarn and longrope).
`apply_rope` rotates queries and keys in transformers' split-half layout.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError


def rope_dim(config):
    """How many dimensions of each head rotate (all, unless partial_rotary_factor < 1)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * getattr(config, "partial_rotary_factor", 1.0))


def default_inv_freq(base, dim):
    """theta_i = base^(-2i/dim), i = 0 .. dim/2 - 1  (float32 like transformers)."""
    return (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)


def rope_default(config, seq_len=None, base=None):
    base = config.rope_theta if base is None else base
    return default_inv_freq(base, rope_dim(config)), 1.0


ROPE_INIT_FUNCTIONS = {"default": rope_default}


def rope_type(scaling):
    """The rope type a `rope_scaling` dict names (`rope_type`, or the older `type` key)."""
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return {"su": "longrope"}.get(kind, kind)


def compute_inv_freq(config, seq_len=None, base=None, scaling=None):
    """(inv_freq, attention_scaling) for this config's rope type at sequence length seq_len."""
    scaling = getattr(config, "rope_scaling", None) if scaling is None else scaling
    kind = rope_type(scaling)
    if kind not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(f"unknown rope type {kind!r}; known: {sorted(ROPE_INIT_FUNCTIONS)}")
    if kind == "default":
        return rope_default(config, seq_len, base=base)
    return ROPE_INIT_FUNCTIONS[kind](config, seq_len, base=base, scaling=scaling)


def rope_cos_sin(position_ids, inv_freq, attention_scaling=1.0):
    """Angles m * theta_i for each position, duplicated for the two halves.

    position_ids: (batch, seq) -> cos, sin: (batch, seq, rope_dim), float32
    """
    angles = position_ids[..., None].astype(np.float32) * inv_freq  # (batch, seq, rope_dim // 2)
    angles = np.concatenate([angles, angles], axis=-1)  # (batch, seq, rope_dim)
    return np.cos(angles) * np.float32(attention_scaling), np.sin(angles) * np.float32(attention_scaling)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i + d/2}) by its angle: x * cos + rotate_half(x) * sin.

    transformers pairs dimension i with i + d/2 (split halves). The original paper and GGUF /
    llama.cpp pair neighbours (2i, 2i+1) (interleaved); the two differ by a fixed permutation
    of the rows of W_q and W_k, which converters apply.
    x: (batch, heads, seq, head_dim); cos, sin: (batch, seq, rope_dim). Dimensions past
    rope_dim (partial rotary) pass through unchanged.
    """
    cos, sin = cos[:, None], sin[:, None]  # (batch, 1, seq, rope_dim)
    d = cos.shape[-1]
    rotated = x[..., :d] * cos + rotate_half(x[..., :d]) * sin
    if d == x.shape[-1]:
        return rotated.astype(x.dtype, copy=False)
    return np.concatenate([rotated, x[..., d:]], axis=-1).astype(x.dtype, copy=False)

"""Rotary position embeddings (Su et al., 2021), every `rope_type` in one place.

Each variant is one pure function `(config, seq_len=None, base=None, scaling=None) ->
(inv_freq, attention_scaling)`, registered in ROPE_INIT_FUNCTIONS under transformers' name:

    default   theta_i = base^(-2i/d)                                   (RoFormer)
    linear    theta_i / factor                                         (position interpolation)
    dynamic   default with base grown by the sequence length           (NTK-aware, "dynamic NTK")
    llama3    low frequencies / factor, high kept, smooth in between   (Llama 3.1)
    yarn      per-dimension blend of interpolation and extrapolation   (YaRN), cos/sin scaled
    longrope  theta_i / short_factor_i or / long_factor_i by length    (LongRoPE, Phi-3 "su"), cos/sin scaled

`inv_freq` (rope_dim // 2,) float32 are the rotation speeds of the dimension pairs;
`attention_scaling` multiplies cos and sin (1.0 except for yarn and longrope). `seq_len` matters
only to `dynamic` and `longrope`: transformers passes max(position_ids) + 1 of the current
forward call (its `dynamic_rope_update`), and `rope_for_positions` does the same. (transformers'
dynamic rope also remembers the longest length seen until a call falls back under
max_position_embeddings; the pure functions here use the current call's length only.)

Float32 as in transformers. torch's float32 `pow` is not correctly rounded (its vectorised and
scalar paths differ by one ulp), so the powers here are computed exactly and rounded once: the
results agree with transformers' ROPE_INIT_FUNCTIONS to a few ulp.

`rope_for_positions` gives one call's cos and sin; `apply_rope` rotates queries and keys in
transformers' split-half layout; `apply_rope_backward`, after it, is its gradient (the backward
pass: upstream gradient in, input gradient out, as every `*_backward` in minilm).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError
from .fusion import fusable

# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def rope_dim(config):
    """How many dimensions of each head rotate (all, unless partial_rotary_factor < 1)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * (getattr(config, "partial_rotary_factor", None) or 1.0))


def base_powers(base, dim):
    """base^(2i/dim), i = 0 .. dim/2 - 1: the wavelengths / 2 pi, float32 (rounded once)."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)  # (dim // 2,)
    base = np.float64(np.float32(base))  # torch rounds the base to float32 too
    return (base ** exponent.astype(np.float64)).astype(np.float32)


def default_inv_freq(base, dim):
    """theta_i = base^(-2i/dim), i = 0 .. dim/2 - 1  (float32 like transformers)."""
    return np.float32(1.0) / base_powers(base, dim)


def original_max_positions(config, scaling):
    """The context length the model was pre-trained with. As transformers' standardize_rope_params:
    a config field `original_max_position_embeddings` (Phi-3) wins, then the rope_scaling key,
    then max_position_embeddings."""
    value = getattr(config, "original_max_position_embeddings", None)
    if value is None:
        value = scaling.get("original_max_position_embeddings")
    return value if value is not None else config.max_position_embeddings


def _require(scaling, kind, *keys):
    """The values of keys a rope type cannot do without; ConfigError naming the missing ones."""
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ConfigError(f"rope_scaling of type {kind!r} needs the key(s) {missing}; got keys {sorted(scaling)}")
    return [scaling[k] for k in keys]


def _factor(scaling, kind):
    (factor,) = _require(scaling, kind, "factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise ConfigError(f"rope_scaling['factor'] must be a positive number for rope type {kind!r}, got {factor!r}")
    return float(factor)


# ---------------------------------------------------------------------------------------------
# One function per rope type: (config, seq_len, base, scaling) -> (inv_freq float32, attention_scaling)
# ---------------------------------------------------------------------------------------------


def rope_default(config, seq_len=None, base=None, scaling=None):
    """RoFormer: theta_i = base^(-2i/d)."""
    base = config.rope_theta if base is None else base
    return default_inv_freq(base, rope_dim(config)), 1.0


def rope_linear(config, seq_len=None, base=None, scaling=None):
    """Position interpolation (Chen et al., 2023): positions / factor, i.e. theta_i / factor."""
    inv_freq, _ = rope_default(config, base=base)
    return inv_freq / np.float32(_factor(scaling, "linear")), 1.0


def rope_dynamic(config, seq_len=None, base=None, scaling=None):
    """Dynamic NTK: past max_position_embeddings the base grows with the length L,

    base' = base * (factor * L / max_pos - (factor - 1)) ^ (d / (d - 2)),   L = max(seq_len, max_pos)
    """
    factor = _factor(scaling, "dynamic")
    base = config.rope_theta if base is None else base
    dim, max_pos = rope_dim(config), config.max_position_embeddings
    if dim <= 2:
        raise ConfigError(f"dynamic rope needs a rotary dimension > 2 (exponent d / (d - 2)); got {dim}")
    length = max_pos if seq_len is None else max(seq_len, max_pos)
    base = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return default_inv_freq(base, dim), 1.0


def rope_llama3(config, seq_len=None, base=None, scaling=None):
    """Llama 3.1: wavelengths longer than original / low_freq_factor are divided by `factor`,
    shorter than original / high_freq_factor kept, and the band between interpolated smoothly."""
    factor = _factor(scaling, "llama3")
    low_freq_factor, high_freq_factor = _require(scaling, "llama3", "low_freq_factor", "high_freq_factor")
    old_context = original_max_positions(config, scaling)
    inv_freq, _ = rope_default(config, base=base)  # (rope_dim // 2,)
    wavelen = np.float32(2 * math.pi) / inv_freq
    low_freq_wavelen, high_freq_wavelen = old_context / low_freq_factor, old_context / high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
    # old_context / wavelen, rounded as torch rounds a scalar over a tensor: scalar * (1 / tensor)
    smooth = (np.float32(old_context) * np.reciprocal(wavelen) - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32), 1.0


def yarn_get_mscale(scale, mscale=1.0):
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_yarn(config, seq_len=None, base=None, scaling=None):
    """YaRN (Peng et al., 2023): dimensions that rotate many times over the original context keep
    their frequency (extrapolate), slow ones are divided by `factor` (interpolate), a linear ramp
    between dimensions `low` and `high` (found from beta_fast / beta_slow rotations) blends them;
    cos and sin are scaled by the attention factor."""
    (factor,) = _require(scaling, "yarn", "factor")  # None: max_position_embeddings / original
    original = original_max_positions(config, scaling)
    factor = config.max_position_embeddings / original if factor is None else _factor(scaling, "yarn")
    base = config.rope_theta if base is None else base
    dim = rope_dim(config)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations):  # the dimension that turns num_rotations times over the original context
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero

    pos_freqs = base_powers(base, dim)  # (dim // 2,)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    keep = 1 - ramp  # 1: extrapolate (fast dimensions), 0: interpolate (slow dimensions)
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def rope_longrope(config, seq_len=None, base=None, scaling=None):
    """LongRoPE (Ding et al., 2024; Phi-3's "su"): theta_i / ext_i with ext = short_factor while
    seq_len <= original_max_position_embeddings (or seq_len unknown), long_factor beyond.
    cos and sin are scaled by sqrt(1 + ln(factor) / ln(original)), factor = max_pos / original
    unless given."""
    short_factor, long_factor = _require(scaling, "longrope", "short_factor", "long_factor")
    dim = rope_dim(config)
    for name, factors in (("short_factor", short_factor), ("long_factor", long_factor)):
        if not isinstance(factors, (list, tuple)) or len(factors) != dim // 2:
            length = len(factors) if isinstance(factors, (list, tuple)) else type(factors).__name__
            raise ConfigError(
                f"rope_scaling['{name}'] must be a list of rope_dim // 2 = {dim // 2} numbers, got {length}"
            )
    original = original_max_positions(config, scaling)
    factor = scaling.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    base = config.rope_theta if base is None else base
    ext = np.asarray(long_factor if seq_len and seq_len > original else short_factor, dtype=np.float32)
    return np.float32(1.0) / (ext * base_powers(base, dim)), float(attention_factor)


ROPE_INIT_FUNCTIONS = {
    "default": rope_default,
    "linear": rope_linear,
    "dynamic": rope_dynamic,
    "llama3": rope_llama3,
    "yarn": rope_yarn,
    "longrope": rope_longrope,
}


def rope_type(scaling):
    """The rope type a `rope_scaling` dict names (`rope_type`, or the older `type` key; Phi-3's
    original "su" is longrope)."""
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return {"su": "longrope"}.get(kind, kind) if isinstance(kind, str) else repr(kind)


def compute_inv_freq(config, seq_len=None, base=None, scaling=None):
    """(inv_freq, attention_scaling) for this config's rope type at sequence length seq_len
    (models pass max(position_ids) + 1 of the call, as transformers does)."""
    scaling = getattr(config, "rope_scaling", None) if scaling is None else scaling
    kind = rope_type(scaling)
    if kind not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(f"unknown rope type {kind!r}; known: {sorted(ROPE_INIT_FUNCTIONS)}")
    return ROPE_INIT_FUNCTIONS[kind](config, seq_len, base=base, scaling=scaling or {})


def check_rope_scaling(config):
    """Raise ConfigError now (at config load) for what compute_inv_freq would reject later:
    an unknown type, a missing key, factors of the wrong length (longrope checks both sets)."""
    compute_inv_freq(config)


# ---------------------------------------------------------------------------------------------
# Rotating queries and keys
# ---------------------------------------------------------------------------------------------


def rope_cos_sin(position_ids, inv_freq, attention_scaling=1.0):
    """Angles m * theta_i for each position, duplicated for the two halves.

    position_ids: (batch, seq) -> cos, sin: (batch, seq, rope_dim), float32
    """
    angles = position_ids[..., None].astype(np.float32) * inv_freq  # (batch, seq, rope_dim // 2)
    angles = np.concatenate([angles, angles], axis=-1)  # (batch, seq, rope_dim)
    return np.cos(angles) * np.float32(attention_scaling), np.sin(angles) * np.float32(attention_scaling)


def rope_for_positions(config, position_ids):
    """cos, sin (batch, seq, rope_dim) for one forward call, as transformers' rotary modules
    compute them: the rope function sees seq_len = max(position_ids) + 1 over the whole batch,
    which is what makes longrope switch factor sets and dynamic NTK grow its base.

        original 4, longrope:  a call with positions 0..3 -> short factors;  reaching 4 -> long
    """
    seq_len = int(np.max(position_ids)) + 1
    return rope_cos_sin(position_ids, *compute_inv_freq(config, seq_len=seq_len))


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@fusable
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


def apply_rope_backward(dy, cos, sin):
    """Gradient of `apply_rope` with respect to x: a rotation's transpose is the rotation by the
    opposite angle. rotate_half is linear with transpose -rotate_half, so

        y = x cos + rotate_half(x) sin   ->   dx = dy cos - rotate_half(dy sin)

    dy: (batch, heads, seq, head_dim); cos, sin: (batch, seq, rope_dim) -> dx like dy, float32.
    Dimensions past rope_dim passed through, so their gradient passes through too.
    """
    dy = np.asarray(dy, dtype=np.float32)
    cos, sin = cos[:, None], sin[:, None]  # (batch, 1, seq, rope_dim)
    d = cos.shape[-1]
    dx = dy[..., :d] * cos - rotate_half(dy[..., :d] * sin)
    return dx if d == dy.shape[-1] else np.concatenate([dx, dy[..., d:]], axis=-1)

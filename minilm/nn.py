"""The shared core: the small functions every architecture is built from.

Each function is one concept from the papers, pure (arrays in, arrays out) and short enough to
check against the equation by eye. Axis names used in the shape comments:

    batch, seq (query positions), kv_seq (key positions, past + current), hidden_size,
    num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size

Model files import these; the three hot spots (matmul, attention, expert dispatch) live in
`minilm.ops`, where the compiled kernels can swap in.

Backward pass (training, `minilm/grad.py`): each `f_backward` sits right after its forward `f`. It
takes the upstream gradient dy = dL/d(output) plus what the forward saw (its inputs), recomputes
what it needs, and returns the gradients of the inputs, in float32. No tape, no autograd: the
chain rule written out, one function per forward, checked against finite differences
(`tests/test_backward.py`).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError
from .fusion import fusable

# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


@fusable
def rms_norm(x, weight, eps):
    """RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * weight.

    Computed in float32 whatever the input dtype, then cast back (as transformers does).
    x: (..., dim), weight: (dim,)
    """
    x32 = x.astype(np.float32, copy=False)
    variance = np.mean(x32 * x32, axis=-1, keepdims=True)  # (..., 1)
    normed = x32 / np.sqrt(variance + np.float32(eps))  # (..., dim)
    return weight * normed.astype(x.dtype, copy=False)


def rms_norm_backward(dy, x, weight, eps):
    """Gradients of y = x / r * w, r = sqrt(mean(x^2) + eps), over the last axis (dim):

        dL/dx = (g - n * mean(g * n)) / r    with g = dy * w, n = x / r
        dL/dw = sum of dy * n over every axis but the last

    dy, x: (..., dim), weight: (dim,) -> dx (..., dim), dweight (dim,), float32
    """
    dy, x = np.asarray(dy, dtype=np.float32), x.astype(np.float32, copy=False)
    r = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))  # (..., 1)
    n = x / r  # (..., dim): the normalised x
    g = dy * weight.astype(np.float32, copy=False)  # (..., dim): gradient at n
    dx = (g - n * np.mean(g * n, axis=-1, keepdims=True)) / r
    return dx, (dy * n).reshape(-1, x.shape[-1]).sum(0)


@fusable
def layer_norm(x, weight, bias, eps):
    """LayerNorm (Ba et al., 2016): (x - mean) / sqrt(var + eps) * weight + bias.

    x: (..., dim), weight and bias: (dim,)
    """
    x32 = x.astype(np.float32, copy=False)
    mean = np.mean(x32, axis=-1, keepdims=True)  # (..., 1)
    centered = x32 - mean
    variance = np.mean(centered * centered, axis=-1, keepdims=True)  # (..., 1)
    normed = centered / np.sqrt(variance + np.float32(eps))
    return (normed * weight + bias).astype(x.dtype, copy=False)


def layer_norm_backward(dy, x, weight, eps):
    """Gradients of y = n * w + b, n = (x - mean(x)) / sqrt(var(x) + eps), over the last axis:

        dL/dx = (g - mean(g) - n * mean(g * n)) / sqrt(var + eps)    with g = dy * w
        dL/dw = sum(dy * n),  dL/db = sum(dy)   (over every axis but the last)

    dy, x: (..., dim), weight: (dim,) -> dx (..., dim), dweight (dim,), dbias (dim,), float32
    """
    dy, x = np.asarray(dy, dtype=np.float32), x.astype(np.float32, copy=False)
    centered = x - np.mean(x, axis=-1, keepdims=True)
    std = np.sqrt(np.mean(centered * centered, axis=-1, keepdims=True) + np.float32(eps))  # (..., 1)
    n = centered / std  # (..., dim)
    g = dy * weight.astype(np.float32, copy=False)  # (..., dim): gradient at n
    dx = (g - np.mean(g, axis=-1, keepdims=True) - n * np.mean(g * n, axis=-1, keepdims=True)) / std
    dim = x.shape[-1]
    return dx, (dy * n).reshape(-1, dim).sum(0), dy.reshape(-1, dim).sum(0)


# ---------------------------------------------------------------------------------------------
# Activations and softmax
# ---------------------------------------------------------------------------------------------


def softmax(x, axis=-1):
    """Numerically stable softmax; a row that is entirely -inf gives zeros, never NaN."""
    x_max = np.max(x, axis=axis, keepdims=True)
    x_max = np.where(np.isfinite(x_max), x_max, 0)
    e = np.exp(x - x_max)
    total = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(total == 0, 1, total)


def log_softmax(x, axis=-1):
    x_max = np.max(x, axis=axis, keepdims=True)
    shifted = x - x_max
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def silu(x):
    """SiLU / swish: x * sigmoid(x)."""
    return x / (1 + np.exp(-x))


def silu_backward(dy, x):
    """d silu / dx = s (1 + x (1 - s)) with s = sigmoid(x). dy, x: (...) -> dx (...)"""
    x = x.astype(np.float32, copy=False)
    s = 1 / (1 + np.exp(-x))
    return dy * (s * (1 + x * (1 - s)))


def gelu(x):
    """GELU with the exact Gaussian CDF: x * Phi(x)."""
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)).astype(x.dtype, copy=False))


def gelu_backward(dy, x):
    """d gelu / dx = Phi(x) + x phi(x): the Gaussian CDF plus x times its density. dy, x: (...) -> dx"""
    x = x.astype(np.float32, copy=False)
    cdf = 0.5 * (1 + _erf(x / math.sqrt(2)).astype(np.float32, copy=False))
    pdf = np.exp(-0.5 * x * x) / np.float32(math.sqrt(2 * math.pi))
    return dy * (cdf + x * pdf)


@fusable
def gelu_tanh(x):
    """GELU, tanh approximation (GPT-2, BLOOM, Gemma): 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))."""
    c, k = x.dtype.type(math.sqrt(2 / math.pi)), x.dtype.type(0.044715)
    return 0.5 * x * (1 + np.tanh(c * (x + k * x * x * x)))


def gelu_tanh_backward(dy, x):
    """With t = tanh(c (x + k x^3)):  d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 k x^2).
    dy, x: (...) -> dx (...)"""
    x = x.astype(np.float32, copy=False)
    c, k = np.float32(math.sqrt(2 / math.pi)), np.float32(0.044715)
    t = np.tanh(c * (x + k * x * x * x))
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * k * x * x))


def _erf(x):
    """Vectorised error function (NumPy has none); float64 inside for accuracy."""
    try:
        from scipy.special import erf  # noqa: PLC0415  (optional, exact)

        return erf(x)
    except ImportError:
        return np.vectorize(math.erf, otypes=[np.float64])(x)


ACTIVATIONS = {
    "silu": silu,
    "swish": silu,
    "gelu": gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu_fast": gelu_tanh,
}


def activation(name):
    """The activation function a config names (`hidden_act` / `hidden_activation`)."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


ACTIVATION_BACKWARDS = {"silu": silu_backward, "swish": silu_backward, "gelu": gelu_backward}
ACTIVATION_BACKWARDS.update(dict.fromkeys(("gelu_pytorch_tanh", "gelu_new", "gelu_fast"), gelu_tanh_backward))


def activation_backward(name):
    """The backward `(dy, x) -> dx` of the activation a config names."""
    activation(name)  # the same error for an unknown name
    return ACTIVATION_BACKWARDS[name]


def soft_cap(x, cap):
    """Logit soft-capping (Gemma 2/3): cap * tanh(x / cap). Smoothly bounds x to (-cap, cap)."""
    return cap * np.tanh(x / cap)


def soft_cap_backward(dy, x, cap):
    """d/dx cap * tanh(x / cap) = 1 - tanh(x / cap)^2. dy, x: (...) -> dx (...)"""
    t = np.tanh(np.asarray(x, dtype=np.float32) / np.float32(cap))
    return dy * (1 - t * t)


def softmax_backward(dy, y, axis=-1):
    """Gradient of y = softmax(x) given y: dx = y * (dy - sum(dy * y)) along `axis`."""
    return y * (dy - np.sum(dy * y, axis=axis, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Masks: which key positions each query position may attend to (True = may attend)
# ---------------------------------------------------------------------------------------------


def causal_mask(q_idx, k_idx):
    """Query at index q sees keys at index <= q.

        k: 0 1 2 3 4
    q=2    x x x . .
    q=4    x x x x x

    q_idx: (seq,), k_idx: (kv_seq,) -> (seq, kv_seq) bool
    """
    return k_idx[None, :] <= q_idx[:, None]


def sliding_window_mask(q_idx, k_idx, window):
    """Query at q sees the `window` most recent keys, itself included: q-window < k <= q.

    sliding_window=3   k: 0 1 2 3 4
    q=4                   . . x x x

    q_idx: (seq,), k_idx: (kv_seq,) -> (seq, kv_seq) bool
    """
    return causal_mask(q_idx, k_idx) & (k_idx[None, :] > q_idx[:, None] - window)


def padding_mask(attention_mask):
    """Keys that are padding are never attended to.

    attention_mask: (batch, kv_seq) of 0/1 -> (batch, 1, 1, kv_seq) bool
    """
    return (attention_mask != 0)[:, None, None, :]  # NumPy, or CuPy where the model lives on the GPU


def attention_mask_4d(attention_mask, q_idx, k_idx, sliding_window=None, image_blocks=None):
    """Combine causal (or sliding-window) and padding masks into one boolean mask.

    attention_mask: (batch, kv_seq) 0/1 or None; q_idx: (seq,); k_idx: (kv_seq,)
    image_blocks: (batch, past + seq) from `image_block_ids`, or None (text only)
    -> (batch or 1, 1, seq, kv_seq) bool, True where the query may attend to the key.
    """
    if sliding_window is None:
        allowed = causal_mask(q_idx, k_idx)  # (seq, kv_seq)
    else:
        allowed = sliding_window_mask(q_idx, k_idx, sliding_window)
    allowed = allowed[None, None]  # (1, 1, seq, kv_seq)
    if image_blocks is not None:  # Gemma 3: tokens of one image also see each other's later tokens
        allowed = allowed | same_image_mask(image_blocks, q_idx, k_idx, sliding_window)  # (batch, 1, seq, kv_seq)
    if attention_mask is not None:
        allowed = allowed & padding_mask(attention_mask)  # (batch, 1, seq, kv_seq)
    return allowed


def image_block_ids(token_type_ids):
    """Number the images of each row: every run of image tokens (token_type_ids == 1) gets the
    index of its image, 0, 1, ...; text tokens get -1 (transformers' block_sequence_ids).

        token_type_ids  0 0 1 1 1 0 0 1 1 0
        image blocks   -1 -1 0 0 0 -1 -1 1 1 -1

    token_type_ids: (batch, seq) -> (batch, seq) int64"""
    is_image = np.asarray(token_type_ids) == 1
    starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]  # an image token after a non-image one
    return np.where(is_image, np.cumsum(starts, axis=1) - 1, -1)


def same_image_mask(image_blocks, q_idx, k_idx, sliding_window=None):
    """Query and key are tokens of the same image: they attend to each other in both directions
    (Gemma 3; text stays causal). On a sliding layer only keys inside the window count, as in
    transformers (sliding AND (causal OR same image)); a later key of the image is always inside.

        text t, image tokens i (one image)   k: t i i i t
                                        q=i     x x x x .      causal would stop at the diagonal
                                        q=t     x x x x x

    image_blocks: (batch, past + seq) from `image_block_ids`; q_idx: (seq,); k_idx: (kv_seq,)
    -> (batch, 1, seq, kv_seq) bool"""
    q_blocks, k_blocks = image_blocks[:, q_idx], image_blocks[:, k_idx]  # (batch, seq), (batch, kv_seq)
    same = (q_blocks[:, :, None] == k_blocks[:, None, :]) & (q_blocks[:, :, None] >= 0)  # (batch, seq, kv_seq)
    if sliding_window is not None:
        same = same & (k_idx[None, :] > q_idx[:, None] - sliding_window)[None]
    return same[:, None]


def position_ids_from_attention_mask(attention_mask):
    """Positions that ignore left padding: cumsum(mask) - 1 (pads get position 1, never used).

    attention_mask: (batch, seq) -> (batch, seq) int64
    """
    mask = np.asarray(attention_mask).astype(np.int64)
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, positions)


# ---------------------------------------------------------------------------------------------
# Attention heads: split and merge
# ---------------------------------------------------------------------------------------------


def split_heads(x, num_heads, head_dim):
    """(batch, seq, num_heads * head_dim) -> (batch, num_heads, seq, head_dim)"""
    b, s, _ = x.shape
    return x.reshape(b, s, num_heads, head_dim).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(batch, num_heads, seq, head_dim) -> (batch, seq, num_heads * head_dim)"""
    b, h, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * d)


# merge_heads is split_heads' inverse (a reshape and a transpose, no arithmetic): the backward of
# one is the other, `split_heads(dy, num_heads, head_dim)` and `merge_heads(dy)`.

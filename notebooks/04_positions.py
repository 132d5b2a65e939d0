# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Positions in attention: ALiBi and RoPE
#
# Attention by itself is blind to order: permute the keys and the weights permute with them.
# Models tell positions apart in one of two ways, both inside the attention scores:
#
# * **ALiBi** (BLOOM) adds a bias `-m_h * (q - k)` to the scores of head `h`: farther keys are
#   penalised linearly, with a different slope `m_h` per head.
# * **RoPE** (Qwen3, Gemma 3, Phi-3) rotates each pair of query/key dimensions by an angle
#   `position * theta_i`, so that `q(m) . k(n)` depends only on `m - n`. Long-context variants
#   (linear, dynamic NTK, Llama 3, YaRN, LongRoPE) change the speeds `theta_i`.
#
# Everything below comes from minilm; nothing is re-implemented here. Prerequisite: notebook 03.

# %%
import matplotlib.pyplot as plt
import numpy as np

import minilm
from minilm import nn, rope
from minilm.models import bloom, phi3

# %% [markdown]
# ## ALiBi slopes
#
# For `n` heads, a power of two, the slopes are the geometric series `2^(-8/n), 2^(-16/n), ...`.
# BLOOM-560M has 16 heads; BLOOM-176B has 112, not a power of two: then the series of the
# largest power of two below is followed by every other term of the next one's series.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
for ax, n in zip(axes, (8, 12), strict=True):
    slopes = bloom.alibi_slopes(n)
    ax.bar(range(n), slopes, color=["C0"] * min(n, 8) + ["C1"] * (n - 8))
    ax.set_yscale("log")
    ax.set_xlabel("head")
    ax.set_ylabel("slope m_h")
    ax.set_title(f"{n} heads")
plt.show()
print("8 heads: ", bloom.alibi_slopes(8))
print("12 heads:", bloom.alibi_slopes(12), "(orange: every other term of the 16-head series)")
assert np.allclose(bloom.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
assert np.allclose(bloom.alibi_slopes(12)[8:], 2.0 ** -np.array([0.5, 1.5, 2.5, 3.5]))

# %% [markdown]
# ## ALiBi bias matrices, and why a key-only bias is enough
#
# The paper's bias is `-m_h (q - k)` on the visible keys: zero on the diagonal, more negative the
# farther back the key. BLOOM adds `m_h * k` instead: the two differ by `m_h * q`, the same for
# every key of one query, and softmax ignores a constant added to a whole row. Key positions come
# from `cumsum(attention_mask) - 1`, so left padding shifts nothing. The panels show the paper's
# form for the 4 heads of a 4-head model, on **one colour scale**: the steepest head (m = 1/4)
# pushes distant keys down 64 times harder than the gentlest (m = 1/256).

# %%
mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1]])  # two left pads
bias = bloom.alibi_bias(mask, 4)[0, :, 0]  # (heads, kv_seq): m_h * key position
allowed = nn.attention_mask_4d(mask, np.arange(8), np.arange(8))[0, 0]  # causal + padding
positions = (np.cumsum(mask) - 1) * mask[0]
paper = -bloom.alibi_slopes(4)[:, None, None] * (positions[:, None] - positions[None, :])  # -m (q - k)
shown = np.where(allowed[None], paper, np.nan)  # (heads, 8, 8): masked entries blank
fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
for h, ax in enumerate(axes):
    image = ax.imshow(shown[h], cmap="viridis", vmin=np.nanmin(shown), vmax=0)
    ax.set_title(f"head {h}, m = {bloom.alibi_slopes(4)[h]:.3g}")
    ax.set_xlabel("key position (2 left pads)")
axes[0].set_ylabel("query position")
fig.colorbar(image, ax=axes, label="bias added to the score (logits)")
plt.show()
for h in range(4):
    a = nn.softmax(np.where(allowed[2:, 2:], bias[h][None, 2:], -np.inf))
    b = nn.softmax(np.where(allowed[2:, 2:], paper[h][2:, 2:], -np.inf))
    assert np.allclose(a, b)  # same attention weights on the real tokens
assert np.isclose(bloom.alibi_slopes(4)[0] / bloom.alibi_slopes(4)[-1], 64)
assert (bias[:, :2] == 0).all() and np.allclose(bias[:, 2:], bloom.alibi_slopes(4)[:, None] * np.arange(6))

# %% [markdown]
# ## ALiBi at work in a tiny BLOOM
#
# Attention maps of a random 6-head BLOOM (6 is not a power of two). Heads with a large slope
# look mostly at the last few keys; heads with a small slope spread out.

# %%
config = bloom.BloomConfig(vocab_size=64, hidden_size=48, n_head=6, n_layer=1)
model = bloom.BloomModel(config, seed=0)
ids = np.random.default_rng(0).integers(0, 64, size=(1, 16))
weights = model(ids, output_attentions=True).attentions[0][0]  # (heads, seq, seq)
order = np.argsort(-bloom.alibi_slopes(6))
fig, axes = plt.subplots(1, 6, figsize=(16, 2.9))
for ax, h in zip(axes, order, strict=True):
    image = ax.imshow(weights[h], cmap="magma", vmin=0, vmax=1)
    ax.set_title(f"head {h}, m = {bloom.alibi_slopes(6)[h]:.3g}")
    ax.set_xlabel("key")
axes[0].set_ylabel("query")
fig.colorbar(image, ax=axes, label="attention weight")
plt.show()
distance = np.abs(np.arange(16)[:, None] - np.arange(16)[None, :])
mean_distance = (weights * distance).sum(-1).mean(-1)  # (heads,)
print("mean attended distance, steepest slope first:", np.round(mean_distance[order], 2))
assert np.allclose(np.triu(weights, k=1), 0)  # causal
assert mean_distance[order[0]] < mean_distance[order[-1]]

# %% [markdown]
# ## RoPE: one rotation speed per pair of dimensions
#
# `theta_i = base^(-2i/d)`: dimension pair 0 turns once per radian of position, the last pair
# takes `base` times longer. The wavelength `2 pi / theta_i` says after how many tokens a pair
# comes back to where it started. Each rope type rescales these speeds:

# %%
cfg = phi3.Phi3Config(
    vocab_size=10,
    hidden_size=128,
    num_attention_heads=1,
    intermediate_size=8,
    num_hidden_layers=1,
    max_position_embeddings=32768,
    original_max_position_embeddings=4096,
)
d = cfg.head_dim
i = np.arange(d // 2)
short = list(np.linspace(1.0, 2.0, d // 2))
long_ = list(np.geomspace(1.0, 8.0, d // 2) ** 1.5)
variants = {
    "default": None,
    "linear x8": {"rope_type": "linear", "factor": 8.0},
    "dynamic x8 @ 128k": {"rope_type": "dynamic", "factor": 8.0},
    "llama3 x8": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "yarn x8": {"rope_type": "yarn", "factor": 8.0},
    "longrope short": {"rope_type": "longrope", "short_factor": short, "long_factor": long_},
    "longrope long": {"rope_type": "longrope", "short_factor": short, "long_factor": long_},
}
spectra = {}
plt.figure(figsize=(8, 4))
for name, scaling in variants.items():
    seq_len = {"dynamic x8 @ 128k": 131072, "longrope long": 32768}.get(name)  # the length reached
    inv_freq, attention_scaling = rope.compute_inv_freq(cfg, seq_len=seq_len, scaling=scaling)
    spectra[name] = inv_freq
    plt.semilogy(i, 2 * np.pi / inv_freq, label=f"{name} (cos/sin x {attention_scaling:.3f})")
plt.axhline(4096, color="gray", ls=":", label="original context 4096")
plt.xlabel("dimension pair i")
plt.ylabel("wavelength (tokens)")
plt.legend(fontsize=7)
plt.show()
default = spectra["default"]
assert np.allclose(spectra["linear x8"], default / 8)
assert np.isclose(spectra["llama3 x8"][0], default[0]) and np.isclose(spectra["llama3 x8"][-1], default[-1] / 8)
assert np.isclose(spectra["yarn x8"][0], default[0]) and np.isclose(spectra["yarn x8"][-1], default[-1] / 8)
assert (spectra["dynamic x8 @ 128k"][1:] < default[1:]).all()

# %% [markdown]
# Linear interpolation slows every pair by the factor. Llama 3 and YaRN keep the fast pairs
# (short wavelengths, which encode local order) and slow only the pairs whose wavelength exceeds
# the original context; dynamic NTK raises the base once the sequence outgrows
# `max_position_embeddings`. YaRN and LongRoPE also scale cos and sin (an attention temperature).
#
# ## The rotation only sees relative positions
#
# For fixed `q` and `k`, the score `q(m) . k(n)` is a function of `m - n` alone: the matrix below
# is constant along its diagonals.

# %%
rng = np.random.default_rng(1)
q, k = rng.standard_normal((2, 1, d)).astype(np.float32)
inv_freq, _ = rope.compute_inv_freq(cfg)
cos, sin = rope.rope_cos_sin(np.arange(32)[None], inv_freq)  # (1, 32, d)
q_rot = rope.apply_rope(np.broadcast_to(q, (32, d))[None, None], cos, sin)[0, 0]  # q at positions 0..31
k_rot = rope.apply_rope(np.broadcast_to(k, (32, d))[None, None], cos, sin)[0, 0]
scores = q_rot @ k_rot.T  # (m, n)
plt.figure(figsize=(5, 4))
plt.imshow(scores, cmap="coolwarm")
plt.xlabel("key position n")
plt.ylabel("query position m")
plt.title("q(m) . k(n)")
plt.colorbar()
plt.show()
for offset in range(-31, 32):
    diagonal = np.diagonal(scores, offset)
    assert np.allclose(diagonal, diagonal[0], atol=1e-3)
assert np.allclose(np.linalg.norm(q_rot, axis=-1), np.linalg.norm(q))  # rotations keep lengths

# %% [markdown]
# ## LongRoPE: short factors, long factors, and the switch
#
# Phi-3 divides each `theta_i` by a searched factor: `short_factor` while the sequence fits in
# `original_max_position_embeddings`, `long_factor` beyond. transformers (and minilm) pick the set
# per forward call from the largest position in it, for the whole batch. Below, a tiny Phi-3 with
# original length 16: positions up to 15 use the short set, a call that reaches position 16 uses
# the long one, and both multiply cos and sin by `sqrt(1 + ln(64/16) / ln(16))`.

# %%
small = phi3.Phi3Config(
    vocab_size=64,
    hidden_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=48,
    num_hidden_layers=2,
    max_position_embeddings=64,
    original_max_position_embeddings=16,
    pad_token_id=0,
    eos_token_id=2,
    rope_scaling={
        "type": "su",
        "short_factor": [1.0, 1.03, 1.08, 1.15, 1.25, 1.4, 1.6, 1.85],
        "long_factor": [1.0, 1.3, 1.9, 2.8, 4.2, 6.5, 9.5, 14.0],
    },
)
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
axes[0].plot(small.rope_scaling["short_factor"], "o-", label="short_factor")
axes[0].plot(small.rope_scaling["long_factor"], "o-", label="long_factor")
axes[0].set_xlabel("dimension pair i")
axes[0].set_ylabel("theta_i divided by")
axes[0].legend()
for last, style in ((15, "-"), (16, "--")):
    cos, _ = rope.rope_for_positions(small, np.arange(last + 1)[None])  # (1, seq, 16)
    axes[1].plot(cos[0, :, 2], style, label=f"call up to position {last}")
axes[1].set_xlabel("position")
axes[1].set_ylabel("cos of pair 2 (x attention factor)")
axes[1].legend()
plt.show()
factor = np.sqrt(1 + np.log(64 / 16) / np.log(16))
cos15, _ = rope.rope_for_positions(small, np.arange(16)[None])
cos16, _ = rope.rope_for_positions(small, np.arange(17)[None])
assert np.isclose(cos15[0, 0, 0], factor) and np.isclose(cos16[0, 0, 0], factor)
assert not np.allclose(cos15[0, :16], cos16[0, :16])  # the same positions, rotated at other speeds

# %% [markdown]
# ## Generation across the original length
#
# Keys in the KV cache were rotated with the short factors. transformers' Phi-3 therefore drops
# the cache once, at the step where the sequence first exceeds the original length, and runs the
# whole sequence again with the long factors; minilm does the same (`cache_is_stale`). The result
# equals recomputing everything at every step, while mixing the two sets would not.

# %%
model = phi3.Phi3ForCausalLM(small, seed=0)
prompt = np.random.default_rng(2).integers(3, 64, size=(1, 10))
cached = model.generate(prompt, max_new_tokens=12, eos_token_id=[])
seq = prompt
for _ in range(12):  # full recompute each step: the factor set always matches the longest position
    seq = np.concatenate([seq, model(seq).logits[:, -1].argmax(-1)[:, None]], axis=1)
print("cached :", cached[0, 10:])
print("full   :", seq[0, 10:])
stale = [model.cache_is_stale(minilm.KVCache(2), n) for n in range(10, 23)]
print("the cache is dropped at the step that feeds a sequence of", 10 + stale.index(True), "tokens")
assert (cached == seq).all() and stale.index(True) == 7

# %% [markdown]
# ## Exercises
#
# **rope.1** (implement): `apply_rope(x, cos, sin)` in the split-half layout, checked against
# `rope.apply_rope` on random inputs.

# %%
print(minilm.course.question("rope.1"))


def apply_rope(x, cos, sin):
    raise NotImplementedError  # your code


minilm.course.check("rope.1", apply_rope)

# %% [markdown]
# **rope.2**: the wavelength, in tokens, of the slowest pair of Gemma 3 270M's global layers
# (base 1e6, head_dim 256). Compare it with the model's 32 768-token context: what does a pair
# that turns less than once over the whole context encode?
#
# **rope.3**: BLOOM with 16 heads: head 0's ALiBi slope.

# %%
answer = None  # a number of tokens
minilm.course.check("rope.2", answer)
answer = None  # a number
minilm.course.check("rope.3", answer)

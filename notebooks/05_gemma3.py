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
# # 05 · Gemma 3: local and global attention, soft caps, (1 + w) norms, on the real model
#
# Gemma 3 is a Llama-style decoder with a few twists, each one small:
#
# * most layers attend only to a **sliding window** of recent tokens; every sixth layer is **global**;
# * logits can be **soft-capped**: `cap * tanh(x / cap)` instead of `x`;
# * every RMSNorm scales by **`1 + w`**, not `w`.
#
# We look at each piece on the model minilm ships (Google's Gemma 3 270M, quantized Q4_K_M), with
# `minilm.capture` to look inside its forward pass. Everything comes from minilm; nothing is
# re-implemented here. Prerequisites: notebooks 03 (attention, masks) and 04 (RoPE).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minilm
from minilm import nn
from minilm.models import gemma3

start = time.perf_counter()
model = minilm.from_pretrained(minilm.default_model.default_model_path())
config, tokenizer = model.config, model.tokenizer
print(
    f"loaded {type(model).__name__} in {time.perf_counter() - start:.1f} s: {config.num_hidden_layers} layers, "
    f"hidden {config.hidden_size}, {config.num_attention_heads} query heads sharing {config.num_key_value_heads} "
    f"key/value head(s), vocabulary {config.vocab_size}"
)
assert isinstance(model, minilm.Gemma3ForCausalLM)

# %% [markdown]
# ## (a) Sliding-window and global attention
#
# A causal mask lets query `q` see every key `k <= q`. A sliding window of size `W` keeps only the
# `W` most recent of them: `q - W < k <= q`. Local layers are cheaper (their KV cache never grows
# past `W` entries) and the global layers carry information across the whole context. Below, both
# masks for 16 positions with a toy window of 4 (the real model's window is printed underneath).

# %%
positions = np.arange(16)
window = 4
masks = {
    "causal (global layers)": nn.causal_mask(positions, positions),
    f"sliding window W={window} (local layers)": nn.sliding_window_mask(positions, positions, window),
}
fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
for ax, (title, mask) in zip(axes, masks.items(), strict=True):
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
    ax.set_title(title)
    ax.set_xlabel("key position k")
    ax.set_ylabel("query position q")
plt.show()
causal, sliding = masks.values()
print("real model: sliding_window =", config.sliding_window)
assert (sliding <= causal).all()  # the window only ever removes keys
assert (sliding.sum(-1) == np.minimum(positions + 1, window)).all()  # each query sees at most W keys

# %% [markdown]
# Which layers are which: `config.layer_types`, read from the checkpoint. Five local layers, then
# one global, repeated; each kind also has its own RoPE base (10 000 for local layers, 1 000 000
# for global ones: global layers need slow rotations that stay distinct over long distances).

# %%
is_global = np.array([t == gemma3.FULL for t in config.layer_types])
plt.figure(figsize=(10, 1.6))
plt.imshow(is_global[None], cmap="coolwarm", vmin=-0.3, vmax=1.3, aspect="auto")
plt.yticks([])
plt.xticks(range(config.num_hidden_layers))
plt.xlabel("layer")
for i, g in enumerate(is_global):
    plt.text(i, 0, "G" if g else "L", ha="center", va="center", color="white")
plt.title(
    f"L = local (window {config.sliding_window}, RoPE base {config.rope_local_base_freq:g}), "
    f"G = global (RoPE base {config.rope_theta:g})"
)
plt.show()
print("global layers:", np.flatnonzero(is_global))
assert is_global.sum() * 5 == (~is_global).sum()  # 5 local : 1 global
assert (np.flatnonzero(is_global) % 6 == 5).all()  # every sixth layer

# %% [markdown]
# ## (b) Logit soft-capping
#
# `soft_cap(x, cap) = cap * tanh(x / cap)` is the identity near zero and bends smoothly towards
# `+-cap`: a logit can never run away, yet small logits (and their ordering) are untouched. Gemma 2
# capped attention scores at 50 and final logits at 30. Gemma 3 dropped the caps in favour of
# QK-norm, so the 270M checkpoint sets neither (printed below); minilm still implements both.

# %%
x = np.linspace(-100, 100, 401)
plt.figure(figsize=(6, 4))
plt.plot(x, x, "k:", label="identity")
for cap in (10, 30, 50):
    plt.plot(x, nn.soft_cap(x, cap), label=f"cap = {cap}")
plt.ylim(-70, 70)
plt.xlabel("logit x")
plt.ylabel("soft_cap(x, cap)")
plt.legend()
plt.grid(alpha=0.3)
plt.show()
print(
    "270M: final_logit_softcapping =",
    config.final_logit_softcapping,
    " attn_logit_softcapping =",
    config.attn_logit_softcapping,
)
for cap in (10, 30, 50):
    y = nn.soft_cap(x, cap)
    assert (np.abs(y) < cap).all() and (np.diff(y) > 0).all()  # bounded, and order is kept
    assert np.allclose(nn.soft_cap(x[np.abs(x) < 1], cap), x[np.abs(x) < 1], atol=1e-2)  # identity near 0

# %% [markdown]
# ## (c) RMSNorm with a (1 + w) scale
#
# Llama's RMSNorm computes `x / rms(x) * w`. Gemma's computes `x / rms(x) * (1 + w)`: its stored
# weights are offsets from one, so all-zero weights are a plain RMSNorm (and weight decay pulls
# towards "no change" rather than towards zero output). A stored `w = -1` switches a channel off.
# Loading a Gemma checkpoint into a Llama norm would scale each channel by `w` instead: channels
# that Gemma damps would come out with their sign flipped. Below, the real weights of layer 0's
# `post_attention_layernorm` and what they do to one hidden vector.

# %%
w = model.params.model.layers[0].post_attention_layernorm.weight  # (hidden_size,) stored offsets
hidden = np.random.default_rng(0).standard_normal((1, config.hidden_size)).astype(np.float32)
gemma_out = gemma3.gemma_rms_norm(hidden, w, config.rms_norm_eps)
plain_out = nn.rms_norm(hidden, w, config.rms_norm_eps)  # the same weights read the Llama way
fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
axes[0].hist(np.clip(w, -1.5, 3), bins=90)
axes[0].axvline(-1, color="C3", ls="--", label="w = -1: channel off")
axes[0].axvline(0, color="k", ls=":", label="w = 0: plain RMSNorm")
axes[0].set_xlabel("stored w (clipped to [-1.5, 3])")
axes[0].set_ylabel("channels")
axes[0].set_title("layer 0 post_attention_layernorm")
axes[0].legend()
channels = np.arange(40)
axes[1].plot(channels, gemma_out[0, channels], "o-", label="gemma_rms_norm(x, w): scale 1 + w")
axes[1].plot(channels, plain_out[0, channels], "x--", label="rms_norm(x, w): scale w (Llama reading)")
axes[1].set_xlabel("channel")
axes[1].set_title("one normalised vector")
axes[1].legend(fontsize=8, loc="upper left")
plt.show()
shrunk = (w > -1) & (w < 0)
print(
    f"{shrunk.mean():.0%} of channels have -1 < w < 0: Gemma shrinks them (0 < 1 + w < 1), "
    "a Llama reading flips their sign"
)
zeros = np.zeros_like(w)
assert np.allclose(gemma3.gemma_rms_norm(hidden, zeros, 1e-6), nn.rms_norm(hidden, zeros + 1, 1e-6))  # w = 0: plain
assert np.allclose(gemma_out, nn.rms_norm(hidden, 1 + w, config.rms_norm_eps), rtol=1e-5, atol=1e-4)
assert np.allclose(gemma_out - plain_out, nn.rms_norm(hidden, zeros + 1, config.rms_norm_eps), atol=1e-3)

# %% [markdown]
# ## (d) Attention maps of the real model
#
# `output_attentions=True` returns every layer's attention weights, (batch, heads, query, key).
# Layer 0 is local and layer 5 global, but for a short prompt the 512-token window covers every
# key, so both are plain causal maps; the difference is what the layers have learned (and their
# RoPE base). Mean over the 4 heads.

# %%
short = "The quick brown fox jumps over the lazy dog because the dog was asleep"
short_ids = np.array([tokenizer.encode(short)])
out = model(short_ids, output_attentions=True, logits_to_keep=1)
labels = [tokenizer.decode([i]) for i in short_ids[0]]
local_layer, global_layer = 0, int(np.flatnonzero(is_global)[0])
fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
for ax, layer in zip(axes, (local_layer, global_layer), strict=True):
    ax.imshow(out.attentions[layer][0].mean(0), cmap="viridis")
    ax.set_title(f"layer {layer} ({config.layer_types[layer]})")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
plt.show()
for weights in out.attentions:
    assert np.allclose(np.triu(weights[0], k=1), 0) and np.allclose(weights.sum(-1), 1, atol=1e-4)

# %% [markdown]
# To see the window bite, the prompt must be longer than it: here 600 tokens (one forward
# pass, a few seconds). Attention of the last 200 queries: in the local layer every key more than
# 511 positions back gets exactly zero weight (the black triangle left of the dashed line), while
# the global layer still reaches the start of the text.

# %%
story = " ".join(["Once upon a time, a small fox lived by the river and watched the boats go by."] * 40)
long_ids = np.array([tokenizer.encode(story)[:600]])
long_out = model(long_ids, output_attentions=True, logits_to_keep=1)
n, W = long_ids.shape[1], config.sliding_window
rows = np.arange(n - 200, n)
fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
for ax, layer in zip(axes, (local_layer, global_layer), strict=True):
    weights = long_out.attentions[layer][0].mean(0)[rows]  # (200, n)
    image = ax.imshow(
        np.log10(weights + 1e-6),
        cmap="magma",
        vmin=-6,
        vmax=0,
        aspect="auto",
        extent=(-0.5, n - 0.5, rows[-1] + 0.5, rows[0] - 0.5),
    )
    ax.plot(rows - W + 1, rows, "c--", lw=1)  # the oldest key the window keeps
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_title(f"layer {layer} ({config.layer_types[layer]}), log10 weight")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
fig.colorbar(image, ax=axes, label="log10 attention weight (mean over heads)")
plt.show()
local_w, global_w = long_out.attentions[local_layer][0], long_out.attentions[global_layer][0]
outside = ~nn.sliding_window_mask(np.arange(n), np.arange(n), W) & nn.causal_mask(np.arange(n), np.arange(n))
print(
    f"weight on keys outside the window, summed over heads and queries: local {local_w[:, outside].sum():.3g}, "
    f"global {global_w[:, outside].sum():.3g}"
)
assert n > W and local_w[:, outside].sum() == 0 and global_w[:, outside].sum() > 0

# %% [markdown]
# ## (e) Four norms per layer, seen from inside
#
# Each Gemma 3 block normalises four times: before attention (`input_layernorm`), after it
# (`post_attention_layernorm`, before the residual add), before the MLP and after it. The
# post-norms decide how large an update each block writes into the residual stream, whatever the
# size of the attention or MLP output itself. `minilm.capture` records the residual stream after
# every block (`layers.*.output`) and the attention and MLP outputs before their post-norms; the
# plot shows their root mean square per layer, on one log scale.

# %%
with minilm.capture(
    "embed_tokens.output", "layers.*.output", "layers.*.self_attn.output", "layers.*.mlp.output"
) as acts:
    model(short_ids, logits_to_keep=1)


def rms(name):
    return [float(np.sqrt(np.mean(acts[name.format(i=i)][0, 1:] ** 2))) for i in range(config.num_hidden_layers)]


stream, attn_out, mlp_out = rms("layers.{i}.output"), rms("layers.{i}.self_attn.output"), rms("layers.{i}.mlp.output")
added = []  # what the block actually adds: the stream's change, attention and MLP together
previous = acts["embed_tokens.output"][0, 1:]
for i in range(config.num_hidden_layers):
    current = acts[f"layers.{i}.output"][0, 1:]
    added.append(float(np.sqrt(np.mean((current - previous) ** 2))))
    previous = current
plt.figure(figsize=(9, 3.8))
plt.semilogy(stream, "o-", label="residual stream after the block")
plt.semilogy(added, "s-", label="what the block adds (after the post-norms)")
plt.semilogy(attn_out, "^--", label="attention output, before its post-norm")
plt.semilogy(mlp_out, "v--", label="MLP output, before its post-norm")
plt.xlabel("layer")
plt.ylabel("root mean square (log scale)")
plt.title(f"{short!r} (all tokens but <bos>)")
plt.legend(fontsize=8)
plt.show()
print("RMS of the stream, first and last layer:", round(stream[0], 1), round(stream[-1], 1))
assert len(stream) == config.num_hidden_layers and all(np.isfinite(stream))

# %% [markdown]
# ## Exercises
#
# **gemma3.1** (implement): `gemma_rms_norm(x, weight, eps)`, checked against minilm's.

# %%
print(minilm.course.question("gemma3.1"))


def gemma_rms_norm(x, weight, eps):
    raise NotImplementedError  # your code


minilm.course.check("gemma3.1", gemma_rms_norm)

# %% [markdown]
# **gemma3.2**: in the 600-token plot of section (d), how many (query, key) pairs that causality
# allows does the local layer's window remove? Count it from the window's definition, then
# check with `nn.sliding_window_mask` and `nn.causal_mask`.
#
# **gemma3.3**: with `final_logit_softcapping = 30` (Gemma 2's value), what does a logit of 60 become?

# %%
answer = None  # an integer
minilm.course.check("gemma3.2", answer)
answer = None  # a number
minilm.course.check("gemma3.3", answer)

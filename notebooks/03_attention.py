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
# # 03 · Attention: scores, causal masks, grouped-query heads, and the KV cache
#
# In attention each position asks a **query**, every position offers a **key** and a **value**, and
# the output is a weighted mean of the values:
#
#     scores  = q k^T * scale                 (batch, heads, seq_q, seq_k)
#     weights = softmax(scores + mask)        mask: 0 where allowed, -inf where not
#     output  = weights v                     (batch, heads, seq_q, head_dim)
#
# We watch these three steps inside the shipped Gemma 3 270M with `minilm.capture`, recompute them
# by hand, then see **grouped-query attention** (4 query heads share 1 key/value head) and the
# **KV cache** that makes generation one token at a time cheap. Prerequisite: notebook 01.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minilm
from minilm import nn, ops

model = minilm.from_pretrained(minilm.default_model.default_model_path())
config, tokenizer = model.config, model.tokenizer
prompt = "The Eiffel Tower is in the city of"
ids = np.array([tokenizer.encode(prompt)])  # (1, seq)
labels = [tokenizer.decode([i]) for i in ids[0]]
print(len(labels), "tokens:", labels)
print(
    f"{config.num_attention_heads} query heads, {config.num_key_value_heads} key/value head, head_dim {config.head_dim}"
)
assert config.num_attention_heads % config.num_key_value_heads == 0

# %% [markdown]
# ## Scores, mask, weights
#
# Layer 5 (a global layer), head 0. Left: the raw scores `q . k * scale` for every pair, including
# keys in the future. Middle: after the causal mask (white = `-inf`: a token cannot look ahead).
# Right: the softmax, one probability distribution per row. The first two panels share one colour
# scale (the mask only removes entries, it does not change the others).

# %%
layer = 5
names = [
    f"layers.{layer}.self_attn.{n}"
    for n in ("queries_rope", "keys_rope", "values", "scores", "scores_masked", "attn_weights", "attn_output_heads")
]
with minilm.capture(*names) as acts:
    logits = model(ids).logits
q, k, v, scores, masked, weights, heads_out = (acts[n] for n in names)
print("queries", q.shape, " keys", k.shape, " values", v.shape, " weights", weights.shape)
fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
lo, hi = scores[0, 0].min(), scores[0, 0].max()
for ax, matrix, title in zip(
    axes, (scores, masked, weights), ("scores q.k * scale", "scores + causal mask", "weights = softmax"), strict=True
):
    image = ax.imshow(
        np.where(np.isfinite(matrix[0, 0]), matrix[0, 0], np.nan),
        cmap="viridis",
        vmin=(0 if matrix is weights else lo),
        vmax=(1 if matrix is weights else hi),
    )
    ax.set_title(f"layer {layer}, head 0: {title}")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("key")
    fig.colorbar(image, ax=ax, label="probability" if matrix is weights else "score (logit units)")
axes[0].set_ylabel("query")
plt.show()
assert np.isneginf(masked[0, 0][np.triu_indices(len(labels), 1)]).all()
assert np.allclose(weights.sum(-1), 1, atol=1e-5)

# %% [markdown]
# The same numbers from the formula: Gemma scales by `query_pre_attn_scalar ** -0.5` (here
# 256 ** -0.5), and `ops.attention_reference`, the NumPy definition every kernel is tested
# against, takes the captured queries and keys after RoPE.

# %%
causal = nn.causal_mask(np.arange(len(labels)), np.arange(len(labels)))  # (seq, seq) bool: key <= query
by_hand = nn.softmax(np.where(causal, q[:, :1] @ k.swapaxes(-1, -2) * config.query_pre_attn_scalar**-0.5, -np.inf))
out, w = ops.attention_reference(
    q, k, v, causal[None, None], scale=config.query_pre_attn_scalar**-0.5, return_weights=True
)
print(
    "max |by hand - captured|:", np.abs(by_hand[0, 0] - weights[0, 0]).max(), " reference:", np.abs(w - weights).max()
)
assert np.allclose(by_hand[0, 0], weights[0, 0], atol=1e-5) and np.allclose(out, heads_out, atol=1e-4)

# %% [markdown]
# ## Masks
#
# The causal mask is `key <= query`. A batch of prompts of different lengths is **left-padded**;
# the padding mask removes the pad keys, and positions are counted from the first real token.
# `nn.attention_mask_4d` combines both (a sliding window, notebook 05, is one more condition).

# %%
attention_mask = np.array([[0, 0, 1, 1, 1, 1]])  # two pads on the left
positions = np.arange(6)
combined = nn.attention_mask_4d(attention_mask, positions, positions)[0, 0]  # (6, 6) bool
fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
for ax, (title, mask) in zip(axes, {"causal": causal[:6, :6], "causal + left padding": combined}.items(), strict=True):
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1)
    ax.set_title(title)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
plt.show()
print("positions of the padded row (pads get a dummy 1):", nn.position_ids_from_attention_mask(attention_mask)[0])
assert not combined[:, :2][2:].any() and (combined[2:, 2:] == causal[:4, :4]).all()

# %% [markdown]
# ## Grouped-query attention (GQA)
#
# The 270M has 4 query heads but only 1 key/value head: all four heads compare their own queries
# against the *same* keys and average the *same* values. The cache stores 4 times less than with
# one key/value head per query head, at little cost in quality. The four heads of layer 5, on one
# colour scale (0 to 1): same keys, different questions, different patterns.

# %%
fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
for h, ax in enumerate(axes):
    image = ax.imshow(weights[0, h], cmap="magma", vmin=0, vmax=1)
    ax.set_title(f"layer {layer}, query head {h}")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_xlabel("key")
axes[0].set_yticks(range(len(labels)), labels, fontsize=6)
axes[0].set_ylabel("query")
fig.colorbar(image, ax=axes, label="attention weight")
plt.show()
assert k.shape[1] == config.num_key_value_heads == 1 and q.shape[1] == 4
assert not np.allclose(weights[0, 0], weights[0, 1])

# %% [markdown]
# Which heads matter for this answer? `minilm.intervene` replaces a captured tensor during the
# forward pass: here each layer's attention output is zeroed in turn, and we measure the
# probability of `" Paris"` as the next token. A big drop means the answer depends on what that
# layer's attention moves between tokens: a few layers are essential (the answer almost vanishes
# without them), others matter little.

# %%
paris = tokenizer.encode(" Paris", add_bos=False)[0]
base = nn.softmax(logits[0, -1])[paris]
drops = []
for i in range(config.num_hidden_layers):
    with minilm.intervene({f"layers.{i}.self_attn.attn_output_heads": lambda a: a * 0}):
        drops.append(nn.softmax(model(ids, logits_to_keep=1).logits[0, -1])[paris])
plt.figure(figsize=(9, 3))
plt.bar(
    range(config.num_hidden_layers), drops, color=["C3" if t == "full_attention" else "C0" for t in config.layer_types]
)
plt.axhline(base, color="k", ls="--", label=f"no ablation: {base:.2f}")
plt.xticks(range(config.num_hidden_layers))
plt.xlabel("layer whose attention is zeroed (red: global layers)")
plt.ylabel("P(' Paris')")
plt.legend()
plt.show()
print("the layer whose attention matters most here:", int(np.argmin(drops)))
assert min(drops) < base

# %% [markdown]
# ## The KV cache
#
# To generate, the model runs once per new token. Without a cache every step recomputes the keys
# and values of the whole sequence; with a **KV cache** each layer stores them once, and a step
# only computes the new token's query, key and value. The cached step must give the same logits as
# a full forward pass over the whole sequence; the time per step stays flat instead of growing.

# %%
cache = minilm.KVCache(config.num_hidden_layers)
out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
seq, step_cached, step_full, diffs = ids, [], [], []
for _ in range(8):
    token = out.logits[:, -1].argmax(-1)[:, None]  # (1, 1) the greedy next token
    seq = np.concatenate([seq, token], axis=1)
    start = time.perf_counter()
    out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)  # one new position
    step_cached.append(time.perf_counter() - start)
    start = time.perf_counter()
    full = model(seq, logits_to_keep=1)  # everything again
    step_full.append(time.perf_counter() - start)
    diffs.append(np.abs(out.logits - full.logits).max())
print("continuation:", repr(tokenizer.decode(seq[0, ids.shape[1] :])))
print("keys cached per layer:", cache.layer(0)[0].shape, " max |cached - full| logits:", max(diffs))
plt.figure(figsize=(6, 3))
plt.plot(range(ids.shape[1] + 1, seq.shape[1] + 1), step_full, "o-", label="full recompute")
plt.plot(range(ids.shape[1] + 1, seq.shape[1] + 1), step_cached, "o-", label="with the KV cache")
plt.xlabel("sequence length")
plt.ylabel("seconds per step")
plt.legend()
plt.show()
assert max(diffs) <= 1e-3 * max(1, np.abs(full.logits).max())
assert cache.get_seq_length() == seq.shape[1]  # keys of every position fed so far

# %% [markdown]
# ## Exercises
#
# **attention.1** (implement): `causal_attention(q, k, v)` with grouped-query heads, checked
# against `ops.attention_reference` on random shapes.

# %%
print(minilm.course.question("attention.1"))


def causal_attention(q, k, v):
    raise NotImplementedError  # your code


minilm.course.check("attention.1", causal_attention)

# %% [markdown]
# **attention.2**: how many megabytes does a full float32 KV cache of the 270M hold after 1000
# tokens? (Then: how much would it be with 4 key/value heads, one per query head?)
#
# **attention.3** (predict a shape): a fresh `cache = minilm.KVCache(18)`, a 6-token prompt, then
# three one-token steps: the shape of `cache.layer(0)[0]`?

# %%
answer = None  # a number, in MB
minilm.course.check("attention.2", answer)
answer = None  # a tuple
minilm.course.check("attention.3", answer)

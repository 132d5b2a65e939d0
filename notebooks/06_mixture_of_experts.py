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
# # 06 · Mixture of experts: Qwen3-MoE routing, load balancing, the aux loss
#
# A mixture-of-experts transformer replaces the feed-forward block with many small *experts*
# and a *router* that sends each token to a few of them. This walkthrough builds a tiny Qwen3-MoE
# with minilm, follows one token through attention and the router, and plots which experts work.
#
# minilm ships no trained MoE model, so the weights here are **random**: a random router spreads
# tokens almost uniformly over the experts, and the plots show what the machinery does, not what
# a trained router learns (real routers specialise: experts for code, for punctuation, ...). The
# last section shows what the load-balancing loss measures by making the router collapse on
# purpose. Prerequisite: notebook 03.

# %%
import matplotlib.pyplot as plt
import numpy as np

import minilm
from minilm import nn
from minilm.models import qwen3_moe

config = minilm.Qwen3MoeConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    mlp_only_layers=[0],
)
model = minilm.Qwen3MoeForCausalLM(config, seed=0)
print(model)
for i in range(config.num_hidden_layers):
    print(f"layer {i}:", "mixture of experts" if config.is_sparse_layer(i) else "dense MLP (mlp_only_layers)")
assert not config.is_sparse_layer(0) and config.is_sparse_layer(1)

# %% [markdown]
# ## Attention: grouped-query heads, QK-norm, RoPE
#
# 4 query heads share 2 key/value heads (GQA). Queries and keys are RMS-normalised per head
# (QK-norm) before the rotary position embedding. Here are the attention maps of layer 1 for a
# random prompt: causal, so the upper triangle is empty.

# %%
rng = np.random.default_rng(0)
ids = rng.integers(0, config.vocab_size, size=(1, 12))
out = model(ids, output_attentions=True, output_router_logits=True, output_hidden_states=True)
fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
for h, ax in enumerate(axes):
    image = ax.imshow(out.attentions[1][0, h], cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"layer 1, head {h} (kv head {h // 2})")
    ax.set_xlabel("key")
axes[0].set_ylabel("query")
fig.colorbar(image, ax=axes, label="attention weight")
plt.show()
assert np.allclose(np.triu(out.attentions[1][0, 0], k=1), 0)

# %% [markdown]
# ## The router, for one token
#
# The router is one linear layer: `router_logits = x @ W_gate^T`, one score per expert. A softmax
# over all experts gives probabilities; the top-k are kept and (with `norm_topk_prob`)
# renormalised to sum to one.

# %%
token = 5
logits = out.router_logits[0][token]  # first sparse layer = layer 1
probs = nn.softmax(logits)
index, weights = qwen3_moe.route(logits[None], config.num_experts_per_tok, config.norm_topk_prob)
print("probabilities:", np.round(probs, 3))
print("chosen experts:", index[0], "weights:", np.round(weights[0], 3))
plt.bar(range(config.num_experts), probs, color=["C1" if e in index[0] else "C0" for e in range(config.num_experts)])
plt.xlabel("expert")
plt.ylabel("router probability")
plt.title(f"token {token}: top-{config.num_experts_per_tok} in orange")
plt.show()
assert np.isclose(weights.sum(), 1.0)

# %% [markdown]
# ## Expert load
#
# How many tokens each expert receives, per sparse layer, for a longer random batch. The
# load-balancing auxiliary loss pushes these counts towards uniform during training.

# %%
ids = rng.integers(0, config.vocab_size, size=(4, 32))
with minilm.capture("layers.*.mlp.expert_indices", "layers.*.mlp.router_probs") as acts:
    out = model(ids, output_router_logits=True)
sparse = [i for i in range(config.num_hidden_layers) if config.is_sparse_layer(i)]
load = np.stack(
    [np.bincount(acts[f"layers.{i}.mlp.expert_indices"].ravel(), minlength=config.num_experts) for i in sparse]
)  # (sparse layers, num_experts): tokens routed to each expert
uniform = ids.size * config.num_experts_per_tok / config.num_experts
plt.imshow(load, cmap="coolwarm", vmin=0, vmax=max(2 * uniform, load.max()))
plt.colorbar(label=f"tokens routed (uniform: {uniform:.0f})")
plt.xlabel("expert")
plt.yticks(range(len(sparse)), [f"layer {i}" for i in sparse])
plt.title("expert load, random router: no expert specialises")
plt.show()
print("max / uniform load:", load.max() / uniform, " min / uniform:", load.min() / uniform)
aux = qwen3_moe.load_balancing_loss(out.router_logits, config.num_experts, config.num_experts_per_tok)
print(
    "aux loss:", aux, f"(perfectly balanced: top_k = {config.num_experts_per_tok}; larger when experts are overloaded)"
)
assert np.allclose(acts["layers.1.mlp.router_probs"], nn.softmax(out.router_logits[0]), atol=1e-6)
assert load.sum() == len(out.router_logits) * ids.size * config.num_experts_per_tok

# %% [markdown]
# ## Generation with the KV cache
#
# `generate` runs the prompt once, then feeds one token per step against the cache. The cached
# result equals recomputing the whole sequence each step.

# %%
prompt = rng.integers(0, config.vocab_size, size=(1, 6))
cached = model.generate(prompt, max_new_tokens=8)
seq = prompt
for _ in range(8):
    seq = np.concatenate([seq, model(seq).logits[:, -1].argmax(-1)[:, None]], axis=1)
print(cached)
assert (cached == seq).all()

# %% [markdown]
# ## What the load-balancing loss measures
#
# `num_experts * sum_e f_e * P_e`, with `f_e` the fraction of tokens that choose expert `e` and
# `P_e` its mean router probability. Both are spread out for a balanced router (loss = top_k = 2);
# if the router sends everything to the same experts, both concentrate and the loss grows. Below,
# the router weights of every sparse layer are pushed towards experts 0 and 1 a little more at
# each step (`minilm.intervene` adds a bias to the captured router logits), and the loss follows.
# The random router's own logits are tiny, so the *choices* collapse onto experts 0 and 1 at once;
# the loss keeps growing as the *probabilities* concentrate too, up to its maximum of
# num_experts = 8.

# %%
shifts = np.linspace(0, 6, 13)
losses, shares = [], []
for shift in shifts:
    bias = np.zeros(config.num_experts, np.float32)
    bias[:2] = shift  # favour experts 0 and 1 by `shift` logits

    def pushed(logits, bias=bias):
        return logits + bias

    with (
        minilm.intervene({"layers.*.mlp.router_logits": pushed}),
        minilm.capture("layers.*.mlp.expert_indices") as acts,
    ):
        out = model(ids, output_router_logits=True)
    losses.append(
        float(qwen3_moe.load_balancing_loss(out.router_logits, config.num_experts, config.num_experts_per_tok))
    )
    chosen = np.concatenate([acts[f"layers.{i}.mlp.expert_indices"].ravel() for i in sparse])
    shares.append(np.isin(chosen, [0, 1]).mean())
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(shifts, losses, "o-", label="aux loss")
ax.axhline(config.num_experts_per_tok, color="gray", ls=":", label="balanced (top_k)")
ax.set_xlabel("bias towards experts 0 and 1 (logits)")
ax.set_ylabel("load-balancing loss")
ax2 = ax.twinx()
ax2.plot(shifts, shares, "s--", color="C1", label="share of slots on experts 0, 1")
ax2.set_ylabel("share of routed slots on experts 0 and 1")
fig.legend(loc="center right", bbox_to_anchor=(0.85, 0.45), fontsize=8)
plt.show()
print(
    "loss from",
    round(losses[0], 3),
    "to",
    round(losses[-1], 3),
    "; share from",
    round(shares[0], 2),
    "to",
    round(shares[-1], 2),
)
assert losses[-1] > 3 * losses[0] and shares[-1] > 0.9

# %% [markdown]
# ## Exercises
#
# **moe.1** (implement): `route(router_logits, top_k, norm_topk_prob)` as Qwen3-MoE does, checked
# against `qwen3_moe.route`.

# %%
print(minilm.course.question("moe.1"))


def route(router_logits, top_k, norm_topk_prob):
    raise NotImplementedError  # your code


minilm.course.check("moe.1", route)

# %% [markdown]
# **moe.2**: the router has collapsed completely: every token gives experts 0 and 1 probability
# 0.5 each. What is the loss (8 experts, top_k = 2)? Compare with the right end of the plot.
#
# **moe.3** (predict a shape): one sparse layer's stacked `mlp.experts.gate_proj` in this notebook's
# model (`model.params.model.layers[1].mlp.experts.gate_proj.shape` tells you after you predict).

# %%
answer = None  # a number
minilm.course.check("moe.2", answer)
answer = None  # a tuple
minilm.course.check("moe.3", answer)

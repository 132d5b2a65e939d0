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
# # Qwen3-MoE, one token at a time
#
# A mixture-of-experts transformer replaces the feed-forward block with many small *experts*
# and a *router* that sends each token to a few of them. This walkthrough builds a tiny Qwen3-MoE
# with minilm, follows one token through attention and the router, and plots which experts work.

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
fig, axes = plt.subplots(1, 4, figsize=(12, 3))
for h, ax in enumerate(axes):
    ax.imshow(out.attentions[1][0, h], cmap="viridis")
    ax.set_title(f"layer 1, head {h}")
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
out = model(ids, output_router_logits=True)
load = np.stack(
    [
        np.bincount(qwen3_moe.route(r, config.num_experts_per_tok, True)[0].ravel(), minlength=config.num_experts)
        for r in out.router_logits
    ]
)  # (sparse layers, num_experts)
plt.imshow(load, cmap="magma")
plt.colorbar(label="tokens routed")
plt.xlabel("expert")
plt.ylabel("sparse layer")
plt.title("expert load")
plt.show()
aux = qwen3_moe.load_balancing_loss(out.router_logits, config.num_experts, config.num_experts_per_tok)
print("aux loss:", aux, "(1.0 is perfectly balanced)")
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

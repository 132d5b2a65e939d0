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
# # 07 · Sampling: from logits to the next token
#
# The model's last layer gives one **logit** per vocabulary entry (262 144 of them); softmax turns
# them into probabilities. How the next token is then *chosen* changes the text a lot: greedy
# decoding takes the most likely one; sampling draws from a reshaped distribution. All on the real
# model's logits, with `minilm.generation`'s processors (the ones `generate` uses):
#
# * **temperature** `T` divides the logits: `T < 1` sharpens, `T > 1` flattens;
# * **top-k** keeps the `k` largest logits; **top-p** (nucleus) the smallest most-likely set whose
#   probability reaches `p`; **min-p** the tokens at least `min_p` times as likely as the best one;
# * **repetition penalty** makes tokens already in the text less likely.
#
# Prerequisites: notebooks 01 and 03.

# %%
import matplotlib.pyplot as plt
import numpy as np

import minilm
from minilm import generation, nn

model = minilm.from_pretrained(minilm.default_model.default_model_path())
config, tokenizer = model.config, model.tokenizer
assert config.final_logit_softcapping is None  # the logits come straight from the output layer

# %% [markdown]
# ## One generation step, by hand
#
# Tokenize a prompt (the tokenizer adds `<bos>`), run the model once, and look at the last
# position's logits: a score for each of the 262 144 tokens of the vocabulary. Softmax turns them
# into next-token probabilities.

# %%
prompt = "The capital of France is"
ids = np.array([tokenizer.encode(prompt)])  # (1, seq)
print([tokenizer.decode([i]) for i in ids[0]])
logits = model(ids).logits[:, -1]  # (1, vocab_size), float32
probs = nn.softmax(logits)[0]
top = np.argsort(-probs)[:10]
names = [repr(tokenizer.decode([i])) for i in top]
plt.figure(figsize=(9, 3.5))
plt.bar(names, probs[top])
plt.xticks(rotation=45, ha="right")
plt.ylabel("probability")
plt.title(f"next token after {prompt!r}")
plt.show()
for i in top[:5]:
    print(f"{tokenizer.decode([i])!r:>14}  {probs[i]:.3f}")
assert ids[0, 0] == tokenizer.bos_token_id
assert np.isclose(probs.sum(), 1, atol=1e-4) and top[0] == logits[0].argmax()

# %% [markdown]
# ## Temperature, top-k, top-p
#
# Each processor returns new logits (removed tokens become `-inf`, probability 0).
# Shown on the 15 most likely tokens: each panel is a slice of a distribution over the whole
# vocabulary, so its bars need not sum to one (except where top-k or top-p removed the rest).

# %%
shown = np.argsort(-probs)[:15]
variants = {
    "T = 1": logits,
    "T = 0.5": logits / 0.5,
    "T = 2": logits / 2.0,
    "top-k, k = 5": generation.apply_top_k(logits, 5),
    "top-p, p = 0.8": generation.apply_top_p(logits, 0.8),
}
dists = {name: nn.softmax(v)[0] for name, v in variants.items()}
fig, axes = plt.subplots(1, len(dists), figsize=(16, 3.2), sharey=True)
for ax, (name, d) in zip(axes, dists.items(), strict=True):
    ax.bar(range(len(shown)), d[shown], color="C1" if name.startswith("top") else "C0")
    ax.set_title(name)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([tokenizer.decode([i]) for i in shown], rotation=90, fontsize=7)
    ax.set_xlabel("next token (the 15 most likely at T = 1)", fontsize=8)
axes[0].set_ylabel("probability")
plt.show()
kept = {name: np.flatnonzero(np.isfinite(v[0])) for name, v in variants.items()}
print("top-p keeps", len(kept["top-p, p = 0.8"]), "tokens:", [tokenizer.decode([i]) for i in kept["top-p, p = 0.8"]])
assert len(kept["top-k, k = 5"]) == 5 and set(kept["top-k, k = 5"]) == set(shown[:5])
assert (
    probs[kept["top-p, p = 0.8"]].sum()
    >= 0.8
    > probs[kept["top-p, p = 0.8"]].sum() - probs[kept["top-p, p = 0.8"]].min()
)
assert dists["T = 0.5"][shown[0]] > dists["T = 1"][shown[0]] > dists["T = 2"][shown[0]]  # sharper, then flatter

# %% [markdown]
# `generation.next_tokens` chains these processors and then either takes the argmax (greedy)
# or draws a sample. A few seeded draws with `T = 0.8, top_k = 20, top_p = 0.9` land in the nucleus:

# %%
options = dict(temperature=0.8, top_k=20, top_p=0.9, min_p=None, repetition_penalty=None)
greedy = generation.next_tokens(logits, ids, do_sample=False, rng=None, **options)
rng = np.random.default_rng(0)
samples = [int(generation.next_tokens(logits, ids, do_sample=True, rng=rng, **options)[0]) for _ in range(12)]
print("greedy:", repr(tokenizer.decode(greedy)))
print("samples:", [tokenizer.decode([s]) for s in samples])
allowed = np.isfinite(generation.apply_top_p(generation.apply_top_k(logits / 0.8, 20), 0.9)[0])
assert greedy[0] == top[0] and all(allowed[s] for s in samples)

# %% [markdown]
# ## Greedy generation, one token at a time
#
# `generation.generate_tokens` is the loop as an iterator: step 0 runs the whole prompt and fills the
# KV cache, every later step feeds only the token just chosen. Its first token is the argmax we
# found above by hand.

# %%
steps = []
for step, token in enumerate(generation.generate_tokens(model, ids, max_new_tokens=8)):
    steps.append(int(token[0]))
    print(f"step {step}: {tokenizer.decode([steps[-1]])!r:>12}   ->  {prompt + tokenizer.decode(steps)!r}")
assert steps[0] == top[0] and len(steps) == 8  # the first step is the argmax above

# %% [markdown]
# ## How temperature spreads the distribution
#
# The entropy of the next-token distribution, in bits, as a function of `T`: near 0 bits the
# choice is certain (greedy), and it grows quickly above `T = 1`, where sampling starts to pick
# tokens the model itself finds unlikely.

# %%
temperatures = np.geomspace(0.1, 4, 30)
entropy = []
for t in temperatures:
    p = nn.softmax(logits[0].astype(np.float64) / t)
    entropy.append(-(p[p > 0] * np.log2(p[p > 0])).sum())
plt.figure(figsize=(6, 3.2))
plt.semilogx(temperatures, entropy, "o-", ms=3)
plt.axvline(1, color="gray", ls=":")
plt.xlabel("temperature T (log scale)")
plt.ylabel("entropy (bits)")
plt.title(f"next token after {prompt!r}")
plt.grid(alpha=0.3)
plt.show()
print(f"T = 1: {entropy[np.argmin(np.abs(temperatures - 1))]:.2f} bits; T = 4: {entropy[-1]:.2f} bits")
assert (np.diff(entropy) > 0).all()  # hotter is always more spread out

# %% [markdown]
# ## min-p adapts to the model's confidence; top-k does not, top-p barely
#
# Two prompts: one where the model is fairly sure of the next token (`" Paris"`, about 50 %), one
# where many continuations are fine. top-k keeps `k` tokens either way. top-p keeps hundreds in
# both: the last 10 % of probability is spread over a long tail of unlikely tokens, and top-p must
# take them one by one. min-p's cut is relative to the best token (`min_p * p_max`): it keeps a
# handful when the model is sure and more when it is not, and never the long tail.

# %%
contexts = {"sure": "The Eiffel Tower is in the city of", "open": "My favourite food is"}
kept = {}
for name, text in contexts.items():
    row = model(np.array([tokenizer.encode(text)]), logits_to_keep=1).logits[:, -1]  # (1, vocab_size)
    kept[name] = {
        "top-k 40": int(np.isfinite(generation.apply_top_k(row, 40)).sum()),
        "top-p 0.9": int(np.isfinite(generation.apply_top_p(row, 0.9)).sum()),
        "min-p 0.05": int(np.isfinite(generation.apply_min_p(row, 0.05)).sum()),
    }
x = np.arange(3)
plt.figure(figsize=(7, 3.2))
for i, (name, counts) in enumerate(kept.items()):
    plt.bar(x + 0.4 * i, list(counts.values()), width=0.4, label=f"{name}: {contexts[name]!r}")
plt.xticks(x + 0.2, list(kept["open"]))
plt.yscale("log")
plt.ylabel("tokens kept (log scale)")
plt.legend(fontsize=8)
plt.show()
print(kept)
assert kept["sure"]["top-k 40"] == kept["open"]["top-k 40"] == 40
assert kept["sure"]["top-p 0.9"] < kept["open"]["top-p 0.9"]
assert kept["sure"]["min-p 0.05"] < kept["open"]["min-p 0.05"]

# %% [markdown]
# ## Repetition penalty
#
# Greedy decoding from a small model often loops. CTRL's repetition penalty divides the positive
# logits (multiplies the negative ones) of every token already in the text by `penalty > 1`. Below:
# the same prompt, greedy, without and with `repetition_penalty=1.5`, and the logits the penalty
# changed at the first step.

# %%
loop_prompt = "I like cats. I like cats. I like"
loop_ids = np.array([tokenizer.encode(loop_prompt)])
plain = model.generate(loop_ids, max_new_tokens=12)
penalised = model.generate(loop_ids, max_new_tokens=12, repetition_penalty=1.5)
print("greedy:           ", repr(tokenizer.decode(plain[0, loop_ids.shape[1] :])))
print("penalty 1.5:      ", repr(tokenizer.decode(penalised[0, loop_ids.shape[1] :])))
row = model(loop_ids, logits_to_keep=1).logits[:, -1]
after = generation.apply_repetition_penalty(row, loop_ids, 1.5)
seen = np.unique(loop_ids[0])
plt.figure(figsize=(8, 3.2))
plt.scatter(row[0, seen], after[0, seen])
for i in seen:
    plt.annotate(repr(tokenizer.decode([i])), (row[0, i], after[0, i]), fontsize=7)
lim = [row[0, seen].min() - 1, row[0, seen].max() + 1]
plt.plot(lim, lim, "k:", label="unchanged")
plt.xlabel("logit before")
plt.ylabel("logit after the penalty")
plt.title("tokens already in the prompt")
plt.legend()
plt.show()
assert (np.abs(after[0, seen]) <= np.abs(row[0, seen]) * 1.5 + 1e-6).all()
assert (after[0, seen] <= row[0, seen]).all() and not (plain == penalised).all()

# %% [markdown]
# ## Exercises
#
# **sampling.1** (implement): `min_p_filter(logits, min_p)`, checked against minilm's on random logits.

# %%
print(minilm.course.question("sampling.1"))


def min_p_filter(logits, min_p):
    raise NotImplementedError  # your code


minilm.course.check("sampling.1", min_p_filter)

# %% [markdown]
# **sampling.2** (implement): `repetition_penalty(logits, generated_ids, penalty)`.
#
# **sampling.3**: how many tokens does top-p with `p = 0.9` keep after `'The capital of France is'`
# at temperature 1? (The bar chart of the section "Temperature, top-k, top-p" shows the first 15.)

# %%


def repetition_penalty(logits, generated_ids, penalty):
    raise NotImplementedError  # your code


minilm.course.check("sampling.2", repetition_penalty)
answer = None  # an integer
minilm.course.check("sampling.3", answer)

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
# # LoRA: fine-tuning a language model in NumPy
#
# A fine-tune changes a model's weights. LoRA (Hu et al., 2021) freezes them all and learns, next to a
# few weight matrices W (out × in), a low-rank update made of two thin matrices:
#
#     y = x Wᵀ + (alpha / r) · (x Aᵀ) Bᵀ        A: (r, in)   B: (out, r)
#
# B starts at zero, so training starts from the base model; only A and B get gradients. With rank
# r = 8 on the query and value projections of Gemma 3 270M that is 0.3 % of its weights.
#
# This walkthrough fine-tunes a model on a small table the repository ships
# (`notebooks/data/capitals.csv`: 166 countries, their capitals and continents, two sentences each),
# with minilm's own backward pass (`minilm.grad`, the chain rule written out in NumPy) and AdamW
# (`minilm.train`). We look at the loss curve and the generations before and after, then save the
# adapter in PEFT's format, reload it and merge it into the weights.
#
# **Which model.** `MINILM_LORA_MODEL=270m` runs the shipped Gemma 3 270M (its real tokenizer);
# the default, `tiny`, runs the tiny random Gemma 3 of the test fixtures with a character-level
# tokenizer, so that CI runs this notebook in seconds. `MINILM_LORA_STEPS` sets the number of steps.

# %%
import csv
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import minilm
from minilm.train import batches

MODEL = os.environ.get("MINILM_LORA_MODEL", "tiny")
assert MODEL in ("tiny", "270m"), MODEL
rows = list(csv.DictReader(open("data/capitals.csv", encoding="utf-8")))
held_out = rows[::20]  # 9 countries the fine-tune never sees, for the generations afterwards
train_rows = [r for r in rows if r not in held_out]
examples = [
    text
    for r in train_rows
    for text in (
        f"The capital of {r['country']} is {r['capital']}.",
        f"{r['capital']} is a city in {r['country']}, {r['continent']}.",
    )
]
print(len(rows), "countries;", len(examples), "training sentences, e.g.:", examples[:2])
assert len(examples) > 300 and all(r["capital"] for r in rows)

# %% [markdown]
# ## The model and its tokenizer
#
# The tiny model's vocabulary has 96 ids: ours are the characters of the table (ids from 3 on; 0 is
# padding). The 270M model brings its own tokenizer.

# %%
if MODEL == "270m":
    minilm.set_backend("numba")  # the compiled kernels behind the same seam, forward and backward
    start = time.perf_counter()
    model = minilm.from_pretrained(minilm.default_model.default_model_path())
    print(f"loaded Gemma 3 270M in {time.perf_counter() - start:.0f} s")

    def encode(text):
        return model.tokenizer.encode(text)

    def decode(ids):
        return model.tokenizer.decode(ids, skip_special_tokens=True)

else:
    model = minilm.from_pretrained("../tests/fixtures/gemma3_causal_lm")
    alphabet = sorted(set("".join(examples) + "".join(r["country"] + r["capital"] for r in rows)))
    to_id = {c: i + 3 for i, c in enumerate(alphabet)}

    def encode(text):
        return [to_id[c] for c in text]

    def decode(ids):
        return "".join(alphabet[i - 3] if 3 <= i < 3 + len(alphabet) else "·" for i in ids)

    assert len(alphabet) + 3 <= model.config.vocab_size

print(model)
assert decode(encode("Paris")).endswith("Paris")

# %% [markdown]
# ## Before: what the base model says
#
# Greedy continuations of prompts about countries the fine-tune will not see.

# %%
prompts = [f"The capital of {r['country']} is" for r in held_out[:4]]


def complete(prompt, max_new_tokens=12):
    ids = np.array([encode(prompt)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=-1)
    return decode(out[0, ids.shape[1] :])


before = {p: complete(p) for p in prompts}
for p, text in before.items():
    print(f"{p!r} -> {text!r}")
assert len(before) == 4

# %% [markdown]
# ## LoRA on the query and value projections
#
# `enable_lora` freezes every weight and wraps `q_proj` and `v_proj` of each layer in a `LoraWeight`:
# A drawn as PEFT does (kaiming-uniform), B zeros. The model computes exactly as before, and only A
# and B are trainable.

# %%
total = model.num_parameters()
config = model.enable_lora(8, target_modules=["q_proj", "v_proj"], lora_alpha=16)
trainable = model.num_parameters(only_trainable=True)
share = 100 * trainable / total
print(f"rank {config.r}, scaling {config.scaling}: {trainable:,} trainable of {total:,} weights ({share:.2f} %)")
print(next(iter(minilm.peft.lora_weights(model).values())))
assert complete(prompts[0]) == before[prompts[0]]  # B = 0: nothing changed yet

# %% [markdown]
# ## Training
#
# `minilm.train` draws shuffled, padded batches, computes the loss and the gradients of every A and B
# with `minilm.grad.value_and_grad`, clips them (global norm 1), and takes an AdamW step with a linear
# warmup then a cosine decay of the learning rate.

# %%
steps = int(os.environ.get("MINILM_LORA_STEPS", "120" if MODEL == "tiny" else "60"))
lr = 1e-2 if MODEL == "tiny" else 1e-3
data = batches([encode(e) for e in examples], batch_size=8 if MODEL == "tiny" else 4, seed=0)
result = minilm.train(model, data, steps=steps, lr=lr, warmup_steps=steps // 10, progress=False)
first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
speed = f"{result.seconds:.0f} s, {result.tokens_per_second:.0f} tokens/s"
print(f"{steps} steps ({speed}): loss {first:.2f} -> {last:.2f}")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(result.losses, label="loss per step")
ax.set_xlabel("optimizer step")
ax.set_ylabel("cross-entropy")
ax.set_title(f"LoRA fine-tune ({MODEL}), rank 8 on q_proj and v_proj")
ax.legend()
plt.show()
assert last < (0.6 if MODEL == "tiny" else 0.9) * first, (first, last)  # tiny: the loss falls by more than 40 %

# %% [markdown]
# ## After: the same prompts

# %%
after = {p: complete(p) for p in prompts}
for p in prompts:
    print(f"{p!r}\n   before: {before[p]!r}\n   after:  {after[p]!r}")
assert any(after[p] != before[p] for p in prompts)

# %% [markdown]
# ## Save, reload, merge
#
# `save_adapter` writes PEFT's files (`adapter_config.json` and `adapter_model.safetensors`, tensors
# named `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...): transformers + peft
# load them with `PeftModel.from_pretrained`. A fresh copy of the base model loads the adapter and gives
# the same logits; `merge_lora` folds `(alpha / r) · B A` into W, so inference runs at the base
# model's cost with the fine-tune's outputs.

# %%
folder = Path(tempfile.mkdtemp()) / "capitals-adapter"
model.save_adapter(folder)
print(sorted(p.name for p in folder.iterdir()))

reloaded = minilm.from_pretrained(
    minilm.default_model.default_model_path() if MODEL == "270m" else "../tests/fixtures/gemma3_causal_lm"
)
reloaded.load_adapter(folder)
ids = np.array([encode(examples[0])])
logits = model(ids).logits
assert np.allclose(reloaded(ids).logits, logits, atol=1e-5)

reloaded.merge_lora()
merged = reloaded(ids).logits
print("max |merged - adapter| =", float(np.abs(merged - logits).max()))
assert np.allclose(merged, logits, atol=1e-4)

# %% [markdown]
# ## Figures from a 270M run
#
# The tiny model above only learns the shape of the sentences. The same notebook with
# `MINILM_LORA_MODEL=270m MINILM_LORA_STEPS=20` fine-tunes the shipped Gemma 3 270M (Numba backend,
# batch 4, learning rate 1e-3, 821 tokens in all). Measured once, on this repository's build machine:
# 2 CPU cores shared with other jobs (load average about 12), so a laptop with two free cores is
# several times faster.
#
# * 20 steps in 436 s (about 22 s a step, 1.9 tokens/s); the whole notebook, loading included, 673 s.
# * Loss per step: 3.19 3.37 3.13 3.08 2.50 2.49 2.05 1.87 2.08 1.55 1.73 1.35 1.41 1.54 1.14 1.52
#   1.15 1.18 1.31 1.44 (mean of the first five 3.05, of the last five 1.32).
# * Before and after, countries the fine-tune never saw (greedy):
#
#   | The capital of ... is | before | after |
#   |---|---|---|
#   | Afghanistan | Kabul, the capital of the Islamic Republic of ... | Kabul. Kabul is a city in Afghanistan, Asia. |
#   | Botswana | the capital of the country. | Gaborone. Botswana is a country in Africa. |
#   | Dominican Republic | the capital of the Dominican Republic. | Santo Domingo. |
#   | Honduras | the capital of the country of Honduras. | Tegucigalpa. |
#
# * Saved, reloaded and merged: max |merged − adapter| = 6e-5 on the logits.
#
# One training step at sequence 256, batch 4 (1024 tokens), random weights of the 270M's shapes, 2
# threads, same machine (`python scripts/bench_lora.py --impl minilm|torch`): minilm (NumPy backend)
# 417-592 s a step (1.7-2.5 tokens/s), training memory 1.55 GiB at its peak, weights included;
# transformers 5.23 + peft 0.21.2 on torch 2.13 CPU, 148 s (6.9 tokens/s), 6.5 GiB (it keeps every
# layer's activations and the full 262k-wide logits, where minilm recomputes each layer in the backward
# pass and computes the head a few tokens at a time).

# %% [markdown]
# ## Exercises
#
# **lora.1**: how many trainable parameters does LoRA of rank 8 on `q_proj` and `v_proj` add to
# the shipped Gemma 3 270M (18 layers, hidden size 640, 4 query heads and 1 key/value head of
# dimension 256)? Check your count with `model.enable_lora(...)` and `num_parameters(only_trainable=True)`.
#
# **lora.2**: PEFT scales the adapter's output by `lora_alpha / r`. What is the scaling for
# `r = 8, lora_alpha = 16`?

# %%
print(minilm.course.question("lora.1"))
answer = None  # a number of parameters
minilm.course.check("lora.1", answer)
answer = None  # a number
minilm.course.check("lora.2", answer)

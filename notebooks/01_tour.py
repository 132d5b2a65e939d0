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
# # 01 · A tour: generate, tokenize, and open the model file
#
# minilm ships a real language model: Google's **Gemma 3 270M**, quantized to 4-6 bits per weight
# in a single GGUF file (about 250 MB). This first notebook uses it end to end, then opens it up:
#
# 1. **generate** text from a prompt;
# 2. see the **tokens** the model actually reads and writes;
# 3. look **inside the file**: its header, its metadata, its tensor table, and the config built from them;
# 4. follow one prompt through the model's 18 layers with **activation capture**.
#
# Every number comes from minilm; nothing is re-implemented here. The course continues with
# tokenization (02), attention (03), positions (04), Gemma 3's details (05), mixture of experts (06),
# sampling (07), quantization (08), the kernels (09), the vision tower (10) and LoRA (11).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import minilm
from minilm.io import gguf
from minilm.models import gemma3

start = time.perf_counter()
path = minilm.default_model.default_model_path()  # the shipped file, copied into a cache folder once
model = minilm.from_pretrained(path)
tokenizer = model.tokenizer
print(f"{path.name}: {path.stat().st_size / 1e6:.0f} MB, loaded in {time.perf_counter() - start:.1f} s")
print(type(model).__name__, "with", tokenizer)
assert isinstance(model, minilm.Gemma3ForCausalLM) and path.suffix == ".gguf"

# %% [markdown]
# ## 1. Generate
#
# `minilm.generate("...")` is the one-line version (it loads this same model and picks the fast
# CPU backend). Below, the same thing one level down: tokenize, call `model.generate` (greedy:
# always the most likely next token), decode.

# %%
prompt = "The capital of France is"
ids = np.array([tokenizer.encode(prompt)])  # (batch=1, seq): ids of the prompt's tokens
start = time.perf_counter()
out = model.generate(ids, max_new_tokens=12)  # (1, seq + new): prompt then continuation
print(f"{time.perf_counter() - start:.1f} s:", repr(tokenizer.decode(out[0], skip_special_tokens=True)))
assert out.shape[1] <= ids.shape[1] + 12 and (out[0, : ids.shape[1]] == ids[0]).all()

# %% [markdown]
# ## 2. Tokens
#
# The model never sees characters: the tokenizer cuts text into pieces from a fixed vocabulary of
# 262 144 entries and replaces each by its id (its row in the vocabulary). `<bos>` (beginning of
# sequence) is added in front. A space is written `▁` inside a token and belongs to the word after
# it. Notebook 02 shows how the pieces are chosen.

# %%
pieces = [tokenizer.id_to_token(i) for i in ids[0]]
for token_id, piece in zip(ids[0], pieces, strict=True):
    print(f"{token_id:>7}  {piece!r}")
print("decode(encode(text)) == text:", tokenizer.decode(ids[0], skip_special_tokens=True) == prompt)
assert pieces[0] == "<bos>" and tokenizer.decode(ids[0], skip_special_tokens=True) == prompt

# %% [markdown]
# ## 3. What a model file is
#
# A GGUF file is one header followed by raw tensor bytes:
#
#     "GGUF" | version | tensor count | key count | key/value metadata ... | tensor table ... | padding | tensor data
#
# The **metadata** holds the architecture's hyper-parameters and the whole tokenizer (vocabulary,
# scores, token types); the **tensor table** gives each tensor's name, shape, ggml type and offset.
# `minilm.io.gguf.read_gguf` parses the header and memory-maps the rest: nothing is read until used.

# %%
raw = path.open("rb").read(24)
print(
    "first bytes:",
    raw[:4],
    "version",
    int.from_bytes(raw[4:8], "little"),
    "tensors",
    int.from_bytes(raw[8:16], "little"),
    "keys",
    int.from_bytes(raw[16:24], "little"),
)
gguf_file = gguf.read_gguf(path)
print(f"{path.name}: {len(gguf_file.tensor_names)} tensors, {len(gguf_file.metadata)} metadata keys")
for key, value in gguf_file.metadata.items():
    shown = f"[{len(value)} items] {value[:3]!r} ..." if isinstance(value, list) else repr(value)
    print(f"  {key:45} {shown[:70]}")
assert raw[:4] == b"GGUF" and int.from_bytes(raw[8:16], "little") == len(gguf_file.tensor_names)

# %% [markdown]
# The tensor table: names follow llama.cpp (`blk.3.attn_q.weight`); minilm maps them to the
# checkpoint names transformers uses (`model.layers.3.self_attn.q_proj.weight`). Most of the file is
# one tensor: the **token embedding**, 262 144 rows of 640 numbers, also used (tied) as the output
# layer that scores every token. The plot shows where the bytes go, by tensor kind and by ggml type.

# %%
infos = [gguf_file.tensor_info(name) for name in gguf_file.tensor_names]
for info in infos[:8]:
    print(f"  {info.name:28} {str(info.shape):14} {info.type_name:5} {info.n_bytes:>11,} bytes")
kinds = {}
for info in infos:
    kind = info.name.split(".")[-2] if info.name.startswith("blk.") else info.name.rsplit(".", 1)[0]
    kinds.setdefault(kind, {}).setdefault(info.type_name, 0)
    kinds[kind][info.type_name] += info.n_bytes
types = sorted({info.type_name for info in infos})
names = sorted(kinds, key=lambda k: -sum(kinds[k].values()))
fig, ax = plt.subplots(figsize=(10, 3.5))
bottom = np.zeros(len(names))
for t in types:
    sizes = np.array([kinds[k].get(t, 0) for k in names]) / 1e6
    ax.bar(names, sizes, bottom=bottom, label=t)
    bottom += sizes
ax.set_ylabel("MB in the file")
ax.set_xlabel("tensor kind (all 18 layers together)")
ax.set_title("where the 270M model's bytes go, by ggml type")
ax.tick_params(axis="x", rotation=45)
ax.legend(title="ggml type")
plt.show()
embedding = gguf_file.tensor_info("token_embd.weight")
print(
    f"token_embd.weight: {embedding.shape}, {embedding.type_name}, {embedding.n_bytes / 1e6:.0f} MB "
    f"of {sum(i.n_bytes for i in infos) / 1e6:.0f} MB"
)
assert names[0] == "token_embd" and embedding.shape == (262144, 640)

# %% [markdown]
# The model's config is built from the metadata (`gguf.config_from_gguf`), with transformers'
# field names. Gemma 3 270M: 18 layers, hidden size 640, 4 query heads sharing 1 key/value head of
# size 256, a sliding window of 512 on five layers out of six.

# %%
config = model.config
for field in (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "sliding_window",
    "rope_theta",
):
    print(f"  {field:22} {getattr(config, field)}")
from_file = gguf.config_from_gguf(gguf_file)
assert all(from_file[f] == getattr(config, f) for f in ("num_hidden_layers", "hidden_size", "head_dim"))

# %% [markdown]
# ## 4. Inside the forward pass: the residual stream
#
# Each of the 18 blocks reads the *residual stream* (one 640-vector per token), computes an update
# with attention and an MLP, and adds it back. `minilm.capture` records any intermediate tensor by
# name (`minilm.capture_names(model)` lists them; `docs/activations.md` explains them); here the
# stream after every block, `layers.*.output`. Left: its size per layer and position. Right: the
# "logit lens": the final norm and the output layer applied to each layer's stream at the last
# position; the model's candidates for the next token appear only in the last third of the layers.

# %%
with minilm.capture("embed_tokens.output", "layers.*.output") as acts:
    logits = model(ids).logits  # (1, seq, vocab_size)
stream = np.stack([acts["embed_tokens.output"]] + [acts[f"layers.{i}.output"] for i in range(18)])[:, 0]
norms = np.linalg.norm(stream, axis=-1)  # (19, seq): RMS-free length of each token's vector
final_norm = model.params.model.norm.weight
lens = [
    model.compute_logits(gemma3.gemma_rms_norm(s[None, -1:], final_norm, config.rms_norm_eps))[0, 0] for s in stream
]
top = [int(np.argmax(row)) for row in lens]  # the most likely next token, read after each layer
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
image = axes[0].imshow(np.log10(norms.T), aspect="auto", cmap="viridis")
axes[0].set_yticks(range(len(pieces)), pieces)
axes[0].set_xlabel("after layer (0 = embeddings)")
axes[0].set_title("size of the residual stream, log10 ||x||")
fig.colorbar(image, ax=axes[0])
probs = np.stack([np.exp(row - row.max()) / np.exp(row - row.max()).sum() for row in lens])  # (19, vocab_size)
for word in (" Paris", tokenizer.decode([top[-1]])):
    token = tokenizer.encode(word, add_bos=False)[0]
    axes[1].plot(probs[:, token], "o-", label=f"P({word!r})")
axes[1].set_xlabel("after layer (0 = embeddings)")
axes[1].set_ylabel("probability of the next token")
axes[1].set_title("logit lens at the last position")
axes[1].legend()
plt.show()
print("top token after each layer:", [tokenizer.decode([t]) for t in top])
assert np.allclose(lens[-1], logits[0, -1], atol=1e-3 * np.abs(logits).max())  # the lens at the end is the model
assert len(acts) == 19

# %% [markdown]
# ## Exercises
#
# Each exercise checks itself: `minilm.course.check(id, answer)` says right or wrong (with a
# hint), without showing the answer. Replace `None` by your answer and run the cell.
#
# **tour.1** (predict a shape): the model is called on a batch of 2 prompts of 7 tokens each.
# What is the shape of `model(ids).logits`? Predict it, then check by running the model.

# %%
print(minilm.course.question("tour.1"))
answer = None  # a tuple, e.g. (1, 2, 3)
minilm.course.check("tour.1", answer)

# %% [markdown]
# **tour.2**: how many parameters (in millions) does the file store? Use `infos` above.
#
# **tour.3**: how many bits per parameter does the file spend on average? Why is it more than the
# 4.5 bits of Q4_K? (The plot of section 3 says which tensors are stored in other types.)

# %%
answer = None  # a number, in millions
minilm.course.check("tour.2", answer)
answer = None  # a number, bits per parameter
minilm.course.check("tour.3", answer)

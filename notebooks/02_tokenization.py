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
# # 02 · Tokenization: BPE with byte fallback, on Gemma's real vocabulary
#
# A language model reads integers. The tokenizer turns text into them with a fixed vocabulary of
# pieces, here Gemma 3's 262 144. We open that vocabulary as the GGUF file stores it, then follow
# **byte-pair encoding** (BPE) merge by merge on one word, see what happens to a character the
# vocabulary lacks (**byte fallback**), and how **special tokens** such as `<start_of_turn>` are
# matched before anything else. Prerequisite: notebook 01.

# %%
import matplotlib.pyplot as plt
import numpy as np

import minilm
from minilm.io import chat_templates, gguf
from minilm.io.tokenizer import TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED

path = minilm.default_model.default_model_path()
tokenizer = minilm.from_pretrained(path).tokenizer
meta = gguf.read_gguf(path).metadata
tokens = meta["tokenizer.ggml.tokens"]  # the vocabulary: the id of a token is its position
scores = np.array(meta["tokenizer.ggml.scores"])  # (vocab_size,) float
types = np.array(meta["tokenizer.ggml.token_type"])  # (vocab_size,) 1 normal, 3 control, 4 user-defined, 6 byte
vocab = {token: i for i, token in enumerate(tokens)}
print(len(tokens), "tokens; first ones:", tokens[:8])
assert len(tokens) == tokenizer.vocab_size == 262144

# %% [markdown]
# ## The vocabulary
#
# Four kinds of entries: **normal** pieces of text (most of them), **control** tokens (`<bos>`,
# `<eos>`, `<start_of_turn>`, ...: never produced by splitting text), **user-defined** ones (runs of
# newlines, HTML tags: matched whole), and 256 **byte** tokens `<0x00>` ... `<0xFF>`. A space is
# spelled `▁` (U+2581) and starts the piece of the word after it. Each normal piece has a
# **score**: the higher, the earlier BPE merges it. In Gemma's file the score of a normal token is
# minus its rank, so "highest score first" and "lowest id first" are the same rule.

# %%
names = {TOKEN_NORMAL: "normal", TOKEN_CONTROL: "control", TOKEN_USER_DEFINED: "user-defined", TOKEN_BYTE: "byte"}
counts = {name: int((types == kind).sum()) for kind, name in names.items()}
normal = np.flatnonzero(types == TOKEN_NORMAL)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
axes[0].bar(list(counts), list(counts.values()))
axes[0].set_yscale("log")
axes[0].set_ylabel("tokens (log scale)")
axes[0].set_title("kinds of vocabulary entries")
axes[1].plot(normal[::500], scores[normal[::500]], ".", ms=2)
axes[1].set_xlabel("token id")
axes[1].set_ylabel("score")
axes[1].set_title("normal tokens: score = -(rank), merged in id order")
plt.show()
print(counts, " first merges:", [tokens[i] for i in normal[:8]])
assert (np.diff(scores[normal]) < 0).all()  # strictly decreasing: score order is id order
assert counts["byte"] == 256 and sum(counts.values()) == len(tokens)

# %% [markdown]
# ## BPE, one merge at a time
#
# Encoding one word: replace spaces by `▁`, split into characters, then repeatedly merge the
# adjacent pair whose merged piece is in the vocabulary with the **best rank** (lowest id), until
# no adjacent pair forms a piece. The first two steps for `"▁unbelievably"`, by hand: every
# adjacent pair, its merged piece, and that piece's id (`-` when it is not in the vocabulary).

# %%
word = "▁unbelievably"
pieces = list(word)
for step in (1, 2):
    pairs = [(a + b, vocab.get(a + b)) for a, b in zip(pieces, pieces[1:], strict=False)]
    print(f"step {step}:", "  ".join(f"{p}:{'-' if i is None else i}" for p, i in pairs))
    best = min(range(len(pairs)), key=lambda j: (pairs[j][1] is None, pairs[j][1] or 0))
    pieces[best : best + 2] = [pairs[best][0]]
    print(f"        merge {pairs[best][0]!r} (id {pairs[best][1]}) ->", pieces)
final = [tokenizer.id_to_token(i) for i in tokenizer.encode(" unbelievably", add_bos=False)]
print("the tokenizer's final pieces:", final)
assert "".join(final) == word and len(final) < len(word)

# %% [markdown]
# Continuing until nothing merges gives the tokenizer's pieces (exercise **tokenization.1** asks
# you to write that loop). The plot shows why BPE works: frequent words are one piece, rarer ones
# a few, and the number of pieces per word grows with how unusual the word is.

# %%
words = ["the", "house", "tokenization", "unbelievably", "antidisestablishmentarianism", "Llanfairpwllgwyngyll"]
lengths = [len(tokenizer.encode(" " + w, add_bos=False)) for w in words]
plt.figure(figsize=(9, 3))
plt.barh(words, lengths)
plt.xlabel("tokens")
plt.title("tokens per word (with its leading space)")
plt.gca().invert_yaxis()
plt.show()
for w in words[-2:]:
    print(w, "->", [tokenizer.id_to_token(i) for i in tokenizer.encode(" " + w, add_bos=False)])
assert lengths[0] == 1 and lengths[-1] > 3

# %% [markdown]
# ## Byte fallback
#
# A character that is in no piece of the vocabulary (e.g. `ꙮ`, U+A66E, Cyrillic "multiocular o")
# is not lost and not mapped to `<unk>`: it is spelled with the byte tokens of its UTF-8 encoding.
# Decoding joins the bytes back into the character, so every string round-trips.

# %%
char = "\ua66e"
ids = tokenizer.encode(char, add_bos=False)
print(f"{char!r} in the vocabulary: {char in vocab}; UTF-8 bytes: {char.encode().hex(' ')}")
print("ids:", ids, "pieces:", [tokenizer.id_to_token(i) for i in ids])
print("decoded:", repr(tokenizer.decode(ids)))
assert [tokenizer.id_to_token(i) for i in ids] == [f"<0x{b:02X}>" for b in char.encode()]
assert tokenizer.decode(ids) == char

# %% [markdown]
# ## Special tokens
#
# Control tokens are matched whole in the raw text, before BPE sees it: `<start_of_turn>` is one
# id, not 15 characters. The chat template uses them to mark whose turn it is; the model learned
# to answer after `<start_of_turn>model` (the GGUF stores no template: minilm has Gemma's built
# in). `decode(..., skip_special_tokens=True)` drops them.

# %%
messages = [{"role": "user", "content": "Hi!"}]
text = tokenizer.apply_chat_template(messages, chat_template=chat_templates.GEMMA_CHAT_TEMPLATE)  # the file has none
ids = tokenizer.encode(text, add_bos=False)
print(repr(text))
print([tokenizer.id_to_token(i) for i in ids])
print("without special tokens:", repr(tokenizer.decode(ids, skip_special_tokens=True)))
start_of_turn = tokenizer.token_to_id("<start_of_turn>")
assert start_of_turn in ids and types[start_of_turn] == TOKEN_CONTROL
assert "<start_of_turn>" not in tokenizer.decode(ids, skip_special_tokens=True)

# %% [markdown]
# ## Exercises
#
# `minilm.course.check(id, answer)` says right or wrong with a hint; replace `None` and run.
#
# **tokenization.1** (implement): write `bpe(word, vocab)`: characters, then merge the best-ranked
# adjacent pair (lowest id; leftmost on a tie) until nothing merges; return the pieces. It is
# checked against minilm's tokenizer on small random vocabularies. Try it on `"▁unbelievably"` too.

# %%
print(minilm.course.question("tokenization.1"))


def bpe(word, vocab):
    raise NotImplementedError  # your code


minilm.course.check("tokenization.1", bpe)

# %% [markdown]
# **tokenization.2**: how many tokens does `tokenizer.encode('\U00013000', add_bos=False)` give?
# Predict it from its UTF-8 encoding before running anything.
#
# **tokenization.3**: and `tokenizer.encode('<start_of_turn>user', add_bos=False)`?

# %%
answer = None  # an integer
minilm.course.check("tokenization.2", answer)
answer = None  # an integer
minilm.course.check("tokenization.3", answer)

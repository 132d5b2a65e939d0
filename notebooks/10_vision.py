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
# # Gemma 3 sees: from pixels to soft tokens
#
# The larger Gemma 3 models (4B and up) read images. A SigLIP vision transformer turns each image
# into a grid of patch vectors; a small projector pools them into `mm_tokens_per_image` **soft
# tokens** (256 on the released models) that take the place of placeholder tokens in the prompt.
# The text decoder is the Gemma 3 of `03_gemma3`, with one change to its mask: the tokens of one
# image attend to each other in both directions.
#
# We follow one image through a tiny random model made by transformers (the test fixture
# `gemma3_mm_causal_lm`: 32-pixel images, 4-pixel patches, 16 soft tokens, hidden size 32), then
# generate after an image prompt, and finally load the same kind of model from llama.cpp's two
# GGUF files (text model + vision `mmproj`). The weights are random: the pictures show the
# mechanics, not what a trained model looks at. Everything is computed by minilm.

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import minilm
from minilm import nn
from minilm.models import gemma3_vision

FIXTURES = Path("..") / "tests" / "fixtures"
model = minilm.from_pretrained(FIXTURES / "gemma3_mm_causal_lm")
config, vision = model.config, model.config.vision_config
print(
    f"{type(model).__name__}: {vision.image_size} px images, {vision.patch_size} px patches "
    f"({vision.patches_per_side} x {vision.patches_per_side} = {vision.num_patches}), vision hidden "
    f"{vision.hidden_size}, {vision.num_hidden_layers} vision layers, {config.mm_tokens_per_image} soft tokens "
    f"per image, text hidden {config.text_config.hidden_size}"
)
assert isinstance(model, minilm.Gemma3ForConditionalGeneration)
assert vision.num_patches == (vision.image_size // vision.patch_size) ** 2

# %% [markdown]
# ## (a) An image cut into patches
#
# Our image is drawn with NumPy: sky, sun, a red house, grass. The processor (`minilm.io.image_processor`,
# which needs Pillow for resizing) would resize it to `image_size`, rescale to [0, 1] and normalise
# with mean = std = 0.5 to [-1, 1], channels first; our image already has the right size, so the
# last two steps are all there is to do. Then `patchify` cuts it into `patch_size` squares, read
# row by row, each flattened channels first: 64 patches of 3 x 4 x 4 = 48 numbers.

# %%
size = vision.image_size
yy, xx = np.mgrid[0:size, 0:size]
image = np.zeros((size, size, 3), np.uint8)
image[...] = np.stack([90 + 2 * yy, 150 + 2 * yy, np.full_like(yy, 235)], axis=-1)  # sky, lighter downwards
image[(yy - 7) ** 2 + (xx - 24) ** 2 < 20] = (255, 210, 40)  # sun
image[yy >= 24] = (70, 160, 60)  # grass
image[(14 <= yy) & (yy < 24) & (5 <= xx) & (xx < 15)] = (190, 40, 40)  # house
image[(10 <= yy) & (yy < 14) & (np.abs(xx - 10) < yy - 9)] = (120, 60, 30)  # roof
pixel_values = ((image / 255 - 0.5) / 0.5).astype(np.float32).transpose(2, 0, 1)[None]  # (1, 3, 32, 32)

patches = gemma3_vision.patchify(pixel_values, vision.patch_size)  # (1, 64, 48)
grid, p = vision.patches_per_side, vision.patch_size
fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
axes[0].imshow(image)
for line in np.arange(p, size, p) - 0.5:
    axes[0].axhline(line, color="white", lw=0.8)
    axes[0].axvline(line, color="white", lw=0.8)
for k in range(vision.num_patches):
    axes[0].text(k % grid * p + 1.5, k // grid * p + 1.5, k, color="white", fontsize=6, ha="center", va="center")
axes[0].set_title("the image and its 64 patches (reading order)")
# the patches laid out apart: each row of `patches` turned back into a 4 x 4 x 3 square
tiles = patches[0].reshape(grid, grid, 3, p, p).transpose(0, 3, 1, 4, 2)  # (row, y, column, x, channel)
spaced = np.ones((grid, p + 1, grid, p + 1, 3))
spaced[:, :p, :, :p] = tiles * 0.5 + 0.5  # back to [0, 1]
axes[1].imshow(spaced.reshape(grid * (p + 1), grid * (p + 1), 3))
axes[1].set_title("patchify: one 48-number vector per square")
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()
assert patches.shape == (1, vision.num_patches, 3 * p * p)
assert np.allclose(tiles.reshape(size, size, 3), pixel_values[0].transpose(1, 2, 0))  # nothing lost or moved

# %% [markdown]
# ## (b) Patch embedding: a convolution that is one matrix product
#
# SigLIP embeds patches with a `Conv2d(3 -> hidden, kernel = stride = patch_size)`. Because the
# windows do not overlap, every output vector is the kernel (hidden, 3, 4, 4), read as a matrix
# (hidden, 48), times one flattened patch, plus the bias. Below: minilm's `patch_embedding`
# against the convolution written out as the sum it is. Then each patch gets its learned
# **position embedding** added (one vector per patch index; there is no RoPE in the tower).

# %%
tower = model.params.model.vision_tower.vision_model
conv = tower.embeddings.patch_embedding  # weight (hidden, 3, 4, 4), bias (hidden,)
embedded = gemma3_vision.patch_embedding(pixel_values, conv, vision)  # (1, 64, hidden)
by_hand = np.zeros_like(embedded)
for k in range(vision.num_patches):
    row, column = divmod(k, grid)
    window = pixel_values[0, :, row * p : (row + 1) * p, column * p : (column + 1) * p]  # (3, 4, 4)
    by_hand[0, k] = (conv.weight * window).sum(axis=(1, 2, 3)) + conv.bias
with_positions = gemma3_vision.position_embedding(embedded, tower.embeddings.position_embedding)

fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for ax, data, title in (
    (axes[0], embedded[0].T, "patch embeddings (hidden x patch)"),
    (axes[1], tower.embeddings.position_embedding.weight.T, "position embeddings (hidden x patch)"),
    (axes[2], with_positions[0].T, "their sum: the tower's input"),
):
    ax.imshow(data, cmap="RdBu_r", aspect="auto", vmin=-3, vmax=3)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("patch")
axes[0].set_ylabel("hidden unit")
plt.show()
print("max |matmul - convolution| =", float(np.abs(embedded - by_hand).max()))
assert np.allclose(embedded, by_hand, atol=1e-5)
assert np.allclose(with_positions - embedded, tower.embeddings.position_embedding.weight[None], atol=1e-6)

# %% [markdown]
# ## (c) Inside the tower: every patch attends to every patch
#
# The encoder layers are a plain pre-LayerNorm ViT: LayerNorm, multi-head attention **without a
# mask** (no causality among patches), LayerNorm, GELU-tanh MLP, with biases everywhere; a final
# LayerNorm gives the vision features. With `output_attentions=True` the tower returns each layer's
# attention weights, (images, heads, 64 queries, 64 keys). Below, for the patch in the middle of
# the house, where each head of each layer looks, drawn back on the 8 x 8 patch grid.

# %%
features, hidden_states, attentions = gemma3_vision.vision_tower(
    pixel_values, tower, vision, output_hidden_states=True, output_attentions=True
)
query = 18 // p * grid + 9 // p  # the patch holding pixel (row 18, column 9): the house
fig, axes = plt.subplots(vision.num_hidden_layers, vision.num_attention_heads + 1, figsize=(9, 6))
for layer, weights in enumerate(attentions):
    axes[layer, 0].imshow(image)
    axes[layer, 0].add_patch(plt.Rectangle((query % grid * p - 0.5, query // grid * p - 0.5), p, p, fill=False, ec="k"))
    axes[layer, 0].set_ylabel(f"layer {layer}")
    for head in range(vision.num_attention_heads):
        axes[layer, head + 1].imshow(weights[0, head, query].reshape(grid, grid), cmap="magma")
        axes[layer, head + 1].set_title(f"head {head}", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle(f"attention of patch {query} (black square) over all 64 patches")
plt.show()
assert features.shape == (1, vision.num_patches, vision.hidden_size)
for weights in attentions:
    assert weights.shape == (1, vision.num_attention_heads, vision.num_patches, vision.num_patches)
    assert np.allclose(weights.sum(-1), 1, atol=1e-5) and (weights > 0).all()  # no key is ever masked
    assert np.triu(weights[0, 0], 1).sum() > 0.3  # a patch also reads patches after it: no causal mask

# %% [markdown]
# ## (d) From 64 patch vectors to 16 soft tokens
#
# The projector (`multimodal_projector`) averages each 2 x 2 square of the patch grid
# (`pool_kernel` = 8 patches per side // 4 soft tokens per side), normalises with Gemma's RMSNorm
# (`mm_soft_emb_norm`, scale `1 + w`), and maps into the text model's hidden size with
# `x @ mm_input_projection_weight`. The result replaces 16 `<image_soft_token>` ids in the prompt.
# Below: the first three principal components of the vision features shown as colours, before and
# after pooling.

# %%
pooled = gemma3_vision.average_pool(features, config)  # (1, 16, vision hidden)
soft_tokens = gemma3_vision.multimodal_projector(features, model.params.model.multi_modal_projector, config)
side = grid // config.pool_kernel


def pca_colours(x):
    """(n, d) -> (n, 3) in [0, 1]: the first three principal components, each stretched to [0, 1]."""
    centred = x - x.mean(0)
    components = centred @ np.linalg.svd(centred, full_matrices=False)[2][:3].T
    return (components - components.min(0)) / (np.ptp(components, axis=0) + 1e-9)


fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
axes[0].imshow(image)
axes[0].set_title("image")
axes[1].imshow(pca_colours(features[0]).reshape(grid, grid, 3))
axes[1].set_title(f"vision features, {grid} x {grid}")
axes[2].imshow(pca_colours(pooled[0]).reshape(side, side, 3))
axes[2].set_title(f"pooled, {side} x {side} = {config.mm_tokens_per_image} soft tokens")
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()
square = features[0].reshape(grid, grid, -1)[:2, :2].reshape(4, -1).mean(0)  # patches 0, 1, 8, 9
assert np.allclose(pooled[0, 0], square, atol=1e-6)
assert soft_tokens.shape == (1, config.mm_tokens_per_image, config.text_config.hidden_size)
assert np.allclose(soft_tokens, model.get_image_features(pixel_values).pooler_output)

# %% [markdown]
# ## (e) The prompt and its attention mask
#
# In the prompt, an image is `<start_of_image>`, then `mm_tokens_per_image` image tokens, then
# `<end_of_image>` (the processor expands each placeholder this way). `token_type_ids` is 1 on the
# image tokens. The decoder's mask is causal for text, and each *run* of image tokens is a block
# in which every token sees every other, later ones included (`nn.image_block_ids` numbers the
# runs, `nn.same_image_mask` draws the blocks). Below, the first row of the fixture's batch (two
# images) on a global layer, and on this model's sliding-window layers (window 6), where the
# window still clips what a token sees behind it.

# %%
ref = np.load(FIXTURES / "gemma3_mm_causal_lm" / "reference.npz")
ids, token_type_ids = ref["input_ids"][:1], ref["token_type_ids"][:1]  # row 0: no padding, two images
positions = np.arange(ids.shape[1])
blocks = nn.image_block_ids(token_type_ids)  # (1, seq): -1 for text, 0, 1, ... per image
global_mask = nn.attention_mask_4d(None, positions, positions, None, blocks)[0, 0]  # (seq, seq) bool
window = config.text_config.sliding_window
local_mask = nn.attention_mask_4d(None, positions, positions, window, blocks)[0, 0]
causal = nn.causal_mask(positions, positions)

names = {config.boi_token_index: "BOI", config.eoi_token_index: "EOI", config.image_token_index: "img"}
labels = [names.get(int(i), str(int(i))) for i in ids[0]]
fig, axes = plt.subplots(1, 2, figsize=(13, 6.2))
panels = ((axes[0], global_mask, "global layer"), (axes[1], local_mask, f"sliding layer (window {window})"))
for ax, mask, title in panels:
    picture = np.where(mask, 1.0, 0.0) + np.where(mask & ~causal, 1.0, 0.0)  # 2: seen only thanks to the image rule
    ax.imshow(picture, cmap="Blues", vmin=0, vmax=2.2)
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_title(title)
fig.suptitle("light: causal (and within the window); dark: a later token of the same image, seen by the image rule")
plt.show()
image_rows = np.flatnonzero(token_type_ids[0])
first = image_rows[blocks[0, image_rows] == 0]
second = image_rows[blocks[0, image_rows] == 1]
assert global_mask[np.ix_(first, first)].all() and global_mask[np.ix_(second, second)].all()  # both ways
assert not global_mask[np.ix_(first, second)].any()  # the first image does not see the second
text_rows = np.flatnonzero(token_type_ids[0] == 0)
assert (global_mask[text_rows] == causal[text_rows]).all()  # text stays causal
assert (local_mask <= global_mask).all() and not local_mask[first[-1], first[0]]  # the window clips

# %% [markdown]
# ## (f) Generating after an image
#
# `Gemma3ForConditionalGeneration.generate` runs the images once, in the prefill (vision tower,
# projector, soft tokens merged into the embeddings, the mixed mask); every new token is then
# decoded against the KV cache with the plain causal mask. The fixture's batch has rows with two,
# zero and one image, left-padded; greedy decoding must give exactly transformers' tokens.

# %%
generated = model.generate(
    ref["input_ids"],
    attention_mask=ref["attention_mask"],
    pixel_values=ref["pixel_values"],
    token_type_ids=ref["token_type_ids"],
    max_new_tokens=8,
    eos_token_id=[],  # as transformers made the reference: no stop token, every row runs 8 steps
)
prompt_length = ref["input_ids"].shape[1]
for row in range(len(generated)):
    images_in_row = int((ref["input_ids"][row] == config.boi_token_index).sum())
    print(f"row {row} ({images_in_row} image(s)): new tokens {generated[row, prompt_length:].tolist()}")
assert np.array_equal(generated, ref["generated_ids"])  # transformers' greedy ids, token for token

# %% [markdown]
# ## (g) The same from llama.cpp's files
#
# llama.cpp stores the text model and the vision tower in two GGUF files; the tower's is an
# "mmproj" (`minilm/io/mmproj.py` reads it: `v.patch_embd`, `v.blk.i.*`, `mm.soft_emb_norm`
# stored as `1 + w`, `mm.input_projection` in float16). The test fixture `gemma3_mmproj/pair` was
# written by llama.cpp's own converter from a tiny checkpoint; `from_pretrained(text, mmproj=...)`
# joins the two into one model. We prompt it with our drawing, laid out by the processor's
# `encode_with_images` with the vocabulary stored in the text GGUF, and check it against the
# checkpoint it came from.

# %%
pair = FIXTURES / "gemma3_mmproj" / "pair"
from_gguf = minilm.from_pretrained(pair / "text.gguf", mmproj=pair / "mmproj.gguf")
from_safetensors = minilm.from_pretrained(pair / "hf")
tokenizer = from_gguf.tokenizer
prompt = minilm.io.image_processor.encode_with_images(tokenizer, "describe <start_of_image>", from_gguf.config)
input_ids = np.array([prompt])
token_type_ids = (input_ids == from_gguf.config.image_token_index).astype(np.int64)
picture = ((image / 255 - 0.5) / 0.5).astype(np.float32).transpose(2, 0, 1)[None]  # the same 32 px drawing
outputs = [
    m.generate(input_ids, pixel_values=picture, token_type_ids=token_type_ids, max_new_tokens=6)
    for m in (from_gguf, from_safetensors)
]
print("prompt:", [tokenizer.decode([i]) if i != from_gguf.config.image_token_index else "img" for i in prompt])
print("new ids from the GGUF pair:      ", outputs[0][0, len(prompt) :].tolist())
print("new ids from the safetensors:    ", outputs[1][0, len(prompt) :].tolist())
print("decoded (random weights):", repr(tokenizer.decode(outputs[0][0, len(prompt) :].tolist())))
assert from_gguf.config.mm_tokens_per_image == prompt.count(from_gguf.config.image_token_index) == 4
assert np.array_equal(outputs[0], outputs[1])
features_gguf = from_gguf.get_image_features(picture).last_hidden_state
assert np.array_equal(features_gguf, from_safetensors.get_image_features(picture).last_hidden_state)

# %% [markdown]
# ## Exercises
#
# **vision.1**: how many patches does the released Gemma 3 vision tower cut an 896 x 896 image
# into, with 14 x 14 patches?
#
# **vision.2**: the projector averages 4 x 4 neighbouring patches into one soft token. What is the
# shape (rows, columns) of the grid of soft tokens for that image, and how many soft tokens is that?

# %%
print(minilm.course.question("vision.1"))
answer = None  # a number of patches
minilm.course.check("vision.1", answer)
answer = None  # a shape: (rows, columns)
minilm.course.check("vision.2", answer)

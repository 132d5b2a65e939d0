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
# # 08 · Quantization: GGUF blocks, Q4_K by hand, and what rounding costs
#
# The shipped model is a 250 MB file, not the 1 GB its 268 M float32 parameters would take: most
# weights are stored as small integers with a few scales per block of values. This notebook reads
# the real file's bytes: which **block types** it uses, how many bits each spends per weight, one
# **Q4_K super-block decoded by hand** (and compared with minilm's dequantizer), and how large the
# **rounding error** of 8-bit and 4-bit blocks is. Prerequisite: notebook 01 (the GGUF file).

# %%
import matplotlib.pyplot as plt
import numpy as np

import minilm
from minilm.io import gguf, quants

gguf_file = gguf.read_gguf(minilm.default_model.default_model_path())
infos = [gguf_file.tensor_info(name) for name in gguf_file.tensor_names]
by_type = {}
for info in infos:
    by_type.setdefault(info.type_name, []).append(info)
for type_name, group in sorted(by_type.items()):
    print(f"{type_name:5} {len(group):4} tensors, e.g. {group[0].name}")
assert {"Q4_K", "Q6_K", "Q8_0", "F32"} <= set(by_type)

# %% [markdown]
# ## Blocks and bits per weight
#
# A row of weights is cut into **blocks** (32 values for Q4_0 .. Q8_0) or **super-blocks** (256 values
# for the "k-quants" Q2_K .. Q6_K). Each block stores a float16 scale `d` (some types also a minimum)
# and one small integer code per value; a value is `d * code` (minus the minimum). Bits per weight =
# bytes per block * 8 / values per block (`quants.BLOCK_LAYOUT`). The file mixes types: the
# "Q4_K_M" recipe keeps the tensors that matter most (the embedding, some value and down
# projections) at higher precision.

# %%
layout = {t: quants.BLOCK_LAYOUT[t] for t in ("F32", "F16", "Q8_0", "Q6_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K")}
bits = {t: nbytes * 8 / values for t, (values, nbytes) in layout.items()}
in_file = {t: sum(i.n_bytes for i in by_type.get(t, [])) / 1e6 for t in bits}
fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
axes[0].bar(list(bits), list(bits.values()), color=["C1" if t in by_type else "C0" for t in bits])
axes[0].set_ylabel("bits per weight")
axes[0].set_title("ggml types (orange: used in the shipped file)")
axes[0].set_yscale("log")
axes[1].bar(list(in_file), list(in_file.values()))
axes[1].set_ylabel("MB in the shipped file")
axes[1].set_title("bytes per type in gemma-3-270m-q4_k_m.gguf")
plt.show()
for t in bits:
    print(f"{t:5} {layout[t][0]:4} values in {layout[t][1]:4} bytes = {bits[t]:6.3f} bits per weight")
assert bits["Q8_0"] == 8.5 and bits["F16"] == 16

# %% [markdown]
# ## One Q4_K super-block, by hand
#
# `blk.0.attn_output.weight` (640 x 1024) is stored as Q4_K: each row of 1024 values is 4
# super-blocks of 144 bytes. The layout of one super-block (from ggml's `block_q4_K`):
#
#     bytes 0-1    d      float16: scale of the sub-block scales
#     bytes 2-3    dmin   float16: scale of the sub-block minimums
#     bytes 4-15   12 bytes = 8 six-bit scales sc[s] and 8 six-bit mins m[s], one per sub-block of 32
#     bytes 16-143 128 bytes = 256 four-bit codes q; bytes 32c..32c+31 hold sub-block 2c in their
#                  low nibbles and sub-block 2c+1 in their high nibbles
#
#     w[s, l] = d * sc[s] * q[s, l] - dmin * m[s]          s = 0..7 sub-blocks, l = 0..31
#
# Below, the first super-block of row 0, decoded with nothing but byte arithmetic.

# %%
name = "blk.0.attn_output.weight"
raw = gguf_file.raw(name)  # (640, 576) uint8: the file's bytes, row by row
block = raw[0, :144]  # the first super-block of row 0
print(gguf_file.tensor_info(name), "\nfirst 20 bytes:", block[:20].tobytes().hex(" "))
d = block[0:2].view("<f2")[0].astype(np.float32)
dmin = block[2:4].view("<f2")[0].astype(np.float32)
packed = block[4:16].astype(np.int32)
sc, m = np.zeros(8, np.int32), np.zeros(8, np.int32)
for s in range(4):  # sub-blocks 0-3: the low 6 bits of bytes s and s + 4
    sc[s], m[s] = packed[s] & 63, packed[s + 4] & 63
for s in range(4, 8):  # sub-blocks 4-7: 4 low bits in byte s + 4, 2 high bits in the top of bytes s - 4, s
    sc[s] = (packed[s + 4] & 0x0F) | ((packed[s - 4] >> 6) << 4)
    m[s] = (packed[s + 4] >> 4) | ((packed[s] >> 6) << 4)
qs = block[16:144]
codes = np.zeros((8, 32), np.int32)
for c in range(4):  # chunk c of 32 bytes: sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles)
    codes[2 * c] = qs[32 * c : 32 * c + 32] & 0x0F
    codes[2 * c + 1] = qs[32 * c : 32 * c + 32] >> 4
by_hand = (d * sc[:, None].astype(np.float32)) * codes.astype(np.float32) - dmin * m[:, None].astype(np.float32)
print(f"d = {d:.3g}, dmin = {dmin:.3g}\nsc = {sc}\nm  = {m}")
minilm_values = quants.dequantize_q4_k(block[None])[0]  # minilm's dequantizer, same bytes
full_matrix = gguf_file.dequantize(name)  # (640, 1024) float32, what the model uses
print("max |by hand - minilm|:", np.abs(by_hand.ravel() - minilm_values).max())
assert np.array_equal(by_hand.ravel(), minilm_values) and np.array_equal(minilm_values, full_matrix[0, :256])

# %% [markdown]
# What the format means: within a sub-block, the 32 values can only sit on 16 evenly spaced
# levels, `d * sc[s] * q - dmin * m[s]` for q = 0..15; each sub-block has its own spacing and
# offset. Below, the 256 decoded values, with the 16 levels of two sub-blocks drawn as lines.

# %%
plt.figure(figsize=(12, 3.8))
for s in range(8):
    plt.plot(range(32 * s, 32 * s + 32), by_hand[s], ".", color=f"C{s % 2}")
for s in (0, 5):
    for level in d * sc[s] * np.arange(16) - dmin * m[s]:
        plt.hlines(level, 32 * s, 32 * s + 31, color="gray", lw=0.5)
plt.xlabel("value index in the super-block (8 sub-blocks of 32)")
plt.ylabel("weight")
plt.title(f"{name}, row 0, first super-block: 16 levels per sub-block (grey: sub-blocks 0 and 5)")
plt.show()
levels_used = [len(np.unique(by_hand[s])) for s in range(8)]
print("distinct values per sub-block:", levels_used)
assert max(levels_used) <= 16

# %% [markdown]
# ## Rounding error: what each bit buys
#
# The file holds no float32 original to compare with (it was quantized before it was shipped).
# The Q8_0 token embedding is the closest thing: we take 2000 of its rows as the reference and
# quantize them again, ourselves, with round-to-nearest (ggml's reference recipe, a few lines
# below): to Q8_0 (which gives back exactly the same bytes: rounding to the same grid is lossless),
# to real Q4_0 blocks decoded by minilm's `dequantize_q4_0`, and to symmetric `b`-bit blocks of 32
# for b = 2..6. The error is measured relative to the root mean square of the weights.

# %%
embedding = quants.QuantizedWeight(gguf_file.raw("token_embd.weight"), "Q8_0", (262144, 640))
weights = embedding[1000:3000]  # (2000, 640) float32: only these rows are decoded
values = weights.reshape(-1, 32)  # (blocks, 32)


def quantize_q8_0(x):
    """(blocks, 32) -> (blocks, 34) bytes: d = max|x| / 127, q = round(x / d)."""
    d = (np.abs(x).max(-1, keepdims=True) / 127).astype(np.float16)
    q = np.round(x / np.where(d == 0, 1, d).astype(np.float32)).astype(np.int8)
    return np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=1)


def quantize_q4_0(x):
    """(blocks, 32) -> (blocks, 18) bytes: d = (the value of largest |x|) / -8, q = round(x / d) + 8 in 0..15."""
    extreme = np.take_along_axis(x, np.abs(x).argmax(-1)[:, None], axis=-1)
    d = (extreme / -8).astype(np.float16)
    q = np.clip(np.round(x / np.where(d == 0, 1, d).astype(np.float32)) + 8, 0, 15).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)  # value j and j + 16 share a byte
    return np.concatenate([d.view(np.uint8), packed], axis=1)


def round_to_bits(x, b):
    """Symmetric b-bit blocks: levels -(2^(b-1) - 1) .. 2^(b-1) - 1 times d = max|x| / (2^(b-1) - 1)."""
    d = np.abs(x).max(-1, keepdims=True) / (2 ** (b - 1) - 1)
    return np.round(x / np.where(d == 0, 1, d)) * d


rms = np.sqrt(np.mean(values**2))
q4_0 = quants.dequantize_q4_0(quantize_q4_0(values))  # real Q4_0 bytes, decoded by minilm
relative = {b: float(np.sqrt(np.mean((round_to_bits(values, b) - values) ** 2)) / rms) for b in range(2, 7)}
relative_q4_0 = float(np.sqrt(np.mean((q4_0 - values) ** 2)) / rms)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
axes[0].semilogy(list(relative), list(relative.values()), "o-", label="symmetric b-bit blocks of 32")
axes[0].semilogy([4.5], [relative_q4_0], "s", color="C3", label="Q4_0 (4 bits + a float16 scale per 32)")
axes[0].set_xlabel("bits per code")
axes[0].set_ylabel("RMS error / RMS of the weights")
axes[0].set_title("rounding error halves with each bit")
axes[0].legend()
axes[1].hist((q4_0 - values).ravel() / rms, bins=101, range=(-0.6, 0.6))
axes[1].set_yscale("log")
axes[1].set_xlabel("Q4_0 error / RMS of the weights")
axes[1].set_ylabel("values (log scale)")
axes[1].set_title("Q4_0 errors: flat, at most half a step")
plt.show()
print("relative RMS error per bits:", {b: round(e, 4) for b, e in relative.items()}, " Q4_0:", round(relative_q4_0, 4))
assert np.array_equal(quants.dequantize_q8_0(quantize_q8_0(values)), values)  # same grid: lossless
assert all(relative[b + 1] < 0.6 * relative[b] for b in range(2, 6))  # each bit at least 40 % less error
assert 0.02 < relative_q4_0 < 0.3

# %% [markdown]
# Each bit halves the step between levels, and with it the error. Q4_K does better than Q4_0 at
# the same cost, because each sub-block of 32 gets its own 6-bit scale *and* minimum (an offset),
# so its 16 levels cover only the range the sub-block uses.
#
# ## Exercises
#
# **quantization.1** (implement): `dequantize_q8_0(blocks)`, checked against minilm's on random blocks.

# %%
print(minilm.course.question("quantization.1"))


def dequantize_q8_0(blocks):
    raise NotImplementedError  # your code


minilm.course.check("quantization.1", dequantize_q8_0)

# %% [markdown]
# **quantization.2**: how many bits per weight does Q4_K spend? Count from the layout above
# before looking at the chart.
#
# **quantization.3**: in a Q4_K super-block, value 100 (from 0) is in which sub-block, and its code
# in which byte of `qs`? Answer `sub_block * 1000 + byte`.

# %%
answer = None  # a number
minilm.course.check("quantization.2", answer)
answer = None  # an integer
minilm.course.check("quantization.3", answer)

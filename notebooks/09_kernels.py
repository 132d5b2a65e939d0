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
# # 09 · Kernels: one seam, three implementations
#
# Almost all the time of a forward pass goes to three operations: the matrix products of linear
# layers, attention, and (in mixture-of-experts models) sending tokens through their experts.
# minilm's model files never compute these themselves; they call `minilm.ops`:
#
#     ops.linear(x, weight, bias)                         y = x W^T + b
#     ops.attention(q, k, v, mask, scale=..., ...)        softmax(q k^T * scale + bias, masked) v
#     ops.moe_dispatch(x, top_k_index, top_k_weights, gate_proj, up_proj, down_proj)
#
# Each op has a **NumPy reference** in `minilm/ops.py`: short, readable, the definition of the
# answer. A **kernel** is a second implementation of the same op, written for speed: Numba
# kernels compiled for the CPU (the package `minilm.kernels.numba`, one module per op: `linear`,
# `attention`, `moe`) and CuPy kernels for a GPU (`minilm.kernels.cupy`). A kernel must return
# what the reference returns, to a stated tolerance; `set_backend` picks which implementation
# runs, and the model code never changes.

# %%
import time
import timeit

import matplotlib.pyplot as plt
import ml_dtypes
import numpy as np

import minilm
from minilm import nn, ops
from minilm.errors import ConfigError

# The three ops above, plus prepare_weight: run once per weight at load, it puts the weight where
# (CuPy: in GPU memory), and in the form, the backend reads it.
print("ops a backend implements:", ops.OPS)
print("backends:", ops.available_backends(), " active:", ops.get_backend())
previous = ops.set_backend("numba")  # imports minilm.kernels.numba, which registers itself
print("set_backend('numba') returned the previous backend:", repr(previous))
ops.set_backend(previous)
with ops.use_backend("numba"):  # or only for a block
    inside = ops.get_backend()
print("inside use_backend:", inside, " after:", ops.get_backend())
assert inside == "numba" and ops.get_backend() == previous
assert ops._BACKENDS["numba"]["attention"] is not ops.attention_reference

# %% [markdown]
# The same model, the same weights, two backends: the model file does not know which one ran.

# %%
config = minilm.Qwen3MoeConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
)
model = minilm.Qwen3MoeForCausalLM(config, seed=0)
ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, 10))
start = time.perf_counter()
with ops.use_backend("numpy"):
    reference_logits = model(ids).logits
with ops.use_backend("numba"):
    numba_logits = model(ids).logits  # the first call also compiles (or loads from Numba's disk cache)
print(
    f"both forward passes in {time.perf_counter() - start:.1f} s; "
    f"max |numba - numpy| = {np.abs(numba_logits - reference_logits).max():.2e}"
)
assert np.allclose(numba_logits, reference_logits, rtol=1e-4, atol=1e-4)

# %% [markdown]
# ## One op, three paths: attention for one decode step
#
# Decoding feeds one new query per step against a long KV cache: here 16 query heads sharing 4
# key/value heads (grouped-query attention), head_dim 128, 1024 cached keys. The tolerance is the
# one `tests/test_kernels.py` holds every kernel to in float32: `|kernel - reference| <= 1e-5 * max|reference|`.
# The kernels may add in a different order (SIMD, blocks of keys merged at the end), so the results
# agree to rounding, not bit for bit. CuPy runs only where it is installed with a CUDA device.

# %%
rng = np.random.default_rng(0)
batch, heads, kv_heads, head_dim, kv_seq = 1, 16, 4, 128, 1024
q = rng.standard_normal((batch, heads, 1, head_dim)).astype(np.float32)
k, v = rng.standard_normal((2, batch, kv_heads, kv_seq, head_dim)).astype(np.float32)
mask = nn.attention_mask_4d(None, np.array([kv_seq - 1]), np.arange(kv_seq))  # (1, 1, 1, kv_seq): sees every key
TOLERANCE = 1e-5


def milliseconds(fn, number=10, repeat=5):
    # Milliseconds per call: the best of `repeat` loops of `number` calls (the least disturbed loop).
    fn()  # warm-up: compiles on first use
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e3


results = {}
for backend in ("numpy", "numba"):
    with ops.use_backend(backend):
        out, _ = ops.attention(q, k, v, mask, scale=head_dim**-0.5)
        ms = milliseconds(lambda: ops.attention(q, k, v, mask, scale=head_dim**-0.5))
    results[backend] = out, ms
try:
    import minilm.kernels.cupy  # registers "cupy"; ConfigError without CuPy or a GPU
except (ConfigError, ImportError) as err:
    print("CuPy path skipped:", str(err).splitlines()[0])
else:
    import cupy

    qg, kg, vg, maskg = (cupy.asarray(a) for a in (q, k, v, mask))  # inputs on the device, as a model keeps them

    def on_gpu():
        out, _ = ops.attention(qg, kg, vg, maskg, scale=head_dim**-0.5)
        cupy.cuda.Device().synchronize()  # a GPU call returns before the work is done
        return out

    with ops.use_backend("cupy"):
        results["cupy"] = cupy.asnumpy(on_gpu()), milliseconds(on_gpu)

reference = results["numpy"][0]
for backend, (out, ms) in results.items():
    error = np.abs(out - reference).max() / np.abs(reference).max()
    print(f"{backend:>6}: {ms:7.3f} ms per call   max|diff| / max|ref| = {error:.1e}")
    assert out.shape == reference.shape and out.dtype == reference.dtype and error <= TOLERANCE

# %% [markdown]
# ## Property tests: the reference is the specification
#
# One agreeing example says little: a kernel can be right on the shape you tried and wrong on the
# next. `tests/test_kernels.py` states the contract as a *property*, "for any inputs, the kernel
# equals the reference within the tolerance", and lets [Hypothesis](https://hypothesis.readthedocs.io)
# draw the inputs: odd sizes, single heads, GQA groups, windows, keys that are all masked. Below is
# a small version, 15 random attention cases (CI runs 40 per property and path, and more ops).

# %%
from hypothesis import given, settings
from hypothesis import strategies as st


@st.composite
def attention_cases(draw):
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))  # a multiple: grouped-query attention
    seq = draw(st.integers(1, 4))
    kv_seq = seq + draw(st.integers(0, 12))  # queries are the last `seq` of kv_seq positions (decode)
    head_dim = draw(st.integers(1, 33))
    window = draw(st.none() | st.integers(1, 8))  # None: causal; else a sliding window
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.standard_normal((1, heads, seq, head_dim)).astype(np.float32)
    k, v = rng.standard_normal((2, 1, kv_heads, kv_seq, head_dim)).astype(np.float32)
    mask = nn.attention_mask_4d(None, np.arange(kv_seq - seq, kv_seq), np.arange(kv_seq), window)
    return q, k, v, mask


def kernel_matches_reference(backend):
    # Run the property against `backend`; returns how many cases it checked.
    checked = []

    @settings(max_examples=15, deadline=None, database=None)
    @given(attention_cases())
    def prop(case):
        q, k, v, mask = case
        reference, _ = ops.attention_reference(q, k, v, mask, scale=0.3)
        with ops.use_backend(backend):
            got, _ = ops.attention(q, k, v, mask, scale=0.3)
        error = np.abs(got - reference).max()
        assert error <= TOLERANCE * np.abs(reference).max(), f"q {q.shape}, k {k.shape}: max|diff| {error:.3g}"
        checked.append(q.shape)

    prop()  # raises AssertionError with the smallest failing case Hypothesis can find
    return len(checked)


start = time.perf_counter()
checked = kernel_matches_reference("numba")
print(f"numba attention: {checked} random cases agree with the reference ({time.perf_counter() - start:.1f} s)")
assert checked >= 10  # the property raised nothing, and it did look at cases

# %% [markdown]
# ### A property with teeth
#
# Now a plausible bug. To share key/value heads, query head `h` must read kv head `h // groups`
# (`ops.attention_reference` groups consecutive query heads under one kv head: 0 0 1 1, the same
# as repeating each kv head `groups` times). The "kernel" below tiles the kv heads instead
# (0 1 0 1), so head `h` reads kv head `h % kv_heads`. With one kv head, or as many kv heads as
# query heads, both give the same answer: a hand-written test on Gemma's shape (1 kv head) or on
# multi-head attention passes. We register it as a backend with `ops.register_backend` (ops it
# leaves out fall back to the reference) and run the property.

# %%
from minilm.kernels.numba.attention import attention as numba_attention


def attention_tiled_kv(q, k, v, mask=None, **options):
    groups = q.shape[1] // k.shape[1]
    k, v = np.tile(k, (1, groups, 1, 1)), np.tile(v, (1, groups, 1, 1))  # BUG: should be np.repeat(k, groups, axis=1)
    return numba_attention(q, k, v, mask, **options)


ops.register_backend("numba_tiled_kv", {"attention": attention_tiled_kv})
try:
    for heads, kv_heads in ((4, 1), (4, 4)):  # the shapes a hand-written test might pick
        q1, k1, v1 = (rng.standard_normal((1, h, 5, 8)).astype(np.float32) for h in (heads, kv_heads, kv_heads))
        with ops.use_backend("numba_tiled_kv"):
            got, _ = ops.attention(q1, k1, v1, scale=0.3)
        assert np.allclose(got, ops.attention_reference(q1, k1, v1, scale=0.3)[0], atol=1e-5)
    print("hand-written tests with 1 kv head and with 4 kv heads: pass")
    try:
        kernel_matches_reference("numba_tiled_kv")
        caught = None
    except AssertionError as err:
        caught = err
finally:
    ops._BACKENDS.pop("numba_tiled_kv")  # minilm has no unregister; leave the registry as we found it
print("the property:", "caught the bug" if caught else "MISSED the bug")
print("smallest failing case Hypothesis found:", str(caught).splitlines()[-1])
assert caught is not None and "numba_tiled_kv" not in ops.available_backends()

# %% [markdown]
# ## Speed: what the kernels buy
#
# One decode step at small but realistic shapes (Gemma 3 270M's sizes for linear and attention,
# a scaled-down Qwen3-MoE for the experts), in float32 and in bfloat16, the dtype most
# checkpoints ship in. Times are per call, best of a few loops on this machine (on 2 shared CPU
# cores they move by tens of percent from run to run). Note the log scale.
#
# * In float32, a one-token `linear` is a matrix-vector product that streams the weight from memory
#   once: NumPy's BLAS and the Numba kernel are both memory-bound and about equal.
# * NumPy has no bfloat16 arithmetic (`ml_dtypes` emulates it element by element), so the
#   reference is one to two orders of magnitude slower; the kernels read the bfloat16 bits,
#   widen them to float32 as they load them, and never make a converted copy.
# * Attention and expert dispatch gain less in float32 at these sizes: the fused attention kernel
#   never materialises the (heads, kv_seq) scores, and the expert kernel runs a token's few experts
#   in one compiled call instead of a Python loop over them, but BLAS is already fast here.

# %%
hidden, intermediate, heads, kv_heads, head_dim, kv_seq = 640, 2048, 4, 1, 256, 512  # Gemma 3 270M
experts, top_k, moe_hidden, moe_intermediate = 32, 4, 512, 256  # a small Qwen3-MoE layer


def decode_inputs(dtype):
    r = np.random.default_rng(1)

    def a(*shape, scale=1.0):
        return (r.standard_normal(shape) * scale).astype(np.float32).astype(dtype)

    x = a(1, hidden)
    linear = (x, a(intermediate, hidden, scale=hidden**-0.5))
    attention = (a(1, heads, 1, head_dim), a(1, kv_heads, kv_seq, head_dim), a(1, kv_heads, kv_seq, head_dim))
    index = r.permutation(experts)[:top_k][None]  # (1 token, top_k) distinct experts
    weights = r.random((1, top_k)).astype(np.float32)
    moe = (
        a(1, moe_hidden),
        index,
        weights,
        a(experts, moe_intermediate, moe_hidden, scale=moe_hidden**-0.5),
        a(experts, moe_intermediate, moe_hidden, scale=moe_hidden**-0.5),
        a(experts, moe_hidden, moe_intermediate, scale=moe_intermediate**-0.5),
    )
    return {
        "linear": lambda: ops.linear(*linear),
        "attention": lambda: ops.attention(*attention, scale=head_dim**-0.5)[0],
        "moe_dispatch": lambda: ops.moe_dispatch(*moe),
    }


times = {}  # (dtype, backend) -> {op: ms}
for dtype in (np.float32, ml_dtypes.bfloat16):
    calls = decode_inputs(dtype)
    outputs = {}
    for backend in ("numpy", "numba"):
        with ops.use_backend(backend):
            outputs[backend] = {op: np.asarray(call()).astype(np.float32) for op, call in calls.items()}
            times[np.dtype(dtype).name, backend] = {
                op: milliseconds(call, number=5, repeat=3) for op, call in calls.items()
            }
    for op in calls:  # same answers (bfloat16: the kernels round once, the reference at every step)
        ref, got = outputs["numpy"][op], outputs["numba"][op]
        assert np.abs(got - ref).max() <= (1e-5 if dtype == np.float32 else 2e-2) * np.abs(ref).max(), op

op_names = list(calls)
fig, ax = plt.subplots(figsize=(9, 4))
for n, ((dtype, backend), ms) in enumerate(times.items()):
    bars = ax.bar(
        np.arange(len(op_names)) + (n - 1.5) * 0.2,
        [ms[op] for op in op_names],
        0.2,
        label=f"{backend}, {dtype}",
        color=["C0", "C1", "C9", "C3"][n],
    )
    ax.bar_label(bars, fmt="%.2g", fontsize=7)
ax.set_xticks(range(len(op_names)))
ax.set_xticklabels(op_names)
ax.set_yscale("log")
ax.set_ylim(top=4 * max(max(ms.values()) for ms in times.values()))
ax.set_ylabel("ms per decode step")
ax.set_title("NumPy reference vs Numba kernels (lower is better)")
ax.legend(ncol=2, fontsize=8, loc="upper left")
plt.show()
for (dtype, backend), ms in times.items():
    print(f"{backend:>6} {dtype:>9}: " + "  ".join(f"{op} {t:.3f} ms" for op, t in ms.items()))
assert len(times) == 4 and all(t > 0 for ms in times.values() for t in ms.values())  # speed itself is not
# asserted: on a shared 2-core machine another process can slow any single loop tenfold

# %% [markdown]
# ## Looking inside a kernel's forward pass
#
# A Numba or CuPy attention kernel never stores the score matrix. When `minilm.capture` asks for a
# layer's `scores` or `attn_weights`, that layer's attention runs the NumPy reference on host
# copies instead (every other op stays on the kernel), so the captured maps are the same on every
# backend, and so are the logits, to float32 rounding.

# %%
probe = minilm.Qwen3MoeForCausalLM(config, seed=0)
captured = {}
for backend in ("numpy", "numba"):
    with ops.use_backend(backend), minilm.capture("layers.0.self_attn.attn_weights", "logits") as acts:
        probe(ids)
    captured[backend] = acts
weights_diff = np.abs(
    captured["numba"]["layers.0.self_attn.attn_weights"] - captured["numpy"]["layers.0.self_attn.attn_weights"]
).max()
logits_diff = np.abs(captured["numba"]["logits"] - captured["numpy"]["logits"]).max()
print(f"numba vs numpy: attention weights differ by {weights_diff:.2g}, logits by {logits_diff:.2g}")
assert weights_diff < 1e-6 and logits_diff <= 1e-4 * max(1, np.abs(captured["numpy"]["logits"]).max())

# %% [markdown]
# ## Exercises
#
# **kernels.1** (implement): `tiled_linear(x, weight, tile)`, the loop a blocked kernel runs,
# checked against `ops.linear_reference`.

# %%
print(minilm.course.question("kernels.1"))


def tiled_linear(x, weight, tile):
    raise NotImplementedError  # your code


minilm.course.check("kernels.1", tiled_linear)

# %% [markdown]
# **kernels.2**: how many megabytes of float32 weights does one decode step of Gemma 3 270M's 18
# layers read (q, k, v, o, gate, up, down once each)? At 25 GB/s of memory bandwidth, what is the
# fastest a step could be? (The embedding used as the output layer adds 671 MB more.)

# %%
answer = None  # a number, in MB
minilm.course.check("kernels.2", answer)

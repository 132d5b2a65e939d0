"""Every backward function against central finite differences, over shapes and values that
hypothesis draws.

For a forward f and a fixed random upstream gradient w, L(x) = <f(x), w>; the backward given
dy = w returns dL/dx for each input. Along a random direction v, the analytic <dL/dx, v> must
equal (L(x + h v) - L(x - h v)) / 2h. The inputs are float64. Forwards that compute in float64
(activations, soft cap, RoPE, LoRA) are checked with h = 1e-4 to RTOL_F64 (the backwards compute
in float32: this is float32's accuracy on a sum, not float64's); the MoE experts to RTOL_F32;
forwards that round to float32 inside, as transformers does (the norms, attention's softmax, the
cross entropy), with h = 1e-3 to RTOL_F32. The tolerance is relative to |analytic| + |finite
difference| + 1e-3, plus what rounding alone can move each side by: the difference quotient by
8 ulp of the terms of L over 2h, the analytic sum by 8 float32 ulp of its terms (a sum that
cancels keeps the rounding of its terms). Rounding stays inside it, a wrong term does not.

Not checked here (tests/test_grad_parity.py does, against torch): a query that sees no key at all
(a left-padding row) attends uniformly, and its gradient follows torch's, not the derivative.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_quantized_weights import random_weight

from minilm import nn, ops
from minilm.errors import ConfigError, InputError
from minilm.grad import value_and_grad
from minilm.heads import causal_lm_head_loss_and_grad, causal_lm_loss, causal_lm_loss_backward
from minilm.kernels.numba import quantized
from minilm.lora import LoraWeight, lora_linear_backward
from minilm.models import bloom, gemma3, qwen3_moe
from minilm.rope import apply_rope, apply_rope_backward, compute_inv_freq, rope_cos_sin

RTOL_F64, RTOL_F32 = 1e-4, 2e-3
SETTINGS = settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)


def norm_offset(dim):
    """Added to a norm's input: its variance stays away from zero, where the norm is so curved that
    a finite difference of step h is no longer a derivative."""
    return np.linspace(-2.0, 2.0, dim)


def directional_check(forward, backward, inputs, rng, h, rtol, wrt=None):
    """forward(*inputs) -> array; backward(dy, *inputs) -> tuple of gradients, one per input
    index in `wrt` (default: every input). Checks each input's gradient along a random direction."""
    wrt = range(len(inputs)) if wrt is None else wrt
    out = np.asarray(forward(*inputs), np.float64)
    w = rng.standard_normal(out.shape)  # the upstream gradient dy
    grads = backward(w, *inputs)
    grads = grads if isinstance(grads, tuple) else (grads,)
    # what rounding alone can move the difference quotient by: an ulp of each term of L, over 2h
    ulp = 2.0**-24 if rtol >= RTOL_F32 else 2.0**-52
    rounding = 8 * ulp * float(np.sum(np.abs(out * w))) / h
    assert len(grads) == len(wrt)
    for i, g in zip(wrt, grads, strict=True):
        v = rng.standard_normal(np.shape(inputs[i]))
        plus = list(inputs)
        minus = list(inputs)
        plus[i], minus[i] = inputs[i] + h * v, inputs[i] - h * v
        fd = np.sum(np.asarray(forward(*plus), np.float64) * w) - np.sum(np.asarray(forward(*minus), np.float64) * w)
        fd /= 2 * h
        terms = np.asarray(g, np.float64) * v
        analytic = float(np.sum(terms))
        # the backwards compute in float32: each term of <dL/dx, v> carries float32 rounding, which
        # a cancelling sum does not shrink (8 ulp of the terms, as for L above)
        backward_rounding = 8 * 2.0**-24 * float(np.sum(np.abs(terms)))
        tolerance = rtol * (abs(analytic) + abs(fd) + 1e-3) + rounding + backward_rounding
        assert abs(analytic - fd) <= tolerance, f"input {i}: analytic {analytic:.8g}, finite difference {fd:.8g}"


# ---------------------------------------------------------------------------------------------
# nn: norms, activations, soft cap, softmax
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(seeds, st.integers(1, 3), st.integers(2, 9), st.sampled_from([1e-6, 1e-2]))
def test_rms_norm_backward(seed, rows, dim, eps):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((rows, 2, dim)) + norm_offset(dim), rng.standard_normal(dim)
    directional_check(
        lambda x, w: nn.rms_norm(x, w.astype(np.float32), eps),
        lambda dy, x, w: nn.rms_norm_backward(dy, x, w, eps),
        [x, w],
        rng,
        1e-3,
        RTOL_F32,
    )


@SETTINGS
@given(seeds, st.integers(1, 3), st.integers(2, 9))
def test_gemma_rms_norm_backward(seed, rows, dim):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((rows, dim)) + norm_offset(dim), rng.standard_normal(dim)
    directional_check(
        lambda x, w: gemma3.gemma_rms_norm(x, w, 1e-6),
        lambda dy, x, w: gemma3.gemma_rms_norm_backward(dy, x, w, 1e-6),
        [x, w],
        rng,
        1e-3,
        RTOL_F32,
    )


@SETTINGS
@given(seeds, st.integers(1, 3), st.integers(3, 9))
def test_layer_norm_backward(seed, rows, dim):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((rows, dim)) + norm_offset(dim), rng.standard_normal(dim), rng.standard_normal(dim)
    directional_check(
        lambda x, w, b: nn.layer_norm(x, w, b, 1e-5),
        lambda dy, x, w, b: nn.layer_norm_backward(dy, x, w, 1e-5),
        [x, w, b],
        rng,
        1e-3,
        RTOL_F32,
    )


@SETTINGS
@given(seeds, st.sampled_from(sorted(nn.ACTIVATIONS)), st.floats(0.5, 6))
def test_activation_backward(seed, name, spread):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 7)) * spread
    act, backward = nn.activation(name), nn.activation_backward(name)
    directional_check(act, backward, [x], rng, 1e-4, RTOL_F64)


@SETTINGS
@given(seeds, st.floats(0.5, 30.0))
def test_soft_cap_backward(seed, cap):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 5)) * cap  # well into the flat part of tanh too
    directional_check(
        lambda x: nn.soft_cap(x, cap), lambda dy, x: nn.soft_cap_backward(dy, x, cap), [x], rng, 1e-4, RTOL_F64
    )


@SETTINGS
@given(seeds)
def test_softmax_backward(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 6)) * 3
    directional_check(nn.softmax, lambda dy, x: nn.softmax_backward(dy, nn.softmax(x)), [x], rng, 1e-4, RTOL_F64)


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(seeds, st.sampled_from([(8, 8), (8, 4), (6, 6)]), st.integers(1, 5))
def test_apply_rope_backward(seed, dims, seq):
    """Full and partial rotary (rope_dim < head_dim: the rest passes through)."""
    head_dim, rope_dim = dims
    rng = np.random.default_rng(seed)
    inv_freq = 1.0 / 100.0 ** (np.arange(0, rope_dim, 2) / rope_dim)
    positions = rng.integers(0, 50, (2, seq))
    cos, sin = rope_cos_sin(positions, inv_freq.astype(np.float32))
    cos, sin = cos.astype(np.float64), sin.astype(np.float64)
    x = rng.standard_normal((2, 3, seq, head_dim))
    directional_check(
        lambda x: apply_rope(x, cos, sin), lambda dy, x: apply_rope_backward(dy, cos, sin), [x], rng, 1e-4, RTOL_F64
    )


# ---------------------------------------------------------------------------------------------
# Attention: GQA, masks (causal, sliding window, padding), soft cap, ALiBi bias
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seeds,
    st.sampled_from([(4, 4), (4, 2), (4, 1), (3, 3)]),
    st.integers(1, 6),
    st.sampled_from([None, 2, 3]),
    st.sampled_from([None, 1.5, 20.0]),
    st.booleans(),
    st.booleans(),
)
def test_attention_backward(seed, heads, seq, window, soft_cap, with_bias, left_pad):
    """Every query row sees at least itself: left padding pads keys only for the queries that
    are tokens (a fully masked query row is the torch-parity test's business)."""
    num_heads, num_kv_heads = heads
    rng = np.random.default_rng(seed)
    b, d = 2, 4
    q = rng.standard_normal((b, num_heads, seq, d))
    k, v = rng.standard_normal((2, b, num_kv_heads, seq, d))
    attention_mask = np.ones((b, seq), np.int64)
    if left_pad and seq > 1:
        attention_mask[1, 0] = 0
    idx = np.arange(seq)
    mask = nn.attention_mask_4d(attention_mask, idx, idx, window)  # (batch, 1, seq, seq)
    mask = mask | (~np.any(mask, axis=-1, keepdims=True) & (idx[None, None, :, None] == idx))  # pad queries see self
    bias = bloom.alibi_bias(attention_mask, num_heads).astype(np.float64) if with_bias else None
    scale = d**-0.5

    def forward(q, k, v):
        return ops.attention_reference(q, k, v, mask, scale=scale, bias=bias, soft_cap=soft_cap)[0]

    def backward(dy, q, k, v):
        return ops.attention_backward(dy, q, k, v, mask, scale=scale, bias=bias, soft_cap=soft_cap)

    directional_check(forward, backward, [q, k, v], rng, 1e-3, RTOL_F32)


# ---------------------------------------------------------------------------------------------
# LoRA linear: PEFT's form (groups = 1) and keras' per-head form (groups = heads)
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(seeds, st.sampled_from([1, 2, 4]), st.integers(1, 3), st.booleans(), st.booleans())
def test_lora_linear_backward(seed, groups, rank, enabled, with_bias):
    rng = np.random.default_rng(seed)
    in_features, out_features = 5, 4 * 3
    base = rng.standard_normal((out_features, in_features))
    bias = rng.standard_normal(out_features) if with_bias else None
    x = rng.standard_normal((2, 3, in_features))
    a0, b0 = rng.standard_normal((groups, rank, in_features)), rng.standard_normal((out_features // groups, rank))

    def forward(x, a, b):
        return ops.linear(x, LoraWeight(base, a, b, scaling=0.75, enabled=enabled), bias)

    def backward(dy, x, a, b):
        return lora_linear_backward(dy, x, LoraWeight(base, a, b, scaling=0.75, enabled=enabled))

    directional_check(forward, backward, [x, a0, b0], rng, 1e-4, RTOL_F64)


def test_lora_linear_backward_through_the_seam_on_numba():
    """The same gradients with the Numba backend's products (float32)."""
    rng = np.random.default_rng(0)
    w = LoraWeight(rng.standard_normal((12, 5)).astype(np.float32), *_lora_arrays(rng, 4, 2, 5, 12), scaling=2.0)
    x, dy = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal((3, 12)).astype(np.float32)
    reference = lora_linear_backward(dy, x, w)
    with ops.use_backend("numba"):
        fast = lora_linear_backward(dy, x, w)
    for r, f in zip(reference, fast, strict=True):
        np.testing.assert_allclose(f, r, rtol=1e-5, atol=1e-5)


def _lora_arrays(rng, groups, rank, in_features, out_features):
    a = rng.standard_normal((groups, rank, in_features)).astype(np.float32)
    return a, rng.standard_normal((out_features // groups, rank)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Mixture of experts: dispatch, routing weights (norm_topk_prob), the aux loss
# ---------------------------------------------------------------------------------------------


def _router_logits(rng, tokens, num_experts):
    """Logits whose top-k choice is stable under the finite difference's step: the experts'
    logits are spread out (no ties, no near ties)."""
    return np.stack([rng.permutation(num_experts) * 0.5 + rng.uniform(0, 0.1) for _ in range(tokens)])


@SETTINGS
@given(seeds, st.sampled_from(["silu", "gelu_pytorch_tanh"]), st.integers(1, 3))
def test_moe_dispatch_backward(seed, act, top_k):
    rng = np.random.default_rng(seed)
    tokens, hidden, inter, num_experts = 5, 4, 3, 4
    x = rng.standard_normal((tokens, hidden))
    index = np.argsort(-_router_logits(rng, tokens, num_experts), axis=-1)[:, :top_k]
    weights = rng.uniform(0.1, 1, (tokens, top_k))
    gate, up = rng.standard_normal((2, num_experts, inter, hidden))
    down = rng.standard_normal((num_experts, hidden, inter))

    def forward(x, w):
        return ops.moe_dispatch_reference(x, index, w, gate, up, down, act)

    def backward(dy, x, w):
        return ops.moe_dispatch_backward(dy, x, index, w, gate, up, down, act)

    directional_check(forward, backward, [x, weights], rng, 1e-4, RTOL_F32)  # the backward is float32


@SETTINGS
@given(seeds, st.integers(1, 3), st.booleans())
def test_route_backward(seed, top_k, norm_topk_prob):
    rng = np.random.default_rng(seed)
    logits = _router_logits(rng, 6, 5)
    index = qwen3_moe.route(logits, top_k, norm_topk_prob)[0]

    def forward(logits):
        chosen, weights = qwen3_moe.route(logits, top_k, norm_topk_prob)
        assert (chosen == index).all(), "the step changed the top-k choice"
        return weights

    directional_check(
        forward,
        lambda dy, logits: qwen3_moe.route_backward(dy, logits, index, norm_topk_prob),
        [logits],
        rng,
        1e-3,
        RTOL_F32,
    )


@SETTINGS
@given(seeds, st.integers(1, 3), st.booleans())
def test_load_balancing_loss_backward(seed, layers, with_mask):
    rng = np.random.default_rng(seed)
    batch, seq, num_experts, top_k = 2, 3, 5, 2
    logits = [_router_logits(rng, batch * seq, num_experts) for _ in range(layers)]
    mask = np.array([[0, 1, 1], [1, 1, 1]]) if with_mask else None

    def forward(*logits):
        return qwen3_moe.load_balancing_loss(logits, num_experts, top_k, mask)

    def backward(dy, *logits):
        return tuple(float(dy) * g for g in qwen3_moe.load_balancing_loss_backward(logits, num_experts, top_k, mask))

    directional_check(forward, backward, logits, rng, 1e-3, RTOL_F32)


# ---------------------------------------------------------------------------------------------
# Losses and the LM head (tied, soft-capped), embeddings
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(seeds, st.integers(1, 5), st.booleans())
def test_causal_lm_loss_backward(seed, seq, ignore_some):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((2, seq, 7)) * 2
    labels = rng.integers(0, 7, (2, seq))
    if ignore_some:
        labels[0, :2] = -100
    if not (nn_kept := (labels[:, 1:] != -100).any()):
        labels[1, -1] = 3
    assert nn_kept or (labels[:, 1:] != -100).any() or seq == 1
    if seq == 1:
        return  # nothing to predict
    directional_check(
        lambda logits: causal_lm_loss(logits, labels),
        lambda dy, logits: float(dy) * causal_lm_loss_backward(logits, labels),
        [logits],
        rng,
        1e-3,
        RTOL_F32,
    )


@SETTINGS
@given(seeds, st.sampled_from([None, 0.7, 5.0]), st.integers(1, 4))
def test_causal_lm_head_loss_and_grad(seed, soft_cap, chunk_tokens):
    """The chunked head gives the loss of the full logits and the gradient at the hidden states,
    soft cap included, whatever the chunk size."""
    rng = np.random.default_rng(seed)
    hidden, lm_head = rng.standard_normal((2, 4, 3)), rng.standard_normal((9, 3))
    labels = rng.integers(0, 9, (2, 4))
    labels[1, :2] = -100

    def forward(hidden):
        logits = hidden @ lm_head.T
        return causal_lm_loss(logits if soft_cap is None else nn.soft_cap(logits, soft_cap), labels)

    loss, _ = causal_lm_head_loss_and_grad(hidden, lm_head, labels, soft_cap, chunk_tokens)
    assert abs(loss - forward(hidden)) <= 1e-5 * abs(loss)
    directional_check(
        forward,
        lambda dy, hidden: float(dy) * causal_lm_head_loss_and_grad(hidden, lm_head, labels, soft_cap, chunk_tokens)[1],
        [hidden],
        rng,
        1e-3,
        RTOL_F32,
    )


@SETTINGS
@given(seeds)
def test_scaled_embedding_backward(seed):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((6, 4))
    ids = rng.integers(0, 6, (2, 5))  # repeated ids: their gradients add up
    directional_check(
        lambda t: gemma3.scaled_embedding(ids, t),
        lambda dy, t: gemma3.scaled_embedding_backward(dy, ids, t),
        [table],
        rng,
        1e-4,
        RTOL_F64,
    )


# ---------------------------------------------------------------------------------------------
# A whole model: Gemma 3 (sliding + global layers, QK-norm, final soft cap) through value_and_grad
# ---------------------------------------------------------------------------------------------


def test_value_and_grad_gemma3_matches_finite_differences():
    """Tiny random Gemma 3 (two sliding layers of window 3 and a global one, GQA, both soft caps),
    LoRA on q/v (PEFT's form) and keras' per-head form on k; a right-padded row."""
    cfg = gemma3.Gemma3TextConfig(
        vocab_size=30,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=6,
        sliding_window=3,
        sliding_window_pattern=3,
        final_logit_softcapping=3.0,
        attn_logit_softcapping=2.0,
        apply_attn_logit_softcapping=True,  # keras-hub's attention soft cap, applied
    )
    rng = np.random.default_rng(0)
    model = gemma3.Gemma3ForCausalLM(cfg)
    flat = {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in model.state_dict().items()}
    flat["lm_head.weight"] = flat["model.embed_tokens.weight"]
    model.load_state_dict({k: v for k, v in flat.items() if k != "lm_head.weight"})
    for layer in model.params.model.layers:
        for name, groups in (("q_proj", 1), ("v_proj", 1), ("k_proj", 2)):
            base = layer.self_attn[name].weight
            a, b = _lora_arrays(rng, groups, 2, base.shape[1], base.shape[0])
            layer.self_attn[name]["weight"] = LoraWeight(base, a * 0.3, b * 0.3, scaling=1.5)
    ids = rng.integers(1, 30, (2, 6))
    attention_mask = np.ones((2, 6), np.int64)
    attention_mask[1, 4:] = 0  # right padding: every query still sees a key
    labels = np.where(attention_mask == 1, ids, -100)
    loss, grads = value_and_grad(model, ids, labels, attention_mask)
    assert abs(loss - model(ids, attention_mask=attention_mask, labels=labels).loss) <= 1e-6 * loss
    assert len(grads) == 3 * 3 * 2

    def f():
        return float(np.float64(model(ids, attention_mask=attention_mask, labels=labels).loss))

    h = 3e-3
    for layer, proj in ((0, "q_proj"), (2, "k_proj"), (1, "v_proj")):
        name, node = f"model.layers.{layer}.self_attn.{proj}", model.params.model.layers[layer].self_attn[proj].weight
        for part in ("lora_A", "lora_B"):
            array, v = getattr(node, part), rng.standard_normal(getattr(node, part).shape).astype(np.float32)
            array += h * v
            up = f()
            array -= 2 * h * v
            down = f()
            array += h * v
            fd = (up - down) / (2 * h)
            analytic = float(np.sum(grads[f"{name}.{part}"] * v))
            assert math.isclose(analytic, fd, rel_tol=2e-2, abs_tol=2e-3), (name, part, analytic, fd)


@pytest.mark.parametrize("shape", [(7, 5), (80, 4)])  # (80, 4): a tall weight (an LM head), the transposed product
@pytest.mark.parametrize("rank", [1, 3])
def test_linear_input_grad_backends_agree(rank, shape):
    """ops.linear_input_grad: the NumPy reference and the Numba backend (BLAS) give dy W."""
    rng = np.random.default_rng(rank)
    w, dy = rng.standard_normal(shape).astype(np.float32), rng.standard_normal((2, rank, shape[0])).astype(np.float32)
    expected = ops.linear_input_grad_reference(dy, w)
    np.testing.assert_allclose(expected, dy.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
    with ops.use_backend("numba"):
        np.testing.assert_allclose(ops.linear_input_grad(dy, w), expected, rtol=1e-5, atol=1e-5)


def test_rope_backward_uses_the_models_frequencies():
    """A smoke check that the real inverse frequencies (not only the test's) rotate back: the
    rotation is orthogonal, so its backward applied to its forward returns the input."""
    cfg = gemma3.Gemma3TextConfig(head_dim=8, hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    inv_freq, scaling = compute_inv_freq(cfg, 8, base=10_000.0, scaling={"rope_type": "default"})
    cos, sin = rope_cos_sin(np.arange(5)[None], inv_freq, scaling)
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(apply_rope_backward(apply_rope(x, cos, sin), cos, sin), x, atol=1e-5)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q8_0", "Q5_0"])
def test_linear_input_grad_on_gguf_blocks(type_name, monkeypatch):
    """QLoRA's frozen base: the Numba backend computes dy W from the blocks a tile of rows at a time
    (small tiles here: several, and a short last one); the reference dequantizes the whole matrix."""
    monkeypatch.setattr(quantized, "TILE_VALUES", 700)
    monkeypatch.setenv("MINILM_KEEP_QUANTIZED", "all")
    w = random_weight(type_name, 13, 256, seed=1)
    dy = np.random.default_rng(0).standard_normal((2, 3, 13)).astype(np.float32)
    expected = dy.astype(np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(
        ops.linear_input_grad_reference(dy, w), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )
    with ops.use_backend("numba"):
        assert ops.reads_quantized(w)
        got = ops.linear_input_grad(dy, w)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_lora_over_gguf_blocks_forward_and_backward():
    """QLoRA: a LoraWeight whose frozen base stays GGUF blocks computes the same forward and
    gradients as one over the dequantized float32 base, on the Numba backend."""
    base = random_weight("Q4_K", 12, 256, seed=3)
    rng = np.random.default_rng(0)
    a, b = _lora_arrays(rng, 1, 2, 256, 12)
    x, dy = rng.standard_normal((3, 256)).astype(np.float32), rng.standard_normal((3, 12)).astype(np.float32)
    dense = LoraWeight(np.asarray(base), a, b, scaling=2.0)
    with ops.use_backend("numba"):
        blocks = ops.prepare_weight(LoraWeight(base, a, b, scaling=2.0))
        assert type(blocks.base).__name__ == "QuantizedWeight"
        y, grads = ops.linear(x, blocks), lora_linear_backward(dy, x, blocks)
    np.testing.assert_allclose(y, ops.linear(x, dense), rtol=1e-4, atol=1e-4)
    for got, expected in zip(grads, lora_linear_backward(dy, x, dense), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_value_and_grad_refusals():
    """A model without adapters, a model that is not a causal LM, and labels of the wrong shape
    are refused with an error that names the problem."""
    cfg = gemma3.Gemma3TextConfig(
        vocab_size=20, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, query_pre_attn_scalar=4, sliding_window=4,
    )  # fmt: skip
    model = gemma3.Gemma3ForCausalLM(cfg)
    ids = np.ones((1, 4), np.int64)
    with pytest.raises(InputError, match="no LoraWeight"):
        value_and_grad(model, ids, ids)
    with pytest.raises(ConfigError, match="causal LM"):
        value_and_grad(gemma3.Gemma3TextModel(cfg), ids, ids)
    w = model.params.model.layers[0].self_attn.q_proj.weight
    model.params.model.layers[0].self_attn.q_proj["weight"] = LoraWeight(
        w, *_lora_arrays(np.random.default_rng(0), 1, 2, 8, 8)
    )
    with pytest.raises(InputError, match="labels"):
        value_and_grad(model, ids, ids[:, :3])
    with pytest.raises(InputError, match="lora_B"):
        LoraWeight(w, np.zeros((2, 8), np.float32), np.zeros((3, 2), np.float32))


def test_value_and_grad_bloom_post_layernorm_residual_matches_finite_differences():
    """BLOOM with apply_residual_connection_post_layernorm (the residual is the normed input; no
    released checkpoint sets it, so the torch fixtures do not cover it): LoRA on the fused
    query_key_value (over its per-head view) and on dense_h_to_4h; 3 heads (ALiBi's two series)."""
    cfg = bloom.BloomConfig(vocab_size=30, hidden_size=12, n_layer=2, n_head=3)
    cfg.apply_residual_connection_post_layernorm = True
    rng = np.random.default_rng(1)
    model = bloom.BloomForCausalLM(cfg)
    model.load_state_dict(
        {
            k: rng.normal(0, 0.4, v.shape).astype(np.float32)
            for k, v in model.state_dict().items()
            if k != "lm_head.weight"
        }
    )
    for block in model.params.transformer.h:
        for node in (block.self_attention.query_key_value, block.mlp.dense_h_to_4h):
            w = node.weight
            out_features = int(np.prod(w.shape[:-1]))
            a, b = _lora_arrays(rng, 1, 2, w.shape[-1], out_features)
            node["weight"] = LoraWeight(w, a * 0.5, b * 0.5, scaling=1.0)
    ids = rng.integers(1, 30, (2, 5))
    attention_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = np.where(attention_mask == 1, ids, -100)
    loss, grads = value_and_grad(model, ids, labels, attention_mask)

    def f():
        return float(model(ids, attention_mask=attention_mask, labels=labels).loss)

    h = 3e-3
    for name, node in (
        (
            "transformer.h.0.self_attention.query_key_value",
            model.params.transformer.h[0].self_attention.query_key_value,
        ),
        ("transformer.h.1.mlp.dense_h_to_4h", model.params.transformer.h[1].mlp.dense_h_to_4h),
    ):
        for part in ("lora_A", "lora_B"):
            array = getattr(node.weight, part)
            v = rng.standard_normal(array.shape).astype(np.float32)
            array += h * v
            up = f()
            array -= 2 * h * v
            down = f()
            array += h * v
            analytic = float(np.sum(grads[f"{name}.{part}"] * v))
            assert math.isclose(analytic, (up - down) / (2 * h), rel_tol=2e-2, abs_tol=2e-3), (name, part)


def test_full_parameter_gradients_match_finite_differences():
    """full_params: dL/dW of named linear weights (full fine-tuning), here with no adapter at all:
    Gemma 3's q_proj and down_proj, BLOOM's fused query_key_value (its per-head 4-D view)."""
    rng = np.random.default_rng(2)
    gcfg = gemma3.Gemma3TextConfig(
        vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=3, final_logit_softcapping=4.0,
    )  # fmt: skip
    bcfg = bloom.BloomConfig(vocab_size=30, hidden_size=12, n_layer=2, n_head=3)
    ids = rng.integers(1, 30, (2, 5))
    for model, names in (
        (
            gemma3.Gemma3ForCausalLM(gcfg),
            ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"],
        ),
        (bloom.BloomForCausalLM(bcfg), ["transformer.h.1.self_attention.query_key_value.weight"]),
    ):
        shapes = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        model.load_state_dict({k: rng.normal(0, 0.4, shape).astype(np.float32) for k, shape in shapes.items()})
        loss, grads = value_and_grad(model, ids, ids, full_params=names)
        assert sorted(grads) == sorted(names)
        flat = model.state_dict()
        assert all(type(flat[n]) is np.ndarray for n in names)  # unwrapped again
        for name in names:
            weight, v, h = flat[name], rng.standard_normal(flat[name].shape).astype(np.float32), 3e-3
            assert grads[name].shape == weight.shape
            weight += h * v
            up = float(model(ids, labels=ids).loss)
            weight -= 2 * h * v
            down = float(model(ids, labels=ids).loss)
            weight += h * v
            analytic = float(np.sum(grads[name] * v))
            assert math.isclose(analytic, (up - down) / (2 * h), rel_tol=2e-2, abs_tol=2e-3), (name, analytic)
    with pytest.raises(InputError, match="not a linear layer"):
        value_and_grad(model, ids, ids, full_params=["transformer.word_embeddings.weight"])
    with pytest.raises(InputError, match="no weight"):
        value_and_grad(model, ids, ids, full_params=["transformer.h.9.mlp.dense_h_to_4h.weight"])

"""Property tests: every compiled kernel against its NumPy reference in `minilm.ops`.

Hypothesis draws fresh random cases (shapes including 1 and odd sizes, GQA groups, decode against a
longer cache, windows wider than the sequence, fully masked rows, ALiBi-like bias, soft cap, experts
that get no token or every token, float32 and bfloat16) and each case runs through `minilm.ops` with
the backend under test selected, exactly as a model would call it.

Tolerances (stated once here, used by `assert_close`):
  float32 in:   |got - ref| <= 1e-5 * max|ref|, ref = the reference on the same inputs.
  bfloat16 in:  the kernels widen bf16 to float32 exactly and round only the result, so they are
                compared with the reference run on the float32 values of the same bf16 inputs:
                |got - ref| <= 2**-8 * |ref| + 1e-5 * max|ref| (half a bf16 ulp for the one final
                rounding when the result is bf16, plus the float32 tolerance). The result dtype must
                be the one the reference gives on the bf16 inputs themselves.

Backends: "numba" always; "cupy" only with CuPy and a CUDA device (marked `gpu`, skipped otherwise).
"""

from __future__ import annotations

import importlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilm import nn, ops
from minilm.errors import ConfigError

BF16 = np.dtype(ml_dtypes.bfloat16)
F32_TOL = 1e-5  # relative to max|ref|
BF16_ROUNDING = 2.0**-8  # half a bf16 ulp, relative to |ref|
EXAMPLES = 40  # per property and backend; keeps the whole file well under a minute on 2 cores


def _gpu_skip_reason():
    try:
        importlib.import_module("minilm.kernels.cupy")
    except ConfigError as err:
        return str(err)
    return None


_GPU_SKIP = _gpu_skip_reason()
_ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))]
# The numba linear and expert dispatch have two paths each, chosen by size; every case runs on both:
# "kernel" (the compiled gemv / per-row expert kernels: decode, small groups) and "blas" (large batches).
PATHS = {
    op: [pytest.param("numba", "kernel"), pytest.param("numba", "blas"), pytest.param("cupy", None, marks=_ON_GPU)]
    for op in ("linear", "moe_dispatch")
}
# Attention's fused decode kernel also splits the keys into blocks: "kernel-blocks" makes the
# blocks 5 keys long so that merging many blocks (and blocks with no visible key) is exercised.
PATHS["attention"] = [pytest.param("numba", "kernel-blocks"), *PATHS["linear"]]
PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def to_backend(backend, a):
    """Inputs as the backend's users hold them: CuPy arrays on the GPU (float32 and integer; CuPy
    has no bfloat16, so bf16 stays a NumPy array), NumPy otherwise."""
    if backend != "cupy" or a is None or a.dtype == BF16:
        return a
    import cupy  # noqa: PLC0415

    return cupy.asarray(a)


def to_numpy(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def as_f32(a):
    return None if a is None else (a.astype(np.float32) if a.dtype == BF16 else a)


def assert_close(got, ref, ref_dtype, low_precision, name):
    """The tolerance rule of this file (see the module docstring); names the tensor on failure."""
    got = to_numpy(got)
    assert got.dtype == ref_dtype, f"{name}: dtype {got.dtype}, reference gives {ref_dtype}"
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, reference {ref.shape}"
    got32, ref32 = got.astype(np.float32), ref.astype(np.float32)
    assert np.all(np.isfinite(got32)), f"{name}: non-finite values"
    scale = max(float(np.max(np.abs(ref32), initial=0.0)), 1e-30)
    bound = F32_TOL * scale + (BF16_ROUNDING * np.abs(ref32) if low_precision else 0.0)
    err = np.abs(got32 - ref32)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert np.all(err <= bound), (
        f"{name}: |got - ref| = {err[worst]:.3g} > {np.broadcast_to(bound, err.shape)[worst]:.3g} at {worst} "
        f"(got {got32[worst]:.6g}, ref {ref32[worst]:.6g}, max|ref| {scale:.3g})"
    )


def force_numba_path(monkeypatch, op, threshold_name, path):
    """Send every case of a numba op down one path by moving its size threshold (in the op's file,
    `minilm.kernels.numba.<op>`) out of the way."""
    if path is None:
        return
    module = importlib.import_module(f"minilm.kernels.numba.{op}")
    monkeypatch.setattr(module, threshold_name, 0 if path == "blas" else 10**9)
    if path == "kernel-blocks":
        monkeypatch.setattr(module, "ATTENTION_KEY_BLOCK", 5)


def random_array(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------


@st.composite
def linear_cases(draw):
    lead = draw(st.sampled_from([(), (1,), (2,), (3,), (5,), (9,), (2, 3), (1, 17)]))
    in_features = draw(st.integers(1, 70))
    out_features = draw(st.integers(1, 70))
    x_dtype, w_dtype = draw(st.sampled_from([(np.float32, np.float32), (BF16, BF16), (np.float32, BF16)]))
    has_bias = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = random_array(rng, (*lead, in_features), x_dtype)
    weight = random_array(rng, (out_features, in_features), w_dtype)
    bias = random_array(rng, (out_features,), w_dtype) if has_bias else None
    return x, weight, bias


def check_linear(backend, case):
    x, weight, bias = case
    low = BF16 in (x.dtype, weight.dtype)
    ref = ops.linear_reference(as_f32(x), as_f32(weight), as_f32(bias))
    ref_dtype = ops.linear_reference(x[..., :1], weight[:1, :1], None if bias is None else bias[:1]).dtype
    with ops.use_backend(backend):
        got = ops.linear(to_backend(backend, x), to_backend(backend, weight), to_backend(backend, bias))
    assert_close(got, ref, ref_dtype, low, "linear")


def linear_property(backend):
    @PROPERTY_SETTINGS
    @given(linear_cases())
    def prop(case):
        check_linear(backend, case)

    prop()


@pytest.mark.parametrize("backend, path", PATHS["linear"])
def test_linear_matches_reference(backend, path, monkeypatch):
    force_numba_path(monkeypatch, "linear", "GEMV_MAX_ROWS", path)
    linear_property(backend)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw):
    """q (batch, heads, seq, head_dim) at positions past..past+seq-1 against kv_seq = past + seq keys."""
    batch = draw(st.integers(1, 3))
    num_kv_heads = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 4))
    seq = draw(st.one_of(st.just(1), st.integers(1, 33)))  # decode (seq = 1) about half the time
    past = draw(st.integers(0, 37))
    kv_seq = past + seq
    head_dim = draw(st.one_of(st.integers(1, 40), st.sampled_from([64, 128, 256])))
    dtype = draw(st.sampled_from([np.float32, BF16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q_idx, k_idx = np.arange(past, kv_seq), np.arange(kv_seq)

    mask_kind = draw(st.sampled_from(["none", "causal", "window", "padding", "random"]))
    if mask_kind == "none":
        mask = None
    elif mask_kind == "causal":
        mask = nn.attention_mask_4d(None, q_idx, k_idx)  # (1, 1, seq, kv_seq)
    elif mask_kind == "window":  # windows from 1 to wider than every sequence
        mask = nn.attention_mask_4d(None, q_idx, k_idx, sliding_window=draw(st.integers(1, kv_seq + 5)))
    elif mask_kind == "padding":  # left padding: the pad queries of a row see no key
        pads = [draw(st.integers(0, kv_seq)) for _ in range(batch)]
        attention_mask = (k_idx[None, :] >= np.array(pads)[:, None]).astype(np.int64)  # (batch, kv_seq)
        window = draw(st.one_of(st.none(), st.integers(1, kv_seq + 5)))
        mask = nn.attention_mask_4d(attention_mask, q_idx, k_idx, sliding_window=window)
        mask = mask & (attention_mask[:, None, past:, None] != 0)  # pad queries see nothing
    else:  # arbitrary pattern, with some rows fully masked
        mask = rng.random((batch, 1, seq, kv_seq)) < draw(st.floats(0.05, 0.95))
        mask[:, :, rng.random(seq) < 0.3] = False

    num_heads = num_kv_heads * groups
    bias_kind = draw(st.sampled_from(["none", "alibi", "full"]))
    if bias_kind == "alibi":  # slope_h * key position, broadcast over batch and queries
        slopes = 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)
        bias = (slopes[:, None, None] * k_idx[None, None, :]).astype(np.float32)[None]  # (1, heads, 1, kv_seq)
    elif bias_kind == "full":
        bias = random_array(rng, (batch, num_heads, seq, kv_seq), np.float32)
    else:
        bias = None
    soft_cap = draw(st.one_of(st.none(), st.floats(1.0, 50.0)))
    scale = float((head_dim * draw(st.floats(0.25, 4.0))) ** -0.5)
    q = random_array(rng, (batch, num_heads, seq, head_dim), dtype)
    k = random_array(rng, (batch, num_kv_heads, kv_seq, head_dim), dtype)
    v = random_array(rng, (batch, num_kv_heads, kv_seq, head_dim), dtype)
    return dict(q=q, k=k, v=v, mask=mask, scale=scale, bias=bias, soft_cap=soft_cap,
                return_weights=draw(st.booleans()))  # fmt: skip


def check_attention(backend, case):
    q, k, v, mask = case["q"], case["k"], case["v"], case["mask"]
    options = dict(
        scale=case["scale"], bias=case["bias"], soft_cap=case["soft_cap"], return_weights=case["return_weights"]
    )
    low = q.dtype == BF16
    ref, ref_w = ops.attention_reference(as_f32(q), as_f32(k), as_f32(v), mask, **options)
    if low:  # the dtypes the reference gives on the bf16 inputs themselves
        tiny = ops.attention_reference(q[:1, :1, :1], k[:1, :1, :1], v[:1, :1, :1], scale=1.0, return_weights=True)
        out_dtype, w_dtype = tiny[0].dtype, tiny[1].dtype
    else:
        out_dtype, w_dtype = ref.dtype, np.dtype(np.float32)
    with ops.use_backend(backend):
        got, got_w = ops.attention(
            to_backend(backend, q), to_backend(backend, k), to_backend(backend, v), to_backend(backend, mask),
            **dict(options, bias=to_backend(backend, case["bias"])),
        )  # fmt: skip
    assert_close(got, ref, out_dtype, low, "attention output")
    if case["return_weights"]:
        assert_close(got_w, ref_w, w_dtype, low, "attention weights")
    else:
        assert got_w is None


def attention_property(backend):
    @PROPERTY_SETTINGS
    @given(attention_cases())
    def prop(case):
        check_attention(backend, case)

    prop()


@pytest.mark.parametrize("backend, path", PATHS["attention"])
def test_attention_matches_reference(backend, path, monkeypatch):
    force_numba_path(monkeypatch, "attention", "ATTENTION_BLAS_MIN_SEQ", path)
    attention_property(backend)


def test_attention_fully_masked_row_attends_uniformly():
    """A padding query that may attend to nothing gets weights 1/kv_seq on every key (what
    transformers' additive mask gives, and what the reference does), never NaN."""
    rng = np.random.default_rng(0)
    q, k, v = (random_array(rng, s, np.float32) for s in [(1, 2, 3, 8), (1, 1, 5, 8), (1, 1, 5, 8)])
    mask = np.ones((1, 1, 3, 5), bool)
    mask[0, 0, 1] = False
    bias = np.full((1, 1, 1, 5), 7.0, np.float32)
    with ops.use_backend("numba"):
        out, weights = ops.attention(q, k, v, mask, scale=0.3, bias=bias, return_weights=True)  # BLAS path
        fused, _ = ops.attention(q, k, v, mask, scale=0.3, bias=bias)  # fused kernel (seq 3)
    np.testing.assert_allclose(weights[:, :, 1], 0.2, rtol=1e-6)
    for o in (out, fused):
        np.testing.assert_allclose(o[:, :, 1], np.broadcast_to(v[0, 0].mean(axis=0), (1, 2, 8)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# moe_dispatch
# ---------------------------------------------------------------------------------------------


@st.composite
def moe_cases(draw):
    tokens = draw(st.integers(1, 12))
    hidden = draw(st.integers(1, 24))
    inter = draw(st.integers(1, 20))
    num_experts = draw(st.integers(1, 10))
    top_k = draw(st.integers(1, num_experts))
    dtype = draw(st.sampled_from([np.float32, BF16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    routing = draw(st.sampled_from(["top_k", "one_expert", "with_repeats"]))
    if routing == "top_k":  # distinct experts per token, as a router's top-k gives; most experts idle
        index = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(tokens)])
    elif routing == "one_expert":  # every slot of every token to one expert
        index = np.full((tokens, top_k), rng.integers(num_experts))
    else:  # any ids, repeats within a token allowed
        index = rng.integers(0, num_experts, (tokens, top_k))
    weights = rng.random((tokens, top_k)).astype(np.float32)
    x = random_array(rng, (tokens, hidden), dtype)
    gate = random_array(rng, (num_experts, inter, hidden), dtype, hidden**-0.5)
    up = random_array(rng, (num_experts, inter, hidden), dtype, hidden**-0.5)
    down = random_array(rng, (num_experts, hidden, inter), dtype, inter**-0.5)
    activation = draw(st.sampled_from(["silu", "gelu", "gelu_pytorch_tanh"]))
    return x, index.astype(np.int64), weights, gate, up, down, activation


def check_moe(backend, case):
    x, index, weights, gate, up, down, activation = case
    low = x.dtype == BF16
    ref = ops.moe_dispatch_reference(as_f32(x), index, weights, as_f32(gate), as_f32(up), as_f32(down), activation)
    with ops.use_backend(backend):
        got = ops.moe_dispatch(*(to_backend(backend, a) for a in case[:6]), activation)
    assert_close(got, ref, x.dtype, low, "moe_dispatch")


def moe_property(backend):
    @PROPERTY_SETTINGS
    @given(moe_cases())
    def prop(case):
        check_moe(backend, case)

    prop()


@pytest.mark.parametrize("backend, path", PATHS["moe_dispatch"])
def test_moe_dispatch_matches_reference(backend, path, monkeypatch):
    force_numba_path(monkeypatch, "moe", "EXPERT_KERNEL_MAX_PAIRS", path)
    moe_property(backend)


# ---------------------------------------------------------------------------------------------
# The properties have teeth: a planted bug is found
# ---------------------------------------------------------------------------------------------


def _attention_window_off_by_one(q, k, v, mask=None, **options):
    """A plausible kernel bug: the window test `k > q - window` written as `k >= q - window`, so
    each query also sees the key just before its window (every allowed run grows by one key to the left)."""
    if mask is not None:
        mask = np.array(np.broadcast_to(mask, (q.shape[0], 1, q.shape[2], k.shape[2])))
        mask[..., :-1] |= mask[..., 1:].copy()
    from minilm.kernels.numba.attention import attention  # noqa: PLC0415

    return attention(q, k, v, mask, **options)


def test_planted_off_by_one_window_is_caught():
    ops.register_backend("numba_window_off_by_one", {"attention": _attention_window_off_by_one})
    try:
        with pytest.raises(AssertionError):
            attention_property("numba_window_off_by_one")
    finally:
        ops._BACKENDS.pop("numba_window_off_by_one", None)


def test_cupy_import_without_gpu_raises_config_error():
    if _GPU_SKIP is None:
        pytest.skip("a GPU is available here")
    with pytest.raises(ConfigError, match=r"pip install minilm\[gpu\]"):
        importlib.import_module("minilm.kernels.cupy")


@pytest.mark.parametrize("magnitude", [100.0, 3000.0])
def test_numba_attention_with_scores_past_exps_range(magnitude):
    """Scores far beyond float32 exp's range (~88): the softmax must subtract the row max
    (a kernel that does not gives inf / NaN), on the path that returns the weights too."""
    from minilm.kernels.numba import attention as numba_attention

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 3, 8)).astype(np.float32) * magnitude
    k = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    mask = np.tril(np.ones((3, 5), bool), k=2)[None, None]
    ref_out, ref_w = ops.attention_reference(q, k, v, mask, scale=1.0, return_weights=True)
    out, weights = numba_attention.attention(q, k, v, mask, scale=1.0, return_weights=True)
    assert np.isfinite(out).all() and np.isfinite(weights).all()
    np.testing.assert_allclose(weights, ref_w, atol=1e-5)
    np.testing.assert_allclose(out, ref_out, atol=1e-4 * np.abs(ref_out).max())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    magnitude=st.sampled_from([1.0, 30.0, 300.0, 3000.0]),
    soft_cap=st.sampled_from([None, 1.0, 50.0]),
    bias_scale=st.sampled_from([0.0, 100.0, 1000.0]),
    return_weights=st.booleans(),
    seq=st.integers(1, 4),
)
def test_numba_attention_extreme_magnitudes(seed, magnitude, soft_cap, bias_scale, return_weights, seq):
    """Scores beyond float32 exp's range, soft caps, and large ALiBi-like biases: the Numba kernels
    (decode and prefill paths) stay finite and equal the reference."""
    from minilm.kernels.numba import attention as numba_attention

    rng = np.random.default_rng(seed)
    kv_seq = seq + 3
    q = (rng.standard_normal((2, 4, seq, 8)) * magnitude).astype(np.float32)
    k = rng.standard_normal((2, 2, kv_seq, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, kv_seq, 8)).astype(np.float32)
    bias = (rng.standard_normal((1, 4, 1, kv_seq)) * bias_scale).astype(np.float32) if bias_scale else None
    mask = np.tril(np.ones((seq, kv_seq), bool), k=3)[None, None]
    options = dict(scale=0.5, bias=bias, soft_cap=soft_cap, return_weights=return_weights)
    ref_out, ref_w = ops.attention_reference(q, k, v, mask, **options)
    out, weights = numba_attention.attention(q, k, v, mask, **options)
    assert np.isfinite(out).all()
    # Both sides round each score q.k * scale (+ bias) in float32, summing in other orders: a score is
    # known to about (head_dim + 1) * eps * sum_d |q_d k_d| * scale (+ eps |bias|), and the softmax
    # turns that into the same relative change of the weights. Negligible at magnitude 1; at 3000,
    # a near-tie of two huge scores moves an output in its 4th digit (found by this test).
    eps, head_dim = float(np.finfo(np.float32).eps), q.shape[-1]
    k_per_query_head = np.repeat(np.abs(k), q.shape[1] // k.shape[1], axis=1)  # (batch, heads, kv_seq, head_dim)
    score_terms = 0.5 * float((np.abs(q) @ k_per_query_head.swapaxes(-1, -2)).max())  # max_ij sum_d |q_d k_d| scale
    score_error = (head_dim + 1) * eps * score_terms + (0.0 if bias is None else eps * float(np.abs(bias).max()))
    out_tol = 1e-4 * max(1.0, float(np.abs(ref_out).max())) + score_error * float(np.abs(v).max())
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=out_tol)
    if return_weights:
        np.testing.assert_allclose(weights, ref_w, rtol=0, atol=1e-5 + 2 * score_error)

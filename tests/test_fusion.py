"""Fused kernels (`minilm/fusion.py`): a backend may replace a `@fusable` function (a norm, RoPE,
an activation) by one kernel. On the CPU: the dispatch itself (the reference runs unless the active
backend registers a kernel that takes the arguments). On a GPU: each CuPy kernel equals its NumPy
reference (hypothesis: shapes, strided views, partial rotary, a cos/sin shared by the batch)."""

import importlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilm import fusion, nn, ops, rope
from minilm.errors import ConfigError
from minilm.models import gemma3

FUSABLE = {
    "rms_norm": nn.rms_norm,
    "gemma_rms_norm": gemma3.gemma_rms_norm,
    "layer_norm": nn.layer_norm,
    "gelu_tanh": nn.gelu_tanh,
    "apply_rope": rope.apply_rope,
}


def test_every_fusable_function_is_known_by_its_name():
    assert set(FUSABLE) <= set(fusion.FUSABLE)
    for name, function in FUSABLE.items():
        assert fusion.FUSABLE[name] is function.reference


def test_the_reference_runs_on_numpy():
    x, w = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32), np.ones(8, np.float32)
    with ops.use_backend("numpy"):
        np.testing.assert_array_equal(nn.rms_norm(x, w, 1e-6), nn.rms_norm.reference(x, w, 1e-6))


def test_a_backend_kernel_replaces_the_reference_and_may_decline():
    calls = []

    def kernel(x, weight, eps):
        calls.append(x.shape)
        return NotImplemented if x.ndim == 1 else np.zeros_like(x)

    ops.register_backend("fusion-test", {"fused": {"rms_norm": kernel}})
    x, w = np.full((2, 4), 3.0, np.float32), np.ones(4, np.float32)
    with ops.use_backend("fusion-test"):
        np.testing.assert_array_equal(nn.rms_norm(x, w, 1e-6), 0)  # the kernel's answer
        np.testing.assert_allclose(nn.rms_norm(x[0], w, 1e-6), 1, rtol=1e-6)  # declined: the reference
        np.testing.assert_array_equal(nn.gelu_tanh(x), nn.gelu_tanh.reference(x))  # not registered
    assert calls == [(2, 4), (4,)]
    np.testing.assert_allclose(nn.rms_norm(x, w, 1e-6), 1, rtol=1e-6)  # another backend again


def test_a_kernel_for_no_fusable_function_is_refused():
    with pytest.raises(ConfigError, match="rms_nrom"):
        ops.register_backend("fusion-typo", {"fused": {"rms_nrom": lambda x, w, eps: x}})


# ---------------------------------------------------------------------------------------------
# Numba's fused kernels against their references (CPU)
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, database=None)
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(1, 5), st.integers(1, 300)),
    seed=st.integers(0, 2**31),
    scale=st.sampled_from([1e-3, 1.0, 8.0, 1e3]),
)
def test_numba_gelu_tanh(shape, seed, scale):
    """Elementwise, the reference's float32 operations in order, tanh from another libm (a few ulp
    apart): the result within 4e-7 relative, plus what 2 ulp of tanh near -1 become after
    1 + tanh cancels (0.5 |x| 2^-22), including where tanh saturates (|x| large) and near zero."""
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    reference = FUSABLE["gelu_tanh"](x)
    with ops.use_backend("numba"):
        got = nn.gelu_tanh(x)
        assert ops._fused_kernel("gelu_tanh") is not None  # the fused kernel, not the reference, ran
    assert got.shape == reference.shape and got.dtype == np.float32
    bound = 4e-7 * np.abs(reference) + 0.5 * np.abs(x) * 2.0**-22
    assert np.all(np.abs(got - reference) <= bound), float(np.max(np.abs(got - reference) - bound))


def test_numba_gelu_tanh_declines_what_it_does_not_take():
    from minilm.kernels.numba import fused  # noqa: PLC0415

    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(4, 6)
    assert fused.gelu_tanh(x.astype(np.float64)) is NotImplemented
    assert fused.gelu_tanh(x.T) is NotImplemented  # not C-contiguous
    with ops.use_backend("numba"):
        np.testing.assert_array_equal(nn.gelu_tanh(x.T), FUSABLE["gelu_tanh"](x.T))  # the reference ran


# ---------------------------------------------------------------------------------------------
# CuPy kernels against their references (GPU only)
# ---------------------------------------------------------------------------------------------


def _gpu_skip_reason():
    try:
        importlib.import_module("minilm.kernels.cupy")
    except ConfigError as err:
        return str(err)
    return None


_GPU_SKIP = _gpu_skip_reason()


def on_gpu(test):
    """Marked `gpu` and skipped without CuPy and a CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))(test))


SETTINGS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-5  # relative to max(1, max|ref|): float32, sums in another order, fused multiply-adds


def _check(name, args, kwargs=None):
    import cupy as cp  # noqa: PLC0415

    kwargs = kwargs or {}
    reference = FUSABLE[name].reference(*args, **kwargs)
    with ops.use_backend("cupy"):
        on_device = [cp.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
        result = FUSABLE[name](*on_device, **kwargs)
    assert isinstance(result, cp.ndarray), "the fused kernel did not run"
    got = result.get()
    assert got.shape == reference.shape and got.dtype == reference.dtype
    np.testing.assert_allclose(got, reference, rtol=0, atol=TOL * max(1.0, float(np.abs(reference).max(initial=0))))


shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 300))


@on_gpu
@pytest.mark.parametrize("name", ["rms_norm", "gemma_rms_norm"])
@given(shape=shapes, seed=st.integers(0, 2**31), scale=st.sampled_from([1e-3, 1.0, 1e3]))
@SETTINGS
def test_cupy_rms_norms(name, shape, seed, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    _check(name, (x, w, 1e-6))


@on_gpu
@given(shape=shapes, seed=st.integers(0, 2**31))
@SETTINGS
def test_cupy_layer_norm(shape, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)  # an offset mean: the centring matters
    w, b = rng.standard_normal((2, shape[-1])).astype(np.float32)
    _check("layer_norm", (x, w, b, 1e-5))


@on_gpu
@given(shape=shapes, seed=st.integers(0, 2**31))
@SETTINGS
def test_cupy_gelu_tanh(shape, seed):
    x = (np.random.default_rng(seed).standard_normal(shape) * 4).astype(np.float32)
    _check("gelu_tanh", (x,))


@on_gpu
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    seq=st.integers(1, 9),
    half=st.integers(1, 16),
    extra=st.sampled_from([0, 0, 2, 7]),
    split_heads=st.booleans(),
    shared_cos=st.booleans(),
    seed=st.integers(0, 2**31),
)
@SETTINGS
def test_cupy_apply_rope(batch, heads, seq, half, extra, split_heads, shared_cos, seed):
    """Queries as the models hold them (a transposed view after `split_heads`), partial rotary
    (`extra` dimensions pass through), and a cos/sin of batch 1 shared by every row."""
    import cupy as cp  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    head_dim = 2 * half + extra
    flat = rng.standard_normal((batch, seq, heads * head_dim)).astype(np.float32)
    cos = rng.standard_normal((1 if shared_cos else batch, seq, 2 * half)).astype(np.float32)
    sin = rng.standard_normal(cos.shape).astype(np.float32)
    x = (
        nn.split_heads(flat, heads, head_dim)
        if split_heads
        else np.ascontiguousarray(nn.split_heads(flat, heads, head_dim))
    )
    reference = rope.apply_rope.reference(x, cos, sin)
    with ops.use_backend("cupy"):
        x_gpu = nn.split_heads(cp.asarray(flat), heads, head_dim) if split_heads else cp.asarray(x)
        got = rope.apply_rope(x_gpu, cp.asarray(cos), cp.asarray(sin))
    assert isinstance(got, cp.ndarray)
    np.testing.assert_allclose(got.get(), reference, rtol=0, atol=TOL * max(1.0, float(np.abs(reference).max())))


@on_gpu
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    kv_seq=st.integers(1, 700),
    head_dim=st.sampled_from([1, 8, 33, 256]),
    masked=st.sampled_from(["none", "padding", "nothing visible"]),
    soft_cap=st.sampled_from([None, 2.0]),
    with_bias=st.booleans(),
    cache_view=st.booleans(),
    seed=st.integers(0, 2**31),
)
@SETTINGS
def test_cupy_decode_attention(
    batch, kv_heads, groups, kv_seq, head_dim, masked, soft_cap, with_bias, cache_view, seed
):
    """One query position (decode) runs as one kernel: it equals the reference for GQA, padding
    masks (and a row that sees nothing), soft caps, ALiBi-like biases, and keys/values that are
    views into a larger cache buffer."""
    import cupy as cp  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    heads = kv_heads * groups
    q = rng.standard_normal((batch, heads, 1, head_dim)).astype(np.float32)
    buffer = rng.standard_normal((2, batch, kv_heads, kv_seq + 5, head_dim)).astype(np.float32)
    k, v = buffer[:, :, :, :kv_seq] if cache_view else np.ascontiguousarray(buffer[:, :, :, :kv_seq])
    mask = None
    if masked != "none":
        mask = rng.random((batch, 1, 1, kv_seq)) < 0.7
        mask[..., -1] = masked == "padding"  # padding: the newest key is always visible
        if masked == "nothing visible":
            mask[0] = False
    bias = rng.standard_normal((1, heads, 1, kv_seq)).astype(np.float32) if with_bias else None
    kwargs = dict(scale=head_dim**-0.5, soft_cap=soft_cap)
    reference, _ = ops.attention_reference(q, k, v, mask, bias=bias, **kwargs)
    gpu = [cp.asarray(a) for a in (q, buffer)]
    k_gpu, v_gpu = gpu[1][:, :, :, :kv_seq] if cache_view else cp.ascontiguousarray(gpu[1][:, :, :, :kv_seq])
    with ops.use_backend("cupy"):
        got, weights = ops.attention(
            gpu[0], k_gpu, v_gpu, None if mask is None else cp.asarray(mask),
            bias=None if bias is None else cp.asarray(bias), **kwargs
        )  # fmt: skip
    assert weights is None and isinstance(got, cp.ndarray)
    np.testing.assert_allclose(got.get(), reference, rtol=0, atol=TOL * max(1.0, float(np.abs(reference).max())))


@on_gpu
@given(
    lead=st.sampled_from([(1,), (3,), (2, 5)]),
    out_in=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    seed=st.integers(0, 2**31),
)
@SETTINGS
def test_cupy_linear_input_grad(lead, out_in, seed):
    """The backward pass's dx = dy W on the GPU (one cuBLAS gemm) equals the NumPy reference."""
    import cupy as cp  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    dy = rng.standard_normal((*lead, out_in[0])).astype(np.float32)
    w = rng.standard_normal(out_in).astype(np.float32)
    reference = ops.linear_input_grad_reference(dy, w)
    with ops.use_backend("cupy"):
        got = ops.linear_input_grad(cp.asarray(dy), cp.asarray(w))
    assert isinstance(got, cp.ndarray) and got.shape == reference.shape
    np.testing.assert_allclose(got.get(), reference, rtol=0, atol=TOL * max(1.0, float(np.abs(reference).max())))

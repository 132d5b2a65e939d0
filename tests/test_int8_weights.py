"""The Numba backend's int8 decode path (`minilm.kernels.numba_backend`, "Weights that are small
integers"): a float32 weight whose every block of 32 (or 16) columns is a scale times integers in
[-127, 127] -- a dequantized Q8_0 / Q5_0 / Q6_K tensor -- is read as int8 codes + scales.

It must be lossless: results equal the NumPy reference to the kernels' float32 tolerance
(|got - ref| <= 1e-5 * max|ref|, as in tests/test_kernels.py), only weights that are exactly of
that form take the path, and a weight that does becomes read-only (its int8 copy is what decode
reads). The last test runs the real Gemma 3 270M (whose embedding, attention and MLP weights take
this path) and asks for transformers' greedy ids.
"""

from __future__ import annotations

import gc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilm import ops
from minilm.kernels import numba_backend as nb

F32_TOL = 1e-5  # relative to max|ref|, as tests/test_kernels.py
BF16 = np.dtype(ml_dtypes.bfloat16)


def block_weight(rng, out_features, in_features, block, max_code=127):
    """codes * scales with float16 scales (as GGUF stores them): exact in float32."""
    codes = rng.integers(-max_code, max_code + 1, size=(out_features, in_features)).astype(np.float32)
    scales = rng.random((out_features, in_features // block)).astype(np.float16).astype(np.float32)
    return codes * np.repeat(scales, block, axis=1)  # (out_features, in_features) float32


def assert_close(got, ref):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    bound = F32_TOL * max(float(np.max(np.abs(ref), initial=0.0)), 1e-30)
    assert np.max(np.abs(got - ref), initial=0.0) <= bound


@st.composite
def int8_cases(draw):
    lead = draw(st.sampled_from([(1,), (1, 1), (3,), (2, 4), (8,)]))  # at most GEMV_MAX_ROWS rows
    in_features = draw(st.sampled_from([16, 32, 48, 96, 640]))
    out_features = draw(st.integers(1, 70))  # groups of four and the rows left over
    block = draw(st.sampled_from([32, 16])) if in_features % 32 == 0 else 16
    max_code = draw(st.sampled_from([127, 16, 1]))  # Q8_0-like, Q5_0-like, tiny codes
    x_dtype = draw(st.sampled_from([np.float32, BF16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = block_weight(rng, out_features, in_features, block, max_code)
    weight[rng.random(out_features) < 0.2, :block] = 0.0  # some all-zero blocks
    x = rng.standard_normal((*lead, in_features)).astype(np.float32).astype(x_dtype)
    bias = rng.standard_normal(out_features).astype(np.float32) if draw(st.booleans()) else None
    return x, weight, bias


def test_int8_blocks_match_reference(monkeypatch):
    monkeypatch.setattr(nb, "INT8_MIN_ELEMENTS", 0)  # analyse every weight, however small

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(int8_cases())
    def prop(case):
        x, weight, bias = case
        ref = ops.linear_reference(x.astype(np.float32), weight, bias)
        with ops.use_backend("numba"):
            got = ops.linear(x, weight, bias)
        assert nb._int8_weight(weight) is not None, "an exact scale x int8 weight must take the int8 path"
        assert not weight.flags.writeable, "a weight read as int8 must be read-only"
        assert_close(got, ref)

    prop()


def test_sixteen_column_blocks_when_thirty_two_do_not_fit(monkeypatch):
    """Q6_K: a scale per 16 columns. Blocks of 32 would need codes beyond 127; 16 are chosen."""
    monkeypatch.setattr(nb, "INT8_MIN_ELEMENTS", 0)
    weight = block_weight(np.random.default_rng(0), 12, 64, 16, max_code=32)
    codes, scales = nb._int8_weight(weight)
    assert codes.dtype == np.int8 and scales.shape == (12, 4)
    np.testing.assert_array_equal(codes * np.repeat(scales, 16, axis=1), weight)  # bit for bit


def test_float32_weights_stay_float32(monkeypatch):
    monkeypatch.setattr(nb, "INT8_MIN_ELEMENTS", 0)
    rng = np.random.default_rng(1)
    random = rng.standard_normal((8, 64)).astype(np.float32)
    almost = block_weight(rng, 8, 64, 32)
    almost[5, 40] = np.nextafter(almost[5, 40], np.float32(np.inf))  # one value one ulp off
    x = rng.standard_normal((1, 64)).astype(np.float32)
    for weight in (random, almost):
        with ops.use_backend("numba"):
            got = ops.linear(x, weight)
        assert nb._int8_weight(weight) is None and weight.flags.writeable
        assert_close(got, ops.linear_reference(x, weight))


def test_small_weights_are_not_analysed():
    weight = block_weight(np.random.default_rng(2), 4, 32, 32)  # far below INT8_MIN_ELEMENTS
    assert nb._int8_weight(weight) is None and weight.flags.writeable


def test_analysis_is_forgotten_with_the_weight(monkeypatch):
    monkeypatch.setattr(nb, "INT8_MIN_ELEMENTS", 0)
    before = len(nb._int8_weights)
    weight = block_weight(np.random.default_rng(3), 8, 32, 32)
    assert nb._int8_weight(weight) is not None and len(nb._int8_weights) == before + 1
    del weight
    gc.collect()
    assert len(nb._int8_weights) == before


def test_writing_into_an_int8_weight_fails_loudly(monkeypatch):
    monkeypatch.setattr(nb, "INT8_MIN_ELEMENTS", 0)
    weight = block_weight(np.random.default_rng(4), 8, 32, 32)
    nb._int8_weight(weight)
    with pytest.raises(ValueError, match="read-only"):
        weight[0, 0] += 1.0


@pytest.mark.slow
def test_real_model_greedy_ids_on_the_int8_path():
    """`minilm.generate()` decodes with this backend by default: the shipped model's greedy ids must
    still be transformers' (tests/fixtures/gemma3_270m_reference.json), for a short prompt and for
    one longer than the sliding window."""
    import json
    from pathlib import Path

    import minilm
    from minilm.default_model import default_model_path

    reference = json.loads((Path(__file__).parent / "fixtures" / "gemma3_270m_reference.json").read_text())
    cases = {case["name"]: case for case in reference["generation"]["cases"]}
    model = minilm.from_pretrained(default_model_path())
    with ops.use_backend("numba"):
        for name in ("capital", "long"):
            prompt = np.array([cases[name]["input_ids"]])
            ids = model.generate(prompt, max_new_tokens=cases[name]["max_new_tokens"])
            assert ids[0, prompt.shape[1]:].tolist() == cases[name]["new_ids"], name
    assert nb._int8_weight(model.params.lm_head.weight) is not None  # the tied embedding took the path

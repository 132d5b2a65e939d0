"""The Numba backend's int8 weights (`minilm.kernels.numba.linear`): `ops.prepare_weight`, called
once per weight at load, returns an `Int8BlockWeight` for a float32 weight whose every block of 32
(or 16) columns is a scale times integers in [-127, 127] -- a dequantized Q8_0 / Q5_0 / Q6_K
tensor -- and decode reads its int8 codes + scales instead of the float32 values.

What must hold:
  * lossless: codes * scales rebuild the weight bit for bit, and `linear` on the prepared weight
    equals the NumPy reference to the kernels' float32 tolerance (|got - ref| <= 1e-5 * max|ref|,
    as in tests/test_kernels.py);
  * only weights exactly of that form are prepared so; every other weight stays a plain ndarray;
  * nothing the caller passed is changed (values, flags, type) by preparing or by `linear`;
  * only the prepared array carries codes: anything derived from it (a slice, `w.T`, `w * 2`,
    `table[ids]`, a copy) is plain float32 data with no codes, and writing into it fails loudly.
The last test runs the real Gemma 3 270M loaded under the backend (its GGUF matrices now stay in
their blocks, tests/test_quantized_weights.py) and asks for transformers' greedy ids.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilm import ops
from minilm.io.quants import QuantizedWeight
from minilm.kernels.numba import linear as numba_linear
from minilm.kernels.numba.linear import Int8BlockWeight

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


def prepare(weight):
    with ops.use_backend("numba"):
        return ops.prepare_weight(weight)


def assert_plain(a, what):
    assert getattr(a, "codes", None) is None and getattr(a, "scales", None) is None, f"{what} carries codes"


@pytest.fixture
def any_size(monkeypatch):
    monkeypatch.setattr(numba_linear, "INT8_MIN_ELEMENTS", 0)  # prepare every weight, however small


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


def test_int8_blocks_match_reference(any_size):
    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(int8_cases())
    def prop(case):
        x, weight, bias = case
        prepared = prepare(weight)
        assert isinstance(prepared, Int8BlockWeight) and prepared.codes is not None, (
            "an exact scale x int8 weight must be prepared as int8"
        )
        block = weight.shape[1] // prepared.scales.shape[1]
        np.testing.assert_array_equal(prepared.codes * np.repeat(prepared.scales, block, axis=1), weight)
        np.testing.assert_array_equal(prepared, weight)  # the same float32 values, read as float32
        ref = ops.linear_reference(x.astype(np.float32), weight, bias)
        with ops.use_backend("numba"):
            got = ops.linear(x, prepared, bias)
        assert_close(got, ref)

    prop()


def test_sixteen_column_blocks_when_thirty_two_do_not_fit(any_size):
    """Q6_K: a scale per 16 columns. Blocks of 32 would need codes beyond 127; 16 are chosen."""
    weight = block_weight(np.random.default_rng(0), 12, 64, 16, max_code=32)
    prepared = prepare(weight)
    assert prepared.codes.dtype == np.int8 and prepared.scales.shape == (12, 4)
    np.testing.assert_array_equal(prepared.codes * np.repeat(prepared.scales, 16, axis=1), weight)  # bit for bit


def test_other_weights_stay_plain(any_size):
    """Not exactly int8 x scale, not float32, not a C-contiguous matrix: prepared as they are."""
    rng = np.random.default_rng(1)
    random = rng.standard_normal((8, 64)).astype(np.float32)
    almost = block_weight(rng, 8, 64, 32)
    almost[5, 40] = np.nextafter(almost[5, 40], np.float32(np.inf))  # one value one ulp off
    exact = block_weight(rng, 8, 64, 32)
    others = {
        "random": random,
        "one ulp off": almost,
        "bfloat16": exact.astype(BF16),
        "float64": exact.astype(np.float64),
        "transposed view": block_weight(rng, 64, 8, 8).T,
        "experts (3-D)": np.stack([exact, exact]),
    }
    x = rng.standard_normal((1, 64)).astype(np.float32)
    for what, weight in others.items():
        prepared = prepare(weight)
        assert type(prepared) is np.ndarray, what
        np.testing.assert_array_equal(prepared, weight)
        if prepared.ndim == 2:
            with ops.use_backend("numba"):
                got = ops.linear(x, prepared)
            ref = ops.linear_reference(x, weight)
            assert_close(got, ref.astype(got.dtype))


def test_small_weights_stay_plain():
    weight = block_weight(np.random.default_rng(2), 4, 32, 32)  # far below INT8_MIN_ELEMENTS
    assert type(prepare(weight)) is np.ndarray


def test_preparing_or_calling_linear_changes_no_caller_array(any_size):
    rng = np.random.default_rng(3)
    weight = block_weight(rng, 8, 64, 32)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    weight_before, x_before = weight.copy(), x.copy()
    prepared = prepare(weight)
    with ops.use_backend("numba"):
        ops.linear(x, weight)  # the plain array: the float32 kernel
        ops.linear(x, prepared)  # the int8 kernel
    for a, before, what in ((weight, weight_before, "weight"), (x, x_before, "x")):
        assert type(a) is np.ndarray and a.flags.writeable, f"{what} was made read-only or changed type"
        np.testing.assert_array_equal(a, before)
    assert_plain(weight, "the caller's weight")
    assert prepare(prepared) is prepared  # preparing twice (model.to_device() again) keeps it


def test_derived_arrays_carry_no_codes(any_size):
    """Only the prepared array is read as int8; a view or a result is plain float32 data, and
    linear on a slice of a prepared weight uses the slice's own values."""
    rng = np.random.default_rng(4)
    table = prepare(block_weight(rng, 16, 64, 32))  # an embedding table, tied as the LM head
    assert table.codes is not None
    ids = np.array([[3, 0, 15]])
    derived = {
        "slice": table[2:],
        "row": table[5],
        "w.T": table.T,
        "w * 2": table * 2,
        "table[ids]": table[ids],
        "copy": table.copy(),
        "reshape": table.reshape(32, 32),
        "np.asarray": np.asarray(table),
        "x @ w.T": np.ones((1, 64), np.float32) @ table.T,
    }
    for what, a in derived.items():
        assert_plain(a, what)
    assert type(table * 2) is np.ndarray and type(table[ids] * 8.0) is np.ndarray  # ufuncs give plain arrays
    np.testing.assert_array_equal(table[ids], np.asarray(table)[ids])
    x = rng.standard_normal((1, 64)).astype(np.float32)
    with ops.use_backend("numba"):
        got = ops.linear(x, table[2:])
    assert_close(got, ops.linear_reference(x, np.asarray(table)[2:]))


def test_writing_into_a_prepared_weight_fails_loudly(any_size):
    prepared = prepare(block_weight(np.random.default_rng(5), 8, 32, 32))
    with pytest.raises(ValueError, match="read-only"):
        prepared[0, 0] += 1.0
    with pytest.raises(ValueError, match="read-only"):
        prepared.codes[0, 0] = 1


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["default", "none"])
def test_real_model_greedy_ids_on_the_int8_path(keep, monkeypatch):
    """`minilm.generate()` loads and decodes with this backend by default: the shipped model's
    greedy ids must still be transformers' (tests/fixtures/gemma3_270m_reference.json), for a
    short prompt and for one longer than the sliding window; with the default weights (every GGUF
    matrix in its blocks, Q5_0 repacked to int8 codes) and with every weight float32 read as int8
    codes where it is exactly codes x scales (MINILM_KEEP_QUANTIZED=none)."""
    import json
    from pathlib import Path

    import minilm
    from minilm import default_model

    reference = json.loads((Path(__file__).parent / "fixtures" / "gemma3_270m_reference.json").read_text())
    cases = {case["name"]: case for case in reference["generation"]["cases"]}
    if keep == "default":
        monkeypatch.delenv("MINILM_KEEP_QUANTIZED", raising=False)
    else:
        monkeypatch.setenv("MINILM_KEEP_QUANTIZED", keep)
    with ops.use_backend("numba"):
        model = minilm.from_pretrained(default_model.default_model_path())  # weights prepared at load
        for name in ("capital", "long"):
            prompt = np.array([cases[name]["input_ids"]])
            ids = model.generate(prompt, max_new_tokens=cases[name]["max_new_tokens"])
            assert ids[0, prompt.shape[1] :].tolist() == cases[name]["new_ids"], name
    lm_head = model.params.lm_head.weight
    assert lm_head is model.params.model.embed_tokens.weight  # tied: one array
    if keep == "default":
        assert isinstance(lm_head, QuantizedWeight)  # the tied embedding stays in its Q8_0 blocks
    else:
        assert lm_head.codes is not None  # read as int8 codes + scales

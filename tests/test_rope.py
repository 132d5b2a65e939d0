"""RoPE: every rope_type against transformers' ROPE_INIT_FUNCTIONS outputs, properties of the
rotation (hypothesis), and clear errors for bad rope_scaling.

Tolerance for inv_freq: 2 ulp of float32. torch's float32 pow is not correctly rounded (its
vectorised and scalar paths differ by one ulp) while minilm rounds the exact power once; on the
saved reference every value agrees bit for bit (0 ulp), which the report below prints.
"""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

from minilm import rope
from minilm.errors import ConfigError

REFERENCE = json.loads((FIXTURES / "rope_reference.json").read_text())["entries"]


def config_from_entry(entry):
    """A minimal config object from a reference entry's transformers config (rope_parameters
    split into rope_theta + rope_scaling, as minilm's configs hold them)."""
    c = dict(entry["config"])
    params = dict(c.pop("rope_parameters"))
    theta = params.pop("rope_theta")
    partial = params.get("partial_rotary_factor", 1.0)
    scaling = None if params.get("rope_type") == "default" else params
    return SimpleNamespace(**c, rope_theta=theta, partial_rotary_factor=partial, rope_scaling=scaling)


def make_config(head_dim=32, rope_theta=10000.0, scaling=None, max_position_embeddings=2048, partial=1.0, **extra):
    return SimpleNamespace(
        head_dim=head_dim,
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        partial_rotary_factor=partial,
        rope_scaling=scaling,
        **extra,
    )


# -- against transformers ----------------------------------------------------------------------


@pytest.mark.parametrize("entry", REFERENCE, ids=[e["key"] for e in REFERENCE])
def test_each_rope_type_matches_transformers(entry):
    inv_freq, scaling = rope.compute_inv_freq(config_from_entry(entry), seq_len=entry["seq_len"])
    ref = np.asarray(entry["inv_freq"], np.float32)
    assert inv_freq.dtype == np.float32 and inv_freq.shape == ref.shape
    np.testing.assert_array_max_ulp(inv_freq, ref, maxulp=2)
    assert math.isclose(scaling, entry["attention_scaling"], rel_tol=1e-12)
    ulp = np.max(np.abs(inv_freq.astype(np.float64) - ref) / np.spacing(ref))
    print(entry["key"], f"max ulp = {ulp:.0f}")


def test_every_registered_type_is_in_the_reference():
    assert set(rope.ROPE_INIT_FUNCTIONS) == {"default", "linear", "dynamic", "llama3", "yarn", "longrope"}
    assert set(rope.ROPE_INIT_FUNCTIONS) <= {e["rope_type"] for e in REFERENCE}


def test_longrope_switches_factor_sets_after_the_original_length():
    short, long_ = [1.0, 1.5, 2.0, 4.0], [1.0, 3.0, 9.0, 27.0]
    cfg = make_config(
        head_dim=8,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        scaling={"rope_type": "longrope", "short_factor": short, "long_factor": long_},
    )
    default, _ = rope.compute_inv_freq(make_config(head_dim=8))
    for seq_len, factors in [(None, short), (1, short), (16, short), (17, long_), (64, long_), (1000, long_)]:
        inv_freq, scaling = rope.compute_inv_freq(cfg, seq_len=seq_len)
        np.testing.assert_allclose(inv_freq, default / np.float32(factors), rtol=1e-6)
        assert math.isclose(scaling, math.sqrt(1 + math.log(4) / math.log(16)))  # factor = 64 / 16


def test_original_max_position_embeddings_precedence():
    """A config field (Phi-3) wins over the rope_scaling key, which wins over max_position_embeddings."""
    scaling = {
        "rope_type": "longrope",
        "short_factor": [1.0] * 4,
        "long_factor": [2.0] * 4,
        "original_max_position_embeddings": 8,
    }
    assert rope.original_max_positions(make_config(head_dim=8, original_max_position_embeddings=16), scaling) == 16
    assert rope.original_max_positions(make_config(head_dim=8), scaling) == 8
    assert rope.original_max_positions(make_config(head_dim=8, max_position_embeddings=99), {}) == 99


def test_rope_type_spellings():
    assert rope.rope_type(None) == "default"
    assert rope.rope_type({"type": "su"}) == "longrope"
    assert rope.rope_type({"type": "linear", "factor": 2.0}) == "linear"
    assert rope.rope_type({"rope_type": "yarn", "type": "linear"}) == "yarn"  # rope_type wins, as in transformers


def test_base_override_and_partial_rotary():
    cfg = make_config(head_dim=16, partial=0.5)
    inv_freq, _ = rope.compute_inv_freq(cfg, base=100.0)
    assert inv_freq.shape == (4,)  # rope_dim = 8
    np.testing.assert_allclose(inv_freq, 100.0 ** -(np.arange(0, 8, 2) / 8), rtol=1e-6)


# -- properties --------------------------------------------------------------------------------

head_dims = st.sampled_from([4, 8, 16, 32, 64, 128])
bases = st.floats(min_value=10.0, max_value=1e6)
factors = st.floats(min_value=1.0, max_value=32.0)


def variant_scalings(dim, factor):
    """One rope_scaling per variant at the given factor (longrope: all factors = `factor`)."""
    return {
        "default": None,
        "linear": {"rope_type": "linear", "factor": factor},
        "dynamic": {"rope_type": "dynamic", "factor": factor},
        "llama3": {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
        "yarn": {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 512},
        "longrope": {
            "rope_type": "longrope",
            "short_factor": [factor] * (dim // 2),
            "long_factor": [factor] * (dim // 2),
            "original_max_position_embeddings": 2048,
        },
    }


def rotate(x, positions, inv_freq, scaling):
    """x: (n, dim) at positions (n,) -> rotated (n, dim)."""
    cos, sin = rope.rope_cos_sin(np.asarray(positions)[None], inv_freq, scaling)  # (1, n, dim)
    return rope.apply_rope(x[None, None], cos, sin)[0, 0]


@settings(max_examples=40, deadline=None)
@given(dim=head_dims, base=bases, factor=factors, seed=st.integers(0, 2**31 - 1))
def test_rotation_preserves_norms_up_to_the_attention_scaling(dim, base, factor, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, dim)).astype(np.float32)
    positions = rng.integers(0, 4096, size=6)
    for kind, scaling in variant_scalings(dim, factor).items():
        inv_freq, s = rope.compute_inv_freq(make_config(dim, base, scaling), seq_len=4096)
        rotated = rotate(x, positions, inv_freq, s)
        np.testing.assert_allclose(
            np.linalg.norm(rotated, axis=-1), s * np.linalg.norm(x, axis=-1), rtol=1e-5, err_msg=kind
        )


@settings(max_examples=40, deadline=None)
@given(
    dim=head_dims,
    base=bases,
    factor=factors,
    m=st.integers(0, 300),
    n=st.integers(0, 300),
    shift=st.integers(0, 200),
    seed=st.integers(0, 2**31 - 1),
)
def test_scores_depend_only_on_the_relative_position(dim, base, factor, m, n, shift, seed):
    """q(m) . k(n) == q(m + t) . k(n + t), for every rope type at a fixed sequence length."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, dim)).astype(np.float32)
    for kind, scaling in variant_scalings(dim, factor).items():
        inv_freq, s = rope.compute_inv_freq(make_config(dim, base, scaling), seq_len=1024)
        a = rotate(q, [m], inv_freq, s) @ rotate(k, [n], inv_freq, s).T
        b = rotate(q, [m + shift], inv_freq, s) @ rotate(k, [n + shift], inv_freq, s).T
        scale = s * s * np.linalg.norm(q) * np.linalg.norm(k)
        assert abs(a.item() - b.item()) <= 1e-3 * scale, kind


@settings(max_examples=40, deadline=None)
@given(dim=head_dims, base=bases, seq_len=st.one_of(st.none(), st.integers(1, 2048)))
def test_each_variant_reduces_to_default_at_factor_one(dim, base, seq_len):
    default, _ = rope.compute_inv_freq(make_config(dim, base))
    for kind, scaling in variant_scalings(dim, 1.0).items():
        # dynamic: only up to max_position_embeddings (2048 here); past it the base grows even at factor 1
        inv_freq, s = rope.compute_inv_freq(make_config(dim, base, scaling), seq_len=seq_len)
        np.testing.assert_allclose(inv_freq, default, rtol=1e-6, err_msg=kind)
        assert s == 1.0, kind


def test_dynamic_grows_the_base_past_max_position_embeddings():
    cfg = make_config(16, scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64)
    at_max, _ = rope.compute_inv_freq(cfg, seq_len=64)
    longer, _ = rope.compute_inv_freq(cfg, seq_len=200)
    np.testing.assert_array_equal(at_max, rope.compute_inv_freq(make_config(16))[0])
    assert (longer[1:] < at_max[1:]).all() and longer[0] == at_max[0]  # slower rotation, dimension 0 stays 1


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"rope_type": "ntk-by-parts", "factor": 2.0}, "unknown rope type 'ntk-by-parts'"),
        ({"rope_type": "linear"}, "needs the key(s) ['factor']"),
        ({"rope_type": "dynamic"}, "needs the key(s) ['factor']"),
        ({"rope_type": "linear", "factor": 0}, "must be a positive number"),
        ({"rope_type": "linear", "factor": "2"}, "must be a positive number"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "needs the key(s) ['high_freq_factor']"),
        ({"rope_type": "yarn"}, "needs the key(s) ['factor']"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 16}, "needs the key(s) ['long_factor']"),
        (
            {"rope_type": "longrope", "short_factor": [1.0] * 15, "long_factor": [1.0] * 16},
            "rope_scaling['short_factor'] must be a list of rope_dim // 2 = 16 numbers, got 15",
        ),
        (
            {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": 2.0},
            "rope_scaling['long_factor'] must be a list of rope_dim // 2 = 16 numbers, got float",
        ),
    ],
)
def test_bad_rope_scaling_raises_config_error(scaling, message):
    cfg = make_config(32, scaling=scaling)
    with pytest.raises(ConfigError) as err:
        rope.check_rope_scaling(cfg)
    assert message in str(err.value)


def test_wrong_long_factor_length_is_caught_before_the_long_regime():
    cfg = make_config(8, scaling={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 5})
    with pytest.raises(ConfigError, match="long_factor"):
        rope.check_rope_scaling(cfg)


def test_dynamic_needs_more_than_two_rotary_dimensions():
    with pytest.raises(ConfigError, match="dynamic rope needs a rotary dimension > 2"):
        rope.check_rope_scaling(make_config(2, scaling={"rope_type": "dynamic", "factor": 2.0}))

"""BLOOM against transformers: every head and output field, ALiBi, the per-head interleaved QKV
layout, the Hub's config / tensor spelling, generation, the KV cache and the keras-hub-style
backbone. Tolerance: max|Δ| <= 1e-4 * max(1, max|ref|), float32, non-padding positions."""

import json

import numpy as np
import pytest
from conftest import assert_close, load_reference, max_diff, tolerance
from parity import check_generation, compare_outputs, forward_kwargs

import minilm
from minilm import BloomBackbone
from minilm.errors import CheckpointError, ConfigError
from minilm.io.safetensors import read_checkpoint, read_safetensors, write_safetensors
from minilm.models.bloom import (
    BloomConfig,
    BloomForCausalLM,
    BloomForTokenClassification,
    BloomModel,
    alibi_bias,
    alibi_slopes,
)

FIXTURES = {
    "bloom_causal_lm": "BloomForCausalLM",
    "bloom_seq_cls": "BloomForSequenceClassification",
    "bloom_token_cls": "BloomForTokenClassification",
    "bloom_qa": "BloomForQuestionAnswering",
    "bloom_base": "BloomModel",
    "bloom_hub_post_ln": "BloomForCausalLM",
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_parity_with_transformers(name):
    folder, ref, meta = load_reference(name)
    model = minilm.from_pretrained(folder)
    assert type(model).__name__ == FIXTURES[name] == meta["model_class"]
    report = compare_outputs(model(**forward_kwargs(ref, meta["head"])), ref)
    assert {"hidden_states_0", "attentions_0"} <= set(report)
    print(name, f"max|Δ| = {max(report.values()):.2e}")


@pytest.mark.parametrize("name", ["bloom_causal_lm", "bloom_hub_post_ln"])
def test_greedy_generation_matches_transformers_batch_and_each_row(name):
    folder, ref, meta = load_reference(name)
    check_generation(minilm.from_pretrained(folder), ref, meta)


def test_breaking_one_weight_breaks_parity():
    folder, ref, meta = load_reference("bloom_causal_lm")
    model = minilm.from_pretrained(folder)
    model.params.transformer.h[1].self_attention.query_key_value.weight[2, 1] += 0.05  # head 2's keys
    out = model(**forward_kwargs(ref, "causal_lm"))
    assert max_diff(out.logits, ref["logits"], ref["attention_mask"].astype(bool)) > tolerance(ref["logits"])


# -- ALiBi -------------------------------------------------------------------------------------


def test_alibi_slopes_powers_of_two_and_interleaved_series():
    np.testing.assert_array_equal(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    np.testing.assert_array_equal(alibi_slopes(6), 2.0 ** -np.array([2, 4, 6, 8, 1, 3]))  # 4's series, then 8's odd
    np.testing.assert_array_equal(alibi_slopes(5), 2.0 ** -np.array([2, 4, 6, 8, 1]))
    np.testing.assert_array_equal(alibi_slopes(1), [2.0**-8])


@pytest.mark.parametrize("num_heads", [1, 2, 3, 5, 6, 7, 12, 16, 24, 31, 32, 40, 64, 71, 112, 128])
def test_alibi_slopes_any_head_count(num_heads):
    """Closed form: the series 2^(-8k/c), k = 1..c, for c = the largest power of two <= n, then
    2^(-4k/c) for odd k (every other term of the 2c series) until n slopes (BLOOM-176B has 112
    heads). Like transformers, minilm raises the float32-rounded base to the power k, so the
    rounding of the base compounds: k * 2^-24 relative at most."""
    c = 2 ** int(np.floor(np.log2(num_heads)))
    exact = [2.0 ** (-8 * k / c) for k in range(1, c + 1)] + [2.0 ** (-4 * k / c) for k in range(1, 2 * c, 2)]
    slopes = alibi_slopes(num_heads)
    assert slopes.dtype == np.float32 and slopes.shape == (num_heads,)
    np.testing.assert_allclose(slopes, exact[:num_heads], rtol=2 * num_heads * 2.0**-24)
    assert len(set(slopes.tolist())) == num_heads  # every head its own slope


def test_alibi_bias_ignores_left_padding():
    unpadded = alibi_bias(np.ones((1, 4), np.int64), 6)  # (1, 6, 1, 4)
    padded = alibi_bias(np.array([[0, 0, 1, 1, 1, 1]]), 6)
    assert padded.shape == (1, 6, 1, 6)
    np.testing.assert_array_equal(padded[..., 2:], unpadded)  # the real keys see positions 0..3 either way
    np.testing.assert_array_equal(padded[..., :2], 0.0)
    np.testing.assert_array_equal(unpadded[0, :, 0], alibi_slopes(6)[:, None] * np.arange(4, dtype=np.float32))


def test_left_padding_shifts_nothing_in_the_model():
    folder, ref, _ = load_reference("bloom_causal_lm")
    model = minilm.from_pretrained(folder)
    mask = ref["attention_mask"]
    batch = model(ref["input_ids"], attention_mask=mask).logits
    for r in range(len(mask)):
        alone = model(ref["input_ids"][r : r + 1, mask[r] == 1]).logits  # no mask at all: ALiBi from arange
        assert_close(batch[r, mask[r] == 1], alone[0])


# -- the fused QKV layout ----------------------------------------------------------------------


def test_query_key_value_is_viewed_per_head_and_saved_back_fused(tmp_path):
    folder, ref, _ = load_reference("bloom_causal_lm")
    model = minilm.from_pretrained(folder)
    cfg = model.config
    hidden, d = cfg.hidden_size, cfg.head_dim
    fused = np.asarray(read_checkpoint(folder)["transformer.h.0.self_attention.query_key_value.weight"])
    view = model.params.transformer.h[0].self_attention.query_key_value.weight  # (n_head, 3, head_dim, hidden)
    assert view.shape == (cfg.n_head, 3, d, hidden)
    for h in range(cfg.n_head):  # rows of head h: [q (d rows), k (d rows), v (d rows)]
        np.testing.assert_array_equal(view[h, 0], fused[3 * d * h : 3 * d * h + d])  # q_h
        np.testing.assert_array_equal(view[h, 1], fused[3 * d * h + d : 3 * d * h + 2 * d])  # k_h
        np.testing.assert_array_equal(view[h, 2], fused[3 * d * h + 2 * d : 3 * d * (h + 1)])  # v_h
    model.save_pretrained(tmp_path / "saved")
    saved, original = read_checkpoint(tmp_path / "saved"), read_checkpoint(folder)
    assert set(saved) == set(original)  # lm_head stays tied (not written), as transformers saves it
    for name in original:
        np.testing.assert_array_equal(saved[name], original[name], err_msg=name)


def test_save_pretrained_round_trip(tmp_path):
    folder, ref, meta = load_reference("bloom_token_cls")
    model = minilm.from_pretrained(folder)
    model.save_pretrained(tmp_path / "saved")
    again = minilm.from_pretrained(tmp_path / "saved")
    assert isinstance(again, BloomForTokenClassification)
    a, b = model(**forward_kwargs(ref, "token_cls")), again(**forward_kwargs(ref, "token_cls"))
    np.testing.assert_array_equal(a.logits, b.logits)
    assert a.loss == b.loss
    assert "transformer.h.0.self_attention.query_key_value.weight" in read_checkpoint(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["n_head"] == 6


def test_state_dict_can_be_passed_back_in():
    folder, ref, _ = load_reference("bloom_base")
    model = minilm.from_pretrained(folder)
    copy = BloomModel(model.config, params=model.state_dict())
    np.testing.assert_array_equal(copy(ref["input_ids"]).last_hidden_state, model(ref["input_ids"]).last_hidden_state)


def test_base_model_loads_a_head_checkpoint_and_head_loads_hub_keys():
    folder, ref, _ = load_reference("bloom_qa")  # keys under `transformer.`
    base = BloomModel.from_pretrained(folder)
    qa = minilm.from_pretrained(folder)
    kwargs = dict(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])
    np.testing.assert_array_equal(base(**kwargs).last_hidden_state, qa.base_model(**kwargs).last_hidden_state)
    hub, _, _ = load_reference("bloom_hub_post_ln")  # keys without `transformer.`, like the Hub
    assert not any(k.startswith("transformer.") for k in read_checkpoint(hub))
    assert isinstance(minilm.from_pretrained(hub), BloomForCausalLM)


# -- cache and generation ----------------------------------------------------------------------


def test_cached_decoding_equals_full_recompute_with_left_padding():
    folder, ref, _ = load_reference("bloom_causal_lm")
    model = minilm.from_pretrained(folder)
    ids, mask = ref["generate_input_ids"], ref["generate_attention_mask"]
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    seq, m = ids, mask
    for _ in range(10):
        nxt = model(seq, attention_mask=m).logits[:, -1].argmax(-1)
        seq, m = np.concatenate([seq, nxt[:, None]], 1), np.concatenate([m, np.ones_like(nxt)[:, None]], 1)
    np.testing.assert_array_equal(cached, seq)
    full = model(seq, attention_mask=m).logits
    cache = minilm.KVCache(model.config.n_layer)
    p = ids.shape[1]
    steps = [model(seq[:, :p], attention_mask=m[:, :p], past_key_values=cache, use_cache=True).logits]
    for t in range(p, seq.shape[1]):
        steps.append(
            model(seq[:, t : t + 1], attention_mask=m[:, : t + 1], past_key_values=cache, use_cache=True).logits
        )
    assert_close(np.concatenate(steps, axis=1), full, keep=m.astype(bool))


# -- config ------------------------------------------------------------------------------------


def test_config_reads_both_spellings():
    hub = BloomConfig.from_dict({"n_embed": 64, "num_attention_heads": 8, "n_layer": 3, "vocab_size": 100})
    hf5 = BloomConfig.from_dict({"hidden_size": 64, "n_head": 8, "num_hidden_layers": 3, "vocab_size": 100})
    for c in (hub, hf5):
        assert (c.hidden_size, c.n_head, c.n_layer, c.head_dim) == (64, 8, 3, 8)
        assert (c.num_attention_heads, c.num_hidden_layers) == (8, 3)
    assert "n_embed" not in hub.extra and hub.to_dict()["hidden_size"] == 64


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 36, "n_head": 5}, "hidden_size=36 is not divisible by n_head=5"),
        ({"n_head": 0}, "n_head must be a positive integer"),
        ({"n_layer": -1}, "n_layer must be a positive integer"),
    ],
)
def test_bad_config_raises_config_error(changes, message):
    with pytest.raises(ConfigError) as err:
        BloomConfig.from_dict({"vocab_size": 10, "hidden_size": 24, "n_head": 6, **changes})
    assert message in str(err.value)


def test_wrong_fused_qkv_shape_names_the_tensor(tmp_path):
    folder, _, _ = load_reference("bloom_base")
    tensors = {k: np.array(v) for k, v in read_safetensors(folder / "model.safetensors").items()}
    tensors["h.1.self_attention.query_key_value.weight"] = tensors["h.1.self_attention.query_key_value.weight"][:-4]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_bytes((folder / "config.json").read_bytes())
    write_safetensors(tmp_path / "bad" / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"h\.1\.self_attention\.query_key_value\.weight.*3 \* hidden_size"):
        minilm.from_pretrained(tmp_path / "bad")


# -- keras-hub style ---------------------------------------------------------------------------


def test_backbone_and_hf_model_agree_exactly():
    folder, ref, _ = load_reference("bloom_causal_lm")
    hf = minilm.from_pretrained(folder)
    backbone = BloomBackbone.from_preset(folder)
    hidden = backbone({"token_ids": ref["input_ids"], "padding_mask": ref["attention_mask"]})
    expected = hf.base_model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
    np.testing.assert_array_equal(hidden, expected)
    logits = backbone.token_embedding(hidden, reverse=True)  # tied LM head
    np.testing.assert_array_equal(logits, hf(ref["input_ids"], attention_mask=ref["attention_mask"]).logits)
    # the keras-style constructor on the same weights
    config = backbone.get_config()
    assert config == {
        "vocabulary_size": 96,
        "num_layers": 2,
        "num_heads": 6,
        "hidden_dim": 36,
        "intermediate_dim": 144,
        "dropout": 0.0,
        "layer_norm_epsilon": 1e-5,
        "dtype": "float32",
    }
    rebuilt = BloomBackbone(**config, params=hf.state_dict())
    np.testing.assert_array_equal(
        rebuilt({"token_ids": ref["input_ids"], "padding_mask": ref["attention_mask"]}), expected
    )


def test_backbone_preset_round_trip(tmp_path):
    folder, ref, _ = load_reference("bloom_hub_post_ln")
    post_ln = BloomBackbone.from_preset(folder)  # runs, but keras-hub's BLOOM has no post-LN residual:
    with pytest.raises(ConfigError, match="apply_residual_connection_post_layernorm"):
        post_ln.get_config()
    folder, ref, _ = load_reference("bloom_token_cls")
    backbone = minilm.Backbone.from_preset(folder)  # the generic entry point picks the family
    assert isinstance(backbone, BloomBackbone)
    backbone.save_to_preset(tmp_path / "preset")
    again = minilm.Backbone.from_preset(tmp_path / "preset")
    inputs = {"token_ids": ref["input_ids"], "padding_mask": ref["attention_mask"]}
    np.testing.assert_array_equal(again(inputs), backbone(inputs))


def test_backbone_rejects_an_mlp_width_bloom_cannot_have():
    with pytest.raises(ConfigError, match="intermediate_dim=100 must be 4 \\* hidden_dim = 128"):
        BloomBackbone(vocabulary_size=10, num_layers=1, num_heads=4, hidden_dim=32, intermediate_dim=100)
    with pytest.raises(ConfigError, match="not divisible by n_head=5"):
        BloomBackbone(vocabulary_size=10, num_layers=1, num_heads=5, hidden_dim=32, intermediate_dim=128)

"""Phi-3 against transformers: every head and output field, fused qkv_proj / gate_up_proj,
LongRoPE in both regimes and across the original length during generation (transformers drops
the cache there), the rope_scaling spellings, partial rotary, sliding window, the KV cache and
the keras-hub-style backbone. Tolerance: max|Δ| <= 1e-4 * max(1, max|ref|), float32, non-padding
positions."""

import json

import numpy as np
import pytest
from conftest import assert_close, load_reference
from parity import check_generation, compare_outputs, forward_kwargs

import minilm
from minilm import Phi3Backbone
from minilm.errors import CheckpointError, ConfigError
from minilm.generation import generate
from minilm.io.safetensors import read_checkpoint, read_safetensors, write_safetensors
from minilm.models.phi3 import Phi3Config, Phi3ForCausalLM, Phi3Model
from minilm.rope import rope_for_positions

FIXTURES = {
    "phi3_causal_lm": "Phi3ForCausalLM",
    "phi3_seq_cls": "Phi3ForSequenceClassification",
    "phi3_token_cls": "Phi3ForTokenClassification",
    "phi3_longrope": "Phi3ForCausalLM",
    "phi3_su": "Phi3ForCausalLM",
    "phi3_partial_rotary": "Phi3ForCausalLM",
}


def long_case(ref):
    """The phi3_longrope fixture's second forward case (keys long_*), without the prefix."""
    return {k[len("long_") :]: v for k, v in ref.items() if k.startswith("long_")}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_parity_with_transformers(name):
    folder, ref, meta = load_reference(name)
    model = minilm.from_pretrained(folder)
    assert type(model).__name__ == FIXTURES[name] == meta["model_class"]
    report = compare_outputs(model(**forward_kwargs(ref, meta["head"])), ref)
    assert {"hidden_states_0", "attentions_0"} <= set(report)
    print(name, f"max|Δ| = {max(report.values()):.2e}")


@pytest.mark.parametrize("name", ["phi3_longrope", "phi3_su"])
def test_longrope_long_regime_matches_transformers(name):
    """24 tokens: every row uses the long factors, even row 2 with 12 real tokens (the batch's max
    position decides)."""
    folder, ref, meta = load_reference(name)
    case = long_case(ref)
    assert case["position_ids"].max() + 1 > meta["longrope"]["original_max_position_embeddings"]
    report = compare_outputs(minilm.from_pretrained(folder)(**forward_kwargs(case, "causal_lm")), case)
    print(name, "long case", f"max|Δ| = {max(report.values()):.2e}")


@pytest.mark.parametrize("name", ["phi3_causal_lm", "phi3_longrope", "phi3_partial_rotary"])
def test_greedy_generation_matches_transformers_batch_and_each_row(name):
    folder, ref, meta = load_reference(name)
    check_generation(minilm.from_pretrained(folder), ref, meta)


class StepLogits:
    """A model wrapper that records the logits generate() chooses from at every step."""

    def __init__(self, model, drop_cache=True):
        self.model, self.config, self.drop_cache, self.steps, self.full_reruns = model, model.config, drop_cache, [], []

    def cache_is_stale(self, cache, total_length):
        stale = self.drop_cache and self.model.cache_is_stale(cache, total_length)
        if stale:
            self.full_reruns.append(total_length)
        return stale

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        self.steps.append(out.logits[:, -1])
        return out


def test_generation_across_the_original_length_matches_transformers_step_by_step():
    """Prompt 10 + 12 new tokens crosses original = 16: transformers drops the cache at the step
    where the sequence reaches 17 tokens and re-runs everything with long factors. Every step's
    logits match; without the cache drop the steps after the crossing do not."""
    folder, ref, meta = load_reference("phi3_longrope")
    model = minilm.from_pretrained(folder)
    ids, mask = ref["generate_input_ids"], ref["generate_attention_mask"]
    recorder = StepLogits(model)
    out = generate(recorder, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    np.testing.assert_array_equal(out, ref["generated_ids"])
    assert recorder.full_reruns == [17]  # once, at step index 7
    worst = max(
        assert_close(step, ref["generate_step_logits"][i], what=f"step {i}") for i, step in enumerate(recorder.steps)
    )
    print(f"generate_step_logits max|Δ| = {worst:.2e}")
    for r in range(3):  # each row alone: its own crossing step
        single = StepLogits(model)
        generate(single, ref[f"single_input_ids_{r}"], max_new_tokens=12, eos_token_id=[])
        assert_close(np.concatenate(single.steps), ref[f"single_step_logits_{r}"], what=f"row {r} alone")
    stale = StepLogits(model, drop_cache=False)
    generate(stale, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    assert_close(np.stack(stale.steps[:7]), ref["generate_step_logits"][:7])  # identical before the crossing
    assert np.abs(stale.steps[7] - ref["generate_step_logits"][7]).max() > 1e-3  # short-rotated keys after it


def test_a_padded_row_switches_when_the_longest_row_crosses():
    """transformers' rule, kept: the factor set is chosen from the whole batch's max position."""
    folder, ref, meta = load_reference("phi3_longrope")
    assert meta["generation"]["batch_equals_single_per_row"] == [True, True, False]
    model = minilm.from_pretrained(folder)
    batch = model.generate(
        ref["generate_input_ids"],
        attention_mask=ref["generate_attention_mask"],
        max_new_tokens=12,
        eos_token_id=[],
        pad_token_id=0,
    )
    alone = model.generate(ref["single_input_ids_2"], max_new_tokens=12, eos_token_id=[])
    assert (batch[2, -12:] != alone[0, -12:]).any()


def test_rope_regime_per_call():
    cfg = Phi3Config.from_json_file(load_reference("phi3_longrope")[0])
    short = np.array(cfg.rope_scaling["short_factor"], np.float32)
    long_ = np.array(cfg.rope_scaling["long_factor"], np.float32)
    cases = [
        (np.arange(16)[None], short),
        (np.arange(17)[None], long_),
        (np.array([[16]]), long_),
        (np.array([[3], [15]]), short),
        (np.array([[3], [16]]), long_),
    ]  # the batch's max position decides
    for positions, factors in cases:
        cos, _ = rope_for_positions(cfg, positions)
        inv_freq = 10000.0 ** -(np.arange(0, 16, 2) / 16) / factors
        angle = positions[..., None] * inv_freq
        np.testing.assert_allclose(cos[..., :8], np.cos(angle) * np.sqrt(1 + np.log(4) / np.log(16)), atol=2e-6)


def test_cached_generation_equals_full_recompute_across_the_crossing():
    folder, ref, _ = load_reference("phi3_partial_rotary")  # longrope + partial rotary + sliding window 6
    model = minilm.from_pretrained(folder)
    ids, mask = ref["generate_input_ids"], ref["generate_attention_mask"]
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], pad_token_id=0)
    seq, m = ids, mask
    for _ in range(10):
        positions = minilm.nn.position_ids_from_attention_mask(m)
        nxt = model(seq, attention_mask=m, position_ids=positions).logits[:, -1].argmax(-1)
        seq, m = np.concatenate([seq, nxt[:, None]], 1), np.concatenate([m, np.ones_like(nxt)[:, None]], 1)
    np.testing.assert_array_equal(cached, seq)


@pytest.mark.parametrize("name", ["phi3_causal_lm", "phi3_partial_rotary"])
def test_cached_logits_equal_full_recompute_within_one_regime(name):
    folder, ref, _ = load_reference(name)
    model = minilm.from_pretrained(folder)
    seq = ref["single_generated_ids_0"][:, :12]  # stays within the short regime (original 12 or 4096)
    full = model(seq).logits
    cache = minilm.KVCache(model.config.num_hidden_layers)
    steps = [model(seq[:, :5], past_key_values=cache, use_cache=True).logits]
    for t in range(5, seq.shape[1]):
        steps.append(model(seq[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert_close(np.concatenate(steps, axis=1), full)


# -- layout and files --------------------------------------------------------------------------


def test_fused_projections_are_split_at_load_and_fused_on_save(tmp_path):
    folder, ref, _ = load_reference("phi3_causal_lm")
    model = minilm.from_pretrained(folder)
    original = read_checkpoint(folder)
    qkv = np.asarray(original["model.layers.1.self_attn.qkv_proj.weight"])  # (32 + 16 + 16, 32)
    attn = model.params.model.layers[1].self_attn
    np.testing.assert_array_equal(np.concatenate([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), qkv)
    assert attn.q_proj.weight.shape == (32, 32) and attn.k_proj.weight.shape == (16, 32)
    gate_up = np.asarray(original["model.layers.1.mlp.gate_up_proj.weight"])
    np.testing.assert_array_equal(model.params.model.layers[1].mlp.gate_proj.weight, gate_up[:48])
    np.testing.assert_array_equal(model.params.model.layers[1].mlp.up_proj.weight, gate_up[48:])
    model.save_pretrained(tmp_path / "saved")
    saved = read_checkpoint(tmp_path / "saved")
    assert set(saved) == set(original)
    for name in original:
        np.testing.assert_array_equal(saved[name], original[name], err_msg=name)
    again = minilm.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(
        again(**forward_kwargs(ref, "causal_lm")).logits, model(**forward_kwargs(ref, "causal_lm")).logits
    )


def test_longrope_config_round_trips_through_save(tmp_path):
    folder, ref, _ = load_reference("phi3_su")
    model = minilm.from_pretrained(folder)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["rope_scaling"]["rope_type"] == "longrope" and "type" not in saved["rope_scaling"]
    assert saved["original_max_position_embeddings"] == 16
    again = minilm.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(
        again(**forward_kwargs(ref, "causal_lm")).logits, model(**forward_kwargs(ref, "causal_lm")).logits
    )


def test_tied_embeddings_are_one_array():
    model = minilm.from_pretrained(load_reference("phi3_partial_rotary")[0])
    assert model.params.lm_head.weight is model.params.model.embed_tokens.weight


# -- config ------------------------------------------------------------------------------------


def test_every_rope_scaling_spelling_loads_to_the_same_model():
    folder, ref, _ = load_reference("phi3_longrope")
    hub = json.loads((folder / "config_hub.json").read_text())
    factors = {k: hub["rope_scaling"][k] for k in ("short_factor", "long_factor")}
    expected = None
    for scaling in (
        {"type": "su"},
        {"type": "longrope"},
        {"rope_type": "longrope"},
        {"type": "yarn"},
        {"rope_type": "longrope", "type": "longrope"},
    ):
        cfg = Phi3Config.from_dict({**hub, "rope_scaling": {**scaling, **factors}})
        assert cfg.rope_scaling == {"rope_type": "longrope", **factors}
        logits = Phi3ForCausalLM(cfg, params=read_checkpoint(folder))(**forward_kwargs(ref, "causal_lm")).logits
        expected = logits if expected is None else expected
        np.testing.assert_array_equal(logits, expected)
    # transformers 5's rope_parameters spelling (config.json of the fixture)
    assert Phi3Config.from_json_file(folder).rope_scaling["rope_type"] == "longrope"
    assert Phi3Config.from_dict({**hub, "rope_scaling": {"type": "default"}}).rope_scaling is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 30}, "hidden_size=30 is not divisible by num_attention_heads=4"),
        ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
        ({"partial_rotary_factor": 1.5}, "partial_rotary_factor=1.5 must be in (0, 1]"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear' is not one Phi-3 supports"),
        (
            {"rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [1.0] * 3}},
            "rope_scaling['long_factor'] must be a list of rope_dim // 2 = 4 numbers, got 3",
        ),
        ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 4}}, "needs the key(s) ['long_factor']"),
        (
            {
                "partial_rotary_factor": 0.5,
                "rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
            },
            "rope_scaling['short_factor'] must be a list of rope_dim // 2 = 2 numbers, got 4",
        ),
    ],
)
def test_bad_config_raises_config_error(changes, message):
    base = dict(
        vocab_size=10,
        hidden_size=32,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(ConfigError) as err:
        Phi3Config.from_dict({**base, **changes})
    assert message in str(err.value)


def test_wrong_fused_shapes_name_the_tensor(tmp_path):
    folder, _, _ = load_reference("phi3_causal_lm")
    tensors = {k: np.array(v) for k, v in read_safetensors(folder / "model.safetensors").items()}
    tensors["model.layers.0.mlp.gate_up_proj.weight"] = tensors["model.layers.0.mlp.gate_up_proj.weight"][:-1]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_bytes((folder / "config.json").read_bytes())
    write_safetensors(tmp_path / "bad" / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_up_proj\.weight.*2 \* intermediate_size"):
        minilm.from_pretrained(tmp_path / "bad")


# -- keras-hub style ---------------------------------------------------------------------------


def test_backbone_and_hf_model_agree_exactly():
    folder, ref, _ = load_reference("phi3_longrope")
    hf = minilm.from_pretrained(folder)
    backbone = Phi3Backbone.from_preset(folder)
    inputs = {"token_ids": ref["input_ids"], "padding_mask": ref["attention_mask"]}
    expected = hf.base_model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
    np.testing.assert_array_equal(backbone(inputs), expected)
    config = backbone.get_config()
    assert config["rope_scaling_type"] == "su" and config["pretraining_sequence_length"] == 16
    assert config["max_sequence_length"] == 64 and len(config["rope_scaling_long_factor"]) == 8
    rebuilt = Phi3Backbone(
        **config, params=hf.state_dict()
    )  # the causal LM's weights; lm_head is the reverse embedding
    np.testing.assert_array_equal(rebuilt(inputs), expected)
    assert Phi3Backbone.from_config(config).get_config() == config


def test_backbone_keras_arguments_map_onto_hf_names(tmp_path):
    b = Phi3Backbone(
        vocabulary_size=40,
        num_layers=2,
        hidden_dim=16,
        intermediate_dim=24,
        num_query_heads=4,
        num_key_value_heads=2,
        max_sequence_length=256,
        pretraining_sequence_length=64,
        rope_max_wavelength=500,
        rope_scaling_type="su",
        rope_scaling_short_factor=[1.0, 1.5],
        rope_scaling_long_factor=[2.0, 3.0],
    )
    c = b.config
    assert (c.vocab_size, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (40, 2, 16, 24)
    assert (c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps, c.rope_theta) == (4, 2, 1e-6, 500)
    assert (c.max_position_embeddings, c.original_max_position_embeddings) == (256, 64)
    assert c.rope_scaling == {"rope_type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 3.0]}
    b.save_to_preset(tmp_path / "p")
    again = minilm.Backbone.from_preset(tmp_path / "p")
    ids = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(again({"token_ids": ids}), b({"token_ids": ids}))
    with pytest.raises(ConfigError, match="rope_scaling_type='yarn'"):
        Phi3Backbone(
            vocabulary_size=40,
            num_layers=1,
            hidden_dim=16,
            intermediate_dim=8,
            num_query_heads=4,
            num_key_value_heads=2,
            rope_scaling_type="yarn",
        )
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.5"):
        Phi3Backbone.from_preset(load_reference("phi3_partial_rotary")[0]).get_config()


def test_base_model_ignores_the_lm_head():
    folder, ref, _ = load_reference("phi3_causal_lm")
    base = Phi3Model.from_pretrained(folder)
    lm = minilm.from_pretrained(folder)
    kwargs = dict(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], position_ids=ref["position_ids"])
    np.testing.assert_array_equal(base(**kwargs).last_hidden_state, lm.base_model(**kwargs).last_hidden_state)

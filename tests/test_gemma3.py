"""Gemma 3 against transformers: tiny fixtures (logits, hidden states, attentions, loss, greedy
ids of a left-padded batch and of each row alone, generation past the sliding window), the
bounded sliding-window cache against the reference cache across the wrap point, save/load, the
keras-hub-style backbone, GGUF loading, and the real Gemma 3 270M (greedy ids equal to
transformers', including a prompt longer than the 512-token window).

Tolerance everywhere a float is compared to transformers: max|Δ| <= 1e-4 * max(1, max|ref|)
over non-padding positions (conftest.assert_close). minilm-vs-minilm comparisons of two paths
that do the same arithmetic are exact or stated.
"""

import json

import numpy as np
import pytest
from conftest import FIXTURES, assert_close, load_reference, max_diff, tolerance
from parity import check_generation, compare_outputs, forward_kwargs

import minilm
from minilm import Gemma3Backbone
from minilm.cache import KVCache, SlidingWindowCache
from minilm.errors import CheckpointError, ConfigError, UnknownArchitectureError
from minilm.models import gemma3
from minilm.models.gemma3 import Gemma3ForCausalLM, Gemma3TextConfig, Gemma3TextModel

HEADS = {"gemma3_causal_lm": "causal_lm", "gemma3_causal_lm_nocap": "causal_lm", "gemma3_base": "base"}


def run(model, ref, head):
    return model(**forward_kwargs(ref, head))


def tiny_config(**overrides):
    """Two sliding layers then a global one, window 4, GQA 4:2, head_dim 8 != 24/4, scalar 6."""
    settings = dict(
        vocab_size=40,
        hidden_size=24,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=6,
        sliding_window=4,
        sliding_window_pattern=3,
        final_logit_softcapping=4.0,
        rope_local_base_freq=100.0,
        rope_theta=1000.0,
        pad_token_id=0,
    )
    settings.update(overrides)
    return Gemma3TextConfig(**settings)


def perturbed(model, seed=0, scale=0.3):
    """Every weight moved off its init (norm weights too), so no feature hides behind a zero."""
    rng = np.random.default_rng(seed)
    state = {
        k: v + rng.normal(0, scale, v.shape).astype(v.dtype)
        for k, v in model.state_dict().items()
        if k not in model.tied_weights()
    }
    model.load_state_dict(state)
    return model


# -- parity with transformers on the tiny fixtures ------------------------------------------------


@pytest.mark.parametrize("name", sorted(HEADS))
def test_parity_with_transformers(name):
    folder, ref, meta = load_reference(name)
    model = minilm.from_pretrained(folder)
    assert type(model).__name__ == meta["model_class"]
    report = compare_outputs(run(model, ref, HEADS[name]), ref)
    assert {"hidden_states_0", "hidden_states_3", "attentions_2"} <= set(report)
    assert ("logits" in report and "loss" in report) or "last_hidden_state" in report
    print(name, f"max|Δ| = {max(report.values()):.2e}")


@pytest.mark.parametrize("name", ["gemma3_causal_lm", "gemma3_causal_lm_nocap"])
def test_greedy_generation_matches_transformers(name):
    """Left-padded batch and each prompt alone; prompt 10 > window 4, 10 new tokens."""
    folder, ref, meta = load_reference(name)
    check_generation(minilm.from_pretrained(folder), ref, meta)


@pytest.mark.parametrize("cache_kind", ["reference", "sliding"])
def test_cached_step_logits_match_transformers(cache_kind):
    """Every decode step's logits (through either cache) equal transformers' generate() scores."""
    folder, ref, _ = load_reference("gemma3_causal_lm")
    model = minilm.from_pretrained(folder)
    gen, mask = ref["generated_ids"], ref["generate_attention_mask"]
    prompt = ref["generate_input_ids"].shape[1]
    cache = KVCache(3) if cache_kind == "reference" else gemma3.make_cache(model.config)
    full_mask = np.concatenate([mask, np.ones((len(gen), gen.shape[1] - prompt), np.int64)], axis=1)
    positions = minilm.nn.position_ids_from_attention_mask(full_mask)
    for step in range(gen.shape[1] - prompt):
        start = 0 if step == 0 else prompt + step - 1
        end = prompt + step
        out = model(
            gen[:, start:end],
            attention_mask=full_mask[:, :end],
            position_ids=positions[:, start:end],
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        assert_close(out.logits[:, -1], ref["generate_step_logits"][step], what=f"step {step}")


def test_final_soft_cap_is_in_the_head_only():
    folder, ref, _ = load_reference("gemma3_causal_lm")
    model = minilm.from_pretrained(folder)
    out = run(model, ref, "causal_lm")
    keep = ref["attention_mask"].astype(bool)
    raw = minilm.ops.linear(out.hidden_states[-1], model.params.lm_head.weight)
    assert_close(raw, ref["logits_before_softcap"], keep, "logits before the cap")
    assert np.abs(ref["logits_before_softcap"]).max() > 5.0 >= np.abs(out.logits).max()  # the cap bites
    assert_close(out.hidden_states[-1], ref["hidden_states_3"], keep, "final norm output, uncapped")


def test_attention_soft_cap_is_stored_but_not_applied_like_transformers():
    """transformers 5.23's Gemma 3 never passes attn_logit_softcapping to its attention function:
    the fixture (cap 3.0) is matched with the cap off. Applying it (keras-hub, Gemma 2) is a
    separate, explicit switch, and it does change the outputs."""
    folder, ref, _ = load_reference("gemma3_causal_lm")
    model = minilm.from_pretrained(folder)
    assert model.config.attn_logit_softcapping == 3.0 and model.config.attention_soft_cap is None
    model.config.apply_attn_logit_softcapping = True
    out = run(model, ref, "causal_lm")
    assert max_diff(out.logits, ref["logits"], ref["attention_mask"].astype(bool)) > tolerance(ref["logits"])


def test_breaking_one_weight_breaks_parity():
    folder, ref, _ = load_reference("gemma3_causal_lm")
    model = minilm.from_pretrained(folder)
    model.params.model.layers[2].post_feedforward_layernorm.weight[3] += 0.05
    out = run(model, ref, "causal_lm")
    assert max_diff(out.logits, ref["logits"], ref["attention_mask"].astype(bool)) > tolerance(ref["logits"])


def test_hub_config_spelling_loads_the_same_model():
    """config_hub.json: rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern."""
    folder, ref, _ = load_reference("gemma3_causal_lm_nocap")
    new = Gemma3TextConfig.from_json_file(folder / "config.json")
    old = Gemma3TextConfig.from_json_file(folder / "config_hub.json")
    for c in (new, old):
        assert (c.rope_theta, c.rope_local_base_freq) == (1e6, 1e4)
        assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
        assert c.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    model = Gemma3ForCausalLM(old, params=minilm.io.safetensors.read_checkpoint(folder))
    compare_outputs(run(model, ref, "causal_lm"), ref)


def test_layer_types_and_rope_per_layer_kind():
    c = Gemma3TextConfig(num_hidden_layers=8)  # legacy pattern 6 when layer_types is absent
    assert c.layer_types == ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2
    assert [c.layer_window(i) for i in (0, 5)] == [4096, None]
    c = tiny_config(rope_scaling={"rope_type": "linear", "factor": 4.0})
    local, _ = gemma3.layer_type_rope(c, "sliding_attention", 10)
    glob, _ = gemma3.layer_type_rope(c, "full_attention", 10)
    np.testing.assert_allclose(local, 1.0 / 100.0 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)  # unscaled, base 100
    np.testing.assert_allclose(glob, 1.0 / 1000.0 ** (np.arange(0, 8, 2) / 8) / 4.0, rtol=1e-6)  # base 1000, / 4


def test_gemma_norm_and_embedding_scale():
    x = np.array([[3.0, -4.0]], np.float32)
    np.testing.assert_allclose(
        gemma3.gemma_rms_norm(x, np.array([0.0, 1.0], np.float32), 0.0),
        [[3 / np.sqrt(12.5), -8 / np.sqrt(12.5)]],
        rtol=1e-6,
    )
    import ml_dtypes

    table = np.ones((2, 640), ml_dtypes.bfloat16)
    assert float(gemma3.scaled_embedding(np.array([[0]]), table)[0, 0, 0]) == 25.25  # sqrt(640) in bfloat16


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(layer_types=["sliding_attention"]), "layer_types"),
        (dict(layer_types=["sliding_attention", "local", "full_attention"]), "layer_types"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
        (dict(final_logit_softcapping=-1.0), "final_logit_softcapping"),
        (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ],
)
def test_impossible_configs_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        tiny_config(**bad)


def test_sliding_layer_rope_scaling_is_refused_not_dropped():
    d = tiny_config().to_dict()
    d["rope_parameters"] = {
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
    }
    with pytest.raises(ConfigError, match="sliding_attention"):
        Gemma3TextConfig.from_dict(d)


# -- the bounded sliding-window cache against the reference cache ----------------------------------


def test_sliding_window_cache_returns_the_last_positions_in_order():
    cache = SlidingWindowCache([3, None])  # capacity 2 for layer 0
    for start, n in ((0, 1), (1, 3), (4, 1), (5, 1), (6, 4), (10, 1)):
        pos = np.arange(start, start + n, dtype=np.float32)[None, None, :, None]  # a key's value is its position
        for layer, expect_past in ((0, min(start, 2)), (1, start)):
            k, v = cache.update(layer, pos, -pos)
            np.testing.assert_array_equal(k[0, 0, :, 0], np.arange(start - expect_past, start + n))
            np.testing.assert_array_equal(v, -k)
    assert cache.get_seq_length(0) == cache.get_seq_length(1) == 11
    np.testing.assert_array_equal(cache.layer(0)[0][0, 0, :, 0], [9, 10])
    assert cache._ring_keys[0].shape[2] == 2  # the ring never grew


def decode(model, prompt, steps, cache, attention_mask=None):
    """Prompt in one call, then one token per call; returns (ids, per-step last logits, cache)."""
    ids, mask = np.asarray(prompt), attention_mask
    if mask is None:
        mask = np.ones_like(ids)
    positions = minilm.nn.position_ids_from_attention_mask(mask)
    out = model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1)[:, None]
        ids = np.concatenate([ids, token], axis=1)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        position = minilm.nn.position_ids_from_attention_mask(mask)[:, -1:]
        out = model(
            token, attention_mask=mask, position_ids=position, past_key_values=out.past_key_values, use_cache=True
        )
        logits.append(out.logits[:, -1])
    return ids, np.stack(logits, axis=1), out.past_key_values


@pytest.mark.parametrize("prompt_len", [2, 3, 9])  # shorter than, one below, and past the window 4
def test_ring_buffer_cache_equals_reference_cache_across_the_wrap(prompt_len):
    model = perturbed(Gemma3ForCausalLM(tiny_config()))
    rng = np.random.default_rng(prompt_len)
    prompt = rng.integers(1, 40, size=(2, prompt_len))
    mask = np.ones_like(prompt)
    mask[1, : prompt_len // 2] = 0  # left padding in row 1
    ids_ref, logits_ref, ref_cache = decode(model, prompt, 12, KVCache(3), mask)
    ids_ring, logits_ring, ring_cache = decode(model, prompt, 12, gemma3.make_cache(model.config), mask)
    np.testing.assert_array_equal(ids_ring, ids_ref)
    np.testing.assert_allclose(logits_ring, logits_ref, rtol=0, atol=1e-5)
    # ... and both equal recomputing the whole sequence at every step (no cache at all)
    full_mask = np.concatenate([mask, np.ones((2, 12), np.int64)], axis=1)
    full = model(ids_ref, attention_mask=full_mask, position_ids=minilm.nn.position_ids_from_attention_mask(full_mask))
    assert_close(logits_ring, full.logits[:, prompt_len - 1 :], what="cached vs full recompute")
    # the sliding layers hold window - 1 positions, the global layer everything
    assert ring_cache.layer(0)[0].shape[2] == 3 and ring_cache.layer(2)[0].shape[2] == prompt_len + 12
    assert ref_cache.layer(0)[0].shape[2] == prompt_len + 12


def test_ring_buffer_memory_stays_bounded():
    model = perturbed(Gemma3ForCausalLM(tiny_config(layer_types=["sliding_attention"] * 3)))
    _, _, cache = decode(model, np.array([[1, 2, 3]]), 5, gemma3.make_cache(model.config))
    size = cache.nbytes
    _, _, cache = decode(model, np.array([[1, 2, 3]]), 40, gemma3.make_cache(model.config))
    assert cache.nbytes == size


def test_generate_uses_the_bounded_cache_by_default():
    model = perturbed(Gemma3ForCausalLM(tiny_config()))
    out = model(np.array([[1, 2, 3, 4, 5, 6]]), use_cache=True)
    assert isinstance(out.past_key_values, SlidingWindowCache)
    ids = model.generate(np.array([[1, 2, 3]]), max_new_tokens=12, eos_token_id=[])
    seq = np.array([[1, 2, 3]])
    for _ in range(12):  # full recompute, no cache
        seq = np.concatenate([seq, model(seq).logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(ids, seq)


# -- checkpoints ------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    folder, ref, _ = load_reference("gemma3_causal_lm")
    model = minilm.from_pretrained(folder)
    model.save_pretrained(tmp_path / "saved")
    again = minilm.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(run(model, ref, "causal_lm").logits, run(again, ref, "causal_lm").logits)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["architectures"] == ["Gemma3ForCausalLM"] and saved["model_type"] == "gemma3_text"
    assert saved["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
    assert not set(Gemma3TextConfig.KERAS_ONLY_DEFAULTS) & set(saved)  # config.json stays transformers'
    from minilm.io.safetensors import read_checkpoint

    assert set(read_checkpoint(tmp_path / "saved")) == set(read_checkpoint(folder))  # lm_head tied, not saved


def test_base_model_and_causal_lm_share_the_backbone():
    folder, ref, _ = load_reference("gemma3_causal_lm")
    base = Gemma3TextModel.from_pretrained(folder)
    lm = minilm.from_pretrained(folder)
    kwargs = dict(attention_mask=ref["attention_mask"], position_ids=ref["position_ids"])
    np.testing.assert_array_equal(
        base(ref["input_ids"], **kwargs).last_hidden_state,
        lm.base_model(input_ids=ref["input_ids"], **kwargs).last_hidden_state,
    )


def test_bfloat16_compute_runs():
    folder, ref, _ = load_reference("gemma3_causal_lm")
    model = minilm.from_pretrained(folder, dtype="bfloat16")
    out = run(model, ref, "causal_lm")
    assert np.isfinite(out.logits.astype(np.float32)).all()
    assert np.abs(out.logits.astype(np.float32) - ref["logits"])[ref["attention_mask"].astype(bool)].max() < 0.5


# -- keras-hub style --------------------------------------------------------------------------------


KERAS_ARGS = dict(
    vocabulary_size=40,
    image_size=896,
    num_layers=7,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=24,
    intermediate_dim=32,
    head_dim=8,
    use_post_ffw_norm=True,
    use_post_attention_norm=True,
    final_logit_soft_cap=4.0,
    use_sliding_window_attention=True,
    sliding_window_size=4,
    global_rope_scaling_factor=8.0,
)


def test_keras_constructor_maps_onto_hf_names():
    c = Gemma3Backbone(**KERAS_ARGS).config
    assert (c.vocab_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (40, 7, 4, 2)
    assert (c.hidden_size, c.intermediate_size, c.head_dim, c.query_pre_attn_scalar) == (24, 32, 8, 8)
    assert c.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert (c.sliding_window, c.rope_theta, c.rope_local_base_freq) == (4, 1e6, 1e4)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 8.0} and c.final_logit_softcapping == 4.0
    assert Gemma3Backbone(**{**KERAS_ARGS, "query_head_dim_normalize": False}).config.query_pre_attn_scalar == 6
    plain = Gemma3Backbone(**{**KERAS_ARGS, "use_sliding_window_attention": False})
    assert plain.config.layer_types == ["full_attention"] * 7


def test_keras_backbone_and_hf_model_agree_exactly():
    backbone = Gemma3Backbone(**KERAS_ARGS)
    hf_config = Gemma3TextConfig(
        vocab_size=40,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=24,
        intermediate_size=32,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        sliding_window_pattern=6,
        final_logit_softcapping=4.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    lm = perturbed(Gemma3ForCausalLM(hf_config))
    backbone.model.load_state_dict(lm.state_dict())
    ids = np.random.default_rng(0).integers(1, 40, size=(2, 9))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    hidden = backbone({"token_ids": ids, "padding_mask": mask})
    np.testing.assert_array_equal(hidden, lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state)
    logits = lm(ids, attention_mask=mask).logits
    np.testing.assert_array_equal(backbone.token_embedding(hidden, reverse=True), logits)  # capped, tied


def test_keras_options_transformers_lacks():
    """keras-hub's defaults (no post norms), QK-norm off and an applied attention soft cap build
    and run; the norms they drop are absent from the weights."""
    args = {
        **KERAS_ARGS,
        "use_post_ffw_norm": False,
        "use_post_attention_norm": False,
        "use_query_key_norm": False,
        "attention_logit_soft_cap": 2.0,
    }
    backbone = Gemma3Backbone(**args)
    names = set(backbone.model.state_dict())
    assert not any("post_" in n or "q_norm" in n for n in names)
    assert backbone.config.attention_soft_cap == 2.0
    config = backbone.get_config()
    assert {k: config[k] for k in args} == {**args, "image_size": 896}
    assert Gemma3Backbone.from_config(config).get_config() == config
    perturbed(backbone.model, scale=1.0)  # scores large enough for the cap of 2 to bite
    ids = np.array([[1, 2, 3, 4, 5, 6]])
    capped = backbone({"token_ids": ids})
    backbone.model.config.apply_attn_logit_softcapping = False
    assert np.abs(capped - backbone({"token_ids": ids})).max() > 1e-3


def test_keras_config_round_trip_and_preset(tmp_path):
    backbone = Gemma3Backbone(**KERAS_ARGS)
    config = backbone.get_config()
    assert config["image_size"] == 896 and config["global_rope_scaling_factor"] == 8.0
    assert Gemma3Backbone.from_config(config).get_config() == config
    backbone.save_to_preset(tmp_path / "preset")
    again = minilm.Backbone.from_preset(tmp_path / "preset")
    ids = {"token_ids": np.array([[3, 4, 5, 6, 7, 8]]), "padding_mask": np.ones((1, 6), np.int64)}
    assert isinstance(again, Gemma3Backbone)
    np.testing.assert_array_equal(again(ids), backbone(ids))


def test_keras_backbone_runs_hf_checkpoints():
    folder, ref, _ = load_reference("gemma3_causal_lm")
    backbone = Gemma3Backbone.from_preset(folder)
    hidden = backbone({"token_ids": ref["input_ids"], "padding_mask": ref["attention_mask"]})
    keep = ref["attention_mask"].astype(bool)
    # keras-hub passes no position_ids: positions are 0..seq-1 for every row, padding included
    full = minilm.from_pretrained(folder)(ref["input_ids"], attention_mask=ref["attention_mask"])
    np.testing.assert_array_equal(backbone.token_embedding(hidden, reverse=True), full.logits)
    assert_close(hidden[0], ref["hidden_states_3"][0], what="unpadded row = transformers")
    assert keep[0].all()
    with pytest.raises(ConfigError, match="layer_types"):  # sliding, sliding, full is not keras-hub's pattern
        backbone.get_config()


def test_keras_refusals():
    with pytest.raises(ConfigError, match="vision_encoder must be a minilm.Gemma3VisionEncoder"):
        Gemma3Backbone(**KERAS_ARGS, vision_encoder=object())  # images: tests/test_keras_gemma3_vision.py
    with pytest.raises(ConfigError, match="local_rope_scaling_factor"):
        Gemma3Backbone(**KERAS_ARGS, local_rope_scaling_factor=2.0)


# -- GGUF -------------------------------------------------------------------------------------------


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_gguf(path, architecture, config=None, state=None):
    """A small float32 GGUF the way llama.cpp's converter writes Gemma 3 (norms stored as 1 + w)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    if config is not None:
        a = architecture
        writer.add_uint32(f"{a}.context_length", config.max_position_embeddings)
        writer.add_uint32(f"{a}.embedding_length", config.hidden_size)
        writer.add_uint32(f"{a}.block_count", config.num_hidden_layers)
        writer.add_uint32(f"{a}.feed_forward_length", config.intermediate_size)
        writer.add_uint32(f"{a}.attention.head_count", config.num_attention_heads)
        writer.add_uint32(f"{a}.attention.head_count_kv", config.num_key_value_heads)
        writer.add_uint32(f"{a}.attention.key_length", config.head_dim)
        writer.add_uint32(f"{a}.attention.value_length", config.head_dim)
        writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
        writer.add_float32(f"{a}.rope.freq_base", config.rope_theta)
        writer.add_uint32(f"{a}.attention.sliding_window", config.sliding_window)
        writer.add_uint32(f"{a}.vocab_size", config.vocab_size)
        writer.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])
    for name, value in (state or {}).items():
        if name == "lm_head.weight":
            continue
        gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}.get(
            name
        )
        if gguf_name is None:
            layer, rest = name[len("model.layers.") :].split(".", 1)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"
        writer.add_tensor(gguf_name, value + 1 if name.endswith("norm.weight") else value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_model_from_gguf_maps_names_and_undoes_the_norm_offset(tmp_path):
    from minilm.io.load import model_from_gguf

    config = Gemma3TextConfig(
        vocab_size=40,
        hidden_size=24,
        intermediate_size=32,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=4,
        rope_theta=1e6,
        max_position_embeddings=64,
    )
    model = perturbed(Gemma3ForCausalLM(config))
    write_gguf(tmp_path / "tiny.gguf", "gemma3", config, model.state_dict())
    loaded = model_from_gguf(tmp_path / "tiny.gguf", tokenizer=False)
    assert isinstance(loaded, Gemma3ForCausalLM) and loaded.config.layer_types == config.layer_types
    ids = np.array([[1, 5, 9, 13, 17, 21, 25, 29, 2]])
    np.testing.assert_allclose(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_unknown_gguf_architecture(tmp_path):
    write_gguf(tmp_path / "other.gguf", "llama")
    from minilm.io.load import model_from_gguf

    with pytest.raises(UnknownArchitectureError, match="llama"):
        model_from_gguf(tmp_path / "other.gguf")
    with pytest.raises(UnknownArchitectureError, match="llama"):
        minilm.from_pretrained(tmp_path / "other.gguf")
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(60))
    with pytest.raises(CheckpointError):
        minilm.from_pretrained(tmp_path / "not.gguf")


# -- the real Gemma 3 270M (Q4_K_M GGUF), against transformers' float32 run of the same file ------

REAL_REFERENCE = FIXTURES / "gemma3_270m_reference.json"


@pytest.fixture(scope="module")
def real_reference():
    assert REAL_REFERENCE.is_file(), f"{REAL_REFERENCE} missing: run scripts/make_real_model_reference.py"
    return json.loads(REAL_REFERENCE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def real_model():
    from minilm.io.default_model import default_model_path

    return minilm.from_pretrained(default_model_path())  # the .gguf path goes through model_from_gguf


def real_cases(real_reference):
    return {case["name"]: case for case in real_reference["generation"]["cases"]}


@pytest.mark.slow
def test_real_model_config_and_tokenizer(real_model, real_reference):
    c = real_model.config
    assert isinstance(real_model, Gemma3ForCausalLM) and real_model.tokenizer is not None
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (18, 640, 4, 1)
    assert (c.head_dim, c.sliding_window, c.vocab_size) == (256, 512, 262144)
    assert c.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    for case in real_cases(real_reference).values():
        assert real_model.tokenizer.encode(case["prompt"]) == case["input_ids"], case["name"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["capital", "code", "chat", "long"])
def test_real_model_greedy_continuations_equal_transformers(real_model, real_reference, name):
    """Exact ids. "long" has a prompt of more than 512 tokens: its prefill and every decode step
    cross the sliding window of the local layers (through the bounded ring-buffer cache)."""
    case = real_cases(real_reference)[name]
    prompt = np.array([case["input_ids"]])
    if name == "long":
        assert prompt.shape[1] > real_model.config.sliding_window
    first = real_model(prompt, logits_to_keep=1).logits[0, -1]  # (vocab_size,)
    top5 = np.argsort(-first, kind="stable")[:5]
    np.testing.assert_array_equal(top5, case["first_step_top5_ids"])
    assert_close(first[top5], np.array(case["first_step_top5_logits"]), what="top-5 logits")
    ids = real_model.generate(prompt, max_new_tokens=case["max_new_tokens"])
    new = ids[0, prompt.shape[1] :].tolist()
    assert new == case["new_ids"], (real_model.tokenizer.decode(new), case["new_text"])
    assert real_model.tokenizer.decode(new) == case["new_text"]


ROPE_SCALINGS = [None, {"rope_type": "linear", "factor": 8.0}, {"rope_type": "dynamic", "factor": 2.0}]


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_a_decode_rope_table_row_is_what_the_forward_computes_at_that_position(scaling):
    """`layer_type_rope_table`, which the compiled decode steps read: row p equals the cos/sin of a
    forward whose last position is p (dynamic NTK rescales with p + 1 past max_position_embeddings,
    so each of its rows is computed at its own length; the others in one call)."""
    cfg = gemma3.Gemma3TextConfig(
        hidden_size=32, head_dim=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
        intermediate_size=16, vocab_size=50, max_position_embeddings=8, rope_scaling=scaling,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    for kind in ("sliding_attention", "full_attention"):
        cos, sin = gemma3.layer_type_rope_table(cfg, kind, 20)
        assert cos.shape == sin.shape == (20, 16) and cos.dtype == np.float32
        for p in range(20):
            ref_cos, ref_sin = gemma3.rope_cos_sin(np.array([[p]]), *gemma3.layer_type_rope(cfg, kind, p + 1))
            np.testing.assert_array_equal(cos[p], ref_cos[0, 0])
            np.testing.assert_array_equal(sin[p], ref_sin[0, 0])

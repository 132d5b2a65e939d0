"""minilm's keras-hub-style backbones against keras-hub itself.

The oracle is `scripts/make_keras_fixtures.py` (keras-hub 0.32 on torch, in its own virtual
environment): tiny keras-hub backbones built from the constructor arguments of keras-hub's own backbone
tests and a few variants, with seeded random weights, saved under tests/fixtures/keras/<name>/ as a
minilm preset (config.json + model.safetensors in Hugging Face names) with keras-hub's outputs
(reference.npz) and its get_config() and count_params() (reference.json).

Each fixture is rebuilt here from keras-hub's get_config() and the saved weights, and must give:
    hidden states and token_embedding(hidden, reverse=True) logits (and an embedding model's pooled
    output) within the project's float32 bar, max|Δ| <= 1e-4 * max(1, max|ref|), over the real tokens
    (padding_mask == 1); measured: at most about 1e-5, i.e. a few 1e-6 relative to max|ref|
    get_config() equal to keras-hub's on every key but KERAS_ONLY_KEYS
    count_params() equal to keras-hub's
"""

import json

import numpy as np
import pytest
from conftest import FIXTURES, assert_close, load_reference

import minilm
from minilm import CheckpointError, ConfigError
from minilm.io.safetensors import read_checkpoint

KERAS_FIXTURES = FIXTURES / "keras"
NAMES = sorted(p.name for p in KERAS_FIXTURES.iterdir() if (p / "reference.json").is_file())


def has_vision_encoder(name):
    """Gemma 3 with a vision encoder (images among the inputs): tested in tests/test_keras_gemma3_vision.py."""
    return bool(json.loads((KERAS_FIXTURES / name / "config.json").read_text())["config"].get("vision_encoder"))


NAMES = [name for name in NAMES if not has_vision_encoder(name)]

# keras-hub get_config() keys a minilm backbone does not have, and why:
KERAS_ONLY_KEYS = {
    "name": "the keras layer name (a graph-naming concern; minilm backbones are not keras layers)",
    "trainable": "keras' training flag (minilm runs inference only)",
}
# `dtype` is there in both, spelled differently: keras-hub serialises a DTypePolicy
# ({"class_name": "DTypePolicy", "config": {"name": "float32"}, ...}), minilm gives the dtype's name.


def load(name):
    folder = KERAS_FIXTURES / name
    ref = dict(np.load(folder / "reference.npz"))
    meta = json.loads((folder / "reference.json").read_text())
    return folder, ref, meta


def minilm_args(keras_config):
    """keras-hub's get_config() as minilm constructor arguments."""
    args = {k: v for k, v in keras_config.items() if k not in KERAS_ONLY_KEYS}
    args["dtype"] = keras_config["dtype"]["config"]["name"]
    return args


def build(name):
    """minilm's backbone from keras-hub's constructor arguments and the fixture's weights."""
    folder, ref, meta = load(name)
    cls = getattr(minilm, meta["keras_hub_class"])
    return cls(**minilm_args(meta["get_config"]), params=read_checkpoint(folder)), ref, meta


def inputs(ref):
    return {"token_ids": ref["token_ids"], "padding_mask": ref["padding_mask"]}


def test_every_family_has_fixtures():
    families = {load(name)[2]["keras_hub_class"] for name in NAMES}
    assert families == {"Qwen3MoeBackbone", "BloomBackbone", "Phi3Backbone", "Gemma3Backbone"}


@pytest.mark.parametrize("name", NAMES)
def test_outputs_equal_keras_hub(name):
    backbone, ref, _ = build(name)
    keep = ref["padding_mask"].astype(bool)  # (batch, seq)
    out = backbone(inputs(ref))
    hidden = out["sequence_output"] if isinstance(out, dict) else out
    assert_close(hidden, ref["hidden"], keep, f"{name} hidden states")
    assert_close(backbone.token_embedding(hidden, reverse=True), ref["logits"], keep, f"{name} reverse logits")
    if "pooled_output" in ref:
        assert_close(out["pooled_output"], ref["pooled_output"], None, f"{name} pooled_output")
    # the preset loads to the very same backbone
    again = minilm.Backbone.from_preset(KERAS_FIXTURES / name)
    assert type(again) is type(backbone)
    np.testing.assert_array_equal(
        again.token_embedding(hidden, reverse=True), backbone.token_embedding(hidden, reverse=True)
    )


@pytest.mark.parametrize("name", NAMES)
def test_get_config_equals_keras_hub(name):
    backbone, _, meta = build(name)
    keras_config, config = meta["get_config"], backbone.get_config()
    assert set(keras_config) - set(config) == set(KERAS_ONLY_KEYS)
    assert set(config) - set(keras_config) == set()
    assert config["dtype"] == keras_config["dtype"]["config"]["name"]
    assert {k: config[k] for k in config if k != "dtype"} == {
        k: v for k, v in keras_config.items() if k not in KERAS_ONLY_KEYS and k != "dtype"
    }
    assert type(backbone).from_config(config).get_config() == config


@pytest.mark.parametrize("name", NAMES)
def test_count_params_equals_keras_hub(name):
    backbone, _, meta = build(name)
    assert backbone.count_params() == meta["count_params"]


@pytest.mark.parametrize("name", NAMES)
def test_save_to_preset_writes_the_fixture_layout(name, tmp_path):
    """The fixture's files are what save_to_preset writes: the same config and the same tensors."""
    backbone, _, _ = build(name)
    backbone.save_to_preset(tmp_path)
    folder = KERAS_FIXTURES / name
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    saved, fixture = read_checkpoint(tmp_path), read_checkpoint(folder)
    assert sorted(saved) == sorted(fixture)
    for key, value in fixture.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)


def test_param_counts_stated_in_keras_hubs_own_tests():
    """keras_hub/src/models/qwen3_moe/qwen3_moe_backbone_test.py: 7768 (untied: the reverse embedding
    counts); gemma3/gemma3_backbone_test.py, text only: 5752."""
    qwen = minilm.Qwen3MoeBackbone(
        vocabulary_size=20,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=2,
        moe_intermediate_dim=16,
        num_experts=4,
        top_k=2,
        norm_top_k_prob=True,
        decoder_sparse_step=1,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        dropout=0.0,
        sliding_window_size=4096,
        router_aux_loss_coefficient=0.01,
        tie_word_embeddings=False,
        mlp_only_layers=[],
        dtype="float32",
    )
    assert qwen.count_params() == 7768
    gemma = minilm.Gemma3Backbone(
        vocabulary_size=256,
        image_size=16,
        num_layers=6,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
        query_head_dim_normalize=True,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        final_logit_soft_cap=None,
        attention_logit_soft_cap=None,
        use_sliding_window_attention=True,
        sliding_window_size=1024,
    )
    assert gemma.count_params() == 5752


# -- untied embeddings: the reverse embedding is its own matrix --------------------------------------


def test_untied_reverse_embedding_is_the_output_projection(tmp_path):
    backbone, ref, _ = build("qwen3_moe")
    hidden = backbone(inputs(ref))
    embed = backbone.model.params.embed_tokens.weight  # (vocab, hidden)
    lm_head = backbone.extra_weight("lm_head.weight")  # (vocab, hidden): keras' reverse_embeddings, transposed
    assert lm_head.shape == embed.shape and not np.allclose(lm_head, embed)
    np.testing.assert_allclose(backbone.token_embedding(hidden, reverse=True), hidden @ lm_head.T, rtol=1e-6)
    assert backbone.count_params() == backbone.model.num_parameters() + lm_head.size
    # it survives save_to_preset / from_preset
    backbone.save_to_preset(tmp_path / "p")
    assert "lm_head.weight" in read_checkpoint(tmp_path / "p")
    again = minilm.Backbone.from_preset(tmp_path / "p")
    np.testing.assert_array_equal(again.extra_weight("lm_head.weight"), lm_head)
    # tied: no extra weight, the input table
    tied, tied_ref, _ = build("qwen3_moe_tied")
    assert tied.extra_weights is None and tied.token_embedding.tie_weights
    h = tied(inputs(tied_ref))
    np.testing.assert_allclose(
        tied.token_embedding(h, reverse=True), h @ tied.model.params.embed_tokens.weight.T, rtol=1e-6
    )


def test_untied_hf_checkpoints():
    """A causal LM's lm_head.weight is the backbone's output projection: reverse logits = the LM's logits.
    A bare base model's checkpoint has none: hidden states work, reverse=True says what is missing."""
    folder, ref, _ = load_reference("qwen3_moe_causal_lm")
    assert not json.loads((folder / "config.json").read_text())["tie_word_embeddings"]
    backbone = minilm.Qwen3MoeBackbone.from_preset(folder)
    lm = minilm.from_pretrained(folder)
    hidden = backbone({"token_ids": ref["input_ids"], "padding_mask": ref["attention_mask"]})
    logits = lm(ref["input_ids"], attention_mask=ref["attention_mask"]).logits
    np.testing.assert_array_equal(backbone.token_embedding(hidden, reverse=True), logits)
    assert backbone.count_params() == lm.num_parameters()
    folder, ref, _ = load_reference("qwen3_moe_base")
    bare = minilm.Backbone.from_preset(folder)
    hidden = bare({"token_ids": ref["input_ids"], "padding_mask": ref["attention_mask"]})
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        bare.token_embedding(hidden, reverse=True)


def test_families_keras_hub_ties_or_unties_for_good():
    """keras-hub's BLOOM and Gemma 3 always tie, its Phi-3 never does: a checkpoint the other way is not
    expressible with keras-hub's arguments (it still runs, as a plain Backbone)."""
    folder = load_reference("phi3_partial_rotary")[0]  # Phi-4-mini style: tied
    with pytest.raises(ConfigError, match="tie_word_embeddings=True"):
        minilm.Phi3Backbone.from_preset(folder).get_config()
    phi3 = minilm.Phi3Backbone(
        vocabulary_size=10, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=8, intermediate_dim=8
    )
    assert not phi3.token_embedding.tie_weights and phi3.extra_weight("lm_head.weight").shape == (10, 8)
    bloom = minilm.BloomBackbone(vocabulary_size=10, num_layers=1, num_heads=4, hidden_dim=8, intermediate_dim=32)
    assert bloom.token_embedding.tie_weights and bloom.extra_weights is None


# -- from_preset(preset, load_weights=True, **kwargs) --------------------------------------------------


def test_from_preset_load_weights_false_builds_the_architecture_only():
    folder, ref, meta = load("qwen3_moe")
    loaded = minilm.Backbone.from_preset(folder)
    bare = minilm.Backbone.from_preset(folder, load_weights=False)
    assert type(bare) is minilm.Qwen3MoeBackbone
    assert bare.get_config() == loaded.get_config() and bare.count_params() == meta["count_params"]
    fresh = minilm.Qwen3MoeBackbone(**minilm_args(meta["get_config"]))  # weights from init
    for key, value in fresh.model.state_dict().items():
        np.testing.assert_array_equal(bare.model.state_dict()[key], value, err_msg=key)
    np.testing.assert_array_equal(bare.extra_weight("lm_head.weight"), fresh.extra_weight("lm_head.weight"))
    assert not np.allclose(bare(inputs(ref)), loaded(inputs(ref)))
    # the init's output projection is its own draw, not a copy of the embedding table
    assert not np.allclose(bare.extra_weight("lm_head.weight"), bare.model.params.embed_tokens.weight)
    # an HF checkpoint too
    hf = minilm.Backbone.from_preset(load_reference("bloom_causal_lm")[0], load_weights=False)
    assert hf.get_config() == minilm.Backbone.from_preset(load_reference("bloom_causal_lm")[0]).get_config()


def test_from_preset_kwargs_override_the_preset():
    folder, ref, _ = load("qwen3_moe")
    base = minilm.Backbone.from_preset(folder)
    windowed = minilm.Backbone.from_preset(folder, sliding_window_size=3)  # same weights, another window
    assert windowed.get_config() == {**base.get_config(), "sliding_window_size": 3}
    keep = ref["padding_mask"].astype(bool)
    assert np.abs(windowed(inputs(ref)) - base(inputs(ref)))[keep].max() > 1e-3
    assert minilm.Backbone.from_preset(folder, dtype="bfloat16").get_config()["dtype"] == "bfloat16"
    assert minilm.Backbone.from_preset(folder, dtype=None).get_config()["dtype"] == "float32"  # None: the preset's
    deeper = minilm.Backbone.from_preset(folder, load_weights=False, num_layers=3)
    assert deeper.get_config()["num_layers"] == 3 and len(deeper.model.params.layers) == 3
    with pytest.raises(CheckpointError, match="layers.0.self_attn.q_proj.weight"):  # the weights do not fit
        minilm.Backbone.from_preset(folder, head_dim=4)
    # an HF checkpoint: keras-hub's arguments from its config.json, then the overrides
    hf_folder = load_reference("qwen3_moe_causal_lm")[0]
    assert minilm.Backbone.from_preset(hf_folder, top_k=1).get_config()["top_k"] == 1
    # a checkpoint keras-hub's arguments cannot express runs as it is, and cannot be overridden
    with pytest.raises(ConfigError, match=r"cannot override \['dropout'\]"):
        minilm.Backbone.from_preset(load_reference("phi3_partial_rotary")[0], dropout=0.1)


# -- Gemma3Backbone(is_embedding_model=True): keras-hub's pooled output --------------------------------


def test_embedding_model_pooled_output(tmp_path):
    backbone, ref, meta = build("gemma3_embedding")
    out = backbone(inputs(ref))
    assert set(out) == {"sequence_output", "pooled_output"}
    assert out["pooled_output"].shape == (3, meta["get_config"]["embedding_dim"])
    np.testing.assert_allclose(np.linalg.norm(out["pooled_output"], axis=-1), 1.0, rtol=1e-6)
    # the pooled output is the mean over the real tokens only: padding's hidden states do not count
    mask = ref["padding_mask"].astype(np.float32)
    seq = out["sequence_output"]
    mean = (seq * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    projected = (
        mean
        @ backbone.extra_weight("pooling_dense_1.weight").T
        @ backbone.extra_weight("embedding_projection.weight").T
    )
    np.testing.assert_allclose(
        out["pooled_output"], projected / np.linalg.norm(projected, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6
    )
    # the head's weights count, are saved and come back
    head = 32 * 8 + 16 * 32  # pooling_dense_1 (32, 8), embedding_projection (16, 32)
    assert backbone.count_params() == backbone.model.num_parameters() + head == meta["count_params"]
    backbone.save_to_preset(tmp_path / "p")
    again = minilm.Backbone.from_preset(tmp_path / "p")
    np.testing.assert_array_equal(again(inputs(ref))["pooled_output"], out["pooled_output"])
    # no padding mask: every token counts
    no_mask = backbone({"token_ids": ref["token_ids"]})["pooled_output"]
    assert no_mask.shape == out["pooled_output"].shape and not np.allclose(no_mask[1], out["pooled_output"][1])


def test_embedding_model_arguments_are_never_ignored():
    args = minilm_args(load("gemma3")[2]["get_config"])
    with pytest.raises(ConfigError, match="needs embedding_dim and pooling_intermediate_dim"):
        minilm.Gemma3Backbone(**{**args, "is_embedding_model": True, "embedding_dim": 16})
    with pytest.raises(ConfigError, match="set is_embedding_model=True"):
        minilm.Gemma3Backbone(**{**args, "pooling_intermediate_dim": 32, "embedding_dim": 16})
    # EmbeddingGemma's bidirectional attention: refused, not run causally
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        minilm.Gemma3Backbone(
            **{
                **args,
                "is_embedding_model": True,
                "embedding_dim": 16,
                "pooling_intermediate_dim": 32,
                "use_bidirectional_attention": True,
            }
        )
    # an embedding preset's pooling weights do not load into a backbone without the pooling head
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        minilm.Backbone.from_preset(
            KERAS_FIXTURES / "gemma3_embedding",
            is_embedding_model=False,
            pooling_intermediate_dim=None,
            embedding_dim=None,
        )

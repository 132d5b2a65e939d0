"""Qwen3-MoE against transformers: every head and output field, both checkpoint layouts,
sharded and bfloat16 checkpoints, generation, and the keras-hub-style backbone."""

import json

import numpy as np
import pytest
from conftest import assert_close, load_reference, max_diff, tolerance
from parity import check_generation, compare_outputs, forward_kwargs

import minilm
from minilm.models import qwen3_moe

HEADS = {
    "qwen3_moe_causal_lm": "causal_lm",
    "qwen3_moe_causal_lm_b": "causal_lm",
    "qwen3_moe_causal_lm_fused": "causal_lm",
    "qwen3_moe_sharded": "causal_lm",
    "qwen3_moe_bf16": "causal_lm",
    "qwen3_moe_seq_cls": "seq_cls",
    "qwen3_moe_seq_cls_multilabel": "seq_cls",
    "qwen3_moe_seq_cls_regression": "seq_cls",
    "qwen3_moe_token_cls": "token_cls",
    "qwen3_moe_qa": "qa",
    "qwen3_moe_base": "base",
}


def run(model, ref, head):
    kwargs = forward_kwargs(ref, head)
    if isinstance(model, (minilm.Qwen3MoeForCausalLM, minilm.Qwen3MoeModel)):
        kwargs["output_router_logits"] = any(k.startswith("router_logits_") for k in ref)
    return model(**kwargs)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_parity_with_transformers(name):
    folder, ref, meta = load_reference(name)
    model = minilm.from_pretrained(folder)
    assert type(model).__name__ == meta["model_class"]
    report = compare_outputs(run(model, ref, HEADS[name]), ref)
    assert report, "nothing compared"
    print(name, f"max|Δ| = {max(report.values()):.2e}")


@pytest.mark.parametrize("name", ["qwen3_moe_causal_lm", "qwen3_moe_causal_lm_b"])
def test_greedy_generation_matches_transformers(name):
    folder, ref, meta = load_reference(name)
    check_generation(minilm.from_pretrained(folder), ref, meta)


def test_router_ties_follow_the_documented_rule():
    """Experts 1/6 and 3/4 have identical router rows, so their scores tie exactly. torch.topk
    breaks such ties either way (the fixture records both outcomes), so no implementation can
    match it there; minilm's rule is "the lower expert index wins", on every backend. Away
    from ties, minilm picks exactly transformers' experts with the same weights."""
    folder, ref, meta = load_reference("qwen3_moe_router_ties")
    model = minilm.from_pretrained(folder)
    out = run(model, ref, "causal_lm")
    keep = ref["attention_mask"].reshape(-1).astype(bool)
    logits = out.router_logits[0]  # layer 0: its inputs do not depend on any earlier routing
    assert_close(logits[keep], ref["router_logits_0"][keep])
    k = model.config.num_experts_per_tok
    index, weights = qwen3_moe.route(ref["router_logits_0"], k, model.config.norm_topk_prob)
    probs = np.sort(minilm.nn.softmax(ref["router_logits_0"]), axis=-1)[:, ::-1]
    boundary_tie = probs[:, k - 1] == probs[:, k]
    assert boundary_tie[keep].any(), "the fixture must contain ties"
    clear = keep & ~boundary_tie
    np.testing.assert_array_equal(np.sort(index[clear], -1), np.sort(ref["router_top_k_index_0"][clear], -1))
    for row in np.nonzero(keep & boundary_tie)[0]:
        tied = np.nonzero(minilm.nn.softmax(ref["router_logits_0"][row]) == probs[row, k - 1])[0]
        chosen = set(index[row]) & set(tied)
        assert chosen == set(sorted(tied)[: len(chosen)]), "ties go to the lower expert index"


def test_breaking_one_weight_breaks_parity():
    """The parity test can fail: nudging one expert's weight moves the logits past the tolerance."""
    folder, ref, _ = load_reference("qwen3_moe_causal_lm")
    model = minilm.from_pretrained(folder)
    model.params.model.layers[2].mlp.experts.down_proj[3] += 0.05
    out = run(model, ref, "causal_lm")
    assert max_diff(out.logits, ref["logits"], ref["attention_mask"].astype(bool)) > tolerance(ref["logits"])


def test_cached_decoding_equals_full_recompute():
    folder, ref, _ = load_reference("qwen3_moe_causal_lm_b")  # sliding window 4, generation past it
    model = minilm.from_pretrained(folder)
    prompt = ref["single_input_ids_0"]
    cached = model.generate(prompt, max_new_tokens=10, eos_token_id=[])
    seq = prompt
    for _ in range(10):
        seq = np.concatenate([seq, model(seq).logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(cached, seq)
    # and the cached logits themselves equal the full recompute at every step
    cache = minilm.KVCache(model.config.num_hidden_layers)
    full = model(seq).logits
    step_logits = [model(seq[:, : prompt.shape[1]], past_key_values=cache, use_cache=True).logits]
    for t in range(prompt.shape[1], seq.shape[1]):
        step_logits.append(model(seq[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert_close(np.concatenate(step_logits, axis=1), full)


def test_left_padded_batch_rows_equal_each_prompt_alone():
    folder, ref, _ = load_reference("qwen3_moe_causal_lm")
    model = minilm.from_pretrained(folder)
    batch = model.generate(
        ref["generate_input_ids"], attention_mask=ref["generate_attention_mask"], max_new_tokens=6, eos_token_id=[]
    )
    mask = ref["generate_attention_mask"]
    for r in range(len(batch)):
        alone = model.generate(ref["generate_input_ids"][r : r + 1, mask[r] == 1], max_new_tokens=6, eos_token_id=[])
        np.testing.assert_array_equal(batch[r, -6:], alone[0, -6:])


def test_save_pretrained_round_trip(tmp_path):
    folder, ref, _ = load_reference("qwen3_moe_causal_lm")
    model = minilm.from_pretrained(folder)
    model.save_pretrained(tmp_path / "saved")
    again = minilm.from_pretrained(tmp_path / "saved")
    a, b = run(model, ref, "causal_lm"), run(again, ref, "causal_lm")
    np.testing.assert_array_equal(a.logits, b.logits)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["architectures"] == ["Qwen3MoeForCausalLM"] and saved["num_experts"] == 8
    # saved in the Hub's one-tensor-per-expert layout, like transformers' save_pretrained
    from minilm.io.safetensors import read_checkpoint

    assert set(read_checkpoint(tmp_path / "saved")) == set(read_checkpoint(folder))


def test_sharded_save_round_trip(tmp_path):
    folder, ref, _ = load_reference("qwen3_moe_seq_cls")
    model = minilm.from_pretrained(folder)
    model.save_pretrained(tmp_path / "s", max_shard_bytes=20_000)
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    again = minilm.from_pretrained(tmp_path / "s")
    np.testing.assert_array_equal(run(model, ref, "seq_cls").logits, run(again, ref, "seq_cls").logits)


def test_bfloat16_checkpoint_and_compute_dtypes():
    folder, ref, _ = load_reference("qwen3_moe_bf16")
    import ml_dtypes

    from minilm.io.safetensors import read_checkpoint

    assert next(iter(read_checkpoint(folder).values())).dtype == ml_dtypes.bfloat16
    model = minilm.from_pretrained(folder)  # computes in float32 by default
    assert model.params.model.norm.weight.dtype == np.float32
    compare_outputs(run(model, ref, "causal_lm"), ref)
    half = minilm.from_pretrained(folder, dtype="float16")
    logits = half(ref["input_ids"], attention_mask=ref["attention_mask"], position_ids=ref["position_ids"]).logits
    assert logits.dtype == np.float16 and np.isfinite(logits).all()


def test_base_model_loads_head_checkpoints_and_vice_versa():
    folder, ref, _ = load_reference("qwen3_moe_qa")  # saved under `transformer.`
    base = minilm.Qwen3MoeModel.from_pretrained(folder)
    qa = minilm.from_pretrained(folder)
    h1 = base(
        ref["input_ids"], attention_mask=ref["attention_mask"], position_ids=ref["position_ids"]
    ).last_hidden_state
    h2 = qa.base_model(
        input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], position_ids=ref["position_ids"]
    ).last_hidden_state
    np.testing.assert_array_equal(h1, h2)


# -- keras-hub style ----------------------------------------------------------------------------


def test_backbone_and_hf_model_agree_exactly():
    folder, ref, _ = load_reference("qwen3_moe_causal_lm")
    hf = minilm.from_pretrained(folder)
    backbone = minilm.Qwen3MoeBackbone.from_preset(folder)
    hidden = backbone({"token_ids": ref["input_ids"], "padding_mask": ref["attention_mask"]})
    expected = hf.base_model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
    np.testing.assert_array_equal(hidden, expected)
    np.testing.assert_array_equal(
        backbone.token_embedding(ref["input_ids"]), hf.params.model.embed_tokens.weight[ref["input_ids"]]
    )
    config = backbone.get_config()
    assert config["num_experts"] == 8 and config["top_k"] == 2 and config["norm_top_k_prob"] is True
    assert config["mlp_only_layers"] == [1] and config["moe_intermediate_dim"] == 12


def test_backbone_config_round_trip_and_preset(tmp_path):
    folder, ref, _ = load_reference("qwen3_moe_causal_lm_b")
    backbone = minilm.Backbone.from_preset(folder)  # the generic entry point picks the family
    assert isinstance(backbone, minilm.Qwen3MoeBackbone)
    assert backbone.get_config()["sliding_window_size"] == 4 and backbone.get_config()["tie_word_embeddings"]
    rebuilt = minilm.Qwen3MoeBackbone.from_config(backbone.get_config())
    assert rebuilt.get_config() == backbone.get_config()
    backbone.save_to_preset(tmp_path / "preset")
    again = minilm.Backbone.from_preset(tmp_path / "preset")
    inputs = {"token_ids": ref["input_ids"], "padding_mask": ref["attention_mask"]}
    np.testing.assert_array_equal(again(inputs), backbone(inputs))
    logits = backbone.token_embedding(backbone(inputs), reverse=True)  # tied: reverse embedding = LM head
    np.testing.assert_allclose(
        logits,
        minilm.from_pretrained(folder)(
            **{"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
        ).logits,
        rtol=0,
        atol=1e-6,
    )


def test_backbone_from_hf_cache(tmp_path, monkeypatch):
    folder, ref, _ = load_reference("qwen3_moe_base")
    snapshot = tmp_path / "hub" / "models--tiny--qwen3-moe" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hub" / "models--tiny--qwen3-moe" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--qwen3-moe" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    backbone = minilm.Qwen3MoeBackbone.from_preset("hf://tiny/qwen3-moe")
    hidden = backbone({"token_ids": ref["input_ids"], "padding_mask": ref["attention_mask"]})
    assert hidden.shape == ref["last_hidden_state"].shape


def test_keras_constructor_maps_onto_hf_names():
    b = minilm.Qwen3MoeBackbone(
        vocabulary_size=40,
        num_layers=3,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=16,
        intermediate_dim=24,
        moe_intermediate_dim=8,
        num_experts=4,
        head_dim=8,
        top_k=2,
        norm_top_k_prob=True,
        decoder_sparse_step=2,
        mlp_only_layers=[0],
        sliding_window_size=None,
        rope_max_wavelength=500,
    )
    c = b.config
    assert (c.vocab_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (40, 3, 4, 2)
    assert (c.hidden_size, c.intermediate_size, c.moe_intermediate_size, c.num_experts) == (16, 24, 8, 4)
    assert (c.head_dim, c.num_experts_per_tok, c.norm_topk_prob, c.decoder_sparse_step) == (8, 2, True, 2)
    assert c.rope_theta == 500 and not c.use_sliding_window
    assert [c.is_sparse_layer(i) for i in range(3)] == [False, True, False]

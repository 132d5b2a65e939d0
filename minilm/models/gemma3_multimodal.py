"""Gemma 3 with images (4B, 12B, 27B): the text decoder of `gemma3.py` reading soft tokens from the
vision tower of `gemma3_vision.py` (transformers' Gemma3Model and Gemma3ForConditionalGeneration).

    prompt ids   ... <start_of_image> <image_soft_token> x mm_tokens_per_image <end_of_image> ...
    embeddings   scaled text embeddings, except at the image tokens, which take the image's soft
                 tokens (vision tower -> projector) in order: image 0 fills the first run, ...
    attention    text is causal; the tokens of one image also attend to each other's later tokens
                 (token_type_ids == 1 marks them; `nn.same_image_mask`); on sliding layers only
                 inside the window
    decoder      Gemma 3's text decoder, unchanged; logits = hidden @ embed_tokens^T (tied)

Generation runs the images once, in the prefill; every later step decodes against the KV cache
with the plain causal mask (the new token is text).

Tensor names: minilm keeps transformers 5's layout (`model.language_model.*`,
`model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`, `lm_head.weight`) and
reads every layout transformers reads:

    released on the Hub (and transformers 4)   language_model.model.*, language_model.lm_head.*,
                                               vision_tower.vision_model.*, multi_modal_projector.*
    written by transformers 5.23               the same without `vision_model.`
    transformers 5 in memory                   model.language_model.*, model.vision_tower.*,
                                               model.multi_modal_projector.*, lm_head.*

`save_pretrained` writes the released layout, or transformers 5's with layout="transformers5".

One difference from the text-only head, as in transformers 5.23: the logits are never soft-capped
here (Gemma3ForConditionalGeneration ignores final_logit_softcapping; released configs set none).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import ops
from ..errors import ConfigError, InputError
from ..heads import ForCausalLM, causal_lm_loss
from ..io.safetensors import write_checkpoint
from ..modeling import BaseModel, ModelOutput, check_model_inputs, with_prefix
from .gemma3 import gemma3_model, gemma3_shapes, scaled_embedding
from .gemma3_vision import Gemma3Config, check_pixel_values, multimodal_projector, vision_shapes, vision_tower

# ---------------------------------------------------------------------------------------------
# Images into the text: soft tokens take the place of the image tokens
# ---------------------------------------------------------------------------------------------


def get_image_features(p, cfg, pixel_values, output_hidden_states=False, output_attentions=False):
    """Vision tower then projector. p: the tree holding `vision_tower` and `multi_modal_projector`.

    pixel_values (num_images, num_channels, image_size, image_size) -> ModelOutput with
    last_hidden_state (num_images, num_patches, vision_hidden), the vision features, and
    pooler_output (num_images, mm_tokens_per_image, text_hidden), the soft tokens."""
    features, hidden_states, attentions = vision_tower(
        pixel_values, p.vision_tower.vision_model, cfg.vision_config, True, output_attentions
    )
    soft_tokens = multimodal_projector(features, p.multi_modal_projector, cfg)
    return ModelOutput(
        last_hidden_state=features,
        pooler_output=soft_tokens,
        hidden_states=hidden_states if output_hidden_states else None,
        attentions=attentions,
    )


def image_token_mask(input_ids, cfg):
    """Where the soft tokens go: input_ids == image_token_index. (batch, seq) -> (batch, seq) bool"""
    return input_ids == cfg.image_token_index


def check_image_tokens(input_ids, num_images, cfg):
    """InputError unless the prompt holds exactly mm_tokens_per_image image tokens per image."""
    found = int(image_token_mask(input_ids, cfg).sum())
    per_image = cfg.mm_tokens_per_image
    if num_images and not found:
        raise InputError(
            f"pixel_values hold {num_images} image(s) but input_ids hold no image token "
            f"(image_token_index={cfg.image_token_index}): lay the prompt out with minilm.io.image_processor"
        )
    if found and not num_images:
        raise InputError(
            f"input_ids hold {found} image tokens (image_token_index={cfg.image_token_index}) but no pixel_values "
            "were given: pass the images"
        )
    if found != num_images * per_image:
        raise InputError(
            f"input_ids hold {found} image tokens but {num_images} image(s) give {num_images * per_image} soft "
            f"tokens ({per_image} per image): the prompt has room for {found / per_image:g} image(s)"
        )


def merge_image_features(embeds, input_ids, soft_tokens, cfg):
    """Put the soft tokens where the image tokens are, image after image, row by row (in the
    order of the True entries of the mask, as torch's masked_scatter).

    embeds (batch, seq, text_hidden), input_ids (batch, seq),
    soft_tokens (num_images, mm_tokens_per_image, text_hidden) -> (batch, seq, text_hidden)"""
    is_image = ops.like(image_token_mask(input_ids, cfg), embeds)  # (batch, seq)
    merged = embeds.copy()
    merged[is_image] = soft_tokens.reshape(-1, soft_tokens.shape[-1]).astype(embeds.dtype)  # (tokens, text_hidden)
    return merged


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def gemma3_multimodal_model(
    p,
    cfg,
    input_ids=None,
    pixel_values=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    token_type_ids=None,
    inputs_embeds=None,
    use_cache=None,
    output_attentions=False,
    output_hidden_states=False,
):
    """Images -> soft tokens -> merged into the text embeddings -> Gemma 3's text decoder."""
    text_cfg = cfg.text_config
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    image_hidden_states = None
    if pixel_values is not None:
        pixel_values = check_pixel_values(pixel_values, cfg.vision_config)  # (num_images, C, H, W)
        if input_ids is None:
            raise InputError("pixel_values need input_ids: the image tokens say where the images go")
    if input_ids is not None:
        image_ids = np.asarray(input_ids)
        if cfg.image_token_index >= text_cfg.vocab_size:  # an id outside the table: look up pad instead
            input_ids = np.where(image_token_mask(image_ids, cfg), 0, image_ids)
        input_ids, *_ = check_model_inputs(text_cfg, input_ids, None, attention_mask, position_ids, past)
        if pixel_values is not None or past == 0:  # a prefill: its image tokens need their images
            check_image_tokens(image_ids, 0 if pixel_values is None else len(pixel_values), cfg)
    if pixel_values is not None:
        image_hidden_states = get_image_features(p, cfg, pixel_values).pooler_output  # (images, mm_tokens, hidden)
        table = p.language_model.embed_tokens.weight
        embeds = scaled_embedding(ops.like(input_ids, table), table)  # (batch, seq, text_hidden)
        inputs_embeds = merge_image_features(embeds, image_ids, image_hidden_states, cfg)
        input_ids = None
    out = gemma3_model(
        p.language_model,
        text_cfg,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        token_type_ids=token_type_ids,
    )
    out.image_hidden_states = image_hidden_states
    return out


def gemma3_multimodal_shapes(cfg):
    """Every tensor of Gemma3Model: vision tower, projector and text decoder."""
    if not isinstance(cfg, Gemma3Config):
        raise ConfigError(f"the multimodal Gemma 3 needs a Gemma3Config, got {type(cfg).__name__}")
    return {**vision_shapes(cfg), **with_prefix("language_model", gemma3_shapes(cfg.text_config))}


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts
# ---------------------------------------------------------------------------------------------

# (prefix in a checkpoint, the prefix in minilm's layout); the first match wins.
READ_RULES = (
    ("language_model.model.", "model.language_model."),  # released
    ("language_model.lm_head.", "lm_head."),  # released, untied
    ("language_model.", "model.language_model."),  # a bare Gemma3Model
    ("vision_tower.vision_model.", "model.vision_tower.vision_model."),  # released
    ("vision_tower.", "model.vision_tower.vision_model."),  # written by transformers 5.23
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("model.vision_tower.vision_model.", "model.vision_tower.vision_model."),
    ("model.vision_tower.", "model.vision_tower.vision_model."),  # transformers 5 in memory
)

WRITE_RULES = {
    "released": (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ),
    "transformers5": (("model.vision_tower.vision_model.", "model.vision_tower."),),
}


def rename(name, rules):
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


class Gemma3MultimodalLayout:
    """Loading and saving shared by both classes: names of any layout -> minilm's, and back."""

    ignored_checkpoint_keys = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq", "embeddings.position_ids")

    def _align_prefix(self, tensors):
        aligned = {rename(name, READ_RULES): value for name, value in tensors.items()}
        if self.has_head:
            return aligned
        # the bare model: drop `model.` and ignore the LM head, as transformers does
        return {name.removeprefix("model."): v for name, v in aligned.items() if not name.startswith("lm_head.")}

    def init_params(self, seed=0):
        """Random weights: SigLIP's LayerNorms start at one, Gemma's (1 + w) norms at zero."""
        params = super().init_params(seed)
        for name, value in params.items():
            if (
                "vision_tower" in name
                and ("layer_norm" in name or "post_layernorm" in name)
                and name.endswith("weight")
            ):
                params[name] = np.ones_like(value)
        return params

    def norm_init_value(self):
        return 0.0

    def save_pretrained(self, folder, *, max_shard_bytes=None, layout="released"):
        """config.json + safetensors; layout "released" (the Hub's names, read by transformers 4 and 5)
        or "transformers5" (transformers 5's own names)."""
        if layout not in WRITE_RULES:
            raise InputError(f"layout must be one of {sorted(WRITE_RULES)}, got {layout!r}")
        folder = Path(folder)
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(folder)
        prefix = "model." if not self.has_head else ""  # write names as the head model's
        tensors = {
            rename(prefix + k, WRITE_RULES[layout]): np.asarray(ops.to_host(v))
            for k, v in self.state_dict().items()
            if k not in self.tied_weights()
        }
        write_checkpoint(folder, tensors, max_shard_bytes=max_shard_bytes)


class Gemma3Model(Gemma3MultimodalLayout, BaseModel):
    """Vision tower + projector + Gemma 3 text decoder, no LM head:
    `model(input_ids, pixel_values=..., token_type_ids=...).last_hidden_state`."""

    config_class = Gemma3Config
    embedding_name = "language_model.embed_tokens.weight"
    backbone_shapes = staticmethod(gemma3_multimodal_shapes)
    backbone_forward = staticmethod(gemma3_multimodal_model)

    def get_image_features(self, pixel_values, output_hidden_states=False, output_attentions=False):
        """ModelOutput: last_hidden_state = vision features, pooler_output = soft tokens."""
        return get_image_features(self.params, self.config, pixel_values, output_hidden_states, output_attentions)


class Gemma3ForConditionalGeneration(Gemma3MultimodalLayout, ForCausalLM):
    """Gemma 3 with images: logits over the vocabulary after a prompt of text and images.

    out = model(input_ids, pixel_values=pixel_values, token_type_ids=token_type_ids, labels=ids)
    out.logits, out.loss, out.image_hidden_states
    model.generate(input_ids, pixel_values=pixel_values, token_type_ids=token_type_ids)

    `minilm.io.image_processor.Gemma3Processor` makes all three from text and images. Without
    token_type_ids the image tokens attend causally, as in transformers (the processor's output
    always has them).
    """

    config_class = Gemma3Config
    base_model_class = Gemma3Model

    def head_shapes(self):
        text = self.config.text_config
        return {"lm_head.weight": (text.vocab_size, text.hidden_size)}

    def get_image_features(self, pixel_values, output_hidden_states=False, output_attentions=False):
        """ModelOutput: last_hidden_state = vision features, pooler_output = soft tokens."""
        return get_image_features(self.params.model, self.config, pixel_values, output_hidden_states, output_attentions)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=False,
        output_hidden_states=False,
        logits_to_keep=0,
    ):
        out = self.base_model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]  # only the last positions (generation needs one)
        logits = self.compute_logits(hidden)  # (batch, seq, vocab_size), never soft-capped (see above)
        loss = causal_lm_loss(ops.to_host(logits), labels) if labels is not None else None
        return ModelOutput(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            image_hidden_states=out.image_hidden_states,
        )

    def generate(self, input_ids, attention_mask=None, pixel_values=None, token_type_ids=None, **options):
        """Prompt + new token ids. The images go through the model once, with the prompt (the
        prefill); every new token is then decoded against the KV cache. See `minilm.generation.generate`."""
        prefill = {"pixel_values": pixel_values, "token_type_ids": token_type_ids}
        return super().generate(input_ids, attention_mask=attention_mask, prefill_inputs=prefill, **options)

"""keras-hub's Gemma3Backbone: its constructor arguments mapped onto `Gemma3TextConfig`, its
embedding-model head (EmbeddingGemma's pooling) on top of the sequence output, and its vision
encoder's soft tokens placed among the token embeddings (`gemma3_vision.py`)."""

from __future__ import annotations

import numpy as np

from .. import ops
from ..errors import ConfigError, InputError
from ..models.gemma3 import FULL, SLIDING, Gemma3TextConfig, Gemma3TextModel, scaled_embedding
from ..models.gemma3_vision import Gemma3Config
from ..rope import rope_type
from .backbone import Backbone, build_weights, check_keras_kwargs
from .gemma3_vision import (
    Gemma3VisionEncoder,
    check_vision_inputs,
    interleave_embeddings,
    split_vision_params,
    vision_encoder_from_config,
)
from .lora import KerasLoraSpec


class Gemma3Backbone(Backbone):
    """keras-hub's Gemma3Backbone arguments on top of Gemma3TextModel (with images: vision_encoder below).

    keras-hub's layer pattern is fixed: with use_sliding_window_attention, layer i is local when
    i % 6 < 5; local layers use RoPE base 10 000 and global ones 1 000 000, each with its own
    linear scaling factor (positions / factor). query_head_dim_normalize scales queries by
    head_dim ** -0.5, else by (hidden_dim // num_query_heads) ** -0.5 (this is what keras-hub
    documents; its decoder block currently hard-codes True).

    is_embedding_model=True adds keras-hub's pooled output, and the call returns
    {"sequence_output": (batch, seq, hidden_dim), "pooled_output": (batch, embedding_dim)}:

        pooled = mean of sequence_output over the tokens padding_mask keeps   (batch, hidden_dim)
        pooled = pooled @ pooling_dense_1.weight^T                             (batch, pooling_intermediate_dim)
        pooled = pooled @ embedding_projection.weight^T                        (batch, embedding_dim)
        pooled = pooled / |pooled|                                             unit length

    The two projections have no bias; they are sentence-transformers' 2_Dense and 3_Dense of
    EmbeddingGemma, held in `extra_weights` under the names above. EmbeddingGemma itself also sets
    use_bidirectional_attention=True, which minilm's causal Gemma 3 refuses (ConfigError).

    vision_encoder=Gemma3VisionEncoder(...) (`gemma3_vision.py`) makes it keras-hub's image + text
    backbone, called on {"token_ids", "padding_mask", "images", "vision_mask", "vision_indices"}:

        text = token_embedding(token_ids) * sqrt(hidden_dim)                   (batch, seq, hidden_dim)
        soft = vision_encoder(images)              (batch * images_per_prompt, tokens_per_image, hidden_dim)
        x    = text with soft token k of image j of row b at vision_indices[b, j * tokens_per_image + k]
        decoder layers: causal, except that each run of vision_mask == 1 attends to itself both ways
                        (transformers' token_type_ids rule; two images side by side form one run)

    On sliding layers minilm follows transformers: a token sees the keys of the last
    sliding_window positions and every later token of its own image. keras-hub 0.32 also bounds
    that look-ahead by the window (|q - k| < sliding_window_size); the two differ only for images
    of more tokens than the window (never on the released models: 256 soft tokens, window 1024).

    Its weights are the encoder's, under transformers' names (`vision_tower.vision_model.*`,
    `multi_modal_projector.*`), next to the text weights in a preset's model.safetensors.
    """

    LORA = KerasLoraSpec(
        "Gemma 3",
        {
            "query": ("q_proj", "query"),
            "key": ("k_proj", "kv"),
            "value": ("v_proj", "kv"),
            "attention_output": ("o_proj", "output"),
        },
        "decoder_block_{i}/attention/{name}",
        "layers.{i}.self_attn",
        kernel_layout="nmh",
    )  # keras-hub's attention layer names -> minilm's modules (enable_lora)

    def __init__(
        self,
        vocabulary_size,
        image_size,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        intermediate_dim,
        head_dim,
        query_head_dim_normalize=True,
        use_query_key_norm=True,
        use_post_ffw_norm=False,
        use_post_attention_norm=False,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=None,
        use_sliding_window_attention=False,
        sliding_window_size=1024,
        local_rope_scaling_factor=1.0,
        global_rope_scaling_factor=1.0,
        vision_encoder=None,
        layer_norm_epsilon=1e-6,
        use_bidirectional_attention=False,
        dropout=0,
        is_embedding_model=False,
        pooling_intermediate_dim=None,
        embedding_dim=None,
        dtype=None,
        params=None,
        **kwargs,
    ):
        if local_rope_scaling_factor != 1.0:
            raise ConfigError(
                f"local_rope_scaling_factor={local_rope_scaling_factor}: minilm's Gemma 3 (like every "
                "released checkpoint) scales RoPE on the global layers only; use 1.0"
            )
        hf_config = Gemma3TextConfig(
            vocab_size=vocabulary_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            hidden_size=hidden_dim,
            intermediate_size=intermediate_dim,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim if query_head_dim_normalize else hidden_dim // num_query_heads,
            use_query_key_norm=use_query_key_norm,
            use_post_ffw_norm=use_post_ffw_norm,
            use_post_attention_norm=use_post_attention_norm,
            attn_logit_softcapping=attention_logit_soft_cap,
            apply_attn_logit_softcapping=attention_logit_soft_cap is not None,
            final_logit_softcapping=final_logit_soft_cap,
            layer_types=[SLIDING if use_sliding_window_attention and i % 6 < 5 else FULL for i in range(num_layers)],
            sliding_window=sliding_window_size,
            rope_local_base_freq=10_000.0,
            rope_theta=1_000_000.0,
            rope_scaling=(
                None
                if global_rope_scaling_factor == 1.0
                else {"rope_type": "linear", "factor": float(global_rope_scaling_factor)}
            ),
            rms_norm_eps=layer_norm_epsilon,
            attention_dropout=dropout,
            use_bidirectional_attention=use_bidirectional_attention,  # True: ConfigError (minilm's Gemma 3 is causal)
        )
        check_keras_kwargs(type(self), kwargs)
        pooling = {}
        if is_embedding_model:
            if embedding_dim is None or pooling_intermediate_dim is None:
                raise ConfigError(
                    "Gemma3Backbone(is_embedding_model=True) needs embedding_dim and "
                    f"pooling_intermediate_dim; got {embedding_dim=}, {pooling_intermediate_dim=}"
                )
            pooling = {
                "pooling_dense_1.weight": (pooling_intermediate_dim, hidden_dim),
                "embedding_projection.weight": (embedding_dim, pooling_intermediate_dim),
            }
        elif (pooling_intermediate_dim, embedding_dim) != (None, None):
            raise ConfigError(
                f"Gemma3Backbone: {pooling_intermediate_dim=} and {embedding_dim=} size the pooling "
                "head of an embedding model; set is_embedding_model=True or leave them None"
            )
        params, vision_params = split_vision_params(params)
        super().__init__(*build_weights(Gemma3TextModel, hf_config, params, dtype, extra_shapes=pooling))
        self.vision_encoder = None
        if vision_encoder is not None:
            self.vision_encoder = vision_encoder_from_config(vision_encoder, vision_params)
            if image_size != self.vision_encoder.image_size:
                raise ConfigError(
                    f"Gemma3Backbone: image_size={image_size} but the vision encoder's is "
                    f"{self.vision_encoder.image_size}; keras-hub feeds the backbone's images to the encoder"
                )
            if self.vision_encoder.output_dim != hidden_dim:
                raise ConfigError(
                    f"Gemma3Backbone: the vision encoder's output_dim={self.vision_encoder.output_dim} must be "
                    f"hidden_dim={hidden_dim}: its soft tokens take the place of token embeddings"
                )
        elif vision_params:
            raise ConfigError(
                f"Gemma3Backbone: the weights hold a vision encoder ({sorted(vision_params)[0]}, ...) but "
                "vision_encoder is None"
            )
        self.image_size = image_size  # the vision encoder's input size (keras-hub's backbone argument)
        self.is_embedding_model = is_embedding_model
        self.pooling_intermediate_dim, self.embedding_dim = pooling_intermediate_dim, embedding_dim

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "vision_encoder": None
            if self.vision_encoder is None
            else {"class_name": "Gemma3VisionEncoder", "config": self.vision_encoder.get_config()},
            "is_embedding_model": self.is_embedding_model,
            "pooling_intermediate_dim": self.pooling_intermediate_dim,
            "embedding_dim": self.embedding_dim,
        }

    def count_params(self):
        vision = 0 if self.vision_encoder is None else self.vision_encoder.count_params()
        return super().count_params() + vision

    def checkpoint_tensors(self):
        vision = {} if self.vision_encoder is None else self.vision_encoder.state_dict()
        return {**super().checkpoint_tensors(), **vision}

    def to_device(self):
        if self.vision_encoder is not None:
            self.vision_encoder.to_device()
        return super().to_device()

    def __call__(self, inputs):
        """The sequence output; an embedding model's call adds the pooled output (see the class docstring)."""
        vision_keys = {"images", "vision_mask", "vision_indices"} & set(inputs if isinstance(inputs, dict) else ())
        if self.vision_encoder is None and vision_keys:
            raise InputError(f"{sorted(vision_keys)} given to a text-only Gemma3Backbone (vision_encoder=None)")
        if self.vision_encoder is not None:
            sequence_output = self.call_with_images(inputs)
        else:
            sequence_output = super().__call__(inputs)  # (batch, seq, hidden_dim)
        if not self.is_embedding_model:
            return sequence_output
        mask = inputs.get("padding_mask")
        mask = np.ones(sequence_output.shape[:2]) if mask is None else np.asarray(mask)
        pooled = mean_pool(sequence_output, ops.like(mask.astype(sequence_output.dtype), sequence_output))
        pooled = ops.linear(pooled, self.extra_weight("pooling_dense_1.weight"))  # (batch, pooling_intermediate_dim)
        pooled = ops.linear(pooled, self.extra_weight("embedding_projection.weight"))  # (batch, embedding_dim)
        return {"sequence_output": sequence_output, "pooled_output": unit_normalize(pooled)}

    def call_with_images(self, inputs):
        """keras-hub's image + text call (see the class docstring). -> (batch, seq, hidden_dim)"""
        missing = {"token_ids", "images", "vision_mask", "vision_indices"} - set(inputs)
        if missing:
            raise InputError(
                f"a Gemma3Backbone with a vision encoder is called on token_ids, padding_mask, images, vision_mask "
                f"and vision_indices; missing {sorted(missing)}"
            )
        token_ids = np.asarray(inputs["token_ids"])
        images, vision_mask, vision_indices = check_vision_inputs(
            inputs["images"],
            inputs["vision_mask"],
            inputs["vision_indices"],
            token_ids,
            self.vision_encoder.num_vision_tokens_per_image,
        )
        table = self.model.params.embed_tokens.weight  # (vocabulary_size, hidden_dim)
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= table.shape[0]):
            raise InputError(f"token ids must lie in [0, {table.shape[0]}); got {token_ids.min()}..{token_ids.max()}")
        x = scaled_embedding(ops.like(token_ids, table), table)  # (batch, seq, hidden_dim), times sqrt(hidden_dim)
        if images.shape[1]:
            soft = self.vision_encoder(images)  # (batch * images_per_prompt, tokens_per_image, hidden_dim)
            x = interleave_embeddings(soft, x, vision_indices)
        mask = inputs.get("padding_mask")
        mask = None if mask is None else np.asarray(mask).astype(np.int64)
        out = self.model(inputs_embeds=x, attention_mask=mask, token_type_ids=vision_mask.astype(np.int64))
        return out.last_hidden_state  # (batch, seq, hidden_dim)

    @staticmethod
    def keras_args(c):
        """keras-hub arguments for a Gemma3TextConfig, or a Gemma3Config (images: its text config's
        arguments and a vision encoder); ConfigError for what keras-hub cannot express."""
        if isinstance(c, Gemma3Config):
            encoder = Gemma3VisionEncoder.keras_args(c)
            return {
                **Gemma3Backbone.keras_args(c.text_config),
                "image_size": encoder["image_size"],
                "vision_encoder": {"class_name": "Gemma3VisionEncoder", "config": encoder},
            }
        sliding = SLIDING in c.layer_types
        keras_types = [SLIDING if sliding and i % 6 < 5 else FULL for i in range(c.num_hidden_layers)]
        scaling = c.rope_scaling or {}
        problems = []
        if c.layer_types != keras_types:
            problems.append(f"layer_types {c.layer_types} (keras-hub: local when i % 6 < 5)")
        if (c.rope_theta, c.rope_local_base_freq) != (1_000_000.0, 10_000.0):
            problems.append(
                f"rope_theta={c.rope_theta}, rope_local_base_freq={c.rope_local_base_freq} (keras-hub: 1e6 and 1e4)"
            )
        if scaling and rope_type(scaling) != "linear":
            problems.append(f"rope_scaling {scaling} (keras-hub: linear only)")
        if c.query_pre_attn_scalar not in (c.head_dim, c.hidden_size // c.num_attention_heads):
            problems.append(
                f"query_pre_attn_scalar={c.query_pre_attn_scalar} (keras-hub: head_dim or "
                "hidden_size // num_attention_heads)"
            )
        if not c.tie_word_embeddings:
            problems.append("tie_word_embeddings=False (keras-hub's Gemma 3 ties its reverse embedding)")
        if c.attn_logit_softcapping is not None and not c.apply_attn_logit_softcapping:
            problems.append("attn_logit_softcapping set but not applied (as in transformers; keras-hub applies it)")
        if problems:
            raise ConfigError("Gemma3Backbone cannot express this Gemma3TextConfig: " + "; ".join(problems))
        return dict(
            vocabulary_size=c.vocab_size,
            image_size=None,
            num_layers=c.num_hidden_layers,
            num_query_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            hidden_dim=c.hidden_size,
            intermediate_dim=c.intermediate_size,
            head_dim=c.head_dim,
            query_head_dim_normalize=c.query_pre_attn_scalar == c.head_dim,
            use_query_key_norm=c.use_query_key_norm,
            use_post_ffw_norm=c.use_post_ffw_norm,
            use_post_attention_norm=c.use_post_attention_norm,
            attention_logit_soft_cap=c.attention_soft_cap,
            final_logit_soft_cap=c.final_logit_softcapping,
            use_sliding_window_attention=sliding,
            sliding_window_size=c.sliding_window,
            local_rope_scaling_factor=1.0,
            global_rope_scaling_factor=float(scaling.get("factor", 1.0)),
            vision_encoder=None,
            layer_norm_epsilon=c.rms_norm_eps,
            use_bidirectional_attention=c.use_bidirectional_attention,
            dropout=c.attention_dropout,
            is_embedding_model=False,
            pooling_intermediate_dim=None,
            embedding_dim=None,
        )


def mean_pool(x, mask):
    """keras-hub's Gemma3MeanPooling: the mean of x over the positions mask keeps.
    x: (batch, seq, hidden_dim), mask: (batch, seq) of 0/1 -> (batch, hidden_dim)"""
    total = (x * mask[..., None]).sum(axis=1)  # (batch, hidden_dim)
    count = np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)  # (batch, 1); an all-padding row gives 0, not NaN
    return (total / count).astype(x.dtype)


def unit_normalize(x, epsilon=1e-12):
    """keras' UnitNormalization: x / max(|x|, epsilon) over the last axis. (..., n) -> (..., n)"""
    squared_norm = (x * x).sum(axis=-1, keepdims=True)  # (..., 1)
    return x / np.sqrt(np.maximum(squared_norm, epsilon * epsilon))

"""keras-hub's Gemma3Backbone (text): its constructor arguments mapped onto `Gemma3TextConfig`, and
its embedding-model head (EmbeddingGemma's pooling) on top of the sequence output."""

from __future__ import annotations

import numpy as np

from .. import ops
from ..errors import ConfigError
from ..models.gemma3 import FULL, SLIDING, Gemma3TextConfig, Gemma3TextModel
from ..rope import rope_type
from .backbone import Backbone, build_weights, check_keras_kwargs
from .lora import KerasLoraSpec


class Gemma3Backbone(Backbone):
    """keras-hub's Gemma3Backbone arguments on top of Gemma3TextModel (text only).

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
        if vision_encoder is not None:
            # The seam for images: encode -> pool to mm_tokens_per_image -> RMSNorm -> project, then
            # interleave with the text embeddings and let one image's tokens attend bidirectionally.
            raise NotImplementedError(
                "Gemma3Backbone(vision_encoder=...) is not implemented: minilm's Gemma 3 is "
                "text only; pass vision_encoder=None"
            )
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
        super().__init__(*build_weights(Gemma3TextModel, hf_config, params, dtype, extra_shapes=pooling))
        self.image_size = image_size  # the vision tower's input size; unused while minilm's Gemma 3 is text only
        self.is_embedding_model = is_embedding_model
        self.pooling_intermediate_dim, self.embedding_dim = pooling_intermediate_dim, embedding_dim

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "is_embedding_model": self.is_embedding_model,
            "pooling_intermediate_dim": self.pooling_intermediate_dim,
            "embedding_dim": self.embedding_dim,
        }

    def __call__(self, inputs):
        """The sequence output; an embedding model's call adds the pooled output (see the class docstring)."""
        sequence_output = super().__call__(inputs)  # (batch, seq, hidden_dim)
        if not self.is_embedding_model:
            return sequence_output
        mask = inputs.get("padding_mask")
        mask = np.ones(sequence_output.shape[:2]) if mask is None else np.asarray(mask)
        pooled = mean_pool(sequence_output, ops.like(mask.astype(sequence_output.dtype), sequence_output))
        pooled = ops.linear(pooled, self.extra_weight("pooling_dense_1.weight"))  # (batch, pooling_intermediate_dim)
        pooled = ops.linear(pooled, self.extra_weight("embedding_projection.weight"))  # (batch, embedding_dim)
        return {"sequence_output": sequence_output, "pooled_output": unit_normalize(pooled)}

    @staticmethod
    def keras_args(c):
        """keras-hub arguments for a Gemma3TextConfig; ConfigError for what keras-hub cannot express."""
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

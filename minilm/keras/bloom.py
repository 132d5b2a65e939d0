"""keras-hub's BloomBackbone: its constructor arguments mapped onto `BloomConfig`."""

from __future__ import annotations

from ..errors import ConfigError
from ..models.bloom import BloomConfig, BloomModel
from .backbone import Backbone, build_weights, check_keras_kwargs
from .lora import KerasLoraSpec


class BloomBackbone(Backbone):
    """keras-hub's BloomBackbone arguments on top of BloomModel. transformers' BLOOM fixes the MLP
    at 4 * hidden_size, so intermediate_dim must be 4 * hidden_dim. The embeddings are tied, as in
    keras-hub (its ReversibleEmbedding's default)."""

    LORA = KerasLoraSpec(
        "BLOOM",
        {"query_dense": ("query_key_value", "query"), "value_dense": ("query_key_value", "value")},
        "transformer_layer_{i}/self_attention/{name}",
        "h.{i}.self_attention",
        fused_qkv=True,
    )  # keras-hub's attention layer names -> minilm's modules (enable_lora)

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_heads,
        hidden_dim,
        intermediate_dim,
        dropout=0.0,
        layer_norm_epsilon=1e-5,
        dtype=None,
        params=None,
        **kwargs,
    ):
        if intermediate_dim != 4 * hidden_dim:
            raise ConfigError(
                f"BloomBackbone: intermediate_dim={intermediate_dim} must be 4 * hidden_dim = "
                f"{4 * hidden_dim} (BLOOM checkpoints have no other MLP width)"
            )
        hf_config = BloomConfig(
            vocab_size=vocabulary_size,
            n_layer=num_layers,
            n_head=num_heads,
            hidden_size=hidden_dim,
            hidden_dropout=dropout,
            attention_dropout=dropout,
            layer_norm_epsilon=layer_norm_epsilon,
        )
        check_keras_kwargs(type(self), kwargs)
        super().__init__(*build_weights(BloomModel, hf_config, params, dtype))

    @staticmethod
    def keras_args(c):
        """keras-hub arguments for a BloomConfig; ConfigError for what keras-hub cannot express."""
        if c.apply_residual_connection_post_layernorm:
            raise ConfigError(
                "BloomBackbone cannot express apply_residual_connection_post_layernorm=True "
                "(keras-hub's BLOOM adds the residual before the LayerNorm); use BloomModel"
            )
        if not c.tie_word_embeddings:
            raise ConfigError(
                "BloomBackbone cannot express tie_word_embeddings=False (keras-hub's BLOOM ties "
                "its reverse embedding to the input table); use BloomModel"
            )
        return dict(
            vocabulary_size=c.vocab_size,
            num_layers=c.n_layer,
            num_heads=c.n_head,
            hidden_dim=c.hidden_size,
            intermediate_dim=4 * c.hidden_size,
            dropout=c.hidden_dropout,
            layer_norm_epsilon=c.layer_norm_epsilon,
        )

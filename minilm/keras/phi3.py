"""keras-hub's Phi3Backbone: its constructor arguments mapped onto `Phi3Config`."""

from __future__ import annotations

from ..errors import ConfigError
from ..models.phi3 import Phi3Config, Phi3Model
from .backbone import Backbone, build_weights, check_keras_kwargs
from .lora import KerasLoraSpec


class Phi3Backbone(Backbone):
    """keras-hub's Phi3Backbone arguments on top of Phi3Model. rope_scaling_type None is plain
    RoPE; "su" (keras-hub's name) or "longrope" takes the short and long factors. The embeddings are
    untied, as in keras-hub: the reverse embedding is lm_head.weight."""

    LORA = KerasLoraSpec(
        "Phi-3",
        {
            "query": ("q_proj", "query"),
            "key": ("k_proj", "kv"),
            "value": ("v_proj", "kv"),
            "attention_output": ("o_proj", "output"),
        },
        "transformer_layer_{i}/attention/{name}",
        "layers.{i}.self_attn",
    )  # keras-hub's attention layer names -> minilm's modules (enable_lora)

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        hidden_dim,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        layer_norm_epsilon=1e-6,
        dropout=0,
        max_sequence_length=4096,
        pretraining_sequence_length=4096,
        rope_max_wavelength=10000,
        rope_scaling_type=None,
        rope_scaling_short_factor=None,
        rope_scaling_long_factor=None,
        dtype=None,
        params=None,
        **kwargs,
    ):
        if rope_scaling_type is None:
            scaling = None
        elif rope_scaling_type in ("su", "longrope"):
            scaling = {
                "rope_type": "longrope",
                "short_factor": list(rope_scaling_short_factor or []),
                "long_factor": list(rope_scaling_long_factor or []),
            }
        else:
            raise ConfigError(f"Phi3Backbone: rope_scaling_type={rope_scaling_type!r}; use None or 'su'")
        hf_config = Phi3Config(
            vocab_size=vocabulary_size,
            num_hidden_layers=num_layers,
            hidden_size=hidden_dim,
            intermediate_size=intermediate_dim,
            num_attention_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            rms_norm_eps=layer_norm_epsilon,
            attention_dropout=dropout,
            resid_pdrop=dropout,
            max_position_embeddings=max_sequence_length,
            original_max_position_embeddings=pretraining_sequence_length,
            rope_theta=rope_max_wavelength,
            rope_scaling=scaling,
        )
        check_keras_kwargs(type(self), kwargs)
        super().__init__(*build_weights(Phi3Model, hf_config, params, dtype))

    @staticmethod
    def keras_args(c):
        """keras-hub arguments for a Phi3Config; ConfigError for what keras-hub cannot express."""
        scaling = c.rope_scaling or {}
        problems = []
        if c.partial_rotary_factor != 1.0:
            problems.append(f"partial_rotary_factor={c.partial_rotary_factor}")
        if c.sliding_window is not None:
            problems.append(f"sliding_window={c.sliding_window}")
        if c.tie_word_embeddings:
            problems.append("tie_word_embeddings=True (keras-hub's Phi-3 keeps a separate reverse embedding)")
        if scaling.keys() & {"factor", "attention_factor"}:
            problems.append(f"rope_scaling sets {sorted(scaling.keys() & {'factor', 'attention_factor'})}")
        if problems:
            raise ConfigError("Phi3Backbone cannot express this Phi3Config: " + "; ".join(problems))
        return dict(
            vocabulary_size=c.vocab_size,
            num_layers=c.num_hidden_layers,
            hidden_dim=c.hidden_size,
            intermediate_dim=c.intermediate_size,
            num_query_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            layer_norm_epsilon=c.rms_norm_eps,
            dropout=c.attention_dropout,
            max_sequence_length=c.max_position_embeddings,
            pretraining_sequence_length=c.original_max_position_embeddings,
            rope_max_wavelength=c.rope_theta,
            rope_scaling_type="su" if scaling else None,
            rope_scaling_short_factor=scaling.get("short_factor"),
            rope_scaling_long_factor=scaling.get("long_factor"),
        )

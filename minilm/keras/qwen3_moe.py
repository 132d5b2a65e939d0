"""keras-hub's Qwen3MoeBackbone: its constructor arguments mapped onto `Qwen3MoeConfig`."""

from __future__ import annotations

from ..errors import ConfigError
from ..models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeModel
from ..rope import rope_type
from .backbone import Backbone, build_weights, check_keras_kwargs
from .lora import KerasLoraSpec


class Qwen3MoeBackbone(Backbone):
    """keras-hub's Qwen3MoeBackbone arguments on top of Qwen3MoeModel."""

    LORA = KerasLoraSpec(
        "Qwen3-MoE",
        {
            "query": ("q_proj", "query"),
            "key": ("k_proj", "kv"),
            "value": ("v_proj", "kv"),
            "attention_output": ("o_proj", "output"),
        },
        "transformer_layer_{i}/self_attention/{name}",
        "layers.{i}.self_attn",
    )  # keras-hub's attention layer names -> minilm's modules (enable_lora)

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        intermediate_dim,
        moe_intermediate_dim,
        num_experts,
        head_dim=None,
        top_k=4,
        norm_top_k_prob=False,
        decoder_sparse_step=1,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        layer_norm_epsilon=1e-6,
        dropout=0,
        dtype=None,
        tie_word_embeddings=False,
        sliding_window_size=32768,
        router_aux_loss_coefficient=0.001,
        mlp_only_layers=None,
        params=None,
        **kwargs,
    ):
        hf_config = Qwen3MoeConfig(
            vocab_size=vocabulary_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            hidden_size=hidden_dim,
            intermediate_size=intermediate_dim,
            moe_intermediate_size=moe_intermediate_dim,
            num_experts=num_experts,
            head_dim=head_dim,
            num_experts_per_tok=top_k,
            norm_topk_prob=norm_top_k_prob,
            decoder_sparse_step=decoder_sparse_step,
            rope_theta=rope_max_wavelength,
            rope_scaling=None if rope_scaling_factor == 1.0 else {"rope_type": "linear", "factor": rope_scaling_factor},
            rms_norm_eps=layer_norm_epsilon,
            attention_dropout=dropout,
            tie_word_embeddings=tie_word_embeddings,
            use_sliding_window=sliding_window_size is not None,
            sliding_window=sliding_window_size,
            router_aux_loss_coef=router_aux_loss_coefficient,
            mlp_only_layers=mlp_only_layers,
        )
        check_keras_kwargs(type(self), kwargs)
        super().__init__(*build_weights(Qwen3MoeModel, hf_config, params, dtype))

    @staticmethod
    def keras_args(c):
        """keras-hub arguments for a Qwen3MoeConfig; ConfigError for what keras-hub cannot express."""
        scaling = c.rope_scaling or {}
        problems = []
        if scaling and rope_type(scaling) != "linear":
            problems.append(f"rope_scaling {scaling} (keras-hub: a linear rope_scaling_factor only)")
        if c.attention_bias:
            problems.append("attention_bias=True (keras-hub's attention has no biases)")
        if c.hidden_act != "silu":
            problems.append(f"hidden_act={c.hidden_act!r} (keras-hub: silu)")
        if problems:
            raise ConfigError("Qwen3MoeBackbone cannot express this Qwen3MoeConfig: " + "; ".join(problems))
        return dict(
            vocabulary_size=c.vocab_size,
            num_layers=c.num_hidden_layers,
            num_query_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            hidden_dim=c.hidden_size,
            intermediate_dim=c.intermediate_size,
            moe_intermediate_dim=c.moe_intermediate_size,
            num_experts=c.num_experts,
            head_dim=c.head_dim,
            top_k=c.num_experts_per_tok,
            norm_top_k_prob=c.norm_topk_prob,
            decoder_sparse_step=c.decoder_sparse_step,
            rope_max_wavelength=c.rope_theta,
            rope_scaling_factor=float(scaling.get("factor", 1.0)),
            layer_norm_epsilon=c.rms_norm_eps,
            dropout=c.attention_dropout,
            tie_word_embeddings=c.tie_word_embeddings,
            sliding_window_size=c.sliding_window if c.use_sliding_window else None,
            router_aux_loss_coefficient=c.router_aux_loss_coef,
            mlp_only_layers=list(c.mlp_only_layers),
        )

"""keras-hub itself as the oracle for minilm's keras-hub-style backbones (`minilm/keras/`).

For each family, tiny keras-hub backbones built from the constructor arguments of keras-hub's own
backbone tests (`keras_hub/src/models/<family>/<family>_backbone_test.py`) and a few variants that
matter, with seeded random weights moved away from their init, run on a small padded batch:

    tests/fixtures/keras/<name>/config.json        {"module": "minilm", "class_name", "config"}: what
                                                   `Backbone.save_to_preset` writes, so that
                                                   `minilm.Backbone.from_preset(folder)` loads it
    tests/fixtures/keras/<name>/model.safetensors  the keras weights under minilm's (Hugging Face)
                                                   tensor names, converted here (`*_to_hf` below)
    tests/fixtures/keras/<name>/reference.npz      token_ids, padding_mask, keras-hub's hidden
                                                   states ("hidden"), token_embedding(hidden,
                                                   reverse=True) ("logits"); embedding models also
                                                   "pooled_output"
    tests/fixtures/keras/<name>/reference.json     keras-hub's get_config() and count_params(), the
                                                   weight names, the versions, notes
    gemma3_vision*/ (Gemma3Backbone with a Gemma3VisionEncoder) also save the images, vision_mask and
    vision_indices, keras-hub's vision features ("vision_features", the tower before pooling) and the
    encoder's output ("image_embeddings"); their weights, inputs and layouts: see VISION_CASES below
    tests/fixtures/keras/<name>/lora_<case>.npz    after enable_lora(2, targets): trainable weights, count_params,
    tests/fixtures/keras/<name>/lora_<case>.json   and outputs with fixed non-zero LoRA kernels (`write_lora`)

Run it in the oracle's own virtual environment (never minilm's), from the repository root:

    python3 -m venv kvenv
    kvenv/bin/pip install torch==2.13.0        # the CPU wheel
    kvenv/bin/pip install keras numpy safetensors
    kvenv/bin/pip install --no-deps keras-hub  # its metadata pulls TensorFlow, not needed here
    kvenv/bin/pip install regex tokenizers     # what keras-hub imports at runtime
    kvenv/bin/python scripts/make_keras_fixtures.py            # every fixture, a few seconds
    kvenv/bin/python scripts/make_keras_fixtures.py --only bloom,phi3_su

The backend is torch on the CPU (set here, before keras is imported), one thread, fixed seeds: a
re-run gives byte-identical files (checked with `cmp` against a copy of the previous run).

keras-hub 0.32 behaviours the fixtures stay clear of (minilm follows transformers there):
    Qwen3-MoE applies sliding_window_size only in its non-fused attention path, which the torch and
    jax backends never take: qwen3_moe_sliding runs that path on purpose (see its reference.json).
    Qwen3-MoE's q/k norms and all of Gemma 3's decoder-block norms use epsilon 1e-6 whatever
    layer_norm_epsilon says (it reaches only the other norms): those fixtures keep 1e-6.
    Gemma 3's decoder block passes query_head_dim_normalize=True to its attention whatever the
    backbone's argument: the fixtures keep True.

Weight layout, keras -> Hugging Face (x @ kernel in keras, x @ weight.T in HF: every matrix is
transposed; keras' per-head kernels are flattened first):

    keras-hub                                  shape              HF name                   shape
    token_embedding.embeddings                 (vocab, hidden)    embed_tokens.weight       same
    token_embedding.reverse_embeddings         (hidden, vocab)    lm_head.weight            (vocab, hidden)
    attention query kernel "bqm,muh"           (hidden, heads, d) q_proj.weight             (heads*d, hidden)
    attention query kernel "btd,ndh" (Gemma)   (heads, hidden, d) q_proj.weight             (heads*d, hidden)
    attention output kernel                    (heads, d, hidden) o_proj.weight             (hidden, heads*d)
    Qwen3-MoE experts gate|up                  (E, hidden, 2*m)   experts.e.gate_proj / up_proj (m, hidden)
    BLOOM query/key/value kernels              (hidden, heads, d) query_key_value.weight    (heads*3*d, hidden):
                                                                  rows per head: q_h, k_h, v_h
    Phi-3 query, key, value / gate, up         ...                qkv_proj (q; k; v) / gate_up_proj (gate; up)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
from keras_hub.src.models.bloom.bloom_backbone import BloomBackbone  # noqa: E402
from keras_hub.src.models.gemma3.gemma3_backbone import Gemma3Backbone  # noqa: E402
from keras_hub.src.models.gemma3.gemma3_vision_encoder import Gemma3VisionEncoder  # noqa: E402
from keras_hub.src.models.phi3.phi3_backbone import Phi3Backbone  # noqa: E402
from keras_hub.src.models.qwen3_moe import qwen3_moe_attention  # noqa: E402
from keras_hub.src.models.qwen3_moe.qwen3_moe_backbone import Qwen3MoeBackbone  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "keras"
SEQ = 10  # tokens per row; row 0 full, row 1 left-padded by 3, row 2 right-padded by 2

# ----------------------------------------------------------------------------------------------
# The cases: keras-hub's own test arguments first, then the variants that matter
# ----------------------------------------------------------------------------------------------

# keras_hub/src/models/qwen3_moe/qwen3_moe_backbone_test.py (its count_params(): 7768)
QWEN3_MOE_TEST = dict(
    vocabulary_size=20,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    head_dim=2,
    moe_intermediate_dim=16,
    num_experts=4,
    top_k=2,
    norm_top_k_prob=True,
    decoder_sparse_step=1,
    layer_norm_epsilon=1e-6,
    rope_max_wavelength=10000,
    rope_scaling_factor=1.0,
    dropout=0.0,
    sliding_window_size=4096,
    router_aux_loss_coefficient=0.01,
    tie_word_embeddings=False,
    mlp_only_layers=[],
    dtype="float32",
)
# keras_hub/src/models/bloom/bloom_backbone_test.py
BLOOM_TEST = dict(vocabulary_size=10, num_layers=2, num_heads=4, hidden_dim=8, intermediate_dim=32)
# keras_hub/src/models/phi3/phi3_backbone_test.py: init_kwargs and su_rotary_init_kwargs
PHI3_TEST = dict(
    vocabulary_size=10, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=8, intermediate_dim=8
)
PHI3_SU_TEST = dict(
    vocabulary_size=10,
    num_layers=2,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=8,
    intermediate_dim=12,
    max_sequence_length=10,
    pretraining_sequence_length=5,
    rope_scaling_type="su",
    rope_scaling_short_factor=[1.2, 1.4],
    rope_scaling_long_factor=[0.8, 0.6],
)
# keras_hub/src/models/gemma3/gemma3_backbone_test.py: text_init_kwargs (its count_params(): 5752)
GEMMA3_TEST = dict(
    vocabulary_size=256,
    image_size=16,
    num_layers=6,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=8,
    intermediate_dim=16,
    head_dim=4,
    query_head_dim_normalize=True,
    use_query_key_norm=True,
    use_post_ffw_norm=True,
    use_post_attention_norm=True,
    final_logit_soft_cap=None,
    attention_logit_soft_cap=None,
    use_sliding_window_attention=True,
    sliding_window_size=1024,
)

CASES = {
    # name: (keras-hub class, constructor arguments, tokens per row, what it exercises)
    "qwen3_moe": (
        Qwen3MoeBackbone,
        QWEN3_MOE_TEST,
        SEQ,
        "keras-hub's test arguments: untied embeddings (reverse_embeddings), top-2 of 4 with "
        "norm_top_k_prob, GQA 4:2, head_dim 2",
    ),
    "qwen3_moe_tied": (
        Qwen3MoeBackbone,
        {**QWEN3_MOE_TEST, "tie_word_embeddings": True},
        SEQ,
        "the test arguments with tie_word_embeddings=True",
    ),
    "qwen3_moe_sparse_step": (
        Qwen3MoeBackbone,
        {
            **QWEN3_MOE_TEST,
            "num_layers": 4,
            "intermediate_dim": 16,
            "moe_intermediate_dim": 8,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [3],
            "top_k": 3,
            "norm_top_k_prob": False,
            "head_dim": 8,
            "rope_max_wavelength": 500,
            "rope_scaling_factor": 2.0,
        },
        SEQ,
        "decoder_sparse_step=2 and mlp_only_layers=[3] (layer 1 sparse, layers 0, 2, 3 dense), top-3 without "
        "renormalisation, head_dim 8 != 16/4, linear rope_scaling_factor 2, rope_max_wavelength 500, dense and "
        "expert widths 16 and 8",
    ),
    "qwen3_moe_sliding": (
        Qwen3MoeBackbone,
        {**QWEN3_MOE_TEST, "sliding_window_size": 3},
        SEQ,
        "sliding_window_size=3 < 10 tokens, through keras-hub's non-fused attention path (see notes)",
    ),
    "bloom": (BloomBackbone, BLOOM_TEST, SEQ, "keras-hub's test arguments (tied embeddings, as every keras-hub BLOOM)"),
    "bloom_6_heads": (
        BloomBackbone,
        {**BLOOM_TEST, "num_heads": 6, "hidden_dim": 12, "intermediate_dim": 48, "layer_norm_epsilon": 1e-4},
        SEQ,
        "ALiBi with 6 heads (not a power of two), layer_norm_epsilon 1e-4",
    ),
    "phi3": (Phi3Backbone, PHI3_TEST, SEQ, "keras-hub's test arguments (untied embeddings, as every keras-hub Phi-3)"),
    "phi3_su": (
        Phi3Backbone,
        PHI3_SU_TEST,
        5,
        "keras-hub's su_rotary test arguments at 5 tokens = pretraining_sequence_length: short factors",
    ),
    "phi3_su_long": (
        Phi3Backbone,
        PHI3_SU_TEST,
        9,
        "the su_rotary arguments at 9 tokens > pretraining_sequence_length 5: long factors",
    ),
    "gemma3": (
        Gemma3Backbone,
        GEMMA3_TEST,
        SEQ,
        "keras-hub's text_init_kwargs: post norms on, QK-norm, 6 layers (5 local + 1 global)",
    ),
    "gemma3_sliding_caps": (
        Gemma3Backbone,
        {
            **GEMMA3_TEST,
            "num_layers": 7,
            "sliding_window_size": 4,
            "attention_logit_soft_cap": 1.0,
            "final_logit_soft_cap": 2.0,
            "global_rope_scaling_factor": 8.0,
        },
        SEQ,
        "sliding window 4 < 10 tokens on layers 0-4 and 6, global layer 5 with linear RoPE scaling 8, attention "
        "and final logit soft caps that bite",
    ),
    "gemma3_defaults": (
        Gemma3Backbone,
        {
            k: v
            for k, v in GEMMA3_TEST.items()
            if k
            not in (
                "use_post_ffw_norm",
                "use_post_attention_norm",
                "use_sliding_window_attention",
                "sliding_window_size",
                "query_head_dim_normalize",
                "use_query_key_norm",
                "final_logit_soft_cap",
                "attention_logit_soft_cap",
            )
        }
        | {"head_dim": 6, "num_layers": 2},
        SEQ,
        "keras-hub's defaults: no post norms, no sliding window (every layer global, RoPE base 1e6), head_dim 6 != 8/2",
    ),
    "gemma3_embedding": (
        Gemma3Backbone,
        {**GEMMA3_TEST, "is_embedding_model": True, "pooling_intermediate_dim": 32, "embedding_dim": 16},
        SEQ,
        "keras-hub's test_embedding_model arguments: mean pooling over the padding mask, two projections "
        "(pooling_dense_1, embedding_projection), unit normalisation -> pooled_output",
    ),
}

NOTES = {
    "padding": "padding_mask 0 marks padding; row 1 is left-padded, row 2 right-padded. keras-hub passes no "
    "position ids: RoPE positions are 0..seq-1 in every row, padding included (minilm's backbone "
    "does the same). Outputs at padding positions are meaningless: compare where padding_mask == 1.",
    "logits": "logits = backbone.token_embedding(hidden, reverse=True): hidden @ embeddings.T when tied, "
    "hidden @ reverse_embeddings when untied (saved as lm_head.weight = reverse_embeddings.T), "
    "soft-capped when final_logit_soft_cap is set.",
    "weights": "every weight is keras' seeded init plus noise (vectors: N(0, 0.2); embedding tables: "
    "N(0, 1/sqrt(hidden_dim)); other matrices: N(0, std of the init matrix)), so no norm is at its init "
    "and no bias is zero.",
}
QWEN3_MOE_SLIDING_NOTE = (
    "keras-hub 0.32's Qwen3MoeAttention applies sliding_window_size only in its non-fused attention path; "
    "fused_attention_op_available() is True on the torch and jax backends, so there keras-hub ignores the window. "
    "This fixture runs the non-fused path (the patched check returns False while it is built and run), which "
    "applies the window as transformers does: query q sees keys q-w+1..q."
)

# ----------------------------------------------------------------------------------------------
# Weights: seeded noise on keras' init, then keras names -> Hugging Face names
# ----------------------------------------------------------------------------------------------


def perturb(backbone, seed):
    """Move every weight away from its init: vectors (norms, biases) by N(0, 0.2), the embedding tables by
    N(0, 1 / sqrt(hidden_dim)) (logits of order one, not 0.01), other matrices by N(0, their init's std)."""
    rng = np.random.default_rng(seed)
    hidden_dim = backbone.token_embedding.output_dim
    for variable in backbone.weights:
        value = np.asarray(variable.numpy(), dtype=np.float32)
        if variable.path.startswith("token_embedding/"):  # embeddings, reverse_embeddings
            scale = hidden_dim**-0.5
        else:
            scale = 0.2 if value.ndim == 1 else max(float(value.std()), 1e-3)
        variable.assign((value + rng.normal(0.0, scale, value.shape)).astype(np.float32))


def t(variable):
    """A keras variable as a float32 NumPy array."""
    return np.ascontiguousarray(np.asarray(variable.numpy(), dtype=np.float32))


def dense(kernel):
    """keras kernel (in, ..., out) with the input axis first -> HF weight (out, in)."""
    k = t(kernel)
    return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)


def heads_out(kernel):
    """keras attention-output kernel (heads, head_dim, hidden) -> HF o_proj (hidden, heads * head_dim)."""
    k = t(kernel)
    return np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T)


def token_embedding_to_hf(backbone):
    emb = backbone.token_embedding
    tensors = {"embed_tokens.weight": t(emb.embeddings)}
    if not emb.tie_weights:
        tensors["lm_head.weight"] = np.ascontiguousarray(t(emb.reverse_embeddings).T)  # (vocab, hidden)
    return tensors


def qwen3_moe_to_hf(backbone):
    tensors = token_embedding_to_hf(backbone)
    for i, layer in enumerate(backbone.transformer_layers):
        p, attn = f"layers.{i}.", layer._self_attention_layer
        tensors |= {
            p + "input_layernorm.weight": t(layer._self_attention_layernorm.scale),
            p + "self_attn.q_proj.weight": dense(attn._query_dense.kernel),
            p + "self_attn.k_proj.weight": dense(attn._key_dense.kernel),
            p + "self_attn.v_proj.weight": dense(attn._value_dense.kernel),
            p + "self_attn.o_proj.weight": heads_out(attn._output_dense.kernel),
            p + "self_attn.q_norm.weight": t(attn._query_dense_layer_norm.scale),
            p + "self_attn.k_norm.weight": t(attn._key_dense_layer_norm.scale),
            p + "post_attention_layernorm.weight": t(layer._feedforward_layernorm.scale),
        }
        if layer.is_sparse_mlp:
            tensors[p + "mlp.gate.weight"] = dense(layer.mlp._sparse_feedforward_gate_dense.kernel)
            gate_up = t(layer.mlp.expert_bank._expert_feedforward_gate_dense)  # (E, hidden, 2 * m): gate | up
            down = t(layer.mlp.expert_bank._expert_feedforward_output_dense)  # (E, m, hidden)
            m = down.shape[1]
            for e in range(gate_up.shape[0]):
                tensors[p + f"mlp.experts.{e}.gate_proj.weight"] = np.ascontiguousarray(gate_up[e, :, :m].T)
                tensors[p + f"mlp.experts.{e}.up_proj.weight"] = np.ascontiguousarray(gate_up[e, :, m:].T)
                tensors[p + f"mlp.experts.{e}.down_proj.weight"] = np.ascontiguousarray(down[e].T)
        else:
            tensors |= {
                p + "mlp.gate_proj.weight": dense(layer.mlp._feedforward_gate_dense.kernel),
                p + "mlp.up_proj.weight": dense(layer.mlp._feedforward_intermediate_dense.kernel),
                p + "mlp.down_proj.weight": dense(layer.mlp._feedforward_output_dense.kernel),
            }
    tensors["norm.weight"] = t(backbone.layer_norm.scale)
    return tensors


def layer_norm(prefix, norm):
    return {prefix + ".weight": t(norm.gamma), prefix + ".bias": t(norm.beta)}


def bloom_to_hf(backbone):
    tensors = {"word_embeddings.weight": t(backbone.token_embedding.embeddings)}
    tensors |= layer_norm("word_embeddings_layernorm", backbone.embeddings_layer_norm)
    for i, layer in enumerate(backbone.transformer_layers):
        p, attn = f"h.{i}.", layer._self_attention_layer
        qkv = [attn._query_dense, attn._key_dense, attn._value_dense]
        kernel = np.stack([t(d.kernel) for d in qkv], axis=2)  # (hidden, heads, 3, head_dim)
        bias = np.stack([t(d.bias) for d in qkv], axis=1)  # (heads, 3, head_dim)
        tensors |= layer_norm(p + "input_layernorm", layer._pre_attention_layernorm)
        tensors |= {
            p + "self_attention.query_key_value.weight": np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T),
            p + "self_attention.query_key_value.bias": bias.reshape(-1),
            p + "self_attention.dense.weight": dense(attn._output_dense.kernel),
            p + "self_attention.dense.bias": t(attn._output_dense.bias),
            p + "mlp.dense_h_to_4h.weight": dense(layer._mlp_intermediate_dense.kernel),
            p + "mlp.dense_h_to_4h.bias": t(layer._mlp_intermediate_dense.bias),
            p + "mlp.dense_4h_to_h.weight": dense(layer._mlp_output_dense.kernel),
            p + "mlp.dense_4h_to_h.bias": t(layer._mlp_output_dense.bias),
        }
        tensors |= layer_norm(p + "post_attention_layernorm", layer._post_attention_layernorm)
    tensors |= layer_norm("ln_f", backbone.layer_norm)
    return tensors


def phi3_to_hf(backbone):
    tensors = token_embedding_to_hf(backbone)
    for i, layer in enumerate(backbone.transformer_layers):
        p, attn = f"layers.{i}.", layer.attention
        qkv = [dense(attn.query_dense.kernel), dense(attn.key_dense.kernel), dense(attn.value_dense.kernel)]
        gate_up = [dense(layer.feedforward_gate_dense.kernel), dense(layer.feedforward_intermediate_dense.kernel)]
        tensors |= {
            p + "input_layernorm.weight": t(layer.pre_attention_layernorm.scale),
            p + "self_attn.qkv_proj.weight": np.concatenate(qkv, axis=0),
            p + "self_attn.o_proj.weight": heads_out(attn.output_dense.kernel),
            p + "post_attention_layernorm.weight": t(layer.post_attention_layernorm.scale),
            p + "mlp.gate_up_proj.weight": np.concatenate(gate_up, axis=0),
            p + "mlp.down_proj.weight": dense(layer.feedforward_output_dense.kernel),
        }
    tensors["norm.weight"] = t(backbone.layer_norm.scale)
    return tensors


def gemma_heads_in(kernel):
    """Gemma's "btd,ndh" kernel (heads, hidden, head_dim) -> HF (heads * head_dim, hidden)."""
    k = t(kernel)
    return np.ascontiguousarray(k.transpose(0, 2, 1).reshape(-1, k.shape[1]))


def gemma3_to_hf(backbone):
    tensors = token_embedding_to_hf(backbone)
    for i, layer in enumerate(backbone.transformer_layers):
        p, attn = f"layers.{i}.", layer.attention
        tensors |= {
            p + "input_layernorm.weight": t(layer.pre_attention_norm.scale),
            p + "self_attn.q_proj.weight": gemma_heads_in(attn.query_dense.kernel),
            p + "self_attn.k_proj.weight": gemma_heads_in(attn.key_dense.kernel),
            p + "self_attn.v_proj.weight": gemma_heads_in(attn.value_dense.kernel),
            p + "self_attn.o_proj.weight": heads_out(attn.output_dense.kernel),
            p + "pre_feedforward_layernorm.weight": t(layer.pre_ffw_norm.scale),
            p + "mlp.gate_proj.weight": dense(layer.gating_ffw.kernel),
            p + "mlp.up_proj.weight": dense(layer.gating_ffw_2.kernel),
            p + "mlp.down_proj.weight": dense(layer.ffw_linear.kernel),
        }
        if layer.use_query_key_norm:
            tensors[p + "self_attn.q_norm.weight"] = t(attn.query_norm.scale)
            tensors[p + "self_attn.k_norm.weight"] = t(attn.key_norm.scale)
        if layer.use_post_attention_norm:
            tensors[p + "post_attention_layernorm.weight"] = t(layer.post_attention_norm.scale)
        if layer.use_post_ffw_norm:
            tensors[p + "post_feedforward_layernorm.weight"] = t(layer.post_ffw_norm.scale)
    tensors["norm.weight"] = t(backbone.layer_norm.scale)
    if backbone.is_embedding_model:  # EmbeddingGemma's head: sentence-transformers' 2_Dense and 3_Dense
        tensors["pooling_dense_1.weight"] = dense(backbone.get_layer("pooling_dense_1").kernel)
        tensors["embedding_projection.weight"] = dense(backbone.get_layer("embedding_projection").kernel)
    return tensors


TO_HF = {
    Qwen3MoeBackbone: qwen3_moe_to_hf,
    BloomBackbone: bloom_to_hf,
    Phi3Backbone: phi3_to_hf,
    Gemma3Backbone: gemma3_to_hf,
}

# ----------------------------------------------------------------------------------------------
# Inputs, the run, saving
# ----------------------------------------------------------------------------------------------


def make_inputs(vocabulary_size, seq, seed):
    """(3, seq) ids in [1, vocab) and the padding mask: row 0 full, row 1 left-padded, row 2 right-padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocabulary_size, size=(3, seq)).astype(np.int32)
    mask = np.ones((3, seq), np.int32)
    mask[1, : max(seq // 3, 1)] = 0
    mask[2, seq - max(seq // 5, 1) :] = 0
    return ids * mask, mask


def minilm_config(keras_config):
    """keras-hub's get_config() as minilm's preset config: keras' own keys (name, trainable) dropped, the dtype
    policy as its name (minilm's `dtype` argument is a dtype name)."""
    config = {k: v for k, v in keras_config.items() if k not in ("name", "trainable")}
    config["dtype"] = keras_config["dtype"]["config"]["name"]
    return config


def dump_json(obj, path):
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def build(name, seed):
    cls, kwargs, seq, description = CASES[name]
    keras.backend.clear_session()  # layer-name counters start afresh: the same names with or without --only
    keras.utils.set_random_seed(seed)
    backbone = cls(**kwargs)
    perturb(backbone, seed)
    ids, mask = make_inputs(kwargs["vocabulary_size"], seq, seed + 1)
    out = backbone({"token_ids": ids, "padding_mask": mask})
    arrays = {"token_ids": ids.astype(np.int64), "padding_mask": mask.astype(np.int64)}
    if isinstance(out, dict):  # Gemma3Backbone(is_embedding_model=True)
        hidden = out["sequence_output"]
        arrays["pooled_output"] = np.asarray(out["pooled_output"].detach().cpu().numpy(), np.float32)
    else:
        hidden = out
    logits = backbone.token_embedding(hidden, reverse=True)
    arrays["hidden"] = np.asarray(hidden.detach().cpu().numpy(), np.float32)
    arrays["logits"] = np.asarray(logits.detach().cpu().numpy(), np.float32)
    meta = {
        "fixture": name,
        "description": description,
        "keras_hub_class": cls.__name__,
        "init_kwargs": kwargs,
        "get_config": backbone.get_config(),
        "count_params": int(backbone.count_params()),
        "versions": {
            "keras_hub": keras_hub.__version__,
            "keras": keras.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
            "keras_backend": keras.config.backend(),
        },
        "seed": seed,
        "notes": dict(NOTES),
        "effects": effects(backbone, ids, mask, arrays),
    }
    return backbone, arrays, meta


def effects(backbone, ids, mask, arrays):
    """How much the features a fixture is about change its outputs (so that a fixture whose soft cap
    never bites, or whose window hides nothing, is seen): max |with - without| over real tokens."""
    keep = mask.astype(bool)
    found = {}
    cap = getattr(backbone.token_embedding, "logit_soft_cap", None)
    if cap is not None:
        backbone.token_embedding.logit_soft_cap = None
        raw = backbone.token_embedding(backbone({"token_ids": ids, "padding_mask": mask}), reverse=True)
        backbone.token_embedding.logit_soft_cap = cap
        found["final_logit_soft_cap"] = float(np.abs(raw.detach().cpu().numpy() - arrays["logits"])[keep].max())
    attention_caps = [
        layer.attention
        for layer in getattr(backbone, "transformer_layers", [])
        if getattr(getattr(layer, "attention", None), "logit_soft_cap", None) is not None
    ]
    if attention_caps:
        saved = [a.logit_soft_cap for a in attention_caps]
        for a in attention_caps:
            a.logit_soft_cap = None
        hidden = backbone({"token_ids": ids, "padding_mask": mask})
        for a, c in zip(attention_caps, saved, strict=True):
            a.logit_soft_cap = c
        found["attention_logit_soft_cap"] = float(np.abs(hidden.detach().cpu().numpy() - arrays["hidden"])[keep].max())
    if isinstance(backbone, Gemma3Backbone):
        sliding = [
            layer.attention for layer in backbone.transformer_layers if layer.attention.use_sliding_window_attention
        ]
        if sliding:
            for a in sliding:
                a.use_sliding_window_attention = False
            hidden = backbone({"token_ids": ids, "padding_mask": mask})
            hidden = hidden["sequence_output"] if isinstance(hidden, dict) else hidden
            for a in sliding:
                a.use_sliding_window_attention = True
            found["sliding_window"] = float(np.abs(hidden.detach().cpu().numpy() - arrays["hidden"])[keep].max())
    return found


def write(name, seed):
    cls, kwargs, _, _ = CASES[name]
    patched = name == "qwen3_moe_sliding"
    original = qwen3_moe_attention.fused_attention_op_available
    if patched:
        qwen3_moe_attention.fused_attention_op_available = lambda: False
    try:
        backbone, arrays, meta = build(name, seed)
        if patched:
            meta["notes"]["sliding_window"] = QWEN3_MOE_SLIDING_NOTE
            qwen3_moe_attention.fused_attention_op_available = original
            fused = backbone({"token_ids": arrays["token_ids"], "padding_mask": arrays["padding_mask"]})
            keep = arrays["padding_mask"].astype(bool)
            meta["effects"]["sliding_window"] = float(
                np.abs(fused.detach().cpu().numpy() - arrays["hidden"])[keep].max()
            )  # fused path: no window
    finally:
        qwen3_moe_attention.fused_attention_op_available = original
    tensors = TO_HF[cls](backbone)
    meta["weights"] = {k: list(v.shape) for k, v in sorted(tensors.items())}
    meta["num_weights_saved"] = int(sum(v.size for v in tensors.values()))
    if meta["num_weights_saved"] != meta["count_params"]:
        raise SystemExit(f"{name}: converted {meta['num_weights_saved']} weights, keras counts {meta['count_params']}")
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = {"module": "minilm", "class_name": cls.__name__, "config": minilm_config(meta["get_config"])}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: tensors[k] for k in sorted(tensors)}, str(folder / "model.safetensors"))
    np.savez_compressed(folder / "reference.npz", **arrays)  # zip entries dated 1980-01-01: reproducible
    dump_json(meta, folder / "reference.json")
    return meta


# ----------------------------------------------------------------------------------------------
# Gemma 3 with its vision encoder (images + text): keras-hub's own vision test, and a padded variant
# ----------------------------------------------------------------------------------------------
#
# keras_hub/src/models/gemma3/gemma3_backbone_test.py (setUp, "text_and_vision"): the text arguments
# above plus this Gemma3VisionEncoder; 16x16 images cut into 4x4 patches (16 patches, pooled 2x2 ->
# 4 soft tokens per image), 3 image slots per prompt, 2 rows of 64 tokens. Its count_params(): 7560
# (text 5752 + vision 1808).
#
# Weight layout, keras-hub's vision encoder -> Hugging Face (transformers' SiglipVisionModel and
# Gemma3MultiModalProjector names; V = vision hidden_dim, p = patch_size, m = intermediate_dim):
#
#   image_encoder/encoder_embeddings/embedding_conv/kernel   (p, p, 3, V)  channels last, HWIO
#       -> vision_tower.vision_model.embeddings.patch_embedding.weight     (V, 3, p, p)  OIHW: transpose(3, 2, 0, 1)
#   .../embedding_conv/bias (V,) -> ...patch_embedding.bias
#   .../position_embedding/embeddings (patches, V) -> ...embeddings.position_embedding.weight   same
#   encoder_block_i/layer_norm_1/{gamma,beta} -> encoder.layers.i.layer_norm1.{weight,bias}   (LayerNorm, not RMSNorm)
#   encoder_block_i/multi_head_attention/{query,key,value,out}_proj/kernel (V, V)
#       -> encoder.layers.i.self_attn.{q,k,v,out}_proj.weight (V, V): transposed; unfused, each with a bias;
#          heads are contiguous blocks of head_dim = V // num_heads columns (as in HF's rows)
#   encoder_block_i/layer_norm_2 -> layer_norm2;  mlp_dense_1 (V, m) -> mlp.fc1 (m, V);  mlp_dense_2 -> mlp.fc2
#   image_encoder/encoder_layer_norm -> vision_tower.vision_model.post_layernorm
#   vision_output_encoder/vision_soft_embedding_norm/scale (V,) -> multi_modal_projector.mm_soft_emb_norm.weight
#       Gemma's RMSNorm: x / rms(x) * (1 + scale), the stored value is the offset from one in both
#   vision_output_encoder/vision_input_projection/kernel (V, hidden_dim)
#       -> multi_modal_projector.mm_input_projection_weight (V, hidden_dim): the same array (x @ W in both)
#
# Images: keras-hub takes (batch, images_per_prompt, H, W, 3) channels last; transformers' pixel_values are
# (batch * images_per_prompt, 3, H, W). Patches are numbered row by row in both (conv output (H/p, W/p, V)
# flattened), and both pool with a pool_size x pool_size average over that grid (keras' AveragePooling2D,
# torch's AvgPool2d), so soft token t of an image is the same vector in both.
#
# vision_indices (batch, images_per_prompt * tokens_per_image): where each soft token goes in the row, image
# by image; a row with fewer images pads with index 0, whose text embedding keras-hub puts back afterwards
# (so a sequence never starts with an image token). vision_mask (batch, seq): 1 at the image tokens; every
# contiguous run of 1s attends bidirectionally (two images side by side form one run, as in transformers'
# token_type_ids groups).

GEMMA3_VISION_ENCODER_TEST = dict(
    image_size=16, patch_size=4, pool_size=2, num_layers=2, num_heads=2, hidden_dim=8, intermediate_dim=16, output_dim=8
)
VISION_SEQ = 64


def vision_test_inputs(rng):
    """keras-hub's test inputs: row 0 has images at 20..27 (two, side by side) and 60..63, row 1 at 16..23
    and 60..63; no padding. (keras-hub's test draws token ids with np.random.rand, which truncate to id 0;
    here they are random ids in [1, vocab).)"""
    ids = rng.integers(1, 256, size=(2, VISION_SEQ)).astype(np.int32)
    vision_mask = np.zeros((2, VISION_SEQ), np.int32)
    vision_mask[0, 20:28] = vision_mask[0, 60:64] = 1
    vision_mask[1, 16:24] = vision_mask[1, 60:64] = 1
    vision_indices = np.array([list(range(20, 28)) + list(range(60, 64)), list(range(16, 24)) + list(range(60, 64))])
    padding_mask = np.ones((2, VISION_SEQ), np.int32)
    images = rng.random((2, 3, 16, 16, 3)).astype(np.float32)
    return ids, padding_mask, images, vision_mask, vision_indices


def vision_padded_inputs(rng):
    """Three rows, 3 image slots each: row 0 three images (positions 4..7, 12..15, 30..33), row 1 left-padded by
    6 with one image (10..13; its other slots index 0, images of zeros), row 2 right-padded by 8, no image at
    all (every index 0)."""
    seq = 40
    ids = rng.integers(1, 256, size=(3, seq)).astype(np.int32)
    padding_mask = np.ones((3, seq), np.int32)
    padding_mask[1, :6] = 0
    padding_mask[2, seq - 8 :] = 0
    vision_indices = np.zeros((3, 12), np.int64)
    vision_indices[0] = list(range(4, 8)) + list(range(12, 16)) + list(range(30, 34))
    vision_indices[1, :4] = range(10, 14)
    vision_mask = np.zeros((3, seq), np.int32)
    for row, count in ((0, 12), (1, 4)):
        vision_mask[row, vision_indices[row, :count]] = 1
    images = rng.random((3, 3, 16, 16, 3)).astype(np.float32)
    images[1, 1:] = 0.0
    images[2] = 0.0
    return ids * padding_mask, padding_mask, images, vision_mask, vision_indices


VISION_CASES = {
    # name: (text arguments, vision encoder arguments, inputs, what it exercises)
    "gemma3_vision": (
        GEMMA3_TEST,
        GEMMA3_VISION_ENCODER_TEST,
        vision_test_inputs,
        "keras-hub's vision test: Gemma3VisionEncoder(16x16 images, 4x4 patches, pool 2 -> 4 tokens) in the text "
        "test's backbone; 3 images per row, two of them side by side",
    ),
    "gemma3_vision_padded": (
        GEMMA3_TEST,
        GEMMA3_VISION_ENCODER_TEST,
        vision_padded_inputs,
        "the same model on padded rows: three images, one image with two empty slots and left padding, no image "
        "with right padding (vision_indices padded with 0)",
    ),
}
VISION_NOTES = {
    "images": "images (batch, images_per_prompt, H, W, 3) in [0, 1), channels last; pixel_values for transformers "
    "are images.reshape(-1, H, W, 3).transpose(0, 3, 1, 2). Empty image slots hold zeros and index 0.",
    "layer_norm_epsilon": "keras-hub 0.32's Gemma3VisionEncoder passes layer_norm_epsilon only to the soft-embedding "
    "RMSNorm: its encoder LayerNorms and post LayerNorm always use 1e-6 (transformers: vision_config.layer_norm_eps "
    "everywhere). The fixtures keep 1e-6.",
    "weights": "as the text fixtures; the vision input projection is perturbed by N(0, 1/sqrt(vision hidden_dim)) "
    "(its init N(0, 0.01) would make the soft tokens 100 times smaller than the text embeddings and images barely "
    "matter).",
}


def gemma3_vision_to_hf(vision_encoder):
    """keras-hub's Gemma3VisionEncoder weights -> transformers' names (the table above)."""
    encoder = vision_encoder.get_layer("image_encoder")
    output = vision_encoder.get_layer("vision_output_encoder")
    v = "vision_tower.vision_model."
    conv = encoder.vision_embeddings.patch_embedding
    tensors = {
        v + "embeddings.patch_embedding.weight": np.ascontiguousarray(t(conv.kernel).transpose(3, 2, 0, 1)),
        v + "embeddings.patch_embedding.bias": t(conv.bias),
        v + "embeddings.position_embedding.weight": t(encoder.vision_embeddings.position_embedding.embeddings),
    }
    for i, block in enumerate(encoder.resblocks):
        p, attn = f"{v}encoder.layers.{i}.", block.attn
        tensors |= layer_norm(p + "layer_norm1", block.layer_norm_1)
        for hf, dense_layer in (("q", attn.query_proj), ("k", attn.key_proj), ("v", attn.value_proj)):
            tensors[p + f"self_attn.{hf}_proj.weight"] = dense(dense_layer.kernel)
            tensors[p + f"self_attn.{hf}_proj.bias"] = t(dense_layer.bias)
        tensors |= {
            p + "self_attn.out_proj.weight": dense(attn.out_proj.kernel),
            p + "self_attn.out_proj.bias": t(attn.out_proj.bias),
            p + "mlp.fc1.weight": dense(block.mlp_dense_1.kernel),
            p + "mlp.fc1.bias": t(block.mlp_dense_1.bias),
            p + "mlp.fc2.weight": dense(block.mlp_dense_2.kernel),
            p + "mlp.fc2.bias": t(block.mlp_dense_2.bias),
        }
        tensors |= layer_norm(p + "layer_norm2", block.layer_norm_2)
    tensors |= layer_norm(v + "post_layernorm", encoder.encoder_layer_norm)
    tensors["multi_modal_projector.mm_soft_emb_norm.weight"] = t(output.vision_soft_embedding_norm.scale)
    tensors["multi_modal_projector.mm_input_projection_weight"] = t(output.vision_input_projection.kernel)
    return tensors


def minilm_vision_config(keras_config):
    """keras-hub's get_config() with a vision encoder, as minilm's preset config: the vision encoder's own
    serialised config reduced the same way ({"class_name": "Gemma3VisionEncoder", "config": {...}})."""
    config = minilm_config(keras_config)
    encoder = keras_config["vision_encoder"]
    config["vision_encoder"] = {"class_name": encoder["class_name"], "config": minilm_config(encoder["config"])}
    return config


def build_vision(name, seed):
    text_kwargs, vision_kwargs, make, description = VISION_CASES[name]
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    vision_encoder = Gemma3VisionEncoder(**vision_kwargs)
    backbone = Gemma3Backbone(**text_kwargs, vision_encoder=vision_encoder)
    perturb(backbone, seed)
    projection = vision_encoder.get_layer("vision_output_encoder").vision_input_projection.kernel
    rng = np.random.default_rng(seed)
    projection.assign(
        (t(projection) + rng.normal(0.0, vision_kwargs["hidden_dim"] ** -0.5, projection.shape)).astype(np.float32)
    )
    ids, mask, images, vision_mask, vision_indices = make(np.random.default_rng(seed + 1))
    inputs = {
        "token_ids": ids,
        "padding_mask": mask,
        "images": images,
        "vision_mask": vision_mask,
        "vision_indices": vision_indices.astype(np.int32),
    }
    hidden = backbone(inputs)
    logits = backbone.token_embedding(hidden, reverse=True)
    flat_images = images.reshape((-1,) + images.shape[2:])[:, None]  # (batch * images, 1, H, W, 3)
    features = vision_encoder.get_layer("image_encoder")(flat_images)  # (batch * images, patches, V)
    image_embeddings = vision_encoder(images)  # (batch * images, tokens per image, hidden_dim)

    def numpy(x):
        return np.asarray(x.detach().cpu().numpy(), np.float32)

    arrays = {
        "token_ids": ids.astype(np.int64),
        "padding_mask": mask.astype(np.int64),
        "images": images,
        "vision_mask": vision_mask.astype(np.int64),
        "vision_indices": vision_indices.astype(np.int64),
        "vision_features": numpy(features),
        "image_embeddings": numpy(image_embeddings),
        "hidden": numpy(hidden),
        "logits": numpy(logits),
    }
    keep = mask.astype(bool)
    without_mask = backbone({**inputs, "vision_mask": np.zeros_like(vision_mask)})  # every image token causal
    blank = backbone({**inputs, "images": np.zeros_like(images)})
    meta = {
        "fixture": name,
        "description": description,
        "keras_hub_class": "Gemma3Backbone",
        "init_kwargs": {**text_kwargs, "vision_encoder": {"Gemma3VisionEncoder": vision_kwargs}},
        "get_config": backbone.get_config(),
        "count_params": int(backbone.count_params()),
        "vision_encoder_count_params": int(vision_encoder.count_params()),
        "num_vision_tokens_per_image": int(vision_encoder.num_vision_tokens_per_image),
        "versions": {
            "keras_hub": keras_hub.__version__,
            "keras": keras.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
            "keras_backend": keras.config.backend(),
        },
        "seed": seed,
        "notes": {**NOTES, **VISION_NOTES},
        "effects": {
            "bidirectional_image_attention": float(np.abs(numpy(without_mask) - arrays["hidden"])[keep].max()),
            "images": float(np.abs(numpy(blank) - arrays["hidden"])[keep].max()),
        },
    }
    tensors = gemma3_to_hf(backbone) | gemma3_vision_to_hf(vision_encoder)
    return meta, arrays, tensors


def write_vision(name, seed):
    meta, arrays, tensors = build_vision(name, seed)
    meta["weights"] = {k: list(v.shape) for k, v in sorted(tensors.items())}
    meta["num_weights_saved"] = int(sum(v.size for v in tensors.values()))
    if meta["num_weights_saved"] != meta["count_params"]:
        raise SystemExit(f"{name}: converted {meta['num_weights_saved']} weights, keras counts {meta['count_params']}")
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = {"module": "minilm", "class_name": "Gemma3Backbone", "config": minilm_vision_config(meta["get_config"])}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: tensors[k] for k in sorted(tensors)}, str(folder / "model.safetensors"))
    np.savez_compressed(folder / "reference.npz", **arrays)
    dump_json(meta, folder / "reference.json")
    return meta


# ----------------------------------------------------------------------------------------------
# LoRA: keras-hub's Backbone.enable_lora(rank, target_layer_names) on the same backbones
# ----------------------------------------------------------------------------------------------

LORA_RANK = 2
LORA_CASES = {
    # file stem in tests/fixtures/keras/<fixture>/: (fixture, target_layer_names or None for the defaults)
    "qwen3_moe": ("qwen3_moe", None),
    "bloom": ("bloom", None),
    "phi3": ("phi3", None),
    "gemma3": ("gemma3", None),
    "gemma3_all_attention": ("gemma3", ["query", "key", "value", "attention_output"]),
}


def write_lora(case, seed):
    """tests/fixtures/keras/<fixture>/lora_<case>.npz / .json: after `enable_lora(LORA_RANK, targets)`,
    keras-hub's trainable weights (paths, shapes, in order), count_params(), the init of the LoRA kernels;
    then with every LoRA kernel set to seeded N(0, 0.3) values (saved under its path), the hidden
    states and logits on the fixture's batch."""
    name, targets = LORA_CASES[case]
    backbone, arrays, meta = build(name, seed)  # the same weights as tests/fixtures/keras/<name>/
    count_before = int(backbone.count_params())
    backbone.enable_lora(LORA_RANK, target_layer_names=targets)
    trainable = [(w.path, list(w.shape)) for w in backbone.trainable_weights]
    kernels = [w for w in backbone.trainable_weights if w.name.startswith("lora_kernel")]
    init = {
        "lora_kernel_b_all_zero": all(float(np.abs(t(w)).max()) == 0 for w in kernels if w.name == "lora_kernel_b"),
        "lora_kernel_a_max_abs": {w.path: float(np.abs(t(w)).max()) for w in kernels if w.name == "lora_kernel_a"},
        "rule": "he_uniform: U(-limit, limit), limit = sqrt(6 / fan_in), fan_in = shape[-2] * prod(shape[:-2])",
    }
    rng = np.random.default_rng(seed + 7)
    out = {"token_ids": arrays["token_ids"], "padding_mask": arrays["padding_mask"]}
    for w in kernels:
        w.assign(rng.normal(0.0, 0.3, tuple(w.shape)).astype(np.float32))
        out["weight:" + w.path] = t(w)
    hidden = backbone({"token_ids": arrays["token_ids"], "padding_mask": arrays["padding_mask"]})
    out["hidden"] = np.asarray(hidden.detach().cpu().numpy(), np.float32)
    out["logits"] = np.asarray(backbone.token_embedding(hidden, reverse=True).detach().cpu().numpy(), np.float32)
    folder = OUT / name
    np.savez_compressed(folder / f"lora_{case}.npz", **out)
    lora_meta = {
        "fixture": name,
        "rank": LORA_RANK,
        "target_layer_names": targets,
        "default_lora_layer_names": backbone.default_lora_layer_names(),
        "count_params_before": count_before,
        "count_params": int(backbone.count_params()),
        "trainable_weights": trainable,
        "num_trainable_weights": len(trainable),
        "num_trainable_params": int(sum(np.prod(shape) for _, shape in trainable)),
        "num_non_trainable_weights": len(backbone.non_trainable_weights),
        "init": init,
        "notes": "keras-hub freezes every layer, then sets each targeted layer trainable and calls "
        "EinsumDense.enable_lora(rank): lora_alpha = rank (scaling 1), the kernel frozen, a bias trainable. "
        "hidden / logits: with the LoRA kernels set to the saved values (weight:<path>).",
        "versions": meta["versions"],
    }
    dump_json(lora_meta, folder / f"lora_{case}.json")
    return lora_meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated fixture names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the fixture names and what they exercise")
    args = parser.parse_args(argv)
    if args.list:
        for name, (_, _, _, description) in (CASES | VISION_CASES).items():
            print(f"{name:24s} {description}")
        return
    names = args.only.split(",") if args.only else list(CASES) + list(VISION_CASES)
    unknown = sorted(set(names) - set(CASES) - set(VISION_CASES))
    if unknown:
        raise SystemExit(f"unknown fixture(s) {unknown}; --list shows them")
    torch.set_num_threads(1)
    for index, name in enumerate(CASES):
        if name in names:
            meta = write(name, seed=1000 + index)
            print(f"{name:24s} count_params={meta['count_params']:6d} effects={meta['effects']}")
    for index, name in enumerate(VISION_CASES):
        if name in names:
            meta = write_vision(name, seed=2000 + index)
            print(f"{name:24s} count_params={meta['count_params']:6d} effects={meta['effects']}")
    for case, (name, _) in LORA_CASES.items():
        if name in names:
            lora_meta = write_lora(case, seed=1000 + list(CASES).index(name))
            counts = f"count_params={lora_meta['count_params']:6d} trainable={lora_meta['num_trainable_weights']}"
            print(f"lora_{case:19s} {counts}")
    sizes = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{OUT.relative_to(ROOT)}: {sizes / 1024:.0f} KiB")


if __name__ == "__main__":
    sys.exit(main())

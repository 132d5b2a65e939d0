"""llama.cpp's vision towers: the `mmproj` GGUF that goes next to a text GGUF.

llama.cpp keeps Gemma 3's SigLIP tower and multimodal projector out of the text model's file, in a
GGUF of its own (`general.architecture = "clip"`, `general.type = "mmproj"`, made by
`convert_hf_to_gguf.py --mmproj`). It is read with `gguf.py`'s reader; this file knows its names and
metadata:

    model = minilm.from_pretrained("gemma-3-4b-it-Q4_K_M.gguf", mmproj="mmproj-gemma-3-4b-it-f16.gguf")
    model.config                    # Gemma3Config: text_config from the text GGUF, vision_config from the mmproj
    gguf = read_mmproj(path)        # the GGUFFile, checked to be a Gemma 3 vision tower
    tensors = mmproj_tensors(gguf)  # {transformers name: GGUFTensor}, e.g. vision_tower.vision_model.*

Names (llama.cpp -> transformers, as in the released checkpoints). The converter maps names only:
no tensor is transposed, and shapes read back in NumPy order are transformers' shapes.

    v.patch_embd.weight / .bias          vision_tower.vision_model.embeddings.patch_embedding.weight / .bias
    v.position_embd.weight               vision_tower.vision_model.embeddings.position_embedding.weight
    v.blk.i.ln1 / ln2                    ...encoder.layers.i.layer_norm1 / layer_norm2   (LayerNorm: weight, bias)
    v.blk.i.attn_q / attn_k / attn_v     ...encoder.layers.i.self_attn.q_proj / k_proj / v_proj
    v.blk.i.attn_out                     ...encoder.layers.i.self_attn.out_proj
    v.blk.i.ffn_up / ffn_down            ...encoder.layers.i.mlp.fc1 / fc2
    v.post_ln                            vision_tower.vision_model.post_layernorm
    mm.soft_emb_norm.weight              multi_modal_projector.mm_soft_emb_norm.weight   stored as 1 + w: one is
                                         subtracted here (Gemma's RMSNorm adds it back); no other norm is shifted
    mm.input_projection.weight           multi_modal_projector.mm_input_projection_weight  (vision, text), used as
                                         x @ W; stored in F16 even in an "f32" file

Config (`clip.*` keys -> SiglipVisionConfig / Gemma3Config):

    clip.vision.image_size, patch_size          image_size, patch_size
    clip.vision.embedding_length                hidden_size
    clip.vision.feed_forward_length             intermediate_size
    clip.vision.block_count                     num_hidden_layers
    clip.vision.attention.head_count            num_attention_heads
    clip.vision.attention.layer_norm_epsilon    layer_norm_eps (the tower's LayerNorms and the soft-embedding norm)
    clip.vision.projector.scale_factor          patches per soft token along a side; absent means 4 (the
                                                released models: 64 x 64 patches -> 16 x 16 = 256 soft tokens);
                                                mm_tokens_per_image = (image_size // patch_size // scale) ** 2
    clip.vision.projection_dim                  the text model's hidden size (checked against the text GGUF)
    clip.use_gelu                               hidden_act gelu_pytorch_tanh
    image token ids                             <start_of_image>, <end_of_image>, <image_soft_token> looked up in
                                                the text GGUF's vocabulary (Gemma3Config's defaults when absent)
    image_mean, image_std                       `image_processor_settings` (the processor's normalisation)

Images are RGB (3 channels); the mmproj does not say otherwise.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from ..errors import CheckpointError, UnknownArchitectureError
from .gguf import GGUFFile, GGUFTensor, gemma3_config_from_gguf, gemma3_tensors_from_gguf, gguf_architecture, read_gguf

DEFAULT_SCALE_FACTOR = 4  # llama.cpp's default when clip.vision.projector.scale_factor is absent (Gemma 3: 64 -> 16)
SOFT_EMB_NORM = "mm.soft_emb_norm.weight"  # the one norm the converter stores as 1 + w
IMAGE_TOKENS = {  # Gemma3Config field -> the token's text in Gemma 3's vocabulary
    "boi_token_index": "<start_of_image>",
    "eoi_token_index": "<end_of_image>",
    "image_token_index": "<image_soft_token>",
}

# llama.cpp leaf -> transformers leaf, inside `v.blk.i.` / `vision_tower.vision_model.encoder.layers.i.`
LAYER_NAMES = {
    "ln1": "layer_norm1",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ln2": "layer_norm2",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}


def read_mmproj(path: str | os.PathLike) -> GGUFFile:
    """Open an mmproj GGUF and check that it holds a Gemma 3 vision tower (CheckpointError otherwise)."""
    gguf_file = read_gguf(pathlib.Path(path))
    meta = gguf_file.metadata
    arch = gguf_architecture(meta)
    if arch != "clip":
        raise CheckpointError(
            f"{gguf_file.path}: general.architecture={arch!r}; an mmproj file (a vision tower) says 'clip'"
            + (
                " (this is a text model's GGUF: pass it as the model, the mmproj as mmproj=)"
                if arch == "gemma3"
                else ""
            )
        )
    projector = meta.get("clip.projector_type")
    if projector != "gemma3":
        raise UnknownArchitectureError(
            f"{gguf_file.path}: clip.projector_type={projector!r}; minilm reads Gemma 3's vision towers only ('gemma3')"
        )
    if not meta.get("clip.has_vision_encoder", False):
        raise CheckpointError(f"{gguf_file.path}: clip.has_vision_encoder is not set: no vision tower in this mmproj")
    return gguf_file


def _require(gguf_file, key):
    if key not in gguf_file.metadata:
        raise CheckpointError(f"{gguf_file.path}: mmproj metadata has no {key!r} key, needed for the vision config")
    return gguf_file.metadata[key]


def vision_config_from_mmproj(gguf_file: GGUFFile) -> dict:
    """The `vision_config` dict (transformers' SiglipVisionConfig names) of an mmproj file."""
    if not gguf_file.metadata.get("clip.use_gelu", True):
        raise CheckpointError(f"{gguf_file.path}: clip.use_gelu is false; Gemma 3's tower uses GELU (tanh)")
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": _require(gguf_file, "clip.vision.embedding_length"),
        "intermediate_size": _require(gguf_file, "clip.vision.feed_forward_length"),
        "num_hidden_layers": _require(gguf_file, "clip.vision.block_count"),
        "num_attention_heads": _require(gguf_file, "clip.vision.attention.head_count"),
        "num_channels": 3,
        "image_size": _require(gguf_file, "clip.vision.image_size"),
        "patch_size": _require(gguf_file, "clip.vision.patch_size"),
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": _require(gguf_file, "clip.vision.attention.layer_norm_epsilon"),
        "vision_use_head": False,
    }


def mm_tokens_per_image(gguf_file: GGUFFile) -> int:
    """Soft tokens per image: the patch grid pooled by clip.vision.projector.scale_factor (default 4)."""
    grid = _require(gguf_file, "clip.vision.image_size") // _require(gguf_file, "clip.vision.patch_size")
    scale = gguf_file.metadata.get("clip.vision.projector.scale_factor", DEFAULT_SCALE_FACTOR)
    if not isinstance(scale, int) or scale < 1 or grid % scale:
        raise CheckpointError(
            f"{gguf_file.path}: clip.vision.projector.scale_factor={scale!r} does not divide the "
            f"{grid} x {grid} patch grid"
        )
    return (grid // scale) ** 2


def image_processor_settings(gguf_file: GGUFFile) -> dict:
    """The normalisation the processor applies before the tower: {"image_mean", "image_std", "size"}."""
    size = _require(gguf_file, "clip.vision.image_size")
    return {
        "image_mean": list(gguf_file.metadata.get("clip.vision.image_mean", [0.5, 0.5, 0.5])),
        "image_std": list(gguf_file.metadata.get("clip.vision.image_std", [0.5, 0.5, 0.5])),
        "size": {"height": size, "width": size},
    }


def mmproj_tensor_name_map(num_layers: int) -> dict[str, str]:
    """llama.cpp name -> transformers name (released layout) for every tensor of a Gemma 3 mmproj."""
    v = "vision_tower.vision_model."
    names = {
        "v.patch_embd.weight": v + "embeddings.patch_embedding.weight",
        "v.patch_embd.bias": v + "embeddings.patch_embedding.bias",
        "v.position_embd.weight": v + "embeddings.position_embedding.weight",
        "v.post_ln.weight": v + "post_layernorm.weight",
        "v.post_ln.bias": v + "post_layernorm.bias",
        SOFT_EMB_NORM: "multi_modal_projector.mm_soft_emb_norm.weight",
        "mm.input_projection.weight": "multi_modal_projector.mm_input_projection_weight",
    }
    for i in range(num_layers):
        for gguf_leaf, hf_leaf in LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                names[f"v.blk.{i}.{gguf_leaf}.{kind}"] = f"{v}encoder.layers.{i}.{hf_leaf}.{kind}"
    return names


def mmproj_tensors(gguf_file: GGUFFile) -> dict[str, GGUFTensor]:
    """Every tensor of a Gemma 3 mmproj under its transformers name, read (dequantized to float32) when
    used; mm.soft_emb_norm gets its stored + 1 taken off. CheckpointError names unexpected or missing tensors."""
    name_map = mmproj_tensor_name_map(_require(gguf_file, "clip.vision.block_count"))
    unexpected = [name for name in gguf_file.tensor_names if name not in name_map]
    if unexpected:
        raise CheckpointError(f"{gguf_file.path}: tensors minilm does not know in a Gemma 3 mmproj: {unexpected[:10]}")
    missing = [name for name in name_map if name not in gguf_file.tensor_names]
    if missing:
        raise CheckpointError(f"{gguf_file.path}: missing Gemma 3 vision tensors: {missing[:10]}")
    return {
        name_map[name]: GGUFTensor(gguf_file, name, offset=1.0 if name == SOFT_EMB_NORM else 0.0)
        for name in gguf_file.tensor_names
    }


def image_token_ids(text_gguf: GGUFFile) -> dict:
    """{"boi_token_index", "eoi_token_index", "image_token_index"} found in the text GGUF's vocabulary
    (those it lacks are left to Gemma3Config's defaults)."""
    tokens = text_gguf.metadata.get("tokenizer.ggml.tokens") or []
    where = {token: i for i, token in enumerate(tokens) if token in IMAGE_TOKENS.values()}
    return {field: where[token] for field, token in IMAGE_TOKENS.items() if token in where}


def gemma3_config_from_gguf_pair(text_gguf: GGUFFile, mmproj_gguf: GGUFFile) -> dict:
    """The multimodal config.json dict (Gemma3Config) of a text GGUF and its mmproj."""
    text_config = gemma3_config_from_gguf(text_gguf.metadata, text_gguf.tensor_names)
    projection_dim = _require(mmproj_gguf, "clip.vision.projection_dim")
    if projection_dim != text_config["hidden_size"]:
        raise CheckpointError(
            f"{mmproj_gguf.path} projects into {projection_dim} dimensions but {text_gguf.path}'s hidden size is "
            f"{text_config['hidden_size']}: this mmproj belongs to another model"
        )
    return {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text_config,
        "vision_config": vision_config_from_mmproj(mmproj_gguf),
        "mm_tokens_per_image": mm_tokens_per_image(mmproj_gguf),
        **image_token_ids(text_gguf),
        "tie_word_embeddings": text_config["tie_word_embeddings"],
    }


def gemma3_tensors_from_gguf_pair(text_gguf: GGUFFile, mmproj_gguf: GGUFFile) -> dict[str, GGUFTensor]:
    """The tensors of both files under the released checkpoints' names: the text model's under
    `language_model.` (language_model.model.*, language_model.lm_head.weight), the vision tower's and
    projector's as `mmproj_tensors` names them."""
    text = {"language_model." + name: tensor for name, tensor in gemma3_tensors_from_gguf(text_gguf).items()}
    return {**text, **mmproj_tensors(mmproj_gguf)}


def dequantized(tensors: dict[str, GGUFTensor]) -> dict[str, np.ndarray]:
    """Every tensor as a float32 array (all in memory)."""
    return {name: np.asarray(tensor) for name, tensor in tensors.items()}

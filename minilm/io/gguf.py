"""Reading GGUF checkpoints (llama.cpp's single-file format) into NumPy, readably.

A GGUF file is a header of key/value metadata (the config and the tokenizer, under llama.cpp's
key names) followed by tensors. Each tensor is stored in one ggml *type*: plain floats (F32, F16,
BF16) or a block-quantized layout in which a row of weights is cut into blocks of 32 (or
"super-blocks" of 256), and every block carries its own scale(s) next to small integer codes.

    gguf = read_gguf(path)
    gguf.metadata["gemma3.embedding_length"]        # 640
    gguf.tensor_info("blk.0.attn_q.weight")         # shape (1024, 640), type "Q5_0"
    w = gguf.dequantize("blk.0.attn_q.weight")      # float32, (1024, 640)

Shapes. GGUF lists a tensor's dimensions fastest-varying first (`ne = [cols, rows]`). Everything
here uses NumPy / Hugging Face order, `(rows, cols)` = `(out_features, in_features)` for a linear
weight, i.e. the reversed `ne`. How each block type turns back into float32 is in `quants.py`.

Gemma 3 specifics (checked against transformers' GGUF loader, `scripts/make_real_model_reference.py`):
  - config: `gemma3_config_from_gguf` rebuilds a Hugging Face `Gemma3TextConfig` dict;
  - names:  `gemma3_tensor_name_map` maps `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`;
  - values: llama.cpp stores every Gemma RMSNorm weight as `w + 1` (Gemma scales by `1 + w`), so
    `gemma3_state_dict_from_gguf` subtracts 1 from each `*norm.weight`. Nothing else changes: Q/K
    rows are *not* permuted (only llama.cpp's Llama-family converter does that) and the embedding
    is stored unscaled (the `sqrt(hidden_size)` factor is applied in the forward pass).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
from tqdm import tqdm

from ..errors import CheckpointError, CheckpointNotFoundError, UnknownArchitectureError
from .quants import DEQUANTIZE, dequantize_bytes

# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a tensor is, without reading its data: shape in NumPy/HF order (reversed GGUF `ne`)."""

    name: str
    shape: tuple[int, ...]
    type_name: str  # ggml type, e.g. "Q4_K"
    n_bytes: int


class GGUFFile:
    """An opened GGUF file: metadata as plain Python values, tensors dequantized on demand.

    The tensor bytes stay memory-mapped (by `gguf.GGUFReader`); `dequantize` returns a new
    float32 array each call.
    """

    def __init__(self, path: pathlib.Path, reader):
        self.path = path
        self._reader = reader
        self.version = int(reader.fields["GGUF.version"].parts[-1][0])
        self.metadata = _read_metadata(reader, path)
        self._tensors = {tensor.name: tensor for tensor in reader.tensors}
        self.tensor_names = list(self._tensors)

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.tensor_names)} tensors, {len(self.metadata)} keys)"

    def _tensor(self, name: str):
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: no tensor named {name!r} (the file has {len(self._tensors)} tensors)")
        return self._tensors[name]

    def tensor_info(self, name: str) -> TensorInfo:
        """Shape (HF order) and ggml type of tensor `name`."""
        tensor = self._tensor(name)
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF ne is (cols, rows, ...)
        return TensorInfo(name=name, shape=shape, type_name=tensor.tensor_type.name, n_bytes=int(tensor.n_bytes))

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name` (memory-mapped, read-only), as gguf-py lays them out."""
        return self._tensor(name).data

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` as a float32 array in HF order, e.g. `(out_features, in_features)`."""
        info = self.tensor_info(name)
        if info.type_name not in DEQUANTIZE:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has ggml type {info.type_name}, which minilm cannot "
                f"dequantize; supported types: {sorted(DEQUANTIZE)}"
            )
        try:
            return dequantize_bytes(self.raw(name), info.type_name, info.shape)
        except CheckpointError as error:
            raise CheckpointError(f"{self.path}: tensor {name!r}: {error}") from None


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file (memory-mapped; only the header is parsed now).

    Raises CheckpointNotFoundError if there is no such file, CheckpointError (naming the file) if
    it is not a GGUF, is truncated or is otherwise unreadable.
    """
    import gguf  # gguf-py, llama.cpp's reader

    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as error:  # gguf-py raises ValueError/IndexError/... on malformed files
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): {error}") from error
    if reader.byte_order != "I":
        raise CheckpointError(f"{path} is a big-endian GGUF file, which minilm does not read")
    _check_tensor_data_in_file(reader, path)
    return GGUFFile(path, reader)


def _check_tensor_data_in_file(reader, path: pathlib.Path) -> None:
    """A truncated file can still parse when only the last tensors lose bytes: check each one."""
    file_size = path.stat().st_size
    for tensor in reader.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > file_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {tensor.name!r} ends at byte {end} but the file has {file_size} bytes"
            )


def _read_metadata(reader, path: pathlib.Path) -> dict:
    """The key/value header as plain Python values (str, int, float, bool, lists of those).

    gguf-py's own bookkeeping keys (`GGUF.version`, `GGUF.tensor_count`, `GGUF.kv_count`) are left out.
    """
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = field.contents()  # strings are decoded as UTF-8, arrays become lists
        except UnicodeDecodeError as error:
            raise CheckpointError(f"{path}: metadata {key!r} holds a string that is not UTF-8: {error}") from None
    return metadata


# --------------------------------------------------------------------------------------------
# Config from metadata
# --------------------------------------------------------------------------------------------


def gguf_architecture(meta: dict) -> str:
    """`general.architecture`, e.g. "gemma3", "llama", "qwen3moe"."""
    if "general.architecture" not in meta:
        raise CheckpointError("GGUF metadata has no 'general.architecture' key")
    return meta["general.architecture"]


def _require(meta: dict, key: str):
    if key not in meta:
        raise CheckpointError(f"GGUF metadata has no {key!r} key, needed for the config")
    return meta[key]


GEMMA3_SLIDING_WINDOW_PATTERN = 6  # 5 sliding-window layers, then 1 global layer
GEMMA3_ROPE_LOCAL_BASE_FREQ = 10_000.0  # not stored in GGUF; llama.cpp hard-codes it too


def gemma3_layer_types(num_layers: int, pattern: int = GEMMA3_SLIDING_WINDOW_PATTERN) -> list[str]:
    """["sliding_attention"] * 5 + ["full_attention"], repeated: layer i is global if (i + 1) % 6 == 0."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


def gemma3_config_from_gguf(meta: dict, tensor_names: list[str] | None = None) -> dict:
    """A Hugging Face `Gemma3TextConfig` dict (HF field names) from GGUF metadata.

    Equal, field by field, to what transformers' GGUF loader builds (5.x), except that transformers
    puts both RoPE bases in `rope_parameters` ({"sliding_attention": 10000, "full_attention":
    rope_theta}) where this returns `rope_theta` and `rope_local_base_freq`.

    Not in the file, so filled with Gemma 3 values (as transformers and llama.cpp do):
      - rope_local_base_freq = 10000, the 5-sliding-then-1-global `layer_types` pattern;
      - query_pre_attn_scalar = head_dim (true for every size but 27B, where llama.cpp uses
        hidden_size / num_heads and transformers' class default 256 is also wrong);
      - no soft-caps unless the file has `<arch>.final_logit_softcapping` /
        `<arch>.attn_logit_softcapping` (Gemma 2 files do, Gemma 3 files do not).
    `rms_norm_eps` is the file's float32 1e-6, i.e. 9.999999974752427e-07, as in transformers.
    `tie_word_embeddings` is True unless `tensor_names` (if given) contains "output.weight".
    """
    arch = gguf_architecture(meta)
    if arch != "gemma3":
        raise UnknownArchitectureError(f"expected a gemma3 GGUF, got general.architecture={arch!r}")

    def key(name):
        return _require(meta, f"{arch}.{name}")

    head_dim = key("attention.key_length")
    value_dim = meta.get(f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise CheckpointError(f"Gemma 3 needs key_length == value_length, got {head_dim} and {value_dim}")
    num_layers = key("block_count")
    vocab_size = meta.get(f"{arch}.vocab_size", len(_require(meta, "tokenizer.ggml.tokens")))
    return {
        "model_type": "gemma3_text",
        "vocab_size": vocab_size,
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": num_layers,
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": key("attention.head_count_kv"),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": float(key("rope.freq_base")),
        "rope_local_base_freq": GEMMA3_ROPE_LOCAL_BASE_FREQ,
        "rope_scaling": None,
        "sliding_window": key("attention.sliding_window"),
        "max_position_embeddings": key("context_length"),
        "query_pre_attn_scalar": head_dim,
        "layer_types": gemma3_layer_types(num_layers),
        "final_logit_softcapping": meta.get(f"{arch}.final_logit_softcapping"),
        "attn_logit_softcapping": meta.get(f"{arch}.attn_logit_softcapping"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "unk_token_id": meta.get("tokenizer.ggml.unknown_token_id"),
        "tie_word_embeddings": tensor_names is None or "output.weight" not in tensor_names,
    }


# --------------------------------------------------------------------------------------------
# Gemma 3 weights: GGUF names -> Gemma3ForCausalLM names, and the norm +1 undone
# --------------------------------------------------------------------------------------------

# llama.cpp leaf name -> Hugging Face leaf name, inside `blk.N.` / `model.layers.N.`
GEMMA3_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gemma3_tensor_name_map(num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face Gemma3ForCausalLM name, for every tensor a Gemma 3 GGUF
    may hold (`output.weight` only exists when the embeddings are not tied)."""
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    for layer in range(num_layers):
        for gguf_leaf, hf_leaf in GEMMA3_LAYER_NAMES.items():
            names[f"blk.{layer}.{gguf_leaf}.weight"] = f"model.layers.{layer}.{hf_leaf}.weight"
    return names


def is_gemma_norm(gguf_name: str) -> bool:
    """Every RMSNorm weight (attn/ffn/post/q/k/output norms): stored by llama.cpp as `w + 1`."""
    return gguf_name.endswith("norm.weight")


def gemma3_state_dict_from_gguf(gguf_file: GGUFFile, progress: bool = True) -> dict[str, np.ndarray]:
    """All tensors of a Gemma 3 GGUF as float32 arrays under Hugging Face names.

    Norm weights get 1 subtracted (llama.cpp stored `1 + w`; Gemma's RMSNorm multiplies by
    `1 + w` itself), exactly as transformers' GGUF loader does. Raises CheckpointError naming
    any tensor that is unexpected or missing.
    """
    config = gemma3_config_from_gguf(gguf_file.metadata, gguf_file.tensor_names)
    name_map = gemma3_tensor_name_map(config["num_hidden_layers"])

    unexpected = [name for name in gguf_file.tensor_names if name not in name_map]
    if unexpected:
        raise CheckpointError(f"{gguf_file.path}: tensors minilm does not know for Gemma 3: {unexpected[:10]}")
    optional = {"output.weight"}
    missing = [name for name in name_map if name not in optional and name not in gguf_file.tensor_names]
    if missing:
        raise CheckpointError(f"{gguf_file.path}: missing Gemma 3 tensors: {missing[:10]}")

    state_dict = {}
    for gguf_name in tqdm(gguf_file.tensor_names, desc="Dequantizing GGUF", unit="tensor", disable=not progress):
        weight = gguf_file.dequantize(gguf_name)
        if is_gemma_norm(gguf_name):
            weight = weight - np.float32(1.0)  # undo llama.cpp's `w + 1`
        state_dict[name_map[gguf_name]] = weight
    return state_dict


# --------------------------------------------------------------------------------------------
# One entry point per file: the Hugging Face config and tensors a GGUF file holds
# --------------------------------------------------------------------------------------------


def config_from_gguf(gguf_file: GGUFFile) -> dict:
    """The config.json dict of the model in `gguf_file` (Hugging Face field names)."""
    arch = gguf_architecture(gguf_file.metadata)
    if arch != "gemma3":
        raise UnknownArchitectureError(f"{gguf_file.path}: minilm reads GGUF weights of gemma3 only, not {arch!r}")
    return gemma3_config_from_gguf(gguf_file.metadata, gguf_file.tensor_names)


def tensors_from_gguf(gguf_file: GGUFFile, progress: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of `gguf_file`, float32, under Hugging Face names in Hugging Face layout."""
    arch = gguf_architecture(gguf_file.metadata)
    if arch != "gemma3":
        raise UnknownArchitectureError(f"{gguf_file.path}: minilm reads GGUF weights of gemma3 only, not {arch!r}")
    return gemma3_state_dict_from_gguf(gguf_file, progress=progress)

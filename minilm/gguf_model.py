"""A model from a GGUF file: metadata -> config, dequantized tensors -> weights, vocabulary -> tokenizer.

    model = model_from_gguf("gemma-3-270m-q4_k_m.gguf")       # a Gemma3ForCausalLM, float32
    ids = model.tokenizer.encode("The capital of France is")
    model.generate([ids], max_new_tokens=8)

The file's layout is fixed once, here, by `minilm.gguf` (llama.cpp names -> Hugging Face names,
Gemma norms' stored `+1` undone); the model itself never knows where its weights came from.
Quantized weights are dequantized to float32 at load (then cast to `dtype`): minilm computes on
plain arrays, so memory is that of a float32 model, not of the 4-bit file.
"""

from __future__ import annotations

from pathlib import Path

from . import gguf
from .errors import UnknownArchitectureError


def _gemma3(gguf_file, dtype, progress):
    from .models.gemma3 import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig.from_dict(gguf.gemma3_config_from_gguf(gguf_file.metadata, gguf_file.tensor_names))
    config.architectures = ["Gemma3ForCausalLM"]
    tensors = gguf.gemma3_state_dict_from_gguf(gguf_file, progress=progress)  # HF names, float32
    return Gemma3ForCausalLM(config, params=tensors, dtype=dtype)


# GGUF `general.architecture` -> builder(gguf_file, dtype, progress) -> model
GGUF_ARCHITECTURES = {"gemma3": _gemma3}


def model_from_gguf(path, dtype="float32", *, progress=False, tokenizer=True):
    """Load a GGUF checkpoint as a minilm model, with its tokenizer as `model.tokenizer`.

    Raises CheckpointNotFoundError / CheckpointError for a missing or unreadable file, and
    UnknownArchitectureError when `general.architecture` is not one minilm reads from GGUF.
    """
    gguf_file = gguf.read_gguf(Path(path))
    architecture = gguf.gguf_architecture(gguf_file.metadata)
    if architecture not in GGUF_ARCHITECTURES:
        raise UnknownArchitectureError(
            f"{gguf_file.path}: GGUF architecture {architecture!r} is not supported; minilm reads GGUF files of: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))} (other families load from Hugging Face folders)")
    model = GGUF_ARCHITECTURES[architecture](gguf_file, dtype, progress)
    model.tokenizer = None
    if tokenizer:
        from .tokenizer import Tokenizer

        model.tokenizer = Tokenizer.from_gguf(gguf_file)
    return model

"""From a checkpoint to a model: `minilm.from_pretrained(path)`.

    Hugging Face folder  config.json (`architectures`, else `model_type`) names the class; the
                         weights come from model.safetensors or its shards (`safetensors.py`)
    .gguf file           `general.architecture` names the family; the config is rebuilt from the
                         metadata and the tensors are dequantized under Hugging Face names (`gguf.py`);
                         the vocabulary becomes `model.tokenizer` (`tokenizer.py`)
    .gguf + mmproj=      a Gemma 3 text GGUF and llama.cpp's vision tower file next to it (`mmproj.py`):
                         one Gemma3ForConditionalGeneration
    hf://owner/name      a folder of the local Hugging Face cache, found without the network
    [part, part, ...]    a GGUF file stored as byte ranges in several files (the shipped model's
                         part packages), read in place

Which class a name stands for is looked up in `registry.py`; the model itself never knows where
its weights came from.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..config import read_config_json
from ..errors import CheckpointNotFoundError, InputError, UnknownArchitectureError
from .gguf import config_from_gguf, gguf_architecture, read_gguf, tensors_from_gguf
from .mmproj import gemma3_config_from_gguf_pair, gemma3_tensors_from_gguf_pair, read_mmproj
from .registry import FAMILIES, family_of_architecture, family_of_gguf
from .tokenizer import Tokenizer


def architecture_class(name):
    """The class named by a config.json `architectures` entry, e.g. "Qwen3MoeForCausalLM"."""
    family = family_of_architecture(name)
    if family is None:
        known = sorted(c for f in FAMILIES.values() for c in f.architectures)
        raise UnknownArchitectureError(f"unknown architecture {name!r}; minilm implements: {', '.join(known)}")
    return getattr(importlib.import_module(family.module), name)


def class_for_config(config_dict):
    """Pick the model class for a config.json dict (architectures first, then model_type)."""
    architectures = config_dict.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise UnknownArchitectureError(
            f"config.json `architectures` must be a list of class names, got {architectures!r}"
        )
    if architectures:
        return architecture_class(architectures[0])
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise UnknownArchitectureError(
            f"config.json has no `architectures` and model_type {model_type!r} is not one minilm implements "
            f"({', '.join(sorted(FAMILIES))})"
        )
    return architecture_class(FAMILIES[model_type].default_architecture)


def from_pretrained(path, *, dtype="float32", mmproj=None):
    """Load any supported checkpoint: a Hugging Face folder (config.json + safetensors, single or
    sharded), a `.gguf` file (or the list of its parts, read in place), or `hf://owner/name` from the
    local Hugging Face cache.

    mmproj: with a Gemma 3 text `.gguf`, the path of llama.cpp's vision tower file for it (an
    "mmproj" GGUF): the two load as one Gemma3ForConditionalGeneration (see `mmproj.py`)."""
    if isinstance(path, (list, tuple)):  # a GGUF file stored in parts (the shipped model)
        return model_from_gguf(path, dtype=dtype, mmproj=mmproj)
    path = resolve_handle(path)
    if mmproj is not None and path.suffix != ".gguf":
        raise InputError(
            f"mmproj={str(mmproj)!r} goes with a text .gguf file; {path} is not one (a Hugging Face folder "
            "holds its vision tower in its own safetensors)"
        )
    if path.suffix == ".gguf":
        return model_from_gguf(path, dtype=dtype, mmproj=mmproj)
    if path.is_file():
        raise CheckpointNotFoundError(
            f"{path} is a file: pass the folder that holds config.json and the safetensors weights (or a .gguf file)"
        )
    cls = class_for_config(read_config_json(path))
    return cls.from_pretrained(path, dtype=dtype)


def model_from_gguf(path, dtype="float32", *, tokenizer=True, mmproj=None):
    """Load a GGUF checkpoint as a minilm model, with its tokenizer as `model.tokenizer`.

        model = model_from_gguf("gemma-3-270m-q4_k_m.gguf")       # a Gemma3ForCausalLM
        ids = model.tokenizer.encode("The capital of France is")
        model = model_from_gguf("gemma-3-4b-it-q4_k_m.gguf", mmproj="mmproj-gemma-3-4b-it-f16.gguf")
        # a Gemma3ForConditionalGeneration: the text model's weights and the vision tower's

    Raises CheckpointNotFoundError / CheckpointError for a missing or unreadable file, and
    UnknownArchitectureError when `general.architecture` is not one minilm reads from GGUF.
    """
    gguf_file = read_gguf(path if isinstance(path, (list, tuple)) else Path(path))
    architecture = gguf_architecture(gguf_file.lazy_metadata)  # the vocabulary's strings stay unread
    family = family_of_gguf(architecture)
    if family is None:
        readable = sorted(a for f in FAMILIES.values() for a in f.gguf_architectures)
        raise UnknownArchitectureError(
            f"{gguf_file.path}: GGUF architecture {architecture!r} is not supported; minilm reads GGUF files of: "
            f"{', '.join(readable)} (other families load from Hugging Face folders)"
        )
    if mmproj is not None:
        if architecture != "gemma3":
            raise UnknownArchitectureError(
                f"{gguf_file.path}: mmproj= is read for Gemma 3 text GGUFs only, not {architecture!r}"
            )
        vision = read_mmproj(resolve_handle(mmproj))
        config = gemma3_config_from_gguf_pair(gguf_file, vision)  # Gemma3ForConditionalGeneration
        params = gemma3_tensors_from_gguf_pair(gguf_file, vision)
    else:
        config = {**config_from_gguf(gguf_file), "architectures": [family.default_architecture]}
        params = tensors_from_gguf(gguf_file)
    cls = class_for_config(config)
    # The tokenizer first: building it needs a few hundred MB of temporaries, which it gives back
    # before the weights arrive, so the two never add up in the peak memory.
    loaded_tokenizer = Tokenizer.from_gguf(gguf_file) if tokenizer else None
    model = cls(cls.config_class.from_dict(config), params=params, dtype=dtype)
    model.tokenizer = loaded_tokenizer
    return model


def resolve_handle(handle):
    """A local path, or `hf://owner/name` looked up in the local Hugging Face cache (offline)."""
    handle = str(handle)
    if handle.startswith("hf://"):
        return hf_cache_snapshot(handle[len("hf://") :])
    if "://" in handle:
        raise CheckpointNotFoundError(
            f"cannot resolve {handle!r} offline: minilm reads local folders, .gguf files "
            "and hf://owner/name from the local Hugging Face cache"
        )
    path = Path(handle).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"no such file or folder: {path}")
    return path


def hf_cache_snapshot(repo_id):
    """The folder of `repo_id` in the Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub or
    ~/.cache/huggingface/hub), without touching the network."""
    if repo_id.count("/") != 1:
        raise CheckpointNotFoundError(f"hf://{repo_id}: expected hf://owner/name")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
    )
    repo_dir = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    if found:
        return found[-1].parent
    raise CheckpointNotFoundError(
        f"hf://{repo_id} is not in the local Hugging Face cache ({cache}); minilm works offline: download it "
        f"where there is network (`hf download {repo_id}`) and copy the cache, or pass a local folder"
    )

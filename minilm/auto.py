"""From a checkpoint to the right class: config.json `architectures` / `model_type`, or GGUF
metadata, names the family; this module is the one table that maps names to classes."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from .config import read_config_json
from .errors import CheckpointNotFoundError, UnknownArchitectureError

# model_type -> (module, config class, default architecture, keras-style backbone class, architectures)
FAMILIES = {
    "qwen3_moe": ("minilm.models.qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3MoeBackbone", [
        "Qwen3MoeModel", "Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification",
        "Qwen3MoeForTokenClassification", "Qwen3MoeForQuestionAnswering"]),
    "bloom": ("minilm.models.bloom", "BloomConfig", "BloomForCausalLM", "BloomBackbone", [
        "BloomModel", "BloomForCausalLM", "BloomForSequenceClassification", "BloomForTokenClassification",
        "BloomForQuestionAnswering"]),
    "phi3": ("minilm.models.phi3", "Phi3Config", "Phi3ForCausalLM", "Phi3Backbone", [
        "Phi3Model", "Phi3ForCausalLM", "Phi3ForSequenceClassification", "Phi3ForTokenClassification"]),
    "gemma3_text": ("minilm.models.gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3Backbone", [
        "Gemma3TextModel", "Gemma3ForCausalLM"]),
}


def _family_module(model_type):
    return importlib.import_module(FAMILIES[model_type][0])


def architecture_class(name):
    """The class named by a config.json `architectures` entry, e.g. "Qwen3MoeForCausalLM"."""
    for model_type, (_, _, _, _, classes) in FAMILIES.items():
        if name in classes:
            return getattr(_family_module(model_type), name)
    known = sorted(c for *_, classes in FAMILIES.values() for c in classes)
    raise UnknownArchitectureError(f"unknown architecture {name!r}; minilm implements: {', '.join(known)}")


def class_for_config(config_dict):
    """Pick the model class for a config.json dict (architectures first, then model_type)."""
    architectures = config_dict.get("architectures") or []
    if architectures:
        return architecture_class(architectures[0])
    model_type = config_dict.get("model_type")
    if model_type not in FAMILIES:
        raise UnknownArchitectureError(
            f"config.json has no `architectures` and model_type {model_type!r} is not one minilm implements "
            f"({', '.join(sorted(FAMILIES))})")
    return architecture_class(FAMILIES[model_type][2])


def from_pretrained(path, *, dtype="float32"):
    """Load any supported checkpoint: a Hugging Face folder (config.json + safetensors, single or
    sharded), a `.gguf` file, or `hf://owner/name` from the local Hugging Face cache."""
    path = resolve_handle(path)
    if path.suffix == ".gguf":
        from .gguf_model import model_from_gguf

        return model_from_gguf(path, dtype=dtype)
    cls = class_for_config(read_config_json(path))
    return cls.from_pretrained(path, dtype=dtype)


def resolve_handle(handle):
    """A local path, or `hf://owner/name` looked up in the local Hugging Face cache (offline)."""
    handle = str(handle)
    if handle.startswith("hf://"):
        return hf_cache_snapshot(handle[len("hf://"):])
    if "://" in handle:
        raise CheckpointNotFoundError(f"cannot resolve {handle!r} offline: minilm reads local folders, .gguf files "
                                      "and hf://owner/name from the local Hugging Face cache")
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
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
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
        f"where there is network (`huggingface-cli download {repo_id}`) and copy the cache, or pass a local folder")

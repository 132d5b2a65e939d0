"""The keras-hub-style API: `Qwen3MoeBackbone(vocabulary_size=..., ...)`, called on
`{"token_ids": ..., "padding_mask": ...}`, returning the final hidden states.

A backbone is a thin wrapper around the family's Hugging Face-style base model: the keras-hub
argument names map onto the config.json names in one place per family (`to_hf_config` /
`from_hf_config`), so both APIs run the same code on the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import ops
from .checkpoint import read_checkpoint, write_checkpoint
from .config import read_config_json
from .errors import CheckpointError, CheckpointNotFoundError, InputError


class TokenEmbedding:
    """keras-hub's ReversibleEmbedding: ids -> vectors, or with reverse=True, vectors -> logits
    against the same table (a tied LM head)."""

    def __init__(self, backbone):
        self._backbone = backbone

    @property
    def embeddings(self):
        """The table, (vocabulary_size, hidden_dim)."""
        return self._backbone.model.params[self._backbone.model.embedding_name.split(".")[0]].weight

    def __call__(self, inputs, reverse=False):
        if reverse:
            return ops.linear(np.asarray(inputs), self.embeddings)  # (..., vocabulary_size)
        ids = np.asarray(inputs)
        if ids.size and (ids.min() < 0 or ids.max() >= self.embeddings.shape[0]):
            raise InputError(f"token ids must lie in [0, {self.embeddings.shape[0]}); got {ids.min()}..{ids.max()}")
        return self.embeddings[ids]  # (..., hidden_dim)


class Backbone:
    """Base of the keras-hub-style backbones. Families set `model_class` and the two mappings."""

    model_class = None

    def __init__(self, hf_config, dtype=None, params=None):
        self.model = self.model_class(hf_config, params=params, dtype=dtype or "float32")

    # -- the two spellings of the config: keras-hub args <-> config.json ----------------------

    @classmethod
    def to_hf_config(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def from_hf_config(cls, hf_config):
        """keras-hub constructor arguments for a Hugging Face config."""
        raise NotImplementedError

    @property
    def config(self):
        return self.model.config

    def get_config(self):
        """The constructor arguments, keras-style: `Backbone.from_config(b.get_config())` rebuilds it."""
        return {**self.from_hf_config(self.model.config), "dtype": self.model.dtype.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # -- calling --------------------------------------------------------------------------

    @property
    def token_embedding(self):
        return TokenEmbedding(self)

    def __call__(self, inputs):
        """{"token_ids": (batch, seq), "padding_mask": (batch, seq)} -> (batch, seq, hidden_dim)"""
        if not isinstance(inputs, dict) or "token_ids" not in inputs:
            raise InputError('a backbone is called on {"token_ids": ..., "padding_mask": ...}')
        mask = inputs.get("padding_mask")
        mask = None if mask is None else np.asarray(mask).astype(np.int64)
        return self.model(input_ids=inputs["token_ids"], attention_mask=mask).last_hidden_state

    # -- presets --------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, preset, dtype=None):
        """Load from a local folder (a Hugging Face checkpoint or a preset saved by
        `save_to_preset`), or `hf://owner/name` from the local Hugging Face cache."""
        from .auto import FAMILIES, class_for_config, resolve_handle

        folder = resolve_handle(preset)
        config = read_config_json(folder)
        if "class_name" in config:  # a minilm (keras-style) preset
            backbone_cls = _backbone_class(config["class_name"])
            _check_family(cls, backbone_cls, preset)
            args = dict(config["config"])
            if dtype is not None:
                args["dtype"] = dtype
            backbone = backbone_cls(**args)
            backbone.model.load_state_dict(read_checkpoint(folder))
            return backbone
        model_cls = class_for_config(config)
        backbone_cls = _backbone_class(FAMILIES[model_cls.config_class.model_type][3])
        _check_family(cls, backbone_cls, preset)
        hf_config = model_cls.config_class.from_dict(config)
        backbone = backbone_cls.__new__(backbone_cls)
        Backbone.__init__(backbone, hf_config, dtype=dtype, params=_backbone_tensors(read_checkpoint(folder)))
        return backbone

    def save_to_preset(self, folder):
        """Write config.json ({"class_name", "config"}) and model.safetensors (HF tensor names)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"module": "minilm", "class_name": type(self).__name__, "config": self.get_config()}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = self.model.to_checkpoint(self.model.state_dict(), self.model.config)
        write_checkpoint(folder, tensors)


def _backbone_tensors(tensors):
    """A head checkpoint's backbone tensors (the base model ignores lm_head / score / qa_outputs)."""
    return {k: v for k, v in tensors.items() if k.split(".")[0] not in ("lm_head", "score", "qa_outputs")}


def _backbone_class(name):
    from .auto import FAMILIES

    for module, _, _, backbone, _ in FAMILIES.values():
        if backbone == name:
            import importlib

            return getattr(importlib.import_module(module), name)
    raise CheckpointError(f"unknown backbone class {name!r} in preset config.json")


def _check_family(requested, found, preset):
    if requested is not Backbone and not issubclass(found, requested):
        raise CheckpointError(f"{preset} holds a {found.__name__}, not a {requested.__name__}")
    if found is None:
        raise CheckpointNotFoundError(preset)

"""What every keras-hub-style backbone shares: the call convention, `token_embedding`, presets.

    backbone = minilm.Qwen3MoeBackbone(vocabulary_size=..., num_layers=..., ...)   # keras-hub's arguments
    hidden = backbone({"token_ids": ids, "padding_mask": mask})                    # (batch, seq, hidden_dim)
    logits = backbone.token_embedding(hidden, reverse=True)                         # the tied LM head
    backbone = minilm.Backbone.from_preset("path/or/hf://owner/name")

A backbone holds a family's Hugging Face-style base model (`backbone.model`) and calls the same
functions on the same weights. Each family's file here maps keras-hub's constructor arguments onto
the config.json names in its constructor, and back in `keras_args`, in one place.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np

from .. import nn, ops
from ..config import read_config_json
from ..errors import CheckpointError, ConfigError, InputError
from ..io.load import class_for_config, resolve_handle
from ..io.registry import FAMILIES, family_of_backbone
from ..io.safetensors import read_checkpoint, write_checkpoint


class TokenEmbedding:
    """keras-hub's ReversibleEmbedding: ids -> vectors, or with reverse=True, vectors -> logits
    against the same table (a tied LM head), soft-capped when `logit_soft_cap` is set."""

    def __init__(self, embeddings, logit_soft_cap=None):
        self.embeddings = embeddings  # (vocabulary_size, hidden_dim)
        self.logit_soft_cap = logit_soft_cap

    def __call__(self, inputs, reverse=False):
        if reverse:
            logits = ops.linear(np.asarray(inputs), self.embeddings)  # (..., vocabulary_size)
            return logits if self.logit_soft_cap is None else nn.soft_cap(logits, self.logit_soft_cap)
        ids = np.asarray(inputs)
        if ids.size and (ids.min() < 0 or ids.max() >= self.embeddings.shape[0]):
            raise InputError(f"token ids must lie in [0, {self.embeddings.shape[0]}); got {ids.min()}..{ids.max()}")
        return self.embeddings[ids]  # (..., hidden_dim)


class Backbone:
    """A minilm base model (`Qwen3MoeModel`, `BloomModel`, ...) with keras-hub's call convention.

    The family classes (`Qwen3MoeBackbone`, ...) build the model from keras-hub's constructor
    arguments; `Backbone(model)` wraps a model built from a Hugging Face config, which is what
    `from_preset` returns for a checkpoint whose config keras-hub's arguments cannot express
    (it runs the checkpoint exactly; `get_config` then says what keras-hub lacks)."""

    def __init__(self, model):
        self.model = model

    @property
    def config(self):
        """The Hugging Face config of the model."""
        return self.model.config

    # -- keras-hub's config: the constructor arguments -------------------------------------

    @staticmethod
    def keras_args(config):
        """keras-hub constructor arguments for a Hugging Face config; ConfigError for what they
        cannot express. Each family class defines it."""
        raise NotImplementedError

    def get_config(self):
        """The constructor arguments, keras-style: `Backbone.from_config(b.get_config())` rebuilds it."""
        return {**_keras_class(self.config).keras_args(self.config), "dtype": self.model.dtype.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # -- calling --------------------------------------------------------------------------

    @property
    def token_embedding(self):
        table = self.model.params[self.model.embedding_name.split(".")[0]].weight
        return TokenEmbedding(table, logit_soft_cap=getattr(self.config, "final_logit_softcapping", None))

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
        hf_config = model_cls.config_class.from_dict(config)
        backbone_cls = _keras_class(hf_config)
        _check_family(cls, backbone_cls, preset)
        tensors = read_checkpoint(folder)  # a head's checkpoint too: the base model ignores the head
        try:
            args = backbone_cls.keras_args(hf_config)
        except ConfigError:  # keras-hub's arguments cannot say it: run the exact model all the same
            base_cls = getattr(model_cls, "base_model_class", None) or model_cls
            return Backbone(base_cls(hf_config, params=tensors, dtype=dtype or "float32"))
        return backbone_cls(**args, dtype=dtype, params=tensors)

    def save_to_preset(self, folder):
        """Write config.json ({"class_name", "config"}) and model.safetensors (HF tensor names)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"module": "minilm", "class_name": type(self).__name__, "config": self.get_config()}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = self.model.to_checkpoint_layout(self.model.state_dict(), self.model.config)
        write_checkpoint(folder, tensors)


def check_keras_kwargs(cls, kwargs):
    """keras-hub's backbones pass **kwargs on to keras (name, trainable, ...); minilm has no use for
    them and says so rather than dropping them."""
    if kwargs:
        raise ConfigError(f"{cls.__name__}: unsupported argument(s) {sorted(kwargs)}")


def _keras_class(hf_config):
    """The keras-hub-style class of a Hugging Face config's family."""
    family = FAMILIES[hf_config.model_type]
    return getattr(importlib.import_module(family.keras_module), family.backbone_class)


def _backbone_class(name):
    family = family_of_backbone(name)
    if family is None:
        raise CheckpointError(f"unknown backbone class {name!r} in preset config.json")
    return getattr(importlib.import_module(family.keras_module), name)


def _check_family(requested, found, preset):
    if requested is not Backbone and not issubclass(found, requested):
        raise CheckpointError(f"{preset} holds a {found.__name__}, not a {requested.__name__}")

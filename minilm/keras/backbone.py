"""What every keras-hub-style backbone shares: the call convention, `token_embedding`, presets.

    backbone = minilm.Qwen3MoeBackbone(vocabulary_size=..., num_layers=..., ...)   # keras-hub's arguments
    hidden = backbone({"token_ids": ids, "padding_mask": mask})                    # (batch, seq, hidden_dim)
    logits = backbone.token_embedding(hidden, reverse=True)                         # (batch, seq, vocabulary_size)
    backbone = minilm.Backbone.from_preset("path/or/hf://owner/name", load_weights=True, **overrides)
    backbone.count_params()                                                         # keras' count_params()

A backbone holds a family's Hugging Face-style base model (`backbone.model`) and calls the same
functions on the same weights. Each family's file here maps keras-hub's constructor arguments onto
the config.json names in its constructor, and back in `keras_args`, in one place.

keras-hub keeps a few weights in its backbones that a Hugging Face base model has not; a backbone
holds them in `backbone.extra_weights`, under the names a checkpoint gives them:

    lm_head.weight   (vocab_size, hidden_size)   when the embeddings are untied: keras-hub's
                     `token_embedding.reverse_embeddings` (hidden, vocab), transposed, which
                     `token_embedding(x, reverse=True)` multiplies by instead of the input table
    the pooling head of Gemma3Backbone(is_embedding_model=True)   (see gemma3.py)
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np

from .. import nn, ops
from ..config import read_config_json
from ..errors import CheckpointError, ConfigError, InputError
from ..io.load import class_for_config, resolve_handle
from ..io.registry import FAMILIES, family_of_backbone
from ..io.safetensors import read_checkpoint, write_checkpoint
from ..modeling import PreTrainedModel
from . import lora as keras_lora

OUTPUT_PROJECTION = "lm_head.weight"  # keras-hub's reverse_embeddings, transposed: (vocab_size, hidden_size)


class TokenEmbedding:
    """keras-hub's ReversibleEmbedding: ids -> vectors, or with reverse=True, vectors -> logits against
    the same table when `tie_weights`, else against the separate output projection
    (`reverse_embeddings`, stored as lm_head.weight), soft-capped when `logit_soft_cap` is set."""

    def __init__(self, embeddings, reverse_embeddings=None, tie_weights=True, logit_soft_cap=None):
        self.embeddings = embeddings  # (vocabulary_size, hidden_dim)
        self.reverse_embeddings = reverse_embeddings  # (vocabulary_size, hidden_dim) when untied, else None
        self.tie_weights = tie_weights
        self.logit_soft_cap = logit_soft_cap

    def __call__(self, inputs, reverse=False):
        if reverse:
            table = self.embeddings if self.tie_weights else self.reverse_embeddings
            if table is None:
                raise CheckpointError(
                    f"the embeddings are untied but this backbone has no output projection: its "
                    f"weights had no {OUTPUT_PROJECTION!r} (a bare base-model checkpoint), so "
                    "token_embedding(x, reverse=True) has no logits to give"
                )
            hidden = inputs if hasattr(inputs, "shape") else np.asarray(inputs)  # arrays stay on their device
            logits = ops.linear(hidden, table)  # (..., vocabulary_size)
            return logits if self.logit_soft_cap is None else nn.soft_cap(logits, self.logit_soft_cap)
        ids = np.asarray(inputs)
        if ids.size and (ids.min() < 0 or ids.max() >= self.embeddings.shape[0]):
            raise InputError(f"token ids must lie in [0, {self.embeddings.shape[0]}); got {ids.min()}..{ids.max()}")
        return self.embeddings[ids]  # (..., hidden_dim)


class ExtraWeights(PreTrainedModel):
    """The weights a keras-hub backbone holds beyond the family's base model, under their checkpoint
    names and shapes (`shapes`): lm_head.weight when untied, a pooling head. Loaded, checked (name,
    shape, dtype, finite), converted and initialised as every model's weights are."""

    has_head = True  # every name is kept as it is (no base-model prefix to align)

    def __init__(self, config, shapes, *, params=None, dtype="float32", seed=1):
        self.shapes = dict(shapes)
        super().__init__(config, params=params, dtype=dtype, seed=seed)  # seed 1: not the embedding's draws

    def parameter_shapes(self):
        return self.shapes


def build_weights(model_cls, config, params=None, dtype=None, extra_shapes=None):
    """(base model, ExtraWeights or None) from one flat {tensor name: array}, or from init when params
    is None. Untied embeddings add lm_head.weight to `extra_shapes`; a checkpoint without it (a bare
    base model, a classification head's checkpoint) gives a backbone without an output projection,
    whose `token_embedding(x, reverse=True)` says so."""
    dtype = dtype or "float32"
    shapes = dict(extra_shapes or {})
    if not config.tie_word_embeddings:
        shapes[OUTPUT_PROJECTION] = (config.vocab_size, config.hidden_size)
        if params is not None and OUTPUT_PROJECTION not in params:
            del shapes[OUTPUT_PROJECTION]
    base_params = None if params is None else {k: v for k, v in params.items() if k not in shapes}
    model = model_cls(config, params=base_params, dtype=dtype)
    if not shapes:
        return model, None
    extra_params = None if params is None else {k: v for k, v in params.items() if k in shapes}
    return model, ExtraWeights(config, shapes, params=extra_params, dtype=dtype)


class Backbone:
    """A minilm base model (`Qwen3MoeModel`, `BloomModel`, ...) with keras-hub's call convention.

    The family classes (`Qwen3MoeBackbone`, ...) build the model from keras-hub's constructor
    arguments; `Backbone(model, extra_weights)` wraps a model built from a Hugging Face config, which
    is what `from_preset` returns for a checkpoint whose config keras-hub's arguments cannot express
    (it runs the checkpoint exactly; `get_config` then says what keras-hub lacks)."""

    def __init__(self, model, extra_weights=None):
        self.model = model  # the family's base model: every weight the hidden states need
        self.extra_weights = extra_weights  # ExtraWeights or None: see the module docstring

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

    def count_params(self):
        """Every weight the backbone holds, as keras' count_params() counts them (the output
        projection of untied embeddings included; after enable_lora, the LoRA kernels too)."""
        extra = self.extra_weights.num_parameters() if self.extra_weights is not None else 0
        total = self.model.num_parameters() + extra
        if self._lora_variables is not None:  # minilm's A and B replaced by keras' kernels (same count but BLOOM's)
            total -= sum(w.lora_A.size + w.lora_B.size for w in keras_lora.lora_weights(self.model).values())
            total += sum(math.prod(v.shape) for v in self._lora_variables if v.name.startswith("lora_kernel"))
        return total

    # -- LoRA, keras-hub's way (minilm/keras/lora.py) ---------------------------------------

    LORA = None  # the family's keras_lora.KerasLoraSpec
    _lora_variables = None

    def default_lora_layer_names(self):
        """keras-hub's default LoRA targets: the query and value dense layers."""
        return list(keras_lora.DEFAULT_LORA_LAYER_NAMES)

    def enable_lora(self, rank, target_layer_names=None):
        """Freeze every weight and enable LoRA (rank `rank`, alpha = rank) on the layers named
        `target_layer_names` (default: `default_lora_layer_names()`), as keras-hub does."""
        if target_layer_names is None:
            target_layer_names = self.default_lora_layer_names()
        keras_lora.enable_lora(self, _keras_class(self.config).LORA, rank, target_layer_names)

    @property
    def trainable_weights(self):
        """keras' trainable_weights (`keras_lora.Variable`s: path, shape, numpy(), assign())."""
        return keras_lora.trainable_weights(self)

    def to_device(self):
        """Prepare every weight for the active backend (`PreTrainedModel.to_device`)."""
        for weights in (self.model, self.extra_weights):
            if weights is not None:
                weights.to_device()
        return self

    def extra_weight(self, name):
        """One of `extra_weights` by its checkpoint name (e.g. "lm_head.weight"), or None."""
        return None if self.extra_weights is None else self.extra_weights.state_dict().get(name)

    @property
    def token_embedding(self):
        table = self.model.params[self.model.embedding_name.split(".")[0]].weight
        return TokenEmbedding(
            table,
            reverse_embeddings=self.extra_weight(OUTPUT_PROJECTION),
            tie_weights=self.config.tie_word_embeddings,
            logit_soft_cap=getattr(self.config, "final_logit_softcapping", None),
        )

    def __call__(self, inputs):
        """{"token_ids": (batch, seq), "padding_mask": (batch, seq)} -> (batch, seq, hidden_dim)"""
        if not isinstance(inputs, dict) or "token_ids" not in inputs:
            raise InputError('a backbone is called on {"token_ids": ..., "padding_mask": ...}')
        mask = inputs.get("padding_mask")
        mask = None if mask is None else np.asarray(mask).astype(np.int64)
        return self.model(input_ids=inputs["token_ids"], attention_mask=mask).last_hidden_state

    # -- presets --------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Load from a local folder (a Hugging Face checkpoint or a preset saved by `save_to_preset`),
        or `hf://owner/name` from the local Hugging Face cache, as keras-hub's `from_preset`:
        load_weights=False builds the architecture only (weights from init); keyword arguments
        override the preset's constructor arguments (e.g. dtype="bfloat16", dropout=0.1)."""
        folder = resolve_handle(preset)
        config = read_config_json(folder)
        if kwargs.get("dtype", "") is None:  # dtype=None: the preset's own
            del kwargs["dtype"]
        tensors = read_checkpoint(folder) if load_weights else None
        if "class_name" in config:  # a minilm (keras-style) preset
            backbone_cls = _backbone_class(config["class_name"])
            _check_family(cls, backbone_cls, preset)
            return backbone_cls(**{**config["config"], **kwargs}, params=tensors)
        model_cls = class_for_config(config)
        hf_config = model_cls.config_class.from_dict(config)
        backbone_cls = _keras_class(hf_config)
        _check_family(cls, backbone_cls, preset)
        try:
            args = backbone_cls.keras_args(hf_config)
        except ConfigError as e:  # keras-hub's arguments cannot say it: run the exact model all the same
            overrides = sorted(set(kwargs) - {"dtype"})
            if overrides:
                raise ConfigError(f"{preset}: cannot override {overrides}: {e}") from None
            base_cls = getattr(model_cls, "base_model_class", None) or model_cls
            return Backbone(*build_weights(base_cls, hf_config, tensors, kwargs.get("dtype")))
        # a head's checkpoint too: the base model ignores the head, lm_head.weight is the output projection
        return backbone_cls(**{**args, **kwargs}, params=tensors)

    def save_to_preset(self, folder):
        """Write config.json ({"class_name", "config"}) and model.safetensors (HF tensor names, plus
        `extra_weights` under theirs: lm_head.weight, ...)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"module": "minilm", "class_name": type(self).__name__, "config": self.get_config()}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_checkpoint(folder, self.checkpoint_tensors())

    def checkpoint_tensors(self):
        """{checkpoint name: array} of every weight: the model's (HF layout) and `extra_weights`."""
        tensors = self.model.to_checkpoint_layout(self.model.state_dict(), self.model.config)
        if self.extra_weights is not None:
            tensors.update(self.extra_weights.state_dict())
        return tensors


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

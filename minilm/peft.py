"""LoRA on the Hugging Face-style models, PEFT's way: adapt, count, merge, save and load adapters.

    model = minilm.from_pretrained("path/to/checkpoint")
    model.enable_lora(8, target_modules=["q_proj", "v_proj"], lora_alpha=16)   # PEFT's LoraConfig
    model.num_parameters(only_trainable=True)                                   # A and B only
    model.save_adapter("my-adapter")          # adapter_config.json + adapter_model.safetensors, as PEFT
    model.load_adapter("my-adapter")          # or an adapter PEFT saved (`PeftModel.save_pretrained`)
    model.merge_lora(); model.unmerge_lora()  # W + scaling B A in the weights, and back
    with model.disable_adapters(): ...        # the base model (transformers' name); also a plain call
    model.merge_and_unload()                  # plain weights again, the adapter folded in

What `enable_lora` does (PEFT 0.21's `get_peft_model(model, LoraConfig(...))`):

    every weight of the model is frozen (minilm trains only what `trainable_parameters` returns);
    each linear layer whose Hugging Face module name matches `target_modules` becomes a
    `LoraWeight` (minilm/lora.py): y = x W^T + (lora_alpha / r) * (x A^T) B^T, with
        A (r, in_features)   kaiming-uniform with a = sqrt(5), as torch's nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
        B (out_features, r)  zeros, so the adapted model starts as the base model
    target_modules: a list (a module matches when its name is an entry or ends with "." + entry), a
    string (a regular expression the whole name must match), or None: PEFT's default for the model
    type (gemma3_text: q_proj, v_proj; bloom: query_key_value; PEFT has none for qwen3_moe or phi3).

Module names are transformers' (`model.layers.0.self_attn.q_proj`), so a target means what it means in
PEFT. Where minilm keeps a checkpoint tensor in another layout, the adapter follows the layout:

    BLOOM query_key_value   one adapter on the fused (n_head, 3, head_dim, hidden) weight; B's rows in
                            the checkpoint's interleaved order, so keys are adapted too (as in PEFT)
    Phi-3 qkv_proj          minilm splits it into q_proj / k_proj / v_proj: one A shared by the three
    Phi-3 gate_up_proj      (the same array), B split by rows; saved back as PEFT's single B

The frozen base may be quantized (a GGUF model: QLoRA's idea); A and B are float32. Dropout on the
adapter's input (`lora_dropout`) is recorded in the adapter's config: at inference PEFT applies
none, and neither does minilm; `minilm.train` refuses to train with lora_dropout > 0, which it does
not implement.

Adapter files: adapter_config.json (PEFT's LoraConfig fields) and adapter_model.safetensors with PEFT's
tensor names: base_model.model.<module name>.lora_A.weight (r, in) and .lora_B.weight (out, r).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from . import ops
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError
from .io.safetensors import read_safetensors, write_safetensors
from .lora import LoraWeight

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
PEFT_VERSION = "0.21.2"  # the PEFT whose files these are checked against (tests/fixtures/lora)

# PEFT 0.21's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for minilm's model types
DEFAULT_TARGET_MODULES = {"gemma3_text": ["q_proj", "v_proj"], "bloom": ["query_key_value"]}

# The linear layers of each family, by their last name component (what LoRA may target). Routers,
# stacked experts, embeddings and the LM head are not targets here.
LINEAR_MODULES = {
    "gemma3_text": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}
# Hugging Face's fused linear layers that minilm keeps as parts: {fused name: the parts, in row order}
FUSED_MODULES = {"phi3": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}}


# ---------------------------------------------------------------------------------------------
# The config: PEFT's LoraConfig fields (what adapter_config.json holds)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoraConfig:
    """PEFT's LoraConfig, the fields minilm implements (defaults as PEFT 0.21's)."""

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list | str | None = None
    use_rslora: bool = False  # scaling lora_alpha / sqrt(r) instead of lora_alpha / r

    # Fields an adapter file may set that minilm does not implement: (field, the value it must have)
    UNSUPPORTED = {
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
        "target_parameters": None,
        "trainable_token_indices": None,
        "layer_replication": None,
        "exclude_modules": None,
        "use_qalora": False,
        "alora_invocation_tokens": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "arrow_config": None,
        "kasa_config": None,
        "velora_config": None,
        "monteclora_config": None,
        "use_bdlora": None,
        "megatron_config": None,
    }

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ConfigError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.target_modules is not None and not isinstance(self.target_modules, (list, str)):
            raise ConfigError(
                f"target_modules must be a list of names, a regex string or None; got {self.target_modules!r}"
            )

    @property
    def scaling(self):
        """PEFT: lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_dict(cls, d, source="adapter_config.json"):
        """From PEFT's adapter_config.json; CheckpointError naming a field whose value minilm does not implement."""
        if d.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{source}: peft_type {d.get('peft_type')!r} is not LoRA (the only one minilm reads)")
        for field, neutral in cls.UNSUPPORTED.items():
            value = d.get(field, neutral)
            if value != neutral and not (neutral in ({}, None) and not value):
                raise CheckpointError(f"{source}: {field}={value!r} is not implemented by minilm (only {neutral!r})")
        init = d.get("init_lora_weights", True)
        if init not in (True, False, "gaussian"):  # it only says how the adapter was initialised
            raise CheckpointError(f"{source}: init_lora_weights={init!r} is not implemented by minilm")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self, base_model_name_or_path=None, task_type="CAUSAL_LM"):
        """adapter_config.json as PEFT 0.21 writes it (its defaults for every field minilm leaves alone)."""
        targets = self.target_modules
        return {
            "alpha_pattern": {},
            "auto_mapping": None,
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "exclude_modules": None,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "layer_replication": None,
            "layers_pattern": None,
            "layers_to_transform": None,
            "lora_alpha": self.lora_alpha,
            "lora_bias": False,
            "lora_dropout": self.lora_dropout,
            "modules_to_save": None,
            "peft_type": "LORA",
            "peft_version": PEFT_VERSION,
            "r": self.r,
            "rank_pattern": {},
            "revision": None,
            "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "task_type": task_type,
            "use_dora": False,
            "use_rslora": self.use_rslora,
        }


# ---------------------------------------------------------------------------------------------
# Finding the linear layers by their Hugging Face names
# ---------------------------------------------------------------------------------------------


def node_at(params, path):
    """The node of the weight tree at a dotted path ("model.layers.0.self_attn.q_proj")."""
    node = params
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _walk(node, prefix=""):
    """(path, node) for every dict node of the weight tree."""
    items = enumerate(node) if isinstance(node, list) else node.items()
    for key, child in items:
        if isinstance(child, (dict, list)):
            path = f"{prefix}{key}"
            yield path, child
            yield from _walk(child, path + ".")


def linear_modules(model):
    """{Hugging Face module name: [(minilm module path, first row, last row + 1), ...]} for every layer
    LoRA may target. A fused module (Phi-3's qkv_proj) lists its parts in row order."""
    model_type = model.config.model_type
    names = LINEAR_MODULES.get(model_type)
    if names is None:
        raise ConfigError(f"LoRA is not implemented for model type {model_type!r}")
    fused = FUSED_MODULES.get(model_type, {})
    found = {}
    for path, node in _walk(model.params):
        if not isinstance(node, dict):
            continue
        for name in names:
            parts = fused.get(name, (name,))
            if all(isinstance(node.get(p), dict) and "weight" in node[p] for p in parts):
                rows, start = [], 0
                for p in parts:
                    weight = node[p]["weight"]
                    out = _out_features(weight)
                    rows.append((f"{path}.{p}", start, start + out))
                    start += out
                found[f"{path}.{name}"] = rows
    return found


def _out_features(weight):
    return int(np.prod(weight.shape[:-1]))


def matches(name, target_modules):
    """PEFT's rule: a regex string must match the whole name; a list entry matches the name itself or
    its last components (`name.endswith("." + entry)`)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def resolve_targets(model, config):
    """The Hugging Face module names `config.target_modules` picks; ConfigError when none (as PEFT)."""
    targets = config.target_modules
    if targets is None:
        targets = DEFAULT_TARGET_MODULES.get(model.config.model_type)
        if targets is None:
            raise ConfigError(
                f"PEFT has no default target_modules for model type {model.config.model_type!r}: pass "
                f"target_modules (e.g. ['q_proj', 'v_proj'])"
            )
        config.target_modules = list(targets)
    modules = linear_modules(model)
    chosen = {name: rows for name, rows in modules.items() if matches(name, config.target_modules)}
    if not chosen:
        kinds = LINEAR_MODULES[model.config.model_type]
        raise ConfigError(f"target_modules {config.target_modules!r} match no linear layer; this model has {kinds}")
    if isinstance(config.target_modules, list):
        unused = [t for t in config.target_modules if not any(matches(n, [t]) for n in chosen)]
        if unused:
            raise ConfigError(f"target_modules {unused} match no linear layer of this model")
    return chosen


# ---------------------------------------------------------------------------------------------
# Enabling, counting, freezing
# ---------------------------------------------------------------------------------------------


def kaiming_uniform_A(rng, rank, in_features):
    """torch's kaiming_uniform_(a=sqrt(5)) on (rank, in_features), as PEFT initialises A:
    gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in) = 1 / sqrt(in_features)."""
    bound = 1.0 / math.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)


def enable_lora(model, r=8, target_modules=None, lora_alpha=8, lora_dropout=0.0, use_rslora=False, seed=0):
    """Freeze the model and put a LoRA adapter on each targeted linear layer (PEFT's defaults).
    Returns the model's LoraConfig."""
    if getattr(model, "lora_config", None) is not None:
        raise ConfigError("LoRA is already enabled on this model (call merge_and_unload() first for a new adapter)")
    config = LoraConfig(r, lora_alpha, lora_dropout, target_modules, use_rslora)
    chosen = resolve_targets(model, config)
    rng = np.random.default_rng(seed)
    adapters = {}
    for name, parts in chosen.items():
        in_features = node_at(model.params, parts[0][0])["weight"].shape[-1]
        A = kaiming_uniform_A(rng, config.r, in_features)  # (r, in_features), shared by a fused module's parts
        B = np.zeros((parts[-1][2], config.r), np.float32)  # (out_features, r)
        adapters[name] = (A, B)
    _install(model, chosen, adapters, config)
    return config


def _install(model, chosen, adapters, config):
    """Wrap each chosen module's weight in a LoraWeight over the given A and B (rows split for fused modules)."""
    for name, parts in chosen.items():
        A, B = adapters[name]
        for path, start, stop in parts:
            node = node_at(model.params, path)
            base = node["weight"]
            node["weight"] = LoraWeight(
                base, ops.like(A, base), ops.like(np.ascontiguousarray(B[start:stop]), base), config.scaling
            )
    model.lora_config = config
    model.lora_modules = chosen


def lora_weights(model):
    """{minilm module path: LoraWeight} of every adapted layer (empty without LoRA)."""
    found = {}
    for parts in (getattr(model, "lora_modules", None) or {}).values():
        for path, _, _ in parts:
            weight = node_at(model.params, path)["weight"]
            if isinstance(weight, LoraWeight):
                found[path] = weight
    return found


def trainable_parameters(model):
    """{name: array} of what training changes: each adapted layer's lora_A and lora_B, named
    `<module path>.lora_A` / `.lora_B`. A fused module's parts share one A: it appears once, under
    its first part's name (`parameter_aliases` names the others)."""
    params, seen = {}, set()
    for path, weight in lora_weights(model).items():
        for kind in ("lora_A", "lora_B"):
            array = getattr(weight, kind)
            if storage_key(array) not in seen:
                seen.add(storage_key(array))
                params[f"{path}.{kind}"] = array
    return params


def parameter_aliases(model):
    """{name: the name `trainable_parameters` gives the same array}, for the names it leaves out (the
    shared A of a fused module's later parts): their gradients add up on the one array."""
    first, aliases = {}, {}
    for path, weight in lora_weights(model).items():
        for kind in ("lora_A", "lora_B"):
            name, key = f"{path}.{kind}", storage_key(getattr(weight, kind))
            if key in first:
                aliases[name] = first[key]
            else:
                first[key] = name
    return aliases


def storage_key(array):
    """Where an array's numbers live (address, shape): views of one array (A[None]) are one parameter."""
    interface = getattr(array, "__array_interface__", None) or array.__cuda_array_interface__
    return interface["data"][0], tuple(array.shape)


def count_parameters(model, only_trainable=False):
    """transformers' num_parameters: every distinct array of the model (a tied LM head once, a LoRA
    layer's base, A and B), or with only_trainable=True what `requires_grad` would hold: every weight
    without LoRA, the adapters' A and B with it."""
    if only_trainable and getattr(model, "lora_config", None) is not None:
        return int(sum(a.size for a in trainable_parameters(model).values()))
    seen, total = set(), 0
    for value in _leaves(model.params):
        arrays = (value.base, value.lora_A, value.lora_B) if isinstance(value, LoraWeight) else (value,)
        for a in arrays:
            key = storage_key(a) if hasattr(a, "__array_interface__") else id(a)  # a quantized weight: by object
            if key not in seen:
                seen.add(key)
                total += int(np.prod(a.shape))
    return total


def _leaves(node):
    items = enumerate(node) if isinstance(node, list) else node.items()
    for _, child in items:
        if isinstance(child, (dict, list)):
            yield from _leaves(child)
        else:
            yield child


# ---------------------------------------------------------------------------------------------
# Merge, unmerge, disable
# ---------------------------------------------------------------------------------------------


def merge_lora(model):
    """W <- W + scaling * B A in every adapted layer (one product less per layer at inference).
    The adapted layers then hold plain float arrays; the LoraWeights are kept aside, so that
    `unmerge_lora` gives back the exact base weights (no subtraction, no rounding)."""
    if getattr(model, "lora_merged", None):
        raise ConfigError("the adapter is already merged (unmerge_lora() first)")
    kept = {}
    for path, weight in lora_weights(model).items():
        node = node_at(model.params, path)
        node["weight"] = ops.like(weight.merged(), weight.lora_A)  # base + delta, the base's shape
        kept[path] = weight
    if not kept:
        raise ConfigError("this model has no LoRA adapter to merge")
    model.lora_merged = kept


def unmerge_lora(model):
    """Undo `merge_lora`: the adapted layers hold their LoraWeight (exact base, A, B) again."""
    kept = getattr(model, "lora_merged", None)
    if not kept:
        raise ConfigError("the adapter is not merged")
    for path, weight in kept.items():
        node_at(model.params, path)["weight"] = weight
    model.lora_merged = None


def merge_and_unload(model):
    """PEFT's merge_and_unload: fold the adapter into the weights and forget it (a plain model again)."""
    if not getattr(model, "lora_merged", None):
        merge_lora(model)
    model.lora_merged = model.lora_config = model.lora_modules = None
    return model


def set_adapters_enabled(model, enabled):
    for weight in lora_weights(model).values():
        weight.enabled = enabled


class _AdaptersDisabled:
    """What `disable_adapters()` returns: the adapters are off from the call on; used as a context
    manager (`with model.disable_adapters(): ...`) they are back on when the block ends."""

    def __init__(self, model):
        self.model = model
        set_adapters_enabled(model, False)

    def __enter__(self):
        return self.model

    def __exit__(self, *exc):
        set_adapters_enabled(self.model, True)


# ---------------------------------------------------------------------------------------------
# Adapter files, PEFT's format
# ---------------------------------------------------------------------------------------------


def adapter_state_dict(model):
    """{PEFT tensor name: array}: base_model.model.<module>.lora_A.weight (r, in), .lora_B.weight (out, r).
    A fused module's B is its parts' Bs stacked in row order."""
    _require_lora(model)
    if getattr(model, "lora_style", None) == "keras":
        raise ConfigError("keras-hub's per-head LoRA (Backbone.enable_lora) has no PEFT adapter format")
    tensors = {}
    for name, parts in model.lora_modules.items():
        weights = [_lora_of(model, path) for path, _, _ in parts]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = ops.to_host(weights[0].lora_A)[0]
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.concatenate([ops.to_host(w.lora_B) for w in weights])
    return tensors


def _lora_of(model, path):
    weight = node_at(model.params, path)["weight"]
    if not isinstance(weight, LoraWeight):
        kept = getattr(model, "lora_merged", None) or {}
        weight = kept.get(path)
    if weight is None:
        raise ConfigError(f"{path} holds no LoRA adapter")
    return weight


def _require_lora(model):
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ConfigError("this model has no LoRA adapter: call enable_lora(...) or load_adapter(...) first")
    return config


def save_adapter(model, folder, base_model_name_or_path=None):
    """Write adapter_config.json and adapter_model.safetensors, as PeftModel.save_pretrained does."""
    config = _require_lora(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(
        json.dumps(config.to_dict(base_model_name_or_path), indent=2, sort_keys=True) + "\n"
    )
    write_safetensors(folder / ADAPTER_WEIGHTS, adapter_state_dict(model), metadata={"format": "pt"})


def load_adapter(model, folder):
    """Read a PEFT adapter folder (made by PEFT or by `save_adapter`) onto the model: every LoRA
    tensor checked by name and shape against the modules the config targets."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointNotFoundError(f"{folder}: no {ADAPTER_CONFIG} (a PEFT adapter folder holds it)")
    if getattr(model, "lora_config", None) is not None:
        raise ConfigError("this model has an adapter already (merge_and_unload() first)")
    config = LoraConfig.from_dict(json.loads((folder / ADAPTER_CONFIG).read_text()), f"{folder / ADAPTER_CONFIG}")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS}")
    tensors = dict(read_safetensors(folder / ADAPTER_WEIGHTS))
    chosen = resolve_targets(model, config)
    adapters = {}
    for name, parts in chosen.items():
        in_features = node_at(model.params, parts[0][0])["weight"].shape[-1]
        expected = {"lora_A": (config.r, in_features), "lora_B": (parts[-1][2], config.r)}
        found = []
        for kind, shape in expected.items():
            key = f"{PEFT_PREFIX}{name}.{kind}.weight"
            if key not in tensors:
                raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: missing {key!r}")
            array = np.asarray(tensors.pop(key), dtype=np.float32)  # (a read-only map of the file)
            if array.shape != shape:
                raise CheckpointError(f"{key!r} has shape {array.shape}; the model and r={config.r} give {shape}")
            if not np.isfinite(array).all():
                raise CheckpointError(f"{key!r} holds NaN or infinite values")
            found.append(np.array(array, dtype=np.float32, order="C"))  # our own, writable copy (not the file map)
        adapters[name] = tuple(found)
    if tensors:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: tensors no targeted module has: {sorted(tensors)[:5]}")
    _install(model, chosen, adapters, config)
    return config

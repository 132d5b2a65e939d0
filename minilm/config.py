"""Config base class: a dataclass whose fields carry Hugging Face `config.json` names.

`from_dict` keeps the keys it knows, fills transformers' defaults for the rest, keeps unknown
keys aside (so a config round-trips), and raises a `ConfigError` naming the field when a value
is impossible. Both spellings of RoPE settings found on the Hub are accepted:
transformers 4 (`rope_theta` + `rope_scaling`) and transformers 5 (`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .errors import CheckpointError, CheckpointNotFoundError, ConfigError

# More layers than any model has: a config asking for more is corrupt, and refusing it up front
# keeps every per-layer loop (shapes, caches, layer types) bounded.
MAX_LAYERS = 10_000


@dataclasses.dataclass
class PretrainedConfig:
    model_type = ""  # class attribute, set by each family

    # Fields every family shares (names and defaults as in transformers' PretrainedConfig).
    architectures: list | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    tie_word_embeddings: bool = True
    num_labels: int = 2
    id2label: dict | None = None
    problem_type: str | None = None
    torch_dtype: str | None = None
    extra: dict = dataclasses.field(default_factory=dict, repr=False)

    # -- construction ---------------------------------------------------------------------

    def __post_init__(self):
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        self.validate()

    def validate(self):
        """Raise ConfigError naming the field when a value is impossible. Families extend this."""
        check_layer_count(self)
        for name in self.field_names():  # norm epsilons and RoPE bases: a bad one gives NaN, not an error
            value = getattr(self, name)
            if type(value) not in (int, float):
                continue
            if (name.endswith(("eps", "epsilon")) and not 0 <= value < math.inf) or (
                name in ("rope_theta", "rope_local_base_freq") and not 0 < value < math.inf
            ):
                bound = ">= 0" if name.endswith(("eps", "epsilon")) else "> 0"
                raise ConfigError(
                    f"{type(self).__name__}.{name}={value!r} is impossible (it must be finite and {bound})"
                )
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ConfigError(
                f"problem_type={self.problem_type!r} is not one of regression, "
                "single_label_classification, multi_label_classification"
            )

    @classmethod
    def field_names(cls):
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls, config_dict):
        """Build from a config.json dict: known keys kept, defaults filled, unknown kept in `extra`."""
        if not isinstance(config_dict, dict):
            raise ConfigError(f"{cls.__name__}: config.json must hold a JSON object, got {type(config_dict).__name__}")
        for name in ("rope_parameters", "rope_scaling", "id2label"):
            if config_dict.get(name) is not None and not isinstance(config_dict[name], dict):
                raise ConfigError(f"{cls.__name__}.{name} must be an object or null, got {config_dict[name]!r}")
        try:
            d = _normalise_rope_spelling(dict(config_dict))
            d = cls._rename_legacy_keys(d)
            if "dtype" in d and "torch_dtype" not in d:
                d["torch_dtype"] = d.pop("dtype")
            if "id2label" in d and d["id2label"] is not None:
                d.pop("num_labels", None)
            known = cls.field_names()
            kwargs = {k: v for k, v in d.items() if k in known}
            _check_types(cls, kwargs)
            extra = {k: v for k, v in d.items() if k not in known and k not in ("model_type", "label2id")}
            config = cls(**kwargs)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as error:
            if isinstance(error, ConfigError):
                raise
            # a value of a shape nothing above expected (a list where a number goes, deep inside
            # rope_scaling, ...): still an error about the config, never a traceback
            raise ConfigError(f"{cls.__name__}: config.json does not describe a valid config ({error!r})") from None
        config.extra = extra
        config.defaulted = sorted(known - kwargs.keys())  # fields config.json left out: defaults used
        return config

    @classmethod
    def _rename_legacy_keys(cls, d):
        """Families override to accept older spellings of a field (e.g. BLOOM's `n_embed`)."""
        return d

    def to_dict(self):
        """The config.json dict (transformers 4 spelling for RoPE, which transformers 5 also reads)."""
        d = {"model_type": self.model_type}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        if self.id2label is not None:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
            d["label2id"] = {v: k for k, v in self.id2label.items()}
        d.update(self.extra)
        return d

    def defaulted_sizes(self):
        """The integer fields (sizes, counts) that config.json did not set, with the defaults used:
        the usual suspects when the weights do not fit the config."""
        shared = PretrainedConfig.field_names()  # token ids, num_labels, ...: not the family's sizes
        names = [n for n in getattr(self, "defaulted", []) if n not in shared and type(getattr(self, n)) is int]
        return ", ".join(f"{n}={getattr(self, n)}" for n in names)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # -- files ----------------------------------------------------------------------------

    @classmethod
    def from_json_file(cls, path):
        return cls.from_dict(read_config_json(path))

    def save_pretrained(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# A field's annotation (a string under `from __future__ import annotations`) -> the JSON values it takes.
_JSON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,),
               "list": (list,), "None": (type(None),)}  # fmt: skip


def _check_types(cls, values):
    """ConfigError naming the field when a config.json value has the wrong JSON type (a string
    for a size, a list for a flag): caught here, not as a TypeError deep in the first matmul."""
    annotations = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in values.items():
        allowed = tuple(t for part in str(annotations[name]).split("|") for t in _JSON_TYPES.get(part.strip(), ()))
        if not allowed:
            continue
        wrong_bool = isinstance(value, bool) and bool not in allowed  # JSON true is not a size
        if wrong_bool or not isinstance(value, allowed):
            expected = str(annotations[name]).replace("|", "or")
            raise ConfigError(f"{cls.__name__}.{name} must be {expected}, got {value!r} ({type(value).__name__})")


def read_config_json(path):
    """Read config.json (or the config.json inside a folder) with clear errors."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointNotFoundError(f"no config file at {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _normalise_rope_spelling(d):
    """Map transformers 5's `rope_parameters` onto `rope_theta` + `rope_scaling`.

    rope_parameters = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, ...}
      -> rope_theta = 1e6, rope_scaling = {"rope_type": "yarn", "factor": 4.0, ...}
    A plain {"rope_type": "default", "rope_theta": ...} gives rope_scaling = None.
    Gemma 3 in transformers 5 nests one dict per layer type ({"full_attention": {...},
    "sliding_attention": {...}}); those become rope_theta / rope_local_base_freq / rope_scaling.
    """
    params = d.pop("rope_parameters", None)
    if not params:
        return d
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        sliding = dict(params.get("sliding_attention") or {})
        if "rope_theta" in sliding:
            d.setdefault("rope_local_base_freq", sliding["rope_theta"])
        params = full
    params = dict(params)
    if "rope_theta" in params:
        d.setdefault("rope_theta", params.pop("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" and d.get("rope_scaling") is None:
        d["rope_scaling"] = params
    if "partial_rotary_factor" in params:
        d.setdefault("partial_rotary_factor", params["partial_rotary_factor"])
    return d


def check_layer_count(config):
    """ConfigError for more layers than MAX_LAYERS, before anything loops over them."""
    layers = getattr(config, "num_hidden_layers", None)
    if type(layers) is int and layers > MAX_LAYERS:
        raise ConfigError(f"{type(config).__name__}.num_hidden_layers={layers} is not a model (at most {MAX_LAYERS})")


def check_positive(config, *names):
    """ConfigError unless each named field is a positive integer."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")

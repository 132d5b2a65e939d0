"""What every model shares: weights as a tree, loading and saving checkpoints, input checks,
and the output object with transformers' field names.

A model is its config plus a tree of NumPy arrays whose dotted paths are the checkpoint's
tensor names (`params.model.layers[0].self_attn.q_proj.weight` is the tensor
`model.layers.0.self_attn.q_proj.weight`). The forward pass is a plain function of that tree;
the classes here only hold it and check what comes in.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import nn, ops, peft
from .cache import KVCache, mask_for_cached_keys
from .config import read_config_json
from .errors import CheckpointError, ConfigError, InputError
from .io.safetensors import read_checkpoint, write_checkpoint

# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelOutput:
    """The fields transformers' output classes use; the ones a model does not produce are None.
    Readable as attributes (`out.logits`) or keys (`out["logits"]`)."""

    loss: object = None
    aux_loss: object = None
    logits: object = None
    start_logits: object = None
    end_logits: object = None
    last_hidden_state: object = None
    past_key_values: object = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    router_logits: tuple | None = None
    image_hidden_states: object = None  # Gemma 3: the images' soft tokens (num_images, mm_tokens_per_image, hidden)
    pooler_output: object = None  # get_image_features: the soft tokens (last_hidden_state: the vision features)

    def __getitem__(self, key):
        return getattr(self, key)

    def keys(self):
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


# ---------------------------------------------------------------------------------------------
# Weights as a tree
# ---------------------------------------------------------------------------------------------


class Params(dict):
    """A dict with attribute access: `p.self_attn.q_proj.weight`. Numbered children are lists.
    `p.path` is the node's checkpoint path ("model.layers.3.self_attn", set by `nest`): the
    name of its activations (`minilm.capture`)."""

    path = ""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def nest(flat):
    """{"layers.0.mlp.weight": a} -> Params(layers=[Params(mlp=Params(weight=a))])"""
    root = Params()
    for name, value in flat.items():
        node = root
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, Params())
        node[leaf] = value
    return _lists_for_numbers(root)


def _lists_for_numbers(node, path=""):
    if not isinstance(node, Params):
        return node
    children = {k: _lists_for_numbers(v, f"{path}.{k}" if path else k) for k, v in node.items()}
    if children and all(k.isdigit() for k in children):
        return [children[str(i)] for i in range(len(children))]
    params = Params(children)
    params.path = path
    return params


def flatten(tree, prefix=""):
    """The inverse of `nest`: {"layers.0.mlp.weight": a, ...}"""
    items = enumerate(tree) if isinstance(tree, list) else tree.items()
    flat = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (Params, list)):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def with_prefix(prefix, shapes):
    return {f"{prefix}.{k}": v for k, v in shapes.items()}


# ---------------------------------------------------------------------------------------------
# The model base class
# ---------------------------------------------------------------------------------------------


HEAD_TENSOR_ROOTS = ("lm_head", "score", "qa_outputs", "classifier")


class PreTrainedModel:
    """Holds `config` and `params`; loads, checks and saves checkpoints.

    A family's classes say which tensors they need (`parameter_shapes`), how a checkpoint's
    layout maps onto them (`to_model_layout`, `to_checkpoint_layout`), and how they compute
    (`forward`).
    """

    config_class = None
    base_model_prefix = "model"
    # Tensor names that transformers writes but that hold no weights (buffers) are skipped.
    ignored_checkpoint_keys = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")

    def __init__(self, config, *, params=None, dtype="float32", seed=0):
        if isinstance(config, dict):
            config = self.config_class.from_dict(config)
        if self.config_class is not None and not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.dtype = _as_dtype(dtype)
        bad = {name: shape for name, shape in self.parameter_shapes().items() if min(shape, default=1) < 1}
        if bad:  # a size in the config that is zero or negative (one the family's validate() does not name)
            name, shape = next(iter(bad.items()))
            raise ConfigError(f"the config gives tensor {name!r} the shape {shape}: a size in it is not positive")
        check_memory(self.weight_bytes(random_init=params is None), f"{type(self).__name__} in {self.dtype.name}")
        if params is None:
            params = self.init_params(seed)
        self.load_state_dict(params)

    def weight_bytes(self, random_init=False):
        """Bytes the weights take in the model's dtype (a random init also holds a float32 copy).
        An upper bound for a GGUF model whose backend keeps the weights quantized."""
        tied = self.tied_weights()
        values = sum(math.prod(shape) for name, shape in self.parameter_shapes().items() if name not in tied)
        return values * (self.dtype.itemsize + (4 if random_init else 0))

    # -- what the family provides ---------------------------------------------------------

    def parameter_shapes(self):
        """{tensor name: shape} of every weight this model needs, in checkpoint naming."""
        raise NotImplementedError

    def tied_weights(self):
        """{name: name it shares storage with}; e.g. a tied LM head."""
        return {}

    @classmethod
    def to_model_layout(cls, tensors, config):
        """Turn a checkpoint's layout into the model's (stack experts, split fused tensors)."""
        return tensors

    @classmethod
    def to_checkpoint_layout(cls, tensors, config):
        """The inverse of to_model_layout: the layout written by save_pretrained."""
        return tensors

    def backbone_roots(self):
        """First name components of the backbone's tensors (used to fix prefixes on load)."""
        return set()

    # -- weights --------------------------------------------------------------------------

    def init_params(self, seed=0):
        """Random weights like transformers' init: normal(0, initializer_range) matrices,
        ones for norm weights, zeros for biases."""
        rng = np.random.default_rng(seed)
        std = getattr(self.config, "initializer_range", 0.02)
        params = {}
        for name, shape in self.parameter_shapes().items():
            if name in self.tied_weights():
                continue
            if name.endswith("bias"):
                params[name] = np.zeros(shape, np.float32)
            elif len(shape) == 1:
                params[name] = np.full(shape, self.norm_init_value(), np.float32)
            else:
                params[name] = rng.normal(0.0, std, size=shape).astype(np.float32)
        return params

    def norm_init_value(self):
        return 1.0

    def state_dict(self):
        """Flat {tensor name: array} in the model's own layout (tied tensors included)."""
        return flatten(self.params)

    def load_state_dict(self, tensors):
        """Check names and shapes against the config, convert dtype, and install the weights.

        Every problem names the tensor: missing, unexpected, mis-shaped, non-finite.

        The weights are copied (and converted to the model's dtype) into one new buffer, one after
        the other in the order `parameter_shapes` lists them, which is the order a forward pass
        reads them. The checkpoint's arrays are never kept (a read-only memory map, the caller's
        arrays), and a decode step streams through one region of memory, which NumPy backs with
        huge pages where the system allows (faster than one array per tensor, because decode is
        bound by memory traffic). Each weight is a view of the buffer.

        A GGUF matrix the active backend computes with as blocks (`ops.reads_quantized`, e.g.
        Q4_K on numba) is not copied at all: it stays a `QuantizedWeight` over the memory-mapped
        file and takes no room in the buffer. On the NumPy reference every weight is float32."""
        tensors = self._align_prefix({k: v for k, v in tensors.items() if not k.endswith(self.ignored_checkpoint_keys)})
        tensors = self.to_model_layout(tensors, self.config)
        expected = self.parameter_shapes()
        tied = self.tied_weights()  # e.g. {"lm_head.weight": "model.embed_tokens.weight"}
        missing = [k for k in expected if k not in tensors and k not in tied]
        unexpected = [k for k in tensors if k not in expected]
        hint = f" (does config.json match the checkpoint? {type(self).__name__} expects {len(expected)} tensors"
        if self.config.defaulted_sizes():
            hint += f"; config.json does not set {self.config.defaulted_sizes()}, so these defaults were used"
        hint += ")"
        if missing:
            raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {_first(missing)}{hint}")
        if unexpected:
            raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {_first(unexpected)}{hint}")
        converted = self._kept_quantized(tensors, expected, tied)  # GGUF matrices the backend reads as blocks
        align = max(64 // self.dtype.itemsize, 1)  # every weight starts on a 64-byte cache line
        padded = {
            name: -(-math.prod(shape) // align) * align
            for name, shape in expected.items()
            if name not in tied and name not in converted
        }
        storage = np.empty(sum(padded.values()), dtype=self.dtype)  # all the weights, in order
        offset = 0
        for name, shape in expected.items():
            if name in tied or name in converted:
                continue
            if tuple(tensors[name].shape) != tuple(shape):
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(tensors[name].shape)} but the config gives {tuple(shape)}{hint}"
                )
            weight = storage[offset : offset + math.prod(shape)].reshape(shape)  # (shape) view, C order
            offset += padded[name]
            read_into = getattr(tensors[name], "read_into", None)
            if read_into is not None and self.dtype == np.float32:
                read_into(weight)  # a GGUF tensor, dequantized straight into its place
            else:
                array = np.asarray(tensors[name])  # read now, one tensor at a time
                if array.dtype.kind not in "fV":  # V: bfloat16 from ml_dtypes
                    raise CheckpointError(f"tensor {name!r} has dtype {array.dtype}, expected a floating-point type")
                np.copyto(weight, array, casting="unsafe")  # the copy and the dtype conversion
                del array
            if not np.isfinite(weight.astype(np.float32, copy=False)).all():
                raise CheckpointError(f"tensor {name!r} holds NaN or infinite values (corrupt checkpoint?)")
            converted[name] = ops.prepare_weight(weight)  # once, at load: the form the backend reads
        for name, source in tied.items():
            converted[name] = converted[source]  # one array, two names
        self.params = nest(converted)

    def _kept_quantized(self, tensors, expected, tied):
        """{name: QuantizedWeight} for the GGUF matrices that stay in their blocks: those the active
        backend computes with (`ops.reads_quantized`) in a float32 model. They take no room in the
        float32 buffer; every other tensor is dequantized into it, as before."""
        kept = {}
        # the first load of a model prepares (and caches) the form the kernels read: a bar if slow
        for name, shape in tqdm(expected.items(), desc="Preparing weights", unit="tensor", delay=1.0, leave=False):
            quantized = getattr(tensors.get(name), "quantized", None)  # a GGUFTensor's blocks
            weight = quantized() if quantized is not None and name not in tied else None
            if (
                weight is not None
                and self.dtype == np.float32
                and tuple(weight.shape) == tuple(shape)
                and ops.reads_quantized(weight)
            ):
                kept[name] = ops.prepare_weight(weight)
        return kept

    def _align_prefix(self, tensors):
        """Accept a backbone saved on its own, or under another head's prefix (`model.` /
        `transformer.`), as transformers does."""
        roots = self.backbone_roots()
        ours = self.base_model_prefix if self.has_head else ""
        aligned = {}
        for name, value in tensors.items():
            first, _, rest = name.partition(".")
            if first in ("model", "transformer") and rest.split(".")[0] in roots:
                name = rest
            elif first not in roots:
                if self.has_head or first not in HEAD_TENSOR_ROOTS:
                    aligned[name] = value  # a head tensor, e.g. lm_head.weight
                continue  # a bare base model ignores a head's tensors, as transformers does
            aligned[f"{ours}.{name}" if ours else name] = value
        return aligned

    has_head = False

    def to_device(self):
        """Prepare the weights for the active backend (`ops.prepare_weight`): the GPU for cupy,
        int8 block codes for numba, plain host arrays for numpy. Call it after switching backend,
        e.g. `set_backend("numpy")` then `to_device()` brings the weights back from the GPU."""
        moved, by_id = {}, {}  # tied weights stay one array
        for name, array in self.state_dict().items():
            if id(array) not in by_id:
                by_id[id(array)] = ops.prepare_weight(ops.to_host(array))
            moved[name] = by_id[id(array)]
        self.params = nest(moved)
        return self

    def num_parameters(self, only_trainable=False):
        """Every distinct weight (a tied head once), as transformers counts; only_trainable=True:
        with LoRA enabled, the adapters' A and B alone (`minilm.peft.count_parameters`)."""
        return peft.count_parameters(self, only_trainable)

    # -- LoRA, PEFT's way (minilm/peft.py) ------------------------------------------------

    lora_config = None  # a peft.LoraConfig once enable_lora / load_adapter ran

    def enable_lora(self, r=8, target_modules=None, lora_alpha=8, lora_dropout=0.0, use_rslora=False, seed=0):
        """Freeze every weight and adapt the targeted linear layers with LoRA, as PEFT's
        `get_peft_model(model, LoraConfig(r, lora_alpha, target_modules, lora_dropout))`."""
        return peft.enable_lora(self, r, target_modules, lora_alpha, lora_dropout, use_rslora, seed)

    def trainable_parameters(self):
        """{name: array} of the LoRA A and B matrices (what training changes)."""
        return peft.trainable_parameters(self)

    def merge_lora(self):
        """Fold the adapter into the weights (W + scaling B A); `unmerge_lora` undoes it exactly."""
        peft.merge_lora(self)
        return self

    def unmerge_lora(self):
        peft.unmerge_lora(self)
        return self

    def merge_and_unload(self):
        """PEFT's merge_and_unload: a plain model with the adapter folded in."""
        return peft.merge_and_unload(self)

    def disable_adapters(self):
        """Compute with the base weights alone; as a context manager, only inside the block."""
        return peft._AdaptersDisabled(self)

    def enable_adapters(self):
        peft.set_adapters_enabled(self, True)
        return self

    def save_adapter(self, folder):
        """adapter_config.json + adapter_model.safetensors, PEFT's format and tensor names."""
        peft.save_adapter(self, folder)

    def load_adapter(self, folder):
        """Load a PEFT adapter folder (PEFT's or minilm's) onto this model."""
        return peft.load_adapter(self, folder)

    # -- files ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, dtype="float32"):
        """Load a Hugging Face checkpoint folder (config.json + model.safetensors or shards)."""
        path = Path(path)
        config = cls.config_class.from_dict(read_config_json(path))
        return cls(config, params=read_checkpoint(path), dtype=dtype)

    def save_pretrained(self, folder, *, max_shard_bytes=None):
        """Write config.json + safetensors in the layout transformers (and the Hub) use."""
        if self.lora_config is not None:
            raise ConfigError(
                "this model holds a LoRA adapter: save_adapter(folder) saves it; after merge_and_unload() "
                "save_pretrained saves the merged model"
            )
        folder = Path(folder)
        self.config.architectures = [type(self).__name__]
        self.config.save_pretrained(folder)
        tensors = {k: np.asarray(v) for k, v in self.state_dict().items() if k not in self.tied_weights()}
        write_checkpoint(folder, self.to_checkpoint_layout(tensors, self.config), max_shard_bytes=max_shard_bytes)

    # -- calling --------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def __repr__(self):
        return f"{type(self).__name__}({self.num_parameters():,} parameters, dtype={self.dtype.name})"


def available_memory():
    """Bytes this process can still allocate: MemAvailable (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every OS offers these
        return None


def check_memory(needed, what):
    """ConfigError before allocating weights that cannot fit in memory, with both numbers.
    MINILM_SKIP_MEMORY_CHECK=1 skips the check (swap, memory that frees up later, ...)."""
    if os.environ.get("MINILM_SKIP_MEMORY_CHECK") == "1":
        return
    available = available_memory()
    if available is not None and needed > available:
        raise ConfigError(
            f"{what} needs {needed / 2**30:,.1f} GiB for its weights but this machine has "
            f"{available / 2**30:,.1f} GiB available (a smaller dtype such as bfloat16 halves it; "
            "MINILM_SKIP_MEMORY_CHECK=1 tries anyway)"
        )


def _first(names, n=5):
    shown = ", ".join(repr(k) for k in names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _as_dtype(dtype):
    import ml_dtypes

    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        return np.dtype(ml_dtypes.bfloat16)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from None
    if dtype not in (np.float32, np.float16, np.float64, np.dtype(ml_dtypes.bfloat16)):
        raise ConfigError(f"dtype {dtype} is not a floating-point type minilm computes in")
    return dtype


# ---------------------------------------------------------------------------------------------
# Input checks: clear errors instead of a stack trace from deep inside NumPy
# ---------------------------------------------------------------------------------------------


def check_model_inputs(config, input_ids, inputs_embeds, attention_mask, position_ids, past_length):
    """Validate and normalise the inputs of a forward pass.

    Returns (input_ids or None, inputs_embeds or None, attention_mask or None, batch, seq)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise InputError(f"input_ids must have shape (batch, seq); got shape {input_ids.shape}")
        if input_ids.size and not np.issubdtype(input_ids.dtype, np.integer):
            raise InputError(f"input_ids must be integers; got dtype {input_ids.dtype}")
        input_ids = input_ids.astype(np.int64, copy=False)
        vocab = config.vocab_size
        bad = (input_ids < 0) | (input_ids >= vocab)
        if bad.any():
            b, s = np.argwhere(bad)[0]
            raise InputError(
                f"token id {int(input_ids[b, s])} at position (batch {b}, seq {s}) is out of range "
                f"for vocab_size={vocab}"
            )
        batch, seq = input_ids.shape
    else:
        if not hasattr(inputs_embeds, "shape"):  # a list; arrays stay where they are (the GPU for cupy)
            inputs_embeds = np.asarray(inputs_embeds)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise InputError(
                f"inputs_embeds must have shape (batch, seq, hidden_size={config.hidden_size}); "
                f"got {inputs_embeds.shape}"
            )
        batch, seq = inputs_embeds.shape[:2]
    if seq == 0:
        raise InputError("the input sequence is empty (seq = 0)")
    if attention_mask is not None:
        attention_mask = np.asarray(attention_mask)
        if attention_mask.shape != (batch, past_length + seq):
            raise InputError(
                f"attention_mask has shape {attention_mask.shape} but the input needs (batch, past + seq) = "
                f"({batch}, {past_length + seq})"
            )
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    if position_ids is not None:
        position_ids = np.asarray(position_ids)
        if position_ids.ndim != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
            raise InputError(
                f"position_ids must have shape (batch or 1, seq) = ({batch}, {seq}); got {position_ids.shape}"
            )
    return input_ids, inputs_embeds, attention_mask, batch, seq


def prepare_inputs(
    config,
    weights,
    input_ids=None,
    inputs_embeds=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    use_cache=None,
    new_cache=None,
    token_type_ids=None,
):
    """Everything a family's model function starts from, checked and set up once (`ForwardInputs`).

    weights: any weight of the model; small arrays built on the host (masks, positions, cos/sin)
      are placed next to it. new_cache(config): the cache `use_cache=True` starts with when none
      is passed (default: `KVCache`, which keeps every position). token_type_ids (Gemma 3 with
      images): (batch, past + seq), 1 on image tokens; tokens of one image attend to each other."""
    past = past_key_values.get_seq_length() if past_key_values is not None else 0
    input_ids, inputs_embeds, attention_mask, batch, seq = check_model_inputs(
        config, input_ids, inputs_embeds, attention_mask, position_ids, past
    )
    if use_cache and past_key_values is None:
        past_key_values = new_cache(config) if new_cache else KVCache(config.num_hidden_layers)
    if position_ids is None:
        position_ids = np.arange(past, past + seq)[None]  # (1, seq); generate() passes mask-aware positions
    image_blocks = None
    if token_type_ids is not None:
        token_type_ids = np.asarray(token_type_ids)
        if token_type_ids.shape != (batch, past + seq):
            raise InputError(
                f"token_type_ids has shape {token_type_ids.shape} but the input needs (batch, past + seq) = "
                f"({batch}, {past + seq}): one entry per token from the start of the sequence"
            )
        if not ((token_type_ids == 0) | (token_type_ids == 1)).all():
            raise InputError("token_type_ids must hold only 0 (text) and 1 (image token)")
        image_blocks = nn.image_block_ids(token_type_ids)  # (batch, past + seq)
    return ForwardInputs(
        input_ids,
        inputs_embeds,
        attention_mask,
        np.asarray(position_ids),
        past_key_values,
        past,
        batch,
        seq,
        weights,
        image_blocks=image_blocks,
    )


class ForwardInputs:
    """One forward call, as every family sees it:

        input_ids       (batch, seq) int64, or None when inputs_embeds are given
        inputs_embeds   (batch, seq, hidden_size) or None
        attention_mask  (batch, past + seq) of 0/1, or None: every position is a token
        position_ids    (batch or 1, seq): as given, else past .. past + seq - 1
        cache           the KV cache, or None (no cache passed and use_cache off)
        past            positions already in the cache (0 without one)
        image_blocks    (batch, past + seq) image index per token, -1 for text; or None (`nn.image_block_ids`)

    `embed` looks the ids up, `mask` builds the attention mask for the keys a layer attends to,
    `place` puts a host-built array where the weights live, `output` assembles the result."""

    def __init__(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, past, batch, seq, weights,
                 image_blocks=None):  # fmt: skip
        self.input_ids, self.inputs_embeds, self.attention_mask = input_ids, inputs_embeds, attention_mask
        self.position_ids, self.cache, self.past, self.batch, self.seq = position_ids, cache, past, batch, seq
        self.image_blocks = image_blocks
        self._weights = weights
        self._masks = {}

    def place(self, array):
        """A host-built array (mask, positions, cos/sin) where the weights live (GPU for cupy)."""
        return ops.like(array, self._weights)

    def embed(self, table, lookup=None):
        """The input vectors: lookup(input_ids, table) (default table[input_ids]), or inputs_embeds
        as given, in the table's dtype. -> (batch, seq, hidden_size)"""
        if self.inputs_embeds is not None:
            return self.place(self.inputs_embeds).astype(table.dtype)
        ids = self.place(self.input_ids)
        return table[ids] if lookup is None else lookup(ids, table)

    def mask(self, window=None, kv_seq=None):
        """(batch or 1, 1, seq, kv_seq) bool: may query i attend to key j? Causal, within `window`
        when given, never to padding; tokens of one image see each other both ways when the input has
        image blocks. The keys are the last kv_seq positions a cache returned
        (default: all past + seq). Built once per (window, kv_seq) and shared by the layers."""
        kv_seq = self.past + self.seq if kv_seq is None else kv_seq
        if (window, kv_seq) not in self._masks:
            # built where the weights live (on the GPU for cupy: a prompt of 2048 tokens makes a
            # 2048 x 2048 mask, cheaper to compute there than to build on the host and copy)
            q_idx = self.place(np.arange(self.past, self.past + self.seq))  # the queries' columns in attention_mask
            padding, blocks = (None if a is None else self.place(a) for a in (self.attention_mask, self.image_blocks))
            self._masks[window, kv_seq] = mask_for_cached_keys(padding, q_idx, kv_seq, window, blocks)
        return self._masks[window, kv_seq]

    def output(self, x, hidden_states=None, attentions=None, router_logits=None):
        """The base model's ModelOutput: final hidden states, the cache, and whichever per-layer
        lists were collected (None: not requested)."""
        return ModelOutput(
            last_hidden_state=x,
            past_key_values=self.cache,
            hidden_states=None if hidden_states is None else tuple(hidden_states),
            attentions=None if attentions is None else tuple(attentions),
            router_logits=None if router_logits is None else tuple(router_logits),
        )


class BaseModel(PreTrainedModel):
    """A family's bare transformer (no head): its forward returns the final hidden states.

    Families define `backbone_shapes(config)` and `backbone_forward(params, config, ...)` as
    class-level functions so that every head can run the same backbone on its own weights."""

    embedding_name = "embed_tokens.weight"

    def parameter_shapes(self):
        return self.backbone_shapes(self.config)

    def backbone_roots(self):
        return {name.split(".")[0] for name in self.backbone_shapes(self.config)}

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=False,
        output_hidden_states=False,
        **extra,
    ):
        return self.backbone_forward(
            self.params,
            self.config,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **extra,
        )

"""Activations by name: look at (or replace) any tensor inside a forward pass, on any backend.

    with minilm.capture("layers.*.self_attn.attn_weights", "layers.1.mlp.router_probs") as acts:
        model(input_ids)
    acts["layers.0.self_attn.attn_weights"]  # a NumPy array on the host, whatever the backend

    def zero_head(a, h):  # a: (batch, num_heads, seq, head_dim)
        a[:, h] = 0
        return a

    with minilm.intervene({"layers.1.self_attn.attn_output_heads": lambda a: zero_head(a, 2)}):
        out = model(input_ids)  # the same forward pass with head 2 of layer 1 silenced

    minilm.capture_names(model)  # every name this model offers, in the order the forward computes them

Names. A name is the checkpoint path of the module (`layers.3.self_attn`, `layers.3.mlp`, BLOOM's
`h.3.self_attention`; the head prefix `model.` / `transformer.` may be given or left out) plus the
name of the quantity in the model file: `layers.3.self_attn.queries_rope`. `docs/activations.md`
lists every name of every family with its shape and meaning (generated from `capture_names`).
In a pattern, `*` stands for any part of one dotted component (`layers.*.mlp.output`) and `**`
for anything, dots included (`**` alone: every name).

How it works. Each quantity is marked in the model file by one line that reads like a comment:

    q = tap(p, "queries_rope", q)  # (batch, num_heads, seq, head_dim)

`p` is the module's weights (a `Params` node, which knows its checkpoint path, see `nest`), so
no layer index travels anywhere. When no `capture` / `intervene` block is active, `tap` checks one
module-level list and returns `x` itself: no copy, no lookup (README, "Activations by name", gives
the measured cost). Inside a block, a tapped name that a pattern matches is first replaced (by
`intervene`'s function), then recorded (by `capture`, as a host copy), and flows on.

Inside attention. The scores and weights live inside `ops.attention`, which the Numba and CuPy
kernels compute without ever storing scores. When a block asks for `scores`, `scores_masked` or
`attn_weights` of a layer, that layer's attention runs the NumPy reference
(`ops.attention_reference`, which taps them) on host copies of q, k, v, and its output goes back
where the model runs (the GPU for CuPy). It equals the kernel's to float32 rounding. No other
name changes which code runs.

Several forward passes (generate). Every forward pass inside the block adds one array per name:
`acts[name]` is the array of the last pass, `acts.all(name)` the list of every pass in order
(`model.generate` makes one pass for the prompt, then one per new token, whose arrays cover only
the new position: queries (batch, num_heads, 1, head_dim), attention weights over every key so
far, (batch, num_heads, 1, kv_seq)).

A pattern that matched no name by the end of the block raises `ActivationNameError` naming the
closest names, so a typo is never silent. The hooks are global to the process (not per thread) and
are removed when the block ends, also when it ends with an exception.
"""

from __future__ import annotations

import difflib
import re
from contextlib import contextmanager

import numpy as np

from .errors import ActivationNameError, InputError

# The active capture / intervene blocks, outermost first. Empty: `tap` returns at once (and `ops.attention`
# runs its backend without asking `wants`).
hooks = []

# First components that name a head's base model in checkpoints, not a module of it.
BASE_MODEL_PREFIXES = ("model", "transformer")


# ---------------------------------------------------------------------------------------------
# What model files call
# ---------------------------------------------------------------------------------------------


def tap(p, quantity, x):
    """The quantity `quantity` of the module whose weights are `p`, e.g. tap(p, "queries_rope", q).
    Returns x itself unless a `capture` / `intervene` block is active (then maybe a replacement).
    p=None (a caller that names no module, e.g. a kernel's fallback to the reference) taps nothing."""
    if not hooks or p is None:  # the only cost when nothing is captured: the first check
        return x
    return _tapped(name_of(p, quantity), x)


def wants(p, *quantities):
    """Does an active block ask for one of these quantities of module `p`? (ops.attention asks
    before it lets a kernel compute what it cannot tap.) The names count as offered either way."""
    if not hooks or p is None:
        return False
    names = [name_of(p, q) for q in quantities]
    for hook in hooks:
        for name in names:
            hook.saw(name)
    return any(hook.matches(name) for hook in hooks for name in names)


def name_of(p, quantity):
    """`layers.3.self_attn` + `queries_rope` -> "layers.3.self_attn.queries_rope" (no base-model prefix)."""
    path = getattr(p, "path", "")
    return canonical(f"{path}.{quantity}" if path else quantity)


def canonical(name):
    """A name without the base-model prefix: "model.layers.0.mlp" -> "layers.0.mlp"."""
    first, dot, rest = name.partition(".")
    return rest if dot and first in BASE_MODEL_PREFIXES else name


def _tapped(name, x):
    for hook in hooks:
        hook.saw(name)
    for hook in hooks:  # replacements first, so that every capture records what flows on
        if isinstance(hook, _Intervention):
            x = hook.replace(name, x)
    for hook in hooks:
        if isinstance(hook, _Capture):
            hook.record(name, x)
    return x


# ---------------------------------------------------------------------------------------------
# Patterns
# ---------------------------------------------------------------------------------------------


def compile_pattern(pattern):
    """A glob over dotted names: `*` = any part of one component, `**` = anything (dots included)."""
    if not isinstance(pattern, str) or not pattern:
        raise InputError(f"an activation name or pattern must be a non-empty string; got {pattern!r}")
    parts = re.split(r"(\*\*|\*)", canonical(pattern))
    regex = "".join({"**": ".*", "*": "[^.]*"}.get(part, re.escape(part)) for part in parts)
    return re.compile(regex)


def close_matches(name, names):
    """Up to five names close to `name` (difflib), for error messages."""
    pool = sorted(set(names))
    return difflib.get_close_matches(canonical(name), pool, n=5, cutoff=0.5)


class _Hook:
    """One active block: its patterns, which of them matched, every name seen while active."""

    def __init__(self, patterns):
        self.patterns = {pattern: compile_pattern(pattern) for pattern in patterns}
        self.matched = set()  # the patterns that matched a tapped name
        self.seen = {}  # every tapped name, in first-seen order (dict as an ordered set)
        self._match_cache = {}  # name -> the patterns matching it

    def matching(self, name):
        if name not in self._match_cache:
            self._match_cache[name] = [p for p, regex in self.patterns.items() if regex.fullmatch(name)]
        return self._match_cache[name]

    def matches(self, name):
        return bool(self.matching(name))

    def saw(self, name):
        self.seen[name] = None

    def check(self, what):
        """ActivationNameError for a pattern that matched nothing (a typo, a quantity the family lacks)."""
        unmatched = [p for p in self.patterns if p not in self.matched]
        if not unmatched:
            return
        if not self.seen:
            raise ActivationNameError(
                f"{what} recorded nothing: no forward pass ran inside the `with` block (patterns {unmatched})"
            )
        lines = []
        for pattern in unmatched:
            near = close_matches(pattern, self.seen)
            lines.append(f"{pattern!r} (close: {', '.join(near)})" if near else repr(pattern))
        raise ActivationNameError(
            f"{what}: no activation matches {'; '.join(lines)}. minilm.capture_names(model) lists every name "
            f"this model offers ({len(self.seen)} were computed here); `*` matches within one dotted component"
        )


class _Capture(_Hook):
    def __init__(self, patterns, record_all=False):
        super().__init__(patterns)
        self.activations = Activations()
        self.record_all = record_all  # capture_names: record names only, match everything

    def matching(self, name):
        return ["**"] if self.record_all else super().matching(name)

    def record(self, name, x):
        if self.record_all:
            self.activations._steps.setdefault(name, [])
            return
        patterns = self.matching(name)
        if patterns:
            self.matched.update(patterns)
            self.activations._steps.setdefault(name, []).append(to_host_copy(x))


class _Intervention(_Hook):
    def __init__(self, replacements):
        if not isinstance(replacements, dict) or not replacements:
            raise InputError(
                "intervene takes a non-empty dict {name or pattern: function(array) -> array}; "
                f"got {type(replacements).__name__}"
            )
        for pattern, fn in replacements.items():
            if not callable(fn):
                raise InputError(f"intervene: the value for {pattern!r} must be a function of the array; got {fn!r}")
        super().__init__(replacements)
        self.functions = dict(replacements)

    def replace(self, name, x):
        for pattern in self.matching(name):
            self.matched.add(pattern)
            copy = x.copy()  # the function may change its argument in place
            result = self.functions[pattern](copy)
            result = copy if result is None else result
            if tuple(getattr(result, "shape", ())) != tuple(x.shape):
                raise InputError(
                    f"intervene: the function for {pattern!r} returned shape {getattr(result, 'shape', None)} "
                    f"for {name!r}, which has shape {tuple(x.shape)}; it must keep the shape"
                )
            if isinstance(x, np.ndarray):
                x = np.asarray(result, dtype=x.dtype)
            else:  # a GPU array: the result goes back where x lives
                x = np.asarray(result, like=x).astype(x.dtype, copy=False)
        return x


def to_host_copy(x):
    """A NumPy copy of x (from the GPU when x lives there): captured arrays never change later."""
    return x.get() if hasattr(x, "__cuda_array_interface__") else np.array(x)


# ---------------------------------------------------------------------------------------------
# The public API
# ---------------------------------------------------------------------------------------------


class Activations:
    """What `capture` recorded: `acts[name]` is the array of the last forward pass, `acts.all(name)`
    the arrays of every forward pass in order (one per `generate` step). Also `name in acts`,
    `list(acts)` (the names, in forward order), `len(acts)`, `acts.items()`."""

    def __init__(self):
        self._steps = {}  # name -> [array per forward pass]

    def __getitem__(self, name):
        return self.all(name)[-1]

    def all(self, name):
        """Every forward pass's array for `name`, in order."""
        steps = self._steps.get(canonical(name)) if isinstance(name, str) else None
        if steps is None:
            near = close_matches(name, self._steps) if isinstance(name, str) else []
            raise ActivationNameError(
                f"{name!r} was not captured; captured: {len(self._steps)} names"
                + (f", close: {', '.join(near)}" if near else "")
            )
        return list(steps)

    def __contains__(self, name):
        return isinstance(name, str) and canonical(name) in self._steps

    def __iter__(self):
        return iter(self._steps)

    def __len__(self):
        return len(self._steps)

    def keys(self):
        return list(self._steps)

    def items(self):
        return [(name, steps[-1]) for name, steps in self._steps.items()]

    def __repr__(self):
        return f"Activations({', '.join(f'{n}: {s[-1].shape}' for n, s in self._steps.items())})"


@contextmanager
def capture(*patterns):
    """Record the activations whose names match `patterns` during the block; yields `Activations`.

        with minilm.capture("layers.*.self_attn.attn_weights", "logits") as acts:
            model(input_ids)
        acts["layers.0.self_attn.attn_weights"]  # (batch, num_heads, seq, kv_seq) NumPy array

    Every pattern must match at least one name by the end of the block, else ActivationNameError
    (with the closest names). `capture("**")` records everything."""
    if not patterns:
        raise InputError('capture needs at least one name or pattern (capture("**") records every activation)')
    hook = _Capture(patterns)
    hooks.append(hook)
    try:
        yield hook.activations
    finally:
        hooks.remove(hook)
    hook.check("capture")


@contextmanager
def intervene(replacements):
    """Replace activations during the block: {name or pattern: fn}. fn gets a copy of the array (on
    the model's device: NumPy, or CuPy on the GPU) and returns the array to use instead, of the same
    shape (or changes its argument in place and returns None).

        def zero_head(a, h):  # a: (batch, num_heads, seq, head_dim)
            a[:, h] = 0
            return a

        with minilm.intervene({"layers.1.self_attn.attn_output_heads": lambda a: zero_head(a, 2)}):
            ablated = model(input_ids).logits

    A capture active at the same time records the replaced values. Every pattern must match a name
    by the end of the block, else ActivationNameError."""
    hook = _Intervention(replacements)
    hooks.append(hook)
    try:
        yield
    finally:
        hooks.remove(hook)
    hook.check("intervene")


def capture_names(model):
    """Every activation name `model` offers, in the order its forward pass computes them.
    Runs the model once on two tokens (id 0); the attention scores are included (the reference
    attention computes them when asked, see the module docstring). A keras-hub-style backbone
    offers the names of its base model (`backbone.model`)."""
    hook = _Capture(["**"], record_all=True)
    runner = model.model if hasattr(model, "token_embedding") else model  # keras-hub style: the base model
    hooks.append(hook)
    try:
        runner(np.zeros((1, 2), np.int64))
    finally:
        hooks.remove(hook)
    return list(hook.seen)


def generic_name(name):
    """A name with its layer index as {i}: "layers.3.mlp.output" -> "layers.{i}.mlp.output"."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "{i}", name)


# ---------------------------------------------------------------------------------------------
# What each name means (docs/activations.md is generated from these and `capture_names`)
# ---------------------------------------------------------------------------------------------

HEADS, KV_HEADS, SCORES = (
    "(batch, num_heads, seq, head_dim)",
    "(batch, num_kv_heads, seq, head_dim)",
    "(batch, num_heads, seq, kv_seq)",
)
ROUTER = "(batch * seq, num_experts)"

QUANTITIES = {  # quantity -> (shape, meaning); "output" depends on the module, see OUTPUTS
    "queries": (HEADS, "queries: the query projection, split into heads"),
    "keys": (
        KV_HEADS,
        "keys: the key projection, split into heads (this call's positions; earlier ones are in the cache)",
    ),
    "values": (KV_HEADS, "values: the value projection, split into heads (this call's positions)"),
    "queries_normed": (HEADS, "queries after QK-norm (an RMSNorm over head_dim, per head)"),
    "keys_normed": (KV_HEADS, "keys after QK-norm"),
    "queries_rope": (HEADS, "queries after RoPE: what meets the keys"),
    "keys_rope": (KV_HEADS, "keys after RoPE (what the cache stores)"),
    "scores": (SCORES, "q k^T * scale, before the soft cap, the bias and the mask (kv_seq: every key so far)"),
    "scores_masked": (SCORES, "what the softmax sees: soft-capped, plus the bias (ALiBi), -inf where masked"),
    "attn_weights": (SCORES, "softmax of scores_masked over the keys (= output_attentions)"),
    "attn_output_heads": (HEADS, "each head's weighted sum of the values, before the output projection"),
    "intermediate": (
        "(batch, seq, intermediate_size)",
        "the MLP's hidden activations, the input of its down projection (BLOOM: 4 * hidden_size)",
    ),
    "router_logits": (ROUTER, "the router's scores per expert (= output_router_logits)"),
    "router_probs": (ROUTER, "softmax of router_logits over all experts, float32"),
    "expert_indices": ("(batch * seq, top_k)", "the experts each token is sent to (int64)"),
    "expert_weights": ("(batch * seq, top_k)", "their weights (renormalised to sum to 1 when norm_topk_prob)"),
    "alibi": ("(batch, num_heads, 1, kv_seq)", "the ALiBi bias every layer adds to its scores"),
    "logits": ("(batch, seq, vocab_size)", "next-token logits (causal LM), after any final soft cap"),
    "output": ("(batch, seq, hidden_size)", None),
}

OUTPUTS = {  # the module a name's "output" belongs to -> meaning
    "block": "the residual stream after the block (= hidden_states[i + 1], before the final norm)",
    "self_attn": "the attention's output after its projection, before the residual add (and any post-norm)",
    "self_attention": "the attention's output after its projection, before the residual add",
    "mlp": "the MLP's (or mixture of experts') output, before the residual add (and any post-norm)",
    "embed_tokens": "the token embeddings (Gemma 3: times sqrt(hidden_size)) (= hidden_states[0])",
    "word_embeddings": "the token embeddings, before the embedding LayerNorm",
    "word_embeddings_layernorm": "the embeddings after the embedding LayerNorm (= hidden_states[0])",
    "norm": "the final norm's output (= last_hidden_state and hidden_states[-1])",
    "ln_f": "the final LayerNorm's output (= last_hidden_state and hidden_states[-1])",
}


def describe(name):
    """(shape, meaning) of an activation name, e.g. describe("layers.0.self_attn.scores")."""
    module, _, quantity = canonical(name).rpartition(".")
    if quantity not in QUANTITIES:
        raise ActivationNameError(f"{name!r}: unknown quantity {quantity!r}; known: {sorted(QUANTITIES)}")
    shape, meaning = QUANTITIES[quantity]
    if quantity == "output":
        last = module.rpartition(".")[2]
        meaning = OUTPUTS["block" if last.isdigit() or last == "{i}" else last]
    return shape, meaning


def names_table(model):
    """The markdown table of `model`'s activation names (layer index as {i}), in forward order."""
    names = capture_names(model)
    layers = {}
    for name in names:
        layers.setdefault(generic_name(name), set()).add(name)
    per_layer = max(len(v) for v in layers.values())
    rows = ["| name | shape | what it is |", "| --- | --- | --- |"]
    for generic, instances in layers.items():
        shape, meaning = describe(generic)
        if "{i}" in generic and len(instances) < per_layer:
            meaning += " (only some layers: see `capture_names`)"
        rows.append(f"| `{generic}` | {shape} | {meaning} |")
    return "\n".join(rows) + "\n"

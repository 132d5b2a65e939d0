"""Training gradients: `value_and_grad(model, input_ids, labels)` -> (loss, {name: gradient}).

The backward pass in minilm is the chain rule written out by hand, one `*_backward` function next
to each forward (`nn.rms_norm_backward` after `nn.rms_norm`, `rope.apply_rope_backward` after
`apply_rope`, `ops.attention_backward` after the attention reference, a family's
`decoder_layer_backward` after its `decoder_layer`, ...). Each takes the upstream gradient plus
what its forward saw and returns the gradients of its inputs, shapes in comments; no tape, no
autograd framework. This module only runs them in order for a causal LM:

    1. forward, keeping each layer's input only            (output_hidden_states=True)
    2. loss and dL/d(final hidden), a few tokens at a time  (heads.causal_lm_head_loss_and_grad)
    3. back through the final norm and the layers, last to first; each layer recomputes its own
       forward from its saved input and walks back step by step (gradient checkpointing: the
       memory is the layers' inputs plus one layer's intermediates)

What is trained: the adapters of the `LoraWeight`s in the model's params (frozen base weights get
no gradient). A LoraWeight at `model.layers.3.self_attn.q_proj.weight` gives the gradients
`model.layers.3.self_attn.q_proj.lora_A` (groups, rank, in_features) and `...q_proj.lora_B`
(out_features // groups, rank), float32, keyed by the params' own names. Where minilm splits a
fused checkpoint tensor (Phi-3's qkv_proj and gate_up_proj), each part's LoraWeight gets its own
entry; adapters that share one array have the sum of their entries as its gradient.
`full_params=[names]` adds the gradients of named linear weights (full fine-tuning), under their
own names.

The backward runs on the host (the NumPy and Numba backends); its products dx = dy W go through
`ops.linear_input_grad` (BLAS; GGUF blocks a tile at a time on Numba). Positions are
arange(seq) unless given, as in transformers' forward; a left-padded row's last padding
position is scored when its label shifts onto the first token, as transformers does (PITFALLS.md).

Qwen3-MoE: with `config.output_router_logits`, the loss includes router_aux_loss_coef times the
load-balancing loss, as the forward's does, and its gradient flows into the routers.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, InputError
from .heads import ForCausalLM, causal_lm_head_loss_and_grad
from .io.quants import QuantizedWeight
from .lora import FullWeight
from .modeling import flatten
from .models.qwen3_moe import load_balancing_loss, load_balancing_loss_backward


def lora_weights(model):
    """{param name: LoraWeight} of the model's params, e.g. {"model.layers.0.self_attn.q_proj.weight": w}."""
    return {name: w for name, w in flatten(model.params).items() if getattr(w, "is_lora", False)}


def value_and_grad(
    model, input_ids, labels, attention_mask=None, position_ids=None, *, full_params=(), chunk_tokens=64
):
    """The causal-LM loss of `model(input_ids, attention_mask, labels=labels)` and its gradients
    with respect to every LoRA adapter in the model (and to the weights `full_params` names).

    input_ids, labels: (batch, seq) (labels -100 are ignored; position t predicts labels[t + 1]);
    attention_mask: (batch, seq) of 0/1 or None; position_ids: (batch or 1, seq) or None (arange,
    as the forward; BLOOM ignores them, as its forward does). Returns (loss float32, {name: float32
    array}) with the names `<LoraWeight's name without .weight>.lora_A` / `.lora_B`.
    full_params: names of linear layers' weights (e.g. "model.layers.0.mlp.down_proj.weight") whose
    own gradient dL/dW = dy^T x is wanted too, full fine-tuning's (FullWeight wraps them for this
    call); embeddings, the LM head, norms and expert stacks are refused. chunk_tokens: how many
    positions' logits the head holds at once ((chunk_tokens, vocab_size) float32: 64 MiB for
    Gemma 3's 262144 tokens at the default 64).
    """
    if not isinstance(model, ForCausalLM):
        raise ConfigError(f"value_and_grad needs a causal LM (a *ForCausalLM); got {type(model).__name__}")
    backbone = model.base_model_class
    if not hasattr(backbone, "backbone_backward"):
        raise ConfigError(f"{backbone.__name__} has no backward pass")
    adapters = lora_weights(model)
    if not adapters and not full_params:
        raise InputError("value_and_grad: the model has no LoraWeight to train (enable LoRA first)")
    head = model.params.lm_head.weight
    if not isinstance(head, (np.ndarray, QuantizedWeight)):
        raise ConfigError(
            f"value_and_grad runs on the host, but the model's weights are {type(head).__name__} (GPU memory): "
            "set a CPU backend and call model.to_device() first"
        )
    expected = {n[: -len(".weight")] + s for n in adapters for s in (".lora_A", ".lora_B")}
    wrapped = _wrap_full_params(model, full_params)
    try:
        loss, grads = _loss_and_backward(model, input_ids, labels, attention_mask, position_ids, chunk_tokens)
    finally:
        for node, weight in wrapped.values():
            node["weight"] = weight  # the plain weight again
    prefix = model.base_model_prefix
    named = {f"{prefix}.{name}": np.asarray(g, dtype=np.float32) for name, g in grads.items()}
    for name, (_, weight) in wrapped.items():
        if name in named:
            named[name] = named[name].reshape(weight.shape)  # BLOOM's per-head view of query_key_value
    expected |= set(wrapped)
    if set(named) != expected:
        missing = sorted(expected - set(named))
        raise ConfigError(f"value_and_grad: the backward pass of {backbone.__name__} gives no gradient for {missing}")
    return loss, named


def _loss_and_backward(model, input_ids, labels, attention_mask, position_ids, chunk_tokens):
    """Steps 1-3 above: (loss, {name under the backbone: gradient})."""
    cfg = model.config
    p = model.params[model.base_model_prefix]
    with_router = bool(getattr(cfg, "output_router_logits", False))
    # 1. forward, keeping each layer's input
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        output_hidden_states=True,
        **({"output_router_logits": True} if with_router else {}),
    )
    # 2. the head: loss and dL/d(last_hidden_state)
    soft_cap = getattr(cfg, "final_logit_softcapping", None)
    loss, dhidden = causal_lm_head_loss_and_grad(
        out.last_hidden_state, model.params.lm_head.weight, labels, soft_cap, chunk_tokens
    )
    extra = {}
    if with_router and out.router_logits:  # Qwen3-MoE's load-balancing loss, as its forward adds it
        k = cfg.num_experts_per_tok
        aux = load_balancing_loss(out.router_logits, cfg.num_experts, k, attention_mask)
        drouter = load_balancing_loss_backward(out.router_logits, cfg.num_experts, k, attention_mask)
        loss = np.float32(loss + cfg.router_aux_loss_coef * aux)
        extra["drouter_logits"] = [cfg.router_aux_loss_coef * d for d in drouter]
    # 3. back through the layers
    grads, _ = model.base_model_class.backbone_backward(
        p, cfg, dhidden, out.hidden_states, input_ids, attention_mask, position_ids, **extra
    )
    return loss, grads


NOT_LINEAR = ("embed_tokens.weight", "word_embeddings.weight", "lm_head.weight")


def _wrap_full_params(model, names):
    """Wrap each named linear weight in a FullWeight, in place: {name: (its node, the plain weight)}."""
    flat = flatten(model.params)
    wrapped = {}
    for name in names:
        weight = flat.get(name)
        if weight is None:
            raise InputError(f"full_params: the model has no weight {name!r}")
        if not name.endswith(".weight") or name.endswith(NOT_LINEAR) or ".experts." in name or weight.ndim < 2:
            raise InputError(
                f"full_params: {name!r} is not a linear layer's weight (embeddings, the LM head, norms and "
                "expert stacks have no full-parameter gradient here)"
            )
        if not isinstance(weight, np.ndarray) or getattr(weight, "is_lora", False):
            raise InputError(f"full_params: {name!r} is {type(weight).__name__}, not a plain float array")
        node = model.params
        for part in name.split(".")[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        node["weight"] = FullWeight(weight)
        wrapped[name] = (node, weight)
    return wrapped

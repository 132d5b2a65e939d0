"""Run a minilm model on a fixture's inputs and compare every output transformers saved.

Used by each family's tests. Positions are compared where attention_mask == 1 (outputs at
padding positions are meaningless in transformers too)."""

import numpy as np
from conftest import assert_close

from minilm import ops


def forward_kwargs(ref, head):
    kwargs = dict(
        input_ids=ref["input_ids"],
        attention_mask=ref.get("attention_mask"),
        output_hidden_states=True,
        output_attentions=True,
    )
    if "position_ids" in ref:
        kwargs["position_ids"] = ref["position_ids"]
    for name in ("pixel_values", "token_type_ids"):  # Gemma 3 with images
        if name in ref:
            kwargs[name] = ref[name]
    if head == "qa":
        kwargs.update(start_positions=ref.get("start_positions"), end_positions=ref.get("end_positions"))
    elif "labels" in ref:
        kwargs["labels"] = ref["labels"]
    return kwargs


def compare_outputs(out, ref, report=None):
    """Assert every saved output matches; returns {name: max|Δ|}."""
    report = {} if report is None else report
    mask = ref.get("attention_mask")
    keep_tokens = None if mask is None else mask.astype(bool)  # (batch, seq)
    for name in ("logits", "start_logits", "end_logits", "last_hidden_state"):
        if name in ref and getattr(out, name) is not None:
            keep = (
                keep_tokens
                if getattr(out, name).ndim >= 2 and getattr(out, name).shape[:2] == ref["input_ids"].shape
                else None
            )
            report[name] = assert_close(getattr(out, name), ref[name], keep, name)
    for name in ("loss", "aux_loss"):
        if name in ref:
            assert getattr(out, name) is not None, f"{name} missing"
            report[name] = assert_close(np.asarray(getattr(out, name)), ref[name], None, name)
    hidden = sorted((k for k in ref if k.startswith("hidden_states_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if hidden:
        assert out.hidden_states is not None and len(out.hidden_states) == len(hidden), "hidden_states count"
        for i, k in enumerate(hidden):
            report[k] = assert_close(out.hidden_states[i], ref[k], keep_tokens, k)
    attn = sorted((k for k in ref if k.startswith("attentions_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if attn:
        assert out.attentions is not None and len(out.attentions) == len(attn), "attentions count"
        for i, k in enumerate(attn):
            keep = None if keep_tokens is None else keep_tokens[:, None, :, None] & keep_tokens[:, None, None, :]
            a, r = ops.to_host(out.attentions[i]), ref[k]
            if keep is not None:
                keep = np.broadcast_to(keep, a.shape)
                a, r = np.where(keep, a, 0), np.where(keep, r, 0)
            report[k] = assert_close(a, r, None, k)
    router = sorted((k for k in ref if k.startswith("router_logits_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if router and getattr(out, "router_logits", None) is not None:
        assert len(out.router_logits) == len(router), "router_logits count (sparse layers only)"
        flat_keep = None if keep_tokens is None else keep_tokens.reshape(-1)
        for i, k in enumerate(router):
            report[k] = assert_close(out.router_logits[i], ref[k], flat_keep, k)
    return report


def check_generation(model, ref, meta=None):
    """Greedy ids of the left-padded batch and of each prompt alone equal transformers'."""
    if "generated_ids" not in ref:
        return
    gen = ref["generated_ids"]
    new = gen.shape[1] - ref["generate_input_ids"].shape[1]
    pad = (meta or {}).get("generation", {}).get("pad_token_id")
    ids = model.generate(
        ref["generate_input_ids"],
        attention_mask=ref["generate_attention_mask"],
        max_new_tokens=new,
        eos_token_id=[],
        pad_token_id=pad,
    )
    np.testing.assert_array_equal(ids, gen)
    for r in range(gen.shape[0]):
        if f"single_input_ids_{r}" in ref:
            single = ref[f"single_input_ids_{r}"]
            ids = model.generate(single, max_new_tokens=new, eos_token_id=[])
            np.testing.assert_array_equal(ids, ref[f"single_generated_ids_{r}"])

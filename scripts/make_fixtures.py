#!/usr/bin/env python
"""Re-create minilm's parity fixtures from Hugging Face transformers.

    python scripts/make_fixtures.py                 # every fixture + the RoPE reference
    python scripts/make_fixtures.py --only NAME     # one (or a comma-separated list)
    python scripts/make_fixtures.py --list          # names and what each exercises

This is a dev-only script: it needs torch + transformers (5.23 when the fixtures were made).
minilm's tests read only what it writes, with numpy and safetensors:

    tests/fixtures/<name>/config.json             what save_pretrained writes (unless noted)
    tests/fixtures/<name>/model.safetensors       (or model.safetensors.index.json + shards)
    tests/fixtures/<name>/reference.npz           inputs and every reference output (float32 / int64)
    tests/fixtures/<name>/reference.json          metadata: versions, class, npz keys, padding, notes
    tests/fixtures/MANIFEST.json                  the list of fixtures
    tests/fixtures/rope_reference.{npz,json}      inv_freq / attention_scaling per rope type

npz key convention (every fixture):
    input_ids, attention_mask (int64, 0 = padding), position_ids (int64, what was passed to HF;
    BLOOM has none: ALiBi is built from the mask), labels | start_positions + end_positions
    logits | start_logits + end_logits | last_hidden_state, loss, aux_loss and lm_loss (MoE causal LM)
    hidden_states_0 .. hidden_states_N   HF's tuple: 0 = embedding output, i = output of layer i-1,
                                         N = final-norm output (HF overwrites the last one with it)
    last_layer_output                    output of the last decoder layer, before the final norm
    attentions_0 .. attentions_{N-1}     softmax weights (batch, num_heads, seq_q, seq_k)
    router_logits_L, router_top_k_index_L, router_top_k_weight_L
                                         MoE only, L = decoder layer index (dense layers have none);
                                         shape (batch * seq, num_experts) / (batch * seq, top_k)
    generate_input_ids, generate_attention_mask, generated_ids (prompt + new tokens),
    generate_step_logits (steps, batch, vocab), single_input_ids_R, single_generated_ids_R,
    single_step_logits_R (row R generated alone, without padding)
    A second forward case of one fixture uses a prefix (phi3_longrope: long_*).
"""

import argparse
import copy
import functools
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures"

PAD, BOS, EOS = 0, 1, 2
FIRST_TOKEN = 3  # random ids are drawn from [FIRST_TOKEN, vocab_size): never PAD / BOS / EOS
VOCAB = 96
MIN_MARGIN = 1e-3  # smallest top-1 vs top-2 logit gap allowed in greedy steps and routing decisions

POSITION_RULE = (
    "position_ids were passed explicitly: cumsum(attention_mask) - 1, set to 0 at padding "
    "(generate()'s rule). A plain HF forward without position_ids would use arange(seq) instead."
)
HIDDEN_STATES_RULE = (
    "hidden_states_0 is the embedding output (Gemma 3: already times sqrt(hidden_size); BLOOM: after "
    "word_embeddings_layernorm); hidden_states_i is the output of decoder layer i-1; the last one, "
    "hidden_states_N, is the output of the final norm (== last_hidden_state). last_layer_output is the "
    "last decoder layer's output before the final norm."
)
PADDED_ROWS_RULE = (
    "HF builds an additive float mask (finfo.min where masked). A query row at a LEFT-padding position "
    "sees no key, so every score is finfo.min and softmax gives a uniform row (1/seq_k over ALL keys, "
    "future ones included); a RIGHT-padding query row attends normally to the real tokens before it. "
    "Outputs at padding positions are meaningless: compare only where attention_mask == 1 "
    "(for attentions: query rows with mask 1)."
)

REGISTRY = {}


def fixture(name, family, head, description):
    """Register a builder: fn() -> dict(save=callable(folder), arrays=..., meta=..., reload=callable)."""

    def register(fn):
        REGISTRY[name] = dict(fn=fn, family=family, head=head, description=description)
        return fn

    return register


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def perturb_(model, seed, matrix_scale=0.05, vector_scale=0.1, scales=()):
    """Move every parameter away from its init: p += scale * N(0, 1).

    Vectors (norm weights, biases) get `vector_scale` so that a norm weight of ones / zeros or a
    zero bias cannot hide a bug; `scales` is a list of (substring of the name, scale) overrides.
    Tied parameters appear once in named_parameters(), so they move once.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = vector_scale if p.ndim == 1 else matrix_scale
            for pattern, s in scales:
                if pattern in name:
                    scale = s
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def make_batch(seed, seq_len, real_lengths, sides="left"):
    """Random ids (batch, seq_len); row r holds real_lengths[r] tokens padded on sides[r]."""
    if isinstance(sides, str):
        sides = [sides] * len(real_lengths)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_TOKEN, VOCAB, (len(real_lengths), seq_len), generator=gen)
    mask = torch.zeros_like(ids)
    for r, (n, side) in enumerate(zip(real_lengths, sides)):
        if side == "left":
            mask[r, seq_len - n :] = 1
        else:
            mask[r, :n] = 1
    ids[mask == 0] = PAD
    return ids, mask, list(sides)


def positions_from_mask(mask):
    """generate()'s rule: cumsum(mask) - 1, with padding set to 0."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def padding_meta(mask, sides):
    return {
        "padding_side_per_row": sides,
        "real_lengths": mask.sum(-1).tolist(),
        "pad_columns_per_row": [(row == 0).nonzero()[:, 0].tolist() for row in mask],
        "pad_token_id": PAD,
        "padded_query_rows": PADDED_ROWS_RULE,
    }


def causal_labels(ids, mask):
    """labels = input_ids, -100 at padding (HF shifts them inside the loss)."""
    return ids.masked_fill(mask == 0, -100)


def to_numpy(t):
    t = t.detach().cpu()
    if t.is_floating_point():
        return t.to(torch.float32).numpy()
    return t.to(torch.int64).numpy()


def decoder_layers(model):
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


def top2_gap(logits):
    """Smallest gap between the largest and second-largest value along the last axis."""
    top = torch.topk(logits.float(), 2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def run_forward(model, inputs, prefix="", extra=None):
    """One HF forward with every output; returns (arrays, info, HF output)."""
    captured, routers, hooks = {}, {}, []

    def keep_last(module, args, output):
        captured["last_layer_output"] = output[0] if isinstance(output, tuple) else output

    hooks.append(decoder_layers(model)[-1].register_forward_hook(keep_last))
    for name, module in model.named_modules():
        if type(module).__name__ == "Qwen3MoeTopKRouter":
            layer = int(name.split("layers.")[1].split(".")[0])

            def keep_router(module, args, output, layer=layer):
                routers[layer] = output  # (router_logits, top_k_weights, top_k_index)

            hooks.append(module.register_forward_hook(keep_router))
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, output_attentions=True, **(extra or {}))
    finally:
        for h in hooks:
            h.remove()

    arrays = {prefix + k: to_numpy(v) for k, v in inputs.items()}
    for key in ("loss", "aux_loss", "logits", "start_logits", "end_logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            arrays[prefix + key] = to_numpy(value)
    for i, h in enumerate(out.hidden_states):
        arrays[f"{prefix}hidden_states_{i}"] = to_numpy(h)
    for i, a in enumerate(out.attentions):
        arrays[f"{prefix}attentions_{i}"] = to_numpy(a)
    arrays[prefix + "last_layer_output"] = to_numpy(captured["last_layer_output"])
    info = {"num_hidden_states": len(out.hidden_states), "num_attentions": len(out.attentions)}
    if routers:
        valid = inputs["attention_mask"].reshape(-1) == 1
        info["router_logits_layers"] = sorted(routers)
        info["min_router_margin"] = float("inf")
        info["experts_used_per_layer"] = {}
        for layer, (logits, weights, index) in sorted(routers.items()):
            arrays[f"{prefix}router_logits_{layer}"] = to_numpy(logits)
            arrays[f"{prefix}router_top_k_weight_{layer}"] = to_numpy(weights)
            arrays[f"{prefix}router_top_k_index_{layer}"] = to_numpy(index)
            k = index.shape[-1]
            ordered = torch.sort(logits[valid].float(), dim=-1, descending=True).values
            gap = float((ordered[:, k - 1] - ordered[:, k]).min())
            info["min_router_margin"] = min(info["min_router_margin"], gap)
            counts = torch.bincount(index[valid].reshape(-1), minlength=logits.shape[-1])
            info["experts_used_per_layer"][str(layer)] = counts.tolist()
    return arrays, info, out


def run_generation(model, ids, mask, max_new_tokens):
    """Greedy generation of the padded batch and of each row alone (no padding).

    eos_token_id=None is passed to generate(): no early stopping, every row gets max_new_tokens.
    """
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    arrays, margins = {}, []
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    step_logits = torch.stack(out.logits)  # (steps, batch, vocab)
    arrays["generate_input_ids"] = to_numpy(ids)
    arrays["generate_attention_mask"] = to_numpy(mask)
    arrays["generated_ids"] = to_numpy(out.sequences)
    arrays["generate_step_logits"] = to_numpy(step_logits)
    margins.append(top2_gap(step_logits))
    same = []
    for r in range(ids.shape[0]):
        row = ids[r][mask[r] == 1][None]
        with torch.no_grad():
            single = model.generate(input_ids=row, attention_mask=torch.ones_like(row), **kwargs)
        arrays[f"single_input_ids_{r}"] = to_numpy(row)
        arrays[f"single_generated_ids_{r}"] = to_numpy(single.sequences)
        arrays[f"single_step_logits_{r}"] = to_numpy(torch.stack(single.logits)[:, 0])
        margins.append(top2_gap(torch.stack(single.logits)))
        same.append(bool(torch.equal(single.sequences[0, row.shape[1] :], out.sequences[r, ids.shape[1] :])))
    new_tokens = out.sequences[:, ids.shape[1] :]
    meta = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": PAD,
        "eos_token_id": None,
        "eos_note": f"generate(eos_token_id=None): no stopping; config eos_token_id={EOS} "
        f"appears among the new tokens: {bool((new_tokens == EOS).any())}",
        "prompt_length_padded": ids.shape[1],
        "total_length": out.sequences.shape[1],
        "batch_equals_single_per_row": same,
        "min_greedy_margin": min(margins),
    }
    return arrays, meta


def dump_json(obj, path):
    """json.dump with short lists of scalars kept on one line (readable diffs of reference.json)."""
    text = json.dumps(obj, indent=1, sort_keys=True)
    innermost = re.compile(r"\[\s*([^\[\]{}\"]*?)\s*\]")
    compact = innermost.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    nested = re.compile(r"\[\s*((?:\[[^\[\]{}\"]*\],?\s*)+)\]")
    compact = nested.sub(lambda m: "[" + re.sub(r"\],\s+", "], ", m.group(1).strip()) + "]", compact)
    if json.loads(compact) != json.loads(text):
        compact = text
    with open(path, "w") as f:
        f.write(compact + "\n")


def describe_weights(folder):
    """Names of the weight files and the dtype / number of tensors they hold."""
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    dtypes, count = set(), 0
    for name in files:
        with safe_open(folder / name, "pt") as f:
            for key in f.keys():
                dtypes.add(str(f.get_slice(key).get_dtype()))
                count += 1
    index = folder / "model.safetensors.index.json"
    return {
        "files": files + ([index.name] if index.exists() else []),
        "num_tensors": count,
        "dtypes": sorted(dtypes),
    }


def compare_arrays(reference, fresh):
    """Largest |difference| over the float arrays both dicts hold."""
    worst = 0.0
    for key, value in fresh.items():
        if key in reference and value.dtype == np.float32:
            worst = max(worst, float(np.abs(reference[key] - value).max()))
    return worst


def base_meta(model, inputs_meta, info):
    meta = {
        "model_class": type(model).__name__,
        "base_model_prefix": model.base_model_prefix,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "attn_implementation": "eager",
        "compute_dtype": "float32",
        "inputs": inputs_meta,
        "hidden_states": HIDDEN_STATES_RULE,
        "notes": [],
    }
    meta.update(info)
    return meta


def write_fixture(name, built):
    """Save weights + config, reference.npz and reference.json; then reload with from_pretrained."""
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    built["save"](folder)
    arrays = built["arrays"]
    np.savez_compressed(folder / "reference.npz", **arrays)
    meta = built["meta"]
    meta["fixture"] = name
    meta["family"] = REGISTRY[name]["family"]
    meta["head"] = REGISTRY[name]["head"]
    meta["description"] = REGISTRY[name]["description"]
    meta["weights"] = describe_weights(folder)
    meta["npz"] = {k: f"{v.dtype} {list(v.shape)}" for k, v in sorted(arrays.items())}
    if "reload" in built:
        meta["reload_check"] = built["reload"](folder, arrays)
    dump_json(meta, folder / "reference.json")
    problems = []
    for key in ("min_greedy_margin", "min_router_margin"):
        value = meta.get(key, meta.get("generation", {}).get(key))
        if value is not None and value < MIN_MARGIN and not meta.get("margin_exempt"):
            problems.append(f"{name}: {key}={value:.2e} < {MIN_MARGIN}: a near-tie; pick another seed")
    for layer, counts in meta.get("experts_used_per_layer", {}).items():
        if sum(c > 0 for c in counts) < 6:
            problems.append(f"{name}: layer {layer} routes to only {sum(c > 0 for c in counts)} of 8 experts")
    return problems


def reload_checker(cls, inputs, forward_extra=None, prefix="", load_kwargs=None, expect_fail=False):
    """from_pretrained(folder) must reproduce the forward outputs."""

    def check(folder, arrays):
        kwargs = dict(attn_implementation="eager", dtype=torch.float32, **(load_kwargs or {}))
        try:
            model = cls.from_pretrained(folder, **kwargs).eval()
        except Exception as e:  # noqa: BLE001 - the failure itself is what we record
            if expect_fail:
                return {"loads_in_transformers": False, "error": f"{type(e).__name__}: {e}"}
            raise
        fresh, _, _ = run_forward(model, inputs, prefix, forward_extra)
        diff = compare_arrays(arrays, fresh)
        if diff > 1e-6:
            raise SystemExit(f"{folder.name}: from_pretrained differs from the reference by {diff}")
        return {"loads_in_transformers": True, "from_pretrained_max_abs_diff": diff}

    return check


def save_with(model, **kwargs):
    return lambda folder: model.save_pretrained(folder, safe_serialization=True, **kwargs)


# ----------------------------------------------------------------------------------------------
# Qwen3-MoE
# ----------------------------------------------------------------------------------------------


def qwen_config(**overrides):
    from transformers import Qwen3MoeConfig

    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=40,  # dense layers
        moe_intermediate_size=12,  # each expert
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # != hidden_size / num_attention_heads = 8
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        router_aux_loss_coef=0.01,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    cfg.update(overrides)
    return Qwen3MoeConfig(**cfg)


QWEN_SCALES = (("mlp.gate.weight", 0.5), ("embed_tokens", 0.2), ("lm_head", 0.3))
# tied embeddings: a small embedding and larger block outputs, else a random model repeats its input token
QWEN_TIED_SCALES = (("mlp.gate.weight", 0.5), ("embed_tokens", 0.05), ("o_proj", 0.2), ("down_proj", 0.2))
QWEN_LOAD = {"experts_implementation": "eager"}
QWEN_SMALL = dict(head_dim=12, moe_intermediate_size=8, intermediate_size=32)  # head / ties fixtures: smaller files


def qwen_model(cls_name, seed, scales=QWEN_SCALES, **config_overrides):
    cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    model = cls(qwen_config(**config_overrides)).eval()
    perturb_(model, seed + 1, scales=scales)
    return model


def qwen_layout_note(model):
    cfg = model.config
    sparse = [
        i
        for i in range(cfg.num_hidden_layers)
        if i not in cfg.mlp_only_layers and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0
    ]
    return {
        "sparse_layers": sparse,
        "dense_layers": [i for i in range(cfg.num_hidden_layers) if i not in sparse],
        "rule": "layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0; "
        "dense layers use intermediate_size, experts use moe_intermediate_size",
    }


QWEN_EXPERT_LAYOUT = (
    "per-expert (Hub) layout, as save_pretrained in transformers 5.23 writes it: "
    "<prefix>layers.L.mlp.experts.E.{gate_proj,up_proj}.weight (moe_intermediate_size, hidden_size), "
    "<prefix>layers.L.mlp.experts.E.down_proj.weight (hidden_size, moe_intermediate_size), "
    "router <prefix>layers.L.mlp.gate.weight (num_experts, hidden_size)"
)
QWEN_FUSED_LAYOUT = (
    "fused layout (transformers 5.x in-memory state_dict, written with safetensors.torch.save_file): "
    "<prefix>layers.L.mlp.experts.gate_up_proj (num_experts, 2 * moe_intermediate_size, hidden_size), "
    "rows [:I] = gate, [I:] = up; <prefix>layers.L.mlp.experts.down_proj "
    "(num_experts, hidden_size, moe_intermediate_size); router <prefix>layers.L.mlp.gate.weight"
)
QWEN_NOTES = [
    "config.json spells the expert count num_local_experts (Qwen3MoeConfig.attribute_map maps "
    "num_experts -> num_local_experts); Hub checkpoints spell it num_experts.",
    "Router: softmax over all experts in float32, top-k, renormalise the k weights iff norm_topk_prob.",
    "aux_loss = num_experts * sum_e(fraction of top-k slots routed to e * mean router prob of e), "
    "over all sparse layers together, padding excluded via attention_mask; "
    "loss = lm_loss + router_aux_loss_coef * aux_loss.",
]


@functools.lru_cache(maxsize=None)
def qwen_causal_lm(bf16=False):
    """The qwen3_moe_causal_lm model and its reference (shared by _fused, _sharded, _bf16)."""
    model = qwen_model("Qwen3MoeForCausalLM", seed=100)
    if bf16:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    ids, mask, sides = make_batch(seed=11, seq_len=12, real_lengths=[12, 9, 6])
    inputs = dict(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), labels=causal_labels(ids, mask)
    )
    arrays, info, out = run_forward(model, inputs, extra={"output_router_logits": True})
    with torch.no_grad():
        lm_only = model(**inputs, output_router_logits=False)
    arrays["lm_loss"] = to_numpy(lm_only.loss)
    gen_arrays, gen_meta = run_generation(model, ids, mask, max_new_tokens=8)
    arrays.update(gen_arrays)
    meta = base_meta(model, padding_meta(mask, sides), info)
    meta["inputs"]["position_ids"] = POSITION_RULE
    meta["labels"] = "labels = input_ids with -100 at padding; HF shifts inside the loss"
    meta["loss"] = "loss = lm_loss + router_aux_loss_coef * aux_loss (output_router_logits=True)"
    meta["moe_layers"] = qwen_layout_note(model)
    meta["generation"] = gen_meta
    meta["weight_layout"] = QWEN_EXPERT_LAYOUT
    meta["notes"] = list(QWEN_NOTES)
    return model, inputs, arrays, meta


def qwen_causal_reload(inputs, **kw):
    return reload_checker(
        transformers.Qwen3MoeForCausalLM, inputs, {"output_router_logits": True}, load_kwargs=QWEN_LOAD, **kw
    )


@fixture(
    "qwen3_moe_causal_lm",
    "qwen3_moe",
    "causal_lm",
    "3 layers (MoE, dense via mlp_only_layers=[1], MoE), top-2 of 8 experts, norm_topk_prob, GQA 4:2, "
    "head_dim 16 != 32/4, QK-norm, untied lm_head, labels -> loss + aux_loss, left-padded greedy generation",
)
def build_qwen3_moe_causal_lm():
    model, inputs, arrays, meta = qwen_causal_lm()
    return dict(save=save_with(model), arrays=arrays, meta=copy.deepcopy(meta), reload=qwen_causal_reload(inputs))


@fixture(
    "qwen3_moe_causal_lm_fused",
    "qwen3_moe",
    "causal_lm",
    "the same model and reference as qwen3_moe_causal_lm, experts written in the fused "
    "gate_up_proj / down_proj layout",
)
def build_qwen3_moe_causal_lm_fused():
    model, inputs, arrays, meta = qwen_causal_lm()

    def save(folder):
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    meta = copy.deepcopy(meta)
    meta["weight_layout"] = QWEN_FUSED_LAYOUT
    meta["notes"].append("Same weights as qwen3_moe_causal_lm; transformers 5.23 from_pretrained loads both layouts.")
    return dict(save=save, arrays=arrays, meta=meta, reload=qwen_causal_reload(inputs))


def qwen_hub_config(folder):
    """Rewrite config.json the way Hub Qwen3-MoE checkpoints spell it (transformers < 5)."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = None
    cfg["max_window_layers"] = cfg["num_hidden_layers"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    return cfg


@fixture(
    "qwen3_moe_sharded",
    "qwen3_moe",
    "causal_lm",
    "the same model and reference as qwen3_moe_causal_lm, saved with a small max_shard_size "
    "(model.safetensors.index.json + shards); also config_hub.json in the Hub spelling",
)
def build_qwen3_moe_sharded():
    model, inputs, arrays, meta = qwen_causal_lm()

    def save(folder):
        model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
        shards = list(folder.glob("model-*.safetensors"))
        if len(shards) < 2:
            raise SystemExit("qwen3_moe_sharded: expected >= 2 shards")
        (folder / "config_hub.json").write_text(json.dumps(qwen_hub_config(folder), indent=2, sort_keys=True) + "\n")

    def reload(folder, arrays_):
        result = qwen_causal_reload(inputs)(folder, arrays_)
        with tempfile.TemporaryDirectory() as tmp:  # the Hub spelling must give the same outputs
            tmp = Path(tmp)
            for p in folder.iterdir():
                if p.name != "config.json":
                    shutil.copy(p, tmp / p.name)
            shutil.copy(folder / "config_hub.json", tmp / "config.json")
            hub = qwen_causal_reload(inputs)(tmp, arrays_)
        result["config_hub_json"] = hub
        return result

    meta = copy.deepcopy(meta)
    meta["notes"].append(
        "config_hub.json: the same config in the Hub spelling (num_experts, top-level rope_theta, "
        "rope_scaling null, max_window_layers, torch_dtype); transformers 5.23 loads it to the same outputs."
    )
    return dict(save=save, arrays=arrays, meta=meta, reload=reload)


@fixture(
    "qwen3_moe_bf16",
    "qwen3_moe",
    "causal_lm",
    "qwen3_moe_causal_lm rounded to bfloat16 and saved as bf16; the reference is the float32 model "
    "built from those same bf16-rounded weights",
)
def build_qwen3_moe_bf16():
    model, inputs, arrays, meta = qwen_causal_lm(bf16=True)

    def save(folder):
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)

    meta = copy.deepcopy(meta)
    meta["weights_dtype"] = "bfloat16"
    meta["notes"].append(
        "Weights stored as bfloat16; upcast each to float32 exactly (bf16 -> f32 is lossless) and run in float32. "
        "config.json says dtype bfloat16."
    )
    return dict(save=save, arrays=arrays, meta=meta, reload=qwen_causal_reload(inputs))


@fixture(
    "qwen3_moe_causal_lm_b",
    "qwen3_moe",
    "causal_lm",
    "norm_topk_prob=False, top-3, decoder_sparse_step=2 (only layer 1 is MoE), tied embeddings, "
    "use_sliding_window=True with sliding_window=4 (applied to every layer in 5.23; max_window_layers=1 "
    "is present but ignored), generation well past the window",
)
def build_qwen3_moe_causal_lm_b():
    model = qwen_model(
        "Qwen3MoeForCausalLM",
        seed=210,
        scales=QWEN_TIED_SCALES,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        decoder_sparse_step=2,
        mlp_only_layers=[],
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    )
    ids, mask, sides = make_batch(seed=21, seq_len=10, real_lengths=[10, 7, 5])
    inputs = dict(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), labels=causal_labels(ids, mask)
    )
    arrays, info, out = run_forward(model, inputs, extra={"output_router_logits": True})
    with torch.no_grad():
        arrays["lm_loss"] = to_numpy(model(**inputs).loss)
    gen_arrays, gen_meta = run_generation(model, ids, mask, max_new_tokens=10)
    arrays.update(gen_arrays)
    # which layers really slide: a real query must give zero weight to real keys >= window behind it
    window = model.config.sliding_window
    sliding = []
    for i, a in enumerate(out.attentions):
        far = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril(-window)  # k <= q - window
        rows = mask[:, None, :, None].bool() & mask[:, None, None, :].bool() & far
        if bool((a[rows.expand_as(a)] == 0).all()):
            sliding.append(i)
    meta = base_meta(model, padding_meta(mask, sides), info)
    meta["inputs"]["position_ids"] = POSITION_RULE
    meta["labels"] = "labels = input_ids with -100 at padding"
    meta["moe_layers"] = qwen_layout_note(model)
    meta["generation"] = gen_meta
    meta["weight_layout"] = QWEN_EXPERT_LAYOUT + "; lm_head tied to embed_tokens (no lm_head.weight in the file)"
    meta["sliding_window"] = {
        "sliding_window": window,
        "layers_observed_sliding": sliding,
        "rule": "Qwen3MoeConfig keeps sliding_window only if use_sliding_window; Qwen3MoeModel then builds "
        "create_sliding_window_causal_mask for ALL layers (no layer_types / max_window_layers logic in "
        "5.23; max_window_layers=1 in this config.json is ignored). Query q sees keys q-w+1..q.",
    }
    if sliding != list(range(model.config.num_hidden_layers)):
        raise SystemExit(f"qwen3_moe_causal_lm_b: expected every layer to slide, saw {sliding}")
    meta["notes"] = list(QWEN_NOTES)
    return dict(
        save=save_with(model),
        arrays=arrays,
        meta=meta,
        reload=reload_checker(
            transformers.Qwen3MoeForCausalLM, inputs, {"output_router_logits": True}, load_kwargs=QWEN_LOAD
        ),
    )


@fixture(
    "qwen3_moe_router_ties",
    "qwen3_moe",
    "causal_lm",
    "router rows AND expert weights of experts 1 = 6 and 3 = 4 are identical: router logits tie exactly, "
    "often at the top-k boundary; any tie rule gives HF's output, a threshold rule (p >= k-th value) does not",
)
def build_qwen3_moe_router_ties():
    model = qwen_model("Qwen3MoeForCausalLM", seed=300, num_hidden_layers=2, mlp_only_layers=[], **QWEN_SMALL)
    with torch.no_grad():
        for layer in model.model.layers:
            gate, experts = layer.mlp.gate.weight, layer.mlp.experts
            for a, b in ((1, 6), (3, 4)):
                gate[b] = gate[a]
                experts.gate_up_proj[b] = experts.gate_up_proj[a]
                experts.down_proj[b] = experts.down_proj[a]
    ids, mask, sides = make_batch(seed=31, seq_len=12, real_lengths=[12, 10, 7])
    inputs = dict(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), labels=causal_labels(ids, mask)
    )
    arrays, info, out = run_forward(model, inputs, extra={"output_router_logits": True})
    valid = mask.reshape(-1) == 1
    ties = {"boundary_ties": 0, "lower_index_won": 0, "higher_index_won": 0}
    for layer in info["router_logits_layers"]:
        logits = torch.from_numpy(arrays[f"router_logits_{layer}"])
        index = torch.from_numpy(arrays[f"router_top_k_index_{layer}"])
        if not (torch.equal(logits[:, 1], logits[:, 6]) and torch.equal(logits[:, 3], logits[:, 4])):
            raise SystemExit("qwen3_moe_router_ties: identical router rows did not give identical logits")
        boundary = torch.zeros(index.shape[0], dtype=torch.bool)
        for t in range(index.shape[0]):
            chosen = set(index[t].tolist())
            for a, b in ((1, 6), (3, 4)):
                if (a in chosen) != (b in chosen):  # the tied pair straddles the top-k boundary
                    boundary[t] = True
                    if valid[t]:
                        ties["boundary_ties"] += 1
                        ties["lower_index_won" if a in chosen else "higher_index_won"] += 1
        arrays[f"router_boundary_tie_{layer}"] = boundary.numpy()
    if ties["boundary_ties"] < 3:
        raise SystemExit(f"qwen3_moe_router_ties: too few boundary ties {ties}")
    meta = base_meta(model, padding_meta(mask, sides), info)
    meta["inputs"]["position_ids"] = POSITION_RULE
    meta["labels"] = "labels = input_ids with -100 at padding"
    meta["moe_layers"] = qwen_layout_note(model)
    meta["weight_layout"] = QWEN_EXPERT_LAYOUT
    meta["router_ties"] = dict(
        ties,
        tied_pairs=[[1, 6], [3, 4]],
        router_boundary_tie_L="bool (batch * seq,): the token's top-k holds exactly one expert of a tied pair",
        rule="torch.topk (CPU, float32, over the softmax probabilities) follows no index order on exact ties: "
        "counts above. Tied experts have identical weights here, so the outputs do not depend on the rule; "
        "compare router_top_k_index only up to swapping 1<->6 and 3<->4. Selecting by a threshold "
        "(prob >= k-th largest) would route a boundary-tie token to k+1 experts and change the outputs.",
    )
    meta["margin_exempt"] = True  # ties are the point; min_router_margin is 0 by construction
    meta["notes"] = list(QWEN_NOTES)
    return dict(
        save=save_with(model),
        arrays=arrays,
        meta=meta,
        reload=reload_checker(
            transformers.Qwen3MoeForCausalLM, inputs, {"output_router_logits": True}, load_kwargs=QWEN_LOAD
        ),
    )


def seq_cls_batch(seed):
    """Row 0 full, row 1 LEFT-padded, row 2 RIGHT-padded (pad_token_id in the ids at padding)."""
    return make_batch(seed=seed, seq_len=10, real_lengths=[10, 7, 6], sides=["left", "left", "right"])


SEQ_CLS_POOLING = (
    "HF pools logits at the rightmost token whose id != pad_token_id: "
    "argmax(arange(seq) * (input_ids != pad_token_id)). That is the last position for a left-padded "
    "row and the last real token for a right-padded row (both are in this batch); the attention_mask is "
    "not used for pooling. last_non_pad_index holds the index chosen per row. Needs pad_token_id "
    "(batch > 1 raises without it); real ids never equal pad_token_id here."
)


def last_non_pad(ids):
    idx = torch.arange(ids.shape[-1])
    return ((ids != PAD).int() * idx).argmax(-1)


def head_fixture(model, ids, mask, sides, labels, meta_extra, reload_cls, load_kwargs=None, use_positions=True):
    """Forward of a classification / QA / base model with labels; shared by the families."""
    inputs = dict(input_ids=ids, attention_mask=mask)
    if use_positions:
        inputs["position_ids"] = positions_from_mask(mask)
    inputs.update(labels)
    arrays, info, out = run_forward(model, inputs)
    meta = base_meta(model, padding_meta(mask, sides), info)
    if use_positions:
        meta["inputs"]["position_ids"] = POSITION_RULE
    meta.update(meta_extra)
    return dict(
        save=save_with(model),
        arrays=arrays,
        meta=meta,
        reload=reload_checker(reload_cls, inputs, load_kwargs=load_kwargs),
    )


def seq_cls_labels(kind, batch, num_labels, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "single_label_classification":
        return (torch.arange(batch) + seed) % num_labels  # every row a different class
    if kind == "multi_label_classification":
        return (torch.rand(batch, num_labels, generator=gen) > 0.5).float()
    return torch.randn(batch, generator=gen)  # regression, num_labels == 1


SEQ_CLS_LOSSES = {
    "single_label_classification": "cross_entropy(pooled_logits, labels) (mean)",
    "multi_label_classification": "BCEWithLogits(pooled_logits, float labels) (mean over batch * num_labels)",
    "regression": "MSE(pooled_logits.squeeze(), labels.squeeze()) (num_labels = 1)",
}


def seq_cls_fixture(family_model, problem_type, num_labels, seed, reload_cls, load_kwargs=None, use_positions=True):
    ids, mask, sides = seq_cls_batch(seed)
    model = family_model(num_labels=num_labels, problem_type=problem_type)
    labels = seq_cls_labels(problem_type, ids.shape[0], num_labels, seed)
    built = head_fixture(
        model,
        ids,
        mask,
        sides,
        {"labels": labels},
        {"pooling": SEQ_CLS_POOLING, "problem_type": problem_type, "num_labels": num_labels,
         "loss": SEQ_CLS_LOSSES[problem_type]},
        reload_cls,
        load_kwargs,
        use_positions,
    )
    built["arrays"]["last_non_pad_index"] = to_numpy(last_non_pad(ids))
    return built


def token_cls_labels(ids, mask, num_labels, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, ids.shape, generator=gen)
    return labels.masked_fill(mask == 0, -100)


TOKEN_CLS_LOSS = "cross_entropy over all positions, labels -100 at padding are ignored"
QA_LOSS = (
    "(CE(start_logits, start_positions) + CE(end_logits, end_positions)) / 2; positions are clamped to "
    "[0, seq_len] and seq_len is the ignore_index: row 2's end_position (99) is out of range and is ignored"
)


def qa_labels(ids, mask):
    seq = ids.shape[1]
    first_real = (mask == 0).sum(-1)  # left padding: index of the first real token
    start = torch.minimum(first_real + 1, torch.tensor(seq - 1))
    end = torch.minimum(start + 2, torch.tensor(seq - 1))
    end[2] = 99
    return {"start_positions": start, "end_positions": end}


def qwen_head(cls_name, seed):
    """Head fixtures: 2 layers (MoE, dense), head_dim 12 (!= 32 / 4)."""
    return lambda **cfg: qwen_model(cls_name, seed, num_hidden_layers=2, mlp_only_layers=[1], **QWEN_SMALL, **cfg)


def qwen_head_meta(meta_extra):
    meta_extra = dict(meta_extra)
    meta_extra["weight_layout"] = QWEN_EXPERT_LAYOUT
    meta_extra["notes"] = list(QWEN_NOTES)
    return meta_extra


@fixture("qwen3_moe_seq_cls", "qwen3_moe", "seq_cls", "Qwen3MoeForSequenceClassification (2 layers (MoE, dense), head_dim 12), 3 labels, rows full / left-padded / right-padded")
def build_qwen3_moe_seq_cls():
    b = seq_cls_fixture(
        qwen_head("Qwen3MoeForSequenceClassification", 401), "single_label_classification", 3, 41,
        transformers.Qwen3MoeForSequenceClassification, QWEN_LOAD,
    )
    b["meta"].update(qwen_head_meta({}))
    return b


@fixture(
    "qwen3_moe_seq_cls_multilabel", "qwen3_moe", "seq_cls",
    "Qwen3MoeForSequenceClassification (2 layers (MoE, dense), head_dim 12), 4 labels, problem_type multi_label_classification, float labels",
)
def build_qwen3_moe_seq_cls_multilabel():
    b = seq_cls_fixture(
        qwen_head("Qwen3MoeForSequenceClassification", 410), "multi_label_classification", 4, 42,
        transformers.Qwen3MoeForSequenceClassification, QWEN_LOAD,
    )
    b["meta"].update(qwen_head_meta({}))
    return b


@fixture(
    "qwen3_moe_seq_cls_regression", "qwen3_moe", "seq_cls",
    "Qwen3MoeForSequenceClassification (2 layers (MoE, dense), head_dim 12), num_labels 1, problem_type regression (MSE)",
)
def build_qwen3_moe_seq_cls_regression():
    b = seq_cls_fixture(
        qwen_head("Qwen3MoeForSequenceClassification", 420), "regression", 1, 43,
        transformers.Qwen3MoeForSequenceClassification, QWEN_LOAD,
    )
    b["meta"].update(qwen_head_meta({}))
    return b


@fixture("qwen3_moe_token_cls", "qwen3_moe", "token_cls", "Qwen3MoeForTokenClassification (2 layers (MoE, dense), head_dim 12), 5 labels, left padding")
def build_qwen3_moe_token_cls():
    model = qwen_head("Qwen3MoeForTokenClassification", 430)(num_labels=5)
    ids, mask, sides = make_batch(seed=44, seq_len=10, real_lengths=[10, 8, 5])
    meta = qwen_head_meta({"num_labels": 5, "loss": TOKEN_CLS_LOSS, "head_bias": True})
    return head_fixture(
        model, ids, mask, sides, {"labels": token_cls_labels(ids, mask, 5, 44)}, meta,
        transformers.Qwen3MoeForTokenClassification, QWEN_LOAD,
    )


@fixture(
    "qwen3_moe_qa", "qwen3_moe", "qa",
    "Qwen3MoeForQuestionAnswering (2 layers (MoE, dense), head_dim 12; base_model_prefix 'transformer'), start/end positions, one ignored",
)
def build_qwen3_moe_qa():
    model = qwen_head("Qwen3MoeForQuestionAnswering", 440)()
    ids, mask, sides = make_batch(seed=45, seq_len=10, real_lengths=[10, 8, 5])
    meta = qwen_head_meta({"loss": QA_LOSS})
    meta["notes"] = meta["notes"] + [
        "Qwen3MoeForQuestionAnswering keeps base_model_prefix = 'transformer' (backward compatibility), so its "
        "keys are transformer.embed_tokens.weight, transformer.layers.L...., transformer.norm.weight, "
        "qa_outputs.weight (2, hidden), qa_outputs.bias (2,). The other heads use model.*."
    ]
    return head_fixture(
        model, ids, mask, sides, qa_labels(ids, mask), meta, transformers.Qwen3MoeForQuestionAnswering, QWEN_LOAD
    )


@fixture("qwen3_moe_base", "qwen3_moe", "base", "Qwen3MoeModel (2 layers (MoE, dense), head_dim 12): last_hidden_state, hidden states, router logits")
def build_qwen3_moe_base():
    model = qwen_head("Qwen3MoeModel", 450)()
    ids, mask, sides = make_batch(seed=46, seq_len=10, real_lengths=[10, 8, 5])
    meta = qwen_head_meta({})
    meta["notes"] = meta["notes"] + ["Saved from Qwen3MoeModel: keys have no 'model.' prefix (embed_tokens.weight, ...)."]
    return head_fixture(model, ids, mask, sides, {}, meta, transformers.Qwen3MoeModel, QWEN_LOAD)


# ----------------------------------------------------------------------------------------------
# BLOOM
# ----------------------------------------------------------------------------------------------


def bloom_model(cls_name, seed, **overrides):
    from transformers import BloomConfig

    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=36,
        n_head=6,  # not a power of two: slopes interleave two geometric series
        n_layer=2,
        layer_norm_epsilon=1e-5,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        attn_implementation="eager",
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(BloomConfig(**cfg)).eval()
    perturb_(model, seed + 1, matrix_scale=0.3, scales=(("word_embeddings.weight", 0.1),))
    with torch.no_grad():  # a small embedding-LayerNorm gain: else a tied random model repeats its input token
        model.base_model.word_embeddings_layernorm.weight.mul_(0.2)
    return model


BLOOM_HEAD = {"hidden_size": 24}  # head fixtures: 6 heads of head_dim 4, to keep the files small

BLOOM_LAYOUT = (
    "transformer.word_embeddings.weight, transformer.word_embeddings_layernorm.{weight,bias}, "
    "transformer.h.L.input_layernorm.{weight,bias}, transformer.h.L.self_attention.query_key_value.{weight,bias} "
    "(3*hidden, hidden), rows viewed as (n_head, 3, head_dim) = per-head interleaved q,k,v, "
    "transformer.h.L.self_attention.dense.{weight,bias}, transformer.h.L.post_attention_layernorm.{weight,bias}, "
    "transformer.h.L.mlp.dense_h_to_4h.{weight,bias}, transformer.h.L.mlp.dense_4h_to_h.{weight,bias}, "
    "transformer.ln_f.{weight,bias}; lm_head tied to word_embeddings (not in the file)"
)
BLOOM_NOTES = [
    "ALiBi: bias = slope_h * ((cumsum(mask) - 1) * mask)[key], added to q.k / sqrt(head_dim) before the "
    "padding/causal mask; it depends on the key position only (softmax is shift-invariant per query). "
    "No position_ids input.",
    "n_head=6: slopes = 2^(-8/4 * [1..4]) then 2^(-8/8 * [1, 3]) (interleaved series of the next power of two).",
    "LayerNorm after the word embeddings; apply_residual_connection_post_layernorm=False (residual is the "
    "pre-norm input). GELU is the tanh approximation.",
    "Hub BLOOM checkpoints are saved from BloomModel: keys there have no 'transformer.' prefix.",
]


def bloom_meta(extra=None):
    meta = {"weight_layout": BLOOM_LAYOUT, "notes": list(BLOOM_NOTES)}
    meta.update(extra or {})
    return meta


@fixture(
    "bloom_causal_lm", "bloom", "causal_lm",
    "BloomForCausalLM, hidden 36, 6 heads (ALiBi, non power of two), 2 layers, labels, left-padded generation",
)
def build_bloom_causal_lm():
    model = bloom_model("BloomForCausalLM", 590)
    ids, mask, sides = make_batch(seed=51, seq_len=11, real_lengths=[11, 8, 5])
    inputs = dict(input_ids=ids, attention_mask=mask, labels=causal_labels(ids, mask))
    arrays, info, out = run_forward(model, inputs)
    gen_arrays, gen_meta = run_generation(model, ids, mask, max_new_tokens=8)
    arrays.update(gen_arrays)
    meta = base_meta(model, padding_meta(mask, sides), info)
    meta.update(bloom_meta({"labels": "labels = input_ids with -100 at padding", "generation": gen_meta}))
    return dict(
        save=save_with(model), arrays=arrays, meta=meta, reload=reload_checker(transformers.BloomForCausalLM, inputs)
    )


@fixture(
    "bloom_seq_cls", "bloom", "seq_cls",
    "BloomForSequenceClassification (hidden 24, 6 heads), 3 labels, rows full / left-padded / right-padded",
)
def build_bloom_seq_cls():
    b = seq_cls_fixture(
        lambda **cfg: bloom_model("BloomForSequenceClassification", 510, **BLOOM_HEAD, **cfg), "single_label_classification", 3, 52,
        transformers.BloomForSequenceClassification, use_positions=False,
    )
    b["meta"].update(bloom_meta())
    return b


@fixture("bloom_token_cls", "bloom", "token_cls", "BloomForTokenClassification (hidden 24, 6 heads; classifier.*), 5 labels")
def build_bloom_token_cls():
    model = bloom_model("BloomForTokenClassification", 520, num_labels=5, **BLOOM_HEAD)
    ids, mask, sides = make_batch(seed=53, seq_len=10, real_lengths=[10, 8, 5])
    meta = bloom_meta({"num_labels": 5, "loss": TOKEN_CLS_LOSS, "head_bias": True})
    return head_fixture(
        model, ids, mask, sides, {"labels": token_cls_labels(ids, mask, 5, 53)}, meta,
        transformers.BloomForTokenClassification, use_positions=False,
    )


@fixture("bloom_qa", "bloom", "qa", "BloomForQuestionAnswering (hidden 24, 6 heads; qa_outputs.*), start/end positions, one ignored")
def build_bloom_qa():
    model = bloom_model("BloomForQuestionAnswering", 530, **BLOOM_HEAD)
    ids, mask, sides = make_batch(seed=54, seq_len=10, real_lengths=[10, 8, 5])
    return head_fixture(
        model, ids, mask, sides, qa_labels(ids, mask), bloom_meta({"loss": QA_LOSS}),
        transformers.BloomForQuestionAnswering, use_positions=False,
    )


@fixture("bloom_base", "bloom", "base", "BloomModel (hidden 24, 6 heads; keys without the 'transformer.' prefix, like Hub checkpoints)")
def build_bloom_base():
    model = bloom_model("BloomModel", 540, **BLOOM_HEAD)
    ids, mask, sides = make_batch(seed=55, seq_len=10, real_lengths=[10, 8, 5])
    return head_fixture(model, ids, mask, sides, {}, bloom_meta(), transformers.BloomModel, use_positions=False)


# ----------------------------------------------------------------------------------------------
# Phi-3
# ----------------------------------------------------------------------------------------------

PHI3_SHORT = [1.0, 1.03, 1.08, 1.15, 1.25, 1.4, 1.6, 1.85]  # head_dim 16 -> 8 factors each
PHI3_LONG = [1.0, 1.3, 1.9, 2.8, 4.2, 6.5, 9.5, 14.0]


def phi3_config(**overrides):
    from transformers import Phi3Config

    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim = 32 / 2 = 16
        num_key_value_heads=1,  # GQA 2:1
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        attn_implementation="eager",
    )
    cfg.update(overrides)
    return Phi3Config(**cfg)


def phi3_model(cls_name, seed, **overrides):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(phi3_config(**overrides)).eval()
    perturb_(model, seed + 1, scales=(("qkv_proj", 0.2), ("embed_tokens", 0.2), ("lm_head", 0.2)))
    return model


PHI3_LAYOUT = (
    "model.embed_tokens.weight, model.layers.L.input_layernorm.weight, "
    "model.layers.L.self_attn.qkv_proj.weight (num_heads*head_dim + 2*num_kv_heads*head_dim, hidden): "
    "contiguous blocks q, then k, then v; model.layers.L.self_attn.o_proj.weight, "
    "model.layers.L.post_attention_layernorm.weight, model.layers.L.mlp.gate_up_proj.weight "
    "(2*intermediate, hidden): rows [:I] = gate, [I:] = up; model.layers.L.mlp.down_proj.weight, "
    "model.norm.weight, lm_head.weight (untied). No biases."
)
PHI3_NOTES = ["Phi-3 heads in transformers 5.23: Phi3Model, Phi3ForCausalLM, Phi3ForSequenceClassification, "
              "Phi3ForTokenClassification (no question answering)."]

LONGROPE_CACHE_RULE = (
    "transformers 5.23 longrope: the rotary module picks ONE factor set per forward call: long factors iff "
    "max(position_ids over the whole batch) + 1 > original_max_position_embeddings, else short "
    "(inv_freq = 1 / (factor_i * base^(2i/d)); cos/sin are multiplied by attention_factor = "
    "sqrt(1 + ln(max_position_embeddings / original) / ln(original)) for BOTH sets). In generate(), "
    "Phi3ForCausalLM.prepare_inputs_for_generation drops the KV cache at the first step where "
    "input_ids.shape[1] (the padded total length) >= original + 1 while the cache holds <= original "
    "tokens, and re-runs the whole sequence without a cache, so every key is re-rotated with the long "
    "factors; from there on the cache is extended normally (all long). Consequences: keys cached with "
    "short factors are never mixed with long ones; in a padded batch a short row switches to long "
    "factors when the LONGEST row crosses, so a padded row can differ from the same row generated "
    "alone (batch_equals_single_per_row)."
)


@fixture(
    "phi3_causal_lm", "phi3", "causal_lm",
    "Phi3ForCausalLM, plain rope, GQA 2:1, fused qkv_proj / gate_up_proj, labels, left-padded generation",
)
def build_phi3_causal_lm():
    model = phi3_model("Phi3ForCausalLM", 600)
    ids, mask, sides = make_batch(seed=61, seq_len=11, real_lengths=[11, 9, 6])
    inputs = dict(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), labels=causal_labels(ids, mask)
    )
    arrays, info, out = run_forward(model, inputs)
    gen_arrays, gen_meta = run_generation(model, ids, mask, max_new_tokens=8)
    arrays.update(gen_arrays)
    meta = base_meta(model, padding_meta(mask, sides), info)
    meta["inputs"]["position_ids"] = POSITION_RULE
    meta.update({"labels": "labels = input_ids with -100 at padding", "generation": gen_meta,
                 "weight_layout": PHI3_LAYOUT, "notes": list(PHI3_NOTES)})
    return dict(
        save=save_with(model), arrays=arrays, meta=meta, reload=reload_checker(transformers.Phi3ForCausalLM, inputs)
    )


@fixture(
    "phi3_seq_cls", "phi3", "seq_cls",
    "Phi3ForSequenceClassification, 3 labels, rows full / left-padded / right-padded",
)
def build_phi3_seq_cls():
    b = seq_cls_fixture(
        lambda **cfg: phi3_model("Phi3ForSequenceClassification", 610, **cfg), "single_label_classification", 3, 62,
        transformers.Phi3ForSequenceClassification,
    )
    b["meta"].update({"weight_layout": PHI3_LAYOUT.replace("lm_head.weight (untied)", "score.weight (num_labels, hidden)"),
                      "notes": list(PHI3_NOTES)})
    return b


@fixture("phi3_token_cls", "phi3", "token_cls", "Phi3ForTokenClassification (score.weight + score.bias), 5 labels")
def build_phi3_token_cls():
    model = phi3_model("Phi3ForTokenClassification", 620, num_labels=5)
    ids, mask, sides = make_batch(seed=63, seq_len=10, real_lengths=[10, 8, 5])
    meta = {"num_labels": 5, "loss": TOKEN_CLS_LOSS, "head_bias": True, "notes": list(PHI3_NOTES),
            "weight_layout": PHI3_LAYOUT.replace("lm_head.weight (untied)", "score.weight, score.bias")}
    return head_fixture(
        model, ids, mask, sides, {"labels": token_cls_labels(ids, mask, 5, 63)}, meta,
        transformers.Phi3ForTokenClassification,
    )


def phi3_longrope_rope():
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG}


@functools.lru_cache(maxsize=None)
def phi3_longrope():
    """Model + reference shared by phi3_longrope and phi3_su."""
    model = phi3_model("Phi3ForCausalLM", 700, rope_parameters=phi3_longrope_rope())
    original = model.config.original_max_position_embeddings
    # case 1 (unprefixed): longest row has exactly `original` tokens -> max position + 1 == 16 -> short factors
    ids, mask, sides = make_batch(seed=71, seq_len=16, real_lengths=[16, 13, 9])
    inputs = dict(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), labels=causal_labels(ids, mask)
    )
    arrays, info, _ = run_forward(model, inputs)
    # case 2 (long_*): 24 tokens -> long factors for the whole batch, including row 2 (12 real tokens)
    lids, lmask, lsides = make_batch(seed=72, seq_len=24, real_lengths=[24, 17, 12])
    long_inputs = dict(input_ids=lids, attention_mask=lmask, position_ids=positions_from_mask(lmask))
    long_arrays, long_info, _ = run_forward(model, long_inputs, prefix="long_")
    arrays.update(long_arrays)
    # generation: prompt of 10 crosses 16 while generating 12 tokens
    gids, gmask, gsides = make_batch(seed=73, seq_len=10, real_lengths=[10, 8, 6])
    gen_arrays, gen_meta = run_generation(model, gids, gmask, max_new_tokens=12)
    arrays.update(gen_arrays)
    gen_meta["crossing"] = (
        f"prompt length {gids.shape[1]} + {12} new tokens = {gids.shape[1] + 12} > original {original}; "
        f"the cache is dropped and the full sequence recomputed at the step where input_ids has {original + 1} "
        f"tokens (step index {original + 1 - gids.shape[1]}, 0-based, in generate_step_logits)"
    )
    gen_meta["padding"] = padding_meta(gmask, gsides)
    attention_factor = math.sqrt(1 + math.log(64 / original) / math.log(original))
    meta = base_meta(model, padding_meta(mask, sides), info)
    meta["inputs"]["position_ids"] = POSITION_RULE
    meta.update(
        {
            "labels": "labels = input_ids with -100 at padding (case 1 only)",
            "generation": gen_meta,
            "weight_layout": PHI3_LAYOUT,
            "longrope": {
                "original_max_position_embeddings": original,
                "max_position_embeddings": 64,
                "short_factor": PHI3_SHORT,
                "long_factor": PHI3_LONG,
                "attention_factor": attention_factor,
                "case_1_unprefixed": "seq 16, max position 15 -> seq_len 16 = original -> short factors (<= uses short)",
                "case_2_long_prefix": "seq 24 -> long factors for every row; row 2 has only 12 real tokens and "
                "uses long factors only because the batch's max position is 23",
                "long_case_padding": padding_meta(lmask, lsides),
                "cache_rule": LONGROPE_CACHE_RULE,
            },
            "notes": list(PHI3_NOTES),
        }
    )
    return model, inputs, arrays, meta


@fixture(
    "phi3_longrope", "phi3", "causal_lm",
    "Phi3ForCausalLM with longrope (original 16, max 64, 8 distinct short/long factors): a 16-token case "
    "(short factors) and a 24-token case long_* (long factors), greedy generation from 10 to 22 tokens "
    "crossing 16; also config_hub.json (rope_scaling spelling)",
)
def build_phi3_longrope():
    model, inputs, arrays, meta = phi3_longrope()

    def save(folder):
        model.save_pretrained(folder, safe_serialization=True)
        cfg = json.loads((folder / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = {"type": "longrope", "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG}
        cfg["torch_dtype"] = cfg.pop("dtype")
        (folder / "config_hub.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    def reload(folder, arrays_):
        result = reload_checker(transformers.Phi3ForCausalLM, inputs)(folder, arrays_)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            shutil.copy(folder / "model.safetensors", tmp / "model.safetensors")
            shutil.copy(folder / "config_hub.json", tmp / "config.json")
            result["config_hub_json"] = reload_checker(transformers.Phi3ForCausalLM, inputs)(tmp, arrays_)
        return result

    meta = copy.deepcopy(meta)
    meta["notes"].append(
        "config.json (5.23 spelling) keeps a stray 'type': 'longrope' next to 'rope_type' inside rope_parameters. "
        "config_hub.json is the Hub spelling (rope_scaling with type longrope, top-level rope_theta and "
        "original_max_position_embeddings), loaded by 5.23 to the same outputs."
    )
    return dict(save=save, arrays=arrays, meta=meta, reload=reload)


@fixture(
    "phi3_su", "phi3", "causal_lm",
    "the phi3_longrope model with the legacy config spelling rope_scaling {'type': 'su', ...}; "
    "transformers 5.23 cannot load this config.json; the reference is computed with longrope",
)
def build_phi3_su():
    model, inputs, arrays, meta = phi3_longrope()

    def save(folder):
        model.save_pretrained(folder, safe_serialization=True)
        cfg = json.loads((folder / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = {"type": "su", "short_factor": PHI3_SHORT, "long_factor": PHI3_LONG}
        cfg["torch_dtype"] = cfg.pop("dtype")
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    arrays = {k: v for k, v in arrays.items() if not k.startswith(("generate", "generated", "single_"))}
    meta = copy.deepcopy(meta)
    meta.pop("generation")
    meta["config_style"] = "hub legacy: rope_scaling {'type': 'su', short_factor, long_factor}, top-level rope_theta"
    meta["notes"].append(
        "'su' is the old name of longrope. transformers 5.23 maps rope_type 'su' -> 'longrope' (Phi3Config."
        "convert_rope_params_to_dict) but only AFTER standardize_rope_params, which copies the top-level "
        "original_max_position_embeddings into the rope dict only for rope_type in (llama3, yarn, longrope); "
        "validation then fails with KeyError: Missing required keys ... {'original_max_position_embeddings'} "
        "(see reload_check). It loads if the rope_scaling dict itself carries original_max_position_embeddings. "
        "The reference here is the longrope model (identical weights and outputs to phi3_longrope)."
    )
    return dict(
        save=save, arrays=arrays, meta=meta,
        reload=reload_checker(transformers.Phi3ForCausalLM, inputs, expect_fail=True),
    )


# ----------------------------------------------------------------------------------------------
# Gemma 3 (text)
# ----------------------------------------------------------------------------------------------

GEMMA_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"]


def gemma_config(**overrides):
    from transformers import Gemma3TextConfig

    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # != 32 / 4
        query_pre_attn_scalar=8,  # != head_dim: scale is 8 ** -0.5
        sliding_window=4,
        layer_types=GEMMA_LAYER_TYPES,
        final_logit_softcapping=5.0,
        attn_logit_softcapping=3.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        attn_implementation="eager",
    )
    cfg.update(overrides)
    return Gemma3TextConfig(**cfg)


def gemma_model(cls_name, seed, **overrides):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(gemma_config(**overrides)).eval()
    # a large embedding makes the final soft cap bite (logits reach ~cap); large post-norm gains keep the
    # blocks, not the token's own (tied) embedding, in charge of the residual stream
    perturb_(model, seed + 1, matrix_scale=0.2, scales=(("embed_tokens", 0.4),))
    with torch.no_grad():
        for layer in model.base_model.layers:
            layer.post_attention_layernorm.weight.add_(3.0)
            layer.post_feedforward_layernorm.weight.add_(3.0)
    return model


GEMMA_LAYOUT = (
    "model.embed_tokens.weight (lm_head tied, not in the file), model.layers.L.input_layernorm.weight, "
    "model.layers.L.self_attn.{q,k,v,o}_proj.weight, model.layers.L.self_attn.{q,k}_norm.weight (head_dim), "
    "model.layers.L.post_attention_layernorm.weight, model.layers.L.pre_feedforward_layernorm.weight, "
    "model.layers.L.mlp.{gate,up,down}_proj.weight, model.layers.L.post_feedforward_layernorm.weight, "
    "model.norm.weight. RMSNorm weights are stored as w and used as (1 + w), computed in float32."
)
GEMMA_NOTES = [
    "layer_types = [sliding, sliding, full]; config.json also carries '_sliding_window_pattern': 6 (a private "
    "default written by 5.23 even though layer_types is given): use layer_types.",
    "Sliding layers use rope_parameters['sliding_attention'] (theta 1e4), full layers "
    "rope_parameters['full_attention'] (theta 1e6 and any scaling); window w=4: query q sees keys q-3..q.",
    "Embeddings are multiplied by sqrt(hidden_size) = torch.tensor(32 ** 0.5) in the weight dtype (float32 here).",
    "attn_logit_softcapping: scores = cap * tanh(scores / cap) after the query_pre_attn_scalar ** -0.5 scaling "
    "and before the mask; final_logit_softcapping: logits = cap * tanh(logits / cap) in Gemma3ForCausalLM only "
    "(logits_before_softcap is the raw lm_head output).",
    "Activation gelu_pytorch_tanh; four norms per layer (input, post-attention, pre-feedforward, post-feedforward).",
]


def gemma_causal(model, seed_inputs):
    ids, mask, sides = make_batch(seed=seed_inputs, seq_len=10, real_lengths=[10, 8, 5])
    inputs = dict(
        input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), labels=causal_labels(ids, mask)
    )
    raw = {}
    hook = model.lm_head.register_forward_hook(lambda m, a, o: raw.__setitem__("logits", o))
    try:
        arrays, info, out = run_forward(model, inputs)
    finally:
        hook.remove()
    arrays["logits_before_softcap"] = to_numpy(raw["logits"])
    gen_arrays, gen_meta = run_generation(model, ids, mask, max_new_tokens=10)
    arrays.update(gen_arrays)
    meta = base_meta(model, padding_meta(mask, sides), info)
    meta["inputs"]["position_ids"] = POSITION_RULE
    meta.update({"labels": "labels = input_ids with -100 at padding", "generation": gen_meta,
                 "weight_layout": GEMMA_LAYOUT, "notes": list(GEMMA_NOTES)})
    cap = model.config.final_logit_softcapping
    if cap is not None:
        meta["softcap_effect"] = {
            "max_abs_logits_before_softcap": float(np.abs(arrays["logits_before_softcap"]).max()),
            "max_abs_logits": float(np.abs(arrays["logits"]).max()),
            "final_logit_softcapping": cap,
            "attn_logit_softcapping": model.config.attn_logit_softcapping,
        }
    return inputs, arrays, meta


@fixture(
    "gemma3_causal_lm", "gemma3", "causal_lm",
    "Gemma3ForCausalLM: layers sliding/sliding/full, window 4, head_dim 16 != 32/4, GQA 4:2, "
    "query_pre_attn_scalar 8, attn soft cap 3.0, final soft cap 5.0, local theta 1e4 / global 1e6, "
    "generation from 10 to 20 tokens",
)
def build_gemma3_causal_lm():
    model = gemma_model("Gemma3ForCausalLM", 800)
    inputs, arrays, meta = gemma_causal(model, 81)
    return dict(
        save=save_with(model), arrays=arrays, meta=meta, reload=reload_checker(transformers.Gemma3ForCausalLM, inputs)
    )


def gemma_hub_config(folder):
    """Rewrite config.json the way Hub Gemma 3 checkpoints spell it."""
    cfg = json.loads((folder / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    full = dict(rope["full_attention"])
    cfg["rope_theta"] = full.pop("rope_theta")
    cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    cfg["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
    cfg.pop("_sliding_window_pattern", None)
    cfg["sliding_window_pattern"] = 3  # consistent with layer_types [S, S, F]
    cfg["torch_dtype"] = cfg.pop("dtype")
    return cfg


@fixture(
    "gemma3_causal_lm_nocap", "gemma3", "causal_lm",
    "Gemma3ForCausalLM with both soft caps None and linear rope scaling (factor 2) on the full-attention "
    "layer only; also config_hub.json (rope_theta / rope_local_base_freq / rope_scaling spelling)",
)
def build_gemma3_causal_lm_nocap():
    model = gemma_model(
        "Gemma3ForCausalLM", 810, final_logit_softcapping=None, attn_logit_softcapping=None,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
        },
    )
    inputs, arrays, meta = gemma_causal(model, 82)

    def save(folder):
        model.save_pretrained(folder, safe_serialization=True)
        (folder / "config_hub.json").write_text(json.dumps(gemma_hub_config(folder), indent=2, sort_keys=True) + "\n")

    def reload(folder, arrays_):
        result = reload_checker(transformers.Gemma3ForCausalLM, inputs)(folder, arrays_)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            shutil.copy(folder / "model.safetensors", tmp / "model.safetensors")
            shutil.copy(folder / "config_hub.json", tmp / "config.json")
            result["config_hub_json"] = reload_checker(transformers.Gemma3ForCausalLM, inputs)(tmp, arrays_)
        return result

    meta["notes"].append(
        "rope: full_attention layers use linear scaling factor 2 (inv_freq / 2) on theta 1e6; sliding layers "
        "are unscaled theta 1e4. config_hub.json spells it rope_scaling {rope_type: linear, factor: 2} + "
        "rope_theta + rope_local_base_freq (+ sliding_window_pattern 3); 5.23 loads it to the same outputs."
    )
    return dict(save=save, arrays=arrays, meta=meta, reload=reload)


@fixture("gemma3_base", "gemma3", "base", "Gemma3TextModel (keys without the 'model.' prefix), same features as gemma3_causal_lm")
def build_gemma3_base():
    model = gemma_model("Gemma3TextModel", 820)
    ids, mask, sides = make_batch(seed=83, seq_len=10, real_lengths=[10, 8, 5])
    meta = {"weight_layout": GEMMA_LAYOUT.replace("model.", "").replace(
        "embed_tokens.weight (lm_head tied, not in the file)", "embed_tokens.weight"), "notes": list(GEMMA_NOTES)}
    return head_fixture(model, ids, mask, sides, {}, meta, transformers.Gemma3TextModel)


# ----------------------------------------------------------------------------------------------
# RoPE reference
# ----------------------------------------------------------------------------------------------

LONGROPE_SHORT_16 = [1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.55, 1.8]
LONGROPE_LONG_16 = [1.0, 1.25, 1.7, 2.5, 3.8, 5.9, 9.0, 13.5]

ROPE_CASES = [
    # (name, config kwargs for LlamaConfig, rope_parameters, seq_lens)
    ("default", dict(hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=2048),
     {"rope_type": "default", "rope_theta": 10000.0}, [None]),
    ("default_theta1e6_partial0.5", dict(hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=2048),
     {"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.5}, [None]),
    ("linear", dict(hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=2048),
     {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, [None]),
    ("dynamic", dict(hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=64),
     {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, [None, 32, 64, 100, 200]),
    ("llama3", dict(hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=131072),
     {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}, [None]),
    ("yarn", dict(hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=256),
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}, [None]),
    ("yarn_mscale_beta_notruncate", dict(hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=256),
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
      "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.8, "truncate": False}, [None]),
    ("yarn_attention_factor", dict(hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=256),
     {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
      "attention_factor": 1.25}, [None]),
    ("longrope", dict(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=64),
     {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": LONGROPE_SHORT_16, "long_factor": LONGROPE_LONG_16,
      "original_max_position_embeddings": 16}, [None, 8, 16, 17, 40]),
    ("longrope_explicit_factor", dict(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=64),
     {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": LONGROPE_SHORT_16, "long_factor": LONGROPE_LONG_16,
      "original_max_position_embeddings": 16, "factor": 2.0}, [None, 17]),
]


def make_rope_reference():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    arrays, entries = {}, []
    for name, cfg_kwargs, rope, seq_lens in ROPE_CASES:
        config = LlamaConfig(**cfg_kwargs, rope_parameters=copy.deepcopy(rope))
        rope_type = config.rope_parameters["rope_type"]
        if rope_type == "default" and "partial_rotary_factor" in rope:
            # Llama's default ignores partial_rotary_factor; Phi-3's honours it
            fn, fn_name = Phi3RotaryEmbedding.compute_default_rope_parameters, "Phi3RotaryEmbedding.compute_default_rope_parameters"
        elif rope_type == "default":
            fn, fn_name = LlamaRotaryEmbedding.compute_default_rope_parameters, "LlamaRotaryEmbedding.compute_default_rope_parameters"
        else:
            fn, fn_name = ROPE_INIT_FUNCTIONS[rope_type], f"ROPE_INIT_FUNCTIONS[{rope_type!r}]"
        for seq_len in seq_lens:
            inv_freq, scaling = fn(config, seq_len=seq_len) if seq_len is not None else fn(config)
            key = name if seq_len is None else f"{name}__seq_len_{seq_len}"
            arrays[key + "__inv_freq"] = to_numpy(inv_freq)
            arrays[key + "__attention_scaling"] = np.array(float(scaling), dtype=np.float32)
            entries.append(
                {
                    "key": key,
                    "rope_type": rope_type,
                    "function": f"{fn_name}(config" + (f", seq_len={seq_len})" if seq_len is not None else ")"),
                    "seq_len": seq_len,
                    "config": {
                        **cfg_kwargs,
                        "rope_parameters": {k: v for k, v in config.rope_parameters.items()},
                    },
                    "inv_freq": [float(x) for x in inv_freq],
                    "attention_scaling": float(scaling),
                }
            )
    np.savez_compressed(OUT / "rope_reference.npz", **arrays)
    meta = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "signature": "ROPE_INIT_FUNCTIONS[rope_type](config, device=None, seq_len=None, layer_type=None) -> "
        "(inv_freq float32 (dim/2,), attention_scaling float); 'default' is not in ROPE_INIT_FUNCTIONS in 5.23: "
        "each model's RotaryEmbedding.compute_default_rope_parameters(config) computes it",
        "npz": "<key>__inv_freq (float32, (rotary_dim/2,)) and <key>__attention_scaling (float32 scalar); "
        "key = name or name__seq_len_<n>",
        "notes": [
            "Config class: LlamaConfig (head_dim given explicitly; dim = head_dim * partial_rotary_factor). "
            "'default' with partial_rotary_factor uses Phi3RotaryEmbedding.compute_default_rope_parameters "
            "(LlamaRotaryEmbedding's ignores partial_rotary_factor).",
            "dynamic: seq_len None or <= max_position_embeddings is replaced by max_position_embeddings "
            "(no change below it); base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2)).",
            "longrope: short_factor iff seq_len is None or seq_len <= original_max_position_embeddings, else "
            "long_factor; attention_scaling = sqrt(1 + ln(f) / ln(original)) with f = factor if given, else "
            "max_position_embeddings / original; 1.0 if f <= 1.",
            "yarn: attention_factor given -> used as is; else mscale & mscale_all_dim -> "
            "(0.1*mscale*ln(f)+1)/(0.1*mscale_all_dim*ln(f)+1); else 0.1*ln(f)+1. truncate (default True) "
            "floors/ceils the correction range.",
            "linear / llama3 / dynamic: attention_scaling 1.0.",
        ],
        "entries": entries,
    }
    dump_json(meta, OUT / "rope_reference.json")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def write_manifest():
    manifest = {
        "generator": "scripts/make_fixtures.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "fixtures": [
            {"name": name, "family": r["family"], "head": r["head"], "description": r["description"],
             "path": f"tests/fixtures/{name}"}
            for name, r in REGISTRY.items()
        ],
        "rope_reference": {"npz": "tests/fixtures/rope_reference.npz", "json": "tests/fixtures/rope_reference.json"},
        "npz_key_convention": __doc__.split("npz key convention (every fixture):")[1].strip(),
    }
    dump_json(manifest, OUT / "MANIFEST.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated fixture names (or 'rope_reference')")
    parser.add_argument("--list", action="store_true", help="print the fixture names and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, r in REGISTRY.items():
            print(f"{name:32s} {r['description']}")
        print(f"{'rope_reference':32s} inv_freq / attention_scaling per rope type")
        return
    names = list(REGISTRY) + ["rope_reference"]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in REGISTRY and n != "rope_reference"]
        if unknown:
            parser.error(f"unknown fixture(s) {unknown}; see --list")

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # bitwise-reproducible float sums on one machine
    OUT.mkdir(parents=True, exist_ok=True)
    problems = []
    for name in names:
        if name == "rope_reference":
            make_rope_reference()
        else:
            problems += write_fixture(name, REGISTRY[name]["fn"]())
        print(f"wrote {name}", file=sys.stderr)
    write_manifest()
    if problems:
        sys.exit("\n".join(problems))


if __name__ == "__main__":
    main()

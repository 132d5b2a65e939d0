"""minilm's backward pass against torch autograd: PEFT LoRA gradients on the tiny causal LMs.

tests/fixtures/grads/<case>.npz (scripts/fixtures/grads.py) holds PEFT's lora_A / lora_B, the
loss and torch's gradients for a batch with a left-padded row. Here the same adapters become
LoraWeights on the same checkpoint and `value_and_grad` must give the same loss (max|diff| <=
1e-4 * max(1, |ref|)) and gradients (max|diff| <= 1e-4 * max|ref| per tensor: relative to the
gradient's own size, stricter than 1e-4 * max(1, .) for gradients below one), on the NumPy
reference and on the Numba backend.

Measured (NumPy reference and Numba): loss within 1.4e-6, gradients within 2.7e-6 * max|ref| in
every case (grads fixtures and the seven PEFT adapter fixtures of tests/fixtures/lora/).

PEFT's names -> minilm's LoraWeights:
  Gemma 3, Qwen3-MoE   q_proj, v_proj: one LoraWeight each (groups = 1)
  BLOOM                query_key_value: one LoraWeight over the (num_heads, 3, head_dim, hidden) view;
                       PEFT's B rows are the fused rows, in the same per-head interleaved order
  Phi-3                qkv_proj: minilm splits it into q_proj, k_proj, v_proj, so three LoraWeights
                       share PEFT's A, each with its rows of B; the fused gradients are the sum of
                       the three A gradients and the three B gradients stacked
"""

import json

import numpy as np
import pytest
from conftest import FIXTURES, max_diff

from minilm import ops
from minilm.grad import value_and_grad
from minilm.io.load import from_pretrained
from minilm.lora import LoraWeight

CASES = {
    "gemma3": "gemma3_causal_lm",
    "qwen3_moe": "qwen3_moe_causal_lm",
    "phi3": "phi3_causal_lm",
    "bloom": "bloom_causal_lm",
}
PEFT_PREFIX = "base_model.model."


def load_case(case):
    ref = dict(np.load(FIXTURES / "grads" / f"{case}.npz"))
    model = from_pretrained(FIXTURES / CASES[case])
    if case == "qwen3_moe":
        model.config.output_router_logits = True  # the loss includes the aux loss, as in the fixture
    head, tail = "value." + PEFT_PREFIX, ".lora_A.weight"
    modules = sorted(k[len(head) : -len(tail)] for k in ref if k.startswith(head) and k.endswith(tail))
    parts = {}  # PEFT module -> [(minilm module, first row, last row)]
    for module in modules:
        A, B = ref[f"value.{PEFT_PREFIX}{module}.lora_A.weight"], ref[f"value.{PEFT_PREFIX}{module}.lora_B.weight"]
        if module.endswith("qkv_proj"):  # Phi-3: split rows q | k | v, as minilm splits the weight
            cfg = model.config
            q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            stem = module[: -len("qkv_proj")]
            bounds = [0, q_rows, q_rows + kv_rows, q_rows + 2 * kv_rows]
            parts[module] = [
                (stem + name, bounds[i], bounds[i + 1]) for i, name in enumerate(["q_proj", "k_proj", "v_proj"])
            ]
        else:
            parts[module] = [(module, 0, B.shape[0])]
        for path, start, stop in parts[module]:
            node = _node(model.params, path)
            node["weight"] = LoraWeight(node["weight"], A, np.ascontiguousarray(B[start:stop]), float(ref["scaling"]))
    return model, ref, parts


def _node(params, path):
    node = params
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


def fused_grads(grads, parts):
    """minilm's per-LoraWeight gradients -> PEFT's per-module ones (sum A over parts, stack B rows)."""
    out = {}
    for module, pieces in parts.items():
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = sum(grads[f"{path}.lora_A"][0] for path, _, _ in pieces)
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.concatenate([grads[f"{path}.lora_B"] for path, _, _ in pieces])
    return out


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("case", list(CASES))
def test_lora_gradients_match_torch_autograd(case, backend):
    model, ref, parts = load_case(case)
    with ops.use_backend(backend):
        model.to_device()
        loss, grads = value_and_grad(model, ref["input_ids"], ref["labels"], ref["attention_mask"])
    assert abs(float(loss) - float(ref["loss"])) <= 1e-4 * max(1.0, abs(float(ref["loss"]))), (loss, ref["loss"])
    ours = fused_grads(grads, parts)
    expected = {k[len("grad.") :]: v for k, v in ref.items() if k.startswith("grad.")}
    assert sorted(ours) == sorted(expected)
    worst = 0.0
    for name, g in expected.items():
        assert ours[name].shape == g.shape, name
        d, tol = max_diff(ours[name], g), 1e-4 * float(np.abs(g).max())
        assert d <= tol, f"{case} {name}: max|diff| {d:.3g} > {tol:.3g}"
        worst = max(worst, d / float(np.abs(g).max()))
    loss_diff = abs(float(loss) - float(ref["loss"]))
    print(f"{case} {backend}: loss diff {loss_diff:.2g}, grads max|diff| / max|ref| {worst:.2g}")
    assert any(np.abs(g).max() > 1e-3 for g in expected.values())  # gradients that say something


PEFT_CASES = sorted(
    p.parent.name for p in (FIXTURES / "lora").glob("*/reference.npz") if (p.parent / "adapter_config.json").is_file()
)


def test_peft_cases_found():
    assert len(PEFT_CASES) >= 7, PEFT_CASES


@pytest.mark.parametrize("case", PEFT_CASES)
def test_gradients_of_peft_adapters_match_torch_autograd(case):
    """The adapters of scripts/fixtures/lora.py (made by PEFT, loaded with `load_adapter`): every
    linear layer of Gemma 3, Qwen3-MoE's attention, Phi-3's fused qkv_proj / gate_up_proj (rsLoRA)
    and o_proj / down_proj, BLOOM's query_key_value, dense, dense_4h_to_h; batches with left
    padding and explicit position_ids. Same tolerance as above."""
    folder = FIXTURES / "lora" / case
    ref = dict(np.load(folder / "reference.npz"))
    base = json.loads((folder / "reference.json").read_text())["base_fixture"]
    model = from_pretrained(FIXTURES / base)
    model.load_adapter(folder)
    loss, grads = value_and_grad(model, ref["input_ids"], ref["labels"], ref["attention_mask"], ref.get("position_ids"))
    assert abs(float(loss) - float(ref["loss"])) <= 1e-4 * max(1.0, abs(float(ref["loss"]))), (loss, ref["loss"])
    ours = fused_grads(grads, model.lora_modules)
    expected = {k[len("grad.") :]: v for k, v in ref.items() if k.startswith("grad.")}
    assert sorted(ours) == sorted(expected)
    for name, g in expected.items():
        d, tol = max_diff(ours[name], g), 1e-4 * float(np.abs(g).max())
        assert d <= tol, f"{case} {name}: max|diff| {d:.3g} > {tol:.3g}"

"""Every model fixture, end to end, under each compiled backend: the same outputs as
transformers (at the project's tolerance) and the same greedy ids. Switching backend changes
no model code. numba runs in CI; cupy runs where a CUDA GPU and CuPy are present."""

import json

import numpy as np
import pytest
from conftest import FIXTURES, load_reference
from parity import check_generation, compare_outputs, forward_kwargs

import minilm
from minilm import ops


def fixtures():
    entries = json.loads((FIXTURES / "MANIFEST.json").read_text())["fixtures"]
    # the router-ties fixture is checked by its own rule in test_qwen3_moe.py
    return [(e["name"], e["head"], e["family"]) for e in entries if e["name"] != "qwen3_moe_router_ties"]


def cupy_ready():
    try:
        ops.set_backend(ops.set_backend("cupy"))  # imports and registers the backend, then restores
        return True
    except minilm.ConfigError:
        return False


BACKENDS = [
    "numba",
    pytest.param(
        "cupy",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not cupy_ready(), reason="CuPy is not installed or no CUDA device is visible (pip install minilm[gpu])"
            ),
        ],
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,head,family", fixtures(), ids=[f[0] for f in fixtures()])
def test_fixture_under_backend(name, head, family, backend):
    folder, ref, meta = load_reference(name)
    with ops.use_backend(backend):
        model = minilm.from_pretrained(folder)  # weights land on the backend's device
        kwargs = forward_kwargs(ref, head)
        if family == "qwen3_moe" and head in ("causal_lm", "base"):
            kwargs["output_router_logits"] = any(k.startswith("router_logits_") for k in ref)
        report = compare_outputs(model(**kwargs), ref)
        assert report
        if head == "causal_lm" and "generated_ids" in ref:
            check_generation(model, ref, meta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_switch_leaves_model_code_alone(backend):
    """The same model object gives the same logits before and after a backend switch."""
    folder, ref, _ = load_reference("gemma3_causal_lm")
    model = minilm.from_pretrained(folder)
    expected = model(ref["input_ids"], attention_mask=ref["attention_mask"]).logits
    with ops.use_backend(backend):
        model.to_device()
        got = ops.to_host(model(ref["input_ids"], attention_mask=ref["attention_mask"]).logits)
    model.to_device()  # back to host arrays
    keep = ref["attention_mask"].astype(bool)
    assert np.abs(got - expected)[keep].max() <= 1e-4 * max(1.0, np.abs(expected[keep]).max())

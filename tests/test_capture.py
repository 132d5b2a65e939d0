"""Activations by name (`minilm.capture`, `minilm.intervene`, `minilm.capture_names`), on every
family's tiny causal-LM fixture and every backend available (cupy skips without a GPU).

Each captured quantity is checked against what the forward pass returns (output_hidden_states,
output_attentions, output_router_logits, logits) or recomputed from its neighbours in the chain
(scores from queries_rope and keys_rope, weights from scores_masked, the head outputs from the
weights and the values, the projections from their inputs), so a tap that names the wrong
tensor fails. Tolerance: the project's, 1e-4 * max(1, max|ref|) in float32."""

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, tolerance
from test_backends import cupy_ready

import minilm
from minilm import activations, nn, ops
from minilm.models.bloom import BloomForCausalLM
from minilm.models.gemma3 import gemma_rms_norm
from minilm.models.qwen3_moe import Qwen3MoeForCausalLM

FAMILIES = ["gemma3_causal_lm", "qwen3_moe_causal_lm", "bloom_causal_lm", "phi3_causal_lm"]
BACKENDS = [
    "numpy",
    "numba",
    pytest.param(
        "cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(not cupy_ready(), reason="CuPy or a CUDA device is missing")]
    ),
]
DOC = Path(__file__).parent.parent / "docs" / "activations.md"

IDS = np.array([[0, 0, 5, 17, 42, 8], [3, 9, 21, 4, 11, 60]])  # (batch, seq), row 0 left-padded
MASK = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])


def close(actual, expected):
    expected = np.asarray(expected, np.float32)
    diff = np.max(np.abs(np.asarray(actual, np.float32) - expected))
    assert diff <= tolerance(expected), f"max|diff| = {diff:.3g} > {tolerance(expected):.3g}"


def load(name, backend):
    with ops.use_backend(backend):
        return minilm.from_pretrained(FIXTURES / name)


def layout(model):
    """(layer prefix, attention module, output projection, final-norm name, number of layers)"""
    n = model.config.num_hidden_layers
    if isinstance(model, BloomForCausalLM):
        return "h", "self_attention", "dense", "ln_f", n
    return "layers", "self_attn", "o_proj", "norm", n


def blocks(model):
    return model.params[model.base_model_prefix][layout(model)[0]]


def host(x):
    return ops.to_host(x)


def forward(model, **extra):
    kwargs = dict(attention_mask=MASK, output_attentions=True, output_hidden_states=True, **extra)
    if isinstance(model, Qwen3MoeForCausalLM):
        kwargs["output_router_logits"] = True
    return model(IDS, **kwargs)


# ---------------------------------------------------------------------------------------------
# Captured values equal what the forward pass computes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_captured_values_equal_the_forward_outputs(name, backend):
    model = load(name, backend)
    L, attn, _, final_norm, n = layout(model)
    with ops.use_backend(backend):
        with minilm.capture("**") as acts:
            out = forward(model)
    assert all(type(a) is np.ndarray for _, a in acts.items())  # on the host, whatever the backend
    close(acts["logits"], host(out.logits))
    hidden = [host(h) for h in out.hidden_states]
    embeddings = "word_embeddings_layernorm.output" if L == "h" else "embed_tokens.output"
    close(acts[embeddings], hidden[0])
    for i in range(n - 1):
        close(acts[f"{L}.{i}.output"], hidden[i + 1])
    close(acts[f"{final_norm}.output"], hidden[-1])
    close(acts[f"model.{final_norm}.output" if L != "h" else f"transformer.{final_norm}.output"], hidden[-1])
    # the residual stream after the last block, normed, is the last hidden state
    p = model.params[model.base_model_prefix][final_norm]
    last = acts[f"{L}.{n - 1}.output"]
    if "gemma3" in name:
        normed = gemma_rms_norm(last, host(p.weight), model.config.rms_norm_eps)
    elif L == "h":
        normed = nn.layer_norm(last, host(p.weight), host(p.bias), model.config.layer_norm_epsilon)
    else:
        normed = nn.rms_norm(last, host(p.weight), model.config.rms_norm_eps)
    close(normed, hidden[-1])
    for i in range(n):
        close(acts[f"{L}.{i}.{attn}.attn_weights"], host(out.attentions[i]))
    if "qwen3_moe" in name:
        sparse = [i for i in range(n) if model.config.is_sparse_layer(i)]
        assert len(sparse) == len(out.router_logits) >= 1
        for i, logits in zip(sparse, out.router_logits, strict=True):
            close(acts[f"{L}.{i}.mlp.router_logits"], host(logits))
            probs = nn.softmax(host(logits).astype(np.float32), axis=-1)
            close(acts[f"{L}.{i}.mlp.router_probs"], probs)
            top = np.argsort(-probs, axis=-1, kind="stable")[:, : model.config.num_experts_per_tok]
            np.testing.assert_array_equal(acts[f"{L}.{i}.mlp.expert_indices"], top)
            chosen = np.take_along_axis(probs, top, axis=-1)
            close(acts[f"{L}.{i}.mlp.expert_weights"], chosen / chosen.sum(-1, keepdims=True))
        assert all(f"{L}.{i}.mlp.intermediate" in acts for i in range(n) if i not in sparse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_each_attention_tap_names_its_tensor(name, backend):
    """Recompute every quantity of one layer from the previous one in the chain."""
    model = load(name, backend)
    L, attn, o_proj, _, n = layout(model)
    cfg = model.config
    with ops.use_backend(backend):
        with minilm.capture("**") as acts:
            model(IDS, attention_mask=MASK)
    for i in range(n):
        a = f"{L}.{i}.{attn}."
        p = blocks(model)[i][attn]
        q, k, v = acts[a + "queries"], acts[a + "keys"], acts[a + "values"]
        if a + "queries_normed" in acts:  # QK-norm
            norm = gemma_rms_norm if "gemma3" in name else nn.rms_norm
            close(acts[a + "queries_normed"], norm(q, host(p.q_norm.weight), cfg.rms_norm_eps))
            close(acts[a + "keys_normed"], norm(k, host(p.k_norm.weight), cfg.rms_norm_eps))
        if a + "queries_rope" in acts:
            q, k = acts[a + "queries_rope"], acts[a + "keys_rope"]
            before = acts[a + "queries_normed"] if a + "queries_normed" in acts else acts[a + "queries"]
            close(np.linalg.norm(q, axis=-1), np.linalg.norm(before, axis=-1))  # a rotation keeps lengths
            assert np.abs(q - before).max() > 1e-3  # ... and moves the vectors (positions 1..5)
        groups = q.shape[1] // k.shape[1]
        k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)  # (batch, num_heads, kv_seq, head_dim)
        scale = cfg.query_pre_attn_scalar**-0.5 if "gemma3" in name else cfg.head_dim**-0.5
        close(acts[a + "scores"], q @ k.swapaxes(-1, -2) * scale)
        masked, seen = acts[a + "scores_masked"], MASK[:, None, None, :].astype(bool)
        expected = acts[a + "scores"] + (acts["alibi"] if L == "h" else 0)
        visible = seen & np.tril(np.ones((IDS.shape[1],) * 2, bool))
        window = cfg.layer_window(i) if "gemma3" in name else None
        if window:
            visible &= np.triu(np.ones_like(visible), 1 - window)
        hidden = ~visible & visible.any(-1, keepdims=True)  # rows with no visible key attend uniformly
        assert np.isneginf(masked[np.broadcast_to(hidden, masked.shape)]).all()
        close(np.where(visible, masked, 0), np.where(visible, expected, 0))
        weights = acts[a + "attn_weights"]
        close(weights[:, :, 2:], nn.softmax(masked, axis=-1)[:, :, 2:])  # rows past row 0's padding
        heads = acts[a + "attn_output_heads"]
        close(heads, weights @ v)
        merged = nn.merge_heads(heads)  # (batch, seq, num_heads * head_dim)
        projection = p[o_proj]
        bias = host(projection.get("bias")) if projection.get("bias") is not None else 0
        close(acts[a + "output"], merged @ host(projection.weight).T + bias)
        mlp = blocks(model)[i].mlp
        if f"{L}.{i}.mlp.intermediate" in acts:
            down = mlp.dense_4h_to_h if L == "h" else mlp.down_proj
            bias = host(down.bias) if L == "h" else 0
            close(acts[f"{L}.{i}.mlp.output"], acts[f"{L}.{i}.mlp.intermediate"] @ host(down.weight).T + bias)


# ---------------------------------------------------------------------------------------------
# Interventions
# ---------------------------------------------------------------------------------------------


def zero_o_proj_columns(model, layer, columns):
    """The model with some input columns of one layer's attention output projection set to zero."""
    _, attn, o_proj, _, _ = layout(model)
    projection = blocks(model)[layer][attn][o_proj]
    weight = np.array(host(projection.weight))
    weight[:, columns] = 0
    projection["weight"] = ops.prepare_weight(ops.like(weight, projection.weight))
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_zeroing_a_head_equals_zeroing_its_output_projection_columns(name, backend):
    model = load(name, backend)
    L, attn, _, _, _ = layout(model)
    h, d = 1, model.config.head_dim

    def zero_head(a):
        a[:, h] = 0
        return a

    with ops.use_backend(backend):
        clean = host(model(IDS, attention_mask=MASK).logits)
        with minilm.capture(f"{L}.1.{attn}.attn_output_heads") as acts:
            with minilm.intervene({f"{L}.1.{attn}.attn_output_heads": zero_head}):
                ablated = host(model(IDS, attention_mask=MASK).logits)
        assert (acts[f"{L}.1.{attn}.attn_output_heads"][:, h] == 0).all()  # the capture sees the replacement
        assert np.abs(ablated - clean).max() > 1e-4  # one head matters
        reference = host(zero_o_proj_columns(model, 1, slice(h * d, (h + 1) * d))(IDS, attention_mask=MASK).logits)
    close(ablated, reference)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_zeroing_all_heads_equals_a_zero_output_projection(name, backend):
    model = load(name, backend)
    L, attn, _, _, _ = layout(model)

    def silence(a):  # in place, returning None
        a[...] = 0

    with ops.use_backend(backend):
        with minilm.intervene({f"model.{L}.0.{attn}.attn_output_heads": silence}):
            ablated = host(model(IDS, attention_mask=MASK).logits)
        reference = host(zero_o_proj_columns(model, 0, slice(None))(IDS, attention_mask=MASK).logits)
    close(ablated, reference)


def test_intervening_on_the_scores_reaches_the_weights():
    model = load("gemma3_causal_lm", "numba")
    with ops.use_backend("numba"):
        with minilm.capture("layers.2.self_attn.attn_weights") as acts:  # a global layer
            with minilm.intervene({"layers.2.self_attn.scores_masked": lambda s: np.where(np.isinf(s), s, 0.0)}):
                model(IDS[1:])
    weights = acts["layers.2.self_attn.attn_weights"][0, 0]  # uniform over each query's visible keys
    close(weights, np.tril(np.ones((6, 6))) / np.arange(1, 7)[:, None])


def test_forcing_the_router_changes_the_routing():
    model = load("qwen3_moe_causal_lm", "numpy")
    with minilm.capture("layers.0.mlp.expert_indices", "logits") as acts:
        with minilm.intervene({"layers.0.mlp.router_logits": lambda r: 0 * r + (np.arange(r.shape[1]) < 2)}):
            forced = model(IDS).logits
    np.testing.assert_array_equal(acts["layers.0.mlp.expert_indices"], np.tile([0, 1], (IDS.size, 1)))
    assert np.abs(forced - model(IDS).logits).max() > 1e-4


# ---------------------------------------------------------------------------------------------
# Blocks end cleanly; names are checked
# ---------------------------------------------------------------------------------------------


def test_no_tap_is_left_after_a_block_even_after_an_exception():
    model = load("qwen3_moe_causal_lm", "numpy")
    clean = model(IDS).logits
    with pytest.raises(RuntimeError, match="boom"):
        with minilm.capture("logits"), minilm.intervene({"layers.0.output": lambda x: x * 0}):
            model(IDS)
            raise RuntimeError("boom")
    assert activations.hooks == []
    with pytest.raises(minilm.ActivationNameError):
        with minilm.capture("logits", "layers.0.outptu"):
            model(IDS)
    assert activations.hooks == []
    with pytest.raises(minilm.InputError, match="keep the shape"):
        with minilm.intervene({"layers.0.output": lambda x: x[:, :1]}):
            model(IDS)
    assert activations.hooks == []
    np.testing.assert_array_equal(model(IDS).logits, clean)  # the intervention is gone


def test_unused_taps_cost_one_check(monkeypatch):
    """Outside a block, a tap returns its argument itself and never builds a name."""
    model = load("gemma3_causal_lm", "numpy")
    x = np.ones(3)
    assert activations.tap(model.params, "logits", x) is x

    def refuse(*args):
        raise AssertionError("a tap did work outside a capture block")

    monkeypatch.setattr(activations, "_tapped", refuse)
    monkeypatch.setattr(activations, "name_of", refuse)
    model(IDS, attention_mask=MASK, output_attentions=True)


def test_unknown_names_are_refused_with_close_matches():
    model = load("qwen3_moe_causal_lm", "numpy")
    with pytest.raises(minilm.ActivationNameError, match=r"layers\.0\.self_attn\.attn_weights"):
        with minilm.capture("layers.0.self_attn.atn_weights"):
            model(IDS)
    with pytest.raises(minilm.ActivationNameError, match="router_probs"):
        with minilm.intervene({"layers.*.mlp.router_prob": lambda x: x}):
            model(IDS)
    with pytest.raises(minilm.ActivationNameError, match="no forward pass ran"):
        with minilm.capture("logits"):
            pass
    with minilm.capture("layers.*.output") as acts:  # `*` stays inside one component
        model(IDS)
    assert list(acts) == ["layers.0.output", "layers.1.output", "layers.2.output"]
    with pytest.raises(minilm.ActivationNameError, match="layers.0.output"):
        acts["layers.0.outpt"]
    with pytest.raises(minilm.InputError):
        with minilm.capture():
            pass
    with pytest.raises(minilm.InputError):
        minilm.intervene({"logits": 0}).__enter__()
    assert activations.hooks == []


def test_names_follow_the_checkpoint_paths():
    model = load("qwen3_moe_causal_lm", "numpy")
    assert model.params.model.layers[2].self_attn.path == "model.layers.2.self_attn"
    names = minilm.capture_names(model)
    assert names[0] == "embed_tokens.output" and names[-1] == "logits"
    assert len(names) == len(set(names))
    assert {activations.name_of(blocks(model)[i].mlp, "output") for i in range(3)} <= set(names)
    assert activations.hooks == []


# ---------------------------------------------------------------------------------------------
# generate(): one array per forward pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_records_every_step(backend):
    model = load("gemma3_causal_lm", backend)
    prompt = IDS[1:, :4]
    with ops.use_backend(backend):
        with minilm.capture("logits", "layers.2.self_attn.attn_weights") as acts:  # a global layer
            ids = model.generate(prompt, max_new_tokens=4, eos_token_id=-1)  # -1: no early stop
    steps = acts.all("logits")
    assert len(steps) == 4 and steps[0].shape == (1, 1, model.config.vocab_size)  # logits_to_keep=1
    np.testing.assert_array_equal([s[0, -1].argmax() for s in steps], ids[0, 4:])  # greedy: the argmax
    weights = acts.all("layers.2.self_attn.attn_weights")
    assert [w.shape[2:] for w in weights] == [(4, 4), (1, 5), (1, 6), (1, 7)]
    np.testing.assert_array_equal(acts["logits"], steps[-1])


# ---------------------------------------------------------------------------------------------
# The documentation lists what the code offers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_docs_list_every_name(name):
    table = activations.names_table(load(name, "numpy"))
    text = DOC.read_text()
    section = re.search(rf"<!-- names: {name} -->\n(.*?)<!-- end -->", text, re.S)
    assert section, f"docs/activations.md has no table for {name} (python scripts/activations_doc.py)"
    assert section.group(1) == table, "docs/activations.md is stale: run python scripts/activations_doc.py"


def test_the_docs_example_runs(monkeypatch):
    monkeypatch.chdir(DOC.parent.parent)
    block = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    namespace = {}
    exec(compile(block, "docs/activations.md", "exec"), namespace)
    assert namespace["acts"]["layers.0.mlp.router_probs"].shape == (6, 8)


def test_scores_masked_are_soft_capped_when_the_model_caps():
    model = load("gemma3_causal_lm", "numpy")
    model.config.apply_attn_logit_softcapping, model.config.attn_logit_softcapping = True, 0.05  # keras-hub's rule
    with minilm.capture("layers.2.self_attn.scores*") as acts:  # a global layer: every earlier key visible
        model(IDS[1:])
    scores, masked = acts["layers.2.self_attn.scores"], acts["layers.2.self_attn.scores_masked"]
    visible = np.tril(np.ones((6, 6), bool))
    close(np.where(visible, masked, 0), np.where(visible, 0.05 * np.tanh(scores / 0.05), 0))
    assert np.abs(scores).max() > 0.1  # the cap changes something


def test_a_keras_hub_backbone_offers_its_base_models_names():
    backbone = minilm.Backbone.from_preset(FIXTURES / "qwen3_moe_base")
    names = minilm.capture_names(backbone)
    assert names[0] == "embed_tokens.output" and names[-1] == "norm.output"
    inputs = {"token_ids": IDS[1:], "padding_mask": MASK[1:]}
    with minilm.capture("norm.output") as acts:
        hidden = backbone(inputs)
    np.testing.assert_array_equal(acts["norm.output"], hidden)


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_real_model_captures_while_generating():
    """The shipped model under its default backend: the captured logits of each generate step pick
    transformers' greedy ids, the residual stream after the last layer, normed, is the final norm's
    output, and every attention row sums to one over every key so far."""
    import json

    from minilm import default_model

    reference = json.loads((FIXTURES / "gemma3_270m_reference.json").read_text())
    case = next(c for c in reference["generation"]["cases"] if c["name"] == "capital")
    prompt = np.array([case["input_ids"]])
    with ops.use_backend("numba"):
        model = minilm.from_pretrained(default_model.default_model_path())
        cfg = model.config
        last = f"layers.{cfg.num_hidden_layers - 1}.output"
        with minilm.capture("logits", "layers.*.self_attn.attn_weights", last, "norm.output") as acts:
            ids = model.generate(prompt, max_new_tokens=3)
    assert ids[0, prompt.shape[1] :].tolist() == case["new_ids"][:3]
    assert [int(s[0, -1].argmax()) for s in acts.all("logits")] == case["new_ids"][:3]
    final = model.params.model.norm.weight
    close(gemma_rms_norm(acts.all(last)[0], ops.to_host(final), cfg.rms_norm_eps), acts.all("norm.output")[0])
    n = prompt.shape[1]  # shorter than the sliding window: every layer sees every key
    for i in range(cfg.num_hidden_layers):
        steps = acts.all(f"layers.{i}.self_attn.attn_weights")
        assert [w.shape[2:] for w in steps] == [(n, n), (1, n + 1), (1, n + 2)]
        for weights in steps:
            close(weights.sum(-1), np.ones(weights.shape[:-1]))

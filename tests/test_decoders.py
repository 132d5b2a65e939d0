"""Compiled decode steps (`ops.compiled_decoder`) against the readable forward they replace.

A backend may register a compiled decode step per model type (Numba: kernels/numba/decode.py;
CuPy: kernels/cupy/decode.py). Each is checked here the same way: the prompt runs through the
model's forward and fills the KV cache; then, token after token, the decoder's logits must equal
what `model(token, past_key_values=cache)` gives, well past the sliding window (so the ring
buffers wrap), and greedy generation must give the same ids with the decoder as without it.
"""

import importlib

import numpy as np
import pytest
from conftest import fixture_path

from minilm import ops
from minilm.errors import ConfigError
from minilm.generation import generate
from minilm.models.gemma3 import Gemma3ForCausalLM, make_cache

TOL = 1e-4  # relative to max(1, max|ref|): float32, sums in another order


def _backends_with_decoders(model_type):
    found = []
    for name in ("numba", "cupy"):
        try:
            implementations = ops._load(name)
        except (ConfigError, ImportError):
            continue
        if model_type in implementations["decoders"]:
            found.append(name)
    return found


GEMMA3_BACKENDS = _backends_with_decoders("gemma3_text")


def backend_param(name):
    marks = [pytest.mark.gpu] if name == "cupy" else []
    return pytest.param(name, marks=marks)


def decode_pairs(model, prompt, new_tokens, seed=0):
    """(reference logits, decoder logits) for each of `new_tokens` steps after `prompt` (1, seq).
    The tokens fed are random (the same for both), so every step checks a fresh row of the
    embedding table."""
    rng = np.random.default_rng(seed)
    mask = np.ones_like(prompt)
    cache = make_cache(model.config)
    out = model(input_ids=prompt, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    decoder = ops.compiled_decoder(model, out.past_key_values, mask, prompt.shape[1] + new_tokens)
    assert decoder is not None, "the backend registers a decoder for this model but built none"
    pairs = []
    for position in range(prompt.shape[1], prompt.shape[1] + new_tokens):
        token = rng.integers(0, model.config.vocab_size, (1,))
        mask = np.ones((1, position + 1), np.int64)
        ref = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=np.array([[position]]),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        got = decoder.step(token, position)
        pairs.append((ops.to_host(ref), ops.to_host(got)))
    return pairs


@pytest.mark.skipif(not GEMMA3_BACKENDS, reason="no backend registers a Gemma 3 decoder here")
@pytest.mark.parametrize("backend", [backend_param(b) for b in GEMMA3_BACKENDS] or ["none"])
@pytest.mark.parametrize("prompt_len", [1, 3, 9])
def test_gemma3_decoder_matches_the_forward(backend, prompt_len):
    """Tiny Gemma 3 (sliding window 4, soft caps, GQA, QK-norm): 12 steps, so the sliding layers'
    ring buffers wrap several times."""
    with ops.use_backend(backend):
        model = Gemma3ForCausalLM.from_pretrained(fixture_path("gemma3_causal_lm"))
        prompt = np.random.default_rng(prompt_len).integers(0, model.config.vocab_size, (1, prompt_len))
        for step, (ref, got) in enumerate(decode_pairs(model, prompt, 12)):
            assert got.shape == ref.shape and got.dtype == np.float32
            tol = TOL * max(1.0, float(np.abs(ref).max()))
            assert np.abs(got - ref).max() <= tol, f"step {step}: max|diff| {np.abs(got - ref).max():.3g} > {tol:.3g}"


@pytest.mark.skipif(not GEMMA3_BACKENDS, reason="no backend registers a Gemma 3 decoder here")
@pytest.mark.parametrize("backend", [backend_param(b) for b in GEMMA3_BACKENDS] or ["none"])
def test_generation_gives_the_same_ids_with_and_without_the_decoder(backend, monkeypatch):
    with ops.use_backend(backend):
        model = Gemma3ForCausalLM.from_pretrained(fixture_path("gemma3_causal_lm"))
        prompt = np.array([[5, 17, 3, 40, 41]])
        with_decoder = generate(model, prompt, max_new_tokens=16, eos_token_id=[])
        monkeypatch.setenv("MINILM_COMPILED_DECODE", "0")
        without = generate(model, prompt, max_new_tokens=16, eos_token_id=[])
    np.testing.assert_array_equal(with_decoder, without)


def test_no_decoder_while_activations_are_captured():
    """capture / intervene read the readable forward: no compiled step runs under them."""
    import minilm

    registered = {"gemma3_text": lambda *args: pytest.fail("the decoder factory ran under capture")}
    ops.register_backend("decoder-probe", {"decoders": registered})
    with ops.use_backend("decoder-probe"):
        model = Gemma3ForCausalLM.from_pretrained(fixture_path("gemma3_causal_lm"))
        with minilm.capture("layers.0.mlp.output"):
            generate(model, np.array([[5, 17]]), max_new_tokens=3)


def test_numpy_has_no_decoder():
    """The reference backend always runs the readable forward."""
    importlib.import_module("minilm.ops")
    with ops.use_backend("numpy"):
        model = Gemma3ForCausalLM.from_pretrained(fixture_path("gemma3_causal_lm"))
        assert ops.compiled_decoder(model, make_cache(model.config), np.ones((1, 2)), 8) is None

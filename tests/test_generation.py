"""Sampling, processor by processor, against transformers' logits processors (saved by
`python -m scripts.fixtures --only logits_processors`), and the properties the loop relies on."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilm import generation
from minilm.generation import apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p

FIXTURE = np.load(__import__("conftest").FIXTURES / "logits_processors.npz")
LOGITS, GENERATED = FIXTURE["logits"], FIXTURE["generated_ids"]


def assert_same_scores(actual, expected):
    """Same tokens filtered (-inf), same values elsewhere (float32 rounding of one division)."""
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    keep = ~np.isneginf(expected)
    np.testing.assert_allclose(actual[keep], expected[keep], rtol=1e-6, atol=0)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty(penalty):
    assert_same_scores(apply_repetition_penalty(LOGITS, GENERATED, penalty), FIXTURE[f"repetition_penalty_{penalty}"])


def test_temperature():
    assert_same_scores(LOGITS / np.float32(0.7), FIXTURE["temperature_0.7"])


def test_top_k():
    assert_same_scores(apply_top_k(LOGITS, 5), FIXTURE["top_k_5"])


@pytest.mark.parametrize("p", [0.8, 0.3])
def test_top_p(p):
    assert_same_scores(apply_top_p(LOGITS, p), FIXTURE[f"top_p_{p}"])


def test_min_p():
    assert_same_scores(apply_min_p(LOGITS, 0.1), FIXTURE["min_p_0.1"])


def test_the_chain_in_minilms_order():
    """repetition penalty -> temperature -> top-k -> top-p -> min-p, as `next_tokens` applies them."""
    scores = apply_repetition_penalty(LOGITS, GENERATED, 1.2) / np.float32(0.8)
    scores = apply_min_p(apply_top_p(apply_top_k(scores, 10), 0.9), 0.05)
    assert_same_scores(scores, FIXTURE["chain"])


def test_sampling_draws_only_from_what_the_processors_keep():
    rng = np.random.default_rng(0)
    kept = ~np.isneginf(FIXTURE["chain"])
    for _ in range(50):
        tokens = generation.next_tokens(
            LOGITS,
            GENERATED,
            do_sample=True,
            temperature=0.8,
            top_k=10,
            top_p=0.9,
            min_p=0.05,
            repetition_penalty=1.2,
            rng=rng,
        )
        assert kept[np.arange(len(tokens)), tokens].all()


def test_greedy_applies_the_repetition_penalty_only():
    tokens = generation.next_tokens(
        LOGITS,
        GENERATED,
        do_sample=False,
        temperature=1.0,
        top_k=None,
        top_p=None,
        min_p=None,
        repetition_penalty=1.3,
        rng=None,
    )
    np.testing.assert_array_equal(tokens, np.argmax(FIXTURE["repetition_penalty_1.3"], axis=-1))


def top_p_by_full_sort(logits, p):
    """The textbook nucleus: sort the whole vocabulary (stable), keep until the mass reaches p."""
    order = np.argsort(-logits, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(generation.nn.softmax(logits, axis=-1), order, axis=-1)
    drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= p
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, logits)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    vocab=st.integers(1, 600),
    p=st.floats(0.01, 0.999),
    ties=st.booleans(),
    candidates=st.sampled_from([1, 4, 256]),
)
def test_top_p_sorts_only_the_head_and_keeps_what_a_full_sort_keeps(seed, vocab, p, ties, candidates):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(2, vocab)).astype(np.float32)
    if ties:  # many equal logits, some right at the nucleus edge
        logits = np.round(logits).astype(np.float32)
    before = generation.NUCLEUS_CANDIDATES
    generation.NUCLEUS_CANDIDATES = candidates
    try:
        np.testing.assert_array_equal(apply_top_p(logits, p), top_p_by_full_sort(logits, p))
    finally:
        generation.NUCLEUS_CANDIDATES = before


def test_top_p_at_the_exact_boundary():
    """Two tokens of probability 0.5 and p = 0.5: the first reaches p alone, so only it is kept
    (transformers keeps one too); ties go to the lower token id, as a stable sort orders them."""
    kept = ~np.isneginf(apply_top_p(np.zeros((1, 2), np.float32), 0.5))
    np.testing.assert_array_equal(kept, [[True, False]])

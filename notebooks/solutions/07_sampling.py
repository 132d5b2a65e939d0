"""Solutions to the exercises of notebooks/07_sampling (for teachers)."""

import numpy as np

import minilm
from minilm import generation


def min_p_filter(logits, min_p):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.where(probs < min_p * probs.max(-1, keepdims=True), -np.inf, logits)


def repetition_penalty(logits, generated_ids, penalty):
    logits = logits.copy()
    for row, ids in enumerate(generated_ids):
        seen = np.unique(ids)
        logits[row, seen] = np.where(logits[row, seen] > 0, logits[row, seen] / penalty, logits[row, seen] * penalty)
    return logits


model, _ = minilm.api.load(backend="numpy")  # loaded once per process
logits = model(np.array([model.tokenizer.encode("The capital of France is")]), logits_to_keep=1).logits[:, -1]

ANSWERS = {
    "sampling.1": min_p_filter,
    "sampling.2": repetition_penalty,
    "sampling.3": int(np.isfinite(generation.apply_top_p(logits, 0.9)).sum()),
}

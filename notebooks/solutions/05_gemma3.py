"""Solutions to the exercises of notebooks/05_gemma3 (for teachers)."""

import numpy as np


def gemma_rms_norm(x, weight, eps):
    x = x.astype(np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + weight)


ANSWERS = {
    "gemma3.1": gemma_rms_norm,
    "gemma3.2": sum(max(0, q + 1 - 512) for q in range(600)),
    "gemma3.3": 30 * np.tanh(60 / 30),
}

"""Solutions to the exercises of notebooks/04_positions (for teachers)."""

import numpy as np


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


ANSWERS = {"rope.1": apply_rope, "rope.2": 2 * np.pi / 1e6 ** (-2 * 127 / 256), "rope.3": 2 ** (-8 / 16)}

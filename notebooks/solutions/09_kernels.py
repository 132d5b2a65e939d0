"""Solutions to the exercises of notebooks/09_kernels (for teachers)."""

import numpy as np


def tiled_linear(x, weight, tile):
    y = np.zeros((x.shape[0], weight.shape[0]), np.float32)
    for i in range(0, x.shape[1], tile):
        y += x[:, i : i + tile] @ weight[:, i : i + tile].T
    return y


per_layer = 1024 * 640 + 2 * 256 * 640 + 640 * 1024 + 2 * 2048 * 640 + 640 * 2048
ANSWERS = {"kernels.1": tiled_linear, "kernels.2": 18 * per_layer * 4 / 1e6}

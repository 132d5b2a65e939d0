"""Solutions to the exercises of notebooks/08_quantization (for teachers)."""

import numpy as np


def dequantize_q8_0(blocks):
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # (n_blocks, 32)
    return d * q


value = 100
sub_block = value // 32  # 3
chunk, high = divmod(sub_block, 2)  # chunk 1, high nibbles
ANSWERS = {
    "quantization.1": dequantize_q8_0,
    "quantization.2": (2 + 2 + 12 + 128) * 8 / 256,
    "quantization.3": sub_block * 1000 + chunk * 32 + value % 32,
}

"""Numba CPU kernels for the ops of `minilm.ops`; importing this package registers the backend.

    compile.py    what every kernel shares: bf16 loads, dot products, `_launch`, precision rules
    linear.py     linear: the decode gemv, BLAS for many rows, int8 block weights (`prepare_weight`);
                  linear_input_grad (dx = dy W, the backward pass): BLAS
    quantized.py  linear on GGUF blocks kept as they are (Q8_0, Q5_0, Q4_K, Q6_K): gemv, tiled BLAS
    attention.py  attention: the fused decode kernel (flash-decoding), BLAS + masked softmax
    moe.py        moe_dispatch: counting sort by expert, per-expert kernels or BLAS, ordered sums
    decode.py     decoders: Gemma 3's compiled decode step (`ops.compiled_decoder`), a few calls per layer
    fused.py      one-pass GELU-tanh for the `@fusable` function (minilm/fusion.py)

Each op has the signature of its NumPy reference in `minilm/ops.py` and returns what the reference
returns, to the tolerances stated in `tests/test_kernels.py`.
"""

from minilm import ops

from . import (  # the modules stay attributes of the package (not shadowed by their ops)
    attention,
    decode,
    fused,
    linear,
    moe,
    quantized,
)

ops.register_backend(
    "numba",
    {
        "linear": linear.linear,
        "attention": attention.attention,
        "moe_dispatch": moe.moe_dispatch,
        "prepare_weight": linear.prepare_weight,
        "reads_quantized": quantized.reads_quantized,
        "linear_input_grad": linear.linear_input_grad,
        "decoders": {"gemma3_text": decode.gemma3_decoder},
        "fused": fused.FUSED,
    },
)

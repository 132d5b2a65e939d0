"""CuPy GPU kernels for the ops of `minilm.ops`; importing this package registers the backend
"cupy", or raises `minilm.errors.ConfigError` without CuPy or a CUDA device.

    common.py     the CuPy import, moving arrays host <-> device, dtypes, `prepare_weight` (weights
                  to GPU memory once, at load), precision rules
    linear.py     linear: one cuBLAS gemm; linear_input_grad (dx = dy W): one cuBLAS gemm
    attention.py  attention: cuBLAS gemms around one RawKernel masked softmax
    moe.py        moe_dispatch: pairs sorted by expert, cuBLAS per chosen expert, ordered sums
    fused.py      one-launch norms, RoPE and GELU for the `@fusable` functions (minilm/fusion.py)
    decode.py     Gemma 3's decode step as eight kernels a layer, replayed as a CUDA graph

Each op has the signature of its NumPy reference in `minilm/ops.py` and returns what the reference
returns, to the tolerances stated in `tests/test_kernels.py`.
"""

from minilm import ops

# the modules stay attributes of the package (not shadowed by their ops)
from . import attention, common, decode, fused, linear, moe

ops.register_backend(
    "cupy",
    {
        "linear": linear.linear,
        "attention": attention.attention,
        "moe_dispatch": moe.moe_dispatch,
        "prepare_weight": common.prepare_weight,
        "fused": fused.FUSED,
        "linear_input_grad": linear.linear_input_grad,
        "decoders": decode.DECODERS,
    },
)

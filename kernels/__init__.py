"""Compiled kernels for minilm's hot spots, installed as `minilm.kernels`.

`numba/` (CPU) and `cupy/` (GPU) each register implementations of the ops in `minilm.ops`
(linear, attention, moe_dispatch, prepare_weight) when imported; `minilm.set_backend(...)`
imports them on demand. Inside each, one file per hot spot: `linear.py`, `attention.py`,
`moe.py`, next to what they share (`numba/compile.py`, `cupy/common.py`).
"""

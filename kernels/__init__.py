"""Compiled kernels for minilm's three hot spots, installed as `minilm.kernels`.

`numba_backend` (CPU) and `cupy_backend` (GPU) register implementations of the ops in
`minilm.ops` when imported; `minilm.set_backend("numba" | "cupy")` imports them on demand.
"""

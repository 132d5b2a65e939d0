"""Small functions a backend may run as one fused kernel: norms, RoPE, activations.

A decode step of a small model is hundreds of these tiny operations, and written as NumPy each is
several array passes (an RMSNorm is a square, a mean, an add, a square root, a divide, a multiply
and two casts). On the CPU that costs little; on a GPU each pass is a kernel launch, and launches,
not arithmetic, set the speed. So the functions marked `@fusable` here keep their NumPy body as
the reference, and a backend may register one fused kernel per function name
(`kernels/cupy/fused.py`), tested against that body:

    @fusable
    def rms_norm(x, weight, eps):
        ...  # the reference, as you read it

    rms_norm(x, w, 1e-6)  # the active backend's fused "rms_norm" if it has one and takes these
                          # arguments, else the body above

A fused implementation returns `NotImplemented` for arguments it does not take (NumPy arrays on
the GPU backend, a dtype it has no kernel for), and the reference runs. On the NumPy backend
there is nothing registered: the cost is one dictionary lookup per call.

This module is a leaf (it imports no other minilm module): `ops` tells it how to find the active
backend's fused kernels (`set_lookup`), so `nn`, `rope` and the model files can use `@fusable`
without importing `ops`.
"""

from __future__ import annotations

import functools

FUSABLE = {}  # name -> the reference function (what a fused kernel must compute)


def _no_fused_kernels(name):
    return None


_lookup = [_no_fused_kernels]  # set by `ops`: name -> the active backend's fused kernel or None


def set_lookup(lookup):
    """Called once by `minilm.ops`: `lookup(name)` gives the active backend's kernel for `name`."""
    _lookup[0] = lookup


def fusable(reference):
    """Mark `reference` as replaceable by a backend's fused kernel registered under its name."""
    name = reference.__name__
    if name in FUSABLE:
        raise ValueError(f"two fusable functions are named {name!r}; fused kernels are found by name")
    FUSABLE[name] = reference

    @functools.wraps(reference)
    def run(*args, **kwargs):
        fused = _lookup[0](name)
        if fused is not None:
            result = fused(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return reference(*args, **kwargs)

    run.reference = reference  # the NumPy body, for tests and for readers
    return run

"""Error types minilm raises on bad input.

Every error names the problem (the tensor, the field, the expected and the actual value), so
that a user never has to read a stack trace from deep inside NumPy. Each subclasses the
built-in exception a Python user would catch for that kind of problem.
"""


class MinilmError(Exception):
    """Base class of every error minilm raises on purpose."""


class InputError(MinilmError, ValueError):
    """Bad arguments to a forward pass or to generate: wrong rank or shape, token ids out of
    range, a mask that does not match the ids, an impossible sampling option."""


class ConfigError(MinilmError, ValueError):
    """A config value that is impossible (negative sizes, heads that do not divide the hidden
    size, rope factors of the wrong length, an unknown rope type, ...)."""


class UnknownArchitectureError(MinilmError, ValueError):
    """config.json (or GGUF metadata) names an architecture minilm does not implement."""


class CheckpointError(MinilmError, ValueError):
    """The weights do not fit the model: a missing, unexpected, mis-shaped or corrupt tensor,
    or a config that does not match the checkpoint."""


class CheckpointNotFoundError(MinilmError, FileNotFoundError):
    """A file or folder that should hold a checkpoint, config or preset is not there."""


class NumericalError(MinilmError, ArithmeticError):
    """A forward pass produced NaN or infinite values where there must be numbers, e.g. logits of
    a model run in float16 whose activations overflow (float32 or bfloat16 have the range)."""


class ActivationNameError(MinilmError, LookupError):
    """An activation name or pattern (`minilm.capture`, `minilm.intervene`) that names nothing the
    forward pass computed; the message lists the closest names."""

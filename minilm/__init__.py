"""minilm: readable NumPy implementations of modern LLM architectures, checked against
Hugging Face transformers, with Numba and CuPy kernels behind one seam (`minilm.ops`).

    import minilm
    model = minilm.from_pretrained("path/to/checkpoint")        # HF folder or .gguf
    minilm.generate("The capital of France is")                # the shipped Gemma 3 270M
"""

from . import default_model, ops
from .auto import from_pretrained
from .backbone import Backbone
from .cache import KVCache
from .errors import (CheckpointError, CheckpointNotFoundError, ConfigError, InputError, MinilmError,
                     UnknownArchitectureError)
from .modeling import ModelOutput
from .models.qwen3_moe import (Qwen3MoeBackbone, Qwen3MoeConfig, Qwen3MoeForCausalLM,
                               Qwen3MoeForQuestionAnswering, Qwen3MoeForSequenceClassification,
                               Qwen3MoeForTokenClassification, Qwen3MoeModel)
from .models.bloom import (BloomBackbone, BloomConfig, BloomForCausalLM, BloomForQuestionAnswering,
                           BloomForSequenceClassification, BloomForTokenClassification, BloomModel)
from .models.gemma3 import Gemma3Backbone, Gemma3ForCausalLM, Gemma3TextConfig, Gemma3TextModel
from .models.phi3 import (Phi3Backbone, Phi3Config, Phi3ForCausalLM, Phi3ForSequenceClassification,
                          Phi3ForTokenClassification, Phi3Model)
from .ops import get_backend, set_backend, use_backend
from .cache import SlidingWindowCache


def generate(prompt=None, **options):
    """Continue a prompt with a language model (default: the shipped Gemma 3 270M); see `minilm.api.generate`."""
    from .api import generate as _generate

    return _generate(prompt, **options)

__version__ = "0.1.0"

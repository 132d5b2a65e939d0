"""minilm: readable NumPy implementations of modern LLM architectures, checked against Hugging Face
transformers, with Numba and CuPy kernels behind one seam (`minilm.ops`).

    import minilm
    model = minilm.from_pretrained("path/to/checkpoint")        # HF folder or .gguf
    minilm.generate("The capital of France is")                # the shipped Gemma 3 270M

Where things are: the math a student reads is at the top level (nn, rope, ops, cache, modeling,
heads, generation) and in `models/` (one file per family); file formats in `io/`; the
keras-hub-style API in `keras/`; text in / text out in `api.py` and `cli.py`.
"""

from . import course, ops
from .activations import capture, capture_names, intervene
from .api import generate
from .cache import KVCache, SlidingWindowCache
from .conversation import Conversation
from .errors import (
    ActivationNameError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    InputError,
    MinilmError,
    NumericalError,
    UnknownArchitectureError,
)
from .grad import value_and_grad
from .io import default_model
from .io.load import from_pretrained
from .keras.backbone import Backbone
from .keras.bloom import BloomBackbone
from .keras.gemma3 import Gemma3Backbone
from .keras.gemma3_vision import Gemma3VisionEncoder
from .keras.phi3 import Phi3Backbone
from .keras.qwen3_moe import Qwen3MoeBackbone
from .lora import LoraWeight
from .modeling import ModelOutput
from .models.bloom import (
    BloomConfig,
    BloomForCausalLM,
    BloomForQuestionAnswering,
    BloomForSequenceClassification,
    BloomForTokenClassification,
    BloomModel,
)
from .models.gemma3 import Gemma3ForCausalLM, Gemma3TextConfig, Gemma3TextModel
from .models.gemma3_multimodal import Gemma3ForConditionalGeneration, Gemma3Model
from .models.gemma3_vision import Gemma3Config, SiglipVisionConfig
from .models.phi3 import (
    Phi3Config,
    Phi3ForCausalLM,
    Phi3ForSequenceClassification,
    Phi3ForTokenClassification,
    Phi3Model,
)
from .models.qwen3_moe import (
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3MoeForQuestionAnswering,
    Qwen3MoeForSequenceClassification,
    Qwen3MoeForTokenClassification,
    Qwen3MoeModel,
)
from .ops import get_backend, set_backend, use_backend
from .peft import LoraConfig
from .train import AdamW, Trainer, TrainResult, train

__all__ = [
    "ActivationNameError",
    "AdamW",
    "Backbone",
    "BloomBackbone",
    "BloomConfig",
    "BloomForCausalLM",
    "BloomForQuestionAnswering",
    "BloomForSequenceClassification",
    "BloomForTokenClassification",
    "BloomModel",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "Conversation",
    "Gemma3Backbone",
    "Gemma3Config",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Gemma3Model",
    "Gemma3TextConfig",
    "Gemma3TextModel",
    "Gemma3VisionEncoder",
    "InputError",
    "KVCache",
    "LoraConfig",
    "LoraWeight",
    "MinilmError",
    "NumericalError",
    "ModelOutput",
    "Phi3Backbone",
    "Phi3Config",
    "Phi3ForCausalLM",
    "Phi3ForSequenceClassification",
    "Phi3ForTokenClassification",
    "Phi3Model",
    "Qwen3MoeBackbone",
    "Qwen3MoeConfig",
    "Qwen3MoeForCausalLM",
    "Qwen3MoeForQuestionAnswering",
    "Qwen3MoeForSequenceClassification",
    "Qwen3MoeForTokenClassification",
    "Qwen3MoeModel",
    "SiglipVisionConfig",
    "SlidingWindowCache",
    "TrainResult",
    "Trainer",
    "UnknownArchitectureError",
    "capture",
    "capture_names",
    "course",
    "default_model",
    "from_pretrained",
    "generate",
    "get_backend",
    "intervene",
    "ops",
    "set_backend",
    "train",
    "use_backend",
    "value_and_grad",
]

__version__ = "0.1.0"

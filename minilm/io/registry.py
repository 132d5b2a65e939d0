"""The one table of what minilm implements: for each family, the names a checkpoint uses and the
classes they stand for. Data only (module paths and class names as strings): nothing here imports
a model, so every module may read it and no import circle can pass through it.

    config.json  "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]
    GGUF         general.architecture = "gemma3"
    keras-hub    preset config.json "class_name": "Qwen3MoeBackbone"
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str  # config.json `model_type`
    module: str  # the family file: math, config and checkpoint layout
    config_class: str
    default_architecture: str  # the class a config.json without `architectures` loads as
    architectures: tuple[str, ...]  # every Hugging Face-style class of the family
    backbone_class: str  # the keras-hub-style class
    keras_module: str  # where that class lives
    gguf_architectures: tuple[str, ...] = ()  # GGUF `general.architecture` values minilm reads as this family


FAMILIES = {
    family.model_type: family
    for family in (
        Family(
            model_type="qwen3_moe",
            module="minilm.models.qwen3_moe",
            config_class="Qwen3MoeConfig",
            default_architecture="Qwen3MoeForCausalLM",
            architectures=(
                "Qwen3MoeModel",
                "Qwen3MoeForCausalLM",
                "Qwen3MoeForSequenceClassification",
                "Qwen3MoeForTokenClassification",
                "Qwen3MoeForQuestionAnswering",
            ),
            backbone_class="Qwen3MoeBackbone",
            keras_module="minilm.keras.qwen3_moe",
        ),
        Family(
            model_type="bloom",
            module="minilm.models.bloom",
            config_class="BloomConfig",
            default_architecture="BloomForCausalLM",
            architectures=(
                "BloomModel",
                "BloomForCausalLM",
                "BloomForSequenceClassification",
                "BloomForTokenClassification",
                "BloomForQuestionAnswering",
            ),
            backbone_class="BloomBackbone",
            keras_module="minilm.keras.bloom",
        ),
        Family(
            model_type="phi3",
            module="minilm.models.phi3",
            config_class="Phi3Config",
            default_architecture="Phi3ForCausalLM",
            architectures=(
                "Phi3Model",
                "Phi3ForCausalLM",
                "Phi3ForSequenceClassification",
                "Phi3ForTokenClassification",
            ),
            backbone_class="Phi3Backbone",
            keras_module="minilm.keras.phi3",
        ),
        Family(
            model_type="gemma3_text",
            module="minilm.models.gemma3",
            config_class="Gemma3TextConfig",
            default_architecture="Gemma3ForCausalLM",
            architectures=("Gemma3TextModel", "Gemma3ForCausalLM"),
            backbone_class="Gemma3Backbone",
            keras_module="minilm.keras.gemma3",
            gguf_architectures=("gemma3",),
        ),
        Family(
            model_type="gemma3",  # Gemma 3 with images (4B and up): SigLIP vision tower + the text decoder
            module="minilm.models.gemma3_multimodal",
            config_class="Gemma3Config",
            default_architecture="Gemma3ForConditionalGeneration",
            architectures=("Gemma3Model", "Gemma3ForConditionalGeneration"),
            backbone_class="Gemma3Backbone",
            keras_module="minilm.keras.gemma3",
        ),
    )
}

# GGUF architectures whose vocabulary is Gemma's SentencePiece BPE with byte fallback: the tokenizer
# reads these even when the weights are of a family minilm does not implement (Gemma, Gemma 2).
GEMMA_TOKENIZER_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def family_of_architecture(name):
    """The Family whose Hugging Face-style classes include `name`, or None."""
    return next((f for f in FAMILIES.values() if name in f.architectures), None)


def family_of_gguf(architecture):
    """The Family that reads GGUF files of `general.architecture` = `architecture`, or None."""
    return next((f for f in FAMILIES.values() if architecture in f.gguf_architectures), None)


def family_of_backbone(class_name):
    """The Family whose keras-hub-style class is `class_name`, or None."""
    return next((f for f in FAMILIES.values() if f.backbone_class == class_name), None)

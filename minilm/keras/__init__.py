"""The keras-hub-style API: `Qwen3MoeBackbone(vocabulary_size=..., ...)` and friends.

Each backbone maps keras-hub's constructor arguments onto the family's Hugging Face config in one
place and runs the very same model functions on the same weights (`minilm/models/`):

    backbone.py   Backbone (the call convention, presets, token_embedding), shared by all
    qwen3_moe.py  Qwen3MoeBackbone      bloom.py  BloomBackbone
    phi3.py       Phi3Backbone          gemma3.py Gemma3Backbone
    gemma3_vision.py  Gemma3VisionEncoder (images -> soft tokens) and the soft tokens' place in the text
"""

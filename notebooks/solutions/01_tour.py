"""Solutions to the exercises of notebooks/01_tour (for teachers)."""

import math

import minilm
from minilm.io import gguf

path = minilm.default_model.default_model_path()
model, _ = minilm.api.load(backend="numpy")  # loaded once per process
gguf_file = gguf.read_gguf(path)
infos = [gguf_file.tensor_info(name) for name in gguf_file.tensor_names]
parameters = sum(math.prod(info.shape) for info in infos)

ANSWERS = {
    "tour.1": (2, 7, model.config.vocab_size),
    "tour.2": parameters / 1e6,
    "tour.3": sum(info.n_bytes for info in infos) * 8 / parameters,
}

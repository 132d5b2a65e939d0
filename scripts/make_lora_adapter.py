"""Write tests/fixtures/lora/minilm_adapter/: a PEFT adapter saved by minilm (`save_adapter`), which the
oracle script (`python -m scripts.fixtures --only lora`) then loads into transformers + peft.

    python scripts/make_lora_adapter.py        (minilm's venv; deterministic: same bytes on a re-run)

The adapter sits on the tiny Gemma 3 fixture (tests/fixtures/gemma3_causal_lm), rank 4, lora_alpha 16,
on every linear layer of the decoder, with A and B drawn from a seeded generator (B away from zero,
so that the adapter changes the logits).
"""

from pathlib import Path

import numpy as np

import minilm

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "tests" / "fixtures" / "gemma3_causal_lm"
OUT = ROOT / "tests" / "fixtures" / "lora" / "minilm_adapter"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    model = minilm.from_pretrained(BASE)
    model.enable_lora(4, target_modules=TARGETS, lora_alpha=16, seed=11)
    rng = np.random.default_rng(12)
    for name, array in sorted(model.trainable_parameters().items()):
        scale = 0.2 if name.endswith("lora_B") else 0.05
        array += rng.normal(0.0, scale, array.shape).astype(np.float32)  # in place: the model's own arrays
    model.save_adapter(OUT)
    print(f"wrote {OUT.relative_to(ROOT)}: {model.num_parameters(only_trainable=True)} trainable parameters")


if __name__ == "__main__":
    main()

"""GPU proof: run the real Gemma 3 270M end to end on the CuPy backend (weights resident on the
GPU) and check its greedy ids against transformers' recorded ones; time prefill and decode.

    python benchmarks/gpu_proof.py path/to/gemma-3-270m-q4_k_m.gguf [--out results.json]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

import minilm
from minilm import ops
from minilm.generation import generate_tokens

REFERENCE = Path(__file__).parent.parent / "tests" / "fixtures" / "gemma3_270m_reference.json"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("--backend", default="cupy")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    minilm.set_backend(a.backend)
    t0 = time.perf_counter()
    model = minilm.from_pretrained(a.gguf)
    load_s = time.perf_counter() - t0
    weight = model.params.model.embed_tokens.weight
    result = {"backend": a.backend, "weights_on": type(weight).__module__, "load_s": load_s, "cases": {}}
    ref = json.loads(REFERENCE.read_text())
    for case in ref["generation"]["cases"]:
        prompt = np.array([case["input_ids"]])
        t0 = time.perf_counter()
        ids = model.generate(prompt, max_new_tokens=case["max_new_tokens"])
        new = ids[0, prompt.shape[1] :].tolist()
        result["cases"][case["name"]] = {
            "prompt_tokens": prompt.shape[1],
            "equal_to_transformers": new == case["new_ids"],
            "text": model.tokenizer.decode(new),
            "seconds": time.perf_counter() - t0,
        }
    # speed: prefill 512 tokens, then decode 64 tokens greedily
    long_ids = np.array([model.tokenizer.encode("The history of the printing press " * 200)[:512]])
    model(long_ids[:, :8], logits_to_keep=1)  # warm-up
    t0 = time.perf_counter()
    ops.to_host(model(long_ids, logits_to_keep=1).logits)
    result["prefill_512_tokens_per_s"] = 512 / (time.perf_counter() - t0)
    steps = generate_tokens(
        model, np.array([model.tokenizer.encode("The capital of France is")]), max_new_tokens=65, eos_token_id=[]
    )
    next(steps)
    t0 = time.perf_counter()
    n = sum(1 for _ in steps)
    result["decode_tokens_per_s"] = n / (time.perf_counter() - t0)
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Generation speed of the shipped Gemma 3 270M: minilm side by side with what users would pick
instead, in one run, reported as ratios.

    python benchmarks/bench_generate.py [--torch-python PY] [--llama-python PY] [--backends numpy,numba]

Each engine runs in its own process (so load time and peak memory are its own) on the same GGUF
file with 2 threads, greedy decoding:
  - minilm (NumPy reference path, and the Numba kernels)
  - transformers on torch CPU, float32 (and bfloat16), loading the same GGUF (`--torch-python`: a
    Python with torch + transformers + gguf; the `fixtures` extra)
  - llama.cpp built from source (`--llama-python`: a Python with llama-cpp-python compiled from its
    sdist, which builds llama.cpp with cmake)
Measured: load time, prefill tokens/s for a 512-token prompt, decode tokens/s over --new-tokens,
peak RSS. OPENBLAS_CORETYPE is left as the machine sets it unless --unset-openblas-coretype.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden press adapted from wine making. ")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Workers: each prints one JSON line
# ---------------------------------------------------------------------------------------------


def worker_minilm(path, backend, prefill, new_tokens):
    import numpy as np

    import minilm
    from minilm.generation import generate_tokens

    minilm.set_backend(backend)
    t0 = time.perf_counter()
    model = minilm.from_pretrained(path)
    load_s = time.perf_counter() - t0
    ids = np.array([model.tokenizer.encode(PROMPT * 40)[:prefill]])
    for _ in generate_tokens(model, ids[:, :8], max_new_tokens=2):  # warm up (Numba compiles here)
        pass
    t0 = time.perf_counter()
    model(ids, logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    short = np.array([model.tokenizer.encode("The capital of France is")])
    steps = generate_tokens(model, short, max_new_tokens=new_tokens + 1, eos_token_id=[])
    next(steps)  # the prompt step
    t0 = time.perf_counter()
    n = sum(1 for _ in steps)
    decode_s = time.perf_counter() - t0
    return dict(load_s=load_s, prefill_tps=prefill / prefill_s, decode_tps=n / decode_s, peak_mb=peak_rss_mb())


def worker_transformers(path, dtype, prefill, new_tokens):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    folder, name = os.path.split(path)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    model.eval()
    load_s = time.perf_counter() - t0
    ids = tok(PROMPT * 40, return_tensors="pt").input_ids[:, :prefill]
    with torch.no_grad():
        model(ids[:, :8])
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        short = tok("The capital of France is", return_tensors="pt").input_ids
        out = model(short, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
    return dict(load_s=load_s, prefill_tps=prefill / prefill_s, decode_tps=new_tokens / decode_s, peak_mb=peak_rss_mb())


def worker_llama_cpp(path, prefill, new_tokens):
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=2048, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    ids = llm.tokenize((PROMPT * 40).encode())[:prefill]
    llm.eval(ids[:8])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t0
    llm.reset()
    llm.eval(llm.tokenize(b"The capital of France is"))
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        token = llm.sample(top_k=1, temp=0.0)
        llm.eval([token])
    decode_s = time.perf_counter() - t0
    return dict(load_s=load_s, prefill_tps=prefill / prefill_s, decode_tps=new_tokens / decode_s, peak_mb=peak_rss_mb())


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def run_worker(python, args, env):
    cmd = [python, os.path.abspath(__file__), "--worker", json.dumps(args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF path (default: the shipped Gemma 3 270M)")
    p.add_argument("--backends", default="numpy,numba")
    p.add_argument("--torch-python", default=None)
    p.add_argument("--llama-python", default=None)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--unset-openblas-coretype", action="store_true",
                   help="unset OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE for this run (faster sgemm on new CPUs)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        w = json.loads(a.worker)
        fn = {"minilm": worker_minilm, "transformers": worker_transformers, "llama.cpp": worker_llama_cpp}[w.pop("engine")]
        print(json.dumps(fn(**w)))
        return
    from minilm.default_model import default_model_path

    path = str(a.model or default_model_path())
    env = dict(os.environ, OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2", NUMBA_NUM_THREADS="2", MKL_NUM_THREADS="2")
    if a.unset_openblas_coretype:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    print(f"model {os.path.basename(path)}, 2 threads, prefill {a.prefill} tokens, decode {a.new_tokens} tokens, "
          f"OPENBLAS_CORETYPE {'unset' if a.unset_openblas_coretype else os.environ.get('OPENBLAS_CORETYPE', 'not set')}",
          flush=True)
    runs = []
    if a.torch_python:
        for dtype in ("float32", "bfloat16"):
            runs.append((f"transformers {dtype}", a.torch_python,
                         dict(engine="transformers", path=path, dtype=dtype, prefill=a.prefill, new_tokens=a.new_tokens)))
    if a.llama_python:
        runs.append(("llama.cpp", a.llama_python, dict(engine="llama.cpp", path=path, prefill=a.prefill, new_tokens=a.new_tokens)))
    for backend in a.backends.split(","):
        runs.append((f"minilm {backend}", sys.executable,
                     dict(engine="minilm", path=path, backend=backend, prefill=a.prefill, new_tokens=a.new_tokens)))
    results = {}
    for name, python, args in runs:
        results[name] = run_worker(python, args, env)
        print(f"  {name}: {results[name]}", flush=True)
    base = results.get("transformers float32", {})
    print("\n| engine | load s | prefill tok/s | decode tok/s | peak MB | decode vs transformers fp32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | |")
            continue
        ratio = f"{r['decode_tps'] / base['decode_tps']:.2f}x" if "decode_tps" in base else "n/a"
        print(f"| {name} | {r['load_s']:.2f} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {r['peak_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()

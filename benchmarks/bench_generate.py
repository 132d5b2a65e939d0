"""Generation speed of the shipped Gemma 3 270M: minilm side by side with what users would pick
instead, in one run, reported as ratios.

    python benchmarks/bench_generate.py [--torch-python PY] [--llama-python PY] [--backends numpy,numba]
    bash benchmarks/run_all.sh     # the same, after building llama.cpp and a torch env (one command)

Each engine runs in its own process (so load time and peak memory are its own) on the same GGUF
file with 2 threads, greedy decoding:
  - minilm (NumPy reference path, and the Numba kernels)
  - transformers on torch CPU, float32 (and bfloat16), loading the same GGUF (`--torch-python`: a
    Python with torch + transformers + gguf; the `fixtures` extra)
  - llama.cpp built from source (`--llama-python`: a Python with llama-cpp-python compiled from its
    sdist, which builds llama.cpp with cmake). On a CPU with AMX it loads without weight repacking
    (`use_extra_bufts=False`, llama.cpp's --no-repack): the AMX matmul of llama.cpp builds of 2026
    segfaults (ggml-org/llama.cpp#20824); the table says "no AMX repack" when that applies.
Measured: load time (the engine's load call), first token (in the fresh worker process: importing
the engine, loading, and the first greedy token of a short prompt, compilation included; the
interpreter's own start is not counted), prefill tokens/s for 128- and 512-token prompts (one forward pass each), decode
tokens/s over --new-tokens (128) greedy steps after a short prompt, peak RSS. The table gives
minilm's ratios to llama.cpp and to transformers float32; OUT.json / OUT.md / OUT.png keep the run.
Prefill and decode are timed --repeats times in the same process; the table shows the medians
(the machine may be shared).
OPENBLAS_CORETYPE is left as the machine sets it unless --unset-openblas-coretype.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def timed_decode(steps, new_tokens):
    """Seconds for `new_tokens` items of the iterator `steps` after its first one (the prompt step)."""
    next(steps)  # the prompt step
    t0 = time.perf_counter()
    n = sum(1 for _ in zip(range(new_tokens), steps, strict=False))  # stops after new_tokens
    assert n == new_tokens, f"the engine stopped after {n} of {new_tokens} tokens"
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Workers: each prints one JSON line. Prefill and decode are timed `repeats` times; the medians count.
# ---------------------------------------------------------------------------------------------


def worker_minilm(path, backend, prefill, new_tokens, repeats):
    start = time.perf_counter()
    import numpy as np

    import minilm
    from minilm.generation import generate_tokens

    minilm.set_backend(backend)
    t0 = time.perf_counter()
    model = minilm.from_pretrained(path)
    load_s = time.perf_counter() - t0
    short = np.array([model.tokenizer.encode("The capital of France is")])
    next(generate_tokens(model, short, max_new_tokens=1))
    first_token_s = time.perf_counter() - start  # imports, load, compiled kernels from Numba's cache, the prompt
    tokens = model.tokenizer.encode(PROMPT * 40)
    for _ in generate_tokens(model, np.array([tokens[:8]]), max_new_tokens=2):  # warm up (Numba compiles here)
        pass
    prefill_s, decode_s = {n: [] for n in prefill}, []
    for _ in range(repeats):
        for n in prefill:
            t0 = time.perf_counter()
            model(np.array([tokens[:n]]), logits_to_keep=1)
            prefill_s[n].append(time.perf_counter() - t0)
        steps = generate_tokens(model, short, max_new_tokens=new_tokens + 1, eos_token_id=[])
        decode_s.append(timed_decode(steps, new_tokens))
    return dict(
        load_s=load_s,
        first_token_s=first_token_s,
        prefill_tps={n: n / median(t) for n, t in prefill_s.items()},
        decode_tps=new_tokens / median(decode_s),
        peak_mb=peak_rss_mb(),
        version=f"minilm {minilm.__version__}, numpy {np.__version__}",
    )


def worker_transformers(path, dtype, prefill, new_tokens, repeats):
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    folder, name = os.path.split(path)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    model.eval()
    load_s = time.perf_counter() - t0
    ids = tok(PROMPT * 40, return_tensors="pt").input_ids
    short = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        model(short).logits[:, -1].argmax(-1)
    first_token_s = time.perf_counter() - start

    def steps():  # greedy decoding with the KV cache, one token per step, as minilm's loop
        out = model(short, use_cache=True)
        while True:
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            yield token
            out = model(token, past_key_values=cache, use_cache=True)

    prefill_s, decode_s = {n: [] for n in prefill}, []
    with torch.no_grad():
        model(ids[:, :8])  # warm up
        for _ in range(repeats):
            for n in prefill:
                t0 = time.perf_counter()
                model(ids[:, :n], logits_to_keep=1)
                prefill_s[n].append(time.perf_counter() - t0)
            decode_s.append(timed_decode(steps(), new_tokens))
    import transformers

    return dict(
        load_s=load_s,
        first_token_s=first_token_s,
        prefill_tps={n: n / median(t) for n, t in prefill_s.items()},
        decode_tps=new_tokens / median(decode_s),
        peak_mb=peak_rss_mb(),
        version=f"transformers {transformers.__version__}, torch {torch.__version__}",
    )


def cpu_has_amx():
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_int8" in f.read()
    except OSError:
        return False


def worker_llama_cpp(path, prefill, new_tokens, repeats):
    start = time.perf_counter()
    import llama_cpp.llama_cpp as llama_capi
    from llama_cpp import Llama

    # On CPUs with AMX, llama.cpp repacks the weights for its AMX matmul, which segfaults in
    # ggml_backend_amx_mul_mat on this machine (ggml-org/llama.cpp#20824; the AMX tile config is
    # invalid). Loading without the "extra" buffer types (llama.cpp's --no-repack) runs the plain
    # CPU kernels on the weights as stored in the file.
    no_repack = cpu_has_amx()
    if no_repack:
        default_params = llama_capi.llama_model_default_params

        def model_params_without_repack():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_capi.llama_model_default_params = model_params_without_repack  # read by Llama.__init__
    t0 = time.perf_counter()
    batch = max(prefill)
    llm = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_ctx=2048, n_batch=batch, verbose=False)
    load_s = time.perf_counter() - t0
    tokens = llm.tokenize((PROMPT * 40).encode())
    short = llm.tokenize(b"The capital of France is")
    next(llm.generate(short, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0))
    first_token_s = time.perf_counter() - start
    llm.reset()
    llm.eval(tokens[:8])  # warm up
    prefill_s, decode_s = {n: [] for n in prefill}, []
    for _ in range(repeats):
        for n in prefill:
            llm.reset()  # forget the KV cache: eval() then starts at position 0
            t0 = time.perf_counter()
            llm.eval(tokens[:n])  # one llama_decode of n tokens (n <= n_batch)
            prefill_s[n].append(time.perf_counter() - t0)
        llm.reset()  # so generate() re-evaluates the prompt rather than reusing a cached prefix
        steps = llm.generate(short, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)  # greedy
        decode_s.append(timed_decode(steps, new_tokens))
    import llama_cpp

    return dict(
        load_s=load_s,
        first_token_s=first_token_s,
        prefill_tps={n: n / median(t) for n, t in prefill_s.items()},
        decode_tps=new_tokens / median(decode_s),
        peak_mb=peak_rss_mb(),
        note="no AMX repack" if no_repack else "",
        version=f"llama-cpp-python {llama_cpp.__version__} (llama.cpp built from its sdist)",
    )


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def run_worker(python, args, env):
    cmd = [python, os.path.abspath(__file__), "--worker", json.dumps(args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"error": f"exit status {done.returncode}" + (f": {last[0]}" if last else "")}
    return json.loads(lines[-1])


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]}, {os.cpu_count()} logical CPUs" if names else "unknown CPU"
    except OSError:
        return "unknown CPU"


def ratio(value, base):
    return f"{value / base:.2f}x" if value and base else "n/a"


def table(results, prefill):
    """The Markdown table: every engine's numbers, and minilm's ratios to llama.cpp and transformers."""
    llama, torch32 = results.get("llama.cpp", {}), results.get("transformers float32", {})
    head = " | ".join(f"prefill {n} tok/s" for n in prefill)
    lines = [
        f"| engine | load s | first token s | {head} | decode tok/s | peak MB | decode vs llama.cpp | "
        f"prefill {max(prefill)} vs llama.cpp | decode vs transformers fp32 |",
        "| --- | ---: | ---: | " + "---: | " * len(prefill) + "---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * (len(prefill) + 6))
            continue
        label = f"{name} ({r['note']})" if r.get("note") else name
        pre = " | ".join(f"{r['prefill_tps'][str(n)]:.0f}" for n in prefill)
        top, first = str(max(prefill)), r.get("first_token_s", float("nan"))
        lines.append(
            f"| {label} | {r['load_s']:.2f} | {first:.2f} | {pre} | {r['decode_tps']:.1f} | {r['peak_mb']:.0f} | "
            f"{ratio(r['decode_tps'], llama.get('decode_tps'))} | "
            f"{ratio(r['prefill_tps'][top], llama.get('prefill_tps', {}).get(top))} | "
            f"{ratio(r['decode_tps'], torch32.get('decode_tps'))} |"
        )
    return "\n".join(lines)


def plot(results, prefill, path, title):
    """Bars: decode and prefill tokens/s of each engine, relative to llama.cpp (or the first engine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {name: r for name, r in results.items() if "error" not in r}
    base_name = "llama.cpp" if "llama.cpp" in ok else next(iter(ok))
    base = ok[base_name]
    metrics = [("decode", lambda r: r["decode_tps"])] + [
        (f"prefill {n}", lambda r, n=str(n): r["prefill_tps"][n]) for n in prefill
    ]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(ok)
    for k, (name, r) in enumerate(ok.items()):
        values = [get(r) / get(base) for _, get in metrics]
        ax.bar([m + k * width for m in range(len(metrics))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([m + width * (len(ok) - 1) / 2 for m in range(len(metrics))], [m for m, _ in metrics])
    ax.set_ylabel(f"tokens/s relative to {base_name}")
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF path (default: the shipped Gemma 3 270M)")
    p.add_argument("--backends", default="numpy,numba")
    p.add_argument("--torch-python", default=None)
    p.add_argument("--llama-python", default=None)
    p.add_argument("--prefill", default="128,512", help="prompt lengths for the prefill timings, comma-separated")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="time prefill and decode this many times; report medians")
    p.add_argument("--out", default=os.path.join(HERE, "results", "bench_generate"), help="writes OUT.json, OUT.png")
    p.add_argument(
        "--unset-openblas-coretype",
        action="store_true",
        help="unset OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE for this run (faster sgemm on new CPUs)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        w = json.loads(a.worker)
        workers = {"minilm": worker_minilm, "transformers": worker_transformers, "llama.cpp": worker_llama_cpp}
        fn = workers[w.pop("engine")]
        print(json.dumps(fn(**w)))
        return
    from minilm.io.default_model import default_model_path

    path = str(a.model or default_model_path())
    prefill = sorted(int(n) for n in a.prefill.split(","))
    env = dict(os.environ, OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2", NUMBA_NUM_THREADS="2", MKL_NUM_THREADS="2")
    if a.unset_openblas_coretype:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    coretype = "unset" if a.unset_openblas_coretype else os.environ.get("OPENBLAS_CORETYPE", "not set")
    machine = cpu_model()
    setup = (
        f"model {os.path.basename(path)}, 2 threads, prefill {prefill} tokens, decode {a.new_tokens} tokens, "
        f"OPENBLAS_CORETYPE {coretype}, median of {a.repeats}"
    )
    print(f"{machine}\n{setup}, load average {os.getloadavg()[0]:.2f}", flush=True)
    common = dict(path=path, prefill=prefill, new_tokens=a.new_tokens, repeats=a.repeats)
    runs = []
    if a.llama_python:
        runs.append(("llama.cpp", a.llama_python, dict(engine="llama.cpp", **common)))
    if a.torch_python:
        for dtype in ("float32", "bfloat16"):
            runs.append((f"transformers {dtype}", a.torch_python, dict(engine="transformers", dtype=dtype, **common)))
    for backend in a.backends.split(","):
        runs.append((f"minilm {backend}", sys.executable, dict(engine="minilm", backend=backend, **common)))
    results = {}
    for name, python, args in runs:
        results[name] = run_worker(python, args, env)
        print(f"  {name}: {results[name]}", flush=True)
    load_end = os.getloadavg()[0]
    print(f"load average at the end {load_end:.2f}")
    markdown = table(results, prefill)
    print("\n" + markdown)
    if a.out:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        record = {"machine": machine, "setup": setup, "load_average_end": load_end, "results": results}
        with open(a.out + ".json", "w") as f:
            json.dump(record, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(f"{machine}; {setup}\n\n{markdown}\n")
        if any("error" not in r for r in results.values()):
            plot(results, prefill, a.out + ".png", f"{machine}\n{setup}")
        print(f"wrote {a.out}.json, .md and .png")


if __name__ == "__main__":
    main()

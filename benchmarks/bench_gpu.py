"""GPU speed of Gemma 3 270M: minilm's CuPy backend side by side with transformers eager (fp32, the
same GPU, the same run), reported as ratios.

    python benchmarks/bench_gpu.py [--gguf PATH] [--new-tokens 128] [--prefill 2048] [--profile]

With --gguf the real weights are used (and minilm's greedy ids are checked against the recorded
transformers reference); without it both engines get random weights of the 270M's shapes (speed
does not depend on the values). transformers runs eager attention in float32 (TF32 off, as CuPy).
Decode: --new-tokens greedy steps after a 6-token prompt, timed after the prompt step; prefill:
one forward of --prefill tokens (logits of the last position only). Medians of --repeats.
--engines minilm,minilm-ops,transformers adds minilm without its compiled decode step (the
readable forward, op by op: MINILM_COMPILED_DECODE=0). --profile prints the Python functions a
minilm decode step calls most (cProfile), which is where kernel launches come from.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

import numpy as np

# The 270M's text config, as its GGUF metadata gives it (shared/README.md)
GEMMA3_270M = dict(
    vocab_size=262_144,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=512,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    max_position_embeddings=32_768,
    rms_norm_eps=1e-6,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
)


def median(values):
    return sorted(values)[len(values) // 2]


def bench_minilm(args):
    import cupy as cp

    import minilm
    from minilm import ops
    from minilm.generation import generate_tokens

    minilm.set_backend("cupy")
    t0 = time.perf_counter()
    if args.gguf:
        model = minilm.from_pretrained(args.gguf)
    else:
        model = minilm.Gemma3ForCausalLM(minilm.Gemma3TextConfig(**GEMMA3_270M))
        model.to_device()
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 1000, size=(1, 6))
    long_ids = rng.integers(3, 1000, size=(1, args.prefill))
    model(long_ids[:, :16], logits_to_keep=1)  # warm-up: compiles the RawKernels
    for _ in generate_tokens(model, prompt, max_new_tokens=4, eos_token_id=[]):
        pass
    prefill, decode = [], []
    for _ in range(args.repeats):
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        ops.to_host(model(long_ids, logits_to_keep=1).logits)
        prefill.append(args.prefill / (time.perf_counter() - t0))
        steps = generate_tokens(model, prompt, max_new_tokens=args.new_tokens + 1, eos_token_id=[])
        next(steps)
        t0 = time.perf_counter()
        n = sum(1 for _ in steps)
        decode.append(n / (time.perf_counter() - t0))
    result = {"load_s": load_s, "prefill_tok_s": median(prefill), "decode_tok_s": median(decode)}
    if args.profile:
        steps = generate_tokens(model, prompt, max_new_tokens=33, eos_token_id=[])
        next(steps)
        profile = cProfile.Profile()
        profile.enable()
        for _ in steps:
            pass
        profile.disable()
        stats = pstats.Stats(profile, stream=sys.stderr)
        print("--- minilm cupy decode, 32 steps, by number of calls ---", file=sys.stderr)
        stats.sort_stats("ncalls").print_stats(25)
        stats.sort_stats("tottime").print_stats(15)
    if args.gguf:
        from pathlib import Path

        ref = json.loads((Path(__file__).parent.parent / "tests/fixtures/gemma3_270m_reference.json").read_text())
        same = []
        for case in ref["generation"]["cases"]:
            ids = model.generate(np.array([case["input_ids"]]), max_new_tokens=case["max_new_tokens"])
            same.append(ids[0, len(case["input_ids"]) :].tolist() == case["new_ids"])
        result["greedy_equal_to_transformers"] = f"{sum(same)}/{len(same)}"
    return result


def bench_transformers(args):
    import torch
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = transformers.Gemma3TextConfig(**GEMMA3_270M, attn_implementation="eager")
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = transformers.Gemma3ForCausalLM(config).eval()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = torch.tensor(rng.integers(3, 1000, size=(1, 6)), device="cuda")
    long_ids = torch.tensor(rng.integers(3, 1000, size=(1, args.prefill)), device="cuda")
    prefill, decode = [], []
    with torch.no_grad():
        model(long_ids[:, :16], logits_to_keep=1)
        model.generate(prompt, max_new_tokens=4, do_sample=False)
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(long_ids, logits_to_keep=1).logits.cpu()
            prefill.append(args.prefill / (time.perf_counter() - t0))
            # decode: time a 1-token generate and an (n+1)-token one; the difference is n steps
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            n = args.new_tokens + 1
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            t2 = time.perf_counter()
            decode.append(args.new_tokens / ((t2 - t1) - (t1 - t0)))
    return {
        "load_s": load_s,
        "prefill_tok_s": median(prefill),
        "decode_tok_s": median(decode),
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--engines", default="minilm,transformers")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    results = {}
    engines = args.engines.split(",")
    if "minilm" in engines:
        results["minilm cupy"] = bench_minilm(args)
    if "minilm-ops" in engines:  # the readable forward op by op, without the compiled decode step
        os.environ["MINILM_COMPILED_DECODE"] = "0"
        results["minilm cupy, op by op"] = bench_minilm(args)
        del os.environ["MINILM_COMPILED_DECODE"]
    if "transformers" in engines:
        results["transformers eager fp32"] = bench_transformers(args)
    if "minilm cupy" in results and "transformers eager fp32" in results:
        ours, theirs = results["minilm cupy"], results["transformers eager fp32"]
        results["ratios"] = {
            "decode": ours["decode_tok_s"] / theirs["decode_tok_s"],
            "prefill": ours["prefill_tok_s"] / theirs["prefill_tok_s"],
        }
    try:
        import cupy as cp

        results["device"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # noqa: BLE001 - the table says "unknown" rather than fail after the runs
        results["device"] = "unknown"
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

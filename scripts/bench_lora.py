"""One LoRA training step of Gemma 3 270M's shapes: minilm (NumPy backward) against transformers + peft (torch CPU).

    python scripts/bench_lora.py --impl minilm --threads 2 --batch 4 --seq 256
    python scripts/bench_lora.py --impl torch  --threads 2 --batch 4 --seq 256   (needs torch, transformers, peft)

Both build Gemma 3 270M's architecture (the shipped model's config: 18 layers, hidden 640, vocabulary
262 144) with random weights (the time and memory of a step do not depend on the values), put LoRA
rank 8 (alpha 16) on q_proj and v_proj, and time loss + gradients of the LoRA weights (minilm:
`minilm.grad.value_and_grad`; torch: forward, `loss.backward()`) plus one AdamW update, on random ids
of shape (batch, seq). Prints one JSON line: seconds per step (the median of --steps after one warm-up
step), tokens per second, the peak resident memory of the process (ru_maxrss) and the peak from the
first training step on (VmHWM after a reset; the weights included, the building of the model not).
"""

import argparse
import json
import os
import resource
import sys
import time

GEMMA3_270M = dict(  # the shipped model's config.json (minilm.default_model), text part
    vocab_size=262_144,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=512,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    max_position_embeddings=32_768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def reset_peak():
    """Start the peak-memory count afresh (Linux: VmHWM := VmRSS), so that building the random model
    (which briefly holds a second float32 copy of the weights) does not count as training memory."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def training_peak_gb():
    """VmHWM: the peak resident memory since `reset_peak` (the weights included), GiB."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20
    except (OSError, StopIteration):
        return float("nan")


def bench_minilm(args):
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import minilm
    from minilm.grad import value_and_grad

    minilm.set_backend(args.backend)
    model = minilm.Gemma3ForCausalLM(minilm.Gemma3TextConfig(**GEMMA3_270M))
    model.enable_lora(8, target_modules=["q_proj", "v_proj"], lora_alpha=16)
    opt = minilm.AdamW(model.trainable_parameters(), lr=1e-4)
    ids = np.random.default_rng(0).integers(3, 20_000, (args.batch, args.seq))
    reset_peak()
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        loss, grads = value_and_grad(model, ids, ids)
        opt.step(grads)
        times.append(time.perf_counter() - start)
    return times, float(loss)


def bench_torch(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.set_num_threads(args.threads)
    config = Gemma3TextConfig(
        **{k: v for k, v in GEMMA3_270M.items() if k not in ("rope_theta", "rope_local_base_freq")},
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        attn_implementation="eager",
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(Gemma3ForCausalLM(config), lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, 20_000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    reset_peak()
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return times, float(loss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["minilm", "torch"], default="minilm")
    parser.add_argument("--backend", default="numpy", help="minilm's backend (numpy, numba)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    times, loss = (bench_minilm if args.impl == "minilm" else bench_torch)(args)
    timed = times[1:] or times  # --steps 0: the first step only
    step = sorted(timed)[len(timed) // 2]
    result = {
        "impl": args.impl if args.impl == "torch" else f"minilm-{args.backend}",
        "threads": args.threads,
        "batch": args.batch,
        "seq": args.seq,
        "first_step_s": round(times[0], 2),
        "step_s": round(step, 2),
        "tokens_per_s": round(args.batch * args.seq / step, 1),
        "peak_rss_gib": round(peak_gb(), 2),  # the whole process, model building included
        "training_peak_gib": round(training_peak_gb(), 2),  # from the first step on, weights included
        "loss": round(loss, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

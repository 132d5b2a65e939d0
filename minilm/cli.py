"""`python -m minilm "prompt"`: stream a continuation from the shipped Gemma 3 270M (or --model).

Timings (load, prompt tokens, prefill, decode tokens/s) go to stderr so stdout is only the text.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import ops


def parser():
    p = argparse.ArgumentParser(prog="minilm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", help="text to continue (with --chat: the user message)")
    p.add_argument("--model", default=None, help="a .gguf file or a Hugging Face checkpoint folder "
                   "(default: the shipped Gemma 3 270M, Q4_K_M)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="how many tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help="CTRL repetition penalty (> 1 discourages)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--backend", default=None, choices=ops.available_backends(),
                   help="kernels for matmul / attention / experts "
                   f"(default: $MINILM_BACKEND, else {ops.FAST_CPU_BACKEND})")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32, float16 or bfloat16")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    from . import api
    from .errors import MinilmError

    try:
        if args.backend:
            ops.set_backend(args.backend)
        t0 = time.perf_counter()
        api.load(args.model, args.dtype)
        load_s = time.perf_counter() - t0
        stats = {}
        options = dict(model=args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                       repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                       dtype=args.dtype, stats=stats, stream=True)
        if args.chat:
            pieces = api.generate(messages=[{"role": "user", "content": args.prompt}], **options)
        else:
            sys.stdout.write(args.prompt)
            pieces = api.generate(args.prompt, **options)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except MinilmError as e:
        print(f"minilm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    backend = stats.get("backend", ops.get_backend())  # the one generate() ran on
    print(f"[minilm] backend {backend}, load {load_s:.2f} s, prompt {stats.get('prompt_tokens', 0)} tokens, "
          f"prefill {stats.get('prefill_s', 0):.2f} s, {stats.get('new_tokens', 0)} new tokens at "
          f"{stats.get('decode_tokens_per_s', 0):.1f} tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

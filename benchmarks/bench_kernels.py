"""Benchmark the three ops on every available backend at the shapes of two real models.

    python benchmarks/bench_kernels.py            # prints a markdown table, saves results/kernels.png
    python benchmarks/bench_kernels.py --only attention --repeats 50

Shapes: Gemma 3 270M (hidden 640, 4 query heads / 1 kv head, head_dim 256, ffn 2048, vocab 262144:
the LM head is a 262144 x 640 gemv) and Qwen3-MoE at the 30B-A3B layer sizes (hidden 2048, 32 / 4
heads, head_dim 128, 128 experts, top-8, moe_intermediate 768; one layer's experts are 2.4 GB in
float32). Decode is one token against a 512 or 2048 cache, prefill is 512 tokens (128 for the MoE).

Each time is the median of repeated calls after one warm-up call (which also compiles). Ratios are
numpy time / backend time: above 1 is faster than the NumPy reference. The environment is left as
it is (OPENBLAS_CORETYPE and thread counts included); the header prints what was in force. The
machine may be shared: the header prints the load average, and a busy machine gives noisy times.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from minilm import nn, ops
from minilm.errors import ConfigError

BF16 = np.dtype(ml_dtypes.bfloat16)
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# Cases: (group, name, op, make) where make(rng) -> (args, kwargs)
# ---------------------------------------------------------------------------------------------


def _randn(rng, shape, dtype=np.float32, scale=1.0):
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(scale)
    return a.astype(dtype, copy=False)


def linear_case(rows, in_features, out_features, dtype=np.float32):
    def make(rng):
        x = _randn(rng, (rows, in_features))
        weight = _randn(rng, (out_features, in_features), dtype, in_features**-0.5)
        return (x, weight), {}

    return make


def attention_case(batch, num_heads, num_kv_heads, seq, kv_seq, head_dim, window=None):
    def make(rng):
        q = _randn(rng, (batch, num_heads, seq, head_dim))
        k = _randn(rng, (batch, num_kv_heads, kv_seq, head_dim))
        v = _randn(rng, (batch, num_kv_heads, kv_seq, head_dim))
        q_idx, k_idx = np.arange(kv_seq - seq, kv_seq), np.arange(kv_seq)
        mask = nn.attention_mask_4d(None, q_idx, k_idx, sliding_window=window)  # (1, 1, seq, kv_seq)
        return (q, k, v, mask), {"scale": head_dim**-0.5}

    return make


def moe_case(tokens, hidden, inter, num_experts, top_k, dtype=np.float32):
    def make(rng):
        x = _randn(rng, (tokens, hidden))
        logits = rng.standard_normal((tokens, num_experts))
        index = np.argsort(-logits, axis=-1)[:, :top_k]  # (tokens, top_k) distinct experts
        weights = rng.random((tokens, top_k)).astype(np.float32)
        weights /= weights.sum(-1, keepdims=True)
        gate = _randn(rng, (num_experts, inter, hidden), dtype, hidden**-0.5)
        up = _randn(rng, (num_experts, inter, hidden), dtype, hidden**-0.5)
        down = _randn(rng, (num_experts, hidden, inter), dtype, inter**-0.5)
        return (x, index, weights, gate, up, down), {}

    return make


GEMMA, QWEN = "Gemma 3 270M", "Qwen3-MoE (30B-A3B layer)"
CASES = [
    (GEMMA, "decode q_proj 1x640 -> 1024", "linear", linear_case(1, 640, 1024)),
    (GEMMA, "decode mlp up 1x640 -> 2048", "linear", linear_case(1, 640, 2048)),
    (GEMMA, "decode mlp down 1x2048 -> 640", "linear", linear_case(1, 2048, 640)),
    (GEMMA, "decode LM head 1x640 -> 262144", "linear", linear_case(1, 640, 262144)),
    (GEMMA, "decode LM head, bf16 weight", "linear", linear_case(1, 640, 262144, BF16)),
    (GEMMA, "prefill mlp up 512x640 -> 2048", "linear", linear_case(512, 640, 2048)),
    (GEMMA, "decode attn, cache 512", "attention", attention_case(1, 4, 1, 1, 512, 256)),
    (GEMMA, "decode attn, cache 2048", "attention", attention_case(1, 4, 1, 1, 2048, 256)),
    (GEMMA, "decode attn, cache 2048, window 512", "attention", attention_case(1, 4, 1, 1, 2048, 256, window=512)),
    (GEMMA, "prefill attn 512, causal", "attention", attention_case(1, 4, 1, 512, 512, 256)),
    (QWEN, "decode q_proj 1x2048 -> 4096", "linear", linear_case(1, 2048, 4096)),
    (QWEN, "decode attn 32/4 heads, cache 2048", "attention", attention_case(1, 32, 4, 1, 2048, 128)),
    (QWEN, "prefill attn 512, 32/4 heads", "attention", attention_case(1, 32, 4, 512, 512, 128)),
    (QWEN, "decode MoE 1 token, 128 experts top-8", "moe_dispatch", moe_case(1, 2048, 768, 128, 8)),
    (QWEN, "decode MoE, bf16 experts", "moe_dispatch", moe_case(1, 2048, 768, 128, 8, BF16)),
    (QWEN, "prefill MoE 128 tokens, top-8", "moe_dispatch", moe_case(128, 2048, 768, 128, 8)),
]


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def available_backends():
    names = ["numpy", "numba"]
    try:
        ops.set_backend("cupy")
        names.append("cupy")
    except ConfigError as err:
        print(f"(cupy skipped: {err})")
    ops.set_backend("numpy")
    return names


def to_backend(backend, args, kwargs):
    """Inputs as that backend's users hold them (CuPy: float32 tensors resident on the GPU)."""
    if backend != "cupy":
        return args, kwargs
    import cupy  # noqa: PLC0415

    def move(a):
        return cupy.asarray(a) if isinstance(a, np.ndarray) and a.dtype != BF16 else a

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def synchronize(backend):
    if backend == "cupy":
        import cupy  # noqa: PLC0415

        cupy.cuda.Device().synchronize()


def time_op(backend, op, args, kwargs, repeats, budget_s):
    """(first call seconds, median seconds) of `op` on `backend`."""
    fn = getattr(ops, op)
    with ops.use_backend(backend):
        start = time.perf_counter()
        fn(*args, **kwargs)
        synchronize(backend)
        first = time.perf_counter() - start
        times, deadline = [], time.perf_counter() + budget_s
        while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
            start = time.perf_counter()
            fn(*args, **kwargs)
            synchronize(backend)
            times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def fmt_ms(seconds):
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per case and backend (at most)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per case and backend (at least 3 calls)")
    parser.add_argument("--only", choices=["linear", "attention", "moe_dispatch"], help="one op only")
    parser.add_argument("--plot", type=Path, default=RESULTS / "kernels.png")
    options = parser.parse_args(argv)

    import numba  # noqa: PLC0415

    backends = available_backends()
    print(f"# minilm kernels: {', '.join(backends)}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; numpy {np.__version__}, "
        f"numba {numba.__version__} ({numba.get_num_threads()} threads); "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} (left as found)"
    )
    print("times: median ms per call; ratio: numpy time / backend time (>1 = faster than NumPy)\n")

    rng = np.random.default_rng(0)
    rows = []
    for group, name, op, make in CASES:
        if options.only and op != options.only:
            continue
        args, kwargs = make(rng)
        result = {"group": group, "name": name, "op": op}
        for backend in backends:
            b_args, b_kwargs = to_backend(backend, args, kwargs)
            first, median = time_op(backend, op, b_args, b_kwargs, options.repeats, options.budget)
            result[backend] = median
            result[backend + "_first"] = first
        rows.append(result)
        del args, kwargs
        print(f"  {group}: {name}: " + ", ".join(f"{b} {fmt_ms(result[b])} ms" for b in backends), flush=True)

    header = ["model", "op", "case", *(f"{b} ms" for b in backends), *(f"{b} ratio" for b in backends[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["group"], r["op"], r["name"], *(fmt_ms(r[b]) for b in backends)]
        cells += [f"{r['numpy'] / r[b]:.2f}x" for b in backends[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    plot(rows, backends, options.plot)
    options.plot.with_suffix(".md").write_text(table + "\n")
    print(f"\nplot: {options.plot}; table: {options.plot.with_suffix('.md')}")
    return rows


def plot(rows, backends, path):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    others = backends[1:]
    labels = [f"{r['group'].split(' (')[0]}: {r['name']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    height = 0.8 / max(len(others), 1)
    for i, backend in enumerate(others):
        ratios = [r["numpy"] / r[backend] for r in rows]
        ys = [y + i * height for y in range(len(rows))]
        ax.barh(ys, ratios, height=height, label=backend)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(rows))], labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the NumPy reference (numpy time / backend time, log scale)")
    ax.set_title("minilm kernels")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

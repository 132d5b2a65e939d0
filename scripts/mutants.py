"""Hand-made mutation testing: does the test suite notice a plausible one-line bug?

A *mutant* is a copy of the code with one small, deliberate change: a sign flipped, a `>=` turned
into `>`, a max-subtraction dropped. Each mutant below is one such bug, of the kind a student
porting a model (or a maintainer refactoring a kernel) could really make. For each one this
script applies the change to a throwaway copy of the repository, runs the test files that ought
to catch it, and records the verdict:

    killed    the tests failed: the suite notices this bug
    survived  the tests passed: the suite is blind to it (a test gap, or an equivalent mutant)
    timeout   the tests ran past the limit (counted as killed, as mutmut does: the bug hangs them)

The score is killed / total. It is a report, not a gate: the script always exits 0 once it has
run. A survivor is worth a look: either write the test that kills it, or explain why the change
cannot matter (then it is an *equivalent* mutant and should be dropped from the list).

The real working tree is never modified. The repository (less .git, virtual environments and
caches) is copied once to a temporary folder, with the symlink minilm/kernels -> ../kernels that
the installed package maps through setuptools' package-dir, and put first on PYTHONPATH; each
mutant is applied there and undone in a `finally`. NUMBA_CACHE_DIR points into the temporary
folder (a fresh one for each mutant of a kernel) so no compiled mutant reaches the real cache.

    python scripts/mutants.py                 # every mutant, a table and the score (~10 min)
    python scripts/mutants.py --list          # names, files and descriptions
    python scripts/mutants.py --only NAME     # one mutant, or a comma-separated list
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider"]
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "*.egg-info", ".ipynb_*"
)


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # test files that should kill it
    description: str


MUTANTS = [
    # --- minilm/nn.py: softmax, soft cap, masks ---------------------------------------------------
    Mutant(
        "softmax_no_max",
        "minilm/nn.py",
        "    x_max = np.where(np.isfinite(x_max), x_max, 0)",
        "    x_max = np.zeros_like(x_max)",
        ("tests/test_generation.py", "tests/test_qwen3_moe.py", "tests/test_kernels.py"),
        "softmax without the max-subtraction: overflows to inf/NaN on large logits",
    ),
    Mutant(
        "soft_cap_no_divide",
        "minilm/nn.py",
        "    return cap * np.tanh(x / cap)",
        "    return cap * np.tanh(x)",
        ("tests/test_gemma3.py", "tests/test_kernels.py"),
        "soft cap as cap * tanh(x) instead of cap * tanh(x / cap)",
    ),
    Mutant(
        "sliding_window_off_by_one",
        "minilm/nn.py",
        "(k_idx[None, :] > q_idx[:, None] - window)",
        "(k_idx[None, :] >= q_idx[:, None] - window)",
        ("tests/test_gemma3.py", "tests/test_cache.py", "tests/test_kernels.py"),
        "sliding window sees window + 1 keys (>= instead of >)",
    ),
    Mutant(
        "padding_mask_ignored",
        "minilm/nn.py",
        "        allowed = allowed & padding_mask(attention_mask)",
        "        allowed = allowed & padding_mask(np.ones_like(attention_mask))",
        ("tests/test_phi3.py", "tests/test_gemma3.py", "tests/test_qwen3_moe.py"),
        "attention mask ignored: queries attend to padding keys",
    ),
    # --- minilm/generation.py: logits processors ---------------------------------------------------
    Mutant(
        "repetition_penalty_sign",
        "minilm/generation.py",
        "np.where(scores > 0, scores / penalty, scores * penalty)",
        "scores / penalty",
        ("tests/test_generation.py",),
        "repetition penalty divides every logit, raising the negative ones",
    ),
    Mutant(
        "top_k_drops_ties",
        "minilm/generation.py",
        "    return np.where(logits < kth, -np.inf, logits)",
        "    return np.where(logits <= kth, -np.inf, logits)",
        ("tests/test_generation.py",),
        "top-k also drops the k-th logit (<= instead of <)",
    ),
    Mutant(
        "top_p_boundary",
        "minilm/generation.py",
        "beyond = np.cumsum(sorted_probs) - sorted_probs >= p",
        "beyond = np.cumsum(sorted_probs) - sorted_probs > p",
        ("tests/test_generation.py",),
        "top-p keeps one token too many when the mass reaches p exactly (> instead of >=)",
    ),
    Mutant(
        "min_p_absolute",
        "minilm/generation.py",
        "np.where(probs < min_p * probs.max(axis=-1, keepdims=True), -np.inf, logits)",
        "np.where(probs < min_p, -np.inf, logits)",
        ("tests/test_generation.py",),
        "min-p as an absolute threshold, not relative to the top probability",
    ),
    # --- minilm/cache.py, minilm/rope.py --------------------------------------------------------------
    Mutant(
        "ring_order_after_wrap",
        "minilm/cache.py",
        "        return [ring[:, :, oldest:], ring[:, :, :oldest]]",
        "        return [ring[:, :, :oldest], ring[:, :, oldest:]]",
        ("tests/test_cache.py", "tests/test_gemma3.py"),
        "sliding-window ring buffer returns keys newest-part first after it wraps",
    ),
    Mutant(
        "rotate_half_sign",
        "minilm/rope.py",
        "    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)",
        "    return np.concatenate([x[..., half:], -x[..., :half]], axis=-1)",
        ("tests/test_rope.py", "tests/test_phi3.py"),
        "RoPE rotate_half with the sign on the wrong half (rotates by -theta)",
    ),
    Mutant(
        "longrope_switch",
        "minilm/rope.py",
        "long_factor if seq_len and seq_len > original else short_factor",
        "long_factor if seq_len and seq_len >= original else short_factor",
        ("tests/test_rope.py", "tests/test_phi3.py"),
        "LongRoPE switches to long factors one position early (>= instead of >)",
    ),
    # --- minilm/models/ ---------------------------------------------------------------------------------
    Mutant(
        "gemma_norm_no_offset",
        "minilm/models/gemma3.py",
        "(normed * (np.float32(1) + weight.astype(np.float32, copy=False)))",
        "(normed * weight.astype(np.float32, copy=False))",
        ("tests/test_gemma3.py",),
        "Gemma RMSNorm multiplies by w, not (1 + w)",
    ),
    Mutant(
        "embedding_normaliser_unrounded",
        "minilm/models/gemma3.py",
        "    normalizer = table.dtype.type(np.float32(table.shape[1] ** 0.5))",
        "    normalizer = np.float32(table.shape[1] ** 0.5)",
        ("tests/test_gemma3.py", "tests/test_gguf.py"),
        "embedding normaliser sqrt(hidden) not rounded to the table's dtype (bf16: 25.25, not 25.298)",
    ),
    Mutant(
        "alibi_extra_slopes",
        "minilm/models/bloom.py",
        "_powers(extra_base, np.arange(1, 1 + 2 * remaining, 2))",
        "_powers(extra_base, np.arange(1, 1 + remaining))",
        ("tests/test_bloom.py",),
        "ALiBi slopes for a non-power-of-two head count use all powers, not the odd ones",
    ),
    Mutant(
        "qk_norm_on_v",
        "minilm/models/qwen3_moe.py",
        "    k = nn.rms_norm(k, p.k_norm.weight, cfg.rms_norm_eps)",
        "    v = nn.rms_norm(v, p.k_norm.weight, cfg.rms_norm_eps)",
        ("tests/test_qwen3_moe.py",),
        "QK-norm's key norm applied to the values instead of the keys",
    ),
    Mutant(
        "top_k_experts_tie_order",
        "minilm/models/qwen3_moe.py",
        '    return np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]',
        '    return np.argsort(probs, axis=-1, kind="stable")[:, ::-1][:, :top_k]',
        ("tests/test_qwen3_moe.py",),
        "tied router probabilities go to the higher expert index",
    ),
    Mutant(
        "norm_topk_prob_inverted",
        "minilm/models/qwen3_moe.py",
        "    if norm_topk_prob:",
        "    if not norm_topk_prob:",
        ("tests/test_qwen3_moe.py",),
        "top-k routing weights renormalised exactly when the config says not to",
    ),
    Mutant(
        "load_balancing_factor",
        "minilm/models/qwen3_moe.py",
        "    return np.float32(num_experts * np.sum(tokens_per_expert * prob_per_expert))",
        "    return np.float32(top_k * np.sum(tokens_per_expert * prob_per_expert))",
        ("tests/test_qwen3_moe.py",),
        "load-balancing loss scaled by top_k instead of num_experts",
    ),
    Mutant(
        "phi3_cache_stale_boundary",
        "minilm/models/phi3.py",
        "        return total_length >= original + 1 and cache.get_seq_length() <= original",
        "        return total_length > original + 1 and cache.get_seq_length() <= original",
        ("tests/test_phi3.py",),
        "Phi-3 re-runs with long factors one step late",
    ),
    # --- kernels/numba/ ---------------------------------------------------------------------------------
    Mutant(
        "numba_softmax_no_max",
        "kernels/numba/attention.py",
        "            e = np.exp(p[j] - row_max)",
        "            e = np.exp(p[j])",
        ("tests/test_kernels.py", "tests/test_backends.py"),
        "Numba masked softmax without the max-subtraction",
    ),
    Mutant(
        "numba_fused_mask_ignored",
        "kernels/numba/attention.py",
        "                if (everything or mask[b, 0, i, j]) and m != -np.inf:",
        "                if m != -np.inf:",
        ("tests/test_kernels.py", "tests/test_backends.py"),
        "fused decode attention exponentiates masked keys too",
    ),
    Mutant(
        "int8_gemv_bias_index",
        "kernels/numba/linear.py",
        "                        out[r, o] += _to_f32(bias[o])",
        "                        out[r, o] += _to_f32(bias[o0])",
        ("tests/test_int8_weights.py", "tests/test_kernels.py"),
        "int8 gemv adds the first bias of each 4-row tile to all four rows",
    ),
    Mutant(
        "q4_k_min_sign",
        "kernels/numba/quantized.py",
        "acc[r, j] += (sub_scale * q - offset) * x[r, base + j]",
        "acc[r, j] += (sub_scale * q + offset) * x[r, base + j]",
        ("tests/test_quantized_weights.py", "tests/test_gguf.py"),
        "Q4_K dot product adds dmin * m instead of subtracting it",
    ),
    Mutant(
        "q4_k_min_high_bits",
        "kernels/numba/quantized.py",
        "low_min = (np.int32(row[sc + s + 4]) >> 4) | ((np.int32(row[sc + s]) >> 6) << 4)",
        "low_min = np.int32(row[sc + s + 4]) >> 4",
        ("tests/test_quantized_weights.py", "tests/test_gguf.py"),
        "Q4_K dot product drops the two high bits of the mins of sub-blocks 4..7",
    ),
    # --- minilm/io/: file checks --------------------------------------------------------------------------
    Mutant(
        "safetensors_end_check",
        "minilm/io/safetensors.py",
        "        if end - begin != expected or data_start + end > size:",
        "        if end - begin != expected:",
        ("tests/test_errors.py",),
        "safetensors loader does not check a tensor ends inside the file",
    ),
    Mutant(
        "gguf_tensor_bounds",
        "minilm/io/gguf.py",
        "        if offset % alignment or start + n_bytes > len(data):",
        "        if offset % alignment:",
        ("tests/test_gguf.py", "tests/test_errors.py"),
        "GGUF reader does not check a tensor ends inside the file",
    ),
    Mutant(
        "gguf_header_take_bounds",
        "minilm/io/gguf.py",
        "        if n < 0 or self.pos + n > len(self.data):",
        "        if n < 0:",
        ("tests/test_gguf.py", "tests/test_errors.py"),
        "GGUF header reader does not check a read stays inside the file",
    ),
]


def check(mutant: Mutant, root: Path = ROOT) -> str:
    """The file's text, after checking the original occurs exactly once."""
    text = (root / mutant.file).read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise SystemExit(f"mutant {mutant.name}: {mutant.original!r} occurs {count} times in {mutant.file}, not once")
    return text


def make_copy(tmp: Path) -> Path:
    """Copy the working tree to tmp/repo and link minilm/kernels -> ../kernels, as installed."""
    copy = tmp / "repo"
    shutil.copytree(ROOT, copy, ignore=IGNORE, symlinks=True)
    link = copy / "minilm" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels")
    return copy


def environment(copy: Path, numba_cache: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["NUMBA_CACHE_DIR"] = str(numba_cache)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def verify_import(copy: Path, env: dict) -> None:
    """The copy, not the installed checkout, must be what `import minilm` finds."""
    code = "import minilm, minilm.kernels.numba; print(minilm.__file__); print(minilm.kernels.numba.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode or len(paths) != 2 or not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in paths):
        raise SystemExit(f"the copy is not what gets imported:\n{out.stdout}{out.stderr}")


def run_tests(tests, copy: Path, env: dict, timeout: float) -> tuple[str, float]:
    """('passed' | 'failed' | 'timeout', seconds) for these test files in the copy."""
    start = time.monotonic()
    try:
        result = subprocess.run(
            PYTEST + list(tests),
            cwd=copy,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start
    return ("passed" if result.returncode == 0 else "failed"), time.monotonic() - start


def run_mutant(mutant: Mutant, copy: Path, env: dict, timeout: float) -> tuple[str, float]:
    """Apply the mutant in the copy, run its tests, always put the file back."""
    path = copy / mutant.file
    original = check(mutant, copy)
    try:
        path.write_text(original.replace(mutant.original, mutant.replacement))
        outcome, seconds = run_tests(mutant.tests, copy, env, timeout)
    finally:
        path.write_text(original)
    verdict = {"failed": "killed", "passed": "survived", "timeout": "timeout"}[outcome]
    return verdict, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", help="run only these mutants (comma-separated names)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per mutant (default 120)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not first run the tests unmutated")
    args = parser.parse_args(argv)

    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise SystemExit("duplicate mutant names")
    for mutant in MUTANTS:  # every original must occur exactly once in the real tree
        check(mutant)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:32} {m.file:30} {m.description}")
        return 0
    selected = MUTANTS
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"unknown mutants {unknown}; see --list")
        selected = [m for m in MUTANTS if m.name in wanted]

    with tempfile.TemporaryDirectory(prefix="minilm-mutants-") as tmp:
        tmp = Path(tmp)
        copy = make_copy(tmp)
        shared_cache = tmp / "numba-cache"
        env = environment(copy, shared_cache)
        verify_import(copy, env)
        print(f"copy: {copy}  ({len(selected)} mutants, {args.timeout:.0f} s each at most)", flush=True)

        if not args.skip_baseline:  # a kill only means something if the tests pass without the mutant
            files = sorted({t for m in selected for t in m.tests})
            outcome, seconds = run_tests(files, copy, env, args.timeout * len(files))
            print(f"baseline ({len(files)} test files, unmutated): {outcome} in {seconds:.0f} s", flush=True)
            if outcome != "passed":
                print("the tests fail without any mutant: fix that first; verdicts below would mean nothing")
                return 0

        rows = []
        for i, mutant in enumerate(selected):
            kernel = mutant.file.startswith("kernels/")  # a fresh cache: no compiled mutant outlives its run
            run_env = environment(copy, tmp / f"numba-cache-{i}") if kernel else env
            verdict, seconds = run_mutant(mutant, copy, run_env, args.timeout)
            rows.append((mutant, verdict, seconds))
            print(f"  {mutant.name:32} {verdict:9} {seconds:6.1f} s", flush=True)

    print()
    print(f"| {'mutant':32} | {'file':28} | {'tests':44} | {'verdict':8} | {'s':>5} |")
    print(f"|{'-' * 34}|{'-' * 30}|{'-' * 46}|{'-' * 10}|{'-' * 7}|")
    for mutant, verdict, seconds in rows:
        tests = ", ".join(Path(t).stem.removeprefix("test_") for t in mutant.tests)
        print(f"| {mutant.name:32} | {mutant.file:28} | {tests:44} | {verdict:8} | {seconds:5.0f} |")
    killed = sum(verdict != "survived" for _, verdict, _ in rows)
    print(f"\nscore: {killed}/{len(rows)} killed ({100 * killed / max(len(rows), 1):.0f}%)")
    survivors = [m for m, verdict, _ in rows if verdict == "survived"]
    if survivors:
        print("survivors (test gaps, or equivalent mutants):")
        for m in survivors:
            print(f"  {m.name}: {m.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

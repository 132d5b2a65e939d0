"""Write tests/fixtures/gemma3_270m_reference.json: what transformers does with the real Gemma 3 270M
GGUF (Q4_K_M), for minilm's tests to compare against without importing torch.

It needs the real model and an environment with minilm as well as torch and transformers
(`pip install -e ".[fixtures]"`). Place the GGUF first, then run:

    python -c "from minilm.io.default_model import default_model_path; print(default_model_path())"
    python scripts/make_real_model_reference.py [--gguf PATH]

It records:
  - versions of transformers / torch / tokenizers / gguf, and the GGUF's SHA-256;
  - the config transformers builds from the GGUF metadata;
  - tokenizer ids (with and without BOS) and decodes for tricky strings;
  - a chat template rendering (the file has no template; a Gemma-style one is supplied);
  - per-tensor checksums of transformers' float32 weights (and it checks here, exactly, that
    `minilm.io.gguf.gemma3_state_dict_from_gguf` gives the same arrays);
  - greedy continuations (float32, eager attention, do_sample=False) of 4 prompts, one longer
    than 600 tokens so that it crosses the 512-token sliding window, with the top-5 logits of
    the first generated position.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import time

import numpy as np

from minilm.io.gguf import gemma3_state_dict_from_gguf, read_gguf

REPO = pathlib.Path(__file__).resolve().parents[1]

OUTPUT = REPO / "tests" / "fixtures" / "gemma3_270m_reference.json"
MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"

TOKENIZER_STRINGS = [
    "",
    "Hello world",
    "The capital of France is",
    "  two leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e",
    "     ",
    "tabs\tand\t\tdouble\t\t\ttabs",
    "line1\nline2\n\n\nline5\r\nwindows\n",
    "\n",
    "emoji 🤗🚀 and a family 👨\u200d👩\u200d👧 and flags 🇫🇷",
    "中文和日本語のテキスト、한국어 텍스트",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text that already starts with bos",
    "html <b>bold</b> <table><tr><td>1</td></tr></table> and <unused0> and [multimodal]",
    "literal sentencepiece marker \u2581 and \u2581\u2581 two",
    "Ünïcödé àccents — dashes … ellipsis “quotes” ‘single’",
    "bytes \x00\x01\x7f zero\u200bwidth e\u0301 combining",
    "Numbers 1234567890, 3.14159, -1e-9, 0x1F, 1,000,000",
    "    indented\n\t\tmixed \t \n  \n",
]

CHAT_TEMPLATE = (  # Gemma 3's instruction-tuned template (the 270M base GGUF ships none)
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CHAT_MESSAGES = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help?  "},
    {"role": "user", "content": "Name a colour.\n"},
]


def long_prompt() -> str:
    """A deterministic text well over 600 tokens whose continuation needs the context."""
    lines = [f"Item {i}: the square of {i} is {i * i}." for i in range(1, 61)]
    return "Here is a list of numbers and their squares.\n" + "\n".join(lines) + "\nItem 61:"


GENERATIONS = [  # (name, prompt, new tokens)
    ("capital", "The capital of France is", 24),
    ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n', 24),
    ("chat", "<start_of_turn>user\nWhat is the capital of Japan?<end_of_turn>\n<start_of_turn>model\n", 24),
    ("long", long_prompt(), 16),
]


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while piece := file.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def default_gguf_path() -> pathlib.Path:
    cache = pathlib.Path(os.environ.get("MINILM_CACHE") or "~/.cache/minilm").expanduser()
    return cache / MODEL_NAME


def config_record(config) -> dict:
    keys = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_activation",
        "rms_norm_eps",
        "rope_parameters",
        "sliding_window",
        "max_position_embeddings",
        "query_pre_attn_scalar",
        "layer_types",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "unk_token_id",
        "tie_word_embeddings",
    ]
    full = config.to_dict()
    return {key: full.get(key) for key in keys}


def tokenizer_records(tokenizer) -> list[dict]:
    records = []
    for text in TOKENIZER_STRINGS:
        ids = tokenizer(text)["input_ids"]
        records.append(
            {
                "text": text,
                "ids": ids,
                "ids_no_bos": tokenizer(text, add_special_tokens=False)["input_ids"],
                "decoded": tokenizer.decode(ids),
                "decoded_skip_special": tokenizer.decode(ids, skip_special_tokens=True),
            }
        )
    return records


def sample_indices(size: int) -> np.ndarray:
    """8 flat indices spread over a tensor, first and last included (the tests recompute them)."""
    return np.linspace(0, size - 1, 8).round().astype(np.int64)


def tensor_checksums(model) -> dict:
    """Shape, float64 sum and 8 spread-out float32 values of every weight (lm_head is tied)."""
    checksums = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        values = tensor.detach().float().numpy()
        flat = values.reshape(-1)
        checksums[name] = {
            "shape": list(values.shape),
            "sum": float(values.astype(np.float64).sum()),
            "sample": [float(v) for v in flat[sample_indices(flat.size)]],
        }
    return checksums


def compare_with_minilm(model, gguf_path: pathlib.Path) -> dict:
    """Check minilm's dequantized + converted tensors equal transformers' exactly."""
    start = time.time()
    ours = gemma3_state_dict_from_gguf(read_gguf(gguf_path))
    seconds = time.time() - start
    theirs = {name: t.detach().float().numpy() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    if set(ours) != set(theirs):
        raise SystemExit(
            f"tensor names differ: only minilm {set(ours) - set(theirs)}, only HF {set(theirs) - set(ours)}"
        )
    worst = 0.0
    for name, value in theirs.items():
        if ours[name].shape != value.shape:
            raise SystemExit(f"{name}: minilm shape {ours[name].shape}, transformers {value.shape}")
        worst = max(worst, float(np.abs(ours[name] - value).max()))
    if worst != 0.0:
        raise SystemExit(f"minilm's tensors differ from transformers' by up to {worst}")
    print(f"minilm state dict == transformers state dict for all {len(theirs)} tensors ({seconds:.1f} s)")
    return {"tensors_compared": len(theirs), "max_abs_diff": worst}


def generation_records(model, tokenizer) -> list[dict]:
    import torch

    records = []
    for name, prompt, new_tokens in GENERATIONS:
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            logits = model(**encoded).logits[0, -1]  # (vocab,) at the last prompt position
            output = model.generate(
                **encoded,
                do_sample=False,
                num_beams=1,
                max_new_tokens=new_tokens,
                min_new_tokens=0,
                temperature=None,
                top_p=None,
                top_k=None,
                repetition_penalty=None,
            )
        input_ids = encoded["input_ids"][0].tolist()
        new_ids = output[0, len(input_ids) :].tolist()
        top = torch.topk(logits, 5)
        records.append(
            {
                "name": name,
                "prompt": prompt,
                "input_ids": input_ids,
                "max_new_tokens": new_tokens,
                "new_ids": new_ids,
                "new_text": tokenizer.decode(new_ids),
                "first_step_top5_ids": top.indices.tolist(),
                "first_step_top5_logits": [float(v) for v in top.values],
            }
        )
        print(f"[{name}] {len(input_ids)} prompt tokens -> {tokenizer.decode(new_ids)!r}")
    return records


def compact_json(value, depth: int = 0) -> str:
    """JSON with one line per dict entry but every list of plain values on a single line."""
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict):
        entries = [f"{inner}{json.dumps(key)}: {compact_json(item, depth + 1)}" for key, item in value.items()]
        return "{\n" + ",\n".join(entries) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return "[\n" + ",\n".join(inner + compact_json(item, depth + 1) for item in value) + "\n" + pad + "]"
    return json.dumps(value, ensure_ascii=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=pathlib.Path, default=default_gguf_path())
    parser.add_argument("--output", type=pathlib.Path, default=OUTPUT)
    args = parser.parse_args()
    if not args.gguf.is_file():
        raise SystemExit(f"{args.gguf} not found; place it first (see this script's docstring)")

    import tokenizers
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    folder, file_name = str(args.gguf.parent), args.gguf.name
    start = time.time()
    config = AutoConfig.from_pretrained(folder, gguf_file=file_name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file_name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    print(f"loaded in {time.time() - start:.1f} s")

    reference = {
        "about": "transformers' view of the Gemma 3 270M Q4_K_M GGUF; written by scripts/make_real_model_reference.py",
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "gguf": importlib.metadata.version("gguf"),
            "python": platform.python_version(),
        },
        "gguf": {"file": file_name, "sha256": sha256_of(args.gguf)},
        "config": config_record(config),
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "unk_token_id": tokenizer.unk_token_id,
            "chat_template": tokenizer.chat_template,
            "cases": tokenizer_records(tokenizer),
        },
        "chat": {
            "template": CHAT_TEMPLATE,
            "messages": CHAT_MESSAGES,
            "rendered": tokenizer.apply_chat_template(
                CHAT_MESSAGES, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
            ),
        },
        "weights": {"minilm_check": compare_with_minilm(model, args.gguf), "checksums": tensor_checksums(model)},
        "generation": {
            "settings": "float32, attn_implementation='eager', do_sample=False, num_beams=1",
            "cases": generation_records(model, tokenizer),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(compact_json(reference) + "\n", encoding="utf-8")
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()

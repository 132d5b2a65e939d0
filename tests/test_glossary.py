"""docs/glossary.md: every file it points at exists, the README links it, and the terms the issue
asked for are there."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
GLOSSARY = (ROOT / "docs" / "glossary.md").read_text(encoding="utf-8")


def named_paths(text):
    """Backquoted things that look like repository paths: `minilm/cache.py`, `kernels/cupy/`."""
    return sorted({p for p in re.findall(r"`([^`\s]+)`", text) if "/" in p and not p.startswith(("~", "$", "hf:"))})


def test_the_glossary_names_files():
    assert len(named_paths(GLOSSARY)) >= 20


@pytest.mark.parametrize("path", named_paths(GLOSSARY))
def test_every_named_file_exists(path):
    assert (ROOT / path).exists(), f"docs/glossary.md names {path}, which does not exist"


TERMS = [
    "GQA", "MQA", "QK-norm", "RoPE", "ALiBi", "SuScaled", "longrope", "YaRN", "Soft cap", "Sliding window",
    "MoE", "top-k routing", "Aux loss", "RMSNorm", "GeGLU", "SwiGLU", "KV cache", "GEMV", "GEMM", "Prefill",
    "decode", "GGUF", "Q4_K", "Q8_0", "Tied embeddings", "Logits", "Greedy", "top-p", "min-p", "BPE",
    "Byte fallback", "LoRA",
]  # fmt: skip


@pytest.mark.parametrize("term", TERMS)
def test_term_is_defined(term):
    assert re.search(r"^- \*\*[^*]*" + re.escape(term), GLOSSARY, flags=re.M | re.I), term


def test_readme_links_the_glossary():
    assert "docs/glossary.md" in (ROOT / "README.md").read_text(encoding="utf-8")

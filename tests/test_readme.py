"""The README's first two commands are the set-up contract; CI must run the second verbatim."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def readme_commands():
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [
        line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")
    ]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) >= 2
    test_command = commands[1]
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines(), f"{test_command!r} is not a line of .ci/run"


def test_first_command_runs_generate():
    assert "minilm" in readme_commands()[0]


def python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, monkeypatch):
    """Every python block of the README runs as written, from the repository root (the real model's
    blocks too: they are what a new user types first)."""
    monkeypatch.chdir(ROOT)
    exec(compile(python_blocks()[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})

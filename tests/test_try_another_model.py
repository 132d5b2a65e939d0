"""The README's "Try another model": the tiny chat model of tests/fixtures/tiny_chat (a Gemma 3 with
a real BPE tokenizer, made by scripts/make_tiny_chat_model.py) gives transformers' greedy ids and
text, and every command of that README section runs as written (in-process, NumPy backend), the
`hf://` one against a Hugging Face cache built in a temporary folder, as `hf download` lays it out."""

import io
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import minilm
from minilm import api, cli, generation

ROOT = Path(__file__).parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny_chat"
REFERENCE = json.loads((TINY / "reference.json").read_text(encoding="utf-8"))


def section_commands():
    """The `python -m minilm ...` lines of the README's "Try another model" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Try another model\n(.*?)^## ", text, flags=re.S | re.M).group(1)
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("python -m minilm")]


@pytest.fixture(autouse=True)
def numpy_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILM_BACKEND", "numpy")  # no numba compilation in this quick test
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda case: case["prompt"])
def test_tiny_chat_model_matches_transformers(case):
    model, tokenizer = api.load(TINY, backend="numpy")
    assert tokenizer.encode(case["prompt"]) == case["prompt_ids"]  # the same tokenizer.json, read by minilm
    ids = generation.generate(model, np.array([case["prompt_ids"]]), max_new_tokens=16, eos_token_id=[1, 5])
    new = ids[0, len(case["prompt_ids"]) :].tolist()
    ends = [i for i, token in enumerate(new) if token in (1, 5)]  # <eos>, <end_of_turn>
    new = new[: ends[0] + 1] if ends else new  # transformers stops there; minilm pads the rest
    assert new == case["new_ids"]
    assert minilm.generate(case["prompt"], model=TINY, max_new_tokens=16) == case["text"]  # specials skipped


def test_the_section_has_commands():
    commands = section_commands()
    assert len(commands) >= 3 and any("hf://" in c for c in commands) and any("--chat" in c for c in commands)


def fake_hf_cache(hub, repo_id, folder):
    """`folder` laid out as `hf download repo_id` leaves it: blobs, a snapshot of symlinks, refs/main."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, file in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"blob{index}"
        shutil.copyfile(file, blob)
        try:
            (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
        except OSError:  # no symlinks (Windows without developer mode): the hub then copies
            shutil.copyfile(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return snapshot


@pytest.mark.parametrize("index", range(len(section_commands())))
def test_readme_command_runs(index, tmp_path, monkeypatch, capsys):
    command = section_commands()[index]
    argv = shlex.split(command)[3:]  # after `python -m minilm`
    handles = [a[len("hf://") :] for a in argv if a.startswith("hf://")]
    if handles:  # the README's model, as if downloaded: the tiny model under that name
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        fake_hf_cache(tmp_path / "hf" / "hub", handles[0], TINY)
    monkeypatch.chdir(ROOT)
    prompt = cli.parser().parse_args(argv).prompt
    typed = "Hello\n/quit\n" if prompt is None else ""  # interactive: what the README says to type
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    status = cli.main(argv)
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.strip(), f"{command!r} printed no text"
    case = next((c for c in REFERENCE["cases"] if c["prompt"] == prompt), None)
    if case is not None and "--chat" not in argv:  # the greedy continuation transformers gives
        assert out == prompt + minilm.generate(prompt, model=TINY, max_new_tokens=64) + "\n"

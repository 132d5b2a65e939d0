"""Reading GGUF checkpoints (llama.cpp's single-file format) into NumPy, readably.

A GGUF file is a header of key/value metadata (the config and the tokenizer, under llama.cpp's
key names) followed by tensors. Each tensor is stored in one ggml *type*: plain floats (F32, F16,
BF16) or a block-quantized layout in which a row of weights is cut into blocks of 32 (or
"super-blocks" of 256), and every block carries its own scale(s) next to small integer codes.

    gguf = read_gguf(path)
    gguf.metadata["gemma3.embedding_length"]        # 640
    gguf.tensor_info("blk.0.attn_q.weight")         # shape (1024, 640), type "Q5_0"
    w = gguf.dequantize("blk.0.attn_q.weight")      # float32, (1024, 640)

Shapes. GGUF lists a tensor's dimensions fastest-varying first (`ne = [cols, rows]`). Everything
here uses NumPy / Hugging Face order, `(rows, cols)` = `(out_features, in_features)` for a linear
weight, i.e. the reversed `ne`. How each block type turns back into float32 is in `quants.py`.

Gemma 3 specifics (checked against transformers' GGUF loader, `scripts/make_real_model_reference.py`):
  - config: `gemma3_config_from_gguf` rebuilds a Hugging Face `Gemma3TextConfig` dict;
  - names:  `gemma3_tensor_name_map` maps `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`;
  - values: llama.cpp stores every Gemma RMSNorm weight as `w + 1` (Gemma scales by `1 + w`), so
    `gemma3_state_dict_from_gguf` subtracts 1 from each `*norm.weight`. Nothing else changes: Q/K
    rows are *not* permuted (only llama.cpp's Llama-family converter does that) and the embedding
    is stored unscaled (the `sqrt(hidden_size)` factor is applied in the forward pass).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import os
import pathlib
import struct

import numpy as np
from tqdm import tqdm

from ..errors import CheckpointError, CheckpointNotFoundError, UnknownArchitectureError
from .array_cache import cached_array
from .quants import BLOCK_LAYOUT, DEQUANTIZE, QuantizedWeight, dequantize_bytes

# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------
#
#   "GGUF"  version u32  tensor_count u64  kv_count u64
#   kv_count x    key: string  value_type u32  value
#   tensor_count x  name: string  n_dims u32  ne: u64 x n_dims  ggml_type u32  offset u64
#   padding to `general.alignment` (32), then the tensors' bytes, each at data_start + offset
#
# string = length u64 + UTF-8 bytes; array = item_type u32 + count u64 + items. All little-endian.

# GGUF value type -> (struct format, size) for the fixed-size scalars
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9
# ggml type id -> name, in ggml.h's numbering (block sizes: `quants.BLOCK_LAYOUT` / `GGML_BLOCKS`)
GGML_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}
# (values_per_block, bytes_per_block) of the types minilm cannot dequantize but can still lay out
GGML_BLOCKS = {
    **BLOCK_LAYOUT,
    "Q8_1": (32, 40),
    "Q8_K": (256, 292),
    "IQ2_XXS": (256, 66),
    "IQ2_XS": (256, 74),
    "IQ3_XXS": (256, 98),
    "IQ1_S": (256, 50),
    "IQ3_S": (256, 110),
    "IQ2_S": (256, 82),
    "I8": (1, 1),
    "I16": (1, 2),
    "I32": (1, 4),
    "I64": (1, 8),
    "IQ1_M": (256, 56),
    "TQ1_0": (256, 54),
    "TQ2_0": (256, 66),
    "MXFP4": (32, 17),
}
MAX_DIMS = 4  # GGML_MAX_DIMS
# String arrays longer than this (a vocabulary: 262 144 tokens) are decoded when first read
# (`StringArray`): loading a model whose tokenizer is cached never needs them.
LAZY_STRINGS = 1024
DEQUANTIZE_CHUNK_BYTES = 16 << 20  # `GGUFFile.dequantize` reads and converts a tensor this much at a time
_U64 = struct.Struct("<Q")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a tensor is, without reading its data: shape in NumPy/HF order (reversed GGUF `ne`)."""

    name: str
    shape: tuple[int, ...]
    type_name: str  # ggml type, e.g. "Q4_K"
    n_bytes: int
    offset: int = 0  # where its bytes start in the file


class GGUFFile:
    """An opened GGUF file: metadata as plain Python values, tensors dequantized on demand.

    The tensor bytes stay memory-mapped (read-only); `dequantize` returns a new float32 array
    each call.
    """

    def __init__(self, path: pathlib.Path, version: int, metadata: dict, tensors: dict[str, TensorInfo], data=None):
        self.path = path  # the file (the first part of a file stored in parts)
        self.version = version
        self.lazy_metadata = metadata  # long string arrays as `StringArray`s, not yet decoded
        self._metadata = None  # every value decoded, on first use of `metadata`
        self._tensors = tensors
        self.tensor_names = list(tensors)
        if data is None:
            data = np.memmap(path, dtype=np.uint8, mode="r") if tensors else np.zeros(0, np.uint8)
        self._data = data  # the file's bytes: a memory map, or `PartedBytes` over the parts' maps

    @property
    def metadata(self) -> dict:
        """Every key/value of the header as plain Python values (string arrays decoded now, once)."""
        if self._metadata is None:
            self._metadata = {
                key: value.decode() if isinstance(value, StringArray) else value
                for key, value in self.lazy_metadata.items()
            }
        return self._metadata

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.tensor_names)} tensors, {len(self.lazy_metadata)} keys)"

    def tensor_info(self, name: str) -> TensorInfo:
        """Shape (HF order) and ggml type of tensor `name`."""
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: no tensor named {name!r} (the file has {len(self._tensors)} tensors)")
        return self._tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name` (memory-mapped, read-only), one row of blocks per row:
        uint8 of shape (*shape[:-1], bytes per row)."""
        info = self.tensor_info(name)
        data = self.map_bytes(info.offset, info.n_bytes)
        rows = math.prod(info.shape[:-1])
        return data.reshape(*info.shape[:-1], info.n_bytes // max(rows, 1))

    def dequantize(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor `name` as a float32 array in HF order, e.g. `(out_features, in_features)`; into
        `out` (float32, C-contiguous, that shape) when given, so no second copy is ever held."""
        info = self.tensor_info(name)
        if info.type_name not in DEQUANTIZE:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has ggml type {info.type_name}, which minilm cannot "
                f"dequantize; supported types: {sorted(DEQUANTIZE)}"
            )
        rows = math.prod(info.shape[:-1])
        row_bytes = info.n_bytes // max(rows, 1)
        if out is None:
            out = np.empty(info.shape, np.float32)
        out = out.reshape(rows, info.shape[-1])  # (rows, values per row), a view
        step = max(1, DEQUANTIZE_CHUNK_BYTES // max(row_bytes, 1))  # rows per read
        try:
            for first in range(0, rows, step):
                count = min(step, rows - first)
                raw = self.read_bytes(info.offset + first * row_bytes, count * row_bytes).reshape(count, row_bytes)
                out[first : first + count] = dequantize_bytes(raw, info.type_name, (count, info.shape[-1]))
        except CheckpointError as error:
            raise CheckpointError(f"{self.path}: tensor {name!r}: {error}") from None
        return out.reshape(info.shape)

    def map_bytes(self, start: int, count: int) -> np.ndarray:
        """Bytes start .. start + count - 1 of the file as a read-only memory map of their own (uint8),
        or read into new memory when they cross from one part of the file to the next.

        One map per tensor, not views of one map of the whole file: a page fault maps the pages
        around it (large page-cache folios: up to megabytes), but never beyond its own map, so a
        kernel reading one tensor does not make its neighbours resident (the Q5_0 blocks that the
        Numba backend replaces by their int8 codes stay out of memory)."""
        parts = self._parts()
        for part, part_start, part_size in parts:
            if part_start <= start and start + count <= part_start + part_size:
                if count == 0:
                    return np.zeros(0, np.uint8)
                return np.memmap(part, dtype=np.uint8, mode="r", offset=start - part_start, shape=(count,))
        # Across parts (the shipped model's embedding, 178 MB): joined once into minilm's cache
        # (array_cache.py), then mapped from there like any other tensor.
        first = next(p for p in parts if p[1] <= start < p[1] + p[2])
        identities = [(part, os.stat(part).st_size, os.stat(part).st_mtime_ns) for part, _, _ in parts]
        return cached_array(
            None,
            f"bytes {start}..{start + count} of the parts {identities}",
            (count,),
            np.uint8,
            lambda: self.read_bytes(start, count),
            source=(pathlib.Path(first[0]), start - first[1]),
        )

    def read_bytes(self, start: int, count: int) -> np.ndarray:
        """Bytes start .. start + count - 1 of the file, read with file I/O into new memory (uint8).

        `dequantize` reads this way rather than through the memory map: a page fault on a map
        brings the pages around it (up to megabytes of other tensors, with large page-cache
        folios) into the process's resident memory, where they stay while the map lives, so
        reading 109 small norm vectors through it made most of the file resident."""
        pieces = []
        for part, part_start, part_size in self._parts():
            low, high = max(start, part_start), min(start + count, part_start + part_size)
            if low < high:
                pieces.append(np.fromfile(part, dtype=np.uint8, count=high - low, offset=low - part_start))
        data = pieces[0] if len(pieces) == 1 else np.concatenate(pieces or [np.zeros(0, np.uint8)])
        if data.size != count:
            raise CheckpointError(f"{self.path} is truncated: {count} bytes at byte {start} could not be read")
        return data

    def _parts(self) -> list[tuple[str, int, int]]:
        """(file, first byte, size) of each file that holds the bytes: one, or the parts."""
        if isinstance(self._data, PartedBytes):
            return [(m.filename, int(s), len(m)) for m, s in zip(self._data.maps, self._data.starts, strict=False)]
        return [(str(self.path), 0, len(self._data))]


class StringArray(collections.abc.Sequence):
    """A GGUF array of strings left in the file's bytes until first read (then decoded at once):
    its length is known from the header; `decode()` is the list of strings."""

    def __init__(self, data: np.ndarray, path: pathlib.Path, start: int, count: int, key: str):
        self._data, self._path, self._start, self._count, self._key = data, path, start, count, key
        self._strings = None

    def decode(self) -> list[str]:
        if self._strings is None:
            header = _Header(self._data, self._path)
            header.pos = self._start
            self._strings = header.strings(self._count, self._key)
        return self._strings

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        return self.decode()[index]

    def __repr__(self) -> str:
        return f"StringArray({self._key!r}, {self._count} strings)"


class PartedBytes:
    """The bytes of one file stored as several parts (the shipped model: four PyPI packages), read
    in place: one memory map per part, no joined copy on disk.

    data[a:b] is a view into one part's map when the range lies in that part (every tensor but a
    few), and a new array joining the pieces when it crosses a boundary between parts.

        parts  |--- part 0 ---|--- part 1 ---|-- part 2 --|
        bytes  0             p1             p2          len
    """

    def __init__(self, maps: list[np.ndarray]):
        self.maps = maps
        self.starts = np.cumsum([0] + [len(m) for m in maps])  # (parts + 1,) where each part begins

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise TypeError("PartedBytes takes contiguous slices only")
        stop = max(start, stop)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1  # the part holding byte `start`
        first = min(first, len(self.maps) - 1)
        if stop <= self.starts[first + 1]:  # within one part: a view, no copy
            return self.maps[first][start - self.starts[first] : stop - self.starts[first]]
        pieces, part = [], first
        while start < stop:
            end = min(stop, int(self.starts[part + 1]))
            pieces.append(self.maps[part][start - self.starts[part] : end - self.starts[part]])
            start, part = end, part + 1
        return np.concatenate(pieces)


def read_gguf(path: str | os.PathLike | list) -> GGUFFile:
    """Open a GGUF file: parse its header (metadata and tensor table) and memory-map the rest.

    path: the file, or the list of its parts in order (a file split into byte ranges, as the
    shipped model's part packages hold it), read in place through `PartedBytes`.

    Raises CheckpointNotFoundError if there is no such file, CheckpointError (naming the file and
    what is wrong) if it is not a GGUF, is truncated, declares sizes its bytes cannot hold, or is
    otherwise unreadable. Nothing is allocated from a declared count before the bytes it needs
    are known to be in the file.
    """
    paths = [pathlib.Path(p) for p in path] if isinstance(path, (list, tuple)) else [pathlib.Path(path)]
    if not paths:
        raise CheckpointNotFoundError("read_gguf: an empty list of parts")
    for part in paths:
        if not part.is_file():
            raise CheckpointNotFoundError(f"GGUF file not found: {part}")
    maps = [np.memmap(p, dtype=np.uint8, mode="r") if p.stat().st_size else np.zeros(0, np.uint8) for p in paths]
    path = paths[0]
    data = maps[0] if len(maps) == 1 else PartedBytes(maps)
    magic = bytes(data[:4])
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    for count in range(1, len(maps) + 1):  # the header from the first part, or from more if it is longer
        try:
            version, metadata, entries, data_start = _parse_header(
                maps[0] if count == 1 else np.concatenate(maps[:count]), path
            )
            break
        except CheckpointError:
            if count == len(maps):
                raise
    tensors = {}
    for name, shape, type_name, offset in entries:
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} is listed twice")
        values_per_block, bytes_per_block = GGML_BLOCKS[type_name]
        if shape[-1] % values_per_block:
            raise CheckpointError(
                f"{path}: tensor {name!r} of type {type_name} has rows of {shape[-1]} values, "
                f"not a multiple of its block of {values_per_block}"
            )
        n_bytes = math.prod(shape) // values_per_block * bytes_per_block
        start = data_start + offset
        if offset % metadata.get("general.alignment", 32) or start + n_bytes > len(data):
            raise CheckpointError(
                f"{path} is truncated or corrupt: tensor {name!r} ends at byte {start + n_bytes} "
                f"(offset {offset}) but the file has {len(data)} bytes"
            )
        tensors[name] = TensorInfo(name=name, shape=shape, type_name=type_name, n_bytes=n_bytes, offset=start)
    return GGUFFile(path, version, metadata, tensors, data=data if len(maps) > 1 else None)


def _parse_header(data: np.ndarray, path: pathlib.Path):
    """(version, metadata, tensor entries, where the tensor data starts) from the bytes of a header."""
    header = _Header(data, path)
    version = header.scalar(4)
    if version not in (2, 3):
        if version & 0xFFFF == 0 and version >> 24 in (2, 3):
            raise CheckpointError(f"{path} is a big-endian GGUF file, which minilm does not read")
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (minilm reads versions 2 and 3)")
    tensor_count, kv_count = header.scalar(10), header.scalar(10)
    header.check_count(kv_count, 13, "metadata keys")  # a key is at least 13 bytes
    header.check_count(tensor_count, 29, "tensors")  # a tensor entry is at least 29 bytes
    metadata = {}
    for _ in range(kv_count):
        key = header.string()
        metadata[key] = header.value(header.scalar(4), key)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise CheckpointError(f"{path}: general.alignment={alignment!r} must be a positive multiple of 8")
    entries = [header.tensor_entry() for _ in range(tensor_count)]
    data_start = -(-header.pos // alignment) * alignment
    return version, metadata, entries, data_start


class _Header:
    """A cursor over the header bytes; every read checks that the bytes are there."""

    def __init__(self, data: np.ndarray, path: pathlib.Path):
        self.data, self.path, self.pos = data, path, 4

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CheckpointError(
                f"{self.path} is truncated or corrupt: its header needs {n} bytes at byte "
                f"{self.pos}, but the file has {len(self.data)} bytes"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def check_count(self, count: int, min_bytes_each: int, what: str) -> None:
        if count * min_bytes_each > len(self.data) - self.pos:
            raise CheckpointError(
                f"{self.path} is corrupt: it declares {count} {what}, more than its {len(self.data)} bytes can hold"
            )

    def scalar(self, value_type: int):
        fmt, size = _SCALARS[value_type]
        return struct.unpack(fmt, self.take(size).tobytes())[0]

    def string(self) -> str:
        raw = self.take(self.scalar(10)).tobytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CheckpointError(
                f"{self.path}: a string at byte {self.pos - len(raw)} is not UTF-8: {error}"
            ) from None

    def value(self, value_type: int, key: str):
        if value_type in _SCALARS:
            return self.scalar(value_type)
        if value_type == STRING:
            return self.string()
        if value_type != ARRAY:
            raise CheckpointError(f"{self.path}: metadata {key!r} has unknown value type {value_type}")
        item_type, count = self.scalar(4), self.scalar(10)
        if item_type in _NUMPY:  # numbers: one read, one conversion
            dtype = np.dtype(_NUMPY[item_type])
            self.check_count(count, dtype.itemsize, f"values in {key!r}")
            return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
        if item_type == STRING:  # e.g. 262 144 vocabulary entries: a tight loop, no per-item arrays
            self.check_count(count, 8, f"strings in {key!r}")
            if count > LAZY_STRINGS:  # stepped over now, decoded when first read
                start = self.pos
                self.skip_strings(count, key)
                return StringArray(self.data, self.path, start, count, key)
            return self.strings(count, key)
        if item_type == ARRAY:
            self.check_count(count, 12, f"arrays in {key!r}")
            return [self.value(ARRAY, key) for _ in range(count)]
        raise CheckpointError(f"{self.path}: metadata {key!r} is an array of unknown type {item_type}")

    def skip_strings(self, count: int, key: str) -> None:
        """Step over `count` strings (their lengths only), checking that they are in the file."""
        view, pos, end, unpack = memoryview(self.data), self.pos, len(self.data), _U64.unpack_from
        for index in range(count):
            if pos + 8 > end:
                raise CheckpointError(
                    f"{self.path} is truncated or corrupt: metadata {key!r} declares {count} strings "
                    f"but the file ends after {index}"
                )
            pos += 8 + unpack(view, pos)[0]
        if pos > end:
            raise CheckpointError(
                f"{self.path} is truncated or corrupt: metadata {key!r} declares {count} strings "
                f"but the file ends in the last one"
            )
        self.pos = pos

    def strings(self, count: int, key: str) -> list[str]:
        buffer, pos, end, out = self.data, self.pos, len(self.data), []
        view = memoryview(buffer)
        for _ in range(count):
            if pos + 8 > end:
                break
            (length,) = struct.unpack_from("<Q", view, pos)
            if pos + 8 + length > end:
                break
            try:
                out.append(bytes(view[pos + 8 : pos + 8 + length]).decode("utf-8"))
            except UnicodeDecodeError as error:
                raise CheckpointError(
                    f"{self.path}: string {len(out)} of metadata {key!r} is not UTF-8: {error}"
                ) from None
            pos += 8 + length
        else:
            self.pos = pos
            return out
        raise CheckpointError(
            f"{self.path} is truncated or corrupt: metadata {key!r} declares {count} strings "
            f"but the file ends after {len(out)}"
        )

    def tensor_entry(self) -> tuple[str, tuple[int, ...], str, int]:
        name = self.string()
        n_dims = self.scalar(4)
        if not 1 <= n_dims <= MAX_DIMS:
            raise CheckpointError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        ne = [self.scalar(10) for _ in range(n_dims)]
        type_id, offset = self.scalar(4), self.scalar(10)
        if type_id not in GGML_TYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has ggml type id {type_id}, which minilm does not know"
            )
        if min(ne) < 1 or math.prod(ne) > len(self.data) * 8:  # no ggml type packs 8 values in a byte
            raise CheckpointError(f"{self.path}: tensor {name!r} has impossible dimensions {ne}")
        return name, tuple(int(n) for n in reversed(ne)), GGML_TYPES[type_id], offset


# --------------------------------------------------------------------------------------------
# Config from metadata
# --------------------------------------------------------------------------------------------


def gguf_architecture(meta: dict) -> str:
    """`general.architecture`, e.g. "gemma3", "llama", "qwen3moe"."""
    if "general.architecture" not in meta:
        raise CheckpointError("GGUF metadata has no 'general.architecture' key")
    return meta["general.architecture"]


def _require(meta: dict, key: str):
    if key not in meta:
        raise CheckpointError(f"GGUF metadata has no {key!r} key, needed for the config")
    return meta[key]


GEMMA3_SLIDING_WINDOW_PATTERN = 6  # 5 sliding-window layers, then 1 global layer
GEMMA3_ROPE_LOCAL_BASE_FREQ = 10_000.0  # not stored in GGUF; llama.cpp hard-codes it too


def gemma3_layer_types(num_layers: int, pattern: int = GEMMA3_SLIDING_WINDOW_PATTERN) -> list[str]:
    """["sliding_attention"] * 5 + ["full_attention"], repeated: layer i is global if (i + 1) % 6 == 0."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


def gemma3_config_from_gguf(meta: dict, tensor_names: list[str] | None = None) -> dict:
    """A Hugging Face `Gemma3TextConfig` dict (HF field names) from GGUF metadata.

    Equal, field by field, to what transformers' GGUF loader builds (5.x), except that transformers
    puts both RoPE bases in `rope_parameters` ({"sliding_attention": 10000, "full_attention":
    rope_theta}) where this returns `rope_theta` and `rope_local_base_freq`.

    Not in the file, so filled with Gemma 3 values (as transformers and llama.cpp do):
      - rope_local_base_freq = 10000, the 5-sliding-then-1-global `layer_types` pattern;
      - query_pre_attn_scalar = head_dim (true for every size but 27B, where llama.cpp uses
        hidden_size / num_heads and transformers' class default 256 is also wrong);
      - no soft-caps unless the file has `<arch>.final_logit_softcapping` /
        `<arch>.attn_logit_softcapping` (Gemma 2 files do, Gemma 3 files do not).
    `rms_norm_eps` is the file's float32 1e-6, i.e. 9.999999974752427e-07, as in transformers.
    `tie_word_embeddings` is True unless `tensor_names` (if given) contains "output.weight".
    """
    arch = gguf_architecture(meta)
    if arch != "gemma3":
        raise UnknownArchitectureError(f"expected a gemma3 GGUF, got general.architecture={arch!r}")

    def key(name):
        return _require(meta, f"{arch}.{name}")

    head_dim = key("attention.key_length")
    value_dim = meta.get(f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise CheckpointError(f"Gemma 3 needs key_length == value_length, got {head_dim} and {value_dim}")
    num_layers = key("block_count")
    vocab_size = meta.get(f"{arch}.vocab_size", len(_require(meta, "tokenizer.ggml.tokens")))
    return {
        "model_type": "gemma3_text",
        "vocab_size": vocab_size,
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": num_layers,
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": key("attention.head_count_kv"),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": float(key("rope.freq_base")),
        "rope_local_base_freq": GEMMA3_ROPE_LOCAL_BASE_FREQ,
        "rope_scaling": None,
        "sliding_window": key("attention.sliding_window"),
        "max_position_embeddings": key("context_length"),
        "query_pre_attn_scalar": head_dim,
        "layer_types": gemma3_layer_types(num_layers),
        "final_logit_softcapping": meta.get(f"{arch}.final_logit_softcapping"),
        "attn_logit_softcapping": meta.get(f"{arch}.attn_logit_softcapping"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "unk_token_id": meta.get("tokenizer.ggml.unknown_token_id"),
        "tie_word_embeddings": tensor_names is None or "output.weight" not in tensor_names,
    }


# --------------------------------------------------------------------------------------------
# Gemma 3 weights: GGUF names -> Gemma3ForCausalLM names, and the norm +1 undone
# --------------------------------------------------------------------------------------------

# llama.cpp leaf name -> Hugging Face leaf name, inside `blk.N.` / `model.layers.N.`
GEMMA3_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gemma3_tensor_name_map(num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face Gemma3ForCausalLM name, for every tensor a Gemma 3 GGUF
    may hold (`output.weight` only exists when the embeddings are not tied)."""
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    for layer in range(num_layers):
        for gguf_leaf, hf_leaf in GEMMA3_LAYER_NAMES.items():
            names[f"blk.{layer}.{gguf_leaf}.weight"] = f"model.layers.{layer}.{hf_leaf}.weight"
    return names


def is_gemma_norm(gguf_name: str) -> bool:
    """Every RMSNorm weight (attn/ffn/post/q/k/output norms): stored by llama.cpp as `w + 1`."""
    return gguf_name.endswith("norm.weight")


class GGUFTensor:
    """One tensor of a GGUF file, under its Hugging Face name, dequantized when it is read
    (`np.asarray(tensor)`), minus `offset` (Gemma's norms). A loader that copies the tensors into
    the model one by one so holds one float32 tensor at a time, never the whole model twice."""

    dtype = np.dtype(np.float32)

    def __init__(self, gguf_file: GGUFFile, name: str, offset: float = 0.0):
        self.gguf_file, self.name, self.offset = gguf_file, name, offset

    @property
    def shape(self) -> tuple[int, ...]:
        return self.gguf_file.tensor_info(self.name).shape

    @property
    def ggml_type(self) -> str:
        return self.gguf_file.tensor_info(self.name).type_name

    def quantized(self) -> QuantizedWeight | None:
        """The tensor as a `QuantizedWeight` (its blocks, memory-mapped, not copied) when it is a
        block-quantized matrix stored as is (no offset); None for plain floats, norms, vectors."""
        info = self.gguf_file.tensor_info(self.name)
        if self.offset or len(info.shape) != 2 or BLOCK_LAYOUT.get(info.type_name, (1, 0))[0] == 1:
            return None
        return QuantizedWeight(self.gguf_file.raw(self.name), info.type_name, info.shape)

    def __array__(self, dtype=None, copy=None):
        weight = self.read_into(np.empty(self.shape, np.float32))  # float32, a new array
        return weight if dtype is None else weight.astype(dtype, copy=False)

    def read_into(self, out: np.ndarray) -> np.ndarray:
        """Dequantize into `out` (float32, C-contiguous, this tensor's shape): a loader that owns the
        storage never holds the float32 tensor twice (the 262k x 640 embedding is 671 MB)."""
        self.gguf_file.dequantize(self.name, out=out)
        if self.offset:
            out -= np.float32(self.offset)
        return out

    def __repr__(self) -> str:
        info = self.gguf_file.tensor_info(self.name)
        return f"GGUFTensor({self.name!r}, shape={info.shape}, {info.type_name})"


def gemma3_tensors_from_gguf(gguf_file: GGUFFile) -> dict[str, GGUFTensor]:
    """Every tensor of a Gemma 3 GGUF under its Hugging Face name, dequantized when read.

    Norm weights get 1 subtracted (llama.cpp stored `1 + w`; Gemma's RMSNorm multiplies by
    `1 + w` itself), exactly as transformers' GGUF loader does. Raises CheckpointError naming
    any tensor that is unexpected or missing.
    """
    config = gemma3_config_from_gguf(gguf_file.lazy_metadata, gguf_file.tensor_names)
    name_map = gemma3_tensor_name_map(config["num_hidden_layers"])

    unexpected = [name for name in gguf_file.tensor_names if name not in name_map]
    if unexpected:
        raise CheckpointError(f"{gguf_file.path}: tensors minilm does not know for Gemma 3: {unexpected[:10]}")
    optional = {"output.weight"}
    missing = [name for name in name_map if name not in optional and name not in gguf_file.tensor_names]
    if missing:
        raise CheckpointError(f"{gguf_file.path}: missing Gemma 3 tensors: {missing[:10]}")
    return {
        name_map[name]: GGUFTensor(gguf_file, name, offset=1.0 if is_gemma_norm(name) else 0.0)  # undo `w + 1`
        for name in gguf_file.tensor_names
    }


def gemma3_state_dict_from_gguf(gguf_file: GGUFFile, progress: bool = True) -> dict[str, np.ndarray]:
    """All tensors of a Gemma 3 GGUF as float32 arrays under Hugging Face names (all in memory)."""
    tensors = gemma3_tensors_from_gguf(gguf_file)
    return {
        name: np.asarray(tensor)
        for name, tensor in tqdm(tensors.items(), desc="Dequantizing GGUF", unit="tensor", disable=not progress)
    }


# --------------------------------------------------------------------------------------------
# One entry point per file: the Hugging Face config and tensors a GGUF file holds
# --------------------------------------------------------------------------------------------


def config_from_gguf(gguf_file: GGUFFile) -> dict:
    """The config.json dict of the model in `gguf_file` (Hugging Face field names)."""
    arch = gguf_architecture(gguf_file.lazy_metadata)
    if arch != "gemma3":
        raise UnknownArchitectureError(f"{gguf_file.path}: minilm reads GGUF weights of gemma3 only, not {arch!r}")
    return gemma3_config_from_gguf(gguf_file.lazy_metadata, gguf_file.tensor_names)


def tensors_from_gguf(gguf_file: GGUFFile) -> dict[str, GGUFTensor]:
    """Every tensor of `gguf_file` under its Hugging Face name in Hugging Face layout, dequantized
    to float32 when read."""
    arch = gguf_architecture(gguf_file.lazy_metadata)
    if arch != "gemma3":
        raise UnknownArchitectureError(f"{gguf_file.path}: minilm reads GGUF weights of gemma3 only, not {arch!r}")
    return gemma3_tensors_from_gguf(gguf_file)

"""Reading and writing Hugging Face checkpoints: `model.safetensors` and sharded folders.

The safetensors format is small enough to read by hand, which is what we do here: it lets us
memory-map every tensor, read bfloat16 (which NumPy lacks; `ml_dtypes` provides it) and give
an error naming the file and the tensor when something is truncated or corrupt.

    file = [8 bytes: header length N, little-endian u64]
           [N bytes: JSON {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}]
           [the tensors' bytes, offsets relative to the end of the header]
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import CheckpointError, CheckpointNotFoundError

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


def read_safetensors(path):
    """All tensors of one .safetensors file as read-only memory-mapped NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"no checkpoint file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(f"{path} is corrupt: header length {header_len} exceeds the file size {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is corrupt: unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    if not header:
        return {}
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        dtype, shape, begin, end = _tensor_entry(path, name, info)
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} is corrupt or truncated "
                f"(shape {shape} needs {expected} bytes, header gives {end - begin}, "
                f"file has {size - data_start - begin})"
            )
        tensors[name] = buffer[data_start + begin : data_start + end].view(dtype).reshape(shape)
    return tensors


def _tensor_entry(path, name, info):
    """(dtype, shape, begin, end) of one header entry, every field checked before it is used."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: the header entry of tensor {name!r} is not an object")
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(n) is int for n in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def write_safetensors(path, tensors, metadata=None):
    """Write {name: array} as a .safetensors file (tensors stored in name order, 8-byte aligned header)."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"cannot save tensor {name!r} of dtype {a.dtype}")
        header[name] = {
            "dtype": DTYPE_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    tmp.replace(path)


def read_checkpoint(folder):
    """Every tensor of a Hugging Face checkpoint folder: `model.safetensors`, or the shards
    listed in `model.safetensors.index.json`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint folder at {folder}")
    if (folder / SINGLE_FILE).is_file():
        return read_safetensors(folder / SINGLE_FILE)
    if (folder / SHARD_INDEX).is_file():
        try:
            weight_map = json.loads((folder / SHARD_INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder / SHARD_INDEX} is not a valid shard index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{folder / SHARD_INDEX}: weight_map must map tensor names to shard file names")
        outside = [v for v in set(weight_map.values()) if Path(v).name != v]
        if outside:  # a shard is a file of this folder: never a path that leads elsewhere
            raise CheckpointError(f"{folder / SHARD_INDEX} names shards outside the folder: {sorted(outside)[:3]}")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(folder / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{SHARD_INDEX} lists tensors that no shard holds: {missing[:5]}")
        return tensors
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(others) == 1:
        return read_safetensors(folder / others[0])
    raise CheckpointNotFoundError(
        f"{folder} holds neither {SINGLE_FILE} nor {SHARD_INDEX}"
        + (
            " (PyTorch .bin checkpoints are not supported: convert them to safetensors)"
            if list(folder.glob("*.bin"))
            else ""
        )
    )


def write_checkpoint(folder, tensors, max_shard_bytes=None):
    """Write tensors as `model.safetensors`, or as shards + index when larger than max_shard_bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(np.asarray(t).nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        write_safetensors(folder / SINGLE_FILE, tensors)
        return
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = np.asarray(tensors[name]).nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file_name, shard)
        weight_map.update({name: file_name for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SHARD_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

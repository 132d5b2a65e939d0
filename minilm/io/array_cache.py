"""Arrays a backend derives from a model file's bytes at load, cached next to the model.

A kernel that computes from a GGUF weight may first turn its blocks into another layout (the
Numba backend unpacks Q5_0's five-bit codes into int8 and reads every block's float16 scale into
float32). That costs about a second for the 270M, on every run. `cached_array` does it once: the
result is saved as a `.npy` file and later runs map it (`np.load(mmap_mode="r")`), so a warm start
touches neither the blocks nor the result until a kernel reads them.

    $MINILM_CACHE/prepared/<key>.npy     (MINILM_CACHE defaults to ~/.cache/minilm)

The key is a hash of the source file's identity (resolved path, size, modification time), where
the array's bytes lie in it, the shape and dtype asked for, and `recipe` (what was computed, by
which version of the code): a changed file or a changed recipe is a new key. Files are written
atomically (temporary file, fsync, `os.replace`); a file that does not read back with the expected
shape and dtype (truncated, corrupt, another version's) is computed again and rewritten.
"""

from __future__ import annotations

import hashlib
import mmap
import pathlib

import numpy as np

from .default_model import minilm_cache_dir, write_cache_file


def source_of(array: np.ndarray) -> tuple[pathlib.Path, int] | None:
    """(file, byte offset) of the bytes of `array` when it is a view into a memory-mapped file
    (`np.memmap`); None for memory of its own (then nothing is cached)."""
    base = array
    while isinstance(base, np.ndarray):
        if isinstance(base, np.memmap) and isinstance(base.base, mmap.mmap) and base.filename:
            return pathlib.Path(base.filename), array.ctypes.data - base.ctypes.data + base.offset
        base = base.base
    return None


def cache_path(source: tuple[pathlib.Path, int], recipe: str, shape: tuple[int, ...], dtype) -> pathlib.Path:
    """Where the array computed by `recipe` from the bytes at `source` is cached (module doc)."""
    path, offset = source
    resolved = path.resolve()
    stat = resolved.stat()
    identity = (
        f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}\0{offset}\0{tuple(shape)}\0{np.dtype(dtype).str}\0{recipe}"
    )
    return minilm_cache_dir() / "prepared" / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.npy"


def cached_array(source_array, recipe: str, shape: tuple[int, ...], dtype, compute, source=None) -> np.ndarray:
    """`compute()` (an array of `shape` and `dtype` derived from `source_array`), read from the cache
    when a previous run saved it (memory-mapped, read-only), else computed and saved.

    source: (file, byte offset) the result derives from, when `source_array` does not say it
    (default: `source_of(source_array)`). Not cached (computed every time) when neither names a
    file, or the cache cannot be written (a warning says why)."""
    source = source or source_of(source_array)
    if source is None:
        return compute()
    path = cache_path(source, recipe, shape, dtype)
    cached = _read(path, shape, dtype)
    if cached is not None:
        return cached
    array = compute()
    save = lambda file: np.save(file, np.ascontiguousarray(array), allow_pickle=False)  # noqa: E731
    write_cache_file(path, save, "a prepared weight")
    return array


def _read(path: pathlib.Path, shape, dtype) -> np.ndarray | None:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):  # absent, truncated, not a .npy file
        return None
    if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        return None
    return array

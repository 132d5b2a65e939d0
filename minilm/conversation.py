"""A conversation that keeps its KV cache between turns: each turn runs only its own new tokens.

    turn 1   [bos user-1 ... model-prefix] -> prefill all, decode reply-1
    turn 2   [closing-1 user-2 ... model-prefix] -> prefill only these, decode reply-2
             (the keys/values of turn 1 and reply-1 come from the cache)

The conversation is kept as token ids: the ids fed to the model and the ids it generated, in
order. `ids` is always what re-running the conversation from scratch would read, so a turn with
the cache gives exactly the tokens a full recomputation of `ids` gives (greedy; tested). Replies
are kept as generated, not re-tokenized from their text (as llama.cpp's llama-cli keeps them).

Invariant between turns: the cache holds the keys/values of `ids[:fed]`; the ids after `fed`
(at most the last generated token) are run at the start of the next turn. Sliding-window layers
keep a ring buffer of their window (`SlidingWindowCache`); a conversation longer than the window
simply wraps it, exactly as a long single prompt does.

Stopping a reply early (the caller no longer asking for tokens: Ctrl-C between two tokens, a
stop string) keeps the tokens already generated, those that spelled the stop string included.
An exception in the middle of a forward pass (a second Ctrl-C, an error) may leave some layers
updated and others not, and a ring buffer cannot be rolled back: the cache is then dropped and
the next turn runs the whole of `ids` again (same result, slower).

A chat turn's text comes from the chat template: `text_after_reply` renders the conversation with
a placeholder in place of the last reply and keeps what the template writes after it (for Gemma
`<end_of_turn>\\n<start_of_turn>user\\n...<start_of_turn>model\\n`). The token that ended a reply
(`<end_of_turn>`, EOS) is not kept: the template's own closing text follows the reply instead.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .generation import generate_tokens

# Stands in for the last reply when rendering a chat; never a real model output.
REPLY_PLACEHOLDER = "\u2063minilm-reply-placeholder\u2063"


class Conversation:
    """Token ids of a conversation with one model, and the KV cache that holds them.

    conversation = Conversation(model)
    for token in conversation.generate(prompt_ids, max_new_tokens=20): ...   # turn 1
    for token in conversation.generate(next_turn_ids, max_new_tokens=20): ...  # only these are prefilled
    conversation.reset()                                                      # forget everything
    """

    def __init__(self, model):
        self.model = model
        self.reset()

    def reset(self):
        """Forget the conversation: no ids, no cache."""
        self.ids = []  # every token of the conversation, fed or generated, in order
        self.cache = None  # holds the keys/values of ids[: self.fed]
        self.fed = 0

    def __len__(self):
        return len(self.ids)

    def generate(self, new_ids, *, stop_ids=(), **options):
        """Append `new_ids` (a turn: list of ints) and yield the reply's token ids one by one (ints).

        options: `generation.generate_tokens`'s sampling options (max_new_tokens, do_sample, ...,
        eos_token_id). Only the ids the cache lacks go through the model. A reply that ends with
        one of `stop_ids` (e.g. EOS, `<end_of_turn>`) yields it, but the conversation does not keep
        it. Stopping early keeps what was yielded. The turn is added to `ids` when this is called."""
        new_ids = [int(i) for i in new_ids]
        if not new_ids and not self.ids:
            raise InputError("a conversation starts with at least one token")
        self.ids.extend(new_ids)
        state = {}
        past = self.cache if self.cache is not None and 0 < self.fed < len(self.ids) else None
        if past is None:
            self.cache, self.fed = None, 0  # run everything (the first turn, or after a dropped cache)
        tokens = generate_tokens(
            self.model, np.array([self.ids], dtype=np.int64), past_key_values=past, state=state, **options
        )
        return self._follow(tokens, state, set(stop_ids))

    def _follow(self, tokens, state, stop_ids):
        """Yield the tokens of `tokens`, keeping ids, cache and `fed` in step with them."""
        while True:
            try:
                column = next(tokens, None)
            except BaseException:  # maybe mid-forward (Ctrl-C, an error): some layers updated, others not
                self.cache, self.fed = None, 0  # the next turn runs all of self.ids again
                raise
            if column is None:
                return
            self.cache, self.fed = state["past_key_values"], state["fed"]
            token = int(column[0])
            if token not in stop_ids:  # the token that ends a reply is not kept (it is never fed)
                self.ids.append(token)
            yield token


def text_after_reply(render, messages):
    """The text a chat template writes after the last assistant reply, up to the generation prompt.

    render(messages) -> the rendered conversation, ending with the generation prompt.
    messages: the conversation, whose second-to-last entry is the reply (its content unused) and
    whose last entry is the new user message.
    Returns (text, prefix): `prefix` is what the template writes before the reply, to check against
    what the earlier turns produced; the caller re-runs the whole conversation when they differ."""
    if len(messages) < 2 or messages[-2].get("role") != "assistant":
        raise InputError("text_after_reply needs [..., assistant reply, new message]")
    with_placeholder = [*messages[:-2], {**messages[-2], "content": REPLY_PLACEHOLDER}, messages[-1]]
    rendered = render(with_placeholder)
    if rendered.count(REPLY_PLACEHOLDER) != 1:
        return None, None  # the template drops or repeats replies: no text to append
    prefix, text = rendered.split(REPLY_PLACEHOLDER)
    return text, prefix

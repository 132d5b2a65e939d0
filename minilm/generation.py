"""Autoregressive generation: run the prompt once, then one token at a time against the KV cache.

    logits of the last position -> processors (repetition penalty, temperature, top-k, top-p,
    min-p) -> greedy argmax or a sample -> append -> repeat until max_new_tokens or EOS.

Batches are left-padded: every row's last prompt token sits in the last column, so one new
column is appended per step. Positions come from the attention mask (cumsum - 1), so padding
shifts nothing.
"""

from __future__ import annotations

import numpy as np

from . import nn, ops
from .errors import InputError, NumericalError

# ---------------------------------------------------------------------------------------------
# Logits processors: (batch, vocab_size) float32 -> (batch, vocab_size)
# ---------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits, generated_ids, penalty):
    """CTRL's penalty: logits of tokens already present are divided by `penalty` if positive,
    multiplied by it if negative. generated_ids: (batch, seq) prompt + new ids."""
    logits = logits.copy()
    for row, ids in enumerate(generated_ids):
        seen = np.unique(ids)
        scores = logits[row, seen]
        logits[row, seen] = np.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def apply_top_k(logits, k):
    """Keep the k largest logits per row; the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]  # (batch, 1)
    return np.where(logits < kth, -np.inf, logits)


# How many of the most probable tokens top-p sorts first (more when their mass falls short of p).
NUCLEUS_CANDIDATES = 256


def apply_top_p(logits, p):
    """Nucleus sampling: keep the smallest set of most probable tokens whose probability reaches p
    (the most probable is always kept); the rest become -inf.

    Only the head of the distribution is sorted: the tokens at least as probable as the k-th most
    probable one (a partition, not a sort of the whole vocabulary), with k growing until the
    nucleus ends among them. Ties are ordered by token id, as a full stable sort orders them, so
    the kept set is exactly the one a sort of all vocab_size tokens gives."""
    if p >= 1.0:
        return logits
    probs = nn.softmax(logits, axis=-1)  # (batch, vocab_size)
    vocab = probs.shape[-1]
    drop = np.ones(probs.shape, dtype=bool)
    for row, row_probs in enumerate(probs):
        k = min(NUCLEUS_CANDIDATES, vocab)
        while True:
            kth = np.partition(row_probs, vocab - k)[vocab - k]  # the k-th largest probability
            candidates = np.flatnonzero(row_probs >= kth)  # ties at the edge included: a prefix of the full order
            order = candidates[np.argsort(-row_probs[candidates], kind="stable")]  # most probable first
            sorted_probs = row_probs[order]
            beyond = np.cumsum(sorted_probs) - sorted_probs >= p  # tokens past the nucleus
            if beyond.any() or k == vocab:
                break
            k = min(4 * k, vocab)
        drop[row, order[~beyond]] = False
    return np.where(drop, -np.inf, logits)


def apply_min_p(logits, min_p):
    """Keep tokens whose probability is at least min_p times the most likely token's."""
    if min_p <= 0:
        return logits
    probs = nn.softmax(logits, axis=-1)
    return np.where(probs < min_p * probs.max(axis=-1, keepdims=True), -np.inf, logits)


def next_tokens(logits, generated_ids, *, do_sample, temperature, top_k, top_p, min_p, repetition_penalty, rng):
    """Choose one token per row. logits: (batch, vocab_size) -> (batch,) int64"""
    logits = logits.astype(np.float32, copy=False)  # the processors below never write into it
    if repetition_penalty is not None and repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, generated_ids, repetition_penalty)
    if not do_sample:
        return np.argmax(logits, axis=-1)  # greedy; ties go to the first maximum
    logits = logits / np.float32(temperature)
    if top_k:
        logits = apply_top_k(logits, top_k)
    if top_p is not None:
        logits = apply_top_p(logits, top_p)
    if min_p is not None:
        logits = apply_min_p(logits, min_p)
    probs = nn.softmax(logits.astype(np.float64), axis=-1)  # float64 so rows sum to 1 for the sampler
    return np.array([rng.choice(probs.shape[-1], p=row / row.sum()) for row in probs], dtype=np.int64)


def check_sampling_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty):
    """InputError naming the option when a value is impossible (NaN included)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not _is_number(temperature) or not 0 < temperature < np.inf:
        raise InputError(f"temperature must be a finite number > 0 (greedy: do_sample=False), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0):
        raise InputError(f"top_k must be an integer >= 0, got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None and (not _is_number(min_p) or not 0 <= min_p <= 1):
        raise InputError(f"min_p must be in [0, 1], got {min_p!r}")
    if repetition_penalty is not None and (not _is_number(repetition_penalty) or not 0 < repetition_penalty < np.inf):
        raise InputError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty!r}")


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_prompt_ids(input_ids):
    """The prompt as (batch, seq) int64: integers only (floats are refused, never truncated),
    at least one token per row."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must have shape (batch, seq); got shape {input_ids.shape}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids is empty (shape {input_ids.shape}): generation needs at least one prompt token")
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise InputError(f"input_ids must be integer token ids; got dtype {input_ids.dtype}")
    return input_ids.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def generate(
    model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens=20,
    do_sample=False,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    repetition_penalty=None,
    eos_token_id=None,
    pad_token_id=None,
    seed=None,
    prefill_inputs=None,
):
    """Generate up to `max_new_tokens` tokens after a (left-padded) batch of prompts.

    input_ids: (batch, seq); attention_mask: (batch, seq) with 0 on the left padding.
    Returns (batch, seq + new) int64: prompt + new ids, transformers' convention. A row that
    emits an EOS token continues with pad_token_id until every row is done.
    prefill_inputs: extra arguments of the forward pass that runs the prompt, and only of that one
    (Gemma 3's pixel_values and token_type_ids: images are read once, then the KV cache holds them).
    """
    input_ids = check_prompt_ids(input_ids)
    columns = [input_ids]
    for tokens in generate_tokens(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        seed=seed,
        prefill_inputs=prefill_inputs,
    ):
        columns.append(tokens[:, None])
    return np.concatenate(columns, axis=1)


def generate_tokens(
    model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens=20,
    do_sample=False,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    repetition_penalty=None,
    eos_token_id=None,
    pad_token_id=None,
    seed=None,
    past_key_values=None,
    state=None,
    prefill_inputs=None,
):
    """The generation loop as an iterator: yields each new column of tokens, (batch,) int64.

    Step 0 runs the whole prompt and fills the KV cache; every later step feeds only the token
    just chosen. Stopping early (stop strings, streaming) is just not asking for the next one.

    past_key_values: a KV cache that already holds the first `past` positions of input_ids (a
      conversation so far, transformers' convention): step 0 then runs only input_ids[:, past:].
    state: a dict the loop keeps up to date after every forward pass: "past_key_values" (the
      cache, which now holds every id fed so far) and "fed" (how many positions that is). The
      token just yielded is not fed yet: the cache always ends one token short of the sequence.
    prefill_inputs: extra arguments of the forward pass that runs the prompt, and only of that one
      (Gemma 3's pixel_values and token_type_ids: images are read once, then the KV cache holds them).
    """
    input_ids = check_prompt_ids(input_ids)
    check_sampling_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
    cfg = model.config
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    attention_mask = np.asarray(attention_mask).astype(np.int64)
    if attention_mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask shape {attention_mask.shape} does not match input_ids shape {input_ids.shape}"
        )
    if (attention_mask[:, -1] == 0).any():
        raise InputError("generation needs LEFT padding: the last column of attention_mask must be all ones")
    eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
    eos = set(np.atleast_1d(eos).tolist()) if eos is not None else set()
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    pad = pad if pad is not None else (min(eos) if eos else 0)
    rng = np.random.default_rng(seed)

    sequences = input_ids.astype(np.int64)  # (batch, seq + generated so far), for the repetition penalty
    done = np.zeros(len(sequences), dtype=bool)
    cache, step_ids = past_key_values, sequences
    decoder = None  # a backend's compiled decode step, once the prompt has filled the cache
    if cache is not None:  # continue a conversation: only the positions the cache lacks go through the model
        past = cache.get_seq_length()
        if not 0 <= past < sequences.shape[1]:
            raise InputError(
                f"past_key_values holds {past} positions but input_ids has {sequences.shape[1]}: the cache must "
                "hold a prefix of input_ids and leave at least one new token to run"
            )
        step_ids = sequences[:, past:]  # (batch, seq - past)
    for step in range(max_new_tokens):
        if decoder is None and cache is not None and model.cache_is_stale(cache, sequences.shape[1]):
            cache, step_ids = None, sequences  # re-run everything (Phi-3 longrope crossing its original length)
        if cache is None or step == 0:  # positions from the mask, so left padding shifts nothing
            positions = nn.position_ids_from_attention_mask(attention_mask)[:, -step_ids.shape[1] :]  # (batch, seq)
        else:  # one new token per row, never padding: the position after the previous one
            positions = positions[:, -1:] + 1  # (batch, 1), without a cumsum over the whole mask
        if decoder is not None:  # the backend's compiled decode step: the same logits, fewer calls
            logits = ops.to_host(decoder.step(step_ids[:, 0], int(positions[0, 0])))  # (batch, vocab_size)
        else:
            prefill = {k: v for k, v in (prefill_inputs or {}).items() if v is not None} if cache is None else {}
            out = model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **prefill,  # the prompt's images (Gemma 3), in the first step only
            )
            cache = out.past_key_values
            if state is not None:
                state.update(past_key_values=cache, fed=sequences.shape[1])
            logits = ops.to_host(out.logits[:, -1])  # (batch, vocab_size)
            if step == 0 and state is None and max_new_tokens > 1:  # a conversation keeps the readable cache
                decoder = ops.compiled_decoder(model, cache, attention_mask, sequences.shape[1] + max_new_tokens)
        if not np.isfinite(logits).all():
            raise NumericalError(
                f"the model produced NaN or infinite logits (dtype {logits.dtype}); a float16 model whose "
                "activations overflow does this: load it with dtype='float32' or 'bfloat16'"
            )
        tokens = next_tokens(
            logits,
            sequences,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            rng=rng,
        )
        tokens = np.where(done, pad, tokens)  # (batch,)
        sequences = np.concatenate([sequences, tokens[:, None]], axis=1)
        attention_mask = np.concatenate([attention_mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        yield tokens
        done |= np.isin(tokens, list(eos))
        if done.all():
            return
        step_ids = tokens[:, None]  # (batch, 1): only the new token goes through the model next

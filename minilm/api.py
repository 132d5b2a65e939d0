"""`minilm.generate("The capital of France is")`: text in, text out, with the shipped model.

Text -> tokenizer -> ids (left-padded for a batch) -> `generation.generate_tokens` -> ids ->
text. Streaming decodes incrementally and holds back bytes of a character that is not complete
yet, so multi-byte characters (emoji, CJK) are never split.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np

from . import ops
from .errors import InputError
from .generation import generate_tokens
from .io.chat_templates import chat_template_for
from .io.default_model import default_model_parts
from .io.image_processor import GEMMA3_CHAT_TEMPLATE, Gemma3ImageProcessor, Gemma3Processor
from .io.load import from_pretrained, resolve_handle
from .io.tokenizer import Tokenizer

_LOADED = {}  # (model path, dtype, backend) -> (model, tokenizer), so repeated calls load once


def _generate_backend():
    """The backend `generate` runs on: the one the program chose (`minilm.set_backend`,
    `ops.use_backend`, $MINILM_BACKEND), else `ops.FAST_CPU_BACKEND`."""
    return ops.get_backend() if ops.backend_is_chosen() else ops.FAST_CPU_BACKEND


def resolve_model(model):
    """None (the default model) or the local path a model argument names: a path, or `hf://owner/name`
    looked up in the local Hugging Face cache. `Path("hf://a/b")` would collapse the `//`, so every
    entry point resolves the handle with this before making a Path of it."""
    return None if model is None else resolve_handle(model)


def load(model=None, dtype="float32", backend=None):
    """(model, tokenizer) for a GGUF file, a Hugging Face folder, or None for the default model,
    its weights prepared for `backend` (`ops.prepare_weight`; default: the one `generate` runs on)."""
    backend = backend or _generate_backend()
    # a path (hf://owner/name resolved), or the shipped model's part files, read in place
    path = resolve_model(model) if model is not None else default_model_parts()
    key = (str(path), str(dtype), backend, os.environ.get("MINILM_KEEP_QUANTIZED"))
    if key not in _LOADED:
        with ops.use_backend(backend):  # the weights take the form this backend reads
            loaded = from_pretrained(path, dtype=dtype)
        tokenizer = getattr(loaded, "tokenizer", None)
        if tokenizer is None:
            tokenizer = Tokenizer.from_file(path)
        _LOADED[key] = (loaded, tokenizer)
    return _LOADED[key]


def generate(
    prompt=None,
    *,
    messages=None,
    model=None,
    max_new_tokens=64,
    do_sample=None,
    temperature=None,
    top_k=None,
    top_p=None,
    min_p=None,
    repetition_penalty=None,
    seed=None,
    stop=None,
    stream=False,
    add_bos=True,
    dtype="float32",
    stats=None,
    chat_template=None,
    conversation=None,
    images=None,
):
    """Continue `prompt` (a string, or a list of strings for a batch) with a language model.

    model: path of a .gguf file or Hugging Face folder, or `hf://owner/name` from the local Hugging
      Face cache; None = the shipped Gemma 3 270M.
    messages: chat messages [{"role": "user", "content": ...}] rendered with the model's chat
      template (a list of such lists for a batch), instead of `prompt`. A Gemma checkpoint that
      stores no template gets the built-in Gemma turn format (a warning says so, once);
      chat_template= overrides both.
    Sampling: greedy unless do_sample=True or a temperature > 0 / top_k / top_p / min_p is given.
      temperature=0 means greedy (top_k / top_p / min_p are then unused); do_sample=True with
      temperature=0 is refused (InputError), since there is no distribution to sample from.
    stop: a string or list of strings; generation ends at the first one (it is not returned).
    stream=True returns an iterator of text pieces (single prompt only).
    stats: a dict to fill with backend, prompt_tokens, new_tokens, prefill_s, decode_tokens_per_s.
    conversation: a `minilm.Conversation` of the same model: `prompt` (one string: the text of a new
      turn, e.g. from `conversation.text_after_reply`) is appended to it, only its tokens go through
      the model (the earlier turns come from the KV cache), and the answer's tokens stay in it.
    images: for a model that reads images (Gemma 3 4B and up, model_type gemma3), the images of the
      prompt (paths, PIL images or uint8 arrays; a list of lists for a batch), one per placeholder
      `<start_of_image>` in the prompt or per {"type": "image"} content part of the messages (rendered
      with Gemma 3's chat template when the checkpoint stores none). A text-only model refuses them.
    Returns the generated text (a list of texts for a batch), without the prompt.
    Runs on the backend the program chose, else on `ops.FAST_CPU_BACKEND` (compiled CPU kernels).
    """
    stops = _stop_strings(stop)
    if temperature is not None and not isinstance(temperature, bool) and temperature == 0:
        if do_sample:
            raise InputError(
                "do_sample=True with temperature=0: there is nothing to sample at temperature 0; for greedy "
                "decoding pass do_sample=False (or leave it out), to sample pass a temperature > 0"
            )
        do_sample = False  # temperature 0 means greedy
    backend = _generate_backend()
    loaded, tokenizer = load(resolve_model(model), dtype, backend)
    if images is not None:
        _check_reads_images(loaded, model)
        if chat_template is None and not tokenizer.chat_template:
            chat_template = GEMMA3_CHAT_TEMPLATE  # image content parts need a template that knows them
    texts, batched = _prompts(prompt, messages, tokenizer, chat_template)
    if stream and batched:
        raise InputError("stream=True takes one prompt, not a batch")
    if do_sample is None:
        do_sample = bool((temperature or 0) > 0 or top_k or top_p is not None or min_p is not None)
    if temperature is None or (not isinstance(temperature, bool) and temperature == 0):
        temperature = 1.0  # unused: greedy
    eos = _eos_ids(loaded, tokenizer)
    if conversation is not None:
        if images is not None:
            raise InputError("images= with conversation= is not implemented: start a new conversation per image prompt")
        return _continue(conversation, loaded, tokenizer, texts, batched, add_bos and messages is None, eos, stops,
                         stream, stats, backend, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
    prefill = None  # what only the prompt's forward pass reads: the images
    if images is None:
        ids, mask = _left_pad(
            [tokenizer.encode(t, add_bos=add_bos and messages is None) for t in texts], tokenizer.pad_token_id or 0
        )
    else:
        inputs = _image_inputs(loaded, tokenizer, model, texts, images, batched, add_bos and messages is None)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        prefill = {"pixel_values": inputs.get("pixel_values"), "token_type_ids": inputs["token_type_ids"]}
    tokens = generate_tokens(
        loaded,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos,
        seed=seed,
        prefill_inputs=prefill,
    )
    tokens = _on_backend(tokens, backend)
    if stats is not None:
        stats["backend"] = backend
        tokens = _timed(tokens, stats, int(mask.sum()))
    if stream:
        return _stream(tokens, tokenizer, eos, stops)
    new = [[] for _ in texts]
    for column in tokens:
        for row, token in enumerate(column):
            new[row].append(int(token))
        if stops and all(_cut_at_stop(_decode_until_eos(tokenizer, r, eos), stops)[1] for r in new):
            break
    results = [_cut_at_stop(_decode_until_eos(tokenizer, r, eos), stops)[0] for r in new]
    return results if batched else results[0]


def _continue(conversation, model, tokenizer, texts, batched, add_bos, eos, stops, stream, stats, backend, **options):
    """generate() for one more turn of a `Conversation`: the turn's ids are prefilled after the cache."""
    if batched:
        raise InputError("conversation= takes one prompt, not a batch")
    if conversation.model is not model:
        raise InputError("this conversation belongs to another model (or another dtype / backend of it)")
    new_ids = tokenizer.encode(texts[0], add_bos=add_bos and not conversation.ids)
    pending = len(conversation.ids) - conversation.fed  # ids of earlier turns not in the cache yet
    columns = (np.array([t]) for t in conversation.generate(new_ids, stop_ids=eos, eos_token_id=eos, **options))
    tokens = _on_backend(columns, backend)
    if stats is not None:
        stats["backend"] = backend
        tokens = _timed(tokens, stats, len(new_ids) + pending)
    pieces = _stream(tokens, tokenizer, eos, stops)
    return pieces if stream else "".join(pieces)


def _check_reads_images(model, name):
    """InputError unless the model has a vision tower (a config with a vision_config)."""
    if getattr(model.config, "vision_config", None) is None:
        what = "the shipped Gemma 3 270M" if name is None else str(name)
        raise InputError(
            f"{what} is a text-only model ({type(model).__name__}): it cannot read images; images need a "
            "multimodal checkpoint (Gemma 3 4B and up, config.json model_type 'gemma3')"
        )


def _image_inputs(model, tokenizer, name, texts, images, batched, add_bos):
    """Token ids with each image placeholder laid out, token_type_ids and pixel_values
    (`minilm.io.image_processor.Gemma3Processor`), for the prompts and their images."""
    path = resolve_model(name)
    if path is not None and path.is_dir():
        image_processor = Gemma3ImageProcessor.from_pretrained(path, model.config)
    else:
        image_processor = Gemma3ImageProcessor.from_config(model.config)
    if not isinstance(images, (list, tuple)):
        images = [images]
    processor = Gemma3Processor(tokenizer, model.config, image_processor)
    return processor(texts if batched else texts[0], images=images, add_bos=add_bos)


def _stop_strings(stop):
    """`stop` as a list of strings; InputError for anything else (a number, a list with a non-string)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise InputError(f"stop must be a string or a list of strings, got {stop!r}")


_TEMPLATE_WARNED = set()  # the built-in templates a warning has named already (once per process)


def _prompts(prompt, messages, tokenizer, chat_template=None):
    if (prompt is None) == (messages is None):
        raise InputError("pass a prompt or chat messages (exactly one)")
    if messages is not None:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        template, source = chat_template_for(tokenizer, chat_template)
        if source.startswith("built-in") and source not in _TEMPLATE_WARNED:
            _TEMPLATE_WARNED.add(source)
            message = f"the checkpoint stores no chat template: using the {source} one (chat_template=... to change)"
            warnings.warn(message, stacklevel=3)
        rendered = [tokenizer.apply_chat_template(m, chat_template=template) for m in conversations]
        return rendered, bool(messages and isinstance(messages[0], list))
    if isinstance(prompt, str):
        return [prompt], False
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt), True
    raise InputError("prompt must be a string or a non-empty list of strings")


def _left_pad(rows, pad_id):
    """Token lists -> (batch, longest) ids and mask, padded on the left."""
    width = max(len(r) for r in rows)
    if width == 0:
        raise InputError("the prompt is empty: nothing to continue (pass add_bos=True or some text)")
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
    if (mask.sum(1) == 0).any():
        raise InputError("a prompt in the batch is empty")
    return ids, mask


def _eos_ids(model, tokenizer):
    """Tokens that end generation: the config's EOS id(s), the tokenizer's, and <end_of_turn> if any."""
    ids = set(np.atleast_1d(model.config.eos_token_id).tolist()) if model.config.eos_token_id is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    end_of_turn = tokenizer.token_to_id("<end_of_turn>")
    if end_of_turn is not None:
        ids.add(end_of_turn)
    return sorted(ids)


def _decode_until_eos(tokenizer, ids, eos):
    for i, token in enumerate(ids):
        if token in eos:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def _cut_at_stop(text, stops):
    """(text before the first stop string, whether one was found)"""
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _stream(tokens, tokenizer, eos, stops):
    """Yield text pieces as tokens arrive. Text is re-decoded from all new ids each step and only
    the part that is final is emitted: never a trailing replacement character (an incomplete
    UTF-8 sequence from byte-fallback tokens), never text that could be the start of a stop string."""
    ids, emitted = [], 0
    for column in tokens:
        token = int(column[0])
        if token in eos:
            break
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, stops)
        if stopped:
            if len(text) > emitted:
                yield text[emitted:]
            return
        safe = len(text.rstrip("\ufffd"))
        for s in stops:  # hold back a suffix that might grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = _cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stops)[0]
    if len(text) > emitted:
        yield text[emitted:]


def _on_backend(tokens, backend):
    """Pass tokens through, each computed with `backend` active. Set around every step rather
    than around the call: a stream is consumed after `generate` has returned."""
    while True:
        with ops.use_backend(backend):
            column = next(tokens, None)
        if column is None:
            return
        yield column


def _timed(tokens, stats, prompt_tokens):
    """Pass tokens through, recording prefill time (first token) and decode speed in `stats`."""
    stats.update(prompt_tokens=prompt_tokens, new_tokens=0)
    start = time.perf_counter()
    for column in tokens:
        if stats["new_tokens"] == 0:
            stats["prefill_s"] = time.perf_counter() - start
            first = time.perf_counter()
        stats["new_tokens"] += 1
        if stats["new_tokens"] > 1:
            stats["decode_s"] = time.perf_counter() - first
            stats["decode_tokens_per_s"] = (stats["new_tokens"] - 1) / max(stats["decode_s"], 1e-9)
        yield column

"""Built-in chat templates, for checkpoints that store none (the shipped Gemma 3 270M GGUF has no
`tokenizer.chat_template`).

Gemma's turn format: Google's chat template for Gemma 3, as released with its checkpoints:

    <bos><start_of_turn>user
    {system prompt}\\n\\n{first user message}<end_of_turn>
    <start_of_turn>model
    {assistant message}<end_of_turn>
    <start_of_turn>model                      <- add_generation_prompt

Gemma has no system role: a leading system message is prepended to the first user message.
The "assistant" role is spelled "model". Contents are trimmed, as the original template does. A
content given as a list of parts ({"type": "text", "text": ...}, {"type": "image"}) becomes its
texts and a <start_of_image> placeholder per image (the multimodal models' prompt layout).

`chat_template_for(tokenizer)` is the one place that decides which template is used:
an explicit one, else the checkpoint's own, else a built-in one that fits the vocabulary.
"""

from __future__ import annotations

from ..errors import ConfigError

GEMMA_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# name -> (template, tokens the vocabulary must have for the template to make sense)
BUILTIN_CHAT_TEMPLATES = {"gemma": (GEMMA_CHAT_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"))}


def builtin_chat_template_name(tokenizer) -> str | None:
    """The name of the built-in template whose special tokens this tokenizer has, or None."""
    for name, (_, tokens) in BUILTIN_CHAT_TEMPLATES.items():
        if all(tokenizer.token_to_id(token) is not None for token in tokens):
            return name
    return None


def chat_template_for(tokenizer, chat_template: str | None = None) -> tuple[str, str]:
    """(template, where it came from): `chat_template` if given ("given"), else the checkpoint's
    ("the checkpoint's"), else the built-in one for the vocabulary ("built-in gemma").
    ConfigError when there is none of the three."""
    if chat_template is not None:
        return chat_template, "given"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template, "the checkpoint's"
    name = builtin_chat_template_name(tokenizer)
    if name is None:
        raise ConfigError(
            "this tokenizer has no chat template (the checkpoint stores none, and its vocabulary has no "
            "<start_of_turn> / <end_of_turn> for the built-in Gemma one); pass chat_template=... "
            "(command line: --chat-template FILE)"
        )
    return BUILTIN_CHAT_TEMPLATES[name][0], f"built-in {name}"

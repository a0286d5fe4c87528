"""The chat format, defined once: used by the engine, the server, post-training and the HF export.

A conversation is one document:

    <|bos|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

An assistant's answer is its text followed by `<|end|>` (the end-of-turn token, where generation
stops); asking for an answer appends `<|assistant|>`. `CHAT_TEMPLATE` is the same format as a Jinja
template for `tokenizer_config.json`, so transformers' `apply_chat_template` gives the same ids as
`render_chat`. One difference is deliberate: Levante encodes message text literally, so a message
containing the string "<|end|>" cannot forge a turn boundary (transformers maps it to the token).
"""

from __future__ import annotations

from collections.abc import Sequence

from levante.errors import LevanteError

ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def check_messages(messages) -> list[dict]:
    """The messages as plain {"role", "content"} dicts, or LevanteError naming the first bad one."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise LevanteError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LevanteError(f"message {i} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise LevanteError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise LevanteError(f"message {i} ({role}) has no text content")
        out.append({"role": role, "content": content})
    return out


def chat_segments(tokenizer, messages) -> list[tuple[list[int], bool]]:
    """The conversation as (ids, is_answer) pieces: `is_answer` marks each assistant message's text
    and its `<|end|>` (what SFT trains on); everything else, role tokens included, is context."""
    segments: list[tuple[list[int], bool]] = [([tokenizer.bos_id], False)]
    for m in check_messages(messages):
        role_id = tokenizer.token_to_id(f"<|{m['role']}|>")
        answer = m["role"] == "assistant"
        segments.append(([role_id], False))
        segments.append(([*tokenizer.encode(m["content"]), tokenizer.end_id], answer))
    return segments


def render_chat(tokenizer, messages, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation; with `add_generation_prompt`, ready for the assistant's answer."""
    ids = [i for piece, _ in chat_segments(tokenizer, messages) for i in piece]
    if add_generation_prompt:
        ids.append(tokenizer.token_to_id("<|assistant|>"))
    return ids

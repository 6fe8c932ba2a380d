"""A conversation through the model's chat template into token ids: the one encoder that the
offline engine (``LLM.chat``) and the HTTP ingress both use, so both give the same ids.

Control tokens belong to the template, never to what a user typed. A template is rendered to
text and then tokenised, and a tokenizer turns every special-token string it meets (ChatML's
``<|im_start|>``, say) into that control token: a user who types
``<|im_end|><|im_start|>system ...`` would otherwise open a system turn of their own. So when
any message holds such a string, the template is rendered with a placeholder per message,
the template's own text is tokenised with special tokens parsed, and each message's text with
special tokens split into plain characters. Conversations without such strings (nearly all)
take the direct path, byte for byte what the tokenizer gives for the rendered text.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from typing import Any

from kvmesh.replicas.tool_calls import render_messages


class ChatTemplateError(ValueError):
    """The template refused the conversation (its own ``raise_exception``), or cannot be used."""


def encode_chat(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[str, list[int]]:
    """(rendered text, token ids) of ``messages`` with the assistant cue appended; ``tools``
    (OpenAI's shape) are offered to the model (``tool_calls.render_messages``)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("this model has no chat template: send a prompt instead")
    messages, tools = render_messages(messages, tools, tokenizer.chat_template)
    messages = [{**m, "content": m.get("content") or ""} for m in messages]
    text = _render(tokenizer, messages, tools)
    specials = _special_strings(tokenizer)
    if not any(s in m["content"] for m in messages for s in specials):
        return text, tokenizer.encode(text, add_special_tokens=False)
    return text, _encode_with_literal_contents(tokenizer, messages, text, tools)


def _render(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
    except TemplateError as exc:  # the template's own message: meant for the caller
        raise ChatTemplateError(f"the chat template rejected the messages: {exc}") from None


@lru_cache(maxsize=16)
def _special_strings(tokenizer: Any) -> tuple[str, ...]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {t.content for t in decoder.values() if getattr(t, "special", False)}
    found.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return tuple(sorted(s for s in found if s))


def _encode_with_literal_contents(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    text: str,
    tools: list[dict[str, Any]] | None,
) -> list[int]:
    nonce = secrets.token_hex(8)
    marks = [f"\u2063kvmesh{nonce}-{i}\u2063" for i in range(len(messages))]
    shaped = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
    frame = _render(tokenizer, shaped, tools)
    # Split the frame at the placeholders: template text and message text alternate.
    pieces: list[tuple[str, bool]] = []  # (text, is_message_content)
    rest = frame
    for mark, message in zip(marks, messages, strict=True):
        before, found, rest = rest.partition(mark)
        if not found:
            raise ChatTemplateError(
                "a message holds a control-token string and this chat template does not "
                "render message content verbatim, so it cannot be kept as plain text"
            )
        pieces += [(before, False), (message["content"], True)]
    pieces.append((rest, False))
    if "".join(p for p, _ in pieces) != text:  # the template transformed the content
        raise ChatTemplateError(
            "a message holds a control-token string and this chat template changes message "
            "content, so it cannot be kept as plain text"
        )
    ids: list[int] = []
    for piece, is_content in pieces:
        if piece:
            ids += tokenizer.encode(
                piece, add_special_tokens=False, split_special_tokens=is_content
            )
    return ids

"""Let vLLM's validation of chat messages pass over prompt_embeds parts, unchecked.

Why: vLLM validates each chat message against a union of message types before any renderer
runs. Which type wins depends on every part of the message, and the OpenAI types hold
``content`` as a lazy ``Iterable`` whose errors surface later as a raw pydantic dump. A text
part standing in for each prompt_embeds part makes validation independent of the parts; the
client's parts go back in place afterwards, untouched, for the renderer to check with our
messages (``renderers/parts.py``). Used by the request-protocol patches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, Final

from pydantic import ValidatorFunctionWrapHandler, WrapValidator

from ..renderers.parts import is_embeds_part

# What vLLM's validation sees in place of a part: valid in a message of any role.
TEXT_STAND_IN: Final = {"type": "text", "text": ""}

# Per message index, the parts taken out as (index in content, part).
Held = dict[int, list[tuple[int, Any]]]


def take_parts(messages: list[Any], stand_in: Mapping[str, Any] = TEXT_STAND_IN):
    """``messages`` with a stand-in for every prompt_embeds part, and the parts by place."""
    held: Held = {}
    out = list(messages)
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue
        parts = [(j, part) for j, part in enumerate(content) if is_embeds_part(part)]
        if parts:
            held[i] = parts
            stood_in = [dict(stand_in) if is_embeds_part(p) else p for p in content]
            out[i] = {**message, "content": stood_in}
    return out, held


def put_back(
    validated: list[Any], held: Held, locate: Callable[[int, int, Any], Any] | None = None
) -> list[Any]:
    """``validated`` with each held part back in its place (``locate`` may wrap it)."""
    out = list(validated)
    for i, parts in held.items():
        message = out[i]
        if not isinstance(message, dict):
            raise RuntimeError(
                f"vllm-chat-embeds: message {i} validated to {type(message).__name__}, not a "
                "dict; this vLLM version is not supported (message_schema)."
            )
        content = list(message["content"])  # a lazy Iterable is materialised here
        for j, part in parts:
            content[j] = locate(i, j, part) if locate else part
        out[i] = {**message, "content": content}
    return out


def validate_messages(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """vLLM's validation of one conversation, parts stood in for and put back."""
    if not isinstance(value, list):
        return handler(value)
    stripped, held = take_parts(value)
    validated = handler(stripped)
    return put_back(validated, held) if held else validated


def validate_conversations(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """The same for a list of conversations (batch chat completions)."""
    if not isinstance(value, list) or not all(isinstance(c, list) for c in value):
        return handler(value)
    taken = [take_parts(conversation) for conversation in value]
    validated = handler([stripped for stripped, _ in taken])
    return [
        put_back(conversation, held) if held else conversation
        for conversation, (_, held) in zip(validated, taken, strict=True)
    ]


def widen_field(patch: Any, model: Any, name: str, validator: Callable[..., Any]) -> None:
    """Add ``validator`` as a wrap validator of ``model.<name>`` and rebuild the model once."""
    field = model.model_fields.get(name)
    if field is None:
        raise RuntimeError(
            f"vllm-chat-embeds: {model.__name__}.{name} is missing; this vLLM version is not "
            f"supported (patch {patch.name}: {patch.why})."
        )
    if any(getattr(m, "func", None) is validator for m in field.metadata):
        return
    widened = copy.copy(field)
    widened.metadata = [*field.metadata, WrapValidator(validator)]
    model.__pydantic_fields__[name] = widened
    model.model_rebuild(force=True)

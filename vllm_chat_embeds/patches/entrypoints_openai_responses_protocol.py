"""Patch of ``vllm/entrypoints/openai/responses/protocol.py``: let ``input`` carry parts.

What: ``ResponsesRequest.input`` also accepts ``{"type": "prompt_embeds", ...}`` content parts
in user, system and developer messages. Why: vLLM validates ``input`` against the OpenAI SDK's
item types, which have no such part, so without this every request holding one is a 400 before
any renderer runs. When it can go: when vLLM's Responses schema accepts prompt_embeds parts.

How: one wrap validator on the ``input`` field (the model is rebuilt once). It stands an empty
``input_text`` part in for each prompt_embeds part, so vLLM's own validation checks the rest
exactly as before (its error locations keep their indices), then puts each part back in its
place as a ``LocatedPart`` naming ``input[i].content[j]``. The part is
not checked here: vLLM turns such messages into chat messages unchanged, and the renderer
checks and decodes the part as on chat completions, with errors that name that location.
Requests without parts go through vLLM's validation untouched.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any, Final

from pydantic import ValidatorFunctionWrapHandler

from .. import errors
from ..entrypoints.message_schema import put_back, take_parts, widen_field
from ..errors import reject
from ..renderers.parts import (
    LocatedPart,
    is_embeds_part,
    placeholder_text_reserved,
    reject_reserved_strings,
)
from . import Patch, check

# Roles whose input messages vLLM passes on as chat messages with their content list intact.
# Assistant items become text-only (their first part's text), so a part there would be lost.
ROLES: Final = frozenset({"user", "system", "developer"})

# What vLLM's validation sees in place of a part: valid in every message that takes a list.
_STAND_IN: Final = {"type": "input_text", "text": ""}


def _check_roles(items: list[Any]) -> None:
    """Refuse a part in a message whose role vLLM would not pass on with its content."""
    for i, item in enumerate(items):
        content = item.get("content") if isinstance(item, Mapping) else None
        if not isinstance(content, list) or item.get("role") in ROLES:
            continue
        first = next((j for j, part in enumerate(content) if is_embeds_part(part)), None)
        if first is not None:
            reject(
                errors.RESPONSES_ROLE, where=f"input[{i}].content[{first}]", role=item.get("role")
            )


def _located(i: int, j: int, part: Any) -> LocatedPart:
    return LocatedPart(part, where=f"input[{i}].content[{j}]")


def validate_input(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """vLLM's validation of ``input``, with prompt_embeds parts stood in for and put back."""
    if not isinstance(value, list):
        return handler(value)
    if placeholder_text_reserved():
        # Checked here, where the text still sits at its place in ``input``; the renderer
        # would see it in the chat messages vLLM builds and name those.
        reject_reserved_strings("input", value)
    _check_roles(value)
    stripped, held = take_parts(value, _STAND_IN)
    validated = handler(stripped)
    return put_back(validated, held, _located) if held else validated


def apply(patch: Patch) -> None:
    from vllm.entrypoints.openai.responses import protocol

    # The model-level before validator runs ahead of ours; it must leave user, system and
    # developer messages as dicts (it converts assistant, reasoning and tool-call items).
    check(patch, {"ResponsesRequest.input_item_parsing": ("data",)})
    model = protocol.ResponsesRequest
    field = model.model_fields.get("input")
    if field is None or list not in {
        typing.get_origin(a) for a in typing.get_args(field.annotation)
    }:
        raise RuntimeError(
            "vllm-chat-embeds: ResponsesRequest.input is missing or takes no list; this vLLM "
            f"version is not supported (patch {patch.name}: {patch.why})."
        )
    widen_field(patch, model, "input", validate_input)

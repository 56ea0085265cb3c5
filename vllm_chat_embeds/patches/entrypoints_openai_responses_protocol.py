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

import copy
import typing
from collections.abc import Mapping
from typing import Any, Final

from pydantic import ValidatorFunctionWrapHandler, WrapValidator

from .. import errors
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

_Held = dict[int, list[tuple[int, Mapping[str, Any]]]]


def _take_parts(items: list[Any]) -> tuple[list[Any], _Held]:
    """``items`` with stand-ins for their prompt_embeds parts, and the parts by position."""
    held: _Held = {}
    stripped = list(items)
    for i, item in enumerate(items):
        content = item.get("content") if isinstance(item, Mapping) else None
        if not isinstance(content, list):
            continue
        parts = [(j, part) for j, part in enumerate(content) if is_embeds_part(part)]
        if not parts:
            continue
        if item.get("role") not in ROLES:
            reject(
                errors.RESPONSES_ROLE,
                where=f"input[{i}].content[{parts[0][0]}]",
                role=item.get("role"),
            )
        held[i] = parts
        stripped[i] = {
            **item,
            "content": [dict(_STAND_IN) if is_embeds_part(p) else p for p in content],
        }
    return stripped, held


def _put_back(validated: list[Any], held: _Held) -> list[Any]:
    out = list(validated)
    for i, parts in held.items():
        item = out[i]
        if not (isinstance(item, dict) and isinstance(item.get("content"), list)):
            raise RuntimeError(
                f"vllm-chat-embeds: input[{i}] validated to {type(item).__name__}, not a "
                "message dict; this vLLM version is not supported (patch "
                "entrypoints_openai_responses_protocol)."
            )
        content = list(item["content"])
        for j, part in parts:
            content[j] = LocatedPart(part, where=f"input[{i}].content[{j}]")
        out[i] = {**item, "content": content}
    return out


def validate_input(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """vLLM's validation of ``input``, with prompt_embeds parts stood in for and put back."""
    if not isinstance(value, list):
        return handler(value)
    if placeholder_text_reserved():
        # Checked here, where the text still sits at its place in ``input``; the renderer
        # would see it in the chat messages vLLM builds and name those.
        reject_reserved_strings("input", value)
    stripped, held = _take_parts(value)
    validated = handler(stripped)
    return _put_back(validated, held) if held else validated


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
    if any(getattr(m, "func", None) is validate_input for m in field.metadata):
        return
    widened = copy.copy(field)
    widened.metadata = [*field.metadata, WrapValidator(validate_input)]
    model.__pydantic_fields__["input"] = widened
    model.model_rebuild(force=True)

"""Patch of ``vllm/renderers/online_renderer.py``: Harmony models refuse Responses parts.

What: for Harmony (gpt-oss) models, a ``/v1/responses`` request whose input holds a
prompt_embeds part is refused with a 400 naming the part. Why: that path builds Harmony
messages itself, without the chat renderer, and keeps only the ``text`` of each content part,
so a part let through by our schema widening (``entrypoints_openai_responses_protocol``) would
be dropped without a word. When it can go: when the Harmony path takes prompt_embeds parts, or
together with the schema widening.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import errors
from ..errors import reject
from ..renderers.parts import LocatedPart
from . import Patch, check


def first_located_part(items: object) -> str | None:
    """Where the first prompt_embeds part of a Responses ``input`` list sits, if any."""
    if not isinstance(items, list):
        return None
    for item in items:
        content = item.get("content") if isinstance(item, Mapping) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, LocatedPart):
                    return part.where
    return None


def apply(patch: Patch) -> None:
    from vllm.renderers import online_renderer

    check(
        patch,
        {
            "OnlineRenderer._render_responses_with_harmony": (
                "self",
                "request",
                "previous_messages",
                "previous_response_outputs",
                "tool_server",
            )
        },
    )
    cls = online_renderer.OnlineRenderer
    original = cls._render_responses_with_harmony

    def _render_responses_with_harmony(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        where = first_located_part(getattr(request, "input", None))
        if where is not None:
            reject(errors.RESPONSES_HARMONY, where=where)
        return original(self, request, *args, **kwargs)

    cls._render_responses_with_harmony = _render_responses_with_harmony  # type: ignore[method-assign]

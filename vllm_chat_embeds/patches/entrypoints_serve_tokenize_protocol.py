"""Patch of ``vllm/entrypoints/serve/tokenize/protocol.py``: parts skip pydantic on /tokenize.

What and why: as ``entrypoints_openai_chat_completion_protocol`` does for chat completions,
``TokenizeChatRequest.messages`` validates each message with a text part standing in for each
prompt_embeds part and puts the client's part back afterwards, so a malformed part anywhere in
a content list gets the renderer's message instead of a raw pydantic dump. When it can go:
with that patch.
"""

from __future__ import annotations

from ..entrypoints.message_schema import validate_messages, widen_field
from . import Patch, check


def apply(patch: Patch) -> None:
    from vllm.entrypoints.serve.tokenize import protocol

    check(patch, {"TokenizeChatRequest.check_generation_prompt": ("data",)})
    widen_field(patch, protocol.TokenizeChatRequest, "messages", validate_messages)

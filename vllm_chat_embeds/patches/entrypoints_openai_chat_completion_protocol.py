"""Patch of ``vllm/entrypoints/openai/chat_completion/protocol.py``: parts skip pydantic.

What: ``ChatCompletionRequest.messages`` and ``BatchChatCompletionRequest.messages`` validate
every message with a text part standing in for each prompt_embeds part, then put the client's
part back in its place, unchecked. Why: vLLM validates a message against a union of message
types. A malformed part (``data`` missing, null or a number) fits no part type, and when
nothing else in the list sets more fields, pydantic picks the OpenAI message type whose
``content`` is a lazy ``Iterable``: the error then surfaces while vLLM's parser iterates,
as a raw dump (``8 validation errors for ValidatorIterator``). Whether it does depended on
the other parts of the list, so a bad part first got the dump and the same part after a text
part got our message. With stand-ins, validation no longer depends on the parts, and the
renderer checks every part with our messages (``renderers/parts.py``). When it can go: when
vLLM validates prompt_embeds parts eagerly and leaves their errors to the renderer.
"""

from __future__ import annotations

from ..entrypoints.message_schema import validate_conversations, validate_messages, widen_field
from . import Patch, check


def apply(patch: Patch) -> None:
    from vllm.entrypoints.openai.chat_completion import protocol

    # The model-level before validator runs ahead of ours and leaves messages as dicts.
    check(
        patch,
        {
            "ChatCompletionRequest._normalize_messages_before": ("data",),
            "BatchChatCompletionRequest.check_batch_mode": ("data",),
        },
    )
    widen_field(patch, protocol.ChatCompletionRequest, "messages", validate_messages)
    widen_field(patch, protocol.BatchChatCompletionRequest, "messages", validate_conversations)

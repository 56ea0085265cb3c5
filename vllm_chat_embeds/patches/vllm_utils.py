"""Patch of ``vllm/utils/__init__.py``: a prompt's length is its token ids' when it has them.

What: ``length_from_prompt_token_ids_or_embeds(ids, embeds)`` returns ``len(ids)`` when ids
are given, instead of raising when ``embeds`` has fewer rows. Why: our chat prompts carry only
the embedding rows (compact transport) beside full-length ids and a mask; vLLM computes prompt
lengths with this helper in 18 places (imported by value), so the function's code object is
replaced once, in place, which every importer sees. The length check it drops is done by our
renderer for every embeds prompt it builds or receives. When it can go: when vLLM carries
embedding rows compactly itself.
"""

from __future__ import annotations

from typing import Any

from . import Patch, check


def _length(prompt_token_ids: Any, prompt_embeds: Any) -> int:
    if prompt_token_ids is not None:
        return len(prompt_token_ids)
    if prompt_embeds is None:
        raise ValueError("Neither prompt_token_ids nor prompt_embeds were defined.")
    return len(prompt_embeds)


def apply(patch: Patch) -> None:
    import vllm.utils as utils

    check(
        patch,
        {"length_from_prompt_token_ids_or_embeds": ("prompt_token_ids", "prompt_embeds")},
    )
    target = utils.length_from_prompt_token_ids_or_embeds
    if target.__code__.co_freevars:
        raise RuntimeError(
            "vllm-chat-embeds: vllm.utils.length_from_prompt_token_ids_or_embeds changed shape; "
            "this vLLM version is not supported."
        )
    target.__code__ = _length.__code__

"""Patch of ``vllm/entrypoints/generate/beam_search/online.py``: serve beam search on parts.

What: ``BeamSearchOnlineMixin.beam_search`` (chat and completions ``use_beam_search``) given an
embeds prompt runs vLLM's search on its beam root (``beam_prompts.beam_root``) instead of
answering ``501 Embedding prompt not supported for beam search``; the
``entrypoints_generate_beam_search_utils`` patch builds each beam's embeds prompt. Why: a chat
with prompt_embeds parts renders to an embeds prompt. When it can go: when vLLM's beam search
extends embeds prompts itself (docs/upstream.md).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator
from typing import Any, Final

from ..entrypoints.beam_prompts import beam_root
from . import Patch, check, one_of

_PARAMS: Final = (
    "self",
    "prompt",
    "request_id",
    "params",
    "lora_request",
    "trace_headers",
    "session_id",
)
_PARAMS_WITH_PRIORITY: Final = (*_PARAMS, "priority")  # vLLM 0.33 adds the request priority


def apply(patch: Patch) -> None:
    from vllm.entrypoints.generate.beam_search import online

    cls = online.BeamSearchOnlineMixin
    shape = one_of(cls.beam_search, _PARAMS, _PARAMS_WITH_PRIORITY)
    check(patch, {"BeamSearchOnlineMixin.beam_search": shape})
    original = cls.beam_search

    @functools.wraps(original)
    async def beam_search(
        self: Any, prompt: Any, *args: Any, **kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        if prompt.get("type") == "embeds":
            prompt = beam_root(prompt)
        async for output in original(self, prompt, *args, **kwargs):
            yield output

    cls.beam_search = beam_search  # type: ignore[method-assign]

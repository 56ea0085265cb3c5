"""Patch of ``vllm/entrypoints/serve/tokenize/serving.py``: say where embeddings sit.

What: ``/tokenize`` with chat ``messages`` holding prompt_embeds parts answers with an added
field ``prompt_embeds_spans`` (``[[start, length], ...]`` of positions given as embeddings),
and ``token_strs`` shows ``<prompt_embeds>`` at those positions. Why: those positions carry
token id 0, which a client would otherwise take for a real token; ``count`` already equals the
chat's ``usage.prompt_tokens``. When it can go: when vLLM's tokenize response describes
embeds prompts itself.

How: the renderer notes each embeds input it builds in a context variable set for the
duration of one ``create_tokenize`` call (context variables follow the request's awaits).
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch

from ..placeholder import PLACEHOLDER_TOKEN
from . import Patch, check

_SPANS: contextvars.ContextVar[list[list[int]] | None] = contextvars.ContextVar(
    "vllm_chat_embeds_tokenize_spans", default=None
)


def note_embeds_rows(is_token: torch.Tensor, offset: int = 0) -> None:
    """Record the embedding runs of one prompt, if a /tokenize call is listening."""
    spans = _SPANS.get()
    if spans is None:
        return
    embed = (~is_token).to(torch.int8)
    edges = torch.diff(embed, prepend=torch.zeros(1, dtype=torch.int8))
    starts = torch.nonzero(edges == 1).flatten()
    ends = torch.nonzero(torch.diff(embed, append=torch.zeros(1, dtype=torch.int8)) == -1)
    for start, end in zip(starts.tolist(), ends.flatten().tolist(), strict=True):
        spans.append([offset + start, end - start + 1])


def apply(patch: Patch) -> None:
    from vllm.entrypoints.serve.tokenize import serving

    check(patch, {"ServingTokenization.create_tokenize": ("self", "request", "raw_request")})
    cls = serving.ServingTokenization
    original = cls.create_tokenize

    async def create_tokenize(self: Any, request: Any, raw_request: Any) -> Any:
        spans: list[list[int]] = []
        token = _SPANS.set(spans)
        try:
            response = await original(self, request, raw_request)
        finally:
            _SPANS.reset(token)
        if spans and isinstance(response, serving.TokenizeResponse):
            response.prompt_embeds_spans = spans  # type: ignore[attr-defined]
            if response.token_strs is not None:
                for start, length in spans:
                    response.token_strs[start : start + length] = [PLACEHOLDER_TOKEN] * length
        return response

    cls.create_tokenize = create_tokenize  # type: ignore[method-assign]

"""Patch of ``vllm/v1/engine/logprobs.py``: no prompt logprobs for rows given as embeddings.

What: ``LogprobsProcessor`` remembers which prompt positions of a request came as embeddings
(``EngineCoreRequest.prompt_is_token_ids``, or beside images the ranges of its
``prompt_embeds`` multimodal items) and reports ``None`` at those positions, as vLLM
already does for position 0. Why: such a row has no token, so a log-probability "of the token"
there would be a made-up number. When it can go: when vLLM itself masks prompt logprobs of
embeds prompts (not the case in 0.32).

The engine side needs no patch: our renderer sends token id 0 at embedding positions (the id
vLLM's own ``Request`` substitutes there), so the worker's logprob gather stays in range.
"""

from __future__ import annotations

from typing import Any

from . import Patch, check

_EMBED_POSITIONS = "_vllm_chat_embeds_embed_positions"


def _embed_positions(request: Any) -> frozenset[int] | None:
    mask = getattr(request, "prompt_is_token_ids", None)
    positions: set[int] = set()
    if mask is not None:
        positions.update(i for i, is_token in enumerate(mask) if not is_token)
    # Beside images, parts ride as multimodal items of vLLM's "prompt_embeds" modality.
    for feature in getattr(request, "mm_features", None) or ():
        if feature.modality == "prompt_embeds":
            start = feature.mm_position.offset
            positions.update(range(start, start + feature.mm_position.length))
    return frozenset(positions) or None


def apply(patch: Patch) -> None:
    from vllm.v1.engine import logprobs

    check(
        patch,
        {
            "LogprobsProcessor.from_new_request": ("tokenizer", "request"),
            "LogprobsProcessor._update_prompt_logprobs": ("self", "prompt_logprobs_tensors"),
        },
    )
    cls = logprobs.LogprobsProcessor
    original_new = cls.from_new_request.__func__  # type: ignore[attr-defined]
    original_update = cls._update_prompt_logprobs

    def from_new_request(klass: Any, tokenizer: Any, request: Any) -> Any:
        processor = original_new(klass, tokenizer, request)
        if processor.prompt_logprobs is not None:
            setattr(processor, _EMBED_POSITIONS, _embed_positions(request))
        return processor

    def _update_prompt_logprobs(self: Any, prompt_logprobs_tensors: Any) -> None:
        start = len(self.prompt_logprobs)
        original_update(self, prompt_logprobs_tensors)
        positions = getattr(self, _EMBED_POSITIONS, None)
        if not positions:
            return
        hit = [p for p in range(start, len(self.prompt_logprobs)) if p in positions]
        if not hit:
            return
        if isinstance(self.prompt_logprobs, list):
            for p in hit:
                self.prompt_logprobs[p] = None
            return
        # FlatLogprobs has no item assignment: rebuild it with None at the embedding rows.
        rebuilt = type(self.prompt_logprobs)()
        for p, entry in enumerate(self.prompt_logprobs):
            rebuilt.append(None if p in positions else entry)
        self.prompt_logprobs = rebuilt

    cls.from_new_request = classmethod(from_new_request)  # type: ignore[method-assign]
    cls._update_prompt_logprobs = _update_prompt_logprobs  # type: ignore[method-assign]

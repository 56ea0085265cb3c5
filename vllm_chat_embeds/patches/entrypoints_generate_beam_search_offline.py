"""Patch of ``vllm/entrypoints/generate/beam_search/offline.py``: ``LLM.beam_search`` on embeds.

What: during ``BeamSearchOfflineMixin.beam_search``, the prompts it renders (through the
instance's ``_preprocess_cmpl``) that are embeds prompts become beam roots
(``beam_prompts.beam_root``) instead of raising ``NotImplementedError: Embedding prompt not
supported for beam search``; the ``entrypoints_generate_beam_search_utils`` patch builds each
beam's embeds prompt. The override is set on the instance for the call only. Why: the
completion-style prompts ``LLM.beam_search`` takes include ``EmbedsPrompt``. When it can go:
when vLLM's beam search extends embeds prompts itself (docs/upstream.md).
"""

from __future__ import annotations

from typing import Any

from ..beam_prompts import beam_root
from . import Patch, check

_PREPROCESS = "_preprocess_cmpl"


def apply(patch: Patch) -> None:
    from vllm.entrypoints.generate.beam_search import offline

    check(
        patch,
        {
            "BeamSearchOfflineMixin.beam_search": (
                "self",
                "prompts",
                "params",
                "lora_request",
                "use_tqdm",
                "concurrency_limit",
            )
        },
    )
    cls = offline.BeamSearchOfflineMixin
    original = cls.beam_search

    def beam_search(
        self: Any,
        prompts: Any,
        params: Any,
        lora_request: Any = None,
        use_tqdm: bool = False,
        concurrency_limit: int | None = None,
    ) -> Any:
        preprocess = getattr(self, _PREPROCESS)

        def with_roots(*args: Any, **kwargs: Any) -> list[Any]:
            rendered = preprocess(*args, **kwargs)
            return [beam_root(p) if p.get("type") == "embeds" else p for p in rendered]

        shadowed = self.__dict__.get(_PREPROCESS)
        setattr(self, _PREPROCESS, with_roots)
        try:
            return original(self, prompts, params, lora_request, use_tqdm, concurrency_limit)
        finally:
            if shadowed is None:
                delattr(self, _PREPROCESS)
            else:
                setattr(self, _PREPROCESS, shadowed)

    cls.beam_search = beam_search  # type: ignore[method-assign]

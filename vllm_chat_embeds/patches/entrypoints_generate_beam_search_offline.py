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

import functools
from typing import Any, Final

from ..entrypoints.beam_prompts import beam_root
from . import Patch, check, one_of

_PREPROCESS = "_preprocess_cmpl"
_PARAMS: Final = ("self", "prompts", "params", "lora_request", "use_tqdm", "concurrency_limit")
_PARAMS_WITH_PRIORITY: Final = (*_PARAMS, "priority")  # vLLM 0.33 adds the request priority


def apply(patch: Patch) -> None:
    from vllm.entrypoints.generate.beam_search import offline

    cls = offline.BeamSearchOfflineMixin
    shape = one_of(cls.beam_search, _PARAMS, _PARAMS_WITH_PRIORITY)
    check(patch, {"BeamSearchOfflineMixin.beam_search": shape})
    original = cls.beam_search

    @functools.wraps(original)
    def beam_search(self: Any, prompts: Any, *args: Any, **kwargs: Any) -> Any:
        preprocess = getattr(self, _PREPROCESS)

        def with_roots(*given: Any, **named: Any) -> list[Any]:
            rendered = preprocess(*given, **named)
            return [beam_root(p) if p.get("type") == "embeds" else p for p in rendered]

        shadowed = self.__dict__.get(_PREPROCESS)
        setattr(self, _PREPROCESS, with_roots)
        try:
            return original(self, prompts, *args, **kwargs)
        finally:
            if shadowed is None:
                delattr(self, _PREPROCESS)
            else:
                setattr(self, _PREPROCESS, shadowed)

    cls.beam_search = beam_search  # type: ignore[method-assign]

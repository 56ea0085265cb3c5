"""Patch of ``vllm/entrypoints/generate/beam_search/utils.py``: beams of embeds prompts.

What: ``BeamSearchSequence.get_prompt`` of a beam whose original prompt is a beam root of an
embeds prompt (``beam_prompts.beam_root``) returns an embeds input: the prompt's rows, its ids
followed by the beam's tokens, the mask grown with ``True`` for them. Every other beam is built
by vLLM as before. Why: vLLM rebuilds each beam's prompt from token ids only. When it can go:
when vLLM's beam search extends embeds prompts itself (docs/upstream.md).
"""

from __future__ import annotations

from typing import Any

from ..entrypoints.beam_prompts import beam_prompt, is_beam_root
from . import Patch, check


def apply(patch: Patch) -> None:
    from vllm.entrypoints.generate.beam_search import utils

    check(patch, {"BeamSearchSequence.get_prompt": ("self",)})
    cls = utils.BeamSearchSequence
    original = cls.get_prompt

    def get_prompt(self: Any) -> Any:
        if is_beam_root(self.orig_prompt):
            return beam_prompt(self.orig_prompt, self.tokens)
        return original(self)

    cls.get_prompt = get_prompt  # type: ignore[method-assign]

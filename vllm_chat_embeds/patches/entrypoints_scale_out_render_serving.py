"""Patch of ``vllm/entrypoints/scale_out/render/serving.py``: rows never vanish at render.

What: ``ServingRender._extract_mm_features``, which every render route (chat, completions,
responses, Anthropic messages, Cohere v2 chat) calls to describe the rendered prompt's
multimodal items in the ``GenerateRequest``, refuses a prompt that holds prompt_embeds rows.
Why: vLLM's ``GenerateRequest`` keeps only ``token_ids`` and ``features``; our embeds input
is neither, so the rows were dropped and the token engine answered a different prompt,
silently. When it can go: when the rows are carried (``features``) instead.
"""

from __future__ import annotations

from typing import Any

from ..entrypoints import scale_out_rows
from . import Patch, check


def apply(patch: Patch) -> None:
    module = patch.home()
    check(
        patch,
        {"ServingRender._extract_mm_features": ("self", "engine_input", "mm_payload")},
    )
    cls = module.ServingRender
    original = cls._extract_mm_features

    def _extract_mm_features(self: Any, engine_input: Any, *, mm_payload: Any = "tensors") -> Any:
        scale_out_rows.refuse_rows(engine_input)
        return original(self, engine_input, mm_payload=mm_payload)

    cls._extract_mm_features = _extract_mm_features

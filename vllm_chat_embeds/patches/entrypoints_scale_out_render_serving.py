"""Patch of ``vllm/entrypoints/scale_out/render/serving.py``: rendered rows travel.

What: ``ServingRender._extract_mm_features``, which every render route (chat, completions,
responses, Anthropic messages, Cohere v2 chat) calls to describe the rendered prompt's
multimodal items in the ``GenerateRequest``, describes our embeds input too: each span of rows
becomes one item of vLLM's ``prompt_embeds`` passthrough modality
(``entrypoints/scale_out_rows.py``). Why: the ``GenerateRequest`` keeps only ``token_ids``
and ``features``; an embeds input is neither, so its rows were dropped and the token engine
answered a different prompt, silently. When it can go: when vLLM's render path describes
embeds inputs itself.
"""

from __future__ import annotations

from typing import Any

from .. import errors
from ..entrypoints import scale_out_rows
from ..errors import reject
from ..renderers.splice import EMBEDS_MODALITY
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
        kind = engine_input.get("type")
        if kind == "embeds":
            return scale_out_rows.features_of_embeds(engine_input, mm_payload)
        if kind == "multimodal" and mm_payload != "tensors":
            ranges = engine_input["mm_placeholders"].get(EMBEDS_MODALITY)
            if ranges:  # rows beside images: vLLM's metadata-only features would lose them
                rows = sum(int(r.length) for r in ranges)
                reject(errors.SCALE_OUT_NO_PAYLOAD, parameter="mm_payload", rows=rows,
                       got=mm_payload)  # fmt: skip
        return original(self, engine_input, mm_payload=mm_payload)

    cls._extract_mm_features = _extract_mm_features

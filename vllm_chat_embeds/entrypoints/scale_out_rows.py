"""prompt_embeds rows and vLLM's scale-out split (extends ``vllm/entrypoints/scale_out/``).

vLLM can render on GPU-less servers (``vllm launch render``, ``/v1/chat/completions/render``)
and generate on token engines (``vllm serve --tokens-only``, ``/inference/v1/generate``). The
``GenerateRequest`` between them holds token ids and multimodal ``features``; until rows travel
in it, a prompt with rows is refused on both sides rather than answered wrongly.
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError

from .. import errors
from ..renderers.splice import EMBEDS_MODALITY


def _embeds_rows(engine_input: Any) -> int:
    """How many positions of a rendered prompt are prompt_embeds rows."""
    kind = engine_input.get("type")
    if kind == "embeds":
        mask = engine_input.get("is_token_ids")
        if mask is None:
            return int(engine_input["prompt_embeds"].shape[0])
        return sum(1 for is_token in mask if not is_token)
    if kind == "multimodal":
        ranges = engine_input.get("mm_placeholders", {}).get(EMBEDS_MODALITY, [])
        return sum(int(r.length) for r in ranges)
    return 0


def refuse_rows(engine_input: Any) -> None:
    """Render side: a 400 for a prompt holding rows the GenerateRequest would drop."""
    rows = _embeds_rows(engine_input)
    if rows:
        errors.reject(errors.SCALE_OUT_ROWS_NOT_CARRIED, parameter="messages", rows=rows)


def refuse_features(request: Any) -> VLLMValidationError | None:
    """Generate side: the error for a request whose features claim prompt_embeds items."""
    features = getattr(request, "features", None)
    if features is None or EMBEDS_MODALITY not in features.mm_hashes:
        return None
    return VLLMValidationError(errors.SCALE_OUT_FEATURES_NOT_SERVED, parameter="features")

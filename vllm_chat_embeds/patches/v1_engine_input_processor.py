"""Patch of ``vllm/v1/engine/input_processor.py``: validate compact embeds inputs.

What: ``InputProcessor._validate_model_input`` sees, for an embeds input that carries only its
embedding rows (fewer rows than token ids), a zero-copy stand-in of full length (the first row
broadcast), so vLLM's own length and mask checks run unchanged. Why: vLLM takes an embeds
input's length from its rows. When it can go: with the ``vllm_utils`` patch.
"""

from __future__ import annotations

from typing import Any

from . import Patch, check


def is_compact(engine_input: Any) -> bool:
    """An embeds input whose rows cover only the positions the mask marks as embeddings."""
    if engine_input.get("type") != "embeds":
        return False
    ids = engine_input.get("prompt_token_ids")
    return ids is not None and len(engine_input["prompt_embeds"]) != len(ids)


def apply(patch: Patch) -> None:
    from vllm.v1.engine import input_processor

    check(
        patch,
        {"InputProcessor._validate_model_input": ("self", "prompt_input", "prompt_type")},
    )
    cls = input_processor.InputProcessor
    original = cls._validate_model_input

    def _validate_model_input(self: Any, prompt_input: Any, prompt_type: Any) -> None:
        if is_compact(prompt_input):
            rows = prompt_input["prompt_embeds"]
            length = len(prompt_input["prompt_token_ids"])
            stand_in = rows[:1].expand(length, -1)  # a view: nothing is allocated
            prompt_input = {**prompt_input, "prompt_embeds": stand_in}
        original(self, prompt_input, prompt_type)

    cls._validate_model_input = _validate_model_input  # type: ignore[method-assign]

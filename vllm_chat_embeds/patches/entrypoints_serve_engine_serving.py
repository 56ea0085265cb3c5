"""Patch of ``vllm/entrypoints/serve/engine/serving.py``: soft prompt names are model names.

What: a request whose ``model`` names a soft prompt (``stores/soft_prompts.py``) passes vLLM's
model check, as a LoRA adapter's name does, and that name is recorded for the renderer, which
puts the soft prompt's rows before the whole prompt. Why: every OpenAI entry point (chat
completions, completions, responses, tokenize) checks ``request.model`` through
``BaseServing._check_model`` and then looks adapters up through ``_is_model_supported``; no
registry lets a plugin add served names. When it can go: when vLLM lets plugins serve
additional model names (or brings back prompt adapters).

How: ``_check_model`` runs first in each request's task, so setting a context variable there
reaches the renderer's ``_process_tokens`` later in the same task (and the tasks vLLM starts
from it). Base model and LoRA names win over a soft prompt of the same name.
"""

from __future__ import annotations

from typing import Any

from ..stores.soft_prompts import STORE, set_active
from . import Patch, check


def _soft_prompt_name(serving: Any, name: object) -> str | None:
    """``name`` if it names a soft prompt and neither the base model nor a LoRA adapter."""
    if not isinstance(name, str) or STORE.get(name) is None:
        return None
    models = serving.models
    if models.is_base_model(name) or name in getattr(models, "lora_requests", {}):
        return None
    return name


def apply(patch: Patch) -> None:
    from vllm.entrypoints.serve.engine import serving

    check(
        patch,
        {
            "BaseServing._check_model": ("self", "request"),
            "BaseServing._is_model_supported": ("self", "model_name"),
        },
    )
    cls = serving.BaseServing
    check_model = cls._check_model
    is_model_supported = cls._is_model_supported

    async def _check_model(self: Any, request: Any) -> Any:
        set_active(_soft_prompt_name(self, getattr(request, "model", None)))
        return await check_model(self, request)

    def _is_model_supported(self: Any, model_name: str | None) -> bool:
        return is_model_supported(self, model_name) or (
            _soft_prompt_name(self, model_name) is not None
        )

    cls._check_model = _check_model  # type: ignore[method-assign]
    cls._is_model_supported = _is_model_supported  # type: ignore[method-assign]

"""Patch of ``vllm/entrypoints/openai/models/serving.py``: list and name soft prompts.

What: ``/v1/models`` lists each soft prompt (``stores/soft_prompts.py``) as a model whose
``parent`` is the base model, as it lists LoRA adapters; responses to a request made to a soft
prompt carry its name in ``model``; with ``--enable-prompt-embeds`` every card also says what a
part must hold for the model (``prompt_embeds``: hidden size, dtypes, encodings, limits, the
model's embedding scale, the upload routes; ``model_rows.describe``). Why: ``OpenAIServingModels``
builds both from the base model paths and LoRA requests only, and no card says what a part
holds. When it can go: with the served-name hook that would let
``entrypoints_serve_engine_serving`` go.
"""

from __future__ import annotations

from typing import Any

from ..model_rows import describe
from ..stores.soft_prompts import STORE, active_name
from . import Patch, check


def apply(patch: Patch) -> None:
    from vllm.entrypoints.openai.models import serving
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

    check(
        patch,
        {
            "OpenAIServingModels.show_available_models": ("self",),
            "OpenAIServingModels.model_name": ("self", "lora_request"),
        },
    )
    cls = serving.OpenAIServingModels
    show_available_models = cls.show_available_models
    model_name = cls.model_name

    async def _show_available_models(self: Any) -> Any:
        listing = await show_available_models(self)
        rows = await describe(self.engine_client)
        listed = {card.id for card in listing.data}
        parent = self.base_model_paths[0].name
        for prompt in STORE.items():
            if prompt.name in listed:  # a base model or LoRA name shadows it
                continue
            listing.data.append(
                ModelCard(
                    id=prompt.name,
                    root=prompt.path,
                    parent=parent,
                    max_model_len=self.model_config.max_model_len,
                    permission=[ModelPermission()],
                )
            )
        if rows is not None:
            for card in listing.data:
                card.prompt_embeds = rows  # ModelCard takes extra fields (OpenAI's models do)
        return listing

    def _model_name(self: Any, lora_request: Any = None) -> str:
        if lora_request is None and (name := active_name()) is not None:
            return name
        return model_name(self, lora_request)

    cls.show_available_models = _show_available_models  # type: ignore[method-assign]
    cls.model_name = _model_name  # type: ignore[method-assign]

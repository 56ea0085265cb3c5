"""The chat renderer for ``--tokenizer-mode mistral`` (extends ``vllm/renderers/mistral.py``).

Why a subclass registered for the ``mistral`` mode: vLLM's ``MistralRenderer`` hands the
request's messages to ``mistral_common``, which refuses a prompt_embeds part. Ours takes the
parts out first (``parts``), gives ``mistral_common`` a marker text chunk in their place, and
finds each marker again in the token ids it returns (``marker_ids``): those positions become
placeholder spans, and the shared steps (``renderers.base``) hand the engine an embeds input.
A chat without prompt_embeds parts is rendered exactly as vLLM renders it.

The placeholder id is the tokenizer's ``<unk>``: a control token that no text and no chat
structure ever renders to, so it marks embedding positions unambiguously; those positions
carry token id 0 to the engine in any case.
"""

from __future__ import annotations

from typing import Any, cast

from vllm.renderers.inputs.preprocess import parse_dec_only_prompt
from vllm.renderers.mistral import (
    MistralRenderer,
    parse_chat_messages,
    parse_chat_messages_async,
    safe_apply_chat_template,
)

from .. import announce, errors
from ..errors import reject
from ..limits import Limits
from .base import SPANS_KEY, EmbedsRendererMixin
from .marker_ids import bound_markers, expand_marker_ids
from .parts import EmbedsPlan


class ChatEmbedsMistralRenderer(EmbedsRendererMixin, MistralRenderer):
    # The placeholder is Tekken's <unk>, a real id of the vocabulary: clients may send it.
    placeholder_reserved = False

    def __init__(self, config: Any, tokenizer: Any) -> None:
        super().__init__(config, tokenizer)
        self.embeds_enabled = self._embeds_flag(config.model_config)
        self.placeholder_id = None
        if tokenizer is not None and self.embeds_enabled:
            self.placeholder_id = _placeholder_id(tokenizer)
        self.limits = Limits.from_env()
        self._load_soft_prompts()
        announce()

    def _parse_kwargs(self, params: Any) -> dict[str, Any]:
        # As MistralRenderer parses: the conversation (echoed to clients) in string form.
        return {
            "content_format": "string",
            "media_io_kwargs": params.media_io_kwargs,
            "mm_processor_kwargs": params.mm_processor_kwargs,
        }

    def _finish(
        self, conversation: list[Any], rendered: Any, mm_data: Any, mm_uuids: Any, plan: Any
    ) -> tuple[list[Any], Any]:
        prompt = cast(dict[str, Any], parse_dec_only_prompt(rendered))
        if plan is not None:
            if mm_data:
                reject(errors.WITH_MULTIMODAL, modalities=", ".join(mm_data), mode="mistral")
            if "prompt_token_ids" not in prompt:
                raise RuntimeError("mistral_common rendered the chat to text, not token ids")
            tokenizer = self.get_tokenizer()
            ids, spans = expand_marker_ids(
                prompt["prompt_token_ids"],
                plan,
                encode=lambda text: tokenizer.encode(text, add_special_tokens=False),
                decode=tokenizer.decode,
                placeholder_id=cast(int, self.placeholder_id),
                dropped=self.limits.dropped_parts,
            )
            prompt["prompt_token_ids"] = ids
            prompt[SPANS_KEY] = spans
            conversation = plan.scrub(conversation)  # vLLM echoes it back to clients
        if mm_data is not None:
            prompt["multi_modal_data"] = mm_data
        if mm_uuids is not None:
            prompt["multi_modal_uuids"] = mm_uuids
        return conversation, prompt

    @staticmethod
    def _for_mistral(messages: list[Any], plan: EmbedsPlan | None) -> list[Any]:
        return messages if plan is None else bound_markers(messages, plan)

    def render_messages(self, messages: list[Any], params: Any) -> tuple[list[Any], Any]:
        messages, plan = self._take_parts(messages, params)
        conversation, mm_data, mm_uuids = parse_chat_messages(
            messages, self.model_config, **self._parse_kwargs(params)
        )
        rendered = safe_apply_chat_template(
            self.get_tokenizer(),
            self._for_mistral(messages, plan),
            **params.get_apply_chat_template_kwargs(),
        )
        return self._finish(conversation, rendered, mm_data, mm_uuids, plan)

    async def render_messages_async(
        self, messages: list[Any], params: Any
    ) -> tuple[list[Any], Any]:
        messages, plan = await self._take_parts_async(messages, params)
        conversation, mm_data, mm_uuids = await parse_chat_messages_async(
            messages, self.model_config, **self._parse_kwargs(params)
        )
        rendered = await self._apply_chat_template_async(
            self.get_tokenizer(),
            self._for_mistral(messages, plan),
            **params.get_apply_chat_template_kwargs(),
        )
        return self._finish(conversation, rendered, mm_data, mm_uuids, plan)


def _placeholder_id(tokenizer: Any) -> int:
    """The ``<unk>`` id, checked to be a control token (never produced from text)."""
    token_id = int(tokenizer.tokenizer.unk_id)
    if token_id not in tokenizer.all_special_ids:
        raise RuntimeError(
            f"vllm-chat-embeds expected <unk> (id {token_id}) to be a special token of this "
            "Mistral tokenizer; it is not, so it cannot mark prompt_embeds positions."
        )
    return token_id

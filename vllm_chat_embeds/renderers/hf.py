"""The chat renderer for Hugging Face templates (extends ``vllm/renderers/hf.py``).

Why a subclass registered for the ``hf`` tokenizer mode: vLLM builds one renderer per process
from ``RENDERER_REGISTRY``, and both ``vllm serve`` and ``LLM.chat()`` go through it. Our
subclass keeps every piece of ``HfRenderer`` that is not about prompt_embeds and replaces the
pieces that are; none of the built-in prompt_embeds helpers is called.

Flow: parts -> marker text parts (``parts``) -> vLLM's own message parsing and template
rendering, always to text -> markers become placeholder runs (``splice``) -> vLLM tokenizes as
for any chat -> ``_process_tokens`` finds the spans and hands the engine an embeds input.
A chat without prompt_embeds parts takes vLLM's ordinary text path unchanged.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any, Final, cast

from vllm.renderers.base import BaseRenderer
from vllm.renderers.hf import (
    HfRenderer,
    parse_chat_messages,
    parse_chat_messages_async,
    rebuild_mm_uuids_from_mm_data,
    replace_vision_chunk_video_placeholder,
    resolve_chat_template_content_format,
    safe_apply_chat_template,
)
from vllm.renderers.inputs.preprocess import parse_dec_only_prompt
from vllm.tokenizers.hf import maybe_make_thread_pool
from vllm.utils.async_utils import make_async

from .. import announce, errors
from ..errors import reject
from ..limits import Limits
from ..placeholder import with_placeholder_token
from .base import SPANS_KEY, EmbedsRendererMixin
from .parts import EmbedsPlan
from .splice import EMBEDS_MODALITY, add_embeds_items, cut_embeds_items, expand_markers
from .truncation import cut_side

# Media that may share a request with prompt_embeds parts (tested end to end on Idefics3).
MEDIA_WITH_EMBEDS: Final = frozenset({"image"})


class ChatEmbedsHfRenderer(EmbedsRendererMixin, HfRenderer):
    def __init__(self, config: Any, tokenizer: Any) -> None:
        # HfRenderer.__init__ registers the built-in placeholder; we set up what it sets up,
        # but with our own placeholder registration.
        model_config = config.model_config
        self.embeds_enabled = self._embeds_flag(model_config)
        self.placeholder_id: int | None = None
        if tokenizer is not None and self.embeds_enabled:
            tokenizer, self.placeholder_id = with_placeholder_token(tokenizer)
        else:
            tokenizer = copy.copy(tokenizer)
        BaseRenderer.__init__(self, config, tokenizer)
        self.use_unified_vision_chunk = getattr(
            model_config.hf_config, "use_unified_vision_chunk", False
        )
        self._apply_chat_template_async = make_async(
            safe_apply_chat_template, executor=self._executor
        )
        if self.tokenizer is not None:
            maybe_make_thread_pool(self.tokenizer, model_config.renderer_num_workers + 1)
        self.limits = Limits.from_env()
        self._load_soft_prompts()
        announce()

    # -- rendering ----------------------------------------------------------------------------

    def _parse_kwargs(self, params: Any) -> dict[str, Any]:
        content_format = resolve_chat_template_content_format(
            chat_template=params.chat_template,
            tools=params.chat_template_kwargs.get("tools"),
            given_format=params.chat_template_content_format,
            tokenizer=self.get_tokenizer(),
            model_config=self.model_config,
        )
        return {
            "content_format": content_format,
            "media_io_kwargs": params.media_io_kwargs,
            "mm_processor_kwargs": params.mm_processor_kwargs,
        }

    @staticmethod
    def _template_kwargs(params: Any) -> dict[str, Any]:
        # Render to text, as vLLM does for chats when --enable-prompt-embeds is off: the
        # request's tokenization options (add_special_tokens, truncation) then apply as usual.
        return {**params.get_apply_chat_template_kwargs(), "tokenize": False}

    def _finish(
        self,
        conversation: list[Any],
        rendered: Any,
        mm_data: Any,
        mm_uuids: Any,
        plan: EmbedsPlan | None,
    ) -> tuple[list[Any], Any]:
        if self.use_unified_vision_chunk and mm_data is not None and mm_uuids is not None:
            # Kimi-K2.5's unified vision chunks, handled as HfRenderer handles them.
            video_placeholder = getattr(self.model_config.hf_config, "video_placeholder", None)
            mm_uuids = rebuild_mm_uuids_from_mm_data(mm_uuids, mm_data)
            rendered = replace_vision_chunk_video_placeholder(rendered, mm_data, video_placeholder)
        prompt = cast(dict[str, Any], parse_dec_only_prompt(rendered))
        if plan is not None:
            if mm_data:
                _check_media(mm_data)
            text, spans = expand_markers(prompt["prompt"], plan, self.limits.dropped_parts)
            prompt["prompt"] = text
            prompt[SPANS_KEY] = spans
            conversation = plan.scrub(conversation)  # vLLM echoes it back to clients
        if mm_data is not None:
            prompt["multi_modal_data"] = mm_data
        if mm_uuids is not None:
            prompt["multi_modal_uuids"] = mm_uuids
        return _echo_ready(conversation), prompt

    def render_messages(self, messages: list[Any], params: Any) -> tuple[list[Any], Any]:
        messages, plan = self._take_parts(messages, params)
        conversation, mm_data, mm_uuids = parse_chat_messages(
            messages, self.model_config, **self._parse_kwargs(params)
        )
        rendered = safe_apply_chat_template(
            self.model_config, self.get_tokenizer(), conversation, **self._template_kwargs(params)
        )
        return self._finish(conversation, rendered, mm_data, mm_uuids, plan)

    async def render_messages_async(
        self, messages: list[Any], params: Any
    ) -> tuple[list[Any], Any]:
        messages, plan = await self._take_parts_async(messages, params)
        conversation, mm_data, mm_uuids = await parse_chat_messages_async(
            messages, self.model_config, **self._parse_kwargs(params)
        )
        rendered = await self._render_with_timeout(
            self._apply_chat_template_async(
                self.model_config,
                self.get_tokenizer(),
                conversation,
                **self._template_kwargs(params),
            )
        )
        return self._finish(conversation, rendered, mm_data, mm_uuids, plan)

    # -- engine input -------------------------------------------------------------------------

    def _add_embeds_items(self, engine_input: Any, spans: list[Any]) -> Any:
        """Parts beside images: the image processor has run; add each part as an item."""
        assert self.placeholder_id is not None
        return add_embeds_items(
            engine_input,
            spans,
            self.placeholder_id,
            hasher=self.model_config.get_multimodal_config().mm_hasher_algorithm,
        )

    def _process_tokens(self, prompt: Any, *, skip_mm_cache: bool = False) -> Any:
        self._ready_spans(prompt)  # before images: the soft prompt is a span like a part's
        spans = _media_spans(prompt)
        engine_input = super()._process_tokens(prompt, skip_mm_cache=skip_mm_cache)
        return engine_input if spans is None else self._add_embeds_items(engine_input, spans)

    async def _process_tokens_async(self, prompt: Any, *, skip_mm_cache: bool = False) -> Any:
        self._ready_spans(prompt)
        spans = _media_spans(prompt)
        engine_input = await super()._process_tokens_async(prompt, skip_mm_cache=skip_mm_cache)
        if spans is None:
            return engine_input
        # Hashing the rows is CPU work: keep it off the event loop.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._add_embeds_items, engine_input, spans
        )

    def _truncate_expanded_prompt(self, engine_input: Any, params: Any) -> None:
        """Parts beside images, cut again after the image processor expanded the prompt.

        vLLM re-applies the truncation once images are expanded and refuses a cut through any
        multimodal item; our parts ride as items there, but are cut as their positions' text
        would be (``splice.cut_embeds_items``), while a cut image is still vLLM's 400.
        """
        placeholders = (
            engine_input.get("mm_placeholders") if engine_input["type"] == "multimodal" else None
        )
        ours = placeholders.pop(EMBEDS_MODALITY, None) if placeholders else None
        if not ours:
            super()._truncate_expanded_prompt(engine_input, params)
            return
        before = len(engine_input["prompt_token_ids"])
        super()._truncate_expanded_prompt(engine_input, params)
        after = len(engine_input["prompt_token_ids"])
        start = before - after if cut_side(params, self.tokenizer) == "left" else 0
        cut_embeds_items(
            engine_input,
            ours,
            start,
            start + after,
            hasher=self.model_config.get_multimodal_config().mm_hasher_algorithm,
        )


def _check_media(mm_data: Any) -> None:
    """Parts beside images are served; beside other media (untested), a 400 naming them."""
    others = sorted(str(m) for m in mm_data if m not in MEDIA_WITH_EMBEDS)
    if others:
        reject(errors.WITH_MULTIMODAL, modalities=", ".join(others), mode="hf")


def _media_spans(prompt: Any) -> list[Any] | None:
    """Take the parts of a prompt that also has media; the rest is left to the embeds path.

    With media the prompt stays a token prompt through vLLM's image processor, and the parts
    are added to its multimodal result afterwards (``splice.add_embeds_items``).
    """
    if not prompt.get("multi_modal_data"):
        return None
    return cast(dict[str, Any], prompt).pop(SPANS_KEY, None) or None


def _echo_ready(conversation: list[Any]) -> list[Any]:
    """The conversation with a text-only list as the last message's content joined to a string.

    vLLM echoes the last message from this conversation. Its non-streaming echo joins text
    parts with newlines; its streaming echo puts the list itself into a string field and fails
    (an error event, even without prompt_embeds). Joining here makes both give the same text.
    """
    if not conversation:
        return conversation
    last = conversation[-1]
    content = last.get("content") if isinstance(last, dict) else None
    if not isinstance(content, list) or not all(
        isinstance(p, dict) and p.get("type") == "text" for p in content
    ):
        return conversation
    joined = "\n".join(str(p.get("text", "")) for p in content)
    return [*conversation[:-1], {**last, "content": joined}]

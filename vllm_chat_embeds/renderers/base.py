"""What every chat renderer the plugin serves does with prompt_embeds parts (extends
``vllm/renderers/base.py``).

Why a mixin: vLLM picks one renderer class per tokenizer mode (``hf``, ``mistral``, ...), and
each renders a chat its own way (a Jinja template to text, or ``mistral_common`` straight to
token ids). Taking the parts out of the messages before rendering, and turning placeholder
spans into the engine's embeds input after tokenization, are the same for all of them and live
here once. A renderer using it sets ``embeds_enabled``, ``placeholder_id`` and ``limits``, and
leaves the spans under ``SPANS_KEY`` on the prompt dict it renders.
"""

from __future__ import annotations

import asyncio
from functools import cached_property
from typing import Any, Final, cast

import torch
from vllm.renderers.base import BaseRenderer

from .. import errors
from ..errors import reject
from ..kv_transfer.connectors import part_min_rows
from ..limits import Limits
from ..payload import PayloadSpec
from ..stores import shared_store, soft_prompts
from .parts import (
    EmbedsPlan,
    extract_parts,
    first_embeds_part,
    has_embeds_data,
    reject_reserved_text,
    reserve_placeholder_text,
)
from .splice import EMBED_ROW_TOKEN_ID, build_embeds_input
from .truncation import CUT_KEY, added_special_ids, cut_side, kept_spans

# Private key under which the part tensors ride on the prompt dict from rendering to
# `_process_tokens`, through vLLM's tokenization (which keeps unknown keys).
SPANS_KEY: Final = "_vllm_chat_embeds_spans"
# Set on a prompt dict once the request's soft prompt (model name) has been put before it.
SOFT_PROMPT_KEY: Final = "_vllm_chat_embeds_soft_prompt"


class EmbedsRendererMixin:
    """Parts in, embeds engine input out; mixed in before a vLLM renderer class."""

    model_config: Any
    _executor: Any
    embeds_enabled: bool
    placeholder_id: int | None
    # Whether the placeholder id is ours alone (an added token, maybe past the model's
    # vocabulary), so token ids from clients must not hold it.
    placeholder_reserved: bool = True
    limits: Limits

    @cached_property
    def payload_spec(self) -> PayloadSpec:
        max_rows = min(self.limits.max_rows, self.model_config.max_model_len)
        min_rows, connector = part_min_rows(cast(Any, self).config)
        return PayloadSpec(
            min_rows=min_rows,
            min_rows_connector=connector,
            width=self.model_config.get_hidden_size(),
            dtype=self.model_config.dtype,
            max_part_bytes=self.limits.max_part_bytes,
            max_rows=max_rows,
            rows_limit=max_rows,
            encodings=self.limits.encodings,
        )

    @staticmethod
    def _embeds_flag(model_config: Any) -> bool:
        """``--enable-prompt-embeds``; when on, this process reserves the placeholder string
        (request validators that run before any renderer, /v1/responses', check it too)."""
        enabled = bool(getattr(model_config, "enable_prompt_embeds", False))
        if enabled:
            reserve_placeholder_text()
        return enabled

    def _load_soft_prompts(self) -> None:
        """Read ``CHAT_EMBEDS_SOFT_PROMPTS`` for this model, once per process (startup errors
        name the entry). Called by every renderer's ``__init__``: renderers are built in every
        process that renders, for ``vllm serve`` and ``LLM`` alike."""
        enabled = self.embeds_enabled and self.placeholder_id is not None
        soft_prompts.STORE.configure(self.model_config, embeds_enabled=enabled)
        if enabled:
            shared_store.bind_model(self.model_config)

    def _tokenize_singleton_prompt(self, prompt: Any, params: Any) -> Any:
        from_text = isinstance(prompt, dict) and "prompt_token_ids" not in prompt
        tokenized = super()._tokenize_singleton_prompt(prompt, params)  # type: ignore[misc]
        self._note_cut(tokenized, params, from_text)
        return tokenized

    async def _tokenize_singleton_prompt_async(self, prompt: Any, params: Any) -> Any:
        from_text = isinstance(prompt, dict) and "prompt_token_ids" not in prompt
        tokenized = await super()._tokenize_singleton_prompt_async(  # type: ignore[misc]
            prompt, params
        )
        self._note_cut(tokenized, params, from_text)
        return tokenized

    def _note_cut(self, prompt: Any, params: Any, from_text: bool) -> None:
        """A prompt with parts that the request truncates: remember from which side, and the
        special ids the tokenizer added after cutting (only to a text it tokenized)."""
        if isinstance(prompt, dict) and prompt.get(SPANS_KEY):
            tokenizer = cast(Any, self).tokenizer
            side = cut_side(params, tokenizer)
            if side is not None:
                edge = added_special_ids(tokenizer, params) if from_text else ()
                prompt[CUT_KEY] = (side, edge)

    def _ready_spans(self, prompt: Any) -> None:
        """The steps between tokenization and the engine input, for every renderer: the rows
        truncation kept (``truncation``), then the soft prompt before them all."""
        prompt = cast(dict[str, Any], prompt)
        cut = prompt.pop(CUT_KEY, None)
        if cut is not None and prompt.get(SPANS_KEY):
            assert self.placeholder_id is not None
            side, edge = cut
            prompt[SPANS_KEY] = kept_spans(
                prompt["prompt_token_ids"], prompt[SPANS_KEY], self.placeholder_id, side, edge
            )
        self._prepend_soft_prompt(prompt)

    def _prepend_soft_prompt(self, prompt: Any) -> None:
        """Put the soft prompt named as the request's model before the whole prompt.

        Its rows become the first span, before BOS and the template's first token, where
        ``PeftModel.generate`` puts them; the parts' spans follow.
        """
        prompt = cast(dict[str, Any], prompt)
        if prompt.get(SOFT_PROMPT_KEY) or (soft := soft_prompts.active()) is None:
            return
        assert self.placeholder_id is not None  # the store loads nothing without it
        prompt[SOFT_PROMPT_KEY] = True
        ids = list(prompt["prompt_token_ids"])
        prompt["prompt_token_ids"] = [self.placeholder_id] * soft.num_virtual_tokens + ids
        prompt[SPANS_KEY] = [soft.rows, *(prompt.get(SPANS_KEY) or [])]

    # -- prompt_embeds parts ------------------------------------------------------------------

    def _take_parts(self, messages: list[Any], params: Any) -> tuple[list[Any], EmbedsPlan | None]:
        if self.embeds_enabled:
            kwargs = {k: v for k, v in params.chat_template_kwargs.items() if k != "tools"}
            reject_reserved_text(messages, params.chat_template_kwargs.get("tools"), kwargs)
        return extract_parts(
            messages,
            enabled=self.embeds_enabled and self.placeholder_id is not None,
            spec=self.payload_spec,
            limits=self.limits,
        )

    async def _take_parts_async(
        self, messages: list[Any], params: Any
    ) -> tuple[list[Any], EmbedsPlan | None]:
        # No parts, or parts by uuid only: no decoding; but with a shared row store, a part by
        # uuid may wait on the store, which must not block the event loop.
        if shared_store.active() is None:
            inline = not has_embeds_data(messages)
        else:
            inline = first_embeds_part(messages) is None
        if inline:
            return self._take_parts(messages, params)
        # Decoding is CPU work: keep it off the event loop.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._take_parts, messages, params)

    # -- engine input -------------------------------------------------------------------------

    def _embeds_or_none(self, prompt: Any) -> Any:
        spans = cast(dict[str, Any], prompt).pop(SPANS_KEY, None)
        if not spans:  # no parts, or every part dropped by the template (policy "warn")
            return None
        assert self.placeholder_id is not None
        return build_embeds_input(
            prompt["prompt_token_ids"],
            spans,
            self.placeholder_id,
            cache_salt=prompt.get("cache_salt"),
            compact=self.limits.compact,
        )

    def _process_tokens(self, prompt: Any, *, skip_mm_cache: bool = False) -> Any:
        self._ready_spans(prompt)
        engine_input = self._embeds_or_none(prompt)
        if engine_input is not None:
            return engine_input
        # BaseRenderer's, not HfRenderer's: the latter exists only for built-in prompt_embeds.
        return BaseRenderer._process_tokens(
            cast(BaseRenderer, self), prompt, skip_mm_cache=skip_mm_cache
        )

    async def _process_tokens_async(self, prompt: Any, *, skip_mm_cache: bool = False) -> Any:
        self._ready_spans(prompt)
        engine_input = self._embeds_or_none(prompt)
        if engine_input is not None:
            return engine_input
        return await BaseRenderer._process_tokens_async(
            cast(BaseRenderer, self), prompt, skip_mm_cache=skip_mm_cache
        )

    # -- embeds prompts and token ids from clients ---------------------------------------------

    def _process_embeds(self, prompt: Any) -> Any:
        """Embeds prompts given directly (``LLM.generate``): check the ids they carry.

        vLLM validates ids of token prompts only; an embeds prompt whose ``prompt_token_ids``
        hold an id past the vocabulary at a token position kills the engine. Ids at embedding
        positions are never looked up as tokens: they are set to 0, as for our chat prompts.
        """
        engine_input = super()._process_embeds(prompt)  # type: ignore[misc]
        self._prepend_soft_prompt_rows(engine_input)
        ids = engine_input.get("prompt_token_ids")
        if ids is None:
            return engine_input
        rows = int(engine_input["prompt_embeds"].shape[0])
        if len(ids) != rows:
            reject(errors.IDS_LENGTH, parameter="prompt_token_ids", ids=len(ids), rows=rows)
        mask = engine_input.get("is_token_ids")
        if mask is None:  # every row is an embedding; say so, so prompt logprobs are masked
            mask = engine_input["is_token_ids"] = [False] * rows
        elif len(mask) != rows:
            reject(errors.MASK_LENGTH, parameter="prompt_is_token_ids", mask=len(mask), rows=rows)
        token_ids = [i for i, is_token in zip(ids, mask, strict=True) if is_token]
        BaseRenderer.validate_token_ids(
            cast(BaseRenderer, self), token_ids, parameter="prompt_token_ids"
        )
        engine_input["prompt_token_ids"] = [
            i if is_token else EMBED_ROW_TOKEN_ID for i, is_token in zip(ids, mask, strict=True)
        ]
        return engine_input

    def _prepend_soft_prompt_rows(self, engine_input: Any) -> None:
        """An embeds prompt given by the client, served by a soft prompt's name: its rows go
        first, as embedding positions."""
        soft = soft_prompts.active()
        if soft is None:
            return
        embeds = engine_input["prompt_embeds"]
        n = soft.num_virtual_tokens
        dtype = torch.promote_types(soft.rows.dtype, embeds.dtype)  # never narrows either
        engine_input["prompt_embeds"] = torch.cat([soft.rows.to(dtype), embeds.to(dtype)])
        ids = engine_input.get("prompt_token_ids")
        if ids is None:
            return
        mask = engine_input.get("is_token_ids")
        engine_input["prompt_token_ids"] = [EMBED_ROW_TOKEN_ID] * n + list(ids)
        engine_input["is_token_ids"] = [False] * n + list(
            mask if mask is not None else [False] * len(ids)
        )

    def validate_token_ids(self, token_ids: Any, *, parameter: str | None = None) -> None:
        super().validate_token_ids(token_ids, parameter=parameter)  # type: ignore[misc]
        # Our embeds inputs never reach here (vLLM validates ids of token inputs only), so a
        # placeholder id here was sent by a client and would index past the embedding table.
        reserved = self.placeholder_id if self.placeholder_reserved else None
        if reserved is not None and reserved in token_ids:
            reject(
                errors.PLACEHOLDER_IN_TOKEN_IDS,
                parameter=parameter or "prompt_token_ids",
                token_id=self.placeholder_id,
            )

"""prompt_embeds parts for vLLM's other chat renderers, by one wrapper (extends
``vllm/renderers/{deepseek_v32,deepseek_v4,kimi_k3,cohere,inkling}.py``).

Why one wrapper instead of a subclass per mode: these renderers differ only in how they turn
messages into a prompt (DeepSeek's and Kimi's Python encoders, Cohere's ``cohere_melody``,
Inkling's token writer); all of them put message text into the prompt as they got it and
tokenize with an ordinary Hugging Face tokenizer, either themselves (token ids out) or later
through vLLM (text out). So each part can stand in the messages as a text that survives any of
them: the part's marker (``parts``) between two ``<prompt_embeds>`` placeholder tokens. The
placeholder is a special token of our private tokenizer copy (``placeholder``), so the
tokenizer splits there and the text around a part is tokenized exactly as it would be around
the part's rows; no text can contain it (``parts.reject_reserved_text``). After vLLM's own
rendering, each bounded marker, found as text or as ids, becomes one placeholder per row, and
the shared steps (``renderers.base``) hand the engine an embeds input. A chat without parts is
rendered by vLLM's class untouched.

Served classes are built on first use (module ``__getattr__``), so a mode whose optional
dependency is missing (``cohere_melody``) costs nothing until it is used.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import torch

from .. import announce, errors
from ..compat.vllm_api import locate
from ..errors import reject
from ..limits import DroppedPolicy, Limits
from ..placeholder import PLACEHOLDER_TOKEN, with_placeholder_token
from .base import SPANS_KEY, EmbedsRendererMixin
from .parts import EmbedsPlan
from .registry import LazyClasses
from .splice import apply_dropped_policy, expand_markers

# Our class name -> the vLLM renderer (module, class) it wraps.
WRAPPED: Final = {
    "ChatEmbedsDeepseekV32Renderer": ("vllm.renderers.deepseek_v32", "DeepseekV32Renderer"),
    "ChatEmbedsDeepseekV4Renderer": ("vllm.renderers.deepseek_v4", "DeepseekV4Renderer"),
    # Its own class from vLLM 0.33 on; DeepseekV4Renderer before (``compat.vllm_api``).
    "ChatEmbedsDeepseekV41Renderer": locate("vllm.renderers.deepseek_v4:DeepseekV41Renderer"),
    "ChatEmbedsKimiK3Renderer": ("vllm.renderers.kimi_k3", "KimiK3Renderer"),
    "ChatEmbedsCohereRenderer": ("vllm.renderers.cohere", "CohereRenderer"),
    "ChatEmbedsInklingRenderer": ("vllm.renderers.inkling", "InklingRenderer"),
}


def bounded(marker: str) -> str:
    """The text standing for a part in the messages a wrapped renderer gets."""
    return f"{PLACEHOLDER_TOKEN}{marker}{PLACEHOLDER_TOKEN}"


def map_markers(value: Any, plan: EmbedsPlan, repl: Callable[[str], str]) -> Any:
    """``value`` (strings, lists, dicts) with each marker of ``plan`` (and its bounds, if
    present) replaced by ``repl(marker)``."""
    if isinstance(value, str):
        if plan.nonce not in value:
            return value
        ph = re.escape(PLACEHOLDER_TOKEN)
        pattern = re.compile(f"(?:{ph})?({plan.any_marker.pattern})(?:{ph})?")
        return pattern.sub(lambda m: repl(m.group(1)), value)
    if isinstance(value, list):
        return [map_markers(v, plan, repl) for v in value]
    if isinstance(value, dict):
        return {k: map_markers(v, plan, repl) for k, v in value.items()}
    return value


def expand_bounded_ids(
    ids: Sequence[int],
    plan: EmbedsPlan,
    placeholder_id: int,
    decode: Callable[[Sequence[int]], str],
    dropped: DroppedPolicy,
) -> tuple[list[int], list[torch.Tensor]]:
    """Replace each ``placeholder, marker ids..., placeholder`` run by one placeholder per row.

    The ids between two placeholders are decoded and must spell a marker of this plan; a lone
    placeholder, an unknown marker, or the plan's nonce left anywhere else is a 400.
    """
    by_marker = {part.marker: part for part in plan.parts}
    ends = [i for i, token in enumerate(ids) if token == placeholder_id]
    if len(ends) % 2:
        reject(errors.MARKER_MANGLED)
    out: list[int] = []
    spans: list[torch.Tensor] = []
    seen: set[str] = set()
    last = 0
    for start, end in zip(ends[::2], ends[1::2], strict=True):
        part = by_marker.get(decode(ids[start + 1 : end]).strip())
        if part is None:
            reject(errors.MARKER_MANGLED)
        out.extend(ids[last:start])
        out.extend([placeholder_id] * int(part.tensor.shape[0]))
        spans.append(part.tensor)
        seen.add(part.marker)
        last = end + 1
    out.extend(ids[last:])
    if plan.nonce in decode([i for i in out if i != placeholder_id]).lower():
        reject(errors.MARKER_MANGLED)  # a marker rendered without its placeholders
    apply_dropped_policy(plan, seen, dropped)
    return out, spans


class GenericEmbedsMixin(EmbedsRendererMixin):
    """Mixed in before a vLLM renderer class that renders messages to text or token ids."""

    def __init__(self, config: Any, tokenizer: Any) -> None:
        self.embeds_enabled = self._embeds_flag(config.model_config)
        self.placeholder_id: int | None = None
        if tokenizer is not None and self.embeds_enabled:
            tokenizer, self.placeholder_id = with_placeholder_token(tokenizer)
        super().__init__(config, tokenizer)  # type: ignore[call-arg]
        self.limits = Limits.from_env()
        self._load_soft_prompts()
        announce()

    def _finish(self, conversation: Any, prompt: Any, plan: EmbedsPlan) -> tuple[Any, Any]:
        prompt = cast(dict[str, Any], prompt)
        if prompt.get("multi_modal_data"):
            reject(
                errors.WITH_MULTIMODAL,
                modalities=", ".join(map(str, prompt["multi_modal_data"])),
                mode=cast(Any, self).model_config.tokenizer_mode,
            )
        dropped = self.limits.dropped_parts
        if "prompt_token_ids" in prompt:
            tokenizer = cast(Any, self).get_tokenizer()
            ids, spans = expand_bounded_ids(
                prompt["prompt_token_ids"],
                plan,
                cast(int, self.placeholder_id),
                tokenizer.decode,
                dropped,
            )
            prompt["prompt_token_ids"] = ids
            prompt.pop("prompt", None)  # stale text, if the renderer kept one
        else:
            text = map_markers(prompt["prompt"], plan, lambda marker: marker)
            prompt["prompt"], spans = expand_markers(text, plan, dropped)
        prompt[SPANS_KEY] = spans
        # vLLM echoes the conversation back to clients: no markers, no placeholders in it.
        return plan.scrub(map_markers(conversation, plan, lambda marker: marker)), prompt

    def render_messages(self, messages: list[Any], params: Any) -> tuple[Any, Any]:
        messages, plan = self._take_parts(messages, params)
        if plan is None:
            return super().render_messages(messages, params)  # type: ignore[misc]
        conversation, prompt = super().render_messages(  # type: ignore[misc]
            map_markers(messages, plan, bounded), params
        )
        return self._finish(conversation, prompt, plan)

    async def render_messages_async(self, messages: list[Any], params: Any) -> tuple[Any, Any]:
        messages, plan = await self._take_parts_async(messages, params)
        if plan is None:
            return await super().render_messages_async(messages, params)  # type: ignore[misc]
        conversation, prompt = await super().render_messages_async(  # type: ignore[misc]
            map_markers(messages, plan, bounded), params
        )
        return self._finish(conversation, prompt, plan)


def wrap(base: type) -> type:
    """``base`` (a vLLM renderer class) serving prompt_embeds parts."""
    return type(
        f"ChatEmbeds{base.__name__}",
        (GenericEmbedsMixin, base),
        {"__module__": __name__, "__doc__": f"vLLM's {base.__name__}, with prompt_embeds parts."},
    )


_CLASSES: Final = LazyClasses(lambda base, name: wrap(base))
_CLASSES.origins.update(WRAPPED)
__getattr__ = _CLASSES.get

"""Tokenizer modes whose chat renderer does not support prompt_embeds parts yet.

Extends ``vllm/renderers/registry.py``. Why: the renderers of vLLM 0.32 that the plugin does
not serve (today ``kimi_audio`` and ``terratorch``; ``renderers.generic`` serves DeepSeek, Kimi
K3, Cohere and Inkling) answer a prompt_embeds part with an unrelated error or pass it to a
multimodal path. Here each is
registered as a subclass that refuses such a part up front with a 400 naming the tokenizer
mode, and otherwise behaves exactly like vLLM's class. Classes are built on first use
(module ``__getattr__``), so a mode whose optional dependencies are missing costs nothing
until it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Final

from .. import errors
from ..errors import reject
from .parts import first_embeds_part

PREFIX: Final = "Refusing"


def refusing_class(base: type, mode: str) -> type:
    """A subclass of ``base`` that refuses prompt_embeds parts for tokenizer mode ``mode``."""

    def _check(messages: list[Any]) -> None:
        where = first_embeds_part(messages)
        if where is not None:
            reject(errors.MODE_UNSUPPORTED, where=where, mode=mode)

    def render_messages(self: Any, messages: list[Any], params: Any) -> Any:
        _check(messages)
        return base.render_messages(self, messages, params)

    async def render_messages_async(self: Any, messages: list[Any], params: Any) -> Any:
        _check(messages)
        return await base.render_messages_async(self, messages, params)

    namespace = {
        "__module__": __name__,
        "__doc__": f"vLLM's {base.__name__}, refusing prompt_embeds parts ({mode!r} mode).",
        "render_messages": render_messages,
        "render_messages_async": render_messages_async,
    }
    return type(f"{PREFIX}{base.__name__}", (base,), namespace)


class LazyClasses:
    """Renderer classes derived from vLLM ones on first use, for a module ``__getattr__``.

    Why lazily: the registry names our classes at start-up, but a vLLM renderer module may
    need optional packages (``cohere_melody``); building only what a process uses keeps a
    missing one from costing anything until its mode is chosen.
    """

    def __init__(self, build: Callable[[type, str], type]) -> None:
        self.origins: dict[str, tuple[str, str]] = {}  # our class name -> vLLM (module, class)
        self._build = build
        self._built: dict[str, type] = {}

    def get(self, name: str) -> type:
        if name not in self._built:
            if name not in self.origins:
                raise AttributeError(name)
            module, class_name = self.origins[name]
            base = getattr(importlib.import_module(module), class_name)
            self._built[name] = self._build(base, name)
        return self._built[name]


# Refusing subclasses, built on first use from the vLLM classes ``take_over`` found.
_CLASSES: Final = LazyClasses(lambda base, name: refusing_class(base, name.rsplit("__", 1)[1]))


def take_over(renderers: dict[str, tuple[str, str]]) -> list[str]:
    """Point every mode we do not serve at a refusing subclass; return those modes."""
    from .. import RENDERER_MODES

    modes = []
    for mode, (module, class_name) in list(renderers.items()):
        if mode in RENDERER_MODES or module.startswith("vllm_chat_embeds"):
            continue
        ours = f"{PREFIX}{class_name}__{mode}"
        _CLASSES.origins[ours] = (module, class_name)
        renderers[mode] = (__name__, ours)
        modes.append(mode)
    return modes


__getattr__ = _CLASSES.get

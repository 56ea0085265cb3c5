"""vllm-chat-embeds: pre-computed prompt embeddings inside chat conversations, as a vLLM plugin.

The one way in is ``register()``, run by vLLM in every process through the
``vllm.general_plugins`` entry point ``chat_embeds``.
"""

from __future__ import annotations

from typing import Final

__version__: Final = "0.1.0"

RENDERER_MODES: Final = ("hf",)

_registered = False


def register() -> None:
    """Check the vLLM version, then route Hugging Face chat rendering through our renderer.

    Cheap and idempotent: vLLM calls it in the API server, the engine core and every worker.
    """
    global _registered
    if _registered:
        return

    from .version_gate import check_vllm_version

    check_vllm_version(__version__)

    from vllm.logger import init_logger
    from vllm.renderers.registry import RENDERER_REGISTRY

    ours = (f"{__name__}.renderer", "ChatEmbedsHfRenderer")
    for mode in RENDERER_MODES:
        if RENDERER_REGISTRY.renderers.get(mode) != ours:
            # vLLM logs a warning that the built-in entry is overwritten: that is the point.
            RENDERER_REGISTRY.register(mode, *ours)
    _registered = True
    init_logger(__name__).info(
        "vllm_chat_embeds %s active: chat prompt_embeds handled by the plugin", __version__
    )

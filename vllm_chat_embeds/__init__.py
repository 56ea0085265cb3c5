"""vllm-chat-embeds: pre-computed prompt embeddings inside chat conversations, as a vLLM plugin.

The one way in is ``register()``, run by vLLM in every process through the
``vllm.general_plugins`` entry point ``chat_embeds``.
"""

from __future__ import annotations

from typing import Any, Final

__version__: Final = "0.1.0"

# Tokenizer mode -> (our module, our renderer class) serving prompt_embeds parts in that mode.
RENDERERS: Final = {
    "hf": ("renderers.hf", "ChatEmbedsHfRenderer"),
    "mistral": ("renderers.mistral", "ChatEmbedsMistralRenderer"),
    # vLLM's other renderers, each wrapped by the one generic mixin (``renderers.generic``).
    "deepseek_v32": ("renderers.generic", "ChatEmbedsDeepseekV32Renderer"),
    "deepseek_v4": ("renderers.generic", "ChatEmbedsDeepseekV4Renderer"),
    "deepseek_v41": ("renderers.generic", "ChatEmbedsDeepseekV41Renderer"),
    "kimi_k3": ("renderers.generic", "ChatEmbedsKimiK3Renderer"),
    "cohere": ("renderers.generic", "ChatEmbedsCohereRenderer"),
    "inkling": ("renderers.generic", "ChatEmbedsInklingRenderer"),
}
RENDERER_MODES: Final = tuple(RENDERERS)

_registered = False


def soft_prompt(name: str):  # -> contextlib.AbstractContextManager[SoftPrompt]
    """Offline: serve a soft prompt as the model, as ``"model": name`` does online.

    ``with vllm_chat_embeds.soft_prompt("sentiment"): llm.chat(messages, params)`` puts the
    soft prompt's rows before every prompt rendered in the block (``LLM.chat`` and
    ``LLM.generate``); ``CHAT_EMBEDS_SOFT_PROMPTS`` names the soft prompts, read when the
    ``LLM`` is built.
    """
    from .stores.soft_prompts import soft_prompt as _soft_prompt

    return _soft_prompt(name)


def load_soft_prompt(name: str, path: str, llm: Any = None) -> None:
    """Offline: serve the soft prompt at ``path`` (a PEFT prompt-tuning folder or a one-tensor
    ``.safetensors`` file) under ``name`` in this process, after ``LLM(...)`` is built.

    The checks are those of ``CHAT_EMBEDS_SOFT_PROMPTS``; a name already served is replaced.
    Pass ``llm`` when the process holds more than one ``LLM``: the soft prompt is checked
    against (and served for) that one's model; otherwise the last one built.
    """
    from .stores.soft_prompts import STORE

    if llm is not None:
        config = llm.model_config
        STORE.configure(config, embeds_enabled=bool(config.enable_prompt_embeds))
    STORE.add(name, path)


def register() -> None:
    """Check the vLLM version, then route chat rendering of the served modes through ours.

    Cheap and idempotent: vLLM calls it in the API server, the engine core and every worker.
    """
    global _registered
    if _registered:
        return

    from .compat.version_gate import check_vllm_version

    check_vllm_version(__version__)

    from vllm.renderers.registry import RENDERER_REGISTRY

    from .patches import apply_all

    apply_all()

    from .renderers.registry import take_over

    # Registry entries are set directly: RENDERER_REGISTRY.register() would log a warning in
    # every process that reads as if something went wrong.
    take_over(RENDERER_REGISTRY.renderers)
    for mode, (module, class_name) in RENDERERS.items():
        RENDERER_REGISTRY.renderers[mode] = (f"{__name__}.{module}", class_name)
    from .transport.shared_rows import sweep_at_exit

    sweep_at_exit()  # shared rows of processes vLLM kills at shutdown
    _registered = True
    announce()


_announced = False


def announce() -> None:
    """Log the one activation line of this process, once vLLM's logging is configured.

    In the API server vLLM loads plugins before it configures logging, so a line logged from
    ``register()`` would be lost there; the renderer calls this again when it is built.
    """
    global _announced
    import logging

    from .log import LOGGER_NAME, logger

    if _announced or not logging.getLogger(LOGGER_NAME.split(".")[0]).handlers:
        return
    _announced = True
    logger.info(
        "vllm_chat_embeds %s active: chat prompt_embeds for tokenizer mode(s) %s are handled "
        "by the plugin",
        __version__,
        ", ".join(RENDERER_MODES),
    )

"""Our logger lives under ``vllm.``: only that tree gets vLLM's handler and format."""

from __future__ import annotations

from typing import Final

from vllm.logger import init_logger

LOGGER_NAME: Final = "vllm.chat_embeds"

logger = init_logger(LOGGER_NAME)

"""Refuse to run on a vLLM whose internals we have not checked.

Why: the renderer subclasses, the patches and the tokenizer handling depend on vLLM internals
checked for each series in ``vllm_api.SUPPORTED_SERIES``. On another version they could
misbehave silently, which is worse than not starting.
"""

from __future__ import annotations

import os
from typing import Final

from .. import errors
from ..log import logger
from .vllm_api import SUPPORTED_SERIES, is_supported, vllm_version

ENV_ALLOW_UNSUPPORTED: Final = "CHAT_EMBEDS_ALLOW_UNSUPPORTED_VLLM"


def supported_text() -> str:
    """``"0.32.x or 0.33.x"``: the series named in the refusal message."""
    return " or ".join(f"{series}.x" for series in SUPPORTED_SERIES)


def check_vllm_version(ours: str) -> None:
    found = vllm_version()
    if is_supported(found):
        return
    message = errors.UNSUPPORTED_VLLM.format(ours=ours, supported=supported_text(), found=found)
    if os.environ.get(ENV_ALLOW_UNSUPPORTED, "").strip() in ("1", "true", "yes"):
        logger.warning("%s (continuing: %s is set)", message, ENV_ALLOW_UNSUPPORTED)
        return
    raise RuntimeError(message)

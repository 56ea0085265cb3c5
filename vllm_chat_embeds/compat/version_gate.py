"""Refuse to run on a vLLM whose internals we have not checked.

Why: the renderer subclass and the tokenizer handling depend on vLLM 0.32 internals. On another
version they could misbehave silently, which is worse than not starting.
"""

from __future__ import annotations

import os
from typing import Final

from .. import errors
from ..log import logger

SUPPORTED_SERIES: Final = ("0.32.",)
ENV_ALLOW_UNSUPPORTED: Final = "CHAT_EMBEDS_ALLOW_UNSUPPORTED_VLLM"


def check_vllm_version(ours: str) -> None:
    import vllm

    found = str(getattr(vllm, "__version__", "unknown"))
    if found.startswith(SUPPORTED_SERIES):
        return
    message = errors.UNSUPPORTED_VLLM.format(
        ours=ours, supported=" or ".join(s + "x" for s in SUPPORTED_SERIES), found=found
    )
    if os.environ.get(ENV_ALLOW_UNSUPPORTED, "").strip() in ("1", "true", "yes"):
        logger.warning("%s (continuing: %s is set)", message, ENV_ALLOW_UNSUPPORTED)
        return
    raise RuntimeError(message)

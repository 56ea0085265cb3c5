"""Patch of ``vllm/renderers/chat_utils.py``: let our bounded part markers through.

(On vLLM 0.33 the function lives in ``vllm/renderers/chat_utils/chat_message.py``; the
manifest's ``Patch.home()`` finds it through ``compat.vllm_api``.)

What: vLLM's check that refuses ``<prompt_embeds>`` inside text content now ignores the
pieces ``placeholder, part marker, placeholder`` that ``renderers.generic`` writes in place of
a part, and refuses any other occurrence as before. Why: the generic renderer hands vLLM's
DeepSeek/Kimi/Cohere/Inkling renderers messages where each part is such a bounded marker, and
those renderers parse messages with the checking parser before they render them. Clients
cannot use the exception: ``parts.reject_reserved_text`` refuses the placeholder in every
client string before any marker is written. When it can go: when the generic renderer no
longer bounds markers with the placeholder, or vLLM's check gains a way to allow them.
"""

from __future__ import annotations

import re
from typing import Any, Final

from ..placeholder import PLACEHOLDER_TOKEN
from . import Patch, check

# ``renderers.generic.bounded`` of a ``parts`` marker, for any nonce and part index.
BOUNDED_MARKER: Final = re.compile(
    re.escape(PLACEHOLDER_TOKEN) + r"<\|pe:[0-9a-f]+:\d+\|>" + re.escape(PLACEHOLDER_TOKEN)
)


def apply(patch: Patch) -> None:
    chat_utils = patch.home()
    check(patch, {"_reject_reserved_placeholder_in_text": ("text", "model_config")})
    original = chat_utils._reject_reserved_placeholder_in_text

    def _reject_reserved_placeholder_in_text(text: str, model_config: Any) -> None:
        if PLACEHOLDER_TOKEN in text:
            text = BOUNDED_MARKER.sub("", text)
        original(text, model_config)

    chat_utils._reject_reserved_placeholder_in_text = _reject_reserved_placeholder_in_text

"""Every difference between the vLLM series we support, in one table.

Why one module: the plugin subclasses, imports and patches vLLM internals, and a few of them
sit elsewhere from one vLLM series to the next. Code outside this module names each vLLM
object by one *canonical* location, ``"module:attribute"`` (its 0.32 location, or for an object
new in a later series, its location there), and asks ``locate``/``resolve``/``import_home``
for where it is on the running vLLM. Nothing else in the package tests the vLLM version.

To support a move (for example a patch target that moved): add one entry to ``WHERE``, keyed
by the canonical location, mapping each series where it differs to ``"module:attribute"``
there. The patch manifest resolves its targets through here (``patches.Patch.home``).

Differences recorded (read from the 0.33.0 wheel; every other name we use is where it was):
- 0.33 split ``vllm/renderers/chat_utils.py`` into the package ``vllm/renderers/chat_utils/``;
  the package re-exports only part of it, and its functions look names up in the submodule
  that defines or imports them, which is where a patch or a test trap must set them.
- 0.33 gave the ``deepseek_v41`` tokenizer mode its own renderer class (image reordering); on
  0.32 that mode used ``DeepseekV4Renderer``.
- Behaviour that changed and that tests compare against (``CHANGED_IN``): 0.33's built-in
  prompt_embeds path follows the chat template's order of parts (numbered placeholders; 0.32's
  matches them in parse order); a streamed ``/v1/responses`` cut short by
  ``max_output_tokens`` ends with ``response.incomplete`` on 0.33, ``response.completed`` on
  0.32 (whose non-streamed status already says ``incomplete``).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Final

# The vLLM series we have checked, oldest first (``vllm.__version__`` starts with "<series>.").
SUPPORTED_SERIES: Final = ("0.32", "0.33")

_CHAT_MESSAGE: Final = "vllm.renderers.chat_utils.chat_message"
_CONTENT_PARSER: Final = "vllm.renderers.chat_utils.content_parser"

# Canonical "module:attribute" -> {series: "module:attribute" on that series}, differences only.
WHERE: Final[dict[str, dict[str, str]]] = {
    # chat_utils.py became a package in 0.33.
    "vllm.renderers.chat_utils:_reject_reserved_placeholder_in_text": {
        "0.33": f"{_CHAT_MESSAGE}:_reject_reserved_placeholder_in_text",
    },
    "vllm.renderers.chat_utils:MultiModalContentParser": {
        "0.33": f"{_CONTENT_PARSER}:MultiModalContentParser",
    },
    "vllm.renderers.chat_utils:AsyncMultiModalContentParser": {
        "0.33": f"{_CONTENT_PARSER}:AsyncMultiModalContentParser",
    },
    "vllm.renderers.chat_utils:safe_load_prompt_embeds": {
        "0.33": f"{_CONTENT_PARSER}:safe_load_prompt_embeds",
    },
    "vllm.renderers.chat_utils:safe_load_prompt_embeds_async": {
        "0.33": f"{_CONTENT_PARSER}:safe_load_prompt_embeds_async",
    },
    # The deepseek_v41 mode's renderer class, new in 0.33.
    "vllm.renderers.deepseek_v4:DeepseekV41Renderer": {
        "0.32": "vllm.renderers.deepseek_v4:DeepseekV4Renderer",
    },
}

# vLLM behaviour that changed -> the first series with the change (tests compare against it).
CHANGED_IN: Final = {
    "builtin_template_order": "0.33",  # built-in rows follow the template's order of parts
    "responses_stream_incomplete_event": "0.33",  # length-capped streams end "incomplete"
}


def _key(series: str) -> tuple[int, ...]:
    return tuple(int(p) for p in series.split("."))


def series_of(version: str) -> str:
    """``"0.33"`` for ``"0.33.0"``, ``"0.33.1rc1"``, ``"0.33.0+cpu"``."""
    major, minor = (version.split(".") + ["0", "0"])[:2]
    digits = "".join(c for c in minor if c.isdigit()) or "0"
    return f"{major}.{int(digits)}" if major.isdigit() else version


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def is_supported(version: str) -> bool:
    return series_of(version) in SUPPORTED_SERIES


@functools.cache
def layout() -> str:
    """The series whose locations apply: the running one, or the nearest supported one (only
    reached with ``CHAT_EMBEDS_ALLOW_UNSUPPORTED_VLLM``)."""
    running = series_of(vllm_version())
    if running in SUPPORTED_SERIES:
        return running
    try:
        key = _key(running)
    except ValueError:
        return SUPPORTED_SERIES[-1]
    older = [s for s in SUPPORTED_SERIES if _key(s) <= key]
    return older[-1] if older else SUPPORTED_SERIES[0]


def locate(canonical: str) -> tuple[str, str]:
    """``(module, attribute)`` holding the canonical ``"module:attribute"`` on this vLLM."""
    where = WHERE.get(canonical, {}).get(layout(), canonical)
    module, _, attribute = where.partition(":")
    return module, attribute


def import_home(module: str, attribute: str) -> Any:
    """The imported module that holds ``attribute`` (``"Class.method"`` allowed) of the
    canonical ``module`` on this vLLM: where a patch reads and replaces it."""
    home, name = locate(f"{module}:{attribute.split('.')[0]}")
    if name != attribute.split(".")[0]:
        raise RuntimeError(f"vllm-chat-embeds: {module}:{attribute} was renamed to {name}")
    return importlib.import_module(home)


def resolve(canonical: str) -> Any:
    """The object at the canonical ``"module:attribute"`` on this vLLM."""
    module, attribute = locate(canonical)
    return getattr(importlib.import_module(module), attribute)


def vllm_has(change: str) -> bool:
    """Whether the running vLLM has the behaviour change named in ``CHANGED_IN``."""
    return _key(layout()) >= _key(CHANGED_IN[change])

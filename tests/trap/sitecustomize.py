"""Test-only: make vLLM's built-in prompt_embeds helpers raise, in every process of a server.

Put this directory on PYTHONPATH and set CHAT_EMBEDS_TEST_TRAP=1. Python imports
``sitecustomize`` at start-up in the API server, the engine core and workers alike; the trap is
installed in each of them as soon as it loads vLLM's renderers (where the helpers live), so if
any built-in helper still ran with the plugin active, the request would fail. This is the
takeover proof of issue 3; it is never installed outside the test suite.
"""

import os
import sys

TRAPPED_CHAT_UTILS = ("safe_load_prompt_embeds", "safe_load_prompt_embeds_async")
TRAPPED_HF = (
    "_ensure_prompt_embeds_placeholder_token",
    "_build_prompt_embeds_updates",
    "_expand_prompt_embeds_placeholders",
    "_build_prompt_embeds_positions",
    "_build_mixed_prompt_embeds",
)
TRAPPED_HF_SINCE_033 = ("_filter_prompt_embeds_by_template",)  # absent from 0.32's hf.py
TRAPPED_HF_METHODS = ("_apply_prompt_embeds_to_prompt", "_apply_prompt_embeds_to_engine_input")
TRAPPED_PARSER_CLASSES = ("MultiModalContentParser", "AsyncMultiModalContentParser")


def _trap(name):
    def trapped(*args, **kwargs):
        raise AssertionError(f"built-in prompt_embeds helper {name} ran with the plugin active")

    return trapped


def install() -> None:
    from vllm.renderers import hf

    # chat_utils names live where the running vLLM looks them up (0.33 made it a package).
    from vllm_chat_embeds.compat.vllm_api import import_home, resolve

    for name in TRAPPED_CHAT_UTILS:
        home = import_home("vllm.renderers.chat_utils", name)
        setattr(home, name, _trap(f"chat_utils.{name}"))
    for cls_name in TRAPPED_PARSER_CLASSES:
        cls = resolve(f"vllm.renderers.chat_utils:{cls_name}")
        cls.parse_prompt_embeds = _trap(f"chat_utils.{cls_name}.parse_prompt_embeds")
    for name in TRAPPED_HF:
        setattr(hf, name, _trap(f"hf.{name}"))
    for name in TRAPPED_HF_SINCE_033:
        if hasattr(hf, name):
            setattr(hf, name, _trap(f"hf.{name}"))
    for name in TRAPPED_HF_METHODS:
        setattr(hf.HfRenderer, name, staticmethod(_trap(f"hf.HfRenderer.{name}")))
    print("vllm-chat-embeds test trap: built-in prompt_embeds helpers disabled", file=sys.stderr)


class _InstallOnVllmRenderers:
    """Install the trap right after ``vllm.renderers.hf`` is first imported, not at start-up.

    Why: every Python process started with this environment runs this file, the helper
    processes torch starts too (inductor's CPU ISA probes, on the first compiled logprobs
    gather), and importing vLLM in each of them cost the first logprobs or beam search request
    of a trapped server tens of seconds. Processes that never load vLLM's renderers never need
    the trap.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "vllm.renderers.hf":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            install()

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("CHAT_EMBEDS_TEST_TRAP") == "1":
    sys.meta_path.insert(0, _InstallOnVllmRenderers())

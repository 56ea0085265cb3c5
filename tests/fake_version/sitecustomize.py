"""Test-only: pretend another vLLM version is installed, to test the plugin's version gate."""

import os

_fake = os.environ.get("CHAT_EMBEDS_TEST_FAKE_VLLM_VERSION")
if _fake:
    import vllm

    vllm.__version__ = _fake

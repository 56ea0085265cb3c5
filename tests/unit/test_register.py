"""register(): version gate and registry entry, without starting an engine."""

from __future__ import annotations

import pytest
import vllm
from vllm.renderers.registry import RENDERER_REGISTRY

import vllm_chat_embeds
from vllm_chat_embeds import errors
from vllm_chat_embeds.compat import version_gate, vllm_api

pytestmark = pytest.mark.unit


def test_supported_version_passes():
    assert vllm_api.series_of(vllm.__version__) in ("0.32", "0.33")
    version_gate.check_vllm_version("x")


@pytest.mark.parametrize("version", ["0.32.0", "0.32.3+cpu", "0.33.0", "0.33.1rc1"])
def test_both_series_are_accepted(monkeypatch, version):
    monkeypatch.setattr(vllm, "__version__", version)
    monkeypatch.delenv(version_gate.ENV_ALLOW_UNSUPPORTED, raising=False)
    version_gate.check_vllm_version("x")


def test_supported_series_are_named_in_the_refusal():
    assert version_gate.supported_text() == "0.32.x or 0.33.x"


def test_unsupported_version_raises_clear_error(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    monkeypatch.delenv(version_gate.ENV_ALLOW_UNSUPPORTED, raising=False)
    with pytest.raises(RuntimeError) as info:
        version_gate.check_vllm_version("9.9")
    assert str(info.value) == errors.UNSUPPORTED_VLLM.format(
        ours="9.9", supported="0.32.x or 0.33.x", found="0.40.1"
    )


def test_escape_hatch_turns_the_error_into_a_warning(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    monkeypatch.setenv(version_gate.ENV_ALLOW_UNSUPPORTED, "1")
    version_gate.check_vllm_version("9.9")  # no exception


def test_register_routes_hf_rendering_to_our_renderer_idempotently():
    vllm_chat_embeds.register()
    vllm_chat_embeds.register()
    assert RENDERER_REGISTRY.renderers["hf"] == (
        "vllm_chat_embeds.renderers.hf",
        "ChatEmbedsHfRenderer",
    )

"""compat.vllm_api: every recorded difference resolves on the running vLLM (0.32 or 0.33).

Run on both series by ``make test`` (the 0.33 harness runs this file too).
"""

from __future__ import annotations

import importlib
import inspect

import pytest

from vllm_chat_embeds.compat import vllm_api
from vllm_chat_embeds.patches import MANIFEST, _resolve

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("version", "series"),
    [("0.32.0", "0.32"), ("0.32.0+cpu", "0.32"), ("0.33.1rc1", "0.33"), ("0.40.0", "0.40")],
)
def test_series_of(version, series):
    assert vllm_api.series_of(version) == series


def test_running_vllm_is_a_supported_series():
    assert vllm_api.layout() in vllm_api.SUPPORTED_SERIES
    assert vllm_api.is_supported(vllm_api.vllm_version())


@pytest.mark.parametrize("canonical", sorted(vllm_api.WHERE))
def test_every_recorded_location_exists_here(canonical):
    module, attribute = vllm_api.locate(canonical)
    assert hasattr(importlib.import_module(module), attribute), (module, attribute)
    assert vllm_api.resolve(canonical) is getattr(importlib.import_module(module), attribute)


def test_chat_utils_check_is_where_vllm_calls_it():
    """The function a patch replaces must be the one vLLM's parser looks up at call time."""
    home = vllm_api.import_home("vllm.renderers.chat_utils", "_reject_reserved_placeholder_in_text")
    callers = [
        name
        for name, fn in vars(home).items()
        if inspect.isfunction(fn)
        and fn.__module__ == home.__name__
        and "_reject_reserved_placeholder_in_text" in fn.__code__.co_names
    ]
    assert callers, f"nothing in {home.__name__} calls the check"


@pytest.mark.parametrize("patch", MANIFEST, ids=lambda p: p.name)
def test_every_patch_target_resolves_here(patch):
    home = patch.home()
    for attribute in patch.attributes:
        assert callable(_resolve(home, attribute)), f"{home.__name__}.{attribute}"


def test_deepseek_v41_mode_wraps_the_class_vllm_registers_for_it():
    from vllm.renderers.registry import _VLLM_RENDERERS  # vLLM's own table, never overwritten

    from vllm_chat_embeds.renderers import generic

    module, class_name = generic.WRAPPED["ChatEmbedsDeepseekV41Renderer"]
    assert (module, class_name) == (
        "vllm.renderers." + _VLLM_RENDERERS["deepseek_v41"][0],
        _VLLM_RENDERERS["deepseek_v41"][1],
    )

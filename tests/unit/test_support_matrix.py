"""docs/support-matrix.md lists every renderer mode of vLLM's registry with its real status."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from vllm.renderers.registry import RENDERER_REGISTRY

import vllm_chat_embeds
from vllm_chat_embeds.compat.vllm_api import layout

pytestmark = pytest.mark.unit

MATRIX = Path(__file__).resolve().parents[2] / "docs" / "support-matrix.md"


def documented_modes() -> dict[str, str]:
    """Mode -> status, for the rows whose vLLM column names the running series."""
    rows = re.findall(
        r"^\| `(\w+)` \| (served|refused)[^|]*\| ([^|]*) \|", MATRIX.read_text(), re.M
    )
    return {mode: status for mode, status, series in rows if layout() in series}


def test_matrix_matches_the_registry():
    vllm_chat_embeds.register()
    documented = documented_modes()
    assert set(documented) == set(RENDERER_REGISTRY.renderers)
    served = {mode for mode, status in documented.items() if status == "served"}
    assert served == set(vllm_chat_embeds.RENDERER_MODES)
    for mode, (module, class_name) in RENDERER_REGISTRY.renderers.items():
        if documented[mode] == "served":
            ours_module, ours_class = vllm_chat_embeds.RENDERERS[mode]
            assert (module, class_name) == (f"vllm_chat_embeds.{ours_module}", ours_class), mode
        else:
            assert module == "vllm_chat_embeds.renderers.registry", mode
            assert class_name.startswith("Refusing"), mode

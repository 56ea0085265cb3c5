"""docs/support-matrix.md lists every renderer mode of vLLM's registry with its real status."""

from __future__ import annotations

import ast
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


TESTS = Path(__file__).resolve().parents[1]
STATUS = r"served|refused|fails in vLLM|not yet|untested"
FEATURE_ROW = re.compile(
    rf"^\| (?P<feature>.+?) \| (?P<status>{STATUS}) \| .+? \| (?P<tests>.+) \|$", re.M
)


def feature_rows() -> list[tuple[str, str, list[str]]]:
    section = MATRIX.read_text().split("## vLLM feature × prompt_embeds parts", 1)[1]
    return [
        (m["feature"], m["status"], re.findall(r"`([\w/]+\.py)::(\w+)`", m["tests"]))
        for m in FEATURE_ROW.finditer(section)
    ]


def functions_of(file: str) -> dict[str, list[str]]:
    """Test functions of a tests file, each with its decorators as source (module-level mark
    names resolved, so ``@NEEDS_FIX = pytest.mark.xfail(...)`` reads as xfail)."""
    path = next(TESTS.rglob(Path(file).name))
    tree = ast.parse(path.read_text())
    marks = {
        target.id: ast.unparse(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    return {
        node.name: [marks.get(ast.unparse(d), ast.unparse(d)) for d in node.decorator_list]
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
    }


def test_feature_rows_name_existing_tests():
    rows = feature_rows()
    assert len(rows) >= 15
    for feature, status, tests in rows:
        assert tests, feature
        for file, name in tests:
            functions = functions_of(file)
            assert name in functions, f"{feature}: {file}::{name} does not exist"
            expected_away = any("xfail" in d or "skip" in d for d in functions[name])
            if status == "served":
                assert not expected_away, f"{feature}: served, but {name} is xfail/skip"
            if status == "not yet":
                assert expected_away, f"{feature}: {name} passes now; mark the row served"

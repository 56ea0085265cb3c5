"""Every ``reject(errors.X, ...)`` in the package passes every field message X needs.

Why: a missing field makes ``str.format`` raise ``KeyError`` inside ``reject``, which a client
sees as a 500 instead of the 400 it should get; paths that are hard to reach in a test (media
beside parts in a text-only mode, for one) would hide it until production.
"""

from __future__ import annotations

import ast
import string
from pathlib import Path

import pytest

from vllm_chat_embeds import errors

pytestmark = pytest.mark.unit

PACKAGE = Path(errors.__file__).resolve().parent


def needed_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def reject_calls() -> list[tuple[str, int, str, set[str] | None]]:
    """(file, line, constant, keyword names or None when ``**kwargs`` are passed)."""
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "reject"):
                continue
            first = node.args[0] if node.args else None
            if not (
                isinstance(first, ast.Attribute) and getattr(first.value, "id", "") == "errors"
            ):
                continue
            names = {k.arg for k in node.keywords if k.arg is not None}
            spread = any(k.arg is None for k in node.keywords)
            calls.append((path.name, node.lineno, first.attr, None if spread else names))
    return calls


def test_the_scan_sees_the_package() -> None:
    assert len(reject_calls()) > 40


@pytest.mark.parametrize("call", reject_calls(), ids=lambda c: f"{c[0]}:{c[1]}:{c[2]}")
def test_reject_call_passes_every_field(call: tuple[str, int, str, set[str] | None]) -> None:
    _, _, constant, names = call
    template = getattr(errors, constant)
    if names is not None:
        assert needed_fields(template) <= names, f"missing {needed_fields(template) - names}"


def test_every_message_naming_a_place_says_prompt_embeds_part() -> None:
    """A log line alone must say what kind of content it is about."""
    unclear = [
        name
        for name in dir(errors)
        if name.isupper()
        and isinstance(value := getattr(errors, name), str)
        and "{where}" in value
        and "prompt_embeds part" not in value
    ]
    assert unclear == []

"""The user guide lists every client-facing message verbatim (or as formatted with its token)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_chat_embeds import errors
from vllm_chat_embeds.placeholder import PLACEHOLDER_TOKEN

pytestmark = pytest.mark.unit

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "user-guide.md"


def test_every_error_message_is_in_the_user_guide():
    guide = GUIDE.read_text()
    missing = []
    for name in dir(errors):
        value = getattr(errors, name)
        if not name.isupper() or not isinstance(value, str) or name == "PART_WHERE":
            continue
        with_token = value.replace("{token!r}", repr(PLACEHOLDER_TOKEN))
        if value not in guide and with_token not in guide:
            missing.append(name)
    assert not missing, f"document these messages in docs/user-guide.md: {missing}"

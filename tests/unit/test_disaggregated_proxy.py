"""``examples/disaggregated_proxy.py``'s decode body with ``--shared-store``: parts that name
their rows lose their data; everything else goes as it came."""

from __future__ import annotations

import runpy

import pytest
from conftest import REPO

pytestmark = pytest.mark.unit

PROXY = runpy.run_path(str(REPO / "examples" / "disaggregated_proxy.py"))


def decode_messages(messages: list, shared: bool = True) -> list:
    body = PROXY["decode_body"]({"messages": messages, "model": "m"}, {"x": 1}, shared_store=shared)
    assert body["kv_transfer_params"] == {"x": 1} and body["model"] == "m"
    return body["messages"]


def test_parts_by_reference_lose_their_data_only():
    embeds = {"type": "prompt_embeds", "uuid": "u", "encoding": "raw", "dtype": "float16",
              "shape": [2, 8], "data": "AAAA"}  # fmt: skip
    anonymous = {"type": "prompt_embeds", "data": "AAAA"}  # no uuid: the decode server needs it
    file_by_id = {"type": "file", "file": {"file_id": "file-pe-1", "file_data": "data:x",
                                           "filename": "rows.safetensors"}}  # fmt: skip
    file_inline = {"type": "file", "file": {"file_data": "data:x"}}
    text = {"type": "text", "text": "hi"}
    messages = [
        {"role": "system", "content": "plain"},
        {"role": "user", "content": [text, embeds, anonymous, file_by_id, file_inline]},
    ]
    out = decode_messages(messages)
    assert out[0] == messages[0]
    assert out[1]["content"] == [
        text,
        {"type": "prompt_embeds", "uuid": "u"},
        anonymous,
        {"type": "file", "file": {"file_id": "file-pe-1", "filename": "rows.safetensors"}},
        file_inline,
    ]
    assert messages[1]["content"][1]["data"] == "AAAA"  # the caller's request is not changed
    assert decode_messages(messages, shared=False) == messages

"""``/tokenize`` with chat messages holding prompt_embeds parts."""

from __future__ import annotations

import pytest
import requests
from chat_cases import CASES, as_text, render

from vllm_chat_embeds.placeholder import PLACEHOLDER_TOKEN

pytestmark = pytest.mark.e2e


def test_tokenize_counts_rows_and_marks_embedding_positions(plugin_server, table):
    case = CASES["several_parts"]  # embeds, text, embeds
    messages = render(case, table.part)
    body = {"model": plugin_server.model, "messages": messages, "return_token_strs": True}
    tok = requests.post(plugin_server.base_url + "/tokenize", json=body, timeout=60)
    assert tok.status_code == 200, tok.text
    data = tok.json()
    chat = requests.post(
        plugin_server.base_url + "/v1/chat/completions",
        json={"model": plugin_server.model, "messages": messages, "max_tokens": 1},
        timeout=60,
    ).json()
    assert data["count"] == chat["usage"]["prompt_tokens"] == len(data["tokens"])
    spans = data["prompt_embeds_spans"]
    rows = [table.rows("import os").shape[0], table.rows(" import sys").shape[0]]
    assert [length for _, length in spans] == rows
    embedded = {start + i for start, length in spans for i in range(length)}
    for i, text in enumerate(data["token_strs"]):
        assert (text == PLACEHOLDER_TOKEN) == (i in embedded)
    # The text-only version tokenizes to the same ids outside the embedding spans.
    ref = requests.post(
        plugin_server.base_url + "/tokenize",
        json={"model": plugin_server.model, "messages": as_text(case)},
        timeout=60,
    ).json()
    assert "prompt_embeds_spans" not in ref
    assert ref["count"] == data["count"]
    assert [t for i, t in enumerate(ref["tokens"]) if i not in embedded] == [
        t for i, t in enumerate(data["tokens"]) if i not in embedded
    ]

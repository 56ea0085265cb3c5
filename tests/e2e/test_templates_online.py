"""Templates that reorder, repeat or drop message content never misplace an embedding.

vLLM 0.32's built-in matches placeholders in parse order, so a template that renders messages
in another order splices rows into the wrong span; it is marked as an expected failure there.
vLLM 0.33's built-in follows the template's order (``compat.vllm_api.CHANGED_IN``).
"""

from __future__ import annotations

import pytest
import requests
from chat_cases import LAST_ONLY, REPEATED, REVERSED, STRING_CONTENT, as_text, render

from vllm_chat_embeds import errors
from vllm_chat_embeds.compat.vllm_api import vllm_has

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 16}

CASE = [
    {"role": "user", "content": [("e", "import os"), ("t", " then")]},
    {"role": "assistant", "content": [("t", "ok,"), ("e", " done")]},
    {"role": "user", "content": [("t", "now"), ("e", " print(os)")]},
]


def post(server, messages, **kwargs):
    body = {"model": server.model, "messages": messages, **GREEDY, **kwargs}
    return requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)


def parity(server, table, template, case=CASE):
    reference = post(server, as_text(case), chat_template=template)
    assert reference.status_code == 200, reference.text
    embeds = post(server, render(case, table.part), chat_template=template)
    assert embeds.status_code == 200, embeds.text
    ref, out = reference.json(), embeds.json()
    assert out["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    assert out["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]


def test_reordering_template_keeps_each_part_in_its_span(plugin_server, table):
    parity(plugin_server, table, REVERSED)


@pytest.mark.xfail(
    not vllm_has("builtin_template_order"),
    reason="vLLM 0.32's built-in matches placeholders in parse order",
    strict=True,
)
def test_reordering_template_builtin(builtin_server, table):
    parity(builtin_server, table, REVERSED)


def test_repeating_template_repeats_each_part(plugin_server, table):
    parity(plugin_server, table, REPEATED)


def test_string_content_template(plugin_server, builtin_server, table):
    for server in (plugin_server, builtin_server):
        parity(server, table, STRING_CONTENT)


def test_dropping_template_is_refused_by_default(plugin_server, table):
    response = post(plugin_server, render(CASE, table.part), chat_template=LAST_ONLY)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith(errors.PART_DROPPED.split("{where}")[0])
    assert "messages[0].content[0]" in message
    assert plugin_server.healthy()

"""An assistant turn's ``reasoning`` given as a prompt_embeds part (or parts), for templates
that render past reasoning."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 12}

THINKING = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['reasoning'] is defined and message['reasoning'] %}"
    "{{- '<think>' + message['reasoning'] + '</think>' }}{%- endif %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{{- part['text'] }}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def post(server, reasoning):
    messages = [
        {"role": "user", "content": "def f(x):"},
        {"role": "assistant", "content": "return x", "reasoning": reasoning},
        {"role": "user", "content": "and g?"},
    ]
    body = {"model": server.model, "messages": messages, "chat_template": THINKING, **GREEDY}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    return data["usage"]["prompt_tokens"], data["choices"][0]["message"]["content"]


def test_reasoning_as_one_part(plugin_server, table):
    reference = post(plugin_server, "x is an int")
    assert post(plugin_server, table.part("x is an int")) == reference
    assert reference != post(plugin_server, "")


def test_reasoning_as_text_and_parts(plugin_server, table):
    reference = post(plugin_server, "x is an int, so")
    mixed = [
        {"type": "text", "text": "x is"},
        table.part(" an int"),
        {"type": "text", "text": ", so"},
    ]
    assert post(plugin_server, mixed) == reference

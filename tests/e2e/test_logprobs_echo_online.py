"""echo, prompt_logprobs and logprobs with prompt_embeds parts: honest results, server alive.

On vLLM's built-in these requests kill the engine (the worker gathers logprobs at the
placeholder id, past the vocabulary: the tiny model's vocab size equals its tokenizer length).
That is recorded by benchmarks/hostile_side_by_side.py, not here, so the shared built-in server
stays up for the other tests.
"""

from __future__ import annotations

import json

import pytest
import requests
from chat_cases import as_text, render

pytestmark = pytest.mark.e2e

CASE = [{"role": "user", "content": [("t", "def f(x):"), ("e", " return x"), ("t", " + 1")]}]
GREEDY = {"temperature": 0.0, "max_tokens": 6}
# vLLM echoes the last message only when it has the reply's role: continue an assistant turn.
ECHO_CASE = [
    {"role": "user", "content": "def f(x):"},
    {"role": "assistant", "content": [("t", "return"), ("e", " x"), ("t", " + 1")]},
]
ECHO = {"echo": True, "add_generation_prompt": False, "continue_final_message": True}


def post(server, messages, **kwargs):
    body = {"model": server.model, "messages": messages, **GREEDY, **kwargs}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_prompt_logprobs_are_none_at_embedding_rows_and_exact_elsewhere(plugin_server, table):
    text = post(plugin_server, as_text(CASE), prompt_logprobs=1)
    embeds = post(plugin_server, render(CASE, table.part), prompt_logprobs=1)
    ref, got = text["prompt_logprobs"], embeds["prompt_logprobs"]
    assert len(ref) == len(got)
    rows = table.rows(" return x").shape[0]
    nones = [i for i, entry in enumerate(got) if entry is None]
    assert len(nones) == 1 + rows  # position 0, as always, plus one per embedding row
    for i, entry in enumerate(got):
        if entry is not None:
            assert entry == ref[i]
    assert plugin_server.healthy()


def test_sample_logprobs_match_the_text_path(plugin_server, table):
    options = {"logprobs": True, "top_logprobs": 3}
    text = post(plugin_server, as_text(CASE), **options)
    embeds = post(plugin_server, render(CASE, table.part), **options)
    assert embeds["choices"][0]["logprobs"] == text["choices"][0]["logprobs"]


# What vLLM echoes for the same turn without the prompt_embeds part: text parts joined by "\n".
ECHOED = "return\n + 1"


def test_echo_returns_the_text_parts_only(plugin_server, table):
    for options in (ECHO, {**ECHO, "logprobs": True, "top_logprobs": 2}):
        out = post(plugin_server, render(ECHO_CASE, table.part), **options)
        content = out["choices"][0]["message"]["content"]
        assert content.startswith(ECHOED), content
        assert "<prompt_embeds>" not in content and "<|pe:" not in content
    assert plugin_server.healthy()


def test_streamed_echo_without_embeds(plugin_server):
    """vLLM 0.32 answers this with an error event; the plugin's renderer fixes it."""
    messages = as_text(ECHO_CASE)
    body = {"model": plugin_server.model, "messages": messages, "stream": True, **ECHO, **GREEDY}
    url = plugin_server.base_url + "/v1/chat/completions"
    with requests.post(url, json=body, stream=True, timeout=120) as response:
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert not any('"error"' in line for line in lines), lines
    assert "return\n x\n + 1" in "".join(lines).replace("\\n", "\n")


def test_streamed_echo(plugin_server, table):
    body = {
        "model": plugin_server.model,
        "messages": render(ECHO_CASE, table.part),
        "stream": True,
        **ECHO,
        **GREEDY,
    }
    url = plugin_server.base_url + "/v1/chat/completions"
    with requests.post(url, json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        events = [
            json.loads(line[len("data: ") :])
            for line in response.iter_lines(decode_unicode=True)
            if line and line.startswith("data: ") and line != "data: [DONE]"
        ]
    assert not any("error" in event for event in events), events
    text = "".join(
        (choice.get("delta") or {}).get("content") or ""
        for event in events
        for choice in event.get("choices", [])
    )
    assert text.startswith(ECHOED), text
    assert "<|pe:" not in text

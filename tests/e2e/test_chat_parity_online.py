"""Greedy parity between text and prompt_embeds parts on a real ``vllm serve``.

Every test runs against our plugin (with vLLM's built-in prompt_embeds helpers trapped so any
call to them fails the request) and, side by side, against vLLM's built-in implementation
(``VLLM_PLUGINS=""``) on the same work.
"""

from __future__ import annotations

import pytest
import requests
import torch
from chat_cases import CASES, as_text, render

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 16}


@pytest.fixture(params=["plugin", "builtin"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def chat(server, messages, **kwargs):
    body = {"model": server.model, "messages": messages, **GREEDY, **kwargs}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def assert_same(a: dict, b: dict) -> None:
    assert [c["message"]["content"] for c in a["choices"]] == [
        c["message"]["content"] for c in b["choices"]
    ]
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_parity(server, table, name):
    case = CASES[name]
    reference = chat(server, as_text(case))
    with_embeds = chat(server, render(case, table.part))
    assert reference["choices"][0]["message"]["content"], "the model must generate something"
    assert_same(reference, with_embeds)


def test_random_embeddings_change_the_output(server, table):
    case = CASES["one_part"]
    reference = chat(server, as_text(case))
    rows = table.rows(" return world + 1")
    torch.manual_seed(0)
    noise = {"type": "prompt_embeds", "data": _b64(torch.randn_like(rows) * rows.std())}
    messages = render(case, lambda text: noise)
    out = chat(server, messages)
    assert out["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"]
    assert out["choices"][0]["message"]["content"] != reference["choices"][0]["message"]["content"]


def test_streaming_matches_non_streaming(server, table):
    messages = render(CASES["interleaved"], table.part)
    full = chat(server, messages)
    client = server.client
    stream = client.chat.completions.create(
        model=server.model, messages=messages, stream=True, **GREEDY
    )
    streamed = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    assert streamed == full["choices"][0]["message"]["content"]


def test_openai_client_usage_counts_embedding_rows(server, table):
    rows = table.rows(" return world + 1")
    messages = render(CASES["one_part"], table.part)
    text_only = [{"role": "user", "content": [{"type": "text", "text": "def hello(world):"}]}]
    client = server.client
    with_rows = client.chat.completions.create(model=server.model, messages=messages, **GREEDY)
    without = client.chat.completions.create(model=server.model, messages=text_only, **GREEDY)
    assert with_rows.usage.prompt_tokens == without.usage.prompt_tokens + rows.shape[0]


def test_n_and_seed(server, table):
    case = CASES["several_parts"]
    sampled = {"temperature": 1.0, "max_tokens": 8, "n": 2, "seed": 1234}
    reference = chat(server, as_text(case), **sampled)
    with_embeds = chat(server, render(case, table.part), **sampled)
    assert len(with_embeds["choices"]) == 2
    assert_same(reference, with_embeds)


def test_stop_strings_and_max_tokens(server, table):
    case = CASES["multi_turn"]
    reference = chat(server, as_text(case))
    text = reference["choices"][0]["message"]["content"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"need a visible stop string from {text!r}"
    stopped_text = chat(server, as_text(case), stop=[stop])
    stopped_embeds = chat(server, render(case, table.part), stop=[stop])
    assert stopped_embeds["choices"][0]["finish_reason"] == "stop"
    assert_same(stopped_text, stopped_embeds)
    short = chat(server, render(case, table.part), max_tokens=3)
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 3


def test_tools_in_request(server, table):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "Look a word up",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    case = CASES["every_role"]
    # tool_choice "none": no tool parser is configured; the tools still reach the template.
    reference = chat(server, as_text(case), tools=tools, tool_choice="none")
    with_embeds = chat(server, render(case, table.part), tools=tools, tool_choice="none")
    without_tools = chat(server, as_text(case))
    assert reference["usage"]["prompt_tokens"] > without_tools["usage"]["prompt_tokens"]
    assert_same(reference, with_embeds)


def test_continue_final_message(server, table):
    case = [
        {"role": "user", "content": [("t", "Write a loop")]},
        {"role": "assistant", "content": [("t", "for i in"), ("e", " range(3):")]},
    ]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    reference = chat(server, as_text(case), **options)
    with_embeds = chat(server, render(case, table.part), **options)
    assert_same(reference, with_embeds)


def test_context_length_is_enforced(server, table):
    too_many = table.rows("x = 1\n" * 10)[:1].repeat(1100, 1)  # over --max-model-len 1024
    messages = [{"role": "user", "content": [{"type": "prompt_embeds", "data": _b64(too_many)}]}]
    body = {"model": server.model, "messages": messages, **GREEDY}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 400, response.text
    assert server.healthy()


def _b64(tensor):
    from conftest import tensor_b64  # noqa: PLC0415

    return tensor_b64(tensor)

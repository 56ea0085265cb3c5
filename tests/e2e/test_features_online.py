"""vLLM features combined with prompt_embeds parts, on the shared ``feature_server``.

Each feature is checked against the text path: the same chat with the parts' text sent as text
gives the same answer (greedy, or seeded sampling). The server carries LoRA adapters, the hermes
tool parser, prefix caching and prompt-token details (``tests/conftest.py``), so one start
covers every feature here. ``docs/support-matrix.md`` names these tests.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from chat_cases import CASES, as_text, render

pytestmark = pytest.mark.e2e

GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 12}


def post(server, messages, **kwargs: Any) -> dict[str, Any]:
    body = {"model": server.model, "messages": messages, **GREEDY, **kwargs}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def answer(data: dict[str, Any]) -> list[Any]:
    """What a client reads: each choice's text and tool calls (ids are random, so left out)."""
    out = []
    for choice in data["choices"]:
        message = choice["message"]
        calls = [
            (c["function"]["name"], c["function"]["arguments"])
            for c in message.get("tool_calls") or []
        ]
        out.append((message.get("content"), calls, choice["finish_reason"]))
    return out


def parity(server, case, table, **kwargs: Any) -> list[Any]:
    """Send ``case`` as text and with parts; both answers must be equal. Returns the answer."""
    reference = answer(post(server, as_text(case), **kwargs))
    assert answer(post(server, render(case, table.part), **kwargs)) == reference
    return reference


# -- structured outputs ----------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "n": {"type": "integer"}},
    "required": ["name", "n"],
}
STRUCTURED: dict[str, dict[str, Any]] = {
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "thing", "schema": SCHEMA},
        },
        "max_tokens": 40,
    },
    "json": {"structured_outputs": {"json": SCHEMA}, "max_tokens": 40},
    "regex": {"structured_outputs": {"regex": "[a-z]{3,6} = [0-9]{1,3}"}},
    "choice": {"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}},
    "grammar": {
        "structured_outputs": {"grammar": 'root ::= "x" ("+" | "-") ("1" | "2" | "3")'},
    },
}


@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_structured_outputs(feature_server, table, name):
    answer_ = parity(feature_server, CASES["interleaved"], table, **STRUCTURED[name])[0]
    content, _, finish = answer_
    if name.startswith("json") and finish == "stop":
        assert set(json.loads(content)) == {"name", "n"}
    elif name == "choice":
        assert content in ("alpha", "beta", "gamma")


# -- tool calling (hermes parser) ------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "run_code",
            "description": "Run Python code",
            "parameters": {
                "type": "object",
                "properties": {"code": {"type": "string", "maxLength": 8}},
                "required": ["code"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"key": {"type": "string", "maxLength": 5}},
                "required": ["key"],
            },
        },
    },
]
TOOL_CHOICES: dict[str, Any] = {
    "named": {"type": "function", "function": {"name": "run_code"}},
    "required": "required",
    "auto": "auto",
}


@pytest.mark.parametrize("choice", sorted(TOOL_CHOICES))
def test_tool_choice(feature_server, table, choice):
    kwargs = {"tools": TOOLS, "tool_choice": TOOL_CHOICES[choice], "max_tokens": 80}
    (content, calls, finish) = parity(feature_server, CASES["one_part"], table, **kwargs)[0]
    if choice != "auto" and finish != "length":  # a random model may not close the call
        assert calls and all(name in ("run_code", "lookup") for name, _ in calls)
    if choice != "auto":  # forced: the call is being written either way
        assert calls or content.startswith("<tool_call>")


TOOL_TURN = [
    {"role": "user", "content": [("t", "Run"), ("e", " print(1 + 2)")]},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "run_code", "arguments": '{"code": "1 + 2"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": [("e", "result = 3"), ("t", " ok")]},
]


def test_tool_messages_holding_parts(feature_server, table):
    parity(feature_server, TOOL_TURN, table, tools=TOOLS)
    parity(feature_server, CASES["tool_role"], table, tools=TOOLS, tool_choice="auto")


# -- chat options ----------------------------------------------------------------------------

CONTINUED = [
    {"role": "user", "content": [("t", "Write"), ("e", " a loop")]},
    {"role": "assistant", "content": [("t", "for i in"), ("e", " range(3):")]},
]


def test_continue_final_message(feature_server, table):
    kwargs = {"continue_final_message": True, "add_generation_prompt": False}
    parity(feature_server, CONTINUED, table, **kwargs)


def test_n_with_seed_gives_the_same_samples(feature_server, table):
    sampled = {"n": 3, "seed": 1234, "temperature": 1.0, "top_p": 0.95, "max_tokens": 10}
    samples = parity(feature_server, CASES["several_parts"], table, **sampled)
    assert len(samples) == 3
    assert len({content for content, _, _ in samples}) > 1  # really sampled


def test_prefix_cache_reports_cached_tokens_with_parts(feature_server, table):
    """Same long chat twice: the second reports cached tokens, text and parts alike."""
    prefix = "def main(argv):\n    parser = build_parser()\n" * 10
    case = [{"role": "user", "content": [("t", prefix), ("e", " return run(args)")]}]
    salt = {"cache_salt": "features-prefix"}
    details = {}
    for form, messages in (("text", as_text(case)), ("parts", render(case, table.part))):
        post(feature_server, messages, **salt)
        again = post(feature_server, messages, **salt)
        details[form] = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert details[form] > 0, again["usage"]
    assert answer(post(feature_server, render(case, table.part), **salt)) == answer(
        post(feature_server, as_text(case), **salt)
    )


# -- concurrency and isolation ---------------------------------------------------------------

# (case, sampling) pairs sent together; each answer must equal the same request sent alone.
MIXED: list[tuple[str, dict[str, Any]]] = [
    ("one_part", {}),
    ("interleaved", {"temperature": 0.8, "seed": 7}),
    ("several_parts", {"frequency_penalty": 0.5}),
    ("every_role", {"temperature": 1.0, "top_k": 5, "seed": 11}),
    ("multi_turn", {"temperature": 0.5, "seed": 3, "n": 2, "presence_penalty": 1.5}),
    ("tool_role", {"logprobs": True, "top_logprobs": 2, "stop": ["\n"]}),
]


def alone_then_together(server, requests_: list[tuple[list[Any], dict[str, Any]]]) -> None:
    short = {"max_tokens": 8}
    alone = [answer(post(server, messages, **short, **kw)) for messages, kw in requests_]
    with ThreadPoolExecutor(len(requests_)) as pool:
        together = list(pool.map(lambda r: answer(post(server, r[0], **short, **r[1])), requests_))
    assert together == alone


def test_concurrent_parts_and_sampling_keep_their_own_answers(feature_server, table):
    batch = [(render(CASES[name], table.part), kwargs) for name, kwargs in MIXED]
    batch += [(as_text(CASES[name]), kwargs) for name, kwargs in MIXED[:2]]
    alone_then_together(feature_server, batch)


def test_concurrent_adapters_on_text_beside_parts_on_the_base_model(feature_server, table):
    """LoRA text requests and base-model part requests share batches (before the LoRA fix, a
    base-model request with a part batched beside an adapter's text request killed the engine)."""
    case = CASES["interleaved"]
    batch = [(render(case, table.part), {}), (render(CASES["one_part"], table.part), {})]
    batch += [(as_text(case), {"model": name}) for name in ("lora-a", "lora-b")]
    alone_then_together(feature_server, batch)


def test_concurrent_adapters_with_parts(feature_server, table):
    case = CASES["interleaved"]
    batch = [(render(case, table.part), {"model": m}) for m in ("lora-a", "lora-b", None)]
    batch = [(messages, {k: v for k, v in kw.items() if v}) for messages, kw in batch]
    batch += [(as_text(case), {"model": "lora-a"})]
    alone_then_together(feature_server, batch)


@pytest.mark.parametrize("adapter", ["lora-a", "lora-b"])
def test_lora_adapter_with_parts_keeps_parity(feature_server, table, adapter):
    reference = parity(feature_server, CASES["interleaved"], table, model=adapter)
    assert reference != answer(post(feature_server, as_text(CASES["interleaved"])))


def test_server_log_has_no_errors(feature_server):
    log = feature_server.log()
    for needle in ("EngineDeadError", "Internal Server Error", "vllm_chat_embeds/"):
        assert needle not in log, feature_server.tail()

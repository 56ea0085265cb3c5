"""prompt_embeds parts on ``POST /v1/responses``: greedy parity with the same content as text.

The suite's feature server (vLLM's built-in prompt_embeds helpers trapped, the response store
on for ``previous_response_id``), driven with the official ``openai`` client; bad parts
get the plugin's 400s naming ``input[i].content[j]``, and the server stays healthy.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests
from conftest import Server, tensor_b64
from hostile_cases import CASES as HOSTILE
from hostile_cases import PLACEMENTS, Placement
from test_hostile_online import hostile_outcome, placement_failures

from vllm_chat_embeds import errors
from vllm_chat_embeds.compat.vllm_api import vllm_has

pytestmark = pytest.mark.e2e

GREEDY: dict[str, Any] = {"temperature": 0.0, "max_output_tokens": 12}

# A message is (role, segments); a segment is ("t", text) for an input_text part or ("e", text)
# for a prompt_embeds part of that text's own embedding rows. Part boundaries sit before a
# space, where byte-level BPE never merges across, so text and rows tokenize alike.
Case = list[tuple[str, list[tuple[str, str]]]]
CASES: dict[str, Case] = {
    "text_and_part": [("user", [("t", "def hello(world):"), ("e", " return world + 1")])],
    "only_part": [("user", [("e", "import os, sys")])],
    "several_parts": [
        ("user", [("e", "import os"), ("t", " and"), ("e", " import sys"), ("e", " as s")]),
    ],
    "system_and_developer": [
        ("system", [("e", "You write Python.")]),
        ("developer", [("t", "Be"), ("e", " brief.")]),
        ("user", [("t", "Write"), ("e", " a loop")]),
    ],
}


@pytest.fixture(scope="module")
def server(feature_server) -> Server:
    """The suite's feature server (conftest): it has the response store on, for
    ``previous_response_id``, and saves this file a server start of its own."""
    return feature_server


def as_input(case: Case, part) -> list[dict[str, Any]]:
    """The case as Responses input items; ``part`` turns an ("e", text) segment into a part."""
    return [
        {
            "role": role,
            "content": [
                {"type": "input_text", "text": text} if kind == "t" else part(text)
                for kind, text in segments
            ],
        }
        for role, segments in case
    ]


def text_part(text: str) -> dict[str, str]:
    return {"type": "input_text", "text": text}


def create(server: Server, input_items: Any, **kwargs: Any):
    return server.client.responses.create(model=server.model, input=input_items, **GREEDY, **kwargs)


def post(server: Server, input_items: Any, **kwargs: Any) -> requests.Response:
    body = {"model": server.model, "input": input_items, **GREEDY, **kwargs}
    return requests.post(server.base_url + "/v1/responses", json=body, timeout=120)


def outcome(response) -> tuple[str, int, int]:
    usage = response.usage
    return response.output_text, usage.input_tokens, usage.output_tokens


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_parity(server, table, name):
    reference = create(server, as_input(CASES[name], text_part))
    with_parts = create(server, as_input(CASES[name], table.part))
    assert reference.output_text, "the model must generate something"
    assert outcome(with_parts) == outcome(reference)


def test_parity_with_instructions(server, table):
    """``instructions`` is a string; parts go in the input messages beside it."""
    case = CASES["text_and_part"]
    reference = create(server, as_input(case, text_part), instructions="You write Python.")
    with_parts = create(server, as_input(case, table.part), instructions="You write Python.")
    assert outcome(with_parts) == outcome(reference)
    assert outcome(reference) != outcome(create(server, as_input(case, text_part)))


def test_rows_are_used(server, table):
    """Other rows of the same shape change the answer: the rows reach the model."""
    case = CASES["text_and_part"]
    reference = create(server, as_input(case, table.part))
    rows = table.rows(" return world + 1")
    shuffled = {"type": "prompt_embeds", "data": tensor_b64(rows.flip(0).contiguous())}
    other = create(server, as_input(case, lambda text: shuffled))
    assert other.usage.input_tokens == reference.usage.input_tokens
    assert other.output_text != reference.output_text


def test_streaming_parity(server, table):
    case = CASES["several_parts"]
    reference = create(server, as_input(case, text_part))
    events = list(create(server, as_input(case, table.part), stream=True))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == reference.output_text
    # The last event names the response's status on 0.33 ("incomplete" when 12 tokens cut the
    # answer short); 0.32 always sent "completed".
    last = reference.status if vllm_has("responses_stream_incomplete_event") else "completed"
    completed = next(e for e in events if e.type == f"response.{last}")
    assert outcome(completed.response) == outcome(reference)


def test_previous_response_id_keeps_the_parts(server, table):
    """A stored turn with parts is history for the next turn, as the same turn as text is."""
    case = CASES["text_and_part"]
    follow_up = [{"role": "user", "content": [text_part("and then?")]}]
    turns = {}
    for name, part in (("text", text_part), ("parts", table.part)):
        first = create(server, as_input(case, part), store=True)
        second = create(server, follow_up, previous_response_id=first.id, store=True)
        turns[name] = (outcome(first), outcome(second))
    assert turns["parts"] == turns["text"]
    assert turns["text"][1][1] > turns["text"][0][1]  # the second prompt holds the first turn


def bad_part_cases(table) -> dict[str, tuple[dict[str, Any], str]]:
    rows = table.rows(" x")
    where = "input[1].content[1]"
    return {
        "missing_data": ({"type": "prompt_embeds"}, errors.DATA_MISSING.format(where=where)),
        "bad_base64": (
            {"type": "prompt_embeds", "data": "not base64!"},
            errors.NOT_BASE64.split("(")[0].format(where=where),
        ),
        "wrong_width": (
            {"type": "prompt_embeds", "data": tensor_b64(rows[:, :-1].contiguous())},
            errors.BAD_WIDTH.format(where=where, got=rows.shape[1] - 1, width=rows.shape[1]),
        ),
    }


@pytest.mark.parametrize("name", ["missing_data", "bad_base64", "wrong_width"])
def test_bad_part_is_a_400_naming_its_input_position(server, table, name):
    part, message = bad_part_cases(table)[name]
    items = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": [text_part("def f(x):"), part]},
    ]
    response = post(server, items)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["param"] == "input"
    assert server.healthy()
    assert create(server, as_input(CASES["text_and_part"], table.part)).output_text


def test_part_in_an_assistant_message_is_refused(server, table):
    items = [
        {"role": "user", "content": "def f(x):"},
        {"role": "assistant", "content": [table.part(" return x")]},
    ]
    response = post(server, items)
    assert response.status_code == 400, response.text
    where = "input[1].content[0]"
    error = response.json()["error"]
    assert errors.RESPONSES_ROLE.format(where=where, role="assistant") in error["message"]
    assert server.healthy()


def test_other_bad_content_keeps_vllms_own_error(server, table):
    """Only prompt_embeds parts are let through: another unknown part is still refused."""
    items = [{"role": "user", "content": [table.part(" x"), {"type": "bogus", "text": "y"}]}]
    response = post(server, items)
    assert response.status_code == 400, response.text
    assert "prompt_embeds" not in response.json()["error"]["message"]
    assert server.healthy()


def test_flag_off_server_refuses_with_not_enabled(flag_off_server, table):
    items = [{"role": "user", "content": [text_part("def f(x):"), table.part(" return x")]}]
    response = post(flag_off_server, items)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert errors.NOT_ENABLED.format(where="input[0].content[1]") in error["message"]
    assert error["param"] == "input"
    assert flag_off_server.healthy()
    assert post(flag_off_server, [{"role": "user", "content": "def f(x):"}]).status_code == 200


def test_placeholder_text_is_plain_text_without_the_flag(flag_off_server, server):
    """The placeholder string is reserved only where prompt_embeds are enabled."""
    items = [{"role": "user", "content": [text_part("say <prompt_embeds> please")]}]
    assert post(flag_off_server, items).status_code == 200
    refused = post(server, items)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["message"].startswith("input[0].content[0].text contains")


def hostile_input(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """A hostile chat case as Responses input, or None when it has no Responses equivalent
    (roles or message fields /v1/responses does not take parts in)."""
    items = []
    for message in messages:
        if set(message) != {"role", "content"} or message["role"] not in ("user", "system"):
            return None
        content = message["content"]
        if isinstance(content, list):
            content = [
                {**part, "type": "input_text"}
                if isinstance(part, dict) and part.get("type") == "text"
                else part
                for part in content
            ]
        items.append({"role": message["role"], "content": content})
    return items


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_hostile_case_through_responses(server, table, case):
    """The chat hostile table, where it translates: the same 400 naming ``input[..]``."""
    items = hostile_input(case.build(int(table.weight.shape[1]), table.rows(" 1 + 2")))
    if items is None:
        pytest.skip("no /v1/responses form (other roles or message fields)")
    message = hostile_outcome(post(server, items), case)
    if message is not None and "{where}" in case.expect:
        assert message.startswith("input["), message
    assert server.healthy()


RESPONSES_PLACEMENTS = [
    p for p in PLACEMENTS if hostile_input(p.build({"type": "prompt_embeds"}, {})) is not None
]


@pytest.mark.parametrize(
    "placement", RESPONSES_PLACEMENTS, ids=[p.name for p in RESPONSES_PLACEMENTS]
)
def test_every_bad_part_at_every_place_through_responses(server, table, placement):
    """The placed hostile table (user and system messages): our message naming ``input[..]``."""

    def send(messages):
        items = hostile_input(messages)
        response = post(server, items, max_output_tokens=1)
        if response.status_code == 200:
            return 200, None
        return response.status_code, response.json().get("error", {}).get("message")

    where = placement.where.replace("messages[", "input[")
    located = Placement(placement.name, placement.build, where)
    width = int(table.weight.shape[1])
    assert placement_failures(send, located, table, width) == []
    assert server.healthy()


def test_server_log_has_no_errors(server):
    """After every request above: no traceback and no serialisation warning in the server log."""
    log = server.log()
    assert "vllm_chat_embeds 0" in log and "active" in log
    # Not "Traceback": the feature server's other tests provoke vLLM's own logged errors.
    needles = ("vllm_chat_embeds/", "PydanticSerializationUnexpectedValue", "EngineDeadError")
    for needle in needles:
        assert needle not in log, server.tail()

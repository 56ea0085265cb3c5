"""Hostile and malformed input against a live server: a clear 400 every time, never a crash.

Every case gets a 400 whose message is the plugin's message for that problem (naming the
part); afterwards the server is healthy and still answers a greedy request correctly.
"""

from __future__ import annotations

import os
import re
import string

import pytest
import requests
from chat_cases import CASES as CHATS
from chat_cases import as_text, render
from hostile_cases import CASES, PART_CASES, PLACEMENTS, WHERE, Placement, part_of

from vllm_chat_embeds import errors

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 8}


def template_regex(template: str) -> re.Pattern[str]:
    """A regex matching the start of any message built from ``template``."""
    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if field is not None:
            out.append(".*?")
    return re.compile("".join(out), re.DOTALL)


def post(server, messages, **kwargs):
    body = {"model": server.model, "messages": messages, **GREEDY, **kwargs}
    return requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)


def hostile_outcome(response: requests.Response, case) -> str | None:
    """Check a hostile case's answer, on any endpoint: a 200 where the case must succeed,
    else a 400 whose message is the case's; return that message."""
    if case.expect is None:
        assert response.status_code == 200, response.text
        return None
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert template_regex(case.expect).match(message), message
    return message


def placement_failures(send, placement: Placement, table, width: int) -> list[str]:
    """Send every part case of the table at ``placement``; return what went wrong.

    ``send(messages)`` answers with ``(status, message)``: 200 with None, or the error code
    and message. A bad part must get its case's message naming the part's place, wherever it
    sits; a valid one must be served there.
    """
    rows = table.rows(" 1 + 2")
    valid = table.part(" 1 + 2")
    failures = []
    for case in PART_CASES:
        status, message = send(placement.build(part_of(case, width, rows), valid))
        if case.expect is None:
            ok = status == 200
        else:
            ok = status == 400 and bool(template_regex(case.expect).match(message or ""))
            if ok and "{where}" in case.expect:
                ok = placement.where in (message or "")
        if not ok:
            failures.append(f"{case.name}: {status} {message!r}")
    return failures


def chat_send(server):
    def send(messages):
        response = post(server, messages, max_tokens=1)
        if response.status_code == 200:
            return 200, None
        return response.status_code, response.json().get("error", {}).get("message")

    return send


@pytest.fixture(scope="module")
def width(table):
    return int(table.weight.shape[1])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case(plugin_server, table, width, case):
    response = post(plugin_server, case.build(width, table.rows(" 1 + 2")))
    message = hostile_outcome(response, case)
    if message is None:
        return
    if "{where}" in case.expect and case.name.startswith(("not_", "data_", "nan", "inf")):
        assert message.startswith(WHERE), message
    assert plugin_server.healthy()


@pytest.mark.parametrize("placement", PLACEMENTS, ids=[p.name for p in PLACEMENTS])
def test_every_bad_part_at_every_place(plugin_server, table, width, placement):
    """Each part case first, middle, last, alone, beside text or a valid part, in any role:
    always our message naming that place (a malformed first part once got pydantic's dump)."""
    assert placement_failures(chat_send(plugin_server), placement, table, width) == []
    assert plugin_server.healthy()


def test_exploit_pickle_never_ran(plugin_server):
    assert not os.path.exists("/tmp/vce-pwned")


def test_server_still_answers_correctly_after_hostile_requests(plugin_server, table, width):
    for case in CASES:
        post(plugin_server, case.build(width, table.rows(" 1 + 2")))
    case = CHATS["interleaved"]
    reference = post(plugin_server, as_text(case)).json()
    with_embeds = post(plugin_server, render(case, table.part)).json()
    assert with_embeds["choices"][0]["message"] == reference["choices"][0]["message"]
    assert plugin_server.healthy()


def test_bad_first_part_on_batch_chat_and_tokenize(plugin_server, table):
    """The other chat-message endpoints validate parts the same way: our message, not
    pydantic's dump; and the batch endpoint serves good parts like the text."""
    bad = [{"role": "user", "content": [{"type": "prompt_embeds"}, {"type": "text", "text": "x"}]}]
    expected = errors.DATA_MISSING.format(where="messages[0].content[0]")
    url = plugin_server.base_url
    body = {"model": plugin_server.model, "messages": [bad], **GREEDY}
    batch = requests.post(url + "/v1/chat/completions/batch", json=body, timeout=120)
    assert batch.status_code == 400, batch.text
    assert batch.json()["error"]["message"].startswith(expected), batch.text
    tokenize = requests.post(
        url + "/tokenize", json={"model": plugin_server.model, "messages": bad}, timeout=120
    )
    assert tokenize.status_code == 400, tokenize.text
    assert tokenize.json()["error"]["message"].startswith(expected)
    case = CHATS["interleaved"]
    body["messages"] = [as_text(case), render(case, table.part)]
    served = requests.post(url + "/v1/chat/completions/batch", json=body, timeout=120)
    assert served.status_code == 200, served.text
    first, second = (c["message"]["content"] for c in served.json()["choices"])
    assert first == second

"""Part data lifted out of the JSON body before FastAPI parses it, on a live server
(``entrypoints/big_bodies.py``).

``plugin_server`` and ``feature_server`` lift every part's data (``ALL_PARTS_LIFTED``), so the
parity and hostile tables on them run over the lifted path. Here: data as it stands and data
with a JSON escape (lifted as it stands, its escapes read by the decoder) answer alike, for
each shape, one request and a batch; ``/v1/responses`` is not lifted (vLLM stores its
input); bodies it must not touch (stray handles, broken JSON, long texts) get vLLM's or the
part's usual answers.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from chat_cases import CASES, as_text, render

from vllm_chat_embeds.entrypoints import body_sink
from vllm_chat_embeds.entrypoints.big_bodies import HANDLE_PREFIX

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 8}
SHAPES = ["one_part", "interleaved", "only_embeds", "every_role", "multi_turn"]


def post(server, body: bytes, path: str = "/v1/chat/completions") -> requests.Response:
    headers = {"Content-Type": "application/json"}
    return requests.post(server.base_url + path, data=body, headers=headers, timeout=180)


def chat_body(server, messages) -> bytes:
    return json.dumps({"model": server.model, "messages": messages, **GREEDY}).encode()


def answer(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_startup_log_names_the_lifting(plugin_server):
    assert "skips the JSON parser of /tokenize, /v1/chat/completions" in plugin_server.log()
    assert body_sink.SINKING in plugin_server.log()  # the launcher runs the sinking protocol


@pytest.mark.parametrize("name", SHAPES)
def test_lifted_and_parsed_bodies_answer_as_the_text(plugin_server, table, name):
    text = answer(post(plugin_server, chat_body(plugin_server, as_text(CASES[name]))))
    messages = render(CASES[name], table.part)
    lifted = chat_body(plugin_server, messages)
    parsed = _escape_data_prefix(lifted)
    assert parsed != lifted and json.loads(parsed) == json.loads(lifted)
    assert answer(post(plugin_server, lifted)) == text
    assert answer(post(plugin_server, parsed)) == text


def _escape_data_prefix(body: bytes) -> bytes:
    """Each ``"data": "<c>`` written as ``"data": "\\u00XX`` (same JSON value, an escape)."""
    out = bytearray()
    marker = b'"data": "'
    pos = 0
    while (at := body.find(marker, pos)) >= 0:
        first = at + len(marker)
        out += body[pos:first] + b"\\u%04x" % body[first]
        pos = first + 1
    out += body[pos:]
    return bytes(out)


def test_a_batch_of_lifted_bodies_answers_as_its_texts(plugin_server, table):
    names = SHAPES * 2
    texts = {
        n: answer(post(plugin_server, chat_body(plugin_server, as_text(CASES[n])))) for n in SHAPES
    }
    bodies = [chat_body(plugin_server, render(CASES[n], table.part)) for n in names]
    with ThreadPoolExecutor(len(bodies)) as pool:
        got = list(pool.map(lambda b: answer(post(plugin_server, b)), bodies))
    assert got == [texts[n] for n in names]


def test_responses_input_is_not_lifted_and_answers_as_the_text(plugin_server, table):
    """vLLM stores a response's input for later turns: handles must not reach it."""
    case = CASES["interleaved"]

    def responses_body(messages) -> bytes:
        items = []
        for m in messages:
            content = m["content"]
            if isinstance(content, list):
                content = [
                    {"type": "input_text", "text": p["text"]} if p["type"] == "text" else p
                    for p in content
                ]
            items.append({"role": m["role"], "content": content})
        body = {"model": plugin_server.model, "input": items, "temperature": 0.0}
        return json.dumps({**body, "max_output_tokens": 8}).encode()

    def output(response) -> str:
        assert response.status_code == 200, response.text
        return response.json()["output"][-1]["content"][0]["text"]

    text = output(post(plugin_server, responses_body(as_text(case)), "/v1/responses"))
    lifted = responses_body(render(case, table.part))
    assert output(post(plugin_server, lifted, "/v1/responses")) == text
    assert output(post(plugin_server, _escape_data_prefix(lifted), "/v1/responses")) == text


def test_a_stray_handle_is_bad_base64(plugin_server, table):
    part = {"type": "prompt_embeds", "data": HANDLE_PREFIX + "x" * 300}
    body = chat_body(plugin_server, [{"role": "user", "content": [part]}])
    response = post(plugin_server, body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "messages[0].content[0]" in message and "base64" in message.lower()


def test_broken_json_gets_vllms_answer(plugin_server, table):
    body = chat_body(plugin_server, render(CASES["one_part"], table.part))[:-3]
    response = post(plugin_server, body)
    assert response.status_code in (400, 422), response.text
    assert answer(post(plugin_server, chat_body(plugin_server, as_text(CASES["one_part"]))))


def test_a_long_text_is_not_lifted(plugin_server):
    words = " ".join(["hello"] * 200)
    messages = [{"role": "user", "content": [{"type": "text", "text": words}]}]
    as_string = [{"role": "user", "content": words}]
    assert answer(post(plugin_server, chat_body(plugin_server, messages))) == answer(
        post(plugin_server, chat_body(plugin_server, as_string))
    )


def test_a_bad_lifted_part_is_refused_as_when_parsed(plugin_server, table):
    part = table.part("x")
    bad = {**part, "data": part["data"][:-8] + "!!!!!!!!"}
    body = chat_body(plugin_server, [{"role": "user", "content": [bad]}])
    answers = []
    for sent in (body, _escape_data_prefix(body)):
        response = post(plugin_server, sent)
        assert response.status_code == 400, response.text
        answers.append(response.json()["error"]["message"])
    assert answers[0] == answers[1]

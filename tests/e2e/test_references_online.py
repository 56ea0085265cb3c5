"""Parts by reference against a live server: a part sent once with ``data`` and a ``uuid`` is
referred to by its uuid alone afterwards, and the answers are those of the data (and of the
text the rows stand for).

Runs on ``feature_server`` (prefix caching on, a small ``CHAT_EMBEDS_REFERENCE_BYTES`` so
eviction is reachable), so a stale cache entry or stale kept rows would show as a wrong answer.
"""

from __future__ import annotations

import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import requests
import torch
from chat_cases import CASES, as_text, render
from conftest import REFERENCE_TEST_BYTES, tensor_b64

from vllm_chat_embeds import errors

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 8}


def new_uuid() -> str:
    return uuidlib.uuid4().hex


def post(server, messages, **kwargs) -> requests.Response:
    body = {"model": server.model, "messages": messages, **GREEDY, **kwargs}
    return requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)


def answer(server, messages, **kwargs) -> tuple[str, int]:
    response = post(server, messages, **kwargs)
    assert response.status_code == 200, response.text
    data = response.json()
    return data["choices"][0]["message"]["content"], data["usage"]["prompt_tokens"]


def unknown(response: requests.Response, where: str, uuid: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith(errors.REFERENCE_UNKNOWN.format(where=where, uuid=uuid))
    assert errors.REFERENCE_UNKNOWN_CODE in error["message"]
    assert error["code"] == 400 and error["type"] == "BadRequestError"


class Parts:
    """Parts of one conversation: each text's rows under a uuid of its own, sent with data
    (``sent``) or by uuid alone (``ref``)."""

    def __init__(self, table) -> None:
        self.table = table
        self.uuids: dict[str, str] = {}

    def uuid(self, text: str) -> str:
        return self.uuids.setdefault(text, new_uuid())

    def sent(self, text: str) -> dict[str, Any]:
        return {**self.table.part(text), "uuid": self.uuid(text)}

    def ref(self, text: str) -> dict[str, Any]:
        return {"type": "prompt_embeds", "uuid": self.uuid(text)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_equals_data_and_text(feature_server, table, name):
    """Part first, middle, last, alone, several, in every role: uuid alone == data == text."""
    case, parts = CASES[name], Parts(table)
    reference = answer(feature_server, as_text(case))
    assert answer(feature_server, render(case, parts.sent)) == reference
    assert answer(feature_server, render(case, parts.ref)) == reference
    # Data and uuid mixed in one request.
    mixed = iter([parts.sent, parts.ref] * 8)
    assert answer(feature_server, render(case, lambda text: next(mixed)(text))) == reference


def test_streaming_by_reference(feature_server, table):
    case, parts = CASES["interleaved"], Parts(table)
    reference = answer(feature_server, as_text(case))[0]
    answer(feature_server, render(case, parts.sent))
    body = {
        "model": feature_server.model,
        "messages": render(case, parts.ref),
        "stream": True,
        **GREEDY,
    }
    chunks = feature_server.client.chat.completions.create(**body)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reference


def test_reasoning_part_by_reference(feature_server, table):
    template = (
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['reasoning'] is defined and message['reasoning'] %}"
        "{{- '<think>' + message['reasoning'] + '</think>' }}{%- endif %}"
        "{{- message['content'] }}{{- '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    parts = Parts(table)

    def chat(reasoning):
        messages = [
            {"role": "user", "content": "def f(x):"},
            {"role": "assistant", "content": "return x", "reasoning": reasoning},
            {"role": "user", "content": "and g?"},
        ]
        return answer(feature_server, messages, chat_template=template)

    reference = chat("x is an int")
    assert chat(parts.sent("x is an int")) == reference
    assert chat(parts.ref("x is an int")) == reference


def test_responses_api_by_reference(feature_server, table):
    parts = Parts(table)
    text = " return world + 1"

    def create(part):
        content = [{"type": "input_text", "text": "def hello(world):"}, part]
        return feature_server.client.responses.create(
            model=feature_server.model,
            input=[{"role": "user", "content": content}],
            temperature=0.0,
            max_output_tokens=8,
        )

    reference = create({"type": "input_text", "text": text})
    for part in (parts.sent(text), parts.ref(text)):
        got = create(part)
        assert (got.output_text, got.usage.input_tokens) == (
            reference.output_text,
            reference.usage.input_tokens,
        )
    body = {
        "model": feature_server.model,
        "input": [{"role": "user", "content": [{"type": "prompt_embeds", "uuid": "never-sent"}]}],
        **GREEDY,
    }
    response = requests.post(feature_server.base_url + "/v1/responses", json=body, timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert errors.REFERENCE_UNKNOWN_CODE in error["message"], error
    assert error["message"].startswith("input[0].content[0]: ") and error["param"] == "input"


def test_previous_response_id_over_a_reference_then_eviction(feature_server, table):
    """A stored /v1/responses turn whose part went by uuid alone is history for the next turn
    while its rows are kept. Once they are evicted, a turn chained to it gets the 400 with the
    marker (never a 500, and the server goes on), and the history sent again with the part's
    data answers as the same chain as text."""
    text, uuid = " return world + 1", new_uuid()
    head = {"type": "input_text", "text": "def hello(world):"}
    follow_up = [{"role": "user", "content": [{"type": "input_text", "text": " and then?"}]}]

    def create(items, **kwargs):
        response = feature_server.client.responses.create(
            model=feature_server.model,
            input=items,
            temperature=0.0,
            max_output_tokens=8,
            store=True,
            **kwargs,
        )
        return response.output_text, response.usage.input_tokens, response.id

    def first(part):
        return [{"role": "user", "content": [head, part]}]

    text_1 = create(first({"type": "input_text", "text": text}))
    text_2 = create(follow_up, previous_response_id=text_1[2])
    create(first({**table.part(text), "uuid": uuid}))  # the rows are kept from here on
    ref_1 = create(first({"type": "prompt_embeds", "uuid": uuid}))
    assert ref_1[:2] == text_1[:2]
    assert create(follow_up, previous_response_id=ref_1[2])[:2] == text_2[:2]
    # Evict the rows: other parts that fill the whole store.
    width = int(table.weight.shape[1])
    rows = REFERENCE_TEST_BYTES // (width * 4) // 3 + 1  # three of these do not fit
    filler = table.rows(" 1 + 2").repeat(rows, 1)[:rows].contiguous()
    for scale in (1.5, 2.0, 2.5):
        part = {"type": "prompt_embeds", "data": tensor_b64(filler * scale), "uuid": new_uuid()}
        response = post(feature_server, [{"role": "user", "content": [part]}])
        assert response.status_code == 200, response.text
    with pytest.raises(openai.BadRequestError) as info:
        create(follow_up, previous_response_id=ref_1[2])
    assert errors.REFERENCE_UNKNOWN_CODE in str(info.value)
    assert uuid in str(info.value)
    # The client resends the history with the part's data (no previous_response_id).
    history = [
        *first({**table.part(text), "uuid": uuid}),
        {"role": "assistant", "content": text_1[0]},
        *follow_up,
    ]
    resent = create(history)
    assert resent[:2] == text_2[:2]
    assert feature_server.healthy()


def test_unknown_uuid_names_the_part_and_says_to_resend(feature_server, table):
    uuid = new_uuid()
    messages = [{"role": "user", "content": [{"type": "text", "text": "x ="}]}]
    messages[0]["content"].append({"type": "prompt_embeds", "uuid": uuid})
    unknown(post(feature_server, messages), "messages[0].content[1]", uuid)
    # Resending with data makes the same reference work.
    messages[0]["content"][1] = {**table.part(" 1 + 2"), "uuid": uuid}
    with_data = answer(feature_server, messages)
    messages[0]["content"][1] = {"type": "prompt_embeds", "uuid": uuid}
    assert answer(feature_server, messages) == with_data


def test_same_uuid_other_data_replaces_rows(feature_server, table):
    """Prefix caching is on: the uuid's old rows must not answer for its new ones."""
    uuid = new_uuid()

    def chat(part):
        return answer(feature_server, [{"role": "user", "content": [part]}])

    for text in ("def hello(world):", "import os, sys", "def hello(world):"):
        reference = chat({"type": "text", "text": text})
        assert chat({**table.part(text), "uuid": uuid}) == reference
        assert chat({"type": "prompt_embeds", "uuid": uuid}) == reference
    assert chat({"type": "text", "text": "import os, sys"}) != reference


def test_two_uuids_with_the_same_rows_answer_alike(feature_server, table):
    first, second = new_uuid(), new_uuid()
    content = [{"type": "text", "text": "class Foo:"}]
    answers = []
    for uuid in (first, second):
        answers.append(
            answer(
                feature_server,
                [
                    {
                        "role": "user",
                        "content": [*content, {**table.part(" def bar(self):"), "uuid": uuid}],
                    }
                ],
            )
        )
    for uuid in (first, second):
        answers.append(
            answer(
                feature_server,
                [{"role": "user", "content": [*content, {"type": "prompt_embeds", "uuid": uuid}]}],
            )
        )
    assert len(set(answers)) == 1


def test_uuid_sent_by_one_client_used_by_another(feature_server, table):
    """References belong to the server process, not to a connection or a client."""
    uuid, text = new_uuid(), " return world + 1"
    content = [{"type": "text", "text": "def hello(world):"}]
    sent = {**table.part(text), "uuid": uuid}
    with requests.Session() as session:
        body = {
            "model": feature_server.model,
            "messages": [{"role": "user", "content": [*content, sent]}],
            **GREEDY,
        }
        first = session.post(
            feature_server.base_url + "/v1/chat/completions", json=body, timeout=120
        )
        assert first.status_code == 200, first.text
    other = feature_server.client.chat.completions.create(
        model=feature_server.model,
        messages=[{"role": "user", "content": [*content, {"type": "prompt_embeds", "uuid": uuid}]}],  # type: ignore[list-item]
        **GREEDY,
    )
    assert other.choices[0].message.content == first.json()["choices"][0]["message"]["content"]


def test_least_recently_used_rows_are_evicted(feature_server, table):
    """The server keeps REFERENCE_TEST_BYTES of rows: three parts of a third of that and more
    push out the least recently used one."""
    width = int(table.weight.shape[1])
    n = REFERENCE_TEST_BYTES // (width * 4) // 3 + 1  # rows: three of them do not fit
    base = table.rows(" 1 + 2")
    uuids = {name: new_uuid() for name in "abcd"}

    def send(name, with_data):
        rows = base.repeat(n // len(base) + 1, 1)[:n] * (1 + "abcd".index(name) / 10)
        part = {"type": "prompt_embeds", "uuid": uuids[name]}
        if with_data:
            part["data"] = tensor_b64(rows.contiguous())
        return post(
            feature_server, [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}]
        )

    for name in "ab":
        assert send(name, True).status_code == 200
    assert send("a", False).status_code == 200  # a is now more recently used than b
    assert send("c", True).status_code == 200  # b goes
    unknown(send("b", False), "messages[0].content[1]", uuids["b"])
    assert send("a", False).status_code == 200
    assert send("c", False).status_code == 200
    assert send("d", True).status_code == 200  # the least recently used of a, c goes: a
    unknown(send("a", False), "messages[0].content[1]", uuids["a"])
    assert send("c", False).status_code == 200 and send("d", False).status_code == 200


def test_concurrent_clients_shared_and_distinct_uuids(feature_server, table):
    """Many clients at once: some share uuids (sent by all, then used by all), some hold their
    own; every answer is that of the text its rows stand for."""
    texts = ["def hello(world):", "import os, sys", "class Foo:", "for item in range(10):"]
    shared = {text: new_uuid() for text in texts}
    references = {
        text: answer(
            feature_server, [{"role": "user", "content": [{"type": "text", "text": text}]}]
        )
        for text in texts
    }

    def client(k: int) -> list[bool]:
        text = texts[k % len(texts)]
        uuid = shared[text] if k % 2 else new_uuid()
        results = []
        for with_data in (True, False, False):
            part = {"type": "prompt_embeds", "uuid": uuid}
            if with_data:
                part = {**table.part(text), "uuid": uuid}
            results.append(
                answer(feature_server, [{"role": "user", "content": [part]}]) == references[text]
            )
        return results

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(client, range(16)))
    assert all(all(r) for r in outcomes), outcomes
    assert feature_server.healthy()


def test_references_hit_the_prefix_cache_and_digests_cannot_be_forged(feature_server, table):
    """A reference's blocks are keyed by the content digest kept beside its rows, so the
    second request reuses the first one's KV blocks; a client cannot supply such a digest."""
    rows = table.rows(" 1 + 2").repeat(300, 1)[:300]
    rows = rows * torch.linspace(0.5, 1.5, 300).unsqueeze(1)
    uuid = new_uuid()
    head = {"type": "text", "text": "x ="}

    def chat(part, **kwargs):
        response = post(feature_server, [{"role": "user", "content": [head, part]}], **kwargs)
        assert response.status_code == 200, response.text
        data = response.json()
        cached = (data["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return data["choices"][0]["message"]["content"], data["usage"]["prompt_tokens"], cached

    sent = chat({"type": "prompt_embeds", "data": tensor_b64(rows), "uuid": uuid})
    again = chat({"type": "prompt_embeds", "uuid": uuid})
    assert again[:2] == sent[:2]
    assert again[2] >= 256, again  # every full block of the first request, rows included
    # vLLM passes a client's vllm_xargs on to the engine; ours among them is dropped.
    forged = {"vllm_xargs": {"_vllm_chat_embeds_span_digests": [300, "00" * 32]}}
    other = rows.flip(0).contiguous()
    plain = chat({"type": "prompt_embeds", "data": tensor_b64(other)})
    assert chat({"type": "prompt_embeds", "data": tensor_b64(other)}, **forged)[:2] == plain[:2]
    # Nor can it claim the engine holds rows it did not send (stores/engine_rows.py): the
    # forged wire (vllm_xargs values are strings, numbers or lists) is dropped, and the
    # request is served with the rows it carries.
    wire = {"_vllm_chat_embeds_rows_wire": ["u", uuid]}
    with_data = {"type": "prompt_embeds", "data": tensor_b64(other)}
    assert chat(with_data, vllm_xargs=wire)[:2] == plain[:2]
    assert chat({"type": "prompt_embeds", "uuid": uuid}, vllm_xargs=wire)[:2] == sent[:2]
    assert feature_server.healthy()


def test_conversation_helper_resends_on_a_miss_with_the_openai_client(feature_server, table):
    """The helper believes the server holds a part it never got: the openai client raises
    BadRequestError with the marker, and the helper resends once with data."""
    from vllm_chat_embeds.client import Conversation

    chat = Conversation()
    part = {**table.part(" return world + 1"), "uuid": new_uuid()}
    chat.sent.add(part["uuid"])  # as if sent before to a server that has since forgotten it
    head = {"type": "text", "text": "def hello(world):"}
    messages = [{"role": "user", "content": [head, part]}]
    reply = chat.send(
        feature_server.client.chat.completions.create,
        model=feature_server.model,
        messages=messages,
        **GREEDY,
    )
    text = [{"role": "user", "content": [head, {"type": "text", "text": " return world + 1"}]}]
    assert reply.choices[0].message.content == answer(feature_server, text)[0]
    assert chat.resends == 1
    again = chat.send(
        feature_server.client.chat.completions.create,
        model=feature_server.model,
        messages=messages,
        **GREEDY,
    )
    assert again.choices[0].message.content == reply.choices[0].message.content
    assert chat.resends == 1

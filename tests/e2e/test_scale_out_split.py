"""vLLM's scale-out split with prompt_embeds parts, on one ``--enable-scale-out`` server:
render (``/v1/chat/completions/render``, ``/v1/responses/render``) then generate
(``/inference/v1/generate``), and ``/v1/chat/completions/derender``.

The rows travel as ``prompt_embeds`` items of the ``GenerateRequest``'s ``features``; the
generated token ids equal those of the same chat sent as text through the same split. Forged
or malformed carried rows get a 400 naming the field, and the engine keeps serving.
"""

from __future__ import annotations

import base64
import copy
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import torch
from chat_cases import CASES, as_text, render
from hostile_cases import CASES as HOSTILE
from test_hostile_online import hostile_outcome
from vllm.entrypoints.scale_out.token_in_token_out.mm_serde import encode_mm_kwargs_item

from vllm_chat_embeds.renderers.splice import rows_item
from vllm_chat_embeds.row_digest import rows_digest

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 6}
SHAPES = ["one_part", "interleaved", "only_embeds", "several_parts", "every_role", "multi_turn"]


def post(server, path: str, body: dict) -> requests.Response:
    return requests.post(server.base_url + path, json=body, timeout=180)


def rendered(server, messages, **extra: Any) -> dict:
    body = {"model": server.model, "messages": messages, **GREEDY, **extra}
    response = post(server, "/v1/chat/completions/render", body)
    assert response.status_code == 200, response.text
    return response.json()


def generated(server, request: dict) -> list[int]:
    response = post(server, "/inference/v1/generate", request)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def split_answer(render_server, generate_server, messages) -> tuple[list[int], dict]:
    request = rendered(render_server, messages)
    return generated(generate_server, request), request


def check_parity(render_server, generate_server, table, names=SHAPES) -> None:
    """Each chat with parts, rendered on one server and generated on another (or the same),
    answers with the token ids of the same chat as text, alone and as a concurrent batch."""
    expected = [split_answer(render_server, generate_server, as_text(CASES[n]))[0] for n in names]
    requests_ = [rendered(render_server, render(CASES[n], table.part)) for n in names]
    for name, request in zip(names, requests_, strict=True):
        assert request["features"]["mm_hashes"].keys() == {"prompt_embeds"}, name
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda r: generated(generate_server, r), requests_ * 2))
    assert answers == expected * 2


def test_one_server_parity(plugin_server, table):
    check_parity(plugin_server, plugin_server, table)


def test_rendered_request_carries_only_rows(plugin_server, table):
    """One item per part, at its placeholder range, holding that part's rows; 0 at the rows in
    token_ids; text chats carry no features."""
    messages = render(CASES["several_parts"], table.part)
    request = rendered(plugin_server, messages)
    features = request["features"]
    ranges = features["mm_placeholders"]["prompt_embeds"]
    lengths = [len(table.rows("import os")), len(table.rows(" import sys"))]
    assert [r["length"] for r in ranges] == lengths
    for r in ranges:
        assert request["token_ids"][r["offset"] : r["offset"] + r["length"]] == [0] * r["length"]
    assert len(features["kwargs_data"]["prompt_embeds"]) == 2
    assert rendered(plugin_server, as_text(CASES["several_parts"]))["features"] is None


def test_stream_usage_and_derender(plugin_server, table):
    """Streamed generate output equals the full one; derender turns it into a chat response
    whose usage counts every row as a prompt token."""
    messages = render(CASES["interleaved"], table.part)
    request = rendered(plugin_server, messages)
    full = post(plugin_server, "/inference/v1/generate", request)
    assert full.status_code == 200, full.text
    tokens = full.json()["choices"][0]["token_ids"]
    streamed: list[int] = []
    with requests.post(
        plugin_server.base_url + "/inference/v1/generate",
        json={**request, "stream": True},
        stream=True,
        timeout=180,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    streamed += choice.get("token_ids") or []
    assert streamed == tokens
    prompt_tokens = len(request["token_ids"])
    text_prompt = len(rendered(plugin_server, as_text(CASES["interleaved"]))["token_ids"])
    assert prompt_tokens == text_prompt
    derender = {
        "model": plugin_server.model,
        "generate_response": full.json(),
        "prompt_tokens": prompt_tokens,
    }
    answer = post(plugin_server, "/v1/chat/completions/derender", derender)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    direct = post(
        plugin_server,
        "/v1/chat/completions",
        {"model": plugin_server.model, "messages": messages, **GREEDY},
    ).json()
    assert body["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert direct["usage"]["prompt_tokens"] == prompt_tokens


def test_responses_render_and_references(plugin_server, table):
    """/v1/responses/render carries parts too; a part by uuid renders with the rows the render
    server keeps, and answers as its text."""
    text = [{"role": "user", "content": [{"type": "input_text", "text": "def hello(world):"}]}]
    with_part = copy.deepcopy(text)
    with_part[0]["content"].append(table.part(" return world + 1"))
    body = {"model": plugin_server.model, "max_output_tokens": 6, "temperature": 0.0}
    as_text_input = copy.deepcopy(text)
    as_text_input[0]["content"].append({"type": "input_text", "text": " return world + 1"})
    answers = []
    for item in (as_text_input, with_part):
        response = post(plugin_server, "/v1/responses/render", {**body, "input": item})
        assert response.status_code == 200, response.text
        answers.append(generated(plugin_server, response.json()))
    assert answers[0] == answers[1]
    # Parts by reference: data once, then the uuid alone.
    uuid = "scale-out-" + base64.b16encode(torch.randn(4).numpy().tobytes()).decode()[:16]
    first = render(CASES["one_part"], lambda t: {**table.part(t), "uuid": uuid})
    later = render(CASES["one_part"], lambda t: {"type": "prompt_embeds", "uuid": uuid})
    expected = split_answer(plugin_server, plugin_server, as_text(CASES["one_part"]))[0]
    assert split_answer(plugin_server, plugin_server, first)[0] == expected
    assert split_answer(plugin_server, plugin_server, later)[0] == expected


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_render_route_answers_hostile_parts(plugin_server, table, case):
    """The render route answers every hostile payload as the chat route does."""
    width = int(table.weight.shape[1])
    body = {"model": plugin_server.model, "messages": case.build(width, table.rows(" 1 + 2"))}
    response = post(plugin_server, "/v1/chat/completions/render", {**body, **GREEDY})
    hostile_outcome(response, case)


def test_metadata_only_render_is_refused(plugin_server, table):
    messages = render(CASES["one_part"], table.part)
    body = {"model": plugin_server.model, "messages": messages, "mm_payload": "none", **GREEDY}
    response = post(plugin_server, "/v1/chat/completions/render", body)
    assert response.status_code == 400, response.text
    assert "mm_payload 'none' would leave out" in response.json()["error"]["message"]


def _item(rows: torch.Tensor) -> str:
    return encode_mm_kwargs_item(rows_item(rows))


def _forgeries(request: dict, width: int) -> dict[str, tuple[dict, str | tuple[str, ...]]]:
    """Carried requests broken one way each, with the start of the message each must get."""

    def forged(change) -> dict:
        body = copy.deepcopy(request)
        change(body, body["features"])
        return body

    rows = torch.randn(3, width)
    nan = rows.clone()
    nan[1, 2] = float("nan")
    return {
        "rows_missing": (
            forged(lambda b, f: f.update(kwargs_data=None)),
            "features.kwargs_data.prompt_embeds[0] is missing",
        ),
        "not_an_item": (
            forged(lambda b, f: f["kwargs_data"].update(prompt_embeds=["bm90IGFuIGl0ZW0="])),
            "features.kwargs_data.prompt_embeds[0] is not the serialised item",
        ),
        "hash_forged": (
            forged(lambda b, f: f["mm_hashes"].update(prompt_embeds=["0" * 64])),
            "features.mm_hashes.prompt_embeds[0] does not match",
        ),
        "other_rows_same_hash": (
            forged(lambda b, f: f["kwargs_data"].update(prompt_embeds=[_item(rows)])),
            "features.mm_hashes.prompt_embeds[0] does not match",
        ),
        "wrong_width": (
            forged(
                lambda b, f: f["kwargs_data"].update(
                    prompt_embeds=[_item(torch.randn(3, width + 1))]
                )
            ),
            "features.kwargs_data.prompt_embeds[0]",
        ),
        "nan_rows": (
            forged(
                lambda b, f: (
                    f["kwargs_data"].update(prompt_embeds=[_item(nan)]),
                    f["mm_hashes"].update(prompt_embeds=[rows_digest(nan)]),
                )
            ),
            "features.kwargs_data.prompt_embeds[0]",
        ),
        "range_not_the_item_length": (
            forged(lambda b, f: f["mm_placeholders"]["prompt_embeds"][0].update(length=1)),
            "features.mm_placeholders.prompt_embeds[0] is offset",
        ),
        "range_past_the_end": (  # vLLM's own schema check answers this one
            forged(
                lambda b, f: f["mm_placeholders"]["prompt_embeds"][0].update(
                    offset=len(b["token_ids"])
                )
            ),
            "1 validation error",
        ),
        "uneven_items": (  # vLLM's schema checks hashes against ranges; we check the items
            forged(lambda b, f: f["kwargs_data"]["prompt_embeds"].append(_item(rows))),
            ("features: the prompt_embeds items disagree", "1 validation error"),
        ),
        "token_past_vocab": (
            forged(lambda b, f: b["token_ids"].__setitem__(0, 10**6)),
            "token_ids: token id 1000000 is outside",
        ),
    }


def test_generate_refuses_forged_rows(plugin_server, table):
    request = rendered(plugin_server, render(CASES["one_part"], table.part))
    expected = generated(plugin_server, request)
    width = int(table.weight.shape[1])
    for name, (body, start) in _forgeries(request, width).items():
        response = post(plugin_server, "/inference/v1/generate", body)
        assert response.status_code == 400, (name, response.text)
        message = response.json()["error"]["message"]
        assert message.startswith(start), (name, message)
    assert plugin_server.healthy()
    assert generated(plugin_server, request) == expected  # the engine still serves rightly

"""Two real ``vllm serve`` replicas of one model, one real Redis (``CHAT_EMBEDS_SHARED_STORE``):
rows uploaded or kept by uuid on one replica resolve on the other, and every answer is that of
the text the rows stand for; forged and corrupted values are refused; the store stopped and
started again mid-run costs 503s with a retry hint, never a wrong answer or a dead server.

The last test stops the store: it runs last in this file on purpose.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import torch
from chat_cases import CASES, as_text, render
from conftest import TEST_SERVER_ARGS, Server, run_server, server_env
from redis_server import RedisServer

from vllm_chat_embeds import errors
from vllm_chat_embeds.client import Conversation, upload_file, upload_rows

pytestmark = pytest.mark.e2e

KEY = "replica-key-42"
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = {"temperature": 0.0, "max_tokens": 8}
# Part first and last, middle, alone, several in one request (several store reads pipelined).
LAYOUTS = ["several_parts", "interleaved", "only_embeds", "one_part", "every_role"]


@pytest.fixture(scope="module")
def replicas(tiny_model: Path, vllm_cache_root: str, redis_store: RedisServer) -> Iterator[Any]:
    """Replicas A and B, started side by side, sharing ``redis_store``; with the scale-out
    routes on, so one renders what the other generates."""
    extra = {"CHAT_EMBEDS_SHARED_STORE": redis_store.url, "CHAT_EMBEDS_SHARED_STORE_TIMEOUT": "1"}
    env = server_env(trap=True, plugins=True, mp=True, cache_root=vllm_cache_root, extra=extra)
    args = [*TEST_SERVER_ARGS, "--api-key", KEY, "--enable-scale-out"]
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        starts = [pool.submit(stack.enter_context, run_server(tiny_model, *args, env=env))
                  for _ in range(2)]  # fmt: skip
        yield tuple(f.result() for f in starts)


def post(server: Server, messages: Any, path: str = "/v1/chat/completions", **kw: Any):
    body = {"model": server.model, "messages": messages, **GREEDY, **kw}
    return requests.post(server.base_url + path, json=body, headers=AUTH, timeout=120)


def answer(server: Server, messages: Any, **kw: Any) -> str:
    response = post(server, messages, **kw)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


def new_uuid() -> str:
    return uuidlib.uuid4().hex


def with_data(table, text: str, uuid: str) -> list[dict[str, Any]]:
    """A chat of one part: ``text``'s rows sent with their data under ``uuid``."""
    return [{"role": "user", "content": [{**table.part(text), "uuid": uuid}]}]


def by_uuid(uuid: str) -> list[dict[str, Any]]:
    """A chat of one part named by ``uuid`` alone."""
    return [{"role": "user", "content": [{"type": "prompt_embeds", "uuid": uuid}]}]


def key_of(redis_store: RedisServer, ident: str) -> bytes:
    keys = list(redis_store.client().scan_iter(match=f"vce:*:r:{ident}"))
    assert len(keys) == 1, keys
    return keys[0]


def test_started_with_the_store(replicas):
    for server in replicas:
        assert "are shared through redis://127.0.0.1" in server.log()


@pytest.mark.parametrize("name", LAYOUTS)
def test_upload_on_one_replica_chat_on_the_other(replicas, table, name):
    a, b = replicas
    reference = answer(b, as_text(CASES[name]))
    base = a.base_url + "/v1"
    uploaded = render(CASES[name], lambda t: upload_rows(base, table.rows(t), api_key=KEY))
    assert answer(b, uploaded) == reference
    assert answer(a, uploaded) == reference


def test_uuid_parts_across_replicas_chat_and_responses(replicas, table):
    a, b = replicas
    case = CASES["several_parts"]
    uuids: dict[str, str] = {}
    sent = render(case, lambda t: {**table.part(t), "uuid": uuids.setdefault(t, new_uuid())})
    named = render(case, lambda t: {"type": "prompt_embeds", "uuid": uuids[t]})
    reference = answer(b, as_text(case))
    assert answer(a, sent) == reference
    assert answer(b, named) == reference
    # /v1/responses on the replica that never saw the data.
    text, part = "import os, sys", {"type": "prompt_embeds", "uuid": new_uuid()}
    answer(a, [{"role": "user", "content": [{**table.part(text), "uuid": part["uuid"]}]}])

    def respond(content: dict) -> str:
        body = {"model": b.model, "input": [{"role": "user", "content": [content]}],
                "temperature": 0.0, "max_output_tokens": 8}  # fmt: skip
        response = requests.post(b.base_url + "/v1/responses", json=body, headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["output"][-1]["content"][0]["text"]

    assert respond(part) == respond({"type": "input_text", "text": text})


def test_files_api_across_replicas(replicas, table):
    a, b = replicas
    case = CASES["one_part"]
    text = case[0]["content"][1][1]
    file_part = upload_file(client(b), table.rows(text))
    file_id = file_part["file"]["file_id"]
    reference = answer(a, as_text(case))
    assert answer(a, render(case, lambda t: file_part)) == reference
    listed = [f.id for f in client(a).files.list().data]
    assert file_id in listed
    assert client(a).files.retrieve(file_id).filename.endswith(".safetensors")
    from safetensors.torch import load

    content = load(client(a).files.content(file_id).read())["embeddings"]
    assert torch.equal(content, table.rows(text))
    assert client(a).files.delete(file_id).deleted  # for the whole deployment
    response = post(b, render(case, lambda t: file_part))
    assert response.status_code == 400 and errors.REFERENCE_UNKNOWN_CODE in response.text
    assert file_id not in [f.id for f in client(b).files.list().data]
    with pytest.raises(openai.NotFoundError):
        client(b).files.retrieve(file_id)


def test_round_robin_conversation_never_resends(replicas, table):
    """A Conversation whose turns alternate between replicas: its rows are sent once."""
    a, b = replicas
    conversation = Conversation()
    history: list[dict[str, Any]] = []
    text_history: list[dict[str, Any]] = []
    for turn, text in enumerate([" What is a list?", " And a dict?", " And a set?"]):
        server = (a, b)[turn % 2]
        question = {"type": "text", "text": "Q:"}
        history.append({"role": "user", "content": [question, conversation.part(table.rows(text))]})
        text_history.append({"role": "user", "content": [question, {"type": "text", "text": text}]})
        reply = conversation.send(
            client(server).chat.completions.create, model=server.model, messages=history, **GREEDY
        )
        content = reply.choices[0].message.content
        assert content == answer(server, text_history)
        history.append({"role": "assistant", "content": content})
        text_history.append({"role": "assistant", "content": content})
    assert conversation.resends == 0 and len(conversation.sent) == 3


def test_uuid_sent_again_with_other_rows_is_never_served_old(replicas, table):
    a, b = replicas
    uuid = new_uuid()
    ref = by_uuid(uuid)
    for text in ("import os, sys", "for item in range(10):"):
        answer(a, with_data(table, text, uuid))
        expected = answer(b, [{"role": "user", "content": text}])
        assert answer(b, ref) == expected  # B held the first rows when the second came


def test_forged_and_corrupted_values_are_refused(replicas, table, redis_store):
    a, b = replicas
    text = "def hello(world):"
    uuid = new_uuid()
    chat = by_uuid(uuid)
    expected = answer(a, [{"role": "user", "content": text}])
    assert answer(a, with_data(table, text, uuid)) == expected
    store, key = redis_store.client(), key_of(redis_store, uuid)
    good = store.hget(key, "rows")
    flipped = bytearray(good)
    flipped[5] ^= 0x20
    store.hset(key, "rows", bytes(flipped))  # corrupted under its digest
    response = post(b, chat)
    assert response.status_code == 400, response.text
    assert errors.REFERENCE_UNKNOWN_CODE in response.text and "failed their check" in response.text
    assert answer(a, chat) == expected  # A holds the rows it checked, and their digest stands
    # A forged value, consistent with its digest, holding NaN: refused by both replicas.
    import json

    from vllm_chat_embeds.row_digest import rows_digest

    rows = table.rows(text)
    rows[0, 0] = float("nan")
    meta = json.loads(store.hget(key, "meta"))
    data = rows.numpy().tobytes()
    store.hset(key, mapping={"meta": json.dumps({**meta, "digest": rows_digest(rows)}),
                             "rows": data})  # fmt: skip
    for server in (a, b):
        response = post(server, chat)
        assert response.status_code == 400 and "failed their check" in response.text
        assert answer(server, [{"role": "user", "content": text}]) == expected  # still serving
    assert "refused the value of" in b.log()
    # The data sent again replaces the forged value.
    assert answer(b, with_data(table, text, uuid)) == expected
    assert answer(a, chat) == expected


def test_render_on_one_replica_generate_on_the_other(replicas, table):
    a, b = replicas
    case = CASES["interleaved"]
    base = a.base_url + "/v1"
    uploaded = render(case, lambda t: upload_rows(base, table.rows(t), api_key=KEY))

    def split(messages: Any) -> list[int]:
        rendered = post(b, messages, path="/v1/chat/completions/render")
        assert rendered.status_code == 200, rendered.text
        response = requests.post(a.base_url + "/inference/v1/generate", json=rendered.json(),
                                 headers=AUTH, timeout=120)  # fmt: skip
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]

    assert split(uploaded) == split(as_text(case))


def test_concurrent_clients_on_both_replicas(replicas, table):
    a, b = replicas
    texts = ["import os", " import sys", "for item", " in range(10):", "class Foo:", " return"]
    expected = {t: answer(a, [{"role": "user", "content": t}]) for t in texts}

    def one(i: int) -> bool:
        text, uuid = texts[i % len(texts)], new_uuid()
        first, other = (a, b) if i % 2 else (b, a)
        sent = answer(first, with_data(table, text, uuid))
        return sent == expected[text] == answer(other, by_uuid(uuid))

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(one, range(12)))


def test_store_stopped_and_started_again(replicas, table, redis_store):
    """Held rows keep serving, a request that needs the store gets a 503 with a retry hint in
    bounded time, uploads are refused rather than kept on one replica, and once the store is
    back everything recovers by itself."""
    a, b = replicas
    text = "import os, sys"
    uuid = new_uuid()
    chat = by_uuid(uuid)
    expected = answer(a, [{"role": "user", "content": text}])
    assert answer(a, with_data(table, text, uuid)) == expected
    redis_store.stop()
    try:
        assert answer(a, chat) == expected  # held by A
        started = time.monotonic()
        response = post(b, chat)
        assert time.monotonic() - started < 10
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) >= 1
        message = response.json()["error"]["message"]
        assert "retry in" in message and "shared row store redis://127.0.0.1" in message
        with pytest.raises(Exception, match="503|unavailable"):
            upload_rows(a.base_url + "/v1", table.rows(text), api_key=KEY)
        listing = requests.get(b.base_url + "/v1/files", headers=AUTH, timeout=30)
        assert listing.status_code == 503
        assert answer(b, [{"role": "user", "content": text}]) == expected  # text: unaffected
    finally:
        redis_store.start()
    deadline = time.monotonic() + 15
    while (response := post(b, chat)).status_code == 503:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.5)
    # The store lost its data with the restart: "send the data again", as after an eviction.
    assert response.status_code == 400 and errors.REFERENCE_UNKNOWN_CODE in response.text
    assert answer(b, with_data(table, text, uuid)) == expected
    assert answer(a, chat) == expected and answer(b, chat) == expected
    part = upload_rows(a.base_url + "/v1", table.rows(text), api_key=KEY)
    assert answer(b, [{"role": "user", "content": [part]}]) == expected
    assert all(server.healthy() for server in replicas)

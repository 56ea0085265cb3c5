"""Rows through shared memory on a live server (``transport/shared_rows.py``).

``plugin_server`` sends every part's rows to its engine core as a shared-memory handle
(``CHAT_EMBEDS_SHARED_ABOVE_BYTES=0``), so every test on it checks parity over the new
transport; here: the handle path itself for each shape (part first, middle, last, alone,
several), one request and a concurrent batch, inline, by uuid and uploaded, and what is left
in ``/dev/shm`` after requests, aborts and errors. TP=2 (hop 2, shared links passed on to
workers) and shutdown cleanup: ``test_scale_out.py``; the small-``/dev/shm`` fallback: the
data-parallel test there and ``tests/unit/test_shared_rows.py``.
"""

from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from uuid import uuid4

import pytest
import requests
from chat_cases import CASES, as_text, render
from conftest import SHM

from vllm_chat_embeds.client import upload_rows
from vllm_chat_embeds.transport.shared_rows import KEPT_SUFFIX, NAME_PREFIX

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 8}
SHAPES = ["interleaved", "every_role", "only_embeds", "multi_turn"]


def ask(server, messages, **extra) -> str:
    body = {"model": server.model, "messages": messages, **GREEDY, **extra}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=180)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def server_names(server, *, kept: bool = False) -> list[str]:
    """Names in /dev/shm made by the server's API server process (its pid is in them): those
    rows lie in, or (``kept``) those kept for reuse."""
    mine = re.compile(rf"{NAME_PREFIX}[0-9a-f]+-{server.proc.pid}-")
    found = [p.name for p in SHM.iterdir() if mine.match(p.name)]
    return sorted(n for n in found if n.endswith(KEPT_SUFFIX) == kept)


def links(server) -> list[str]:
    """Links of sends nobody has opened yet (``<segment>-l<n>-<pid>``)."""
    return [n for n in server_names(server) if re.search(r"-l\d+-\d+$", n)]


def settled(server, expect: int, timeout_s: float = 20.0) -> list[str]:
    """The server's names once they number ``expect`` (finalisers run after the response)."""
    deadline = time.monotonic() + timeout_s
    while (found := server_names(server)) and len(found) != expect:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return found


@pytest.fixture(scope="module")
def texts(plugin_server):
    return {name: ask(plugin_server, as_text(CASES[name])) for name in SHAPES}


@pytest.mark.parametrize("name", SHAPES)
def test_each_shape_answers_as_its_text_with_rows_as_a_handle(plugin_server, table, texts, name):
    before = server_names(plugin_server)
    assert ask(plugin_server, render(CASES[name], table.part)) == texts[name]
    assert settled(plugin_server, len(before)) == before  # nothing left behind
    log = plugin_server.log()
    assert "cross processes as copies" not in log
    # The API server sent a handle, and the engine core (its own process) mapped it.
    assert re.search(r"\(APIServer pid=\d+\).*cross processes through shared memory", log)
    assert re.search(r"\(EngineCore\S* pid=\d+\).*rows arrive through shared memory", log)


def test_a_concurrent_batch_answers_as_its_text(plugin_server, table, texts):
    before = server_names(plugin_server)
    batch = [render(CASES[name], table.part) for name in SHAPES] * 3
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda m: ask(plugin_server, m), batch))
    assert answers == [texts[name] for name in SHAPES] * 3
    assert settled(plugin_server, len(before)) == before
    assert links(plugin_server) == []


def test_parts_by_uuid_and_uploads_stay_in_one_segment_each(plugin_server, table, texts):
    before = server_names(plugin_server)
    case = CASES["only_embeds"]
    uuid = uuid4().hex
    first = render(case, lambda text: {**table.part(text), "uuid": uuid})
    assert ask(plugin_server, first) == texts["only_embeds"]
    again = render(case, lambda text: {"type": "prompt_embeds", "uuid": uuid})
    for _ in range(3):
        assert ask(plugin_server, again) == texts["only_embeds"]
    kept = settled(plugin_server, len(before) + 1)
    assert len(kept) == len(before) + 1  # the store's one segment, mapped by the engine core
    (text,) = [c[1] for m in case for c in m["content"] if c[0] == "e"]
    part = upload_rows(plugin_server.base_url + "/v1", table.rows(text))
    uploaded = render(case, lambda _: part)
    assert ask(plugin_server, uploaded) == texts["only_embeds"]
    assert len(settled(plugin_server, len(before) + 2)) == len(before) + 2
    assert links(plugin_server) == []
    for ref in (uuid, part["uuid"]):
        requests.delete(f"{plugin_server.base_url}/v1/prompt_embeds/{ref}", timeout=30)


def test_aborted_and_refused_requests_leave_no_segment(plugin_server, table, texts):
    before = server_names(plugin_server)
    messages = render(CASES["interleaved"], table.part)
    host, port = plugin_server.base_url.removeprefix("http://").split(":")
    payload = json.dumps(
        {"model": plugin_server.model, "messages": messages, "max_tokens": 64, "stream": True}
    ).encode()
    for _ in range(4):  # the client goes away as soon as the request is sent
        with socket.create_connection((host, int(port))) as sock:
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            )
            sock.sendall(head.encode() + payload)
    bad = render(CASES["interleaved"], table.part)
    bad[0]["content"].append({"type": "prompt_embeds", "data": "not base64!"})
    body = {"model": plugin_server.model, "messages": bad, **GREEDY}
    refused = requests.post(plugin_server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert refused.status_code == 400
    assert ask(plugin_server, messages) == texts["interleaved"]  # still serving, right answers
    assert settled(plugin_server, len(before)) == before
    assert links(plugin_server) == []


def segment_numbers(server) -> set[int]:
    """The numbers of the server's segments, live or kept (not its links)."""
    found = server_names(server) + server_names(server, kept=True)
    bases = [n.removesuffix(KEPT_SUFFIX) for n in found if not re.search(r"-l\d+-\d+$", n)]
    return {int(n.rsplit("-", 1)[1]) for n in bases}


def test_the_next_parts_of_a_size_reuse_kept_segments(plugin_server, table, texts):
    """Once the engine core and the workers have let a request's rows go, the API server
    writes the next rows of that size into the same segment (no new pages). A worker lets a
    finished request go at its next step, so back-to-back requests may take turns between
    two segments; never more."""
    messages = render(CASES["only_embeds"], table.part)
    assert ask(plugin_server, messages) == texts["only_embeds"]
    deadline = time.monotonic() + 20
    while not server_names(plugin_server, kept=True) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server_names(plugin_server, kept=True), "the rows' segment was not kept"
    before = max(segment_numbers(plugin_server))
    for _ in range(4):
        assert ask(plugin_server, messages) == texts["only_embeds"]
        time.sleep(0.3)
    assert len({n for n in segment_numbers(plugin_server) if n > before}) <= 1

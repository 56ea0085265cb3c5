"""Parts by reference with ``vllm serve --api-server-count 2`` (conftest's ``guarded_server``):
each API server process keeps its own rows, so a uuid sent to one misses on the other;
resending with data fixes that process for good, and every answer is that of the text the rows
stand for.

A kept-alive HTTP connection stays with the API server process that accepted it, so each
``requests.Session`` here talks to one process throughout (keep-alive raised to outlast the
test): a session that misses is on a process that has not seen the data yet.
"""

from __future__ import annotations

import uuid as uuidlib

import pytest
import requests
from conftest import GUARDED_API_KEY

from vllm_chat_embeds import errors
from vllm_chat_embeds.client import Conversation

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 8}
SESSIONS = 12
AUTH = {"Authorization": f"Bearer {GUARDED_API_KEY}"}


def test_miss_on_the_other_api_server_then_resend(guarded_server, table):
    server = guarded_server
    url = server.base_url + "/v1/chat/completions"
    text, uuid = " return world + 1", uuidlib.uuid4().hex
    head = {"type": "text", "text": "def hello(world):"}

    def post(session, part):
        body = {"model": server.model, "messages": [{"role": "user", "content": [head, part]}]}
        return session.post(url, json={**body, **GREEDY}, headers=AUTH, timeout=120)

    def content(response):
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    with_data = {**table.part(text), "uuid": uuid}
    by_uuid = {"type": "prompt_embeds", "uuid": uuid}
    sessions = [requests.Session() for _ in range(SESSIONS)]
    try:
        reference = content(post(sessions[0], {"type": "text", "text": text}))
        assert content(post(sessions[0], with_data)) == reference
        missed = []
        for session in sessions:
            response = post(session, by_uuid)
            if response.status_code == 400:
                message = response.json()["error"]["message"]
                assert errors.REFERENCE_UNKNOWN_CODE in message, message
                missed.append(session)
            else:
                assert content(response) == reference
        assert missed, "no connection reached the second API server"
        assert len(missed) < len(sessions)  # the first session's process holds the rows
        # Resent with data on one missing connection: that process now holds the rows too.
        assert content(post(missed[0], with_data)) == reference
        for session in sessions:
            assert content(post(session, by_uuid)) == reference
    finally:
        for session in sessions:
            session.close()

    # The client helper does the same unattended, over a new connection per request (any
    # process): every turn is right, a miss costs one resend and never an error.
    chat = Conversation()
    part = {**table.part(" import sys"), "uuid": uuidlib.uuid4().hex}
    messages = [{"role": "user", "content": [{"type": "text", "text": "import os,"}, part]}]
    text_parts = [
        {"type": "text", "text": "import os,"},
        {"type": "text", "text": " import sys"},
    ]
    text_messages = [{"role": "user", "content": text_parts}]

    def create(**body):
        body = {"model": server.model, **GREEDY, **body}
        response = requests.post(url, json=body, headers=AUTH, timeout=120)
        if response.status_code != 200:
            raise RuntimeError(response.text)
        return response.json()["choices"][0]["message"]["content"]

    for _ in range(8):
        assert chat.send(create, messages=messages) == create(messages=text_messages)
    assert chat.resends < 8 and chat.sent == {part["uuid"]}

"""Beam search (``use_beam_search``) with prompt_embeds parts on a real ``vllm serve``.

vLLM answered ``501 Embedding prompt not supported for beam search``; the beam-search patches
extend the embeds prompt by each beam's tokens. Each check compares the beams with those of the
same chat sent as text: every beam, in order. Runs on the shared feature server.
"""

from __future__ import annotations

from uuid import uuid4

import pytest
import requests
from chat_cases import CASES, as_text, render
from conftest import EmbeddingTable, tensor_b64

pytestmark = pytest.mark.e2e

BEAMS = {"use_beam_search": True, "n": 3, "max_tokens": 6, "temperature": 0.0}
POSITIONS = ("only_embeds", "one_part", "several_parts", "interleaved", "every_role")


def post(server, path: str, body: dict) -> dict:
    response = requests.post(server.base_url + path, json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def chat_beams(server, model: str, messages: list) -> tuple[list[str], int]:
    out = post(server, "/v1/chat/completions", {"model": model, "messages": messages, **BEAMS})
    return [c["message"]["content"] for c in out["choices"]], out["usage"]["prompt_tokens"]


@pytest.mark.parametrize("case", POSITIONS)
def test_chat_beams_equal_the_text_paths_beams(feature_server, table, case):
    model = feature_server.model
    text = chat_beams(feature_server, model, as_text(CASES[case]))
    parts = chat_beams(feature_server, model, render(CASES[case], table.part))
    assert len(set(text[0])) == 3, "three different beams, or parity is weak"
    assert parts == text


@pytest.mark.parametrize("case", ("only_embeds", "interleaved"))
def test_chat_beams_by_reference(feature_server, table, case):
    """Parts sent with data and a uuid, then by uuid alone: every beam prompt reuses the rows
    kept beside the engine, and the beams stay those of the text."""
    model = feature_server.model
    text = chat_beams(feature_server, model, as_text(CASES[case]))
    uuids: dict[str, str] = {}

    def sent(piece: str) -> dict:
        return {**table.part(piece), "uuid": uuids.setdefault(piece, uuid4().hex)}

    assert chat_beams(feature_server, model, render(CASES[case], sent)) == text
    by_uuid = render(CASES[case], lambda piece: {"type": "prompt_embeds", "uuid": uuids[piece]})
    assert chat_beams(feature_server, model, by_uuid) == text


def test_chat_beams_through_an_adapter(feature_server, table):
    messages = CASES["interleaved"]
    text = chat_beams(feature_server, "lora-a", as_text(messages))
    assert chat_beams(feature_server, "lora-a", render(messages, table.part)) == text
    assert text != chat_beams(feature_server, feature_server.model, as_text(messages))


def _prompt_rows(table: EmbeddingTable, text: str):
    return table.weight[table.tokenizer(text).input_ids]


def test_completions_beams_on_prompt_embeds(feature_server, table):
    """vLLM's own /v1/completions prompt_embeds take the same patched path."""
    prompt = "def hello(world): return world"
    body = {"model": feature_server.model, **BEAMS}
    text = post(feature_server, "/v1/completions", {**body, "prompt": prompt})
    rows = tensor_b64(_prompt_rows(table, prompt))
    embeds = post(feature_server, "/v1/completions", {**body, "prompt_embeds": rows})
    assert [c["text"] for c in embeds["choices"]] == [c["text"] for c in text["choices"]]
    assert len({c["text"] for c in text["choices"]}) == 3

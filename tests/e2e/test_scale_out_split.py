"""vLLM's scale-out split with prompt_embeds parts: render (``/v1/chat/completions/render``)
then generate (``/inference/v1/generate``), on one ``--enable-scale-out`` server.

Never silently: a render of a chat with parts is refused with a 400 saying why, and generate
refuses a request whose features claim prompt_embeds items.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from chat_cases import CASES, render
from conftest import TEST_SERVER_ARGS, Server, run_server, server_env

from vllm_chat_embeds import errors

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def scale_out_server(tiny_model, vllm_cache_root) -> Iterator[Server]:
    env = server_env(trap=True, plugins=True, mp=True, cache_root=vllm_cache_root)
    with run_server(tiny_model, *TEST_SERVER_ARGS, "--enable-scale-out", env=env) as server:
        yield server


def post(server: Server, path: str, body: dict) -> requests.Response:
    return requests.post(server.base_url + path, json=body, timeout=120)


@pytest.mark.parametrize("name", ["one_part", "interleaved", "only_embeds", "every_role"])
def test_render_refuses_parts(scale_out_server, table, name):
    messages = render(CASES[name], table.part)
    body = {"model": scale_out_server.model, "messages": messages, "max_tokens": 4}
    response = post(scale_out_server, "/v1/chat/completions/render", body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "cannot carry to a token engine" in message
    # The same chat without parts renders; the server keeps serving.
    text = [{"role": "user", "content": "hello"}]
    ok = post(scale_out_server, "/v1/chat/completions/render", {**body, "messages": text})
    assert ok.status_code == 200, ok.text


def test_generate_refuses_claimed_rows(scale_out_server):
    body = {
        "token_ids": [1, 2, 3, 4],
        "sampling_params": {"max_tokens": 2, "temperature": 0.0},
        "features": {
            "mm_hashes": {"prompt_embeds": ["x"]},
            "mm_placeholders": {"prompt_embeds": [{"offset": 1, "length": 2}]},
        },
    }
    response = post(scale_out_server, "/inference/v1/generate", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == errors.SCALE_OUT_FEATURES_NOT_SERVED
    assert scale_out_server.healthy()

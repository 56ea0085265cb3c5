"""Two fleets: a GPU-less render server (``vllm launch render``) and a token engine
(``vllm serve --tokens-only``), as a scale-out deployment runs them.

The render server's ``GenerateRequest`` goes to the token engine unchanged (as a router
forwards it); chats with parts answer with the token ids of the same chats as text, alone and
concurrently, and a request claiming rows it does not carry is refused there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import CPU_FLAGS, VLLM, run_server, server_env
from test_scale_out_split import check_parity, post, rendered

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleets(tiny_model, vllm_cache_root) -> Iterator[tuple]:
    env = server_env(trap=True, plugins=True, mp=True, cache_root=vllm_cache_root)
    model = str(tiny_model)
    render_cmd = [
        VLLM, "launch", "render", model, "--host", "127.0.0.1", "--port", "{port}",
        "--dtype", "float32", "--max-model-len", "1024", "--enable-prompt-embeds",
    ]  # fmt: skip
    tokens_cmd = [
        VLLM, "serve", model, "--host", "127.0.0.1", "--port", "{port}", *CPU_FLAGS,
        "--tokens-only", "--enable-prompt-embeds",
    ]  # fmt: skip
    with run_server(model, env=env, command=render_cmd) as renderer:
        with run_server(model, env=env, command=tokens_cmd) as engine:
            yield renderer, engine


def test_render_fleet_to_token_engine_parity(fleets, table):
    renderer, engine = fleets
    check_parity(renderer, engine, table)


def test_token_engine_refuses_rows_it_is_not_given(fleets, table):
    from chat_cases import CASES, render

    renderer, engine = fleets
    request = rendered(renderer, render(CASES["interleaved"], table.part))
    request["features"]["kwargs_data"] = None
    response = post(engine, "/inference/v1/generate", request)
    assert response.status_code == 400, response.text
    assert "is missing" in response.json()["error"]["message"]
    assert engine.healthy()

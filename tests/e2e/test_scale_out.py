"""``vllm serve --api-server-count 2``: both frontends run the plugin and keep parity."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from chat_cases import CASES, as_text, render
from conftest import run_server, server_env

import vllm_chat_embeds

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 8}


def test_two_api_servers(tiny_model, table, vllm_cache_root):
    env = server_env(trap=True, plugins=True, mp=True, cache_root=vllm_cache_root)
    args = ["--enable-prompt-embeds", "--api-server-count", "2"]
    with run_server(tiny_model, *args, env=env) as server:
        case = CASES["interleaved"]
        url = server.base_url + "/v1/chat/completions"

        def ask(messages):
            body = {"model": server.model, "messages": messages, **GREEDY}
            response = requests.post(url, json=body, timeout=120)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        reference = ask(as_text(case))
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, [render(case, table.part)] * 12))
        assert answers == [reference] * 12
        active = f"vllm_chat_embeds {vllm_chat_embeds.__version__} active"
        frontends = {
            m.group(1)
            for line in server.log().splitlines()
            if active in line and (m := re.match(r"\((APIServer_\d+|ApiServer_\d+)", line))
        }
        assert len(frontends) == 2, server.tail(80)

"""Tokenizer modes other than ``hf`` refuse prompt_embeds parts with a 400 naming the mode."""

from __future__ import annotations

import pytest
import requests
from conftest import run_server, server_env
from vllm.config import ModelConfig, VllmConfig
from vllm.exceptions import VLLMValidationError
from vllm.renderers.params import ChatParams
from vllm.renderers.registry import renderer_from_config

import vllm_chat_embeds
from vllm_chat_embeds import errors

pytestmark = pytest.mark.e2e

# Modes whose renderer can be built on the tiny model's plain HF tokenizer.
MODES = ["deepseek_v32", "deepseek_v4", "kimi_k3"]


def messages(part):
    return [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]


@pytest.mark.parametrize("mode", MODES)
def test_renderer_refuses_parts_naming_the_mode(tiny_model, table, mode):
    vllm_chat_embeds.register()
    config = ModelConfig(str(tiny_model), tokenizer_mode=mode, enable_prompt_embeds=True)
    renderer = renderer_from_config(VllmConfig(model_config=config))
    assert type(renderer).__name__.startswith("Refusing")
    with pytest.raises(VLLMValidationError) as info:
        renderer.render_messages(messages(table.part(" x")), ChatParams())
    assert info.value.args[0] == errors.MODE_UNSUPPORTED.format(
        where="messages[0].content[1]", mode=mode
    )


def test_live_server_in_another_mode_answers_400(tiny_model, table, vllm_cache_root):
    env = server_env(trap=True, plugins=True, mp=False, cache_root=vllm_cache_root)
    args = ["--enable-prompt-embeds", "--tokenizer-mode", "kimi_k3"]
    with run_server(tiny_model, *args, env=env) as server:
        body = {"model": server.model, "messages": messages(table.part(" x")), "max_tokens": 4}
        response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400, response.text
        assert "tokenizer mode 'kimi_k3'" in response.json()["error"]["message"]
        assert server.healthy()

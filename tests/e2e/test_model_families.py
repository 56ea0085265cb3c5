"""Parity across model families: the text chat against the part ``embedding_rows`` builds, on
tiny random models of each family vLLM serves with prompt embeds (``tools/build_family_model.py``:
Llama as a sharded checkpoint, Qwen2, Qwen3, Mistral, Phi-3, Granite, Gemma 2, Gemma 3), with the
real ``LLM``; and, on a served Gemma 3, the rows the server computes for a text
(``POST /v1/prompt_embeds`` with ``{"text": ...}``) and what ``/v1/models`` says a part holds.

Gemma multiplies its table's rows by sqrt(hidden_size): the raw table rows are asserted to give
another answer there, so the test is known to be sharp.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from conftest import (
    TEST_SERVER_ARGS,
    build_family,
    make_offline_llm,
    run_server,
    server_env,
    tensor_b64,
)

from vllm_chat_embeds import errors
from vllm_chat_embeds.client import embedding_rows, rows_for_text

pytestmark = pytest.mark.e2e

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "granite", "gemma2", "gemma3"]
SHARDS = {"llama": 3}
SCALED = {"gemma2", "gemma3"}
PART = " return world + 1"
# Part first, in the middle, last, alone (boundaries before a space: BPE never merges across).
LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "first": [("e", "def"), ("t", " hello(world): return world")],
    "middle": [("t", "def hello(world):"), ("e", PART), ("t", " # done")],
    "last": [("t", "def hello(world):"), ("e", PART)],
    "alone": [("e", "import os, sys")],
}
GREEDY = {"temperature": 0.0, "max_tokens": 8}


def messages(layout: str, part_for) -> list[dict[str, Any]]:
    content = [
        {"type": "text", "text": text} if kind == "t" else part_for(text)
        for kind, text in LAYOUTS[layout]
    ]
    return [{"role": "user", "content": content}]


def as_text(layout: str) -> list[dict[str, Any]]:
    return messages(layout, lambda text: {"type": "text", "text": text})


@pytest.fixture(scope="module", params=FAMILIES)
def family_llm(request, tiny_model: Path, vllm_cache_root: str) -> Iterator[tuple[str, Path, Any]]:
    model = build_family(request.param, tiny_model, SHARDS.get(request.param, 1))
    llm = make_offline_llm(model, vllm_cache_root)
    try:
        yield request.param, model, llm
    finally:
        del llm
        gc.collect()


def test_text_and_embedding_rows_agree_in_every_layout(family_llm):
    family, model, llm = family_llm
    from vllm import SamplingParams

    params = SamplingParams(**GREEDY)

    def answers(part_for) -> list[str]:
        conversations = [messages(layout, part_for) for layout in LAYOUTS]
        return [out.outputs[0].text for out in llm.chat(conversations, params)]

    def rows_part(text: str) -> dict[str, Any]:
        return {"type": "prompt_embeds", "data": torch.as_tensor(embedding_rows(model, text))}

    reference = answers(lambda text: {"type": "text", "text": text})
    assert len(set(reference)) > 1, f"{family}: a constant answer proves nothing"
    assert answers(rows_part) == reference, family
    # One layout alone, not batched.
    alone = llm.chat(messages("middle", rows_part), params)[0].outputs[0].text
    assert alone == reference[1]
    if family in SCALED:
        from safetensors import safe_open
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        with safe_open(str(model / "model.safetensors"), "pt") as f:
            table = f.get_tensor(next(k for k in f.keys() if k.endswith("embed_tokens.weight")))

        def raw_part(text: str) -> dict[str, Any]:
            return {"type": "prompt_embeds", "data": table[tok.encode(text)].clone()}

        assert answers(raw_part) != reference, f"{family}: raw table rows should not match"


# -- a served Gemma 3: the server's rows for a text, and discovery ------------------------------


@pytest.fixture(scope="module")
def gemma_server(tiny_model: Path, vllm_cache_root: str):
    model = build_family("gemma3", tiny_model)
    env = server_env(trap=True, plugins=True, mp=True, cache_root=vllm_cache_root)
    with run_server(model, *TEST_SERVER_ARGS, env=env) as server:
        yield server, model


def chat(server, body_messages) -> str:
    body = {"model": server.model, "messages": body_messages, **GREEDY}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_server_rows_for_text_equal_the_helper_and_answer_as_text(gemma_server):
    server, model = gemma_server
    base = server.base_url + "/v1"
    part, rows = rows_for_text(base, PART)
    assert torch.equal(rows, torch.as_tensor(embedding_rows(model, PART)))
    for layout in LAYOUTS:
        by_server = messages(layout, lambda text: rows_for_text(base, text)[0])
        inline = messages(layout, lambda text: {
            "type": "prompt_embeds", "data": tensor_b64(rows_for_text(base, text)[1])})  # fmt: skip
        reference = chat(server, as_text(layout))
        assert chat(server, by_server) == reference, layout
        assert chat(server, inline) == reference, layout
    assert part["type"] == "prompt_embeds" and part["uuid"].startswith("file-pe-")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, errors.TEXT_ROWS_TEXT.format(where="text", got="NoneType")),
        ({"text": ""}, errors.TEXT_ROWS_TEXT.format(where="text", got="str")),
        ({"text": 12}, errors.TEXT_ROWS_TEXT.format(where="text", got="int")),
        ({"text": "x", "add_special_tokens": "yes"},
         errors.TEXT_ROWS_SPECIAL.format(where="text", got="str")),
        ({"text": "a <prompt_embeds> b"}, errors.TEXT_ROWS_TOKENS.split("{vocab}")[0].format(
            where="text")),
        ({"text": "word " * 2000}, "rows"),
    ],
    ids=["missing", "empty", "not_a_string", "special_not_bool", "placeholder", "too_long"],
)  # fmt: skip
def test_rows_for_text_refuses_bad_bodies(gemma_server, body, message):
    server, _ = gemma_server
    response = requests.post(server.base_url + "/v1/prompt_embeds", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert server.healthy()


def test_models_route_says_what_a_part_holds(gemma_server, plugin_server):
    server, model = gemma_server
    config = json.loads((model / "config.json").read_text())
    card = requests.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]
    described = card["prompt_embeds"]
    assert described["hidden_size"] == config["hidden_size"]
    assert described["embedding_scale"] == pytest.approx(config["hidden_size"] ** 0.5)
    assert described["dtype"] == "float32" and described["rows"] == "after_embedding_scale"
    assert set(described["accepted_dtypes"]) == {"float32", "float16", "bfloat16"}
    assert described["routes"]["upload"] == "/v1/prompt_embeds"
    assert described["max_rows"] <= 1024 and described["max_part_bytes"] > 0
    plain = requests.get(plugin_server.base_url + "/v1/models", timeout=30).json()["data"][0]
    assert plain["prompt_embeds"]["embedding_scale"] == 1.0  # Llama: the table's rows

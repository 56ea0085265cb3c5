"""PEFT prompt-tuning soft prompts served by ``vllm serve``, checked against PEFT itself.

One server for the file: two soft prompts from ``CHAT_EMBEDS_SOFT_PROMPTS`` (a PEFT folder and a
single-tensor ``.safetensors`` file), runtime updates on inside a root folder, prefix caching
with prompt-token details. Greedy output by soft prompt name must equal ``PeftModel.generate``
on the same rendered token ids, token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import (
    ALL_ROWS_SHARED,
    MODELS,
    TEST_SERVER_ARGS,
    Server,
    run_server,
    server_env,
    tensor_b64,
)
from soft_prompt_peft import build_prompt_tuning, peft_greedy, prompt_rows, without_eos

from vllm_chat_embeds import errors

pytestmark = pytest.mark.e2e

STORE = MODELS / "soft-prompts"
MAX_TOKENS = 10
CHATS: dict[str, list[dict[str, Any]]] = {
    "user_only": [{"role": "user", "content": "def hello(world):"}],
    "system_and_user": [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "import os, sys"},
    ],
    "multi_turn": [
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A list holds items."},
        {"role": "user", "content": "And a dict?"},
    ],
}


@pytest.fixture(scope="module")
def checkpoints(tiny_model: Path) -> dict[str, Path]:
    """PEFT checkpoints: ``a`` (folder), ``b`` (also served as a one-tensor file), ``c``
    (inside the runtime root), ``outside`` (outside it)."""
    from safetensors.torch import save_file

    made = {
        "a": build_prompt_tuning(tiny_model, STORE / "a", virtual_tokens=6, seed=1),
        "b": build_prompt_tuning(tiny_model, STORE / "b", virtual_tokens=4, seed=2),
        "c": build_prompt_tuning(tiny_model, STORE / "root" / "c", virtual_tokens=5, seed=3),
        "outside": build_prompt_tuning(tiny_model, STORE / "outside", virtual_tokens=3, seed=4),
    }
    made["b_file"] = STORE / "b.safetensors"
    save_file({"soft_prompt": prompt_rows(made["b"]).contiguous()}, str(made["b_file"]))
    return made


@pytest.fixture(scope="module")
def server(tiny_model, vllm_cache_root, checkpoints) -> Iterator[Server]:
    extra = {
        "CHAT_EMBEDS_SOFT_PROMPTS": f"sp-a={checkpoints['a']},sp-file={checkpoints['b_file']}",
        "CHAT_EMBEDS_ALLOW_RUNTIME_SOFT_PROMPTS": "1",
        "CHAT_EMBEDS_SOFT_PROMPTS_ROOT": str(STORE / "root"),
        **ALL_ROWS_SHARED,  # soft prompts' rows joined with parts cross as one segment
    }
    env = server_env(trap=True, plugins=True, mp=True, cache_root=vllm_cache_root, extra=extra)
    with run_server(tiny_model, *TEST_SERVER_ARGS, "--enable-prefix-caching", env=env) as srv:
        yield srv


def post(server: Server, path: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(server.base_url + path, json=body, timeout=120)


def chat(server: Server, model: str, messages: list[dict[str, Any]], **extra: Any) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    response = post(server, "/v1/chat/completions", {**body, "return_token_ids": True, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def chat_ids(server: Server, messages: list[dict[str, Any]]) -> list[int]:
    """The token ids vLLM renders the chat to, for the base model (no soft prompt)."""
    body = {"model": server.model, "messages": messages, "add_generation_prompt": True}
    response = post(server, "/tokenize", body)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def error_of(response: requests.Response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


# -- by model name -----------------------------------------------------------------------------


def test_models_lists_each_soft_prompt_with_the_base_model_as_parent(server, checkpoints):
    cards = {c["id"]: c for c in requests.get(server.base_url + "/v1/models").json()["data"]}
    assert cards["sp-a"]["parent"] == server.model
    assert cards["sp-a"]["root"] == str(checkpoints["a"])
    assert cards["sp-file"]["parent"] == server.model
    assert cards[server.model]["parent"] is None


@pytest.mark.parametrize("case", sorted(CHATS))
def test_chat_by_name_equals_peft_generate(server, tiny_model, checkpoints, case):
    messages = CHATS[case]
    ids = chat_ids(server, messages)
    expected = peft_greedy(tiny_model, checkpoints["a"], ids, MAX_TOKENS)
    got = chat(server, "sp-a", messages)
    assert without_eos(got["choices"][0]["token_ids"]) == expected
    assert got["model"] == "sp-a"
    # Usage counts the 6 virtual tokens as prompt tokens.
    assert got["usage"]["prompt_tokens"] == len(ids) + 6
    # The soft prompt changes the answer: the base model says something else.
    base = chat(server, server.model, messages)["choices"][0]["token_ids"]
    assert without_eos(base) != expected


def test_completions_by_name_equal_peft_generate_for_text_and_token_prompts(
    server, tiny_model, checkpoints
):
    text = "class Foo:\n    def bar(self):"
    tokenized = post(server, "/tokenize", {"model": server.model, "prompt": text}).json()
    ids = tokenized["tokens"]
    expected = peft_greedy(tiny_model, checkpoints["a"], ids, MAX_TOKENS)
    body = {"model": "sp-a", "max_tokens": MAX_TOKENS, "temperature": 0.0, "return_token_ids": True}
    for prompt in (text, ids):
        response = post(server, "/v1/completions", {**body, "prompt": prompt})
        assert response.status_code == 200, response.text
        out = response.json()
        assert without_eos(out["choices"][0]["token_ids"]) == expected, prompt
        assert out["usage"]["prompt_tokens"] == len(ids) + 6
        assert out["model"] == "sp-a"


def test_completions_embeds_prompt_by_name_gets_the_rows_first(
    server, tiny_model, checkpoints, table
):
    """A ``prompt_embeds`` completion sent to a soft prompt: its rows, then the client's."""
    ids = post(server, "/tokenize", {"model": server.model, "prompt": "import os"}).json()["tokens"]
    expected = peft_greedy(tiny_model, checkpoints["a"], ids, MAX_TOKENS)
    body = {"model": "sp-a", "max_tokens": MAX_TOKENS, "temperature": 0.0, "return_token_ids": True}
    response = post(
        server, "/v1/completions", {**body, "prompt_embeds": tensor_b64(table.weight[ids])}
    )
    assert response.status_code == 200, response.text
    out = response.json()
    assert without_eos(out["choices"][0]["token_ids"]) == expected
    assert out["usage"]["prompt_tokens"] == len(ids) + 6


def test_single_tensor_file_equals_peft_generate_of_its_checkpoint(server, tiny_model, checkpoints):
    messages = CHATS["system_and_user"]
    expected = peft_greedy(tiny_model, checkpoints["b"], chat_ids(server, messages), MAX_TOKENS)
    got = chat(server, "sp-file", messages)["choices"][0]["token_ids"]
    assert without_eos(got) == expected


def test_chat_by_name_with_its_own_parts_equals_the_same_chat_as_text(server, table):
    as_text = [{"role": "user", "content": "def hello(world): return world + 1"}]
    with_part = [
        {"role": "user", "content": [{"type": "text", "text": "def hello(world):"},
                                     table.part(" return world + 1")]},
    ]  # fmt: skip
    reference = chat(server, "sp-a", as_text)
    got = chat(server, "sp-a", with_part)
    assert got["choices"][0]["token_ids"] == reference["choices"][0]["token_ids"]
    assert got["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"]


def test_truncated_chat_by_name_keeps_its_soft_prompt_first(server, tiny_model, checkpoints, table):
    """PEFT prepends its virtual tokens to the input ids as given: truncation cuts the chat's
    ids, and the soft prompt's rows come before what is kept, whole."""
    messages = CHATS["system_and_user"]
    ids = chat_ids(server, messages)
    k = len(ids) - 4
    expected = peft_greedy(tiny_model, checkpoints["a"], ids[-k:], MAX_TOKENS)
    got = chat(server, "sp-a", messages, truncate_prompt_tokens=k)
    assert without_eos(got["choices"][0]["token_ids"]) == expected
    assert got["usage"]["prompt_tokens"] == k + 6
    # A part the cut runs through keeps its kept rows behind the soft prompt.
    with_part = [
        messages[0],
        {"role": "user", "content": [{"type": "text", "text": "import"},
                                     table.part(" os, sys")]},
    ]  # fmt: skip
    text = [{"type": "text", "text": "import"}, {"type": "text", "text": " os, sys"}]
    as_text = [messages[0], {"role": "user", "content": text}]
    run = table.tokenizer.encode(" os, sys", add_special_tokens=False)
    start = next(i for i in range(len(ids)) if ids[i : i + len(run)] == run)
    for kept in (len(ids) - start - 1, len(ids) - start - 2, len(ids) - start + 1):
        reference = chat(server, "sp-a", as_text, truncate_prompt_tokens=kept)
        out = chat(server, "sp-a", with_part, truncate_prompt_tokens=kept)
        assert out["choices"][0]["token_ids"] == reference["choices"][0]["token_ids"]
        assert out["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"]


def test_responses_by_name_equals_peft_generate(server, tiny_model, checkpoints, table):
    text = "import os, sys"
    # /v1/responses tokenizes the rendered chat with special tokens (a BOS the chat lacks).
    body = {"model": server.model, "messages": [{"role": "user", "content": text}],
            "add_generation_prompt": True, "add_special_tokens": True}  # fmt: skip
    ids = post(server, "/tokenize", body).json()["tokens"]
    expected = peft_greedy(tiny_model, checkpoints["a"], ids, MAX_TOKENS)
    request = {"model": "sp-a", "input": text, "temperature": 0.0, "max_output_tokens": MAX_TOKENS}
    response = post(server, "/v1/responses", request)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["model"] == "sp-a"
    assert out["output"][-1]["content"][0]["text"] == table.tokenizer.decode(expected)
    assert out["usage"]["input_tokens"] == len(ids) + 6


def test_prefix_cache_is_shared_by_requests_of_one_soft_prompt(server):
    system = {"role": "system", "content": "You are a careful Python assistant. " * 40}
    first = chat(server, "sp-a", [system, {"role": "user", "content": "first question"}])
    second = chat(server, "sp-a", [system, {"role": "user", "content": "another one, longer"}])
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    # Another soft prompt's rows hash differently: no blocks of sp-a are reused for it.
    other = chat(server, "sp-file", [system, {"role": "user", "content": "first question"}])
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_unknown_model_name_is_404(server):
    response = post(
        server, "/v1/chat/completions", {"model": "sp-nope", "messages": CHATS["user_only"]}
    )
    assert "sp-nope" in error_of(response, 404)


# -- as a part ---------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["alone", "first", "middle", "last"])
def test_named_part_equals_the_same_rows_sent_as_data(server, checkpoints, position):
    named = {"type": "prompt_embeds", "name": "sp-a"}
    data = {"type": "prompt_embeds", "data": tensor_b64(prompt_rows(checkpoints["a"]))}
    text_a = {"type": "text", "text": "def hello(world):"}
    text_b = {"type": "text", "text": " return world"}

    def content(part: dict) -> list[dict]:
        return {
            "alone": [part],
            "first": [part, text_a],
            "middle": [text_a, part, text_b],
            "last": [text_a, part],
        }[position]

    by_name = chat(server, server.model, [{"role": "user", "content": content(named)}])
    by_data = chat(server, server.model, [{"role": "user", "content": content(data)}])
    assert by_name["choices"][0]["token_ids"] == by_data["choices"][0]["token_ids"]
    assert by_name["usage"]["prompt_tokens"] == by_data["usage"]["prompt_tokens"]


def test_named_part_beside_a_soft_prompt_model_name(server, checkpoints):
    """Model ``sp-a`` with a part naming ``sp-file``: both sets of rows, each in its place."""
    data = {"type": "prompt_embeds", "data": tensor_b64(prompt_rows(checkpoints["b"]))}
    named = {"type": "prompt_embeds", "name": "sp-file"}
    text = {"type": "text", "text": "import os"}
    by_name = chat(server, "sp-a", [{"role": "user", "content": [text, named]}])
    by_data = chat(server, "sp-a", [{"role": "user", "content": [text, data]}])
    assert by_name["choices"][0]["token_ids"] == by_data["choices"][0]["token_ids"]


def test_named_part_errors(server):
    def send(part: dict) -> requests.Response:
        content = [{"type": "text", "text": "hi"}, part]
        body = {"model": server.model, "messages": [{"role": "user", "content": content}]}
        return post(server, "/v1/chat/completions", body)

    where = "messages[0].content[1]"
    unknown = send({"type": "prompt_embeds", "name": "sp-nope"})
    assert error_of(unknown).startswith(
        errors.NAMED_PART_UNKNOWN.format(where=where, name="sp-nope", served=["sp-a", "sp-file"])
    )
    both = send({"type": "prompt_embeds", "name": "sp-a", "data": "AAAA"})
    assert error_of(both).startswith(errors.NAMED_PART_KEYS.format(where=where, keys=["data"]))
    bad = send({"type": "prompt_embeds", "name": 7})
    assert error_of(bad).startswith(errors.NAMED_PART_BAD_NAME.format(where=where, got="int"))
    assert server.healthy()


# -- runtime updates ---------------------------------------------------------------------------


def test_runtime_load_serves_like_peft_then_unload_removes_it(server, tiny_model, checkpoints):
    loaded = post(server, "/v1/load_soft_prompt", {"name": "sp-c", "path": str(checkpoints["c"])})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["num_virtual_tokens"] == 5
    ids_listed = [c["id"] for c in requests.get(server.base_url + "/v1/models").json()["data"]]
    assert "sp-c" in ids_listed
    messages = CHATS["user_only"]
    expected = peft_greedy(tiny_model, checkpoints["c"], chat_ids(server, messages), MAX_TOKENS)
    assert without_eos(chat(server, "sp-c", messages)["choices"][0]["token_ids"]) == expected

    assert post(server, "/v1/unload_soft_prompt", {"name": "sp-c"}).status_code == 200
    ids_listed = [c["id"] for c in requests.get(server.base_url + "/v1/models").json()["data"]]
    assert "sp-c" not in ids_listed
    gone = post(server, "/v1/chat/completions", {"model": "sp-c", "messages": messages})
    assert gone.status_code == 404
    again = post(server, "/v1/unload_soft_prompt", {"name": "sp-c"})
    assert error_of(again, 404) == errors.RUNTIME_NOT_LOADED.format(name="sp-c")


def test_runtime_load_refuses_paths_outside_the_root_and_bad_checkpoints(server, checkpoints):
    outside = str(checkpoints["outside"])
    refused = post(server, "/v1/load_soft_prompt", {"name": "sp-x", "path": outside})
    assert refused.status_code == 403
    # A ``..`` path that leaves the root is outside too.
    sneaky = str(STORE / "root" / ".." / "outside")
    assert post(server, "/v1/load_soft_prompt", {"name": "sp-x", "path": sneaky}).status_code == 403
    missing = post(server, "/v1/load_soft_prompt", {"name": "sp-x"})
    assert error_of(missing) == errors.RUNTIME_BAD_FIELD.format(field="path")
    not_peft = post(server, "/v1/load_soft_prompt", {"name": "sp-x", "path": str(STORE / "root")})
    assert errors.SOFT_PROMPT_NOT_PEFT in error_of(not_peft)
    names = [c["id"] for c in requests.get(server.base_url + "/v1/models").json()["data"]]
    assert "sp-x" not in names


def test_runtime_updates_are_refused_unless_enabled(plugin_server):
    body = {"name": "sp-x", "path": "/tmp"}
    response = post(plugin_server, "/v1/load_soft_prompt", body)
    assert error_of(response, 403) == errors.RUNTIME_DISABLED
    response = post(plugin_server, "/v1/unload_soft_prompt", {"name": "sp-x"})
    assert error_of(response, 403) == errors.RUNTIME_DISABLED


def test_concurrent_requests_keep_their_own_soft_prompt(server):
    """Requests to different soft prompts and the base model, in flight together, each get
    exactly the answer they get alone (the soft prompt rides in each request's own context)."""
    from concurrent.futures import ThreadPoolExecutor

    models = ["sp-a", server.model, "sp-file", "sp-a", server.model, "sp-file", "sp-a", "sp-a"]
    messages = CHATS["system_and_user"]
    alone = {m: chat(server, m, messages)["choices"][0]["token_ids"] for m in set(models)}
    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        together = list(pool.map(lambda m: chat(server, m, messages), models))
    for model, out in zip(models, together, strict=True):
        assert out["choices"][0]["token_ids"] == alone[model], model
        assert out["model"] == model

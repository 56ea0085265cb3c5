"""Parts across vLLM's KV connectors, on real servers: never KV computed from other rows.

``ExampleConnector`` saves every prompt's KV to a folder keyed by the prompt's token ids (and
multimodal hashes) and loads it for any later prompt with the same key. At the rows, every
request of vLLM's built-in holds the same ids: the chat with rows Y, sent after the same chat
with rows X, is served X's KV. With the plugin, the ids at the rows come from the rows'
content (``kv_transfer/row_keys.py``): Y gets Y's answer, and X sent again really loads X's KV
from the connector. The built-in runs the same sequence side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from chat_cases import as_text, render
from conftest import TEST_SERVER_ARGS, free_port, run_server, server_env
from kv_cases import (
    BLOCK_SIZE,
    LAYOUTS,
    X_TEXT,
    Y_TEXT,
    EventSubscriber,
    answer,
    as_parts,
    as_plain_text,
    cached_tokens,
    chat_body,
    post_chat,
    stored_blocks,
)

from vllm_chat_embeds.kv_transfer.row_keys import content_ids
from vllm_chat_embeds.row_digest import rows_digest

pytestmark = pytest.mark.e2e


def connector_server(
    tiny_model: Path, cache_root: str, storage: Path, *, plugins: bool, events: str | None = None
):
    config = {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": str(storage)},
    }
    env = server_env(
        trap=plugins,
        plugins=plugins,
        mp=True,
        cache_root=cache_root,
        extra={"VLLM_SERVER_DEV_MODE": "1"},  # POST /reset_prefix_cache
    )
    args = [*TEST_SERVER_ARGS, *BLOCK_SIZE, "--kv-transfer-config", json.dumps(config)]
    if events:
        args += ["--kv-events-config", events]
    return run_server(tiny_model, *args, env=env)


@pytest.fixture(scope="module")
def subscriber():
    listener = EventSubscriber(free_port())
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def plugin_kv_server(tiny_model, vllm_cache_root, tmp_path_factory, subscriber):
    """The plugin behind ExampleConnector, publishing KV-cache events to ``subscriber``."""
    storage = tmp_path_factory.mktemp("kv")
    with connector_server(
        tiny_model, vllm_cache_root, storage, plugins=True, events=subscriber.config()
    ) as server:
        yield server


def reset_local_cache(base_url: str) -> None:
    response = requests.post(base_url + "/reset_prefix_cache", timeout=30)
    assert response.status_code == 200 and response.json()["success"], response.text


def x_then_y(server, table) -> dict[str, dict[str, str]]:
    """Per layout: the text answers of X and Y, and the answers to X's parts, then Y's."""
    results: dict[str, dict[str, str]] = {}

    def ask(messages: list) -> str:
        return answer(post_chat(server.base_url, chat_body(server, messages)))

    for layout in LAYOUTS:
        results[layout] = {
            "x_text": ask(as_plain_text(layout, X_TEXT)),
            "y_text": ask(as_plain_text(layout, Y_TEXT)),
            "x_parts": ask(as_parts(layout, X_TEXT, table)),
            "y_parts": ask(as_parts(layout, Y_TEXT, table)),
        }
    return results


def test_rows_are_part_of_the_shared_storage_key(plugin_kv_server, table):
    """X then Y with the plugin: every layout answers as its own text; then X again, with
    the local prefix cache emptied, loads X's saved KV (a real hit) and still answers right."""
    server = plugin_kv_server
    results = x_then_y(server, table)
    for layout, out in results.items():
        assert out["x_text"] != out["y_text"], f"{layout}: X and Y must answer differently"
        assert out["x_parts"] == out["x_text"], layout
        assert out["y_parts"] == out["y_text"], layout
    for layout in LAYOUTS:
        reset_local_cache(server.base_url)
        again = post_chat(server.base_url, chat_body(server, as_parts(layout, X_TEXT, table)))
        assert answer(again) == results[layout]["x_text"], layout
        # Nothing is left in the local prefix cache: these came from the connector's folder.
        assert cached_tokens(again) >= 64, f"{layout}: no KV loaded: {again['usage']}"


def test_builtin_serves_one_chats_rows_with_anothers_kv(
    tiny_model, vllm_cache_root, table, tmp_path
):
    """The same sequence on vLLM's built-in: Y's parts are answered from X's saved KV (the
    defect the plugin fixes; kept here so the test above is known to be sharp)."""
    with connector_server(tiny_model, vllm_cache_root, tmp_path / "kv", plugins=False) as server:
        results = x_then_y(server, table)
    wrong = [layout for layout, out in results.items() if out["y_parts"] != out["y_text"]]
    assert wrong, f"the built-in answered every layout right: {results}"


def test_kv_events_carry_the_rows_keys(plugin_kv_server, subscriber, table):
    """A KV-aware router reading ``BlockStored`` events sees, at the rows, ids drawn from the
    rows' digest (the same on any server: a pure function of the rows) and the rows' digest
    among the block's extra keys; equal rows give equal blocks, other rows other blocks."""
    server = plugin_kv_server
    vocab = len(table.tokenizer)
    layout = [("t", "class Walker:"), ("e", "{rows}"), ("t", " # done")]

    def blocks_of(messages: list) -> list:
        subscriber.stored(quiet_s=0.5)  # drop what came before
        post_chat(server.base_url, chat_body(server, messages))
        return stored_blocks(subscriber.stored())

    def messages(text: str, parts: bool) -> list:
        segments = [(kind, value.format(rows=text)) for kind, value in layout]
        case = [{"role": "user", "content": segments}]
        return render(case, table.part) if parts else as_text(case)

    reset_local_cache(server.base_url)
    text_x = blocks_of(messages(X_TEXT, parts=False))
    x = blocks_of(messages(X_TEXT, parts=True))
    y = blocks_of(messages(Y_TEXT, parts=True))
    assert len(x) == len(text_x) == len(y) >= 3
    text_ids = [i for _, ids, _ in text_x for i in ids]
    x_ids = [i for _, ids, _ in x for i in ids]
    start = next(p for p, (a, b) in enumerate(zip(text_ids, x_ids, strict=True)) if a != b)
    expected = content_ids(bytes.fromhex(rows_digest(table.rows(X_TEXT))), 70, vocab).tolist()
    assert x_ids[start : start + 70] == expected
    assert x_ids[:start] == text_ids[:start] and x_ids[start + 70 :] == text_ids[start + 70 :]
    for (x_hash, _, x_extra), (y_hash, _, y_extra) in zip(x[1:], y[1:], strict=True):
        x_digests = [k for k in x_extra or [] if isinstance(k, bytes)]
        y_digests = [k for k in y_extra or [] if isinstance(k, bytes)]
        assert x_digests and y_digests and x_digests != y_digests and x_hash != y_hash
    reset_local_cache(server.base_url)
    again = blocks_of(messages(X_TEXT, parts=True))
    assert [(h, ids) for h, ids, _ in again] == [(h, ids) for h, ids, _ in x]


def test_a_part_too_short_to_key_is_refused(plugin_kv_server, table):
    """Under a connector keyed by token ids, a part with too few rows for a 64-bit content
    key (6 rows of this 2,000-id vocabulary) gets a 400 naming it; the server keeps serving."""
    server = plugin_kv_server
    short = [{"role": "user", "content": [{"type": "text", "text": "x ="}, table.part(" 1")]}]
    body = chat_body(server, short)
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "messages[0].content[1]" in message and "ExampleConnector" in message
    assert "at least 6 rows" in message
    ok = chat_body(server, as_parts("last", X_TEXT, table))
    assert answer(post_chat(server.base_url, ok))

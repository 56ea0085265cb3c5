"""Prefill/decode disaggregation over NIXL with parts: two real servers and the example proxy.

The prefill server (``kv_producer``) computes a chat's KV and keeps it; the decode server
(``kv_consumer``) pulls it over NIXL (UCX on this machine, ``kv_buffer_device: cpu``) and
generates. ``examples/disaggregated_proxy.py`` does the two steps. Every answer must equal the
same chat sent as text through the same pair, and the decode server's
``vllm:external_prefix_cache_hits`` must grow by the prompt's tokens (the KV really
travelled; ``cached_tokens`` in the usage reads 0 there).

Each server gets a core of its own (``VLLM_CPU_OMP_THREADS_BIND``): the two engines poll for
transfers between steps, and on two shared cores they starved each other into decodes of
30-100 s.
"""

from __future__ import annotations

import json
import runpy
import threading
import uuid as uuidlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from chat_cases import CASES, as_text, render
from conftest import REPO, TEST_SERVER_ARGS, free_port, run_server, server_env
from kv_cases import BLOCK_SIZE, EXTERNAL_HITS, LAYOUTS, X_TEXT, as_parts, as_plain_text, metric

from vllm_chat_embeds.client import upload_rows

pytestmark = pytest.mark.e2e
pytest.importorskip("nixl._api", reason="NIXL is installed by make install ([dev] extra)")

GREEDY = {"temperature": 0.0, "max_tokens": 8}
LOCAL_HITS = "vllm:prefix_cache_hits_total"


def nixl_server(model: Path, cache_root: str, role: str, core: str, store_url: str):
    config = {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"}
    env = server_env(
        trap=True,
        plugins=True,
        mp=True,
        cache_root=cache_root,
        extra={
            "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
            "VLLM_CPU_OMP_THREADS_BIND": core,
            "CHAT_EMBEDS_SHARED_STORE": store_url,  # for the --shared-store proxy
        },
    )
    args = [*TEST_SERVER_ARGS, *BLOCK_SIZE, "--kv-transfer-config", json.dumps(config)]
    return run_server(model, *args, env=env)


class Pair:
    def __init__(self, prefill, decode, proxy_url: str) -> None:
        self.prefill, self.decode, self.url = prefill, decode, proxy_url
        self.model = prefill.model
        self.by_reference: Pair | None = None

    def chat(self, messages: list, **extra) -> dict:
        body = {"model": self.model, "messages": messages, **GREEDY, **extra}
        response = requests.post(self.url + "/v1/chat/completions", json=body, timeout=240)
        assert response.status_code == 200, response.text
        return response.json()

    def hits(self) -> float:
        """Prompt tokens the decode server did not compute: pulled from the prefill server, or
        found in its own prefix cache (chats sharing a prefix)."""
        return metric(self.decode.base_url, EXTERNAL_HITS) + metric(
            self.decode.base_url, LOCAL_HITS
        )


@pytest.fixture(scope="module")
def pair(tiny_model, vllm_cache_root, redis_store) -> Iterator[Pair]:
    """The two servers (sharing a row store) behind the example proxy; ``pair.by_reference``:
    the same servers behind the proxy started with ``--shared-store``."""
    proxy_module = runpy.run_path(str(REPO / "examples" / "disaggregated_proxy.py"))
    with ExitStack() as stack:
        servers = [
            stack.enter_context(
                nixl_server(tiny_model, vllm_cache_root, role, core, redis_store.url)
            )
            for role, core in (("kv_producer", "0"), ("kv_consumer", "1"))
        ]
        urls = []
        for shared in (False, True):
            proxy = proxy_module["Proxy"](*(s.base_url for s in servers), shared_store=shared)
            handler = proxy_module["handler_for"](proxy)
            httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            stack.callback(httpd.server_close)
            stack.callback(httpd.shutdown)
            urls.append(f"http://127.0.0.1:{httpd.server_address[1]}")
        ready = Pair(*servers, urls[0])
        ready.by_reference = Pair(*servers, urls[1])
        warm_up(ready)
        yield ready


def warm_up(pair: Pair, attempts: int = 5) -> None:
    """The first request makes the NIXL handshake, which vLLM gives 5 s: on a loaded machine
    (the 0.33 suite runs beside this one) it can miss, and that request fails. Retry a text
    chat until KV travels."""
    body = {"model": pair.model, "messages": as_plain_text("alone", X_TEXT), **GREEDY}
    for _ in range(attempts):
        before = metric(pair.decode.base_url, EXTERNAL_HITS)
        requests.post(pair.url + "/v1/chat/completions", json=body, timeout=240)
        if metric(pair.decode.base_url, EXTERNAL_HITS) > before:
            return
    raise AssertionError(f"no KV travelled in {attempts} warm-up chats")


def answer(out: dict) -> str:
    return out["choices"][0]["message"]["content"]


def test_every_layout_answers_as_text_with_the_kv_transferred(pair, table):
    for layout in LAYOUTS:
        text = pair.chat(as_plain_text(layout, X_TEXT))
        before = pair.hits()
        parts = pair.chat(as_parts(layout, X_TEXT, table))
        assert answer(parts) == answer(text), layout
        assert parts["usage"]["prompt_tokens"] == text["usage"]["prompt_tokens"]
        external = metric(pair.decode.base_url, EXTERNAL_HITS)
        not_computed = pair.hits() - before
        assert not_computed >= parts["usage"]["prompt_tokens"] - 32, f"{layout}: {not_computed}"
        assert external > 0, f"{layout}: no KV pulled from the prefill server"


@pytest.mark.parametrize("name", ["several_parts", "every_role", "multi_turn"])
def test_several_parts_in_any_role(pair, table, name):
    assert answer(pair.chat(render(CASES[name], table.part))) == answer(
        pair.chat(as_text(CASES[name]))
    )


def test_streaming_and_concurrent_requests(pair, table):
    reference = {layout: answer(pair.chat(as_plain_text(layout, X_TEXT))) for layout in LAYOUTS}
    body = {"model": pair.model, "messages": as_parts("middle", X_TEXT, table), **GREEDY}
    with requests.post(
        pair.url + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=240
    ) as response:
        assert response.status_code == 200
        pieces = []
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
    assert "".join(pieces) == reference["middle"]
    with ThreadPoolExecutor(4) as pool:
        answers = dict(
            zip(
                LAYOUTS,
                pool.map(lambda lay: answer(pair.chat(as_parts(lay, X_TEXT, table))), LAYOUTS),
                strict=True,
            )
        )
    assert answers == reference


def test_parts_by_uuid_resolve_on_both_servers(pair, table):
    """A part sent once with data and a uuid is kept by both servers (both render the chat);
    afterwards the uuid alone serves through the pair."""
    reference = answer(pair.chat(as_plain_text("last", X_TEXT)))
    uuid = "pd-part-7f3a9c"

    def with_uuid(data: bool) -> list:
        messages = as_parts("last", X_TEXT, table)
        part = messages[0]["content"][-1]
        part["uuid"] = uuid
        if not data:
            del part["data"]
        return messages

    assert answer(pair.chat(with_uuid(data=True))) == reference
    assert answer(pair.chat(with_uuid(data=False))) == reference


def test_shared_store_proxy_sends_the_decode_server_references_only(pair, table):
    """With a shared row store, the proxy strips the rows from the decode request: the decode
    server reads the part the prefill server wrote (a fresh uuid: nothing held before), and an
    upload taken by the prefill server alone resolves on both."""
    proxy_module = runpy.run_path(str(REPO / "examples" / "disaggregated_proxy.py"))
    shared = pair.by_reference
    assert shared is not None
    reference = answer(pair.chat(as_plain_text("middle", X_TEXT)))
    messages = as_parts("middle", X_TEXT, table)
    part = messages[0]["content"][1]
    part["uuid"] = uuidlib.uuid4().hex
    stripped = proxy_module["decode_body"]({"messages": messages}, {}, shared_store=True)[
        "messages"
    ][0]["content"][1]
    assert stripped == {"type": "prompt_embeds", "uuid": part["uuid"]}
    assert answer(shared.chat(messages)) == reference
    uploaded = upload_rows(pair.prefill.base_url + "/v1", table.rows(X_TEXT))
    messages[0]["content"][1] = uploaded
    assert answer(shared.chat(messages)) == reference


# Malformed kv_transfer_params on the decode request: a 400 naming the field. (vLLM alone: the
# engine dies on block ids that are not integers; missing fields leave the request waiting.)
MALFORMED = {
    "missing_fields": ({"do_remote_prefill": True}, "remote_engine_id"),
    "block_ids_not_ints": ({"remote_block_ids": [["a", "b"]]}, "remote_block_ids"),
    "block_ids_flat": ({"remote_block_ids": [1, 2]}, "remote_block_ids"),
    "more_blocks": ({"remote_block_ids": [list(range(40))]}, "remote_block_ids"),
    "fewer_blocks": ({"remote_block_ids": [[0]]}, "remote_block_ids"),
    "port_not_a_number": ({"remote_port": "http"}, "remote_port"),
    "negative_block": ({"remote_block_ids": [[-1]]}, "remote_block_ids"),
}


# Well formed but naming KV the prefill server does not hold for this request: whatever vLLM
# answers, quickly, and the pair keeps serving.
def far_blocks(params: dict) -> dict:
    return {
        **params,
        "remote_block_ids": [[9**6 + i for i in g] for g in params["remote_block_ids"]],
    }


WELL_FORMED = {
    "far_blocks": far_blocks,
    "unknown_request": lambda p: {**p, "remote_request_id": "no-such-request"},
}  # fmt: skip


def prefill_params(pair, body: dict) -> dict:
    prefill = {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    response = requests.post(
        pair.prefill.base_url + "/v1/chat/completions", json=prefill, timeout=120
    )
    return response.json()["kv_transfer_params"]


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_kv_transfer_params_get_a_400(pair, table, name):
    body = {"model": pair.model, "messages": as_parts("middle", X_TEXT, table), **GREEDY}
    change, field = MALFORMED[name]
    params = {**prefill_params(pair, body), **change}
    if name == "missing_fields":
        params = change
    response = requests.post(
        pair.decode.base_url + "/v1/chat/completions",
        json={**body, "kv_transfer_params": params},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert f"kv_transfer_params.{field}" in response.json()["error"]["message"]
    assert answer(pair.chat(as_parts("last", X_TEXT, table)))  # the pair keeps serving


@pytest.mark.parametrize("name", sorted(WELL_FORMED))
def test_kv_transfer_params_naming_other_kv_never_hang(pair, table, name):
    body = {"model": pair.model, "messages": as_parts("middle", X_TEXT, table), **GREEDY}
    params = WELL_FORMED[name](prefill_params(pair, body))
    response = requests.post(
        pair.decode.base_url + "/v1/chat/completions",
        json={**body, "kv_transfer_params": params},
        timeout=90,
    )
    print(name, response.status_code, response.text[:300])
    assert response.status_code in (200, 400, 500), response.text
    assert answer(pair.chat(as_parts("last", X_TEXT, table)))  # the pair keeps serving

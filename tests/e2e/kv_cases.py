"""Chats for the KV-transfer tests: two row sets X and Y of the same length, in every layout.

A connector that keys KV by what it thinks the prompt is must tell X from Y: the chat with Y's
rows, sent after the same chat with X's rows, must answer as Y's text chat. X and Y are the
model's own rows of two texts with the same number of tokens, repeated to parts of 70 rows, so
every prompt spans several KV blocks (the servers run ``--block-size 32``, the CPU backend's
smallest: connectors key and move whole blocks only).
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import requests
from chat_cases import as_text, render

X_TEXT = " for item in range(10):" * 10
Y_TEXT = " while count < limit:" * 10
BLOCK_SIZE = ["--block-size", "32"]

LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "alone": [("e", "{rows}")],
    "first": [("e", "{rows}"), ("t", " # loop over the values")],
    "middle": [("t", "def walk(values):"), ("e", "{rows}"), ("t", " pass")],
    "last": [("t", "def walk(values):"), ("e", "{rows}")],
}
GREEDY = {"temperature": 0.0, "max_tokens": 12}


def case(layout: str, text: str) -> list[dict[str, Any]]:
    segments = [(kind, value.format(rows=text)) for kind, value in LAYOUTS[layout]]
    return [{"role": "user", "content": segments}]


def chat_body(server: Any, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": server.model, "messages": messages, **GREEDY, **extra}


def post_chat(base_url: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    response = requests.post(base_url + "/v1/chat/completions", json=body, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()


def answer(out: dict[str, Any]) -> str:
    return str(out["choices"][0]["message"]["content"])


def as_parts(layout: str, text: str, table: Any) -> list[dict[str, Any]]:
    return render(case(layout, text), table.part)


def as_plain_text(layout: str, text: str) -> list[dict[str, Any]]:
    return as_text(case(layout, text))


def cached_tokens(out: dict[str, Any]) -> int:
    """Prompt tokens a response says were not computed (local prefix cache or a connector)."""
    return int((out["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def metric(base_url: str, name: str) -> float:
    """The sum of a Prometheus counter's samples on a vLLM server's /metrics."""
    body = requests.get(base_url + "/metrics", timeout=10).text
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(body))


EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"


# -- KV-cache events (``--kv-events-config``): a real ZMQ subscriber -------------------------


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


class EventSubscriber:
    """Binds a SUB socket on 127.0.0.1 (the server's publisher connects to it) and collects
    the ``BlockStored`` events it receives."""

    def __init__(self, port: int) -> None:
        import zmq

        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.bind(self.endpoint)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)

    def config(self) -> str:
        return json.dumps(
            {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": self.endpoint}
        )

    def stored(self, quiet_s: float = 2.0) -> list[BlockStored]:
        """Every ``BlockStored`` received until none came for ``quiet_s``."""
        out: list[BlockStored] = []
        while self._socket.poll(int(quiet_s * 1000)):
            _topic, _seq, payload = self._socket.recv_multipart()
            batch = self._decoder.decode(payload)
            out += [event for event in batch.events if isinstance(event, BlockStored)]
        return out

    def close(self) -> None:
        self._socket.close(linger=0)


def stored_blocks(events: list[BlockStored]) -> list[tuple[Any, list[int], Any]]:
    """(block hash, token ids, extra keys) per stored block, in order."""
    blocks = []
    for event in events:
        size = event.block_size
        for index, block_hash in enumerate(event.block_hashes):
            ids = event.token_ids[index * size : (index + 1) * size]
            extra = event.extra_keys[index] if event.extra_keys else None
            blocks.append((block_hash, ids, extra))
    return blocks

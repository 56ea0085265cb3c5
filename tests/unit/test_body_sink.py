"""Body sinks (entrypoints/body_sink.py): under a real uvicorn, a big chat body is written into
the middleware's buffer by the protocol and lifted exactly as through ``receive``."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from vllm_chat_embeds.entrypoints import big_bodies, body_sink

pytestmark = pytest.mark.unit

BIG = "QUJD" * 300_000  # 1.2 MB of base64: many pieces from the parser


def _chat_body() -> bytes:
    part = {"type": "prompt_embeds", "encoding": "raw", "data": BIG}
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": [part]}]}).encode()


class Inner:
    """The route: records what it was handed."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        data = json.loads(body)["messages"][0]["content"][0]["data"]
        resolved = big_bodies.resolve(data)
        self.seen.append(
            {
                "small": len(body),
                "data": bytes(resolved) if isinstance(resolved, memoryview) else resolved,
                "sink_offered": body_sink.SINK in (scope.get("extensions") or {}),
            }
        )
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def serving(protocol: type | str, wrap=lambda app: app) -> Iterator[tuple[int, Inner]]:
    inner = Inner()
    app = wrap(big_bodies.LiftBigParts(inner, floor=1000, max_body=1 << 24))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=protocol, lifespan="off",
                            log_level="warning")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port, inner
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _post(port: int, body: bytes, pieces: int = 1) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    step = -(-len(body) // pieces)
    for start in range(0, len(body), step):
        conn.send(body[start : start + step])
        if pieces > 1:
            time.sleep(0.01)
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.fixture(scope="module")
def sinking() -> Iterator[tuple[int, Inner]]:
    protocol = body_sink.protocol_class()
    assert protocol is not None  # httptools is a vLLM dependency
    with serving(protocol) as served:
        yield served


@pytest.mark.parametrize("pieces", [1, 7, 64])
def test_sunk_body_is_lifted_as_through_receive(sinking, pieces, monkeypatch):
    port, inner = sinking
    taken: list[int] = []
    take = body_sink.BodySink.take

    def counting(self, piece):
        taken.append(len(piece))
        return take(self, piece)

    monkeypatch.setattr(body_sink.BodySink, "take", counting)
    body = _chat_body()
    assert _post(port, body, pieces) == 200
    seen = inner.seen[-1]
    assert seen["sink_offered"]
    assert sum(taken) == len(body)  # every byte went through the sink, none through receive
    assert seen["data"] == BIG.encode() and seen["small"] < 300
    assert big_bodies.held_count() == 0


def test_client_leaving_mid_body_leaves_nothing_and_the_server_serves_on(sinking):
    port, inner = sinking
    body = _chat_body()
    before = len(inner.seen)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode() + body[: len(body) // 2])
        time.sleep(0.2)
    time.sleep(0.2)
    assert len(inner.seen) == before  # the route never ran on half a body
    assert big_bodies.held_count() == 0
    assert _post(port, _chat_body()) == 200


def test_uvicorn_own_protocol_gives_the_same_result():
    with serving("httptools") as (port, inner):
        assert _post(port, _chat_body(), 7) == 200
    seen = inner.seen[-1]
    assert not seen["sink_offered"]
    assert seen["data"] == BIG.encode() and seen["small"] < 300


def test_a_wrapped_receive_gets_no_sink():
    """A middleware between uvicorn and the app that wraps ``receive`` must see the body."""
    seen: dict = {}

    class Wrapping:
        def __init__(self, app) -> None:
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            async def wrapped():
                message = await receive()
                seen["bytes"] = seen.get("bytes", 0) + len(message.get("body", b""))
                return message

            await self.app(scope, wrapped, send)

    body = _chat_body()
    with serving(body_sink.protocol_class(), Wrapping) as (port, inner):
        assert _post(port, body, 7) == 200
    assert seen["bytes"] == len(body)
    assert inner.seen[-1]["data"] == BIG.encode()

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


# Each server runs on uvloop (as vLLM's) and on asyncio's own loop (transports differ).
LOOPS = ("uvloop", "asyncio")


@contextmanager
def running(app, protocol: type | str, loop: str = "uvloop") -> Iterator[int]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=protocol, lifespan="off",
                            loop=loop, log_level="warning")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def serving(
    protocol: type | str, wrap=lambda app: app, loop: str = "uvloop"
) -> Iterator[tuple[int, Inner]]:
    inner = Inner()
    app = wrap(big_bodies.LiftBigParts(inner, floor=1000, max_body=1 << 24))
    with running(app, protocol, loop) as port:
        yield port, inner


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


@pytest.fixture(scope="module", params=LOOPS)
def sinking(request) -> Iterator[tuple[int, Inner]]:
    protocol = body_sink.protocol_class()
    assert protocol is not None  # httptools is a vLLM dependency
    with serving(protocol, loop=request.param) as served:
        yield served


def _none_held(timeout_s: float = 5.0) -> bool:
    """No lifted handle is left, once the route has returned (it may return just after the
    client has its response)."""
    deadline = time.monotonic() + timeout_s
    while big_bodies.held_count() and time.monotonic() < deadline:
        time.sleep(0.01)
    return big_bodies.held_count() == 0


@pytest.fixture
def sinks(monkeypatch) -> list[tuple[int, int, int]]:
    """Each sink, as it closes: (bytes copied in by ``take``, read straight from the socket,
    filled in all)."""
    closed: list[tuple[int, int, int]] = []
    taken = [0]
    take, close = body_sink.BodySink.take, body_sink.BodySink.close

    def counting(self, piece):
        taken[0] += len(piece)
        return take(self, piece)

    def recording(self):
        closed.append((taken[0], self.read_directly, self.got))
        taken[0] = 0
        close(self)

    monkeypatch.setattr(body_sink.BodySink, "take", counting)
    monkeypatch.setattr(body_sink.BodySink, "close", recording)
    return closed


@pytest.mark.parametrize("pieces", [1, 7, 64])
def test_sunk_body_is_lifted_as_through_receive(sinking, sinks, pieces):
    port, inner = sinking
    body = _chat_body()
    assert _post(port, body, pieces) == 200
    seen = inner.seen[-1]
    assert seen["sink_offered"]
    ((taken, direct, got),) = sinks
    assert got == len(body) and taken + direct == got  # every byte into the sink, none queued
    assert direct > 0  # the rest, once lent, read from the socket straight in
    assert seen["data"] == BIG.encode() and seen["small"] < 300
    assert _none_held()


def _raw_post(body: bytes, *, chunked: bool = False) -> bytes:
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if chunked:
        size = f"{len(body):x}".encode()
        return (
            (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
            + size
            + b"\r\n"
            + body
            + b"\r\n0\r\n\r\n"
        )
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _responses(sock: socket.socket, count: int) -> list[int]:
    """The statuses of ``count`` responses read off ``sock``."""
    data = b""
    deadline = time.monotonic() + 30
    while data.count(b"\r\n0\r\n\r\n") < count:  # each response ends its chunked body
        assert time.monotonic() < deadline, data[-200:]
        chunk = sock.recv(65536)
        assert chunk, data[-200:]
        data += chunk
    return [int(line.split()[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


def test_requests_after_a_body_read_directly_are_parsed_afresh(sinking, sinks):
    """Keep-alive and pipelining: a second request in the same write as the first's body (the
    reader stops at the body's end, so the next request is left for a fresh parser), then a
    third, chunked (no declared length: not lifted, no sink)."""
    port, inner = sinking
    body = _chat_body()
    before = len(inner.seen)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        first = _raw_post(body)
        sock.sendall(first[: len(first) // 3])
        time.sleep(0.2)  # the route lends its buffer: the rest is read straight in
        sock.sendall(first[len(first) // 3 :] + _raw_post(body))
        assert _responses(sock, 2) == [200, 200]
        sock.sendall(_raw_post(body, chunked=True))
        assert _responses(sock, 1) == [200]
    datas = [s["data"] for s in inner.seen[before:]]
    assert [d if isinstance(d, bytes) else d.encode() for d in datas] == [BIG.encode()] * 3
    assert isinstance(datas[2], str)  # chunked (no declared length): not lifted, no sink
    assert len(sinks) == 2 and sinks[0][1] > 0 and [s[2] for s in sinks] == [len(body)] * 2


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
    assert _none_held()
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


def test_a_sink_given_up_mid_body_reads_the_rest_past_it_and_serves_on(sinks):
    """A route that answers before the body ends (and closes its sink): the rest of the body
    is read and dropped, and the next request on the connection is served."""
    answered: list[int] = []

    async def refusing(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        sink = body_sink.attach(scope, bytearray(1 << 21), receive)
        if sink is not None:
            sink.close()
        answered.append(0 if sink is None else 1)
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b"no"})

    with running(refusing, body_sink.protocol_class()) as port:
        body = b"x" * (1 << 20)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            first = _raw_post(body)
            sock.sendall(first[:200])
            assert _responses(sock, 1) == [413]
            sock.sendall(first[200:] + _raw_post(b"{}"))
            assert _responses(sock, 1) == [413]
    assert answered == [1, 1]
    assert sinks[0][1] == 0  # closed before any byte came: the rest was read past it

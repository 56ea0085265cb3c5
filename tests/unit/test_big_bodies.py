"""The big-body middleware: which strings it lifts, and that everything else goes on as it came
(entrypoints/big_bodies.py)."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
import torch

from vllm_chat_embeds.entrypoints import big_bodies
from vllm_chat_embeds.errors import VLLMValidationError
from vllm_chat_embeds.payload import PayloadSpec, decode_payload

pytestmark = pytest.mark.unit

BIG = "QUJD" * 200  # 800 characters of base64


def _body(obj: object) -> bytearray:
    return bytearray(json.dumps(obj).encode())


def _chat(*parts: dict) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}


def test_lifts_part_data_and_nothing_else():
    body = _chat(
        {"type": "text", "text": "T" * 900},
        {"type": "prompt_embeds", "data": BIG},
        {"data": BIG, "type": "prompt_embeds", "encoding": "raw"},
    )
    small, strings = big_bodies.lift(_body(body), 0)
    tree = json.loads(small)
    parts = tree["messages"][0]["content"]
    assert parts[0]["text"] == "T" * 900  # a long text stays
    # Views of the body's own bytes (no string is made): the decoder reads them in place.
    assert len(strings) == 2 and {bytes(v) for v in strings.values()} == {BIG.encode()}
    for part in parts[1:]:
        assert part["data"].startswith(big_bodies.HANDLE_PREFIX)
        assert strings[part["data"]] == BIG.encode()
    assert len(small) < 900 + 300  # the text, and two handles in place of 1600 characters


@pytest.mark.parametrize(
    "obj",
    [
        _chat({"type": "text", "text": "x" * 1000}),  # long, but a text
        _chat({"type": "image_url", "data": BIG}),  # not a prompt_embeds part
        {"model": "m", BIG: 1},  # a key
        _chat({"type": "prompt_embeds", "data": [BIG]}),  # not the data string itself
    ],
)
def test_nothing_to_lift(obj):
    assert big_bodies.lift(_body(obj), 0) is None


@pytest.mark.parametrize("escape", [b"\\/", b"\\u002f", b"\\u002F"])
def test_escaped_data_is_lifted_and_read_by_the_decoder(escape: bytes):
    """JSON escapes inside a part's data (``\\/`` from PHP's and some Java encoders): lifted
    as they stand, and decoded to the rows their JSON value means."""
    rows = torch.arange(600, dtype=torch.float16).view(300, 2)
    data = base64.b64encode(rows.numpy().tobytes())
    assert b"/" in data
    part = {"type": "prompt_embeds", "encoding": "raw", "dtype": "float16", "shape": [300, 2]}
    body = bytearray(json.dumps(_chat({**part, "data": "DATA"})).encode())
    body = body.replace(b"DATA", data.replace(b"/", escape))
    lifted = big_bodies.lift(body, 0)
    assert lifted is not None
    (text,) = lifted[1].values()
    assert escape in bytes(text)
    spec = PayloadSpec(width=2, dtype=torch.float16, max_part_bytes=1 << 20, max_rows=4096,
                       rows_limit=4096)  # fmt: skip
    got = decode_payload(text, "messages[0].content[0]", spec, encoding="raw", dtype="float16",
                         shape=[300, 2])  # fmt: skip
    assert torch.equal(got, rows)


def test_non_ascii_data_is_lifted_and_refused_by_the_decoder():
    """Raw UTF-8 inside a lifted string is never base64: the part's 400, as for any bad text."""
    body = bytearray(
        b'{"messages": [{"role": "user", "content": [{"type": "prompt_embeds", '
        + b'"encoding": "raw", "data": "'
        + "é".encode() * 400
        + b'"}]}]}'
    )
    lifted = big_bodies.lift(body, 0)
    assert lifted is not None
    (text,) = lifted[1].values()
    spec = PayloadSpec(width=2, dtype=torch.float16, max_part_bytes=1 << 20, max_rows=4096,
                       rows_limit=4096)  # fmt: skip
    with pytest.raises(VLLMValidationError, match="not valid base64"):
        decode_payload(text, "messages[0].content[0]", spec, encoding="raw", dtype="float16",
                       shape=[150, 2])  # fmt: skip


def test_not_json_goes_on_as_it_came():
    broken = _body(_chat({"type": "prompt_embeds", "data": BIG}))[:-2]
    assert big_bodies.lift(broken, 0) is None
    unterminated = bytearray(b'{"messages": "' + b"A" * 900)
    assert big_bodies.lift(unterminated, 0) is None


def test_floor_is_respected():
    body = _body(_chat({"type": "prompt_embeds", "data": BIG}))
    assert big_bodies.lift(body, len(BIG) + 1) is None
    assert big_bodies.lift(body, len(BIG)) is not None


def test_resolve_unknown_handles_and_other_values():
    assert (
        big_bodies.resolve(big_bodies.HANDLE_PREFIX + "nope") == big_bodies.HANDLE_PREFIX + "nope"
    )
    assert big_bodies.resolve(None) is None
    assert big_bodies.resolve("QUJD") == "QUJD"


def _run(body: bytes, *, path: str = "/v1/chat/completions", chunk: int = 100, headers=None):
    """Drive the middleware with ``body`` in chunks; what the inner app received and saw."""
    seen: dict = {}

    async def inner(scope, receive, send):
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        seen["body"] = b"".join(chunks)
        seen["resolved"] = {}
        if seen["body"]:
            try:
                tree = json.loads(seen["body"])
                data = tree["messages"][0]["content"][0].get("data")
                resolved = big_bodies.resolve(data)  # a view, released when the route returns
                seen["resolved"] = bytes(resolved) if isinstance(resolved, memoryview) else resolved
            except (ValueError, KeyError, TypeError, IndexError):
                pass
        seen["held_inside"] = big_bodies.held_count()

    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
        for i, p in enumerate(pieces)
    ]

    async def receive():
        return messages.pop(0)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers
        if headers is not None
        else [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
    }
    app = big_bodies.LiftBigParts(inner, floor=0, max_body=1 << 20)
    asyncio.run(app(scope, receive, lambda message: asyncio.sleep(0)))
    return seen


def test_middleware_hands_the_route_a_small_body_and_cleans_up():
    body = json.dumps(_chat({"type": "prompt_embeds", "data": BIG})).encode()
    seen = _run(body)
    assert len(seen["body"]) < 200
    assert seen["resolved"] == BIG.encode()
    assert seen["held_inside"] == 1
    assert big_bodies.held_count() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"path": "/v1/completions"},
        {"headers": [(b"content-type", b"text/plain"), (b"content-length", b"900")]},
        {"headers": []},  # no declared length (chunked): left alone
    ],
)
def test_middleware_leaves_other_requests_alone(kwargs):
    body = json.dumps(_chat({"type": "prompt_embeds", "data": BIG})).encode()
    seen = _run(body, **kwargs)
    assert seen["body"] == body


def test_middleware_passes_a_body_it_cannot_lift_whole():
    body = json.dumps(_chat({"type": "text", "text": "x" * 1000})).encode()
    assert _run(body)["body"] == body


def test_floor_comes_from_the_environment(monkeypatch):
    from vllm_chat_embeds.limits import ENV_LIFT_ABOVE_BYTES, Limits

    assert Limits.from_env().lift_above_bytes == 1024 * 1024
    monkeypatch.setenv(ENV_LIFT_ABOVE_BYTES, "0")
    assert Limits.from_env().lift_above_bytes == 0
    monkeypatch.setenv(ENV_LIFT_ABOVE_BYTES, "-1")
    with pytest.raises(ValueError, match=ENV_LIFT_ABOVE_BYTES):
        Limits.from_env()


def _drive(messages: list[dict], declared: int) -> list[dict]:
    """What the route receives when the client sends ``messages`` under ``declared`` length."""
    got: list[dict] = []

    async def inner(scope, receive, send):
        while True:
            message = await receive()
            got.append(message)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

    queue = list(messages)

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % declared)],
    }
    app = big_bodies.LiftBigParts(inner, floor=0, max_body=1 << 20)
    asyncio.run(app(scope, receive, lambda message: asyncio.sleep(0)))
    return got


def test_a_client_leaving_mid_body_is_a_disconnect_for_the_route():
    body = json.dumps(_chat({"type": "prompt_embeds", "data": BIG})).encode()
    got = _drive([{"type": "http.request", "body": body[:300], "more_body": True}], len(body))
    assert got[-1]["type"] == "http.disconnect"
    assert big_bodies.held_count() == 0


def test_more_bytes_than_declared_go_on_as_they_came():
    body = json.dumps(_chat({"type": "prompt_embeds", "data": BIG})).encode()
    messages = [
        {"type": "http.request", "body": body[:500], "more_body": True},
        {"type": "http.request", "body": body[500:], "more_body": False},
    ]
    got = _drive(messages, 600)
    assert b"".join(m["body"] for m in got) == body
    assert got[-1]["more_body"] is False

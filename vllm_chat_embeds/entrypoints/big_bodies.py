"""Big chat bodies: a part's base64 ``data`` lifted out of the JSON before FastAPI parses it.

Why: FastAPI reads a body as a list of chunks it then joins, and parses it with ``json.loads``,
which builds every string character by character. For one 8192-row float16 part (an 89 MB
body) that is about 60 ms of joining and 120-220 ms of parsing, before our own decode starts.
This ASGI middleware (attached by the ``entrypoints_launchers_app`` patch, inside vLLM's
``--api-key`` check) reads a chat body straight into one buffer, finds its long strings with
``bytes.find`` over the quotes (memchr), and passes the body on with a short handle in place of
each long string that is the ``data`` of a ``prompt_embeds`` part. The part parser swaps the
handle back (``resolve``, in ``renderers/parts.py``) for a view of the body's bytes between the
quotes, which the decoder reads in place: no ``str`` of the text is ever made (for 2048 float16
rows that was a 22 MB copy into fresh pages, 15 ms of the request's CPU). A string with JSON
escapes (``\\/``) is lifted as it stands; the decoder reads the escapes only when the bytes are
not base64 as they are (``payload._unescaped``), so no request pays a pass looking for them.
Anything else (a long text, a body that is not JSON) goes on untouched, so vLLM answers it
exactly as without the middleware. One difference: a raw control character or a non-ASCII
character inside a lifted string reaches the part parser with the base64 and gets the part's
400 (not base64), not FastAPI's JSON error.

Memory: the body is read into a mapping of its own (``heap.fresh_pages``: huge pages where the
kernel allows, touched only as bytes arrive). With nothing lifted it is unmapped before the
route runs; with parts lifted it stays for the route (in place of the strings it used to make)
and is unmapped when the route returns, or with the last view of it.

Lifetime: a handle is a random name valid for the one HTTP request that made it; it is dropped
when the route returns. A handle sent by a client, or left over, is just an invalid base64
string, answered by the part's usual 400.
"""

from __future__ import annotations

import json
import mmap
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from .. import heap
from ..limits import Limits
from ..log import logger
from . import body_sink

# The stateless routes whose JSON goes through our part parser. Not /v1/responses: vLLM
# stores a response's input for later turns (previous_response_id), and a handle lives for one
# HTTP request only.
LIFTED_PATHS: Final = frozenset(
    {"/v1/chat/completions", "/v1/chat/completions/render", "/tokenize"}
)
HANDLE_PREFIX: Final = "vce-lifted:"  # ':' is not base64: a stray handle fails as bad base64
# Past this many strings the body is not a chat with a few big parts: left to json.loads.
_MAX_STRINGS: Final = 100_000
# JSON besides the rows a lifted body may carry (messages, tools, settings).
_BODY_SLACK: Final = 16 * 1024 * 1024
# Strings shorter than this are never lifted (the part's ``type``, keys, short texts).
MIN_LIFTED_CHARS: Final = 256
_BACKSLASH: Final = ord("\\")

LIFTING: Final = (
    "vllm-chat-embeds: prompt_embeds part data of {floor} characters or more skips the JSON "
    "parser of {paths} (CHAT_EMBEDS_LIFT_ABOVE_BYTES)"
)

_held: dict[str, memoryview] = {}

Buffer = bytes | bytearray | mmap.mmap
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def resolve(value: object) -> object:
    """The text a handle stands for, as a view of the body's bytes (anything else as given)."""
    if isinstance(value, str) and value.startswith(HANDLE_PREFIX):
        return _held.get(value, value)
    return value


def held_count() -> int:
    """How many lifted texts are alive (0 between requests; for tests)."""
    return len(_held)


def _long_strings(body: Buffer, floor: int) -> list[tuple[int, int]] | None:
    """``(start, end)`` of each JSON string of at least ``floor`` bytes, quotes included; None
    when the body has too many strings to be worth it or ends inside one."""
    found = []
    pos = body.find(b'"')
    count = 0
    while pos >= 0:
        count += 1
        if count > _MAX_STRINGS:
            return None
        end = body.find(b'"', pos + 1)
        while end >= 0:
            slashes = 0
            while body[end - 1 - slashes] == _BACKSLASH:
                slashes += 1
            if slashes % 2 == 0:
                break
            end = body.find(b'"', end + 1)
        if end < 0:
            return None
        if end - pos - 1 >= floor:
            found.append((pos, end + 1))
        pos = body.find(b'"', end + 1)
    return found


def _well_placed(tree: object, handles: set[str]) -> set[str]:
    """The handles in ``tree`` that are the ``data`` of a prompt_embeds part (the others stand
    for keys, texts or other fields, and go back as they came)."""
    good: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        values = node.values() if isinstance(node, dict) else node
        for value in values:  # type: ignore[union-attr]
            if isinstance(value, dict | list):
                stack.append(value)
        if isinstance(node, dict) and node.get("type") == "prompt_embeds":
            data = node.get("data")
            if isinstance(data, str) and data in handles:
                good.add(data)
    return good


def _joined(view: memoryview, spans: list[tuple[int, int, str]]) -> bytes:
    """The body with each span replaced by its handle as a JSON string."""
    pieces: list[bytes | memoryview] = []
    last = 0
    for start, end, handle in spans:
        pieces += [view[last:start], b'"', handle.encode(), b'"']
        last = end
    pieces.append(view[last:])
    return b"".join(pieces)


def lift(body: Buffer, floor: int) -> tuple[bytes, dict[str, memoryview]] | None:
    """The body with each long part ``data`` string replaced by a handle, and by handle a view
    of each string's bytes in ``body``; None when nothing can be lifted (the body then goes on
    as it came)."""
    found = _long_strings(body, max(floor, MIN_LIFTED_CHARS))
    if not found:
        return None
    view = memoryview(body)
    strings: dict[str, memoryview] = {}
    spans = []
    for start, end in found:
        # Escapes inside (``\/`` from some encoders) are read by the decoder, only when the
        # bytes are not base64 as they stand: no pass over every body looks for them.
        handle = HANDLE_PREFIX + secrets.token_urlsafe(18)
        strings[handle] = view[start + 1 : end - 1]
        spans.append((start, end, handle))
    if not spans:
        return None
    small = _joined(view, spans)
    try:
        tree = json.loads(small)
    except ValueError:
        return None  # not JSON: vLLM's own answer, from the body as it came
    good = _well_placed(tree, set(strings))
    if not good:
        return None
    if len(good) < len(spans):
        spans = [span for span in spans if span[2] in good]
        small = _joined(view, spans)
    return small, {handle: strings[handle] for handle in good}


class LiftBigParts:
    """Pure ASGI middleware (no extra task, so the route runs in the request's own context)."""

    def __init__(self, app: App, floor: int, max_body: int) -> None:
        self.app = app
        self.floor = floor
        self.max_body = max_body

    def _declared_length(self, scope: Scope) -> int | None:
        """The body's declared length, when this request's body is worth reading here."""
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return None
        if scope.get("path") not in LIFTED_PATHS:
            return None
        length = None
        for name, value in scope.get("headers") or ():
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return None
            elif name == b"content-type" and b"json" not in value.lower():
                return None
        if length is None or length < self.floor or length > self.max_body:
            return None
        return length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = self._declared_length(scope)
        if length is None:
            await self.app(scope, receive, send)
            return
        # An anonymous mapping, not a heap buffer: its pages are touched only as bytes arrive
        # (a declared length costs nothing until sent) and go back to the system when closed
        # (a 20-90 MB heap buffer would stay in the process).
        body = heap.fresh_pages(length)
        strings: dict[str, memoryview] = {}
        try:
            first, strings = await self._read(scope, body, length, receive)
            if not strings:
                _close(body)  # the route reads its own copy: the mapping can go now
            _held.update(strings)
            await self.app(scope, _replay(first, receive), send)
        finally:
            for handle, text in strings.items():
                _held.pop(handle, None)
                try:
                    text.release()
                except BufferError:  # exported by a decoder still alive: goes with it
                    pass
            _close(body)

    async def _read(
        self, scope: Scope, body: mmap.mmap, length: int, receive: Receive
    ) -> tuple[Message, dict[str, memoryview]]:
        """The first message the route gets (the body as it came, or lifted), and the lifted
        texts by handle (views of ``body``)."""
        # Under ``vllm serve`` the protocol writes the body into ``body`` itself; ``receive``
        # then says when it is complete, or brings what did not fit.
        sink = body_sink.attach(scope, body, receive)
        try:
            return await self._receive_into(body, length, receive, sink)
        finally:
            if sink is not None:
                sink.close()

    async def _receive_into(
        self, body: mmap.mmap, length: int, receive: Receive, sink: body_sink.BodySink | None
    ) -> tuple[Message, dict[str, memoryview]]:
        got = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: say so downstream
                return message, {}
            if sink is not None:
                got = sink.got
            chunk = message.get("body", b"")
            if got + len(chunk) > length:  # more than declared: as it came, for vLLM to judge
                return {**message, "body": body[:got] + chunk}, {}
            body[got : got + len(chunk)] = chunk
            got += len(chunk)
            if not message.get("more_body", False):
                break
        lifted = lift(body, self.floor) if got == length else None
        if lifted is None:
            return _final(body[:got]), {}
        small, strings = lifted
        return _final(small), strings


def _close(body: mmap.mmap) -> None:
    try:
        body.close()
    except BufferError:  # a view still alive (an error's traceback): the mapping goes with it
        pass


def _final(body: bytes) -> Message:
    return {"type": "http.request", "body": body, "more_body": False}


def _replay(first: Message, receive: Receive) -> Receive:
    """A ``receive`` that gives ``first`` then defers to the real one (disconnects)."""
    pending = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def attach(app: Any, limits: Limits | None = None) -> None:
    """Add the middleware to vLLM's app (innermost: vLLM's own middlewares come after)."""
    limits = limits or Limits.from_env()
    max_body = (limits.max_request_bytes // 3) * 4 + _BODY_SLACK
    floor = max(limits.lift_above_bytes, MIN_LIFTED_CHARS)
    app.add_middleware(LiftBigParts, floor=floor, max_body=max_body)
    logger.info(LIFTING.format(floor=floor, paths=", ".join(sorted(LIFTED_PATHS))))

"""Request bodies written straight into a buffer as they arrive (extends uvicorn's httptools
protocol, which ``vllm serve``'s launcher runs).

Why: uvicorn hands a body to the app in pieces: every piece the parser yields is appended to a
``bytearray``, copied again into a ``bytes`` per ASGI ``receive``, and passed through an
``asyncio.Event`` and a task switch, before the app copies it into its own buffer. For a
22 MB chat body (2048 float16 rows inline) that is two extra copies and hundreds of wake-ups.
Here the app may lend a buffer for the rest of a request's body (``BodySink``); the protocol
then copies each parsed piece into it, and ``receive`` says only when the body is complete.

How an app finds it: each request's ASGI scope carries ``scope["extensions"][SINK]``, a
callable that takes a writable buffer and the ``receive`` the app was handed, and returns the
``BodySink`` now filling it. It returns None when the bytes already queued do not fit, or when
that ``receive`` is not uvicorn's own: a middleware in between that wraps it (a decompressing
one, say, given with ``--middleware``) must see the body, so it goes its ordinary way. Without
this protocol (h11, another server, tests) the key is absent and the app reads ``receive`` as
usual. A body longer than the buffer leaves the sink at that point and goes on through
``receive`` as uvicorn's own pieces, so the app sees the overflow exactly as it would have.

What it relies on in uvicorn (checked by ``protocol_class`` at startup; a uvicorn without them
gets its own protocol and a warning, so bodies take the ordinary path): the protocol's
``on_headers_complete`` and ``on_body``, the request cycle's ``receive`` method, and its
``body`` (a ``bytearray`` of what is queued; a sink is refused without it), ``scope`` and
``response_complete``.
"""

from __future__ import annotations

from typing import Any, Final

from ..log import logger

SINK: Final = "vllm_chat_embeds.body_sink"
_CYCLE_ATTRIBUTE: Final = "_vllm_chat_embeds_sink"

SINKING: Final = (
    "vllm-chat-embeds: big request bodies are written straight into the buffers their routes "
    "lend (uvicorn's httptools protocol with body sinks)"
)
NO_SINK: Final = (
    "vllm-chat-embeds: request bodies take uvicorn's ordinary path ({reason}); big chat bodies "
    "then cost the API server two more copies"
)


class BodySink:
    """A lent buffer a request's body is written into, and how much of it is filled."""

    def __init__(self, buffer: Any) -> None:
        self.view = memoryview(buffer).cast("B")
        self.got = 0
        self.open = True

    def take(self, piece: bytes | bytearray) -> bool:
        """Write ``piece`` at the end; False (and closed from now on) if it does not fit."""
        end = self.got + len(piece)
        if not self.open or end > len(self.view):
            self.open = False
            return False
        self.view[self.got : end] = piece
        self.got = end
        return True

    def close(self) -> None:
        """No more writes (the request is done, or the app gave up): the buffer is its own."""
        self.open = False
        self.view.release()


def attach(scope: Any, buffer: Any, receive: Any) -> BodySink | None:
    """The sink now filling ``buffer`` with the rest of this request's body, or None (no sink
    offered, a wrapped ``receive``, or more already queued than fits)."""
    offer = (scope.get("extensions") or {}).get(SINK)
    return offer(buffer, receive) if offer is not None else None


def _attach(cycle: Any) -> Any:
    def attach(buffer: Any, receive: Any) -> BodySink | None:
        if getattr(receive, "__self__", None) is not cycle:  # wrapped on its way to the app
            return None
        queued = getattr(cycle, "body", None)
        if not isinstance(queued, bytearray):  # not the uvicorn this was written for
            return None
        sink = BodySink(buffer)
        if not sink.take(queued):
            sink.close()
            return None
        queued.clear()
        setattr(cycle, _CYCLE_ATTRIBUTE, sink)
        return sink

    return attach


def protocol_class() -> type | None:
    """uvicorn's httptools protocol with body sinks, or None where that cannot be built."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
    except ImportError as exc:  # no httptools: uvicorn serves with h11
        logger.info(NO_SINK.format(reason=f"uvicorn's httptools protocol is unavailable: {exc}"))
        return None
    missing = [
        name
        for owner, name in (
            (HttpToolsProtocol, "on_headers_complete"),
            (HttpToolsProtocol, "on_body"),
            (RequestResponseCycle, "receive"),
        )
        if not callable(getattr(owner, name, None))
    ]
    if missing:
        logger.warning(NO_SINK.format(reason=f"this uvicorn has no {', '.join(missing)}"))
        return None

    class SinkingHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc, valid-type]
        """uvicorn's protocol, with each request's body sink offered in its scope."""

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = getattr(self, "cycle", None)
            if cycle is not None and getattr(cycle, "scope", None) is getattr(self, "scope", 0):
                cycle.scope.setdefault("extensions", {})[SINK] = _attach(cycle)

        def on_body(self, body: bytes) -> None:
            cycle = getattr(self, "cycle", None)
            sink = getattr(cycle, _CYCLE_ATTRIBUTE, None)
            if sink is None or cycle.response_complete or not sink.take(body):
                super().on_body(body)

    return SinkingHttpToolsProtocol

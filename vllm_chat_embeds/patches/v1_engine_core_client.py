"""Patch of ``vllm/v1/engine/core_client.py``: rows cross to the engine core once, or not at all.

What: ``SyncMPClient._send_input`` and ``AsyncMPClient._send_input`` (the DP clients inherit
it) serialise an added request without its rows when the engine core can do without them: as
the handle of the shared memory they lie in (``transport/shared_rows.py``), when the engine
cores listen on this machine (an ``ipc://`` input socket), or with only the rows its engine
core does not hold yet, and the wire that says which (``stores/engine_rows.py``); the engine
core puts the rows back (``v1_engine_core``). One ``HeldRows`` per client and engine: the send
to one engine over one socket is the order that engine reads in. Why: a big part's rows
otherwise cross to the engine core as bytes, and a part referred to by uuid on every turn.
When it can go: when vLLM's engine requests can carry embedding rows by content hash or by a
shared-memory handle, as its multimodal caches do for media.

Also ``AsyncMPClient.abort_requests_async`` (and the load-balancing DP client's own): each abort
asks for a cycle collection soon after (``shared_rows.collect_soon``), so an aborted request's
shared rows are freed although its traceback's cycle still holds them. When it can go: when
vLLM's ``generate`` no longer leaves the prompt in a reference cycle on abort.
"""

from __future__ import annotations

from typing import Any

from ..stores.engine_rows import attached, new_sender, rows_left_behind
from ..transport.shared_rows import collect_soon
from . import Patch, check


def listens_locally(client: Any) -> bool:
    """Whether the client's engine cores read from an ``ipc://`` socket (this machine): only
    they can map a shared-memory handle."""
    import zmq

    try:
        endpoint = client.input_socket.getsockopt(zmq.LAST_ENDPOINT)
    except Exception:  # no socket, or closed: send rows as bytes
        return False
    return bytes(endpoint).startswith(b"ipc://")


def apply(patch: Patch) -> None:
    module = patch.home()
    check(
        patch,
        {
            "SyncMPClient._send_input": ("self", "request_type", "request"),
            "AsyncMPClient._send_input": ("self", "request_type", "request", "engine"),
            "AsyncMPClient.abort_requests_async": ("self", "request_ids"),
            "DPLBAsyncMPClient.abort_requests_async": ("self", "request_ids"),
        },
    )
    from vllm.v1.engine import EngineCoreRequest, EngineCoreRequestType

    def wrap(cls: Any) -> None:
        original = cls._send_input

        def _send_input(
            self: Any, request_type: Any, request: Any, *args: Any, **kwargs: Any
        ) -> Any:
            if request_type != EngineCoreRequestType.ADD or not isinstance(
                request, EngineCoreRequest
            ):
                return original(self, request_type, request, *args, **kwargs)
            engine = args[0] if args else kwargs.get("engine")
            held = attached(self, bytes(engine or self.core_engine or b""), new_sender)
            local = attached(self, "local engines", lambda: listens_locally(self))
            with rows_left_behind(held, request, local=local):
                return original(self, request_type, request, *args, **kwargs)

        cls._send_input = _send_input

    wrap(module.SyncMPClient)
    wrap(module.AsyncMPClient)

    def collect_after(cls: Any) -> None:
        original = cls.abort_requests_async

        async def abort_requests_async(self: Any, request_ids: Any, *args: Any, **kw: Any) -> Any:
            try:
                return await original(self, request_ids, *args, **kw)
            finally:
                collect_soon()

        cls.abort_requests_async = abort_requests_async

    collect_after(module.AsyncMPClient)
    if "abort_requests_async" in vars(module.DPLBAsyncMPClient):
        collect_after(module.DPLBAsyncMPClient)

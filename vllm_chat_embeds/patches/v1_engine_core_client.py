"""Patch of ``vllm/v1/engine/core_client.py``: a reference's rows stay with the engine core.

What: ``SyncMPClient._send_input`` and ``AsyncMPClient._send_input`` (the DP clients inherit
it) serialise an added request with only the rows its engine core does not hold yet, and the
wire that says which (``stores/engine_rows.py``); the engine core puts the rows back
(``v1_engine_core``). One ``HeldRows`` per client and engine: the send to one engine over one
socket is the order that engine reads in. Why: a part referred to by uuid otherwise crosses to
the engine core with all its rows on every turn. When it can go: when vLLM's engine requests
can carry embedding rows by content hash, as its multimodal sender cache does for media.
"""

from __future__ import annotations

from typing import Any

from ..stores.engine_rows import attached, new_sender, rows_left_behind
from . import Patch, check


def apply(patch: Patch) -> None:
    module = patch.home()
    check(
        patch,
        {
            "SyncMPClient._send_input": ("self", "request_type", "request"),
            "AsyncMPClient._send_input": ("self", "request_type", "request", "engine"),
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
            with rows_left_behind(held, request):
                return original(self, request_type, request, *args, **kwargs)

        cls._send_input = _send_input

    wrap(module.SyncMPClient)
    wrap(module.AsyncMPClient)

"""Patch of ``vllm/v1/engine/core.py``: put back the rows a request left behind.

What: ``EngineCore.preprocess_add_request`` (run in the input thread, in the order requests
arrive) first rebuilds a request's rows from those it carries and those this engine core keeps
for its API server, as the request's wire says (``stores/engine_rows.py``; the sender is the
``v1_engine_core_client`` patch). One ``KeptRows`` per API server (``client_index``): each has
its own sender. A request whose wire names rows not kept fails on its own (vLLM returns an
error for it; the engine goes on). Why and when it can go: see ``v1_engine_core_client``.
"""

from __future__ import annotations

from typing import Any

from ..stores.engine_rows import KeptRows, attached, span_digests, take_wire
from . import Patch, check


def restore_rows(core: Any, request: Any) -> None:
    """Give ``request`` its whole rows back, if it left some behind."""
    params = request.sampling_params
    wire = take_wire(params) if params is not None else None
    if wire is None:
        return
    spans = span_digests(params) or []
    kept = attached(core, int(request.client_index or 0), KeptRows)  # one per API server
    request.prompt_embeds = kept.resolve(spans, wire, request.prompt_embeds, request.request_id)


def apply(patch: Patch) -> None:
    module = patch.home()
    check(patch, {"EngineCore.preprocess_add_request": ("self", "request")})
    cls = module.EngineCore
    original = cls.preprocess_add_request

    def preprocess_add_request(self: Any, request: Any) -> Any:
        restore_rows(self, request)
        return original(self, request)

    cls.preprocess_add_request = preprocess_add_request

"""Patch of ``vllm/v1/engine/core.py``: put back the rows a request left behind.

What: ``EngineCore.preprocess_add_request`` (run in the input thread, in the order requests
arrive) first rebuilds a request's rows as its wire says (``stores/engine_rows.py``; the sender
is the ``v1_engine_core_client`` patch): mapped from shared memory when they came as a handle
(``transport/shared_rows.py``), else from the rows it carries and those this engine core keeps
for its API server (one ``KeptRows`` per ``client_index``: each has its own sender). Shared rows
that go on to workers keep their link until the executor retires it
(``v1_executor_multiproc_executor``), or, when vLLM's own preprocessing then fails the request
(it never reaches the scheduler, so no step would retire it), at once. A request whose rows
cannot be rebuilt fails on its own (vLLM returns an error for it; the engine goes on). Why
and when it can go: see ``v1_engine_core_client``.

Also: before the first request is built, it tells ``kv_transfer/row_keys.py`` the model's
vocabulary size (the content ids it draws for rows stay below it); it can go with the
``v1_request`` patch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..kv_transfer import row_keys
from ..stores.engine_rows import SHARED, KeptRows, attached, incoming, span_digests, take_wire
from ..transport import shared_rows
from . import Patch, check
from .v1_executor_multiproc_executor import kept_links, passes_rows_on


def restore_rows(core: Any, request: Any) -> str | None:
    """Give ``request`` its whole rows back, if it left some behind; the link kept for the
    workers, if one is."""
    params = request.sampling_params
    wire = take_wire(params) if params is not None else None
    if wire is None:
        return None
    spans = span_digests(params) or []
    kept = attached(core, int(request.client_index or 0), KeptRows)  # one per API server
    executor = getattr(core, "model_executor", None)
    keep_link = SHARED in wire and passes_rows_on(executor)
    request.prompt_embeds = incoming(
        kept, spans, wire, request.prompt_embeds, request.request_id, keep_link=keep_link
    )
    if not keep_link:
        return None
    link = kept_links(executor)[request.request_id] = wire[SHARED][0]
    return link


def add_with_rows(core: Any, request: Any, add: Callable[[Any, Any], Any]) -> Any:
    """``add(core, request)`` (vLLM's preprocessing) on the request with its rows back; if it
    fails, the link kept for the workers goes too (the request's mapping goes with it)."""
    link = restore_rows(core, request)
    try:
        return add(core, request)
    except BaseException:
        if link is not None:
            kept_links(core.model_executor).pop(request.request_id, None)
            shared_rows.process_rows().retire([link])
        raise


def apply(patch: Patch) -> None:
    module = patch.home()
    check(patch, {"EngineCore.preprocess_add_request": ("self", "request")})
    cls = module.EngineCore
    original = cls.preprocess_add_request

    def preprocess_add_request(self: Any, request: Any) -> Any:
        if row_keys.vocab_size() is None:
            row_keys.note_vocab_size(self.vllm_config.model_config.get_vocab_size())
        return add_with_rows(self, request, original)

    cls.preprocess_add_request = preprocess_add_request

"""Patch of ``vllm/v1/executor/multiproc_executor.py``: a reference's rows stay with the workers.

What: ``MultiprocExecutor.execute_model`` broadcasts each newly scheduled request with only
the rows its workers do not hold yet, and per request the wire that says which
(``stores/engine_rows.py``), as an attribute of the scheduler output; the workers put the rows
back (``v1_worker_gpu_worker``). The engine core is the one sender, and every worker reads the
broadcast in order, so one ``HeldRows`` per executor describes every worker. The scheduler
output is put back as it was once broadcast. Why: a part referred to by uuid otherwise crosses
to every worker with all its rows on every turn. When it can go: see ``v1_engine_core_client``.
"""

from __future__ import annotations

from typing import Any, Final

from ..stores.engine_rows import attached, new_sender, outgoing, span_digests
from . import Patch, check

# The scheduler output's attribute holding {request id: wire} for the workers.
WIRES_ATTR: Final = "_vllm_chat_embeds_row_wires"


def apply(patch: Patch) -> None:
    module = patch.home()
    check(
        patch,
        {"MultiprocExecutor.execute_model": ("self", "scheduler_output", "non_block")},
    )
    cls = module.MultiprocExecutor
    original = cls.execute_model

    def execute_model(self: Any, scheduler_output: Any, non_block: bool = False) -> Any:
        new_reqs = getattr(scheduler_output, "scheduled_new_reqs", None) or ()
        if not any(req.prompt_embeds is not None for req in new_reqs):
            return original(self, scheduler_output, non_block)
        held = attached(self, "workers", new_sender)
        wires: dict[str, Any] = {}
        restore: list[tuple[Any, Any]] = []
        for req in new_reqs:
            out = outgoing(held, req.prompt_embeds, span_digests(req.sampling_params))
            if out is None:
                continue
            restore.append((req, req.prompt_embeds))
            req.prompt_embeds, wires[req.req_id] = out
        if not wires:
            return original(self, scheduler_output, non_block)
        setattr(scheduler_output, WIRES_ATTR, wires)
        try:
            return original(self, scheduler_output, non_block)
        finally:  # the broadcast is serialised by now
            delattr(scheduler_output, WIRES_ATTR)
            for req, rows in restore:
                req.prompt_embeds = rows

    cls.execute_model = execute_model

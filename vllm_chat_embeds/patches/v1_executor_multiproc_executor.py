"""Patch of ``vllm/v1/executor/multiproc_executor.py``: rows cross to the workers once.

What: ``MultiprocExecutor.execute_model`` broadcasts each newly scheduled request without its
rows when the workers can do without them: as the handle of the shared memory they already
lie in (``transport/shared_rows.py``), or with only the rows its workers do not hold yet
(``stores/engine_rows.py``); per request, the wire that says which rides as an attribute of the
scheduler output, and the workers put the rows back (``v1_worker_gpu_worker``). The engine core
is the one sender, and every worker reads the broadcast in order, so one ``HeldRows`` per
executor describes every worker. The scheduler output is put back as it was once broadcast.

Shared rows' links (kept by the ``v1_engine_core`` patch while their request lives, since vLLM
may schedule a request as new again after a preemption) are removed once the step whose
scheduler output announces the request finished has come back: the workers read steps in
order, and the step that first carried the request had every rank map its rows before its
forward pass, which that later reply follows.

Why: a part's rows otherwise cross to every worker on every first schedule (pickled once per
worker past the broadcast queue's chunk). When it can go: see ``v1_engine_core_client``.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Final

from ..stores.engine_rows import attached, new_sender, outgoing, shared_outgoing, span_digests
from ..transport import shared_rows
from . import Patch, check

# The scheduler output's attribute holding {request id: wire} for the workers.
WIRES_ATTR: Final = "_vllm_chat_embeds_row_wires"
_PASSES_ON_ATTR: Final = "_vllm_chat_embeds_passes_rows_on"


def passes_rows_on(executor: Any) -> bool:
    """Whether ``executor`` hands rows to worker processes of this machine alone, the ones a
    shared-memory handle can reach (one node, one pipeline stage)."""
    if not getattr(type(executor), _PASSES_ON_ATTR, False):
        return False
    parallel = getattr(getattr(executor, "vllm_config", None), "parallel_config", None)
    nodes = getattr(parallel, "nnodes_within_dp", 1) or 1
    return nodes == 1 and getattr(parallel, "pipeline_parallel_size", 1) == 1


def kept_links(executor: Any) -> dict[str, str]:
    """Request id -> the shared rows' link the engine core keeps for this executor's workers."""
    return attached(executor, "kept links", dict)


def _retire_after(result: Any, names: list[str]) -> None:
    if not names:
        return
    if isinstance(result, Future):
        result.add_done_callback(lambda _: shared_rows.process_rows().retire(names))
    else:
        shared_rows.process_rows().retire(names)


def apply(patch: Patch) -> None:
    module = patch.home()
    check(
        patch,
        {"MultiprocExecutor.execute_model": ("self", "scheduler_output", "non_block")},
    )
    cls = module.MultiprocExecutor
    setattr(cls, _PASSES_ON_ATTR, True)
    original = cls.execute_model

    def execute_model(self: Any, scheduler_output: Any, non_block: bool = False) -> Any:
        links = kept_links(self)
        finished = getattr(scheduler_output, "finished_req_ids", None) or ()
        retiring = [links.pop(rid) for rid in finished if rid in links]
        new_reqs = getattr(scheduler_output, "scheduled_new_reqs", None) or ()
        wires: dict[str, Any] = {}
        restore: list[tuple[Any, Any]] = []
        if any(req.prompt_embeds is not None for req in new_reqs):
            held = attached(self, "workers", new_sender)
            for req in new_reqs:
                out = None
                if req.req_id in links:
                    out = shared_outgoing(req.prompt_embeds, passed_on=True)
                if out is None:
                    out = outgoing(held, req.prompt_embeds, span_digests(req.sampling_params))
                if out is not None:
                    restore.append((req, req.prompt_embeds))
                    req.prompt_embeds, wires[req.req_id] = out
        if wires:
            setattr(scheduler_output, WIRES_ATTR, wires)
        try:
            result = original(self, scheduler_output, non_block)
        finally:  # the broadcast is serialised by now
            if wires:
                delattr(scheduler_output, WIRES_ATTR)
            for req, rows in restore:
                req.prompt_embeds = rows
        _retire_after(result, retiring)
        return result

    cls.execute_model = execute_model

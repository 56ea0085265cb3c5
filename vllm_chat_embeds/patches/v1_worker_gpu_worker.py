"""Patch of ``vllm/v1/worker/gpu_worker.py``: put back the rows a scheduled request left behind.

What: ``Worker.execute_model`` (the CPU worker inherits it; both model runners sit below it)
first rebuilds the rows of each newly scheduled request that carries a wire, from the rows
sent and those this worker keeps (``stores/engine_rows.py``; the sender is the
``v1_executor_multiproc_executor`` patch), in the order the requests were scheduled. Why and
when it can go: see ``v1_engine_core_client``.
"""

from __future__ import annotations

from typing import Any

from ..stores.engine_rows import KeptRows, attached, span_digests
from . import Patch, check
from .v1_executor_multiproc_executor import WIRES_ATTR


def restore_rows(worker: Any, scheduler_output: Any) -> None:
    wires: dict[str, Any] | None = getattr(scheduler_output, WIRES_ATTR, None)
    if not wires:
        return
    kept = attached(worker, "engine core", KeptRows)
    for req in scheduler_output.scheduled_new_reqs:
        wire = wires.get(req.req_id)
        if wire is not None:
            spans = span_digests(req.sampling_params) or []
            req.prompt_embeds = kept.resolve(spans, wire, req.prompt_embeds, req.req_id)


def apply(patch: Patch) -> None:
    module = patch.home()
    check(patch, {"Worker.execute_model": ("self", "scheduler_output")})
    cls = module.Worker
    original = cls.execute_model

    def execute_model(self: Any, scheduler_output: Any) -> Any:
        restore_rows(self, scheduler_output)
        return original(self, scheduler_output)

    cls.execute_model = execute_model

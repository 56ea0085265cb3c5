"""Patch of ``vllm/v1/worker/gpu_worker.py``: put back the rows a scheduled request left behind.

What: ``Worker.execute_model`` (the CPU worker inherits it; both model runners sit below it)
first rebuilds the rows of each newly scheduled request that carries a wire (the sender is the
``v1_executor_multiproc_executor`` patch), in the order the requests were scheduled: mapped
from shared memory when they came as a handle (``transport/shared_rows.py``; the engine core
removes the link), else from the rows sent and those this worker keeps
(``stores/engine_rows.py``). Why and when it can go: see ``v1_engine_core_client``. Under
vLLM's ``--enable-shm-tensor-arena`` the rows arrive as views of the arena's slots, so rows to
keep are copied out of them.

Also: ``Worker`` gets ``model_rows.WORKER_METHOD``, so the API server can ask the served model
for its input rows of given token ids through ``collective_rpc`` (``model_rows.py``: rows for
a text, the embedding scale ``/v1/models`` reports). Why: vLLM has no call that returns what
``embed_input_ids`` gives. When it can go: when vLLM exposes one.
"""

from __future__ import annotations

from typing import Any

from ..model_rows import WORKER_METHOD, embed_on_worker
from ..stores.engine_rows import KeptRows, attached, incoming, span_digests
from . import Patch, check
from .v1_executor_multiproc_executor import WIRES_ATTR


def uses_tensor_arena(worker: Any) -> bool:
    """Whether vLLM's shared-memory arena may carry this worker's broadcast (rows received
    are then views of its slots)."""
    parallel = getattr(getattr(worker, "vllm_config", None), "parallel_config", None)
    return bool(getattr(parallel, "enable_shm_tensor_arena", False))


def restore_rows(worker: Any, scheduler_output: Any) -> None:
    wires: dict[str, Any] | None = getattr(scheduler_output, WIRES_ATTR, None)
    if not wires:
        return
    kept = attached(worker, "engine core", lambda: KeptRows(copy_kept=uses_tensor_arena(worker)))
    for req in scheduler_output.scheduled_new_reqs:
        wire = wires.get(req.req_id)
        if wire is not None:
            spans = span_digests(req.sampling_params) or []
            req.prompt_embeds = incoming(
                kept, spans, wire, req.prompt_embeds, req.req_id, keep_link=True
            )


def apply(patch: Patch) -> None:
    module = patch.home()
    check(patch, {"Worker.execute_model": ("self", "scheduler_output")})
    cls = module.Worker
    original = cls.execute_model

    def execute_model(self: Any, scheduler_output: Any) -> Any:
        restore_rows(self, scheduler_output)
        return original(self, scheduler_output)

    def embed_ids(self: Any, token_ids: list[int] | None) -> dict[str, Any]:
        return embed_on_worker(self, token_ids)

    cls.execute_model = execute_model
    setattr(cls, WORKER_METHOD, embed_ids)

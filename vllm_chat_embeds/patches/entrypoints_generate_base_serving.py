"""Patch of ``vllm/entrypoints/generate/base/serving.py``: no rejection notice for garbled
``kv_transfer_params``.

What: ``GenerateBaseServing._with_kv_transfer_rejection_cleanup`` tells the engine's KV
connector that a request asking for a remote prefill was refused, handing it the request's
``kv_transfer_params``, so it frees the prefill server's blocks. For params the NIXL connector
cannot read (``kv_transfer/transfer_params.py``: missing fields, block ids that are not lists
of integers), that notice itself killed the engine (``KeyError: 'remote_block_ids'``), after
the client already had its 400. Such requests now go without the notice: there is nothing a
connector could free from them. Why and when it can go: see ``v1_engine_input_processor``.
"""

from __future__ import annotations

from typing import Any

from ..kv_transfer.transfer_params import well_formed
from . import Patch, check


def apply(patch: Patch) -> None:
    module = patch.home()
    attribute = "GenerateBaseServing._with_kv_transfer_rejection_cleanup"
    check(patch, {attribute: ("self", "awaitable", "request", "raw_request")})
    cls = module.GenerateBaseServing
    original = cls._with_kv_transfer_rejection_cleanup

    async def _with_kv_transfer_rejection_cleanup(
        self: Any, awaitable: Any, request: Any, raw_request: Any
    ) -> Any:
        if not well_formed(getattr(request, "kv_transfer_params", None)):
            return await awaitable  # refused with a 400 naming the field; nothing to free
        return await original(self, awaitable, request, raw_request)

    cls._with_kv_transfer_rejection_cleanup = _with_kv_transfer_rejection_cleanup

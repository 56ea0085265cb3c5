"""Patch of ``vllm/v1/request.py``: key a compact request's rows, keep its mask as runs.

What: ``Request.__init__`` of a compact embeds prompt (rows only at the positions its mask
marks) first gives each part a content digest and each of its positions an id drawn from it
(``kv_transfer/row_keys.py``), in ``prompt_token_ids`` and in vLLM's own ``all_token_ids``,
then hashes the request's blocks (vLLM's hasher, run after the ids are in place). Afterwards the
request's ``prompt_is_token_ids`` is replaced by a ``RunMask``: two integers per embedding span
instead of a list entry per prompt position, kept for the request's life in the engine core and
handed to the workers. Why: KV connectors, KV-cache events and routers key KV by token ids,
and every request held the same id at its rows (a connector served one chat another chat's
KV); and the engine should hold a compact mask, not something as long as the chat. Requests
without embeddings, and vLLM's own full-length embeds prompts, are left as they are. When it can
go: when vLLM keys embedding positions by content everywhere it keys by ids, and stores the mask
compactly itself.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..kv_transfer import row_keys
from ..patches.v1_core_kv_cache_utils import SPAN_DIGESTS_KEY
from . import Patch, check

_INIT_PARAMETERS = (
    "self",
    "request_id",
    "prompt_token_ids",
    "sampling_params",
    "pooling_params",
    "client_index",
    "arrival_time",
    "prompt_embeds",
    "prompt_is_token_ids",
    "mm_features",
    "lora_request",
    "cache_salt",
    "priority",
    "trace_headers",
    "block_hasher",
    "resumable",
    "session_id",
    "reasoning_ended",
    "reasoning_parser_kwargs",
    "abort_immediately",
    "kv_hints",
)


def compact(arguments: dict[str, Any]) -> bool:
    """A prompt of token ids, a mask as long, and fewer rows (``row_keys.key_prompt`` checks
    that there is one per embedding position)."""
    ids, rows = arguments.get("prompt_token_ids"), arguments.get("prompt_embeds")
    mask = arguments.get("prompt_is_token_ids")
    if ids is None or rows is None or mask is None or len(mask) != len(ids):
        return False
    return len(rows) != len(mask)


def apply(patch: Patch) -> None:
    from vllm.v1 import request

    check(patch, {"Request.__init__": _INIT_PARAMETERS})
    cls = request.Request
    original = cls.__init__
    signature = inspect.signature(original)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        arguments = bound.arguments
        keyed = None
        if compact(arguments):
            params = arguments.get("sampling_params")
            keyed = row_keys.key_prompt(
                arguments["prompt_token_ids"],
                arguments["prompt_embeds"],
                arguments["prompt_is_token_ids"],
                (getattr(params, "extra_args", None) or {}).get(SPAN_DIGESTS_KEY),
            )
        if keyed is None:
            original(self, *args, **kwargs)
            return
        hasher = arguments.pop("block_hasher", None)  # hashed below, once the ids are in
        arguments["prompt_token_ids"] = keyed.ids
        original(*bound.args, **bound.kwargs)
        keyed.apply(self)
        self.prompt_is_token_ids = keyed.mask
        self._block_hasher = hasher
        self.update_block_hashes()

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]

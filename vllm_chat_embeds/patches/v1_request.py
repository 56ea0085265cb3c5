"""Patch of ``vllm/v1/request.py``: keep a compact request's mask as runs.

What: after ``Request.__init__`` (which reads the mask as a list once, to zero the ids at
embedding positions), the request's ``prompt_is_token_ids`` of a compact embeds prompt is
replaced by a ``RunMask``: two integers per embedding span instead of a list entry per prompt
position, kept for the request's life in the engine core and handed to the workers. Why: the
engine should hold, per request, the embedding rows and a compact mask, not something as long
as the chat. Requests without embeddings, and vLLM's own full-length embeds prompts, are left
as they are. When it can go: when vLLM stores the mask compactly itself.
"""

from __future__ import annotations

from typing import Any

from ..position_mask import RunMask
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


def apply(patch: Patch) -> None:
    from vllm.v1 import request

    check(patch, {"Request.__init__": _INIT_PARAMETERS})
    cls = request.Request
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        mask = self.prompt_is_token_ids
        rows = self.prompt_embeds
        if isinstance(mask, list) and rows is not None and len(rows) != len(mask):
            self.prompt_is_token_ids = RunMask.from_mask(mask)

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]

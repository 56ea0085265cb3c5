"""Patch of ``vllm/entrypoints/scale_out/token_in_token_out/serving.py``: generate serves the
rows a ``GenerateRequest`` carries.

What: ``ServingTokens.serve_tokens`` (``/inference/v1/generate``) checks the ``prompt_embeds``
items of a request's ``features`` (``entrypoints/scale_out_rows.py``: payload checks, ranges,
recomputed hashes; a 400 naming the field otherwise). A request whose only items are rows is
then served as our embeds engine input: ``serve_tokens`` builds its engine input from
``features`` with the module's ``mm_input``, which hands over the input built for that request
(a context variable, set only around that call). Why: a text-only model's runner never reads
multimodal items, so the rows would be ignored and the prompt served as token ids alone; and
``serve_tokens`` has no hook between its request and its engine input. Rows beside images stay
vLLM's multimodal items. When it can go: when vLLM serves ``prompt_embeds`` items on any model.
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError

from ..entrypoints import scale_out_rows
from . import Patch, check


def apply(patch: Patch) -> None:
    module = patch.home()
    check(
        patch,
        {
            "ServingTokens.serve_tokens": ("self", "request", "raw_request"),
            "mm_input": (
                "prompt_token_ids",
                "mm_kwargs",
                "mm_hashes",
                "mm_placeholders",
                "prompt",
                "cache_salt",
            ),
        },
    )
    cls = module.ServingTokens
    original = cls.serve_tokens
    original_mm_input = module.mm_input

    async def serve_tokens(self: Any, request: Any, raw_request: Any = None) -> Any:
        try:
            engine_input = scale_out_rows.carried_input(self, request)
        except VLLMValidationError as exc:
            return self.create_error_response(exc)
        if engine_input is None:
            return await original(self, request, raw_request)
        request.features = scale_out_rows.without_payload(request.features)
        token = scale_out_rows.CARRIED.set(engine_input)
        try:
            return await original(self, request, raw_request)
        finally:
            scale_out_rows.CARRIED.reset(token)

    def mm_input(*args: Any, **kwargs: Any) -> Any:
        carried = scale_out_rows.CARRIED.get()
        return carried if carried is not None else original_mm_input(*args, **kwargs)

    cls.serve_tokens = serve_tokens
    module.mm_input = mm_input

"""Patch of ``vllm/entrypoints/scale_out/token_in_token_out/serving.py``: generate refuses
rows it cannot serve.

What: ``ServingTokens.serve_tokens`` (``/inference/v1/generate``) answers a 400 for a
``GenerateRequest`` whose ``features`` claim ``prompt_embeds`` items. Why: on a text-only model
vLLM's runner never reads multimodal items, so those rows would be ignored and the prompt
served as token ids alone. When it can go: when such items are served.
"""

from __future__ import annotations

from typing import Any

from ..entrypoints import scale_out_rows
from . import Patch, check


def apply(patch: Patch) -> None:
    module = patch.home()
    check(patch, {"ServingTokens.serve_tokens": ("self", "request", "raw_request")})
    cls = module.ServingTokens
    original = cls.serve_tokens

    async def serve_tokens(self: Any, request: Any, raw_request: Any = None) -> Any:
        error = scale_out_rows.refuse_features(request)
        if error is not None:
            return self.create_error_response(error)
        return await original(self, request, raw_request)

    cls.serve_tokens = serve_tokens

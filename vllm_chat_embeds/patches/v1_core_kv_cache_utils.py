"""Patch of ``vllm/v1/core/kv_cache_utils.py``: block hashes of compact embeds prompts.

What: ``_gen_prompt_embeds_extra_hash_keys`` maps a block's positions to the embedding rows
they hold. A block with no embedding position gets no extra key, so it hashes like the same
text; a block with some hashes their rows together with its slice of the mask, so the same
embeddings hit, other embeddings miss, and a zero row is never confused with token 0.
Prompts with one row per position (vLLM's own embeds prompts) keep vLLM's hashing. Why: vLLM
slices the embeddings by absolute position, which only works for full-length tensors. When it
can go: with the ``vllm_utils`` patch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from . import Patch, check

_ROW_INDEX = "_vllm_chat_embeds_row_index"


def row_index(mask: Any) -> np.ndarray:
    """For each prompt position, the row holding its embedding, or -1 for a token."""
    is_token = np.asarray(mask, dtype=bool)
    index = np.cumsum(~is_token) - 1
    index[is_token] = -1
    return index


def block_digest(rows: torch.Tensor, index: np.ndarray, start: int, end: int) -> bytes | None:
    window = index[start:end]
    used = window[window >= 0]
    if used.size == 0:
        return None
    block_rows = rows[int(used[0]) : int(used[-1]) + 1].contiguous()
    digest = hashlib.sha256((window >= 0).tobytes())
    digest.update(block_rows.view(torch.uint8).numpy().tobytes())
    return digest.digest()


def apply(patch: Patch) -> None:
    from vllm.v1.core import kv_cache_utils

    check(
        patch,
        {
            "_gen_prompt_embeds_extra_hash_keys": (
                "request",
                "start_token_idx",
                "end_token_idx",
            )
        },
    )
    original = kv_cache_utils._gen_prompt_embeds_extra_hash_keys

    def _gen_prompt_embeds_extra_hash_keys(
        request: Any, start_token_idx: int, end_token_idx: int
    ) -> list[tuple[str, bytes]]:
        rows = request.prompt_embeds
        mask = request.prompt_is_token_ids
        if rows is None or mask is None or len(rows) == len(mask):
            return original(request, start_token_idx, end_token_idx)
        cache = request._prompt_embeds_per_block_hashes
        key = (start_token_idx, end_token_idx)
        if key not in cache:
            index = getattr(request, _ROW_INDEX, None)
            if index is None:
                index = row_index(mask)
                setattr(request, _ROW_INDEX, index)
            cache[key] = block_digest(rows, index, start_token_idx, end_token_idx)
        digest = cache[key]
        return [] if digest is None else [("prompt_embeds", digest)]

    kv_cache_utils._gen_prompt_embeds_extra_hash_keys = _gen_prompt_embeds_extra_hash_keys

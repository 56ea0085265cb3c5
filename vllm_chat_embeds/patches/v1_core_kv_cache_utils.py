"""Patch of ``vllm/v1/core/kv_cache_utils.py``: block hashes of compact embeds prompts.

What: ``_gen_prompt_embeds_extra_hash_keys`` maps a block's positions to the embedding rows
they hold. A block with no embedding position gets no extra key, so it hashes like the same
text; a block with some hashes them with its slice of the mask, so the same embeddings hit,
other embeddings miss, and a zero row is never confused with token 0. Prompts with one row per
position (vLLM's own embeds prompts) keep vLLM's hashing. Why: vLLM slices the embeddings by
absolute position, which only works for full-length tensors. When it can go: with the
``vllm_utils`` patch.

Each part of the request carries the digest of its rows (``kv_transfer/row_keys.py``, set
when the engine's request is built; rows kept by uuid bring the digest computed once in the
frontend, ``SPAN_DIGESTS_KEY``, which only the server sets). A block hashes the digests of the
parts it overlaps and their row ranges instead of the rows, so rows are hashed once per
request, and a part sent inline and the same rows sent by uuid get the same keys. The keys come
from the content (never from a uuid), in a domain of their own (``_SPANS``). A request without
a part table (none is built outside the engine core) hashes each block's rows.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from ..kv_transfer.row_keys import PART_TABLE_ATTR
from . import Patch, check

_ROW_INDEX = "_vllm_chat_embeds_row_index"
# The request's row spans, in row order, as [[rows, content digest hex or None], ...]
# (row_digest.py).
SPAN_DIGESTS_KEY = "_vllm_chat_embeds_span_digests"
_SPANS = b"vllm_chat_embeds.spans\0"


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
    # Rows keep their payload's dtype (float16 and bfloat16 bytes look alike): it is keyed too.
    digest.update(str(rows.dtype).encode())
    digest.update(block_rows.view(torch.uint8).numpy().tobytes())
    return digest.digest()


def spans_block_digest(
    rows: torch.Tensor,
    spans: list[tuple[int, int, bytes | None]],
    index: np.ndarray,
    start: int,
    end: int,
) -> bytes | None:
    """``block_digest`` for rows given as spans ``(first row, rows, digest or None)``: a span
    with a digest stands for its rows by that digest and the rows' range inside it."""
    window = index[start:end]
    used = window[window >= 0]
    if used.size == 0:
        return None
    first, last = int(used[0]), int(used[-1]) + 1
    digest = hashlib.sha256(_SPANS)
    digest.update((window >= 0).tobytes())
    digest.update(str(rows.dtype).encode())
    for span_first, count, span_digest in spans:
        lo, hi = max(first, span_first), min(last, span_first + count)
        if lo >= hi:
            continue
        digest.update(np.array([lo - span_first, hi - span_first], dtype="<i8").tobytes())
        if span_digest is None:
            digest.update(b"r" + rows[lo:hi].contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(b"d" + span_digest)
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
            spans = getattr(request, PART_TABLE_ATTR, None)
            if spans is None:
                cache[key] = block_digest(rows, index, start_token_idx, end_token_idx)
            else:
                cache[key] = spans_block_digest(rows, spans, index, start_token_idx, end_token_idx)
        digest = cache[key]
        return [] if digest is None else [("prompt_embeds", digest)]

    kv_cache_utils._gen_prompt_embeds_extra_hash_keys = _gen_prompt_embeds_extra_hash_keys

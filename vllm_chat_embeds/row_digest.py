"""The content digest of embedding rows: what every key of a part's KV is derived from (maps
to ``vllm/multimodal/hasher.py``, which keys images by their content the same way).

Why one function: rows kept by uuid, rows sent inline (hashed in the engine core), rows in the
shared store and rows across the scale-out split must all key alike, or one part sent two ways
would miss its own cache entries.
"""

from __future__ import annotations

import hashlib

import torch


def rows_digest(rows: torch.Tensor) -> str:
    """The SHA-256 of rows' dtype, shape and bytes (computed every call)."""
    digest = hashlib.sha256(f"{rows.dtype}:{tuple(rows.shape)}:".encode())
    digest.update(rows.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()

"""The content digest of embedding rows: what every key of a part's KV is derived from (maps
to ``vllm/multimodal/hasher.py``, which keys images by their content the same way).

Why one function: rows kept by uuid, rows sent inline (hashed in the engine core), rows in the
shared store and rows across the scale-out split must all key alike, or one part sent two ways
would miss its own cache entries.

Why BLAKE3 by default: it is what vLLM's multimodal hasher keys every image by unless told
otherwise, a cryptographic hash (a client cannot forge rows that take another part's cache
entries), and about four times faster than SHA-256 here (16 MiB of rows: 2.2 ms against
8.7 ms with SHA-NI), which is most of an upload's cost in the API server beyond reading it.
``CHAT_EMBEDS_ROW_DIGEST=sha256`` is for deployments that must use FIPS-approved hashes (as
vLLM's ``--mm-hasher-algorithm sha256``). Every process and replica of a deployment must use
the same one: the shared store refuses values written with another.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Any

import torch
from blake3 import blake3

from .limits import Limits

_FACTORIES: dict[str, Callable[[], Any]] = {"blake3": blake3, "sha256": hashlib.sha256}


@functools.cache
def digest_name() -> str:
    """The digest this process keys rows by (``CHAT_EMBEDS_ROW_DIGEST``, read once)."""
    return Limits.from_env().row_digest


def rows_digest(rows: torch.Tensor) -> str:
    """The hex digest of rows' dtype, shape and bytes (computed every call; 64 characters with
    either digest)."""
    digest = _FACTORIES[digest_name()]()
    digest.update(f"{rows.dtype}:{tuple(rows.shape)}:".encode())
    digest.update(rows.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()

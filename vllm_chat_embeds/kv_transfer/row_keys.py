"""Content keys for a request's embedding rows, for everything that keys KV by the prompt.

Maps to ``vllm/v1/request.py`` (applied by ``patches/v1_request.py``) and is read by
``patches/v1_core_kv_cache_utils.py``.

Why: vLLM's block hashes key a block over rows by the rows' digest, but much of vLLM's
KV-transfer layer keys by token ids instead: KV connectors that store KV by the prompt's ids
(``ExampleConnector``, ``HF3FSKVConnector``, ...), the ``token_ids`` of KV-cache events that
KV-aware routers read, P/D proxies that compare prompts. At embedding positions every request
held the same id, so one chat's rows were served another chat's KV. Here, in the engine core,
each part gets the digest of its rows (``row_digest.rows_digest``: the digest rows kept by uuid
already carry, so a part sent inline and by uuid keys alike), and each of its positions an id
drawn from that digest. Equal rows give equal ids on every server; different rows differ in
every position with probability ``1 - 1/vocab``, so a part of ``n`` rows collides with another
with probability ``vocab ** -n``. The ids stay inside the vocabulary (anything that indexes the
vocabulary with prompt ids stays in bounds); the model never embeds them (its inputs there are
the rows).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch

from ..position_mask import RunMask
from ..row_digest import rows_digest

# The request's parts as ``[(first row, rows, digest), ...]``, set on the engine's
# ``Request`` (``patches/v1_request.py``), read by the block hasher (``v1_core_kv_cache_utils``).
PART_TABLE_ATTR: Final = "_vllm_chat_embeds_part_table"
_ID_DOMAIN: Final = b"vllm_chat_embeds.row_ids\0"

_vocab_size: int | None = None

Part = tuple[int, int, bytes]


def note_vocab_size(size: int) -> None:
    """The model's vocabulary size in this engine core (ids are drawn below it)."""
    global _vocab_size
    _vocab_size = int(size)


def vocab_size() -> int | None:
    return _vocab_size


def content_ids(digest: bytes, count: int, vocab: int) -> np.ndarray:
    """``count`` ids in ``[0, vocab)`` drawn from a part's digest (SHAKE-256 as a stream)."""
    stream = hashlib.shake_256(_ID_DOMAIN + digest).digest(8 * count)
    return np.frombuffer(stream, dtype="<u8") % np.uint64(vocab)


@dataclass
class KeyedPrompt:
    """A compact embeds prompt's parts with their digests, and its ids with content ids."""

    parts: list[Part]
    positions: np.ndarray  # the prompt position of each row, in row order
    ids: list[int]
    mask: RunMask
    drawn: bool  # whether ``ids`` hold content ids (the vocabulary size was known)

    def apply(self, request: Any) -> None:
        """Put the content ids into the request's own copy of its ids (vLLM zeroed them there)
        and the part table beside it."""
        if self.drawn:
            all_ids = request._all_token_ids
            for position in self.positions.tolist():
                all_ids[position] = self.ids[position]
        setattr(request, PART_TABLE_ATTR, self.parts)


def part_counts(given: Sequence[Sequence[Any]] | None, mask: RunMask, rows: int) -> list[Any]:
    """The parts as ``[(rows, hex digest or None), ...]``: as the frontend sent them (one per
    part; digests for rows kept by uuid), else one per run of embedding positions."""
    if given and sum(int(count) for count, _ in given) == rows:
        return [(int(count), digest) for count, digest in given]
    return [(stop - start, None) for start, stop in mask.spans]


def key_prompt(
    token_ids: list[int], rows: torch.Tensor, mask: Sequence[bool], given: Any
) -> KeyedPrompt | None:
    """Digest each part of a compact embeds prompt and draw its positions' ids; None if the
    rows are not one per embedding position of the mask (not a compact prompt)."""
    runs = mask if isinstance(mask, RunMask) else RunMask.from_mask(mask)
    positions = np.concatenate(
        [np.arange(start, stop) for start, stop in runs.spans] or [np.zeros(0, np.int64)]
    )
    if positions.size != int(rows.shape[0]):
        return None
    ids = list(token_ids)
    vocab = _vocab_size
    parts: list[Part] = []
    first = 0
    for count, hexdigest in part_counts(given, runs, int(rows.shape[0])):
        if hexdigest is None:
            digest = bytes.fromhex(rows_digest(rows[first : first + count]))
        else:
            digest = bytes.fromhex(hexdigest)
        parts.append((first, count, digest))
        if vocab:
            for position, token in zip(
                positions[first : first + count].tolist(),
                content_ids(digest, count, vocab).tolist(),
                strict=True,
            ):
                ids[position] = int(token)
        first += count
    return KeyedPrompt(parts, positions, ids, runs, drawn=bool(vocab))

"""Turn rendered markers into placeholder spans and build the engine's embeds input.

Extends the span logic of ``vllm/renderers/hf.py``. Why markers rather than matching
placeholders in parse order: a template may drop, reorder or repeat message content. Each
marker names its part, so wherever the template put it, the rows that land there are that
part's rows; a dropped part is detected instead of shifting the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Final, cast

import numpy as np
import torch
from vllm.config.multimodal import MMHasherAlgorithm
from vllm.inputs.engine import EmbedsInput, MultiModalInput, embeds_input
from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import (
    MultiModalFieldElem,
    MultiModalKwargsItem,
    MultiModalSharedField,
    PlaceholderRange,
)

from .. import errors
from ..errors import reject
from ..limits import DroppedPolicy
from ..log import logger
from ..patches.entrypoints_serve_tokenize_serving import note_embeds_rows
from ..patches.v1_core_kv_cache_utils import SPAN_DIGESTS_KEY
from ..placeholder import PLACEHOLDER_TOKEN
from ..stores.references import content_hash, kept_rows_digest
from ..transport import shared_rows
from .parts import MARKER_CLOSE, EmbedsPlan

EMBED_ROW_TOKEN_ID: Final = 0
# vLLM's passthrough modality for ready embedding rows, and the key its runners read them from.
EMBEDS_MODALITY: Final = "prompt_embeds"
EMBEDS_ITEM_KEY: Final = "embedding"


def expand_markers(
    text: str, plan: EmbedsPlan, dropped: DroppedPolicy
) -> tuple[str, list[torch.Tensor]]:
    """Replace each rendered marker by one placeholder per row of its part.

    Returns the new text and the part tensors in the order their spans appear in it.
    """
    by_marker = {part.marker: part for part in plan.parts}
    prefix = plan.marker_prefix  # found with str.find: no pattern compiled per request
    pieces: list[str] = []
    spans: list[torch.Tensor] = []
    seen: set[str] = set()
    last = 0
    start = text.find(prefix)
    while start != -1:
        end = text.find(MARKER_CLOSE, start + len(prefix))
        part = by_marker.get(text[start : end + len(MARKER_CLOSE)]) if end != -1 else None
        if part is None:  # not a whole marker: left in place, refused below
            start = text.find(prefix, start + 1)
            continue
        seen.add(part.marker)
        pieces.append(text[last:start])
        pieces.append(PLACEHOLDER_TOKEN * int(part.tensor.shape[0]))
        spans.append(part.tensor)
        last = end + len(MARKER_CLOSE)
        start = text.find(prefix, last)
    pieces.append(text[last:])
    expanded = "".join(pieces)
    if plan.nonce in expanded.lower():  # token_hex nonces are lower case; catch re-cased ones
        # A marker survived only partly (the template sliced, escaped or re-cased it).
        reject(errors.MARKER_MANGLED)
    apply_dropped_policy(plan, seen, dropped)
    return expanded, spans


def apply_dropped_policy(plan: EmbedsPlan, seen: set[str], dropped: DroppedPolicy) -> None:
    """Parts whose marker the rendering left out: a 400, or (policy ``warn``) a warning."""
    for part in plan.parts:
        if part.marker in seen:
            continue
        if dropped == "error":
            reject(errors.PART_DROPPED, where=part.where)
        logger.warning("chat rendering dropped %s (a prompt_embeds part); ignoring it", part.where)


def locate_spans(
    ids: np.ndarray, spans: Sequence[torch.Tensor], placeholder_id: int
) -> tuple[np.ndarray, list[int]]:
    """The placeholder positions in ``ids`` (vectorised) and the first position of each span.

    A 400 unless the placeholders form exactly one whole run per part, in order.
    """
    positions = np.flatnonzero(ids == placeholder_id)
    lengths = np.fromiter((int(t.shape[0]) for t in spans), dtype=np.int64, count=len(spans))
    expected = int(lengths.sum())
    if positions.size != expected or not spans:
        reject(errors.SPANS_CUT, found=int(positions.size), expected=expected)
    # Positions ascend, so a span is contiguous iff its last and first positions differ by its
    # length minus one.
    starts = np.cumsum(lengths) - lengths
    ends = starts + lengths - 1
    if not bool(np.all(positions[ends] - positions[starts] == lengths - 1)):
        reject(errors.SPANS_CUT, found=int(positions.size), expected=expected)
    return positions, positions[starts].tolist()


def _embedding_positions(
    token_ids: Sequence[int], spans: Sequence[torch.Tensor], placeholder_id: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The prompt's ids with embedding positions set to ``EMBED_ROW_TOKEN_ID``, its
    ``is_token_ids`` mask and each span's first position; the /tokenize listener is told."""
    ids = np.array(token_ids, dtype=np.int64)  # a copy: the caller's ids stay as they were
    positions, starts = locate_spans(ids, spans, placeholder_id)
    is_token = np.ones(len(ids), dtype=bool)
    is_token[positions] = False
    # Embedding rows carry token id 0, the id vLLM's engine itself substitutes there: the
    # placeholder id may lie past the model's vocabulary, and anything that indexes the
    # vocabulary with prompt ids (prompt logprobs) would fail on it.
    ids[positions] = EMBED_ROW_TOKEN_ID
    note_embeds_rows(torch.from_numpy(is_token))
    return ids, is_token, starts


def join_rows(spans: Sequence[torch.Tensor]) -> torch.Tensor:
    """The spans' rows as one tensor, in shared memory when they are big enough to cross
    processes as a handle (``transport/shared_rows.py``): a lone span already there is used
    as it is; others are joined (or copied) into a new segment, else in process memory."""
    if len(spans) == 1 and shared_rows.is_shared(spans[0]):
        return spans[0]
    shape = (sum(int(s.shape[0]) for s in spans), int(spans[0].shape[1]))
    out = shared_rows.empty(shape, spans[0].dtype)
    if out is None:
        return spans[0] if len(spans) == 1 else torch.cat(list(spans))
    return torch.cat(list(spans), out=out)


def build_embeds_input(
    token_ids: Sequence[int],
    spans: Sequence[torch.Tensor],
    placeholder_id: int,
    *,
    cache_salt: str | None = None,
    compact: bool = True,
) -> EmbedsInput:
    """Locate the placeholder spans (vectorised) and build vLLM's embeds engine input.

    Compact (the default): ``prompt_embeds`` holds only the embedding rows, in position order,
    beside full-length token ids and the ``is_token_ids`` mask; the patches listed in
    ``patches/__init__.py`` teach vLLM's engine that layout. Dense: one row per position,
    zeros at token positions, as vLLM's built-in sends.
    """
    ids, is_token, _ = _embedding_positions(token_ids, spans, placeholder_id)
    rows = join_rows(spans)
    if compact:
        prompt_embeds = rows
    else:
        prompt_embeds = rows.new_zeros((len(ids), rows.shape[1]))
        prompt_embeds[torch.from_numpy(~is_token)] = rows
    engine_input = embeds_input(
        prompt_embeds=prompt_embeds,
        prompt_token_ids=ids.tolist(),
        is_token_ids=is_token.tolist(),
        cache_salt=cache_salt,
    )
    digests = [kept_rows_digest(span) for span in spans] if compact else []
    if any(d is not None for d in digests):
        # Rows kept by uuid: the engine keys their blocks by these (v1_core_kv_cache_utils).
        spans_info = [[int(s.shape[0]), d] for s, d in zip(spans, digests, strict=True)]
        cast(dict, engine_input)[SPAN_DIGESTS_KEY] = spans_info
    return engine_input


def rows_mm_hash(hasher: MMHasherAlgorithm, rows: torch.Tensor) -> str:
    """vLLM's multimodal hash of rows as a ``prompt_embeds`` item (computed every call)."""
    return MultiModalHasher.hash_kwargs(hasher, **{EMBEDS_MODALITY: rows})


def rows_item(rows: torch.Tensor) -> MultiModalKwargsItem:
    """One ``prompt_embeds`` passthrough item holding ``rows``, as vLLM's runners read it."""
    field = MultiModalSharedField(batch_size=1)
    return MultiModalKwargsItem({EMBEDS_ITEM_KEY: MultiModalFieldElem(rows, field)})


def add_embeds_items(
    engine_input: MultiModalInput,
    spans: Sequence[torch.Tensor],
    placeholder_id: int,
    *,
    hasher: MMHasherAlgorithm,
) -> MultiModalInput:
    """Attach the parts to a multimodal engine input (images) as rows-only passthrough items.

    Why this way: vLLM's engine input is either multimodal or embeds, never both, and its
    multimodal path already splices a ready tensor at a placeholder range without running an
    encoder (modality ``prompt_embeds``; the V1 and V2 runners both know it). Each part becomes
    one item holding only its rows, so this path is compact by construction. The spans are
    located after the image processor ran, since it expands each image token in place.
    """
    ids, _, starts = _embedding_positions(engine_input["prompt_token_ids"], spans, placeholder_id)
    engine_input["prompt_token_ids"] = ids.tolist()
    items = [_item(rows, start, hasher) for rows, start in zip(spans, starts, strict=True)]
    _set_items(engine_input, items)
    return engine_input


_Item = tuple[MultiModalKwargsItem, str, PlaceholderRange]


def _item(rows: torch.Tensor, start: int, hasher: MMHasherAlgorithm) -> _Item:
    item = rows_item(rows)
    # The encoder cache and prefix caching key on this: same rows, same key. Rows kept by
    # uuid keep their hash beside them, so a reference is not hashed again.
    row_hash = content_hash(rows, f"mm:{hasher}", partial(rows_mm_hash, hasher))
    return item, row_hash, PlaceholderRange(offset=start, length=int(rows.shape[0]))


def _set_items(engine_input: MultiModalInput, items: Sequence[_Item]) -> None:
    """Make ``items`` the engine input's prompt_embeds items (none: no such modality)."""
    kwargs = cast(dict, engine_input["mm_kwargs"])
    hashes = {**engine_input["mm_hashes"]}
    placeholders = cast(dict, engine_input["mm_placeholders"])
    if items:
        kwargs[EMBEDS_MODALITY] = [item for item, _, _ in items]
        hashes[EMBEDS_MODALITY] = [h for _, h, _ in items]
        placeholders[EMBEDS_MODALITY] = [r for _, _, r in items]
    else:
        for table in (kwargs, hashes, placeholders):
            table.pop(EMBEDS_MODALITY, None)
    engine_input["mm_hashes"] = hashes


def cut_embeds_items(
    engine_input: MultiModalInput,
    ranges: Sequence[PlaceholderRange],
    start: int,
    stop: int,
    *,
    hasher: MMHasherAlgorithm,
) -> None:
    """After vLLM cut an expanded multimodal prompt to positions ``[start, stop)``: each part
    item keeps the rows inside that window, at its new offsets (``ranges``: the items' ranges
    before the cut; the ids are already cut).

    Why not vLLM's rule for multimodal items (refuse any it would cut): a part's rows are
    token positions, cut as the same text would be; an image is refused by vLLM as before.
    """
    items = cast(dict, engine_input["mm_kwargs"]).get(EMBEDS_MODALITY, [])
    kept: list[_Item] = []
    for item, row_hash, where in zip(
        items, engine_input["mm_hashes"].get(EMBEDS_MODALITY, []), ranges, strict=True
    ):
        lo, hi = max(where.offset, start), min(where.offset + where.length, stop)
        if lo >= hi:
            continue  # cut away
        if hi - lo == where.length:
            kept.append((item, row_hash, PlaceholderRange(offset=lo - start, length=hi - lo)))
            continue
        rows = cast(torch.Tensor, item[EMBEDS_ITEM_KEY].data)
        kept.append(_item(rows[lo - where.offset : hi - where.offset], lo - start, hasher))
    _set_items(engine_input, kept)

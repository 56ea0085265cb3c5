"""prompt_embeds rows across vLLM's scale-out split (extends ``vllm/entrypoints/scale_out/``).

vLLM can render on GPU-less servers (``vllm launch render``, ``/v1/chat/completions/render``)
and generate on token engines (``vllm serve --tokens-only``, ``/inference/v1/generate``). The
``GenerateRequest`` between them holds token ids and multimodal ``features`` (per modality:
item hashes, placeholder ranges, serialised ``MultiModalKwargsItem`` s).

Why rows travel as ``features``: vLLM already has a passthrough modality for ready rows,
``prompt_embeds`` (one item = one tensor under ``embedding``, spliced at its placeholder
range), which is exactly one span of a chat's rows. So each span of rows becomes one such item
and a router between the two fleets forwards the request unchanged; only the rows travel,
never a tensor as long as the prompt. The token ids hold ``0`` at the rows, as our engine
inputs do everywhere.

On the token engine the items are checked as a part's payload is (shape, dtype, finite values,
every limit), against their ranges and against their hashes (recomputed, so a forged hash can
never key other rows' cache entries), and become our embeds engine input: a text-only model's
runner never reads multimodal items, so they must not stay items there. Beside images (a
vision-language model) they stay vLLM's multimodal items, after the same checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any, Final

import numpy as np
import torch
from vllm.entrypoints.scale_out.token_in_token_out.mm_serde import (
    decode_mm_kwargs_item,
    encode_mm_kwargs_item,
)
from vllm.entrypoints.scale_out.token_in_token_out.protocol import (
    MultiModalFeatures,
    PlaceholderRangeInfo,
)

from .. import errors
from ..errors import reject
from ..payload import validate_tensor
from ..renderers.splice import (
    EMBEDS_ITEM_KEY,
    EMBEDS_MODALITY,
    build_embeds_input,
    rows_item,
    rows_mm_hash,
)
from ..row_digest import rows_digest

# Stands at the rows in the ids handed to ``build_embeds_input``: no token id is negative.
_ROW_MARK: Final = -1
# The embeds input built for the request being served, handed to ``mm_input`` (patched).
CARRIED: ContextVar[Any] = ContextVar("vllm_chat_embeds_carried_input", default=None)


def _embedding_runs(mask: Sequence[bool]) -> list[tuple[int, int]]:
    """``(offset, length)`` of each run of embedding positions (``False`` in the mask)."""
    rows = np.concatenate(([False], ~np.asarray(mask, dtype=bool), [False])).astype(np.int8)
    edges = np.diff(rows)
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


# -- render side -----------------------------------------------------------------------------


def features_of_embeds(engine_input: Any, mm_payload: str) -> MultiModalFeatures:
    """The ``features`` of a rendered embeds input: one ``prompt_embeds`` item per span."""
    ids = engine_input["prompt_token_ids"]
    mask = engine_input.get("is_token_ids")
    if mask is None:
        mask = [False] * len(ids)
    runs = _embedding_runs(mask)
    if mm_payload != "tensors":
        # Nothing else can bring rows to the engine (vLLM's EC connector moves encoder
        # outputs, not these), so metadata-only features would lose them.
        rows = sum(length for _, length in runs)
        reject(errors.SCALE_OUT_NO_PAYLOAD, parameter="mm_payload", rows=rows, got=mm_payload)
    embeds: torch.Tensor = engine_input["prompt_embeds"]
    rows_in_order = embeds[~torch.tensor(mask)] if embeds.shape[0] == len(ids) else embeds
    hashes: list[str] = []
    items: list[str | None] = []
    ranges: list[PlaceholderRangeInfo] = []
    start = 0
    for offset, length in runs:
        rows = rows_in_order[start : start + length]
        start += length
        hashes.append(rows_digest(rows))
        items.append(encode_mm_kwargs_item(rows_item(rows.contiguous())))
        ranges.append(PlaceholderRangeInfo(offset=offset, length=length))
    return MultiModalFeatures(
        mm_hashes={EMBEDS_MODALITY: hashes},
        mm_placeholders={EMBEDS_MODALITY: ranges},
        kwargs_data={EMBEDS_MODALITY: items},
    )


# -- generate side ---------------------------------------------------------------------------


def _decoded_rows(data: object, where: str) -> torch.Tensor:
    """The tensor of one serialised ``prompt_embeds`` item, or a 400 naming it."""
    if data is None:
        reject(errors.SCALE_OUT_ROWS_MISSING, parameter="features", where=where)
    try:
        item = decode_mm_kwargs_item(str(data))
        keys = set(item)
        tensor = item[EMBEDS_ITEM_KEY].data if keys == {EMBEDS_ITEM_KEY} else None
    except Exception as exc:  # msgpack, base64 and vLLM's decoders raise many types
        reject(errors.SCALE_OUT_ROWS_MALFORMED, parameter="features", where=where, reason=exc)
    if not isinstance(tensor, torch.Tensor):
        got = sorted(keys) if keys != {EMBEDS_ITEM_KEY} else type(tensor).__name__
        reject(errors.SCALE_OUT_ROWS_MALFORMED, parameter="features", where=where, reason=got)
    return tensor


def carried_spans(serving: Any, request: Any) -> list[tuple[int, torch.Tensor]] | None:
    """The checked ``(offset, rows)`` of each ``prompt_embeds`` item a request carries,
    in position order; None when it carries none."""
    features = request.features
    if features is None or EMBEDS_MODALITY not in features.mm_hashes:
        return None
    spec = getattr(serving.online_renderer.renderer, "payload_spec", None)
    if spec is None or not serving.model_config.enable_prompt_embeds:
        reject(errors.SCALE_OUT_NOT_ENABLED, parameter="features")
    hashes = features.mm_hashes[EMBEDS_MODALITY]
    ranges = features.mm_placeholders[EMBEDS_MODALITY]
    data = (features.kwargs_data or {}).get(EMBEDS_MODALITY) or [None] * len(hashes)
    if not len(hashes) == len(ranges) == len(data):
        reject(
            errors.SCALE_OUT_ITEMS_UNEVEN,
            parameter="features",
            hashes=len(hashes),
            ranges=len(ranges),
            items=len(data),
        )
    mixed = set(features.mm_hashes) != {EMBEDS_MODALITY}
    hasher = serving.model_config.get_multimodal_config().mm_hasher_algorithm if mixed else None
    n_ids = len(request.token_ids)
    rows_left = spec.rows_limit
    spans: list[tuple[int, torch.Tensor]] = []
    for i, (digest, place, item) in enumerate(zip(hashes, ranges, data, strict=True)):
        where = f"features.kwargs_data.prompt_embeds[{i}]"
        tensor = _decoded_rows(item, where)
        rows = validate_tensor(tensor, where, dataclasses.replace(spec, max_rows=rows_left))
        rows_left -= int(rows.shape[0])
        sent = tensor.detach().cpu().contiguous()  # hashed as /render hashed it: before any cast
        if digest != (rows_mm_hash(hasher, sent) if hasher is not None else rows_digest(sent)):
            reject(
                errors.SCALE_OUT_HASH_MISMATCH,
                parameter="features",
                where=f"features.mm_hashes.prompt_embeds[{i}]",
            )
        if place.length != rows.shape[0] or place.offset < 0 or place.offset + place.length > n_ids:
            where = f"features.mm_placeholders.prompt_embeds[{i}]"
            reject(
                errors.SCALE_OUT_RANGE_BAD,
                parameter="features",
                where=where,
                offset=place.offset,
                length=place.length,
                rows=int(rows.shape[0]),
                ids=n_ids,
            )
        if hasher is not None and rows.dtype != tensor.dtype:  # vLLM's runner takes them as sent
            reject(
                errors.SCALE_OUT_DTYPE,
                parameter="features",
                where=where,
                got=str(tensor.dtype),
                dtype=str(rows.dtype),
            )
        spans.append((int(place.offset), rows))
    spans.sort(key=lambda span: span[0])
    for (offset, rows), (following, _) in zip(spans, spans[1:], strict=False):
        if offset + rows.shape[0] > following:
            reject(errors.SCALE_OUT_OVERLAP, parameter="features", offset=following)
    return spans


def carried_input(serving: Any, request: Any) -> Any:
    """The embeds engine input of a request whose only items are ``prompt_embeds`` rows;
    None when vLLM's own path serves it (no rows, or rows beside images). A 400 if the rows
    or the token ids around them are not what the model can take."""
    spans = carried_spans(serving, request)
    if spans is None or set(request.features.mm_hashes) != {EMBEDS_MODALITY}:
        return None
    ids = np.asarray(request.token_ids, dtype=np.int64)
    is_row = np.zeros(len(ids), dtype=bool)
    for offset, rows in spans:
        is_row[offset : offset + rows.shape[0]] = True
    text_ids = ids[~is_row]
    vocab = int(serving.model_config.get_vocab_size())
    if text_ids.size and int(text_ids.max()) >= vocab:
        reject(
            errors.SCALE_OUT_TOKEN_ID,
            parameter="token_ids",
            token_id=int(text_ids.max()),
            vocab=vocab,
        )
    ids[is_row] = _ROW_MARK
    compact = bool(serving.online_renderer.renderer.limits.compact)
    return build_embeds_input(
        ids,
        [rows for _, rows in spans],
        _ROW_MARK,
        cache_salt=request.cache_salt,
        compact=compact,
    )


def without_payload(features: MultiModalFeatures) -> MultiModalFeatures:
    """``features`` with the ``prompt_embeds`` items dropped, once they are decoded: vLLM's
    own decoding of them would be a second, unused copy."""
    kwargs = dict(features.kwargs_data or {})
    kwargs.pop(EMBEDS_MODALITY, None)
    return features.model_copy(update={"kwargs_data": kwargs or None})

"""Turn rendered markers into placeholder spans and build the engine's embeds input.

Extends the span logic of ``vllm/renderers/hf.py``. Why markers rather than matching
placeholders in parse order: a template may drop, reorder or repeat message content. Each
marker names its part, so wherever the template put it, the rows that land there are that
part's rows; a dropped part is detected instead of shifting the others.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import torch
from vllm.inputs.engine import EmbedsInput, embeds_input

from . import errors
from .errors import reject
from .limits import DroppedPolicy
from .log import logger
from .parts import EmbedsPlan
from .patches.entrypoints_serve_tokenize_serving import note_embeds_rows
from .placeholder import PLACEHOLDER_TOKEN

EMBED_ROW_TOKEN_ID: Final = 0


def expand_markers(
    text: str, plan: EmbedsPlan, dropped: DroppedPolicy
) -> tuple[str, list[torch.Tensor]]:
    """Replace each rendered marker by one placeholder per row of its part.

    Returns the new text and the part tensors in the order their spans appear in it.
    """
    by_marker = {part.marker: part for part in plan.parts}
    pattern = re.compile("|".join(re.escape(m) for m in by_marker))
    pieces: list[str] = []
    spans: list[torch.Tensor] = []
    seen: set[str] = set()
    last = 0
    for match in pattern.finditer(text):
        part = by_marker[match.group(0)]
        seen.add(part.marker)
        pieces.append(text[last : match.start()])
        pieces.append(PLACEHOLDER_TOKEN * int(part.tensor.shape[0]))
        spans.append(part.tensor)
        last = match.end()
    pieces.append(text[last:])
    expanded = "".join(pieces)
    if plan.nonce in expanded.lower():  # token_hex nonces are lower case; catch re-cased ones
        # A marker survived only partly (the template sliced, escaped or re-cased it).
        reject(errors.MARKER_MANGLED)
    for part in plan.parts:
        if part.marker in seen:
            continue
        if dropped == "error":
            reject(errors.PART_DROPPED, where=part.where)
        logger.warning("chat template dropped %s (a prompt_embeds part); ignoring it", part.where)
    return expanded, spans


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
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    positions = torch.nonzero(ids == placeholder_id).flatten()
    lengths = torch.tensor([int(t.shape[0]) for t in spans], dtype=torch.long)
    expected = int(lengths.sum()) if len(spans) else 0
    if positions.numel() != expected or not spans:
        reject(errors.SPANS_CUT, found=int(positions.numel()), expected=expected)
    # Positions ascend, so a span is contiguous iff its last and first positions differ by its
    # length minus one.
    starts = torch.cumsum(lengths, 0) - lengths
    ends = starts + lengths - 1
    if not bool(torch.all(positions[ends] - positions[starts] == lengths - 1)):
        reject(errors.SPANS_CUT, found=int(positions.numel()), expected=expected)
    rows = torch.cat(list(spans)) if len(spans) > 1 else spans[0]
    is_token = torch.ones(len(ids), dtype=torch.bool)
    is_token[positions] = False
    if compact:
        prompt_embeds = rows
    else:
        prompt_embeds = rows.new_zeros((len(ids), rows.shape[1]))
        prompt_embeds[positions] = rows
    # Embedding rows carry token id 0, the id vLLM's engine itself substitutes there: the
    # placeholder id may lie past the model's vocabulary, and anything that indexes the
    # vocabulary with prompt ids (prompt logprobs) would fail on it.
    ids[positions] = EMBED_ROW_TOKEN_ID
    note_embeds_rows(is_token)
    return embeds_input(
        prompt_embeds=prompt_embeds,
        prompt_token_ids=ids.tolist(),
        is_token_ids=is_token.tolist(),
        cache_salt=cache_salt,
    )

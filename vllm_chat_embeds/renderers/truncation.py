"""Keep the rows of prompt_embeds parts that survive ``truncate_prompt_tokens`` (extends the
truncation of ``vllm/renderers/params.py``, ``TokenizeParams``).

Why: vLLM truncates a chat after tokenization, keeping the last (``truncation_side`` "left",
the default for generation) or the first ("right") k token ids. Our placeholders are ids like
any other there, so the cut falls wherever it falls: parts wholly before it are gone, a part it
runs through keeps the placeholders of its rows on the kept side, and the rest are whole. The
rows served must be exactly the kept positions, as the same chat sent as text (or vLLM's
built-in, which slices its full-length embeddings with the ids) gets them.

How: each placeholder in the kept ids stands for one row, in order. With ``found`` of the
``expected`` rows kept, the kept rows are the last (left cut) or first (right cut) ``found``
rows of the parts laid end to end; a part the cut ran through must touch the edge of the kept
ids, where the cut is, or stand behind only the special tokens the tokenizer adds itself after
truncating (a BOS with ``add_special_tokens``: Hugging Face tokenizers truncate the text, then
add them). ``splice.locate_spans`` then checks one whole run per kept part, as for any prompt,
so a run cut anywhere else is still refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

import numpy as np
import torch

from .. import errors
from ..errors import reject

CutSide = Literal["left", "right"]
# Private key under which the side a request's truncation cuts from rides on the prompt dict,
# from tokenization to ``_process_tokens`` (set only when the request truncates).
CUT_KEY: Final = "_vllm_chat_embeds_cut"


def cut_side(params: Any, tokenizer: Any) -> CutSide | None:
    """The side ``params`` (vLLM's ``TokenizeParams``) truncates from, or None if it does not.

    As vLLM resolves it: the request's ``truncation_side``, else the tokenizer's (vLLM sets
    "left" for generation); anything but "left" keeps the first tokens.
    """
    if getattr(params, "truncate_prompt_tokens", None) is None:
        return None
    side = getattr(params, "truncation_side", None) or getattr(tokenizer, "truncation_side", None)
    return "left" if side == "left" else "right"


def added_special_ids(tokenizer: Any, params: Any) -> tuple[int, ...]:
    """The ids the tokenizer adds around a text it tokenizes for ``params`` (none without
    ``add_special_tokens``): all that may stand between a cut part's run and the cut edge."""
    if tokenizer is None or not getattr(params, "add_special_tokens", False):
        return ()
    try:
        return tuple(int(i) for i in tokenizer.encode("", add_special_tokens=True))
    except (TypeError, ValueError, AttributeError):
        return ()


def kept_spans(
    ids: Sequence[int],
    spans: Sequence[torch.Tensor],
    placeholder_id: int,
    side: CutSide | None,
    edge_ids: Sequence[int] = (),
) -> list[torch.Tensor]:
    """The parts' rows that the (maybe truncated) ``ids`` keep, one tensor per kept part.

    Untruncated (``side`` None) or with every row kept, ``spans`` as they are. Otherwise the
    rows on the kept side; a part cut through keeps a slice of its rows (a view: it has no
    digest of its own, so the engine hashes those rows by content). ``edge_ids``: the special
    ids the tokenizer added after truncating, which may stand at the cut edge.
    """
    spans = list(spans)
    found = int(np.count_nonzero(np.asarray(ids, dtype=np.int64) == placeholder_id))
    expected = sum(int(t.shape[0]) for t in spans)
    if side is None or found >= expected:
        return spans  # nothing cut: the whole-run checks decide
    left = side == "left"
    ordered = reversed(spans) if left else iter(spans)
    kept: list[torch.Tensor] = []
    need = found
    partial = False
    for rows in ordered:
        if need == 0:
            break
        count = int(rows.shape[0])
        if count > need:
            rows = rows[count - need :] if left else rows[:need]
            partial = True
            count = need
        kept.append(rows)
        need -= count
    if left:
        kept.reverse()
    if partial and not _at_edge(ids, placeholder_id, left, edge_ids):
        reject(errors.SPANS_CUT, found=found, expected=expected)
    return kept


def _at_edge(ids: Sequence[int], placeholder_id: int, left: bool, edge_ids: Sequence[int]) -> bool:
    """Whether the first (left) or last (right) placeholder has only tokenizer-added special
    ids, at most as many as it adds, between it and that end of ``ids``."""
    positions = np.flatnonzero(np.asarray(ids, dtype=np.int64) == placeholder_id)
    outside = list(ids[: positions[0]]) if left else list(ids[positions[-1] + 1 :])
    allowed = set(edge_ids)
    return len(outside) <= len(edge_ids) and all(i in allowed for i in outside)

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
ids, where the cut is. ``splice.locate_spans`` then checks one whole run per kept part, as for
any prompt, so a run cut anywhere else is still refused.
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


def kept_spans(
    ids: Sequence[int],
    spans: Sequence[torch.Tensor],
    placeholder_id: int,
    side: CutSide | None,
) -> list[torch.Tensor]:
    """The parts' rows that the (maybe truncated) ``ids`` keep, one tensor per kept part.

    Untruncated (``side`` None) or with every row kept, ``spans`` as they are. Otherwise the
    rows on the kept side; a part cut through keeps a slice of its rows (a view: it has no
    digest of its own, so the engine hashes those rows by content).
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
    if partial:
        # The run of a part cut through must sit at the edge of the kept ids.
        edge = ids[0] if left else ids[-1]
        if edge != placeholder_id:
            reject(errors.SPANS_CUT, found=found, expected=expected)
    return kept

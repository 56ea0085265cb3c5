"""Turn marker token runs into placeholder spans, for renderers that render chats to token ids.

The token-id counterpart of ``splice.expand_markers``. Why: ``mistral_common`` turns a chat
straight into token ids, so a part's marker text is tokenized with the rest of the content and
can only be found again as a run of token ids. That run equals the marker tokenized alone only
if the tokenizer did not merge the marker with the text around it; ``bounded_marker`` gives a
marker that Tekken's pre-tokenizer always splits off, and a marker whose run is missing while
its text survives is refused (400) rather than guessed at.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from .. import errors
from ..errors import reject
from ..limits import DroppedPolicy
from .parts import EmbedsPart, EmbedsPlan
from .splice import apply_dropped_policy

# A digit on both sides: Tekken's pre-tokenizer makes every digit a piece of its own, so no
# piece (hence no merge) crosses into or out of the marker, whatever text surrounds it.
_BOUND = "0"
T = TypeVar("T")


def bounded_marker(marker: str) -> str:
    """The text standing for a part in the chat given to a token-id renderer."""
    return f"{_BOUND}{marker}{_BOUND}"


def bound_markers(value: Any, plan: EmbedsPlan) -> Any:
    """``value`` (messages: strings, lists, dicts) with each of this plan's markers bounded."""
    if isinstance(value, str):
        if plan.nonce not in value:
            return value
        return plan.any_marker.sub(lambda m: bounded_marker(m.group(0)), value)
    if isinstance(value, list):
        return [bound_markers(v, plan) for v in value]
    if isinstance(value, dict):
        return {k: bound_markers(v, plan) for k, v in value.items()}
    return value


def _find_runs(ids: Sequence[int], runs: Mapping[tuple[int, ...], T]) -> list[tuple[int, int, T]]:
    """``(start, length, value)`` of each non-overlapping occurrence of a run, left to right."""
    keys = sorted(runs, key=len, reverse=True)
    # A plan's markers all start with the same tokens (bound, "<|pe:", nonce): cheap to test
    # at each position before trying the whole runs.
    prefix = os.path.commonprefix([list(k) for k in keys]) or list(keys[0][:1])
    found: list[tuple[int, int, T]] = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == prefix[0] and list(ids[i : i + len(prefix)]) == prefix:
            match = next((k for k in keys if tuple(ids[i : i + len(k)]) == k), None)
            if match is not None:
                found.append((i, len(match), runs[match]))
                i += len(match)
                continue
        i += 1
    return found


def expand_marker_ids(
    ids: Sequence[int],
    plan: EmbedsPlan,
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    placeholder_id: int,
    dropped: DroppedPolicy,
) -> tuple[list[int], list[torch.Tensor]]:
    """Replace each part's marker run by one ``placeholder_id`` per row of the part.

    ``encode`` tokenizes text without special tokens, ``decode`` turns ids back into text
    (used only when a marker run is missing, to tell a merged marker from a dropped part).
    Returns the new ids and the part tensors in the order their spans appear.
    """
    if placeholder_id in ids:
        raise RuntimeError(
            f"the rendered chat already holds token id {placeholder_id}, which "
            "vllm-chat-embeds uses as the prompt_embeds placeholder"
        )
    runs: dict[tuple[int, ...], EmbedsPart] = {}
    for part in plan.parts:
        run = tuple(encode(bounded_marker(part.marker)))
        if not run or run in runs:
            raise RuntimeError("prompt_embeds markers do not tokenize to distinct token runs")
        runs[run] = part
    out: list[int] = []
    spans: list[torch.Tensor] = []
    seen: set[str] = set()
    last = 0
    for start, length, part in _find_runs(ids, runs):
        out.extend(ids[last:start])
        out.extend([placeholder_id] * int(part.tensor.shape[0]))
        spans.append(part.tensor)
        seen.add(part.marker)
        last = start + length
    out.extend(ids[last:])
    missing = [part for part in plan.parts if part.marker not in seen]
    if missing:
        text = decode(out)
        for part in missing:
            if part.marker in text:
                reject(errors.MARKER_MERGED, where=part.where)
        if plan.nonce in text.lower():  # a marker cut or re-cased, not merged
            reject(errors.MARKER_MANGLED)
        apply_dropped_policy(plan, seen, dropped)
    return out, spans

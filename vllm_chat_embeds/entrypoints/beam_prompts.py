"""Beam search over embeds prompts (extends ``vllm/entrypoints/generate/beam_search/utils.py``).

Why: vLLM's beam search builds each beam's next prompt from token ids alone (the prompt's ids
plus the tokens the beam has chosen), so it refuses embeds prompts. A beam of an embeds prompt
is that prompt with the beam's tokens appended: the embedding rows stay as they are, the token
ids and the ``is_token_ids`` mask grow. vLLM's search loop runs unchanged on a *root*, a
token-type stand-in for the embeds prompt whose ids (0 at embedding positions, as in the
engine) are what the loop reads and extends; the root carries the rows, and each beam's prompt
is rebuilt from it here. Beam prompts are always compact (only the rows, one tensor shared by
every beam of every step), whatever layout the original prompt had.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import torch
from vllm.inputs import EmbedsInput, embeds_input

from ..patches.v1_core_kv_cache_utils import SPAN_DIGESTS_KEY
from ..renderers.splice import EMBED_ROW_TOKEN_ID

# The key under which a root carries its rows; nothing in vLLM reads it.
ROOT_KEY: Final = "_vllm_chat_embeds_beam_rows"


@dataclass(frozen=True)
class BeamRows:
    """The embedding rows of an embeds prompt (compact) and its prompt-length mask."""

    rows: torch.Tensor
    is_token_ids: tuple[bool, ...]


def beam_root(prompt: Mapping[str, Any]) -> dict[str, Any]:
    """A token-type stand-in for an embeds prompt that vLLM's beam search can extend."""
    rows: torch.Tensor = prompt["prompt_embeds"]
    ids = prompt.get("prompt_token_ids")
    mask = prompt.get("is_token_ids")
    if ids is None:  # a prompt of rows only (vLLM's completions prompt_embeds)
        ids = [EMBED_ROW_TOKEN_ID] * int(rows.shape[0])
    if mask is None:
        mask = [False] * len(ids)
    is_token = torch.as_tensor(list(mask), dtype=torch.bool)
    if rows.shape[0] == len(ids) and bool(is_token.any()):
        rows = rows[~is_token]  # dense: keep the embedding rows only
    root: dict[str, Any] = {
        "type": "token",
        "prompt_token_ids": [
            int(i) if t else EMBED_ROW_TOKEN_ID for i, t in zip(ids, is_token.tolist(), strict=True)
        ],
        ROOT_KEY: BeamRows(rows, tuple(is_token.tolist())),
    }
    # The digests of rows kept by uuid describe the rows, which every beam shares: each beam's
    # prompt carries them too, so its blocks are keyed by them and its rows stay beside the
    # engine (stores/engine_rows.py) instead of crossing again for every beam and step.
    for key in ("prompt", "cache_salt", SPAN_DIGESTS_KEY):
        if prompt.get(key) is not None:
            root[key] = prompt[key]
    return root


def is_beam_root(prompt: Mapping[str, Any]) -> bool:
    return ROOT_KEY in prompt


def beam_prompt(root: Mapping[str, Any], tokens: Sequence[int]) -> EmbedsInput:
    """The engine input of one beam: the root's rows, its ids then the beam's tokens."""
    beam: BeamRows = root[ROOT_KEY]
    grown = len(tokens) - len(beam.is_token_ids)
    if grown < 0:
        raise ValueError("a beam is shorter than its prompt")
    engine_input = embeds_input(
        prompt_embeds=beam.rows,
        prompt=root.get("prompt"),
        cache_salt=root.get("cache_salt"),
        prompt_token_ids=list(tokens),
        is_token_ids=[*beam.is_token_ids, *([True] * grown)],
    )
    if root.get(SPAN_DIGESTS_KEY):
        cast(dict, engine_input)[SPAN_DIGESTS_KEY] = root[SPAN_DIGESTS_KEY]
    return engine_input

"""Beam roots and beam prompts of embeds prompts (``entrypoints.beam_prompts``)."""

from __future__ import annotations

import pytest
import torch

from vllm_chat_embeds.entrypoints.beam_prompts import beam_prompt, beam_root, is_beam_root

pytestmark = pytest.mark.unit

ROWS = torch.arange(2 * 3, dtype=torch.float32).reshape(2, 3) + 1
IDS = [5, 0, 0, 7]
MASK = [True, False, False, True]


def test_compact_prompt_keeps_its_rows_and_grows_ids_and_mask():
    root = beam_root(
        {"type": "embeds", "prompt_embeds": ROWS, "prompt_token_ids": IDS, "is_token_ids": MASK}
    )
    assert root["type"] == "token" and root["prompt_token_ids"] == IDS and is_beam_root(root)
    beam = beam_prompt(root, [*IDS, 11, 12])
    assert beam["type"] == "embeds"
    assert beam["prompt_embeds"] is ROWS  # shared by every beam: nothing copied
    assert beam["prompt_token_ids"] == [*IDS, 11, 12]
    assert beam["is_token_ids"] == [*MASK, True, True]


def test_digests_of_kept_rows_reach_every_beam():
    """So each beam's rows stay beside the engine and its blocks are keyed by the digests."""
    from vllm_chat_embeds.patches.v1_core_kv_cache_utils import SPAN_DIGESTS_KEY

    digests = [[2, "ab" * 32]]
    prompt = {"type": "embeds", "prompt_embeds": ROWS, "prompt_token_ids": IDS}
    root = beam_root({**prompt, "is_token_ids": MASK, SPAN_DIGESTS_KEY: digests})
    assert beam_prompt(root, [*IDS, 9])[SPAN_DIGESTS_KEY] == digests  # type: ignore[typeddict-item]
    plain = beam_root({**prompt, "is_token_ids": MASK})
    assert SPAN_DIGESTS_KEY not in beam_prompt(plain, [*IDS, 9])


def test_dense_prompt_becomes_compact_and_ids_at_rows_become_zero():
    dense = torch.zeros(4, 3)
    dense[[1, 2]] = ROWS
    root = beam_root(
        {
            "type": "embeds",
            "prompt_embeds": dense,
            "prompt_token_ids": [5, 99, 98, 7],
            "is_token_ids": MASK,
            "cache_salt": "salt",
        }
    )
    assert root["prompt_token_ids"] == IDS
    beam = beam_prompt(root, [*IDS, 3])
    assert torch.equal(beam["prompt_embeds"], ROWS)
    assert beam["is_token_ids"] == [*MASK, True]
    assert beam["cache_salt"] == "salt"


def test_rows_only_prompt_gets_zero_ids():
    root = beam_root({"type": "embeds", "prompt_embeds": ROWS})
    assert root["prompt_token_ids"] == [0, 0]
    first = beam_prompt(root, [0, 0])
    assert first["is_token_ids"] == [False, False] and first["prompt_embeds"] is ROWS
    assert beam_prompt(root, [0, 0, 4])["is_token_ids"] == [False, False, True]


def test_token_prompts_are_not_roots():
    assert not is_beam_root({"type": "token", "prompt_token_ids": [1, 2]})

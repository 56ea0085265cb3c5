"""The LoRA fix of the V1 runner patch: every scheduled position is embedded, rows are kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_chat_embeds.patches.v1_worker_gpu_model_runner import (
    _NoTokenPositions,
    embed_every_position,
)

pytestmark = pytest.mark.unit

TABLE = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)


def test_embed_every_position_embeds_all_positions_and_keeps_the_rows():
    seen: list[torch.Tensor] = []

    def embed(*, input_ids: torch.Tensor) -> torch.Tensor:
        seen.append(input_ids.clone())
        return TABLE[input_ids] + 0.5  # stands in for the table plus a LoRA delta

    ids = torch.tensor([4, 7, 9, 2, -1])  # 9 sits at a row position; -1 a draft placeholder
    mask = torch.tensor([True, False, False, True, True])
    rows = torch.full((5, 3), -1.0)  # the rows already copied into the step's buffer
    embed_every_position(embed, ids, mask, rows)
    # One call covering every position, as the LoRA mapping does; valid ids only.
    assert [s.tolist() for s in seen] == [[4, 0, 0, 2, 0]]
    assert torch.equal(rows[[0, 3, 4]], TABLE[[4, 2, 0]] + 0.5)
    assert torch.equal(rows[[1, 2]], torch.full((2, 3), -1.0))  # rows untouched: no delta


def test_stand_in_mask_hides_token_positions_only_from_numpy_readers():
    class Buffer:
        np = np.array([True, False, True])
        gpu = torch.tensor([True, False, True])

    stand_in = _NoTokenPositions(Buffer(), 3)
    assert not stand_in.np.any()
    assert stand_in.gpu is Buffer.gpu
    assert Buffer.np.tolist() == [True, False, True]  # the real buffer is never written

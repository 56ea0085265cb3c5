"""The pure pieces of the compact-transport patches, checked against dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_chat_embeds.patches.v1_core_kv_cache_utils import block_digest, row_index
from vllm_chat_embeds.patches.v1_worker_gpu_model_runner import copy_scheduled_rows
from vllm_chat_embeds.patches.v1_worker_gpu_model_states_prompt_embeds import densify
from vllm_chat_embeds.patches.vllm_utils import _length

pytestmark = pytest.mark.unit

WIDTH = 4
MASK = [True, False, False, True, True, False, True, False]  # 4 embedding rows
ROWS = torch.arange(4 * WIDTH, dtype=torch.float32).reshape(4, WIDTH) + 1


def test_row_index_maps_positions_to_rows():
    assert row_index(MASK).tolist() == [-1, 0, 1, -1, -1, 2, -1, 3]


def test_densify_matches_a_hand_built_dense_tensor():
    dense = densify(ROWS, MASK)
    assert dense.shape == (len(MASK), WIDTH)
    assert torch.equal(dense[[1, 2, 5, 7]], ROWS)
    assert torch.equal(dense[[0, 3, 4, 6]], torch.zeros(4, WIDTH))


def test_length_prefers_token_ids():
    assert _length([1, 2, 3], ROWS[:1]) == 3
    assert _length(None, ROWS) == 4
    with pytest.raises(ValueError):
        _length(None, None)


def test_block_digest_text_blocks_have_none_and_rows_matter():
    index = row_index(MASK)
    assert block_digest(ROWS, index, 3, 5) is None  # tokens only: hashes like text
    first = block_digest(ROWS, index, 0, 4)
    assert first is not None
    assert block_digest(ROWS.clone(), index, 0, 4) == first  # same rows: same key
    other = ROWS.clone()
    other[1, 0] += 1
    assert block_digest(other, index, 0, 4) != first  # other rows: other key
    # The same rows at other positions of the block give another key (the mask is hashed).
    shifted = row_index([False, False, True, True, True, False, True, False])
    assert block_digest(ROWS, shifted, 0, 4) != first
    # A zero row is not a token 0: an all-zero embedding block still gets a key.
    assert block_digest(torch.zeros(4, WIDTH), index, 0, 4) is not None


def test_block_digest_keys_the_rows_dtype():
    """Rows keep their payload's dtype: float16 and bfloat16 rows of the same bytes differ."""
    from vllm_chat_embeds.patches.v1_core_kv_cache_utils import spans_block_digest

    index = row_index(MASK)
    half = ROWS.to(torch.float16)
    brain = half.view(torch.bfloat16)  # the same bytes read as another dtype
    assert block_digest(half, index, 0, 4) != block_digest(brain, index, 0, 4)
    span = [(0, ROWS.shape[0], None)]
    assert spans_block_digest(half, span, index, 0, 4) != spans_block_digest(
        brain, span, index, 0, 4
    )


def test_copy_scheduled_rows_widens_float16_rows_as_a_cast_would():
    """float16 rows stay float16 until the worker's copy into its float32 input buffer."""
    half = ROWS.to(torch.float16)
    dst = torch.zeros(8, WIDTH)
    copy_scheduled_rows(
        dst,
        {0: half},
        num_reqs=1,
        cu_num_tokens=np.array([8]),
        num_scheduled=np.array([8]),
        num_computed=np.array([0]),
        num_prompt=np.array([len(MASK)]),
        is_token_ids=np.array([MASK]),
    )
    assert torch.equal(dst[~torch.tensor(MASK)], half.float())


@pytest.mark.parametrize("schedule", [[8], [3, 5], [1, 1, 1, 1, 1, 1, 1, 1], [2, 6]])
def test_copy_scheduled_rows_matches_the_dense_copy(schedule):
    """Prefill in chunks: the embedding positions of each chunk receive the right rows."""
    dense = densify(ROWS, MASK)
    is_token = np.array([MASK + [True] * 8])
    computed = 0
    for count in schedule:
        dst = torch.full((16, WIDTH), -1.0)
        copy_scheduled_rows(
            dst,
            {0: ROWS},
            num_reqs=1,
            cu_num_tokens=np.array([count]),
            num_scheduled=np.array([count]),
            num_computed=np.array([computed]),
            num_prompt=np.array([len(MASK)]),
            is_token_ids=is_token,
        )
        window = np.array(MASK[computed : computed + count])
        embedded = np.flatnonzero(~window)
        assert torch.equal(dst[embedded], dense[computed + embedded])
        assert bool((dst[np.flatnonzero(window)] == -1).all())  # token rows untouched
        computed += count


def test_copy_scheduled_rows_two_requests_and_dense_layout():
    dense_rows = torch.randn(3, WIDTH)  # a request with one row per position
    dst = torch.zeros(8, WIDTH)
    copy_scheduled_rows(
        dst,
        {0: ROWS, 1: dense_rows},
        num_reqs=2,
        cu_num_tokens=np.array([5, 8]),
        num_scheduled=np.array([5, 3]),
        num_computed=np.array([0, 0]),
        num_prompt=np.array([len(MASK), 3]),
        is_token_ids=np.array([MASK, [False] * 3 + [True] * 5]),
    )
    assert torch.equal(dst[[1, 2]], ROWS[:2])
    assert torch.equal(dst[5:8], dense_rows)


def test_span_digests_stand_for_kept_rows_in_block_keys():
    from vllm_chat_embeds.patches.v1_core_kv_cache_utils import spans_block_digest

    index = row_index(MASK)
    d1, d2 = b"\1" * 32, b"\2" * 32
    two = [(0, 2, d1), (2, 2, None)]  # rows 0-1 kept by uuid, rows 2-3 sent with data
    first = spans_block_digest(ROWS, two, index, 0, 4)
    assert first is not None and spans_block_digest(ROWS, two, index, 3, 5) is None
    # The digest stands for its rows (block 0-4 holds rows 0-1 only): the key follows it...
    other = ROWS.clone()
    other[:2] += 1
    assert spans_block_digest(other, two, index, 0, 4) == first
    # ...another digest, another key; rows without a digest are hashed.
    assert spans_block_digest(ROWS, [(0, 2, d2), (2, 2, None)], index, 0, 4) != first
    other = ROWS.clone()
    other[2:] += 1
    assert spans_block_digest(other, two, index, 4, 8) != spans_block_digest(ROWS, two, index, 4, 8)
    # Which rows of a span a block holds is part of the key.
    one = [(0, 4, d1)]
    assert spans_block_digest(ROWS, one, index, 0, 4) != spans_block_digest(ROWS, one, index, 4, 8)
    # Keys of rows by digest never equal keys of rows by bytes.
    assert spans_block_digest(ROWS, [(0, 4, None)], index, 0, 4) != block_digest(ROWS, index, 0, 4)


def test_only_the_server_sets_span_digests():
    from types import SimpleNamespace

    from vllm_chat_embeds.patches.v1_core_kv_cache_utils import SPAN_DIGESTS_KEY
    from vllm_chat_embeds.patches.v1_engine_input_processor import carry_span_digests
    from vllm_chat_embeds.stores.engine_rows import WIRE_KEY

    forged = {SPAN_DIGESTS_KEY: [[4, "00" * 32]], WIRE_KEY: {"ops": ["u"], "drop": []}, "mine": 1}
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=dict(forged)))
    engine_input = {"type": "embeds", "prompt_token_ids": MASK, "prompt_embeds": ROWS}
    carry_span_digests(request, engine_input)  # a client's value, no server's: dropped
    assert request.sampling_params.extra_args == {"mine": 1}
    ours = [[4, "ab" * 32]]
    carry_span_digests(request, {**engine_input, SPAN_DIGESTS_KEY: ours})
    assert request.sampling_params.extra_args == {"mine": 1, SPAN_DIGESTS_KEY: ours}

"""``RunMask``: the engine's compact ``prompt_is_token_ids``, equal to the list it replaces."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_utils import _gen_prompt_embeds_extra_hash_keys

import vllm_chat_embeds
from vllm_chat_embeds.position_mask import RunMask

pytestmark = pytest.mark.unit

MASK = [True, False, False, True, True, False, True, False]
WIDTH = 4


@given(st.lists(st.booleans(), max_size=200))
def test_behaves_as_the_list(mask: list[bool]) -> None:
    runs = RunMask.from_mask(mask)
    assert len(runs) == len(mask)
    assert list(runs) == mask and runs.tolist() == mask and runs == mask
    assert np.array_equal(np.asarray(runs), np.asarray(mask, dtype=bool))
    for i in range(-len(mask), len(mask)):
        assert runs[i] is mask[i]
    assert runs[3:-2] == mask[3:-2]
    assert pickle.loads(pickle.dumps(runs)) == runs
    with pytest.raises(IndexError):
        runs[len(mask)]


def test_spans_and_size() -> None:
    runs = RunMask.from_mask(MASK)
    assert runs.spans == [(1, 3), (5, 6), (7, 8)]
    long = RunMask.from_mask([True] * 5000 + [False] * 8 + [True] * 5000)
    assert long.spans == [(5000, 5008)] and long.nbytes == 16  # a list would hold 10,008 slots


def test_numpy_row_assignment_as_the_input_batch_does() -> None:
    batch = np.zeros((2, 12), dtype=bool)
    batch[1, : len(MASK)] = RunMask.from_mask(MASK)
    assert batch[1, : len(MASK)].tolist() == MASK


def make_request(mask: list[bool], rows: torch.Tensor):
    vllm_chat_embeds.register()
    from vllm.v1.request import Request

    ids = [7 if is_token else 99 for is_token in mask]
    return Request(
        request_id="r",
        prompt_token_ids=ids,
        sampling_params=SamplingParams(max_tokens=1),
        pooling_params=None,
        prompt_embeds=rows,
        prompt_is_token_ids=list(mask),
    )


def test_engine_request_keeps_runs_and_hashes_as_with_the_list() -> None:
    rows = torch.arange(4 * WIDTH, dtype=torch.float32).reshape(4, WIDTH)
    request = make_request(MASK, rows)
    assert isinstance(request.prompt_is_token_ids, RunMask)
    assert request.prompt_is_token_ids == MASK
    # Rows hold content ids (kv_transfer/row_keys.py) in both views of the prompt, or the
    # zeros vLLM writes while the engine core has not said its vocabulary size yet.
    assert list(request.all_token_ids)[::3] == [7, 7, 7] and request.all_token_ids[4] == 7
    assert all(request.all_token_ids[p] in (0, request.prompt_token_ids[p]) for p in (1, 2, 5, 7))
    by_runs = [_gen_prompt_embeds_extra_hash_keys(request, s, s + 4) for s in (0, 4)]
    listed = make_request(MASK, rows)
    listed.prompt_is_token_ids = list(MASK)  # what the engine held before
    assert by_runs == [_gen_prompt_embeds_extra_hash_keys(listed, s, s + 4) for s in (0, 4)]
    assert all(by_runs)


def test_full_length_embeds_prompts_keep_vllms_list() -> None:
    request = make_request(MASK, torch.zeros(len(MASK), WIDTH))
    assert isinstance(request.prompt_is_token_ids, list)

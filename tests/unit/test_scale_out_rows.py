"""The rows of a rendered embeds input as ``GenerateRequest`` features (``scale_out_rows``)."""

from __future__ import annotations

import pytest
import torch
from vllm.entrypoints.scale_out.token_in_token_out.mm_serde import decode_mm_kwargs_item
from vllm.exceptions import VLLMValidationError
from vllm.inputs.engine import embeds_input

from vllm_chat_embeds import errors
from vllm_chat_embeds.entrypoints.scale_out_rows import (
    _embedding_runs,
    features_of_embeds,
    without_payload,
)
from vllm_chat_embeds.row_digest import rows_digest

pytestmark = pytest.mark.unit


def test_embedding_runs():
    assert _embedding_runs([True, False, False, True, False]) == [(1, 2), (4, 1)]
    assert _embedding_runs([False, False]) == [(0, 2)]
    assert _embedding_runs([True, True]) == []


def _inputs() -> tuple[dict, dict, list[torch.Tensor]]:
    spans = [torch.randn(2, 8), torch.randn(3, 8)]
    mask = [True, False, False, True, True, False, False, False, True]
    ids = [5 if m else 0 for m in mask]
    compact = embeds_input(prompt_embeds=torch.cat(spans), prompt_token_ids=ids, is_token_ids=mask)
    dense_rows = torch.zeros(len(ids), 8)
    dense_rows[torch.tensor([not m for m in mask])] = torch.cat(spans)
    dense = embeds_input(prompt_embeds=dense_rows, prompt_token_ids=ids, is_token_ids=mask)
    return compact, dense, spans


def test_one_item_per_span_from_either_layout():
    compact, dense, spans = _inputs()
    features = features_of_embeds(compact, "tensors")
    assert features == features_of_embeds(dense, "tensors")
    ranges = features.mm_placeholders["prompt_embeds"]
    assert [(r.offset, r.length) for r in ranges] == [(1, 2), (5, 3)]
    assert features.mm_hashes["prompt_embeds"] == [rows_digest(s) for s in spans]
    items = [decode_mm_kwargs_item(d) for d in features.kwargs_data["prompt_embeds"]]
    for item, rows in zip(items, spans, strict=True):
        assert torch.equal(item["embedding"].data, rows)
    assert without_payload(features).kwargs_data is None
    assert without_payload(features).mm_hashes == features.mm_hashes


def test_metadata_only_features_are_refused():
    compact, _, _ = _inputs()
    with pytest.raises(VLLMValidationError) as info:
        features_of_embeds(compact, "none")
    assert str(info.value).startswith(errors.SCALE_OUT_NO_PAYLOAD.split("{")[0])

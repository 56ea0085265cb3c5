"""The rows of prompt_embeds parts that a truncated prompt keeps (``renderers/truncation``), and
part items beside images cut after expansion (``splice.cut_embeds_items``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from vllm.exceptions import VLLMValidationError
from vllm.renderers.params import TokenizeParams

from vllm_chat_embeds import errors
from vllm_chat_embeds.renderers import splice
from vllm_chat_embeds.renderers.splice import build_embeds_input
from vllm_chat_embeds.renderers.truncation import cut_side, kept_spans

PH = 1000
WIDTH = 4


def block(n: int, start: float) -> torch.Tensor:
    """``n`` rows whose values identify them: row i is all ``start + i``."""
    return (start + torch.arange(n, dtype=torch.float32)).unsqueeze(1).repeat(1, WIDTH)


def first_values(spans: list[torch.Tensor]) -> list[list[float]]:
    return [t[:, 0].tolist() for t in spans]


A, B = block(2, 10), block(3, 20)  # prompt: 1 A A 2 B B B 3


def truncated(side: str, k: int) -> list[int]:
    ids = [1, PH, PH, 2, PH, PH, PH, 3]
    return ids[-k:] if side == "left" else ids[:k]


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (8, [[10, 11], [20, 21, 22]]),  # nothing cut
        (7, [[10, 11], [20, 21, 22]]),  # only text cut
        (6, [[11], [20, 21, 22]]),  # through A: its last row
        (5, [[20, 21, 22]]),  # A cut away exactly
        (4, [[20, 21, 22]]),  # before B: B whole
        (3, [[21, 22]]),  # through B
        (2, [[22]]),
        (1, []),  # after every part
    ],
)
def test_left_cut_keeps_the_last_rows(k: int, expected: list[list[float]]) -> None:
    assert first_values(kept_spans(truncated("left", k), [A, B], PH, "left")) == expected


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (8, [[10, 11], [20, 21, 22]]),
        (7, [[10, 11], [20, 21, 22]]),
        (6, [[10, 11], [20, 21]]),  # through B: its first rows
        (4, [[10, 11]]),
        (3, [[10, 11]]),
        (2, [[10]]),
        (1, []),
    ],
)
def test_right_cut_keeps_the_first_rows(k: int, expected: list[list[float]]) -> None:
    assert first_values(kept_spans(truncated("right", k), [A, B], PH, "right")) == expected


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("k", range(1, 9))
def test_kept_rows_build_the_same_embeds_as_slicing_a_dense_prompt(side: str, k: int) -> None:
    """What vLLM's built-in does (one row per position, sliced with the ids) is the reference."""
    full = [1, PH, PH, 2, PH, PH, PH, 3]
    dense = torch.zeros(len(full), WIDTH)
    dense[[i for i, t in enumerate(full) if t == PH]] = torch.cat([A, B])
    cut = slice(-k, None) if side == "left" else slice(0, k)
    ids = full[cut]
    spans = kept_spans(ids, [A, B], PH, side)  # type: ignore[arg-type]
    if not spans:
        assert PH not in ids
        return
    built = build_embeds_input(ids, spans, PH, compact=False)
    assert torch.equal(built["prompt_embeds"], dense[cut])
    assert built["is_token_ids"] == [t != PH for t in ids]


def test_adjacent_parts_cut_through_the_first() -> None:
    ids = [PH, PH, PH, PH, 9]  # the last row of A, then B, then text
    assert first_values(kept_spans(ids, [A, B], PH, "left")) == [[11], [20, 21, 22]]


def test_untruncated_prompts_are_left_to_the_whole_run_checks() -> None:
    ids = [PH, 5, PH, PH, PH]
    assert kept_spans(ids, [A, B], PH, None) == [A, B]
    with pytest.raises(VLLMValidationError):
        build_embeds_input(ids, [A, B], PH)


@pytest.mark.parametrize(
    ("ids", "side"),
    [
        ([5, PH, PH, PH, PH], "left"),  # a partial run not at the cut edge
        ([PH, PH, PH, PH, 5], "right"),
    ],
)
def test_a_partial_run_away_from_the_cut_is_refused(ids: list[int], side: str) -> None:
    with pytest.raises(VLLMValidationError) as info:
        kept_spans(ids, [A, B], PH, side)  # type: ignore[arg-type]
    assert info.value.args[0] == errors.SPANS_CUT.format(found=4, expected=5)


def test_a_bos_added_after_the_cut_may_precede_the_cut_part() -> None:
    """Hugging Face tokenizers truncate, then add their special tokens (``add_special_tokens``):
    a BOS stands before the cut part's run; it is allowed there, and only it."""
    bos = 7
    assert first_values(kept_spans([bos, PH, PH, PH, PH, 3], [A, B], PH, "left", (bos,))) == [
        [11],
        [20, 21, 22],
    ]
    with pytest.raises(VLLMValidationError):
        kept_spans([bos, 5, PH, PH, PH, PH], [A, B], PH, "left", (bos,))
    with pytest.raises(VLLMValidationError):
        kept_spans([bos, PH, PH, PH, PH], [A, B], PH, "left")


def test_a_run_split_inside_the_kept_ids_is_still_refused() -> None:
    ids = [PH, PH, 7, PH, PH]  # 4 rows kept: A's last row, then B split by a token
    spans = kept_spans(ids, [A, B], PH, "left")
    with pytest.raises(VLLMValidationError) as info:
        build_embeds_input(ids, spans, PH)
    assert info.value.args[0] == errors.SPANS_CUT.format(found=4, expected=4)


def test_a_cut_part_has_no_digest_of_its_own() -> None:
    """Rows kept by uuid carry a digest; a slice of them must be hashed by its content."""
    from vllm_chat_embeds.stores.references import ReferenceStore, kept_rows_digest

    kept = ReferenceStore(1 << 20).put("u", A)
    assert kept_rows_digest(kept) is not None
    (cut,) = kept_spans([PH, 4], [kept], PH, "left")
    assert kept_rows_digest(cut) is None
    built = build_embeds_input([PH, 4], [cut], PH)
    assert splice.SPAN_DIGESTS_KEY not in built


class _Tok:
    truncation_side = "left"


@pytest.mark.parametrize(
    ("kwargs", "side"),
    [
        ({}, None),
        ({"truncate_prompt_tokens": 5}, "left"),
        ({"truncate_prompt_tokens": -1}, "left"),
        ({"truncate_prompt_tokens": 5, "truncation_side": "right"}, "right"),
        ({"truncate_prompt_tokens": 5, "truncation_side": "left"}, "left"),
    ],
)
def test_cut_side_resolves_as_vllm_does(kwargs: dict[str, Any], side: str | None) -> None:
    params = TokenizeParams(max_total_tokens=100, **kwargs)
    assert cut_side(params, _Tok()) == side


def _mm_input(spans: list[torch.Tensor], offsets: list[int], length: int) -> dict[str, Any]:
    ids = [1] * length
    for rows, offset in zip(spans, offsets, strict=True):
        ids[offset : offset + rows.shape[0]] = [PH] * rows.shape[0]
    engine_input: dict[str, Any] = {
        "type": "multimodal",
        "prompt_token_ids": ids,
        "mm_kwargs": {},
        "mm_hashes": {},
        "mm_placeholders": {},
    }
    return splice.add_embeds_items(engine_input, spans, PH, hasher="sha256")  # type: ignore[arg-type]


def test_cut_embeds_items_keeps_the_rows_inside_the_window() -> None:
    engine_input = _mm_input([A, B], [1, 4], 8)  # 1 A A 1 B B B 1
    ranges = engine_input["mm_placeholders"].pop(splice.EMBEDS_MODALITY)
    whole_b = engine_input["mm_hashes"][splice.EMBEDS_MODALITY][1]
    engine_input["prompt_token_ids"] = engine_input["prompt_token_ids"][2:]  # vLLM's cut
    splice.cut_embeds_items(engine_input, ranges, 2, 8, hasher="sha256")  # type: ignore[arg-type]
    items = engine_input["mm_kwargs"][splice.EMBEDS_MODALITY]
    rows = [item[splice.EMBEDS_ITEM_KEY].data[:, 0].tolist() for item in items]
    assert rows == [[11], [20, 21, 22]]
    placed = engine_input["mm_placeholders"][splice.EMBEDS_MODALITY]
    assert [(r.offset, r.length) for r in placed] == [(0, 1), (2, 3)]
    hashes = engine_input["mm_hashes"][splice.EMBEDS_MODALITY]
    assert hashes[1] == whole_b and hashes[0] != whole_b


def test_cut_embeds_items_drops_the_modality_when_every_part_is_cut() -> None:
    engine_input = _mm_input([A], [0], 5)
    ranges = engine_input["mm_placeholders"].pop(splice.EMBEDS_MODALITY)
    splice.cut_embeds_items(engine_input, ranges, 3, 5, hasher="sha256")  # type: ignore[arg-type]
    for key in ("mm_kwargs", "mm_hashes", "mm_placeholders"):
        assert splice.EMBEDS_MODALITY not in engine_input[key]

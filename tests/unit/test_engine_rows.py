"""Unit tests for rows kept beside the engine (``stores/engine_rows.py``): whatever a sender
decides, its receiver rebuilds every request's rows exactly, holds what the sender records, and
never more than the budget."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_chat_embeds.patches.v1_core_kv_cache_utils import SPAN_DIGESTS_KEY
from vllm_chat_embeds.stores.engine_rows import (
    KEEP,
    ROWS_NOT_KEPT,
    SEND,
    USE,
    WIRE_KEY,
    HeldRows,
    KeptRows,
    outgoing,
    rows_left_behind,
    take_wire,
)

pytestmark = pytest.mark.unit

WIDTH = 4
ROW_BYTES = WIDTH * 4
# A pool of kept rows by digest: distinct contents, 1 to 6 rows each.
POOL = {f"d{i}": torch.full((1 + i % 6, WIDTH), float(i)) for i in range(8)}


def request_rows(spans: list[tuple[str | None, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([rows for _, rows in spans])


def wire_spans(spans: list[tuple[str | None, torch.Tensor]]) -> list[tuple[int, str | None]]:
    return [(int(rows.shape[0]), digest) for digest, rows in spans]


def one_span() -> st.SearchStrategy[tuple[str | None, torch.Tensor]]:
    kept = st.sampled_from(sorted(POOL)).map(lambda d: (d, POOL[d]))
    fresh = st.integers(1, 5).map(lambda n: (None, torch.randn(n, WIDTH)))
    return st.one_of(kept, kept, fresh)


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(st.lists(one_span(), min_size=1, max_size=4), min_size=1, max_size=25),
    budget_rows=st.integers(0, 14),
)
def test_receiver_rebuilds_every_request_and_holds_what_the_sender_records(requests, budget_rows):
    held, kept = HeldRows(budget_rows * ROW_BYTES), KeptRows()
    for index, spans in enumerate(requests):
        rows = request_rows(spans)
        out = outgoing(held, rows, wire_spans(spans))
        if out is None:  # sent as is: nothing kept, nothing left behind
            assert all(d is None or POOL[d].numel() * 4 > held.capacity for d, _ in spans) or (
                held.capacity == 0
            )
            continue
        sent, wire = out
        used = [op == USE for op in wire["ops"]]
        assert sent.shape[0] == sum(
            r.shape[0] for (_, r), u in zip(spans, used, strict=True) if not u
        )
        rebuilt = kept.resolve(wire_spans(spans), wire, sent, f"r{index}")
        assert torch.equal(rebuilt, rows)
        assert set(kept._rows) == set(held._held)
        assert kept.held_bytes() == held.held_bytes() <= held.capacity


def test_a_span_may_use_rows_its_own_request_pushed_out():
    """Budget for one part: the second span's keep evicts the first; the drop waits until the
    request's spans are rebuilt, and a part kept again is not dropped."""
    held, kept = HeldRows(6 * ROW_BYTES), KeptRows()
    a, b = POOL["d4"], POOL["d5"]  # 5 and 6 rows
    spans = [("d4", a), ("d5", b), ("d4", a)]
    sent, wire = outgoing(held, request_rows(spans), wire_spans(spans))  # type: ignore[misc]
    assert wire == {"ops": [KEEP, KEEP, KEEP], "drop": ["d5"]}
    assert torch.equal(kept.resolve(wire_spans(spans), wire, sent, "r"), request_rows(spans))
    assert set(kept._rows) == {"d4"} == set(held._held)


def test_rows_larger_than_the_budget_travel_and_are_not_kept():
    held = HeldRows(2 * ROW_BYTES)
    spans = [("d3", POOL["d3"])]  # 4 rows
    assert held.plan(wire_spans(spans), ROW_BYTES) == {"ops": [SEND], "drop": []}
    assert outgoing(held, request_rows(spans), wire_spans(spans)) is None
    assert outgoing(HeldRows(0), POOL["d0"], [(1, "d0")]) is None  # references off


def test_rows_that_do_not_match_their_digests_travel_untouched():
    """A prompt whose rows are not the spans' (e.g. a beam's prompt grown by tokens)."""
    assert outgoing(HeldRows(1 << 20), torch.zeros(3, WIDTH), [(2, "d1")]) is None


def test_a_receiver_refuses_rows_it_does_not_hold():
    with pytest.raises(RuntimeError) as info:
        KeptRows().resolve([(2, "d1")], {"ops": [USE], "drop": []}, POOL["d1"][:0], "req-7")
    assert str(info.value) == ROWS_NOT_KEPT.format(digest="d1", request_id="req-7")


def test_serialising_leaves_the_request_as_it_was():
    rows = POOL["d2"]
    extra = {SPAN_DIGESTS_KEY: [[3, "d2"]], "mine": 1}
    params = SimpleNamespace(extra_args=extra)
    request = SimpleNamespace(prompt_embeds=rows, sampling_params=params)
    held = HeldRows(1 << 20)
    seen = []
    for _ in range(2):
        with rows_left_behind(held, request):
            seen.append((request.prompt_embeds.shape[0], params.extra_args[WIRE_KEY]["ops"]))
        assert request.prompt_embeds is rows and params.extra_args is extra
    assert seen == [(3, [KEEP]), (0, [USE])]
    received = SimpleNamespace(extra_args={**extra, WIRE_KEY: {"ops": [USE], "drop": []}})
    assert take_wire(received) == {"ops": [USE], "drop": []}
    assert received.extra_args == extra
    assert take_wire(received) is None


@pytest.mark.parametrize("copy_kept", [False, True])
def test_a_receiver_under_the_tensor_arena_keeps_copies_not_views(copy_kept: bool) -> None:
    """Under vLLM's shared-memory arena a worker's rows are views of an arena slot: a kept
    view would hold the slot for good, so such a receiver keeps a copy."""
    held, kept = HeldRows(64 * ROW_BYTES), KeptRows(copy_kept=copy_kept)
    rows = POOL["d3"].clone()
    spans = [(int(rows.shape[0]), "d3")]
    sent, wire = outgoing(held, rows, spans) or (None, None)
    assert wire is not None and wire["ops"] == [KEEP]
    assert torch.equal(kept.resolve(spans, wire, sent, "r1"), rows)
    shares = kept._rows["d3"].data_ptr() == sent.data_ptr()
    assert shares is not copy_kept
    again, wire = outgoing(held, rows, spans) or (None, None)
    assert wire is not None and wire["ops"] == [USE]
    assert torch.equal(kept.resolve(spans, wire, again, "r2"), rows)

"""``renderers.generic``: bounded markers in token ids become placeholder runs, or a 400."""

from __future__ import annotations

import pytest
import torch
from vllm.exceptions import VLLMValidationError

from vllm_chat_embeds import errors
from vllm_chat_embeds.renderers.generic import bounded, expand_bounded_ids, map_markers
from vllm_chat_embeds.renderers.parts import EmbedsPart, EmbedsPlan

pytestmark = pytest.mark.unit

PH = 99
NONCE = "0123456789abcdef"


def plan_of(*rows: int) -> EmbedsPlan:
    plan = EmbedsPlan(nonce=NONCE)
    for index, n in enumerate(rows):
        marker = f"<|pe:{NONCE}:{index}|>"
        plan.parts.append(EmbedsPart(f"messages[0].content[{index}]", marker, torch.ones(n, 4)))
    return plan


def tokens(*pieces: str | int) -> tuple[list[int], dict[int, str]]:
    """Ids for ``pieces`` (a string is one id standing for that text; an int is itself)."""
    vocab: dict[int, str] = {PH: "<prompt_embeds>"}
    ids = []
    for piece in pieces:
        if isinstance(piece, int):
            ids.append(piece)
            continue
        token = next((i for i, text in vocab.items() if text == piece), len(vocab) + 200)
        vocab[token] = piece
        ids.append(token)
    return ids, vocab


def expand(plan: EmbedsPlan, *pieces: str | int, dropped: str = "error"):
    ids, vocab = tokens(*pieces)
    return ids, expand_bounded_ids(
        ids,
        plan,
        PH,
        lambda xs: "".join(vocab[i] for i in xs),
        dropped,  # type: ignore[arg-type]
    )


def test_runs_replace_bounded_markers_in_rendered_order():
    plan = plan_of(2, 3)
    ids, (out, spans) = expand(
        plan, "a", PH, plan.parts[1].marker, PH, "b", PH, plan.parts[0].marker, PH
    )
    assert out == [ids[0], PH, PH, PH, ids[4], PH, PH]
    assert [s.shape[0] for s in spans] == [3, 2]


def test_a_repeated_part_repeats_its_rows():
    plan = plan_of(2)
    marker = plan.parts[0].marker
    _, (out, spans) = expand(plan, PH, marker, PH, "x", PH, marker, PH)
    assert out.count(PH) == 4 and len(spans) == 2


@pytest.mark.parametrize(
    "pieces",
    [
        (PH, "<|pe:", PH, "x", PH),  # a lone placeholder
        (PH, "<|pe:ffffffffffffffff:0|>", PH),  # not this request's marker
        ("x <|pe:0123456789abcdef:0|> y",),  # the marker without its placeholders
    ],
)
def test_altered_markers_are_refused(pieces):
    with pytest.raises(VLLMValidationError) as info:
        expand(plan_of(1), *pieces)
    assert info.value.args[0] == errors.MARKER_MANGLED


def test_a_dropped_part_is_refused_or_ignored():
    with pytest.raises(VLLMValidationError) as info:
        expand(plan_of(1), "x")
    assert info.value.args[0] == errors.PART_DROPPED.format(where="messages[0].content[0]")
    _, (out, spans) = expand(plan_of(1), "x", dropped="warn")
    assert spans == [] and PH not in out


def test_map_markers_bounds_and_unbounds_everywhere():
    plan = plan_of(1, 1)
    m0, m1 = (p.marker for p in plan.parts)
    messages = [{"role": "user", "content": [{"type": "text", "text": m0}], "reasoning": m1}]
    wrapped = map_markers(messages, plan, bounded)
    assert wrapped[0]["content"][0]["text"] == bounded(m0)
    assert wrapped[0]["reasoning"] == bounded(m1)
    assert map_markers(wrapped, plan, lambda marker: marker) == messages

"""Finding prompt_embeds markers in token ids (``marker_ids``), with real Tekken tokenizers.

The e2e model's Tekken file has no merges; real ones do. Here small Tekken files with merges
check that bounded markers survive any neighbours under Tekken's own pre-tokenizer, and that a
tokenizer that does merge a marker into its neighbours gets a clear 400, never a guess.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm.exceptions import VLLMValidationError

from vllm_chat_embeds import errors
from vllm_chat_embeds.renderers.marker_ids import bound_markers, bounded_marker, expand_marker_ids
from vllm_chat_embeds.renderers.parts import EmbedsPart, EmbedsPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from build_mistral_test_model import PATTERN, tekken_json  # noqa: E402

pytestmark = pytest.mark.unit

NONCE = "0123456789abcdef"
# Merges a real Tekken file has in some form: across the marker's own edges and across the
# separator mistral_common puts between text chunks ("\n\n").
MERGES = [">\n", ">\n\n", "|>", " <", "<|", "\n\n", "a0", "0<", ">0", "00"]


def tekkenizer(tmp_path: Path, merges: list[str], pattern: str = PATTERN) -> Any:
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = tekken_json()
    vocab = data["vocab"]
    for text in merges:
        token = text.encode()
        vocab.append(
            {"rank": len(vocab), "token_bytes": base64.b64encode(token).decode(), "token_str": text}
        )
    data["config"].update(
        pattern=pattern,
        num_vocab_tokens=len(vocab),
        default_vocab_size=len(vocab) + data["config"]["default_num_special_tokens"],
    )
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(data))
    return Tekkenizer.from_file(path)


def plan_of(*rows: int) -> EmbedsPlan:
    plan = EmbedsPlan(nonce=NONCE)
    for index, n in enumerate(rows):
        tensor = torch.full((n, 4), float(index))
        plan.parts.append(
            EmbedsPart(f"messages[0].content[{index}]", f"<|pe:{NONCE}:{index}|>", tensor)
        )
    return plan


def run(tok: Any, text: str, plan: EmbedsPlan, dropped: str = "error") -> tuple[list[int], list]:
    return expand_marker_ids(
        tok.encode(text, bos=False, eos=False),
        plan,
        encode=lambda t: tok.encode(t, bos=False, eos=False),
        decode=tok.decode,
        placeholder_id=tok.unk_id,
        dropped=dropped,  # type: ignore[arg-type]
    )


def rejected(fn, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(VLLMValidationError) as info:
        fn(*args, **kwargs)
    return info.value.args[0]


@pytest.mark.parametrize(
    ("before", "after"),
    [("a\n\n", "\n\nb"), ("a", "b"), ("a <", ">\n\n"), ("x a", "00 y"), ("", ""), ("12", "34")],
)
def test_bounded_markers_survive_merges_with_any_neighbours(tmp_path, before, after):
    tok = tekkenizer(tmp_path, MERGES)
    plan = plan_of(3, 2)
    a, b = (bounded_marker(p.marker) for p in plan.parts)
    text = f"{before}{a}\n\n{b}{after}"
    ids, spans = run(tok, text, plan)
    unk = tok.unk_id
    expected = [
        *tok.encode(before, bos=False, eos=False),
        *[unk] * 3,
        *tok.encode("\n\n", bos=False, eos=False),
        *[unk] * 2,
        *tok.encode(after, bos=False, eos=False),
    ]
    assert ids == expected
    assert [s.shape[0] for s in spans] == [3, 2]


def test_an_unbounded_marker_would_merge_which_is_why_markers_are_bounded(tmp_path):
    tok = tekkenizer(tmp_path, MERGES)
    marker = plan_of(1).parts[0].marker
    alone = tok.encode(marker, bos=False, eos=False)
    in_context = tok.encode(f"{marker}\n\nb", bos=False, eos=False)
    assert in_context[: len(alone)] != alone  # "|>" + "\n\n" became ">\n\n"


def test_a_tokenizer_that_merges_the_marker_gets_a_clear_400(tmp_path):
    # One pre-token for the whole text: the "a0" merge crosses into the marker.
    tok = tekkenizer(tmp_path, MERGES, pattern=r"[\s\S]+")
    plan = plan_of(2)
    text = f"a{bounded_marker(plan.parts[0].marker)}"
    message = rejected(run, tok, text, plan)
    assert message == errors.MARKER_MERGED.format(where="messages[0].content[0]")


def test_dropped_part_is_a_400_or_a_warning(tmp_path):
    tok = tekkenizer(tmp_path, MERGES)
    plan = plan_of(2, 1)
    text = f"a {bounded_marker(plan.parts[1].marker)}"
    message = rejected(run, tok, text, plan)
    assert message == errors.PART_DROPPED.format(where="messages[0].content[0]")
    ids, spans = run(tok, text, plan, dropped="warn")
    assert ids.count(tok.unk_id) == 1 and len(spans) == 1


def test_cut_marker_is_mangled(tmp_path):
    tok = tekkenizer(tmp_path, MERGES)
    plan = plan_of(1)
    text = f"a {bounded_marker(plan.parts[0].marker)[:-4]}"
    assert rejected(run, tok, text, plan) == errors.MARKER_MANGLED


def test_parts_in_reversed_order_map_to_their_own_spans(tmp_path):
    tok = tekkenizer(tmp_path, MERGES)
    plan = plan_of(1, 2)
    a, b = (bounded_marker(p.marker) for p in plan.parts)
    _, spans = run(tok, f"{b} {a}", plan)
    assert [float(s[0, 0]) for s in spans] == [1.0, 0.0]


def test_bound_markers_rewrites_only_this_plans_markers():
    plan = plan_of(1, 1)
    a, b = (p.marker for p in plan.parts)
    other = "<|pe:ffffffffffffffff:0|>"
    messages = [
        {"role": "user", "content": [{"type": "text", "text": a}, {"type": "text", "text": other}]},
        {"role": "assistant", "content": f"x{b}y", "reasoning": a},
    ]
    out = bound_markers(messages, plan)
    assert out[0]["content"][0]["text"] == bounded_marker(a)
    assert out[0]["content"][1]["text"] == other
    assert out[1]["content"] == f"x{bounded_marker(b)}y"
    assert out[1]["reasoning"] == bounded_marker(a)
    assert messages[0]["content"][0]["text"] == a  # the input is not modified

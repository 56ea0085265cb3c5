"""Unit tests for ``parts`` (extract and check prompt_embeds parts) and ``splice`` (markers)."""

from __future__ import annotations

import base64
import copy
import io
import re
from typing import Any

import pytest
import torch
from vllm.exceptions import VLLMValidationError

from vllm_chat_embeds import errors
from vllm_chat_embeds.limits import Limits
from vllm_chat_embeds.payload import PayloadSpec
from vllm_chat_embeds.placeholder import PLACEHOLDER_TOKEN
from vllm_chat_embeds.renderers import splice
from vllm_chat_embeds.renderers.parts import (
    ALLOWED_KEYS,
    EmbedsPart,
    EmbedsPlan,
    extract_parts,
    has_embeds_parts,
    reject_reserved_text,
)
from vllm_chat_embeds.renderers.splice import build_embeds_input, expand_markers

pytestmark = pytest.mark.unit

WIDTH = 8
SPEC = PayloadSpec(
    width=WIDTH, dtype=torch.float32, max_part_bytes=1 << 20, max_rows=64, rows_limit=64
)
LIMITS = Limits()
PH = 1000  # placeholder token id used in build_embeds_input tests
P = PLACEHOLDER_TOKEN


def where(msg: int, part: int) -> str:
    return errors.PART_WHERE.format(msg=msg, part=part)


def block(n: int, start: float) -> torch.Tensor:
    """``n`` rows whose values identify them: row i is all ``start + i``."""
    return (start + torch.arange(n, dtype=torch.float32)).unsqueeze(1).repeat(1, WIDTH)


def b64(tensor: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def embeds(tensor: torch.Tensor) -> dict[str, Any]:
    return {"type": "prompt_embeds", "data": b64(tensor)}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def rejected(fn, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(VLLMValidationError) as info:
        fn(*args, **kwargs)
    assert type(info.value) is VLLMValidationError
    return info.value.args[0]


def extract(messages: list[Any], **kwargs: Any) -> tuple[list[Any], EmbedsPlan | None]:
    options: dict[str, Any] = {"enabled": True, "spec": SPEC, "limits": LIMITS}
    options.update(kwargs)
    return extract_parts(messages, **options)


def conversation() -> list[dict[str, Any]]:
    """Three parts in three messages of different roles, with plain messages in between."""
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [text("look:"), embeds(block(2, 10)), text("and")]},
        {"role": "assistant", "content": [embeds(block(3, 20))]},
        {"role": "user", "content": "plain"},
        {"role": "tool", "tool_call_id": "c1", "content": [embeds(block(1, 30)), text("t")]},
    ]


# -- extract_parts -----------------------------------------------------------------------------


def test_no_parts_gives_messages_back_and_no_plan() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": [text("x")]}]
    out, plan = extract(messages, enabled=False)
    assert plan is None
    assert out == messages
    assert not has_embeds_parts(messages)


def test_caller_messages_are_not_modified() -> None:
    messages = conversation()
    before = copy.deepcopy(messages)
    contents = [m["content"] for m in messages]
    out, plan = extract(messages)
    assert plan is not None
    assert messages == before
    assert [m["content"] for m in messages] == contents
    assert all(a is b for a, b in zip((m["content"] for m in messages), contents, strict=True))
    # Messages without parts are passed through as they are; the others are copies.
    assert out[0] is messages[0] and out[3] is messages[3]
    assert out[1] is not messages[1] and out[1]["content"] is not messages[1]["content"]


def test_parts_become_marker_text_parts_in_place() -> None:
    messages = conversation()
    out, plan = extract(messages)
    assert plan is not None
    assert [p.where for p in plan.parts] == [where(1, 1), where(2, 0), where(4, 0)]
    markers = [p.marker for p in plan.parts]
    assert len(set(markers)) == 3
    assert all(plan.nonce in m for m in markers)
    assert out[1]["content"] == [text("look:"), text(markers[0]), text("and")]
    assert out[2]["content"] == [text(markers[1])]
    assert out[4]["content"] == [text(markers[2]), text("t")]
    # Every other field of a message survives.
    assert out[1]["role"] == "user" and out[2]["role"] == "assistant"
    assert out[4]["role"] == "tool" and out[4]["tool_call_id"] == "c1"
    assert out[0] == messages[0] and out[3] == messages[3]
    # The decoded rows are each part's own.
    assert torch.equal(plan.parts[0].tensor, block(2, 10))
    assert torch.equal(plan.parts[1].tensor, block(3, 20))
    assert torch.equal(plan.parts[2].tensor, block(1, 30))
    assert plan.num_rows == 6
    assert has_embeds_parts(messages)


def test_each_request_gets_its_own_nonce() -> None:
    _, first = extract(conversation())
    _, second = extract(conversation())
    assert first is not None and second is not None
    assert first.nonce != second.nonce
    assert not set(p.marker for p in first.parts) & set(p.marker for p in second.parts)


def test_tensor_data_is_accepted_offline() -> None:
    messages = [{"role": "user", "content": [{"type": "prompt_embeds", "data": block(4, 1)}]}]
    _, plan = extract(messages)
    assert plan is not None
    assert torch.equal(plan.parts[0].tensor, block(4, 1))


def test_not_enabled_names_the_first_part() -> None:
    messages = conversation()
    message = rejected(extract, messages, enabled=False)
    assert message == errors.NOT_ENABLED.format(where=where(1, 1))
    assert "messages[1].content[1]" in message


def test_unknown_keys_are_rejected() -> None:
    part = {**embeds(block(1, 0)), "ref": "abc", "cache": True}
    messages = [{"role": "user", "content": [text("a"), part]}]
    message = rejected(extract, messages)
    assert message == errors.UNKNOWN_KEYS.format(
        where=where(0, 1), keys=["cache", "ref"], allowed=sorted(ALLOWED_KEYS)
    )


@pytest.mark.parametrize(
    "part", [{"type": "prompt_embeds"}, {"type": "prompt_embeds", "data": None}]
)
def test_missing_or_null_data_is_rejected(part: dict[str, Any]) -> None:
    messages = [{"role": "user", "content": "x"}, {"role": "user", "content": [part]}]
    assert rejected(extract, messages) == errors.DATA_MISSING.format(where=where(1, 0))


def test_too_many_parts() -> None:
    messages = [{"role": "user", "content": [embeds(block(1, i)) for i in range(3)]}]
    message = rejected(extract, messages, limits=Limits(max_parts=2))
    assert message == errors.TOO_MANY_PARTS.format(count=3, limit=2)
    _, plan = extract(messages, limits=Limits(max_parts=3))
    assert plan is not None and len(plan.parts) == 3


def test_total_rows_over_limit_across_parts_names_the_part_that_crosses_it() -> None:
    messages = [
        {"role": "user", "content": [embeds(block(40, 0))]},
        {"role": "user", "content": [text("x"), embeds(block(25, 0))]},
    ]
    message = rejected(extract, messages)
    assert message == errors.TOO_MANY_ROWS.format(where=where(1, 1), limit=64)


def test_total_rows_exactly_at_limit_is_accepted() -> None:
    messages = [
        {"role": "user", "content": [embeds(block(40, 0))]},
        {"role": "user", "content": [embeds(block(24, 0))]},
    ]
    _, plan = extract(messages)
    assert plan is not None and plan.num_rows == 64


def test_total_base64_over_request_limit() -> None:
    parts = [embeds(block(8, i)) for i in range(2)]
    total = sum(len(p["data"]) for p in parts)
    limit = (total // 4) * 3 - 1
    messages = [{"role": "user", "content": parts}]
    message = rejected(extract, messages, limits=Limits(max_request_bytes=limit))
    assert message == errors.TOO_MANY_REQUEST_BYTES.format(size=(total // 4) * 3, limit=limit)


def test_payload_errors_name_their_own_part() -> None:
    messages = [
        {"role": "user", "content": [embeds(block(2, 0))]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [text("a"), text("b"), embeds(torch.zeros(2, WIDTH + 1))]},
    ]
    message = rejected(extract, messages)
    assert message == errors.BAD_WIDTH.format(where=where(2, 2), got=WIDTH + 1, width=WIDTH)


def test_scrub_removes_this_plans_markers_only() -> None:
    out, plan = extract(conversation())
    assert plan is not None
    _, other = extract([{"role": "user", "content": [embeds(block(1, 0))]}])
    assert other is not None
    stray = other.parts[0].marker
    value = {"a": [out[1]["content"], f"x{plan.parts[2].marker}y{stray}"], "n": 3}
    assert plan.scrub(value) == {
        "a": [[text("look:"), text("and")], f"xy{stray}"],
        "n": 3,
    }


# -- reject_reserved_text ----------------------------------------------------------------------


def reserved(path: str) -> str:
    return errors.RESERVED_TEXT.format(where=path, token=PLACEHOLDER_TOKEN)


def test_clean_messages_and_tools_pass() -> None:
    messages = conversation()
    tools = [{"type": "function", "function": {"name": "f", "description": "<prompt_embed>"}}]
    assert reject_reserved_text(messages, tools) is None


@pytest.mark.parametrize(
    ("messages", "path"),
    [
        ([{"role": "user", "content": f"a {P} b"}], "messages[0].content"),
        (
            [{"role": "user", "content": "x"}, {"role": "user", "content": [text("ok"), text(P)]}],
            "messages[1].content[1].text",
        ),
        ([{"role": "user", "name": f"bob{P}", "content": "x"}], "messages[0].name"),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "reasoning": P, "content": ""},
            ],
            "messages[1].reasoning",
        ),
        (
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        },
                        {
                            "id": "2",
                            "type": "function",
                            "function": {"name": "g", "arguments": f'{{"q": "{P}"}}'},
                        },
                    ],
                }
            ],
            "messages[0].tool_calls[1].function.arguments",
        ),
        (
            [{"role": "user", "content": [embeds(block(1, 0)), text(f"x{P}")]}],
            "messages[0].content[1].text",
        ),
    ],
    ids=["string-content", "text-part", "name", "reasoning", "tool-call-arguments", "after-part"],
)
def test_reserved_text_in_messages(messages: list[Any], path: str) -> None:
    assert rejected(reject_reserved_text, messages) == reserved(path)


@pytest.mark.parametrize(
    ("tools", "path"),
    [
        (
            [{"type": "function", "function": {"name": "f", "description": f"use {P}"}}],
            "tools[0].function.description",
        ),
        (
            [
                {"type": "function", "function": {"name": "f"}},
                {
                    "type": "function",
                    "function": {
                        "name": "g",
                        "parameters": {
                            "type": "object",
                            "properties": {"q": {"type": "string", "description": P}},
                        },
                    },
                },
            ],
            "tools[1].function.parameters.properties.q.description",
        ),
        (
            [{"type": "function", "function": {"name": "g", "parameters": {"enum": ["a", P]}}}],
            "tools[0].function.parameters.enum[1]",
        ),
    ],
    ids=["description", "parameter-description", "enum-value"],
)
def test_reserved_text_in_tools(tools: list[Any], path: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert rejected(reject_reserved_text, messages, tools) == reserved(path)


def test_reserved_text_in_tool_parameter_name() -> None:
    tools = [
        {
            "type": "function",
            "function": {"name": "g", "parameters": {"type": "object", "properties": {P: {}}}},
        }
    ]
    with pytest.raises(VLLMValidationError, match=re.escape(repr(P))):
        reject_reserved_text([{"role": "user", "content": "hi"}], tools)


# -- expand_markers ----------------------------------------------------------------------------


def two_part_plan() -> tuple[EmbedsPlan, EmbedsPart, EmbedsPart]:
    messages = [
        {"role": "user", "content": [embeds(block(2, 10))]},
        {"role": "user", "content": [text("x"), embeds(block(3, 20))]},
    ]
    _, plan = extract(messages)
    assert plan is not None
    return plan, plan.parts[0], plan.parts[1]


def fixed_plan() -> tuple[EmbedsPlan, EmbedsPart]:
    """A plan built by hand whose nonce holds letters (so re-casing changes it)."""
    nonce = "abcdef0123456789"
    part = EmbedsPart(where=where(0, 0), marker=f"<|pe:{nonce}:0|>", tensor=block(2, 1))
    return EmbedsPlan(nonce=nonce, parts=[part]), part


def test_markers_in_order() -> None:
    plan, a, b = two_part_plan()
    out, spans = expand_markers(f"<s>{a.marker} mid {b.marker}</s>", plan, "error")
    assert out == f"<s>{P * 2} mid {P * 3}</s>"
    assert len(spans) == 2 and spans[0] is a.tensor and spans[1] is b.tensor


def test_reordered_markers_map_each_part_to_its_own_span() -> None:
    plan, a, b = two_part_plan()
    out, spans = expand_markers(f"first {b.marker} then {a.marker}.", plan, "error")
    assert out == f"first {P * 3} then {P * 2}."
    assert [s.shape[0] for s in spans] == [3, 2]
    assert spans[0] is b.tensor and spans[1] is a.tensor
    assert torch.equal(torch.cat(spans), torch.cat([block(3, 20), block(2, 10)]))


def test_duplicated_marker_repeats_that_parts_rows() -> None:
    plan, a, b = two_part_plan()
    out, spans = expand_markers(f"{a.marker}|{b.marker}|{a.marker}", plan, "error")
    assert out == f"{P * 2}|{P * 3}|{P * 2}"
    assert len(spans) == 3
    assert spans[0] is a.tensor and spans[1] is b.tensor and spans[2] is a.tensor


def test_many_markers_whose_indices_share_prefixes() -> None:
    # Markers 1, 10 and 11 share a prefix; each must still match only itself.
    messages = [{"role": "user", "content": [embeds(block(1, i)) for i in range(12)]}]
    _, plan = extract(messages)
    assert plan is not None
    order = [11, 1, 10, 0, 5, 2, 3, 4, 6, 7, 8, 9]
    out, spans = expand_markers("".join(plan.parts[i].marker for i in order), plan, "error")
    assert out == P * 12
    assert [int(s[0, 0]) for s in spans] == order


def test_dropped_part_is_an_error_by_default() -> None:
    plan, a, b = two_part_plan()
    message = rejected(expand_markers, f"only {a.marker}", plan, "error")
    assert message == errors.PART_DROPPED.format(where=b.where)
    assert b.where == where(1, 1)


def test_dropped_part_only_warns_with_warn_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    plan, a, b = two_part_plan()
    warnings: list[tuple[Any, ...]] = []
    monkeypatch.setattr(splice.logger, "warning", lambda *args: warnings.append(args))
    out, spans = expand_markers(f"only {a.marker}", plan, "warn")
    assert out == f"only {P * 2}"
    assert len(spans) == 1 and spans[0] is a.tensor
    assert len(warnings) == 1 and b.where in warnings[0]


def test_all_parts_dropped_with_warn_policy() -> None:
    plan, _, _ = two_part_plan()
    assert expand_markers("nothing here", plan, "warn") == ("nothing here", [])


@pytest.mark.parametrize("dropped", ["error", "warn"])
@pytest.mark.parametrize(
    "mangle",
    [
        lambda m: m.upper(),
        lambda m: m[:-2],  # "|>" cut off
        lambda m: m[:-1],
        lambda m: m[2:],  # "<|" cut off
        lambda m: m.replace("<", "&lt;").replace(">", "&gt;"),  # HTML-escaped
        lambda m: m.replace(":0|>", ":9|>"),  # an index that names no part
    ],
    ids=["upper", "cut-end", "cut-last-char", "cut-start", "escaped", "wrong-index"],
)
def test_mangled_marker_is_rejected(mangle, dropped: str) -> None:
    plan, part = fixed_plan()
    message = rejected(expand_markers, f"a {mangle(part.marker)} b", plan, dropped)
    assert message == errors.MARKER_MANGLED


def test_mangled_copy_next_to_an_intact_marker_is_rejected() -> None:
    plan, a, b = two_part_plan()
    message = rejected(expand_markers, f"{a.marker}{b.marker}{b.marker[:-2]}", plan, "error")
    assert message == errors.MARKER_MANGLED


def test_marker_of_another_request_is_left_alone() -> None:
    plan, a, b = two_part_plan()
    _, other = extract([{"role": "user", "content": [embeds(block(1, 0))]}])
    assert other is not None
    stray = other.parts[0].marker
    out, spans = expand_markers(f"{a.marker}{stray}{b.marker}", plan, "error")
    assert out == f"{P * 2}{stray}{P * 3}"
    assert len(spans) == 2


# -- build_embeds_input ------------------------------------------------------------------------


def test_rows_land_at_placeholder_positions() -> None:
    a, b = block(2, 10), block(3, 20)
    ids = [1, 2, PH, PH, 3, PH, PH, PH, 4]
    result = build_embeds_input(ids, [a, b], PH, compact=False)
    assert result["type"] == "embeds"
    # Embedding rows carry token id 0 (the placeholder id may lie past the vocabulary).
    assert result["prompt_token_ids"] == [1, 2, 0, 0, 3, 0, 0, 0, 4]
    assert result["is_token_ids"] == [True, True, False, False, True, False, False, False, True]
    dense = result["prompt_embeds"]
    assert dense.shape == (len(ids), WIDTH)
    assert dense.dtype == torch.float32
    assert torch.equal(dense[2:4], a)
    assert torch.equal(dense[5:8], b)
    assert torch.equal(dense[[0, 1, 4, 8]], torch.zeros(4, WIDTH))
    assert "cache_salt" not in result


def test_compact_input_carries_only_the_rows() -> None:
    a, b = block(2, 10), block(3, 20)
    ids = [1, 2, PH, PH, 3, PH, PH, PH, 4]
    compact = build_embeds_input(ids, [a, b], PH)
    dense = build_embeds_input(ids, [a, b], PH, compact=False)
    assert torch.equal(compact["prompt_embeds"], torch.cat([a, b]))
    mask = torch.tensor(compact["is_token_ids"])
    assert torch.equal(dense["prompt_embeds"][~mask], compact["prompt_embeds"])
    assert compact["prompt_token_ids"] == dense["prompt_token_ids"]
    assert compact["is_token_ids"] == dense["is_token_ids"]


def test_adjacent_spans_of_two_parts() -> None:
    a, b = block(2, 10), block(3, 20)
    ids = [7, PH, PH, PH, PH, PH, 8]
    result = build_embeds_input(ids, [a, b], PH, compact=False)
    assert result["is_token_ids"] == [True] + [False] * 5 + [True]
    assert torch.equal(result["prompt_embeds"][1:6], torch.cat([a, b]))


def test_span_order_follows_the_given_spans() -> None:
    a, b = block(2, 10), block(3, 20)
    ids = [PH, PH, PH, 5, PH, PH]
    result = build_embeds_input(ids, [b, a], PH, compact=False)
    assert torch.equal(result["prompt_embeds"][0:3], b)
    assert torch.equal(result["prompt_embeds"][4:6], a)


def test_prompt_made_only_of_placeholders() -> None:
    a = block(3, 1)
    result = build_embeds_input([PH, PH, PH], [a], PH, cache_salt="salt")
    assert result["is_token_ids"] == [False, False, False]
    assert torch.equal(result["prompt_embeds"], a)
    assert result["cache_salt"] == "salt"


def test_dtype_of_the_rows_is_kept() -> None:
    a = block(2, 1).to(torch.bfloat16)
    result = build_embeds_input([1, PH, PH], [a], PH, compact=False)
    assert result["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(result["prompt_embeds"][1:], a)


@pytest.mark.parametrize(
    ("ids", "found"),
    [
        ([PH, 5, PH, PH], 3),  # truncation cut a row of the first span
        ([1, PH, PH, PH, PH], 4),
        ([PH, PH, PH, PH, PH, PH], 6),  # one placeholder too many
        ([1, 2, 3], 0),
    ],
)
def test_wrong_placeholder_count_is_spans_cut(ids: list[int], found: int) -> None:
    message = rejected(build_embeds_input, ids, [block(2, 0), block(3, 0)], PH)
    assert message == errors.SPANS_CUT.format(found=found, expected=5)


@pytest.mark.parametrize(
    "ids",
    [
        [PH, 1, PH, PH, PH, PH],  # first span split
        [PH, PH, PH, 1, PH, PH],  # second span split
        [PH, PH, 1, PH, 2, PH, PH],
    ],
)
def test_right_count_but_split_span_is_spans_cut(ids: list[int]) -> None:
    message = rejected(build_embeds_input, ids, [block(2, 0), block(3, 0)], PH)
    assert message == errors.SPANS_CUT.format(found=5, expected=5)


# -- the pieces together -----------------------------------------------------------------------


def render(messages: list[Any]) -> str:
    """A stand-in chat template: role headers and the text of every part."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        out.append(f"<{message['role']}>{content}")
    return "".join(out)


def tokenize(text: str) -> list[int]:
    """One id per character, the placeholder string as one token ``PH``."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(P)):
        if i:
            ids.append(PH)
        ids.extend(ord(c) for c in chunk)
    return ids


def test_extract_expand_build_round_trip() -> None:
    messages = conversation()
    out, plan = extract(messages)
    assert plan is not None
    prompt, spans = expand_markers(render(out), plan, "error")
    ids = tokenize(prompt)
    result = build_embeds_input(ids, spans, PH, compact=False)
    mask = torch.tensor(result["is_token_ids"])
    assert int((~mask).sum()) == 6
    assert torch.equal(
        result["prompt_embeds"][~mask], torch.cat([block(2, 10), block(3, 20), block(1, 30)])
    )
    # The text around the parts is tokenized as usual.
    kept = "".join(chr(i) for i, is_tok in zip(ids, result["is_token_ids"], strict=True) if is_tok)
    assert kept == "<system>You are terse.<user>look:and<assistant><user>plain<tool>t"

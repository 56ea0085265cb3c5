"""``LLM.chat()`` with prompt_embeds parts: parity with text, tensors or base64, clear errors."""

from __future__ import annotations

import pytest
import torch
from chat_cases import CASES, STRING_CONTENT, as_text, render
from conftest import tensor_b64
from hostile_cases import PLACEMENTS
from test_hostile_online import placement_failures
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from vllm_chat_embeds import errors

pytestmark = pytest.mark.e2e

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def generate(llm, messages, **kwargs):
    out = llm.chat(messages, GREEDY, use_tqdm=False, **kwargs)[0]
    return len(out.prompt_token_ids), list(out.outputs[0].token_ids)


@pytest.mark.parametrize("form", ["tensor", "base64"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_offline_parity(offline_llm, table, name, form):
    def part(text):
        rows = table.rows(text)
        return {"type": "prompt_embeds", "data": rows if form == "tensor" else tensor_b64(rows)}

    case = CASES[name]
    assert generate(offline_llm, render(case, part)) == generate(offline_llm, as_text(case))


def test_offline_string_content_template(offline_llm, table):
    case = CASES["every_role"]
    reference = generate(offline_llm, as_text(case), chat_template=STRING_CONTENT)
    assert generate(offline_llm, render(case, table.part), chat_template=STRING_CONTENT) == (
        reference
    )


def test_offline_batch_of_conversations(offline_llm, table):
    cases = [CASES["one_part"], CASES["interleaved"], CASES["multi_turn"]]
    outs = offline_llm.chat([render(c, table.part) for c in cases], GREEDY, use_tqdm=False)
    refs = offline_llm.chat([as_text(c) for c in cases], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in refs]


def test_offline_bad_payload_raises_clear_error_then_recovers(offline_llm, table):
    rows = table.rows(" return world + 1")
    rows[0, 0] = float("nan")
    messages = [{"role": "user", "content": [{"type": "prompt_embeds", "data": rows}]}]
    with pytest.raises(VLLMValidationError) as info:
        offline_llm.chat(messages, GREEDY, use_tqdm=False)
    assert info.value.args[0] == errors.NOT_FINITE.format(where="messages[0].content[0]")
    case = CASES["one_part"]
    assert generate(offline_llm, render(case, table.part)) == generate(offline_llm, as_text(case))


def test_offline_random_rows_change_output(offline_llm, table):
    case = CASES["one_part"]
    torch.manual_seed(1)
    noise = {"type": "prompt_embeds", "data": torch.randn_like(table.rows(" return world + 1"))}
    assert generate(offline_llm, render(case, lambda _: noise)) != generate(
        offline_llm, as_text(case)
    )


def test_generate_embeds_prompt_with_out_of_vocab_token_id_is_refused(offline_llm, table):
    rows = table.rows("def hello(world): return world")
    n = rows.shape[0]
    mask = [True] * n
    mask[1] = False
    ids = [5] * n
    ids[0] = 10**6  # at a token position: would index past the embedding table
    prompt = {"prompt_embeds": rows, "prompt_token_ids": ids, "prompt_is_token_ids": mask}
    with pytest.raises(VLLMValidationError, match="out of vocabulary"):
        offline_llm.generate(prompt, GREEDY, use_tqdm=False)
    ids[0] = 5
    ids[1] = 10**6  # at an embedding position: never looked up, replaced by 0
    plp = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=1)
    out = offline_llm.generate(prompt, plp, use_tqdm=False)[0]
    assert out.prompt_logprobs[1] is None
    assert len(out.outputs[0].token_ids) == 4


def test_generate_embeds_prompt_with_mismatched_ids_is_refused(offline_llm, table):
    rows = table.rows("def hello(world):")
    prompt = {"prompt_embeds": rows, "prompt_token_ids": [5] * (rows.shape[0] + 1)}
    with pytest.raises(VLLMValidationError) as info:
        offline_llm.generate(prompt, GREEDY, use_tqdm=False)
    assert info.value.args[0] == errors.IDS_LENGTH.format(ids=rows.shape[0] + 1, rows=rows.shape[0])


@pytest.mark.parametrize("placement", PLACEMENTS, ids=[p.name for p in PLACEMENTS])
def test_every_bad_part_at_every_place_offline(offline_llm, table, placement):
    """The placed hostile table through ``LLM.chat()``: our message naming the part's place."""
    one_token = SamplingParams(temperature=0.0, max_tokens=1)

    def send(messages):
        try:
            offline_llm.chat(messages, one_token, use_tqdm=False)
        except VLLMValidationError as exc:
            return 400, str(exc.args[0])
        return 200, None

    width = int(table.weight.shape[1])
    assert placement_failures(send, placement, table, width) == []


@pytest.mark.parametrize("form", ["tensor", "base64"])
def test_offline_parts_by_reference(offline_llm, table, form):
    """LLM.chat(): a part's data once under a uuid, then the uuid alone; same tokens as text.
    A tensor the caller changes afterwards does not change the kept rows."""
    case = CASES["multi_turn"]
    tag = f"offline-{form}-"
    given: list[torch.Tensor] = []

    def sent(text):
        rows = table.rows(text)
        given.append(rows)
        data = rows if form == "tensor" else tensor_b64(rows)
        return {"type": "prompt_embeds", "data": data, "uuid": tag + text}

    reference = generate(offline_llm, as_text(case))
    assert generate(offline_llm, render(case, sent)) == reference
    for rows in given:
        rows.fill_(3.0)
    by_uuid = render(case, lambda text: {"type": "prompt_embeds", "uuid": tag + text})
    assert generate(offline_llm, by_uuid) == reference
    unknown = [{"role": "user", "content": [{"type": "prompt_embeds", "uuid": tag + "nope"}]}]
    with pytest.raises(VLLMValidationError) as info:
        offline_llm.chat(unknown, GREEDY, use_tqdm=False)
    where = "messages[0].content[0]"
    assert info.value.args[0] == errors.REFERENCE_UNKNOWN.format(where=where, uuid=tag + "nope")


# Keeping these many last tokens cuts these chats after every part (8: the template's tail),
# through a part (9, 10, 12, 14 for most), at a part's first row or before it (12, 14, 16).
OFFLINE_CUTS = {"compact": (8, 9, 10, 12, 14, 16), "dense": (9, 12)}


@pytest.mark.parametrize("transport", sorted(OFFLINE_CUTS))
def test_offline_truncation_through_parts(offline_llm, table, transport):
    """``tokenization_kwargs={"truncate_prompt_tokens": k}``: the same tokens as the text chat
    cut at k, with the parts first, in the middle, last, alone and several, in one batch."""
    import dataclasses

    renderer = offline_llm.llm_engine.renderer
    limits = renderer.limits
    renderer.limits = dataclasses.replace(limits, compact=transport == "compact")
    short = SamplingParams(temperature=0.0, max_tokens=4)
    cases = [CASES[n] for n in ("only_embeds", "interleaved", "several_parts", "one_part")]
    batch = [render(c, table.part) for c in cases] + [as_text(c) for c in cases]
    try:
        for k in OFFLINE_CUTS[transport]:
            options = {"tokenization_kwargs": {"truncate_prompt_tokens": k}}
            outs = offline_llm.chat(batch, short, use_tqdm=False, **options)
            got = [(o.prompt_token_ids, o.outputs[0].token_ids) for o in outs]
            assert all(len(ids) == k for ids, _ in got)
            assert [t for _, t in got[: len(cases)]] == [t for _, t in got[len(cases) :]], k
    finally:
        renderer.limits = limits

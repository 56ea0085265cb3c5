"""Offline (``LLM``) LoRA with parts, and ``LLM.beam_search`` on embeds prompts.

One LoRA-enabled ``LLM`` for the module (it coexists with the session's ``offline_llm``); it
keeps one LoRA slot more than adapters for the reason given in ``feature_server``.
"""

from __future__ import annotations

import pytest
import torch
from chat_cases import CASES, as_text, render
from conftest import LORA_NAMES, make_offline_llm

pytestmark = pytest.mark.e2e

POSITIONS = ("only_embeds", "one_part", "several_parts", "interleaved")


@pytest.fixture(scope="session")
def lora_llm(tiny_model, vllm_cache_root):
    # Session scope: deleting an in-process LLM tears down vLLM's process-wide distributed
    # state, which would break every other LLM of this test process (``offline_llm``).
    llm = make_offline_llm(
        tiny_model, vllm_cache_root, enable_lora=True, max_lora_rank=8, max_loras=3
    )
    yield llm
    del llm


@pytest.fixture(scope="module")
def loras(lora_adapters):
    from vllm.lora.request import LoRARequest

    return {
        name: LoRARequest(name, index, str(path))
        for index, (name, path) in enumerate(lora_adapters.items(), start=1)
    }


def _greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=12)


def answers(llm, conversations, lora_request=None) -> list[str]:
    outputs = llm.chat(conversations, _greedy(), lora_request=lora_request, use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


@pytest.mark.parametrize("case", POSITIONS)
def test_offline_adapter_parity(lora_llm, loras, table, case):
    base = answers(lora_llm, [as_text(CASES[case])])
    for name in LORA_NAMES:
        lora = loras[name]
        text = answers(lora_llm, [as_text(CASES[case])], lora)
        parts = answers(lora_llm, [render(CASES[case], table.part)], lora)
        assert text[0], "the adapter must generate something"
        assert parts == text
        assert text != base


def test_offline_batch_of_adapters_and_base_model(lora_llm, loras, table):
    conversations = [render(CASES[case], table.part) for case in POSITIONS] + [
        as_text(CASES["one_part"])
    ]
    adapters = [loras["lora-a"], loras["lora-b"], None, loras["lora-a"], None]
    alone = [answers(lora_llm, [c], a)[0] for c, a in zip(conversations, adapters, strict=True)]
    assert answers(lora_llm, conversations, adapters) == alone


# -- LLM.beam_search -----------------------------------------------------------------------------

PROMPT = "def hello(world): return world + 1 if world else None"


def _beams(llm, prompt, lora_request=None, prompt_len: int = 0) -> list[list[int]]:
    from vllm.sampling_params import BeamSearchParams

    params = BeamSearchParams(beam_width=3, max_tokens=6)
    (output,) = llm.beam_search([prompt], params, lora_request=lora_request)
    return [list(seq.tokens[prompt_len:]) for seq in output.sequences]


@pytest.mark.parametrize(
    ("span", "adapter"),
    [("first", None), ("middle", None), ("last", None), ("every", None), ("middle", "lora-a")],
)
def test_offline_beam_search_on_embeds_prompts(lora_llm, loras, table, span, adapter):
    """The beams of an embeds prompt equal those of the same prompt as token ids."""
    ids = table.tokenizer(PROMPT).input_ids
    n = len(ids)
    embedded = {"first": range(0, 4), "middle": range(4, 9), "last": range(n - 5, n)}
    lora = loras[adapter] if adapter else None
    reference = _beams(lora_llm, {"prompt_token_ids": ids}, lora, n)
    assert len({tuple(b) for b in reference}) == 3, "three different beams, or parity is weak"
    rows = table.weight[ids].clone()
    if span == "every":  # rows only, no ids: vLLM's plain embeds prompt
        prompt = {"prompt_embeds": rows}
    else:
        mask = [i not in embedded[span] for i in range(n)]
        rows[torch.tensor(mask)] = 0.0  # token positions: the row is not used
        prompt = {"prompt_embeds": rows, "prompt_token_ids": ids, "prompt_is_token_ids": mask}
    assert _beams(lora_llm, prompt, lora, n) == reference

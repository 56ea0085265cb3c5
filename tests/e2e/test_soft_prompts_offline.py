"""Soft prompts with ``LLM.chat`` / ``LLM.generate``: by name (``soft_prompt(name)``) equal to
``PeftModel.generate``, and as named parts, in the session's one in-process ``LLM``."""

from __future__ import annotations

import pytest
from conftest import MODELS
from soft_prompt_peft import build_prompt_tuning, peft_greedy, prompt_rows, without_eos
from vllm import SamplingParams

import vllm_chat_embeds
from vllm_chat_embeds.stores.soft_prompts import SoftPromptError

pytestmark = pytest.mark.e2e

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "def hello(world):"},
]


@pytest.fixture(scope="module")
def soft(offline_llm, tiny_model):
    """``sp-offline`` served by the in-process LLM, loaded after it was built."""
    path = build_prompt_tuning(
        tiny_model, MODELS / "soft-prompts" / "offline", virtual_tokens=7, seed=5
    )
    vllm_chat_embeds.load_soft_prompt("sp-offline", str(path), llm=offline_llm)
    return path


def test_chat_and_generate_by_name_equal_peft_generate(offline_llm, tiny_model, soft):
    base = offline_llm.chat(MESSAGES, GREEDY, use_tqdm=False)[0]
    ids = list(base.prompt_token_ids)
    expected = peft_greedy(tiny_model, soft, ids, MAX_TOKENS)
    with vllm_chat_embeds.soft_prompt("sp-offline"):
        chat = offline_llm.chat([MESSAGES, MESSAGES], GREEDY, use_tqdm=False)
        generated = offline_llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    for out in [*chat, *generated]:
        assert without_eos(list(out.outputs[0].token_ids)) == expected
        assert len(out.prompt_token_ids) == len(ids) + 7
    # Outside the block the base model answers again.
    after = offline_llm.chat(MESSAGES, GREEDY, use_tqdm=False)[0]
    assert list(after.outputs[0].token_ids) == list(base.outputs[0].token_ids)


def test_generate_embeds_prompts_by_name_get_the_rows_first(offline_llm, tiny_model, soft, table):
    """Embeds prompts (all rows, or rows with ids and a mask) inside ``soft_prompt(name)``."""
    ids = list(offline_llm.chat(MESSAGES, GREEDY, use_tqdm=False)[0].prompt_token_ids)
    expected = peft_greedy(tiny_model, soft, ids, MAX_TOKENS)
    rows = table.weight[ids]
    mask = [True] * len(ids)
    mask[1] = mask[2] = False  # two positions given as rows, the rest as ids
    prompts = [
        {"prompt_embeds": rows},
        {"prompt_embeds": rows, "prompt_token_ids": ids, "prompt_is_token_ids": mask},
    ]
    with vllm_chat_embeds.soft_prompt("sp-offline"):
        outs = offline_llm.generate(prompts, GREEDY, use_tqdm=False)
    for out in outs:
        assert without_eos(list(out.outputs[0].token_ids)) == expected
        assert len(out.prompt_token_ids) == len(ids) + 7


def test_named_part_equals_the_rows_as_data(offline_llm, soft):
    def content(part):
        return [{"role": "user", "content": [{"type": "text", "text": "import os"}, part]}]

    named = offline_llm.chat(
        content({"type": "prompt_embeds", "name": "sp-offline"}), GREEDY, use_tqdm=False
    )[0]
    data = offline_llm.chat(
        content({"type": "prompt_embeds", "data": prompt_rows(soft)}), GREEDY, use_tqdm=False
    )[0]
    assert list(named.outputs[0].token_ids) == list(data.outputs[0].token_ids)


def test_unknown_name_raises_before_rendering(offline_llm, soft):
    with pytest.raises(SoftPromptError, match="sp-nope"):
        with vllm_chat_embeds.soft_prompt("sp-nope"):
            offline_llm.chat(MESSAGES, GREEDY, use_tqdm=False)


@pytest.mark.parametrize("problem", ["prefix_tuning", "wrong_width", "nan"])
def test_building_a_renderer_refuses_a_bad_entry_by_name(
    tiny_model, tmp_path, monkeypatch, problem
):
    """What ``vllm serve`` and ``LLM(...)`` hit at start-up: the renderer reads the variable."""
    import torch
    from safetensors.torch import save_file
    from soft_prompt_peft import build_prefix_tuning
    from vllm.config import ModelConfig, VllmConfig
    from vllm.renderers.registry import renderer_from_config

    vllm_chat_embeds.register()
    good = build_prompt_tuning(tiny_model, MODELS / "soft-prompts" / "a", virtual_tokens=6, seed=1)
    if problem == "prefix_tuning":
        bad = build_prefix_tuning(tiny_model, tmp_path / "prefix")
        expected = "is a PEFT PREFIX_TUNING checkpoint"
    else:
        rows = torch.randn(3, 32 if problem == "wrong_width" else 64)
        if problem == "nan":
            rows[1, 1] = float("nan")
        bad = tmp_path / "bad.safetensors"
        save_file({"rows": rows}, str(bad))
        expected = "width 32 does not match" if problem == "wrong_width" else "NaN"
    monkeypatch.setenv("CHAT_EMBEDS_SOFT_PROMPTS", f"good={good},bad={bad}")
    config = ModelConfig(str(tiny_model), enable_prompt_embeds=True, dtype="float32")
    with pytest.raises(SoftPromptError) as info:
        renderer_from_config(VllmConfig(model_config=config))
    assert str(info.value).startswith(f"Soft prompt bad={bad}: ")
    assert expected in str(info.value)

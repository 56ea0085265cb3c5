"""prompt_embeds parts in vLLM's other tokenizer modes (``renderers.generic``).

Each served mode renders the same chats twice through the real renderer, with a tiny Llama
whose tokenizer carries that mode's structural tokens (``tools/build_renderers_test_model.py``):
once as text, once with some text given as its embedding rows. The engine input must hold the
text path's token ids everywhere but at the rows, and exactly the model's own rows of the text
path's tokens there. Real ``vllm serve`` runs in modes deepseek_v32 (token ids out) and
cohere (text out) then check greedy parity end to end. Modes we do not serve keep refusing
parts with a 400 naming the mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from chat_cases import CASES, as_text, render
from conftest import MODELS, EmbeddingTable, Server, build_model, run_server, server_env
from hostile_cases import CASES as HOSTILE
from test_hostile_online import hostile_outcome, post
from vllm.config import ModelConfig, VllmConfig
from vllm.exceptions import VLLMValidationError
from vllm.renderers.params import ChatParams
from vllm.renderers.registry import renderer_from_config

import vllm_chat_embeds
from vllm_chat_embeds import errors
from vllm_chat_embeds.placeholder import PLACEHOLDER_TOKEN
from vllm_chat_embeds.renderers.generic import bounded

pytestmark = pytest.mark.e2e

SERVED = ["deepseek_v32", "deepseek_v4", "deepseek_v41", "kimi_k3", "cohere", "inkling"]
REFUSED = ["kimi_audio", "terratorch"]
# DeepSeek V4 thinks by default; chat mode keeps the prompts short.
TEMPLATE_KWARGS: dict[str, dict[str, Any]] = {
    "deepseek_v4": {"thinking": False},
    "deepseek_v41": {"thinking": False},
}
RENDER_CASES = ["one_part", "only_embeds", "several_parts", "adjacent_parts", "every_role"]
GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="module")
def renderers_model() -> Path:
    return build_model("build_renderers_test_model.py", MODELS / "tiny-renderers-test")


@pytest.fixture(scope="module")
def rows_table(renderers_model: Path) -> EmbeddingTable:
    return EmbeddingTable(renderers_model)


_BUILT: dict[str, Any] = {}


def renderer_for(model: Path, mode: str) -> Any:
    if mode not in _BUILT:
        vllm_chat_embeds.register()
        config = ModelConfig(
            str(model), tokenizer_mode=mode, enable_prompt_embeds=True, dtype="float32"
        )
        _BUILT[mode] = renderer_from_config(VllmConfig(model_config=config))
    return _BUILT[mode]


def engine_input(
    renderer: Any, mode: str, messages: list, tok_params: Any = None
) -> tuple[list, Any]:
    kwargs = {"add_generation_prompt": True, **TEMPLATE_KWARGS.get(mode, {})}
    conversations, prompts = renderer.render_chat(
        [messages], ChatParams(chat_template_kwargs=kwargs), tok_params
    )
    return conversations[0], prompts[0]


@pytest.mark.parametrize("case", RENDER_CASES)
@pytest.mark.parametrize("mode", SERVED)
def test_rows_take_the_places_of_their_text(renderers_model, rows_table, mode, case):
    renderer = renderer_for(renderers_model, mode)
    assert type(renderer).__name__.startswith("ChatEmbeds"), type(renderer)
    _, reference = engine_input(renderer, mode, as_text(CASES[case]))
    conversation, with_rows = engine_input(renderer, mode, render(CASES[case], rows_table.part))
    assert reference["type"] == "token" and with_rows["type"] == "embeds"

    ref_ids, ids = reference["prompt_token_ids"], with_rows["prompt_token_ids"]
    mask = torch.tensor(with_rows["is_token_ids"])
    assert len(ids) == len(ref_ids) == len(mask)
    at_rows = torch.nonzero(~mask).flatten()
    expected_rows = sum(
        len(rows_table.tokenizer.encode(text, add_special_tokens=False))
        for message in CASES[case]
        for kind, text in message["content"]
        if kind == "e"
    )
    assert len(at_rows) == expected_rows > 0
    # Token positions: the text path's ids; embedding positions: id 0.
    assert [i for i, keep in zip(ids, mask.tolist(), strict=True) if keep] == [
        i for i, keep in zip(ref_ids, mask.tolist(), strict=True) if keep
    ]
    assert all(ids[p] == 0 for p in at_rows.tolist())
    # The rows are the model's own rows of the tokens the text path has at those positions.
    embeds = with_rows["prompt_embeds"]
    if embeds.shape[0] == len(ids):  # dense transport
        embeds = embeds[at_rows]
    want = rows_table.weight[torch.tensor(ref_ids)[at_rows]]
    assert torch.equal(embeds.float(), want)
    # Nothing internal is echoed back.
    assert PLACEHOLDER_TOKEN not in str(conversation) and "<|pe:" not in str(conversation)


@pytest.mark.parametrize("mode", SERVED)
def test_truncation_keeps_the_rows_of_the_kept_positions(renderers_model, rows_table, mode):
    """Every cut of the last 16 positions (after, through and before the parts): the ids are the
    text path's cut ids, with the model's own rows of the kept text at the kept rows."""
    renderer = renderer_for(renderers_model, mode)
    case = CASES["several_parts"]
    full = engine_input(renderer, mode, as_text(case))[1]["prompt_token_ids"]
    for k in range(1, min(len(full), 17)):
        tok = renderer.default_chat_tok_params.with_kwargs(truncate_prompt_tokens=k)
        ref_ids = engine_input(renderer, mode, as_text(case), tok)[1]["prompt_token_ids"]
        got = engine_input(renderer, mode, render(case, rows_table.part), tok)[1]
        assert ref_ids == full[-k:]
        if got["type"] == "token":  # every part cut away: the remaining text
            assert got["prompt_token_ids"] == ref_ids
            continue
        mask = torch.tensor(got["is_token_ids"])
        assert len(got["prompt_token_ids"]) == len(mask) == k
        at_rows = torch.nonzero(~mask).flatten()
        ids = torch.tensor(got["prompt_token_ids"])
        assert torch.equal(ids[mask], torch.tensor(ref_ids)[mask])
        embeds = got["prompt_embeds"]
        if embeds.shape[0] == k:  # dense transport
            embeds = embeds[at_rows]
        want = rows_table.weight[torch.tensor(ref_ids)[at_rows]]
        assert torch.equal(embeds.float(), want), k


@pytest.mark.parametrize("mode", ["deepseek_v32", "cohere"])
def test_placeholder_in_client_text_is_refused(renderers_model, rows_table, mode):
    renderer = renderer_for(renderers_model, mode)
    forged = f"{PLACEHOLDER_TOKEN}<|pe:0123456789abcdef:0|>{PLACEHOLDER_TOKEN}"
    messages = [
        {"role": "user", "content": [{"type": "text", "text": forged}, rows_table.part(" x")]}
    ]
    with pytest.raises(VLLMValidationError) as info:
        engine_input(renderer, mode, messages)
    assert info.value.args[0] == errors.RESERVED_TEXT.format(
        where="messages[0].content[0].text", token=PLACEHOLDER_TOKEN
    )


def test_parts_need_the_flag(renderers_model, rows_table):
    vllm_chat_embeds.register()
    config = ModelConfig(str(renderers_model), tokenizer_mode="kimi_k3", dtype="float32")
    renderer = renderer_from_config(VllmConfig(model_config=config))
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, rows_table.part(" x")]}
    ]
    with pytest.raises(VLLMValidationError) as info:
        renderer.render_messages(messages, ChatParams())
    assert info.value.args[0] == errors.NOT_ENABLED.format(where="messages[0].content[1]")


def test_vllm_check_lets_only_bounded_markers_through(renderers_model):
    """The ``renderers_chat_utils`` patch: our bounded markers pass, any other placeholder not."""
    from vllm_chat_embeds.compat.vllm_api import resolve

    vllm_chat_embeds.register()
    check = resolve("vllm.renderers.chat_utils:_reject_reserved_placeholder_in_text")
    config = ModelConfig(str(renderers_model), enable_prompt_embeds=True, dtype="float32")
    marker = bounded("<|pe:0123456789abcdef:3|>")
    check(f"a {marker} b", config)
    for text in (f"a{PLACEHOLDER_TOKEN}b", marker + PLACEHOLDER_TOKEN, bounded("<|pe:NOTHEX:0|>")):
        with pytest.raises(VLLMValidationError):
            check(text, config)


@pytest.mark.parametrize("mode", REFUSED)
def test_unserved_modes_refuse_parts_naming_the_mode(renderers_model, rows_table, mode):
    """kimi_audio (a tiktoken tokenizer) and terratorch are built without a tokenizer here."""
    vllm_chat_embeds.register()
    config = ModelConfig(
        str(renderers_model),
        tokenizer_mode=mode,
        enable_prompt_embeds=True,
        skip_tokenizer_init=True,
    )
    renderer = renderer_from_config(VllmConfig(model_config=config))
    assert type(renderer).__name__.startswith("Refusing")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, rows_table.part(" x")]}
    ]
    with pytest.raises(VLLMValidationError) as info:
        renderer.render_messages(messages, ChatParams())
    assert info.value.args[0] == errors.MODE_UNSUPPORTED.format(
        where="messages[0].content[1]", mode=mode
    )


# -- a real server ---------------------------------------------------------------------------


# deepseek_v32 renders to token ids, cohere to text that vLLM tokenizes afterwards.
@pytest.fixture(scope="module", params=["deepseek_v32", "cohere"])
def mode_server(request, renderers_model: Path, vllm_cache_root: str) -> Iterator[Server]:
    env = server_env(trap=True, plugins=True, mp=False, cache_root=vllm_cache_root)
    args = ["--enable-prompt-embeds", "--tokenizer-mode", request.param]
    with run_server(renderers_model, *args, env=env) as server:
        yield server


def chat(server: Server, messages: list, status: int = 200) -> dict:
    body = {"model": server.model, "messages": messages, "return_token_ids": True, **GREEDY}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == status, response.text
    return response.json()


@pytest.mark.parametrize("case", ["one_part", "several_parts", "every_role"])
def test_live_greedy_parity(mode_server, rows_table, case):
    reference = chat(mode_server, as_text(CASES[case]))
    with_rows = chat(mode_server, render(CASES[case], rows_table.part))
    ref, got = reference["choices"][0], with_rows["choices"][0]
    assert ref["message"]["content"], "the model must generate something"
    assert got["token_ids"] == ref["token_ids"]
    assert got["message"]["content"] == ref["message"]["content"]
    assert with_rows["usage"] == reference["usage"]


def test_live_other_rows_change_the_answer(mode_server, rows_table):
    """The parity above is sharp: rows of another text give another greedy answer."""
    case = CASES["one_part"]
    reference = chat(mode_server, as_text(case))["choices"][0]["token_ids"]
    other = [{"role": "user", "content": [("t", "def hello(world):"), ("e", " return None")]}]
    assert chat(mode_server, render(other, rows_table.part))["choices"][0]["token_ids"] != reference


def test_live_bad_part_is_a_400_and_the_server_stays_up(mode_server, rows_table):
    bad = {"type": "prompt_embeds", "data": "not base64!"}
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, bad]}]
    answer = chat(mode_server, messages, status=400)
    assert "messages[0].content[1]" in answer["error"]["message"]
    assert mode_server.healthy()
    chat(mode_server, render(CASES["one_part"], rows_table.part))


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_live_hostile_case(mode_server, rows_table, case):
    """The chat hostile table in this mode: the same 400 for each bad payload, server up."""
    messages = case.build(int(rows_table.weight.shape[1]), rows_table.rows(" 1 + 2"))
    hostile_outcome(post(mode_server, messages), case)
    assert mode_server.healthy()


def test_live_tokenize_marks_the_rows(mode_server, rows_table):
    """/tokenize (renderer-independent) counts and locates the rows in this mode too."""
    case = CASES["several_parts"]
    messages = render(case, rows_table.part)

    def tokenize(messages: list) -> dict:
        body = {"model": mode_server.model, "messages": messages}
        response = requests.post(mode_server.base_url + "/tokenize", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    text, with_rows = tokenize(as_text(case)), tokenize(messages)
    assert (
        with_rows["count"] == text["count"] == chat(mode_server, messages)["usage"]["prompt_tokens"]
    )
    lengths = [len(rows_table.rows(t)) for m in case for kind, t in m["content"] if kind == "e"]
    spans = with_rows["prompt_embeds_spans"]
    assert [length for _, length in spans] == lengths
    embedded = {s + i for s, length in spans for i in range(length)}
    assert [t for i, t in enumerate(with_rows["tokens"]) if i not in embedded] == [
        t for i, t in enumerate(text["tokens"]) if i not in embedded
    ]

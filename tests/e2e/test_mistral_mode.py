"""prompt_embeds parts with ``--tokenizer-mode mistral``: greedy parity on a real ``vllm serve``.

The model is a tiny random Llama beside a byte-only ``tekken.json``
(``tools/build_mistral_test_model.py``), so a text and the same text given as its embedding
rows render to the same positions; with greedy decoding the outputs must be identical.
"""

from __future__ import annotations

import base64
import io
import json
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from chat_cases import CASES, as_text, render
from conftest import MODELS, Server, build_model, run_server, server_env
from hostile_cases import CASES as HOSTILE
from test_hostile_online import hostile_outcome, post

from vllm_chat_embeds import errors

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 12}
# Cases whose roles mistral_common accepts as they are (no tool calls).
PARITY_CASES = ["one_part", "only_embeds", "several_parts", "interleaved", "every_role"]
SYSTEM_AND_ASSISTANT = [
    {"role": "system", "content": [("t", "Answer"), ("e", " in French.")]},
    {"role": "user", "content": [("t", "Say hi")]},
    {"role": "assistant", "content": [("e", "Bonjour"), ("t", " !")]},
    {"role": "user", "content": [("t", "Again"), ("e", " please")]},
]


class TekkenTable:
    """The tiny model's own input embeddings of a text, tokenized with its tekken.json."""

    def __init__(self, model_dir: Path) -> None:
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer
        from safetensors import safe_open

        self.tokenizer = Tekkenizer.from_file(model_dir / "tekken.json")
        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            self.weight = f.get_tensor("model.embed_tokens.weight").float()

    def rows(self, text: str) -> torch.Tensor:
        return self.weight[self.tokenizer.encode(text, bos=False, eos=False)].clone()

    def part(self, text: str) -> dict:
        buf = io.BytesIO()
        torch.save(self.rows(text), buf)
        return {"type": "prompt_embeds", "data": base64.b64encode(buf.getvalue()).decode()}


@pytest.fixture(scope="module")
def mistral_model() -> Path:
    return build_model("build_mistral_test_model.py", MODELS / "tiny-mistral-test")


@pytest.fixture(scope="module")
def tekken_table(mistral_model: Path) -> TekkenTable:
    return TekkenTable(mistral_model)


@pytest.fixture(scope="module")
def mistral_server(mistral_model: Path, vllm_cache_root: str) -> Iterator[Server]:
    env = server_env(trap=True, plugins=True, mp=False, cache_root=vllm_cache_root)
    args = ["--tokenizer-mode", "mistral", "--enable-prompt-embeds"]
    with run_server(mistral_model, *args, env=env) as server:
        yield server


def chat(server: Server, messages: list, **kwargs) -> dict:
    body = {"model": server.model, "messages": messages, **GREEDY, **kwargs}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def assert_same(reference: dict, with_embeds: dict) -> None:
    ref, emb = reference["choices"][0], with_embeds["choices"][0]
    assert ref["message"]["content"], "the model must generate something"
    assert emb["token_ids"] == ref["token_ids"]
    assert emb["message"]["content"] == ref["message"]["content"]
    assert with_embeds["usage"] == reference["usage"]


@pytest.mark.parametrize("name", PARITY_CASES)
def test_greedy_parity(mistral_server, tekken_table, name):
    case = CASES[name]
    reference = chat(mistral_server, as_text(case), return_token_ids=True)
    with_embeds = chat(mistral_server, render(case, tekken_table.part), return_token_ids=True)
    assert_same(reference, with_embeds)


def test_parts_in_system_and_assistant_messages(mistral_server, tekken_table):
    reference = chat(mistral_server, as_text(SYSTEM_AND_ASSISTANT), return_token_ids=True)
    messages = render(SYSTEM_AND_ASSISTANT, tekken_table.part)
    assert_same(reference, chat(mistral_server, messages, return_token_ids=True))


def test_streaming_matches_non_streaming(mistral_server, tekken_table):
    messages = render(CASES["interleaved"], tekken_table.part)
    full = chat(mistral_server, messages)
    stream = mistral_server.client.chat.completions.create(
        model=mistral_server.model, messages=messages, stream=True, **GREEDY
    )
    streamed = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    assert streamed == full["choices"][0]["message"]["content"]
    assert "<unk>" not in streamed


def test_no_unk_for_embedding_rows_with_special_tokens_kept(mistral_server, tekken_table):
    """Embedding positions carry id 0 (Tekken's <unk>); it must not leak into the text."""
    case = CASES["several_parts"]
    keep = {"skip_special_tokens": False, "return_token_ids": True}
    reference = chat(mistral_server, as_text(case), **keep)
    with_embeds = chat(mistral_server, render(case, tekken_table.part), **keep)
    assert_same(reference, with_embeds)
    assert "<unk>" not in with_embeds["choices"][0]["message"]["content"]


def test_random_rows_change_the_output(mistral_server, tekken_table):
    case = CASES["one_part"]
    reference = chat(mistral_server, as_text(case))
    rows = tekken_table.rows(" return world + 1")
    noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(0)) * rows.std()
    buf = io.BytesIO()
    torch.save(noise, buf)
    part = {"type": "prompt_embeds", "data": base64.b64encode(buf.getvalue()).decode()}
    out = chat(mistral_server, render(case, lambda text: part))
    assert out["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"]
    assert out["choices"][0]["message"]["content"] != reference["choices"][0]["message"]["content"]


def test_bad_part_is_a_400_naming_the_field(mistral_server, tekken_table):
    bad = {"type": "prompt_embeds", "data": "not base64!"}
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}, bad]}]
    body = {"model": mistral_server.model, "messages": messages, **GREEDY}
    response = requests.post(
        mistral_server.base_url + "/v1/chat/completions", json=body, timeout=60
    )
    assert response.status_code == 400, response.text
    assert "messages[0].content[1].data" in response.json()["error"]["message"]
    wide = {"type": "prompt_embeds", "data": _b64(torch.zeros(2, 3))}
    messages = [{"role": "user", "content": [wide]}]
    body = {"model": mistral_server.model, "messages": messages, **GREEDY}
    response = requests.post(
        mistral_server.base_url + "/v1/chat/completions", json=body, timeout=60
    )
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert errors.BAD_WIDTH.format(where="messages[0].content[0]", got=3, width=64) in message
    assert mistral_server.healthy()
    assert chat(mistral_server, as_text(CASES["one_part"]))["choices"][0]["message"]["content"]


def _b64(tensor: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode()


def test_renderer_alone_splices_parts_without_an_engine(mistral_model, tekken_table):
    """Rendering only (no server): the ids match the text at every non-embedding position."""
    import vllm_chat_embeds

    vllm_chat_embeds.register()
    from vllm.config import ModelConfig, VllmConfig
    from vllm.renderers.params import ChatParams
    from vllm.renderers.registry import renderer_from_config

    config = ModelConfig(str(mistral_model), tokenizer_mode="mistral", enable_prompt_embeds=True)
    renderer = renderer_from_config(VllmConfig(model_config=config))
    assert type(renderer).__name__ == "ChatEmbedsMistralRenderer"
    case = CASES["every_role"]
    _, text_prompt = renderer.render_messages(as_text(case), ChatParams())
    conversation, prompt = renderer.render_messages(render(case, tekken_table.part), ChatParams())
    text_ids, ids = text_prompt["prompt_token_ids"], prompt["prompt_token_ids"]
    assert len(ids) == len(text_ids)
    embedded = [i for i, t in enumerate(ids) if t == renderer.placeholder_id]
    rows = sum(
        len(tekken_table.rows(text)) for m in case for kind, text in m["content"] if kind == "e"
    )
    assert len(embedded) == rows
    assert all(
        a == b for i, (a, b) in enumerate(zip(ids, text_ids, strict=True)) if i not in embedded
    )
    assert "<|pe:" not in str(conversation)


def test_prompt_logprobs_and_tokenize(mistral_server, tekken_table):
    """Engine-side features are renderer-independent: check them in this mode too."""
    case = CASES["several_parts"]
    messages = render(case, tekken_table.part)
    text = chat(mistral_server, as_text(case), prompt_logprobs=1)
    embeds = chat(mistral_server, messages, prompt_logprobs=1)
    ref, got = text["prompt_logprobs"], embeds["prompt_logprobs"]
    assert len(ref) == len(got) == embeds["usage"]["prompt_tokens"]
    embedded = {i for i, entry in enumerate(got) if entry is None} - {0}
    rows = sum(len(tekken_table.rows(t)) for m in case for kind, t in m["content"] if kind == "e")
    assert len(embedded) == rows
    assert all(got[i] == ref[i] for i in range(1, len(got)) if i not in embedded)

    body = {"model": mistral_server.model, "messages": messages}
    tok = requests.post(mistral_server.base_url + "/tokenize", json=body, timeout=60).json()
    assert tok["count"] == embeds["usage"]["prompt_tokens"]
    spans = {s + i for s, length in tok["prompt_embeds_spans"] for i in range(length)}
    assert spans == embedded
    assert mistral_server.healthy()


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_hostile_case(mistral_server, tekken_table, case):
    """The chat hostile table in this mode: the same 400 for each bad payload, server up."""
    messages = case.build(int(tekken_table.weight.shape[1]), tekken_table.rows(" 1 + 2"))
    hostile_outcome(post(mistral_server, messages), case)
    assert mistral_server.healthy()


OFFLINE_SCRIPT = """
import json, sys, torch
from vllm import LLM, SamplingParams
cases = torch.load(sys.argv[2])
llm = LLM(model=sys.argv[1], tokenizer_mode="mistral", enable_prompt_embeds=True,
          dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=4,
          kv_cache_memory_bytes=64 << 20)
greedy = SamplingParams(max_tokens=12, temperature=0.0)
out = {}
for name, messages in cases.items():
    out[name] = list(llm.chat(messages, greedy, use_tqdm=False)[0].outputs[0].token_ids)
print("RESULT " + json.dumps(out))
"""


def test_offline_llm_chat_in_mistral_mode(mistral_model, tekken_table, vllm_cache_root, tmp_path):
    """LLM.chat() in this mode (its own process: one engine per test process is enough)."""
    import subprocess
    import sys

    case = CASES["every_role"]
    cases = {
        "text": as_text(case),
        "base64": render(case, tekken_table.part),
        "tensor": render(case, lambda t: {"type": "prompt_embeds", "data": tekken_table.rows(t)}),
    }
    torch.save(cases, tmp_path / "cases.pt")
    env = server_env(trap=True, plugins=True, mp=False, cache_root=vllm_cache_root)
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(mistral_model), str(tmp_path / "cases.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["text"], "the model must generate something"
    assert out["base64"] == out["tensor"] == out["text"]


def test_parts_by_reference(mistral_server, tekken_table):
    """Mode mistral: a part's data once under a uuid, then the uuid alone; same as text."""
    case = CASES["interleaved"]
    reference = chat(mistral_server, as_text(case), return_token_ids=True)
    tag = uuidlib.uuid4().hex

    def sent(text: str) -> dict:
        return {**tekken_table.part(text), "uuid": tag + text}

    assert_same(reference, chat(mistral_server, render(case, sent), return_token_ids=True))
    by_uuid = render(case, lambda text: {"type": "prompt_embeds", "uuid": tag + text})
    assert_same(reference, chat(mistral_server, by_uuid, return_token_ids=True))


@pytest.mark.parametrize("name", ["one_part", "several_parts"])
def test_truncation_through_parts_equals_the_text_cut(mistral_server, tekken_table, name):
    """mistral_common renders token ids; vLLM cuts them as any ids: every cut near the parts
    (after, through, before) gives the text chat's answer cut at the same place."""
    case = CASES[name]
    for k in range(1, 11):
        options = {"truncate_prompt_tokens": k, "return_token_ids": True, "max_tokens": 4}
        reference = chat(mistral_server, as_text(case), **options)
        out = chat(mistral_server, render(case, tekken_table.part), **options)
        assert out["choices"][0]["token_ids"] == reference["choices"][0]["token_ids"], k
        assert out["usage"] == reference["usage"]

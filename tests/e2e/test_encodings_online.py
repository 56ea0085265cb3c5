"""The pickle-free encodings end to end: a real ``vllm serve``, a real ``LLM`` and the built-in.

Why: unit tests prove the decoder; here the parts travel as JSON through the OpenAI server
and ``LLM.chat``, built by the client helper exactly as a user would. On this float32 model a
float32 payload holds the model's own rows, so greedy output must equal the text prompt's.
Half-precision wire dtypes round the rows, so there the reference is the same rounded rows
sent with the ``torch`` encoding.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
import torch
from chat_cases import CASES, as_text, render
from conftest import TEST_SERVER_ARGS, run_server, server_env
from vllm import SamplingParams

from vllm_chat_embeds import errors
from vllm_chat_embeds.client import Encoding, WireDtype, prompt_embeds_part
from vllm_chat_embeds.limits import ENV_ENCODINGS

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 16}
ENCODINGS: list[Encoding] = ["raw", "safetensors", "torch"]
PICKLE_FREE: list[Encoding] = ["raw", "safetensors"]
HALF: dict[WireDtype, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
HALF_CASES = ["one_part", "interleaved", "multi_turn"]


def post(server, messages: list[dict[str, Any]]) -> requests.Response:
    body = {"model": server.model, "messages": messages, **GREEDY}
    return requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)


def chat(server, messages: list[dict[str, Any]]) -> dict[str, Any]:
    response = post(server, messages)
    assert response.status_code == 200, response.text
    return response.json()


def outcome(reply: dict[str, Any]) -> tuple[str, int, int]:
    usage = reply["usage"]
    content = reply["choices"][0]["message"]["content"]
    return content, usage["prompt_tokens"], usage["completion_tokens"]


def parts_of(table, encoding: Encoding, dtype: torch.dtype = torch.float32):
    """The part builder for ``render``: the text's rows, in ``dtype``, in ``encoding``."""
    return lambda text: prompt_embeds_part(table.rows(text).to(dtype), encoding=encoding)


# -- plugin server -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_float32_parity_with_text(plugin_server, table, encoding: Encoding, name: str) -> None:
    reference = chat(plugin_server, as_text(CASES[name]))
    with_embeds = chat(plugin_server, render(CASES[name], parts_of(table, encoding)))
    assert reference["choices"][0]["message"]["content"], "the model must generate something"
    assert outcome(with_embeds) == outcome(reference)


@pytest.mark.parametrize("encoding", PICKLE_FREE)
def test_numpy_rows_parity_with_text(plugin_server, table, encoding: Encoding) -> None:
    """A client holding NumPy arrays only (no PyTorch) gets the same answer."""
    case = CASES["interleaved"]

    def part(text: str) -> dict[str, Any]:
        return prompt_embeds_part(table.rows(text).numpy(), encoding=encoding)

    assert outcome(chat(plugin_server, render(case, part))) == outcome(
        chat(plugin_server, as_text(case))
    )


@pytest.mark.parametrize("name", HALF_CASES)
@pytest.mark.parametrize("wire", list(HALF))
@pytest.mark.parametrize("encoding", PICKLE_FREE)
def test_half_precision_wire_equals_torch_part_with_the_same_values(
    plugin_server, table, encoding: Encoding, wire: WireDtype, name: str
) -> None:
    case = CASES[name]
    dtype = HALF[wire]
    rounded_torch = chat(plugin_server, render(case, parts_of(table, "torch", dtype)))
    # The client casts float32 rows to the wire dtype itself.
    ours = chat(
        plugin_server,
        render(case, lambda t: prompt_embeds_part(table.rows(t), encoding=encoding, dtype=wire)),
    )
    assert outcome(ours) == outcome(rounded_torch)
    # Same number of rows as the text prompt, whatever the rounding did to the output.
    text = chat(plugin_server, as_text(case))
    assert ours["usage"]["prompt_tokens"] == text["usage"]["prompt_tokens"]


def test_encodings_mixed_in_one_request(plugin_server, table) -> None:
    case = CASES["several_parts"]  # two prompt_embeds parts
    encodings = iter(PICKLE_FREE)
    mixed = render(case, lambda t: prompt_embeds_part(table.rows(t), encoding=next(encodings)))
    assert outcome(chat(plugin_server, mixed)) == outcome(chat(plugin_server, as_text(case)))


@pytest.fixture(scope="module")
def pickle_free_server(tiny_model, vllm_cache_root):
    """The plugin with CHAT_EMBEDS_ENCODINGS=raw,safetensors: no unpickling at all.

    It also drafts tokens with a draft model (the tiny model itself), the second speculative
    method vLLM's CPU build runs: greedy answers are the same with or without drafts, so the
    tests here hold either way, and one start serves both.
    """
    extra = {ENV_ENCODINGS: "raw,safetensors"}
    env = server_env(trap=True, plugins=True, mp=False, cache_root=vllm_cache_root, extra=extra)
    draft = {"method": "draft_model", "model": str(tiny_model), "num_speculative_tokens": 2}
    args = [*TEST_SERVER_ARGS, "--speculative-config", json.dumps(draft)]
    with run_server(tiny_model, *args, env=env) as server:
        yield server


def test_operator_can_disable_the_torch_encoding(pickle_free_server, table) -> None:
    """The environment variable reaches the API server's renderer; the others still work."""
    case = CASES["one_part"]
    response = post(pickle_free_server, render(case, parts_of(table, "torch")))
    assert response.status_code == 400, response.text
    expected = errors.ENCODING_DISABLED.format(
        where="messages[0].content[1]", got="torch", allowed="raw,safetensors"
    )
    assert response.json()["error"]["message"].startswith(expected)
    reference = outcome(chat(pickle_free_server, as_text(case)))
    for encoding in PICKLE_FREE:
        parts = render(case, parts_of(table, encoding))
        assert outcome(chat(pickle_free_server, parts)) == reference


def spec_drafts(server) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=30).text
    name = "vllm:spec_decode_num_drafts_total"
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_draft_model_speculative_decoding_keeps_parity(pickle_free_server, table) -> None:
    """Drafts from a draft model are verified by the target model: parts answer as text."""
    before = spec_drafts(pickle_free_server)
    for name in ("interleaved", "every_role"):
        case = CASES[name]
        reference = outcome(chat(pickle_free_server, as_text(case)))
        assert outcome(chat(pickle_free_server, render(case, parts_of(table, "raw")))) == reference
    assert spec_drafts(pickle_free_server) > before


# -- vLLM's built-in implementation --------------------------------------------------------------


@pytest.mark.parametrize("encoding", PICKLE_FREE)
def test_builtin_server_refuses_pickle_free_encodings(
    builtin_server, table, encoding: Encoding
) -> None:
    """vLLM's own parser knows only base64 of torch.save: a clear 400, not a 500.

    Observed on vLLM 0.32.0: it ignores the ``encoding``/``dtype``/``shape`` keys and hands
    ``data`` to ``torch.load``, which cannot read it; the reply is a 400 saying it "could not
    be deserialized as a torch tensor", followed by torch's own hint about re-running with
    ``weights_only=False`` (misleading for a client). A client must use ``encoding="torch"``
    there.
    """
    messages = render(CASES["one_part"], parts_of(table, encoding))
    response = post(builtin_server, messages)
    assert response.status_code == 400, response.text
    assert "could not be deserialized as a torch tensor" in response.json()["error"]["message"]
    assert builtin_server.healthy()
    # The same rows in the torch encoding work there.
    chat(builtin_server, render(CASES["one_part"], parts_of(table, "torch")))


# -- offline LLM.chat --------------------------------------------------------------------------


OFFLINE_GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def generate(llm, messages: list[dict[str, Any]]) -> tuple[int, list[int]]:
    out = llm.chat(messages, OFFLINE_GREEDY, use_tqdm=False)[0]
    return len(out.prompt_token_ids), list(out.outputs[0].token_ids)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_offline_parity_with_text(offline_llm, table, encoding: Encoding, name: str) -> None:
    case = CASES[name]
    assert generate(offline_llm, render(case, parts_of(table, encoding))) == generate(
        offline_llm, as_text(case)
    )


@pytest.mark.parametrize("wire", list(HALF))
@pytest.mark.parametrize("encoding", PICKLE_FREE)
def test_offline_half_precision_wire(
    offline_llm, table, encoding: Encoding, wire: WireDtype
) -> None:
    case = CASES["multi_turn"]
    ours = render(case, parts_of(table, encoding, HALF[wire]))
    reference = render(case, parts_of(table, "torch", HALF[wire]))
    assert generate(offline_llm, ours) == generate(offline_llm, reference)

"""LoRA adapters with prompt_embeds parts on a real ``vllm serve`` (the shared feature server).

Before the ``v1_worker_gpu_model_runner`` LoRA fix, the first chat with a part addressed to an
adapter killed the engine (and with it every tenant of the server). Every check compares the
parts path with the text path through the same adapter, or a request in a batch with the same
request sent alone.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from chat_cases import CASES, as_text, render
from conftest import LORA_EMBED_NAME, LORA_NAMES, EmbeddingTable, tensor_b64

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 12}
# Where the part sits: alone, last, first and last, in the middle.
POSITIONS = ("only_embeds", "one_part", "several_parts", "interleaved")


def chat(server, model: str, messages: list, **kwargs) -> str:
    body = {"model": model, "messages": messages, **GREEDY, **kwargs}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def completion(server, model: str, **kwargs) -> str:
    body = {"model": model, **GREEDY, **kwargs}
    response = requests.post(server.base_url + "/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.mark.parametrize("case", POSITIONS)
@pytest.mark.parametrize("adapter", LORA_NAMES)
def test_adapter_parity_and_the_adapter_matters(feature_server, table, adapter, case):
    text = chat(feature_server, adapter, as_text(CASES[case]))
    parts = chat(feature_server, adapter, render(CASES[case], table.part))
    base = chat(feature_server, feature_server.model, as_text(CASES[case]))
    assert text, "the adapter must generate something"
    assert parts == text
    assert text != base, "the adapter must change the answer, or parity proves nothing"


def _adapted_part(table: EmbeddingTable, adapter_dir: Path):
    """Rows as the adapter's embedding layer would give them: table row + LoRA delta.

    PEFT's embedding LoRA adds ``lora_embedding_B @ lora_embedding_A[:, id]`` (scaled by
    ``lora_alpha / r``, 1 for our adapters) to each token's embedding.
    """
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    (a,) = [w for k, w in weights.items() if k.endswith("embed_tokens.lora_embedding_A")]
    (b,) = [w for k, w in weights.items() if k.endswith("embed_tokens.lora_embedding_B")]

    def part(text: str) -> dict:
        ids = table.tokenizer.encode(text, add_special_tokens=False)
        rows = table.weight[ids] + a.T[ids] @ b.T
        return {"type": "prompt_embeds", "data": tensor_b64(rows)}

    return part


@pytest.mark.parametrize("case", POSITIONS)
def test_embedding_adapter_applies_to_token_positions_only(
    feature_server, table, lora_embed_adapter, case
):
    """Rows are final input embeddings: the adapter's embedding delta is not added to them.

    Rows that already hold the delta give the text path's answer; the plain table rows (no
    delta) give another one.
    """
    text = chat(feature_server, LORA_EMBED_NAME, as_text(CASES[case]))
    adapted = chat(
        feature_server,
        LORA_EMBED_NAME,
        render(CASES[case], _adapted_part(table, lora_embed_adapter)),
    )
    plain = chat(feature_server, LORA_EMBED_NAME, render(CASES[case], table.part))
    assert adapted == text
    assert plain != text


def test_adapters_and_base_model_in_one_batch_keep_their_answers(feature_server, table):
    base = feature_server.model
    work = [
        (base, render(CASES["interleaved"], table.part)),
        ("lora-a", render(CASES["one_part"], table.part)),
        ("lora-b", render(CASES["several_parts"], table.part)),
        (LORA_EMBED_NAME, render(CASES["only_embeds"], table.part)),
        ("lora-a", as_text(CASES["interleaved"])),
        (base, as_text(CASES["one_part"])),
        ("lora-b", render(CASES["one_part"], table.part)),
        (base, render(CASES["several_parts"], table.part)),
    ]
    alone = [chat(feature_server, model, messages) for model, messages in work]
    for _ in range(2):
        with ThreadPoolExecutor(len(work)) as pool:
            together = list(pool.map(lambda job: chat(feature_server, *job), work))
        assert together == alone
    assert feature_server.healthy()


def _prompt_rows(table: EmbeddingTable, text: str) -> torch.Tensor:
    """The rows of a completions prompt as the server tokenizes it (special tokens added)."""
    return table.weight[table.tokenizer(text).input_ids]


def test_completions_prompt_embeds_to_an_adapter(feature_server, table):
    """vLLM's own /v1/completions prompt_embeds, beside text requests in one batch."""
    prompt = "def hello(world): return world"
    rows = tensor_b64(_prompt_rows(table, prompt))
    work = [
        ("lora-a", {"prompt_embeds": rows}),
        ("lora-b", {"prompt": prompt}),
        ("lora-a", {"prompt": prompt}),
        ("lora-b", {"prompt_embeds": rows}),
    ]
    alone = [completion(feature_server, model, **body) for model, body in work]
    assert alone[0] == alone[2], "rows of the prompt answer as the prompt does"
    assert alone[3] == completion(feature_server, "lora-b", prompt=prompt)
    with ThreadPoolExecutor(len(work)) as pool:
        together = list(pool.map(lambda job: completion(feature_server, job[0], **job[1]), work))
    assert together == alone

"""Images beside prompt_embeds parts, on a real ``vllm serve`` of a tiny Idefics3.

One server (plugin on, vLLM's built-in prompt_embeds helpers trapped, in-process engine,
compact transport at its default: on). Each case is written once as segments and sent twice:
all text, then with some text given as the model's own embedding rows of that text; greedy
output must be identical. The model's vocab size equals its tokenizer length, so the
placeholder id is out of the model's vocabulary (vLLM's built-in refuses every such request
with "Token id N is out of vocabulary").
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chat_cases
import pytest
import requests
import torch
from conftest import (
    MODELS,
    TEST_SERVER_ARGS,
    EmbeddingTable,
    Server,
    build_model,
    run_server,
    server_env,
    tensor_b64,
)
from hostile_cases import TEXT, Placement
from PIL import Image
from test_hostile_online import chat_send, placement_failures
from vllm.exceptions import VLLMValidationError

from vllm_chat_embeds import errors

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 16}

# Segments: ("t", text) a text part, ("e", text) a prompt_embeds part of that text's rows,
# ("i", colour) an image part. Part boundaries sit before a space or next to an image, where
# byte-level BPE never merges across, so the token rows are the same either way.
Case = list[dict[str, Any]]
CASES: dict[str, Case] = {
    "embeds_after_image": [
        {
            "role": "user",
            "content": [("i", "red"), ("t", "What is the capital"), ("e", " of France?")],
        },
    ],
    "embeds_before_image": [
        {
            "role": "user",
            "content": [("e", "Describe this"), ("i", "red"), ("t", " in one word.")],
        },
    ],
    "embeds_on_both_sides": [
        {
            "role": "user",
            "content": [("e", "Look at"), ("i", "blue"), ("e", " and tell me more")],
        },
    ],
    "two_messages": [
        {"role": "system", "content": [("e", "You describe pictures.")]},
        {"role": "user", "content": [("i", "red"), ("t", "What colour"), ("e", " is this?")]},
        {"role": "assistant", "content": [("t", "It is"), ("e", " red.")]},
        {"role": "user", "content": [("t", "And"), ("e", " this one?"), ("i", "green")]},
    ],
}


def image_part(colour: str) -> dict[str, Any]:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def render(case: Case, embeds_part) -> list[dict[str, Any]]:
    """Messages of a case; ``embeds_part(text)`` builds each ("e", text) segment."""
    return chat_cases.render(case, embeds_part, {"i": image_part})


def as_text(case: Case) -> list[dict[str, Any]]:
    return chat_cases.as_text(case, {"i": image_part})


@pytest.fixture(scope="module")
def vlm_model() -> Path:
    return build_model("build_vlm_test_model.py", MODELS / "tiny-idefics3-test")


@pytest.fixture(scope="module")
def vlm_table(vlm_model: Path) -> EmbeddingTable:
    return EmbeddingTable(vlm_model)


@pytest.fixture(scope="module")
def vlm_server(vlm_model: Path, vllm_cache_root: str) -> Iterator[Server]:
    env = server_env(trap=True, plugins=True, mp=False, cache_root=vllm_cache_root)
    with run_server(vlm_model, *TEST_SERVER_ARGS, env=env) as server:
        yield server


def post(server: Server, messages: list[dict[str, Any]], **kwargs: Any) -> requests.Response:
    body = {"model": server.model, "messages": messages, **GREEDY, **kwargs}
    return requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)


def chat(server: Server, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    response = post(server, messages, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def content(reply: dict[str, Any]) -> str:
    return reply["choices"][0]["message"]["content"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_parity_with_images(vlm_server, vlm_table, name):
    case = CASES[name]
    reference = chat(vlm_server, as_text(case))
    with_embeds = chat(vlm_server, render(case, vlm_table.part))
    assert content(reference), "the model must generate something"
    assert content(with_embeds) == content(reference)
    for key in ("prompt_tokens", "completion_tokens"):
        assert with_embeds["usage"][key] == reference["usage"][key]
    # The usage details count the rows beside the image tokens, under their own name.
    media = with_embeds["usage"]["prompt_tokens_details"]["multimodal_tokens"]
    rows = sum(len(vlm_table.rows(t)) for m in case for kind, t in m["content"] if kind == "e")
    assert media["prompt_embeds"] == rows
    assert (
        media["image"] == reference["usage"]["prompt_tokens_details"]["multimodal_tokens"]["image"]
    )


def test_the_image_and_the_rows_both_move_the_output(vlm_server, vlm_table):
    """The parity above is sharp: another image, or other rows, give another answer."""
    case = CASES["embeds_after_image"]
    reference = content(chat(vlm_server, render(case, vlm_table.part)))
    other_image = [{**m, "content": [("i", "blue"), *m["content"][1:]]} for m in case]
    assert content(chat(vlm_server, render(other_image, vlm_table.part))) != reference
    rows = vlm_table.rows(" of France?")
    torch.manual_seed(0)
    noise = {"type": "prompt_embeds", "data": tensor_b64(torch.randn_like(rows) * rows.std())}
    assert content(chat(vlm_server, render(case, lambda _: noise))) != reference


def test_prompt_logprobs_are_none_at_embedding_rows(vlm_server, vlm_table):
    case = CASES["embeds_before_image"]
    text = chat(vlm_server, as_text(case), prompt_logprobs=1, max_tokens=1)
    embeds = chat(vlm_server, render(case, vlm_table.part), prompt_logprobs=1, max_tokens=1)
    ref, got = text["prompt_logprobs"], embeds["prompt_logprobs"]
    assert len(ref) == len(got)
    rows = len(vlm_table.rows("Describe this"))
    masked = [i for i, (r, g) in enumerate(zip(ref, got, strict=True)) if g is None and r]
    assert masked == list(range(masked[0], masked[0] + rows))  # exactly the part's rows
    for r, g in zip(ref, got, strict=True):
        if r is not None and g is not None:
            assert r.keys() == g.keys()  # same tokens scored everywhere else


def test_bad_parts_beside_an_image_get_a_400_and_the_server_stays_healthy(vlm_server, vlm_table):
    width = int(vlm_table.weight.shape[1])
    bad = {
        "nan": torch.full((2, width), float("nan")),
        "width": torch.zeros((2, width + 1)),
    }
    for name, tensor in bad.items():
        part = {"type": "prompt_embeds", "data": tensor_b64(tensor)}
        messages = [{"role": "user", "content": [image_part("red"), part]}]
        response = post(vlm_server, messages)
        assert response.status_code == 400, (name, response.text)
        assert "messages[0].content[1]" in response.json()["error"]["message"], name
    assert vlm_server.healthy()
    case = CASES["embeds_after_image"]
    assert content(chat(vlm_server, render(case, vlm_table.part))) == content(
        chat(vlm_server, as_text(case))
    )


IMAGE_PLACEMENTS = [
    Placement(
        "first_before_an_image",
        lambda p, v: [{"role": "user", "content": [p, image_part("red"), TEXT]}],
        "messages[0].content[0]",
    ),
    Placement(
        "after_an_image_and_a_valid_part",
        lambda p, v: [{"role": "user", "content": [image_part("blue"), v, p]}],
        "messages[0].content[2]",
    ),
]


@pytest.mark.parametrize("placement", IMAGE_PLACEMENTS, ids=[p.name for p in IMAGE_PLACEMENTS])
def test_every_bad_part_beside_an_image(vlm_server, vlm_table, placement):
    """The placed hostile table beside an image: our message naming the part's place."""
    width = int(vlm_table.weight.shape[1])
    assert placement_failures(chat_send(vlm_server), placement, vlm_table, width) == []
    assert vlm_server.healthy()


def test_other_media_beside_parts_are_refused_by_name():
    """Audio and video beside parts are untested, so refused (this model takes images only,
    and vLLM refuses other media for it before our renderer sees them)."""
    from vllm_chat_embeds.renderers.hf import _check_media

    _check_media({"image": [object()]})
    message = errors.WITH_MULTIMODAL.format(modalities="audio, video", mode="hf")
    with pytest.raises(VLLMValidationError, match=re.escape(message)):
        _check_media({"image": [object()], "audio": [object()], "video": [object()]})


def test_parts_by_reference_beside_images(vlm_server, vlm_table):
    """Parts sent once under a uuid, then by uuid alone beside images: the same answer as
    text, and as the data (the rows' content hash, kept beside them, keys the cache)."""
    case = CASES["two_messages"]
    reference = chat(vlm_server, as_text(case))
    tag = f"vlm-{torch.randint(0, 2**62, ()).item():x}-"

    def sent(text: str) -> dict[str, Any]:
        return {**vlm_table.part(text), "uuid": tag + text}

    assert content(chat(vlm_server, render(case, sent))) == content(reference)
    for _ in range(2):  # the second time, the rows' hash is the one kept beside them
        by_uuid = chat(
            vlm_server, render(case, lambda t: {"type": "prompt_embeds", "uuid": tag + t})
        )
        assert content(by_uuid) == content(reference)
        assert by_uuid["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"]


def test_truncation_beside_an_image_cuts_parts_as_their_text(vlm_server, vlm_table):
    """``truncate_prompt_tokens`` is applied again after the image is expanded; a cut through a
    part there keeps its kept rows (vLLM refuses a cut through the image, for text as for us)."""
    case = CASES["embeds_on_both_sides"]
    length = chat(vlm_server, as_text(case))["usage"]["prompt_tokens"]
    kept_rows = set()
    for k in (*range(length - 10, length), 6):
        reference = post(vlm_server, as_text(case), truncate_prompt_tokens=k)
        out = post(vlm_server, render(case, vlm_table.part), truncate_prompt_tokens=k)
        assert out.status_code == reference.status_code, (k, out.text, reference.text)
        if reference.status_code != 200:
            continue
        ref, got = reference.json(), out.json()
        assert content(got) == content(ref), k
        assert got["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"] == k
        media = got["usage"]["prompt_tokens_details"]["multimodal_tokens"]
        kept_rows.add(media.get("prompt_embeds", 0))
    # Whole parts, the first part cut through, and the first part cut away all occurred.
    assert len(kept_rows) >= 3, kept_rows

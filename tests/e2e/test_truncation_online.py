"""``truncate_prompt_tokens`` through prompt_embeds parts, on a real ``vllm serve``.

vLLM keeps the last k token ids of the rendered chat. The same chat sent as text and truncated
at the same k is the reference: a cut before a part keeps it whole, a cut through it keeps the
rows of its kept positions, a cut after it drops it. Each case runs against our plugin and, side
by side, vLLM's built-in (which slices its full-length embeddings with the ids).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from chat_cases import as_text, render
from conftest import tensor_b64

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 6}

# Each case has its prompt_embeds parts first, in the middle, last, alone, or several.
CASES: dict[str, list[dict[str, Any]]] = {
    "first": [
        {"role": "user", "content": [("e", "import os, sys"), ("t", " and print the path")]},
    ],
    "middle": [
        {
            "role": "user",
            "content": [("t", "Write a function"), ("e", " that adds two"), ("t", " numbers")],
        },
    ],
    "last": [
        {"role": "user", "content": [("t", "Write a function that adds"), ("e", " two numbers")]},
    ],
    "alone": [
        {"role": "user", "content": [("e", "Write a function that adds two numbers")]},
    ],
    "several": [
        {"role": "system", "content": [("e", "You write Python.")]},
        {"role": "user", "content": [("t", "Write"), ("e", " a loop over a list")]},
    ],
}


@pytest.fixture(params=["plugin", "builtin"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def post(server, messages, **kwargs) -> dict[str, Any]:
    body = {"model": server.model, "messages": messages, **GREEDY, **kwargs}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def prompt_ids(server, messages) -> list[int]:
    body = {"model": server.model, "messages": messages}
    response = requests.post(server.base_url + "/tokenize", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def part_spans(case, ids: list[int], table) -> list[tuple[int, int]]:
    """Where each part's rows sit in the text chat's ids: ``(start, end)``, in order."""
    spans, at = [], 0
    for message in case:
        for kind, text in message["content"] if isinstance(message["content"], list) else []:
            if kind != "e":
                continue
            run = table.tokenizer.encode(text, add_special_tokens=False)
            start = next(i for i in range(at, len(ids)) if ids[i : i + len(run)] == run)
            spans.append((start, start + len(run)))
            at = start + len(run)
    return spans


def cuts(length: int, spans: list[tuple[int, int]]) -> list[int]:
    """Values of k (keep the last k ids) cutting just before, at, through and after each part."""
    ks = {1}
    for start, end in spans:
        for first_kept in (start - 1, start, start + 1, end - 1, end):
            if 0 < first_kept < length:
                ks.add(length - first_kept)
    return sorted(ks)


def answer(reply: dict[str, Any]) -> tuple[str, int]:
    return reply["choices"][0]["message"]["content"], reply["usage"]["prompt_tokens"]


def parity_jobs(server, table, name: str) -> list[tuple[list, list, int]]:
    case = CASES[name]
    text = as_text(case)
    ids = prompt_ids(server, text)
    ks = cuts(len(ids), part_spans(case, ids, table))
    assert len(ks) >= 4
    return [(text, render(case, table.part), k) for k in ks]


@pytest.mark.parametrize("name", sorted(CASES))
def test_cut_before_through_and_after_each_part(server, table, name):
    for text, embeds, k in parity_jobs(server, table, name):
        reference = post(server, text, truncate_prompt_tokens=k)
        assert reference["usage"]["prompt_tokens"] == k
        assert answer(post(server, embeds, truncate_prompt_tokens=k)) == answer(reference), k


def test_concurrent_batch_of_cuts(server, table):
    jobs = [job for name in sorted(CASES) for job in parity_jobs(server, table, name)]
    with ThreadPoolExecutor(8) as pool:
        refs = list(pool.map(lambda j: post(server, j[0], truncate_prompt_tokens=j[2]), jobs))
        outs = list(pool.map(lambda j: post(server, j[1], truncate_prompt_tokens=j[2]), jobs))
    assert [answer(o) for o in outs] == [answer(r) for r in refs]


def test_right_side_truncation_keeps_the_first_rows(server, table):
    """``truncation_side: "right"`` keeps the first k ids: a part cut keeps its first rows."""
    case = CASES["middle"]
    ids = prompt_ids(server, as_text(case))
    ((start, end),) = part_spans(case, ids, table)
    for k in (start, start + 1, end - 1, end + 1):
        options = {"truncate_prompt_tokens": k, "truncation_side": "right"}
        reference = post(server, as_text(case), **options)
        assert answer(post(server, render(case, table.part), **options)) == answer(reference)


def test_prompt_logprobs_after_a_cut(plugin_server, table):
    """None at position 0 and at each kept row; the text path's values elsewhere."""
    case = CASES["middle"]
    ids = prompt_ids(plugin_server, as_text(case))
    ((start, end),) = part_spans(case, ids, table)
    k = len(ids) - start - 1  # the cut runs through the part: all but its first row kept
    options = {"truncate_prompt_tokens": k, "prompt_logprobs": 1}
    ref = post(plugin_server, as_text(case), **options)["prompt_logprobs"]
    got = post(plugin_server, render(case, table.part), **options)["prompt_logprobs"]
    assert len(got) == len(ref) == k
    rows = end - start - 1
    assert [i for i, e in enumerate(got) if e is None] == [0, *range(1, rows)]
    assert all(got[i] == ref[i] for i in range(rows, k))


def test_echo_after_a_cut(plugin_server, table):
    """vLLM echoes the last message as sent; truncation changes only the prompt."""
    case = [
        {"role": "user", "content": "def f(x):"},
        {"role": "assistant", "content": [("t", "return"), ("e", " x"), ("t", " + 1")]},
    ]
    echo = {"echo": True, "add_generation_prompt": False, "continue_final_message": True}
    for k in (2, 3, 5):
        ref = post(plugin_server, as_text(case), truncate_prompt_tokens=k, **echo)
        out = post(plugin_server, render(case, table.part), truncate_prompt_tokens=k, **echo)
        assert out["usage"] == ref["usage"]
        assert out["choices"][0]["message"]["content"].startswith("return\n + 1")


def test_prefix_cache_keeps_truncated_and_whole_prompts_apart(plugin_server, table):
    """A chat longer than a cache block (128 on CPU), sent whole, cut through its part and cut
    after it, twice each: every answer is the text path's, cached blocks or not."""
    long = "def main(argv):\n    parser = build_parser()\n" * 10
    case = [{"role": "user", "content": [("t", long), ("e", " return run(args) + 1")]}]
    ids = prompt_ids(plugin_server, as_text(case))
    ((start, end),) = part_spans(case, ids, table)
    salt = {"cache_salt": "truncation-test"}
    for _ in range(2):
        for k in (None, len(ids) - start - 2, len(ids) - end, len(ids) - 3):
            options = {**salt, "truncate_prompt_tokens": k}
            reference = post(plugin_server, as_text(case), **options)
            assert answer(post(plugin_server, render(case, table.part), **options)) == answer(
                reference
            )


def test_parts_by_reference_cut_through(feature_server, table):
    """Rows kept by uuid, then referred to and cut through: the kept slice is served."""
    case = CASES["middle"]
    text = as_text(case)
    ids = prompt_ids(feature_server, text)
    ((start, _),) = part_spans(case, ids, table)
    rows = table.rows(" that adds two")
    first = {"type": "prompt_embeds", "data": tensor_b64(rows), "uuid": "trunc-ref-1"}
    by_ref = {"type": "prompt_embeds", "uuid": "trunc-ref-1"}
    post(feature_server, render(case, lambda t: first))
    for k in (len(ids) - start - 1, len(ids) - start + 1, None):
        reference = post(feature_server, text, truncate_prompt_tokens=k)
        out = post(feature_server, render(case, lambda t: by_ref), truncate_prompt_tokens=k)
        assert answer(out) == answer(reference), k


def test_responses_truncation_auto_cuts_through_a_part(plugin_server, table):
    """``/v1/responses`` with ``truncation: "auto"`` keeps the last max-model-len - 1 (1023)
    tokens; a part at the front of a long input is cut as its text would be."""

    def respond(first: dict, filler: int) -> dict:
        content = [first, {"type": "input_text", "text": " a" * filler}]
        body = {
            "model": plugin_server.model,
            "input": [{"role": "user", "content": content}],
            "truncation": "auto",
            "temperature": 0.0,
            "max_output_tokens": 1,
        }
        response = requests.post(plugin_server.base_url + "/v1/responses", json=body, timeout=120)
        assert response.status_code == 200, response.text
        out = response.json()
        cached = out["usage"]["input_tokens_details"]["cached_tokens"]
        return {"text": out["output"][-1]["content"][0]["text"], "usage": out["usage"]}, cached

    words = " import os, sys"
    text = {"type": "input_text", "text": words}
    part = {"type": "prompt_embeds", "data": tensor_b64(table.rows(words))}
    rows = len(table.rows(words))
    base = respond(text, 10)[0]["usage"]["input_tokens"] - 10
    # The tokenizer cuts the chat, then adds its BOS: removed are the header's 4 tokens, then
    # the part's rows, then the filler.
    for over in range(2, 4 + rows + 1):
        filler = 1023 - base + over
        (reference, _), (out, cached) = respond(text, filler), respond(part, filler)
        assert out["text"] == reference["text"], over
        assert out["usage"]["input_tokens"] == reference["usage"]["input_tokens"] == 1023
        if over < 4 + rows:  # rows kept in the first block: it must not hit the text's blocks
            assert cached == 0, over
        else:  # every row cut away: the same prompt as the text, whose blocks it reuses
            assert cached > 0

"""Compact transport inside the engine: prefix caching, chunked prefill, preemption, and the
scheduler features that reorder or extend a request's steps (priority scheduling, ngram
speculative decoding), which share one small-chunk server.

The plugin sends only embedding rows to the engine; these tests exercise the engine paths
that used to assume one row per prompt position (see vllm_chat_embeds/patches/).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from chat_cases import as_text, render
from conftest import run_server, server_env, tensor_b64

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0.0, "max_tokens": 8}
PREFIX = "def main(argv):\n    parser = build_parser()\n    args = parser.parse_args(argv)\n"
SUFFIX = " # done"
CASE = [{"role": "user", "content": [("t", PREFIX), ("e", " return run(args)"), ("t", SUFFIX)]}]
# The CPU backend caches whole blocks of 128 tokens: the cache test needs a longer chat, with
# the rows in the second block.
LONG_PREFIX = PREFIX * 8
LONG_CASE = [
    {
        "role": "user",
        "content": [("t", LONG_PREFIX), ("e", " return run(args)"), ("t", SUFFIX * 40)],
    }
]


def post(server, messages, **kwargs):
    body = {"model": server.model, "messages": messages, **GREEDY, **kwargs}
    response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def cached(data) -> int:
    details = data["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def test_prefix_cache_hits_same_embeddings_and_misses_different_ones(plugin_server, table):
    rows = table.rows(" return run(args)")
    first_embed = len(table.tokenizer.encode("<|im_start|>user\n" + LONG_PREFIX))
    salt = {"cache_salt": "prefix-test"}  # isolates this test's cache entries

    def with_rows(r):
        part = {"type": "prompt_embeds", "data": tensor_b64(r)}
        return render(LONG_CASE, lambda text: part)

    post(plugin_server, with_rows(rows), **salt)
    again = post(plugin_server, with_rows(rows), **salt)
    other = post(plugin_server, with_rows(rows + 0.5), **salt)
    zeros = post(plugin_server, with_rows(torch.zeros_like(rows)), **salt)
    total = again["usage"]["prompt_tokens"]
    assert cached(again) > first_embed, again["usage"]  # blocks holding the rows hit
    assert cached(other) <= first_embed, other["usage"]  # only text blocks before the rows
    assert cached(zeros) <= first_embed, zeros["usage"]
    assert cached(other) > 0  # the text prefix itself hashes like text and hits
    assert cached(again) < total


NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}  # fmt: skip


@pytest.fixture(scope="module")
def tight_server(tiny_model, vllm_cache_root):
    """Small prefill chunks (8 tokens) and a KV cache of three 128-token blocks: chunks split
    embedding spans, and four concurrent requests growing past one block must preempt. The
    same server schedules by priority and drafts tokens by ngram lookup (one start for all)."""
    env = server_env(trap=True, plugins=True, mp=False, cache_root=vllm_cache_root)
    args = [
        "--enable-prompt-embeds",
        "--max-model-len", "256",
        "--max-num-batched-tokens", "8",
        "--max-num-seqs", "4",
        "--kv-cache-memory-bytes", str(3 * 128 * 2048),
        "--no-enable-prefix-caching",
        "--scheduling-policy", "priority",
        "--speculative-config", json.dumps(NGRAM),
    ]  # fmt: skip
    with run_server(tiny_model, *args, env=env) as server:
        yield server


def test_chunked_prefill_splitting_an_embeddings_span(tight_server, table):
    reference = post(tight_server, as_text(CASE))
    with_embeds = post(tight_server, render(CASE, table.part))
    assert with_embeds["choices"][0]["message"] == reference["choices"][0]["message"]


def preemptions(server) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=30).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("vllm:num_preemptions")
        and not line.startswith("#")
        and "_created" not in line  # a counter's creation timestamp, not a count
    )


def test_preemption_and_recompute_keep_parity(tight_server, table):
    cases = [
        [{"role": "user", "content": [("t", f"case {i}:"), ("e", " x = compute(y)")]}]
        for i in range(4)
    ]
    long = {"max_tokens": 150, "ignore_eos": True}
    # Four requests at once need more blocks than the cache holds; on a loaded machine the API
    # server may admit them too far apart to overlap, so the batch is sent again (up to three
    # times) until the engine has preempted while parts were running.
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda c: post(tight_server, as_text(c), **long), cases))
            before = preemptions(tight_server)
            embeds = list(
                pool.map(lambda c: post(tight_server, render(c, table.part), **long), cases)
            )
        for text, emb in zip(texts, embeds, strict=True):
            assert emb["choices"][0]["message"] == text["choices"][0]["message"]
        if preemptions(tight_server) > before:
            break
    else:
        raise AssertionError("the KV cache was meant to force preemption of requests with parts")


def metric(server, name: str) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=30).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_ngram_speculative_decoding_keeps_parity(tight_server, table):
    """Drafted tokens are checked by the model: parts and text give the same answer."""
    before = metric(tight_server, "vllm:spec_decode_num_drafts_total")
    long = {"max_tokens": 80, "ignore_eos": True}
    for case in (CASE, [{"role": "user", "content": [("e", PREFIX), ("t", SUFFIX)]}]):
        reference = post(tight_server, as_text(case), **long)
        with_embeds = post(tight_server, render(case, table.part), **long)
        assert with_embeds["choices"][0]["message"] == reference["choices"][0]["message"]
    assert metric(tight_server, "vllm:spec_decode_num_drafts_total") > before


def test_priority_scheduling_keeps_each_answer(tight_server, table):
    """Requests of different priorities in one batch (lower runs first, and is preempted
    last) each get the answer they get alone."""
    cases = [
        [{"role": "user", "content": [("t", f"job {i}:"), ("e", " y = transform(x)")]}]
        for i in range(4)
    ]
    requests_ = [
        (render(c, table.part), {"priority": p}) for c, p in zip(cases, (3, -1, 0, 7), strict=True)
    ]
    requests_ += [(as_text(cases[0]), {"priority": -5})]
    long = {"max_tokens": 40, "ignore_eos": True}
    alone = [post(tight_server, m, **kw, **long)["choices"] for m, kw in requests_]
    with ThreadPoolExecutor(len(requests_)) as pool:
        together = list(pool.map(lambda r: post(tight_server, r[0], **r[1], **long), requests_))
    assert [t["choices"] for t in together] == alone
    assert alone[0] != alone[1]

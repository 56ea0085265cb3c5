"""A bounded load test: concurrent valid and hostile requests, no 5xx, no crash, bounded RSS.

Why: the hostile test sends one request at a time. Here 6 client threads send a fixed mix of
120 requests (every hostile case of ``hostile_cases`` twice, the rest, at least 24, valid
prompt_embeds chats) to one live plugin server over loopback, so decoding, rejecting and
serving overlap. It stops by itself. Every hostile case must get its 400, every valid request
a 200 with the same prompt token count as in the warm-up, no response may be a 5xx, and at the
end ``/health`` must be ok and a greedy probe chat, sent alone, must answer exactly as before
the load (bad values surviving a request would change it).

Memory: the summed RSS of the server process tree (API server + engine core) is measured after
a warm-up round (every case once) and after the load. On the 2-core CPU machine this was
written on the tree holds about 2.4 to 2.5 GB and grew by 6 to 19 MB over nine runs, and by
28 MB with ten times the requests: it does not scale with the load, so it reads as allocator
settling. The bound, ``RSS_GROWTH_BOUND_MB`` = 300 MB, is over ten times that: it ignores
allocator noise and catches runaway growth, such as a hostile payload densified or kept alive.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
import requests
from hostile_cases import CASES

pytestmark = pytest.mark.e2e

CLIENT_THREADS = 6
TOTAL_REQUESTS = 120
HOSTILE_ROUNDS = 2  # every hostile case this many times within TOTAL_REQUESTS
MIN_VALID = 24  # valid requests even if the hostile table outgrows TOTAL_REQUESTS
RSS_GROWTH_BOUND_MB = 300.0
REQUEST_TIMEOUT_S = 60.0
GREEDY = {"temperature": 0.0, "max_tokens": 4}
PROBE = [{"role": "user", "content": "def f(x):"}]
# Texts whose embedding rows make the valid requests; distinct so payloads differ.
VALID_TEXTS = (" 1 + 2", " return x", " import os", " for i in range(3):", " print(x)")


@dataclass(frozen=True)
class Job:
    name: str
    messages: list[dict[str, Any]]
    expect_status: int
    valid_text: str | None = None  # set for the valid prompt_embeds chats


@dataclass(frozen=True)
class Outcome:
    job: Job
    status: int  # 0 for a transport error (connection refused, timeout)
    body: dict[str, Any] | str


def tree_rss_bytes(pid: int) -> int:
    """Summed RSS of a process and all its descendants (the engine core runs in a child)."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def send(server, job: Job) -> Outcome:
    body = {"model": server.model, "messages": job.messages, **GREEDY}
    url = server.base_url + "/v1/chat/completions"
    try:
        response = requests.post(url, json=body, timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as exc:
        return Outcome(job, 0, f"{type(exc).__name__}: {exc}")
    try:
        payload: dict[str, Any] | str = response.json()
    except ValueError:
        payload = response.text
    return Outcome(job, response.status_code, payload)


def probe_reply(server) -> str:
    body = {"model": server.model, "messages": PROBE, "temperature": 0.0, "max_tokens": 8}
    url = server.base_url + "/v1/chat/completions"
    response = requests.post(url, json=body, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def run_all(server, jobs: list[Job]) -> list[Outcome]:
    with ThreadPoolExecutor(max_workers=CLIENT_THREADS) as pool:
        return list(pool.map(lambda job: send(server, job), jobs))


def describe(outcome: Outcome) -> str:
    return f"{outcome.job.name}: HTTP {outcome.status}: {str(outcome.body)[:300]}"


def hostile_jobs(width: int, table) -> list[Job]:
    """One job per case of ``hostile_cases`` (its valid control expects a 200)."""
    rows = table.rows(" 1 + 2")
    return [
        Job(case.name, case.build(width, rows), 200 if case.expect is None else 400)
        for case in CASES
    ]


def test_bounded_concurrent_load(plugin_server, table):
    width = int(table.weight.shape[1])
    valid_messages = {
        text: [{"role": "user", "content": [{"type": "text", "text": "x ="}, table.part(text)]}]
        for text in VALID_TEXTS
    }

    def valid(text: str) -> Job:
        return Job(f"valid{text!r}", valid_messages[text], 200, valid_text=text)

    hostile = hostile_jobs(width, table)
    # Warm-up: every path once (each hostile case, each valid text), concurrently, so the
    # baseline includes whatever the server allocates on first use.
    warmup = run_all(plugin_server, hostile + [valid(text) for text in VALID_TEXTS])
    prompt_tokens = {}
    for outcome in warmup:
        assert outcome.status == outcome.job.expect_status, describe(outcome)
        if outcome.job.valid_text is not None:
            prompt_tokens[outcome.job.valid_text] = outcome.body["usage"]["prompt_tokens"]
    assert set(prompt_tokens) == set(VALID_TEXTS)
    reply_before = probe_reply(plugin_server)
    rss_before = tree_rss_bytes(plugin_server.proc.pid)

    jobs = hostile * HOSTILE_ROUNDS
    valid_count = max(TOTAL_REQUESTS - len(jobs), MIN_VALID)
    jobs += [valid(VALID_TEXTS[i % len(VALID_TEXTS)]) for i in range(valid_count)]
    random.Random(0).shuffle(jobs)
    start = time.monotonic()
    outcomes = run_all(plugin_server, jobs)
    elapsed = time.monotonic() - start
    rss_after = tree_rss_bytes(plugin_server.proc.pid)
    growth_mb = (rss_after - rss_before) / 2**20
    print(
        f"\nload: {len(outcomes)} requests from {CLIENT_THREADS} threads in {elapsed:.1f}s; "
        f"server tree RSS {rss_before / 2**20:.1f} MB -> {rss_after / 2**20:.1f} MB "
        f"(growth {growth_mb:+.1f} MB, bound {RSS_GROWTH_BOUND_MB:.0f} MB)"
    )

    server_errors = [describe(o) for o in outcomes if o.status == 0 or o.status >= 500]
    assert not server_errors, server_errors
    wrong = [describe(o) for o in outcomes if o.status != o.job.expect_status]
    assert not wrong, wrong
    hostile_names = {o.job.name for o in outcomes if o.job.expect_status == 400}
    assert hostile_names == {case.name for case in CASES if case.expect is not None}
    for outcome in outcomes:
        if outcome.job.valid_text is not None:
            usage = outcome.body["usage"]
            assert usage["prompt_tokens"] == prompt_tokens[outcome.job.valid_text], usage
            assert outcome.body["choices"][0]["finish_reason"] in ("length", "stop")
    assert plugin_server.healthy()
    assert probe_reply(plugin_server) == reply_before
    assert growth_mb < RSS_GROWTH_BOUND_MB, f"server RSS grew by {growth_mb:.1f} MB"

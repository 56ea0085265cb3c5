"""Hostile and edge-case prompt_embeds chats against the plugin and vLLM's built-in, in turn.

Why: the e2e tests assert what the plugin answers; this script records what both answer, for
the same requests, so the differences (and the requests that kill the built-in's engine) are
documented with real output rather than claims. Not a test: it never fails on a difference.

It builds the tiny test model, starts ``vllm serve`` with the plugin, then with
``VLLM_PLUGINS=""`` (vLLM 0.32's built-in prompt_embeds chat support), both with
``--enable-prompt-embeds``, ``--trust-request-chat-template`` (for the reordering-template case)
and the CPU flags of ``tests/conftest.py``. For each case it records the HTTP status, the first
100 characters of the error message (for a 200: the prompt token count and the reply) and
whether the server still served a probe chat afterwards. A server that died is restarted for
the remaining cases, and the restart is recorded. Prints a side-by-side table and writes
``benchmarks/results/hostile_side_by_side.json``.

    .venv/bin/python benchmarks/hostile_side_by_side.py
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402, F401  (imported first: puts tests/ and tests/e2e/ on sys.path)
from chat_cases import REVERSED, as_text, render  # noqa: E402  (tests/e2e, via common)
from common import (  # noqa: E402
    CPU_FLAGS,
    TEST_SERVER_ARGS,
    EmbeddingTable,
    ManagedServer,
    Server,
    build_tiny_model,
    exit_on_sigterm,
    vllm_cache_root,
    write_results,
)
from hostile_cases import CASES as HOSTILE  # noqa: E402  (tests/, via common)

MESSAGE_CHARS = 100
REQUEST_TIMEOUT_S = 120.0
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 6}
PROBE = [{"role": "user", "content": "def f(x):"}]


@dataclass(frozen=True)
class Case:
    """One request: messages, extra body fields, and which write-up it documents."""

    name: str
    messages: list[dict[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    about: str = ""  # the defect of docs/upstream.md this case shows, if any


@dataclass
class Result:
    status: int | str  # HTTP status, or "timeout" / "connection error"
    message: str
    alive_after: bool
    restarted_after: bool = False
    seconds: float = 0.0


# Segment notation of tests/e2e/chat_cases.py: ("t", text) is a text part, ("e", text) a
# prompt_embeds part holding the model's own embedding rows of that text.
PLAIN = [{"role": "user", "content": [("t", "def f(x):"), ("e", " return x"), ("t", " + 1")]}]
# vLLM echoes the last message only when it has the reply's role: continue an assistant turn.
ASSISTANT_LAST = [
    {"role": "user", "content": "def f(x):"},
    {"role": "assistant", "content": [("t", "return"), ("e", " x"), ("t", " + 1")]},
]
ECHO = {"echo": True, "add_generation_prompt": False, "continue_final_message": True}
REORDERED = [
    {"role": "user", "content": [("e", "import os"), ("t", " then")]},
    {"role": "assistant", "content": [("t", "ok,"), ("e", " done")]},
    {"role": "user", "content": [("t", "now"), ("e", " print(os)")]},
]
TEXT_ONLY = [{"role": "user", "content": "def hello(world):"}]


def build_cases(table: EmbeddingTable) -> list[Case]:
    """Every hostile case of tests/hostile_cases.py, then echo/logprobs and defect probes."""
    width = int(table.weight.shape[1])
    rows = table.rows(" 1 + 2")
    cases = [Case(c.name, c.build(width, rows), about="hostile") for c in HOSTILE]
    part = table.part
    cases += [
        Case("echo_with_part", render(ASSISTANT_LAST, part), ECHO, "a"),
        Case("prompt_logprobs_with_part", render(PLAIN, part), {"prompt_logprobs": 1}, "a"),
        Case(
            "logprobs_top_logprobs_with_part",
            render(PLAIN, part),
            {"logprobs": True, "top_logprobs": 3},
        ),
        Case("stream_echo_text_list", as_text(ASSISTANT_LAST), {**ECHO, "stream": True}, "h"),
        Case("stream_echo_with_part", render(ASSISTANT_LAST, part), {**ECHO, "stream": True}, "h"),
        Case("reversed_template_as_text", as_text(REORDERED), {"chat_template": REVERSED}, "d"),
        Case("reversed_template_parts", render(REORDERED, part), {"chat_template": REVERSED}, "d"),
        Case("text_chat_add_special_false", TEXT_ONLY, {"add_special_tokens": False}, "g"),
        Case("text_chat_add_special_true", TEXT_ONLY, {"add_special_tokens": True}, "g"),
    ]
    return cases


def clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def summarize_stream(response: requests.Response) -> str:
    """The streamed reply text, or the first error event vLLM sent instead."""
    pieces = []
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        if "error" in event:
            return "stream error event: " + str(event["error"].get("message", event["error"]))
        for choice in event.get("choices", []):
            pieces.append((choice.get("delta") or {}).get("content") or "")
    return "stream ok: " + repr("".join(pieces))


def summarize(response: requests.Response, stream: bool) -> str:
    if response.status_code == 200 and stream:
        return summarize_stream(response)
    try:
        body = response.json()
    except ValueError:
        return response.text
    if response.status_code != 200:
        error = body.get("error", body) if isinstance(body, dict) else body
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    choice = body["choices"][0]
    return f"pt={body['usage']['prompt_tokens']} {choice['message']['content']!r}"


def send(server: Server, case: Case) -> tuple[int | str, str]:
    body = {"model": server.model, "messages": case.messages, **GREEDY, **case.options}
    stream = bool(case.options.get("stream"))
    url = server.base_url + "/v1/chat/completions"
    try:
        with requests.post(url, json=body, stream=stream, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status_code, clip(summarize(response, stream))
    except requests.Timeout:
        return "timeout", f"no answer within {REQUEST_TIMEOUT_S:.0f}s"
    except requests.RequestException as exc:
        return "connection error", clip(f"{type(exc).__name__}: {exc}")


def alive(server: Server) -> bool:
    """/health is ok and a one-token text chat is served (a dead engine fails one of them)."""
    if not server.healthy():
        return False
    body = {"model": server.model, "messages": PROBE, "max_tokens": 1, "temperature": 0.0}
    try:
        response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    except requests.RequestException:
        return False
    return response.status_code == 200 and server.healthy()


def run_flavour(managed: ManagedServer, cases: list[Case]) -> dict[str, Result]:
    results: dict[str, Result] = {}
    with managed:
        for case in cases:
            started = time.monotonic()
            status, message = send(managed.server, case)
            result = Result(status, message, alive(managed.server))
            result.seconds = round(time.monotonic() - started, 2)
            print(f"  {managed.flavour:8} {case.name:34} {status} alive={result.alive_after}")
            if not result.alive_after:
                managed.restart()
                result.restarted_after = True
            results[case.name] = result
    return results


def cell(result: Result) -> str:
    return f"{result.status} {result.message}".replace("|", "\\|")


def alive_cell(result: Result) -> str:
    return "yes" if result.alive_after else "**NO** (died; restarted)"


def print_table(cases: list[Case], plugin: dict[str, Result], builtin: dict[str, Result]) -> None:
    print("\n| case | plugin | built-in | built-in alive? |")
    print("| --- | --- | --- | --- |")
    for case in cases:
        p, b = plugin[case.name], builtin[case.name]
        name = case.name + ("" if p.alive_after else " (plugin died!)")
        print(f"| {name} | {cell(p)} | {cell(b)} | {alive_cell(b)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-name", default="hostile_side_by_side", help="results file stem")
    args = parser.parse_args()
    exit_on_sigterm()

    model = build_tiny_model()
    table = EmbeddingTable(model)
    cases = build_cases(table)
    runs: dict[str, dict[str, Result]] = {}
    servers: dict[str, ManagedServer] = {}
    with vllm_cache_root() as cache_root:
        for flavour in ("plugin", "builtin"):
            print(f"{flavour}: starting vllm serve ...", flush=True)
            servers[flavour] = ManagedServer(flavour, model, cache_root)
            runs[flavour] = run_flavour(servers[flavour], cases)

    print_table(cases, runs["plugin"], runs["builtin"])
    for flavour, managed in servers.items():
        print(f"{flavour}: {managed.restarts} restart(s); startup seconds {managed.startup_s}")

    import vllm

    import vllm_chat_embeds

    data = {
        "meta": {
            "vllm": vllm.__version__,
            "vllm_chat_embeds": vllm_chat_embeds.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "model": str(model.relative_to(model.parents[1])),
            "server_args": [*CPU_FLAGS, *TEST_SERVER_ARGS],
            "request_defaults": GREEDY,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "servers": {
            flavour: {"restarts": m.restarts, "startup_s": m.startup_s}
            for flavour, m in servers.items()
        },
        "cases": [
            {
                "name": case.name,
                "about": case.about,
                "options": {k: v for k, v in case.options.items() if k != "chat_template"},
                **{flavour: asdict(runs[flavour][case.name]) for flavour in runs},
            }
            for case in cases
        ],
    }
    print(f"\nwrote {write_results(args.out_name, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

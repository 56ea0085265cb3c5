"""Hostile and edge-case prompt_embeds chats against the plugin and vLLM's built-in, in turn.

Why: the e2e tests assert what the plugin answers; this script records what both answer, for
the same requests, so the differences (and the requests that kill the built-in's engine) are
documented with real output rather than claims. Not a test: it never fails on a difference.

It builds the tiny test model, starts ``vllm serve`` with the plugin, then with
``VLLM_PLUGINS=""`` (the built-in prompt_embeds chat support of the vLLM in this venv: 0.32,
or 0.33 on the harness of ``make venv-vllm033``), both with
``--enable-prompt-embeds``, ``--trust-request-chat-template`` (for the reordering-template case)
and the CPU flags of ``tests/conftest.py``. For each case it records the HTTP status, the first
100 characters of the error message (for a 200: the prompt token count and the reply) and
whether the server afterwards still answers a fixed greedy probe chat, and with the same reply
as at start-up. A server that died, or whose probe reply changed, is restarted for the
remaining cases, and the restart is recorded. Prints a side-by-side table and writes
``benchmarks/results/hostile_side_by_side.json``.

A third column, vLLM 0.33's built-in with the upstream patch series of ``upstream/`` applied
(plugin off, served by the 0.33 harness), is added when ``build/upstream/site`` exists (built by
``tools/upstream_check.py --apply-only``; ``--series yes|no`` forces it on or off).

    .venv/bin/python benchmarks/hostile_side_by_side.py [--model-dir CHECKPOINT_DIR]
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
    HARNESS_VLLM,
    SERIES_SITE,
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
DETAIL_CHARS = 600
REQUEST_TIMEOUT_S = 120.0
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 6}
# A fixed greedy text chat: sent after every case, its reply must stay what it was at start-up
# (a server can stay up yet answer differently, e.g. when bad values survive a request).
PROBE = [{"role": "user", "content": "def f(x):"}]
PROBE_TOKENS = 8


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
    message: str  # the first MESSAGE_CHARS characters of ``detail``
    detail: str  # error message (or reply summary), up to DETAIL_CHARS characters
    alive_after: bool  # /health ok and the probe chat answered 200
    probe_unchanged: bool  # ... with the same reply as right after start-up
    probe_reply: str | None  # that reply (None: no answer)
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
    by_name = {c.name: c for c in HOSTILE}
    forged = by_name["reserved_in_tool_arguments"].build(width, rows)
    forged += [{"role": "user", "content": [{"type": "text", "text": "x ="}, part(" 1")]}]
    cases += [
        Case("reserved_in_tool_arguments_with_part", forged, about="e"),
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
        Case("beam_search_with_part", render(PLAIN, part), {"use_beam_search": True, "n": 2}, "k"),
    ]
    return cases


def one_line(text: str) -> str:
    return " ".join(text.split())


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
            return response.status_code, one_line(summarize(response, stream))[:DETAIL_CHARS]
    except requests.Timeout:
        return "timeout", f"no answer within {REQUEST_TIMEOUT_S:.0f}s"
    except requests.RequestException as exc:
        return "connection error", one_line(f"{type(exc).__name__}: {exc}")[:DETAIL_CHARS]


def probe(server: Server) -> str | None:
    """The probe chat's reply, or None when the server is not healthy or fails it."""
    if not server.healthy():
        return None
    body = {
        "model": server.model,
        "messages": PROBE,
        "max_tokens": PROBE_TOKENS,
        "temperature": 0.0,
    }
    try:
        response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
    except requests.RequestException:
        return None
    if response.status_code != 200 or not server.healthy():
        return None
    return str(response.json()["choices"][0]["message"]["content"])


def run_flavour(managed: ManagedServer, cases: list[Case]) -> dict[str, Result]:
    """Send every case in turn; restart the server after one that killed or changed it."""
    results: dict[str, Result] = {}
    with managed:
        baseline = probe(managed.server)
        for case in cases:
            started = time.monotonic()
            status, detail = send(managed.server, case)
            reply = probe(managed.server)
            result = Result(
                status, detail[:MESSAGE_CHARS], detail, reply is not None, reply == baseline, reply
            )
            result.seconds = round(time.monotonic() - started, 2)
            print(
                f"  {managed.flavour:8} {case.name:38} {status} alive={result.alive_after} "
                f"probe_unchanged={result.probe_unchanged}",
                flush=True,
            )
            if not result.probe_unchanged:
                managed.restart()
                result.restarted_after = True
                baseline = probe(managed.server)
            results[case.name] = result
    return results


def cell(result: Result) -> str:
    return f"{result.status} {result.message}".replace("|", "\\|")


def state_cell(result: Result) -> str:
    if not result.alive_after:
        return "**NO** (died; restarted)"
    if not result.probe_unchanged:
        return "**changed**: probe answer differs (restarted)"
    return "yes"


def print_table(cases: list[Case], runs: dict[str, dict[str, Result]]) -> None:
    plugin, builtin, series = runs["plugin"], runs["builtin"], runs.get("series")
    extra = " 0.33 + upstream series | series alive? |" if series else ""
    print(f"\n| case | plugin | built-in | built-in alive? |{extra}")
    print("| --- | --- | --- | --- |" + (" --- | --- |" if series else ""))
    for case in cases:
        p, b = plugin[case.name], builtin[case.name]
        name = case.name if p.probe_unchanged else f"{case.name} (plugin: {state_cell(p)})"
        row = f"| {name} | {cell(p)} | {cell(b)} | {state_cell(b)} |"
        if series:
            s = series[case.name]
            row += f" {cell(s)} | {state_cell(s)} |"
        print(row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-name", default="hostile_side_by_side", help="results file stem")
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="serve this checkpoint directory instead of the tiny test model (built if needed)",
    )
    parser.add_argument(
        "--series",
        choices=("auto", "yes", "no"),
        default="auto",
        help="third column: vLLM 0.33 + the upstream series, plugin off (auto: when "
        "build/upstream/site exists, i.e. after tools/upstream_check.py --apply-only)",
    )
    args = parser.parse_args()
    exit_on_sigterm()
    with_series = args.series == "yes" or (
        args.series == "auto" and (SERIES_SITE / "vllm").is_dir() and HARNESS_VLLM.exists()
    )

    model = args.model_dir.resolve() if args.model_dir else build_tiny_model()
    table = EmbeddingTable(model)
    cases = build_cases(table)
    runs: dict[str, dict[str, Result]] = {}
    servers: dict[str, ManagedServer] = {}
    with vllm_cache_root() as cache_root:
        for flavour in ("plugin", "builtin", *(("series",) if with_series else ())):
            print(f"{flavour}: starting vllm serve ...", flush=True)
            servers[flavour] = ManagedServer(flavour, model, cache_root)
            runs[flavour] = run_flavour(servers[flavour], cases)

    print_table(cases, runs)
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
            "model": model.name,
            "server_args": [*CPU_FLAGS, *TEST_SERVER_ARGS],
            "request_defaults": GREEDY,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "probe": {"messages": PROBE, "max_tokens": PROBE_TOKENS},
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

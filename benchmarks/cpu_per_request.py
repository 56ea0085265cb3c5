"""CPU time per request in each process of a server (API server, engine core, workers), for big
parts in every form, beside the floor of the same work done by a minimal loop (issue 32).

Why: one API server process handles every request's body on one core, so its CPU per part is
the ceiling of big-part requests per second on any host. Wall times hide where CPU goes; this
reads each process's own CPU time (``/proc/<pid>/stat``: user + system) before and after a
batch of identical requests and divides by their count.

Servers: the plugin and the built-in (``VLLM_PLUGINS=""``), started together, on
``big_parts.py``'s 4096-wide cheap model (``--max-model-len 8448``, no prefix caching,
float32, TP=1). Each process of a server is classed by its name: ``VLLM::EngineCore``,
``VLLM::Worker...``, the ``vllm serve`` process itself (the API server), anything else
(``other``). Variants, per size (1024, 2048, 8192 float16 rows of the model's own embedding
rows of one-token words, after ``"Repeat:"``):

- ``text``: the same words as text (both servers);
- ``inline_raw``, ``inline_safetensors``, ``inline_torch``: the part inline in that encoding
  (the built-in reads ``torch`` only);
- ``upload``: ``upload_rows`` (raw bytes to ``POST /v1/prompt_embeds``) alone;
- ``files``: ``client.files.create`` (a safetensors file) alone;
- ``chat_by_id``: the chat naming rows uploaded beforehand (so ``upload`` + ``chat_by_id`` is
  what a part sent by upload costs in all).

Per part: the API server's CPU beyond the same server's text chat of that size (the chat's
own work, which any chat costs), or an upload's in all; ``part/floor`` is its ratio to the
floor, beside ``API/floor`` for the whole request.

The floor (``floor_server.py``): a minimal HTTP loop in its own process, sent the very same
bodies, whose own CPU time per request is read the same way (its clock, not ticks): it reads
the body off the socket into fresh memory (huge pages) and, for an inline part, finds the
part's data string in the raw-encoded body, base64-decodes it (``pybase64``) and checks the
rows are finite (the plugin's one-reduction check, the cheapest known); for an upload, it
checks the bytes as sent. No JSON parse, no render, no digest, no shared memory, no engine.
The ratio is the API server's CPU per request over that floor.

    .venv/bin/python benchmarks/cpu_per_request.py [--quick] [--runs N] [--rows N ...]

Prints a table, writes ``benchmarks/results/cpu_per_request.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402, F401  (imported first: puts tests/ on sys.path)
from big_parts import (  # noqa: E402
    BigChats,
    big_chats,
    build_big_model,
    cpu_seconds,
    server_flags,
    sized_args,
)
from common import Server, exit_on_sigterm, started_together, vllm_cache_root, write_results  # noqa: E402
from conftest import MODELS, VLLM, free_port, run_server, server_env  # noqa: E402
from latency_side_by_side import SERVED_NAME, check_impl  # noqa: E402

from vllm_chat_embeds.client import prompt_embeds_part, upload_file, upload_rows  # noqa: E402

NAME = "cpu_per_request"
PLUGIN_VARIANTS = (
    "text", "inline_raw", "inline_safetensors", "inline_torch", "upload", "files", "chat_by_id"
)  # fmt: skip
BUILTIN_VARIANTS = ("text", "inline_torch")


def chat_body(content: list[dict[str, Any]]) -> str:
    return json.dumps({"model": SERVED_NAME, "messages": [{"role": "user", "content": content}],
                       "max_tokens": 1, "temperature": 0.0})  # fmt: skip


def post(server: Server, data: str) -> None:
    response = requests.post(server.base_url + "/v1/chat/completions", data=data,
                             headers={"Content-Type": "application/json"}, timeout=600)  # fmt: skip
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text[:300]}")


def sender(server: Server, big: BigChats, n: int, variant: str) -> Callable[[], None]:
    rows = big.rows(n)
    if variant == "text":
        data = chat_body(big.text(n))
        return lambda: post(server, data)
    if variant.startswith("inline_"):
        part = prompt_embeds_part(rows, encoding=variant.removeprefix("inline_"))
        data = chat_body(big.with_part(part))
        return lambda: post(server, data)
    base = server.base_url + "/v1"
    if variant == "upload":
        return lambda: None if upload_rows(base, rows) else None
    if variant == "chat_by_id":
        data = chat_body(big.with_part(upload_rows(base, rows)))
        return lambda: post(server, data)
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    return lambda: None if upload_file(client, rows) else None


@contextmanager
def floor_server() -> Iterator[str]:
    """``floor_server.py`` on a free port, stopped on exit; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("floor_server.py")),
                             str(port)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def floor_ms(floor_url: str, big: BigChats, n: int, variant: str, runs: int) -> float | None:
    """The minimal loop's CPU per request for the same body (ms), or None (text, chats by id)."""
    if variant in ("text", "chat_by_id"):
        return None
    rows = big.rows(n)
    if variant in ("upload", "files", "upload_reused"):
        path, data = "/" + variant.replace("files", "upload"), rows.numpy().tobytes()
    else:  # every inline encoding against the raw-encoded body: the least decoding there is
        path = "/inline"
        data = chat_body(big.with_part(prompt_embeds_part(rows, encoding="raw"))).encode()
    session = requests.Session()

    def cpu() -> float:
        return float(session.get(floor_url + "/cpu", timeout=60).text)

    session.post(floor_url + path, data=data, timeout=600).raise_for_status()  # warm
    times = []
    for _ in range(runs):
        before = cpu()
        session.post(floor_url + path, data=data, timeout=600).raise_for_status()
        times.append(cpu() - before)
    return round(1000 * statistics.median(times), 1)


def measure(server: Server, send: Callable[[], None], runs: int) -> dict[str, float]:
    root = server.proc.pid
    for _ in range(2):  # one-off costs of a shape (shared segments of a new size come in pairs:
        send()  # a worker lets a request's rows go only at its next step)
    time.sleep(1.5)
    before = cpu_seconds(root)
    for _ in range(runs):
        send()
        time.sleep(0.3)  # idle between requests, so nothing of one overlaps the next
    time.sleep(1.5)  # let workers stop polling before reading
    after = cpu_seconds(root)
    return {k: round(1000 * (after.get(k, 0.0) - before.get(k, 0.0)) / runs, 1)
            for k in sorted(set(after) | set(before)) if k != "gone"}  # fmt: skip


@contextmanager
def serve(model: Path, cache_root: str) -> Iterator[dict[str, Server]]:
    base = [VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", "{port}"]
    managers = {
        impl: run_server(
            model,
            env=server_env(trap=False, plugins=impl == "plugin", mp=True, cache_root=cache_root),
            command=base + server_flags(model, 1),
        )
        for impl in ("plugin", "builtin")
    }
    with started_together(managers) as servers:
        for impl, server in servers.items():
            check_impl(impl, server)
        yield servers


def part_ms(
    table: list[dict[str, Any]], impl: str, n: int, variant: str, api: float
) -> float | None:
    """The API server's CPU for the part itself: a chat's beyond the same server's text chat of
    that size (measured first), an upload's in all (it is nothing but the part)."""
    if variant == "text":
        return None
    if variant in ("upload", "files"):
        return api
    text = [r for r in table if (r["impl"], r["rows"], r["variant"]) == (impl, n, "text")]
    return round(api - text[0]["api_server"], 1) if text else None


def main(argv: list[str] | None = None) -> int:
    args = sized_args(argv, __doc__.splitlines()[0], rows=[1024, 2048, 8192], runs=5, seed=32)
    exit_on_sigterm()
    started = time.monotonic()
    model = build_big_model(MODELS)
    big = big_chats(model, args.seed)
    table = []
    with (
        vllm_cache_root() as cache_root,
        serve(model, cache_root) as servers,
        floor_server() as floor_url,
    ):
        for n in args.rows:
            for impl, variants in (("plugin", PLUGIN_VARIANTS), ("builtin", BUILTIN_VARIANTS)):
                for variant in variants:
                    cpu = measure(servers[impl], sender(servers[impl], big, n, variant), args.runs)
                    floor = floor_ms(floor_url, big, n, variant, args.runs)
                    api = cpu.get("api_server", 0.0)
                    reused = (floor_ms(floor_url, big, n, "upload_reused", args.runs)
                              if variant in ("upload", "files") else None)  # fmt: skip
                    part = part_ms(table, impl, n, variant, api)
                    part_x = round(part / floor, 2) if floor and part else None
                    row = {"impl": impl, "rows": n, "variant": variant, **cpu,
                           "floor_ms": floor, "floor_reused_ms": reused,
                           "api_x_floor": round(api / floor, 2) if floor else None,
                           "part_ms": part, "part_x_floor": part_x}  # fmt: skip
                    table.append(row)
                    print(json.dumps(row), flush=True)
    print(
        "\nimpl | rows | variant | API server ms | engine core ms | workers ms | floor ms | "
        "API/floor | part ms | part/floor | floor, buffer reused ms"
    )
    for r in table:
        print(f"{r['impl']} | {r['rows']} | {r['variant']} | {r.get('api_server')} | "
              f"{r.get('engine_core')} | {r.get('workers')} | {r['floor_ms']} | "
              f"{r['api_x_floor']} | {r['part_ms']} | {r['part_x_floor']} | "
              f"{r['floor_reused_ms']}")  # fmt: skip
    path = write_results(NAME, {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "args": vars(args), "table": table, "seconds": round(time.monotonic() - started, 1),
    })  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

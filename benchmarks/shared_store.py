"""A chat by id resolved from the shared row store, beside the same chat with its rows held
locally, inline, and as text; vLLM's built-in inline and as text alongside (issue 29).

Why: with ``CHAT_EMBEDS_SHARED_STORE`` a replica that did not take an upload reads its rows
from Redis once (one ``HMGET``, the checks of an upload, the SHA-256) and holds them from then
on; a replica that holds them confirms them with one small read per request. This measures
both against the chat as text on the same server, at big-part sizes.

Model and flags: ``big_parts.py``'s (``.models/wide-4096-cheap``, 4096 wide, one cheap layer,
``--max-model-len 8448``, no prefix caching, float32). Servers, started together: plugin
replicas A and B sharing one ``redis-server`` (Debian's, started here on a free port, no
persistence), and the built-in (``VLLM_PLUGINS=""``). A chat is ``"Repeat:"`` and one float16
part of N rows (the model's own embedding rows of N one-token words), or those words as text.
Variants, all timed on B (and the built-in's on the built-in):

- ``plugin_text``: the words as text (the baseline of every ratio);
- ``plugin_held``: the part by id, its rows held by B (one small read of the store);
- ``plugin_from_store``: the part by an id A took just before (``upload_rows`` to A, untimed),
  so B reads, checks and keeps the rows from the store inside the timed request;
- ``plugin_inline``: the part inline (``raw``, base64 in JSON);
- ``builtin_text`` / ``builtin_inline``: the built-in, as text / inline (``torch``).

Latency: wall time of one non-streaming greedy request, ``max_tokens=1``, body serialised
before the clock starts; median over ``--runs``, variants shuffled per run; ratio = variant /
the same server's text chat. Greedy replies are compared with the text chat's (``parity``).
Also timed in this process: the store's own read and checks of the same rows (``store_ms``:
``SharedStore.read`` plus ``rows_of``, the floor of ``plugin_from_store`` over ``plugin_held``).

    .venv/bin/python benchmarks/shared_store.py [--quick] [--runs N] [--rows N ...]

Prints a table, writes ``benchmarks/results/shared_store.json``.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402, F401  (imported first: puts tests/ on sys.path)
from big_parts import BigChats, big_chats, build_big_model, server_flags, sized_args  # noqa: E402
from common import (  # noqa: E402
    Server,
    exit_on_sigterm,
    started_together,
    vllm_cache_root,
    write_results,
)
from conftest import MODELS, VLLM, run_server, server_env  # noqa: E402
from latency_side_by_side import Body, check_impl, post  # noqa: E402
from redis_server import RedisServer  # noqa: E402

from vllm_chat_embeds.client import prompt_embeds_part, upload_rows  # noqa: E402
from vllm_chat_embeds.payload import PayloadSpec  # noqa: E402
from vllm_chat_embeds.row_digest import rows_digest  # noqa: E402
from vllm_chat_embeds.stores import shared_store  # noqa: E402

NAME = "shared_store"
VARIANTS = (
    "plugin_text",
    "plugin_held",
    "plugin_from_store",
    "plugin_inline",
    "builtin_text",
    "builtin_inline",
)


@contextmanager
def serve(model: Path, cache_root: str, store_url: str) -> Iterator[dict[str, Server]]:
    base = [VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", "{port}"]
    command = base + server_flags(model, 1)
    managers = {}
    for name in ("a", "b", "builtin"):
        plugin = name != "builtin"
        extra = {"CHAT_EMBEDS_SHARED_STORE": store_url} if plugin else {}
        env = server_env(trap=False, plugins=plugin, mp=True, cache_root=cache_root, extra=extra)
        managers[name] = run_server(model, env=env, command=command)
    with started_together(managers) as servers:
        for name, server in servers.items():
            check_impl("builtin" if name == "builtin" else "plugin", server)
        yield servers


def store_ms(store_url: str, big: BigChats, n: int, runs: int) -> float:
    """The store's read and checks of ``n`` rows, in this process (median ms)."""
    rows = big.rows(n).contiguous()
    store = shared_store.SharedStore(store_url, timeout_s=10, ttl_s=600)
    store.bind(("bench",), int(rows.shape[1]), "")
    store.write("bench", rows, rows_digest(rows))
    spec = PayloadSpec(width=int(rows.shape[1]), dtype=rows.dtype, max_part_bytes=1 << 30,
                       max_rows=n, rows_limit=n)  # fmt: skip
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        found = store.read({"bench": True})["bench"]
        assert found is not None
        shared_store.rows_of(found, spec, "bench")
        times.append(time.perf_counter() - started)
    store.delete("bench")
    return round(1000 * statistics.median(times), 1)


def measure(servers: dict[str, Server], big: BigChats, n: int, runs: int, seed: int) -> list[dict]:
    a, b, builtin = servers["a"], servers["b"], servers["builtin"]
    rows = big.rows(n)
    held = upload_rows(a.base_url + "/v1", rows)  # B reads it once below, then holds it
    bodies = {
        "plugin_text": Body(big.text(n)),
        "plugin_held": Body(big.with_part(held)),
        "plugin_inline": Body(big.with_part(prompt_embeds_part(rows, encoding="raw"))),
        "builtin_text": Body(big.text(n)),
        "builtin_inline": Body(big.with_part(prompt_embeds_part(rows, encoding="torch"))),
    }
    sessions = {"b": requests.Session(), "builtin": requests.Session()}
    for name, body in bodies.items():  # first requests pay one-off costs (and B reads `held`)
        target = builtin if name.startswith("builtin") else b
        post(target, body.render(), sessions["builtin" if target is builtin else "b"])
    rng = random.Random(seed)
    samples = []
    for run in range(runs):
        names = list(VARIANTS)
        rng.shuffle(names)
        for name in names:
            server, session = (builtin, sessions["builtin"]) if name.startswith("builtin") else (
                b, sessions["b"])  # fmt: skip
            if name == "plugin_from_store":
                part = upload_rows(a.base_url + "/v1", rows)  # a fresh id: B does not hold it
                data = Body(big.with_part(part)).render()
            else:
                data = bodies[name].render()
            time.sleep(0.3)
            reply = post(server, data, session)
            samples.append({"rows": n, "variant": name, "run": run, "seconds": reply.seconds,
                            "status": reply.status, "reply": reply.text,
                            "error": reply.error})  # fmt: skip
            if reply.status != 200:
                print(f"  ! {n} {name}: {reply.status} {reply.error}")
        print(f"  run {run + 1}/{runs} rows={n}", flush=True)
    return samples


def summarise(samples: list[dict], sizes: list[int], floor: dict[int, float]) -> list[dict]:
    table = []
    for n in sizes:
        ms = {}
        replies = {}
        for name in VARIANTS:
            got = [s for s in samples if s["rows"] == n and s["variant"] == name]
            ok = [s["seconds"] for s in got if s["status"] == 200]
            ms[name] = round(1000 * statistics.median(ok), 1) if ok else None
            replies[name] = {s["reply"] for s in got}
        parity = all(
            replies[v] == replies[f"{v.split('_')[0]}_text"]
            for v in VARIANTS
            if not v.endswith("_text")
        )
        row: dict[str, Any] = {"rows": n, **{f"{k}_ms": v for k, v in ms.items()}}
        for name in VARIANTS:
            base = ms[f"{name.split('_')[0]}_text"]
            if ms[name] is not None and base:
                row[f"{name}_x_text"] = round(ms[name] / base, 2)
        if ms["plugin_from_store"] and ms["plugin_inline"]:
            row["from_store_x_inline"] = round(ms["plugin_from_store"] / ms["plugin_inline"], 2)
        row["store_read_and_check_ms"] = floor[n]
        row["parity"] = parity
        table.append(row)
    return table


def print_table(table: list[dict]) -> None:
    print("\nrows | " + " | ".join(f"{v} ms (x text)" for v in VARIANTS) + " | store ms | parity")
    for row in table:
        cells = [f"{row[f'{v}_ms']} ({row.get(f'{v}_x_text', '-')}x)" for v in VARIANTS]
        print(f"{row['rows']} | " + " | ".join(cells) +
              f" | {row['store_read_and_check_ms']} | {row['parity']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = sized_args(argv, __doc__.splitlines()[0], rows=[2048, 8192], runs=7, seed=29)
    exit_on_sigterm()
    started = time.monotonic()
    model = build_big_model(MODELS)
    big = big_chats(model, args.seed)
    redis = RedisServer()
    redis.start()
    try:
        floor = {n: store_ms(redis.url, big, n, max(3, args.runs)) for n in args.rows}
        with vllm_cache_root() as cache_root, serve(model, cache_root, redis.url) as servers:
            samples = [s for n in args.rows
                       for s in measure(servers, big, n, args.runs, args.seed)]  # fmt: skip
    finally:
        redis.close()
    table = summarise(samples, args.rows, floor)
    print_table(table)
    path = write_results(NAME, {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "args": vars(args), "table": table, "samples": samples,
        "seconds": round(time.monotonic() - started, 1),
    })  # fmt: skip
    print(f"wrote {path}")
    return 0 if all(row["parity"] for row in table) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Big parts (thousands of rows) against the same chat as text, at TP=1 and TP=2 (issue 19).

Why: people who depend on prompt_embeds send their own encoders' output, thousands of rows per
request, and then the first transfer of the rows is the whole cost: the HTTP body (base64
inside JSON), decoding, the cast to the model's dtype and a copy per process hop. This script
measures that cost side by side with vLLM's built-in, and where it goes.

Model: ``.models/wide-4096-cheap`` (``latency_side_by_side.py``'s: 4096 wide, one cheap layer),
its position limit lifted to ``--max-model-len`` (8448, room for 8192 rows). Servers: the
plugin and the built-in (``VLLM_PLUGINS=""``), started together, per tensor-parallel size
(``--tensor-parallel-size 2`` with ``VLLM_CPU_OMP_THREADS_BIND='0|1'``, one core per rank),
``--no-enable-prefix-caching``, ``--dtype float32``.

A chat: one user message, ``"Repeat:"`` and one part of N rows (the model's own float16
embedding rows of N one-token words), next to the same chat with those words as text (same
prompt token for token; greedy replies are compared: ``parity``). Variants per size:

- ``builtin_text`` / ``builtin_inline``: the built-in, the words as text / the part inline
  (``torch`` encoding, the only one it reads);
- ``plugin_text`` / ``plugin_inline``: the plugin, as text / the part inline (``raw``,
  float16);
- ``plugin_held``: the plugin, the part by ``uuid`` only, its rows sent once before (untimed);
- ``plugin_upload``: ``vllm_chat_embeds.client.upload_rows`` (raw bytes to
  ``POST /v1/prompt_embeds``) and then the chat by the uuid it returns, timed together.

Latency: wall time of one non-streaming greedy request, ``max_tokens=1``, body serialised before
the clock starts; median over ``--runs``; ratio = variant / the same server's text chat. A run
sends every variant once per server, shuffled, the servers taking turns (``Switch``).

Also measured:

- ``parse``: the same inline body sent with an unknown model name: vLLM answers 404 once the
  body is read and validated, before anything of ours decodes, so this is the HTTP body read
  plus JSON parse plus request validation on the real server;
- ``stages``: the pieces of the path timed in this process on the same rows (the HTTP body
  read and JSON parse in a bare FastAPI app on uvicorn, JSON parse alone,
  base64, our decode with and without the cast, the cast alone, hop 1 as vLLM's msgpack
  encoder over a ZMQ ipc socket, hop 2 as a pickle round trip per worker, the broadcast's
  path for messages over its chunk size);
- ``memory``: a plugin server with ``CHAT_EMBEDS_REFERENCE_BYTES=64 MiB`` (``--memory-bound-mib``)
  gets 256 MiB (``--memory-mib``) of distinct parts by uuid (2048 rows each, ``--memory-rows``)
  from ``--memory-clients`` clients; PSS summed over the server's processes before and after
  (and by process class and kind of mapping: heap, anonymous, shared memory, files), and the
  machine's used memory (``MemTotal - MemAvailable``, shared memory included; also less this
  benchmark process's own growth, since it builds the rows and bodies);
- ``scale`` (issue 32 item 4; not with ``--quick``): the plugin alone behind
  ``--api-server-count N`` for each of ``--api-servers`` (1 2), TP=1, one server at a time; 4
  clients each on a kept-alive session send text chats, inline parts and upload + chat
  (``upload_rows``' request, then the chat on the same connection, so both reach the API
  server process that keeps the rows) at 2048 and 8192 rows (``--scale-rows``): requests per
  second, and CPU per request of each process class.

    .venv/bin/python benchmarks/big_parts.py [--quick] [--runs N] [--tp 1 2] [--rows ...]
        [--only latency memory scale]

Prints tables, writes ``benchmarks/results/big_parts.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402, F401  (imported first: puts tests/ on sys.path)
from common import (  # noqa: E402
    CPU_FLAGS,
    RESULTS,
    EmbeddingTable,
    Server,
    exit_on_sigterm,
    results_stem,
    started_together,
    vllm_cache_root,
    write_results,
)
from conftest import (  # noqa: E402
    MODELS,
    VLLM,
    VLLM_SEGMENT_PREFIXES,
    build_model,
    run_server,
    server_env,
)
from latency_side_by_side import (  # noqa: E402
    LAYER_SHAPES,
    SERVED_NAME,
    Body,
    Chats,
    Impl,
    Switch,
    check_impl,
    hf_overrides,
    package_version,
    post,
)

from vllm_chat_embeds import client  # noqa: E402
from vllm_chat_embeds.client import prompt_embeds_part  # noqa: E402
from vllm_chat_embeds.heap import heap_trimmer  # noqa: E402

NAME = "big_parts"
IMPLS: tuple[Impl, ...] = ("plugin", "builtin")
VARIANTS: dict[str, tuple[Impl, str]] = {
    "builtin_text": ("builtin", "text"),
    "builtin_inline": ("builtin", "inline"),
    "plugin_text": ("plugin", "text"),
    "plugin_inline": ("plugin", "inline"),
    "plugin_held": ("plugin", "held"),
}
# Issue 19 item 2 (built on another branch): timed once the client helper exists.
UPLOAD_ROWS = getattr(client, "upload_rows", None)
if UPLOAD_ROWS is not None:
    VARIANTS["plugin_upload"] = ("plugin", "upload")
MAX_MODEL_LEN = 8448  # 8192 rows, the prompt and the template
KV_CACHE_BYTES = 512 << 20
LEAD = "Repeat:"
MIB = 1 << 20
REFERENCE_BYTES = 64 * MIB  # the memory phase's CHAT_EMBEDS_REFERENCE_BYTES
ONE_CORE_PER_RANK = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
TRIM_HEAP = heap_trimmer()  # glibc's malloc_trim, or None
TARGETS = {1: 1.25, 2: 1.30}  # inline at 8192 rows, x the text chat (issue 19)
TICKS = os.sysconf("SC_CLK_TCK")
SCALE_VARIANTS = ("text", "inline", "upload")  # the scale-out phase's, per size
PHASES = ("latency", "memory", "scale")


def sized_args(argv: list[str] | None, description: str, *, rows: list[int], runs: int,
               seed: int) -> argparse.Namespace:  # fmt: skip
    """The options of a benchmark over part sizes on this model (``--quick``: 2048 rows, 3
    runs; ``--rows`` must fit ``MAX_MODEL_LEN``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="2048 rows, 3 runs")
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--rows", type=int, nargs="+", default=rows)
    parser.add_argument("--seed", type=int, default=seed)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.runs = [2048], 3
    if max(args.rows) > MAX_MODEL_LEN - 64:
        parser.error(f"rows must leave room in --max-model-len {MAX_MODEL_LEN}")
    return args


def build_big_model(models: Path, tp: int = 1) -> Path:
    """The 4096-wide cheap model (``latency_side_by_side``'s), built once under ``models``.

    Its one attention head cannot be split over ranks, so TP > 1 gets the same model with
    ``tp`` heads (and KV heads) of 128: as wide, and still nearly free to run.
    """
    if tp == 1:
        name, shape = "wide-4096-cheap", list(LAYER_SHAPES["cheap"])
    else:
        name = f"wide-4096-cheap-{tp}h"
        shape = ["--heads", str(tp), "--kv-heads", str(tp), "--head-dim", "128"]
        shape += ["--intermediate", "256"]
    return build_model(
        "build_test_model.py", models / name, "--hidden", "4096", "--layers", "1", *shape
    )


def server_flags(model: Path, tp: int, extra: tuple[str, ...] = ()) -> list[str]:
    flags = list(CPU_FLAGS)
    for flag, value in (
        ("--max-model-len", MAX_MODEL_LEN),
        ("--kv-cache-memory-bytes", KV_CACHE_BYTES),
    ):
        flags[flags.index(flag) + 1] = str(value)
    overrides = hf_overrides(model)
    overrides["max_position_embeddings"] = MAX_MODEL_LEN
    flags += [
        "--enable-prompt-embeds",
        "--served-model-name",
        SERVED_NAME,
        "--no-enable-prefix-caching",
        "--hf-overrides",
        json.dumps(overrides),
    ]
    if tp > 1:
        flags += ["--tensor-parallel-size", str(tp)]
    return flags + list(extra)


@contextmanager
def serve(
    model: Path,
    tp: int,
    cache_root: str,
    impls: tuple[Impl, ...],
    extra: dict[str, str],
    plugin_args: tuple[str, ...] = (),
) -> Iterator[dict[Impl, Server]]:
    """Start the servers of ``impls`` at once and always stop them all (``plugin_args``:
    more ``vllm serve`` flags for the plugin's server only)."""
    base = [VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", "{port}"]
    env_extra = dict(ONE_CORE_PER_RANK) if tp > 1 else {}
    managers: dict[Impl, AbstractContextManager[Server]] = {
        impl: run_server(
            model,
            env=server_env(
                trap=False,
                plugins=impl == "plugin",
                mp=True,
                cache_root=cache_root,
                extra={**env_extra, **(extra if impl == "plugin" else {})},
            ),
            command=base + server_flags(model, tp, plugin_args if impl == "plugin" else ()),
        )
        for impl in impls
    }
    with started_together(managers) as servers:
        for impl, server in servers.items():
            check_impl(impl, server)
        yield servers


# -- chats -------------------------------------------------------------------------------------


class BigChats:
    """``"Repeat:"`` and N words, as text or as one float16 part of their embedding rows."""

    def __init__(self, chats: Chats) -> None:
        self.chats = chats

    def rows(self, n: int, salt: int = 0) -> torch.Tensor:
        words = self.chats.words(n)
        table = self.chats.table.weight
        rows = table[[self.chats.ids[w] for w in words]].to(torch.float16)
        if salt:  # distinct rows of the same shape (the memory phase)
            rows[0, 0] += salt
        return rows

    def text(self, n: int) -> list[dict[str, Any]]:
        words = self.chats.words(n)
        return [{"type": "text", "text": LEAD + "".join(" " + w for w in words)}]

    def with_part(self, part: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"type": "text", "text": LEAD}, part]


def big_chats(model: Path, seed: int) -> BigChats:
    chats = Chats(EmbeddingTable(model), seed)
    chats.table.tokenizer.model_max_length = MAX_MODEL_LEN
    return BigChats(chats)


def bodies_for(big: BigChats, n: int, held_uuid: str) -> dict[str, Body]:
    rows = big.rows(n)
    held = {"type": "prompt_embeds", "uuid": held_uuid}
    return {
        "builtin_text": Body(big.text(n)),
        "builtin_inline": Body(big.with_part(prompt_embeds_part(rows, encoding="torch"))),
        "plugin_text": Body(big.text(n)),
        "plugin_inline": Body(big.with_part(prompt_embeds_part(rows, encoding="raw"))),
        "plugin_held": Body(big.with_part(held)),
    }


def hold(server: Server, big: BigChats, n: int, held_uuid: str) -> None:
    """Send the part once with data under ``held_uuid`` (untimed), so later chats refer to it."""
    part = {**prompt_embeds_part(big.rows(n), encoding="raw"), "uuid": held_uuid}
    reply = post(server, Body(big.with_part(part)).render())
    if reply.status != 200:
        raise RuntimeError(f"holding {n} rows failed: {reply.status} {reply.error}")


def upload_and_chat(server: Server, big: BigChats, n: int, session: requests.Session) -> Any:
    """``upload_rows`` and then the chat by its uuid, timed together."""
    rows = big.rows(n)
    started = time.perf_counter()
    part = UPLOAD_ROWS(server.base_url + "/v1", rows)  # type: ignore[misc]
    reply = post(server, Body(big.with_part(part)).render(), session)
    reply.seconds = time.perf_counter() - started
    return reply


def parse_ms(server: Server, body: Body, runs: int) -> float:
    """Median time for the server to read, parse and validate ``body`` (404: unknown model)."""
    data = body.render().replace(f'"model": "{SERVED_NAME}"', '"model": "no-such-model"', 1)
    times = []
    with requests.Session() as session:
        for _ in range(runs):
            started = time.perf_counter()
            response = session.post(
                server.base_url + "/v1/chat/completions",
                data=data,
                headers={"Content-Type": "application/json"},
                timeout=600,
            )
            times.append(time.perf_counter() - started)
            if response.status_code != 404:
                raise RuntimeError(f"expected 404 for an unknown model: {response.status_code}")
    return round(1000 * statistics.median(times), 1)


def latency_phase(
    servers: dict[Impl, Server], big: BigChats, sizes: list[int], runs: int, tp: int, seed: int
) -> tuple[list[dict[str, Any]], dict[int, dict[str, float]]]:
    switch = Switch(servers, big.chats)
    sessions = {impl: requests.Session() for impl in IMPLS}
    held = {n: f"big-{n}-{uuid.uuid4().hex}" for n in sizes}
    plan = {n: bodies_for(big, n, held[n]) for n in sizes}
    switch.to("plugin")
    for n in sizes:
        hold(servers["plugin"], big, n, held[n])
    for impl in IMPLS:  # first requests of a shape pay one-off costs
        switch.to(impl)
        for n in sizes:
            for name, body in plan[n].items():
                if VARIANTS[name][0] == impl:
                    post(servers[impl], body.render(), sessions[impl])
    rng = random.Random(seed)
    samples: list[dict[str, Any]] = []
    block = 0
    for run in range(runs):
        for n in sizes:
            order = IMPLS if block % 2 == 0 else IMPLS[::-1]
            block += 1
            for impl in order:
                switch.to(impl)
                names = [name for name in VARIANTS if VARIANTS[name][0] == impl]
                rng.shuffle(names)
                for name in names:
                    if name == "plugin_upload":
                        reply = upload_and_chat(servers[impl], big, n, sessions[impl])
                    else:
                        reply = post(servers[impl], plan[n][name].render(), sessions[impl])
                    samples.append(
                        {
                            "tp": tp, "rows": n, "variant": name, "run": run,
                            "seconds": reply.seconds, "status": reply.status,
                            "prompt_tokens": reply.prompt_tokens, "reply": reply.text,
                            "error": reply.error,
                        }
                    )  # fmt: skip
                    if reply.status != 200:
                        print(f"  ! tp={tp} {n} {name}: {reply.status} {reply.error}")
            print(f"  tp={tp} run {run + 1}/{runs} rows={n}", flush=True)
    parse: dict[int, dict[str, float]] = {}
    for n in sizes:
        parse[n] = {}
        for impl in IMPLS:
            switch.to(impl)
            parse[n][impl] = parse_ms(servers[impl], plan[n][f"{impl}_inline"], max(3, runs))
    return samples, parse


def throughput_phase(
    servers: dict[Impl, Server], big: BigChats, n: int, clients: int, count: int, tp: int
) -> list[dict[str, Any]]:
    """``count`` chats per variant from ``clients`` clients at once (max_tokens=4)."""
    switch = Switch(servers, big.chats)
    out = []
    for rnd in range(2):
        for impl in IMPLS if rnd == 0 else IMPLS[::-1]:
            for kind in ("text", "inline") if rnd == 0 else ("inline", "text"):
                name = f"{impl}_{kind}"
                body = bodies_for(big, n, "unused")[name]
                head = body.head.replace('"max_tokens": 1', '"max_tokens": 4', 1)
                datas = [head + uuid.uuid4().hex + '"}' for _ in range(count)]
                switch.to(impl)
                started = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    replies = list(pool.map(lambda d, s=servers[impl]: post(s, d), datas))
                wall = time.perf_counter() - started
                failed = sum(r.status != 200 for r in replies)
                out.append(
                    {"tp": tp, "rows": n, "variant": name, "round": rnd, "clients": clients,
                     "requests": count, "failed": failed, "req_per_s": round(count / wall, 3)}
                )  # fmt: skip
                print(f"  throughput tp={tp} {name}: {count / wall:.2f} req/s", flush=True)
    return out


# -- scale-out of the API server ---------------------------------------------------------------


def upload_on(session: requests.Session, server: Server, raw: bytes, shape: str) -> dict[str, Any]:
    """``upload_rows``' request on a kept-alive session: behind ``--api-server-count N`` the
    chat naming the id must reach the API server process that keeps it, and a connection
    stays with the process that accepted it."""
    response = session.post(
        server.base_url + "/v1/prompt_embeds",
        params={"dtype": "float16", "shape": shape},
        data=raw,
        headers={"Content-Type": "application/octet-stream"},
        timeout=600,
    )
    if response.status_code != 200:
        raise RuntimeError(f"upload: {response.status_code} {response.text[:300]}")
    return dict(response.json()["part"])


def _chat_status(session: requests.Session, server: Server, data: bytes) -> int:
    response = session.post(
        server.base_url + "/v1/chat/completions",
        data=data,
        headers={"Content-Type": "application/json"},
        timeout=600,
    )
    return response.status_code


def scale_batch(
    server: Server, big: BigChats, n: int, variant: str, clients: int, count: int
) -> dict[str, Any]:
    """``count`` chats from ``clients`` clients at once (each on its own kept-alive session,
    ``max_tokens=4``), the bodies encoded before the clock starts; requests per second and
    each process class's CPU per request."""
    rows = big.rows(n)
    content = big.text(n) if variant == "text" else big.with_part(
        prompt_embeds_part(rows, encoding="raw"))  # fmt: skip
    body = Body(content).render().replace('"max_tokens": 1', '"max_tokens": 4', 1).encode()
    raw, shape = rows.numpy().tobytes(), f"{rows.shape[0]},{rows.shape[1]}"

    def client(share: int) -> int:
        failed = 0
        with requests.Session() as session:
            for _ in range(share):
                data = body
                if variant == "upload":
                    part = upload_on(session, server, raw, shape)
                    data = Body(big.with_part(part)).render().replace(
                        '"max_tokens": 1', '"max_tokens": 4', 1).encode()  # fmt: skip
                failed += _chat_status(session, server, data) != 200
        return failed

    shares = [count // clients + (i < count % clients) for i in range(clients)]
    cpu_before = cpu_seconds(server.proc.pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        failed = sum(pool.map(client, shares))
    wall = time.perf_counter() - started
    cpu_after = cpu_seconds(server.proc.pid)
    cpu_ms = {k: round(1000 * (cpu_after.get(k, 0.0) - cpu_before.get(k, 0.0)) / count, 1)
              for k in sorted(set(cpu_after) | set(cpu_before)) if k != "gone"}  # fmt: skip
    return {"rows": n, "variant": variant, "clients": clients, "requests": count,
            "failed": failed, "req_per_s": round(count / wall, 3), "cpu_ms": cpu_ms}  # fmt: skip


def scale_phase(
    model: Path,
    big: BigChats,
    cache_root: str,
    api_servers: list[int],
    sizes: list[int],
    count: int,
    plugin_args: tuple[str, ...] = (),
    clients: int = 4,
) -> list[dict[str, Any]]:
    """The plugin alone behind ``--api-server-count N`` for each N (TP=1, one server at a time):
    text, inline and upload + chat at each size, two rounds in opposite orders."""
    out = []
    for n_api in api_servers:
        flags = ("--api-server-count", str(n_api), *plugin_args)
        print(f"\n== scale-out: --api-server-count {n_api}", flush=True)
        with serve(model, 1, cache_root, ("plugin",), {}, flags) as servers:
            server = servers["plugin"]
            for n in sizes:
                for variant in SCALE_VARIANTS:  # first requests of a shape, in every process
                    scale_batch(server, big, n, variant, clients, clients)
                for rnd in range(2):
                    for variant in SCALE_VARIANTS if rnd == 0 else SCALE_VARIANTS[::-1]:
                        time.sleep(1.5)  # the worker stops polling after the last batch
                        got = scale_batch(server, big, n, variant, clients, count)
                        got.update(api_servers=n_api, round=rnd)
                        out.append(got)
                        print(f"  N={n_api} rows={n} {variant}: {got['req_per_s']:.2f} req/s "
                              f"(failed {got['failed']}), CPU ms/request {got['cpu_ms']}",
                              flush=True)  # fmt: skip
    return out


def print_scale(results: list[dict[str, Any]]) -> None:
    """Requests per second by N, size and variant (mean of the rounds), x the text chats."""
    cells: dict[tuple[int, int, str], list[float]] = {}
    for r in results:
        cells.setdefault((r["api_servers"], r["rows"], r["variant"]), []).append(r["req_per_s"])
    print("\nscale-out, 4 clients: req/s (x text) by --api-server-count")
    for n_api, n, variant in sorted(cells):
        rate = statistics.mean(cells[(n_api, n, variant)])
        text = statistics.mean(cells[(n_api, n, "text")])
        print(f"  N={n_api} rows={n} {variant}: {rate:.2f} req/s ({rate / text:.2f}x text)")


# -- memory ------------------------------------------------------------------------------------


def session_pids(leader: int) -> list[int]:
    """Every process in the server's session (``run_server`` starts it in a new session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == leader:  # field 6 (session id), after pid and comm
            pids.append(int(entry.name))
    return pids


def process_class(pid: int, root: int) -> str:
    """``api_server``, ``engine_core``, ``workers`` or ``other``, by process title. With
    ``--api-server-count`` above 1 the ``vllm serve`` process only launches: its children
    ``VLLM::APIServer_<i>`` serve, and count as API servers."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"
    if name.startswith("VLLM::EngineCor"):
        return "engine_core"
    if name.startswith("VLLM::Worker"):
        return "workers"
    if pid == root or name.startswith("VLLM::APIServer"):
        return "api_server"
    return "other"


def _process_cpu_s(pid: int) -> float:
    """A process's CPU seconds: the sum of its threads' on-CPU nanoseconds (``schedstat``),
    far finer than ``stat``'s 10 ms ticks; ``stat`` where schedstats are off. Threads that
    exited are only in ``stat``: the servers' threads (executors, OpenMP) live as long as they."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9  # fmt: skip
    except (OSError, ValueError, IndexError):
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds of every process in ``root``'s session, by class."""
    totals: dict[str, float] = {}
    for pid in session_pids(root):
        kind = process_class(pid, root)
        totals[kind] = totals.get(kind, 0.0) + _process_cpu_s(pid)
    return totals


def smaps_pss(pid: int) -> dict[str, int]:
    """``pid``'s PSS by kind of mapping: ``heap`` (brk), ``anon`` (anonymous mappings: glibc's
    big chunks and thread arenas, Python's arenas, mmapped bodies), ``shm`` (/dev/shm and other
    shared memory), ``file`` (code and data files)."""
    kinds = {"heap": 0, "anon": 0, "shm": 0, "file": 0}
    kind = "anon"
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return kinds
    for line in lines:
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            fields = line.split()
            path = fields[5] if len(fields) > 5 else ""
            if path == "[heap]":
                kind = "heap"
            elif path.startswith(("/dev/shm/", "/SYSV", "/memfd:")):
                kind = "shm"
            elif path.startswith("/"):
                kind = "file"
            else:
                kind = "anon"
        elif first == "Pss:":
            kinds[kind] += int(line.split()[1]) * 1024
    return kinds


def pss_by_process(leader: int) -> dict[str, dict[str, int]]:
    """PSS by process class (summed over its processes) and kind of mapping."""
    out: dict[str, dict[str, int]] = {}
    for pid in session_pids(leader):
        kind = process_class(pid, leader)
        if kind == "gone":
            continue
        into = out.setdefault(kind, {})
        for key, value in smaps_pss(pid).items():
            into[key] = into.get(key, 0) + value
    return out


def pss_bytes(leader: int) -> int:
    total = 0
    for pid in session_pids(leader):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


def machine_used_bytes() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def settled_used_bytes(step_s: float = 5.0, within: int = 2 * MIB, limit_s: float = 180.0) -> int:
    """The machine's used memory once it stops falling: this VM's kernel hands pages that
    processes freed back to its free pool over tens of seconds (a 1 GiB tensor freed at a
    process's exit still counted 750 MiB "used" a second later), so a reading right after
    the uploads counts the server's freed bodies and buffers as held."""
    deadline = time.monotonic() + limit_s
    last = machine_used_bytes()
    while time.monotonic() < deadline:
        time.sleep(step_s)
        now = machine_used_bytes()
        if abs(now - last) < within:
            return now
        last = now
    return last


def trim_own_heap() -> None:
    """Hand this process's freed rows and bodies back to the kernel (glibc keeps freed heap
    resident), so the machine's used memory counts the server, not the benchmark."""
    gc.collect()
    if TRIM_HEAP is not None:
        TRIM_HEAP(0)


def own_rss_bytes() -> int:
    """This benchmark process's resident memory: the rows and bodies it builds count in the
    machine's used memory, and are not the server's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def shm_bytes() -> int:
    """Bytes in /dev/shm, vLLM's own broadcast buffers and semaphores left out."""
    total = 0
    for entry in Path("/dev/shm").iterdir():
        if entry.name.startswith("sem.") or entry.name.startswith(VLLM_SEGMENT_PREFIXES):
            continue
        try:
            total += entry.stat().st_blocks * 512
        except OSError:
            continue
    return total


def memory_phase(
    model: Path,
    big: BigChats,
    cache_root: str,
    tp: int,
    total: int,
    rows: int,
    plugin_args: tuple[str, ...] = (),
    bound: int = REFERENCE_BYTES,
    clients: int = 1,
) -> dict[str, Any]:
    """``total`` bytes of distinct ``rows``-row parts sent inline with a uuid through a store of
    ``bound`` bytes (``CHAT_EMBEDS_REFERENCE_BYTES``) by ``clients`` clients at once; memory
    before and after, per process class and kind of mapping too (``pss_by_process``)."""
    extra = {"CHAT_EMBEDS_REFERENCE_BYTES": str(bound)}
    part_bytes = rows * 4096 * 2
    count = max(1, total // part_bytes)
    with serve(model, tp, cache_root, ("plugin",), extra, plugin_args) as servers:
        server = servers["plugin"]
        post(server, Body(big.text(32)).render())
        time.sleep(1.5)
        trim_own_heap()
        before = {
            "pss": pss_bytes(server.proc.pid),
            "used": settled_used_bytes(),
            "shm": shm_bytes(),
            "client_rss": own_rss_bytes(),
        }
        before_by_process = pss_by_process(server.proc.pid)

        def send(i: int) -> None:
            part = {**prompt_embeds_part(big.rows(rows, salt=i + 1), encoding="raw")}
            part["uuid"] = f"mem-{i}-{uuid.uuid4().hex}"
            reply = post(server, Body(big.with_part(part)).render())
            if reply.status != 200:
                raise RuntimeError(f"memory phase: {reply.status} {reply.error}")

        # Each body is dropped once sent: its data string is as big as the rows, not to be
        # counted as held.
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(send, range(count)))
        time.sleep(1.5)
        trim_own_heap()
        after = {
            "pss": pss_bytes(server.proc.pid),
            "used": settled_used_bytes(),
            "shm": shm_bytes(),
            "client_rss": own_rss_bytes(),
        }
        after_by_process = pss_by_process(server.proc.pid)
    growth = {k: after[k] - before[k] for k in before}
    by_process = {
        cls: {k: v - before_by_process.get(cls, {}).get(k, 0) for k, v in kinds.items()}
        for cls, kinds in after_by_process.items()
    }
    return {
        "tp": tp,
        "reference_bytes": bound,
        "parts": count,
        "clients": clients,
        "rows_per_part": rows,
        "sent_bytes_float16": count * part_bytes,
        "before": before,
        "after": after,
        "growth": growth,
        "pss_growth_by_process": by_process,
        "pss_growth_x_bound": round(growth["pss"] / bound, 2),
        "used_growth_x_bound": round(growth["used"] / bound, 2),
        # The machine's used memory less what this benchmark process itself grew by.
        "server_used_growth_x_bound": round((growth["used"] - growth["client_rss"]) / bound, 2),
    }


def print_memory(m: dict[str, Any]) -> None:
    print(
        f"memory TP={m['tp']}, {m['clients']} clients: {m['parts']} x {m['rows_per_part']} rows "
        f"by uuid ({m['sent_bytes_float16'] >> 20} MiB float16), bound "
        f"{m['reference_bytes'] >> 20} MiB: PSS +"
        f"{m['growth']['pss'] >> 20} MiB ({m['pss_growth_x_bound']}x), machine used +"
        f"{m['growth']['used'] >> 20} MiB ({m['used_growth_x_bound']}x; less this "
        f"process's own growth: {m['server_used_growth_x_bound']}x), /dev/shm +"
        f"{m['growth']['shm'] >> 20} MiB",
        flush=True,
    )
    for cls, kinds in sorted(m["pss_growth_by_process"].items()):
        parts = ", ".join(f"{k} {v / MIB:+.1f}" for k, v in kinds.items())
        print(f"  PSS growth, {cls} (MiB): {parts}", flush=True)


# -- stages (in this process) ------------------------------------------------------------------


def _median_ms(fn: Any, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 1)


def http_stages(body: bytes, runs: int) -> dict[str, float]:
    """The HTTP body read and ``json.loads`` of ``body`` as FastAPI does them (starlette's
    ``Request.body``) on uvicorn (httptools, uvloop: what ``vllm serve`` runs), timed in the
    app, which then answers at once."""
    import socket

    import uvicorn
    from starlette.requests import Request

    seen: list[tuple[float, float]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        raw = await Request(scope, receive).body()
        read = time.perf_counter()
        json.loads(raw)
        seen.append((read - started, time.perf_counter() - read))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with requests.Session() as session:
            for _ in range(runs + 1):  # the first warms up
                session.post(f"http://127.0.0.1:{port}/body", data=body, timeout=600)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    reads, parses = zip(*seen[1:], strict=True)
    return {
        "http_body_read": round(1000 * statistics.median(reads), 1),
        "json_parse_in_server": round(1000 * statistics.median(parses), 1),
    }


def stages(big: BigChats, n: int, runs: int) -> dict[str, float]:
    """The inline path's pieces, timed here on ``n`` float16 rows (see the module docstring)."""
    import pickle

    import pybase64
    import zmq
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from vllm_chat_embeds.payload import PayloadSpec, _all_finite, decode_payload

    rows = big.rows(n)
    part = prompt_embeds_part(rows, encoding="raw")
    body = Body(big.with_part(part)).render().encode()
    data = part["data"]
    f32 = PayloadSpec(width=4096, dtype=torch.float32, max_part_bytes=1 << 31, max_rows=1 << 20,
                      rows_limit=1 << 20)  # fmt: skip
    f16 = PayloadSpec(width=4096, dtype=torch.float16, max_part_bytes=1 << 31, max_rows=1 << 20,
                      rows_limit=1 << 20)  # fmt: skip

    def decode(spec: PayloadSpec) -> torch.Tensor:
        return decode_payload(data, "p", spec, encoding="raw", dtype="float16",
                              shape=[n, 4096])  # fmt: skip

    as32 = rows.to(torch.float32)
    out: dict[str, float] = {
        **http_stages(body, runs),
        "json_parse": _median_ms(lambda: json.loads(body), runs),
        "base64": _median_ms(lambda: pybase64.b64decode(data, validate=True), runs),
        "decode_to_float32": _median_ms(lambda: decode(f32), runs),
        "decode_keep_float16": _median_ms(lambda: decode(f16), runs),
        "cast_float16_to_float32": _median_ms(lambda: rows.to(torch.float32), runs),
        "finite_check_float16": _median_ms(lambda: _all_finite(rows), runs),
    }
    context = zmq.Context()
    push, pull = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    address = f"ipc:///tmp/vce-bench-{uuid.uuid4().hex}"
    pull.bind(address)
    push.connect(address)
    encoder, decoder = MsgpackEncoder(), MsgpackDecoder(torch.Tensor)

    def hop1(tensor: torch.Tensor) -> None:
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(pull.recv_multipart(copy=False)))
        reader.start()
        push.send_multipart(encoder.encode(tensor), copy=False)
        reader.join()
        decoder.decode(got[0])

    def hop2(tensor: torch.Tensor) -> None:
        pickle.loads(pickle.dumps(tensor, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        out["hop1_zmq_float32"] = _median_ms(lambda: hop1(as32), runs)
        out["hop1_zmq_float16"] = _median_ms(lambda: hop1(rows), runs)
        out["hop2_pickle_per_worker_float32"] = _median_ms(lambda: hop2(as32), runs)
        out["hop2_pickle_per_worker_float16"] = _median_ms(lambda: hop2(rows), runs)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        context.term()
        Path(address.removeprefix("ipc://")).unlink(missing_ok=True)
    out["rows"] = n
    out["body_mb"] = round(len(body) / 1e6, 1)
    return out


# -- summary -----------------------------------------------------------------------------------


def summarize(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys = sorted({(s["tp"], s["rows"]) for s in samples})
    for tp, n in keys:
        cell = [s for s in samples if s["tp"] == tp and s["rows"] == n and s["status"] == 200]
        med = {
            name: statistics.median([s["seconds"] for s in cell if s["variant"] == name])
            for name in VARIANTS
            if any(s["variant"] == name for s in cell)
        }
        texts = {impl: med.get(f"{impl}_text") for impl in IMPLS}
        row: dict[str, Any] = {"tp": tp, "rows": n}
        for name, seconds in med.items():
            impl = VARIANTS[name][0]
            text = texts[impl]
            replies = {s["reply"] for s in cell if s["variant"] in (name, f"{impl}_text")}
            row[name] = {
                "median_ms": round(1000 * seconds, 1),
                "x_text": round(seconds / text, 2) if text else None,
                "added_ms": round(1000 * (seconds - text), 1) if text else None,
                "parity": len(replies) == 1,
            }
        out.append(row)
    return out


def print_latency(rows: list[dict[str, Any]]) -> None:
    names = list(VARIANTS)
    print("\n" + f"{'tp':>3} {'rows':>5} " + " ".join(f"{n:>22}" for n in names))
    for row in rows:
        cells = []
        for name in names:
            v = row.get(name)
            cells.append(
                f"{'-':>22}"
                if v is None
                else f"{v['median_ms']:>9.0f}ms {v['x_text']:>5.2f}x"
                f"{'' if v['parity'] else ' !par':>6}"
            )
        print(f"{row['tp']:>3} {row['rows']:>5} " + " ".join(cells))


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tps = sorted({r["tp"] for r in rows})
    fig, axes = plt.subplots(1, len(tps), figsize=(6 * len(tps), 4.2), squeeze=False)
    shown = [n for n in ("builtin_inline", "plugin_inline", "plugin_upload", "plugin_held")
             if n in VARIANTS]  # fmt: skip
    for ax, tp in zip(axes[0], tps, strict=True):
        cells = [r for r in rows if r["tp"] == tp]
        width = 0.8 / len(shown)
        for i, name in enumerate(shown):
            xs = [j + i * width for j in range(len(cells))]
            ys = [(r.get(name) or {}).get("x_text") or 0 for r in cells]
            ax.bar(xs, ys, width, label=name.replace("builtin", "built-in"))
        ax.axhline(1.0, color="grey", linewidth=0.8)
        if tp in TARGETS:
            ax.axhline(TARGETS[tp], color="red", linestyle="--", linewidth=0.8,
                       label=f"target at 8192 rows ({TARGETS[tp]}x)")  # fmt: skip
        ax.set_xticks([j + width for j in range(len(cells))])
        ax.set_xticklabels([str(r["rows"]) for r in cells])
        ax.set_xlabel("rows in the part (float16, 4096 wide)")
        ax.set_ylabel("latency / same chat as text")
        ax.set_title(f"TP={tp}")
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 and 4096 rows, TP=1, 3 runs")
    parser.add_argument("--rows", type=int, nargs="+", help="rows per part (1024 4096 8192)")
    parser.add_argument("--tp", type=int, nargs="+", help="tensor-parallel sizes (1 2)")
    parser.add_argument("--runs", type=int, help="runs per cell (5; quick 3)")
    parser.add_argument("--memory-mib", type=int, help="memory phase: MiB of uploads (256)")
    parser.add_argument("--tput-requests", type=int, help="throughput: chats per batch (16; 0)")
    parser.add_argument("--memory-tp", type=int, nargs="+", help="memory phase at (1)")
    parser.add_argument(
        "--memory-bound-mib", type=int, default=REFERENCE_BYTES // MIB,
        help="memory phase: CHAT_EMBEDS_REFERENCE_BYTES in MiB (64; issue 32: 128)",
    )  # fmt: skip
    parser.add_argument("--memory-clients", type=int, default=1, help="memory phase: clients (1)")
    parser.add_argument("--memory-rows", type=int, default=2048, help="memory phase: rows (2048)")
    parser.add_argument(
        "--only", nargs="+", choices=PHASES, help="run these phases (all; quick: no scale)"
    )
    parser.add_argument(
        "--api-servers", type=int, nargs="+", default=[1, 2],
        help="scale phase: --api-server-count values (1 2)",
    )  # fmt: skip
    parser.add_argument("--scale-rows", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--scale-requests", type=int, default=12, help="scale: chats per batch")
    parser.add_argument(
        "--plugin-args",
        default="",
        help="more vllm serve flags for the plugin's servers (--plugin-args=--flag)",
    )
    parser.add_argument("--models", type=Path, default=MODELS, help="where the model is built")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.rows = args.rows or ([1024, 4096] if args.quick else [1024, 4096, 8192])
    args.tp = args.tp or ([1] if args.quick else [1, 2])
    args.runs = args.runs or (3 if args.quick else 5)
    args.memory_mib = 64 if args.memory_mib is None and args.quick else (args.memory_mib or 256)
    if args.tput_requests is None:
        args.tput_requests = 0 if args.quick else 16
    args.memory_tp = args.memory_tp or [1]
    args.plugin_args = tuple(args.plugin_args.split())
    args.only = args.only or [p for p in PHASES if not (args.quick and p == "scale")]
    if max(args.rows) + 64 > MAX_MODEL_LEN:
        parser.error(f"rows must leave room in --max-model-len {MAX_MODEL_LEN}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    started = time.monotonic()
    load_before = os.getloadavg()
    model = build_big_model(args.models)
    models = {tp: build_big_model(args.models, tp) for tp in args.tp}
    big = big_chats(model, args.seed)
    samples: list[dict[str, Any]] = []
    parse: dict[str, Any] = {}
    tput: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    latency = "latency" in args.only
    stage = stages(big, max(args.rows), max(3, args.runs)) if latency else {}
    print("stages (ms, this process):", json.dumps(stage), flush=True)
    with vllm_cache_root() as cache_root:
        for tp in args.tp:
            big = big_chats(models[tp], args.seed)  # rows of the model served
            if latency:
                print(f"\n== TP={tp}: starting plugin and built-in servers", flush=True)
                with serve(models[tp], tp, cache_root, IMPLS, {}, args.plugin_args) as servers:
                    got, parse[str(tp)] = latency_phase(
                        servers, big, args.rows, args.runs, tp, args.seed
                    )
                    samples += got
                    if args.tput_requests:
                        tput += throughput_phase(servers, big, 2048, 4, args.tput_requests, tp)
            if "memory" in args.only and args.memory_mib and tp in args.memory_tp:
                memory.append(
                    memory_phase(
                        models[tp], big, cache_root, tp, args.memory_mib * MIB, args.memory_rows,
                        args.plugin_args, args.memory_bound_mib * MIB, args.memory_clients,
                    )
                )  # fmt: skip
                print_memory(memory[-1])
            partial = {"samples": samples, "parse_ms": parse, "memory": memory, "stages_ms": stage}
            write_results(f"{NAME}.partial", partial)  # a later phase may fail
        scale = []
        if "scale" in args.only:
            big = big_chats(model, args.seed)
            scale = scale_phase(model, big, cache_root, args.api_servers, args.scale_rows,
                                args.scale_requests, args.plugin_args)  # fmt: skip
            print_scale(scale)
    if not latency:  # memory and scale-out only: their own results file
        for m in memory:
            print_memory(m)
        path = write_results(f"{NAME}.{'-'.join(args.only)}", {
            "args": vars(args), "memory": memory, "scale": scale,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        })  # fmt: skip
        print(f"wrote {path}")
        return 0
    rows = summarize(samples)
    print_latency(rows)
    print("\nparse (ms, 404 after the body is read and validated):", json.dumps(parse))
    for m in memory:
        print_memory(m)
    if scale:
        print_scale(scale)
    elapsed = round(time.monotonic() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"{results_stem(NAME)}.png"
    plot(rows, png, f"{args.rows} float16 rows, {model.name}: medians of {args.runs} runs")
    failed = sum(s["status"] != 200 for s in samples)
    data = {
        "meta": {
            "models": {tp: str(path) for tp, path in models.items()},
            "server_flags": {tp: server_flags(models[tp], tp) for tp in args.tp},
            "plugin_args": list(args.plugin_args),
            "rows": args.rows,
            "tp": args.tp,
            "runs": args.runs,
            "upload_rows": "measured (plugin_upload)"
            if UPLOAD_ROWS is not None
            else "not measured: vllm_chat_embeds.client.upload_rows is not on this branch "
            "(issue 19 item 2 is built elsewhere)",
            "elapsed_s": elapsed,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "vllm": package_version("vllm"),
            "failed_requests": failed,
        },
        "latency": rows,
        "parse_ms": parse,
        "stages_ms": stage,
        "throughput": tput,
        "memory": memory,
        "scale": scale,
        "samples": samples,
    }
    path = write_results(NAME, data)
    print(f"\nwrote {path} and {png} in {elapsed:.0f}s (load average {load_before[0]:.1f})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

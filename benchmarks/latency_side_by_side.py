"""What a chat prompt_embeds part costs: this plugin vs vLLM's built-in, side by side (issue 5).

Why: vLLM's built-in turns a chat with parts into one dense, full-length ``prompt_embeds``
tensor (every prompt position, text included, as ``hidden`` float32 values), so a part may cost
far more than its own rows; this plugin sends only the rows by default (compact transport,
``CHAT_EMBEDS_COMPACT=0`` or ``--plugin-dense`` here for the dense layout). This script
measures what a part costs with each, in one run, on equal terms.

Model (``--layers cheap``, the default, the issue's configuration): ``tools/build_test_model.py
--hidden 4096 --layers 1 --heads 1 --kv-heads 1 --head-dim 128 --intermediate 256`` in
``.models/wide-4096-cheap``: an 8B model's width (embeddings and rows of 4096 values, what the
plugin and the built-in move around) with one layer so cheap that prefill no longer drowns a
few milliseconds of overhead in run-to-run noise. ``--layers full``: the same width with a
full-cost layer (``.models/wide-4096``: 4 heads of 1024, which vLLM's CPU attention does not
support, read as 32 heads x 128 via ``--hf-overrides``; MLP 8192), where CPU prefill of 3,000
tokens takes seconds. Both have a 2048-position limit lifted to 4096 via ``--hf-overrides``.

Servers: the plugin and the built-in (``VLLM_PLUGINS=""``) run at the same time, started from
``tests/conftest.py``'s ``run_server`` with its CPU flags but ``--max-model-len 4096`` and a
1 GiB KV cache, ``--enable-prompt-embeds``; prefix caching on (vLLM's default), then a variant
with ``--no-enable-prefix-caching``. The two take turns block by block (one length of one run),
so load from anything else on the machine hits both alike.

Requests: one user turn of ``L`` words, each word one token (`` self``, `` return``, ...), so
the text is exactly ``L`` tokens. The "embeds" chat is the same chat with ``parts`` spans of
``rows`` words each sent as the model's own embedding rows of those words (``encoding="torch"``,
the only one the built-in reads), so the prompt is identical and the greedy reply must match
(checked: ``parity``). Latency is the wall time of one non-streaming greedy request with
``max_tokens=1`` (prefill-dominated), median over runs. A run sends, per length, the text chat
and every embeds variant once to one server in a shuffled order, then the same to the other
(see ``Switch`` for the pause in between). "added" is the median over runs of (embeds - text of
the same run and server). Every request carries a fresh ``cache_salt``: with prefix
caching on, no request can reuse another's KV blocks (repeats would otherwise be ~10x faster
and hide the prefill), while the cost of hashing the blocks stays in the measurement (the
built-in hashes the embeddings of every block, text positions included; the compact plugin
only blocks holding rows); the caching-off variant shows the cost without.

Engine bytes (computed, not measured): the ``prompt_embeds`` tensor the renderer hands to the
engine for an embeds request, float32 (4 bytes a value): built-in (and plugin with the dense
layout) ``prompt_tokens x hidden x 4``; plugin compact ``parts x rows x hidden x 4``. Both also
send the token ids and a 1-byte-per-position mask, left out; a text request sends ids only.
Body bytes: the JSON request size (base64 of torch.save).

Throughput: ``--requests`` chats sent by ``--concurrency`` clients at once (24 and 4 by default),
the text chat vs the embeds chat, per server.

    .venv/bin/python benchmarks/latency_side_by_side.py [--quick | --grid full] [--runs N]

Prints the tables, writes ``benchmarks/results/latency_side_by_side.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import builtins
import json
import keyword
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import requests

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
from conftest import MODELS, VLLM, build_model, run_server, server_env  # noqa: E402

from vllm_chat_embeds.client import prompt_embeds_part  # noqa: E402

NAME = "latency_side_by_side"
SERVED_NAME = "wide"
Impl = Literal["plugin", "builtin"]
IMPLS: tuple[Impl, ...] = ("plugin", "builtin")
Caching = Literal["on", "off"]
MAX_MODEL_LEN = 4096
KV_CACHE_BYTES = 1 << 30  # 64k tokens of KV at this width: 4 x 4096-token requests fit
DTYPE_BYTES = 4  # --dtype float32 (CPU_FLAGS)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32 CPU_ATTN
HEAD_DIM = 128
REQUEST_TIMEOUT_S = 600.0
SETTLE_S = 1.5  # > the 1 s a vLLM worker busy-polls after its last step (see Switch)
PRIMER_TOKENS = 32
TEMPLATE_TOKENS = 16  # room the chat template takes around the user text (checked below)

Cell = tuple[int, int]  # (rows per part, parts)


@dataclass(frozen=True)
class Grid:
    """What one run measures; presets below, overridable from the command line."""

    lengths: tuple[int, ...]  # user text tokens, caching on
    cells: tuple[Cell, ...]  # embeds variants per length (skipped where they do not fit)
    runs: int
    caching: tuple[Caching, ...]
    off_lengths: tuple[int, ...]  # lengths re-measured with prefix caching off
    off_cells: tuple[Cell, ...]
    tput_length: int
    tput_cell: Cell
    requests: int
    concurrency: int
    tput_rounds: int = 3


ALL_CELLS: tuple[Cell, ...] = ((8, 1), (64, 1), (512, 1), (8, 3), (64, 3), (512, 3))
GRIDS: dict[str, Grid] = {
    # ~2 min on a quiet machine: two lengths, prefix caching on only.
    "quick": Grid(
        lengths=(256, 1000),
        cells=((8, 1), (512, 1), (64, 3)),
        runs=3,
        caching=("on",),
        off_lengths=(),
        off_cells=(),
        tput_length=256,
        tput_cell=(64, 1),
        requests=8,
        concurrency=4,
    ),
    # ~10 min on a quiet machine; the caching-off variant only where hashing weighs most.
    "default": Grid(
        lengths=(256, 1000, 3000),
        cells=((8, 1), (64, 1), (512, 1), (64, 3)),
        runs=3,
        caching=("on", "off"),
        off_lengths=(3000,),
        off_cells=((8, 1), (512, 1)),
        tput_length=256,
        tput_cell=(64, 1),
        requests=24,
        concurrency=4,
    ),
    # Every cell of issue 5, five runs, both caching modes: ~25 min.
    "full": Grid(
        lengths=(256, 1000, 3000),
        cells=ALL_CELLS,
        runs=5,
        caching=("on", "off"),
        off_lengths=(256, 1000, 3000),
        off_cells=ALL_CELLS,
        tput_length=1000,
        tput_cell=(512, 1),
        requests=24,
        concurrency=4,
    ),
}


def fits(length: int, cell: Cell) -> bool:
    """Parts need at least one text word before each of them."""
    rows, parts = cell
    return rows * parts + parts <= length


def cell_name(cell: Cell | None) -> str:
    return "text" if cell is None else f"{cell[1]}x{cell[0]}"


# -- model and servers -------------------------------------------------------------------------


# Layer shapes: "cheap" keeps the width but makes the one layer nearly free to run.
LAYER_SHAPES: dict[str, tuple[str, ...]] = {
    "cheap": ("--heads", "1", "--kv-heads", "1", "--head-dim", "128", "--intermediate", "256"),
    "full": (),
}


def build_wide_model(hidden: int, layers: str = "cheap") -> Path:
    suffix = "" if layers == "full" else f"-{layers}"
    return build_model(
        "build_test_model.py",
        MODELS / f"wide-{hidden}{suffix}",
        "--hidden",
        str(hidden),
        "--layers",
        "1",
        *LAYER_SHAPES[layers],
    )


def hf_overrides(model: Path) -> dict[str, int]:
    """Re-split attention heads the CPU backend refuses, and lift the 2048-position limit."""
    config = json.loads((model / "config.json").read_text())
    out: dict[str, int] = {}
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    if head_dim not in CPU_HEAD_SIZES:
        q_width = config["num_attention_heads"] * head_dim
        kv_width = config["num_key_value_heads"] * head_dim
        if q_width % HEAD_DIM or kv_width % HEAD_DIM:
            raise SystemExit(f"cannot re-split heads of {q_width}/{kv_width} into {HEAD_DIM}")
        out.update(
            num_attention_heads=q_width // HEAD_DIM,
            num_key_value_heads=kv_width // HEAD_DIM,
            head_dim=HEAD_DIM,
        )
    if config["max_position_embeddings"] < MAX_MODEL_LEN:
        out["max_position_embeddings"] = MAX_MODEL_LEN
    return out


def server_flags(model: Path, caching: Caching) -> list[str]:
    """conftest's CPU flags with a 4096 context and a 1 GiB KV cache, plus the feature flags."""
    flags = list(CPU_FLAGS)
    for flag, value in (
        ("--max-model-len", MAX_MODEL_LEN),
        ("--kv-cache-memory-bytes", KV_CACHE_BYTES),
    ):
        flags[flags.index(flag) + 1] = str(value)
    flags += ["--enable-prompt-embeds", "--served-model-name", SERVED_NAME]
    overrides = hf_overrides(model)
    if overrides:
        flags += ["--hf-overrides", json.dumps(overrides)]
    if caching == "off":
        flags.append("--no-enable-prefix-caching")
    return flags


def check_impl(impl: Impl, server: Server) -> None:
    """Refuse to measure a server that is not the implementation it claims to be."""
    log = server.log()
    active = "vllm_chat_embeds" in log and " active" in log
    if active != (impl == "plugin"):
        raise RuntimeError(f"{impl} server: plugin active={active}; log {server.log_path}")


@contextmanager
def serve_both(
    model: Path, caching: Caching, cache_root: str, plugin_env: dict[str, str]
) -> Iterator[dict[Impl, Server]]:
    """Start both servers at once (start-up is mostly idle imports) and always stop both."""
    flags = server_flags(model, caching)
    command = [VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", "{port}", *flags]
    managers: dict[Impl, AbstractContextManager[Server]] = {
        impl: run_server(
            model,
            env=server_env(
                trap=False,
                plugins=impl == "plugin",
                mp=True,
                cache_root=cache_root,
                extra=plugin_env if impl == "plugin" else None,
            ),
            command=command,
        )
        for impl in IMPLS
    }
    with started_together(managers) as servers:
        for impl, server in servers.items():
            check_impl(impl, server)
        yield servers


# -- chats -------------------------------------------------------------------------------------


class Chats:
    """Chats of exactly ``L`` text tokens, as text or with spans sent as embedding rows."""

    def __init__(self, table: EmbeddingTable, seed: int) -> None:
        self.table = table
        tok = table.tokenizer
        tok.model_max_length = MAX_MODEL_LEN  # the builder says 2048; the servers allow 4096
        pool = sorted(set(keyword.kwlist) | {n for n in dir(builtins) if n.isalpha()})
        self.ids: dict[str, int] = {}
        for word in pool:
            ids = tok.encode(" " + word, add_special_tokens=False)
            if len(ids) == 1:
                self.ids[word] = ids[0]
        if len(self.ids) < 20:
            raise SystemExit(f"only {len(self.ids)} single-token words in this tokenizer")
        self.vocab = sorted(self.ids)
        self.seed = seed

    def words(self, length: int) -> list[str]:
        """The same ``length`` words on every run (distinct runs differ by cache_salt only)."""
        rng = random.Random(f"{self.seed}-{length}")
        words = [rng.choice(self.vocab) for _ in range(length)]
        text = "".join(" " + w for w in words)
        if self.table.tokenizer.encode(text, add_special_tokens=False) != [
            self.ids[w] for w in words
        ]:
            raise SystemExit("the chat text does not tokenize word by word; parity would break")
        return words

    def content(self, words: list[str], cell: Cell | None) -> list[dict[str, Any]]:
        """Text parts, and ``parts`` embeds spans of ``rows`` words spread evenly between them."""
        if cell is None:
            return [{"type": "text", "text": "".join(" " + w for w in words)}]
        rows, parts = cell
        gap = (len(words) - rows * parts) // (parts + 1)
        content: list[dict[str, Any]] = []
        pos = 0
        for _ in range(parts):
            content.append(
                {"type": "text", "text": "".join(" " + w for w in words[pos : pos + gap])}
            )
            span = words[pos + gap : pos + gap + rows]
            table_rows = self.table.weight[[self.ids[w] for w in span]]
            content.append(prompt_embeds_part(table_rows, encoding="torch"))
            pos += gap + rows
        content.append({"type": "text", "text": "".join(" " + w for w in words[pos:])})
        return content


class Body:
    """A pre-serialized request; only the cache_salt changes, outside the timed section."""

    def __init__(self, content: list[dict[str, Any]]) -> None:
        payload = {
            "model": SERVED_NAME,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 1,
            "temperature": 0.0,
        }
        self.head = json.dumps(payload)[:-1] + ', "cache_salt": "'

    def render(self) -> str:
        return self.head + uuid.uuid4().hex + '"}'

    @property
    def size(self) -> int:
        return len(self.head) + 34


@dataclass
class Reply:
    seconds: float
    status: int
    prompt_tokens: int
    text: str
    error: str = ""


def post(server: Server, data: str, session: requests.Session | None = None) -> Reply:
    """One timed request; the body is serialized before the clock starts."""
    url = server.base_url + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    send = session.post if session is not None else requests.post
    started = time.perf_counter()
    response = send(url, data=data, headers=headers, timeout=REQUEST_TIMEOUT_S)
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        return Reply(seconds, response.status_code, 0, "", response.text[:300])
    body = response.json()
    text = body["choices"][0]["message"]["content"] or ""
    return Reply(seconds, 200, int(body["usage"]["prompt_tokens"]), text)


# -- measurements ------------------------------------------------------------------------------


@dataclass
class Sample:
    caching: Caching
    impl: Impl
    length: int
    cell: str  # "text" or "<parts>x<rows>"
    run: int
    seconds: float
    status: int
    prompt_tokens: int
    reply: str
    error: str


class Switch:
    """Settle before the next request goes to the other server, then prime that server.

    Why: both servers pin their model worker to the same core, and a vLLM worker keeps polling
    its queue (``sched_yield``) for ~1 s after its last step; the first request a server gets
    after the other one worked also runs slower (seen up to ~2x at 1000 tokens). A pause and
    one short unmeasured chat absorb both, and blocks are shuffled so what is left falls on
    text and embeds requests alike.
    """

    def __init__(self, servers: dict[Impl, Server], chats: Chats) -> None:
        self.servers = servers
        self.primer = Body(chats.content(chats.words(PRIMER_TOKENS), None))
        self.last: Impl | None = None

    def to(self, impl: Impl) -> None:
        if self.last != impl:
            time.sleep(SETTLE_S)
            reply = post(self.servers[impl], self.primer.render())
            if reply.status != 200:
                raise RuntimeError(f"{impl} server refused a {PRIMER_TOKENS}-token text chat")
        self.last = impl


def latency_phase(
    servers: dict[Impl, Server],
    chats: Chats,
    caching: Caching,
    lengths: Sequence[int],
    cells: Sequence[Cell],
    runs: int,
    seed: int,
    switch: Switch,
) -> list[Sample]:
    """Warm up; then per run and length, each server in turn gets text and embeds, shuffled."""
    sessions = {impl: requests.Session() for impl in IMPLS}
    plan: dict[int, list[tuple[Cell | None, Body]]] = {}
    for length in lengths:
        words = chats.words(length)
        usable = [c for c in cells if fits(length, c)]
        plan[length] = [(None, Body(chats.content(words, None)))]
        plan[length] += [(c, Body(chats.content(words, c))) for c in usable]
    for impl in IMPLS:  # the first requests of a new shape pay one-off costs
        switch.to(impl)
        for items in plan.values():
            for _, body in items[:2]:
                post(servers[impl], body.render(), sessions[impl])
    rng = random.Random(seed)
    samples: list[Sample] = []
    block = 0
    for run in range(runs):
        for length, items in plan.items():
            block_items = list(items)  # text and embeds in a fresh order every block
            rng.shuffle(block_items)
            # Alternate which server goes first, so neither always follows the other.
            order = IMPLS if block % 2 == 0 else IMPLS[::-1]
            block += 1
            for impl in order:
                switch.to(impl)
                for cell, body in block_items:
                    reply = post(servers[impl], body.render(), sessions[impl])
                    name = cell_name(cell)
                    samples.append(
                        Sample(caching, impl, length, name, run, reply.seconds, reply.status,
                               reply.prompt_tokens, reply.text, reply.error)
                    )  # fmt: skip
                    if reply.status != 200:
                        print(f"  ! {impl} {length} {name}: {reply.status} {reply.error}")
            done = [s for s in samples if s.run == run and s.length == length]
            print(
                f"  [{caching}] run {run + 1}/{runs} L={length}: {len(done)} requests, "
                f"{sum(s.seconds for s in done):.1f}s",
                flush=True,
            )
    return samples


def throughput_phase(
    servers: dict[Impl, Server], chats: Chats, grid: Grid, switch: Switch
) -> list[dict[str, Any]]:
    """``requests`` chats per (impl, text|embeds) with ``concurrency`` clients in parallel."""
    words = chats.words(grid.tput_length)
    bodies = {
        "text": Body(chats.content(words, None)),
        "embeds": Body(chats.content(words, grid.tput_cell)),
    }
    out: list[dict[str, Any]] = []
    # Rounds alternate the order, so warm-up and drift land on every batch alike.
    order = [
        (rnd, kind, impl)
        for rnd in range(grid.tput_rounds)
        for turn, kind in enumerate(bodies if rnd % 2 == 0 else list(bodies)[::-1])
        for impl in (IMPLS if (rnd + turn) % 2 == 0 else IMPLS[::-1])
    ]
    for rnd, kind, impl in order:
        body = bodies[kind]
        datas = [body.render() for _ in range(grid.requests)]
        server = servers[impl]
        switch.to(impl)
        started = time.perf_counter()
        with ThreadPoolExecutor(grid.concurrency) as pool:
            replies = list(pool.map(lambda data, s=server: post(s, data), datas))
        wall = time.perf_counter() - started
        failed = sum(r.status != 200 for r in replies)
        seconds = sorted(r.seconds for r in replies)
        out.append(
            {
                "impl": impl,
                "kind": kind,
                "round": rnd,
                "requests": grid.requests,
                "concurrency": grid.concurrency,
                "failed": failed,
                "wall_s": round(wall, 3),
                "req_per_s": round(grid.requests / wall, 3),
                "median_ms": round(1000 * statistics.median(seconds), 1),
                "max_ms": round(1000 * seconds[-1], 1),
            }
        )
        print(f"  throughput {impl:7} {kind:6}: {grid.requests / wall:.2f} req/s ({wall:.1f}s)")
    return out


# -- summary -----------------------------------------------------------------------------------


def median_ms(values: Sequence[float]) -> float | None:
    return round(1000 * statistics.median(values), 1) if values else None


def engine_bytes(impl: Impl, dense_plugin: bool, prompt_tokens: int, cell: str, hidden: int) -> int:
    """The prompt_embeds tensor one embeds request hands to the engine (see the docstring)."""
    parts, rows = (int(n) for n in cell.split("x"))
    positions = prompt_tokens if impl == "builtin" or dense_plugin else parts * rows
    return positions * hidden * DTYPE_BYTES


def summarize(
    samples: list[Sample], hidden: int, bodies: dict[tuple[int, str], int], dense_plugin: bool
) -> list[dict]:
    """One row per (caching, length, cell): medians, added latency, ratios, bytes, parity."""
    ok = [s for s in samples if s.status == 200]
    index = {(s.caching, s.impl, s.length, s.cell, s.run): s for s in ok}

    def order(key: tuple[Caching, int, str]) -> tuple[bool, int, list[int]]:
        caching, length, cell = key  # caching on first, then by length, parts and rows
        return caching != "on", length, [int(n) for n in cell.split("x")] if cell != "text" else []

    keys = sorted({(s.caching, s.length, s.cell) for s in samples}, key=order)
    rows: list[dict[str, Any]] = []
    for caching, length, cell in keys:
        if cell == "text":
            continue
        row: dict[str, Any] = {"caching": caching, "length": length, "cell": cell}
        for impl in IMPLS:
            emb = [
                s
                for s in ok
                if (s.caching, s.impl, s.length, s.cell) == (caching, impl, length, cell)
            ]
            text = [
                s
                for s in ok
                if (s.caching, s.impl, s.length, s.cell) == (caching, impl, length, "text")
            ]
            pairs = [(e, index.get((caching, impl, length, "text", e.run))) for e in emb]
            added = [e.seconds - t.seconds for e, t in pairs if t is not None]
            parity = [
                e.reply == t.reply and e.prompt_tokens == t.prompt_tokens for e, t in pairs if t
            ]
            text_ms, emb_ms = (
                median_ms([s.seconds for s in text]),
                median_ms([s.seconds for s in emb]),
            )
            row[impl] = {
                "text_ms": text_ms,
                "embeds_ms": emb_ms,
                "added_ms": median_ms(added),
                "added_range_ms": [median_ms([min(added)]), median_ms([max(added)])]
                if added
                else None,
                # Fastest embeds - fastest text: less hit by a spike of outside load.
                "added_min_ms": median_ms(
                    [min(e.seconds for e in emb) - min(t.seconds for t in text)]
                )
                if emb and text
                else None,
                "ratio": round(emb_ms / text_ms, 3) if text_ms and emb_ms else None,
                "parity": f"{sum(parity)}/{len(parity)}",
                "prompt_tokens": emb[0].prompt_tokens if emb else None,
                "engine_bytes": engine_bytes(
                    impl, dense_plugin, emb[0].prompt_tokens if emb else 0, cell, hidden
                ),
                "failed": sum(
                    s.status != 200
                    for s in samples
                    if (s.caching, s.impl, s.length, s.cell) == (caching, impl, length, cell)
                ),
            }
        p, b = row["plugin"], row["builtin"]
        row["body_bytes"] = bodies[(length, cell)]
        row["plugin_over_builtin"] = (
            round(p["embeds_ms"] / b["embeds_ms"], 3) if p["embeds_ms"] and b["embeds_ms"] else None
        )
        rows.append(row)
    return rows


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def print_latency(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'cache':5} {'tokens':>6} {'parts':>6} {'bodyMB':>6} | "
        f"{'plugin: engMB':>13} {'text':>5} {'embeds':>6} {'+ms':>5} {'x':>5} {'par':>4} | "
        f"{'built-in: engMB':>15} {'text':>5} {'embeds':>6} {'+ms':>5} {'x':>5} {'par':>4} | "
        f"{'p/b':>5}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        p, b = row["plugin"], row["builtin"]
        print(
            f"{row['caching']:5} {row['length']:>6} {row['cell']:>6} "
            f"{row['body_bytes'] / 1e6:>6.2f} | "
            f"{p['engine_bytes'] / 1e6:>13.2f} {fmt(p['text_ms']):>5} {fmt(p['embeds_ms']):>6} "
            f"{fmt(p['added_ms'], '+.0f'):>5} {fmt(p['ratio'], '.2f'):>5} {p['parity']:>4} | "
            f"{b['engine_bytes'] / 1e6:>15.2f} {fmt(b['text_ms']):>5} {fmt(b['embeds_ms']):>6} "
            f"{fmt(b['added_ms'], '+.0f'):>5} {fmt(b['ratio'], '.2f'):>5} {b['parity']:>4} | "
            f"{fmt(row['plugin_over_builtin'], '.2f'):>5}"
        )


def tput_medians(tput: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (impl, kind): the median req/s over rounds, and failures summed."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for key in {(t["impl"], t["kind"]) for t in tput}:
        batches = [t for t in tput if (t["impl"], t["kind"]) == key]
        out[key] = {
            "req_per_s": statistics.median(t["req_per_s"] for t in batches),
            "failed": sum(t["failed"] for t in batches),
        }
    return out


def print_throughput(tput: list[dict[str, Any]], grid: Grid) -> None:
    by = tput_medians(tput)
    print(
        f"\nthroughput: {grid.requests} requests, {grid.concurrency} clients, "
        f"{grid.tput_length} tokens, embeds = {cell_name(grid.tput_cell)} (parts x rows), "
        f"median req/s of {grid.tput_rounds} rounds"
    )
    print(f"{'impl':8} {'text req/s':>10} {'embeds req/s':>12} {'embeds/text':>11} {'failed':>6}")
    for impl in IMPLS:
        text, emb = by[(impl, "text")], by[(impl, "embeds")]
        print(
            f"{impl:8} {text['req_per_s']:>10.2f} {emb['req_per_s']:>12.2f} "
            f"{emb['req_per_s'] / text['req_per_s']:>11.2f} {text['failed'] + emb['failed']:>6}"
        )
    p, b = by[("plugin", "embeds")], by[("builtin", "embeds")]
    print(f"plugin/built-in embeds req/s: {p['req_per_s'] / b['req_per_s']:.2f}")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Added latency vs text length: one line per implementation x rows, a panel per parts.

    Bars span the smallest to largest per-run difference, to show how far to trust a median;
    the y range follows the medians, so a bar running off the panel marks a noisy cell.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    panels = sorted(
        {(r["caching"], r["cell"].split("x")[0]) for r in rows}, key=lambda p: (p[0] != "on", p)
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    all_rows = sorted({int(r["cell"].split("x")[1]) for r in rows})
    colours = dict(
        zip(all_rows, plt.get_cmap("viridis")([0.0, 0.45, 0.85, 0.3, 0.6]), strict=False)
    )
    lengths = sorted({r["length"] for r in rows})
    shift = {"plugin": 0.97, "builtin": 1.03}  # side by side at each length, on a log axis
    for ax, (caching, parts) in zip(axes[0], panels, strict=True):
        for impl, style, marker in (("plugin", "-", "o"), ("builtin", "--", "s")):
            for n_rows in all_rows:
                pts = sorted(
                    (r["length"], r[impl]["added_ms"], *r[impl]["added_range_ms"])
                    for r in rows
                    if r["caching"] == caching
                    and r["cell"] == f"{parts}x{n_rows}"
                    and r[impl]["added_ms"] is not None
                )
                if not pts:
                    continue
                xs = [x * shift[impl] for x, *_ in pts]
                ys = [y for _, y, _, _ in pts]
                spread = [[y - lo for _, y, lo, _ in pts], [hi - y for _, y, _, hi in pts]]
                label = f"{'built-in' if impl == 'builtin' else impl}, {n_rows} rows"
                ax.errorbar(
                    xs, ys, yerr=spread, fmt=style, marker=marker, color=colours[n_rows],
                    label=label, capsize=3, elinewidth=0.8,
                )  # fmt: skip
        # One scale for all panels, set by the medians; a bar cut at the edge marks a noisy run.
        medians = [r[impl]["added_ms"] for r in rows for impl in IMPLS if r[impl]["added_ms"]]
        lo, hi = min([0.0, *medians]), max([0.0, *medians])
        pad = max(50.0, 0.3 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(min(lengths) / 1.4, max(lengths) * 1.4)
        ax.xaxis.set_major_locator(FixedLocator(lengths))
        ax.xaxis.set_major_formatter(FixedFormatter([str(n) for n in lengths]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("chat length (text tokens)")
        ax.set_ylabel("added latency vs same chat as text (ms)")
        ax.set_title(f"{parts} part{'s' if parts != '1' else ''}, prefix caching {caching}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Grid]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="default", help="preset")
    parser.add_argument("--quick", action="store_true", help="same as --grid quick (~2 min)")
    parser.add_argument("--runs", type=int, help="runs per cell (median over them)")
    parser.add_argument("--lengths", type=int, nargs="+", help="chat lengths in tokens")
    parser.add_argument("--caching", choices=("on", "off", "both"), help="prefix caching variants")
    parser.add_argument("--requests", type=int, help="throughput: requests per batch (0: skip)")
    parser.add_argument(
        "--tput-cell",
        metavar="PARTSxROWS",
        help="throughput: the embeds variant, e.g. 1x8 (default: the preset's)",
    )
    parser.add_argument("--tput-length", type=int, help="throughput: chat length in tokens")
    parser.add_argument("--concurrency", type=int, help="throughput: parallel clients")
    parser.add_argument(
        "--plugin-dense",
        action="store_true",
        help="serve the plugin with CHAT_EMBEDS_COMPACT=0 (dense layout, as the built-in)",
    )
    parser.add_argument("--hidden", type=int, default=4096, help="model width (default 4096)")
    parser.add_argument(
        "--layers",
        choices=sorted(LAYER_SHAPES),
        default="cheap",
        help="cost of the one decoder layer (default cheap: overhead stands out of the noise)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    grid = GRIDS["quick" if args.quick else args.grid]
    if args.runs:
        grid = replace(grid, runs=args.runs)
    if args.lengths:
        grid = replace(grid, lengths=tuple(args.lengths))
    if args.caching:
        caching: tuple[Caching, ...] = ("on", "off") if args.caching == "both" else (args.caching,)
        off = grid.off_lengths or grid.lengths
        grid = replace(
            grid, caching=caching, off_lengths=off, off_cells=grid.off_cells or grid.cells
        )
    if args.requests is not None:
        grid = replace(grid, requests=args.requests)
    if args.concurrency:
        grid = replace(grid, concurrency=args.concurrency)
    if args.tput_cell:
        parts, _, rows = args.tput_cell.partition("x")
        if not (parts.isdigit() and rows.isdigit()):
            parser.error("--tput-cell takes PARTSxROWS, e.g. 1x8")
        grid = replace(grid, tput_cell=(int(rows), int(parts)))
    if args.tput_length:
        grid = replace(grid, tput_length=args.tput_length)
    too_long = [n for n in grid.lengths + grid.off_lengths if n + TEMPLATE_TOKENS > MAX_MODEL_LEN]
    if too_long:
        parser.error(f"lengths {too_long} do not fit --max-model-len {MAX_MODEL_LEN}")
    return args, grid


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args, grid = parse_args(argv)
    exit_on_sigterm()
    started = time.monotonic()
    load_before = os.getloadavg()
    model = build_wide_model(args.hidden, args.layers)
    table = EmbeddingTable(model)
    hidden = int(table.weight.shape[1])
    chats = Chats(table, args.seed)
    samples: list[Sample] = []
    tput: list[dict[str, Any]] = []
    startup_s: dict[str, float] = {}
    plugin_env = {"CHAT_EMBEDS_COMPACT": "0" if args.plugin_dense else "1"}
    transport = "dense" if args.plugin_dense else "compact"
    with vllm_cache_root() as cache_root:
        for caching in grid.caching:
            lengths = grid.lengths if caching == "on" else grid.off_lengths
            cells = grid.cells if caching == "on" else grid.off_cells
            print(
                f"\n== prefix caching {caching}: starting plugin and built-in servers", flush=True
            )
            t0 = time.monotonic()
            with serve_both(model, caching, cache_root, plugin_env) as servers:
                startup_s[caching] = round(time.monotonic() - t0, 1)
                print(f"  both healthy after {startup_s[caching]}s", flush=True)
                switch = Switch(servers, chats)
                samples += latency_phase(
                    servers, chats, caching, lengths, cells, grid.runs, args.seed, switch
                )
                if caching == grid.caching[0] and grid.requests > 0:
                    tput = throughput_phase(servers, chats, grid, switch)
    bodies: dict[tuple[int, str], int] = {}
    for length in sorted({s.length for s in samples}):
        words = chats.words(length)
        for cell in set(grid.cells) | set(grid.off_cells):
            if fits(length, cell):
                bodies[(length, cell_name(cell))] = Body(chats.content(words, cell)).size
    rows = summarize(samples, hidden, bodies, args.plugin_dense)
    elapsed = round(time.monotonic() - started, 1)
    overrides = hf_overrides(model)
    print(
        f"\nmodel {model.name}: hidden {hidden}, 1 {args.layers} layer, hf-overrides "
        f"{overrides}; plugin transport {transport}; medians of {grid.runs} runs, "
        "max_tokens=1 greedy, a fresh cache_salt per request"
    )
    print(
        "tokens = user text tokens; parts = parts x rows; bodyMB = JSON request size; engMB = "
        "prompt_embeds tensor to the engine, computed: prompt_tokens x hidden x 4 B (built-in"
        + (", plugin dense);\n" if args.plugin_dense else "), rows x hidden x 4 B (plugin);\n")
        + "text/embeds = median ms; +ms = median (embeds - text) per run; x = embeds/text; "
        "par = runs with the same reply and prompt_tokens as text; p/b = plugin/built-in embeds\n"
    )
    print_latency(rows)
    if tput:
        print_throughput(tput, grid)
    failed = sum(s.status != 200 for s in samples) + sum(t["failed"] for t in tput)
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"{results_stem(NAME)}.png"
    plot(
        rows,
        png,
        f"prompt_embeds part cost, {model.name} (hidden {hidden}), plugin ({transport}) vs "
        f"built-in, medians of {grid.runs} runs",
    )
    meta = {
        "model": str(model),
        "hidden": hidden,
        "layers": args.layers,
        "hf_overrides": overrides,
        "server_flags": {c: server_flags(model, c) for c in grid.caching},
        "grid": asdict(grid),
        "plugin_transport": transport,
        "engine_bytes": "prompt_embeds tensor, float32: built-in (and dense plugin) "
        "prompt_tokens x hidden x 4; compact plugin parts x rows x hidden x 4",
        "elapsed_s": elapsed,
        "startup_s": startup_s,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "vllm": package_version("vllm"),
        "failed_requests": failed,
    }
    data = {
        "meta": meta,
        "latency": rows,
        "throughput": tput,
        "samples": [asdict(s) for s in samples],
    }
    path = write_results(NAME, data)
    print(
        f"\nwrote {path} and {png} in {elapsed:.0f}s (load average {load_before[0]:.1f} at start)"
    )
    if failed:
        print(f"{failed} requests failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

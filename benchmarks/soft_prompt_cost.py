"""What serving a soft prompt by name costs, and how well its prefix is cached (issue 13).

Model: the 4096-wide cheap model of ``latency_side_by_side.py`` (``.models/wide-4096-cheap``,
one cheap layer, so a few milliseconds are not drowned by prefill). One plugin server with
``CHAT_EMBEDS_SOFT_PROMPTS`` naming a 20-row soft prompt (a one-tensor ``.safetensors`` file of
rows drawn like the model's embeddings), prefix caching on (vLLM's default),
``--enable-prompt-tokens-details``.

Time to first token (streaming, ``max_tokens=2``; the first content chunk): the same chat of
``L`` one-token words sent to the base model (``text``), to the soft prompt's name
(``soft_prompt``: 20 more prompt positions, given as rows), and to the base model with 20 more
words at the start of the user turn (``text+20``: the prefill cost of 20 positions as text).
Every request has a fresh ``cache_salt`` so none reuses another's KV blocks; the three take
turns in a shuffled order each run; medians over runs. "added" is the median of
(soft_prompt - text) per run: the full cost of the soft prompt, its 20 positions of prefill
included; (soft_prompt - text+20) is what the plugin adds beyond that prefill.

Prefix cache: 20 requests to the soft prompt sharing a system message and differing in the
user question (no cache_salt), one after another; hit rate = cached prompt tokens / prompt
tokens over requests 2..20, and how many of them hit at all. The same for the base model.

Renderer work (in-process, no server): the median time ``build_embeds_input`` takes to put the
20 rows before an ``L``-token prompt, the plugin's own share of the added cost.

    .venv/bin/python benchmarks/soft_prompt_cost.py [--quick] [--runs N] [--length L]

Prints the tables, writes ``benchmarks/results/soft_prompt_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402, F401  (puts tests/ on sys.path)
from common import (  # noqa: E402
    EmbeddingTable,
    Server,
    exit_on_sigterm,
    run_server,
    server_env,
    vllm_cache_root,
    write_results,
)
from latency_side_by_side import SERVED_NAME, Chats, build_wide_model, server_flags  # noqa: E402

NAME = "soft_prompt_cost"
SOFT_PROMPT = "sp20"
VIRTUAL_TOKENS = 20
SHARED_REQUESTS = 20


def soft_prompt_file(table: EmbeddingTable, folder: Path) -> Path:
    """20 rows drawn with the spread of the model's own embedding rows."""
    torch.manual_seed(0)
    rows = torch.randn(VIRTUAL_TOKENS, table.weight.shape[1]) * table.weight.std()
    from safetensors.torch import save_file

    path = folder / f"{SOFT_PROMPT}.safetensors"
    save_file({"soft_prompt": rows.contiguous()}, str(path))
    return path


def ttft(server: Server, model: str, text: str, salt: bool = True) -> tuple[float, dict]:
    """Seconds to the first streamed content chunk, and the usage of the request."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 2,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if salt:
        body["cache_salt"] = uuid.uuid4().hex
    data = json.dumps(body)
    first: float | None = None
    usage: dict = {}
    started = time.perf_counter()
    with requests.post(
        server.base_url + "/v1/chat/completions",
        data=data,
        headers={"Content-Type": "application/json"},
        stream=True,
        timeout=600,
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                usage = chunk["usage"]
    assert first is not None, "no content chunk"
    return first, usage


def latency(server: Server, chats: Chats, length: int, runs: int) -> dict[str, Any]:
    words = chats.words(length + VIRTUAL_TOKENS)
    text = "".join(" " + w for w in words[VIRTUAL_TOKENS:])
    text20 = "".join(" " + w for w in words)
    variants = {
        "text": (SERVED_NAME, text),
        "soft_prompt": (SOFT_PROMPT, text),
        "text+20": (SERVED_NAME, text20),
    }
    for model, content in variants.values():  # warm-up
        ttft(server, model, content)
    times: dict[str, list[float]] = {k: [] for k in variants}
    tokens: dict[str, int] = {}
    rng = random.Random(0)
    for _ in range(runs):
        order = list(variants)
        rng.shuffle(order)
        for key in order:
            model, content = variants[key]
            seconds, usage = ttft(server, model, content)
            times[key].append(seconds)
            tokens[key] = usage.get("prompt_tokens", 0)
            time.sleep(0.2)
    added = [s - t for s, t in zip(times["soft_prompt"], times["text"], strict=True)]
    beyond = [s - t for s, t in zip(times["soft_prompt"], times["text+20"], strict=True)]
    return {
        "length": length,
        "runs": runs,
        "prompt_tokens": tokens,
        "ttft_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
        "added_ms": 1000 * statistics.median(added),
        "added_beyond_text20_ms": 1000 * statistics.median(beyond),
    }


def prefix_cache(server: Server, chats: Chats, model: str) -> dict[str, Any]:
    system = "".join(" " + w for w in chats.words(600))
    cached, prompt, hits = 0, 0, 0
    for i in range(SHARED_REQUESTS):
        question = "".join(" " + w for w in chats.words(10 + i))
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
            "max_tokens": 1,
            "temperature": 0.0,
        }
        response = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        usage = response.json()["usage"]
        if i == 0:
            continue
        got = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        cached += got
        prompt += usage["prompt_tokens"]
        hits += got > 0
    return {
        "model": model,
        "requests": SHARED_REQUESTS,
        "hit_rate": cached / prompt,
        "requests_with_hits": hits,
        "cached_tokens": cached,
        "prompt_tokens": prompt,
    }


def renderer_cost(hidden: int, length: int, repeats: int = 200) -> float:
    """Median ms the renderer spends putting 20 rows before a ``length``-token prompt
    (placeholder ids prepended, spans located, compact embeds input built), in-process."""
    from vllm_chat_embeds.renderers.splice import build_embeds_input

    rows = torch.randn(VIRTUAL_TOKENS, hidden)
    ids = list(range(5, 5 + length))
    placeholder = 5 + length
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        build_embeds_input([placeholder] * VIRTUAL_TOKENS + ids, [rows], placeholder)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--length", type=int, default=1000, help="user-turn words (tokens)")
    args = parser.parse_args(argv)
    runs = args.runs or (8 if args.quick else 30)
    exit_on_sigterm()

    model = build_wide_model(4096, "cheap")
    table = EmbeddingTable(model)
    chats = Chats(table, seed=13)
    with (
        tempfile.TemporaryDirectory(prefix="vce-soft-prompt-") as folder,
        vllm_cache_root() as root,
    ):
        path = soft_prompt_file(table, Path(folder))
        extra = {"CHAT_EMBEDS_SOFT_PROMPTS": f"{SOFT_PROMPT}={path}"}
        env = server_env(trap=False, plugins=True, mp=True, cache_root=root, extra=extra)
        flags = [*server_flags(model, "on"), "--enable-prompt-tokens-details"]
        with run_server(model, *flags, env=env) as server:
            lat = latency(server, chats, args.length, runs)
            caches = [prefix_cache(server, chats, m) for m in (SOFT_PROMPT, SERVED_NAME)]
    lat["renderer_ms"] = renderer_cost(int(table.weight.shape[1]), args.length)

    print(f"\nTTFT, user turn of {lat['length']} tokens, median of {lat['runs']} runs (ms):")
    for key, ms in lat["ttft_ms"].items():
        print(f"  {key:<12} {ms:8.1f}   prompt_tokens {lat['prompt_tokens'].get(key)}")
    print(f"  soft prompt added (vs text):          {lat['added_ms']:+.1f} ms")
    print(f"  soft prompt added beyond text+20:     {lat['added_beyond_text20_ms']:+.1f} ms")
    print(f"  renderer work for the 20 rows (in-process): {lat['renderer_ms']:.2f} ms")
    print(f"\nPrefix cache over requests 2..{SHARED_REQUESTS} sharing a 600-token system message:")
    for c in caches:
        print(
            f"  {c['model']:<6} hit rate {c['hit_rate']:.1%}  "
            f"({c['cached_tokens']}/{c['prompt_tokens']} tokens; "
            f"{c['requests_with_hits']}/{c['requests'] - 1} requests hit)"
        )
    out = write_results(NAME, {"latency": lat, "prefix_cache": caches, "argv": sys.argv[1:]})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

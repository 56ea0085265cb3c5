"""What one prompt_embeds part adds to a chat, measured in-process: plugin vs built-in (issue 5).

Why beside ``latency_side_by_side.py``: over HTTP, two servers sharing two cores make every
request vary by 5-20 ms, as much as the cost being measured. Here each implementation runs in
its own process with an in-process ``LLM`` (no HTTP, no second server), and each run sends the
same chat twice, once as text and once with its last words as one part of their own embedding
rows, back to back; "added" is the median over runs of (embeds - text).

Model: the latency benchmark's wide model with one cheap layer (4096 wide). Chats: ``L``
one-token words plus a short tail; the tail is the part. Every request gets other random
words, so prefix caching helps neither (with the same words, the plugin's embeds request would
reuse the text request's cached blocks: its text blocks hash as text). The built-in runs with
``VLLM_PLUGINS=""``.

    .venv/bin/python benchmarks/offline_part_cost.py [--quick] [--runs N]

Prints a table and writes ``benchmarks/results/offline_part_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import EmbeddingTable, exit_on_sigterm, vllm_cache_root, write_results
from latency_side_by_side import MAX_MODEL_LEN, build_wide_model

NAME = "offline_part_cost"
LENGTHS = (256, 1000, 3000)
WORDS = (" self", " return", " import", " def", " class", " None", " True", " for")
TAIL = " return x + 1 and"
IMPLS = ("plugin", "builtin")


def chat(table: EmbeddingTable, length: int, embeds: bool, rnd: random.Random) -> list[dict]:
    content: list[dict[str, Any]] = [
        {"type": "text", "text": "".join(rnd.choice(WORDS) for _ in range(length))}
    ]
    content.append(table.part(TAIL) if embeds else {"type": "text", "text": TAIL})
    return [{"role": "user", "content": content}]


def child(model: Path, runs: int) -> dict[str, Any]:
    """Measure in this process (the parent set VLLM_PLUGINS for the implementation)."""
    from vllm import LLM, SamplingParams

    table = EmbeddingTable(model)
    llm = LLM(
        model=str(model),
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=4,
        kv_cache_memory_bytes=1 << 30,
        enable_prompt_embeds=True,
        hf_overrides={"max_position_embeddings": MAX_MODEL_LEN},
    )
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    rnd = random.Random(0)
    out: dict[str, Any] = {}
    for length in LENGTHS:
        llm.chat(chat(table, length, True, rnd), greedy, use_tqdm=False)  # warm-up
        text_ms: list[float] = []
        added_ms: list[float] = []
        for run in range(runs):
            timed: dict[bool, float] = {}
            for embeds in (False, True) if run % 2 == 0 else (True, False):
                # Other words each time: neither request may reuse the other's cached blocks.
                messages = chat(table, length, embeds, rnd)
                started = time.perf_counter()
                llm.chat(messages, greedy, use_tqdm=False)
                timed[embeds] = (time.perf_counter() - started) * 1e3
            text_ms.append(timed[False])
            added_ms.append(timed[True] - timed[False])
        # Correctness beside the timing: the same words as text and as a part, same reply.
        seed = rnd.random()
        replies = [
            llm.chat(chat(table, length, e, random.Random(seed)), greedy, use_tqdm=False)
            for e in (False, True)
        ]
        same = int(replies[0][0].outputs[0].token_ids == replies[1][0].outputs[0].token_ids)
        out[str(length)] = {
            "text_ms": round(statistics.median(text_ms), 2),
            "added_ms": round(statistics.median(added_ms), 2),
            "added_ms_runs": [round(x, 2) for x in added_ms],
            "same_reply": same,
            "runs": runs,
        }
    return out


def run_child(impl: str, model: Path, runs: int, cache_root: str) -> dict[str, Any]:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CACHE_ROOT=cache_root)
    env.pop("VLLM_PLUGINS", None)
    if impl == "builtin":
        env["VLLM_PLUGINS"] = ""
    command = [sys.executable, __file__, "--child", str(model), "--runs", str(runs)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{impl} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 runs per length")
    parser.add_argument("--runs", type=int, help="runs per length (default 15)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 15)
    if args.child:
        print(json.dumps(child(args.child, runs)))
        return
    exit_on_sigterm()
    model = build_wide_model(4096, "cheap")
    results: dict[str, Any] = {}
    with vllm_cache_root() as cache_root:
        for impl in IMPLS:
            print(f"measuring {impl} ({runs} runs per length) ...", flush=True)
            results[impl] = run_child(impl, model, runs, cache_root)
    print(f"\none part of {len(EmbeddingTable(model).rows(TAIL))} rows, {model.name}, medians")
    print(f"{'tokens':>6} | {'plugin text':>11} {'+ms':>6} | {'built-in text':>13} {'+ms':>6}")
    for length in map(str, LENGTHS):
        p, b = results["plugin"][length], results["builtin"][length]
        print(
            f"{length:>6} | {p['text_ms']:>11.1f} {p['added_ms']:>+6.1f} | "
            f"{b['text_ms']:>13.1f} {b['added_ms']:>+6.1f}"
        )
    same = {impl: sum(r["same_reply"] for r in results[impl].values()) for impl in IMPLS}
    print(f"greedy reply with the part equal to the text's, per length: {same} of {len(LENGTHS)}")
    path = write_results(NAME, {"model": str(model), "tail": TAIL, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

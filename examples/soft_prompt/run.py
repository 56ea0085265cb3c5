"""Prompt-tune SmolLM2-135M-Instruct on a local sentiment task, serve the soft prompt, and
measure task accuracy of the base model and of the soft prompt through the server.

    python examples/soft_prompt/run.py            # train, start a server, evaluate, stop it

Step by step, with the demo server of ``make serve`` (served as ``smollm2``)::

    python examples/soft_prompt/run.py train      # -> .models/soft-prompts/sentiment
    CHAT_EMBEDS_SOFT_PROMPTS=sentiment=.models/soft-prompts/sentiment make serve
    python examples/soft_prompt/run.py evaluate --url http://127.0.0.1:8000

A review is correct when the answer is exactly ``Sentiment: positive|negative`` with the right
label. Output lines: ``base accuracy: K/N`` and ``soft_prompt accuracy: K/N``. ``--smoke`` runs
the same pipeline on a tiny model for a few steps (the tests do this).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from task import Review, reviews
from train import train

REPO = Path(__file__).resolve().parents[2]
SOFT_PROMPT = "sentiment"
SERVED = "smollm2"  # the demo server's name for the base model (make serve)
# The Makefile's serve flags for 2 CPU cores.
FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
         "--max-num-seqs", "4", "--kv-cache-memory-bytes", str(256 * 1024 * 1024)]  # fmt: skip


def ask(url: str, model: str, review: Review) -> str:
    body = {"model": model, "messages": review.messages(), "max_tokens": 8, "temperature": 0.0}
    response = requests.post(url + "/v1/chat/completions", json=body, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"] or ""


def evaluate(url: str, held_out: list[Review], base: str) -> dict[str, int]:
    correct = {"base": 0, "soft_prompt": 0}
    for review in held_out:
        for label, model in (("base", base), ("soft_prompt", SOFT_PROMPT)):
            answer = ask(url, model, review)
            correct[label] += answer.strip() == review.answer
    for label, count in correct.items():
        print(f"{label} accuracy: {count}/{len(held_out)}", flush=True)
    sample = held_out[0]
    print(f"example: {sample.text!r} -> base {ask(url, base, sample)!r}, "
          f"soft prompt {ask(url, SOFT_PROMPT, sample)!r}")  # fmt: skip
    return correct


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(model_dir: Path, checkpoint: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``vllm serve`` as ``make serve`` runs it, plus ``CHAT_EMBEDS_SOFT_PROMPTS``."""
    port = free_port()
    env = {**os.environ, "CHAT_EMBEDS_SOFT_PROMPTS": f"{SOFT_PROMPT}={checkpoint}"}
    env.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vce-soft-prompt-"))
    vllm = str(Path(sys.executable).parent / "vllm")
    cmd = [vllm, "serve", str(model_dir), "--served-model-name", SERVED, "--enable-prompt-embeds"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *FLAGS]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"vllm serve did not start; see {log}")
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", nargs="?", default="all", choices=["all", "train", "evaluate"])
    parser.add_argument("--model-dir", type=Path, default=REPO / ".models/smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=REPO / ".models/soft-prompts/sentiment")
    parser.add_argument("--url", help="evaluate against this running server instead")
    parser.add_argument("--base-model", default=SERVED, help="the server's base model name")
    parser.add_argument("--smoke", action="store_true", help="a few steps, a few reviews")
    args = parser.parse_args()

    train_set, held_out = reviews()
    if args.smoke:
        train_set, held_out = train_set[:16], held_out[:4]
    if args.step in ("all", "train"):
        steps = 2 if args.smoke else None
        virtual = 4 if args.smoke else 16
        train(args.model_dir, args.out, train_set, max_steps=steps, virtual_tokens=virtual)
    if args.step == "train":
        return
    if args.url:
        evaluate(args.url.rstrip("/"), held_out, args.base_model)
        return
    log = Path(tempfile.mkstemp(prefix="vce-soft-prompt-server-", suffix=".log")[1])
    proc, url = serve(args.model_dir, args.out, log)
    try:
        evaluate(url, held_out, SERVED)
    finally:
        stop(proc)


if __name__ == "__main__":
    main()

"""The examples run as a user would run them, and show what they claim to show.

Each example prints one ``<label> answer: <repr>`` line per request; with the model's own
embedding rows in the prompt_embeds part, greedy answers must equal the plain-text answer.
The tiny test model is random, so the answers are gibberish, but deterministic.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from conftest import REPO, server_env

pytestmark = pytest.mark.e2e

EXAMPLES = REPO / "examples"
TIMEOUT_S = 300
# A user text and an embedded continuation that suit the tiny model's code-trained tokenizer.
TINY_ARGS = ["--text", "def hello(world):", "--embed-text", " return world + 1"]
TINY_ARGS += ["--max-tokens", "16"]
LINE = re.compile(r"^(\w+) (answer|prompt_tokens): (.*)$")


OFFLINE_HUB = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _answers(stdout: str) -> dict[str, dict]:
    found: dict[str, dict] = {"answer": {}, "prompt_tokens": {}}
    for line in stdout.splitlines():
        match = LINE.match(line)
        if match:
            label, kind, value = match.groups()
            found[kind][label] = ast.literal_eval(value)
    return found


def run_example(name: str, *args: str, env: dict[str, str] | None = None) -> dict[str, dict]:
    """Run ``examples/<name>`` in a process of its own (an example that starts an engine);
    return ``{"answer": {label: text}, "prompt_tokens": {...}}``."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env or {**os.environ, **OFFLINE_HUB},
        cwd=REPO,
    )
    output = f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
    assert done.returncode == 0, output
    return _answers(done.stdout)


def run_client_example(name: str, *args: str) -> dict[str, dict]:
    """Run a client example (one that talks to a server) as ``python examples/<name>`` would,
    in this process: the same ``__main__``, argv and output, without a new interpreter's
    imports of torch and transformers for each example."""
    out = io.StringIO()
    argv = [str(EXAMPLES / name), *args]
    with mock.patch.object(sys, "argv", argv), mock.patch.dict(os.environ, OFFLINE_HUB):
        with contextlib.redirect_stdout(out), contextlib.chdir(REPO):
            try:
                runpy.run_path(str(EXAMPLES / name), run_name="__main__")
            except SystemExit as stop:
                assert stop.code in (0, None), f"exit {stop.code}:\n{out.getvalue()[-4000:]}"
    return _answers(out.getvalue())


def test_online_example_matches_text(plugin_server, tiny_model: Path):
    found = run_client_example(
        "online_chat.py",
        "--model-dir", str(tiny_model),
        "--base-url", plugin_server.base_url + "/v1",
        "--model", plugin_server.model,
        *TINY_ARGS,
        "--compare",
    )  # fmt: skip
    answers, prompt_tokens = found["answer"], found["prompt_tokens"]
    assert set(answers) == {"embeds", "text"}, found
    assert answers["text"], "the model must generate something"
    assert answers["embeds"] == answers["text"]
    # One prompt token per embedding row: the same count as the text the rows stand for.
    assert prompt_tokens["embeds"] == prompt_tokens["text"]


def test_online_example_on_the_responses_api_matches_text(plugin_server, tiny_model: Path):
    found = run_client_example(
        "online_chat.py",
        "--model-dir", str(tiny_model),
        "--base-url", plugin_server.base_url + "/v1",
        "--model", plugin_server.model,
        "--api", "responses",
        *TINY_ARGS,
        "--compare",
    )  # fmt: skip
    answers, prompt_tokens = found["answer"], found["prompt_tokens"]
    assert answers["text"], "the model must generate something"
    assert answers["embeds"] == answers["text"]
    assert prompt_tokens["embeds"] == prompt_tokens["text"]


def test_online_example_finds_the_served_model(plugin_server, tiny_model: Path):
    answers = run_client_example(
        "online_chat.py",
        "--model-dir", str(tiny_model),
        "--base-url", plugin_server.base_url + "/v1",
        *TINY_ARGS,
    )["answer"]  # fmt: skip
    assert set(answers) == {"embeds"}, answers
    assert answers["embeds"]


def test_offline_example_tensor_raw_torch_and_text_agree(tiny_model: Path, tmp_path: Path):
    # In-process engine, vLLM's built-in prompt_embeds helpers trapped (as in the servers).
    env = server_env(trap=True, plugins=True, mp=False, cache_root=str(tmp_path))
    found = run_example("offline_chat.py", "--model-dir", str(tiny_model), *TINY_ARGS, env=env)
    answers, prompt_tokens = found["answer"], found["prompt_tokens"]
    assert set(answers) == {"tensor", "raw", "torch", "text"}, found
    assert answers["tensor"], "the model must generate something"
    assert answers["tensor"] == answers["raw"] == answers["torch"] == answers["text"]
    assert len(set(prompt_tokens.values())) == 1, prompt_tokens


def test_multi_turn_example_by_reference_matches_text(plugin_server, tiny_model: Path):
    """The part goes once with data, then by uuid; every turn answers as the text chat."""
    found = run_client_example(
        "multi_turn_chat.py",
        "--model-dir", str(tiny_model),
        "--base-url", plugin_server.base_url + "/v1",
        "--model", plugin_server.model,
        *TINY_ARGS,
        "--turns", "3",
        "--compare",
    )  # fmt: skip
    answers, prompt_tokens = found["answer"], found["prompt_tokens"]
    assert set(answers) == {f"{kind}_turn{t}" for kind in ("embeds", "text") for t in (1, 2, 3)}
    for turn in (1, 2, 3):
        assert answers[f"embeds_turn{turn}"] == answers[f"text_turn{turn}"], found
        assert prompt_tokens[f"embeds_turn{turn}"] == prompt_tokens[f"text_turn{turn}"]
    assert answers["text_turn1"], "the model must generate something"


def test_client_shapes_example_matches_text(plugin_server, tiny_model: Path):
    """file_data, the Files API, the binary upload and Conversation(shape="file") all answer
    as the text the rows stand for (on /v1/responses too: ``--api responses``, run by hand;
    test_row_uploads_online.py covers those shapes there)."""
    found = run_client_example(
        "clients/openai_file_parts.py",
        "--model-dir", str(tiny_model),
        "--base-url", plugin_server.base_url + "/v1",
        "--model", plugin_server.model,
        *TINY_ARGS,
        "--compare",
    )  # fmt: skip
    answers, prompt_tokens = found["answer"], found["prompt_tokens"]
    assert set(answers) == {"file_data", "file_id", "upload", "conversation", "text"}, found
    assert answers["text"], "the model must generate something"
    assert len(set(answers.values())) == 1, answers
    assert len(set(prompt_tokens.values())) == 1, prompt_tokens

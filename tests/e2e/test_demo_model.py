"""The demo model, served exactly as ``make serve`` serves it, answers from embeddings too."""

from __future__ import annotations

import pytest
from conftest import MODELS, REPO, EmbeddingTable, run_server, server_env

pytestmark = pytest.mark.e2e

DEMO_DIR = MODELS / "smollm2-135m-instruct"
GREEDY = {"temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def demo_server(vllm_cache_root):
    env = server_env(trap=True, plugins=True, mp=True, cache_root=vllm_cache_root)
    command = ["make", "-C", str(REPO), "--no-print-directory", "serve", "PORT={port}"]
    with run_server(DEMO_DIR, env=env, command=command, timeout_s=420) as server:
        server.model = "smollm2"
        yield server


def answer(server, content) -> str:
    messages = [{"role": "user", "content": content}]
    out = server.client.chat.completions.create(model=server.model, messages=messages, **GREEDY)
    return out.choices[0].message.content or ""


def test_demo_answers_paris_from_text(demo_server):
    assert "Paris" in answer(demo_server, "What is the capital of France?")


def test_demo_answers_paris_from_embeddings(demo_server):
    table = EmbeddingTable(DEMO_DIR)
    content = [{"type": "text", "text": "What is the capital"}, table.part(" of France?")]
    text_content = [
        {"type": "text", "text": "What is the capital"},
        {"type": "text", "text": " of France?"},
    ]
    from_embeds = answer(demo_server, content)
    assert "Paris" in from_embeds
    assert from_embeds == answer(demo_server, text_content)


def test_readme_example_runs_and_answers_paris(demo_server, capsys):
    import re

    source = (REPO / "README.md").read_text()
    code = re.search(r"## Example.*?```python\n(.*?)```", source, re.S)
    assert code is not None
    program = code.group(1).replace("http://127.0.0.1:8000", demo_server.base_url)
    program = program.replace(".models/smollm2-135m-instruct", str(DEMO_DIR))
    exec(compile(program, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "Paris" in printed

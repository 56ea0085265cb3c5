"""``LLM.chat()`` by reference with the engine in processes of its own (the offline client,
``SyncMPClient``): rows cross to the engine core through shared memory
(``transport/shared_rows.py``; the rows kept by uuid are the store's one segment, mapped by the
engine core), every answer is that of the text the rows stand for, and nothing is left in
``/dev/shm`` once the process is gone. The copy protocol (``stores/engine_rows.py``: only the
rows the engine core lacks) is the fallback, tested online in ``test_scale_out.py``.

Runs in a subprocess: the session's in-process ``LLM`` owns this process's vLLM state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ALL_ROWS_SHARED, shm_names

from vllm_chat_embeds.transport.shared_rows import NAME_PREFIX

pytestmark = pytest.mark.e2e

TEXTS = (" return world + 1", " print(world)")

SCRIPT = r"""
import json, sys, torch
from vllm import LLM, SamplingParams

rows = torch.load(sys.argv[2])
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1024,
          max_num_seqs=4, kv_cache_memory_bytes=64 * 1024 * 1024, enable_prompt_embeds=True)
greedy = SamplingParams(temperature=0.0, max_tokens=8)
head = {"type": "text", "text": "def hello(world):"}

def chat(parts):
    conversations = [[{"role": "user", "content": [head, part]}] for part in parts]
    return [out.outputs[0].token_ids for out in llm.chat(conversations, greedy)]

def sent(text):
    return {"type": "prompt_embeds", "data": rows[text], "uuid": "u" + text}

def ref(text):
    return {"type": "prompt_embeds", "uuid": "u" + text}

texts = list(rows)
result = {
    "text": chat([{"type": "text", "text": t} for t in texts]),
    # One batch: the first conversation sends the data, the second refers to it.
    "batch": chat([sent(texts[0]), ref(texts[0]), sent(texts[1])]),
    "by_uuid": chat([ref(t) for t in texts] * 2),
}
# What the offline client recorded as held by its engine core by the copy protocol: nothing,
# since the rows went as shared-memory handles.
client = llm.llm_engine.engine_core
result["held"] = [[len(held._held)] for held in vars(client).get(
    "_vllm_chat_embeds_engine_rows", {}).values() if hasattr(held, "_held")]
print("RESULT " + json.dumps({k: [list(v) for v in vs] for k, vs in result.items()}))
"""


def test_llm_chat_by_reference_with_a_multiprocess_engine(
    tiny_model, table, vllm_cache_root, tmp_path
):
    rows_path = tmp_path / "rows.pt"
    torch.save({text: table.rows(text) for text in TEXTS}, rows_path)
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_CACHE_ROOT": vllm_cache_root,
        **ALL_ROWS_SHARED,
    }
    before = shm_names(NAME_PREFIX)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model), str(rows_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    first, second = result["text"]
    assert result["batch"] == [first, first, second]
    assert result["by_uuid"] == [first, second, first, second]
    assert result["held"] in ([], [[0]])  # no copies kept beside the engine core
    assert "rows arrive through shared memory" in done.stdout + done.stderr
    assert shm_names(NAME_PREFIX) <= before

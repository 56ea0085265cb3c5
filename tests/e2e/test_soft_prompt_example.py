"""``examples/soft_prompt/run.py --smoke``: train with PEFT, serve by name, measure accuracy.

The tiny test model is random, so the accuracies are whatever they are; the point is that the
whole pipeline a user runs (PEFT training and ``save_pretrained``, a server started with
``CHAT_EMBEDS_SOFT_PROMPTS``, requests to the base model and to the soft prompt) works.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.e2e


def test_soft_prompt_example_smoke(tiny_model: Path, tmp_path: Path, vllm_cache_root: str):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["VLLM_CACHE_ROOT"] = vllm_cache_root
    done = subprocess.run(
        [sys.executable, str(REPO / "examples/soft_prompt/run.py"), "--smoke",
         "--model-dir", str(tiny_model), "--out", str(tmp_path / "sentiment")],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )  # fmt: skip
    output = f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}"
    assert done.returncode == 0, output
    found = dict(re.findall(r"^(base|soft_prompt) accuracy: (\d+/\d+)$", done.stdout, re.M))
    assert set(found) == {"base", "soft_prompt"}, output
    assert all(value.endswith("/4") for value in found.values())
    assert (tmp_path / "sentiment" / "adapter_model.safetensors").is_file()

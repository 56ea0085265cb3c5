"""The plugin loads in every process of a real server, and refuses unsupported vLLM versions."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from conftest import CPU_FLAGS, FAKE_VERSION_DIR, VLLM, server_env

import vllm_chat_embeds
from vllm_chat_embeds import errors
from vllm_chat_embeds.compat.version_gate import supported_text

pytestmark = pytest.mark.e2e

ACTIVE = f"vllm_chat_embeds {vllm_chat_embeds.__version__} active"


def test_plugin_announces_itself_once_in_each_process(plugin_server):
    log = plugin_server.log()
    lines = [line for line in log.splitlines() if ACTIVE in line]
    procs = [re.match(r"\((\w+)[^ ]* pid=(\d+)\)", line) for line in lines]
    assert all(procs), lines
    kinds = [m.group(1) for m in procs if m]
    pids = [m.group(2) for m in procs if m]
    assert {"APIServer", "EngineCore"} <= set(kinds), lines
    assert len(pids) == len(set(pids)), "one line per process, not more"
    # The takeover trap is installed in every process that loads vLLM's renderers (where the
    # built-in helpers live): at least each API server, which renders every chat.
    renderers = kinds.count("APIServer")
    assert log.count("test trap: built-in prompt_embeds helpers disabled") >= renderers


def test_unsupported_vllm_is_refused_at_startup(tiny_model, vllm_cache_root):
    env = server_env(trap=False, plugins=True, mp=False, cache_root=vllm_cache_root)
    # Prepended, so a PYTHONPATH that points at a checkout (as in a worktree) still applies.
    paths = [str(FAKE_VERSION_DIR), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["CHAT_EMBEDS_TEST_FAKE_VLLM_VERSION"] = "0.99.0"
    cmd = [VLLM, "serve", str(tiny_model), "--port", "1", *CPU_FLAGS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    expected = errors.UNSUPPORTED_VLLM.format(
        ours=vllm_chat_embeds.__version__, supported=supported_text(), found="0.99.0"
    )
    assert expected in output, output[-3000:]

"""The quick part of ``make upstream-check``: the upstream series and the patched built-in.

Why: ``upstream/`` is a patch series for vLLM 0.33.0 itself (docs/upstream.md). This checks
that every patch applies to vLLM v0.33.0's source release over the patches it declares, that
the series goes in with ``upstream/am.sh`` (``git am --signoff``), that every Python file it
touches passes vLLM's own ruff check and format, and that vLLM's built-in with the series
applied (this plugin off) survives the hostile core and answers it as the series claims. The
patches' own tests and every hostile case run in ``make upstream-check``
(tools/upstream_check.py), which takes far longer.

The hostile core costs a server start of a fresh vLLM tree (65-80 s here), which
``make upstream-check`` pays anyway, so ``make test`` runs it only with
``CHAT_EMBEDS_TEST_UPSTREAM_SERVER=1``; that the series applies is checked every time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import requests
from conftest import CPU_FLAGS, REPO, TEST_SERVER_ARGS, run_server, server_env

pytestmark = pytest.mark.e2e

TOOLS = REPO / "tools"
HARNESS_VLLM = REPO / ".venv-vllm033" / "bin" / "vllm"
# The hostile core: a case of each patch that touches the online chat path, and a control.
CORE = (
    "echo_with_part",
    "prompt_logprobs_with_part",
    "stream_echo_with_part",
    "nan",
    "data_number",
    "zero_rows",
    "reserved_in_tool_arguments",
    "data_null",
    "beam_search_with_part",
    "one_dim",
    "valid_control",
)


def _load(name: str):
    if str(TOOLS) not in sys.path:  # as when run as a script: the tools import each other
        sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check():
    wheels = sorted((REPO / ".models" / "cache" / "wheels").glob("vllm-0.33.0-*.whl"))
    if not wheels or not HARNESS_VLLM.exists():
        pytest.skip("needs the vLLM 0.33 harness (make venv-vllm033) and its cached wheel")
    return _load("upstream_check")


def test_series_applies_to_the_033_release_and_passes_vllm_lint(check, tmp_path: Path):
    release = tmp_path / "release"
    check.unpack_release(release)
    check.check_declared_stack(release)
    check.apply_as_submitter(release)
    assert check.lint_touched(release) == 0


@pytest.fixture(scope="module")
def patched_builtin(check, tmp_path_factory, tiny_model: Path, vllm_cache_root: str):
    """vLLM's built-in over the harness's vllm with the series applied, plugin off."""
    if os.environ.get("CHAT_EMBEDS_TEST_UPSTREAM_SERVER") != "1":
        pytest.skip("make upstream-check runs every hostile case on the patched built-in")
    site = tmp_path_factory.mktemp("upstream") / "site"
    check.build_site(site=site)
    env = server_env(trap=False, plugins=False, mp=True, cache_root=vllm_cache_root,
                     extra={"PYTHONPATH": str(site)})  # fmt: skip
    command = [str(HARNESS_VLLM), "serve", str(tiny_model), "--host", "127.0.0.1",
               "--port", "{port}", *CPU_FLAGS, *TEST_SERVER_ARGS]  # fmt: skip
    try:
        # A fresh copy of vLLM's sources starts slower than the installed one on a loaded
        # machine (nothing is precompiled): more time than the suite's default.
        with run_server(tiny_model, env=env, command=command, timeout_s=480) as server:
            yield server
    finally:
        shutil.rmtree(site, ignore_errors=True)


def test_patched_builtin_passes_hostile_core(patched_builtin):
    sys.path.insert(0, str(REPO / "benchmarks"))
    hostile = _load("upstream_hostile")
    side = hostile.side
    model = Path(patched_builtin.model)
    cases = [c for c in side.build_cases(side.EmbeddingTable(model)) if c.name in CORE]
    assert {c.name for c in cases} == set(CORE)
    baseline = side.probe(patched_builtin)
    results = {}
    for case in cases:
        status, detail = side.send(patched_builtin, case)
        reply = side.probe(patched_builtin)
        results[case.name] = side.Result(
            status, detail[:100], detail, reply is not None, reply == baseline, reply
        )
    assert hostile.check(cases, results) == []
    assert requests.get(patched_builtin.base_url + "/health", timeout=5).status_code == 200

"""Shared helpers for the benchmark scripts: the test model, real servers, results files.

Why reuse ``tests/conftest.py``: the benchmarks must start servers exactly as the end-to-end
tests do (same model builder, CPU flags, environment and process-group teardown), so numbers
and behaviours seen here are the ones the tests check.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
for _path in (REPO / "tests", REPO / "tests" / "e2e"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from conftest import (  # noqa: E402
    CPU_FLAGS,
    MODELS,
    TEST_SERVER_ARGS,
    EmbeddingTable,
    Server,
    build_model,
    run_server,
    server_env,
)

Flavour = Literal["plugin", "builtin", "series"]
# ``series``: vLLM 0.33's built-in with the upstream patch series applied (plugin off), served by
# the 0.33 harness over the patched tree that ``tools/upstream_check.py --apply-only`` builds.
SERIES_SITE = REPO / "build" / "upstream" / "site"
HARNESS_VLLM = REPO / ".venv-vllm033" / "bin" / "vllm"
ACTIVE_LINE = "vllm_chat_embeds"  # the plugin logs "vllm_chat_embeds <version> active: ..."

__all__ = [
    "CPU_FLAGS",
    "TEST_SERVER_ARGS",
    "EmbeddingTable",
    "ManagedServer",
    "RESULTS",
    "Server",
    "build_tiny_model",
    "exit_on_sigterm",
    "results_stem",
    "vllm_cache_root",
    "write_results",
]


def build_tiny_model() -> Path:
    """The tiny test model of the e2e tests (built once, then reused)."""
    return build_model("build_test_model.py", MODELS / "tiny-llama-test")


@contextmanager
def vllm_cache_root() -> Iterator[str]:
    """A throw-away VLLM_CACHE_ROOT, so runs do not share or pollute caches."""
    with tempfile.TemporaryDirectory(prefix="vce-bench-cache-") as root:
        yield root


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks still tear servers down."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@contextmanager
def started_together(managers: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Enter every server context manager of ``managers`` at once (start-ups overlap) and
    yield their servers by name; all are torn down on exit, even if a start-up fails."""
    from concurrent.futures import ThreadPoolExecutor, wait

    with ExitStack() as stack:
        pool = ThreadPoolExecutor(len(managers))
        futures = {name: pool.submit(cm.__enter__) for name, cm in managers.items()}
        try:
            wait(futures.values())
        finally:
            # Even when interrupted: wait for start-ups in flight, then register every server
            # that came up, so the ExitStack tears it down.
            pool.shutdown(wait=True)
            for name, future in futures.items():
                if future.exception() is None:
                    stack.push(managers[name].__exit__)
        yield {name: future.result() for name, future in futures.items()}


class ManagedServer:
    """A ``vllm serve`` of one flavour that can be restarted; always torn down on exit.

    ``plugin``: this plugin active. ``builtin``: vLLM's own implementation (``VLLM_PLUGINS=""``).
    ``series``: the built-in of vLLM 0.33 with the upstream series applied (``SERIES_SITE``).
    All use vLLM's default multiprocess engine and the e2e tests' server arguments.
    """

    def __init__(self, flavour: Flavour, model: Path, cache_root: str) -> None:
        self.flavour = flavour
        self.model = model
        extra = {"PYTHONPATH": str(SERIES_SITE)} if flavour == "series" else None
        self.env = server_env(
            trap=False, plugins=flavour == "plugin", mp=True, cache_root=cache_root, extra=extra
        )
        self.args = list(TEST_SERVER_ARGS)
        self.command: list[str] | None = None
        if flavour == "series":
            self.command = [str(HARNESS_VLLM), "serve", str(model), "--host", "127.0.0.1",
                            "--port", "{port}", *CPU_FLAGS, *self.args]  # fmt: skip
        self.restarts = 0
        self.startup_s: list[float] = []
        self._stack: ExitStack | None = None
        self._server: Server | None = None

    @property
    def server(self) -> Server:
        assert self._server is not None, "server not started"
        return self._server

    def start(self) -> Server:
        stack = ExitStack()
        started = time.monotonic()
        try:
            server = stack.enter_context(
                run_server(self.model, *self.args, env=self.env, command=self.command)
            )
        except BaseException:
            stack.close()
            raise
        self.startup_s.append(round(time.monotonic() - started, 1))
        self._stack, self._server = stack, server
        self._check_flavour(server)
        return server

    def _check_flavour(self, server: Server) -> None:
        active = ACTIVE_LINE in server.log() and "active" in server.log()
        if active != (self.flavour == "plugin"):
            raise RuntimeError(
                f"{self.flavour} server: plugin active={active}, expected the opposite; "
                f"log: {server.log_path}"
            )

    def stop(self) -> None:
        stack, self._stack, self._server = self._stack, None, None
        if stack is not None:
            stack.close()  # run_server stops the whole process group

    def restart(self) -> Server:
        self.stop()
        self.restarts += 1
        return self.start()

    def __enter__(self) -> ManagedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def results_stem(name: str) -> str:
    """``name`` on vLLM 0.32; ``name.vllm-0.33`` on the 0.33 harness (``make bench VLLM=0.33``),
    so runs on both series sit side by side."""
    from vllm_chat_embeds.compat.vllm_api import SUPPORTED_SERIES, layout

    series = layout()
    return name if series == SUPPORTED_SERIES[0] else f"{name}.vllm-{series}"


def write_results(name: str, data: Any) -> Path:
    """Write ``benchmarks/results/<name>.json`` (the directory is git-ignored), tagged with the
    vLLM series when it is not 0.32 (``results_stem``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{results_stem(name)}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path

"""Stand-in for vLLM's ``tests/utils.py`` where it is absent (a wheel ships no tests).

Only what the upstream series' tests use: ``RemoteOpenAIServer`` (a ``vllm serve`` subprocess
on a free local port, waited for on ``/health``, stopped with its process group) with
``url_root``, ``url_for`` and ``get_client``. Written for this harness (tools/upstream_check.py);
in a vLLM checkout the tests use vLLM's own class of the same name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import requests

STARTUP_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RemoteOpenAIServer:
    def __init__(
        self,
        model: str,
        vllm_serve_args: list[str],
        *,
        env_dict: dict[str, str] | None = None,
        max_wait_seconds: float | None = None,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = _free_port()
        env = {**os.environ, **(env_dict or {})}
        self._log = tempfile.NamedTemporaryFile(prefix="upstream-server-", suffix=".log",
                                                delete=False)  # fmt: skip
        vllm = Path(sys.executable).parent / "vllm"
        cmd = [str(vllm), "serve", model, "--host", self.host, "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, *vllm_serve_args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait(max_wait_seconds or STARTUP_TIMEOUT_S)
        except BaseException:
            self._stop()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(self.url_for("health"), timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited early:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not ready in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 40) -> str:
        text = Path(self._log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def __enter__(self) -> RemoteOpenAIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    @property
    def url_root(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_for(self, *parts: str) -> str:
        return self.url_root + "/" + "/".join(parts)

    def get_client(self, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("timeout", 600)
        return openai.OpenAI(
            base_url=self.url_for("v1"), api_key="token-abc123", max_retries=0, **kwargs
        )

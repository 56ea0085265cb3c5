"""Shared harness: locally built models, real ``vllm serve`` subprocesses and a real ``LLM``."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import torch
from redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / ".models"
TOOLS = REPO / "tools"
PY = sys.executable
VLLM = str(Path(PY).parent / "vllm")
TRAP_DIR = Path(__file__).parent / "trap"
FAKE_VERSION_DIR = Path(__file__).parent / "fake_version"

CPU_FLAGS = [
    "--dtype", "float32",
    "--enforce-eager",
    "--max-model-len", "1024",
    "--max-num-seqs", "4",
    "--kv-cache-memory-bytes", str(64 * 1024 * 1024),
]  # fmt: skip
# Loaded machines start servers slowly; CHAT_EMBEDS_TEST_STARTUP_S raises the wait.
STARTUP_TIMEOUT_S = float(os.environ.get("CHAT_EMBEDS_TEST_STARTUP_S", "240"))
# The plugin and built-in servers take request chat templates, to test odd templates.
TEST_SERVER_ARGS = [
    "--enable-prompt-embeds",
    "--trust-request-chat-template",
    "--enable-prompt-tokens-details",
]


def build_model(builder: str, out: Path, *args: str) -> Path:
    subprocess.run([PY, str(TOOLS / builder), "--out", str(out), *args], check=True)
    return out


def build_family(family: str, base: Path, shards: int = 1) -> Path:
    """A tiny random model of ``family`` with ``base``'s tokenizer (tools/build_family_model.py),
    its weights in ``shards`` safetensors files."""
    out = MODELS / (f"family-{family}" + (f"-{shards}shards" if shards > 1 else ""))
    args = ["--family", family, "--base", str(base), "--shards", str(shards)]
    return build_model("build_family_model.py", out, *args)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return build_model("build_test_model.py", MODELS / "tiny-llama-test")


@pytest.fixture(scope="session")
def vllm_cache_root() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="vce-vllm-cache-") as root:
        yield root


# vLLM's TP CPU communicator (``--tensor-parallel-size 2`` on CPU) makes segments named
# ``vllm_dist_<ident>-tp:...-cpushm_<rank>`` and leaves them in /dev/shm when its workers are
# stopped (vLLM's own leak, docs/upstream.md); ``run_server`` removes those its server made.
SHM = Path("/dev/shm")
VLLM_SEGMENT_PREFIXES = (
    "vllm_dist_",
    # A server killed during startup (see run_server) also leaves its engine's message queue
    # (multiprocessing's ``psm_``) and a multiprocessing semaphore (``sem.mp-``) behind.
    "psm_",
    "sem.mp-",
)


def shm_names(*prefixes: str) -> set[str]:
    if not SHM.is_dir():
        return set()
    return {p.name for p in SHM.iterdir() if p.name.startswith(prefixes)}


def shm_names_in_use() -> set[str]:
    """Names in /dev/shm that some process still maps or holds open (others' are unreadable).

    Matched by inode, not by the path a process shows: glibc's ``sem_open`` maps a temporary
    file and only then links it under its name, so a live semaphore's mapping never shows
    its ``sem.*`` name."""
    inodes: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                    inodes.add(int(fields[4]))
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd).startswith("/dev/shm/"):
                    inodes.add(fd.stat().st_ino)
        except OSError:
            continue
    used = set()
    for path in SHM.iterdir() if SHM.is_dir() else ():
        try:
            if path.stat().st_ino in inodes:
                used.add(path.name)
        except OSError:
            continue
    return used


def remove_vllm_segments(since: set[str]) -> None:
    """Unlink vLLM's segments that are not in ``since`` and that no process still maps."""
    for name in shm_names(*VLLM_SEGMENT_PREFIXES) - since - shm_names_in_use():
        (SHM / name).unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    model: str
    extra: dict[str, object] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    @property
    def client(self):  # an openai.OpenAI client bound to this server
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="none", max_retries=0)

    def healthy(self) -> bool:
        try:
            return requests.get(self.base_url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False


def server_env(*, trap: bool, plugins: bool, mp: bool, cache_root: str, extra=None) -> dict:
    env = dict(os.environ)
    env["VLLM_CACHE_ROOT"] = cache_root
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if mp else "0"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.pop("VLLM_PLUGINS", None)
    if not plugins:
        env["VLLM_PLUGINS"] = ""
    paths = [str(TRAP_DIR)] if trap else []
    if trap:
        env["CHAT_EMBEDS_TEST_TRAP"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    env.update(extra or {})
    return env


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def stack_dump(proc: subprocess.Popen[bytes]) -> str:
    """Every Python stack in ``proc``'s process group (py-spy, from the dev extra), to say
    where a server that never became healthy was stuck."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return "(py-spy not installed: no stacks)"
    found = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
    dumps = []
    for pid in found.stdout.split():
        out = subprocess.run(
            [str(spy), "dump", "--pid", pid], capture_output=True, text=True, timeout=30
        )
        dumps.append(f"--- py-spy dump {pid} ---\n{out.stdout}{out.stderr}")
    return "\n".join(dumps)


class StartupStalled(RuntimeError):
    """The server process lived but never answered /health in time."""


@contextmanager
def run_server(
    model: Path | str,
    *args: str,
    env: dict,
    command: list[str] | None = None,
    timeout_s: float = STARTUP_TIMEOUT_S,
    attempts: int = 2,
) -> Iterator[Server]:
    """Start ``vllm serve`` in its own process group, wait for /health, always tear it down.

    A start that stalls (the process alive, /health silent past ``timeout_s``) is logged with
    every process's stack and tried once more: seen once in CI on a loaded machine, a spawned
    engine worker that never printed a line in four minutes. A server that exits is an error
    at once."""
    for attempt in range(1, attempts + 1):
        served = False
        try:
            with _run_server_once(model, args, env, command, timeout_s) as server:
                served = True
                yield server
            return
        except StartupStalled as stalled:
            if served or attempt == attempts:  # a stall inside the body is not this start's
                raise
            print(f"--- startup stalled, starting again ---\n{stalled}", file=sys.stderr)


@contextmanager
def _run_server_once(
    model: Path | str,
    args: tuple[str, ...],
    env: dict,
    command: list[str] | None,
    timeout_s: float,
) -> Iterator[Server]:
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="vce-server-", suffix=".log", delete=False)
    cmd = command or [VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(port)]
    if command is None:
        cmd += [*CPU_FLAGS, *args]
    else:
        cmd = [c.replace("{port}", str(port)) for c in cmd]
    segments = shm_names(*VLLM_SEGMENT_PREFIXES)
    proc = subprocess.Popen(
        cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    server = Server(f"http://127.0.0.1:{port}", proc, Path(log_file.name), str(model))
    try:
        deadline = time.monotonic() + timeout_s
        while not server.healthy():
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{server.tail()}")
            if time.monotonic() > deadline:
                raise StartupStalled(
                    f"vllm serve not healthy after {timeout_s}s:\n{server.tail()}\n"
                    f"{stack_dump(proc)}"
                )
            time.sleep(0.5)
        yield server
    except BaseException:
        print(f"--- server log tail ({server.log_path}) ---\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        stop_process_group(proc)
        remove_vllm_segments(since=segments)


# Every part's rows cross processes through shared memory, however small (tiny test models
# have tiny rows): the servers started with it test parity over that transport.
ALL_ROWS_SHARED = {"CHAT_EMBEDS_SHARED_ABOVE_BYTES": "0"}
# Every part's base64 data (256 characters or more: all of the tests') skips FastAPI's JSON
# parser (entrypoints/big_bodies.py): the servers started with it test parity over that path.
ALL_PARTS_LIFTED = {"CHAT_EMBEDS_LIFT_ABOVE_BYTES": "0"}


@pytest.fixture(scope="session")
def plugin_server(tiny_model: Path, vllm_cache_root: str) -> Iterator[Server]:
    """The plugin, with vLLM's built-in prompt_embeds helpers trapped, multiprocess engine,
    every part's rows sent to the engine core through shared memory (``ALL_ROWS_SHARED``),
    every part's data lifted out of the JSON body (``ALL_PARTS_LIFTED``);
    with the scale-out routes (render, generate, derender) on, for test_scale_out_split.py."""
    env = server_env(
        trap=True,
        plugins=True,
        mp=True,
        cache_root=vllm_cache_root,
        extra={**ALL_ROWS_SHARED, **ALL_PARTS_LIFTED},
    )
    with run_server(tiny_model, *TEST_SERVER_ARGS, "--enable-scale-out", env=env) as server:
        yield server


@pytest.fixture(scope="session")
def builtin_server(tiny_model: Path, vllm_cache_root: str) -> Iterator[Server]:
    """vLLM's built-in implementation (all plugins disabled), for side-by-side tests."""
    env = server_env(trap=False, plugins=False, mp=False, cache_root=vllm_cache_root)
    with run_server(tiny_model, *TEST_SERVER_ARGS, env=env) as server:
        yield server


@pytest.fixture(scope="session")
def flag_off_server(tiny_model: Path, vllm_cache_root: str) -> Iterator[Server]:
    """The plugin installed but --enable-prompt-embeds off: vLLM's ordinary text path."""
    env = server_env(trap=True, plugins=True, mp=False, cache_root=vllm_cache_root)
    with run_server(tiny_model, env=env) as server:
        yield server


LORA_NAMES = ("lora-a", "lora-b")


@pytest.fixture(scope="session")
def lora_adapters(tiny_model: Path) -> dict[str, Path]:
    """Two random PEFT LoRA adapters (q/v projections) of the tiny model, by served name."""
    return {
        name: build_model("build_lora_adapter.py", MODELS / f"tiny-{name}", "--base",
                          str(tiny_model), "--seed", str(seed))
        for seed, name in enumerate(LORA_NAMES)
    }  # fmt: skip


# feature_server keeps this many bytes of parts by uuid, so tests can reach eviction.
REFERENCE_TEST_BYTES = 128 * 1024
LORA_EMBED_NAME = "lora-embed"


@pytest.fixture(scope="session")
def lora_embed_adapter(tiny_model: Path) -> Path:
    """A random PEFT LoRA adapter that also adapts the input embedding (``embed_tokens``)."""
    out = MODELS / f"tiny-{LORA_EMBED_NAME}"
    return build_model("build_lora_adapter.py", out, "--base", str(tiny_model), "--seed", "2",
                       "--embed")  # fmt: skip


@pytest.fixture(scope="session")
def feature_server(
    tiny_model: Path, lora_adapters: dict, lora_embed_adapter: Path, vllm_cache_root: str
):
    """One plugin server carrying the vLLM features parts are combined with: LoRA adapters
    (``lora-a``, ``lora-b`` and the embedding-adapting ``lora-embed``), auto tool choice with
    the hermes parser, prefix caching with prompt-token details, and a small store of parts by
    uuid (``REFERENCE_TEST_BYTES``).

    Why one: each server start costs 20-40 s of the suite's 15-minute budget. Why one LoRA slot
    more than adapters: vLLM's CPU LoRA ops index the slots with the token's adapter index, and
    a token without an adapter (-1) then reads the *last* slot, so base-model requests batched
    with adapter requests get the last slot's adapter applied (vLLM's own bug, plain text too;
    docs/upstream.md). A slot that stays empty keeps base-model answers right.
    """
    modules = [f"{name}={path}" for name, path in lora_adapters.items()]
    modules.append(f"{LORA_EMBED_NAME}={lora_embed_adapter}")
    args = [
        *TEST_SERVER_ARGS,
        "--enable-lora", "--max-lora-rank", "8", "--max-loras", str(len(modules) + 1),
        "--lora-modules", *modules,
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--enable-prefix-caching",
        # JSON without free whitespace: a random model otherwise pads JSON until max_tokens.
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]  # fmt: skip
    extra = {
        "CHAT_EMBEDS_REFERENCE_BYTES": str(REFERENCE_TEST_BYTES),
        "VLLM_ENABLE_RESPONSES_API_STORE": "1",  # previous_response_id over references
        **ALL_ROWS_SHARED,  # LoRA, tools, beams, prefix caching over shared-memory rows
        **ALL_PARTS_LIFTED,
    }
    env = server_env(trap=True, plugins=True, mp=True, cache_root=vllm_cache_root, extra=extra)
    with run_server(tiny_model, *args, env=env) as server:
        yield server


# guarded_server: what its tests need the limits to be.
GUARDED_API_KEY = "secret-key-123"
GUARDED_PART_BYTES = 64 * 1024
GUARDED_STORE_BYTES = 32 * 1024


@pytest.fixture(scope="session")
def guarded_server(tiny_model: Path, vllm_cache_root: str) -> Iterator[Server]:
    """Two API server processes behind ``--api-key``, with small part and store limits: the
    upload routes' guards and limits (test_row_uploads_online.py), and parts by reference
    across API server processes (test_references_scale_out.py). Kept-alive connections
    outlast the tests, so a ``requests.Session`` stays with one process."""
    extra = {
        "CHAT_EMBEDS_MAX_PART_BYTES": str(GUARDED_PART_BYTES),
        "CHAT_EMBEDS_REFERENCE_BYTES": str(GUARDED_STORE_BYTES),
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "600",
    }
    env = server_env(trap=True, plugins=True, mp=True, cache_root=vllm_cache_root, extra=extra)
    args = [*TEST_SERVER_ARGS, "--api-key", GUARDED_API_KEY, "--api-server-count", "2"]
    with run_server(tiny_model, *args, env=env) as server:
        yield server


@pytest.fixture(scope="session")
def redis_store() -> Iterator[RedisServer]:
    """A real Redis server for the shared row store (tests may stop and start it again)."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


def make_offline_llm(tiny_model: Path, vllm_cache_root: str, **extra):
    """A real in-process ``LLM`` with the plugin and the built-in helpers trapped."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CACHE_ROOT", vllm_cache_root)
    spec = importlib.util.spec_from_file_location("vce_trap", TRAP_DIR / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    trap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trap)
    trap.install()
    from vllm import LLM

    return LLM(
        model=str(tiny_model),
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=4,
        kv_cache_memory_bytes=64 * 1024 * 1024,
        enable_prompt_embeds=True,
        **extra,
    )


@pytest.fixture(scope="session")
def offline_llm(tiny_model: Path, vllm_cache_root: str):
    """A real in-process ``LLM`` with the plugin and the built-in helpers trapped."""
    llm = make_offline_llm(tiny_model, vllm_cache_root)
    yield llm
    del llm


# -- payload helpers ---------------------------------------------------------------------------


def tensor_b64(tensor: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class EmbeddingTable:
    """The model's own input embeddings, to turn text into the rows the model would see."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
            self.weight = f.get_tensor(key).float()

    def rows(self, text: str) -> torch.Tensor:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.weight[ids].clone()

    def part(self, text: str) -> dict:
        return {"type": "prompt_embeds", "data": tensor_b64(self.rows(text))}


@pytest.fixture(scope="session")
def table(tiny_model: Path) -> EmbeddingTable:
    return EmbeddingTable(tiny_model)

"""The build protocol both model builders share: idempotent, atomic, and stamped.

Why: a build is skipped when the output already holds a finished build with the same
parameters (a stamp file records them), happens in a temporary folder beside the output and is
renamed into place at the end, so an interrupted build never leaves a half model behind, and a
non-empty folder that is not ours is never touched.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STAMP_NAME = "build_stamp.json"
# What a Hugging Face checkpoint for vLLM needs, besides what a builder adds.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def read_stamp(out: Path, builder: str) -> dict[str, Any] | None:
    """The stamp of a previous build by ``builder``, or None."""
    try:
        stamp = json.loads((out / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("builder") == builder else None


def is_complete(out: Path, builder: str, params: dict[str, Any]) -> bool:
    stamp = read_stamp(out, builder)
    return (
        stamp is not None
        and stamp.get("params") == params
        and all((out / name).is_file() for name in stamp.get("files", []))
    )


def _make_readable(build: Path) -> None:
    """Normal umask permissions; mkdtemp and transformers create private ones."""
    umask = os.umask(0)
    os.umask(umask)
    build.chmod(0o777 & ~umask)
    for path in build.iterdir():
        path.chmod(0o666 & ~umask)


@contextmanager
def _one_build_at_a_time(out: Path) -> Iterator[None]:
    """A lock file beside ``out``: suites running side by side (``make test``) ask for the same
    models, and a second build must not replace the first while a server reads it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_once(
    out: Path,
    *,
    builder: str,
    params: dict[str, Any],
    expected_files: Iterable[str],
    make: Callable[[Path], None],
    check: Callable[[Path], None],
    log: Callable[[str], None],
) -> None:
    """Run ``make(tmp)`` then ``check(tmp)`` and move the result to ``out``, unless up to date
    (checked again once the lock is held: another process may have built it meanwhile)."""
    out = out.resolve()
    if is_complete(out, builder, params):
        log(f"up to date: {out}")
        return
    with _one_build_at_a_time(out):
        if is_complete(out, builder, params):
            log(f"up to date: {out}")
            return
        if out.exists() and any(out.iterdir()) and read_stamp(out, builder) is None:
            raise SystemExit(
                f"{out} exists, is not empty and holds no build stamp; not touching it"
            )
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            make(tmp)
            missing = [name for name in expected_files if not (tmp / name).is_file()]
            if missing:
                raise RuntimeError(f"build is missing {missing}")
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            stamp = {"builder": builder, "params": params, "files": files}
            (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
            check(tmp)
            _make_readable(tmp)
            if out.exists():
                shutil.rmtree(out)  # a stale build of ours (checked above)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"wrote {out} in {time.monotonic() - start:.1f}s")

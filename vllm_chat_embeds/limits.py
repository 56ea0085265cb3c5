"""Operator-tunable limits and policies, read from environment variables.

Why environment variables: the plugin runs inside ``vllm serve`` and ``LLM(...)`` whose argument
parsers it does not own, and environment variables reach every process vLLM spawns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final, Literal

ENV_MAX_PARTS: Final = "CHAT_EMBEDS_MAX_PARTS"
ENV_MAX_ROWS: Final = "CHAT_EMBEDS_MAX_ROWS"
ENV_MAX_PART_BYTES: Final = "CHAT_EMBEDS_MAX_PART_BYTES"
ENV_MAX_REQUEST_BYTES: Final = "CHAT_EMBEDS_MAX_REQUEST_BYTES"
ENV_DROPPED_PARTS: Final = "CHAT_EMBEDS_DROPPED_PARTS"
ENV_ENCODINGS: Final = "CHAT_EMBEDS_ENCODINGS"
ENV_COMPACT: Final = "CHAT_EMBEDS_COMPACT"
ENV_DECODE_POOL_BYTES: Final = "CHAT_EMBEDS_DECODE_POOL_BYTES"
ENV_REFERENCE_BYTES: Final = "CHAT_EMBEDS_REFERENCE_BYTES"
ENV_SHM_BYTES: Final = "CHAT_EMBEDS_SHM_BYTES"
ENV_SHARED_ABOVE_BYTES: Final = "CHAT_EMBEDS_SHARED_ABOVE_BYTES"
ENV_SHM_DIR: Final = "CHAT_EMBEDS_SHM_DIR"
ENV_SHM_REUSE_BYTES: Final = "CHAT_EMBEDS_SHM_REUSE_BYTES"
ENV_LIFT_ABOVE_BYTES: Final = "CHAT_EMBEDS_LIFT_ABOVE_BYTES"
ENV_SHARED_STORE: Final = "CHAT_EMBEDS_SHARED_STORE"
ENV_SHARED_STORE_TIMEOUT: Final = "CHAT_EMBEDS_SHARED_STORE_TIMEOUT"
ENV_SHARED_STORE_TTL: Final = "CHAT_EMBEDS_SHARED_STORE_TTL"
ENV_ROW_DIGEST: Final = "CHAT_EMBEDS_ROW_DIGEST"
ALL_ENCODINGS: Final = ("torch", "raw", "safetensors")
# The rows' content digest (row_digest.py): blake3 as vLLM's multimodal hasher, or sha256 (FIPS).
ROW_DIGESTS: Final = ("blake3", "sha256")

DEFAULT_MAX_PARTS: Final = 64
DEFAULT_MAX_ROWS: Final = 32768
DEFAULT_MAX_PART_BYTES: Final = 256 * 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES: Final = 512 * 1024 * 1024
DEFAULT_DECODE_POOL_BYTES: Final = 256 * 1024 * 1024
DEFAULT_REFERENCE_BYTES: Final = 512 * 1024 * 1024
# Rows this big or bigger cross processes through shared memory (transport/shared_rows.py):
# below it a socket copy costs less than a segment's system calls.
DEFAULT_SHARED_ABOVE_BYTES: Final = 1024 * 1024
DEFAULT_SHM_DIR: Final = "/dev/shm"
# Segments whose rows are gone, kept (mapped, pages in place) for the next rows of about their
# size, up to this many bytes per process: a new 16 MiB segment costs 4-6 ms of page
# allocation, a kept one nothing (transport/shared_rows.py). Room for two segments of 8192
# float16 rows at width 4096 (64 MiB, a little more as a torch.save archive): back-to-back
# parts of one size take turns between two.
DEFAULT_SHM_REUSE_BYTES: Final = 160 * 1024 * 1024
# Part data strings this long or longer skip FastAPI's JSON parser (entrypoints/big_bodies.py).
DEFAULT_LIFT_ABOVE_BYTES: Final = 1024 * 1024

# The shared row store (stores/shared_store.py): how long one of its operations may wait, and
# how long a value it holds lives after its last use (0: until the store evicts it).
DEFAULT_SHARED_STORE_TIMEOUT_S: Final = 2.0
DEFAULT_SHARED_STORE_TTL_S: Final = 24 * 3600
SHARED_STORE_SCHEMES: Final = ("redis", "rediss", "unix")

DroppedPolicy = Literal["error", "warn"]


def _int_env(name: str, default: int, *, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    kind = "positive" if minimum == 1 else "non-negative"
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a {kind} integer, got {raw!r}") from exc
    if value < minimum:
        raise ValueError(f"{name} must be a {kind} integer, got {raw!r}")
    return value


def _optional_int_env(name: str) -> int | None:
    """A non-negative integer, or None when the variable is unset or empty (a default that
    depends on the machine)."""
    if not os.environ.get(name, "").strip():
        return None
    return _int_env(name, 0, minimum=0)


@dataclass(frozen=True)
class Limits:
    max_parts: int = DEFAULT_MAX_PARTS
    max_rows: int = DEFAULT_MAX_ROWS
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    dropped_parts: DroppedPolicy = "error"
    encodings: frozenset[str] = frozenset(ALL_ENCODINGS)
    compact: bool = True  # send embedding rows only (False: dense, as the built-in)
    decode_pool_bytes: int = DEFAULT_DECODE_POOL_BYTES  # reused decode buffers; 0: none
    reference_bytes: int = DEFAULT_REFERENCE_BYTES  # rows kept by uuid (stores/references); 0: off
    # Shared-memory rows (transport/shared_rows.py): the bytes one process may have in
    # segments (None: half of the directory's free space when first used; 0: off), the size
    # from which rows use them, and the directory (a tmpfs).
    shm_bytes: int | None = None
    shared_above_bytes: int = DEFAULT_SHARED_ABOVE_BYTES
    shm_dir: str = DEFAULT_SHM_DIR
    shm_reuse_bytes: int = DEFAULT_SHM_REUSE_BYTES  # segments kept for reuse; 0: none
    lift_above_bytes: int = DEFAULT_LIFT_ABOVE_BYTES
    shared_store: str = ""  # a redis:// URL: rows by uuid and uploads shared by every replica
    shared_store_timeout_s: float = DEFAULT_SHARED_STORE_TIMEOUT_S
    shared_store_ttl_s: int = DEFAULT_SHARED_STORE_TTL_S
    row_digest: str = ROW_DIGESTS[0]

    @classmethod
    def from_env(cls) -> Limits:
        policy = os.environ.get(ENV_DROPPED_PARTS, "error").strip().lower()
        if policy not in ("error", "warn"):
            raise ValueError(f"{ENV_DROPPED_PARTS} must be 'error' or 'warn', got {policy!r}")
        digest = os.environ.get(ENV_ROW_DIGEST, "").strip().lower() or ROW_DIGESTS[0]
        if digest not in ROW_DIGESTS:
            raise ValueError(
                f"{ENV_ROW_DIGEST} must be one of {', '.join(ROW_DIGESTS)}; got {digest!r}"
            )
        return cls(
            max_parts=_int_env(ENV_MAX_PARTS, DEFAULT_MAX_PARTS),
            max_rows=_int_env(ENV_MAX_ROWS, DEFAULT_MAX_ROWS),
            max_part_bytes=_int_env(ENV_MAX_PART_BYTES, DEFAULT_MAX_PART_BYTES),
            max_request_bytes=_int_env(ENV_MAX_REQUEST_BYTES, DEFAULT_MAX_REQUEST_BYTES),
            dropped_parts=policy,  # type: ignore[arg-type]
            encodings=_encodings_env(),
            compact=os.environ.get(ENV_COMPACT, "1").strip().lower() not in ("0", "false", "no"),
            decode_pool_bytes=_int_env(ENV_DECODE_POOL_BYTES, DEFAULT_DECODE_POOL_BYTES, minimum=0),
            reference_bytes=_int_env(ENV_REFERENCE_BYTES, DEFAULT_REFERENCE_BYTES, minimum=0),
            shm_bytes=_optional_int_env(ENV_SHM_BYTES),
            shared_above_bytes=_int_env(
                ENV_SHARED_ABOVE_BYTES, DEFAULT_SHARED_ABOVE_BYTES, minimum=0
            ),
            shm_dir=os.environ.get(ENV_SHM_DIR, "").strip() or DEFAULT_SHM_DIR,
            shm_reuse_bytes=_int_env(ENV_SHM_REUSE_BYTES, DEFAULT_SHM_REUSE_BYTES, minimum=0),
            lift_above_bytes=_int_env(ENV_LIFT_ABOVE_BYTES, DEFAULT_LIFT_ABOVE_BYTES, minimum=0),
            shared_store=_store_url_env(),
            shared_store_timeout_s=_seconds_env(
                ENV_SHARED_STORE_TIMEOUT, DEFAULT_SHARED_STORE_TIMEOUT_S
            ),
            shared_store_ttl_s=_int_env(
                ENV_SHARED_STORE_TTL, DEFAULT_SHARED_STORE_TTL_S, minimum=0
            ),
            row_digest=digest,
        )


def _encodings_env() -> frozenset[str]:
    raw = os.environ.get(ENV_ENCODINGS, "").strip()
    if not raw:
        return frozenset(ALL_ENCODINGS)
    chosen = {e.strip().lower() for e in raw.split(",") if e.strip()}
    unknown = sorted(chosen - set(ALL_ENCODINGS))
    if unknown or not chosen:
        raise ValueError(
            f"{ENV_ENCODINGS} must list some of {', '.join(ALL_ENCODINGS)}; got {raw!r}"
        )
    return frozenset(chosen)


def _store_url_env() -> str:
    url = os.environ.get(ENV_SHARED_STORE, "").strip()
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if url and scheme not in SHARED_STORE_SCHEMES:
        raise ValueError(
            f"{ENV_SHARED_STORE} must be a redis://, rediss:// or unix:// URL; got one starting "
            f"{url[:12]!r}"
        )
    return url


def _seconds_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 600:
        raise ValueError(f"{name} must be a number of seconds in (0, 600], got {raw!r}")
    return value

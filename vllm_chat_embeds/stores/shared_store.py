"""Rows kept once for the whole deployment: the tier under each process's reference store.

Why: a process keeps rows by uuid and uploads in its own memory (``references.py``), so a
replica behind a load balancer, another ``--api-server-count`` process, a render server of the
scale-out split or the decode server of a prefill/decode pair knew nothing of an id another one
had taken. With ``CHAT_EMBEDS_SHARED_STORE=redis://host:6379/0`` every row kept by uuid and
every upload is also written to a Redis-protocol server, and a process that does not hold an id
reads it from there once, then holds it as if it had been sent to it.

Layout, one Redis hash per id (``<prefix>:r:<id>``): ``meta`` (small JSON: format, dtype, shape,
the rows' digest and its name, the upload's file fields) and ``rows`` (the row-major little-
endian bytes as kept, no base64, no pickle: a pickle read back would run code). A hash rather
than one string: both fields are written by one ``HSET`` whose rows argument is a view of the
kept tensor, sent as is (no concatenated copy), and read by one ``HMGET``; a process that holds
the rows reads ``meta`` alone. Uploads are also listed in a sorted set (``<prefix>:files``) for
``GET /v1/files``. ``<prefix>`` is ``vce:<digest>`` of the served model names, the hidden size
and the ``--api-key`` realm, so ids never resolve in another model's or another realm's
deployment.

Nothing read back is trusted: a value is checked as an upload is (dtype, shape, limits,
finite values) and against its digest (``row_digest.py``) before anything uses it; a failing
one is logged and answered with a 400 that asks for the data again, never served.

The store is the authority while it answers: a process confirms a uuid it holds against the
store's digest (one small read, pipelined with the others of the request), so a uuid sent again
with other rows, or a deleted upload, is never served from an old local copy. When it does not
answer within ``CHAT_EMBEDS_SHARED_STORE_TIMEOUT``, rows held locally keep serving, a request
that needs the store gets a 503 with a retry hint, and for ``RETRY_AFTER_S`` no request waits on
it again; the next one after that tries, and recovery needs nothing else.

Client: redis-py (with hiredis when installed), the client the vLLM ecosystem runs beside its
routers and KV caches: URLs with auth, TLS (``rediss://``) and unix sockets, a thread-safe
connection pool (renderers resolve parts in executor threads), pipelines (one round trip for
every part of a request), and binary values sent from a ``memoryview`` without a copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import torch
from vllm.exceptions import GracefulHTTPError

from .. import errors
from ..limits import ENV_ROW_DIGEST, ENV_SHARED_STORE, Limits
from ..log import logger
from ..payload import PayloadSpec, carried_dtype, validate_tensor
from ..row_digest import digest_name, rows_digest
from . import references

T = TypeVar("T")

# 2: the digest is named (``digest``, ``digest_name``); 1 held a SHA-256 under ``sha256``.
FORMAT: Final = 2
# After a fault, requests that need the store are answered 503 at once for this long.
RETRY_AFTER_S: Final = 3.0
_DTYPES: Final = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The most of meta a process reads (a file's name is cut to fit well under it).
_META_LIMIT: Final = 8192
_FILENAME_LIMIT: Final = 1024


class StoreUnavailable(Exception):
    """The store did not answer (or is in its back-off window after a fault)."""


@dataclass(frozen=True)
class FileFields:
    """What the Files API says of an upload, kept beside its rows."""

    filename: str
    purpose: str
    bytes: int
    created_at: int


@dataclass(frozen=True)
class Found:
    """A value read back: its meta, and its rows when they were asked for."""

    meta: dict[str, Any]
    rows: bytes | None


def display(url: str) -> str:
    """The store's address without credentials (for messages and logs)."""
    parts = urlsplit(url)
    host = parts.hostname or parts.path or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path if parts.hostname else ''}"


def _realm_of(api_key: object) -> str:
    """A digest of the ``--api-key`` value(s) (never the key itself), '' without one."""
    if not api_key:
        return ""
    keys = sorted(api_key) if isinstance(api_key, list | tuple) else [str(api_key)]
    return hashlib.sha256("\0".join(keys).encode()).hexdigest()


class SharedStore:
    """One process's client of the deployment's row store."""

    def __init__(self, url: str, *, timeout_s: float, ttl_s: int, client: Any = None) -> None:
        self.url = url
        self.where = display(url)
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._client = client if client is not None else _connect(url, timeout_s)
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._prefix = "vce:unset"

    # -- identity ---------------------------------------------------------------------------

    def bind(self, served_names: Sequence[str], width: int, realm: str) -> None:
        """Namespace keys by model and realm (renderer construction; the app sets the realm)."""
        ident = json.dumps([sorted(served_names), width, realm]).encode()
        self._prefix = "vce:" + hashlib.sha256(ident).hexdigest()[:24]

    def key(self, ident: str) -> str:
        return f"{self._prefix}:r:{ident}"

    @property
    def files_key(self) -> str:
        return f"{self._prefix}:files"

    # -- faults -----------------------------------------------------------------------------

    def retry_after(self) -> int:
        """Seconds until the store is tried again (0: it is not in its back-off window)."""
        left = self._down_until - time.monotonic()
        return max(1, math.ceil(left)) if left > 0 else 0

    def _call(self, action: Callable[[], T]) -> T:
        if self.retry_after():
            raise StoreUnavailable("it failed moments ago")
        try:
            return action()
        except Exception as exc:  # redis errors, timeouts, closed sockets: all one fault
            if not _is_store_error(exc):
                raise
            with self._lock:
                first = self._down_until < time.monotonic()
                self._down_until = time.monotonic() + RETRY_AFTER_S
            if first:
                logger.warning(
                    "vllm-chat-embeds: shared row store %s unavailable (%s: %s); rows held "
                    "locally keep serving, requests needing the store get 503 for %.0f s",
                    self.where, type(exc).__name__, exc, RETRY_AFTER_S,
                )  # fmt: skip
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def unavailable(self, message: str, **fields: object) -> GracefulHTTPError:
        """The 503 a request gets when it needs the store and the store is down."""
        text = message.format(store=self.where, retry_after=self.retry_after() or 1, **fields)
        return GracefulHTTPError(text, HTTPStatus.SERVICE_UNAVAILABLE)

    # -- operations -------------------------------------------------------------------------

    def write(
        self, ident: str, rows: torch.Tensor, digest: str, file: FileFields | None = None
    ) -> None:
        """Keep ``rows`` (contiguous, as kept locally) under ``ident``, replacing its value."""
        meta: dict[str, Any] = {
            "format": FORMAT,
            "dtype": str(rows.dtype).removeprefix("torch."),
            "shape": [int(n) for n in rows.shape],
            "digest": digest,
            "digest_name": digest_name(),
        }
        if file is not None:
            name = file.filename[:_FILENAME_LIMIT]
            meta["file"] = {**file.__dict__, "filename": name}
        data = memoryview(rows.reshape(-1).view(torch.uint8).numpy())
        key = self.key(ident)

        def run() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(key)
            pipe.hset(key, mapping={"meta": json.dumps(meta).encode(), "rows": data})
            if self.ttl_s:
                pipe.expire(key, self.ttl_s)
            if file is not None:
                pipe.zadd(self.files_key, {ident: file.created_at})
            pipe.execute()

        self._call(run)

    def read(self, wanted: Mapping[str, bool]) -> dict[str, Found | None]:
        """One round trip for several ids: each id's meta, and its rows where ``wanted[id]``
        (a process that holds the rows asks for meta alone). None: the store holds no id."""
        idents = list(wanted)

        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for ident in idents:
                key = self.key(ident)
                if wanted[ident]:
                    pipe.hmget(key, ["meta", "rows"])
                else:
                    pipe.hmget(key, ["meta"])
                if self.ttl_s:
                    pipe.expire(key, self.ttl_s)  # a use keeps the value alive
            return list(pipe.execute())

        replies = self._call(run)
        step = 2 if self.ttl_s else 1
        out: dict[str, Found | None] = {}
        for ident, reply in zip(idents, replies[::step], strict=True):
            meta_raw = reply[0]
            if meta_raw is None:
                out[ident] = None
                continue
            out[ident] = Found(_parse_meta(meta_raw), reply[1] if len(reply) > 1 else None)
        return out

    def file_fields(self, ident: str) -> FileFields | None:
        """The Files API fields of an upload the store holds, or None."""
        found = self.read({ident: False}).get(ident)
        return None if found is None else _file_fields(found.meta)

    def delete(self, ident: str) -> bool:
        """Forget ``ident`` for every process; whether the store held it."""

        def run() -> bool:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self.key(ident))
            pipe.zrem(self.files_key, ident)
            removed, _ = pipe.execute()
            return bool(removed)

        return self._call(run)

    def files(self) -> list[tuple[str, FileFields]]:
        """Uploads the store still holds, oldest first (ids it lost are dropped from the list)."""

        def run() -> tuple[list[Any], list[Any]]:
            ids = [i.decode() if isinstance(i, bytes) else i for i in self._client.zrange(
                self.files_key, 0, -1)]  # fmt: skip
            pipe = self._client.pipeline(transaction=False)
            for ident in ids:
                pipe.hget(self.key(ident), "meta")
            metas = list(pipe.execute()) if ids else []
            gone = [i for i, m in zip(ids, metas, strict=True) if m is None]
            if gone:
                self._client.zrem(self.files_key, *gone)
            return ids, metas

        ids, metas = self._call(run)
        listed = []
        for ident, raw in zip(ids, metas, strict=True):
            if raw is None:
                continue
            fields = _file_fields(_parse_meta(raw))
            if fields is not None:
                listed.append((ident, fields))
        return listed

    def ping(self) -> None:
        self._call(self._client.ping)


def _connect(url: str, timeout_s: float) -> Any:
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError as exc:
        raise RuntimeError(errors.SHARED_STORE_NO_CLIENT.format(env=ENV_SHARED_STORE)) from exc
    # One immediate retry: a pooled connection the store closed (a restart) fails once, and a
    # fresh one then succeeds; anything longer is the breaker's job, not a wait in a request.
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
    )


def _is_store_error(exc: Exception) -> bool:
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - a test double's own errors
        return isinstance(exc, ConnectionError | TimeoutError | OSError)
    return isinstance(exc, RedisError | ConnectionError | TimeoutError | OSError)


def _parse_meta(raw: object) -> dict[str, Any]:
    """Meta as a dict; anything else as a dict the checks refuse (``format`` missing)."""
    if not isinstance(raw, bytes | str) or len(raw) > _META_LIMIT:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _file_fields(meta: Mapping[str, Any]) -> FileFields | None:
    file = meta.get("file")
    if not isinstance(file, dict):
        return None
    try:
        return FileFields(
            str(file["filename"]), str(file["purpose"]), int(file["bytes"]),
            int(file["created_at"]),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return None


class BadValue(Exception):
    """A value read back failed its checks (the reason is the message)."""


def rows_of(found: Found, spec: PayloadSpec, where: str) -> tuple[torch.Tensor, str]:
    """The rows of a value read back, checked as an upload's are, and their digest.

    Raises ``BadValue`` for anything a value written by this plugin could not be; the part's
    own limits (rows left in the request) answer with the part's usual messages.
    """
    meta = found.meta
    if meta.get("format") != FORMAT:
        raise BadValue("unknown format")
    dtype = _DTYPES.get(str(meta.get("dtype")))
    if dtype is None or carried_dtype(dtype, spec.dtype) != dtype:
        raise BadValue(f"dtype {meta.get('dtype')!r} is not one this model's rows are kept in")
    shape = meta.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(type(n) is int and n > 0 for n in shape)
        or shape[1] != spec.width
    ):
        raise BadValue(f"shape {shape!r} is not [rows, {spec.width}]")
    if meta.get("digest_name") != digest_name():
        raise BadValue(
            f"written with digest {meta.get('digest_name')!r}, this process keys rows by "
            f"{digest_name()!r} ({ENV_ROW_DIGEST})"
        )
    digest = meta.get("digest")
    if not isinstance(digest, str) or len(digest) != 64:
        raise BadValue("no digest")
    data = found.rows
    if not isinstance(data, bytes) or len(data) != shape[0] * shape[1] * dtype.itemsize:
        raise BadValue(f"{len(data or b'')} bytes of rows for shape {shape} in {dtype}")
    if shape[0] > spec.max_rows:
        errors.reject(errors.TOO_MANY_ROWS, where=where, limit=spec.rows_limit)
    with warnings.catch_warnings():  # read-only bytes: the rows are only read, then copied
        warnings.simplefilter("ignore", UserWarning)
        rows = torch.frombuffer(data, dtype=dtype).view(shape[0], shape[1])
    try:
        rows = validate_tensor(rows, where, spec, pooled=False)
    except Exception as exc:  # NaN/Inf and the like: corrupted, whatever the message says
        raise BadValue(str(exc)) from exc
    got = rows_digest(rows)
    if got != digest:
        raise BadValue("the rows do not match their digest")
    return rows, got


# -- this process's store --------------------------------------------------------------------

_store: SharedStore | None = None
_configured = False
_realm: str | None = None  # None: not told by the app (offline): VLLM_API_KEY's, if any
_model: tuple[tuple[str, ...], int] | None = None
_lock = threading.Lock()


def active() -> SharedStore | None:
    """This process's store, or None when ``CHAT_EMBEDS_SHARED_STORE`` is unset."""
    global _store, _configured
    if _configured:
        return _store
    with _lock:
        if not _configured:
            limits = Limits.from_env()
            url = limits.shared_store
            _store = (
                SharedStore(
                    url, timeout_s=limits.shared_store_timeout_s, ttl_s=limits.shared_store_ttl_s
                )
                if url
                else None
            )
            _configured = True
            _rebind()
    return _store


def _rebind() -> None:
    if _store is not None and _model is not None:
        realm = _realm if _realm is not None else _realm_of(os.environ.get("VLLM_API_KEY"))
        _store.bind(_model[0], _model[1], realm)


def set_realm(api_key: object) -> None:
    """The ``--api-key`` realm of this API server (the app patch, before any request); vLLM
    falls back to ``VLLM_API_KEY`` as its own check does."""
    global _realm
    with _lock:
        _realm = _realm_of(api_key or os.environ.get("VLLM_API_KEY"))
        _rebind()


def bind_model(model_config: Any) -> None:
    """The served model this process renders for (each renderer's construction); checks the
    settings and says where the store is, once."""
    global _model
    served = getattr(model_config, "served_model_name", None) or model_config.model
    names = tuple(served) if isinstance(served, list | tuple) else (str(served),)
    store = active()
    with _lock:
        first = _model is None
        _model = (names, int(model_config.get_hidden_size()))
        _rebind()
    if store is not None and first:
        try:
            store.ping()
            state = "reachable"
        except StoreUnavailable as exc:
            state = f"not reachable yet ({exc})"
        logger.info(
            "vllm-chat-embeds: rows kept by uuid and uploads are shared through %s (%s; "
            "TTL %s; timeout %.1f s)",
            store.where, state, f"{store.ttl_s} s" if store.ttl_s else "none", store.timeout_s,
        )  # fmt: skip


def reset(store: SharedStore | None = None) -> None:
    """Use ``store`` as bound by the caller (tests), or read the settings again on next use
    (None)."""
    global _store, _configured
    with _lock:
        _store, _configured = store, store is not None


# -- the tiers together: what callers use ----------------------------------------------------


def keep_through(uuid: str, kept: torch.Tensor, previous_digest: str | None) -> None:
    """Write rows just kept locally under a part's uuid through to the store (a part sent with
    its data). The request has its rows either way: a fault is logged, not raised."""
    store = active()
    if store is None:
        return
    digest = references.kept_rows_digest(kept) or rows_digest(kept)
    try:
        if previous_digest == digest:  # sent again as it was: write only if the store lost it
            found = store.read({uuid: False}).get(uuid)
            if found is not None and found.meta.get("digest") == digest:
                return
        store.write(uuid, kept, digest)
    except StoreUnavailable:
        pass  # logged by the store; other replicas answer "send the data again"


def resolve(
    uuids: Mapping[str, str], spec: PayloadSpec, local: references.ReferenceStore
) -> dict[str, torch.Tensor | None]:
    """Rows for each uuid (``uuids``: uuid -> where the first part naming it sits): held
    locally and confirmed by the store, or read from it; None where nobody holds them."""
    held = {uuid: local.get(uuid) for uuid in uuids}
    store = active()
    if store is None or not uuids:
        return held
    digests = {
        u: references.kept_rows_digest(r) if r is not None else None for u, r in held.items()
    }
    try:
        found = store.read({u: digests[u] is None for u in uuids})
        changed = [u for u, f in found.items() if f is not None and digests[u] is not None
                   and f.meta.get("digest") != digests[u]]  # fmt: skip
        if changed:
            found.update(store.read({u: True for u in changed}))
    except StoreUnavailable as exc:
        missing = [u for u, rows in held.items() if rows is None]
        if missing:
            raise store.unavailable(
                errors.SHARED_STORE_DOWN, where=uuids[missing[0]], uuid=missing[0], reason=exc
            ) from exc
        return held  # every row held here: served as before the fault
    out: dict[str, torch.Tensor | None] = {}
    for uuid, where in uuids.items():
        value = found.get(uuid)
        if value is None:  # deleted, expired or evicted for the deployment: not here either
            if held[uuid] is not None:
                local.remove(uuid)
            out[uuid] = None
        elif value.rows is None:  # confirmed: the rows held here are the store's
            out[uuid] = held[uuid]
        else:
            out[uuid] = _take(uuid, value, spec, where, local, store)
    return out


def _take(
    uuid: str,
    value: Found,
    spec: PayloadSpec,
    where: str,
    local: references.ReferenceStore,
    store: SharedStore,
) -> torch.Tensor:
    try:
        rows, digest = rows_of(value, spec, where)
    except BadValue as exc:
        local.remove(uuid)
        logger.warning(
            "vllm-chat-embeds: refused the value of %s in the shared row store %s: %s",
            store.key(uuid), store.where, exc,
        )  # fmt: skip
        errors.reject(errors.SHARED_VALUE_BAD, where=where, uuid=uuid, reason=exc)
    return local.put(uuid, rows, digest=digest)


def exists(ident: str) -> bool:
    """Whether the store holds ``ident`` (True when it cannot say: the caller then resolves it
    as rows, and that answers 503 with a retry hint)."""
    store = active()
    if store is None:
        return False
    try:
        return store.read({ident: False}).get(ident) is not None
    except StoreUnavailable:
        return True

"""Parts sent once and referred to by a client-chosen ``uuid`` afterwards.

Why: chat clients resend the whole history every turn, so a large part sent in turn 1 would
cost its upload, JSON parsing, base64 and tensor decoding and validation again on every later
turn. A part that carries a ``uuid`` and its ``data`` leaves its decoded, validated rows here;
a later part with the same ``uuid`` and no ``data`` gets those rows back without any of that.

Why it is safe to trust client uuids: nothing downstream is keyed by the uuid. The engine keys
prefix-cache blocks by the rows' content: over kept rows by the digest computed once when they
were kept (``kept_rows_digest``, see ``patches/v1_core_kv_cache_utils.py``), beside images by
their multimodal hash (``content_hash``). So two uuids holding the same rows share cache
entries, one uuid re-sent with other rows gets other answers, and a reference costs no rehash.
What the uuid gives is access: any client that knows a uuid can use its rows, so uuids should
be random.

One store per process that renders chats (each API server, or the ``LLM`` process), bounded by
``CHAT_EMBEDS_REFERENCE_BYTES`` (least recently used out first, ``0``: off). Thread-safe: the
async renderer decodes parts in an executor thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from ..limits import Limits
from ..row_digest import rows_digest
from ..transport import shared_rows

# A uuid longer than this is refused: it is a name, not a payload.
MAX_UUID_CHARS: Final = 256
_HASHES_ATTR: Final = "_vllm_chat_embeds_content_hashes"
_DIGEST_KEY: Final = "rows"  # row_digest.rows_digest, beside other content hashes


def _own_rows(rows: torch.Tensor, owned: bool = False, digest: str | None = None) -> torch.Tensor:
    """A copy of ``rows`` that only the store holds (``owned``: ``rows`` already is one).

    Why copy: the decoded rows may sit in a reused decode buffer (``decode_buffers``), which
    must stay free to reuse, or be a client's own tensor (offline), which it may change
    afterwards; and the store's byte count is then exactly what it keeps alive. Uploaded rows
    (``entrypoints/row_uploads.py``) and rows decoded into a shared-memory segment of their
    own skip it. A copy goes to shared memory when it can, so kept rows are held once per
    machine (``transport/shared_rows.py``).
    """
    rows = rows.detach()
    if owned or (rows.is_contiguous() and shared_rows.is_shared(rows)):
        kept = rows  # a segment of its own: never reused, never a client's
    else:
        kept = shared_rows.empty(tuple(rows.shape), rows.dtype)  # type: ignore[arg-type]
        if kept is None:
            kept = torch.empty(rows.shape, dtype=rows.dtype)
        kept.copy_(rows)
    # Content hashes of these rows, computed once (``digest``: already known for these rows).
    setattr(kept, _HASHES_ATTR, {} if digest is None else {_DIGEST_KEY: digest})
    kept_rows_digest(kept)  # here, off the event loop (the async renderer's executor)
    return kept


def kept_rows_digest(rows: torch.Tensor) -> str | None:
    """The digest (``row_digest.py``) of rows the store keeps (of their dtype, shape and
    bytes), computed once; None for any other rows. The engine keys prefix-cache blocks over
    kept rows by it."""
    if getattr(rows, _HASHES_ATTR, None) is None:
        return None
    return content_hash(rows, _DIGEST_KEY, rows_digest)


@dataclass
class ReferenceStore:
    """Decoded rows by uuid, at most ``capacity`` bytes of them (LRU out first)."""

    capacity: int
    _rows: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict)
    _held: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def put(
        self, uuid: str, rows: torch.Tensor, *, owned: bool = False, digest: str | None = None
    ) -> torch.Tensor:
        """Keep ``rows`` under ``uuid``, replacing what it held; return the rows as kept.

        Rows larger than the whole store are not kept, and the uuid's old rows are forgotten
        even then: a later reference must never get rows other than the last ones sent.
        ``owned``: ``rows`` are a contiguous tensor nobody else holds, kept without a copy.
        ``digest``: their ``rows_digest``, when the caller has just checked it.
        """
        nbytes = rows.numel() * rows.element_size()
        if nbytes > self.capacity:  # also when the store is off (capacity 0)
            with self._lock:
                self._forget(uuid)
            return rows
        # The old rows stay readable while the new ones are copied: a concurrent request
        # naming the uuid gets the old rows (it came first) instead of a miss.
        # Copied outside the lock: other requests go on meanwhile.
        kept = _own_rows(rows, owned, digest)
        with self._lock:
            self._forget(uuid)  # a concurrent put of the same uuid: the last one wins
            while self._held + nbytes > self.capacity:
                self._forget(next(iter(self._rows)))
            self._rows[uuid] = kept
            self._held += nbytes
        return kept

    def get(self, uuid: str) -> torch.Tensor | None:
        """The rows kept under ``uuid`` (now the most recently used), or None."""
        with self._lock:
            rows = self._rows.get(uuid)
            if rows is not None:
                self._rows.move_to_end(uuid)
            return rows

    def peek(self, uuid: str) -> torch.Tensor | None:
        """The rows kept under ``uuid``, without counting it as a use (listings)."""
        with self._lock:
            return self._rows.get(uuid)

    def remove(self, uuid: str) -> bool:
        """Forget the rows kept under ``uuid``; whether there were any."""
        with self._lock:
            held = uuid in self._rows
            self._forget(uuid)
            return held

    def _forget(self, uuid: str) -> None:
        rows = self._rows.pop(uuid, None)
        if rows is not None:
            self._held -= rows.numel() * rows.element_size()

    def held_bytes(self) -> int:
        with self._lock:
            return self._held

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)


_store: ReferenceStore | None = None
_store_lock = threading.Lock()
_sharing = 1  # processes that each keep a store under the one bound (share_among)


def share_among(processes: int) -> None:
    """Size this process's store as its share of ``CHAT_EMBEDS_REFERENCE_BYTES`` among
    ``processes`` API servers (``--api-server-count``). Why: each keeps a store of its own, and
    the engine core and workers map the same shared rows, so the shares bound the machine's
    total."""
    global _sharing, _store
    with _store_lock:
        _sharing = max(1, processes)
        _store = None  # made again on first use, at the new size


def process_bytes() -> int:
    """What this process's store (and, beside the engine, its kept rows) may hold."""
    return Limits.from_env().reference_bytes // _sharing


def process_store() -> ReferenceStore:
    """This process's store, sized by ``process_bytes()`` on first use."""
    global _store
    with _store_lock:
        if _store is None:
            _store = ReferenceStore(process_bytes())
        return _store


def configure(capacity: int) -> ReferenceStore:
    """Replace this process's store by an empty one of ``capacity`` bytes (tests, benchmarks)."""
    global _store
    with _store_lock:
        _store = ReferenceStore(capacity)
        return _store


def content_hash(rows: torch.Tensor, key: str, compute: Any) -> str:
    """``compute(rows)``, computed once per rows object and kept beside it under ``key``.

    Why on the object: rows the store hands out are the same tensor object every time and
    never change, so a reference pays for hashing its rows once. Any other rows (sent with
    ``data``) are hashed on every call. The hash is of the content, never of a uuid.
    """
    hashes: dict[str, str] | None = getattr(rows, _HASHES_ATTR, None)
    if hashes is None:
        return compute(rows)
    if key not in hashes:
        hashes[key] = compute(rows)
    return hashes[key]

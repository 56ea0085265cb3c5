"""Rows uploaded as bytes, kept by reference under an id the server picks (the one
implementation behind ``POST /v1/prompt_embeds`` and ``POST /v1/files``,
``entrypoints/row_uploads.py``).

Why: a big part sent inline costs base64 (a third more bytes), JSON parsing of the whole body
and a decode into a buffer before any check. Here the body streams straight into the one tensor
the rows end up in: its layout (dtype and shape, from the request or a safetensors header) is
checked first with the very checks and messages of an inline part (``payload.py``), the tensor
is allocated once (``allocate_rows``, the one place that decides where rows live), filled chunk
by chunk, validated as a part is (``payload.validate_tensor``: width, rows, NaN/Inf, the model
dtype) and kept in the reference store parts by ``uuid`` use (``stores/references.py``) without
a further copy. A refused upload keeps nothing. The id is usable as a part's ``uuid`` and as a
``file`` part's ``file_id``.

Per process, like the reference store: with several API server processes (or replicas) an
upload is held by the process that took it, and a chat reaching another one gets the usual
``prompt_embeds_reference_unknown`` 400, unless they share a row store
(``CHAT_EMBEDS_SHARED_STORE``, ``shared_store.py``): then every upload is written there before
its id is handed out, and the Files API lists, reads and deletes the deployment's uploads.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import torch

from .. import errors
from ..errors import reject
from ..payload import (
    MAX_SAFETENSORS_HEADER,
    PayloadSpec,
    RowsLayout,
    check_safetensors_body,
    little_endian,
    raw_layout,
    safetensors_header_length,
    safetensors_layout,
    validate_tensor,
)
from ..transport import shared_rows
from . import references, shared_store

# Ids of uploaded rows; a file part's ``file_id`` with this prefix is always taken for rows.
UPLOAD_ID_PREFIX: Final = "file-pe-"
# Bytes allowed over the part limit for a safetensors file's header (as base64 slack inline).
_FILE_SLACK: Final = 4

Kind = Literal["raw", "safetensors"]
T = TypeVar("T")


def new_upload_id() -> str:
    """A fresh, unguessable id (any client that knows it can use the rows)."""
    return UPLOAD_ID_PREFIX + secrets.token_hex(16)


def allocate_rows(layout: RowsLayout) -> torch.Tensor:
    """The one allocation of an upload: an uninitialised tensor the body is read into.

    Kept in one function so where rows live is decided in one place: shared memory when it
    can hold them (they then cross processes as a handle, ``transport/shared_rows.py``), else
    process memory.
    """
    shape = (layout.rows, layout.width)
    shared = shared_rows.empty(shape, layout.dtype)
    return shared if shared is not None else torch.empty(shape, dtype=layout.dtype)


def _bytes_of(rows: torch.Tensor) -> memoryview:
    return memoryview(rows.view(-1).view(torch.uint8).numpy())


# Lends a buffer to the HTTP server for the rest of a body, which the server then writes into
# as it arrives (``entrypoints/body_sink.py``): returns the sink filling it, or None.
Lend = Callable[[memoryview], Any]


class BodyReader:
    """Reads an async stream of byte chunks exactly: a few bytes at a time (headers), or
    straight into a buffer (the rows), never holding more than one chunk of its own.

    With ``lend``, the rows' buffer (``readinto(..., lent=True)``) is lent to the server once
    nothing is pending, and the server writes the body into it itself (no chunk queued,
    copied and handed over for it); whatever does not fit then arrives as chunks, as without.
    """

    def __init__(self, chunks: AsyncIterator[bytes], lend: Lend | None = None) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")
        self._lend = lend
        self.received = 0

    async def _refill(self) -> bool:
        while not self._pending:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                return False
            self._pending = memoryview(chunk)
            self.received += len(chunk)
        return True

    async def readinto(self, view: memoryview, *, lent: bool = False) -> int:
        """Fill ``view``; fewer bytes only at the end of the stream. ``lent``: the server may
        write into ``view`` itself (the rows: the rest of the body is meant for them)."""
        filled = 0
        while filled < len(view):
            if lent and not self._pending and self._lend is not None:
                filled += await self._sunk(view[filled:])
                continue
            if not await self._refill():
                break
            take = self._pending[: len(view) - filled]
            view[filled : filled + len(take)] = take
            filled += len(take)
            self._pending = self._pending[len(take) :]
        return filled

    async def _sunk(self, view: memoryview) -> int:
        """How many bytes the server wrote straight into ``view`` (lent once per body)."""
        lend, self._lend = self._lend, None
        sink = lend(view) if lend is not None else None
        if sink is None:
            return 0
        try:
            await self._refill()  # back at the body's end, or with what did not fit
        finally:
            got = int(sink.got)
            sink.close()
        self.received += got
        return got

    async def read(self, n: int) -> bytes:
        out = bytearray(n)
        return bytes(out[: await self.readinto(memoryview(out))])

    async def skip(self, limit: int) -> int:
        """Count (and drop) what is left, up to about ``limit`` bytes."""
        left = len(self._pending)
        self._pending = memoryview(b"")
        while left <= limit and await self._refill():
            left += len(self._pending)
            self._pending = memoryview(b"")
        return left


async def _receive_raw(
    reader: BodyReader,
    spec: PayloadSpec,
    where: str,
    size: int | None,
    dtype: object,
    shape: object,
) -> tuple[torch.Tensor, int]:
    layout = raw_layout(where, spec, dtype, shape)

    def wrong_length(got: int) -> None:
        reject(
            errors.RAW_BODY_LENGTH,
            where=where,
            got=got,
            shape=[layout.rows, layout.width],
            dtype=dtype,
            nbytes=layout.nbytes,
        )

    if size is not None and size != layout.nbytes:
        wrong_length(size)
    _check_room(layout.nbytes, where)
    rows = allocate_rows(layout)
    filled = await reader.readinto(_bytes_of(rows), lent=True)
    if filled == 0:
        reject(errors.DATA_EMPTY, where=where)
    extra = await reader.skip(spec.max_part_bytes)
    if filled + extra != layout.nbytes:
        wrong_length(filled + extra)
    return rows, layout.nbytes


async def _receive_safetensors(
    reader: BodyReader, spec: PayloadSpec, where: str, size: int | None
) -> tuple[torch.Tensor, int]:
    limit = spec.max_part_bytes + _FILE_SLACK
    if size is not None and size > limit:
        reject(errors.TOO_MANY_BYTES, where=where, size=size, limit=spec.max_part_bytes)
    prefix = await reader.read(8)
    if not prefix:
        reject(errors.DATA_EMPTY, where=where)
    # Unknown size (a chunked body): the header must merely fit the header limit; a header
    # running past the end of the body is found when it is read.
    header_len = safetensors_header_length(
        prefix, len(prefix) if len(prefix) < 8 else (size or 8 + MAX_SAFETENSORS_HEADER), where
    )
    header = await reader.read(header_len)
    if len(header) < header_len:
        reason = f"header length {header_len} does not fit"
        reject(errors.SAFETENSORS_BAD, where=where, reason=reason)
    layout = safetensors_layout(header, where, spec)
    total = 8 + header_len + layout.nbytes
    if total > limit:
        reject(errors.TOO_MANY_BYTES, where=where, size=total, limit=spec.max_part_bytes)
    if size is not None:
        check_safetensors_body(size - 8 - header_len, layout, where)
    _check_room(layout.nbytes, where)
    rows = allocate_rows(layout)
    filled = await reader.readinto(_bytes_of(rows), lent=True)
    extra = await reader.skip(spec.max_part_bytes)
    check_safetensors_body(filled + extra, layout, where)
    return rows, total


def _check_room(nbytes: int, where: str) -> None:
    """Refuse before reading rows the store could not keep."""
    store = references.process_store()
    if not store.enabled:
        reject(errors.UPLOAD_REFERENCES_OFF, where=where)
    if nbytes > store.capacity:
        reject(errors.UPLOAD_OVER_STORE, where=where, size=nbytes, limit=store.capacity)


async def receive_rows(
    chunks: AsyncIterator[bytes],
    kind: Kind,
    spec: PayloadSpec,
    where: str,
    *,
    size: int | None = None,
    dtype: object = None,
    shape: object = None,
    lend: Lend | None = None,
) -> tuple[torch.Tensor, int]:
    """Read a body of rows (``raw`` with ``dtype`` and ``shape``, or one ``safetensors``
    tensor) into one tensor; return it (not yet validated) and the body's size in bytes.

    ``size`` is the body's declared length, when known: a wrong one is refused before any
    rows are read. ``lend``: see ``BodyReader``.
    """
    reader = BodyReader(chunks, lend)
    if kind == "safetensors" and (dtype is not None or shape is not None):
        reject(errors.RAW_ONLY_FIELDS, where=where)
    if kind == "raw":
        rows, nbytes = await _receive_raw(reader, spec, where, size, dtype, shape)
    else:
        rows, nbytes = await _receive_safetensors(reader, spec, where, size)
    return little_endian(rows), nbytes


@dataclass(frozen=True)
class Upload:
    """What the Files API says about uploaded rows (the rows live in the reference store)."""

    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int


_uploads: dict[str, Upload] = {}
_uploads_lock = threading.Lock()


def keep(
    rows: torch.Tensor, spec: PayloadSpec, where: str, *, filename: str, purpose: str, size: int
) -> tuple[Upload, torch.Tensor]:
    """Validate received rows as a part's and keep them under a fresh id (blocking work: the
    NaN/Inf scan, a cast to the dtype rows travel in, the content digest, the write to the
    shared store; run it off the event loop).

    With a shared store, the id is only handed out once the store holds the rows: an id only
    this process knew would fail on every other replica. A store fault is a 503, nothing kept.
    """
    validated = validate_tensor(rows, where, spec, pooled=False)
    del rows  # a cast leaves the received buffer unused: free it before keeping the rows
    store = references.process_store()
    nbytes = validated.numel() * validated.element_size()
    if nbytes > store.capacity:  # larger in the dtype carried than as sent
        reject(errors.UPLOAD_OVER_STORE, where=where, size=nbytes, limit=store.capacity)
    upload = Upload(new_upload_id(), filename, purpose, size, int(time.time()))
    kept = store.put(upload.id, validated, owned=True)
    shared = shared_store.active()
    if shared is not None:
        fields = shared_store.FileFields(filename, purpose, size, upload.created_at)
        try:
            shared.write(upload.id, kept, references.kept_rows_digest(kept) or "", fields)
        except shared_store.StoreUnavailable as exc:
            store.remove(upload.id)
            raise shared.unavailable(
                errors.SHARED_STORE_UPLOAD_DOWN, where=where, reason=exc
            ) from exc
    with _uploads_lock:
        _prune()
        _uploads[upload.id] = upload
    return upload, kept


def _prune() -> None:
    store = references.process_store()
    for upload_id in [u for u in _uploads if store.peek(u) is None]:
        del _uploads[upload_id]


def _shared_call(action: Callable[[shared_store.SharedStore], T]) -> T | None:
    """``action`` on the shared store (None without one); a fault is the Files API's 503."""
    shared = shared_store.active()
    if shared is None:
        return None
    try:
        return action(shared)
    except shared_store.StoreUnavailable as exc:
        raise shared.unavailable(errors.SHARED_STORE_FILES_DOWN, reason=exc) from exc


def describe(upload_id: str) -> Upload | None:
    """What the Files API says of an upload still held (with a shared store: by the
    deployment), or None."""
    shared = _shared_call(lambda s: s.file_fields(upload_id))
    if shared_store.active() is not None:
        f = shared
        return (
            None if f is None else Upload(upload_id, f.filename, f.purpose, f.bytes, f.created_at)
        )
    if references.process_store().peek(upload_id) is None:
        return None
    with _uploads_lock:
        return _uploads.get(upload_id)


def find(upload_id: str, spec: PayloadSpec) -> tuple[Upload, torch.Tensor] | None:
    """An upload and its rows (read from the shared store, checked and held here from then on,
    when another process took it), or None."""
    upload = describe(upload_id)
    if upload is None:
        return None
    if shared_store.active() is None:
        rows = references.process_store().peek(upload_id)
    else:
        where = f"{errors.FILE_WHERE} {upload_id}"
        rows = shared_store.resolve({upload_id: where}, spec, references.process_store())[upload_id]
    return None if rows is None else (upload, rows)


def listing() -> list[Upload]:
    """Uploads whose rows are still held, oldest first (with a shared store: the deployment's).
    Rows kept by a part's own uuid are not listed: their uuids are the clients' secrets."""
    shared = _shared_call(lambda s: s.files())
    if shared is not None:
        return [Upload(i, f.filename, f.purpose, f.bytes, f.created_at) for i, f in shared]
    with _uploads_lock:
        _prune()
        return list(_uploads.values())


def delete(upload_id: str) -> bool:
    """Forget an upload and its rows (with a shared store: for every process); whether it
    was held."""
    with _uploads_lock:
        known = _uploads.pop(upload_id, None) is not None
    held = references.process_store().remove(upload_id) and known
    removed = _shared_call(lambda s: s.delete(upload_id))
    return held if removed is None else removed or held

"""Reusable buffers for decoding large payloads (base64 text -> bytes a tensor is built over).

Why: decoding a 64 MiB payload into fresh memory costs more in the kernel (mapping and zeroing
16k pages) than the decoding itself, and glibc hands allocations over 32 MiB back to the kernel
on every free, so each large request paid that again. Here a few buffers are kept and reused.

Safety rests on the buffer protocol, not on bookkeeping: a buffer is lent out as a
``memoryview``, and the tensor built over it keeps that view alive. A ``bytearray`` with a live
export cannot be resized, so a buffer is reused only once resizing it succeeds, i.e. once no
tensor, view or NumPy array over it is left anywhere (including the engine input it went into).
"""

from __future__ import annotations

import threading
from typing import Final

import pybase64
import torch

from .limits import Limits
from .transport import shared_rows

# Up to this size a whole decode into fresh memory costs no more than a chunked decode into a
# pool (glibc's dynamic mmap threshold stops at 32 MiB on 64-bit hosts; in an API server every
# block of 1 MiB or more is a fresh mapping anyway: ``heap.bound``).
POOL_ABOVE_BYTES: Final = 32 * 1024 * 1024
# A part's base64 text: a ``str`` from JSON, or a view of the request body's bytes for a string
# the HTTP layer lifted out of it (``entrypoints/big_bodies.py``), read in place.
Base64Text = str | memoryview

# Base64 characters decoded per step: small enough to stay in cache before the copy out.
_CHUNK_CHARS: Final = 1 << 20


def _is_free(buffer: bytearray) -> bool:
    """True when nothing holds a view of ``buffer`` (resizing fails while an export lives).

    Shrinks by one byte and grows back: both stay inside the allocation, so the buffer never
    moves (growing first would reallocate it).
    """
    try:
        del buffer[-1:]
    except BufferError:
        return False
    buffer.append(0)
    return True


class BufferPool:
    """At most ``capacity`` bytes of idle-or-lent decode buffers, each reused when free."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()

    def lend(self, nbytes: int) -> memoryview:
        """A writable view of exactly ``nbytes`` bytes; the buffer is busy while it lives."""
        with self._lock:
            fitting = [b for b in self._buffers if len(b) >= nbytes]
            for buffer in sorted(fitting, key=len):
                if _is_free(buffer):
                    return memoryview(buffer)[:nbytes]  # the export is taken under the lock
            buffer = bytearray(nbytes)
            view = memoryview(buffer)
            self._keep(buffer)
            return view

    def _keep(self, buffer: bytearray) -> None:
        held = sum(len(b) for b in self._buffers)
        if held + len(buffer) <= self.capacity:
            self._buffers.append(buffer)
            return
        # Make room by forgetting free buffers (smallest first); busy ones stay with their users.
        for old in sorted(self._buffers, key=len):
            if held + len(buffer) <= self.capacity:
                break
            if len(old) < len(buffer) and _is_free(old):
                self._buffers.remove(old)
                held -= len(old)
        if held + len(buffer) <= self.capacity:
            self._buffers.append(buffer)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._buffers)


_pool: BufferPool | None = None
_pool_lock = threading.Lock()


def configure(capacity: int) -> None:
    """Replace the pool by one of ``capacity`` bytes (tests and benchmarks)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.capacity != capacity:
            _pool = BufferPool(capacity)


def pool() -> BufferPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            # The renderer already read the limits at start-up, so a bad value failed there.
            _pool = BufferPool(Limits.from_env().decode_pool_bytes)
        return _pool


def _ends_with(data: Base64Text, tail: str) -> bool:
    if isinstance(data, str):
        return data.endswith(tail)
    return len(data) >= len(tail) and data[-len(tail) :] == tail.encode()


def decoded_size(data: Base64Text) -> int | None:
    """The exact decoded length of well-formed padded base64, or None if it cannot be."""
    if len(data) % 4:
        return None
    return len(data) // 4 * 3 - (_ends_with(data, "=") + _ends_with(data, "=="))


def decode_into_pool(
    data: Base64Text, nbytes: int, *, exact_segment: bool = False
) -> memoryview | None:
    """Decode ASCII base64 ``data`` of decoded length ``nbytes`` into a buffer of its own:
    a shared-memory segment (rows that cross processes as a handle), else (unless
    ``exact_segment``: a segment exactly ``nbytes`` long, or nothing) a pooled one.

    Returns None when neither applies (small payload, pool disabled or full); raises
    what ``pybase64`` raises on bad input. A short result (padding inside the text) is
    returned short, for the caller's length check.
    """
    view = shared_rows.process_rows().allocate(nbytes, exact=exact_segment)  # a handle
    if view is None:
        if exact_segment or nbytes <= POOL_ABOVE_BYTES or nbytes > pool().capacity:
            return None
        view = pool().lend(nbytes)
    filled = 0
    for start in range(0, len(data), _CHUNK_CHARS):
        piece = pybase64.b64decode(data[start : start + _CHUNK_CHARS], validate=True)
        end = filled + len(piece)
        if end > nbytes:
            raise ValueError(f"decodes to more than {nbytes} bytes")
        view[filled:end] = piece
        filled = end
    return view[:filled]


def pooled_empty(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
    """An uninitialised tensor for large casts: in shared memory, else over a pooled buffer;
    None if neither applies."""
    shared = shared_rows.empty(shape, dtype)
    if shared is not None:
        return shared
    nbytes = shape[0] * shape[1] * dtype.itemsize
    if nbytes <= POOL_ABOVE_BYTES or nbytes > pool().capacity:
        return None
    return torch.frombuffer(pool().lend(nbytes), dtype=dtype).view(shape)

"""The API server's heap: big blocks go back to the system when freed, in every thread.

Why: a big part passes through an API server as blocks of 16-90 MB (the lifted ``data``
string, the body FastAPI joins on routes that are not lifted, decoded bytes when there is no
shared memory), made and freed on the event loop and on the renderer's and asyncio's executor
threads. glibc's malloc serves a block above ``M_MMAP_THRESHOLD`` (128 KiB at start) with its
own mapping, unmapped on free, but each such free raises the threshold to the block's size (up
to 32 MiB) and the heap's trim threshold to twice that: from then on blocks of that size come
from the heap of the thread's arena (one per thread, up to 8 per core), and the free space at
the top of each stays resident, up to 64 MiB per arena. ``malloc_trim(0)`` after each big
request hands it back, but only where it is called, and every later big block then faults in
fresh pages anyway. Fixing both thresholds once per API server process (``mallopt``; setting
them turns glibc's adjustment off) makes every block of ``MMAP_ABOVE_BYTES`` or more a mapping
of its own, unmapped on free by whichever thread frees it, and bounds what any arena keeps at
its top to ``TRIM_ABOVE_BYTES``. Smaller blocks (the 768 KB pieces of the chunked decode, 64 KiB
body chunks) are still reused from the arenas.

Only API server processes (``bound``, called where the app is built): the engine core and the
workers make their model's activations of these sizes every step, and reuse them from the heap.
Elsewhere than glibc (musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading
from collections.abc import Callable
from typing import Final

from .log import logger

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
# Blocks this big or bigger are mappings of their own: unmapped on free.
MMAP_ABOVE_BYTES: Final = 1024 * 1024
# Free space an arena keeps at its top before handing it back.
TRIM_ABOVE_BYTES: Final = 4 * 1024 * 1024
# A huge page on x86-64 and most arm64 kernels: smaller mappings gain nothing from the advice.
_HUGE_PAGE_BYTES: Final = 2 * 1024 * 1024

BOUNDED: Final = (
    "vllm-chat-embeds: heap blocks of {mmap_mib} MiB or more go back to the system when freed "
    "(glibc mallopt, this API server process)"
)

_lock = threading.Lock()
_bounded = False


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def heap_trimmer() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS)."""
    libc = _libc()
    return getattr(libc, "malloc_trim", None) if libc is not None else None


def bound() -> bool:
    """Fix glibc's mmap and trim thresholds for this process, once; True when in effect."""
    global _bounded
    with _lock:
        if _bounded:
            return True
        libc = _libc()
        mallopt = getattr(libc, "mallopt", None) if libc is not None else None
        if mallopt is None:
            return False
        # mallopt returns 1 on success; the mmap threshold first, so a failure leaves the
        # trim threshold as glibc set it.
        if mallopt(_M_MMAP_THRESHOLD, MMAP_ABOVE_BYTES) != 1:
            return False
        mallopt(_M_TRIM_THRESHOLD, TRIM_ABOVE_BYTES)
        _bounded = True
    logger.info(BOUNDED.format(mmap_mib=MMAP_ABOVE_BYTES >> 20))
    return True


def fresh_pages(nbytes: int) -> mmap.mmap:
    """An anonymous mapping of ``nbytes`` for a big body, backed by huge pages where the kernel
    allows it (transparent huge pages ``always`` or ``madvise``).

    Why: a body's pages are all written once, as it arrives. With 4 KiB pages that is one fault
    per page: 9.6 ms of CPU for 22 MiB here, against 2.3 ms with 2 MiB pages. Pages are still
    touched only as bytes arrive, so a declared length costs nothing until sent.
    """
    # Private: an anonymous mmap is shared by default, which is shmem (tmpfs pages, never
    # huge unless the host's shmem_enabled says so, and dearer to fault in).
    mapping = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and nbytes >= _HUGE_PAGE_BYTES:
        try:
            mapping.madvise(advice)
        except OSError:  # no THP in this kernel: 4 KiB pages, as without the advice
            pass
    return mapping

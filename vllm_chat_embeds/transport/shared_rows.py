"""Rows that cross processes as a name, not as bytes: one shared-memory segment per big tensor.

Why: a big part's rows were copied at every process boundary (the API server to the engine
core over ZMQ, the engine core to each worker over vLLM's broadcast) and held again in every
process that kept them. Here the process that makes the rows puts them in a segment once;
every other process maps the same pages. So a hop costs a few system calls whatever the size,
and rows are held once per machine (the kernel frees them with the last mapping).

Why our own segments: vLLM's multimodal shared-memory cache (``--mm-processor-cache-type
shm``) is a ring whose oldest items are overwritten, and its broadcast arena
(``--enable-shm-tensor-arena``) frees a slot once no view of it is left; rows kept by uuid must
outlive any ring position and stay in no slot for good. Rows beside images are vLLM's own
multimodal items and keep its mechanisms.

Who owns what (the lifetimes):

- **Creator** (the process that decodes, uploads or joins rows: an API server, or the ``LLM``
  process) makes a segment per tensor (``allocate``), a file in ``CHAT_EMBEDS_SHM_DIR``
  (``/dev/shm``) named ``vce-rows-<host>-<pid>-<n>``, reserved with ``posix_fallocate`` (a full
  tmpfs then fails here, not with a SIGBUS later). Once its own tensors over a segment are
  gone, it keeps the segment, still mapped, for the next rows of about its size (up to
  ``CHAT_EMBEDS_SHM_REUSE_BYTES``, for ``REUSE_IDLE_S`` at most; its name then ends in
  ``-kept``), and unlinks the name after that.
- **Reuse**: a tmpfs page is allocated and zeroed when a segment is made and freed with its
  last mapping, so a new 16 MiB segment costs 4-6 ms of CPU and a kept one, its pages in place,
  nothing. A kept segment is reused only when no other process can still read it: every
  receiver holds a shared ``flock`` on it while it is mapped, and each link counts in the
  file's link count until removed, so the creator reuses a segment only when an exclusive
  ``flock`` is granted and the name is the file's only link.
- **A send** (``send``) makes a hard link of the segment for that send alone, and the wire
  carries the link's name. The receiver opens and maps it, then removes the link
  (``receive``); a receiver that passes the rows on (the engine core to its workers) keeps
  the link until its own receivers have mapped it, or until vLLM fails the request first
  (``retire``). So a creator never needs to know when a receiver opened: a name lives
  exactly as long as someone is yet to open it.
- **Memory** stays while any mapping does: the creator's store, a request in the engine core,
  a worker's request state. Receivers map copy-on-write, so no process can change another's
  rows.
- **Aborts**: an aborted or failed request's rows can stay reachable from a reference cycle
  (the exception's traceback holds vLLM's ``generate`` frame, which holds the prompt), which
  CPython frees only when its collector runs, and an idle server may not run it for long. So
  the API server's engine client calls ``collect_soon`` on every abort: one collection a
  second after it (coalesced, only while this process has segments made).
- **Death**: a creator unlinks every name it made at exit; every process of the plugin
  removes, at its exit, names of creators of this host that are gone (vLLM's launcher kills
  its API server processes outright, and the launcher is left), and a creator starting up
  does the same. The kernel drops a dead process's mappings.
- **No shared memory** (no directory, not writable, the budget ``CHAT_EMBEDS_SHM_BYTES`` spent,
  or the tmpfs full, as in a container's 64 MiB default): ``allocate`` returns None and rows
  travel as copies, as before; the log says so once, with the fix.
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import gc
import itertools
import mmap
import multiprocessing.util
import os
import re
import socket
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy
import torch

from ..limits import Limits
from ..log import logger

NAME_PREFIX: Final = "vce-rows-"
# A kept segment's name ends so while it waits for new rows (see "Reuse" above).
KEPT_SUFFIX: Final = "-kept"
# The wire's form of a handle: [link name, byte offset, dtype, rows, width].
Wire = list[Any]
# The creator maps its new segment's pages at once: one call, not a write fault per page as
# the rows are decoded in. ``MADV_POPULATE_WRITE`` (Linux 5.14+; not named by Python 3.11)
# maps them writable: 16 MiB reserved, mapped and written cost 5.9 ms here, against 7.4 ms with
# ``MAP_POPULATE`` (read-only entries, each then faulted writable) and 8.3 ms of write faults.
_POPULATE: Final = getattr(mmap, "MAP_POPULATE", 0)
_MADV_POPULATE_WRITE: Final = 23 if sys.platform == "linux" else None
# How much of the directory's free space one process may use when no budget is set.
_AUTO_SHARE: Final = 0.5
# A kept segment serves rows that fill at least this share of it (the rest idles meanwhile).
_REUSE_FILL: Final = 0.75
# How long a kept segment waits for new rows before its name and pages go.
REUSE_IDLE_S: Final = 30.0
NO_SHARED_MEMORY: Final = (
    "vllm-chat-embeds: rows of {size_mib:.0f} MiB cross processes as copies, not through "
    "shared memory: {reason}. To give them shared memory, run the container with a larger "
    "/dev/shm (docker run --shm-size=4g, or --ipc=host), or set CHAT_EMBEDS_SHM_DIR to a "
    "tmpfs with room (CHAT_EMBEDS_SHM_BYTES bounds what one process uses)."
)
# Said once per process, the first time rows go or come as a handle.
SENDING_SHARED: Final = (
    "vllm-chat-embeds: rows of {above} bytes or more cross processes through shared memory in "
    "{dir} (CHAT_EMBEDS_SHARED_ABOVE_BYTES, CHAT_EMBEDS_SHM_BYTES)"
)
RECEIVING_SHARED: Final = "vllm-chat-embeds: rows arrive through shared memory from {dir}"
LINK_NOT_FOUND: Final = (
    "vllm-chat-embeds: the shared rows {name} of request {request_id} are gone before this "
    "process could map them (was the API server restarted, or its /dev/shm cleared?)"
)
_DTYPES: Final = {
    str(d).removeprefix("torch."): d
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def _host_tag() -> str:
    """Names carry the host, so a sweep never touches another container's segments when
    several share one ``/dev/shm`` (``--ipc=host``)."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


@dataclass(frozen=True)
class _Mapped:
    """One mapping this process holds: its address range and the name it came by."""

    base: int
    size: int
    name: str  # the creator's name, or the link a receiver keeps for its own receivers


@dataclass(eq=False)
class _Made:
    """A segment this process made, with its own writable mapping (kept while it waits)."""

    name: str
    size: int
    mapping: mmap.mmap
    base: int
    idle_since: float = 0.0  # when its last rows went (meaningful while kept)


class _SharedRows:
    """This process's segments: those it made and those it mapped, by address."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.dir = Path(limits.shm_dir)
        self.tag = _host_tag()
        # Reentrant: a finalizer below may run when a last reference drops inside a locked block.
        self._lock = threading.RLock()
        self._mapped: dict[int, _Mapped] = {}  # base address -> mapping
        self._made: dict[str, int] = {}  # names this process made (kept ones too) -> bytes
        self._kept: list[_Made] = []  # segments whose rows are gone, oldest first
        self._single_use: set[str] = set()  # names never to be kept (``forgo_reuse``)
        self._expiry: threading.Timer | None = None
        self._links = itertools.count()
        self._said_no = False
        self._said_sending = False
        self._said_receiving = False
        self.budget = self._budget()
        if self.budget:
            sweep_dead_creators(self.dir, self.tag)
            atexit.register(self.unlink_own)
            # A multiprocessing child (vLLM's API server processes with --api-server-count)
            # leaves through os._exit, past atexit; its own exit hook runs these.
            multiprocessing.util.Finalize(None, self.unlink_own, exitpriority=0)

    # -- the creator's side --------------------------------------------------------------

    def _budget(self) -> int:
        if self.limits.shm_bytes is not None:
            return self.limits.shm_bytes
        try:
            stat = os.statvfs(self.dir)
        except OSError:
            return 0
        if not os.access(self.dir, os.W_OK):
            return 0
        return int(stat.f_bavail * stat.f_frsize * _AUTO_SHARE)

    def made_bytes(self) -> int:
        """Bytes of segments this process made that rows still lie in (kept ones excluded)."""
        with self._lock:
            return sum(self._made.values()) - sum(kept.size for kept in self._kept)

    def _say_no(self, nbytes: int, reason: str) -> None:
        if not self._said_no:
            self._said_no = True
            logger.warning(NO_SHARED_MEMORY.format(size_mib=nbytes / 2**20, reason=reason))

    def allocate(self, nbytes: int, *, exact: bool = False) -> memoryview | None:
        """A writable view of ``nbytes`` bytes in a segment of its own (a kept one when one
        fits and is free, else a new one; ``exact``: a segment of just that size, for a file
        read from its end); None: use private memory."""
        if nbytes < max(self.limits.shared_above_bytes, 1):
            return None
        if not self.budget:
            self._say_no(nbytes, f"{self.dir} is not writable, or CHAT_EMBEDS_SHM_BYTES is 0")
            return None
        with self._lock:
            self._expire(time.monotonic() - REUSE_IDLE_S)
            kept = self._take_kept(nbytes, exact)
            if kept is not None:
                return self._lend(kept, nbytes)
            while self._kept and sum(self._made.values()) + nbytes > self.budget:
                self._drop(self._kept.pop(0))  # room for new rows before idle segments
            made = sum(self._made.values())
            if made + nbytes > self.budget:
                used = f"{made / 2**20:.0f} MiB of its {self.budget / 2**20:.0f} MiB budget"
                self._say_no(nbytes, f"this process already has {used} in use")
                return None
            name = f"{NAME_PREFIX}{self.tag}-{os.getpid()}-{next(self._links)}"
            self._made[name] = nbytes
        path = self.dir / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            self._forget(name)
            self._say_no(nbytes, f"{path} cannot be created ({exc.strerror})")
            return None
        try:
            os.posix_fallocate(fd, 0, nbytes)  # reserve now: a full tmpfs fails here
            segment = _mapped_writable(fd, nbytes)
        except OSError as exc:
            self._unlink(name)
            self._say_no(nbytes, f"{self.dir} has no room for them ({exc.strerror})")
            return None
        finally:
            os.close(fd)
        made = _Made(name, nbytes, segment, _address(segment))
        with self._lock:
            self._mapped[made.base] = _Mapped(made.base, nbytes, name)
            return self._lend(made, nbytes)

    def _lend(self, made: _Made, nbytes: int) -> memoryview:
        """A view of ``made``'s first ``nbytes`` that gives the segment back when it goes.

        Every view, slice or tensor made from it holds the one array made here (numpy and
        memoryview slices keep their base), so the array's end is the rows' end."""
        array = numpy.frombuffer(made.mapping, dtype=numpy.uint8, count=nbytes)
        weakref.finalize(array, self._returned, made).atexit = False
        return memoryview(array)

    def forgo_reuse(self, buffer: memoryview) -> None:
        """Never reuse the segment ``buffer`` lies in (this process mapped its file another
        way, with no claim on it): its name goes with its last view."""
        path = self.path_of(buffer)
        with self._lock:
            if path is not None:
                self._single_use.add(path.name)

    def _returned(self, made: _Made) -> None:
        """The last view of ``made`` is gone: keep it for reuse, or let it go."""
        with self._lock:
            cap = self.limits.shm_reuse_bytes
            if made.size > cap or made.name in self._single_use:
                self._single_use.discard(made.name)
                self._drop(made)
                return
            try:  # the name says it is kept (an operator listing the directory sees which)
                os.rename(self.dir / made.name, self.dir / (made.name + KEPT_SUFFIX))
            except OSError:  # its directory was cleared
                self._drop(made)
                return
            made.idle_since = time.monotonic()
            self._kept.append(made)
            while sum(kept.size for kept in self._kept) > cap:
                self._drop(self._kept.pop(0))
            if self._kept and self._expiry is None:
                self._arm_expiry(REUSE_IDLE_S)

    def _take_kept(self, nbytes: int, exact: bool) -> _Made | None:
        """The newest kept segment that fits ``nbytes`` and that no other process can read."""
        for i in range(len(self._kept) - 1, -1, -1):
            kept = self._kept[i]
            if not kept.size * _REUSE_FILL <= nbytes <= kept.size or exact and kept.size != nbytes:
                continue
            path = self.dir / (kept.name + KEPT_SUFFIX)
            state = _readers(path)
            if state is False:
                try:
                    os.rename(path, self.dir / kept.name)
                    return self._kept.pop(i)
                except OSError:
                    state = None
            if state is None:  # the name is gone (its directory cleared): forget it
                self._drop(self._kept.pop(i))
        return None

    def _expire_idle(self) -> None:
        with self._lock:
            self._expiry = None
            self._expire(time.monotonic() - REUSE_IDLE_S)
            if self._kept:
                self._arm_expiry(
                    max(self._kept[0].idle_since + REUSE_IDLE_S - time.monotonic(), 0.1)
                )

    def _arm_expiry(self, after_s: float) -> None:
        """Let kept segments that are idle too long go in ``after_s``, on a timer thread (an
        idle server makes no allocation that would)."""
        self._expiry = threading.Timer(after_s, self._expire_idle)
        self._expiry.daemon = True
        self._expiry.start()

    def _expire(self, before: float) -> None:
        while self._kept and self._kept[0].idle_since <= before:
            self._drop(self._kept.pop(0))

    def _drop(self, made: _Made) -> None:
        """Forget a segment made here and unlink its name (other mappings keep its pages)."""
        self._mapped.pop(made.base, None)
        _remove(self.dir / (made.name + KEPT_SUFFIX))
        self._unlink(made.name)

    def drop_kept(self) -> None:
        """Let every kept segment go now (tests, and a process that is done with rows)."""
        with self._lock:
            while self._kept:
                self._drop(self._kept.pop())

    def _forget(self, name: str) -> None:
        with self._lock:
            self._made.pop(name, None)

    def _unlink(self, name: str) -> None:
        self._forget(name)
        _remove(self.dir / name)

    def find(self, rows: torch.Tensor) -> tuple[_Mapped, int] | None:
        """The mapping ``rows`` lie in and their offset in it, if they lie in one."""
        if not rows.is_contiguous() or rows.device.type != "cpu":
            return None
        start = rows.data_ptr()
        end = start + rows.numel() * rows.element_size()
        with self._lock:
            for mapped in self._mapped.values():
                if mapped.base <= start and end <= mapped.base + mapped.size:
                    return mapped, start - mapped.base
        return None

    def path_of(self, buffer: memoryview) -> Path | None:
        """The file of the segment this process made that ``buffer`` starts in, if any."""
        start = numpy.frombuffer(buffer, dtype=numpy.uint8, count=1).ctypes.data
        with self._lock:
            for mapped in self._mapped.values():
                if mapped.base <= start < mapped.base + mapped.size and mapped.name in self._made:
                    return self.dir / mapped.name
        return None

    def send(self, rows: torch.Tensor) -> Wire | None:
        """A link for one receiver to the segment ``rows`` lie in, as the wire carries it;
        None: send the rows themselves (not shared, or the name is gone)."""
        if rows.dim() != 2 or rows.dtype not in _DTYPES.values() or rows.shape[0] == 0:
            return None
        found = self.find(rows)
        if found is None:
            return None
        mapped, offset = found
        link = f"{mapped.name}-l{next(self._links)}-{os.getpid()}"
        try:
            os.link(self.dir / mapped.name, self.dir / link)
        except OSError:
            return None  # swept meanwhile: the rows go as bytes
        if not self._said_sending:
            self._said_sending = True
            above = self.limits.shared_above_bytes
            logger.info(SENDING_SHARED.format(above=above, dir=self.dir))
        return _wire(link, offset, rows)

    # -- the receiver's side -------------------------------------------------------------

    def receive(self, wire: Sequence[Any], request_id: str, *, keep_link: bool) -> torch.Tensor:
        """The rows a wire names, mapped copy-on-write; the link is removed unless
        ``keep_link`` (this process passes the rows on: ``retire`` removes it later)."""
        name, offset, dtype, rows, width = wire
        if not isinstance(name, str) or not name.startswith(NAME_PREFIX) or "/" in name:
            raise RuntimeError(LINK_NOT_FOUND.format(name=name, request_id=request_id))
        path = self.dir / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise RuntimeError(LINK_NOT_FOUND.format(name=name, request_id=request_id)) from exc
        try:
            # Held while mapped (the descriptor closes with the mapping): the creator reuses
            # the segment only once no process holds it. Taken before the link can go.
            fcntl.flock(fd, fcntl.LOCK_SH)
            size = os.fstat(fd).st_size
            segment = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        except BaseException:
            os.close(fd)
            raise
        if not keep_link:
            _remove(path)
        if not self._said_receiving:
            self._said_receiving = True
            logger.info(RECEIVING_SHARED.format(dir=self.dir))
        base = _address(segment)
        with self._lock:
            self._mapped[base] = _Mapped(base, size, name)
        weakref.finalize(segment, self._release_mapped, base, fd)
        count = int(rows) * int(width)
        flat = torch.frombuffer(segment, dtype=_DTYPES[dtype], count=count, offset=int(offset))
        return flat.view(int(rows), int(width))

    def _release_mapped(self, base: int, fd: int) -> None:
        with self._lock:
            self._mapped.pop(base, None)
        os.close(fd)  # releases the shared lock

    def pass_on(self, rows: torch.Tensor) -> Wire | None:
        """The wire for rows this process received and passes on (the engine core to its
        workers): the link it kept, which ``retire`` removes once they have mapped it."""
        if rows.dim() != 2 or rows.shape[0] == 0:
            return None
        found = self.find(rows)
        if found is None or found[0].name in self._made:
            return None  # not received by a kept link
        mapped, offset = found
        return _wire(mapped.name, offset, rows)

    def retire(self, names: Sequence[str]) -> None:
        """Remove links this process kept for its receivers, once they have mapped them."""
        for name in names:
            _remove(self.dir / name)

    # -- death and shutdown --------------------------------------------------------------

    def unlink_own(self) -> None:
        """Remove every name this process made (at exit: its links not yet opened too)."""
        mine = re.compile(rf"{NAME_PREFIX}{self.tag}-{os.getpid()}-\d+(-l\d+-\d+|{KEPT_SUFFIX})?$")
        for path in _listing(self.dir):
            if mine.match(path.name):
                _remove(path)


def sweep_dead_creators(
    directory: Path, tag: str | None = None, *, children_grace_s: float = 0.0
) -> None:
    """Remove names whose creator (and whose link's maker) on this host is gone.

    ``children_grace_s``: first wait up to that long for creators that are this process's own
    children to die (at exit, vLLM's launcher has just sent them SIGKILL)."""
    tag = tag or _host_tag()
    pattern = re.compile(rf"{NAME_PREFIX}{tag}-(\d+)-\d+(?:-l\d+-(\d+)|{KEPT_SUFFIX})?$")
    named: list[tuple[Path, list[int]]] = []
    for path in _listing(directory):
        match = pattern.match(path.name)
        if match is not None:
            named.append((path, [int(p) for p in match.groups() if p is not None]))
    deadline = time.monotonic() + children_grace_s
    dying = {pid for _, pids in named for pid in pids if _parent(pid) == os.getpid()}
    while dying and time.monotonic() < deadline:
        dying = {pid for pid in dying if _alive(pid)}
        if dying:
            time.sleep(0.05)
    for path, pids in named:
        if not any(_alive(pid) for pid in pids):
            _remove(path)


_sweeping_at_exit = False
# How long a process at exit waits for its killed children to be gone before sweeping.
_CHILDREN_GRACE_S: Final = 5.0


def sweep_at_exit() -> None:
    """At this process's exit, remove the names of creators that are gone: vLLM's launcher
    kills its API server processes (``--api-server-count``) and engine cores outright, and
    this is the process left to clean after them. Called by ``register()``, in every
    process (a listing of the directory at exit)."""
    global _sweeping_at_exit
    if not _sweeping_at_exit:
        _sweeping_at_exit = True
        directory = Path(Limits.from_env().shm_dir)
        grace = {"children_grace_s": _CHILDREN_GRACE_S}
        atexit.register(sweep_dead_creators, directory, **grace)
        multiprocessing.util.Finalize(
            None, sweep_dead_creators, (directory,), grace, exitpriority=0
        )


def _wire(name: str, offset: int, rows: torch.Tensor) -> Wire:
    """The wire's form of a handle to ``rows`` at ``offset`` in the segment ``name``."""
    dtype = str(rows.dtype).removeprefix("torch.")
    return [name, offset, dtype, int(rows.shape[0]), int(rows.shape[1])]


_populate_write = _MADV_POPULATE_WRITE is not None


def _mapped_writable(fd: int, nbytes: int) -> mmap.mmap:
    """``fd``'s first ``nbytes`` mapped shared, every page already writable where the kernel
    can do that in one call (else populated read-only, as older kernels allow)."""
    global _populate_write
    if _populate_write and _MADV_POPULATE_WRITE is not None:
        segment = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        try:
            segment.madvise(_MADV_POPULATE_WRITE)
            return segment
        except OSError:  # a kernel before 5.14: populate at map time from now on
            _populate_write = False
            segment.close()
    return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _POPULATE)


def _readers(path: Path) -> bool | None:
    """Whether another process may still read the segment at ``path``: one maps it (holds
    a shared lock) or a link to it is yet to be opened. None: the name is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return os.fstat(fd).st_nlink != 1
    finally:
        os.close(fd)  # releases the lock, if taken


def _address(segment: mmap.mmap) -> int:
    return torch.frombuffer(segment, dtype=torch.uint8, count=1).data_ptr()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust the signal check
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _listing(directory: Path) -> list[Path]:
    try:
        return [p for p in directory.iterdir() if p.name.startswith(NAME_PREFIX)]
    except OSError:
        return []


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


_process: _SharedRows | None = None
_process_lock = threading.Lock()
# How long after an abort the collector runs: the aborted request's exception has unwound.
COLLECT_AFTER_ABORT_S: Final = 1.0
_collect_pending = False


def collect_soon() -> None:
    """After an abort, run CPython's cycle collector once, shortly, if this process has
    segments made: rows held only by a dead request's traceback are then freed, and their
    names go, without waiting for the next automatic collection. At most one is pending."""
    global _collect_pending
    if _collect_pending or _process is None or not _process.made_bytes():
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no event loop (the offline LLM): its own collections run with its work
    _collect_pending = True
    loop.call_later(COLLECT_AFTER_ABORT_S, _collect)


def _collect() -> None:
    global _collect_pending
    _collect_pending = False
    gc.collect()


def process_rows() -> _SharedRows:
    """This process's segments, configured from the environment on first use."""
    global _process
    with _process_lock:
        if _process is None:
            _process = _SharedRows(Limits.from_env())
        return _process


def configure(limits: Limits) -> _SharedRows:
    """Start over with ``limits`` (tests, benchmarks); segments already made stay valid."""
    global _process
    with _process_lock:
        _process = _SharedRows(limits)
        return _process


def empty(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
    """An uninitialised tensor in a new segment, or None (too small, or no shared memory)."""
    view = process_rows().allocate(shape[0] * shape[1] * dtype.itemsize)
    if view is None:
        return None
    return torch.frombuffer(view, dtype=dtype).view(shape)


def is_shared(rows: torch.Tensor) -> bool:
    """Whether ``rows`` lie in a segment this process made or mapped."""
    return process_rows().find(rows) is not None

"""The floor of an API server's work on a big body: a minimal HTTP loop that reads the body off
its socket and does only what the rows need (issue 32's "the body read and decode done by a
minimal loop"). ``cpu_per_request.py`` sends it the very bodies it sends vLLM and reads this
process's CPU time (``GET /cpu``: ``time.process_time()``, nanosecond clock, not 10 ms ticks).

- ``POST /inline`` (a chat body with one part inline, raw-encoded): find the part's data
  string, base64-decode it (``pybase64``, SIMD, the fastest decoder known; the standard
  library's ``binascii`` takes 30 times as long), check the rows are finite. No JSON parse, no
  render.
- ``POST /upload`` (the rows' bytes): check them. The body lands in fresh pages (an anonymous
  mapping of its own), as rows that are kept need memory nothing else uses.

Every body is read into fresh pages of its own, backed by huge pages where the kernel allows
(``heap.fresh_pages``, as the plugin's API server reads a lifted chat body): the cheapest fresh
memory known here (22 MiB: 2.3 ms against 9.6 ms of 4 KiB page faults).
- ``POST /upload_reused``: the same into one buffer reused by every request (no page faults):
  the least any server could do, though it could keep nothing.
- Any other path: read the body, do nothing.

The finite check is the plugin's own one-reduction check (``payload._all_finite``), the
cheapest known, so the floor is not inflated by a slower one. One connection at a time, kept
alive; one thread.

    python benchmarks/floor_server.py PORT    # prints "ready" once listening
"""

from __future__ import annotations

import mmap
import socket
import sys
import time
import warnings

import pybase64
import torch

from vllm_chat_embeds.heap import fresh_pages
from vllm_chat_embeds.payload import _all_finite

DATA_KEY = b'"data": "'


def check(rows: bytes | bytearray | memoryview) -> None:
    with warnings.catch_warnings():  # a writable view of a read-only buffer: only read
        warnings.simplefilter("ignore", UserWarning)
        if not _all_finite(torch.frombuffer(rows, dtype=torch.float16)):
            raise ValueError("non-finite rows")


def work(path: bytes, body: mmap.mmap | memoryview) -> bytes:
    if path == b"/inline" and isinstance(body, mmap.mmap):
        start = body.find(DATA_KEY) + len(DATA_KEY)
        text = memoryview(body)[start : body.find(b'"', start)]
        check(pybase64.b64decode(text, validate=True))
        text.release()
    elif path.startswith(b"/upload"):
        check(memoryview(body)[: len(body)])
    elif path == b"/cpu":
        return repr(time.process_time()).encode()
    return b"{}"


_reused = bytearray()


def body_buffer(path: bytes, length: int) -> mmap.mmap | memoryview:
    """Where a body is read to: fresh pages, or one reused buffer."""
    global _reused
    if path == b"/upload_reused":
        if len(_reused) < length:
            _reused = bytearray(length)
        return memoryview(_reused)[:length]
    return fresh_pages(length)


def serve(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as stream:
            while request := stream.readline():
                path = request.split()[1]
                length = 0
                while (line := stream.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = body_buffer(path, length)
                view, got = memoryview(body), 0
                while got < length and (n := stream.readinto(view[got:])):
                    got += n
                answer = work(path, body)
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(answer)}\r\n\r\n".encode()
                conn.sendall(head + answer)


if __name__ == "__main__":
    torch.set_num_threads(1)  # a minimal loop: one thread, no OpenMP team spinning beside it
    serve(int(sys.argv[1]))

"""Rows kept by uuid, kept again beside the engine, so a reference does not carry its rows.

Why: a part referred to by uuid costs its frontend nothing, but its rows (8 MiB for 512 rows of
a 4096-wide model) still crossed two process boundaries on every turn: the API server to the
engine core (ZMQ), and the engine core to each worker (vLLM's shared-memory broadcast). Those
copies were most of what a turn by reference cost over the same turn as text.

How: each hop has one sender and receivers that read its messages in order (one ZMQ socket per
API server and engine; one broadcast queue to every worker). The sender alone decides what its
receivers hold (``HeldRows``, least recently used out first, within
``CHAT_EMBEDS_REFERENCE_BYTES``) and says so with each request (the wire: one op per row span,
and the digests to forget); a receiver (``KeptRows``) only does what the wire says. So no policy
has to agree across processes, and what a receiver holds is bounded by its sender's budget.

Only rows the frontend keeps by uuid take part: they carry the digest of their content
(``SPAN_DIGESTS_KEY``), and rows are kept under that digest, never under a uuid. Rows without a
digest travel as before. A receiver that lacks rows the wire says it holds raises
(``ROWS_NOT_KEPT``): the request fails on its own (vLLM returns an error for it), and no
request is ever served other rows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import torch

from ..patches.v1_core_kv_cache_utils import SPAN_DIGESTS_KEY
from ..transport import shared_rows
from . import references

T = TypeVar("T")

# What a request's wire says of each of its row spans, in order.
KEEP: Final = "k"  # the rows are sent; keep them under their digest
USE: Final = "u"  # the rows are not sent; use those kept under their digest
SEND: Final = "s"  # the rows are sent; do not keep them
# A wire with this key instead of ops: the request's rows are in shared memory, and the key
# holds their handle (``transport/shared_rows.py``); nothing is kept, nothing is sent.
SHARED: Final = "shared"
# Where the frontend puts the wire: the request's ``sampling_params.extra_args`` (only while it
# is serialised; the engine core takes it out). A client's value is dropped on the way in.
WIRE_KEY: Final = "_vllm_chat_embeds_rows_wire"
ROWS_NOT_KEPT: Final = (
    "vllm-chat-embeds: rows {digest} of request {request_id} are not kept beside the engine; "
    "the sender and this receiver disagree (was a process restarted?)"
)


@dataclass
class HeldRows:
    """A sender's record of what its receivers hold: digest -> bytes, LRU order."""

    capacity: int
    _held: OrderedDict[str, int] = field(default_factory=OrderedDict)
    _bytes: int = 0

    def plan(self, spans: Sequence[tuple[int, str | None]], row_bytes: int) -> dict[str, Any]:
        """The wire for one request's spans: ``{"ops": [...], "drop": [...]}``.

        Drops are what making room forgot; a receiver applies them after the request's spans,
        so a span may still use rows that this same request pushed out.
        """
        ops: list[str] = []
        drop: dict[str, None] = {}  # ordered set
        for count, digest in spans:
            size = count * row_bytes
            if digest is None or size > self.capacity:
                ops.append(SEND)
            elif digest in self._held:
                self._held.move_to_end(digest)
                ops.append(USE)
            else:
                while self._bytes + size > self.capacity:
                    old, old_size = self._held.popitem(last=False)
                    self._bytes -= old_size
                    drop[old] = None
                self._held[digest] = size
                self._bytes += size
                drop.pop(digest, None)  # kept again after this request pushed it out
                ops.append(KEEP)
        return {"ops": ops, "drop": list(drop)}

    def held_bytes(self) -> int:
        return self._bytes


@dataclass
class KeptRows:
    """A receiver's rows by digest: exactly what its sender's ``HeldRows`` says.

    ``copy_kept``: keep a private copy of rows told to keep even when they arrived whole. A
    worker needs it when vLLM's shared-memory tensor arena carries the broadcast
    (``--enable-shm-tensor-arena``): the rows received are a view of one of the arena's few
    slots, which vLLM frees only once no view is left, so a kept view would hold the slot for
    good (and, all slots held, every later big tensor would be pickled again).
    """

    _rows: dict[str, torch.Tensor] = field(default_factory=dict)
    copy_kept: bool = False

    def resolve(
        self,
        spans: Sequence[tuple[int, str | None]],
        wire: dict[str, Any],
        sent: torch.Tensor,
        request_id: str,
    ) -> torch.Tensor:
        """The request's whole compact rows, from the rows sent and those kept."""
        pieces: list[torch.Tensor] = []
        offset = 0
        for (count, digest), op in zip(spans, wire["ops"], strict=True):
            if op == USE:
                rows = self._rows.get(str(digest))
                if rows is None or rows.shape[0] != count:
                    raise RuntimeError(ROWS_NOT_KEPT.format(digest=digest, request_id=request_id))
            else:
                rows = sent[offset : offset + count]
                offset += count
                if op == KEEP:
                    # A slice would pin every row sent with it; a whole tensor is kept as is.
                    whole = rows.shape[0] == sent.shape[0] and not self.copy_kept
                    self._rows[str(digest)] = rows if whole else rows.clone()
            pieces.append(rows)
        if offset != sent.shape[0]:
            raise RuntimeError(
                f"vllm-chat-embeds: request {request_id} sent {sent.shape[0]} rows, "
                f"its wire accounts for {offset}"
            )
        for digest in wire["drop"]:
            self._rows.pop(digest, None)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def held_bytes(self) -> int:
        return sum(rows.numel() * rows.element_size() for rows in self._rows.values())


_STATE_ATTR: Final = "_vllm_chat_embeds_engine_rows"


def attached(owner: Any, key: Any, factory: Callable[[], T]) -> T:
    """The sender's or receiver's state under ``key`` (an engine, an API server), kept on the
    vLLM object that sends or receives (a core client, engine core, executor or worker), so it
    lives and dies with that object."""
    states: dict[Any, Any] | None = getattr(owner, _STATE_ATTR, None)
    if states is None:
        states = {}
        setattr(owner, _STATE_ATTR, states)
    if key not in states:
        states[key] = factory()
    return states[key]


def span_digests(params: Any) -> list[tuple[int, str | None]] | None:
    """The request's row spans and their digests, if the frontend sent any."""
    extra = getattr(params, "extra_args", None) or {}
    spans = extra.get(SPAN_DIGESTS_KEY)
    if not spans:
        return None
    return [(int(count), digest) for count, digest in spans]


def new_sender() -> HeldRows:
    """A sender's record, with the budget it lets its receivers hold (this process's share of
    ``CHAT_EMBEDS_REFERENCE_BYTES``, ``references.process_bytes``; 0: none)."""
    return HeldRows(references.process_bytes())


def outgoing(
    held: HeldRows, rows: torch.Tensor | None, spans: list[tuple[int, str | None]] | None
) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """The rows to send in place of ``rows`` and the wire that says so; None: send as is."""
    if rows is None or not spans or held.capacity <= 0 or rows.dim() != 2:
        return None
    if sum(count for count, _ in spans) != rows.shape[0]:
        return None  # not the compact rows the digests describe: sent as they are
    wire = held.plan(spans, rows.shape[1] * rows.element_size())
    if all(op == SEND for op in wire["ops"]):
        return None
    pieces: list[torch.Tensor] = []
    offset = 0
    for (count, _), op in zip(spans, wire["ops"], strict=True):
        if op != USE:
            pieces.append(rows[offset : offset + count])
        offset += count
    if not pieces:
        sent = rows[:0]
    else:
        sent = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return sent, wire


def shared_outgoing(
    rows: torch.Tensor | None, *, passed_on: bool = False
) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """Rows in shared memory go as a handle: an empty tensor in their place and the wire
    naming them (``passed_on``: a receiver passing on rows it mapped); None: not shared."""
    if rows is None or rows.dim() != 2:
        return None
    store = shared_rows.process_rows()
    handle = store.pass_on(rows) if passed_on else store.send(rows)
    if handle is None:
        return None
    return rows[:0], {SHARED: handle}


@contextmanager
def rows_left_behind(held: HeldRows, request: Any, *, local: bool = True) -> Iterator[None]:
    """While serialising an engine request: send only the rows its receiver lacks, and the wire.

    Rows in shared memory go as a handle when the receiver is on this machine (``local``);
    other rows go as before. The request's own ``prompt_embeds`` and ``extra_args`` are put
    back afterwards: the frontend keeps using the request object (its output processor holds
    it).
    """
    params = request.sampling_params
    out = shared_outgoing(request.prompt_embeds) if local and params is not None else None
    if out is None:
        out = outgoing(held, request.prompt_embeds, span_digests(params))
    if out is None:
        yield
        return
    sent, wire = out
    rows, extra = request.prompt_embeds, params.extra_args
    request.prompt_embeds = sent
    params.extra_args = {**(extra or {}), WIRE_KEY: wire}
    try:
        yield
    finally:
        request.prompt_embeds = rows
        params.extra_args = extra


def incoming(
    kept: KeptRows,
    spans: Sequence[tuple[int, str | None]],
    wire: dict[str, Any],
    sent: torch.Tensor,
    request_id: str,
    *,
    keep_link: bool = False,
) -> torch.Tensor:
    """A received request's whole rows: mapped from shared memory (``keep_link``: this
    receiver passes them on), or rebuilt from the rows sent and those kept."""
    if SHARED in wire:
        return shared_rows.process_rows().receive(wire[SHARED], request_id, keep_link=keep_link)
    return kept.resolve(spans, wire, sent, request_id)


def take_wire(params: Any) -> dict[str, Any] | None:
    """Remove the wire from a received request's ``extra_args`` and return it."""
    extra = getattr(params, "extra_args", None)
    if not extra or WIRE_KEY not in extra:
        return None
    extra = dict(extra)
    wire = extra.pop(WIRE_KEY)
    params.extra_args = extra or None
    return wire

"""Find, check and decode prompt_embeds content parts (extends ``vllm/renderers/chat_utils.py``).

Why before vLLM's parser: we take the parts out of the messages before vLLM parses them, so the
built-in prompt_embeds parser never sees one. Each part is replaced by a text part holding a
marker unique to this request and part; the chat template then renders the marker wherever it
renders that content, and ``splice`` turns markers into placeholder tokens. A part therefore
renders exactly where a text part at the same position would.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Final, cast

import torch

from .. import errors
from ..entrypoints import big_bodies
from ..errors import reject
from ..limits import Limits
from ..payload import PayloadSpec, carried_dtype, decode_payload
from ..placeholder import PLACEHOLDER_TOKEN
from ..stores import references, shared_store
from ..stores.references import kept_rows_digest
from ..stores.soft_prompts import named_part_rows
from .file_parts import as_embeds_part, file_fields, holds_rows

PART_TYPE: Final = "prompt_embeds"
ALLOWED_KEYS: Final = frozenset({"type", "data", "encoding", "dtype", "shape", "uuid", "name"})


MARKER_OPEN: Final = "<|pe:"
MARKER_CLOSE: Final = "|>"


@dataclass(frozen=True)
class EmbedsPart:
    where: str
    marker: str
    tensor: torch.Tensor


@dataclass
class EmbedsPlan:
    """The decoded parts of one request, keyed by the marker that stands for each."""

    nonce: str
    parts: list[EmbedsPart] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(int(p.tensor.shape[0]) for p in self.parts)

    def scrub(self, value: Any) -> Any:
        """``value`` (strings, lists, dicts) without this plan's markers.

        A content list loses the text parts that stood for prompt_embeds parts.
        """
        if isinstance(value, str):
            if self.nonce not in value:
                return value
            for marker in self.markers:  # str.replace: no pattern compiled per request
                value = value.replace(marker, "")
            return self.any_marker.sub("", value) if self.nonce in value else value
        if isinstance(value, list):
            return [self.scrub(v) for v in value if not self._is_marker_part(v)]
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        return value

    def _is_marker_part(self, value: Any) -> bool:
        text = value.get("text") if isinstance(value, dict) else None
        if not isinstance(text, str) or self.nonce not in text:
            return False
        return text in self.markers or self.any_marker.fullmatch(text) is not None

    @property
    def markers(self) -> frozenset[str]:
        return frozenset(part.marker for part in self.parts)

    @cached_property
    def any_marker(self) -> re.Pattern[str]:
        """Matches any marker of this plan (``_marker`` with this nonce), even one whose index
        is not a part's (compiled per request: the hot paths try ``markers`` first)."""
        return re.compile(re.escape(self.marker_prefix) + r"\d+" + re.escape(MARKER_CLOSE))

    @property
    def marker_prefix(self) -> str:
        """What every marker of this plan starts with."""
        return f"{MARKER_OPEN}{self.nonce}:"


def _marker(nonce: str, index: int) -> str:
    return f"{MARKER_OPEN}{nonce}:{index}{MARKER_CLOSE}"


def is_embeds_part(part: object, *, files: bool | None = None) -> bool:
    """A prompt_embeds part, or a ``file`` part holding rows (``renderers/file_parts.py``).

    ``files``: whether file parts count; by default, when this process serves parts.
    """
    if isinstance(part, Mapping) and part.get("type") == PART_TYPE:
        return True
    return (_reserved_in_process if files is None else files) and holds_rows(part)


def _as_part(value: Any) -> Any:
    """The prompt_embeds part ``value`` is or stands for (a file part holding rows)."""
    return value if value.get("type") == PART_TYPE else as_embeds_part(value)


class LocatedPart(dict[str, Any]):
    """A prompt_embeds part that knows where the client put it (e.g. ``input[2].content[1]``).

    Why: entry points other than chat completions (``/v1/responses``) turn their request into
    chat messages, so a part's index among those messages is not where the client sent it.
    Errors name ``where`` instead; the part is otherwise the plain dict the client sent.
    """

    __slots__ = ("where",)

    def __init__(self, part: Mapping[str, Any], where: str) -> None:
        super().__init__(part)
        self.where = where


def _where(part: object, default: str) -> str:
    return part.where if isinstance(part, LocatedPart) else default


def _iter_strings(value: object, path: str) -> Iterator[tuple[str, str]]:
    """Every string reachable from ``value`` except prompt_embeds payloads, with its path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        if is_embeds_part(value):
            return
        for key, item in value.items():
            if isinstance(key, str):
                yield f"{path}.{key}", key
            yield from _iter_strings(item, f"{path}.{key}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        for index, item in enumerate(value):
            yield from _iter_strings(item, f"{path}[{index}]")


def reject_reserved_text(
    messages: Sequence[Any], tools: object = None, template_kwargs: object = None
) -> None:
    """Refuse the placeholder string anywhere a user-controlled string reaches the template."""
    roots = (("messages", messages), ("tools", tools), ("chat_template_kwargs", template_kwargs))
    for root, value in roots:
        reject_reserved_strings(root, value)


def reject_reserved_strings(root: str, value: object) -> None:
    """Refuse the placeholder string in any string of ``value``, located from ``root``."""
    for path, text in _iter_strings(value, root):
        if PLACEHOLDER_TOKEN in text:
            reject(errors.RESERVED_TEXT, where=path, token=PLACEHOLDER_TOKEN)


_reserved_in_process = False


def reserve_placeholder_text() -> None:
    """Record that this process serves prompt_embeds parts, so the placeholder is reserved."""
    global _reserved_in_process
    _reserved_in_process = True


def placeholder_text_reserved() -> bool:
    return _reserved_in_process


@dataclass(frozen=True)
class _Slot:
    """Where a part sits: ``messages[m].content[i]``, ``.reasoning`` or ``.reasoning[i]``."""

    message: int
    field: str  # "content" or "reasoning"
    index: int | None
    where: str

    def get(self, messages: Sequence[Any]) -> Any:
        value = messages[self.message][self.field]
        return value if self.index is None else value[self.index]


def _located_parts(messages: Sequence[Any], files: bool | None = None) -> list[_Slot]:
    found = []
    for m, message in enumerate(messages):
        if not isinstance(message, Mapping):
            continue
        for key in ("content", "reasoning"):
            value = message.get(key)
            if key == "reasoning" and is_embeds_part(value, files=files):
                found.append(_Slot(m, key, None, f"messages[{m}].reasoning"))
            elif isinstance(value, list):
                for p, part in enumerate(value):
                    if is_embeds_part(part, files=files):
                        where = _where(part, f"messages[{m}].{key}[{p}]")
                        found.append(_Slot(m, key, p, where))
    return found


def _reasoning_as_text(reasoning: list[Any], m: int) -> str:
    """A reasoning list of text parts (markers by now) as the string templates expect."""
    texts = []
    for p, part in enumerate(reasoning):
        if not (isinstance(part, Mapping) and part.get("type") == "text"):
            reject(errors.BAD_REASONING_PART, where=f"messages[{m}].reasoning[{p}]")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def has_embeds_parts(messages: Sequence[Any]) -> bool:
    return bool(_located_parts(messages))


def has_embeds_data(messages: Sequence[Any]) -> bool:
    """Whether any prompt_embeds part carries ``data`` to decode (not only a ``uuid``)."""
    for slot in _located_parts(messages):
        part = slot.get(messages)
        fields = file_fields(part)
        if (part if fields is None else {"data": fields.get("file_data")}).get("data") is not None:
            return True
    return False


def first_embeds_part(messages: Sequence[Any]) -> str | None:
    """Where the first prompt_embeds part sits (``messages[i].content[j]``), if any."""
    located = _located_parts(messages)
    return located[0].where if located else None


def _check_keys(part: Mapping[str, Any], where: str) -> object:
    extra = sorted(str(k) for k in part if k not in ALLOWED_KEYS)
    if extra:
        reject(errors.UNKNOWN_KEYS, where=where, keys=extra, allowed=sorted(ALLOWED_KEYS))
    if "name" in part:  # a soft prompt's rows, by name (stores/soft_prompts.py)
        return named_part_rows(part, where)
    uuid = _uuid(part, where)  # checked before anything is decoded
    data = big_bodies.resolve(part.get("data"))  # a long string the HTTP layer lifted out
    if data is None and uuid is None:
        reject(errors.DATA_MISSING, where=where)
    return data


def _uuid(part: Mapping[str, Any], where: str) -> str | None:
    """The part's ``uuid``: None when absent or null, else a non-empty string of bounded size."""
    uuid = part.get("uuid")
    if uuid is None:
        return None
    if not isinstance(uuid, str):
        reject(errors.UUID_WRONG_TYPE, where=where, got=type(uuid).__name__)
    if not uuid:
        reject(errors.UUID_EMPTY, where=where)
    if len(uuid) > references.MAX_UUID_CHARS:
        reject(errors.UUID_TOO_LONG, where=where, length=len(uuid), limit=references.MAX_UUID_CHARS)
    return uuid


def _rows_within(rows: Any, where: str, rows_left: int, spec: PayloadSpec) -> torch.Tensor:
    """Rows decoded before this request (a soft prompt's, or kept by uuid), within its row
    budget."""
    if int(rows.shape[0]) > rows_left:
        reject(errors.TOO_MANY_ROWS, where=where, limit=spec.rows_limit)
    return rows


def _resolve_rows(
    located: list[_Slot], payloads: list[object], parts: list[Any], spec: PayloadSpec
) -> list[torch.Tensor]:
    """Each part's rows: decoded from its ``data``, a soft prompt's by its ``name``, or kept
    under its ``uuid`` from before.

    Parts with data come first (in order), so a uuid sent with data anywhere in this request
    names those rows for the whole request; they are kept once all of them decoded.
    """
    store = references.process_store()
    rows: list[torch.Tensor | None] = [None] * len(located)
    sent: dict[str, int] = {}  # uuid -> index of the last part sending its data
    rows_left = spec.max_rows
    for i, (slot, data, part) in enumerate(zip(located, payloads, parts, strict=True)):
        if data is None:
            continue
        if "name" in part:  # a soft prompt's rows, checked when it was loaded
            tensor = _rows_within(cast(torch.Tensor, data), slot.where, rows_left, spec)
        else:
            tensor = decode_payload(
                data,
                slot.where,
                replace(spec, max_rows=rows_left),
                encoding=part.get("encoding"),
                dtype=part.get("dtype"),
                shape=part.get("shape"),
            )
        rows_left -= int(tensor.shape[0])
        rows[i] = tensor
        uuid = _uuid(part, slot.where)
        if uuid is not None:
            sent[uuid] = i
    for uuid, i in sent.items():
        before = store.peek(uuid)
        rows[i] = store.put(uuid, cast(torch.Tensor, rows[i]))
        shared_store.keep_through(
            uuid, cast(torch.Tensor, rows[i]), None if before is None else kept_rows_digest(before)
        )
    named: dict[str, str] = {}  # uuid -> where the first part naming it without data sits
    for i, slot in enumerate(located):
        if rows[i] is None:
            named.setdefault(cast(str, _uuid(parts[i], slot.where)), slot.where)
    found = shared_store.resolve({u: w for u, w in named.items() if u not in sent}, spec, store)
    for i, slot in enumerate(located):
        if rows[i] is not None:
            continue
        uuid = cast(str, _uuid(parts[i], slot.where))
        tensor = rows[sent[uuid]] if uuid in sent else found[uuid]
        # Rows kept for another model in this process (offline) are no rows for this one.
        if (
            tensor is None
            or tensor.shape[1] != spec.width
            or tensor.dtype != carried_dtype(tensor.dtype, spec.dtype)
        ):
            if not store.enabled:
                reject(errors.REFERENCES_OFF, where=slot.where)
            reject(errors.REFERENCE_UNKNOWN, where=slot.where, uuid=uuid)
        rows[i] = _rows_within(tensor, slot.where, rows_left, spec)
        rows_left -= int(tensor.shape[0])
    for slot, tensor in zip(located, rows, strict=True):
        count = int(cast(torch.Tensor, tensor).shape[0])
        if count < spec.min_rows:
            reject(
                errors.TOO_FEW_ROWS_TO_KEY,
                where=slot.where,
                rows=count,
                connector=spec.min_rows_connector,
                min_rows=spec.min_rows,
            )
    return cast(list[torch.Tensor], rows)


def extract_parts(
    messages: Sequence[Any],
    *,
    enabled: bool,
    spec: PayloadSpec,
    limits: Limits,
) -> tuple[list[Any], EmbedsPlan | None]:
    """Return messages with every prompt_embeds part replaced by a marker text part.

    The caller's messages are not modified. Without prompt_embeds parts, the same list comes
    back with ``None``.
    """
    # Without prompt_embeds, file parts are vLLM's to answer, as without the plugin.
    located = _located_parts(messages, files=enabled)
    if not located:
        return list(messages), None
    if not enabled:
        reject(errors.NOT_ENABLED, where=located[0].where)
    if len(located) > limits.max_parts:
        reject(errors.TOO_MANY_PARTS, count=len(located), limit=limits.max_parts)

    parts = [_as_part(slot.get(messages)) for slot in located]
    payloads = []
    total_chars = 0
    for slot, part in zip(located, parts, strict=True):
        data = _check_keys(part, slot.where)
        if isinstance(data, str):
            total_chars += len(data)
        payloads.append(data)
    if (total_chars // 4) * 3 > limits.max_request_bytes:
        size = (total_chars // 4) * 3
        reject(errors.TOO_MANY_REQUEST_BYTES, size=size, limit=limits.max_request_bytes)

    plan = EmbedsPlan(nonce=secrets.token_hex(8))
    out = list(messages)
    tensors = _resolve_rows(located, payloads, parts, spec)
    for index, (slot, tensor) in enumerate(zip(located, tensors, strict=True)):
        marker = _marker(plan.nonce, index)
        plan.parts.append(EmbedsPart(where=slot.where, marker=marker, tensor=tensor))
        m = slot.message
        if out[m] is messages[m]:
            out[m] = dict(messages[m])
        if slot.index is None:  # reasoning given as one part: templates expect a string
            out[m][slot.field] = marker
            continue
        if out[m][slot.field] is messages[m][slot.field]:
            out[m][slot.field] = list(messages[m][slot.field])
        out[m][slot.field][slot.index] = {"type": "text", "text": marker}
    for m, message in enumerate(out):
        if message is not messages[m] and isinstance(message.get("reasoning"), list):
            message["reasoning"] = _reasoning_as_text(message["reasoning"], m)
    return out, plan

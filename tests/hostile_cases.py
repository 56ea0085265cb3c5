"""Hostile and malformed prompt_embeds requests, shared by the e2e test and the benchmark.

Each case is a name, a function building the messages (given the model's embedding width and
a valid row tensor), and the error template the plugin must answer with (None: must succeed).
"""

from __future__ import annotations

import base64
import io
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vllm_chat_embeds import errors

WHERE = "messages[0].content[1]"
# A uuid no test ever sends with data, and one the valid uuid case keeps.
NEVER_SENT = "hostile-never-sent-b6f0c1d2"
KEPT = "hostile-kept-5e1a9c07"


def b64(obj: Any) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Exploit:
    """A pickle that would run a shell command when unpickled without restrictions."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/vce-pwned",))


def user(part: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "x ="}, part]}]


def embeds(data: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "prompt_embeds", "data": data, **extra}


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[int, torch.Tensor], list[dict[str, Any]]]
    expect: str | None  # the errors.* template, formatted with WHERE where it has {where}


def _sparse(width: int) -> torch.Tensor:
    index = torch.tensor([[0], [0]])
    return torch.sparse_coo_tensor(index, torch.tensor([1.0]), (10**9, width))


CASES: list[Case] = [
    Case("not_base64", lambda w, r: user(embeds("@@not base64@@")), errors.NOT_BASE64),
    Case(
        "not_a_tensor_file",
        lambda w, r: user(embeds(base64.b64encode(b"hello world").decode())),
        errors.NOT_A_TENSOR_FILE,
    ),
    Case("pickled_dict", lambda w, r: user(embeds(b64({"rows": r}))), errors.NOT_A_TENSOR),
    Case(
        "exploit_pickle",
        lambda w, r: user(embeds(base64.b64encode(pickle.dumps(_Exploit())).decode())),
        errors.NOT_A_TENSOR_FILE,
    ),
    Case("one_dim", lambda w, r: user(embeds(b64(r[0]))), errors.BAD_NDIM),
    Case("three_dim", lambda w, r: user(embeds(b64(r[None].repeat(2, 1, 1)))), errors.BAD_NDIM),
    Case("batched", lambda w, r: user(embeds(b64(r[None]))), errors.BAD_NDIM),
    Case("wrong_width", lambda w, r: user(embeds(b64(torch.zeros(2, w + 1)))), errors.BAD_WIDTH),
    Case(
        "int_dtype",
        lambda w, r: user(embeds(b64(torch.ones(2, w, dtype=torch.int32)))),
        errors.BAD_DTYPE,
    ),  # fmt: skip
    Case(
        "bool_dtype",
        lambda w, r: user(embeds(b64(torch.ones(2, w, dtype=torch.bool)))),
        errors.BAD_DTYPE,
    ),  # fmt: skip
    Case(
        "complex_dtype",
        lambda w, r: user(embeds(b64(torch.ones(2, w, dtype=torch.cfloat)))),
        errors.BAD_DTYPE,
    ),  # fmt: skip
    Case("zero_rows", lambda w, r: user(embeds(b64(torch.zeros(0, w)))), errors.ZERO_ROWS),
    Case("nan", lambda w, r: user(embeds(b64(r.clone().fill_(float("nan"))))), errors.NOT_FINITE),
    Case("inf", lambda w, r: user(embeds(b64(r.clone().fill_(float("inf"))))), errors.NOT_FINITE),
    Case("sparse_huge", lambda w, r: user(embeds(b64(_sparse(w)))), errors.BAD_LAYOUT),
    Case(
        "stride_trick_huge",
        lambda w, r: user(embeds(b64(torch.zeros(1, w).expand(10**7, w)))),
        errors.TOO_MANY_ROWS,
    ),
    Case("data_missing", lambda w, r: user({"type": "prompt_embeds"}), errors.DATA_MISSING),
    Case("data_null", lambda w, r: user(embeds(None)), errors.DATA_MISSING),
    Case("data_number", lambda w, r: user(embeds(42)), errors.DATA_WRONG_TYPE),
    Case("data_empty", lambda w, r: user(embeds("")), errors.DATA_EMPTY),
    Case("unknown_key", lambda w, r: user(embeds(b64(r), ref="abc")), errors.UNKNOWN_KEYS),
    # Parts by reference: the uuid must be a short non-empty string; one never sent is a 400.
    Case("uuid_number", lambda w, r: user(embeds(b64(r), uuid=42)), errors.UUID_WRONG_TYPE),
    Case("uuid_list", lambda w, r: user(embeds(b64(r), uuid=["a"])), errors.UUID_WRONG_TYPE),
    Case("uuid_object", lambda w, r: user(embeds(None, uuid={"a": 1})), errors.UUID_WRONG_TYPE),
    Case("uuid_empty", lambda w, r: user(embeds(b64(r), uuid="")), errors.UUID_EMPTY),
    Case("uuid_empty_alone", lambda w, r: user(embeds(None, uuid="")), errors.UUID_EMPTY),
    Case("uuid_huge", lambda w, r: user(embeds(b64(r), uuid="u" * 10**6)), errors.UUID_TOO_LONG),
    Case("uuid_long", lambda w, r: user(embeds(None, uuid="u" * 257)), errors.UUID_TOO_LONG),
    Case(
        "uuid_unknown",
        lambda w, r: user({"type": "prompt_embeds", "uuid": NEVER_SENT}),
        errors.REFERENCE_UNKNOWN,
    ),
    Case("uuid_with_data_control", lambda w, r: user(embeds(b64(r), uuid=KEPT)), None),
    Case(
        "more_rows_than_context",
        lambda w, r: user(embeds(b64(r[:1].repeat(1100, 1)))),
        errors.TOO_MANY_ROWS,
    ),
    Case(
        "too_many_parts",
        lambda w, r: [{"role": "user", "content": [embeds(b64(r[:1]))] * 65}],
        errors.TOO_MANY_PARTS,
    ),
    Case(
        "reserved_in_text",
        lambda w, r: [{"role": "user", "content": "a <prompt_embeds> b"}],
        errors.RESERVED_TEXT,
    ),
    Case(
        "reserved_in_name",
        lambda w, r: [{"role": "user", "content": "hi", "name": "<prompt_embeds>"}],
        errors.RESERVED_TEXT,
    ),
    Case(
        "reserved_in_reasoning",
        lambda w, r: [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok", "reasoning": "<prompt_embeds>"},
            {"role": "user", "content": "go"},
        ],
        errors.RESERVED_TEXT,
    ),
    Case(
        "reserved_in_tool_arguments",
        lambda w, r: [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"q": "<prompt_embeds>"}'},
                    }
                ],
            },
            {"role": "tool", "content": "done", "tool_call_id": "call_1"},
        ],
        errors.RESERVED_TEXT,
    ),
    Case("valid_control", lambda w, r: user(embeds(b64(r))), None),
]


# -- the pickle-free encodings (raw, safetensors) ------------------------------------------------


def raw_part(rows: torch.Tensor, **override: Any) -> dict[str, Any]:
    """A valid raw part for ``rows`` (float32), with some fields overridden."""
    data = base64.b64encode(rows.contiguous().view(torch.uint8).numpy().tobytes()).decode()
    part = {"type": "prompt_embeds", "encoding": "raw", "dtype": "float32", "data": data}
    return {**part, "shape": list(rows.shape), **override}


def safetensors_part(file: bytes) -> dict[str, Any]:
    """A safetensors part holding ``file`` as is."""
    return {
        "type": "prompt_embeds",
        "encoding": "safetensors",
        "data": base64.b64encode(file).decode(),
    }


def safetensors_file(tensors: dict[str, torch.Tensor]) -> bytes:
    """A file written by the safetensors library itself."""
    from safetensors.torch import save

    return save(tensors)


def with_header(header: bytes, body: bytes = b"\0" * 64, size: int | None = None) -> bytes:
    """A safetensors file with the given header bytes (and declared header length)."""
    return (len(header) if size is None else size).to_bytes(8, "little") + header + body


CASES.extend(
    [
        Case(
            "raw_length_mismatch",
            lambda w, r: user(raw_part(r, shape=[r.shape[0] + 1, w])),
            errors.RAW_LENGTH,
        ),
        Case(
            "raw_unknown_dtype",
            lambda w, r: user(raw_part(r, dtype="float64")),
            errors.RAW_BAD_DTYPE,
        ),
        # A JSON list is unhashable: once answered with Python's own "unhashable type" text.
        Case(
            "raw_list_dtype",
            lambda w, r: user(raw_part(r, dtype=["float32"])),
            errors.RAW_BAD_DTYPE,
        ),
        Case(
            "raw_negative_dim", lambda w, r: user(raw_part(r, shape=[-1, w])), errors.RAW_BAD_SHAPE
        ),
        Case(
            "raw_overflow_dims",
            lambda w, r: user(raw_part(r, shape=[2**62, w])),
            errors.TOO_MANY_ROWS,
        ),
        Case(
            "raw_overflow_width",
            lambda w, r: user(raw_part(r, shape=[1, 2**64])),
            errors.BAD_WIDTH,
        ),
        Case(
            "raw_missing_shape",
            lambda w, r: user(raw_part(r, shape=None)),
            errors.RAW_MISSING_FIELD,
        ),
        Case(
            "raw_fields_with_torch",
            lambda w, r: user(embeds(b64(r), dtype="float32", shape=list(r.shape))),
            errors.RAW_ONLY_FIELDS,
        ),
        Case(
            "unknown_encoding",
            lambda w, r: user(embeds(b64(r), encoding="pickle")),
            errors.UNKNOWN_ENCODING,
        ),
        Case(
            "safetensors_two_tensors",
            lambda w, r: user(safetensors_part(safetensors_file({"a": r, "b": r.clone()}))),
            errors.SAFETENSORS_COUNT,
        ),
        Case(
            "safetensors_bad_header",
            lambda w, r: user(safetensors_part(with_header(b'{"e": ', size=2**63))),
            errors.SAFETENSORS_BAD,
        ),
        # A deeply nested JSON header: once a RecursionError, answered with a 500.
        Case(
            "safetensors_deep_header",
            lambda w, r: user(safetensors_part(with_header(b"[" * 50_000))),
            errors.SAFETENSORS_BAD,
        ),
        Case(
            "safetensors_int_dtype",
            lambda w, r: user(safetensors_part(safetensors_file({"e": r.to(torch.int32)}))),
            errors.BAD_DTYPE,
        ),
        Case("raw_valid_control", lambda w, r: user(raw_part(r)), None),
        Case(
            "safetensors_valid_control",
            lambda w, r: user(safetensors_part(safetensors_file({"embeddings": r}))),
            None,
        ),
    ]
)


# -- the same bad parts at every place of a chat ---------------------------------------------------

TEXT = {"type": "text", "text": "x ="}
MORE = {"type": "text", "text": " and more"}


def part_of(case: Case, width: int, rows: torch.Tensor) -> dict[str, Any] | None:
    """The one part a ``user(part)`` case sends, or None for cases built another way."""
    messages = case.build(width, rows)
    if len(messages) != 1 or messages[0]["role"] != "user":
        return None
    content = messages[0]["content"]
    if not isinstance(content, list) or len(content) != 2 or content[0] != TEXT:
        return None
    return content[1]


@dataclass(frozen=True)
class Placement:
    """Where a part goes: ``build(part, valid_part)`` gives the messages, ``where`` names it."""

    name: str
    build: Callable[[Any, dict[str, Any]], list[dict[str, Any]]]
    where: str


def _users(*contents: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content} for content in contents]


PLACEMENTS: list[Placement] = [
    Placement("alone", lambda p, v: _users([p]), "messages[0].content[0]"),
    Placement("first", lambda p, v: _users([p, TEXT]), "messages[0].content[0]"),
    Placement("middle", lambda p, v: _users([TEXT, p, MORE]), "messages[0].content[1]"),
    Placement("last", lambda p, v: _users([TEXT, p]), "messages[0].content[1]"),
    Placement("before_a_valid_part", lambda p, v: _users([p, v]), "messages[0].content[0]"),
    Placement("after_a_valid_part", lambda p, v: _users([v, p]), "messages[0].content[1]"),
    Placement(
        "system_alone",
        lambda p, v: [{"role": "system", "content": [p]}, *_users("hi")],
        "messages[0].content[0]",
    ),
    Placement(
        "later_user_message_first",
        lambda p, v: [*_users([TEXT, v]), {"role": "system", "content": "ok"}, *_users([p, MORE])],
        "messages[2].content[0]",
    ),
    Placement(
        "assistant_middle",
        lambda p, v: [
            *_users("hi"),
            {"role": "assistant", "content": [TEXT, p, MORE]},
            *_users("go on"),
        ],
        "messages[1].content[1]",
    ),
    Placement(
        "tool_alone",
        lambda p, v: [
            *_users("hi"),
            {"role": "assistant", "content": "calling"},
            {"role": "tool", "content": [p], "tool_call_id": "call_1"},
        ],
        "messages[2].content[0]",
    ),
]

PART_CASES: list[Case] = [
    c for c in CASES if part_of(c, 8, torch.zeros(2, 8)) is not None
]  # fmt: skip


# -- the same bad payloads as bytes: the upload route and the file part --------------------------


@dataclass(frozen=True)
class BytesCase:
    """A part case as the bytes of an upload: ``kind`` ``raw`` (with ``dtype``, ``shape``) or
    ``safetensors``; ``expect`` as in ``Case``."""

    name: str
    kind: str
    body: bytes
    expect: str | None
    dtype: Any = None
    shape: Any = None

    def params(self) -> dict[str, str]:
        """The query parameters of ``POST /v1/prompt_embeds``."""
        out = {}
        if self.dtype is not None:
            out["dtype"] = str(self.dtype)
        if self.shape is not None:
            out["shape"] = ",".join(str(d) for d in self.shape)
        return out

    def media_type(self) -> str:
        return "application/octet-stream" if self.kind == "raw" else "application/safetensors"

    def file_part(self, media: str = "application/pdf") -> dict[str, Any]:
        """The payload as a ``file`` part (safetensors only; the media type is a lie, as
        LangChain's, and the filename says what it is)."""
        data = base64.b64encode(self.body).decode()
        file = {"file_data": f"data:{media};base64,{data}", "filename": "rows.safetensors"}
        return {"type": "file", "file": file}


_SAFETENSORS_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int32: "I32", torch.bool: "BOOL", torch.complex64: "C64",
}  # fmt: skip
_SMALL = 1 << 20


def tensor_file(tensor: torch.Tensor) -> bytes:
    """A safetensors file of ``tensor``, written by hand so any shape or dtype can be declared;
    a tensor too large to write declares its shape over a short body (its checks come first)."""
    import json

    name = _SAFETENSORS_NAMES[tensor.dtype]
    nbytes = tensor.numel() * tensor.element_size()
    header = {"e": {"dtype": name, "shape": list(tensor.shape), "data_offsets": [0, nbytes]}}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    body = b"" if nbytes > _SMALL else tensor.contiguous().view(torch.uint8).numpy().tobytes()
    return len(head).to_bytes(8, "little") + head + body


def as_bytes(case: Case, width: int, rows: torch.Tensor) -> BytesCase | None:
    """The case's payload as upload bytes, or None where it has no such form (a uuid, a key, an
    encoding name, a JSON type)."""
    part = part_of(case, width, rows)
    if part is None or "uuid" in part or set(part) - {"type", "data", "encoding", "dtype", "shape"}:
        return None
    data, encoding = part.get("data"), part.get("encoding", "torch")
    if not isinstance(data, str) or encoding not in ("torch", "raw", "safetensors"):
        return None
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        return None
    if encoding == "raw":
        expect = errors.RAW_BODY_LENGTH if case.expect == errors.RAW_LENGTH else case.expect
        return BytesCase(case.name, "raw", raw, expect, part.get("dtype"), part.get("shape"))
    if encoding == "safetensors" or not raw:
        return BytesCase(case.name, "safetensors", raw, case.expect)
    if "dtype" in part or "shape" in part:  # raw fields beside a safetensors body
        return BytesCase(case.name, "safetensors", raw, case.expect, part.get("dtype"))
    try:
        value = torch.load(io.BytesIO(raw), weights_only=True)
    except Exception:
        value = None
    if (
        isinstance(value, torch.Tensor)
        and value.layout == torch.strided
        and value.dtype in _SAFETENSORS_NAMES
    ):
        return BytesCase(case.name, "safetensors", tensor_file(value), case.expect)
    # Not a tensor a safetensors file can hold (a pickle, a sparse tensor, junk): as the file.
    return BytesCase(case.name, "safetensors", raw, errors.SAFETENSORS_BAD)

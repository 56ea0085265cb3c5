"""Unit tests for rows uploaded as bytes (``stores/uploads.py``), rows as ``file`` parts
(``renderers/file_parts.py`` through ``parts.extract_parts``) and their client helpers."""

from __future__ import annotations

import asyncio
import base64
import re
import string
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm.exceptions import VLLMValidationError

from vllm_chat_embeds import errors
from vllm_chat_embeds.limits import Limits
from vllm_chat_embeds.payload import PayloadSpec
from vllm_chat_embeds.renderers import parts as parts_module
from vllm_chat_embeds.renderers.file_parts import holds_rows
from vllm_chat_embeds.renderers.parts import extract_parts
from vllm_chat_embeds.stores import references, uploads

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hostile_cases import PART_CASES, as_bytes, tensor_file  # noqa: E402

pytestmark = pytest.mark.unit

WIDTH = 8
SPEC = PayloadSpec(
    width=WIDTH, dtype=torch.float32, max_part_bytes=1 << 20, max_rows=64, rows_limit=64
)
WHERE = errors.UPLOAD_WHERE


@pytest.fixture(autouse=True)
def fresh_store() -> Iterator[None]:
    references.configure(1 << 20)
    yield
    references.configure(1 << 20)


def template_regex(template: str) -> re.Pattern[str]:
    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if field is not None:
            out.append(".*?")
    return re.compile("".join(out), re.DOTALL)


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]
        yield b""  # Starlette's stream ends with an empty chunk; any may be empty


def upload(body: bytes, kind: str = "safetensors", *, chunk: int = 7, known: bool = True, **kw):
    async def run():
        size = len(body) if known else None
        got, nbytes = await uploads.receive_rows(
            _chunks(body, chunk), kind, SPEC, WHERE, size=size, **kw
        )
        return uploads.keep(got, SPEC, WHERE, filename="f", purpose="p", size=nbytes)

    return asyncio.run(run())


def refused(body: bytes, kind: str = "safetensors", **kw: Any) -> str:
    with pytest.raises(VLLMValidationError) as info:
        upload(body, kind, **kw)
    return str(info.value)


def test_rows_arrive_whole_in_any_chunking_and_are_kept_without_a_copy() -> None:
    rows = torch.randn(5, WIDTH)
    for chunk in (1, 3, 64, 1 << 20):
        for known in (True, False):
            done, kept = upload(tensor_file(rows), chunk=chunk, known=known)
            assert torch.equal(kept, rows)
            assert references.process_store().get(done.id) is kept
    raw = rows.to(torch.float16)
    done, kept = upload(
        raw.view(torch.uint8).numpy().tobytes(), "raw", dtype="float16", shape=[5, WIDTH]
    )
    assert kept.dtype == torch.float16 and torch.equal(kept, raw)  # kept as carried, as inline
    assert done.id.startswith(uploads.UPLOAD_ID_PREFIX) and uploads.find(done.id, SPEC) is not None
    assert done.bytes == 5 * WIDTH * 2


@pytest.mark.parametrize("case", PART_CASES, ids=lambda c: c.name)
def test_every_hostile_payload_as_bytes_gets_the_parts_message_and_nothing_is_kept(case) -> None:
    as_upload = as_bytes(case, WIDTH, torch.randn(3, WIDTH))
    if as_upload is None:
        pytest.skip("no bytes form")
    kwargs = {"dtype": as_upload.dtype, "shape": as_upload.shape}
    if as_upload.expect is None:
        upload(as_upload.body, as_upload.kind, **kwargs)
        return
    held = references.process_store().held_bytes()
    for known in (True, False):
        message = refused(as_upload.body, as_upload.kind, known=known, **kwargs)
        assert template_regex(as_upload.expect).match(message), message
        assert message.startswith(WHERE) or "{where}" not in as_upload.expect
    assert references.process_store().held_bytes() == held and not uploads.listing()


def test_limits_hold_before_any_rows_are_read() -> None:
    big = tensor_file(torch.randn(40, WIDTH))
    references.configure(100)
    assert template_regex(errors.UPLOAD_OVER_STORE).match(refused(big))
    references.configure(0)
    assert template_regex(errors.UPLOAD_REFERENCES_OFF).match(refused(big))
    references.configure(1 << 20)
    small = PayloadSpec(width=WIDTH, dtype=torch.float32, max_part_bytes=256, max_rows=64,
                        rows_limit=64)  # fmt: skip

    async def run(known: bool):
        await uploads.receive_rows(
            _chunks(big, 64), "safetensors", small, WHERE, size=len(big) if known else None
        )

    for known in (True, False):
        with pytest.raises(VLLMValidationError, match="CHAT_EMBEDS_MAX_PART_BYTES"):
            asyncio.run(run(known))


def test_a_body_longer_or_shorter_than_its_shape_is_refused() -> None:
    body = torch.randn(3, WIDTH).numpy().tobytes()
    for extra in (body + b"\0" * 4, body[:-4]):
        for known in (True, False):
            message = refused(extra, "raw", dtype="float32", shape=[3, WIDTH], known=known)
            assert template_regex(errors.RAW_BODY_LENGTH).match(message), message
    file = tensor_file(torch.randn(3, WIDTH))
    for bad in (file + b"\0", file[:-1]):
        assert "safetensors" in refused(bad, known=False)


def test_listing_delete_and_eviction() -> None:
    references.configure(3 * 4 * WIDTH * 4)
    first, _ = upload(tensor_file(torch.randn(4, WIDTH)))
    second, _ = upload(tensor_file(torch.randn(4, WIDTH)))
    assert [u.id for u in uploads.listing()] == [first.id, second.id]
    upload(tensor_file(torch.randn(4, WIDTH)))
    upload(tensor_file(torch.randn(4, WIDTH)))  # evicts the first
    assert uploads.find(first.id, SPEC) is None
    assert first.id not in [u.id for u in uploads.listing()]
    assert uploads.delete(second.id) and not uploads.delete(second.id)
    assert references.process_store().get(second.id) is None


# -- file parts ----------------------------------------------------------------------------------


def file_part(body: bytes, media: str = "application/pdf", name: str | None = "r.pdf") -> dict:
    data = base64.b64encode(body).decode()
    file: dict[str, Any] = {"file_data": f"data:{media};base64,{data}"}
    if name is not None:
        file["filename"] = name
    return {"type": "file", "file": file}


def user(*content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "x"}, *content]}]


def extracted(messages: list[Any], enabled: bool = True):
    return extract_parts(messages, enabled=enabled, spec=SPEC, limits=Limits())


def test_file_parts_holding_rows_are_served_as_prompt_embeds_parts() -> None:
    rows = torch.randn(3, WIDTH)
    body = tensor_file(rows)
    for part in (
        file_part(body),  # by content, whatever the media type
        file_part(body, "application/safetensors", None),
        file_part(base64.b64decode(base64.b64encode(body)), "text/plain", "rows.SAFETENSORS"),
        {"type": "input_file", "file_data": file_part(body)["file"]["file_data"]},
    ):
        assert holds_rows(part)
        out, plan = extracted(user(part))
        assert plan is not None and torch.equal(plan.parts[0].tensor, rows)
        assert out[0]["content"][1] == {"type": "text", "text": plan.parts[0].marker}
    # file_data with a file_id keeps the rows under it; the id alone refers to them after.
    kept = {"type": "file", "file": {**file_part(body)["file"], "file_id": "mine"}}
    extracted(user(kept))
    _, plan = extracted(user({"type": "file", "file": {"file_id": "mine"}}))
    assert plan is not None and torch.equal(plan.parts[0].tensor, rows)


def test_file_parts_without_rows_and_without_prompt_embeds_are_left_alone() -> None:
    pdf = file_part(b"%PDF-1.4 not rows at all")
    unknown_id = {"type": "file", "file": {"file_id": "file-abc123"}}
    for part in (pdf, unknown_id, {"type": "file", "file": "x"}, {"type": "file"}):
        assert not holds_rows(part)
        out, plan = extracted(user(part))
        assert plan is None and out[0]["content"][1] == part
    rows_part = file_part(tensor_file(torch.randn(2, WIDTH)))
    assert extracted(user(rows_part), enabled=False)[1] is None


def test_file_part_errors_are_the_part_messages_naming_the_part() -> None:
    ours = {"type": "file", "file": {"file_id": uploads.UPLOAD_ID_PREFIX + "0" * 32}}
    with pytest.raises(VLLMValidationError) as info:
        extracted(user(ours))
    where, uuid = "messages[0].content[1]", ours["file"]["file_id"]
    assert str(info.value).startswith(errors.REFERENCE_UNKNOWN.format(where=where, uuid=uuid))
    for body, expect in (
        (tensor_file(torch.full((2, WIDTH), float("nan"))), errors.NOT_FINITE),
        (tensor_file(torch.randn(2, WIDTH + 1)), errors.BAD_WIDTH),
        (b"not safetensors", errors.SAFETENSORS_BAD),
    ):
        with pytest.raises(VLLMValidationError) as info:
            extracted(user(file_part(body, name="rows.safetensors")))
        message = str(info.value)
        assert template_regex(expect).match(message) and "messages[0].content[1]" in message


def test_file_parts_count_as_parts_only_where_parts_are_served() -> None:
    part = file_part(tensor_file(torch.randn(2, WIDTH)))
    before = parts_module.placeholder_text_reserved()
    try:
        parts_module._reserved_in_process = False
        assert not parts_module.is_embeds_part(part)
        parts_module.reserve_placeholder_text()
        assert parts_module.is_embeds_part(part)
    finally:
        parts_module._reserved_in_process = before


# -- client helpers ------------------------------------------------------------------------------


def test_client_file_part_round_trips_in_each_float_dtype() -> None:
    import numpy as np

    from vllm_chat_embeds import client

    for rows in (np.random.rand(3, WIDTH).astype(np.float16), torch.randn(3, WIDTH).bfloat16()):
        part = client.file_part(rows)
        _, plan = extracted(user(part))
        assert plan is not None
        assert torch.equal(plan.parts[0].tensor, torch.as_tensor(rows).float())
        _, plan = extracted(user(client.responses_file_part(part)))
        assert plan is not None


def test_conversation_in_file_shape_sends_file_data_once_then_file_id() -> None:
    from vllm_chat_embeds.client import Conversation

    sent: list[Any] = []

    def create(*, messages: list[Any]) -> Any:
        sent.append(messages)
        try:
            return [p.tensor for p in extracted(messages)[1].parts]  # type: ignore[union-attr]
        except VLLMValidationError as exc:
            raise RuntimeError(str(exc)) from exc

    chat = Conversation(shape="file")
    rows = torch.randn(2, WIDTH)
    messages = user(chat.part(rows))
    first = chat.send(create, messages=messages)
    second = chat.send(create, messages=messages)
    assert torch.equal(first[0], second[0])
    assert set(sent[1][0]["content"][1]["file"]) == {"file_id"}
    references.configure(1 << 20)  # forgotten: resent once with the data
    assert torch.equal(chat.send(create, messages=messages)[0], rows) and chat.resends == 1


def test_client_constants_are_the_servers() -> None:
    from vllm_chat_embeds import client

    assert client.ROWS_ID_PREFIX == uploads.UPLOAD_ID_PREFIX


class _ServerSink:
    """What ``entrypoints/body_sink`` lends: the server writes up to the view's length."""

    def __init__(self, view: memoryview, body: bytes) -> None:
        self.got = min(len(view), len(body))
        view[: self.got] = body[: self.got]
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("kind", ["raw", "safetensors"])
@pytest.mark.parametrize("extra", [0, 5])
def test_rows_written_by_the_server_into_a_lent_buffer(kind, extra):
    """The rows' buffer lent to the server: its bytes, then what did not fit as chunks (a
    body longer than declared is refused, as without the sink)."""
    rows = torch.randn(3, WIDTH)
    body = tensor_file(rows) if kind == "safetensors" else rows.numpy().tobytes()
    body += b"\0" * extra
    header = 0 if kind == "raw" else 8 + int.from_bytes(body[:8], "little")
    sinks: list[_ServerSink] = []

    def lend(view: memoryview) -> _ServerSink:
        sinks.append(_ServerSink(view, body[header:]))
        return sinks[-1]

    async def rest() -> AsyncIterator[bytes]:  # the header as chunks, then what overflowed
        yield body[:header]
        yield body[header + sinks[0].got :] if sinks else body[header:]
        yield b""

    async def run():
        return (
            await uploads.receive_rows(
                rest(), kind, SPEC, WHERE, dtype="float32", shape=[3, WIDTH], lend=lend
            )
            if kind == "raw"
            else await uploads.receive_rows(rest(), kind, SPEC, WHERE, lend=lend)
        )

    if extra:
        with pytest.raises(VLLMValidationError):
            asyncio.run(run())
    else:
        got, nbytes = asyncio.run(run())
        assert torch.equal(got, rows) and nbytes == len(body)
    assert len(sinks) == 1 and sinks[0].closed and sinks[0].got == 3 * WIDTH * 4

"""Reused decode buffers: a buffer is reused only when no tensor over it is left anywhere."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from vllm.exceptions import VLLMValidationError

from vllm_chat_embeds import decode_buffers, errors
from vllm_chat_embeds.decode_buffers import POOL_ABOVE_BYTES, BufferPool, decoded_size
from vllm_chat_embeds.limits import ENV_DECODE_POOL_BYTES, Limits
from vllm_chat_embeds.payload import PayloadSpec, decode_payload
from vllm_chat_embeds.renderers.splice import build_embeds_input
from vllm_chat_embeds.transport import shared_rows

pytestmark = pytest.mark.unit

WIDTH = 1024
ROWS = POOL_ABOVE_BYTES // (WIDTH * 4) + 1  # the smallest float32 payload that is pooled
WHERE = errors.PART_WHERE.format(msg=0, part=1)
SPEC = PayloadSpec(
    width=WIDTH, dtype=torch.float32, max_part_bytes=1 << 30, max_rows=1 << 20, rows_limit=1 << 20
)


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[BufferPool]:
    """A pool of its own, with shared memory off (rows would go to segments first)."""
    monkeypatch.setattr(decode_buffers, "_pool", BufferPool(4 * POOL_ABOVE_BYTES))
    shared_rows.configure(Limits(shm_bytes=0))
    yield decode_buffers.pool()
    shared_rows.configure(Limits())


def payload(seed: int, rows: int = ROWS) -> tuple[torch.Tensor, str]:
    tensor = torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(seed))
    return tensor, base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def decode(data: str, rows: int = ROWS, encoding: str = "raw") -> torch.Tensor:
    if encoding == "safetensors":
        return decode_payload(data, WHERE, SPEC, encoding="safetensors")
    return decode_payload(data, WHERE, SPEC, encoding="raw", dtype="float32", shape=[rows, WIDTH])


def test_live_tensor_is_never_overwritten(fresh_pool: BufferPool) -> None:
    source_a, data_a = payload(1)
    source_b, data_b = payload(2)
    a = decode(data_a)
    b = decode(data_b)
    assert a.data_ptr() != b.data_ptr()
    assert torch.equal(a, source_a) and torch.equal(b, source_b)


def test_freed_buffer_is_reused(fresh_pool: BufferPool) -> None:
    source_a, data_a = payload(1)
    source_b, data_b = payload(2)
    a = decode(data_a)
    address = a.data_ptr()
    held = fresh_pool.held_bytes()
    del a
    b = decode(data_b)
    assert b.data_ptr() == address
    assert fresh_pool.held_bytes() == held
    assert torch.equal(b, source_b)


def test_a_view_or_array_keeps_the_buffer_busy(fresh_pool: BufferPool) -> None:
    source_a, data_a = payload(1)
    _, data_b = payload(2)
    a = decode(data_a)
    keep = [a[3:5], a.numpy()[7]]
    del a
    b = decode(data_b)
    c = decode(data_b)
    assert torch.equal(keep[0], source_a[3:5])
    assert (keep[1] == source_a[7].numpy()).all()
    assert b.data_ptr() != c.data_ptr()


def test_engine_input_keeps_its_rows(fresh_pool: BufferPool) -> None:
    # A single-part chat sends the decoded tensor itself to the engine (no copy): the next
    # request must not decode into it while the engine input lives.
    source_a, data_a = payload(1)
    _, data_b = payload(2)
    rows = decode(data_a)
    ids = [5] + [99] * ROWS + [6]
    engine_input = build_embeds_input(ids, [rows], 99)
    del rows
    decode(data_b)
    assert torch.equal(engine_input["prompt_embeds"], source_a)


def test_safetensors_payloads_are_pooled_too(fresh_pool: BufferPool) -> None:
    from safetensors.torch import save

    source, _ = payload(3)
    data = base64.b64encode(save({"x": source})).decode("ascii")
    first = decode(data, encoding="safetensors")
    assert torch.equal(first, source)
    address = first.data_ptr()
    del first
    assert decode(data, encoding="safetensors").data_ptr() == address


def test_bad_base64_in_a_later_chunk_is_named(fresh_pool: BufferPool) -> None:
    _, data = payload(4)
    middle = len(data) // 2 // 4 * 4
    for bad in (
        data[:middle] + "!" + data[middle + 1 :],
        data[:middle] + "====" + data[middle + 4 :],
    ):
        with pytest.raises(VLLMValidationError) as info:
            decode(bad)
        assert info.value.args[0].startswith(errors.NOT_BASE64.split("(")[0].format(where=WHERE))
    assert decode(data) is not None  # the pool still works afterwards


def test_capacity_bounds_what_is_kept() -> None:
    pool = BufferPool(3 * POOL_ABOVE_BYTES)
    views = [pool.lend(POOL_ABOVE_BYTES) for _ in range(5)]  # all busy: 3 kept, 2 one-offs
    assert pool.held_bytes() == 3 * POOL_ABOVE_BYTES
    del views
    big = pool.lend(2 * POOL_ABOVE_BYTES)  # replaces free smaller buffers to stay in bounds
    assert len(big) == 2 * POOL_ABOVE_BYTES
    assert pool.held_bytes() <= 3 * POOL_ABOVE_BYTES


def test_pool_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DECODE_POOL_BYTES, "0")
    decode_buffers.configure(Limits.from_env().decode_pool_bytes)
    source, data = payload(5)
    assert torch.equal(decode(data), source)
    assert decode_buffers.pool().held_bytes() == 0
    monkeypatch.setenv(ENV_DECODE_POOL_BYTES, "-3")
    with pytest.raises(ValueError, match=f"{ENV_DECODE_POOL_BYTES} must be a non-negative"):
        Limits.from_env()


@pytest.mark.parametrize(
    ("text", "size"), [("", 0), ("QQ==", 1), ("QUI=", 2), ("QUJD", 3), ("QUJ", None)]
)
def test_decoded_size(text: str, size: int | None) -> None:
    assert decoded_size(text) == size


def test_casts_of_large_payloads_land_in_pooled_buffers(fresh_pool: BufferPool) -> None:
    # float16 rows are cast for a bfloat16 model (under float32 they would stay as sent);
    # twice the rows, so the 2-byte cast is as large as a pooled float32 payload.
    source, _ = payload(6, rows=2 * ROWS)
    half = source.to(torch.float16)
    data = base64.b64encode(half.numpy().tobytes()).decode("ascii")
    spec = replace(SPEC, dtype=torch.bfloat16)

    def decode_half() -> torch.Tensor:
        return decode_payload(
            data, WHERE, spec, encoding="raw", dtype="float16", shape=[2 * ROWS, WIDTH]
        )

    first = decode_half()
    second = decode_half()
    assert first.dtype == torch.bfloat16 and torch.equal(first, half.to(torch.bfloat16))
    assert first.data_ptr() != second.data_ptr() and torch.equal(second, first)
    address = first.data_ptr()
    del first
    assert decode_half().data_ptr() == address

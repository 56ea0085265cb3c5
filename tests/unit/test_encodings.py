"""Unit tests for the pickle-free payload encodings ``raw`` and ``safetensors``.

Why: these encodings parse client bytes with our own code (lengths, shapes, a JSON header), so
every malformed field must end in the plugin's own 400 naming the part, decided before
anything large is decoded; and the client helper must produce exactly what the server takes.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from payload_spec import MAX_ROWS, WIDTH, make_spec
from safetensors.torch import save as save_safetensors
from vllm.exceptions import VLLMValidationError

from vllm_chat_embeds import errors, payload
from vllm_chat_embeds.client import Encoding, WireDtype, prompt_embeds_part
from vllm_chat_embeds.limits import ALL_ENCODINGS, ENV_ENCODINGS, Limits
from vllm_chat_embeds.payload import PayloadSpec, carried_dtype, decode_payload
from vllm_chat_embeds.renderers.parts import ALLOWED_KEYS, extract_parts

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
WHERE = errors.PART_WHERE.format(msg=1, part=2)
ENCODINGS: list[Encoding] = ["raw", "safetensors", "torch"]
PICKLE_FREE_ENCODINGS: list[Encoding] = ["raw", "safetensors"]
WIRE: dict[WireDtype, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Round-to-nearest keeps the relative error within half an ulp of the wire dtype.
CAST_RTOL = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}
SOURCE = torch.randn(5, WIDTH, generator=torch.Generator().manual_seed(0))
LITTLE_ENDIAN = pytest.mark.skipif(sys.byteorder != "little", reason="views need a LE host")


SPEC = make_spec()


def decode_part(part: dict[str, Any], spec: PayloadSpec = SPEC) -> torch.Tensor:
    """Decode a content part the way ``parts.extract_parts`` does."""
    return decode_payload(
        part["data"],
        WHERE,
        spec,
        encoding=part.get("encoding"),
        dtype=part.get("dtype"),
        shape=part.get("shape"),
    )


def rejected(data: object, spec: PayloadSpec = SPEC, **fields: object) -> str:
    """Decode, expect the plugin's own 400, return its message (without the parameter)."""
    with pytest.raises(VLLMValidationError) as info:
        decode_payload(data, WHERE, spec, **fields)
    assert type(info.value) is VLLMValidationError
    assert info.value.parameter == "messages"
    return info.value.args[0]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def torch_b64(obj: object) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return b64(buf.getvalue())


def raw_b64(tensor: torch.Tensor) -> str:
    return b64(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def st_file(header: object, body: bytes = b"", *, text: bytes | None = None, size=None) -> bytes:
    """A safetensors file from a header object (or header bytes), with its 8-byte length."""
    text = json.dumps(header).encode() if text is None else text
    return (len(text) if size is None else size).to_bytes(8, "little") + text + body


def entry(shape: object, dtype: object = "F32", offsets: object = None) -> dict[str, object]:
    if offsets is None:
        offsets = [0, math.prod(shape) * 4]  # type: ignore[arg-type]
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def st_bad(reason: str) -> str:
    return errors.SAFETENSORS_BAD.format(where=WHERE, reason=reason)


def source_input(kind: str, wire: WireDtype) -> Any:
    """SOURCE rounded to the wire dtype, as a torch tensor or a NumPy array."""
    rounded = SOURCE.to(WIRE[wire])
    return rounded if kind == "torch" else rounded.numpy()


# NumPy has no bfloat16: that input does not exist (the client's refusal is tested below).
KINDS_AND_WIRES = [
    (k, w) for k in ("numpy", "torch") for w in WIRE if (k, w) != ("numpy", "bfloat16")
]


# -- round trips through the client helper -----------------------------------------------------


@pytest.mark.parametrize(("kind", "wire"), KINDS_AND_WIRES)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_in_the_arrays_own_dtype(encoding: Encoding, kind: str, wire: WireDtype) -> None:
    part = prompt_embeds_part(source_input(kind, wire), encoding=encoding)
    assert set(part) <= ALLOWED_KEYS
    assert part.get("encoding") == (None if encoding == "torch" else encoding)
    if encoding == "raw":
        assert part["dtype"] == wire
        assert part["shape"] == [5, WIDTH]
    out = decode_part(part)
    # Half-width rows stay as sent under a float32 model (the worker widens them).
    assert out.dtype == WIRE[wire] and out.shape == (5, WIDTH) and out.is_contiguous()
    # Exact against the rounded values, within the cast's tolerance against the originals.
    assert torch.equal(out.float(), SOURCE.to(WIRE[wire]).float())
    torch.testing.assert_close(out.float(), SOURCE, rtol=CAST_RTOL[wire], atol=1e-7)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("wire", list(WIRE))
@pytest.mark.parametrize("encoding", PICKLE_FREE_ENCODINGS)
def test_client_casts_to_the_requested_wire_dtype(
    encoding: Encoding, wire: WireDtype, kind: str
) -> None:
    array: Any = SOURCE if kind == "torch" else SOURCE.numpy()
    if kind == "numpy" and wire == "bfloat16":
        with pytest.raises(ValueError, match="bfloat16 needs a torch.Tensor"):
            prompt_embeds_part(array, encoding=encoding, dtype=wire)
        return
    part = prompt_embeds_part(array, encoding=encoding, dtype=wire)
    out = decode_part(part, make_spec(WIRE[wire]))
    assert out.dtype == WIRE[wire]
    assert torch.equal(out, SOURCE.to(WIRE[wire]))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("spec_dtype", [torch.float16, torch.bfloat16])
def test_server_casts_float32_wire_to_the_model_dtype(encoding: Encoding, spec_dtype) -> None:
    out = decode_part(prompt_embeds_part(SOURCE, encoding=encoding), make_spec(spec_dtype))
    assert out.dtype == spec_dtype
    assert torch.equal(out, SOURCE.to(spec_dtype))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_float64_and_odd_layouts_are_sent_compactly(encoding: Encoding) -> None:
    """Views (transposed, sliced, reversed) and float64 arrays all encode to just their rows."""
    base = torch.randn(400, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inputs: list[Any] = [
        base[:3],
        base[:WIDTH, :WIDTH].t(),
        base.numpy()[::-1][:4],
        base.numpy()[:6:2],
    ]
    for array in inputs:
        part = prompt_embeds_part(array, encoding=encoding)
        expected = torch.as_tensor(np.ascontiguousarray(array)).float()
        assert torch.equal(decode_part(part), expected)
        # Never the whole 400-row base (34 kB of base64): the rows plus a small header.
        assert len(part["data"]) < 4 * expected.numel() * 8 // 3 + 4096


def test_client_refuses_non_2d_and_unknown_encoding() -> None:
    with pytest.raises(ValueError, match="must be 2-D"):
        prompt_embeds_part(np.zeros(WIDTH, dtype=np.float32))
    with pytest.raises(ValueError, match="encoding must be"):
        prompt_embeds_part(np.zeros((1, WIDTH), dtype=np.float32), encoding="pickle")  # type: ignore[arg-type]


@LITTLE_ENDIAN
@pytest.mark.parametrize("wire", list(WIRE))
@pytest.mark.parametrize("encoding", PICKLE_FREE_ENCODINGS)
def test_decoded_tensor_is_a_view_of_the_decoded_buffer(
    monkeypatch, encoding: Encoding, wire: WireDtype
) -> None:
    """In the model dtype, raw and safetensors cost one base64 decode and no further copy."""
    decoded: list[bytearray] = []
    real = payload.pybase64.b64decode_as_bytearray

    def spy(*args: Any, **kwargs: Any) -> bytearray:
        decoded.append(real(*args, **kwargs))
        return decoded[-1]

    monkeypatch.setattr(payload.pybase64, "b64decode_as_bytearray", spy)
    dtype = WIRE[wire]
    part = prompt_embeds_part(SOURCE.to(dtype), encoding=encoding)
    out = decode_part(part, make_spec(dtype))
    (buffer,) = decoded
    nbytes = 5 * WIDTH * dtype.itemsize
    assert out.untyped_storage().nbytes() == nbytes
    start = len(buffer) - nbytes  # the single tensor's data ends the file in both encodings
    assert out.data_ptr() == torch.frombuffer(buffer, dtype=torch.uint8).data_ptr() + start
    buffer[start : start + dtype.itemsize] = bytes(dtype.itemsize)  # write through the buffer
    assert out[0, 0].item() == 0.0
    assert torch.equal(out[1:], SOURCE.to(dtype)[1:])


# -- raw: malformed fields ---------------------------------------------------------------------


def raw(shape: object = (2, WIDTH), dtype: object = "float32", data: str | None = None) -> dict:
    """Fields for decode_payload: a valid 2-row float32 raw payload unless overridden."""
    if data is None:
        data = raw_b64(torch.ones(2, WIDTH))
    shape = list(shape) if isinstance(shape, tuple) else shape
    return {"data": data, "encoding": "raw", "dtype": dtype, "shape": shape}


@pytest.mark.parametrize("delta", [-4, -1, 1, 4, 1000])
def test_raw_length_mismatch_is_refused_with_both_sizes(delta: int) -> None:
    good = raw_b64(torch.ones(2, WIDTH))
    assert len(good) == 88
    data = (good + "A" * 1000)[: len(good) + delta]
    message = rejected(**raw(data=data))
    assert message == errors.RAW_LENGTH.format(
        where=WHERE, got=len(data), shape=[2, WIDTH], dtype="float32", expected=88, nbytes=64
    )


def test_raw_length_is_decided_before_decoding(monkeypatch) -> None:
    def no_decode(*args: Any, **kwargs: Any) -> bytearray:
        raise AssertionError("decoded before the length check")

    monkeypatch.setattr(payload.pybase64, "b64decode_as_bytearray", no_decode)
    # Not base64 at all, and 8 MiB of it: a decoder that ran first would say NOT_BASE64.
    data = "!" * (8 << 20)
    message = rejected(**raw(data=data, shape=[1, WIDTH], dtype="float16"))
    assert message == errors.RAW_LENGTH.format(
        where=WHERE, got=len(data), shape=[1, WIDTH], dtype="float16", expected=24, nbytes=16
    )


def test_raw_right_length_but_not_base64() -> None:
    message = rejected(**raw(data="!" * 88))
    assert message.startswith(errors.NOT_BASE64.split("(")[0].format(where=WHERE))


def test_raw_right_length_but_early_padding_decodes_short() -> None:
    # [1, 8] float32 is 32 bytes, 44 characters ending in one "="; "==" decodes to 31 bytes.
    message = rejected(**raw(data="A" * 42 + "==", shape=[1, WIDTH]))
    assert message == errors.NOT_BASE64.format(where=WHERE, reason="decoded to 31 bytes")


@pytest.mark.parametrize("dtype", ["float64", "int8", "F32", "Float32", "", 32, ["float32"], {}])
def test_raw_unknown_dtype(dtype: object) -> None:
    message = rejected(**raw(dtype=dtype))
    assert message == errors.RAW_BAD_DTYPE.format(where=WHERE, got=repr(dtype))


@pytest.mark.parametrize(
    "shape",
    [[-1, WIDTH], [-(2**62), WIDTH], [2, -WIDTH], [1, 0], [0, 0], [-1, -1]],
)
def test_raw_negative_or_zero_width_dims(shape: list[int]) -> None:
    assert rejected(**raw(shape=shape)) == errors.RAW_BAD_SHAPE.format(
        where=WHERE, width=WIDTH, got=shape
    )


def test_raw_zero_rows() -> None:
    assert rejected(**raw(shape=[0, WIDTH])) == errors.ZERO_ROWS.format(where=WHERE)


@pytest.mark.parametrize("width", [1, WIDTH + 1, 2**62, 10**30])
def test_raw_wrong_or_overflowing_width(width: int) -> None:
    message = rejected(**raw(shape=[2**62, width]))
    assert message == errors.BAD_WIDTH.format(where=WHERE, got=width, width=WIDTH)


@pytest.mark.parametrize("rows", [MAX_ROWS + 1, 2**62, 2**64, 10**30])
def test_raw_overflowing_rows(rows: int) -> None:
    message = rejected(**raw(shape=[rows, WIDTH]))
    assert message == errors.TOO_MANY_ROWS.format(where=WHERE, limit=MAX_ROWS)


def test_raw_overflowing_rows_under_a_huge_row_limit_hit_the_byte_limit() -> None:
    spec = make_spec(max_rows=2**80, rows_limit=2**80)
    message = rejected(spec=spec, **raw(shape=[2**62, WIDTH]))
    assert message == errors.TOO_MANY_BYTES.format(
        where=WHERE, size=2**62 * WIDTH * 4, limit=1 << 20
    )


def test_raw_rows_over_remaining_budget_names_request_limit() -> None:
    spec = make_spec(max_rows=1, rows_limit=100)
    assert rejected(spec=spec, **raw()) == errors.TOO_MANY_ROWS.format(where=WHERE, limit=100)


@pytest.mark.parametrize("shape", [[WIDTH], [1, 2, WIDTH], [], [1, 1, 1, WIDTH]])
def test_raw_wrong_number_of_dims(shape: list[int]) -> None:
    assert rejected(**raw(shape=shape)) == errors.RAW_BAD_SHAPE.format(
        where=WHERE, width=WIDTH, got=shape
    )


@pytest.mark.parametrize(
    "shape",
    [
        [2.0, WIDTH],
        [2, float(WIDTH)],
        ["2", WIDTH],
        [None, WIDTH],
        [[2], WIDTH],
        [True, WIDTH],
        [2, True],
        [False, False],
        "2,8",
        WIDTH,
        {"rows": 2, "width": WIDTH},
    ],
)
def test_raw_non_integer_dims(shape: object) -> None:
    assert rejected(**raw(shape=shape)) == errors.RAW_BAD_SHAPE.format(
        where=WHERE, width=WIDTH, got=repr(shape)
    )


def test_raw_shape_as_tuple_is_accepted_offline() -> None:
    fields = raw()
    fields["shape"] = (2, WIDTH)
    out = decode_payload(fields.pop("data"), WHERE, SPEC, **fields)
    assert torch.equal(out, torch.ones(2, WIDTH))


@pytest.mark.parametrize("field", ["dtype", "shape"])
def test_raw_missing_field(field: str) -> None:
    fields = raw()
    fields[field] = None
    assert rejected(**fields) == errors.RAW_MISSING_FIELD.format(where=WHERE, field=field)


def test_raw_missing_both_names_dtype_first() -> None:
    message = rejected(**raw(dtype=None, shape=None))
    assert message == errors.RAW_MISSING_FIELD.format(where=WHERE, field="dtype")


@pytest.mark.parametrize("encoding", [None, "torch", "safetensors"])
@pytest.mark.parametrize(
    "extra", [{"dtype": "float32"}, {"shape": [2, WIDTH]}, {"dtype": "x", "shape": "y"}]
)
def test_dtype_and_shape_apply_to_raw_only(encoding: Encoding | None, extra: dict) -> None:
    data = prompt_embeds_part(SOURCE, encoding=encoding or "torch")["data"]
    message = rejected(data, encoding=encoding, **extra)
    assert message == errors.RAW_ONLY_FIELDS.format(where=WHERE)


@pytest.mark.parametrize("encoding", ["RAW", "Torch", "pickle", "numpy", "", 0, ["raw"], {}])
def test_unknown_encoding(encoding: object) -> None:
    message = rejected(torch_b64(torch.ones(1, WIDTH)), encoding=encoding)
    assert message == errors.UNKNOWN_ENCODING.format(where=WHERE, got=repr(encoding))


def test_raw_refuses_a_tensor_given_directly() -> None:
    message = rejected(torch.ones(2, WIDTH), encoding="raw", dtype="float32", shape=[2, WIDTH])
    assert message == errors.DATA_WRONG_TYPE.format(where=WHERE, got="Tensor")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("wire", list(WIRE))
def test_raw_non_finite_values(wire: WireDtype, bad: float) -> None:
    values = SOURCE.to(WIRE[wire], copy=True)
    values[3, 1] = bad
    message = decode_error(prompt_embeds_part(values, encoding="raw"))
    assert message == errors.NOT_FINITE.format(where=WHERE)


def test_raw_float32_overflowing_a_float16_model() -> None:
    values = SOURCE.clone()
    values[0, 0] = 1e6  # finite in float32, inf in float16
    part = prompt_embeds_part(values, encoding="raw")
    assert decode_error(part, make_spec(torch.float16)) == errors.NOT_FINITE.format(where=WHERE)
    assert decode_part(part)[0, 0].item() == 1e6


def test_raw_over_part_byte_limit_before_decoding() -> None:
    spec = make_spec(max_part_bytes=100)
    message = rejected(spec=spec, **raw(data="!", shape=[4, WIDTH]))
    assert message == errors.TOO_MANY_BYTES.format(where=WHERE, size=128, limit=100)


def decode_error(part: dict[str, Any], spec: PayloadSpec = SPEC) -> str:
    with pytest.raises(VLLMValidationError) as info:
        decode_part(part, spec)
    return info.value.args[0]


# -- safetensors: malformed files --------------------------------------------------------------


def st_rejected(raw_file: bytes, spec: PayloadSpec = SPEC) -> str:
    return rejected(b64(raw_file), spec, encoding="safetensors")


def valid_st(rows: int = 2) -> bytes:
    return save_safetensors({"embeddings": torch.ones(rows, WIDTH)})


@pytest.mark.parametrize(
    "header", [{}, {"__metadata__": {"format": "pt"}}], ids=["empty", "metadata-only"]
)
def test_safetensors_with_zero_tensors(header: dict) -> None:
    message = st_rejected(st_file(header))
    assert message == errors.SAFETENSORS_COUNT.format(where=WHERE, count=0)


@pytest.mark.parametrize("metadata", [None, {"a": "b"}])
def test_safetensors_with_two_tensors(metadata: dict | None) -> None:
    two = save_safetensors({"a": torch.ones(2, WIDTH), "b": torch.ones(1, WIDTH)}, metadata)
    assert st_rejected(two) == errors.SAFETENSORS_COUNT.format(where=WHERE, count=2)


def test_safetensors_metadata_is_ignored() -> None:
    file = save_safetensors({"embeddings": SOURCE}, metadata={"format": "pt"})
    assert torch.equal(decode_payload(b64(file), WHERE, SPEC, encoding="safetensors"), SOURCE)


@pytest.mark.parametrize("cut", [1, 4, 63])
def test_safetensors_truncated_body(cut: int) -> None:
    message = st_rejected(valid_st()[:-cut])
    assert message == st_bad(f"data cut short: {64 - cut} of 64 bytes")


@pytest.mark.parametrize("keep", [1, 7])
def test_safetensors_shorter_than_its_length_field(keep: int) -> None:
    assert st_rejected(valid_st()[:keep]) == st_bad("shorter than its 8-byte header length")


def test_safetensors_truncated_inside_the_header() -> None:
    file = valid_st()
    size = int.from_bytes(file[:8], "little")
    assert st_rejected(file[: 8 + size - 1]) == st_bad(f"header length {size} does not fit")


@pytest.mark.parametrize("size", [2**64 - 1, 2**63, 64 * 1024 + 1])
def test_safetensors_header_length_too_large(size: int) -> None:
    # The body is large enough for a 64 KiB + 1 header, so only the header cap can refuse it.
    file = st_file({"e": entry([2, WIDTH])}, bytes(70_000), size=size)
    assert st_rejected(file) == st_bad(f"header length {size} does not fit")


@pytest.mark.parametrize(
    "text",
    [
        b"not json",
        b"\xff\xfe{}",
        b'{"e": ',
        b"{'e': 1}",
        b"[" * 60_000,
        b'{"a":' + b"9" * 5000 + b"}",
    ],
    ids=["words", "not-utf8", "cut", "single-quotes", "deep-nesting", "huge-int"],
)
def test_safetensors_header_not_json(text: bytes) -> None:
    assert st_rejected(st_file(None, bytes(64), text=text)) == st_bad("header is not JSON")


@pytest.mark.parametrize("header", [[], [1, 2], "e", 1, None])
def test_safetensors_header_not_an_object(header: object) -> None:
    assert st_rejected(st_file(header, bytes(64))) == st_bad("header is not a JSON object")


@pytest.mark.parametrize("value", [[1], "F32", 3, None])
def test_safetensors_entry_not_an_object(value: object) -> None:
    message = st_rejected(st_file({"e": value}, bytes(64)))
    assert message == st_bad("tensor entry is not an object")


@pytest.mark.parametrize(
    "offsets",
    [
        [0, 60],  # too short for the shape
        [0, 68],  # too long for the shape
        [8, 72],  # past the end of the body
        [64, 0],  # reversed
        [-64, 0],  # negative
        [0],  # one number
        [0, 64, 64],  # three numbers
        [0.0, 64.0],  # floats
        ["0", "64"],  # strings
        "0,64",  # not a list
        None,  # missing
    ],
)
def test_safetensors_bad_data_offsets(offsets: object) -> None:
    header = {"e": {"dtype": "F32", "shape": [2, WIDTH], "data_offsets": offsets}}
    message = st_rejected(st_file(header, bytes(64)))
    assert message == st_bad(f"data_offsets {offsets!r} do not match shape [2, 8] and F32")


@pytest.mark.parametrize("dtype", ["I32", "I64", "U8", "BOOL", "F8_E4M3", "f32", None, ["F32"]])
def test_safetensors_non_float_or_unknown_dtype(dtype: object) -> None:
    message = st_rejected(st_file({"e": entry([2, WIDTH], dtype)}, bytes(64)))
    assert message == errors.BAD_DTYPE.format(where=WHERE, dtype=str(dtype))


def test_safetensors_int_tensor_saved_by_the_library() -> None:
    file = save_safetensors({"e": torch.ones(2, WIDTH, dtype=torch.int32)})
    assert st_rejected(file) == errors.BAD_DTYPE.format(where=WHERE, dtype="I32")


@pytest.mark.parametrize("shape", [(WIDTH,), (1, 2, WIDTH), (1, 1, 1, WIDTH)])
def test_safetensors_wrong_number_of_dims(shape: tuple[int, ...]) -> None:
    file = save_safetensors({"e": torch.ones(shape)})
    assert st_rejected(file) == errors.BAD_NDIM.format(where=WHERE, width=WIDTH, shape=list(shape))


def test_safetensors_wrong_width_zero_rows_and_too_many_rows() -> None:
    wide = save_safetensors({"e": torch.ones(2, WIDTH + 1)})
    assert st_rejected(wide) == errors.BAD_WIDTH.format(where=WHERE, got=WIDTH + 1, width=WIDTH)
    empty = st_file({"e": entry([0, WIDTH])}, b"\0")
    assert st_rejected(empty) == errors.ZERO_ROWS.format(where=WHERE)
    huge = st_file({"e": entry([2**62, WIDTH], offsets=[0, 64])}, bytes(64))
    assert st_rejected(huge) == errors.TOO_MANY_ROWS.format(where=WHERE, limit=MAX_ROWS)
    negative = st_file({"e": entry([-2, WIDTH], offsets=[0, 64])}, bytes(64))
    assert st_rejected(negative) == st_bad(
        f"shape [-2, {WIDTH}] is not a list of positive integers"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_safetensors_non_finite_values(dtype: torch.dtype, bad: float) -> None:
    values = SOURCE.to(dtype, copy=True)
    values[4, 7] = bad
    file = save_safetensors({"embeddings": values})
    assert st_rejected(file) == errors.NOT_FINITE.format(where=WHERE)


def test_safetensors_float64_is_cast_to_the_model_dtype() -> None:
    file = save_safetensors({"embeddings": SOURCE.double()})
    out = decode_payload(b64(file), WHERE, SPEC, encoding="safetensors")
    assert out.dtype == torch.float32 and torch.equal(out, SOURCE)


@pytest.mark.parametrize("pad", range(4))
def test_safetensors_header_padding_decodes(pad: int) -> None:
    """Writers pad the header with spaces (to align the data); that is part of the format."""
    text = json.dumps({"e": entry([5, WIDTH])}).encode() + b" " * pad
    file = st_file(None, raw_bytes(SOURCE), text=text)
    assert torch.equal(decode_payload(b64(file), WHERE, SPEC, encoding="safetensors"), SOURCE)


@pytest.mark.parametrize("skew", [1, 3])
def test_safetensors_holes_and_trailing_bytes_are_refused(skew: int) -> None:
    """The data section must be exactly the tensor: no hole before it, nothing after it."""
    offsets = [skew, skew + 160]
    hole = st_file({"e": entry([5, WIDTH], offsets=offsets)}, bytes(skew) + raw_bytes(SOURCE))
    assert st_rejected(hole) == st_bad(
        f"data_offsets {offsets!r} do not match shape [5, 8] and F32"
    )
    trailing = st_file({"e": entry([5, WIDTH])}, raw_bytes(SOURCE) + bytes(skew))
    assert st_rejected(trailing) == st_bad(f"{skew} bytes after the tensor data")
    short = st_file({"e": entry([5, WIDTH])}, raw_bytes(SOURCE)[:-skew])
    assert st_rejected(short) == st_bad(f"data cut short: {160 - skew} of 160 bytes")


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


# -- operator policy ---------------------------------------------------------------------------


PICKLE_FREE_ONLY = frozenset(PICKLE_FREE_ENCODINGS)


@pytest.mark.parametrize("encoding", [None, "torch"])
def test_disabled_torch_encoding_is_refused(encoding: str | None) -> None:
    spec = make_spec(encodings=PICKLE_FREE_ONLY)
    for data in (torch_b64(SOURCE), SOURCE, "not even base64"):
        message = rejected(data, spec, encoding=encoding)
        assert message == errors.ENCODING_DISABLED.format(
            where=WHERE, got="torch", allowed="raw,safetensors"
        )
    # The pickle-free encodings still work on that server.
    for name in PICKLE_FREE_ENCODINGS:
        part = prompt_embeds_part(SOURCE, encoding=name)
        assert torch.equal(decode_part(part, spec), SOURCE)


def test_disabled_raw_names_what_is_allowed_in_canonical_order() -> None:
    spec = make_spec(encodings=frozenset({"safetensors", "torch"}))
    message = decode_error(prompt_embeds_part(SOURCE, encoding="raw"), spec)
    assert message == errors.ENCODING_DISABLED.format(
        where=WHERE, got="raw", allowed="torch,safetensors"
    )
    # An unknown name stays "unknown", not "disabled".
    assert rejected("AAAA", spec, encoding="pickle") == errors.UNKNOWN_ENCODING.format(
        where=WHERE, got="'pickle'"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, set(ALL_ENCODINGS)),
        ("", set(ALL_ENCODINGS)),
        ("  ", set(ALL_ENCODINGS)),
        ("raw", {"raw"}),
        ("raw,safetensors", {"raw", "safetensors"}),
        (" Raw , SAFETENSORS ,", {"raw", "safetensors"}),
        ("torch,raw,safetensors", set(ALL_ENCODINGS)),
    ],
)
def test_limits_read_encodings_from_env(monkeypatch, value: str | None, expected: set) -> None:
    if value is None:
        monkeypatch.delenv(ENV_ENCODINGS, raising=False)
    else:
        monkeypatch.setenv(ENV_ENCODINGS, value)
    assert Limits.from_env().encodings == frozenset(expected)


@pytest.mark.parametrize("value", ["pickle", "raw,pickle", "raw;safetensors", ",", " , "])
def test_limits_refuse_unknown_encodings(monkeypatch, value: str) -> None:
    monkeypatch.setenv(ENV_ENCODINGS, value)
    with pytest.raises(ValueError, match=ENV_ENCODINGS):
        Limits.from_env()


def test_extract_parts_passes_encoding_fields_through() -> None:
    """The parser hands encoding, dtype and shape to the decoder, and still refuses others."""
    parts = [prompt_embeds_part(SOURCE[:2], encoding=e) for e in ENCODINGS]
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}, *parts]}]
    out, plan = extract_parts(messages, enabled=True, spec=SPEC, limits=Limits())
    assert plan is not None and len(plan.parts) == 3
    for part in plan.parts:
        assert torch.equal(part.tensor, SOURCE[:2])
    assert plan.num_rows == 6
    messages[0]["content"].append({**parts[0], "order": "C"})
    with pytest.raises(VLLMValidationError) as info:
        extract_parts(messages, enabled=True, spec=SPEC, limits=Limits())
    where = errors.PART_WHERE.format(msg=0, part=4)
    assert info.value.args[0] == errors.UNKNOWN_KEYS.format(
        where=where, keys=["order"], allowed=sorted(ALLOWED_KEYS)
    )


# -- the client without PyTorch ----------------------------------------------------------------


CHILD = """
import json, sys
import numpy as np
from vllm_chat_embeds.client import prompt_embeds_part
rows = np.arange(3 * 8, dtype=np.float32).reshape(3, 8) / 4
parts = [prompt_embeds_part(rows), prompt_embeds_part(rows, dtype="float16"),
         prompt_embeds_part(rows, encoding="safetensors")]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "vllm"))
print(json.dumps({"heavy": heavy, "parts": parts}))
"""


def test_client_builds_pickle_free_parts_without_torch_or_vllm() -> None:
    # -E: no PYTHONPATH, so no test sitecustomize; the editable install finds the package.
    result = subprocess.run(
        [sys.executable, "-E", "-c", CHILD],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        timeout=120,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["heavy"] == []
    expected = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8) / 4
    for part in report["parts"]:
        assert torch.equal(decode_part(part), expected)


# -- property: anything decodes to valid rows or is refused ------------------------------------

FAST = settings(
    max_examples=400,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROP_ROWS = 4
PROP_SPEC_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

dtype_names = st.one_of(
    st.none(),
    st.sampled_from(["float32", "float16", "bfloat16"] * 3 + ["float64", "int8", "F32", ""]),
    st.lists(st.sampled_from(["float32", "x"]), max_size=2),
    st.integers(-2, 2),
)
dims = st.one_of(
    st.integers(-2, PROP_ROWS + 1),
    st.just(WIDTH),
    st.sampled_from([2**31, 2**62, 2**64, -(2**63)]),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=2),
    st.none(),
)
shapes = st.one_of(
    st.none(),
    st.tuples(st.integers(0, PROP_ROWS + 1), st.just(WIDTH)).map(list),  # often valid
    st.lists(dims, max_size=4),
    st.text(max_size=4),
    st.integers(),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
ST_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "BOOL", "F8_E5M2"]
ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I32": 4, "BOOL": 1, "F8_E5M2": 1}
BASE64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def declared_bytes(shape: object, itemsize: int) -> int:
    """The byte size a shape declares, or 64 for a shape that is not a list of integers."""
    if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
        return math.prod(shape) * itemsize
    return 64


@st.composite
def body_bytes(draw: st.DrawFn, size: int) -> bytes:
    """``size`` random bytes (often NaN or Inf), or the same with every byte below 0x40.

    Below 0x40, the top byte of every little-endian float keeps its exponent off the
    all-ones pattern, so the values are finite in every float dtype and the payload decodes.
    """
    size = max(0, min(size, 4096))
    raw = draw(st.binary(min_size=size, max_size=size))
    return raw if draw(st.booleans()) else bytes(b & 0x3F for b in raw)


@st.composite
def safetensors_file(draw: st.DrawFn) -> bytes:
    """A safetensors file, valid or broken in its count, dtype, shape, offsets or length."""
    header: dict[str, Any] = {}
    if draw(st.booleans()):
        header["__metadata__"] = {"k": "v"}
    for index in range(draw(st.sampled_from([0, 1, 1, 1, 1, 2]))):
        dtype = draw(st.sampled_from(ST_DTYPES))
        shape = draw(st.one_of(st.tuples(st.integers(0, PROP_ROWS + 1), st.just(WIDTH)), shapes))
        shape = list(shape) if isinstance(shape, tuple) else shape
        nbytes = declared_bytes(shape, ST_ITEMSIZE[dtype])
        start = draw(st.sampled_from([0, 0, 0, 1, 3]))
        offsets = draw(st.one_of(st.just([start, start + nbytes]), st.lists(st.integers(-8, 80))))
        header[f"t{index}"] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    text = json.dumps(header).encode()
    size = len(text) if draw(st.integers(0, 9)) else draw(st.integers(0, 2**64 - 1))
    ends = [e["data_offsets"] for k, e in header.items() if k != "__metadata__"]
    end = max([o[-1] for o in ends if o and isinstance(o[-1], int)] + [0])
    body = draw(body_bytes(end + draw(st.sampled_from([0, 0, 0, -1, 2]))))
    return size.to_bytes(8, "little") + text + body


@st.composite
def payload_case(draw: st.DrawFn) -> tuple[object, object, object, object]:
    """(data, encoding, dtype, shape): mostly coherent for the encoding, sometimes not at all."""
    names = ["raw"] * 4 + ["safetensors"] * 4 + ["torch", "torch", None, "RAW", 3, ["raw"]]
    encoding = draw(st.sampled_from(names))
    coherent = draw(st.integers(0, 4)) > 0
    if encoding == "raw" and coherent:
        # Mostly valid fields (one_of would weigh each junk branch like the valid one).
        valid_dtype, valid_shape = draw(st.integers(0, 5)) > 0, draw(st.integers(0, 5)) > 0
        dtype = draw(st.sampled_from(list(WIRE)) if valid_dtype else dtype_names)
        shape = [draw(st.integers(0, PROP_ROWS + 1)), WIDTH] if valid_shape else draw(shapes)
    elif encoding == "raw" or not coherent:
        dtype, shape = draw(dtype_names), draw(shapes)
    else:
        dtype = shape = None
    kinds = ["raw", "safetensors", "torch", "b64", "text"]
    kind = encoding if coherent and encoding in kinds else draw(st.sampled_from(kinds))
    if kind == "raw" and isinstance(dtype, str) and dtype in WIRE:
        # The length the raw fields call for, so the bytes themselves get decoded.
        size = declared_bytes(shape, WIRE[dtype].itemsize) + draw(
            st.sampled_from([0] * 8 + [-1, 3])
        )
        data = b64(draw(body_bytes(size)))
    elif kind == "safetensors":
        data = b64(draw(safetensors_file()))
    elif kind in ("torch", None):
        rows = draw(st.integers(0, PROP_ROWS + 1))
        data = torch_b64(torch.ones(rows, draw(st.sampled_from([WIDTH, WIDTH, 3]))))
    elif kind == "b64":
        data = b64(draw(st.binary(max_size=300)))
    else:
        data = draw(st.one_of(st.text(max_size=120), st.text(alphabet=BASE64_ALPHABET)))
    return data, encoding, dtype, shape


@pytest.mark.filterwarnings("ignore::UserWarning")
@FAST
@given(case=payload_case(), spec_dtype=st.sampled_from(PROP_SPEC_DTYPES))
@example(
    case=(raw_b64(torch.ones(2, WIDTH)), "raw", "float32", [2, WIDTH]), spec_dtype=torch.float32
)
@example(case=("AAAA", "raw", ["float32"], [1, WIDTH]), spec_dtype=torch.float32)
@example(
    case=(b64(st_file(None, text=b"[" * 5000)), "safetensors", None, None), spec_dtype=torch.float32
)
@example(
    case=(b64(st_file({"e": entry([1, WIDTH], ["F32"])}, bytes(32))), "safetensors", None, None),
    spec_dtype=torch.float16,
)
def test_any_payload_decodes_to_valid_rows_or_is_refused(case, spec_dtype) -> None:
    data, encoding, dtype, shape = case
    spec = make_spec(spec_dtype, max_rows=PROP_ROWS, rows_limit=PROP_ROWS)
    try:
        out = decode_payload(data, WHERE, spec, encoding=encoding, dtype=dtype, shape=shape)
    except VLLMValidationError as exc:
        event(f"refused: {exc.args[0].removeprefix(WHERE)[:28]}")
        assert type(exc) is VLLMValidationError
        assert exc.parameter == "messages"
        assert isinstance(exc.args[0], str) and exc.args[0]
        return
    event(f"decoded {encoding}")
    assert isinstance(out, torch.Tensor)
    assert out.dim() == 2 and out.shape[1] == WIDTH and 1 <= out.shape[0] <= PROP_ROWS
    assert out.dtype == carried_dtype(out.dtype, spec_dtype)
    assert out.layout == torch.strided and out.device.type == "cpu"
    assert out.is_contiguous()
    assert bool(torch.isfinite(out).all())
    if encoding == "raw":
        assert list(out.shape) == list(shape)  # type: ignore[arg-type]

"""Unit tests for ``vllm_chat_embeds.payload``: the decoder of one prompt_embeds payload."""

from __future__ import annotations

import base64
import gc
import io
import os
import pickle
import random
import time

import pytest
import torch
from payload_spec import MAX_ROWS, WIDTH, make_spec
from vllm.exceptions import VLLMValidationError

from vllm_chat_embeds import errors
from vllm_chat_embeds.limits import Limits
from vllm_chat_embeds.payload import PayloadSpec, carried_dtype, decode_payload, validate_tensor
from vllm_chat_embeds.transport import shared_rows

pytestmark = pytest.mark.unit

WHERE = errors.PART_WHERE.format(msg=1, part=2)


SPEC = make_spec()


@pytest.fixture(autouse=True, params=["private", "in_segment"])
def where_decoded(request, tmp_path):
    """Every case twice: payloads decoded into private memory, and (``in_segment``) each
    decoded into a shared-memory segment, a ``torch`` one then loaded in place
    (``torch_archive.py``), with segments kept for reuse."""
    if request.param == "private":
        yield request.param
        return
    shared_rows.configure(Limits(shm_dir=str(tmp_path), shared_above_bytes=0))
    yield request.param
    gc.collect()
    shared_rows.process_rows().drop_kept()
    shared_rows.configure(Limits())


def saved_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def b64(obj: object) -> str:
    return base64.b64encode(saved_bytes(obj)).decode("ascii")


def rejected(data: object, spec: PayloadSpec = SPEC) -> str:
    """Decode ``data``, expect a VLLMValidationError, return its message."""
    with pytest.raises(VLLMValidationError) as info:
        decode_payload(data, WHERE, spec)
    assert type(info.value) is VLLMValidationError
    assert info.value.parameter == "messages"
    return info.value.args[0]


def rows(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.arange(n * WIDTH, dtype=torch.float64).reshape(n, WIDTH) / 8 - 3).to(dtype)


# -- valid payloads ----------------------------------------------------------------------------


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("spec_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_casts_to_the_carried_dtype(
    src_dtype: torch.dtype, spec_dtype: torch.dtype
) -> None:
    # Values k/8 - 3 for small k are exact in every dtype involved, so equality is exact.
    source = rows(5, src_dtype)
    out = decode_payload(b64(source), WHERE, make_spec(spec_dtype))
    # Half-width rows under a float32 model stay as sent; anything else becomes the model's.
    narrow = src_dtype in (torch.float16, torch.bfloat16) and spec_dtype == torch.float32
    assert out.dtype == (src_dtype if narrow else spec_dtype)
    assert out.dtype == carried_dtype(src_dtype, spec_dtype)
    assert out.shape == (5, WIDTH)
    assert out.device.type == "cpu"
    assert out.is_contiguous()
    assert out.layout == torch.strided
    assert torch.equal(out.to(spec_dtype), source.to(spec_dtype))


@pytest.mark.parametrize(
    ("payload", "model", "carried"),
    [
        (torch.float16, torch.float32, torch.float16),  # the worker widens them
        (torch.bfloat16, torch.float32, torch.bfloat16),
        (torch.float32, torch.float32, torch.float32),
        (torch.float64, torch.float32, torch.float32),  # wider than the model: cast here
        (torch.float32, torch.float16, torch.float16),  # narrowing early halves every copy
        (torch.bfloat16, torch.float16, torch.float16),  # same width: the model's
        (torch.float16, torch.bfloat16, torch.bfloat16),
    ],
)
def test_carried_dtype(payload: torch.dtype, model: torch.dtype, carried: torch.dtype) -> None:
    assert carried_dtype(payload, model) == carried


def test_round_trip_preserves_arbitrary_float32_values() -> None:
    source = torch.randn(7, WIDTH, generator=torch.Generator().manual_seed(0))
    out = decode_payload(b64(source), WHERE, SPEC)
    assert torch.equal(out, source)


def test_round_trip_of_non_contiguous_tensor_gives_contiguous_rows() -> None:
    source = rows(WIDTH).t()  # (8, 8) transposed view
    assert not source.is_contiguous()
    out = decode_payload(b64(source), WHERE, SPEC)
    assert out.is_contiguous()
    assert torch.equal(out, source)


def test_exactly_max_rows_is_accepted() -> None:
    out = decode_payload(b64(rows(MAX_ROWS)), WHERE, SPEC)
    assert out.shape == (MAX_ROWS, WIDTH)


def test_tensor_given_directly_is_validated_and_cast() -> None:
    source = rows(3, torch.float64)
    out = decode_payload(source, WHERE, make_spec(torch.float16))
    assert out.dtype == torch.float16
    assert out.is_contiguous()
    assert torch.equal(out, source.to(torch.float16))


def test_tensor_given_directly_with_grad_is_detached() -> None:
    source = rows(2).requires_grad_(True)
    out = validate_tensor(source, WHERE, SPEC)
    assert not out.requires_grad
    assert torch.equal(out, source.detach())


def test_tensor_given_directly_is_still_checked() -> None:
    message = rejected(torch.zeros(2, WIDTH + 1))
    assert message == errors.BAD_WIDTH.format(where=WHERE, got=WIDTH + 1, width=WIDTH)


# -- the data field itself ---------------------------------------------------------------------


def test_none_is_data_missing() -> None:
    assert rejected(None) == errors.DATA_MISSING.format(where=WHERE)


def test_empty_string_is_data_empty() -> None:
    assert rejected("") == errors.DATA_EMPTY.format(where=WHERE)


@pytest.mark.parametrize(
    ("value", "got"),
    [(12, "int"), (1.5, "float"), (b"AAAA", "bytes"), (["AAAA"], "list"), ({"a": 1}, "dict")],
)
def test_non_string_data_is_wrong_type(value: object, got: str) -> None:
    assert rejected(value) == errors.DATA_WRONG_TYPE.format(where=WHERE, got=got)


def test_non_ascii_is_not_base64() -> None:
    message = rejected("AAAA\u00e9AAA")
    assert message == errors.NOT_BASE64.format(where=WHERE, reason="non-ASCII characters")


@pytest.mark.parametrize(
    "text",
    [
        "abc",  # bad padding
        "AAAAA",  # bad padding
        "AA=A",  # padding in the middle
        "AA==AA==",  # data after padding
        "=AAA",  # leading padding
        "AA!A",  # not in the alphabet
        "AAAA\nAAAA",  # whitespace is not accepted in strict mode
        "-_-_",  # urlsafe alphabet
    ],
)
def test_malformed_base64_is_not_base64(text: str) -> None:
    message = rejected(text)
    prefix = errors.NOT_BASE64.split("(")[0].format(where=WHERE)
    assert message.startswith(prefix)
    assert "non-ASCII" not in message


def test_over_max_part_bytes_is_rejected_before_decoding() -> None:
    spec = make_spec(max_part_bytes=1000)
    # Not base64 at all: a decoder that ran first would answer NOT_BASE64.
    text = "!" * 4000
    message = rejected(text, spec)
    assert message == errors.TOO_MANY_BYTES.format(where=WHERE, size=3000, limit=1000)


def test_over_max_part_bytes_valid_payload_is_rejected() -> None:
    data = b64(rows(MAX_ROWS))
    spec = make_spec(max_part_bytes=len(data) // 2)
    message = rejected(data, spec)
    assert message == errors.TOO_MANY_BYTES.format(
        where=WHERE, size=(len(data) // 4) * 3, limit=len(data) // 2
    )


def test_huge_payload_is_rejected_quickly() -> None:
    spec = make_spec(max_part_bytes=1 << 20)
    text = "A" * (64 << 20)
    start = time.perf_counter()
    message = rejected(text, spec)
    assert time.perf_counter() - start < 0.5
    assert message == errors.TOO_MANY_BYTES.format(
        where=WHERE, size=(len(text) // 4) * 3, limit=1 << 20
    )


# -- not a tensor file -------------------------------------------------------------------------


def not_a_tensor_file_prefix() -> str:
    return errors.NOT_A_TENSOR_FILE.split("{reason}")[0].format(where=WHERE)


@pytest.mark.parametrize(
    "raw",
    [
        random.Random(0).randbytes(257),
        bytes(range(256)) * 3,
        b"PK\x03\x04" + b"\x00" * 60,  # a zip header and nothing behind it
        saved_bytes(rows(2))[:-40],  # a truncated torch.save file
    ],
    ids=["random", "byte-ramp", "zip-header", "truncated"],
)
def test_random_bytes_are_not_a_tensor_file(raw: bytes) -> None:
    message = rejected(base64.b64encode(raw).decode("ascii"))
    assert message.startswith(not_a_tensor_file_prefix())


class _RunsShell:
    """Unpickling this would run a shell command that creates ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch '{self.path}'",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsShell(str(marker)), protocol=protocol)
    message = rejected(base64.b64encode(payload).decode("ascii"))
    assert message.startswith(not_a_tensor_file_prefix())
    assert not marker.exists()


def test_malicious_object_inside_torch_save_is_refused_and_never_run(tmp_path) -> None:
    marker = tmp_path / "pwned"
    message = rejected(b64(_RunsShell(str(marker))))
    assert message.startswith(not_a_tensor_file_prefix())
    assert not marker.exists()


@pytest.mark.parametrize(
    ("obj", "got"),
    [
        ({"embeds": torch.zeros(2, WIDTH)}, "dict"),
        ([torch.zeros(2, WIDTH)], "list"),
        (7, "int"),
        ((torch.zeros(2, WIDTH),), "tuple"),
    ],
)
def test_saved_non_tensor_is_not_a_tensor(obj: object, got: str) -> None:
    assert rejected(b64(obj)) == errors.NOT_A_TENSOR.format(where=WHERE, got=got)


# -- shape, dtype, values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(), (WIDTH,), (0,), (1, 3, WIDTH), (2, 3, WIDTH), (1, 1, 1, WIDTH)],
    ids=["0-D", "1-D", "1-D-empty", "batch-1", "3-D", "4-D"],
)
def test_wrong_ndim_is_rejected(shape: tuple[int, ...]) -> None:
    message = rejected(b64(torch.zeros(shape)))
    assert message == errors.BAD_NDIM.format(where=WHERE, width=WIDTH, shape=list(shape))


@pytest.mark.parametrize("width", [1, WIDTH - 1, WIDTH + 1, 4 * WIDTH])
def test_wrong_width_is_rejected(width: int) -> None:
    message = rejected(b64(torch.zeros(3, width)))
    assert message == errors.BAD_WIDTH.format(where=WHERE, got=width, width=WIDTH)


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (torch.int32, "int32"),
        (torch.int64, "int64"),
        (torch.uint8, "uint8"),
        (torch.bool, "bool"),
        (torch.complex64, "complex64"),
        (torch.complex128, "complex128"),
    ],
)
def test_non_float_dtype_is_rejected(dtype: torch.dtype, name: str) -> None:
    message = rejected(b64(torch.ones(3, WIDTH, dtype=dtype)))
    assert message == errors.BAD_DTYPE.format(where=WHERE, dtype=name)


def test_zero_rows_is_rejected() -> None:
    assert rejected(b64(torch.zeros(0, WIDTH))) == errors.ZERO_ROWS.format(where=WHERE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_values_are_rejected(bad: float, dtype: torch.dtype) -> None:
    tensor = rows(4, dtype)
    tensor[2, 5] = bad
    assert rejected(b64(tensor)) == errors.NOT_FINITE.format(where=WHERE)


def test_float64_overflowing_float16_spec_is_rejected() -> None:
    tensor = rows(3, torch.float64)
    tensor[1, 1] = 1e6  # finite in float64, inf in float16 (max 65504)
    spec16 = make_spec(torch.float16)
    assert rejected(b64(tensor), spec16) == errors.NOT_FINITE.format(where=WHERE)
    # The same values are fine for a float32 model.
    assert decode_payload(b64(tensor), WHERE, SPEC)[1, 1].item() == 1e6


def test_float64_overflowing_float32_spec_is_rejected() -> None:
    tensor = rows(3, torch.float64)
    tensor[0, 0] = -1e300
    assert rejected(b64(tensor)) == errors.NOT_FINITE.format(where=WHERE)


# -- hostile layouts and declared sizes --------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sparse_coo_with_huge_size_is_rejected_by_layout_without_densifying() -> None:
    huge = (1 << 40, WIDTH)  # would be 32 TiB dense
    sparse = torch.sparse_coo_tensor(torch.tensor([[0], [0]]), torch.tensor([1.0]), huge)
    data = b64(sparse)
    start = time.perf_counter()
    message = rejected(data)
    assert time.perf_counter() - start < 1.0
    assert message == errors.BAD_LAYOUT.format(where=WHERE, layout="sparse_coo")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sparse_csr_is_rejected_by_layout() -> None:
    sparse = rows(4).to_sparse_csr()
    assert rejected(b64(sparse)) == errors.BAD_LAYOUT.format(where=WHERE, layout="sparse_csr")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sparse_tensor_given_directly_is_rejected_by_layout() -> None:
    sparse = torch.sparse_coo_tensor(torch.tensor([[0], [0]]), torch.tensor([1.0]), (1 << 40, 8))
    assert rejected(sparse) == errors.BAD_LAYOUT.format(where=WHERE, layout="sparse_coo")


def test_stride0_view_declaring_too_many_rows_is_rejected_without_allocating() -> None:
    view = torch.ones(1, WIDTH).expand(1 << 40, WIDTH)  # 32 TiB if materialised
    assert view.stride() == (0, 1)
    data = b64(view)
    assert len(data) < 4096  # only the single stored row travels
    start = time.perf_counter()
    message = rejected(data)
    assert time.perf_counter() - start < 1.0
    assert message == errors.TOO_MANY_ROWS.format(where=WHERE, limit=MAX_ROWS)


def test_stride0_view_within_limits_is_materialised() -> None:
    view = rows(1).expand(5, WIDTH)
    out = decode_payload(b64(view), WHERE, SPEC)
    assert out.is_contiguous()
    assert out.stride() == (WIDTH, 1)
    assert torch.equal(out, rows(1).repeat(5, 1))


def test_rows_over_remaining_budget_names_request_limit() -> None:
    # max_rows is what this part may still add; the message names the request-wide limit.
    spec = make_spec(max_rows=3, rows_limit=100)
    message = rejected(b64(rows(4)), spec)
    assert message == errors.TOO_MANY_ROWS.format(where=WHERE, limit=100)
    assert decode_payload(b64(rows(3)), WHERE, spec).shape == (3, WIDTH)


def test_errors_name_the_part() -> None:
    where = errors.PART_WHERE.format(msg=7, part=0)
    with pytest.raises(VLLMValidationError, match=r"^messages\[7\]\.content\[0\]\.data "):
        decode_payload(b64(torch.zeros(2, 3)), where, SPEC)


# -- odd tensors ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nested_tensor_is_rejected_by_layout() -> None:
    nested = torch.nested.nested_tensor([torch.zeros(2, WIDTH), torch.zeros(3, WIDTH)])
    message = rejected(b64(nested))
    assert message == errors.BAD_LAYOUT.format(where=WHERE, layout="nested")


def test_meta_tensor_is_rejected() -> None:
    message = rejected(b64(torch.zeros(2, WIDTH, device="meta")))
    assert message == errors.META_TENSOR.format(where=WHERE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_finite_values_whose_sum_overflows_are_accepted(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max / 2
    tensor = torch.full((4, WIDTH), big, dtype=dtype)
    assert torch.equal(decode_payload(tensor, WHERE, make_spec(dtype)), tensor)


# -- torch payloads loaded in place ------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", ["whole", "rows_of_a_bigger_storage", "half", "transposed", "cast_down"]
)
def test_a_torch_payload_in_a_segment_is_viewed_there_or_copied_before_it_goes(
    where_decoded: str, shape: str
) -> None:
    """In a segment, a plain payload's rows are the decoded archive's own bytes (a slice of a
    bigger storage at its offset); a transposed one is copied out before the segment can be
    reused, so the next payload, decoded into that very segment, leaves it intact."""
    source = {
        "whole": rows(6),
        "rows_of_a_bigger_storage": rows(12)[3:9],
        "half": rows(6, torch.float16),
        "transposed": rows(WIDTH).t()[:6].t().t(),
        "cast_down": rows(6, torch.float64),
    }[shape]
    out = decode_payload(b64(source), WHERE, SPEC)
    expected = source.to(out.dtype)
    assert out.is_contiguous() and torch.equal(out, expected)
    assert shared_rows.is_shared(out) == (where_decoded == "in_segment")
    gc.collect()
    again = decode_payload(b64(rows(6) + 100), WHERE, SPEC)  # may reuse a kept segment
    assert torch.equal(out, expected) and torch.equal(again, rows(6) + 100)

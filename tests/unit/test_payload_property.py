"""Property tests for ``decode_payload``: any input gives valid embeddings or a 400, never more."""

from __future__ import annotations

import base64
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from vllm.exceptions import VLLMValidationError

from vllm_chat_embeds import errors
from vllm_chat_embeds.payload import PayloadSpec, carried_dtype, decode_payload

pytestmark = pytest.mark.unit

WHERE = errors.PART_WHERE.format(msg=0, part=1)
WIDTH = 8
MAX_ROWS = 4
SPEC_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OTHER_DTYPES = [torch.int32, torch.bool, torch.complex64]

FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def make_spec(dtype: torch.dtype) -> PayloadSpec:
    return PayloadSpec(
        width=WIDTH, dtype=dtype, max_part_bytes=1 << 16, max_rows=MAX_ROWS, rows_limit=MAX_ROWS
    )


def saved_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_or_refuse(data: object, spec: PayloadSpec) -> torch.Tensor | None:
    """The property itself: a valid tensor of the spec, or a VLLMValidationError; nothing else."""
    try:
        out = decode_payload(data, WHERE, spec)
    except VLLMValidationError as exc:
        event(f"refused: {exc.args[0].removeprefix(WHERE)[:24]}")
        assert type(exc) is VLLMValidationError
        assert exc.parameter == "messages"
        assert isinstance(exc.args[0], str) and exc.args[0]
        return None
    event("decoded")
    assert isinstance(out, torch.Tensor)
    assert out.dim() == 2
    assert out.shape[1] == WIDTH
    assert 1 <= out.shape[0] <= MAX_ROWS
    assert out.dtype == carried_dtype(out.dtype, spec.dtype)
    assert out.layout == torch.strided
    assert out.device.type == "cpu"
    assert out.is_contiguous()
    assert bool(torch.isfinite(out).all())
    return out


# -- (1) arbitrary text and bytes --------------------------------------------------------------

VALID = b64(saved_bytes(torch.ones(2, WIDTH)))


@st.composite
def corrupted_tensor_file(draw: st.DrawFn) -> bytes:
    """A valid torch.save file with a few bytes overwritten, cut short or extended."""
    raw = bytearray(saved_bytes(torch.ones(draw(st.integers(1, MAX_ROWS)), WIDTH)))
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(raw)))
    return bytes(raw[:cut]) + draw(st.binary(max_size=16))


any_data = st.one_of(
    st.text(max_size=200),
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=200
    ),
    st.binary(max_size=600).map(b64),
    corrupted_tensor_file().map(b64),
)


@pytest.mark.filterwarnings("ignore::UserWarning")
@FAST
@given(data=any_data, spec_dtype=st.sampled_from(SPEC_DTYPES))
@example(data=VALID, spec_dtype=torch.float32)
@example(data="", spec_dtype=torch.float32)
@example(data="\x00", spec_dtype=torch.float16)
@example(data="====", spec_dtype=torch.float32)
@example(data=b64(b"PK\x05\x06" + b"\x00" * 18), spec_dtype=torch.float32)  # empty zip
def test_arbitrary_data_decodes_or_is_refused(data: str, spec_dtype: torch.dtype) -> None:
    out = decode_or_refuse(data, make_spec(spec_dtype))
    if data == VALID:
        assert out is not None and torch.equal(out, torch.ones(2, WIDTH, dtype=spec_dtype))


# -- (2) arbitrary small tensors ---------------------------------------------------------------

dims = st.sampled_from([0, 1, 2, 3, MAX_ROWS, MAX_ROWS + 1, WIDTH])
finite = st.one_of(
    st.floats(min_value=-4.0, max_value=4.0),  # representable in every float dtype
    st.floats(min_value=-1e38, max_value=1e38),  # may overflow float16 / bfloat16
)
special = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e39, -70000.0])


@st.composite
def small_tensor(draw: st.DrawFn) -> torch.Tensor:
    ndim = draw(st.sampled_from([0, 1, 2, 2, 2, 2, 3]))
    if ndim == 2 and draw(st.integers(0, 3)):
        shape: tuple[int, ...] = (draw(st.integers(0, MAX_ROWS + 1)), WIDTH)  # often valid
    else:
        shape = tuple(draw(dims) for _ in range(ndim))
    dtype = draw(st.sampled_from(FLOAT_DTYPES * 2 + OTHER_DTYPES))
    count = math.prod(shape)
    if dtype == torch.int32:
        values = draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=count, max_size=count))
        return torch.tensor(values, dtype=dtype).reshape(shape)
    if dtype == torch.bool:
        values = draw(st.lists(st.booleans(), min_size=count, max_size=count))
        return torch.tensor(values, dtype=dtype).reshape(shape)
    values = draw(st.lists(finite, min_size=count, max_size=count))
    if count and draw(st.booleans()):  # poison some positions with NaN, Inf or overflow
        for _ in range(draw(st.integers(1, 3))):
            values[draw(st.integers(0, count - 1))] = draw(special)
    tensor = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if dtype == torch.complex64:
        return torch.complex(tensor, tensor).to(dtype)
    return tensor.to(dtype)


def expected_message(tensor: torch.Tensor, spec: PayloadSpec) -> str | None:
    """The first check an independent reading of the rules says the tensor fails, if any."""
    if tensor.dim() != 2:
        return errors.BAD_NDIM.format(where=WHERE, width=WIDTH, shape=list(tensor.shape))
    rows, width = tensor.shape
    if width != WIDTH:
        return errors.BAD_WIDTH.format(where=WHERE, got=width, width=WIDTH)
    if tensor.dtype not in FLOAT_DTYPES:
        dtype = str(tensor.dtype).removeprefix("torch.")
        return errors.BAD_DTYPE.format(where=WHERE, dtype=dtype)
    if rows == 0:
        return errors.ZERO_ROWS.format(where=WHERE)
    if rows > MAX_ROWS:
        return errors.TOO_MANY_ROWS.format(where=WHERE, limit=MAX_ROWS)
    if not bool(torch.isfinite(tensor.to(spec.dtype)).all()):
        return errors.NOT_FINITE.format(where=WHERE)
    return None


@FAST
@given(tensor=small_tensor(), spec_dtype=st.sampled_from(SPEC_DTYPES))
@example(tensor=torch.zeros(1, WIDTH), spec_dtype=torch.float32)
@example(tensor=torch.full((2, WIDTH), 1e6, dtype=torch.float64), spec_dtype=torch.float16)
@example(tensor=torch.full((2, WIDTH), 1e6, dtype=torch.float64), spec_dtype=torch.bfloat16)
def test_saved_tensor_decodes_or_is_refused(tensor: torch.Tensor, spec_dtype: torch.dtype) -> None:
    spec = make_spec(spec_dtype)
    data = b64(saved_bytes(tensor))
    out = decode_or_refuse(data, spec)
    expected = expected_message(tensor, spec)
    if expected is None:
        assert out is not None
        assert torch.equal(out, tensor.to(spec_dtype))
        # Offline, the same tensor given directly behaves the same.
        assert torch.equal(decode_payload(tensor, WHERE, spec), out)
    else:
        assert out is None
        with pytest.raises(VLLMValidationError) as info:
            decode_payload(data, WHERE, spec)
        assert info.value.args[0] == expected

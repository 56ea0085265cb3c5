"""Decode and validate one prompt_embeds payload (extends ``vllm/renderers/embed_utils.py``).

Why our own decoder: the built-in accepts NaN/Inf, densifies sparse tensors under a
process-wide lock, and answers several bad payloads without naming the field. Here every
failure is a ``VLLMValidationError`` that names the part, sizes are checked before anything
large is allocated, and no global lock is taken.

Three encodings: ``torch`` (base64 of ``torch.save``, the RFC's form and the default), ``raw``
(base64 of row-major little-endian bytes, with ``dtype`` and ``shape`` beside it) and
``safetensors`` (base64 of a safetensors file holding one tensor). The last two never unpickle
anything, and are built over the decoded buffer without further copies; so is a big ``torch``
payload, once ``torch.load`` (weights only) has read its archive in place (``torch_archive``).
"""

from __future__ import annotations

import binascii
import io
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn, cast

import pybase64
import torch

from . import errors, torch_archive
from .decode_buffers import Base64Text, decode_into_pool, decoded_size, pooled_empty
from .errors import reject
from .limits import ALL_ENCODINGS as ENCODINGS
from .transport import shared_rows

# A torch.save file is a zip; its overhead over the raw storage is small but not zero.
_BASE64_SLACK: Final = 4

RAW_DTYPES: Final = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES: Final = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
MAX_SAFETENSORS_HEADER: Final = 64 * 1024


@dataclass(frozen=True)
class PayloadSpec:
    """What a payload must look like for the model being served."""

    width: int
    dtype: torch.dtype
    max_part_bytes: int
    max_rows: int  # rows this part may still add to the request
    rows_limit: int  # the request-wide limit, for the message
    encodings: frozenset[str] = frozenset(ENCODINGS)  # those the operator allows
    # The fewest rows a part may hold, and the KV connector that asks for more than one
    # (``kv_transfer/connectors.py``).
    min_rows: int = 1
    min_rows_connector: str | None = None


def _decode_base64(
    data: Base64Text,
    where: str,
    spec: PayloadSpec,
    *,
    pooled: bool = False,
    writable: bool = True,
    exact_segment: bool = False,
) -> bytes | bytearray | memoryview:
    """Decode to a writable buffer, so raw and safetensors payloads are viewed without a copy.

    ``pooled``: large payloads go to a reused buffer (``decode_buffers``; ``exact_segment``: a
    shared-memory segment of exactly their size, or none), for callers that build the tensor
    over the buffer itself.
    ``writable=False``: otherwise plain ``bytes``, which ``io.BytesIO`` reads in place (it
    copies a ``bytearray``), for ``torch.load``.
    """
    # The decoded size is known from the text length: refuse before decoding anything.
    approx = (len(data) // 4) * 3
    if approx > spec.max_part_bytes + _BASE64_SLACK:
        reject(errors.TOO_MANY_BYTES, where=where, size=approx, limit=spec.max_part_bytes)
    exact = decoded_size(data) if pooled else None
    raw: bytes | bytearray | memoryview | None = None
    try:
        if isinstance(data, str) and not data.isascii():  # a view: pybase64 refuses it
            raise UnicodeEncodeError("ascii", data, 0, 1, "non-ASCII")
        if exact is not None:
            raw = decode_into_pool(data, exact, exact_segment=exact_segment)
        if raw is None and not writable:
            raw = pybase64.b64decode(data, validate=True)
        elif raw is None:
            raw = pybase64.b64decode_as_bytearray(data, validate=True)  # no copy of the text
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        text = _unescaped(data)
        if text is not None:  # a lifted string with JSON escapes: decode the text they mean
            options = {"pooled": pooled, "writable": writable, "exact_segment": exact_segment}
            return _decode_base64(text, where, spec, **options)
        reason = "non-ASCII characters" if isinstance(exc, UnicodeEncodeError) else str(exc)
        reject(errors.NOT_BASE64, where=where, reason=reason)
    if not raw:
        reject(errors.DATA_EMPTY, where=where)
    if exact is not None and len(raw) != exact:  # padding inside the text
        reject(errors.NOT_BASE64, where=where, reason=f"decoded to {len(raw)} bytes")
    return raw


def _unescaped(data: Base64Text) -> str | None:
    """The text a lifted JSON string (``big_bodies``: its raw bytes) means, when it holds
    escapes; None otherwise (a ``str`` was parsed already)."""
    if not isinstance(data, memoryview):
        return None
    raw = bytes(data)
    if b"\\" not in raw:
        return None
    try:
        text = json.loads(b'"' + raw + b'"')
    except ValueError:
        return None
    return text if isinstance(text, str) else None


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _load_tensor(raw: bytes | Path, where: str) -> object:
    """``torch.load`` of an archive's bytes (a copy of its storages), or of a file (mapped:
    its storages are views of the file)."""
    source = io.BytesIO(raw) if isinstance(raw, bytes) else str(raw)
    mapped = not isinstance(raw, bytes)
    try:
        return torch.load(source, weights_only=True, map_location="cpu", mmap=mapped)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as exc:
        reject(errors.NOT_A_TENSOR_FILE, where=where, reason=_short(exc))
    except Exception as exc:  # torch raises many types for malformed archives
        reject(errors.NOT_A_TENSOR_FILE, where=where, reason=_short(exc))


def _all_finite(tensor: torch.Tensor) -> bool:
    """One reduction, no mask: a finite sum proves every value finite (NaN and Inf propagate).

    A non-finite sum may only be an overflow of large finite values, so then min and max,
    which are NaN or infinite exactly when some value is, decide.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


# Half-width dtypes rows may keep under a wider model dtype (see ``carried_dtype``).
_NARROW_DTYPES: Final = (torch.float16, torch.bfloat16)


def carried_dtype(payload: torch.dtype, model: torch.dtype) -> torch.dtype:
    """The dtype a part's rows travel in to the worker.

    The payload's own when it is a half-width float under a wider model dtype (float16 rows
    for a float32 model): the worker's copy into its input buffer widens them exactly as a
    cast here would, and every copy before it (the store, each process hop) moves half the
    bytes. Otherwise the model's: narrowing early halves those copies instead.
    """
    if payload in _NARROW_DTYPES and payload.itemsize < model.itemsize:
        return payload
    return model


def validate_tensor(
    value: object, where: str, spec: PayloadSpec, *, pooled: bool = True
) -> torch.Tensor:
    """Check shape, dtype, size and values; return a contiguous CPU tensor in the dtype its
    rows travel in (``carried_dtype``: the model's, or the payload's narrower float).

    ``pooled=False``: a cast never lands in a reused decode buffer, so the result is either
    ``value`` itself or memory nobody else holds (uploads keep it as is).
    """
    if not isinstance(value, torch.Tensor):
        reject(errors.NOT_A_TENSOR, where=where, got=type(value).__name__)
    tensor = value.detach()
    if tensor.is_nested or tensor.layout != torch.strided:
        layout = "nested" if tensor.is_nested else str(tensor.layout).replace("torch.", "")
        reject(errors.BAD_LAYOUT, where=where, layout=layout)
    if tensor.is_meta:
        reject(errors.META_TENSOR, where=where)
    if tensor.dim() != 2:
        reject(errors.BAD_NDIM, where=where, width=spec.width, shape=list(tensor.shape))
    rows, width = tensor.shape
    if width != spec.width:
        reject(errors.BAD_WIDTH, where=where, got=width, width=spec.width)
    if not tensor.is_floating_point():
        reject(errors.BAD_DTYPE, where=where, dtype=str(tensor.dtype).replace("torch.", ""))
    if rows == 0:
        reject(errors.ZERO_ROWS, where=where)
    if rows > spec.max_rows:
        # Checked on the declared shape: a stride-0 view may claim far more rows than it stores.
        reject(errors.TOO_MANY_ROWS, where=where, limit=spec.rows_limit)
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    dtype = carried_dtype(tensor.dtype, spec.dtype)
    if tensor.dtype != dtype or not tensor.is_contiguous():
        out = pooled_empty((rows, width), dtype) if pooled else None
        tensor = tensor.to(dtype).contiguous() if out is None else out.copy_(tensor)
    # Checked in the dtype carried: widening later keeps finite values finite.
    if not _all_finite(tensor):
        reject(errors.NOT_FINITE, where=where)
    return tensor


def little_endian(tensor: torch.Tensor) -> torch.Tensor:
    """Payload bytes are little-endian; on a big-endian host, swap (a copy, rare)."""
    if sys.byteorder == "little" or tensor.element_size() == 1:
        return tensor
    swapped = tensor.view(torch.uint8).view(-1, tensor.element_size()).flip(1)
    return swapped.contiguous().view(tensor.dtype).view(tensor.shape)


def _declared_shape(
    shape: object, where: str, spec: PayloadSpec, *, in_header: bool = False
) -> tuple[int, int]:
    """Check a declared shape: the part's ``shape`` field, or (``in_header``) a safetensors
    header's, whose problems are the file's and so are reported against ``data``."""

    def malformed(got: object) -> None:
        if in_header:
            reject(
                errors.SAFETENSORS_BAD,
                where=where,
                reason=f"shape {got!r} is not a list of positive integers",
            )
        reject(errors.RAW_BAD_SHAPE, where=where, width=spec.width, got=got)

    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        malformed(repr(shape))
    if len(shape) != 2:  # type: ignore[arg-type]
        if in_header:
            reject(errors.BAD_NDIM, where=where, width=spec.width, shape=list(shape))  # type: ignore[arg-type]
        malformed(list(shape))  # type: ignore[arg-type]
    rows, width = shape  # type: ignore[misc]
    if rows < 0 or width <= 0:
        malformed(list(shape))  # type: ignore[arg-type]
    if width != spec.width:
        reject(errors.BAD_WIDTH, where=where, got=width, width=spec.width)
    if rows == 0:
        reject(errors.ZERO_ROWS, where=where)
    if rows > spec.max_rows:
        reject(errors.TOO_MANY_ROWS, where=where, limit=spec.rows_limit)
    return rows, width


@dataclass(frozen=True)
class RowsLayout:
    """What a payload's bytes hold, known before they are read: ``rows`` x ``width`` values of
    ``dtype``, ``nbytes`` in all."""

    dtype: torch.dtype
    rows: int
    width: int

    @property
    def nbytes(self) -> int:
        return self.rows * self.width * self.dtype.itemsize


def raw_layout(where: str, spec: PayloadSpec, dtype: object, shape: object) -> RowsLayout:
    """Check a raw payload's declared ``dtype`` and ``shape`` (and its size against the part
    limit) before any of its bytes are decoded."""
    if dtype is None:
        reject(errors.RAW_MISSING_FIELD, where=where, field="dtype")
    if shape is None:
        reject(errors.RAW_MISSING_FIELD, where=where, field="shape")
    if not isinstance(dtype, str) or dtype not in RAW_DTYPES:  # a JSON list is unhashable
        reject(errors.RAW_BAD_DTYPE, where=where, got=repr(dtype))
    rows, width = _declared_shape(shape, where, spec)
    layout = RowsLayout(RAW_DTYPES[dtype], rows, width)  # type: ignore[index]
    if layout.nbytes > spec.max_part_bytes:
        reject(errors.TOO_MANY_BYTES, where=where, size=layout.nbytes, limit=spec.max_part_bytes)
    return layout


def _decode_raw(
    data: Base64Text, where: str, spec: PayloadSpec, dtype: object, shape: object
) -> object:
    layout = raw_layout(where, spec, dtype, shape)
    torch_dtype, rows, width, nbytes = layout.dtype, layout.rows, layout.width, layout.nbytes
    expected = 4 * ((nbytes + 2) // 3)  # padded base64 length, known before decoding
    if len(data) != expected and (text := _unescaped(data)) is not None:
        data = text  # a lifted string with JSON escapes: the text they mean
    if len(data) != expected:
        reject(
            errors.RAW_LENGTH,
            where=where,
            got=len(data),
            shape=[rows, width],
            dtype=dtype,
            expected=expected,
            nbytes=nbytes,
        )
    buffer = _decode_base64(data, where, spec, pooled=True)
    if len(buffer) != nbytes:  # e.g. a padding character where data was expected
        reject(errors.NOT_BASE64, where=where, reason=f"decoded to {len(buffer)} bytes")
    flat = torch.frombuffer(buffer, dtype=torch_dtype)
    return little_endian(flat).view(rows, width)


def _safetensors_bad(where: str, reason: str) -> NoReturn:
    reject(errors.SAFETENSORS_BAD, where=where, reason=reason)


def looks_like_safetensors(prefix: bytes | bytearray | memoryview) -> bool:
    """Whether a file's first 9 bytes could start a safetensors file: a plausible header
    length, then the header's opening brace (recognising rows by content, whatever media type
    a client claims)."""
    if len(prefix) < 9:
        return False
    header_len = int.from_bytes(prefix[:8], "little")
    return 2 <= header_len <= MAX_SAFETENSORS_HEADER and prefix[8] == ord("{")


def safetensors_header_length(prefix: bytes | bytearray | memoryview, size: int, where: str) -> int:
    """The header length a safetensors file of ``size`` bytes declares in its first 8."""
    if size < 8:
        _safetensors_bad(where, "shorter than its 8-byte header length")
    header_len = int.from_bytes(prefix[:8], "little")
    if header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
        _safetensors_bad(where, f"header length {header_len} does not fit")
    return header_len


def safetensors_layout(header_bytes: bytes, where: str, spec: PayloadSpec) -> RowsLayout:
    """Check a safetensors header (one 2-D floating tensor, its data right after the header)."""
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deep nesting
        _safetensors_bad(where, "header is not JSON")
    if not isinstance(header, dict):
        _safetensors_bad(where, "header is not a JSON object")
    names = [k for k in header if k != "__metadata__"]
    if len(names) != 1:
        reject(errors.SAFETENSORS_COUNT, where=where, count=len(names))
    info = header[names[0]]
    if not isinstance(info, dict):
        _safetensors_bad(where, "tensor entry is not an object")
    name = info.get("dtype")
    dtype = _SAFETENSORS_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        reject(errors.BAD_DTYPE, where=where, dtype=str(info.get("dtype")))
    shape = info.get("shape")
    rows, width = _declared_shape(shape, where, spec, in_header=True)
    layout = RowsLayout(dtype, rows, width)
    offsets = info.get("data_offsets")
    # The format's rule: the data section is exactly the tensors' bytes, no holes, nothing
    # after, so one file cannot also be read as something else.
    if (
        not isinstance(offsets, list)
        or [type(o) for o in offsets] != [int, int]
        or offsets != [0, layout.nbytes]
    ):
        _safetensors_bad(
            where, f"data_offsets {offsets!r} do not match shape {shape} and {info.get('dtype')}"
        )
    return layout


def check_safetensors_body(body: int, layout: RowsLayout, where: str) -> None:
    """The data section after the header must be exactly the tensor's bytes."""
    nbytes = layout.nbytes
    if body != nbytes:
        _safetensors_bad(
            where,
            f"{body - nbytes} bytes after the tensor data"
            if body > nbytes
            else f"data cut short: {body} of {nbytes} bytes",
        )


def _decode_safetensors(data: Base64Text, where: str, spec: PayloadSpec) -> object:
    buffer = _decode_base64(data, where, spec, pooled=True)
    header_len = safetensors_header_length(buffer, len(buffer), where)
    layout = safetensors_layout(bytes(buffer[8 : 8 + header_len]), where, spec)
    check_safetensors_body(len(buffer) - 8 - header_len, layout, where)
    start = 8 + header_len
    count = layout.rows * layout.width
    flat = torch.frombuffer(buffer, dtype=layout.dtype, count=count, offset=start)
    return little_endian(flat).view(layout.rows, layout.width)


def decode_payload(
    data: object,
    where: str,
    spec: PayloadSpec,
    *,
    encoding: object = None,
    dtype: object = None,
    shape: object = None,
) -> torch.Tensor:
    """Turn a part's payload into embeddings: a validated, contiguous tensor in the dtype its
    rows travel in (``carried_dtype``).

    ``data`` is base64 text (a ``str``, or a view of a lifted string's bytes), or (offline,
    encoding ``torch``) a ``torch.Tensor`` itself.
    """
    encoding = "torch" if encoding is None else encoding
    if encoding not in ENCODINGS:
        reject(errors.UNKNOWN_ENCODING, where=where, got=repr(encoding))
    if encoding not in spec.encodings:
        allowed = ",".join(e for e in ENCODINGS if e in spec.encodings)
        reject(errors.ENCODING_DISABLED, where=where, got=encoding, allowed=allowed)
    if encoding != "raw" and (dtype is not None or shape is not None):
        reject(errors.RAW_ONLY_FIELDS, where=where)
    if isinstance(data, torch.Tensor) and encoding == "torch":
        return validate_tensor(data, where, spec)
    if data is None:
        reject(errors.DATA_MISSING, where=where)
    if not isinstance(data, str | memoryview):  # a view: a lifted string (big_bodies)
        reject(errors.DATA_WRONG_TYPE, where=where, got=type(data).__name__)
    if not data:
        reject(errors.DATA_EMPTY, where=where)
    if encoding == "raw":
        return validate_tensor(_decode_raw(data, where, spec, dtype, shape), where, spec)
    if encoding == "safetensors":
        return validate_tensor(_decode_safetensors(data, where, spec), where, spec)
    return validate_tensor(_decode_torch(data, where, spec), where, spec)


def _plain(tensor: torch.Tensor) -> bool:
    """A dense, contiguous, non-empty CPU tensor: one whose elements are one run of bytes."""
    if tensor.layout != torch.strided or tensor.is_nested or tensor.is_meta:
        return False
    return tensor.device.type == "cpu" and tensor.numel() > 0 and tensor.is_contiguous()


def _decode_torch(data: Base64Text, where: str, spec: PayloadSpec) -> object:
    """A ``torch.save`` payload's tensor. A big one is decoded into a shared-memory segment
    and loaded from there as a view of its rows in place: ``torch.load`` from bytes copies
    the storage out (16 MiB of rows: 8 ms here), and the copy would then be copied again
    into a segment to cross processes."""
    # A segment of the archive's exact size: torch's zip reader finds the archive's directory
    # at the file's end.
    raw = _decode_base64(data, where, spec, pooled=True, writable=False, exact_segment=True)
    path = shared_rows.process_rows().path_of(raw) if isinstance(raw, memoryview) else None
    if path is None:
        return _load_tensor(cast(bytes, raw), where)
    loaded = _load_tensor(path, where)  # torch's own copy-on-write mapping of the segment
    offset = None
    if isinstance(loaded, torch.Tensor) and _plain(loaded):
        offset = torch_archive.storage_offset(path, loaded)
    if offset is None:
        # Validated (or refused) as loaded. torch's mapping of the segment holds no claim on
        # it, so the segment must not be written again once ``raw`` goes.
        shared_rows.process_rows().forgo_reuse(raw)
        return loaded
    count = loaded.numel()
    return torch.frombuffer(raw, dtype=loaded.dtype, count=count, offset=offset).view(loaded.shape)

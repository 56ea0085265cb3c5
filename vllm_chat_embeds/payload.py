"""Decode and validate one prompt_embeds payload (extends ``vllm/renderers/embed_utils.py``).

Why our own decoder: the built-in accepts NaN/Inf, densifies sparse tensors under a
process-wide lock, and answers several bad payloads without naming the field. Here every
failure is a ``VLLMValidationError`` that names the part, sizes are checked before anything
large is allocated, and no global lock is taken.
"""

from __future__ import annotations

import binascii
import io
import pickle
from dataclasses import dataclass
from typing import Final

import torch

from . import errors
from .errors import reject

# A torch.save file is a zip; its overhead over the raw storage is small but not zero.
_BASE64_SLACK: Final = 4


@dataclass(frozen=True)
class PayloadSpec:
    """What a payload must look like for the model being served."""

    width: int
    dtype: torch.dtype
    max_part_bytes: int
    max_rows: int  # rows this part may still add to the request
    rows_limit: int  # the request-wide limit, for the message


def _decode_base64(data: str, where: str, spec: PayloadSpec) -> bytes:
    # The decoded size is known from the text length: refuse before decoding anything.
    approx = (len(data) // 4) * 3
    if approx > spec.max_part_bytes + _BASE64_SLACK:
        reject(errors.TOO_MANY_BYTES, where=where, size=approx, limit=spec.max_part_bytes)
    try:
        raw = binascii.a2b_base64(data.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        reason = "non-ASCII characters" if isinstance(exc, UnicodeEncodeError) else str(exc)
        reject(errors.NOT_BASE64, where=where, reason=reason)
    if not raw:
        reject(errors.DATA_EMPTY, where=where)
    return raw


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _load_tensor(raw: bytes, where: str) -> object:
    try:
        return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as exc:
        reject(errors.NOT_A_TENSOR_FILE, where=where, reason=_short(exc))
    except Exception as exc:  # torch raises many types for malformed archives
        reject(errors.NOT_A_TENSOR_FILE, where=where, reason=_short(exc))


def validate_tensor(value: object, where: str, spec: PayloadSpec) -> torch.Tensor:
    """Check shape, dtype, size and values; return a contiguous CPU tensor in the model dtype."""
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
    tensor = tensor.to(spec.dtype).contiguous()
    if not bool(torch.isfinite(tensor).all()):
        reject(errors.NOT_FINITE, where=where)
    return tensor


def decode_payload(data: object, where: str, spec: PayloadSpec) -> torch.Tensor:
    """Turn a part's ``data`` (base64 of ``torch.save`` or, offline, a tensor) into embeddings."""
    if isinstance(data, torch.Tensor):
        return validate_tensor(data, where, spec)
    if data is None:
        reject(errors.DATA_MISSING, where=where)
    if not isinstance(data, str):
        reject(errors.DATA_WRONG_TYPE, where=where, got=type(data).__name__)
    if not data:
        reject(errors.DATA_EMPTY, where=where)
    raw = _decode_base64(data, where, spec)
    return validate_tensor(_load_tensor(raw, where), where, spec)

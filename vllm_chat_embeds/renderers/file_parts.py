"""Rows sent as a standard OpenAI ``file`` content part (extends the part types of
``vllm/renderers/chat_utils.py``, which has none for files).

Why: client libraries and gateways (LiteLLM, LangChain, llama-index) refuse or drop a part type
they do not know, but pass OpenAI's ``file`` part through. A ``file`` part (chat completions:
``{"type": "file", "file": {...}}``; /v1/responses: ``{"type": "input_file", ...}``) holds rows
when its ``file_data`` is a safetensors file (recognised by a ``.safetensors`` filename, a
safetensors media type, or its first bytes: clients such as LangChain rewrite the media type
to ``application/pdf``), or when its ``file_id`` names rows this server holds (an upload's id,
or any part's ``uuid``). Such a part is served as the ``prompt_embeds`` part it stands for
(``as_embeds_part``): ``file_data`` as ``encoding: safetensors`` data, ``file_id`` as the
``uuid``. Any other ``file`` part is left to vLLM, which answers as it does without the plugin.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any, Final

import pybase64

from ..payload import looks_like_safetensors
from ..stores import references, shared_store
from ..stores.uploads import UPLOAD_ID_PREFIX

FILE_TYPES: Final = frozenset({"file", "input_file"})
SAFETENSORS_SUFFIX: Final = ".safetensors"
SAFETENSORS_MEDIA_TYPES: Final = frozenset(
    {"application/safetensors", "application/x-safetensors", "application/vnd.safetensors"}
)
# How far into ``file_data`` the comma ending a data URL's header may sit.
_MAX_DATA_URL_HEADER: Final = 256


def file_fields(part: object) -> Mapping[str, Any] | None:
    """The fields of a file part (``file_data``, ``file_id``, ``filename``), or None."""
    if not isinstance(part, Mapping) or part.get("type") not in FILE_TYPES:
        return None
    fields = part.get("file") if part.get("type") == "file" else part
    return fields if isinstance(fields, Mapping) else None


def _split_data_url(data: str) -> tuple[str | None, int]:
    """A ``data:<media type>;base64,`` URL's media type and where its base64 starts (bare
    base64: no media type, 0)."""
    if not data.startswith("data:"):
        return None, 0
    comma = data.find(",", 0, _MAX_DATA_URL_HEADER)
    if comma < 0:
        return None, 0
    return data[5:comma].split(";")[0].strip().lower(), comma + 1


def _sniff(data: str, start: int) -> bool:
    try:
        prefix = pybase64.b64decode(data[start : start + 12], validate=True)
    except (binascii.Error, ValueError):
        return False
    return looks_like_safetensors(prefix)


def holds_rows(part: object) -> bool:
    """Whether ``part`` is a file part holding rows (cheap: reads at most 12 characters)."""
    fields = file_fields(part)
    if fields is None:
        return False
    data = fields.get("file_data")
    if isinstance(data, str) and data:
        media, start = _split_data_url(data)
        name = fields.get("filename")
        if isinstance(name, str) and name.lower().endswith(SAFETENSORS_SUFFIX):
            return True
        return media in SAFETENSORS_MEDIA_TYPES or _sniff(data, start)
    file_id = fields.get("file_id")
    if not isinstance(file_id, str) or not file_id:
        return False
    return (
        file_id.startswith(UPLOAD_ID_PREFIX)
        or references.process_store().peek(file_id) is not None
        or shared_store.exists(file_id)
    )


def as_embeds_part(part: Mapping[str, Any]) -> dict[str, Any]:
    """The prompt_embeds part a file part holding rows stands for."""
    fields = file_fields(part) or {}
    out: dict[str, Any] = {"type": "prompt_embeds"}
    data = fields.get("file_data")
    if isinstance(data, str) and data:
        _, start = _split_data_url(data)
        out["encoding"] = "safetensors"
        out["data"] = data[start:] if start else data
    if fields.get("file_id") is not None:
        out["uuid"] = fields["file_id"]
    return out
